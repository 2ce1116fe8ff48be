use super::*;
use k8s_openapi::api::core::v1::Node;

use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------

/// Deep-merges `patch` into `base` (objects merge, everything else replaces).
fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, p) => *b = p,
    }
}

/// A Service `default/<name>`: ClusterIP 10.96.0.10, one TCP port "http" 80 → 8080,
/// with `patch` deep-merged on top.
fn service(name: &str, patch: Value) -> Service {
    let mut v = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": "default",
            "creationTimestamp": "2024-01-01T00:00:00Z",
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10"],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    });
    merge(&mut v, patch);
    serde_json::from_value(v).expect("valid Service JSON")
}

/// An EndpointSlice `default/<name>` for Service `default/<svc>`.
fn slice(
    svc: &str,
    name: &str,
    address_type: &str,
    ports: Value,
    endpoints: Value,
) -> EndpointSlice {
    slice_with(svc, name, address_type, ports, endpoints, json!({}))
}

fn slice_with(
    svc: &str,
    name: &str,
    address_type: &str,
    ports: Value,
    endpoints: Value,
    patch: Value,
) -> EndpointSlice {
    let mut v = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": address_type,
        "ports": ports,
        "endpoints": endpoints,
    });
    merge(&mut v, patch);
    serde_json::from_value(v).expect("valid EndpointSlice JSON")
}

/// The usual ports of a slice of the "http" Service port.
fn http_ports() -> Value {
    json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
}

/// An IPv4 slice of Service `svc` with the "http" port on 8080.
fn http_slice(svc: &str, name: &str, endpoints: Value) -> EndpointSlice {
    slice(svc, name, "IPv4", http_ports(), endpoints)
}

/// A ready endpoint on `node`.
fn ep(addr: &str, node: &str) -> Value {
    json!({"addresses": [addr], "nodeName": node, "conditions": {"ready": true}})
}

/// An endpoint with explicit conditions.
fn ep_cond(addr: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({
        "addresses": [addr],
        "nodeName": node,
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
    })
}

/// A ready endpoint with zone hints.
fn ep_zone(addr: &str, node: &str, zones: &[&str]) -> Value {
    let z: Vec<Value> = zones.iter().map(|z| json!({"name": z})).collect();
    json!({
        "addresses": [addr],
        "nodeName": node,
        "conditions": {"ready": true},
        "hints": {"forZones": z},
    })
}

/// A ready endpoint with node and zone hints.
fn ep_node_zone(addr: &str, node: &str, for_nodes: &[&str], zones: &[&str]) -> Value {
    let n: Vec<Value> = for_nodes.iter().map(|n| json!({"name": n})).collect();
    let z: Vec<Value> = zones.iter().map(|z| json!({"name": z})).collect();
    json!({
        "addresses": [addr],
        "nodeName": node,
        "conditions": {"ready": true},
        "hints": {"forNodes": n, "forZones": z},
    })
}

fn node(name: &str, zone: Option<&str>) -> Node {
    let mut v = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}});
    if let Some(z) = zone {
        v["metadata"]["labels"] = json!({"topology.kubernetes.io/zone": z});
    }
    serde_json::from_value(v).expect("valid Node JSON")
}

fn ctx(node_name: &str) -> NodeContext {
    NodeContext {
        node_name: node_name.into(),
        ..Default::default()
    }
}

fn snap(services: Vec<Service>, endpoint_slices: Vec<EndpointSlice>, nodes: Vec<Node>) -> Snapshot {
    Snapshot::of(services, endpoint_slices, nodes)
}

fn key(name: &str, port_name: &str, protocol: Protocol, family: Family, scope: Scope) -> PlanKey {
    PlanKey {
        namespace: "default".into(),
        name: name.into(),
        port_name: port_name.into(),
        protocol,
        family,
        scope,
    }
}

/// The plan of `default/<name>:http`, TCP.
fn http_plan<'a>(st: &'a DesiredState, name: &str, family: Family, scope: Scope) -> &'a Plan {
    get_plan(st, &key(name, "http", Protocol::Tcp, family, scope))
}

fn get_plan<'a>(st: &'a DesiredState, k: &PlanKey) -> &'a Plan {
    st.plans.get(k).unwrap_or_else(|| {
        let keys: Vec<String> = st.plans.keys().map(|k| k.to_string()).collect();
        panic!("no plan {k}; plans: {keys:?}")
    })
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn sas(v: &[&str]) -> Vec<SocketAddr> {
    v.iter().map(|s| sa(s)).collect()
}

fn ip_fe(ip: &str, port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr: FrontendAddr::Ip(ip.parse().unwrap()),
        port,
        protocol,
    }
}

fn np_fe(family: Family, port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr: FrontendAddr::NodePort(family),
        port,
        protocol,
    }
}

fn fes(v: &[Frontend]) -> BTreeSet<Frontend> {
    v.iter().copied().collect()
}

fn plan_keys(st: &DesiredState) -> Vec<PlanKey> {
    st.plans.keys().cloned().collect()
}

/// Three ready endpoints of the "http" port on two nodes.
fn three_ready(svc: &str) -> EndpointSlice {
    http_slice(
        svc,
        &format!("{svc}-abc"),
        json!([ep("10.0.0.2", "node-b"), ep("10.0.0.1", "node-a"), {
            // No conditions at all: ready (nil means ready).
            "addresses": ["10.0.0.3"], "nodeName": "node-c"
        }]),
    )
}

// ---------------------------------------------------------------------------------------
// ClusterIP, families, frontends
// ---------------------------------------------------------------------------------------

#[test]
fn clusterip_v4_one_internal_plan() {
    let s = snap(
        vec![service("web", json!({}))],
        vec![three_ready("web")],
        vec![],
    );
    let st = desired_state(&s, &ctx("node-a"));
    assert_eq!(
        plan_keys(&st),
        vec![key(
            "web",
            "http",
            Protocol::Tcp,
            Family::V4,
            Scope::Internal
        )]
    );
    let p = http_plan(&st, "web", Family::V4, Scope::Internal);
    assert_eq!(p.frontends, fes(&[ip_fe("10.96.0.10", 80, Protocol::Tcp)]));
    assert_eq!(
        p.backends,
        sas(&["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"])
    );
    assert_eq!(p.affinity_timeout, None);
    assert_eq!(p.algorithm, Algorithm::Random);
    assert_eq!(st.frontend_count(), 1);
    assert_eq!(st.backend_count(), 3);
}

#[test]
fn clusterip_from_cluster_ip_field_when_cluster_ips_missing() {
    let mut svc = service("web", json!({}));
    svc.spec.as_mut().unwrap().cluster_ips = None;
    let st = desired_state(
        &snap(vec![svc], vec![three_ready("web")], vec![]),
        &ctx("n"),
    );
    let p = http_plan(&st, "web", Family::V4, Scope::Internal);
    assert_eq!(p.frontends, fes(&[ip_fe("10.96.0.10", 80, Protocol::Tcp)]));
}

#[test]
fn clusterip_v6_one_internal_plan() {
    let svc = service(
        "web",
        json!({"spec": {"clusterIP": "fd00:96::a", "clusterIPs": ["fd00:96::a"], "ipFamilies": ["IPv6"]}}),
    );
    let sl = slice(
        "web",
        "web-v6",
        "IPv6",
        http_ports(),
        json!([ep("fd00:1::2", "node-a"), ep("fd00:1::1", "node-b")]),
    );
    let st = desired_state(&snap(vec![svc], vec![sl], vec![]), &ctx("node-a"));
    assert_eq!(
        plan_keys(&st),
        vec![key(
            "web",
            "http",
            Protocol::Tcp,
            Family::V6,
            Scope::Internal
        )]
    );
    let p = http_plan(&st, "web", Family::V6, Scope::Internal);
    assert_eq!(p.frontends, fes(&[ip_fe("fd00:96::a", 80, Protocol::Tcp)]));
    assert_eq!(p.backends, sas(&["[fd00:1::1]:8080", "[fd00:1::2]:8080"]));
}

