//! The model: what Kubernetes objects mean for the data path. Pure code, no kernel, no I/O.
//!
//! [`desired_state`] turns a [`Snapshot`] of Services, EndpointSlices and Nodes into a
//! [`DesiredState`]: for every Service port, address family and traffic scope, the
//! frontends that answer for it and the backends they may use. The state is the same for
//! every data-plane mode; the modes only differ in how they hand it to the kernel.
pub mod maglev;
mod snapshot;

pub use snapshot::{Kind, ObjectKey, Objects, Shared, Snapshot, key_of};

use std::collections::{BTreeMap, BTreeSet};

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use tracing::warn;

/// Label on Services naming the proxy that should handle them (kube-proxy ignores them).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label on EndpointSlices of headless Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label tying an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The Node label holding the node's zone.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Per-Service choice of backend selection (`random` or `maglev`), as Cilium's
/// `service.cilium.io/lb-algorithm`.
pub const ANNOTATION_LB_ALGORITHM: &str = "service.capstan.io/lb-algorithm";
/// kube-apiserver's default for sessionAffinityConfig.clientIP.timeoutSeconds.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

/// Who we are and how we were asked to balance.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// This node's name (`--hostname-override` or the hostname).
    pub node_name: String,
    /// `--service-proxy-name`: Services labelled with this proxy name are ours; Services
    /// labelled with any other are not. Without it, every labelled Service is skipped, as
    /// kube-proxy does.
    pub service_proxy_name: Option<String>,
    /// The default algorithm for Services without the annotation.
    pub default_algorithm: Algorithm,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    #[default]
    Random,
    Maglev,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }
}

/// Whether a plan serves traffic to the ClusterIP (internalTrafficPolicy applies) or to
/// the external frontends (NodePorts, ExternalIPs, LoadBalancer IPs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Internal,
    External,
}

/// One frontend: where a client connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendAddr {
    /// A ClusterIP, ExternalIP or LoadBalancer ingress IP.
    Ip(IpAddr),
    /// A NodePort: every node address of this family.
    NodePort(Family),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: FrontendAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        match self.addr {
            FrontendAddr::Ip(ip) => write!(f, "{}/{proto}", SocketAddr::new(ip, self.port)),
            FrontendAddr::NodePort(Family::V4) => write!(f, "nodeport:{}/{proto}", self.port),
            FrontendAddr::NodePort(Family::V6) => write!(f, "nodeport6:{}/{proto}", self.port),
        }
    }
}

/// Identifies a plan: one Service port, one family, one scope.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlanKey {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub protocol: Protocol,
    pub family: Family,
    pub scope: Scope,
}

impl fmt::Display for PlanKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.name, self.port_name)?;
        write!(f, "/{:?}/{:?}/{:?}", self.protocol, self.family, self.scope)
    }
}

/// The frontends of one Service port (per family and scope) and the backends they use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub frontends: BTreeSet<Frontend>,
    /// Sorted and unique. Empty means: refuse connections at once.
    pub backends: Vec<SocketAddr>,
    /// sessionAffinity ClientIP: its timeout in seconds.
    pub affinity_timeout: Option<u32>,
    pub algorithm: Algorithm,
}

/// The data path as it should be. A persistent map: cloning is O(1) and two states that
/// share structure are compared in time proportional to their difference, which is what
/// keeps an EndpointSlice change cheap at 100,000 Services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub plans: imbl::OrdMap<PlanKey, Plan>,
}

impl DesiredState {
    pub fn frontend_count(&self) -> usize {
        self.plans.values().map(|p| p.frontends.len()).sum()
    }
    pub fn backend_count(&self) -> usize {
        self.plans.values().map(|p| p.backends.len()).sum()
    }
}

/// Why a Service is not proxied (for logs and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    Headless,
    ExternalName,
    OtherProxy(String),
    Invalid(String),
}

