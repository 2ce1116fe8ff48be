//! RBAC authorization, pure: Roles, ClusterRoles and their bindings (as JSON objects)
//! decide whether a user may do a verb on a resource, as kube-apiserver's RBAC authorizer
//! does. `system:masters` may do everything.
use serde_json::{Value, json};

use crate::auth::User;

/// What a request does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    /// `services`, or `services/status` for a subresource.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// The RBAC objects in force.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub roles: Vec<Value>,
    pub cluster_roles: Vec<Value>,
    pub role_bindings: Vec<Value>,
    pub cluster_role_bindings: Vec<Value>,
}

fn strs(v: &Value, field: &str) -> Vec<String> {
    v.get(field)
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(String::from))
        .collect()
}

fn any_match(list: &[String], want: &str) -> bool {
    list.iter().any(|x| x == "*" || x == want)
}

fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    let verbs = strs(rule, "verbs");
    let groups = strs(rule, "apiGroups");
    let resources = strs(rule, "resources");
    let names = strs(rule, "resourceNames");
    let resource_ok = resources.iter().any(|r| {
        r == "*"
            || *r == a.resource
            || (r.ends_with("/*") && a.resource.starts_with(&r[..r.len() - 1]))
    });
    any_match(&verbs, &a.verb)
        && any_match(&groups, &a.group)
        && resource_ok
        && (names.is_empty()
            || a.name
                .as_deref()
                .is_some_and(|n| names.iter().any(|x| x == n)))
}

fn subject_matches(s: &Value, user: &User) -> bool {
    let name = s.get("name").and_then(|n| n.as_str()).unwrap_or("");
    match s.get("kind").and_then(|k| k.as_str()) {
        Some("User") => name == user.name,
        Some("Group") => user.groups.iter().any(|g| g == name),
        Some("ServiceAccount") => {
            let ns = s.get("namespace").and_then(|n| n.as_str()).unwrap_or("");
            user.name == format!("system:serviceaccount:{ns}:{name}")
        }
        _ => false,
    }
}

impl Policy {
    fn role(&self, kind: &str, name: &str, namespace: Option<&str>) -> Option<&Value> {
        let pool = if kind == "ClusterRole" {
            &self.cluster_roles
        } else {
            &self.roles
        };
        pool.iter().find(|r| {
            r.pointer("/metadata/name").and_then(|n| n.as_str()) == Some(name)
                && (kind == "ClusterRole"
                    || r.pointer("/metadata/namespace").and_then(|n| n.as_str()) == namespace)
        })
    }

    fn binding_allows(
        &self,
        b: &Value,
        user: &User,
        a: &Attributes,
        namespace: Option<&str>,
    ) -> bool {
        if !b
            .get("subjects")
            .and_then(|s| s.as_array())
            .into_iter()
            .flatten()
            .any(|s| subject_matches(s, user))
        {
            return false;
        }
        let kind = b
            .pointer("/roleRef/kind")
            .and_then(|k| k.as_str())
            .unwrap_or("");
        let name = b
            .pointer("/roleRef/name")
            .and_then(|k| k.as_str())
            .unwrap_or("");
        self.role(kind, name, namespace)
            .and_then(|r| r.get("rules"))
            .and_then(|r| r.as_array())
            .into_iter()
            .flatten()
            .any(|rule| rule_allows(rule, a))
    }

    /// Whether `user` may do `a`.
    pub fn allows(&self, user: &User, a: &Attributes) -> bool {
        if user.groups.iter().any(|g| g == "system:masters") {
            return true;
        }
        if self
            .cluster_role_bindings
            .iter()
            .any(|b| self.binding_allows(b, user, a, None))
        {
            return true;
        }
        let Some(ns) = a.namespace.as_deref() else {
            return false;
        };
        self.role_bindings
            .iter()
            .filter(|b| b.pointer("/metadata/namespace").and_then(|n| n.as_str()) == Some(ns))
            .any(|b| self.binding_allows(b, user, a, Some(ns)))
    }
}