#[test]
fn dual_stack_one_plan_per_family_with_its_own_backends() {
    let svc = service(
        "web",
        json!({"spec": {"clusterIPs": ["10.96.0.10", "fd00:96::a"], "ipFamilies": ["IPv4", "IPv6"]}}),
    );
    let v4 = http_slice("web", "web-v4", json!([ep("10.0.0.1", "node-a")]));
    let v6 = slice(
        "web",
        "web-v6",
        "IPv6",
        http_ports(),
        json!([ep("fd00:1::1", "node-a"), ep("fd00:1::2", "node-b")]),
    );
    let st = desired_state(&snap(vec![svc], vec![v4, v6], vec![]), &ctx("node-a"));
    assert_eq!(
        plan_keys(&st),
        vec![
            key("web", "http", Protocol::Tcp, Family::V4, Scope::Internal),
            key("web", "http", Protocol::Tcp, Family::V6, Scope::Internal),
        ]
    );
    let p4 = http_plan(&st, "web", Family::V4, Scope::Internal);
    assert_eq!(p4.frontends, fes(&[ip_fe("10.96.0.10", 80, Protocol::Tcp)]));
    assert_eq!(p4.backends, sas(&["10.0.0.1:8080"]));
    let p6 = http_plan(&st, "web", Family::V6, Scope::Internal);
    assert_eq!(p6.frontends, fes(&[ip_fe("fd00:96::a", 80, Protocol::Tcp)]));
    assert_eq!(p6.backends, sas(&["[fd00:1::1]:8080", "[fd00:1::2]:8080"]));
}

#[test]
fn backends_filtered_by_family_of_the_plan() {
    // A single-stack IPv4 Service whose slices also hold IPv6 endpoints: no IPv6 plan and
    // no IPv6 backend in the IPv4 plan.
    let v4 = http_slice("web", "web-v4", json!([ep("10.0.0.1", "node-a")]));
    let v6 = slice(
        "web",
        "web-v6",
        "IPv6",
        http_ports(),
        json!([ep("fd00:1::1", "node-a")]),
    );
    let st = desired_state(
        &snap(vec![service("web", json!({}))], vec![v4, v6], vec![]),
        &ctx("node-a"),
    );
    assert_eq!(st.plans.len(), 1);
    let p = http_plan(&st, "web", Family::V4, Scope::Internal);
    assert_eq!(p.backends, sas(&["10.0.0.1:8080"]));
}

#[test]
fn backends_sorted_and_deduplicated() {
    // Addresses out of order, one endpoint twice in a slice, one twice in an endpoint.
    let sl = http_slice(
        "web",
        "web-a",
        json!([
            ep("10.0.0.9", "node-a"),
            ep("10.0.0.10", "node-a"),
            ep("10.0.0.1", "node-a"),
            ep("10.0.0.9", "node-b"),
            {"addresses": ["10.0.0.5", "10.0.0.5"], "conditions": {"ready": true}},
        ]),
    );
    let st = desired_state(
        &snap(vec![service("web", json!({}))], vec![sl], vec![]),
        &ctx("x"),
    );
    let p = http_plan(&st, "web", Family::V4, Scope::Internal);
    assert_eq!(
        p.backends,
        sas(&[
            "10.0.0.1:8080",
            "10.0.0.5:8080",
            "10.0.0.9:8080",
            "10.0.0.10:8080"
        ])
    );
    let mut sorted = p.backends.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(p.backends, sorted);
}

#[test]
fn invalid_endpoint_addresses_are_skipped() {
    let sl = slice(
        "web",
        "web-a",
        "IPv4",
        http_ports(),
        json!([
            ep("10.0.0.1", "node-a"),
            ep("not-an-ip", "node-a"),
            ep("10.0.0.300", "node-a")
        ]),
    );
    let st = desired_state(
        &snap(vec![service("web", json!({}))], vec![sl], vec![]),
        &ctx("x"),
    );
    assert_eq!(
        http_plan(&st, "web", Family::V4, Scope::Internal).backends,
        sas(&["10.0.0.1:8080"])
    );
}

#[test]
fn nodeport_service_has_nodeport_frontend_in_external_plan() {
    let svc = service(
        "web",
        json!({"spec": {"type": "NodePort",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}}),
    );
    let st = desired_state(
        &snap(vec![svc], vec![three_ready("web")], vec![]),
        &ctx("node-a"),
    );
    assert_eq!(
        plan_keys(&st),
        vec![
            key("web", "http", Protocol::Tcp, Family::V4, Scope::Internal),
            key("web", "http", Protocol::Tcp, Family::V4, Scope::External),
        ]
    );
    let int = http_plan(&st, "web", Family::V4, Scope::Internal);
    assert_eq!(
        int.frontends,
        fes(&[ip_fe("10.96.0.10", 80, Protocol::Tcp)])
    );
    let ext = http_plan(&st, "web", Family::V4, Scope::External);
    assert_eq!(
        ext.frontends,
        fes(&[np_fe(Family::V4, 30080, Protocol::Tcp)])
    );
    assert_eq!(ext.backends, int.backends);
    assert_eq!(ext.backends.len(), 3);
}

#[test]
fn dual_stack_nodeport_has_a_nodeport_frontend_per_family() {
    let svc = service(
        "web",
        json!({"spec": {"type": "NodePort", "clusterIPs": ["10.96.0.10", "fd00:96::a"],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}}),
    );
    let v6 = slice(
        "web",
        "web-v6",
        "IPv6",
        http_ports(),
        json!([ep("fd00:1::1", "node-a")]),
    );
    let st = desired_state(
        &snap(vec![svc], vec![three_ready("web"), v6], vec![]),
        &ctx("node-a"),
    );
    assert_eq!(st.plans.len(), 4);
    assert_eq!(
        http_plan(&st, "web", Family::V4, Scope::External).frontends,
        fes(&[np_fe(Family::V4, 30080, Protocol::Tcp)])
    );
    let ext6 = http_plan(&st, "web", Family::V6, Scope::External);
    assert_eq!(
        ext6.frontends,
        fes(&[np_fe(Family::V6, 30080, Protocol::Tcp)])
    );
    assert_eq!(ext6.backends, sas(&["[fd00:1::1]:8080"]));
}

#[test]
fn node_port_ignored_on_clusterip_services_and_when_unallocated() {
    // A ClusterIP Service with a stale nodePort: no NodePort frontend.
    let stale = service(
        "a",
        json!({"spec": {"ports": [{"name": "http", "port": 80, "nodePort": 30080}]}}),
    );
    // A NodePort Service whose nodePort is not (yet) allocated.
    let unallocated = service(
        "b",
        json!({"spec": {"type": "NodePort", "clusterIP": "10.96.0.11", "clusterIPs": ["10.96.0.11"],
            "ports": [{"name": "http", "port": 80, "nodePort": 0}]}}),
    );
    let st = desired_state(&snap(vec![stale, unallocated], vec![], vec![]), &ctx("n"));
    assert!(
        st.plans.keys().all(|k| k.scope == Scope::Internal),
        "{st:?}"
    );
    assert_eq!(st.plans.len(), 2);
}