/// Decides whether a Service is ours to proxy.
pub fn skip_reason(svc: &Service, ctx: &NodeContext) -> Option<Skip> {
    let labels = svc.metadata.labels.as_ref();
    if let Some(proxy) = labels.and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME))
        && ctx.service_proxy_name.as_deref() != Some(proxy.as_str())
    {
        return Some(Skip::OtherProxy(proxy.clone()));
    }
    let spec = match &svc.spec {
        Some(s) => s,
        None => return Some(Skip::Invalid("no spec".into())),
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Some(Skip::ExternalName);
    }
    if spec.cluster_ip.as_deref() == Some("None") {
        return Some(Skip::Headless);
    }
    None
}

/// An endpoint after merging every slice of a Service, for one Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Candidate {
    addr: SocketAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<String>,
    zones: Option<BTreeSet<String>>,
    nodes: Option<BTreeSet<String>>,
}

fn endpoint_candidates(ep: &Endpoint, port: u16, publish_not_ready: bool) -> Vec<Candidate> {
    let c = ep.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    // serving: nil means "same as ready" (API documentation).
    let serving = c.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    let (ready, serving) = if publish_not_ready {
        (true, true)
    } else {
        (ready, serving)
    };
    let hints = ep.hints.as_ref();
    let zones = hints
        .and_then(|h| h.for_zones.as_ref())
        .map(|z| z.iter().map(|z| z.name.clone()).collect());
    let nodes = hints
        .and_then(|h| h.for_nodes.as_ref())
        .map(|n| n.iter().map(|n| n.name.clone()).collect());
    let mut out = Vec::new();
    for a in &ep.addresses {
        match a.parse::<IpAddr>() {
            Ok(ip) => out.push(Candidate {
                addr: SocketAddr::new(ip, port),
                ready,
                serving,
                terminating,
                node: ep.node_name.clone(),
                zones: zones.clone(),
                nodes: nodes.clone(),
            }),
            Err(_) => warn!(address = %a, "skipping endpoint with an invalid address"),
        }
    }
    out
}

fn protocol_of(p: Option<&str>) -> Result<Protocol, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        other => Err(format!("protocol {other} is not supported")),
    }
}

fn port_u16(p: i32, what: &str) -> Result<u16, String> {
    if (1..=65535).contains(&p) {
        Ok(p as u16)
    } else {
        Err(format!("{what} {p} is out of range 1-65535"))
    }
}

/// The candidates for one Service port, merged over every slice of the Service.
fn candidates_for_port(
    slices: &[&EndpointSlice],
    sp: &ServicePort,
    protocol: Protocol,
    publish_not_ready: bool,
) -> Vec<Candidate> {
    let want_name = sp.name.clone().unwrap_or_default();
    let mut by_addr: BTreeMap<SocketAddr, Candidate> = BTreeMap::new();
    for slice in slices {
        let Some(ports) = &slice.ports else { continue };
        for p in ports {
            if p.name.clone().unwrap_or_default() != want_name {
                continue;
            }
            if protocol_of(p.protocol.as_deref()) != Ok(protocol) {
                continue;
            }
            let Some(port) = p.port.and_then(|p| port_u16(p, "endpoint port").ok()) else {
                continue;
            };
            for ep in slice.endpoints.iter().flatten() {
                for c in endpoint_candidates(ep, port, publish_not_ready) {
                    // The same endpoint in two slices (a slice being replaced): prefer
                    // the readier copy.
                    match by_addr.get(&c.addr) {
                        Some(old) if old.ready || !c.ready => {}
                        _ => {
                            by_addr.insert(c.addr, c);
                        }
                    }
                }
            }
        }
    }
    by_addr.into_values().collect()
}

/// kube-proxy's CategorizeEndpoints: ready endpoints, else serving-and-terminating ones.
fn usable(cands: &[&Candidate]) -> Vec<SocketAddr> {
    let ready: Vec<_> = cands.iter().filter(|c| c.ready).map(|c| c.addr).collect();
    if !ready.is_empty() {
        return ready;
    }
    cands
        .iter()
        .filter(|c| c.serving && c.terminating)
        .map(|c| c.addr)
        .collect()
}

