//! The Kubernetes REST API over the store: one generic handler for every resource in the
//! [`resources`] table (get, list, watch, create, update, patch, delete, deletecollection,
//! subresources), discovery, Table responses for kubectl, and admission for Services and
//! EndpointSlices.
pub mod admission;
pub mod discovery;
pub mod meta;
pub mod rbac;
pub mod resources;
pub mod schema;
pub mod status;
mod table;
mod watch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tracing::{debug, warn};

use crate::store::{Expect, KeyValue, Store, StoreError, Write, mvcc};
use resources::Resource;
use status::ApiError;

/// Objects larger than this are refused (kube-apiserver's 1.5 MiB etcd limit).
pub const MAX_OBJECT_BYTES: usize = 1536 * 1024;
/// Request bodies larger than this are refused before parsing (kube-apiserver: 3 MiB).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// Namespaces that always exist.
pub const SYSTEM_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

pub struct Api {
    pub store: Arc<Store>,
    pub alloc: Mutex<admission::Allocator>,
    /// The RBAC policy in force, and when it was read (re-read at most every second).
    pub policy: Mutex<Option<(std::time::Instant, Arc<rbac::Policy>)>>,
}

type Params = HashMap<String, String>;

/// What a path names.
#[derive(Debug)]
enum Target {
    Collection {
        res: &'static Resource,
        ns: Option<String>,
    },
    Object {
        res: &'static Resource,
        ns: Option<String>,
        name: String,
        sub: Option<String>,
    },
    Discovery(Value),
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn store_err(e: StoreError) -> ApiError {
    match e {
        StoreError::Mvcc(mvcc::Error::Compacted {
            requested,
            compacted,
        }) => ApiError::gone(format!(
            "too old resource version: {requested} ({compacted})"
        )),
        StoreError::Mvcc(mvcc::Error::FutureRevision { requested, current }) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "Timeout",
            format!("Too large resource version: {requested}, current: {current}"),
        ),
        other => ApiError::internal(other.to_string()),
    }
}

/// Parses `/api/...` or `/apis/...` into what it names.
fn route(path: &str) -> Result<Target, ApiError> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        )
    };
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["api"] => return Ok(Target::Discovery(discovery::core_versions())),
        ["api", v] => {
            return discovery::resource_list("", v)
                .map(Target::Discovery)
                .ok_or_else(not_found);
        }
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis"] => return Ok(Target::Discovery(discovery::group_list())),
        ["apis", g] => {
            return discovery::group(g)
                .map(Target::Discovery)
                .ok_or_else(not_found);
        }
        ["apis", g, v] => {
            return discovery::resource_list(g, v)
                .map(Target::Discovery)
                .ok_or_else(not_found);
        }
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(not_found()),
    };
    let find = |plural: &str| resources::find(group, version, plural).ok_or_else(not_found);
    let obj = |res, ns: Option<&str>, name: &str, sub: Option<&str>| Target::Object {
        res,
        ns: ns.map(String::from),
        name: name.to_string(),
        sub: sub.map(String::from),
    };
    Ok(match rest {
        // The Namespace object itself (core) and its subresources.
        ["namespaces", name] if group.is_empty() => obj(find("namespaces")?, None, name, None),
        ["namespaces", name, sub @ ("status" | "finalize")] if group.is_empty() => {
            obj(find("namespaces")?, None, name, Some(sub))
        }
        ["namespaces", ns, plural] => {
            let res = find(plural)?;
            if !res.namespaced {
                return Err(not_found());
            }
            Target::Collection {
                res,
                ns: Some(ns.to_string()),
            }
        }
        ["namespaces", ns, plural, name] => obj(find(plural)?, Some(ns), name, None),
        ["namespaces", ns, plural, name, sub] => obj(find(plural)?, Some(ns), name, Some(sub)),
        [plural] => Target::Collection {
            res: find(plural)?,
            ns: None,
        },
        [plural, name] => {
            let res = find(plural)?;
            if res.namespaced {
                return Err(not_found());
            }
            obj(res, None, name, None)
        }
        [plural, name, sub] => {
            let res = find(plural)?;
            if res.namespaced {
                return Err(not_found());
            }
            obj(res, None, name, Some(sub))
        }
        _ => return Err(not_found()),
    })
}

/// The stored object with its resourceVersion.
fn decode(kv: &KeyValue) -> Result<Value, ApiError> {
    let mut v: Value = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::internal(format!("stored object {} is corrupt: {e}", kv.key)))?;
    v["metadata"]["resourceVersion"] = json!(kv.mod_revision.to_string());
    Ok(v)
}

fn encode(v: &Value) -> Result<Arc<[u8]>, ApiError> {
    let mut v = v.clone();
    if let Some(m) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        m.remove("resourceVersion");
    }
    let bytes = serde_json::to_vec(&v).map_err(|e| ApiError::internal(e.to_string()))?;
    if bytes.len() > MAX_OBJECT_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            "Request entity too large: limit is 3145728",
        ));
    }
    Ok(Arc::from(bytes))
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> &str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// The body as a JSON object, from JSON or YAML.
fn parse_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(ApiError::too_large());
    }
    let ct = header_str(headers, header::CONTENT_TYPE);
    let mime = ct.split(';').next().unwrap_or("").trim();
    let v: Value = match mime {
        "application/json" | "" => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding JSON: {e}")))?,
        "application/yaml" | "application/apply-patch+yaml" => serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
        other => return Err(ApiError::unsupported_media_type(other)),
    };
    if !v.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    Ok(v)
}

fn name_check(res: &Resource, name: &str) -> Result<(), String> {
    match res.kind {
        "Namespace" => meta::check_label(name),
        "Service" => meta::check_dns1035(name),
        // RBAC names are path segments (`system:node-proxier`).
        "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding" => {
            if name.is_empty()
                || name == "."
                || name == ".."
                || name.contains('/')
                || name.contains('%')
            {
                Err("may not be '.' or '..' and may not contain '/' or '%'".into())
            } else {
                Ok(())
            }
        }
        _ => meta::check_subdomain(name),
    }
}