#[test]
fn loadbalancer_frontends_external_ips_ingress_and_nodeport() {
    let svc = service(
        "web",
        json!({
            "spec": {
                "type": "LoadBalancer",
                "externalIPs": ["192.0.2.10"],
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}],
            },
            "status": {"loadBalancer": {"ingress": [
                {"ip": "198.51.100.1"},
                {"ip": "198.51.100.2", "ipMode": "Proxy"},
                {"ip": "198.51.100.3", "ipMode": "VIP"},
                {"hostname": "lb.example.com"},
                // An IPv6 ingress on a single-stack IPv4 Service: no IPv6 plan.
                {"ip": "2001:db8::1"},
            ]}},
        }),
    );
    let st = desired_state(
        &snap(vec![svc], vec![three_ready("web")], vec![]),
        &ctx("node-a"),
    );
    assert_eq!(
        plan_keys(&st),
        vec![
            key("web", "http", Protocol::Tcp, Family::V4, Scope::Internal),
            key("web", "http", Protocol::Tcp, Family::V4, Scope::External),
        ]
    );
    assert_eq!(
        http_plan(&st, "web", Family::V4, Scope::Internal).frontends,
        fes(&[ip_fe("10.96.0.10", 80, Protocol::Tcp)])
    );
    let ext = http_plan(&st, "web", Family::V4, Scope::External);
    assert_eq!(
        ext.frontends,
        fes(&[
            ip_fe("192.0.2.10", 80, Protocol::Tcp),
            ip_fe("198.51.100.1", 80, Protocol::Tcp),
            ip_fe("198.51.100.3", 80, Protocol::Tcp),
            np_fe(Family::V4, 30080, Protocol::Tcp),
        ])
    );
    assert!(
        !ext.frontends
            .contains(&ip_fe("198.51.100.2", 80, Protocol::Tcp)),
        "ipMode Proxy must be skipped"
    );
    assert_eq!(ext.backends.len(), 3);
}

#[test]
fn external_ips_on_clusterip_service_and_lb_status_ignored_without_lb_type() {
    let svc = service(
        "web",
        json!({
            "spec": {"externalIPs": ["192.0.2.10"]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}},
        }),
    );
    let st = desired_state(
        &snap(vec![svc], vec![three_ready("web")], vec![]),
        &ctx("node-a"),
    );
    let ext = http_plan(&st, "web", Family::V4, Scope::External);
    assert_eq!(
        ext.frontends,
        fes(&[ip_fe("192.0.2.10", 80, Protocol::Tcp)])
    );
    assert_eq!(ext.backends.len(), 3);
    assert_eq!(st.plans.len(), 2);
}

#[test]
fn dual_stack_external_ips_split_by_family() {
    let svc = service(
        "web",
        json!({"spec": {"clusterIPs": ["10.96.0.10", "fd00:96::a"],
            "externalIPs": ["192.0.2.10", "2001:db8::10"]}}),
    );
    let st = desired_state(&snap(vec![svc], vec![], vec![]), &ctx("n"));
    assert_eq!(
        http_plan(&st, "web", Family::V4, Scope::External).frontends,
        fes(&[ip_fe("192.0.2.10", 80, Protocol::Tcp)])
    );
    assert_eq!(
        http_plan(&st, "web", Family::V6, Scope::External).frontends,
        fes(&[ip_fe("2001:db8::10", 80, Protocol::Tcp)])
    );
}

// ---------------------------------------------------------------------------------------
// Endpoint conditions
// ---------------------------------------------------------------------------------------

fn backends_of(eps: Value, svc_patch: Value) -> Vec<SocketAddr> {
    let st = desired_state(
        &snap(
            vec![service("web", svc_patch)],
            vec![http_slice("web", "web-a", eps)],
            vec![],
        ),
        &ctx("node-a"),
    );
    http_plan(&st, "web", Family::V4, Scope::Internal)
        .backends
        .clone()
}

#[test]
fn ready_endpoints_preferred_over_terminating() {
    let b = backends_of(
        json!([
            ep_cond("10.0.0.1", "node-a", true, true, false),
            ep_cond("10.0.0.2", "node-a", false, false, false),
            ep_cond("10.0.0.3", "node-b", false, true, true),
        ]),
        json!({}),
    );
    assert_eq!(b, sas(&["10.0.0.1:8080"]));
}

#[test]
fn serving_terminating_fallback_when_none_ready() {
    let b = backends_of(
        json!([
            ep_cond("10.0.0.2", "node-a", false, false, true),
            ep_cond("10.0.0.3", "node-b", false, true, true),
            ep_cond("10.0.0.4", "node-b", false, true, false),
            ep_cond("10.0.0.5", "node-b", false, false, false),
        ]),
        json!({}),
    );
    assert_eq!(b, sas(&["10.0.0.3:8080"]));
}

#[test]
fn no_usable_endpoint_gives_a_plan_with_no_backends() {
    let b = backends_of(
        json!([
            ep_cond("10.0.0.2", "node-a", false, false, true),
            ep_cond("10.0.0.5", "node-b", false, false, false),
        ]),
        json!({}),
    );
    assert!(b.is_empty());
    // No slice at all: the frontend still exists and refuses.
    let st = desired_state(
        &snap(vec![service("web", json!({}))], vec![], vec![]),
        &ctx("n"),
    );
    let p = http_plan(&st, "web", Family::V4, Scope::Internal);
    assert!(p.backends.is_empty());
    assert_eq!(p.frontends.len(), 1);
}

#[test]
fn publish_not_ready_addresses_uses_every_endpoint() {
    let eps = json!([
        ep_cond("10.0.0.1", "node-a", true, true, false),
        ep_cond("10.0.0.2", "node-a", false, false, false),
        ep_cond("10.0.0.3", "node-b", false, true, true),
    ]);
    assert_eq!(backends_of(eps.clone(), json!({})), sas(&["10.0.0.1:8080"]));
    assert_eq!(
        backends_of(eps, json!({"spec": {"publishNotReadyAddresses": true}})),
        sas(&["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"])
    );
}

// ---------------------------------------------------------------------------------------
// Traffic policies and topology
// ---------------------------------------------------------------------------------------

#[test]
fn internal_traffic_policy_local_limits_internal_plan_only() {
    let svc = service(
        "web",
        json!({"spec": {"type": "NodePort", "internalTrafficPolicy": "Local",
            "externalIPs": ["192.0.2.10"],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}}),
    );
    let sl = http_slice(
        "web",
        "web-a",
        json!([ep("10.0.0.1", "node-a"), ep("10.0.0.2", "node-b"), ep("10.0.0.3", "node-a"),
            {"addresses": ["10.0.0.4"], "conditions": {"ready": true}}]),
    );
    let st = desired_state(&snap(vec![svc], vec![sl], vec![]), &ctx("node-a"));
    assert_eq!(
        http_plan(&st, "web", Family::V4, Scope::Internal).backends,
        sas(&["10.0.0.1:8080", "10.0.0.3:8080"])
    );
    assert_eq!(
        http_plan(&st, "web", Family::V4, Scope::External).backends,
        sas(&[
            "10.0.0.1:8080",
            "10.0.0.2:8080",
            "10.0.0.3:8080",
            "10.0.0.4:8080"
        ])
    );
}