/// Topology-aware routing: keep the endpoints hinted for this node (PreferSameNode) or
/// zone (PreferSameZone, PreferClose, topology-mode Auto) when every ready endpoint carries
/// hints and at least one matches; otherwise all endpoints.
fn topology_filter<'a>(
    cands: &'a [Candidate],
    svc: &Service,
    node_name: &str,
    zone: Option<&str>,
) -> Vec<&'a Candidate> {
    let all: Vec<&Candidate> = cands.iter().collect();
    let spec = svc.spec.as_ref();
    let dist = spec.and_then(|s| s.traffic_distribution.as_deref());
    let auto = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| {
            a.get("service.kubernetes.io/topology-mode")
                .or_else(|| a.get("service.kubernetes.io/topology-aware-hints"))
        })
        .is_some_and(|v| v.eq_ignore_ascii_case("auto"));
    let prefer_node = dist == Some("PreferSameNode");
    let prefer_zone = prefer_node || auto || matches!(dist, Some("PreferSameZone" | "PreferClose"));
    if !prefer_zone {
        return all;
    }
    let ready: Vec<&Candidate> = cands.iter().filter(|c| c.ready).collect();
    if ready.is_empty() {
        return all;
    }
    if prefer_node && ready.iter().all(|c| c.nodes.is_some()) {
        let picked: Vec<&Candidate> = cands
            .iter()
            .filter(|c| c.nodes.as_ref().is_some_and(|n| n.contains(node_name)))
            .collect();
        if picked.iter().any(|c| c.ready) {
            return picked;
        }
    }
    let Some(zone) = zone else { return all };
    if !ready.iter().all(|c| c.zones.is_some()) {
        return all;
    }
    let picked: Vec<&Candidate> = cands
        .iter()
        .filter(|c| c.zones.as_ref().is_some_and(|z| z.contains(zone)))
        .collect();
    if picked.iter().any(|c| c.ready) {
        picked
    } else {
        all
    }
}

/// Builds the desired data-path state. Never fails: what cannot be used is logged and
/// skipped, so one bad object cannot take the others down.
pub fn desired_state(snap: &Snapshot, ctx: &NodeContext) -> DesiredState {
    Model::default().desired_state(snap, ctx)
}

type Plans = Result<Vec<(PlanKey, Plan)>, String>;

/// A Service to evaluate, its key and its slices.
type Work<'a> = (
    &'a Shared<Service>,
    &'a ObjectKey,
    Vec<&'a Shared<EndpointSlice>>,
);

/// Below this many Services to evaluate, one thread does it.
const PARALLEL_EVALUATION_MIN: usize = 512;

/// What one Service gave last time, and from which objects.
struct Cached {
    service: Shared<Service>,
    slices: Vec<*const EndpointSlice>,
    zone: Option<String>,
    plans: Plans,
}

/// [`desired_state`] with memory: a Service whose object, slices and node zone are the very
/// same (shared) objects as last time is not evaluated again, and when only EndpointSlices
/// changed, only the Services they feed are looked at: one EndpointSlice change costs one
/// Service's work, not the cluster's.
#[derive(Default)]
pub struct Model {
    cache: HashMap<ObjectKey, Cached>,
    ctx: Option<NodeContext>,
    /// The last snapshot (which also keeps the objects `cache` points at alive) and the
    /// state it gave.
    last: Option<(Snapshot, DesiredState)>,
    /// Each Service's EndpointSlices (keys), kept as slices come and go.
    slices_of: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// Frontends and backends in the last state (kept without walking it).
    counts: (usize, usize),
}

