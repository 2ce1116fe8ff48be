//! The resources capstan-server serves, as data: adding one is adding an entry to
//! [`RESOURCES`] (and, when it has them, its table columns and validation).
use serde_json::{Value, json};

/// A column of `kubectl get` for a resource (meta.k8s.io/v1 Table).
pub struct Column {
    pub name: &'static str,
    pub kind: &'static str,
    pub priority: u8,
    pub description: &'static str,
    pub cell: fn(&Value) -> Value,
}

/// One resource: where it lives in the API and how it looks.
pub struct Resource {
    /// API group; "" for the legacy core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Subresources besides the object itself ("status", "scale", "binding").
    pub subresources: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// Columns after NAME (AGE comes last for every resource).
    pub columns: &'static [Column],
}

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.api_version(), self.plural)
    }
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// The storage prefix of this resource's objects (all namespaces).
    pub fn prefix(&self) -> String {
        let group = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        format!("/registry/{group}/{}/", self.plural)
    }

    /// The storage prefix for one namespace (or the whole resource when cluster-scoped).
    pub fn ns_prefix(&self, namespace: Option<&str>) -> String {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("{}{ns}/", self.prefix()),
            _ => self.prefix(),
        }
    }

    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{name}", self.ns_prefix(namespace))
    }

    pub fn has_subresource(&self, sub: &str) -> bool {
        self.subresources.contains(&sub)
    }
}

fn s(v: &Value, path: &[&str]) -> Value {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(x) => cur = x,
            None => return Value::String("<none>".into()),
        }
    }
    match cur {
        Value::String(_) | Value::Number(_) | Value::Bool(_) => cur.clone(),
        Value::Null => Value::String("<none>".into()),
        other => Value::String(other.to_string()),
    }
}

fn join(items: Vec<String>) -> Value {
    if items.is_empty() {
        Value::String("<none>".into())
    } else {
        Value::String(items.join(","))
    }
}

fn svc_type(v: &Value) -> Value {
    v.pointer("/spec/type")
        .cloned()
        .unwrap_or_else(|| json!("ClusterIP"))
}

fn svc_external(v: &Value) -> Value {
    let mut ips: Vec<String> = Vec::new();
    for i in v
        .pointer("/status/loadBalancer/ingress")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
    {
        if let Some(ip) = i.get("ip").or(i.get("hostname")).and_then(|x| x.as_str()) {
            ips.push(ip.into());
        }
    }
    for ip in v
        .pointer("/spec/externalIPs")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str())
    {
        ips.push(ip.into());
    }
    if ips.is_empty() && v.pointer("/spec/type").and_then(|x| x.as_str()) == Some("LoadBalancer") {
        return json!("<pending>");
    }
    join(ips)
}

fn svc_ports(v: &Value) -> Value {
    let ports = v
        .pointer("/spec/ports")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
        .map(|p| {
            let port = p.get("port").and_then(|x| x.as_i64()).unwrap_or(0);
            let proto = p.get("protocol").and_then(|x| x.as_str()).unwrap_or("TCP");
            match p.get("nodePort").and_then(|x| x.as_i64()) {
                Some(np) => format!("{port}:{np}/{proto}"),
                None => format!("{port}/{proto}"),
            }
        })
        .collect();
    join(ports)
}

fn endpoints_of_slice(v: &Value) -> Value {
    let addrs: Vec<String> = v
        .get("endpoints")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
        .filter_map(|e| {
            e.get("addresses")?
                .as_array()?
                .first()?
                .as_str()
                .map(String::from)
        })
        .collect();
    join(addrs)
}

fn slice_ports(v: &Value) -> Value {
    join(
        v.get("ports")
            .and_then(|x| x.as_array())
            .into_iter()
            .flatten()
            .filter_map(|p| {
                p.get("port")
                    .and_then(|x| x.as_i64())
                    .map(|p| p.to_string())
            })
            .collect(),
    )
}