#[test]
fn internal_traffic_policy_local_categorises_local_endpoints_alone() {
    // The only local endpoint is serving and terminating while a remote one is ready:
    // the local plan falls back to the terminating local one (kube-proxy's behaviour).
    let svc = service("web", json!({"spec": {"internalTrafficPolicy": "Local"}}));
    let sl = http_slice(
        "web",
        "web-a",
        json!([
            ep_cond("10.0.0.1", "node-a", false, true, true),
            ep("10.0.0.2", "node-b")
        ]),
    );
    let st = desired_state(&snap(vec![svc.clone()], vec![sl], vec![]), &ctx("node-a"));
    assert_eq!(
        http_plan(&st, "web", Family::V4, Scope::Internal).backends,
        sas(&["10.0.0.1:8080"])
    );
    // No local endpoint at all: the internal plan refuses.
    let sl = http_slice("web", "web-a", json!([ep("10.0.0.2", "node-b")]));
    let st = desired_state(&snap(vec![svc], vec![sl], vec![]), &ctx("node-a"));
    let p = http_plan(&st, "web", Family::V4, Scope::Internal);
    assert!(p.backends.is_empty());
    assert_eq!(p.frontends.len(), 1);
}

fn zone_nodes() -> Vec<Node> {
    vec![
        node("node-a", Some("zone-a")),
        node("node-b", Some("zone-b")),
        node("node-d", Some("zone-a")),
        node("node-nozone", None),
    ]
}

/// Internal and External backends of a NodePort "web" with `svc_patch` and these endpoints,
/// seen from `node_name`.
fn topo_backends(
    svc_patch: Value,
    eps: Value,
    node_name: &str,
) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    let mut patch = json!({"spec": {"type": "NodePort",
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}});
    merge(&mut patch, svc_patch);
    let st = desired_state(
        &snap(
            vec![service("web", patch)],
            vec![http_slice("web", "web-a", eps)],
            zone_nodes(),
        ),
        &ctx(node_name),
    );
    (
        http_plan(&st, "web", Family::V4, Scope::Internal)
            .backends
            .clone(),
        http_plan(&st, "web", Family::V4, Scope::External)
            .backends
            .clone(),
    )
}

fn zoned_eps() -> Value {
    json!([
        ep_zone("10.0.0.1", "node-a", &["zone-a"]),
        ep_zone("10.0.0.2", "node-b", &["zone-b"]),
        ep_zone("10.0.0.3", "node-d", &["zone-a"]),
    ])
}

const ALL3: [&str; 3] = ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"];

#[test]
fn prefer_same_zone_keeps_hinted_endpoints_of_this_zone() {
    let (int, ext) = topo_backends(
        json!({"spec": {"trafficDistribution": "PreferSameZone"}}),
        zoned_eps(),
        "node-a",
    );
    assert_eq!(int, sas(&["10.0.0.1:8080", "10.0.0.3:8080"]));
    assert_eq!(ext, sas(&["10.0.0.1:8080", "10.0.0.3:8080"]));
    let (int, _) = topo_backends(
        json!({"spec": {"trafficDistribution": "PreferSameZone"}}),
        zoned_eps(),
        "node-b",
    );
    assert_eq!(int, sas(&["10.0.0.2:8080"]));
}

#[test]
fn zone_hints_ignored_without_traffic_distribution() {
    let (int, ext) = topo_backends(json!({}), zoned_eps(), "node-a");
    assert_eq!(int, sas(&ALL3));
    assert_eq!(ext, sas(&ALL3));
}

#[test]
fn prefer_same_zone_falls_back_when_a_ready_endpoint_has_no_hints() {
    let eps = json!([
        ep_zone("10.0.0.1", "node-a", &["zone-a"]),
        ep_zone("10.0.0.2", "node-b", &["zone-b"]),
        ep("10.0.0.3", "node-d"),
    ]);
    let (int, ext) = topo_backends(
        json!({"spec": {"trafficDistribution": "PreferSameZone"}}),
        eps,
        "node-a",
    );
    assert_eq!(int, sas(&ALL3));
    assert_eq!(ext, sas(&ALL3));
}

#[test]
fn prefer_same_zone_ignores_missing_hints_on_not_ready_endpoints() {
    let eps = json!([
        ep_zone("10.0.0.1", "node-a", &["zone-a"]),
        ep_zone("10.0.0.2", "node-b", &["zone-b"]),
        ep_cond("10.0.0.4", "node-b", false, false, false),
    ]);
    let (int, _) = topo_backends(
        json!({"spec": {"trafficDistribution": "PreferSameZone"}}),
        eps,
        "node-a",
    );
    assert_eq!(int, sas(&["10.0.0.1:8080"]));
}

#[test]
fn prefer_same_zone_falls_back_when_no_hint_matches() {
    let eps = json!([
        ep_zone("10.0.0.1", "node-a", &["zone-c"]),
        ep_zone("10.0.0.2", "node-b", &["zone-b"]),
        ep_zone("10.0.0.3", "node-d", &["zone-c"]),
    ]);
    let (int, ext) = topo_backends(
        json!({"spec": {"trafficDistribution": "PreferSameZone"}}),
        eps,
        "node-a",
    );
    assert_eq!(int, sas(&ALL3));
    assert_eq!(ext, sas(&ALL3));
}

#[test]
fn prefer_same_zone_falls_back_when_the_matching_endpoints_are_not_ready() {
    let eps = json!([
        {"addresses": ["10.0.0.1"], "nodeName": "node-a",
         "conditions": {"ready": false, "serving": false, "terminating": false},
         "hints": {"forZones": [{"name": "zone-a"}]}},
        ep_zone("10.0.0.2", "node-b", &["zone-b"]),
    ]);
    let (int, _) = topo_backends(
        json!({"spec": {"trafficDistribution": "PreferSameZone"}}),
        eps,
        "node-a",
    );
    assert_eq!(int, sas(&["10.0.0.2:8080"]));
}

#[test]
fn prefer_same_zone_needs_the_node_zone_label() {
    let dist = json!({"spec": {"trafficDistribution": "PreferSameZone"}});
    // The node has no zone label.
    let (int, _) = topo_backends(dist.clone(), zoned_eps(), "node-nozone");
    assert_eq!(int, sas(&ALL3));
    // The node is not in the snapshot at all.
    let (int, _) = topo_backends(dist, zoned_eps(), "node-unknown");
    assert_eq!(int, sas(&ALL3));
}

#[test]
fn prefer_close_and_topology_mode_auto_act_as_same_zone() {
    let zone_a = sas(&["10.0.0.1:8080", "10.0.0.3:8080"]);
    for patch in [
        json!({"spec": {"trafficDistribution": "PreferClose"}}),
        json!({"metadata": {"annotations": {"service.kubernetes.io/topology-mode": "Auto"}}}),
        json!({"metadata": {"annotations": {"service.kubernetes.io/topology-mode": "auto"}}}),
        json!({"metadata": {"annotations": {"service.kubernetes.io/topology-aware-hints": "auto"}}}),
    ] {
        let (int, ext) = topo_backends(patch.clone(), zoned_eps(), "node-a");
        assert_eq!(int, zone_a, "{patch}");
        assert_eq!(ext, zone_a, "{patch}");
    }
    let (int, _) = topo_backends(
        json!({"metadata": {"annotations": {"service.kubernetes.io/topology-mode": "Disabled"}}}),
        zoned_eps(),
        "node-a",
    );
    assert_eq!(int, sas(&ALL3));
}

fn node_hinted_eps() -> Value {
    json!([
        ep_node_zone("10.0.0.1", "node-a", &["node-a"], &["zone-a"]),
        ep_node_zone("10.0.0.2", "node-d", &["node-d"], &["zone-a"]),
        ep_node_zone("10.0.0.3", "node-b", &["node-b"], &["zone-b"]),
    ])
}

#[test]
fn prefer_same_node_keeps_this_nodes_endpoints() {
    let dist = json!({"spec": {"trafficDistribution": "PreferSameNode"}});
    let (int, ext) = topo_backends(dist.clone(), node_hinted_eps(), "node-a");
    assert_eq!(int, sas(&["10.0.0.1:8080"]));
    assert_eq!(ext, sas(&["10.0.0.1:8080"]));
    let (int, _) = topo_backends(dist, node_hinted_eps(), "node-b");
    assert_eq!(int, sas(&["10.0.0.3:8080"]));
}