/// Checks apiVersion/kind, labels and annotations of an incoming object.
fn check_object(res: &Resource, v: &mut Value, name: &str) -> Result<(), ApiError> {
    let want_av = res.api_version();
    match v.get("apiVersion").and_then(|x| x.as_str()) {
        None => v["apiVersion"] = json!(want_av),
        Some(av) if av == want_av => {}
        Some(av) => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({want_av})"
            )));
        }
    }
    match v.get("kind").and_then(|x| x.as_str()) {
        None => v["kind"] = json!(res.kind),
        Some(k) if k == res.kind => {}
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                res.kind
            )));
        }
    }
    if !v.get("metadata").is_some_and(|m| m.is_object()) {
        v["metadata"] = json!({});
    }
    let mut causes = Vec::new();
    if let Err(e) = name_check(res, name) {
        causes.push((
            "metadata.name".into(),
            "FieldValueInvalid".into(),
            format!("Invalid value: {name:?}: {e}"),
        ));
    }
    for (field, check_values) in [("labels", true), ("annotations", false)] {
        match v["metadata"].get(field) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, val) in m {
                    if let Err(e) = meta::check_label_key(k) {
                        causes.push((
                            format!("metadata.{field}"),
                            "FieldValueInvalid".into(),
                            format!("Invalid value: {k:?}: {e}"),
                        ));
                    }
                    match val.as_str() {
                        Some(s) if check_values => {
                            if let Err(e) = meta::check_label_value(s) {
                                causes.push((
                                    format!("metadata.{field}"),
                                    "FieldValueInvalid".into(),
                                    format!("Invalid value: {s:?}: {e}"),
                                ));
                            }
                        }
                        Some(_) => {}
                        None => causes.push((
                            format!("metadata.{field}"),
                            "FieldValueInvalid".into(),
                            format!("Invalid value: {k:?}: values must be strings"),
                        )),
                    }
                }
            }
            Some(_) => causes.push((
                format!("metadata.{field}"),
                "FieldValueInvalid".into(),
                "must be a map of strings".into(),
            )),
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(res.kind, res.group, name, causes))
    }
}

/// Decodes the object against its schema: a value of the wrong type is a 400; unknown
/// fields are a 400 under `fieldValidation=Strict` and dropped otherwise (as
/// kube-apiserver's decoder does).
fn check_schema(res: &Resource, obj: &mut Value, params: &Params) -> Result<(), ApiError> {
    let (typed, unknown) = schema::decode(res.kind, obj).map_err(|e| {
        ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {e}",
            res.kind, res.version, res.kind
        ))
    })?;
    if !unknown.is_empty() && params.get("fieldValidation").is_some_and(|v| v == "Strict") {
        let fields: Vec<String> = unknown
            .iter()
            .map(|f| format!("unknown field \"{}\"", f.trim_start_matches('.')))
            .collect();
        return Err(ApiError::bad_request(format!(
            "strict decoding error: {}",
            fields.join(", ")
        )));
    }
    *obj = typed;
    Ok(())
}

fn has_status(res: &Resource) -> bool {
    res.has_subresource("status")
}