fn node_status(v: &Value) -> Value {
    let ready = v
        .pointer("/status/conditions")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
        .find(|c| c.get("type").and_then(|t| t.as_str()) == Some("Ready"))
        .and_then(|c| c.get("status").and_then(|s| s.as_str()).map(String::from));
    let mut st = match ready.as_deref() {
        Some("True") => "Ready".to_string(),
        _ => "NotReady".to_string(),
    };
    if v.pointer("/spec/unschedulable").and_then(|x| x.as_bool()) == Some(true) {
        st.push_str(",SchedulingDisabled");
    }
    json!(st)
}

fn pod_ready(v: &Value) -> Value {
    let statuses = v
        .pointer("/status/containerStatuses")
        .and_then(|x| x.as_array());
    let total = v
        .pointer("/spec/containers")
        .and_then(|x| x.as_array())
        .map_or(0, |c| c.len());
    let ready = statuses
        .into_iter()
        .flatten()
        .filter(|c| c.get("ready").and_then(|r| r.as_bool()) == Some(true))
        .count();
    json!(format!("{ready}/{total}"))
}

fn pod_restarts(v: &Value) -> Value {
    json!(
        v.pointer("/status/containerStatuses")
            .and_then(|x| x.as_array())
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("restartCount").and_then(|r| r.as_i64()))
            .sum::<i64>()
    )
}

fn replicas_ready(v: &Value) -> Value {
    let want = v
        .pointer("/spec/replicas")
        .and_then(|x| x.as_i64())
        .unwrap_or(1);
    let ready = v
        .pointer("/status/readyReplicas")
        .and_then(|x| x.as_i64())
        .unwrap_or(0);
    json!(format!("{ready}/{want}"))
}

fn num(v: &Value, path: &str) -> Value {
    json!(v.pointer(path).and_then(|x| x.as_i64()).unwrap_or(0))
}

fn containers(v: &Value, field: &str) -> Value {
    join(
        v.pointer("/spec/template/spec/containers")
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
            .filter_map(|c| c.get(field).and_then(|x| x.as_str()).map(String::from))
            .collect(),
    )
}

fn selector(v: &Value) -> Value {
    join(
        v.pointer("/spec/selector/matchLabels")
            .and_then(|m| m.as_object())
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect(),
    )
}

fn role_ref(v: &Value) -> Value {
    json!(format!(
        "{}/{}",
        v.pointer("/roleRef/kind")
            .and_then(|x| x.as_str())
            .unwrap_or(""),
        v.pointer("/roleRef/name")
            .and_then(|x| x.as_str())
            .unwrap_or("")
    ))
}

fn data_count(v: &Value) -> Value {
    json!(
        v.get("data")
            .and_then(|d| d.as_object())
            .map_or(0, |d| d.len())
    )
}

macro_rules! col {
    ($name:expr, $kind:expr, $prio:expr, $f:expr) => {
        Column {
            name: $name,
            kind: $kind,
            priority: $prio,
            description: "",
            cell: $f,
        }
    };
}