#[test]
fn prefer_same_node_falls_back_to_zone_then_all() {
    let dist = json!({"spec": {"trafficDistribution": "PreferSameNode"}});
    // No endpoint hinted for this node (node-d has none in this set): zone hints.
    let eps = json!([
        ep_node_zone("10.0.0.1", "node-a", &["node-a"], &["zone-a"]),
        ep_node_zone("10.0.0.3", "node-b", &["node-b"], &["zone-b"]),
    ]);
    let (int, _) = topo_backends(dist.clone(), eps, "node-d");
    assert_eq!(int, sas(&["10.0.0.1:8080"]));
    // One ready endpoint without node hints: zone hints.
    let eps = json!([
        ep_node_zone("10.0.0.1", "node-a", &["node-a"], &["zone-a"]),
        ep_zone("10.0.0.2", "node-d", &["zone-a"]),
        ep_node_zone("10.0.0.3", "node-b", &["node-b"], &["zone-b"]),
    ]);
    let (int, _) = topo_backends(dist.clone(), eps, "node-a");
    assert_eq!(int, sas(&["10.0.0.1:8080", "10.0.0.2:8080"]));
    // No hints at all: every endpoint.
    let eps = json!([ep("10.0.0.1", "node-a"), ep("10.0.0.2", "node-b")]);
    let (int, _) = topo_backends(dist, eps, "node-a");
    assert_eq!(int, sas(&["10.0.0.1:8080", "10.0.0.2:8080"]));
}

#[test]
fn topology_does_not_apply_to_internal_traffic_policy_local() {
    let (int, ext) = topo_backends(
        json!({"spec": {"trafficDistribution": "PreferSameZone", "internalTrafficPolicy": "Local"}}),
        zoned_eps(),
        "node-d",
    );
    assert_eq!(int, sas(&["10.0.0.3:8080"]));
    assert_eq!(ext, sas(&["10.0.0.1:8080", "10.0.0.3:8080"]));
}

// ---------------------------------------------------------------------------------------
// Skips
// ---------------------------------------------------------------------------------------

#[test]
fn headless_and_external_name_are_skipped() {
    let headless = service(
        "headless",
        json!({"spec": {"clusterIP": "None", "clusterIPs": ["None"]}}),
    );
    let ext_name = serde_json::from_value::<Service>(json!({
        "metadata": {"name": "ext", "namespace": "default"},
        "spec": {"type": "ExternalName", "externalName": "example.com",
            "ports": [{"name": "http", "port": 80}]},
    }))
    .unwrap();
    let c = ctx("node-a");
    assert_eq!(skip_reason(&headless, &c), Some(Skip::Headless));
    assert_eq!(skip_reason(&ext_name, &c), Some(Skip::ExternalName));
    let st = desired_state(
        &snap(
            vec![headless.clone(), ext_name.clone()],
            vec![three_ready("headless")],
            vec![],
        ),
        &c,
    );
    assert!(st.plans.is_empty(), "{st:?}");
    assert_eq!(validate_service(&headless), Ok(()));
    assert_eq!(validate_service(&ext_name), Ok(()));
}

#[test]
fn service_without_spec_is_invalid() {
    let svc: Service =
        serde_json::from_value(json!({"metadata": {"name": "x", "namespace": "default"}})).unwrap();
    assert_eq!(
        skip_reason(&svc, &ctx("n")),
        Some(Skip::Invalid("no spec".into()))
    );
    assert!(validate_service(&svc).is_err());
    assert!(
        desired_state(&snap(vec![svc], vec![], vec![]), &ctx("n"))
            .plans
            .is_empty()
    );
}

#[test]
fn service_proxy_name_label() {
    let labelled = |proxy: &str| {
        service(
            "web",
            json!({"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": proxy}}}),
        )
    };
    let plain = service("web", json!({}));
    let no_name = ctx("node-a");
    let ours = NodeContext {
        service_proxy_name: Some("capstan".into()),
        ..ctx("node-a")
    };

    // Without --service-proxy-name every labelled Service is someone else's.
    assert_eq!(
        skip_reason(&labelled("capstan"), &no_name),
        Some(Skip::OtherProxy("capstan".into()))
    );
    assert_eq!(skip_reason(&plain, &no_name), None);
    // With it: ours when the label names us, not when it names another proxy.
    assert_eq!(skip_reason(&labelled("capstan"), &ours), None);
    assert_eq!(
        skip_reason(&labelled("other"), &ours),
        Some(Skip::OtherProxy("other".into()))
    );
    assert_eq!(skip_reason(&plain, &ours), None);

    let run = |svc: Service, c: &NodeContext| {
        desired_state(&snap(vec![svc], vec![three_ready("web")], vec![]), c)
    };
    assert!(run(labelled("capstan"), &no_name).plans.is_empty());
    assert!(run(labelled("other"), &ours).plans.is_empty());
    let st = run(labelled("capstan"), &ours);
    assert_eq!(
        http_plan(&st, "web", Family::V4, Scope::Internal)
            .backends
            .len(),
        3
    );
    assert_eq!(run(plain, &ours).plans.len(), 1);
}

// ---------------------------------------------------------------------------------------
// Slices
// ---------------------------------------------------------------------------------------

#[test]
fn headless_labelled_and_unlabelled_and_foreign_slices_are_ignored() {
    let headless = slice_with(
        "web",
        "web-headless",
        "IPv4",
        http_ports(),
        json!([ep("10.0.0.1", "node-a")]),
        json!({"metadata": {"labels": {"service.kubernetes.io/headless": ""}}}),
    );
    let mut unlabelled = http_slice("web", "web-nolabel", json!([ep("10.0.0.2", "node-a")]));
    unlabelled.metadata.labels = None;
    let other_ns = slice_with(
        "web",
        "web-other",
        "IPv4",
        http_ports(),
        json!([ep("10.0.0.3", "node-a")]),
        json!({"metadata": {"namespace": "other"}}),
    );
    let other_svc = http_slice("api", "api-a", json!([ep("10.0.0.4", "node-a")]));
    let good = http_slice("web", "web-good", json!([ep("10.0.0.5", "node-a")]));
    let st = desired_state(
        &snap(
            vec![service("web", json!({}))],
            vec![headless, unlabelled, other_ns, other_svc, good],
            vec![],
        ),
        &ctx("node-a"),
    );
    assert_eq!(
        http_plan(&st, "web", Family::V4, Scope::Internal).backends,
        sas(&["10.0.0.5:8080"])
    );
}

#[test]
fn namespace_defaults_to_default() {
    let mut svc = service("web", json!({}));
    svc.metadata.namespace = None;
    let mut sl = three_ready("web");
    sl.metadata.namespace = None;
    let st = desired_state(&snap(vec![svc], vec![sl], vec![]), &ctx("n"));
    assert_eq!(
        http_plan(&st, "web", Family::V4, Scope::Internal)
            .backends
            .len(),
        3
    );
}

