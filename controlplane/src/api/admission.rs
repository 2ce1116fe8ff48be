//! Admission, pure: defaults, validation and allocation of ClusterIPs and NodePorts, as
//! kube-apiserver does them for Services (and the checks every object gets).
use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{Value, json};

/// A field error: (field path, reason, message) as in a 422 Status's causes.
pub type Cause = (String, String, String);

fn cause(field: impl Into<String>, reason: &str, msg: impl Into<String>) -> Cause {
    (field.into(), reason.into(), msg.into())
}

fn invalid(field: impl Into<String>, value: &Value, msg: &str) -> Cause {
    let shown = match value {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    };
    cause(
        field,
        "FieldValueInvalid",
        format!("Invalid value: {shown}: {msg}"),
    )
}

fn required(field: impl Into<String>) -> Cause {
    cause(field, "FieldValueRequired", "Required value")
}

/// ClusterIP and NodePort allocation state: the ranges and what is taken.
#[derive(Clone, Debug)]
pub struct Allocator {
    pub ranges: Vec<IpNet>,
    pub node_ports: (u16, u16),
    pub ips: BTreeSet<IpAddr>,
    pub ports: BTreeSet<(u16, String)>,
}

impl Allocator {
    pub fn new(ranges: Vec<IpNet>, node_ports: (u16, u16)) -> Self {
        Allocator {
            ranges,
            node_ports,
            ips: BTreeSet::new(),
            ports: BTreeSet::new(),
        }
    }

    fn range_for(&self, family_v6: bool) -> Option<&IpNet> {
        self.ranges
            .iter()
            .find(|r| matches!(r, IpNet::V6(_)) == family_v6)
    }

    /// The first free address of a family (the range's network and, for IPv4, broadcast
    /// addresses excluded; the first host address is the `kubernetes` Service's).
    fn next_ip(&self, v6: bool) -> Option<IpAddr> {
        let range = self.range_for(v6)?;
        let size: u128 = match range {
            IpNet::V4(n) => 1u128 << (32 - n.prefix_len()),
            IpNet::V6(n) => 1u128 << (128 - n.prefix_len()).min(64),
        };
        // Start from a position that spreads allocations, then scan.
        let start = (rand::random::<u64>() as u128) % size.max(1);
        for i in 0..size {
            let off = (start + i) % size;
            if off == 0 || (!v6 && off == size - 1) {
                continue;
            }
            let ip = match range {
                IpNet::V4(n) => IpAddr::V4((u32::from(n.network()) + off as u32).into()),
                IpNet::V6(n) => IpAddr::V6((u128::from(n.network()) + off).into()),
            };
            if !self.ips.contains(&ip) {
                return Some(ip);
            }
        }
        None
    }

    fn next_port(&self, proto: &str) -> Option<u16> {
        let (lo, hi) = self.node_ports;
        let span = (hi - lo) as u32 + 1;
        let start = rand::random::<u32>() % span;
        (0..span)
            .map(|i| lo + ((start + i) % span) as u16)
            .find(|p| !self.ports.contains(&(*p, proto.to_string())))
    }

    /// Records what a stored Service holds (at start-up).
    pub fn take_existing(&mut self, svc: &Value) {
        for ip in cluster_ips(svc) {
            if let Ok(ip) = ip.parse() {
                self.ips.insert(ip);
            }
        }
        for (p, proto) in node_ports(svc) {
            self.ports.insert((p, proto));
        }
    }

    /// Frees what a deleted Service held.
    pub fn release(&mut self, svc: &Value) {
        for ip in cluster_ips(svc) {
            if let Ok(ip) = ip.parse() {
                self.ips.remove(&ip);
            }
        }
        for (p, proto) in node_ports(svc) {
            self.ports.remove(&(p, proto));
        }
    }
}

fn cluster_ips(svc: &Value) -> Vec<String> {
    let mut out: Vec<String> = svc
        .pointer("/spec/clusterIPs")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    if out.is_empty()
        && let Some(ip) = svc.pointer("/spec/clusterIP").and_then(|v| v.as_str())
    {
        out.push(ip.to_string());
    }
    out.retain(|ip| !ip.is_empty() && ip != "None");
    out
}