pub static RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        singular: "namespace",
        namespaced: false,
        short_names: &["ns"],
        subresources: &["status"],
        categories: &[],
        columns: &[col!("Status", "string", 0, |v| s(v, &["status", "phase"]))],
    },
    Resource {
        group: "",
        version: "v1",
        kind: "Node",
        plural: "nodes",
        singular: "node",
        namespaced: false,
        short_names: &["no"],
        subresources: &["status"],
        categories: &[],
        columns: &[
            col!("Status", "string", 0, node_status),
            col!("Version", "string", 0, |v| s(
                v,
                &["status", "nodeInfo", "kubeletVersion"]
            )),
            col!("Internal-IP", "string", 1, |v| {
                v.pointer("/status/addresses")
                    .and_then(|a| a.as_array())
                    .and_then(|a| {
                        a.iter()
                            .find(|x| x.get("type").and_then(|t| t.as_str()) == Some("InternalIP"))
                    })
                    .and_then(|x| x.get("address").cloned())
                    .unwrap_or_else(|| json!("<none>"))
            }),
        ],
    },
    Resource {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        singular: "pod",
        namespaced: true,
        short_names: &["po"],
        subresources: &["status", "binding"],
        categories: &["all"],
        columns: &[
            col!("Ready", "string", 0, pod_ready),
            col!("Status", "string", 0, |v| s(v, &["status", "phase"])),
            col!("Restarts", "integer", 0, pod_restarts),
            col!("IP", "string", 1, |v| s(v, &["status", "podIP"])),
            col!("Node", "string", 1, |v| s(v, &["spec", "nodeName"])),
        ],
    },
    Resource {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        singular: "service",
        namespaced: true,
        short_names: &["svc"],
        subresources: &["status"],
        categories: &["all"],
        columns: &[
            col!("Type", "string", 0, svc_type),
            col!("Cluster-IP", "string", 0, |v| s(v, &["spec", "clusterIP"])),
            col!("External-IP", "string", 0, svc_external),
            col!("Port(s)", "string", 0, svc_ports),
            col!("Selector", "string", 1, |v| {
                join(
                    v.pointer("/spec/selector")
                        .and_then(|x| x.as_object())
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect(),
                )
            }),
        ],
    },
    Resource {
        group: "",
        version: "v1",
        kind: "Endpoints",
        plural: "endpoints",
        singular: "endpoints",
        namespaced: true,
        short_names: &["ep"],
        subresources: &[],
        categories: &[],
        columns: &[col!("Endpoints", "string", 0, |v| {
            join(
                v.get("subsets")
                    .and_then(|x| x.as_array())
                    .into_iter()
                    .flatten()
                    .flat_map(|s| {
                        let ports: Vec<i64> = s
                            .get("ports")
                            .and_then(|p| p.as_array())
                            .into_iter()
                            .flatten()
                            .filter_map(|p| p.get("port").and_then(|x| x.as_i64()))
                            .collect();
                        s.get("addresses")
                            .and_then(|a| a.as_array())
                            .into_iter()
                            .flatten()
                            .filter_map(|a| a.get("ip").and_then(|x| x.as_str()))
                            .flat_map(move |ip| {
                                let ports = ports.clone();
                                ports.into_iter().map(move |p| format!("{ip}:{p}"))
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect(),
            )
        })],
    },
    Resource {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        singular: "endpointslice",
        namespaced: true,
        short_names: &[],
        subresources: &[],
        categories: &[],
        columns: &[
            col!("AddressType", "string", 0, |v| s(v, &["addressType"])),
            col!("Ports", "string", 0, slice_ports),
            col!("Endpoints", "string", 0, endpoints_of_slice),
        ],
    },
    Resource {
        group: "",
        version: "v1",
        kind: "ConfigMap",
        plural: "configmaps",
        singular: "configmap",
        namespaced: true,
        short_names: &["cm"],
        subresources: &[],
        categories: &[],
        columns: &[col!("Data", "integer", 0, data_count)],
    },
    Resource {
        group: "",
        version: "v1",
        kind: "Secret",
        plural: "secrets",
        singular: "secret",
        namespaced: true,
        short_names: &[],
        subresources: &[],
        categories: &[],
        columns: &[
            col!("Type", "string", 0, |v| s(v, &["type"])),
            col!("Data", "integer", 0, data_count),
        ],
    },
    Resource {
        group: "",
        version: "v1",
        kind: "Event",
        plural: "events",
        singular: "event",
        namespaced: true,
        short_names: &["ev"],
        subresources: &[],
        categories: &[],
        columns: &[
            col!("Type", "string", 0, |v| s(v, &["type"])),
            col!("Reason", "string", 0, |v| s(v, &["reason"])),
            col!("Message", "string", 0, |v| s(v, &["message"])),
        ],
    },
    Resource {
        group: "",
        version: "v1",
        kind: "ServiceAccount",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        namespaced: true,
        short_names: &["sa"],
        subresources: &[],
        categories: &[],
        columns: &[],
    },
    Resource {
        group: "coordination.k8s.io",
        version: "v1",
        kind: "Lease",
        plural: "leases",
        singular: "lease",
        namespaced: true,
        short_names: &[],
        subresources: &[],
        categories: &[],
        columns: &[col!("Holder", "string", 0, |v| s(
            v,
            &["spec", "holderIdentity"]
        ))],
    },
    Resource {
        group: "apps",
        version: "v1",
        kind: "Deployment",
        plural: "deployments",
        singular: "deployment",
        namespaced: true,
        short_names: &["deploy"],
        subresources: &["status", "scale"],
        categories: &["all"],
        columns: &[
            col!("Ready", "string", 0, replicas_ready),
            col!("Up-to-date", "integer", 0, |v| num(
                v,
                "/status/updatedReplicas"
            )),
            col!("Available", "integer", 0, |v| num(
                v,
                "/status/availableReplicas"
            )),
            col!("Containers", "string", 1, |v| containers(v, "name")),
            col!("Images", "string", 1, |v| containers(v, "image")),
            col!("Selector", "string", 1, selector),
        ],
    },
    Resource {
        group: "apps",
        version: "v1",
        kind: "ReplicaSet",
        plural: "replicasets",
        singular: "replicaset",
        namespaced: true,
        short_names: &["rs"],
        subresources: &["status", "scale"],
        categories: &["all"],
        columns: &[
            col!("Desired", "integer", 0, |v| num(v, "/spec/replicas")),
            col!("Current", "integer", 0, |v| num(v, "/status/replicas")),
            col!("Ready", "integer", 0, |v| num(v, "/status/readyReplicas")),
        ],
    },
    Resource {
        group: "apps",
        version: "v1",
        kind: "DaemonSet",
        plural: "daemonsets",
        singular: "daemonset",
        namespaced: true,
        short_names: &["ds"],
        subresources: &["status"],
        categories: &["all"],
        columns: &[
            col!("Desired", "integer", 0, |v| num(
                v,
                "/status/desiredNumberScheduled"
            )),
            col!("Current", "integer", 0, |v| num(
                v,
                "/status/currentNumberScheduled"
            )),
            col!("Ready", "integer", 0, |v| num(v, "/status/numberReady")),
        ],
    },
    Resource {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "Role",
        plural: "roles",
        singular: "role",
        namespaced: true,
        short_names: &[],
        subresources: &[],
        categories: &[],
        columns: &[],
    },
    Resource {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "ClusterRole",
        plural: "clusterroles",
        singular: "clusterrole",
        namespaced: false,
        short_names: &[],
        subresources: &[],
        categories: &[],
        columns: &[],
    },
    Resource {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "RoleBinding",
        plural: "rolebindings",
        singular: "rolebinding",
        namespaced: true,
        short_names: &[],
        subresources: &[],
        categories: &[],
        columns: &[col!("Role", "string", 0, role_ref)],
    },
    Resource {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "ClusterRoleBinding",
        plural: "clusterrolebindings",
        singular: "clusterrolebinding",
        namespaced: false,
        short_names: &[],
        subresources: &[],
        categories: &[],
        columns: &[col!("Role", "string", 0, role_ref)],
    },
];

/// The resource served at `group`/`version` under this plural name.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Groups and their versions, in discovery order (core first).
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_resource_is_unique_and_findable() {
        for r in RESOURCES {
            assert_eq!(
                find(r.group, r.version, r.plural).map(|x| x.kind),
                Some(r.kind)
            );
            assert_eq!(
                RESOURCES.iter().filter(|x| x.kind == r.kind).count(),
                1,
                "{}",
                r.kind
            );
        }
        assert_eq!(groups()[0], ("", "v1"));
    }

    #[test]
    fn service_columns_read_like_kubectl() {
        let svc = json!({"spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
            "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]}});
        let r = find("", "v1", "services").unwrap();
        let cells: Vec<Value> = r.columns.iter().map(|c| (c.cell)(&svc)).collect();
        assert_eq!(cells[0], json!("NodePort"));
        assert_eq!(cells[1], json!("10.96.0.10"));
        assert_eq!(cells[2], json!("<none>"));
        assert_eq!(cells[3], json!("80:30080/TCP,53/UDP"));
    }
}