#[test]
fn slices_merged_and_duplicates_prefer_the_ready_copy() {
    let a = http_slice(
        "web",
        "web-a",
        json!([
            ep("10.0.0.1", "node-a"),
            ep_cond("10.0.0.2", "node-a", false, false, false)
        ]),
    );
    let b = http_slice(
        "web",
        "web-b",
        json!([ep("10.0.0.2", "node-a"), ep("10.0.0.3", "node-b")]),
    );
    let c = http_slice(
        "web",
        "web-c",
        json!([ep_cond("10.0.0.3", "node-b", false, false, false)]),
    );
    let want = sas(&["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]);
    for order in [
        vec![a.clone(), b.clone(), c.clone()],
        vec![c.clone(), b.clone(), a.clone()],
        vec![b.clone(), a.clone(), c.clone()],
    ] {
        let st = desired_state(
            &snap(vec![service("web", json!({}))], order, vec![]),
            &ctx("node-a"),
        );
        assert_eq!(
            http_plan(&st, "web", Family::V4, Scope::Internal).backends,
            want
        );
    }
}

#[test]
fn duplicate_prefers_ready_copy_over_terminating_copy() {
    // 10.0.0.2 is in two slices: terminating in one, ready in the other. Were the
    // terminating copy kept, the backends would be the ready 10.0.0.1 alone.
    let a = http_slice(
        "web",
        "web-a",
        json!([
            ep_cond("10.0.0.2", "node-a", false, true, true),
            ep("10.0.0.1", "node-a")
        ]),
    );
    let b = http_slice("web", "web-b", json!([ep("10.0.0.2", "node-a")]));
    for order in [vec![a.clone(), b.clone()], vec![b, a]] {
        let st = desired_state(
            &snap(vec![service("web", json!({}))], order, vec![]),
            &ctx("node-a"),
        );
        assert_eq!(
            http_plan(&st, "web", Family::V4, Scope::Internal).backends,
            sas(&["10.0.0.1:8080", "10.0.0.2:8080"])
        );
    }
}

#[test]
fn named_ports_resolved_per_slice() {
    let svc = service(
        "web",
        json!({"spec": {"ports": [{"name": "http", "port": 80, "targetPort": "web"}]}}),
    );
    let a = slice(
        "web",
        "web-a",
        "IPv4",
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
        json!([ep("10.0.0.1", "node-a")]),
    );
    let b = slice(
        "web",
        "web-b",
        "IPv4",
        json!([{"name": "http", "port": 9090, "protocol": "TCP"},
               {"name": "metrics", "port": 9100, "protocol": "TCP"}]),
        json!([ep("10.0.0.2", "node-b")]),
    );
    let st = desired_state(&snap(vec![svc], vec![a, b], vec![]), &ctx("node-a"));
    assert_eq!(
        http_plan(&st, "web", Family::V4, Scope::Internal).backends,
        sas(&["10.0.0.1:8080", "10.0.0.2:9090"])
    );
}

#[test]
fn multi_port_service_has_a_plan_per_port() {
    let svc = service(
        "web",
        json!({"spec": {"ports": [
            {"name": "http", "port": 80, "targetPort": 8080},
            {"name": "metrics", "port": 9100, "targetPort": 9100},
        ]}}),
    );
    let sl = slice(
        "web",
        "web-a",
        "IPv4",
        json!([{"name": "http", "port": 8080}, {"name": "metrics", "port": 9100}]),
        json!([ep("10.0.0.1", "node-a")]),
    );
    let st = desired_state(&snap(vec![svc], vec![sl], vec![]), &ctx("node-a"));
    assert_eq!(st.plans.len(), 2);
    assert_eq!(
        http_plan(&st, "web", Family::V4, Scope::Internal).backends,
        sas(&["10.0.0.1:8080"])
    );
    let m = get_plan(
        &st,
        &key("web", "metrics", Protocol::Tcp, Family::V4, Scope::Internal),
    );
    assert_eq!(
        m.frontends,
        fes(&[ip_fe("10.96.0.10", 9100, Protocol::Tcp)])
    );
    assert_eq!(m.backends, sas(&["10.0.0.1:9100"]));
}

#[test]
fn unnamed_port_matches_unnamed_slice_port() {
    let svc = service(
        "web",
        json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}]}}),
    );
    let sl = slice(
        "web",
        "web-a",
        "IPv4",
        json!([{"port": 8080, "protocol": "TCP"}]),
        json!([ep("10.0.0.1", "node-a")]),
    );
    let st = desired_state(&snap(vec![svc], vec![sl], vec![]), &ctx("node-a"));
    let p = get_plan(
        &st,
        &key("web", "", Protocol::Tcp, Family::V4, Scope::Internal),
    );
    assert_eq!(p.backends, sas(&["10.0.0.1:8080"]));
}

#[test]
fn tcp_and_udp_on_the_same_port_are_two_plans() {
    let svc = service(
        "dns",
        json!({"spec": {"ports": [
            {"name": "dns-tcp", "port": 53, "targetPort": 5353, "protocol": "TCP"},
            {"name": "dns", "port": 53, "targetPort": 5354, "protocol": "UDP"},
        ]}}),
    );
    let sl = slice(
        "dns",
        "dns-a",
        "IPv4",
        json!([
            {"name": "dns-tcp", "port": 5353, "protocol": "TCP"},
            {"name": "dns", "port": 5354, "protocol": "UDP"},
        ]),
        json!([ep("10.0.0.1", "node-a")]),
    );
    let st = desired_state(&snap(vec![svc], vec![sl], vec![]), &ctx("node-a"));
    assert_eq!(
        plan_keys(&st),
        vec![
            key("dns", "dns", Protocol::Udp, Family::V4, Scope::Internal),
            key("dns", "dns-tcp", Protocol::Tcp, Family::V4, Scope::Internal),
        ]
    );
    let tcp = get_plan(
        &st,
        &key("dns", "dns-tcp", Protocol::Tcp, Family::V4, Scope::Internal),
    );
    assert_eq!(
        tcp.frontends,
        fes(&[ip_fe("10.96.0.10", 53, Protocol::Tcp)])
    );
    assert_eq!(tcp.backends, sas(&["10.0.0.1:5353"]));
    let udp = get_plan(
        &st,
        &key("dns", "dns", Protocol::Udp, Family::V4, Scope::Internal),
    );
    assert_eq!(
        udp.frontends,
        fes(&[ip_fe("10.96.0.10", 53, Protocol::Udp)])
    );
    assert_eq!(udp.backends, sas(&["10.0.0.1:5354"]));
}