fn node_ports(svc: &Value) -> Vec<(u16, String)> {
    svc.pointer("/spec/ports")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let np = p.get("nodePort")?.as_u64()? as u16;
            let proto = p.get("protocol").and_then(|x| x.as_str()).unwrap_or("TCP");
            Some((np, proto.to_string()))
        })
        .collect()
}

/// Defaults, validates and allocates a new Service in place (`old`: the stored version
/// on update, whose allocations carry over). Returns the field errors; on success the
/// allocator holds the new allocations.
pub fn admit_service(
    svc: &mut Value,
    old: Option<&Value>,
    alloc: &mut Allocator,
) -> Result<(), Vec<Cause>> {
    let mut errs = Vec::new();
    if !svc.get("spec").is_some_and(|s| s.is_object()) {
        svc["spec"] = json!({});
    }
    let spec = &mut svc["spec"];
    let ty = spec
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or("ClusterIP")
        .to_string();
    if !matches!(
        ty.as_str(),
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        errs.push(cause(
            "spec.type",
            "FieldValueNotSupported",
            format!("Unsupported value: {ty:?}: supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""),
        ));
        return Err(errs);
    }
    spec["type"] = json!(ty);
    if ty == "ExternalName" {
        if spec
            .get("externalName")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .is_empty()
        {
            errs.push(required("spec.externalName"));
        }
        return if errs.is_empty() { Ok(()) } else { Err(errs) };
    }
    match spec.get("sessionAffinity").and_then(|a| a.as_str()) {
        None => spec["sessionAffinity"] = json!("None"),
        Some("None" | "ClientIP") => {}
        Some(other) => errs.push(cause(
            "spec.sessionAffinity",
            "FieldValueNotSupported",
            format!("Unsupported value: {other:?}: supported values: \"ClientIP\", \"None\""),
        )),
    }
    if spec.get("internalTrafficPolicy").is_none() {
        spec["internalTrafficPolicy"] = json!("Cluster");
    }
    if ty != "ClusterIP" && spec.get("externalTrafficPolicy").is_none() {
        spec["externalTrafficPolicy"] = json!("Cluster");
    }
    // Ports.
    let headless = spec.get("clusterIP").and_then(|v| v.as_str()) == Some("None");
    let mut ports = spec
        .get("ports")
        .and_then(|p| p.as_array())
        .cloned()
        .unwrap_or_default();
    if ports.is_empty() && !headless {
        errs.push(required("spec.ports"));
    }
    let mut names = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let multi = ports.len() > 1;
    for (i, p) in ports.iter_mut().enumerate() {
        let f = |s: &str| format!("spec.ports[{i}].{s}");
        let proto = p
            .get("protocol")
            .and_then(|v| v.as_str())
            .unwrap_or("TCP")
            .to_string();
        if !matches!(proto.as_str(), "TCP" | "UDP" | "SCTP") {
            errs.push(cause(
                f("protocol"),
                "FieldValueNotSupported",
                format!(
                    "Unsupported value: {proto:?}: supported values: \"SCTP\", \"TCP\", \"UDP\""
                ),
            ));
        }
        p["protocol"] = json!(proto);
        let port = p.get("port").and_then(|v| v.as_i64()).unwrap_or(0);
        if !(1..=65535).contains(&port) {
            errs.push(invalid(
                f("port"),
                p.get("port").unwrap_or(&Value::Null),
                "must be between 1 and 65535, inclusive",
            ));
        }
        let name = p
            .get("name")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        if multi && name.is_empty() {
            errs.push(required(f("name")));
        } else if !name.is_empty() && !names.insert(name.clone()) {
            errs.push(cause(
                f("name"),
                "FieldValueDuplicate",
                format!("Duplicate value: {name:?}"),
            ));
        }
        if !seen.insert((port, proto.clone())) {
            errs.push(
                cause(
                    f(""),
                    "FieldValueDuplicate",
                    format!("Duplicate value: {{Port:{port} Protocol:{proto}}}"),
                )
                .clone(),
            );
        }
        match p.get("targetPort") {
            None | Some(Value::Null) => p["targetPort"] = json!(port),
            Some(Value::Number(n)) if !(1..=65535).contains(&n.as_i64().unwrap_or(0)) => {
                errs.push(invalid(
                    f("targetPort"),
                    &json!(n),
                    "must be between 1 and 65535, inclusive",
                ))
            }
            _ => {}
        }
    }
    // Cluster IPs: carried over on update, else asked for or allocated.
    let old_ips = old.map(cluster_ips).unwrap_or_default();
    let mut ips: Vec<String> = cluster_ips(svc);
    let mut new_ips: Vec<IpAddr> = Vec::new();
    if !headless {
        if !old_ips.is_empty() && ips.is_empty() {
            ips = old_ips.clone();
        }
        if !old_ips.is_empty() && ips != old_ips {
            errs.push(invalid(
                "spec.clusterIPs[0]",
                &json!(ips),
                "field is immutable",
            ));
        }
        if ips.is_empty() {
            // The families asked for (ipFamilies, else the cluster's primary), plus the
            // other one when the policy asks for dual-stack and the cluster has it.
            let policy = svc
                .pointer("/spec/ipFamilyPolicy")
                .and_then(|v| v.as_str())
                .unwrap_or("SingleStack")
                .to_string();
            let mut fams: Vec<bool> = svc
                .pointer("/spec/ipFamilies")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str())
                .map(|f| f == "IPv6")
                .collect();
            if fams.is_empty() {
                fams.push(matches!(alloc.ranges.first(), Some(IpNet::V6(_))));
            }
            if policy != "SingleStack" && fams.len() == 1 && alloc.range_for(!fams[0]).is_some() {
                fams.push(!fams[0]);
            }
            if policy == "SingleStack" {
                fams.truncate(1);
            }
            if policy == "RequireDualStack" && alloc.ranges.len() < 2 {
                errs.push(invalid(
                    "spec.ipFamilyPolicy",
                    &json!(policy),
                    "this cluster is not configured for dual-stack services",
                ));
            }
            for v6 in fams {
                if alloc.range_for(v6).is_none() {
                    errs.push(invalid(
                        "spec.ipFamilies",
                        &json!(if v6 { "IPv6" } else { "IPv4" }),
                        "not configured on this cluster",
                    ));
                    continue;
                }
                match alloc.next_ip(v6).filter(|ip| !new_ips.contains(ip)) {
                    Some(ip) => {
                        new_ips.push(ip);
                        ips.push(ip.to_string());
                    }
                    None => errs.push(cause(
                        "spec.clusterIPs",
                        "FieldValueInvalid",
                        "Internal error: failed to allocate a serviceIP: range is full",
                    )),
                }
            }
        } else if old_ips.is_empty() {
            for (i, s) in ips.iter().enumerate() {
                let field = format!("spec.clusterIPs[{i}]");
                match s.parse::<IpAddr>() {
                    Err(_) => errs.push(invalid(&field, &json!(s), "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)")),
                    Ok(ip) if !alloc.ranges.iter().any(|r| r.contains(&ip)) => errs.push(invalid(
                        &field,
                        &json!(s),
                        &format!("failed to allocate IP {s}: the provided IP ({s}) is not in the valid range. The range of valid IPs is {}", alloc.ranges.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",")),
                    )),
                    Ok(ip) if alloc.ips.contains(&ip) || new_ips.contains(&ip) => errs.push(invalid(
                        &field,
                        &json!(s),
                        &format!("failed to allocate IP {s}: provided IP is already allocated"),
                    )),
                    Ok(ip) => new_ips.push(ip),
                }
            }
        }
        let spec = &mut svc["spec"];
        spec["clusterIP"] = json!(ips.first().cloned().unwrap_or_default());
        spec["clusterIPs"] = json!(ips);
        let fams: Vec<&str> = ips
            .iter()
            .map(|s| if s.contains(':') { "IPv6" } else { "IPv4" })
            .collect();
        spec["ipFamilies"] = json!(fams);
        if spec.get("ipFamilyPolicy").is_none()
            || (fams.len() > 1 && spec["ipFamilyPolicy"] == "SingleStack")
        {
            spec["ipFamilyPolicy"] = json!(if fams.len() > 1 {
                "RequireDualStack"
            } else {
                "SingleStack"
            });
        }
    }
    // Node ports.
    let mut new_ports: Vec<(u16, String)> = Vec::new();
    let old_ports = old.map(node_ports).unwrap_or_default();
    if ty == "NodePort" || ty == "LoadBalancer" {
        let (lo, hi) = alloc.node_ports;
        for (i, p) in ports.iter_mut().enumerate() {
            let proto = p["protocol"].as_str().unwrap_or("TCP").to_string();
            match p.get("nodePort").and_then(|v| v.as_i64()) {
                Some(np) if np != 0 => {
                    let np16 = np as u16;
                    let kept = old_ports.contains(&(np16, proto.clone()));
                    if np < lo as i64 || np > hi as i64 {
                        errs.push(invalid(format!("spec.ports[{i}].nodePort"), &json!(np), &format!("provided port is not in the valid range. The range of valid ports is {lo}-{hi}")));
                    } else if !kept
                        && (alloc.ports.contains(&(np16, proto.clone()))
                            || new_ports.contains(&(np16, proto.clone())))
                    {
                        errs.push(invalid(
                            format!("spec.ports[{i}].nodePort"),
                            &json!(np),
                            "provided port is already allocated",
                        ));
                    } else if !kept {
                        new_ports.push((np16, proto));
                    }
                }
                _ => match alloc
                    .next_port(&proto)
                    .filter(|p| !new_ports.contains(&(*p, proto.clone())))
                {
                    Some(np) => {
                        p["nodePort"] = json!(np);
                        new_ports.push((np, proto));
                    }
                    None => errs.push(cause(
                        format!("spec.ports[{i}].nodePort"),
                        "FieldValueInvalid",
                        "Internal error: failed to allocate a nodePort: range is full",
                    )),
                },
            }
        }
    } else {
        for p in ports.iter_mut() {
            if let Some(o) = p.as_object_mut() {
                o.remove("nodePort");
            }
        }
    }
    if !ports.is_empty() || svc["spec"].get("ports").is_some() {
        svc["spec"]["ports"] = Value::Array(ports);
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    alloc.ips.extend(new_ips);
    alloc.ports.extend(new_ports);
    // What the old version held and this one does not is free again.
    if let Some(old) = old {
        let keep: BTreeSet<(u16, String)> = node_ports(svc).into_iter().collect();
        for p in node_ports(old) {
            if !keep.contains(&p) {
                alloc.ports.remove(&p);
            }
        }
    }
    Ok(())
}