/// kube-apiserver's message for a refused request.
pub fn forbidden_message(user: &User, a: &Attributes) -> String {
    let what = match &a.name {
        Some(n) => format!("{} \"{n}\"", a.resource.split('/').next().unwrap_or("")),
        None => a.resource.split('/').next().unwrap_or("").to_string(),
    };
    let scope = match &a.namespace {
        Some(ns) => format!(" in the namespace \"{ns}\""),
        None => " at the cluster scope".to_string(),
    };
    format!(
        "{what} is forbidden: User \"{}\" cannot {} resource \"{}\" in API group \"{}\"{scope}",
        user.name, a.verb, a.resource, a.group
    )
}

/// The roles capstan-server keeps in place (kube-apiserver's bootstrap policy, the part
/// capstan's agents need), and their bindings.
pub fn bootstrap_objects() -> Vec<Value> {
    let cr = |name: &str, rules: Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}}, "rules": rules})
    };
    let crb = |name: &str, role: &str, subject: Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [subject]})
    };
    vec![
        cr(
            "cluster-admin",
            json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]),
        ),
        // kube-proxy's role: read Services, EndpointSlices and Nodes; write Events.
        cr(
            "system:node-proxier",
            json!([
                {"apiGroups": [""], "resources": ["services", "endpoints", "nodes"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch", "update"]},
            ]),
        ),
        // A node agent: its Node and its Lease.
        cr(
            "system:node",
            json!([
                {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "create", "update", "patch"]},
                {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch", "update"]},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update", "patch"]},
                {"apiGroups": [""], "resources": ["services", "endpoints", "pods"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch", "update"]},
            ]),
        ),
        crb(
            "cluster-admin",
            "cluster-admin",
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:masters"}),
        ),
        crb(
            "system:node-proxier",
            "system:node-proxier",
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:kube-proxy"}),
        ),
        crb(
            "system:node",
            "system:node",
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str]) -> User {
        User {
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn attrs(verb: &str, group: &str, resource: &str, ns: Option<&str>) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: ns.map(String::from),
            name: None,
        }
    }

    fn policy() -> Policy {
        let mut p = Policy::default();
        for o in bootstrap_objects() {
            match o["kind"].as_str().unwrap() {
                "ClusterRole" => p.cluster_roles.push(o),
                _ => p.cluster_role_bindings.push(o),
            }
        }
        p.roles.push(json!({"metadata": {"name": "cm-reader", "namespace": "team"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": ["one"]}]}));
        p.role_bindings.push(json!({"metadata": {"name": "b", "namespace": "team"},
            "roleRef": {"kind": "Role", "name": "cm-reader"}, "subjects": [{"kind": "User", "name": "alice"}]}));
        p
    }

    #[test]
    fn the_proxy_reads_and_nothing_more() {
        let p = policy();
        let proxy = user("system:kube-proxy", &[]);
        assert!(p.allows(&proxy, &attrs("watch", "", "services", None)));
        assert!(p.allows(
            &proxy,
            &attrs("list", "discovery.k8s.io", "endpointslices", None)
        ));
        assert!(p.allows(&proxy, &attrs("get", "", "nodes", None)));
        assert!(!p.allows(&proxy, &attrs("create", "", "services", Some("default"))));
        assert!(!p.allows(
            &proxy,
            &attrs("update", "", "services/status", Some("default"))
        ));
        assert!(!p.allows(&proxy, &attrs("list", "", "secrets", None)));
        assert!(p.allows(
            &user("x", &["system:masters"]),
            &attrs("delete", "", "secrets", Some("a"))
        ));
        let node = user("system:node:n1", &["system:nodes"]);
        assert!(p.allows(
            &node,
            &attrs(
                "update",
                "coordination.k8s.io",
                "leases",
                Some("kube-node-lease")
            )
        ));
        assert!(!p.allows(&node, &attrs("delete", "", "nodes", None)));
    }

    #[test]
    fn role_bindings_are_namespaced_and_names_restrict() {
        let p = policy();
        let alice = user("alice", &[]);
        let mut a = attrs("get", "", "configmaps", Some("team"));
        a.name = Some("one".into());
        assert!(p.allows(&alice, &a));
        a.name = Some("two".into());
        assert!(!p.allows(&alice, &a));
        a.name = Some("one".into());
        a.namespace = Some("other".into());
        assert!(!p.allows(&alice, &a));
        assert_eq!(
            forbidden_message(&alice, &attrs("create", "", "services", Some("default"))),
            "services is forbidden: User \"alice\" cannot create resource \"services\" in API group \"\" in the namespace \"default\""
        );
    }
}