#[test]
fn slice_port_of_another_protocol_is_not_used() {
    let svc = service(
        "dns",
        json!({"spec": {"ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}}),
    );
    let sl = slice(
        "dns",
        "dns-a",
        "IPv4",
        json!([{"name": "dns", "port": 5353, "protocol": "TCP"}]),
        json!([ep("10.0.0.1", "node-a")]),
    );
    let st = desired_state(&snap(vec![svc], vec![sl], vec![]), &ctx("node-a"));
    let p = get_plan(
        &st,
        &key("dns", "dns", Protocol::Udp, Family::V4, Scope::Internal),
    );
    assert!(p.backends.is_empty());
}

// ---------------------------------------------------------------------------------------
// Affinity and algorithm
// ---------------------------------------------------------------------------------------

fn internal_plan_of(svc: Service, c: &NodeContext) -> Plan {
    let st = desired_state(&snap(vec![svc], vec![three_ready("web")], vec![]), c);
    http_plan(&st, "web", Family::V4, Scope::Internal).clone()
}

#[test]
fn session_affinity_client_ip() {
    let c = ctx("node-a");
    let none = internal_plan_of(
        service("web", json!({"spec": {"sessionAffinity": "None"}})),
        &c,
    );
    assert_eq!(none.affinity_timeout, None);
    let default = internal_plan_of(
        service("web", json!({"spec": {"sessionAffinity": "ClientIP"}})),
        &c,
    );
    assert_eq!(default.affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT));
    assert_eq!(DEFAULT_AFFINITY_TIMEOUT, 10800);
    let explicit = service(
        "web",
        json!({"spec": {"type": "NodePort", "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 300}},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}}),
    );
    let st = desired_state(&snap(vec![explicit], vec![three_ready("web")], vec![]), &c);
    for p in st.plans.values() {
        assert_eq!(p.affinity_timeout, Some(300));
    }
    assert_eq!(st.plans.len(), 2);
}

#[test]
fn lb_algorithm_annotation_and_default() {
    let ann = |v: &str| {
        service(
            "web",
            json!({"metadata": {"annotations": {"service.capstan.io/lb-algorithm": v}}}),
        )
    };
    let random_ctx = ctx("node-a");
    let maglev_ctx = NodeContext {
        default_algorithm: Algorithm::Maglev,
        ..ctx("node-a")
    };
    assert_eq!(Algorithm::default(), Algorithm::Random);
    assert_eq!(
        internal_plan_of(ann("maglev"), &random_ctx).algorithm,
        Algorithm::Maglev
    );
    assert_eq!(
        internal_plan_of(ann("random"), &maglev_ctx).algorithm,
        Algorithm::Random
    );
    assert_eq!(
        internal_plan_of(service("web", json!({})), &maglev_ctx).algorithm,
        Algorithm::Maglev
    );
    assert_eq!(
        internal_plan_of(service("web", json!({})), &random_ctx).algorithm,
        Algorithm::Random
    );
    // An unknown algorithm: the Service is skipped and does not validate.
    let bad = ann("round-robin");
    assert!(validate_service(&bad).is_err());
    let st = desired_state(
        &snap(vec![bad], vec![three_ready("web")], vec![]),
        &random_ctx,
    );
    assert!(st.plans.is_empty());
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

#[test]
fn invalid_services_are_skipped_and_do_not_validate() {
    let cases = [
        (
            "bad-cluster-ip",
            json!({"spec": {"clusterIP": "10.96.0.300", "clusterIPs": ["10.96.0.300"]}}),
        ),
        (
            "port-too-big",
            json!({"spec": {"ports": [{"name": "http", "port": 70000}]}}),
        ),
        (
            "port-zero",
            json!({"spec": {"ports": [{"name": "http", "port": 0}]}}),
        ),
        (
            "sctp",
            json!({"spec": {"ports": [{"name": "http", "port": 80, "protocol": "SCTP"}]}}),
        ),
        (
            "nodeport-too-big",
            json!({"spec": {"type": "NodePort",
                "ports": [{"name": "http", "port": 80, "nodePort": 70000}]}}),
        ),
        (
            "bad-external-ip",
            json!({"spec": {"externalIPs": ["not-an-ip"]}}),
        ),
        (
            "bad-lb-ip",
            json!({"spec": {"type": "LoadBalancer"},
                "status": {"loadBalancer": {"ingress": [{"ip": "bogus"}]}}}),
        ),
        (
            "duplicate-port",
            json!({"spec": {"ports": [
                {"name": "a", "port": 80, "protocol": "TCP"},
                {"name": "b", "port": 80, "protocol": "TCP"},
            ]}}),
        ),
    ];
    for (name, patch) in cases {
        // Every invalid Service gets its own ClusterIP so that only its own fault counts.
        let bad = service(name, patch);
        assert!(validate_service(&bad).is_err(), "{name} validated");
        let good = service(
            "good",
            json!({"spec": {"clusterIP": "10.96.0.99", "clusterIPs": ["10.96.0.99"]}}),
        );
        let st = desired_state(&snap(vec![bad, good], vec![], vec![]), &ctx("node-a"));
        assert!(
            st.plans.keys().all(|k| k.name == "good"),
            "{name}: {:?}",
            plan_keys(&st)
        );
        assert_eq!(st.plans.len(), 1, "{name}");
    }
}

#[test]
fn valid_services_validate() {
    for svc in [
        service("web", json!({})),
        service(
            "lb",
            json!({"spec": {"type": "LoadBalancer", "externalIPs": ["192.0.2.1"],
                "clusterIPs": ["10.96.0.10", "fd00::a"],
                "ports": [
                    {"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"},
                    {"name": "dns", "port": 53, "nodePort": 30053, "protocol": "UDP"},
                ]},
                "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}, {"hostname": "x"}]}}}),
        ),
    ] {
        assert_eq!(validate_service(&svc), Ok(()));
    }
}

#[test]
fn validate_endpoint_slices() {
    let ok4 = http_slice("web", "a", json!([ep("10.0.0.1", "n")]));
    assert_eq!(validate_endpoint_slice(&ok4), Ok(()));
    let ok6 = slice(
        "web",
        "b",
        "IPv6",
        http_ports(),
        json!([ep("fd00::1", "n")]),
    );
    assert_eq!(validate_endpoint_slice(&ok6), Ok(()));
    let fqdn = slice(
        "web",
        "c",
        "FQDN",
        http_ports(),
        json!([ep("db.example.com", "n")]),
    );
    assert_eq!(validate_endpoint_slice(&fqdn), Ok(()));
    let empty = slice("web", "d", "IPv4", json!(null), json!([]));
    assert_eq!(validate_endpoint_slice(&empty), Ok(()));

    let bad = [
        slice("web", "e", "IPv5", http_ports(), json!([])),
        slice(
            "web",
            "f",
            "IPv4",
            http_ports(),
            json!([ep("fd00::1", "n")]),
        ),
        slice(
            "web",
            "g",
            "IPv6",
            http_ports(),
            json!([ep("10.0.0.1", "n")]),
        ),
        slice("web", "h", "IPv4", http_ports(), json!([ep("nope", "n")])),
        slice(
            "web",
            "i",
            "IPv4",
            json!([{"name": "http", "port": 70000}]),
            json!([]),
        ),
        slice(
            "web",
            "j",
            "IPv4",
            json!([{"name": "http", "port": 80, "protocol": "SCTP"}]),
            json!([]),
        ),
    ];
    for s in bad {
        assert!(
            validate_endpoint_slice(&s).is_err(),
            "{:?} validated",
            s.metadata.name
        );
    }
}

// ---------------------------------------------------------------------------------------
// Conflicts
// ---------------------------------------------------------------------------------------

#[test]
fn conflicting_frontends_go_to_the_older_service() {
    let young = service(
        "young",
        json!({
            "metadata": {"creationTimestamp": "2024-06-01T00:00:00Z"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                "externalIPs": ["192.0.2.10"],
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}]},
        }),
    );
    let old = service(
        "old",
        json!({
            "metadata": {"creationTimestamp": "2023-01-01T00:00:00Z"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.2", "clusterIPs": ["10.96.0.2"],
                "externalIPs": ["192.0.2.10"],
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}]},
        }),
    );
    for order in [
        vec![young.clone(), old.clone()],
        vec![old.clone(), young.clone()],
    ] {
        let st = desired_state(&snap(order, vec![], vec![]), &ctx("node-a"));
        let old_ext = http_plan(&st, "old", Family::V4, Scope::External);
        assert_eq!(
            old_ext.frontends,
            fes(&[
                ip_fe("192.0.2.10", 80, Protocol::Tcp),
                np_fe(Family::V4, 30080, Protocol::Tcp)
            ])
        );
        // The young Service keeps its own ClusterIP; its External plan lost every frontend.
        assert_eq!(
            http_plan(&st, "young", Family::V4, Scope::Internal).frontends,
            fes(&[ip_fe("10.96.0.1", 80, Protocol::Tcp)])
        );
        assert!(
            !st.plans.contains_key(&key(
                "young",
                "http",
                Protocol::Tcp,
                Family::V4,
                Scope::External
            )),
            "{:?}",
            plan_keys(&st)
        );
        // Every frontend has exactly one plan.
        let all: Vec<Frontend> = st
            .plans
            .values()
            .flat_map(|p| p.frontends.iter().copied())
            .collect();
        let unique: BTreeSet<Frontend> = all.iter().copied().collect();
        assert_eq!(all.len(), unique.len());
    }
}

#[test]
fn partially_conflicting_frontends_keep_the_rest() {
    let young = service(
        "young",
        json!({
            "metadata": {"creationTimestamp": "2024-06-01T00:00:00Z"},
            "spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                "externalIPs": ["192.0.2.10", "192.0.2.11"]},
        }),
    );
    let old = service(
        "old",
        json!({
            "metadata": {"creationTimestamp": "2023-01-01T00:00:00Z"},
            "spec": {"clusterIP": "10.96.0.2", "clusterIPs": ["10.96.0.2"],
                "externalIPs": ["192.0.2.10"]},
        }),
    );
    // Another port on the same address is no conflict.
    let other_port = service(
        "other-port",
        json!({
            "metadata": {"creationTimestamp": "2022-01-01T00:00:00Z"},
            "spec": {"clusterIP": "10.96.0.3", "clusterIPs": ["10.96.0.3"],
                "externalIPs": ["192.0.2.11"],
                "ports": [{"name": "http", "port": 8443}]},
        }),
    );
    let st = desired_state(
        &snap(vec![young, old, other_port], vec![], vec![]),
        &ctx("n"),
    );
    assert_eq!(
        http_plan(&st, "young", Family::V4, Scope::External).frontends,
        fes(&[ip_fe("192.0.2.11", 80, Protocol::Tcp)])
    );
    assert_eq!(
        http_plan(&st, "old", Family::V4, Scope::External).frontends,
        fes(&[ip_fe("192.0.2.10", 80, Protocol::Tcp)])
    );
    assert_eq!(
        http_plan(&st, "other-port", Family::V4, Scope::External).frontends,
        fes(&[ip_fe("192.0.2.11", 8443, Protocol::Tcp)])
    );
}

// ---------------------------------------------------------------------------------------
// Display
// ---------------------------------------------------------------------------------------

#[test]
fn display_of_frontends_and_plan_keys() {
    assert_eq!(
        ip_fe("10.96.0.10", 80, Protocol::Tcp).to_string(),
        "10.96.0.10:80/tcp"
    );
    assert_eq!(
        ip_fe("fd00::a", 53, Protocol::Udp).to_string(),
        "[fd00::a]:53/udp"
    );
    assert_eq!(
        np_fe(Family::V4, 30080, Protocol::Tcp).to_string(),
        "nodeport:30080/tcp"
    );
    assert_eq!(
        np_fe(Family::V6, 30053, Protocol::Udp).to_string(),
        "nodeport6:30053/udp"
    );
    assert_eq!(
        key("web", "http", Protocol::Tcp, Family::V4, Scope::Internal).to_string(),
        "default/web:http/Tcp/V4/Internal"
    );
    assert_eq!(Protocol::Tcp.number(), 6);
    assert_eq!(Protocol::Udp.number(), 17);
    assert_eq!(Family::of(&"fd00::1".parse().unwrap()), Family::V6);
    assert_eq!(Family::of(&"10.0.0.1".parse().unwrap()), Family::V4);
}

/// The cached model (fast path when only slices change, cache hits otherwise) gives
/// exactly what a fresh evaluation gives.
#[test]
fn cached_model_matches_a_fresh_evaluation() {
    let c = ctx("n1");
    let mut model = Model::default();
    let web = service(
        "web",
        json!({"spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"]}}),
    );
    let api = service(
        "api",
        json!({"spec": {"clusterIP": "10.96.0.2", "clusterIPs": ["10.96.0.2"]}}),
    );
    let s1 = http_slice("web", "web-1", json!([ep("10.0.0.1", "n1")]));
    let s2 = http_slice("api", "api-1", json!([ep("10.0.0.9", "n1")]));
    let mut snap = Snapshot::of(vec![web, api], vec![s1, s2], vec![]);
    assert_eq!(model.desired_state(&snap, &c), desired_state(&snap, &c));
    // Only a slice changes (the fast path).
    snap.put(Shared::new(http_slice(
        "web",
        "web-1",
        json!([ep("10.0.0.1", "n1"), ep("10.0.0.2", "n1")]),
    )));
    let fast = model.desired_state(&snap, &c);
    assert_eq!(fast, desired_state(&snap, &c));
    assert_eq!(
        model.counts(),
        (fast.frontend_count(), fast.backend_count())
    );
    assert_eq!(
        http_plan(&fast, "web", Family::V4, Scope::Internal)
            .backends
            .len(),
        2
    );
    // A slice disappears.
    snap.remove::<EndpointSlice>(&("default".into(), "web-1".into()));
    let st = model.desired_state(&snap, &c);
    assert_eq!(st, desired_state(&snap, &c));
    assert_eq!(model.counts(), (st.frontend_count(), st.backend_count()));
    // A Service changes (the full path, with the other one cached).
    snap.put(Shared::new(service(
        "web",
        json!({"spec": {"clusterIP": "10.96.0.3", "clusterIPs": ["10.96.0.3"]}}),
    )));
    assert_eq!(model.desired_state(&snap, &c), desired_state(&snap, &c));
    // And back to a slice-only change.
    snap.put(Shared::new(http_slice(
        "web",
        "web-2",
        json!([ep("10.0.0.5", "n1")]),
    )));
    assert_eq!(model.desired_state(&snap, &c), desired_state(&snap, &c));
    // A slice moves from one Service to another (relabelled): both are re-evaluated.
    snap.put(Shared::new(http_slice(
        "api",
        "web-2",
        json!([ep("10.0.0.5", "n1")]),
    )));
    let st = model.desired_state(&snap, &c);
    assert_eq!(st, desired_state(&snap, &c));
    assert_eq!(model.counts(), (st.frontend_count(), st.backend_count()));
}

/// A long pseudo-random sequence of changes (slices added, changed, moved, made headless
/// and removed; Services changed and removed): after every step the cached model agrees
/// with a fresh evaluation.
#[test]
fn cached_model_agrees_with_fresh_evaluation_over_random_changes() {
    let c = ctx("n1");
    let mut model = Model::default();
    let mut snap = Snapshot::default();
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let names = ["a", "b", "c", "d"];
    for step in 0..400 {
        let svc = names[next(4) as usize];
        match next(10) {
            0 => {
                let ip = format!("10.96.0.{}", 1 + next(6));
                snap.put(Shared::new(service(
                    svc,
                    json!({"spec": {"clusterIP": ip, "clusterIPs": [ip]}}),
                )));
            }
            1 => {
                snap.remove::<Service>(&("default".into(), svc.into()));
            }
            2 => {
                let slice = format!("s{}", next(6));
                snap.remove::<EndpointSlice>(&("default".into(), slice));
            }
            3 => {
                let slice = format!("s{}", next(6));
                let mut s = http_slice(svc, &slice, json!([ep("10.0.1.1", "n1")]));
                s.metadata
                    .labels
                    .get_or_insert_default()
                    .insert(LABEL_HEADLESS.into(), "".into());
                snap.put(Shared::new(s));
            }
            _ => {
                let slice = format!("s{}", next(6));
                let eps: Vec<Value> = (0..next(4))
                    .map(|i| ep(&format!("10.0.{}.{}", next(3), 10 + i), "n1"))
                    .collect();
                snap.put(Shared::new(http_slice(svc, &slice, json!(eps))));
            }
        }
        let st = model.desired_state(&snap, &c);
        assert_eq!(st, desired_state(&snap, &c), "step {step}");
        assert_eq!(
            model.counts(),
            (st.frontend_count(), st.backend_count()),
            "step {step}"
        );
    }
}
