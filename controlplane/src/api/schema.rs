//! The built-in types' schemas, from k8s-openapi: an object is decoded into its typed
//! form and encoded back; a field that does not survive the round trip is not in the
//! schema (an unknown field), and a value that does not decode has the wrong type.
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Endpoints, Event, Namespace, Node, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn roundtrip<T: DeserializeOwned + Serialize>(v: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(typed).map_err(|e| e.to_string())
}

/// Paths (`.spec.foo`) of fields in `orig` that are not in `typed`.
fn unknown(orig: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, typed) {
        (Value::Object(o), Value::Object(t)) => {
            for (k, v) in o {
                let p = format!("{path}.{k}");
                match t.get(k) {
                    Some(tv) => unknown(v, tv, &p, out),
                    None if v.is_null() => {}
                    // An empty map or list may be dropped by the typed form.
                    None if v.as_object().is_some_and(|m| m.is_empty())
                        || v.as_array().is_some_and(|a| a.is_empty()) => {}
                    None => out.push(p),
                }
            }
        }
        (Value::Array(o), Value::Array(t)) => {
            for (i, (ov, tv)) in o.iter().zip(t).enumerate() {
                unknown(ov, tv, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Checks an object of a built-in kind against its schema: `Err` with the decoding error
/// for a value of the wrong type, else the unknown fields (empty when all are known).
pub fn check(kind: &str, v: &Value) -> Result<Vec<String>, String> {
    decode(kind, v).map(|(_, unknown)| unknown)
}

/// The object as its typed form has it (unknown fields dropped, as kube-apiserver stores
/// it), and the unknown fields; `Err` for a value of the wrong type. Kinds without a
/// schema come back as they are.
pub fn decode(kind: &str, v: &Value) -> Result<(Value, Vec<String>), String> {
    let typed = match kind {
        "Namespace" => roundtrip::<Namespace>(v),
        "Node" => roundtrip::<Node>(v),
        "Pod" => roundtrip::<Pod>(v),
        "Service" => roundtrip::<Service>(v),
        "Endpoints" => roundtrip::<Endpoints>(v),
        "EndpointSlice" => roundtrip::<EndpointSlice>(v),
        "ConfigMap" => roundtrip::<ConfigMap>(v),
        "Secret" => roundtrip::<Secret>(v),
        "Event" => roundtrip::<Event>(v),
        "ServiceAccount" => roundtrip::<ServiceAccount>(v),
        "Lease" => roundtrip::<Lease>(v),
        "Deployment" => roundtrip::<Deployment>(v),
        "ReplicaSet" => roundtrip::<ReplicaSet>(v),
        "DaemonSet" => roundtrip::<DaemonSet>(v),
        "Role" => roundtrip::<Role>(v),
        "ClusterRole" => roundtrip::<ClusterRole>(v),
        "RoleBinding" => roundtrip::<RoleBinding>(v),
        "ClusterRoleBinding" => roundtrip::<ClusterRoleBinding>(v),
        _ => return Ok((v.clone(), Vec::new())),
    }?;
    let mut out = Vec::new();
    unknown(v, &typed, "", &mut out);
    Ok((typed, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_fields_and_wrong_types_are_found() {
        let ok = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "labels": {}},
            "spec": {"ports": [{"port": 80, "targetPort": "http"}], "selector": null}});
        assert_eq!(check("Service", &ok).unwrap(), Vec::<String>::new());
        let extra = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"},
            "spec": {"bogus": 1, "ports": [{"port": 80, "nope": true}]}});
        assert_eq!(
            check("Service", &extra).unwrap(),
            vec![".spec.bogus", ".spec.ports[0].nope"]
        );
        let wrong = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"ports": [{"port": "eighty"}]}});
        assert!(check("Service", &wrong).is_err());
        assert!(check("Unknown", &wrong).unwrap().is_empty());
    }
}
