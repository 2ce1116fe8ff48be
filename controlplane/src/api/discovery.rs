//! Discovery documents: /version, /api, /apis and the resource lists per group version,
//! legacy and aggregated (apidiscovery.k8s.io/v2), built from the resource table.
use serde_json::{Value, json};

use super::resources::{RESOURCES, Resource, groups};

pub const GIT_VERSION: &str = "v1.32.0-capstan";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": GIT_VERSION,
        "gitCommit": "capstan",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "rust",
        "compiler": "rustc",
        "platform": "linux/amd64",
    })
}

fn verbs(r: &Resource) -> Vec<&'static str> {
    let _ = r;
    vec![
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    ]
}

fn resources_of(group: &str, version: &str) -> impl Iterator<Item = &'static Resource> {
    let (g, v) = (group.to_string(), version.to_string());
    RESOURCES
        .iter()
        .filter(move |r| r.group == g && r.version == v)
}

/// APIResourceList for one group version (legacy discovery).
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut list = Vec::new();
    for r in resources_of(group, version) {
        let mut main = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": verbs(r),
            "storageVersionHash": "",
        });
        if !r.short_names.is_empty() {
            main["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            main["categories"] = json!(r.categories);
        }
        list.push(main);
        for sub in r.subresources {
            let (kind, group_version, verbs) = match *sub {
                "scale" => (
                    "Scale",
                    Some("autoscaling/v1"),
                    vec!["get", "patch", "update"],
                ),
                "binding" => ("Binding", None, vec!["create"]),
                _ => (r.kind, None, vec!["get", "patch", "update"]),
            };
            let mut s = json!({
                "name": format!("{}/{sub}", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": kind,
                "verbs": verbs,
            });
            if let Some(gv) = group_version {
                let (g, v) = gv.split_once('/').unwrap_or(("", gv));
                s["group"] = json!(g);
                s["version"] = json!(v);
            }
            list.push(s);
        }
    }
    if list.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}),
    )
}

/// /api
pub fn core_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
    })
}

fn group_doc(group: &str) -> Value {
    let versions: Vec<Value> = groups()
        .into_iter()
        .filter(|(g, _)| *g == group)
        .map(|(g, v)| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    json!({
        "name": group,
        "versions": versions,
        "preferredVersion": versions.first().cloned().unwrap_or(Value::Null),
    })
}

/// /apis (legacy): APIGroupList of the named groups.
pub fn group_list() -> Value {
    let mut names: Vec<&str> = Vec::new();
    for (g, _) in groups() {
        if !g.is_empty() && !names.contains(&g) {
            names.push(g);
        }
    }
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": names.iter().map(|g| group_doc(g)).collect::<Vec<_>>(),
    })
}

/// /apis/{group}
pub fn group(group: &str) -> Option<Value> {
    if !groups().iter().any(|(g, _)| *g == group && !g.is_empty()) {
        return None;
    }
    let mut doc = group_doc(group);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

/// Aggregated discovery (apidiscovery.k8s.io/v2 APIGroupDiscoveryList) for the core group
/// (`legacy`) or the named groups.
pub fn aggregated(legacy: bool, api_version: &str) -> Value {
    let mut items = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    for (g, _) in groups() {
        if g.is_empty() == legacy && !names.contains(&g) {
            names.push(g);
        }
    }
    for g in names {
        let versions: Vec<Value> = groups()
            .into_iter()
            .filter(|(gg, _)| *gg == g)
            .map(|(_, v)| {
                let resources: Vec<Value> = resources_of(g, v)
                    .map(|r| {
                        let subs: Vec<Value> = r
                            .subresources
                            .iter()
                            .map(|sub| {
                                let (kind, gv, verbs) = match *sub {
                                    "scale" => ("Scale", json!({"group": "autoscaling", "version": "v1", "kind": "Scale"}), vec!["get", "patch", "update"]),
                                    "binding" => ("Binding", json!({"group": "", "version": "v1", "kind": "Binding"}), vec!["create"]),
                                    _ => (r.kind, json!({"group": r.group, "version": r.version, "kind": r.kind}), vec!["get", "patch", "update"]),
                                };
                                let _ = kind;
                                json!({"subresource": sub, "responseKind": gv, "verbs": verbs})
                            })
                            .collect();
                        let mut res = json!({
                            "resource": r.plural,
                            "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
                            "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                            "singularResource": r.singular,
                            "verbs": verbs(r),
                        });
                        if !r.short_names.is_empty() {
                            res["shortNames"] = json!(r.short_names);
                        }
                        if !r.categories.is_empty() {
                            res["categories"] = json!(r.categories);
                        }
                        if !subs.is_empty() {
                            res["subresources"] = json!(subs);
                        }
                        res
                    })
                    .collect();
                json!({"version": v, "resources": resources, "freshness": "Current"})
            })
            .collect();
        items.push(json!({"metadata": {"name": g}, "versions": versions}));
    }
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": api_version, "metadata": {}, "items": items})
}

/// Whether the client asked for aggregated discovery; returns the version to answer with.
pub fn wants_aggregated(accept: &str) -> Option<&'static str> {
    for part in accept.split(',') {
        if part.contains("as=APIGroupDiscoveryList") && part.contains("g=apidiscovery.k8s.io") {
            if part.contains("v=v2beta1") {
                return Some("v2beta1");
            }
            if part.contains("v=v2") {
                return Some("v2");
            }
        }
    }
    None
}