impl Api {
    /// Creates the system namespaces and the `kubernetes` Service when missing, and loads
    /// the allocator with what stored Services hold.
    pub async fn bootstrap(
        &self,
        api_address: Option<std::net::IpAddr>,
        api_port: u16,
    ) -> anyhow::Result<()> {
        let ns_res = resources::find("", "v1", "namespaces").expect("namespaces in the table");
        for ns in SYSTEM_NAMESPACES {
            if self.store.get(&ns_res.key(None, ns)).await?.is_none() {
                let obj =
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
                if let Err(e) = self.create(ns_res, None, obj, &Params::new()).await
                    && e.reason != "AlreadyExists"
                {
                    anyhow::bail!("creating namespace {ns}: {}", e.message);
                }
            }
        }
        for obj in rbac::bootstrap_objects() {
            let plural = if obj["kind"] == "ClusterRole" {
                "clusterroles"
            } else {
                "clusterrolebindings"
            };
            let res =
                resources::find("rbac.authorization.k8s.io", "v1", plural).expect("rbac resources");
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if self.store.get(&res.key(None, &name)).await?.is_none()
                && let Err(e) = self.create(res, None, obj, &Params::new()).await
                && e.reason != "AlreadyExists"
            {
                anyhow::bail!("creating {plural} {name}: {}", e.message);
            }
        }
        let svc_res = resources::find("", "v1", "services").expect("services in the table");
        {
            let stored = self.store.range(&svc_res.prefix(), None, None, 0).await?;
            let mut alloc = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
            for kv in &stored.kvs {
                if let Ok(v) = serde_json::from_slice::<Value>(&kv.value) {
                    alloc.take_existing(&v);
                }
            }
        }
        if self
            .store
            .get(&svc_res.key(Some("default"), "kubernetes"))
            .await?
            .is_none()
        {
            let first = {
                let alloc = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
                alloc.ranges.first().map(|r| match r {
                    ipnet::IpNet::V4(n) => {
                        std::net::IpAddr::V4((u32::from(n.network()) + 1).into())
                    }
                    ipnet::IpNet::V6(n) => {
                        std::net::IpAddr::V6((u128::from(n.network()) + 1).into())
                    }
                })
            };
            let mut spec = json!({"ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": api_port}], "sessionAffinity": "None", "type": "ClusterIP"});
            if let Some(ip) = first {
                spec["clusterIP"] = json!(ip.to_string());
            }
            let obj = json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"component": "apiserver", "provider": "kubernetes"}},
                "spec": spec});
            if let Err(e) = self
                .create(svc_res, Some("default"), obj, &Params::new())
                .await
            {
                warn!(error = %e.message, "cannot create the kubernetes Service");
            }
        }
        if let Some(addr) = api_address {
            let slice_res = resources::find("discovery.k8s.io", "v1", "endpointslices")
                .expect("endpointslices");
            let fam = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
            let obj = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubernetes", "endpointslice.kubernetes.io/managed-by": "capstan-server"}},
                "addressType": fam,
                "endpoints": [{"addresses": [addr.to_string()], "conditions": {"ready": true}}],
                "ports": [{"name": "https", "port": api_port, "protocol": "TCP"}]});
            let key = slice_res.key(Some("default"), "kubernetes");
            let current = self.store.get(&key).await?;
            match current {
                None => {
                    let _ = self
                        .create(slice_res, Some("default"), obj, &Params::new())
                        .await;
                }
                Some(kv) => {
                    let old = decode(&kv).map_err(|e| anyhow::anyhow!(e.message))?;
                    if old.get("endpoints") != obj.get("endpoints")
                        || old.get("ports") != obj.get("ports")
                    {
                        let mut new = obj.clone();
                        new["metadata"] = old["metadata"].clone();
                        let _ = self
                            .put(
                                slice_res,
                                Some("default"),
                                "kubernetes",
                                new,
                                None,
                                &Params::new(),
                            )
                            .await;
                    }
                }
            }
        }
        Ok(())
    }

    /// The RBAC objects in force (read from the store at most once a second).
    async fn policy(&self) -> Result<Arc<rbac::Policy>, ApiError> {
        if let Some((at, p)) = self
            .policy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            && at.elapsed() < Duration::from_secs(1)
        {
            return Ok(p.clone());
        }
        let mut p = rbac::Policy::default();
        for (plural, out) in [
            ("roles", &mut p.roles),
            ("clusterroles", &mut p.cluster_roles),
            ("rolebindings", &mut p.role_bindings),
            ("clusterrolebindings", &mut p.cluster_role_bindings),
        ] {
            let res =
                resources::find("rbac.authorization.k8s.io", "v1", plural).expect("rbac resources");
            let range = self
                .store
                .range(&res.prefix(), None, None, 0)
                .await
                .map_err(store_err)?;
            for kv in &range.kvs {
                out.push(decode(kv)?);
            }
        }
        let p = Arc::new(p);
        *self.policy.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((std::time::Instant::now(), p.clone()));
        Ok(p)
    }

    async fn namespace_exists(&self, ns: &str) -> Result<bool, ApiError> {
        let res = resources::find("", "v1", "namespaces").expect("namespaces");
        Ok(self
            .store
            .get(&res.key(None, ns))
            .await
            .map_err(store_err)?
            .is_some())
    }

    fn admit(
        &self,
        res: &Resource,
        obj: &mut Value,
        old: Option<&Value>,
        name: &str,
    ) -> Result<(), ApiError> {
        match res.kind {
            "Service" => {
                let mut alloc = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
                admission::admit_service(obj, old, &mut alloc)
                    .map_err(|causes| ApiError::invalid(res.kind, res.group, name, causes))
            }
            "EndpointSlice" => {
                let causes = admission::validate_endpoint_slice(obj);
                if causes.is_empty() {
                    Ok(())
                } else {
                    Err(ApiError::invalid(res.kind, res.group, name, causes))
                }
            }
            "Namespace" => {
                if obj.pointer("/status/phase").is_none() {
                    obj["status"] = json!({"phase": "Active"});
                }
                if obj.pointer("/spec/finalizers").is_none() {
                    obj["spec"] = json!({"finalizers": ["kubernetes"]});
                }
                Ok(())
            }
            other => {
                let causes = admission::validate_other(other, obj);
                if causes.is_empty() {
                    Ok(())
                } else {
                    Err(ApiError::invalid(res.kind, res.group, name, causes))
                }
            }
        }
    }

    /// Undoes what admission allocated when the write did not happen.
    fn unadmit(&self, res: &Resource, obj: &Value, old: Option<&Value>) {
        if res.kind == "Service" {
            let mut alloc = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
            alloc.release(obj);
            if let Some(old) = old {
                alloc.take_existing(old);
            }
        }
    }

    pub async fn create(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
        mut obj: Value,
        params: &Params,
    ) -> Result<Value, ApiError> {
        let dry_run = params.get("dryRun").is_some_and(|d| d == "All");
        if !obj.get("metadata").is_some_and(|m| m.is_object()) {
            obj["metadata"] = json!({});
        }
        let body_ns = obj["metadata"]
            .get("namespace")
            .and_then(|n| n.as_str())
            .map(String::from);
        let ns = if res.namespaced {
            let ns = ns
                .map(String::from)
                .or(body_ns.clone())
                .unwrap_or_else(|| "default".into());
            if let Some(b) = &body_ns
                && *b != ns
            {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            if !self.namespace_exists(&ns).await? {
                return Err(ApiError::not_found("", "namespaces", &ns));
            }
            obj["metadata"]["namespace"] = json!(ns);
            Some(ns)
        } else {
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("namespace");
            }
            None
        };
        let name = match obj["metadata"].get("name").and_then(|n| n.as_str()) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => match obj["metadata"].get("generateName").and_then(|n| n.as_str()) {
                Some(g) if !g.is_empty() => format!("{g}{}", meta::random_suffix()),
                _ => {
                    return Err(ApiError::invalid(
                        res.kind,
                        res.group,
                        "",
                        vec![(
                            "metadata.name".into(),
                            "FieldValueRequired".into(),
                            "Required value: name or generateName is required".into(),
                        )],
                    ));
                }
            },
        };
        obj["metadata"]["name"] = json!(name);
        check_object(res, &mut obj, &name)?;
        check_schema(res, &mut obj, params)?;
        {
            let m = &mut obj["metadata"];
            m["uid"] = json!(uuid::Uuid::new_v4().to_string());
            m["creationTimestamp"] = json!(rfc3339(SystemTime::now()));
            if let Some(o) = m.as_object_mut() {
                o.remove("deletionTimestamp");
                o.remove("deletionGracePeriodSeconds");
                o.remove("resourceVersion");
                o.remove("selfLink");
            }
            if obj.get("spec").is_some() {
                obj["metadata"]["generation"] = json!(1);
            }
        }
        self.admit(res, &mut obj, None, &name)?;
        if dry_run {
            self.unadmit(res, &obj, None);
            return Ok(obj);
        }
        let value = match encode(&obj) {
            Ok(v) => v,
            Err(e) => {
                self.unadmit(res, &obj, None);
                return Err(e);
            }
        };
        let key = res.key(ns.as_deref(), &name);
        match self
            .store
            .write(Write::Put { key, value }, Expect::Absent)
            .await
        {
            Ok(ev) => {
                obj["metadata"]["resourceVersion"] = json!(ev.revision.to_string());
                Ok(obj)
            }
            Err(StoreError::Mvcc(mvcc::Error::Conflict(_))) => {
                self.unadmit(res, &obj, None);
                Err(ApiError::already_exists(res.group, res.plural, &name))
            }
            Err(e) => {
                self.unadmit(res, &obj, None);
                Err(store_err(e))
            }
        }
    }

    async fn get_obj(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        match self
            .store
            .get(&res.key(ns, name))
            .await
            .map_err(store_err)?
        {
            Some(kv) => decode(&kv),
            None => Err(ApiError::not_found(res.group, res.plural, name)),
        }
    }

    /// Replaces an object (PUT), or its status (`sub` = "status"), with optimistic
    /// concurrency when the body carries a resourceVersion.
    pub async fn put(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
        name: &str,
        mut obj: Value,
        sub: Option<&str>,
        params: &Params,
    ) -> Result<Value, ApiError> {
        let dry_run = params.get("dryRun").is_some_and(|d| d == "All");
        if !obj.get("metadata").is_some_and(|m| m.is_object()) {
            obj["metadata"] = json!({});
        }
        match obj["metadata"].get("name").and_then(|n| n.as_str()) {
            Some(n) if n == name => {}
            None | Some("") => obj["metadata"]["name"] = json!(name),
            Some(n) => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
        }
        if let Some(ns) = ns {
            match obj["metadata"].get("namespace").and_then(|n| n.as_str()) {
                Some(b) if b != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => obj["metadata"]["namespace"] = json!(ns),
            }
        }
        check_object(res, &mut obj, name)?;
        check_schema(res, &mut obj, params)?;
        let key = res.key(ns, name);
        let current = self.store.get(&key).await.map_err(store_err)?;
        let Some(current) = current else {
            return Err(ApiError::not_found(res.group, res.plural, name));
        };
        let old = decode(&current)?;
        let expect = match obj["metadata"]
            .get("resourceVersion")
            .and_then(|r| r.as_str())
        {
            Some(rv) if !rv.is_empty() => match rv.parse::<u64>() {
                Ok(r) if r == current.mod_revision => Expect::ModRevision(r),
                Ok(_) => return Err(ApiError::conflict(res.group, res.plural, name)),
                Err(_) => {
                    return Err(ApiError::bad_request(format!(
                        "invalid resourceVersion {rv:?}"
                    )));
                }
            },
            _ => Expect::ModRevision(current.mod_revision),
        };
        // What the caller may not change.
        for f in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            match old["metadata"].get(f) {
                Some(v) => obj["metadata"][f] = v.clone(),
                None => {
                    if let Some(m) = obj["metadata"].as_object_mut() {
                        m.remove(f);
                    }
                }
            }
        }
        if sub == Some("status") {
            // Only the status changes through /status.
            let status = obj.get("status").cloned();
            let mut next = old.clone();
            match status {
                Some(s) => next["status"] = s,
                None => {
                    if let Some(o) = next.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
            obj = next;
        } else {
            if has_status(res) {
                match old.get("status") {
                    Some(s) => obj["status"] = s.clone(),
                    None => {
                        if let Some(o) = obj.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
            let generation = old["metadata"].get("generation").and_then(|g| g.as_i64());
            if let Some(g) = generation {
                let changed = old.get("spec") != obj.get("spec");
                obj["metadata"]["generation"] = json!(if changed { g + 1 } else { g });
            }
            self.admit(res, &mut obj, Some(&old), name)?;
        }
        // Finalizers emptied on an object being deleted: it goes now.
        let finalizers_empty = obj["metadata"]
            .get("finalizers")
            .and_then(|f| f.as_array())
            .is_none_or(|f| f.is_empty());
        if dry_run {
            return Ok(obj);
        }
        if old["metadata"].get("deletionTimestamp").is_some() && finalizers_empty {
            return match self.store.write(Write::Delete { key }, expect).await {
                Ok(ev) => {
                    self.released(res, &old);
                    obj["metadata"]["resourceVersion"] = json!(ev.revision.to_string());
                    Ok(obj)
                }
                Err(StoreError::Mvcc(mvcc::Error::Conflict(_))) => {
                    Err(ApiError::conflict(res.group, res.plural, name))
                }
                Err(e) => Err(store_err(e)),
            };
        }
        // Nothing changed: no write, no new resourceVersion (kubectl then says "no change").
        let mut same = obj.clone();
        same["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if same == old {
            return Ok(old);
        }
        let value = encode(&obj)?;
        match self.store.write(Write::Put { key, value }, expect).await {
            Ok(ev) => {
                obj["metadata"]["resourceVersion"] = json!(ev.revision.to_string());
                Ok(obj)
            }
            Err(StoreError::Mvcc(mvcc::Error::Conflict(_))) => {
                if sub != Some("status") {
                    self.unadmit(res, &obj, Some(&old));
                }
                Err(ApiError::conflict(res.group, res.plural, name))
            }
            Err(e) => Err(store_err(e)),
        }
    }

    fn released(&self, res: &Resource, obj: &Value) {
        if res.kind == "Service" {
            self.alloc
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .release(obj);
        }
    }

    /// PATCH: read, patch, write with the read's revision; retried on a conflict.
    #[allow(clippy::too_many_arguments)]
    async fn patch(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
        name: &str,
        sub: Option<&str>,
        headers: &HeaderMap,
        body: &Bytes,
        params: &Params,
    ) -> Result<Value, ApiError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(ApiError::too_large());
        }
        let ct = header_str(headers, header::CONTENT_TYPE);
        let mime = ct.split(';').next().unwrap_or("").trim().to_string();
        for _ in 0..8 {
            let current = match self.get_obj(res, ns, name).await {
                Ok(v) => Some(v),
                Err(e) if e.reason == "NotFound" && mime == "application/apply-patch+yaml" => None,
                Err(e) => return Err(e),
            };
            let patched = match (mime.as_str(), &current) {
                ("application/json-patch+json", Some(cur)) => {
                    let p: json_patch::Patch = serde_json::from_slice(body).map_err(|e| {
                        ApiError::bad_request(format!("error decoding JSON patch: {e}"))
                    })?;
                    let mut doc = cur.clone();
                    json_patch::patch(&mut doc, &p)
                        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", format!("the server rejected our request due to an error in our request: {e}")))?;
                    doc
                }
                ("application/merge-patch+json", Some(cur)) => {
                    let p: Value = serde_json::from_slice(body).map_err(|e| {
                        ApiError::bad_request(format!("error decoding merge patch: {e}"))
                    })?;
                    let mut doc = cur.clone();
                    json_patch::merge(&mut doc, &p);
                    doc
                }
                ("application/strategic-merge-patch+json", Some(cur)) => {
                    let p: Value = serde_json::from_slice(body).map_err(|e| {
                        ApiError::bad_request(format!("error decoding strategic merge patch: {e}"))
                    })?;
                    let mut doc = cur.clone();
                    strategic_merge(&mut doc, &p, "");
                    doc
                }
                ("application/apply-patch+yaml", cur) => {
                    let p: Value = serde_yaml::from_slice(body)
                        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
                    match cur {
                        None => {
                            let created = self.create(res, ns, p, params).await?;
                            return Ok(created);
                        }
                        Some(cur) => {
                            let mut doc = cur.clone();
                            strategic_merge(&mut doc, &p, "");
                            doc
                        }
                    }
                }
                (other, _) => {
                    return Err(ApiError::unsupported_media_type(other));
                }
            };
            let mut patched = patched;
            // The revision read is the one the write expects.
            if let Some(cur) = &current {
                patched["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"].clone();
            }
            match self.put(res, ns, name, patched, sub, params).await {
                Err(e) if e.reason == "Conflict" => continue,
                other => return other,
            }
        }
        Err(ApiError::conflict(res.group, res.plural, name))
    }

    async fn delete(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
        name: &str,
        params: &Params,
    ) -> Result<Value, ApiError> {
        let dry_run = params.get("dryRun").is_some_and(|d| d == "All");
        for _ in 0..8 {
            let key = res.key(ns, name);
            let Some(kv) = self.store.get(&key).await.map_err(store_err)? else {
                return Err(ApiError::not_found(res.group, res.plural, name));
            };
            let mut obj = decode(&kv)?;
            if dry_run {
                return Ok(obj);
            }
            if res.kind == "Namespace" {
                if SYSTEM_NAMESPACES.contains(&name) {
                    return Err(ApiError::forbidden(format!(
                        "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
                    )));
                }
                self.empty_namespace(name).await?;
            }
            let finalizers = obj["metadata"]
                .get("finalizers")
                .and_then(|f| f.as_array())
                .is_some_and(|f| !f.is_empty());
            if finalizers {
                // Graceful: marked, and gone when the last finalizer is removed.
                if obj["metadata"].get("deletionTimestamp").is_none() {
                    obj["metadata"]["deletionTimestamp"] = json!(rfc3339(SystemTime::now()));
                    obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                    let value = encode(&obj)?;
                    match self
                        .store
                        .write(
                            Write::Put { key, value },
                            Expect::ModRevision(kv.mod_revision),
                        )
                        .await
                    {
                        Ok(ev) => {
                            obj["metadata"]["resourceVersion"] = json!(ev.revision.to_string())
                        }
                        Err(StoreError::Mvcc(mvcc::Error::Conflict(_))) => continue,
                        Err(e) => return Err(store_err(e)),
                    }
                }
                return Ok(obj);
            }
            match self
                .store
                .write(Write::Delete { key }, Expect::ModRevision(kv.mod_revision))
                .await
            {
                Ok(_) => {
                    self.released(res, &obj);
                    return Ok(obj);
                }
                Err(StoreError::Mvcc(mvcc::Error::Conflict(_))) => continue,
                Err(e) => return Err(store_err(e)),
            }
        }
        Err(ApiError::conflict(res.group, res.plural, name))
    }

    /// Deletes every namespaced object in a namespace (what the namespace controller does).
    async fn empty_namespace(&self, ns: &str) -> Result<(), ApiError> {
        for res in resources::RESOURCES.iter().filter(|r| r.namespaced) {
            let range = self
                .store
                .range(&res.ns_prefix(Some(ns)), None, None, 0)
                .await
                .map_err(store_err)?;
            for kv in range.kvs {
                let name = kv.key.rsplit('/').next().unwrap_or_default().to_string();
                let _ = Box::pin(self.delete(res, Some(ns), &name, &Params::new())).await;
            }
        }
        Ok(())
    }

    /// The objects a list returns: selectors applied, chunked with limit/continue.
    async fn list_items(
        &self,
        res: &Resource,
        ns: Option<&str>,
        params: &Params,
    ) -> Result<(Vec<Value>, u64, Option<String>, Option<u64>), ApiError> {
        let (labels, fields) = selectors(res, params)?;
        let limit: usize = params
            .get("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let prefix = res.ns_prefix(ns);
        // continue = "<revision>:<last key>"
        let (at, start_after) = match params.get("continue").filter(|c| !c.is_empty()) {
            Some(c) => {
                let (rev, key) = c
                    .split_once(':')
                    .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
                let rev: u64 = rev
                    .parse()
                    .map_err(|_| ApiError::bad_request("continue key is not valid"))?;
                (Some(rev), Some(key.to_string()))
            }
            None => {
                let rv = params
                    .get("resourceVersion")
                    .filter(|r| !r.is_empty() && *r != "0");
                let exact = params
                    .get("resourceVersionMatch")
                    .is_some_and(|m| m == "Exact");
                match rv {
                    Some(r) if exact => (
                        Some(r.parse().map_err(|_| {
                            ApiError::bad_request(format!("invalid resourceVersion {r:?}"))
                        })?),
                        None,
                    ),
                    _ => (None, None),
                }
            }
        };
        let mut items = Vec::new();
        let mut cursor = start_after;
        let mut revision;
        let mut more;
        loop {
            let page = self
                .store
                .range(
                    &prefix,
                    cursor.as_deref(),
                    at,
                    if limit > 0 { limit * 2 } else { 0 },
                )
                .await
                .map_err(store_err)?;
            revision = page.revision;
            more = page.more;
            let mut last = None;
            for kv in &page.kvs {
                last = Some(kv.key.clone());
                let v = decode(kv)?;
                if labels.matches(&v) && fields.matches(&v) {
                    items.push(v);
                    if limit > 0 && items.len() == limit {
                        more = more || page.kvs.last().map(|k| &k.key) != Some(&kv.key);
                        cursor = Some(kv.key.clone());
                        break;
                    }
                }
            }
            if limit == 0 || items.len() == limit || !page.more {
                if !(limit > 0 && items.len() == limit) {
                    cursor = last;
                }
                break;
            }
            cursor = last;
            // The rest must come from the same revision.
            let _ = at;
            if at.is_none() {
                return Box::pin(self.list_items_at(
                    res, ns, params, revision, items, cursor, limit, &labels, &fields,
                ))
                .await;
            }
        }
        let cont =
            (limit > 0 && more).then(|| format!("{revision}:{}", cursor.unwrap_or_default()));
        let remaining = cont.as_ref().map(|_| 0);
        Ok((items, revision, cont, remaining))
    }

    #[allow(clippy::too_many_arguments)]
    async fn list_items_at(
        &self,
        res: &Resource,
        ns: Option<&str>,
        _params: &Params,
        rev: u64,
        mut items: Vec<Value>,
        mut cursor: Option<String>,
        limit: usize,
        labels: &meta::LabelSelector,
        fields: &meta::FieldSelector,
    ) -> Result<(Vec<Value>, u64, Option<String>, Option<u64>), ApiError> {
        let prefix = res.ns_prefix(ns);
        loop {
            let page = self
                .store
                .range(&prefix, cursor.as_deref(), Some(rev), limit * 2)
                .await
                .map_err(store_err)?;
            let mut more = page.more;
            for kv in &page.kvs {
                cursor = Some(kv.key.clone());
                let v = decode(kv)?;
                if labels.matches(&v) && fields.matches(&v) {
                    items.push(v);
                    if items.len() == limit {
                        more = more || page.kvs.last().map(|k| &k.key) != Some(&kv.key);
                        let cont =
                            more.then(|| format!("{rev}:{}", cursor.clone().unwrap_or_default()));
                        return Ok((items, rev, cont, None));
                    }
                }
            }
            if !more {
                return Ok((items, rev, None, None));
            }
        }
    }
}

/// A strategic merge patch for the built-in types: maps merge, lists of objects with a
/// known merge key merge by that key (containers, ports, env, volumes, conditions, …),
/// `$patch: delete` removes an element, `null` removes a field, other lists are replaced.
pub fn strategic_merge(doc: &mut Value, patch: &Value, path: &str) {
    match (doc, patch) {
        (Value::Object(d), Value::Object(p)) => {
            for (k, pv) in p {
                if k.starts_with("$setElementOrder") || k == "$retainKeys" {
                    continue;
                }
                if pv.is_null() {
                    d.remove(k);
                    continue;
                }
                let child = format!("{path}/{k}");
                match d.get_mut(k) {
                    Some(dv) => {
                        if let (Value::Array(da), Value::Array(pa)) = (&mut *dv, pv) {
                            match merge_key(&child, da, pa) {
                                Some(mk) => merge_list(da, pa, &mk, &child),
                                None => *dv = pv.clone(),
                            }
                        } else if dv.is_object() && pv.is_object() {
                            strategic_merge(dv, pv, &child);
                        } else {
                            *dv = strip_directives(pv);
                        }
                    }
                    None => {
                        d.insert(k.clone(), strip_directives(pv));
                    }
                }
            }
        }
        (d, p) => *d = strip_directives(p),
    }
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

/// The merge key of a list, from its path (as the Go types' patchMergeKey tags say).
fn merge_key(path: &str, current: &[Value], patch: &[Value]) -> Option<String> {
    let last = path.rsplit('/').next().unwrap_or("");
    let key = match last {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "volumeMounts"
        | "imagePullSecrets" => "name",
        "ports" if path.contains("containers") => "containerPort",
        "ports" => "port",
        "conditions" => "type",
        "addresses" if path.ends_with("status/addresses") => "type",
        "tolerations" => "key",
        "volumeDevices" => "devicePath",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        _ => return None,
    };
    let all_objects = current.iter().chain(patch).all(|v| v.is_object());
    all_objects.then(|| key.to_string())
}

fn merge_list(current: &mut Vec<Value>, patch: &[Value], key: &str, path: &str) {
    for p in patch {
        let id = p.get(key).cloned();
        let delete = p.get("$patch").and_then(|x| x.as_str()) == Some("delete");
        let pos = id
            .as_ref()
            .and_then(|id| current.iter().position(|c| c.get(key) == Some(id)));
        match (pos, delete) {
            (Some(i), true) => {
                current.remove(i);
            }
            (Some(i), false) => strategic_merge(&mut current[i], p, path),
            (None, true) => {}
            (None, false) => current.push(strip_directives(p)),
        }
    }
}

/// The request's label and field selectors (a bad one is a 400).
fn selectors(
    res: &Resource,
    params: &Params,
) -> Result<(meta::LabelSelector, meta::FieldSelector), ApiError> {
    let get = |k: &str| params.get(k).map(String::as_str).unwrap_or("");
    Ok((
        meta::LabelSelector::parse(get("labelSelector")).map_err(ApiError::bad_request)?,
        meta::FieldSelector::parse(get("fieldSelector"), res.kind)
            .map_err(ApiError::bad_request)?,
    ))
}

fn params_flag(params: &Params, k: &str) -> bool {
    params.get(k).is_some_and(|v| v == "true" || v == "1")
}

/// Wraps objects in a list (or a Table) response.
fn list_response(
    res: &Resource,
    headers: &HeaderMap,
    items: Vec<Value>,
    rev: u64,
    cont: Option<String>,
) -> Response {
    let accept = header_str(headers, header::ACCEPT);
    if table::wants_table(accept) {
        return json_response(StatusCode::OK, &table::table(res, &items, rev, cont));
    }
    let mut meta = json!({"resourceVersion": rev.to_string()});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
    }
    json_response(
        StatusCode::OK,
        &json!({"kind": res.list_kind(), "apiVersion": res.api_version(), "metadata": meta, "items": items}),
    )
}

fn object_response(res: &Resource, headers: &HeaderMap, code: StatusCode, obj: &Value) -> Response {
    let accept = header_str(headers, header::ACCEPT);
    if table::wants_table(accept) {
        let rev: u64 = obj["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        return json_response(
            code,
            &table::table(res, std::slice::from_ref(obj), rev, None),
        );
    }
    json_response(code, obj)
}

fn scale_of(obj: &Value) -> Value {
    json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"],
            "uid": obj["metadata"]["uid"], "resourceVersion": obj["metadata"]["resourceVersion"],
            "creationTimestamp": obj["metadata"]["creationTimestamp"]},
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(1))},
        "status": {"replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": obj.pointer("/spec/selector/matchLabels").and_then(|m| m.as_object()).map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect::<Vec<_>>().join(",")).unwrap_or_default()},
    })
}