/// The Service an EndpointSlice feeds, if any (headless slices feed none).
fn slice_owner(s: &EndpointSlice) -> Option<ObjectKey> {
    let labels = s.metadata.labels.as_ref()?;
    if labels.contains_key(LABEL_HEADLESS) {
        return None;
    }
    let svc = labels.get(LABEL_SERVICE_NAME)?;
    Some((
        s.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        svc.clone(),
    ))
}

// SAFETY: the raw pointers are only compared, never dereferenced.
unsafe impl Send for Model {}

impl Model {
    /// (frontends, backends) of the state last returned.
    pub fn counts(&self) -> (usize, usize) {
        self.counts
    }

    pub fn desired_state(&mut self, snap: &Snapshot, ctx: &NodeContext) -> DesiredState {
        if self.ctx.as_ref() != Some(ctx) {
            self.cache.clear();
            self.last = None;
            self.ctx = Some(ctx.clone());
        }
        // Held until the new state is made: the cache points into its objects.
        let last = self.last.take();
        let state = match &last {
            Some((prev, state))
                if prev.services.diff(&snap.services).next().is_none()
                    && prev.nodes.diff(&snap.nodes).next().is_none() =>
            {
                self.only_slices_changed(prev, snap, ctx, state.clone())
            }
            _ => self.evaluate_all(snap, ctx),
        };
        self.last = Some((snap.clone(), state.clone()));
        drop(last);
        state
    }

    fn index_slice(&mut self, key: &ObjectKey, slice: &EndpointSlice, add: bool) {
        let Some(owner) = slice_owner(slice) else {
            return;
        };
        if add {
            self.slices_of.entry(owner).or_default().insert(key.clone());
        } else if let Some(set) = self.slices_of.get_mut(&owner) {
            set.remove(key);
            if set.is_empty() {
                self.slices_of.remove(&owner);
            }
        }
    }

    /// The fast path: the same Services and Nodes as last time, so frontends and their
    /// owners are the same; only the Services whose slices changed are evaluated again and
    /// their backends patched into the last state.
    fn only_slices_changed(
        &mut self,
        prev: &Snapshot,
        snap: &Snapshot,
        ctx: &NodeContext,
        mut state: DesiredState,
    ) -> DesiredState {
        let mut affected: BTreeSet<ObjectKey> = BTreeSet::new();
        for change in prev.endpoint_slices.diff(&snap.endpoint_slices) {
            let (old, new) = match change {
                imbl::ordmap::DiffItem::Add(k, v) => (None, Some((k, v))),
                imbl::ordmap::DiffItem::Update { old, new } => (Some(old), Some(new)),
                imbl::ordmap::DiffItem::Remove(k, v) => (Some((k, v)), None),
            };
            for ((key, slice), add) in old
                .into_iter()
                .map(|o| (o, false))
                .chain(new.map(|n| (n, true)))
            {
                if let Some(owner) = slice_owner(slice) {
                    affected.insert(owner);
                }
                self.index_slice(key, slice, add);
            }
        }
        let zone = self.cache.values().next().and_then(|c| c.zone.clone());
        for key in &affected {
            let Some(cached) = self.cache.get_mut(key) else {
                continue;
            };
            let slices: Vec<&Shared<EndpointSlice>> = self
                .slices_of
                .get(key)
                .into_iter()
                .flatten()
                .filter_map(|k| snap.endpoint_slices.get(k))
                .collect();
            let refs: Vec<&EndpointSlice> = slices.iter().map(|s| &***s).collect();
            let plans = service_plans(&cached.service, &key.0, &key.1, &refs, ctx, zone.as_deref());
            if let Ok(plans) = &plans {
                for (pkey, plan) in plans {
                    // Frontends (and who owns them) do not change with slices: keep the
                    // resolved frontends, take the new backends.
                    if let Some(old) = state.plans.get(pkey)
                        && old.backends != plan.backends
                    {
                        self.counts.1 = (self.counts.1 + plan.backends.len())
                            .saturating_sub(old.backends.len());
                        let mut p = old.clone();
                        p.backends = plan.backends.clone();
                        state.plans.insert(pkey.clone(), p);
                    }
                }
            }
            cached.slices = slices.iter().map(|s| s.as_ptr()).collect();
            cached.plans = plans;
        }
        state
    }