/// Checks the fields kube-apiserver validates for kinds without their own admission here:
/// ConfigMap and Secret data keys, workload replica counts.
pub fn validate_other(kind: &str, v: &Value) -> Vec<Cause> {
    let mut errs = Vec::new();
    match kind {
        "ConfigMap" | "Secret" => {
            for field in ["data", "binaryData", "stringData"] {
                for key in v
                    .get(field)
                    .and_then(|d| d.as_object())
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k)
                {
                    let ok = !key.is_empty()
                        && key.len() <= 253
                        && key
                            .bytes()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
                        && key != "."
                        && key != "..";
                    if !ok {
                        errs.push(invalid(
                            format!("{field}[{key}]"),
                            &json!(key),
                            "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')",
                        ));
                    }
                }
            }
        }
        "Deployment" | "ReplicaSet" => {
            if let Some(r) = v.pointer("/spec/replicas").and_then(|r| r.as_i64())
                && r < 0
            {
                errs.push(invalid(
                    "spec.replicas",
                    &json!(r),
                    "must be greater than or equal to 0",
                ));
            }
        }
        _ => {}
    }
    errs
}

/// Checks an EndpointSlice's shape (addressType, ports, addresses).
pub fn validate_endpoint_slice(v: &Value) -> Vec<Cause> {
    let mut errs = Vec::new();
    let at = v.get("addressType").and_then(|x| x.as_str()).unwrap_or("");
    if !matches!(at, "IPv4" | "IPv6" | "FQDN") {
        errs.push(cause(
            "addressType",
            "FieldValueNotSupported",
            format!("Unsupported value: {at:?}: supported values: \"FQDN\", \"IPv4\", \"IPv6\""),
        ));
    }
    for (i, e) in v
        .get("endpoints")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let addrs = e.get("addresses").and_then(|x| x.as_array());
        if addrs.is_none_or(|a| a.is_empty()) {
            errs.push(required(format!("endpoints[{i}].addresses")));
        }
        for (j, a) in addrs.into_iter().flatten().enumerate() {
            let s = a.as_str().unwrap_or("");
            let ok = match at {
                "IPv4" => s.parse::<std::net::Ipv4Addr>().is_ok(),
                "IPv6" => s.parse::<std::net::Ipv6Addr>().is_ok(),
                _ => !s.is_empty(),
            };
            if !ok {
                errs.push(invalid(
                    format!("endpoints[{i}].addresses[{j}]"),
                    a,
                    &format!("must be a valid {at} address"),
                ));
            }
        }
    }
    for (i, p) in v
        .get("ports")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(n) = p.get("port").and_then(|x| x.as_i64())
            && !(1..=65535).contains(&n)
        {
            errs.push(invalid(
                format!("ports[{i}].port"),
                &json!(n),
                "must be between 1 and 65535, inclusive",
            ));
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc() -> Allocator {
        Allocator::new(
            vec![
                "10.96.0.0/28".parse().unwrap(),
                "fd00:96::/120".parse().unwrap(),
            ],
            (30000, 30002),
        )
    }

    #[test]
    fn services_get_defaults_and_allocations() {
        let mut a = alloc();
        let mut svc = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}]}});
        admit_service(&mut svc, None, &mut a).unwrap();
        let ip: IpAddr = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
        assert!(a.ranges[0].contains(&ip));
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], json!(80));
        assert_eq!(svc["spec"]["ports"][0]["protocol"], json!("TCP"));
        let np = svc["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
        assert!((30000..=30002).contains(&np));
        assert_eq!(svc["spec"]["ipFamilies"], json!(["IPv4"]));
        assert_eq!(svc["spec"]["sessionAffinity"], json!("None"));
        // The same IP and port again: already allocated.
        let mut dup = json!({"spec": {"type": "NodePort", "clusterIP": ip.to_string(), "ports": [{"port": 80, "nodePort": np}]}});
        let errs = admit_service(&mut dup, None, &mut a).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.2.contains("provided IP is already allocated")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.2.contains("provided port is already allocated")),
            "{errs:?}"
        );
        // Out of range.
        let mut out = json!({"spec": {"type": "NodePort", "clusterIP": "10.0.0.1", "ports": [{"port": 80, "nodePort": 80}]}});
        let errs = admit_service(&mut out, None, &mut a).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.0 == "spec.ports[0].nodePort" && e.2.contains("30000-30002")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.2.contains("not in the valid range")),
            "{errs:?}"
        );
        // Release frees them.
        a.release(&svc);
        assert!(a.ips.is_empty() && a.ports.is_empty());
    }

    #[test]
    fn invalid_services_say_which_field() {
        let mut a = alloc();
        let mut svc =
            json!({"spec": {"ports": [{"port": 70000, "protocol": "ICMP"}, {"port": 80}]}});
        let errs = admit_service(&mut svc, None, &mut a).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.0.as_str()).collect();
        assert!(fields.contains(&"spec.ports[0].port"), "{fields:?}");
        assert!(fields.contains(&"spec.ports[0].protocol"), "{fields:?}");
        assert!(fields.contains(&"spec.ports[0].name"), "{fields:?}");
        assert!(a.ips.is_empty(), "nothing allocated for a refused Service");
        let mut none = json!({"spec": {}});
        assert!(admit_service(&mut none, None, &mut a).unwrap_err()[0].0 == "spec.ports");
    }

    #[test]
    fn updates_keep_allocations_and_the_ip_is_immutable() {
        let mut a = alloc();
        let mut svc = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}]}});
        admit_service(&mut svc, None, &mut a).unwrap();
        let mut upd = json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": svc["spec"]["ports"][0]["nodePort"]}]}});
        admit_service(&mut upd, Some(&svc), &mut a).unwrap();
        assert_eq!(upd["spec"]["clusterIP"], svc["spec"]["clusterIP"]);
        let mut moved = json!({"spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80}]}});
        if svc["spec"]["clusterIP"] != json!("10.96.0.9") {
            assert!(admit_service(&mut moved, Some(&svc), &mut a).is_err());
        }
        // NodePort -> ClusterIP frees the node port.
        let mut cip = json!({"spec": {"type": "ClusterIP", "ports": [{"port": 80}]}});
        admit_service(&mut cip, Some(&upd), &mut a).unwrap();
        assert!(a.ports.is_empty());
    }

    #[test]
    fn endpoint_slices_are_checked() {
        let ok = json!({"addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"]}], "ports": [{"port": 80}]});
        assert!(validate_endpoint_slice(&ok).is_empty());
        let bad = json!({"addressType": "IPv4", "endpoints": [{"addresses": ["fd00::1"]}], "ports": [{"port": 0}]});
        assert_eq!(validate_endpoint_slice(&bad).len(), 2);
    }
}