/// The one handler behind `/api/...` and `/apis/...`.
pub async fn dispatch(
    State(api): State<Arc<Api>>,
    user: Option<axum::Extension<crate::auth::User>>,
    method: Method,
    uri: Uri,
    Query(params): Query<Params>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let user = user
        .map(|u| u.0)
        .unwrap_or_else(crate::auth::User::anonymous);
    match serve(&api, &user, &method, &uri, &params, &headers, &body).await {
        Ok(r) => r,
        Err(e) => {
            debug!(method = %method, path = %uri.path(), code = e.code.as_u16(), reason = e.reason, "request failed");
            e.into_response()
        }
    }
}

/// The RBAC verb of a request.
fn verb_of(method: &Method, collection: bool, params: &Params) -> &'static str {
    match (method.as_str(), collection) {
        ("GET", true) if params_flag(params, "watch") => "watch",
        ("GET", true) => "list",
        ("GET", false) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "deletecollection",
        ("DELETE", false) => "delete",
        _ => "unknown",
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    api: &Arc<Api>,
    user: &crate::auth::User,
    method: &Method,
    uri: &Uri,
    params: &Params,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let target = route(uri.path())?;
    // Authorization: discovery is open to every authenticated user; the rest is RBAC's.
    let attrs = match &target {
        Target::Discovery(_) => None,
        Target::Collection { res, ns } => Some(rbac::Attributes {
            verb: verb_of(method, true, params).into(),
            group: res.group.into(),
            resource: res.plural.into(),
            namespace: ns.clone(),
            name: None,
        }),
        Target::Object { res, ns, name, sub } => Some(rbac::Attributes {
            verb: verb_of(method, false, params).into(),
            group: res.group.into(),
            resource: match sub {
                Some(s) => format!("{}/{s}", res.plural),
                None => res.plural.into(),
            },
            namespace: if res.kind == "Namespace" {
                Some(name.clone())
            } else {
                ns.clone()
            },
            name: Some(name.clone()),
        }),
    };
    if let Some(a) = attrs
        && !api.policy().await?.allows(user, &a)
    {
        return Err(ApiError::forbidden(rbac::forbidden_message(user, &a)));
    }
    match target {
        Target::Discovery(doc) => {
            if *method != Method::GET {
                return Err(ApiError::method_not_allowed());
            }
            let accept = header_str(headers, header::ACCEPT);
            let path = uri.path().trim_end_matches('/');
            if let Some(v) = discovery::wants_aggregated(accept)
                && (path == "/api" || path == "/apis")
            {
                let doc =
                    discovery::aggregated(path == "/api", &format!("apidiscovery.k8s.io/{v}"));
                return Ok((
                    StatusCode::OK,
                    [(
                        header::CONTENT_TYPE,
                        format!(
                            "application/json;g=apidiscovery.k8s.io;v={v};as=APIGroupDiscoveryList"
                        ),
                    )],
                    doc.to_string(),
                )
                    .into_response());
            }
            Ok(json_response(StatusCode::OK, &doc))
        }
        Target::Collection { res, ns } => {
            if let Some(ns) = &ns
                && *method == Method::POST
                && !api.namespace_exists(ns).await?
            {
                return Err(ApiError::not_found("", "namespaces", ns));
            }
            match *method {
                Method::GET if params_flag(params, "watch") => {
                    watch::serve(api.clone(), res, ns, params, headers).await
                }
                Method::GET => {
                    let (items, rev, cont, _) = api.list_items(res, ns.as_deref(), params).await?;
                    Ok(list_response(res, headers, items, rev, cont))
                }
                Method::POST => {
                    let obj = parse_body(headers, body)?;
                    let created = api.create(res, ns.as_deref(), obj, params).await?;
                    Ok(object_response(res, headers, StatusCode::CREATED, &created))
                }
                Method::DELETE => {
                    let (items, _, _, _) = api.list_items(res, ns.as_deref(), params).await?;
                    let mut deleted = Vec::new();
                    for it in items {
                        let name = it["metadata"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string();
                        let ons = it["metadata"]["namespace"].as_str().map(String::from);
                        if let Ok(d) = api.delete(res, ons.as_deref(), &name, params).await {
                            deleted.push(d);
                        }
                    }
                    let rev = api.store.revision().await.map_err(store_err)?;
                    Ok(list_response(res, headers, deleted, rev, None))
                }
                _ => Err(ApiError::method_not_allowed()),
            }
        }
        Target::Object { res, ns, name, sub } => {
            if let Some(s) = &sub
                && !res.has_subresource(s)
                && !(res.kind == "Namespace" && s == "finalize")
            {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "the server could not find the requested resource",
                ));
            }
            let ns = ns.as_deref();
            match (method.clone(), sub.as_deref()) {
                (Method::GET, Some("scale")) => {
                    let obj = api.get_obj(res, ns, &name).await?;
                    Ok(json_response(StatusCode::OK, &scale_of(&obj)))
                }
                (Method::PUT | Method::PATCH, Some("scale")) => {
                    let mut obj = api.get_obj(res, ns, &name).await?;
                    let mut scale = scale_of(&obj);
                    if *method == Method::PUT {
                        scale = parse_body(headers, body)?;
                    } else {
                        let p: Value = serde_json::from_slice(body)
                            .map_err(|e| ApiError::bad_request(e.to_string()))?;
                        json_patch::merge(&mut scale, &p);
                    }
                    let replicas = scale.pointer("/spec/replicas").cloned().unwrap_or(json!(1));
                    obj["spec"]["replicas"] = replicas;
                    let updated = api.put(res, ns, &name, obj, None, params).await?;
                    Ok(json_response(StatusCode::OK, &scale_of(&updated)))
                }
                (Method::POST, Some("binding")) => {
                    let b = parse_body(headers, body)?;
                    let node = b
                        .pointer("/target/name")
                        .and_then(|n| n.as_str())
                        .unwrap_or("")
                        .to_string();
                    if node.is_empty() {
                        return Err(ApiError::invalid(
                            "Binding",
                            "",
                            &name,
                            vec![(
                                "target.name".into(),
                                "FieldValueRequired".into(),
                                "Required value".into(),
                            )],
                        ));
                    }
                    let mut pod = api.get_obj(res, ns, &name).await?;
                    if pod
                        .pointer("/spec/nodeName")
                        .and_then(|n| n.as_str())
                        .is_some_and(|n| !n.is_empty())
                    {
                        return Err(ApiError::conflict(res.group, res.plural, &name));
                    }
                    pod["spec"]["nodeName"] = json!(node);
                    api.put(res, ns, &name, pod, None, params).await?;
                    Ok(json_response(
                        StatusCode::CREATED,
                        &status::success(json!({"name": name, "kind": "pods"})),
                    ))
                }
                (Method::GET, _) => {
                    let obj = api.get_obj(res, ns, &name).await?;
                    Ok(object_response(res, headers, StatusCode::OK, &obj))
                }
                (Method::PUT, s) => {
                    let obj = parse_body(headers, body)?;
                    let updated = api
                        .put(res, ns, &name, obj, s.filter(|s| *s != "finalize"), params)
                        .await?;
                    Ok(object_response(res, headers, StatusCode::OK, &updated))
                }
                (Method::PATCH, s) => {
                    let created_before = api.get_obj(res, ns, &name).await.is_ok();
                    let updated = api.patch(res, ns, &name, s, headers, body, params).await?;
                    let code = if created_before {
                        StatusCode::OK
                    } else {
                        StatusCode::CREATED
                    };
                    Ok(object_response(res, headers, code, &updated))
                }
                (Method::DELETE, None) => {
                    let obj = api.delete(res, ns, &name, params).await?;
                    Ok(json_response(StatusCode::OK, &obj))
                }
                _ => Err(ApiError::method_not_allowed()),
            }
        }
    }
}