    /// Evaluates every Service (reusing the cached plans of unchanged ones) and resolves
    /// frontend conflicts.
    fn evaluate_all(&mut self, snap: &Snapshot, ctx: &NodeContext) -> DesiredState {
        let zone = snap
            .nodes
            .values()
            .find(|n| n.metadata.name.as_deref() == Some(ctx.node_name.as_str()))
            .and_then(|n| n.metadata.labels.as_ref()?.get(LABEL_ZONE).cloned());

        // Slices by Service; headless slices are not ours.
        self.slices_of.clear();
        for (key, s) in &snap.endpoint_slices {
            self.index_slice(key, s, true);
        }

        let mut services: Vec<&Shared<Service>> = snap.services.values().collect();
        // Older Services win a conflict over a frontend, as the API server would have let
        // only the first one have the address.
        services.sort_by(|a, b| {
            let ka = (
                &a.metadata.creation_timestamp,
                &a.metadata.namespace,
                &a.metadata.name,
            );
            let kb = (
                &b.metadata.creation_timestamp,
                &b.metadata.namespace,
                &b.metadata.name,
            );
            ka.partial_cmp(&kb).unwrap_or(std::cmp::Ordering::Equal)
        });
        // Services to evaluate again (not in the cache, or changed), evaluated on every
        // core: this is most of the work when a large cluster is programmed from nothing.
        let services: Vec<(&Shared<Service>, ObjectKey)> = services
            .into_iter()
            .filter(|svc| skip_reason(svc, ctx).is_none())
            .map(|svc| (svc, svc.key()))
            .collect();
        let misses: Vec<Work> = services
            .iter()
            .filter_map(|(svc, key)| {
                let svc_slices: Vec<&Shared<EndpointSlice>> = self
                    .slices_of
                    .get(key)
                    .into_iter()
                    .flatten()
                    .filter_map(|k| snap.endpoint_slices.get(k))
                    .collect();
                let hit = self.cache.get(key).is_some_and(|c| {
                    c.service == **svc
                        && c.zone == zone
                        && c.slices
                            .iter()
                            .copied()
                            .eq(svc_slices.iter().map(|s| s.as_ptr()))
                });
                (!hit).then_some((*svc, key, svc_slices))
            })
            .collect();
        let evaluate = |part: &[Work]| {
            part.iter()
                .map(|(svc, key, slices)| {
                    let refs: Vec<&EndpointSlice> = slices.iter().map(|s| &***s).collect();
                    service_plans(svc, &key.0, &key.1, &refs, ctx, zone.as_deref())
                })
                .collect::<Vec<Plans>>()
        };
        let evaluated: Vec<Plans> = if misses.len() >= PARALLEL_EVALUATION_MIN {
            let (lower, upper) = misses.split_at(misses.len() / 2);
            std::thread::scope(|s| {
                let upper = s.spawn(|| evaluate(upper));
                let mut out = evaluate(lower);
                out.extend(
                    upper
                        .join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p)),
                );
                out
            })
        } else {
            evaluate(&misses)
        };
        for ((svc, key, slices), plans) in misses.iter().zip(evaluated) {
            if let Err(e) = &plans {
                warn!(service = %format!("{}/{}", key.0, key.1), error = %e, "Service skipped");
            }
            self.cache.insert(
                (*key).clone(),
                Cached {
                    service: (*svc).clone(),
                    slices: slices.iter().map(|s| s.as_ptr()).collect(),
                    zone: zone.clone(),
                    plans,
                },
            );
        }

        let mut out: Vec<(PlanKey, Plan)> = Vec::new();
        let mut owner: HashMap<Frontend, usize> = HashMap::new();
        let mut seen: HashSet<ObjectKey> = HashSet::new();
        for (_, key) in services {
            let (ns, name) = (key.0.as_str(), key.1.as_str());
            let Some(Cached {
                plans: Ok(plans), ..
            }) = self.cache.get(&key)
            else {
                seen.insert(key);
                continue;
            };
            for (pkey, plan) in plans {
                let idx = out.len();
                let mut plan = plan.clone();
                plan.frontends.retain(|f| match owner.get(f) {
                    Some(other) => {
                        let o = &out[*other].0;
                        warn!(frontend = %f, service = %format!("{ns}/{name}"), owner = %format!("{}/{}", o.namespace, o.name), "frontend already taken by another Service; skipped");
                        false
                    }
                    None => true,
                });
                if plan.frontends.is_empty() {
                    continue;
                }
                for f in &plan.frontends {
                    owner.insert(*f, idx);
                }
                out.push((pkey.clone(), plan));
            }
            seen.insert(key);
        }
        self.cache.retain(|k, _| seen.contains(k));
        self.counts = (
            out.iter().map(|(_, p)| p.frontends.len()).sum(),
            out.iter().map(|(_, p)| p.backends.len()).sum(),
        );
        DesiredState {
            plans: out.into_iter().collect(),
        }
    }
}