/// The OpenAPI v3 index: one document per group version.
pub fn openapi_v3_index() -> Value {
    let mut paths = serde_json::Map::new();
    for (g, v) in groups() {
        let p = if g.is_empty() {
            format!("api/{v}")
        } else {
            format!("apis/{g}/{v}")
        };
        paths.insert(p.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash=capstan-{}", super::discovery::GIT_VERSION)}));
    }
    json!({"paths": paths})
}

/// One group version's OpenAPI v3 document: every operation on every resource, marked
/// with its group/version/kind and accepting `fieldValidation` (so kubectl lets the server
/// validate, strictly, instead of validating against a schema itself).
pub fn openapi_v3(group: &str, version: &str) -> Option<Value> {
    let mut paths = serde_json::Map::new();
    let mut found = false;
    let param = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
    for r in resources_of(group, version) {
        found = true;
        let base = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let gvk = json!({"group": group, "version": version, "kind": r.kind});
        let op = |action: &str| {
            json!({
                "operationId": format!("{action}{}", r.kind),
                "parameters": [param("fieldValidation"), param("fieldManager"), param("dryRun")],
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
            })
        };
        let (collection, item) = if r.namespaced {
            (
                format!("{base}/namespaces/{{namespace}}/{}", r.plural),
                format!("{base}/namespaces/{{namespace}}/{}/{{name}}", r.plural),
            )
        } else {
            (
                format!("{base}/{}", r.plural),
                format!("{base}/{}/{{name}}", r.plural),
            )
        };
        paths.insert(
            collection,
            json!({"get": op("list"), "post": op("post"), "delete": op("deletecollection")}),
        );
        paths.insert(item.clone(), json!({"get": op("get"), "put": op("put"), "patch": op("patch"), "delete": op("delete")}));
        for sub in r.subresources {
            paths.insert(
                format!("{item}/{sub}"),
                json!({"get": op("get"), "put": op("put"), "patch": op("patch")}),
            );
        }
    }
    found.then(|| {
        json!({
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": GIT_VERSION},
            "paths": paths,
            "components": {"schemas": {}},
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_covers_the_table() {
        let core = resource_list("", "v1").unwrap();
        let names: Vec<&str> = core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        for n in [
            "services",
            "services/status",
            "pods/binding",
            "namespaces",
            "nodes",
        ] {
            assert!(names.contains(&n), "{n}");
        }
        assert!(resource_list("apps", "v1").is_some());
        assert!(resource_list("nope", "v1").is_none());
        let groups = group_list();
        assert!(
            groups["groups"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g["name"] == "discovery.k8s.io")
        );
        let agg = aggregated(false, "apidiscovery.k8s.io/v2");
        assert!(agg["items"].as_array().unwrap().len() >= 3);
        assert_eq!(
            wants_aggregated(
                "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
            ),
            Some("v2")
        );
        assert_eq!(wants_aggregated("application/json"), None);
    }
}