/// Watch keep-alive: bookmarks this often when asked for.
pub const BOOKMARK_EVERY: Duration = Duration::from_secs(30);

/// The response body of a watch: newline-separated JSON events.
pub fn stream_body(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Body {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<Bytes, std::convert::Infallible>(b), rx))
    });
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_resources() {
        assert!(
            matches!(route("/api/v1/namespaces/default/services").unwrap(), Target::Collection { res, ns: Some(n) } if res.kind == "Service" && n == "default")
        );
        assert!(
            matches!(route("/api/v1/namespaces/kube-system").unwrap(), Target::Object { res, name, .. } if res.kind == "Namespace" && name == "kube-system")
        );
        assert!(
            matches!(route("/api/v1/nodes/n1/status").unwrap(), Target::Object { sub: Some(s), .. } if s == "status")
        );
        assert!(matches!(
            route("/apis/discovery.k8s.io/v1/endpointslices").unwrap(),
            Target::Collection { ns: None, .. }
        ));
        assert!(
            matches!(route("/apis/apps/v1/namespaces/x/deployments/d/scale").unwrap(), Target::Object { sub: Some(s), .. } if s == "scale")
        );
        assert!(
            route("/api/v1/services/x").is_err(),
            "namespaced objects need a namespace"
        );
        assert!(
            route("/api/v1/namespaces/x/nodes").is_err(),
            "nodes are cluster-scoped"
        );
        assert!(route("/apis/nope/v1/things").is_err());
        assert!(matches!(route("/apis").unwrap(), Target::Discovery(_)));
    }

    #[test]
    fn strategic_merge_merges_by_key() {
        let mut doc = json!({"spec": {"containers": [{"name": "a", "image": "x", "env": [{"name": "A", "value": "1"}]}, {"name": "b", "image": "y"}],
            "ports": [{"port": 80, "name": "http"}]}, "metadata": {"labels": {"a": "1", "b": "2"}}});
        let patch = json!({"spec": {"containers": [{"name": "a", "image": "x2", "env": [{"name": "B", "value": "2"}]}, {"name": "b", "$patch": "delete"}],
            "ports": [{"port": 443, "name": "https"}]}, "metadata": {"labels": {"b": null, "c": "3"}}});
        strategic_merge(&mut doc, &patch, "");
        assert_eq!(doc["spec"]["containers"].as_array().unwrap().len(), 1);
        assert_eq!(doc["spec"]["containers"][0]["image"], json!("x2"));
        assert_eq!(
            doc["spec"]["containers"][0]["env"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert_eq!(doc["spec"]["ports"].as_array().unwrap().len(), 2);
        assert_eq!(doc["metadata"]["labels"], json!({"a": "1", "c": "3"}));
    }
}