/// Validates a Service the way the data path needs it (addresses, ports, protocols).
pub fn validate_service(svc: &Service) -> Result<(), String> {
    let ctx = NodeContext::default();
    if let Some(Skip::Invalid(e)) = skip_reason(svc, &ctx) {
        return Err(e);
    }
    if matches!(
        skip_reason(svc, &ctx),
        Some(Skip::Headless | Skip::ExternalName)
    ) {
        return Ok(());
    }
    service_plans(svc, "", "", &[], &ctx, None).map(|_| ())
}

/// Validates an EndpointSlice: its address type, addresses and ports.
pub fn validate_endpoint_slice(slice: &EndpointSlice) -> Result<(), String> {
    let family = match slice.address_type.as_str() {
        "IPv4" => Some(Family::V4),
        "IPv6" => Some(Family::V6),
        "FQDN" => None,
        other => return Err(format!("addressType {other:?} is not IPv4, IPv6 or FQDN")),
    };
    for p in slice.ports.iter().flatten() {
        if let Some(port) = p.port {
            port_u16(port, "port")?;
        }
        protocol_of(p.protocol.as_deref())?;
    }
    let Some(family) = family else { return Ok(()) };
    for ep in slice.endpoints.iter().flatten() {
        for a in &ep.addresses {
            let ip: IpAddr = a
                .parse()
                .map_err(|_| format!("invalid endpoint address {a:?}"))?;
            if Family::of(&ip) != family {
                return Err(format!(
                    "endpoint address {a} is not an {} address",
                    slice.address_type
                ));
            }
        }
    }
    Ok(())
}