#[cfg(test)]
mod dual_stack_tests {
    use super::*;

    #[test]
    fn dual_stack_policies_allocate_both_families() {
        let mut a = Allocator::new(
            vec![
                "10.96.0.0/24".parse().unwrap(),
                "fd00:96::/120".parse().unwrap(),
            ],
            (30000, 30100),
        );
        let mut svc =
            json!({"spec": {"ipFamilyPolicy": "PreferDualStack", "ports": [{"port": 80}]}});
        admit_service(&mut svc, None, &mut a).unwrap();
        assert_eq!(svc["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
        assert_eq!(svc["spec"]["clusterIPs"].as_array().unwrap().len(), 2);
        let mut v6 = json!({"spec": {"ipFamilies": ["IPv6"], "ports": [{"port": 80}]}});
        admit_service(&mut v6, None, &mut a).unwrap();
        assert_eq!(v6["spec"]["ipFamilies"], json!(["IPv6"]));
        let mut single = Allocator::new(vec!["10.96.0.0/24".parse().unwrap()], (30000, 30100));
        let mut req =
            json!({"spec": {"ipFamilyPolicy": "RequireDualStack", "ports": [{"port": 80}]}});
        assert!(admit_service(&mut req, None, &mut single).is_err());
    }
}

#[cfg(test)]
mod other_tests {
    use super::*;

    #[test]
    fn config_keys_replicas_and_affinity_are_checked() {
        assert_eq!(
            validate_other(
                "ConfigMap",
                &json!({"data": {"ok.key": "1", "bad key": "2"}})
            )
            .len(),
            1
        );
        assert!(validate_other("ConfigMap", &json!({"data": {"a-b_c.d": "1"}})).is_empty());
        assert_eq!(
            validate_other("Deployment", &json!({"spec": {"replicas": -1}}))[0].0,
            "spec.replicas"
        );
        let mut a = Allocator::new(vec!["10.96.0.0/24".parse().unwrap()], (30000, 30100));
        let mut svc = json!({"spec": {"sessionAffinity": "Sticky", "ports": [{"port": 80}]}});
        let errs = admit_service(&mut svc, None, &mut a).unwrap_err();
        assert!(
            errs[0].2.contains("Unsupported value: \"Sticky\""),
            "{errs:?}"
        );
    }
}