fn service_plans(
    svc: &Service,
    ns: &str,
    name: &str,
    slices: &[&EndpointSlice],
    ctx: &NodeContext,
    zone: Option<&str>,
) -> Result<Vec<(PlanKey, Plan)>, String> {
    let spec = svc.spec.as_ref().ok_or("no spec")?;
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    let ips = spec
        .cluster_ips
        .clone()
        .filter(|v| !v.is_empty())
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default();
    for ip in ips.iter().filter(|s| !s.is_empty()) {
        cluster_ips.push(
            ip.parse()
                .map_err(|_| format!("invalid clusterIP {ip:?}"))?,
        );
    }
    let mut external: Vec<IpAddr> = Vec::new();
    for ip in spec.external_ips.iter().flatten() {
        external.push(
            ip.parse()
                .map_err(|_| format!("invalid externalIP {ip:?}"))?,
        );
    }
    let is_lb = spec.type_.as_deref() == Some("LoadBalancer");
    if is_lb {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        for ing in ingress.into_iter().flatten() {
            // ipMode Proxy: the load balancer proxies, the node must not short-circuit.
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(ip) = &ing.ip {
                external.push(
                    ip.parse()
                        .map_err(|_| format!("invalid loadBalancer ingress IP {ip:?}"))?,
                );
            }
        }
    }
    let with_node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .filter(|t| *t > 0)
            .map(|t| t as u32)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    let algorithm = match svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_LB_ALGORITHM))
        .map(|s| s.as_str())
    {
        Some("maglev") => Algorithm::Maglev,
        Some("random") => Algorithm::Random,
        Some(other) => return Err(format!("unknown {ANNOTATION_LB_ALGORITHM} {other:?}")),
        None => ctx.default_algorithm,
    };
    let itp_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);

    let mut plans = Vec::new();
    let mut seen_ports = BTreeSet::new();
    for sp in spec.ports.iter().flatten() {
        let protocol = protocol_of(sp.protocol.as_deref())?;
        let port = port_u16(sp.port, "port")?;
        if !seen_ports.insert((port, protocol)) {
            return Err(format!("duplicate port {port}/{protocol:?}"));
        }
        let node_port = match (with_node_ports, sp.node_port) {
            (true, Some(np)) if np != 0 => Some(port_u16(np, "nodePort")?),
            _ => None,
        };
        let cands = candidates_for_port(slices, sp, protocol, publish_not_ready);
        let topo = topology_filter(&cands, svc, &ctx.node_name, zone);
        let cluster = usable(&topo);
        let local_cands: Vec<&Candidate> = cands
            .iter()
            .filter(|c| c.node.as_deref() == Some(ctx.node_name.as_str()))
            .collect();
        let local = usable(&local_cands);
        for family in [Family::V4, Family::V6] {
            let of_family = |v: &[SocketAddr]| -> Vec<SocketAddr> {
                let mut v: Vec<SocketAddr> = v
                    .iter()
                    .copied()
                    .filter(|a| Family::of(&a.ip()) == family)
                    .collect();
                v.sort();
                v.dedup();
                v
            };
            let key = |scope| PlanKey {
                namespace: ns.to_string(),
                name: name.to_string(),
                port_name: sp.name.clone().unwrap_or_default(),
                protocol,
                family,
                scope,
            };
            let frontend = |addr| Frontend {
                addr,
                port,
                protocol,
            };
            let internal: BTreeSet<Frontend> = cluster_ips
                .iter()
                .filter(|ip| Family::of(ip) == family)
                .map(|ip| frontend(FrontendAddr::Ip(*ip)))
                .collect();
            // Clients on the node reach external frontends with the cluster-wide
            // endpoints, as kube-proxy short-circuits local traffic for eTP Local too.
            let mut ext: BTreeSet<Frontend> = external
                .iter()
                .filter(|ip| Family::of(ip) == family)
                .map(|ip| frontend(FrontendAddr::Ip(*ip)))
                .collect();
            if let Some(np) = node_port {
                ext.insert(Frontend {
                    addr: FrontendAddr::NodePort(family),
                    port: np,
                    protocol,
                });
            }
            let base = Plan {
                frontends: BTreeSet::new(),
                backends: Vec::new(),
                affinity_timeout,
                algorithm,
            };
            if !internal.is_empty() {
                let backends = if itp_local {
                    of_family(&local)
                } else {
                    of_family(&cluster)
                };
                plans.push((
                    key(Scope::Internal),
                    Plan {
                        frontends: internal,
                        backends,
                        ..base.clone()
                    },
                ));
            }
            if !ext.is_empty() && !cluster_ips.iter().all(|ip| Family::of(ip) != family) {
                plans.push((
                    key(Scope::External),
                    Plan {
                        frontends: ext,
                        backends: of_family(&cluster),
                        ..base
                    },
                ));
            }
        }
    }
    Ok(plans)
}

#[cfg(test)]
mod tests;
