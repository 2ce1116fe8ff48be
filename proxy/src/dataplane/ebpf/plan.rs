//! The eBPF reconciler's pure half: given what the maps hold ([`MapState`]) and the
//! desired state, the ordered map operations that move one to the other ([`Changes`]).
//!
//! Order is what keeps clients safe while a Service changes:
//! 1. **prepare**: new backends, then backend slots 1..n, then Maglev tables — nothing a
//!    client can reach yet, or slots that still hold valid backends;
//! 2. **commit**: slot 0 of each frontend (count, flags): one map update per frontend
//!    switches it to the new backend set at once;
//! 3. **cleanup**: slots past the new count, frontends that went away (slot 0 first),
//!    backends and tables nobody references any more.
//!
//! Operations carry the plan they belong to so that the applier can skip a plan's commit
//! and cleanup when one of its prepare steps failed (a full map): the frontend then keeps
//! serving its last complete state.
use std::collections::{BTreeMap, BTreeSet};

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::net::{IpAddr, SocketAddr};

use capstan_proxy_common::{
    Backend, FAMILY_V4, FAMILY_V6, NodeAddrKey, ServiceKey, ServiceValue, flags,
};

use crate::model::{Algorithm, DesiredState, Family, Frontend, FrontendAddr, PlanKey, maglev};

/// What the maps hold (or should hold): the agent keeps this mirror of the kernel's maps,
/// read from them at start-up and updated with every successful write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: HashMap<ServiceKey, ServiceValue>,
    pub backends: HashMap<u32, Backend>,
    /// Maglev tables by service id (the table's length is its M).
    pub maglev: HashMap<u32, Vec<u16>>,
    pub node_addrs: BTreeSet<NodeAddrKey>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutNodeAddr(NodeAddrKey),
    PutBackend(u32, Backend),
    PutSlot(ServiceKey, ServiceValue),
    PutMaglev(u32, Vec<u16>),
    DelSlot(ServiceKey),
    DelBackend(u32),
    DelMaglev(u32),
    DelNodeAddr(NodeAddrKey),
}

/// An operation and the plan (index into [`Changes::plans`]) it belongs to; `None` for
/// operations that belong to no desired plan (removals of what is gone, node addresses).
pub type Tagged = (Option<usize>, Op);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub plans: Vec<PlanKey>,
    pub prepare: Vec<Tagged>,
    pub commit: Vec<Tagged>,
    pub cleanup: Vec<Tagged>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.prepare.is_empty() && self.commit.is_empty() && self.cleanup.is_empty()
    }
    pub fn len(&self) -> usize {
        self.prepare.len() + self.commit.len() + self.cleanup.len()
    }
}

/// Hands out service and backend ids that are not in use.
#[derive(Clone, Debug, Default)]
pub struct Ids {
    next_service: u32,
    next_backend: u32,
}

impl Ids {
    /// Continues after the highest ids the maps already use.
    pub fn after(state: &MapState) -> Ids {
        let max_svc = state
            .services
            .values()
            .map(|v| v.service_id)
            .max()
            .unwrap_or(0);
        let max_be = state.backends.keys().copied().max().unwrap_or(0);
        Ids {
            next_service: max_svc + 1,
            next_backend: max_be + 1,
        }
    }
    fn service(&mut self) -> u32 {
        let id = self.next_service.max(1);
        self.next_service = id.wrapping_add(1);
        id
    }
    fn backend(&mut self) -> u32 {
        let id = self.next_backend.max(1);
        self.next_backend = id.wrapping_add(1);
        id
    }
}

/// Words in network byte order, as the socket hooks see them.
pub fn addr_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

/// The inverse of [`addr_words`].
pub fn words_addr(addr: [u32; 4], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from(addr[0].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        for (i, w) in addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    }
}

pub fn net_port(port: u16) -> u16 {
    port.to_be()
}

pub fn host_port(port: u16) -> u16 {
    u16::from_be(port)
}

pub fn node_addr_key(ip: IpAddr) -> NodeAddrKey {
    let (addr, family) = addr_words(ip);
    NodeAddrKey {
        addr,
        family,
        _pad: [0; 3],
    }
}

/// Slot 0 key of a frontend.
pub fn frontend_key(f: &Frontend) -> ServiceKey {
    let (addr, family) = match f.addr {
        FrontendAddr::Ip(ip) => addr_words(ip),
        FrontendAddr::NodePort(Family::V4) => ([0; 4], FAMILY_V4),
        FrontendAddr::NodePort(Family::V6) => ([0; 4], FAMILY_V6),
    };
    ServiceKey {
        addr,
        port: net_port(f.port),
        proto: f.protocol.number(),
        family,
        slot: 0,
        _pad: 0,
    }
}

pub fn backend_value(addr: SocketAddr, proto: u8, service_id: u32) -> Backend {
    let (words, family) = addr_words(addr.ip());
    Backend {
        addr: words,
        port: net_port(addr.port()),
        proto,
        family,
        service_id,
    }
}

/// The Service CIDR trie's key for a CIDR.
pub fn service_cidr_key(net: &ipnet::IpNet) -> ([u32; 5], u32) {
    let (w, family) = addr_words(net.network());
    (
        [family as u32, w[0], w[1], w[2], w[3]],
        32 + net.prefix_len() as u32,
    )
}

fn slot_key(k: &ServiceKey, slot: u16) -> ServiceKey {
    ServiceKey { slot, ..*k }
}

/// The slots 1..=count of a frontend as the maps hold them (missing slots as 0).
fn current_slots(state: &MapState, key: &ServiceKey) -> Vec<u32> {
    let Some(head) = state.services.get(key) else {
        return Vec::new();
    };
    (1..=head.count)
        .map(|s| {
            state
                .services
                .get(&slot_key(key, s))
                .map(|v| v.backend_id)
                .unwrap_or(0)
        })
        .collect()
}

/// Keeps backends in the slots they already hold, moves the ones beyond the new count
/// into the holes left by removed backends, and puts new backends in what remains, so an
/// endpoint change rewrites only the slots it must.
fn assign_slots(current: &[u32], wanted: &[u32]) -> Vec<u32> {
    let want: HashSet<u32> = wanted.iter().copied().collect();
    let n = wanted.len();
    let mut out: Vec<u32> = current
        .iter()
        .take(n)
        .map(|id| if want.contains(id) { *id } else { 0 })
        .collect();
    out.resize(n, 0);
    let placed: HashSet<u32> = out.iter().copied().filter(|id| *id != 0).collect();
    let mut pending = wanted.iter().copied().filter(|id| !placed.contains(id));
    for s in out.iter_mut() {
        if *s == 0 {
            *s = pending.next().unwrap_or(0);
        }
    }
    out
}

/// Computes the operations that turn `current` into `desired`.
pub fn diff(
    current: &MapState,
    desired: &DesiredState,
    node_addrs: &BTreeSet<IpAddr>,
    maglev_m: u32,
    ids: &mut Ids,
) -> Changes {
    diff_in(current, desired, node_addrs, maglev_m, ids, None)
}

/// [`diff`] for a part of the state: `desired` holds only the plans that changed, and
/// `scope` every frontend (slot-0 key) they had or have. Nothing outside the scope is
/// read or touched, so a change costs the size of what changed, not of the cluster.
pub fn diff_scoped(
    current: &MapState,
    desired: &DesiredState,
    node_addrs: &BTreeSet<IpAddr>,
    maglev_m: u32,
    ids: &mut Ids,
    scope: &HashSet<ServiceKey>,
) -> Changes {
    diff_in(current, desired, node_addrs, maglev_m, ids, Some(scope))
}

/// The slots (1..) a frontend holds: up to its count and on until the first gap.
fn held_slots<'a>(
    current: &'a MapState,
    head: &ServiceKey,
) -> Vec<(&'a ServiceKey, &'a ServiceValue)> {
    let count = current.services.get(head).map(|h| h.count).unwrap_or(0);
    let mut out = Vec::new();
    for s in 1..=u16::MAX {
        match current.services.get_key_value(&slot_key(head, s)) {
            Some(kv) => out.push(kv),
            None if s > count => break,
            None => {}
        }
    }
    out
}

fn diff_in(
    current: &MapState,
    desired: &DesiredState,
    node_addrs: &BTreeSet<IpAddr>,
    maglev_m: u32,
    ids: &mut Ids,
    scope: Option<&HashSet<ServiceKey>>,
) -> Changes {
    let mut ch = Changes::default();
    // The slot entries this diff may look at: all of them, or those of the scope.
    let relevant: Vec<(&ServiceKey, &ServiceValue)> = match scope {
        None => current.services.iter().collect(),
        Some(scope) => scope
            .iter()
            .filter_map(|k| current.services.get_key_value(k))
            .flat_map(|(k, v)| std::iter::once((k, v)).chain(held_slots(current, k)))
            .collect(),
    };

    let want_addrs: BTreeSet<NodeAddrKey> =
        node_addrs.iter().map(|ip| node_addr_key(*ip)).collect();
    for a in want_addrs.difference(&current.node_addrs) {
        ch.prepare.push((None, Op::PutNodeAddr(*a)));
    }

    // The backends each service id reaches today, by address.
    let mut service_backends: HashMap<u32, HashMap<Backend, u32>> = HashMap::new();
    let mut backend_service: HashMap<u32, u32> = HashMap::new();
    for (k, v) in &relevant {
        if k.slot != 0 {
            backend_service.insert(v.backend_id, v.service_id);
            if let Some(b) = current.backends.get(&v.backend_id) {
                service_backends
                    .entry(v.service_id)
                    .or_default()
                    .insert(*b, v.backend_id);
            }
        }
    }
    let mut plan_of_service: HashMap<u32, usize> = HashMap::new();

    let mut claimed_services: HashSet<u32> = HashSet::new();
    let mut wanted_frontends: HashSet<ServiceKey> = HashSet::new();
    let mut kept_backends: HashSet<u32> = HashSet::new();
    let mut kept_maglev: HashSet<u32> = HashSet::new();

    for (key, plan) in &desired.plans {
        let idx = ch.plans.len();
        ch.plans.push(key.clone());
        let proto = key.protocol.number();
        let fkeys: Vec<ServiceKey> = plan.frontends.iter().map(frontend_key).collect();
        wanted_frontends.extend(fkeys.iter().copied());

        // Reuse the service id most of its frontends already carry.
        let mut votes: BTreeMap<u32, usize> = BTreeMap::new();
        for fk in &fkeys {
            if let Some(v) = current.services.get(fk)
                && !claimed_services.contains(&v.service_id)
            {
                *votes.entry(v.service_id).or_default() += 1;
            }
        }
        let service_id = votes
            .iter()
            .max_by_key(|(id, n)| (**n, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)
            .unwrap_or_else(|| ids.service());
        claimed_services.insert(service_id);
        plan_of_service.insert(service_id, idx);

        // Backend ids: reuse by address within this service, allocate the rest.
        let known = service_backends.get(&service_id);
        let mut wanted_ids = Vec::with_capacity(plan.backends.len());
        for addr in &plan.backends {
            let b = backend_value(*addr, proto, service_id);
            let id = match known.and_then(|m| m.get(&b)) {
                Some(id) if current.backends.get(id) == Some(&b) => *id,
                _ => {
                    let id = ids.backend();
                    ch.prepare.push((Some(idx), Op::PutBackend(id, b)));
                    id
                }
            };
            kept_backends.insert(id);
            wanted_ids.push(id);
        }

        // One slot layout for the plan, anchored on the frontend that has most in place.
        let wanted_set: HashSet<u32> = wanted_ids.iter().copied().collect();
        let anchor = fkeys
            .iter()
            .map(|fk| current_slots(current, fk))
            .max_by_key(|s| s.iter().filter(|id| wanted_set.contains(id)).count())
            .unwrap_or_default();
        let slots = assign_slots(&anchor, &wanted_ids);

        let maglev_on = plan.algorithm == Algorithm::Maglev && !slots.is_empty();
        let mut fl = 0u16;
        if plan.affinity_timeout.is_some() {
            fl |= flags::AFFINITY;
        }
        if maglev_on {
            fl |= flags::MAGLEV;
            let index: HashMap<u32, usize> = wanted_ids
                .iter()
                .enumerate()
                .map(|(i, id)| (*id, i))
                .collect();
            let names: Vec<String> = slots
                .iter()
                .map(|id| plan.backends[index[id]].to_string())
                .collect();
            let table = maglev::table(&names, maglev_m);
            if current.maglev.get(&service_id) != Some(&table) {
                ch.prepare
                    .push((Some(idx), Op::PutMaglev(service_id, table)));
            }
            kept_maglev.insert(service_id);
        }

        for fk in &fkeys {
            let mut f = fl;
            if fk.addr == [0; 4] {
                f |= flags::NODEPORT;
            }
            let head = ServiceValue {
                backend_id: 0,
                count: slots.len() as u16,
                flags: f,
                service_id,
                affinity_timeout: plan.affinity_timeout.unwrap_or(0),
            };
            let old_head = current.services.get(fk);
            for (i, id) in slots.iter().enumerate() {
                let sk = slot_key(fk, (i + 1) as u16);
                let v = ServiceValue {
                    backend_id: *id,
                    service_id,
                    ..Default::default()
                };
                if current.services.get(&sk) != Some(&v) {
                    ch.prepare.push((Some(idx), Op::PutSlot(sk, v)));
                }
            }
            if old_head != Some(&head) {
                ch.commit.push((Some(idx), Op::PutSlot(*fk, head)));
            }
            // Slots past the new count: whatever of them the maps hold.
            let old_count = old_head
                .map(|h| h.count)
                .unwrap_or(0)
                .max(slots.len() as u16);
            // Also the slots an unfinished apply wrote past the old count (slots are
            // written in order, so they end at the first gap).
            // Deleted from the top down, so that an interrupted cleanup leaves no gap.
            let mut past = Vec::new();
            for s in (slots.len() as u16 + 1)..=u16::MAX {
                let sk = slot_key(fk, s);
                if current.services.contains_key(&sk) {
                    past.push((Some(idx), Op::DelSlot(sk)));
                } else if s > old_count {
                    break;
                }
            }
            ch.cleanup.extend(past.into_iter().rev());
        }
    }

    // Frontends that are no longer wanted: slot 0 first, then their slots.
    let mut gone: Vec<&ServiceKey> = relevant
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| k.slot == 0 && !wanted_frontends.contains(k))
        .collect();
    gone.sort();
    for k in gone {
        ch.cleanup.push((None, Op::DelSlot(*k)));
    }
    let mut stray: Vec<&ServiceKey> = relevant
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| k.slot != 0 && !wanted_frontends.contains(&slot_key(k, 0)))
        .collect();
    stray.sort();
    for k in stray {
        ch.cleanup.push((None, Op::DelSlot(*k)));
    }
    let scoped_services: Option<HashSet<u32>> =
        scope.map(|_| relevant.iter().map(|(_, v)| v.service_id).collect());
    let mut old_backends: Vec<u32> = match &scoped_services {
        None => current
            .backends
            .keys()
            .copied()
            .filter(|id| !kept_backends.contains(id))
            .collect(),
        Some(_) => backend_service
            .keys()
            .copied()
            .filter(|id| !kept_backends.contains(id) && current.backends.contains_key(id))
            .collect(),
    };
    old_backends.sort();
    for id in old_backends {
        // Tied to the plan still using it, so that it stays while that plan's commit fails.
        let owner = backend_service
            .get(&id)
            .and_then(|s| plan_of_service.get(s))
            .copied();
        ch.cleanup.push((owner, Op::DelBackend(id)));
    }
    let mut old_tables: Vec<u32> = current
        .maglev
        .keys()
        .copied()
        .filter(|id| !kept_maglev.contains(id))
        .filter(|id| scoped_services.as_ref().is_none_or(|s| s.contains(id)))
        .collect();
    old_tables.sort();
    for id in old_tables {
        ch.cleanup.push((None, Op::DelMaglev(id)));
    }
    for a in current.node_addrs.difference(&want_addrs) {
        ch.cleanup.push((None, Op::DelNodeAddr(*a)));
    }
    ch
}

/// The operation that undoes `op` on a map whose content `state` mirrors (before `op`).
pub fn inverse(state: &MapState, op: &Op) -> Op {
    match op {
        Op::PutNodeAddr(a) => Op::DelNodeAddr(*a),
        Op::DelNodeAddr(a) => Op::PutNodeAddr(*a),
        Op::PutBackend(id, _) | Op::DelBackend(id) => match state.backends.get(id) {
            Some(b) => Op::PutBackend(*id, *b),
            None => Op::DelBackend(*id),
        },
        Op::PutSlot(k, _) | Op::DelSlot(k) => match state.services.get(k) {
            Some(v) => Op::PutSlot(*k, *v),
            None => Op::DelSlot(*k),
        },
        Op::PutMaglev(id, _) | Op::DelMaglev(id) => match state.maglev.get(id) {
            Some(t) => Op::PutMaglev(*id, t.clone()),
            None => Op::DelMaglev(*id),
        },
    }
}

/// Applies `op` to a mirror (after the kernel accepted it) and returns the operation that
/// undoes it (what [`inverse`] would have said before), with one lookup.
pub fn apply_to_mirror(state: &mut MapState, op: &Op) -> Op {
    match op {
        Op::PutNodeAddr(a) => {
            state.node_addrs.insert(*a);
            Op::DelNodeAddr(*a)
        }
        Op::PutBackend(id, b) => match state.backends.insert(*id, *b) {
            Some(old) => Op::PutBackend(*id, old),
            None => Op::DelBackend(*id),
        },
        Op::PutSlot(k, v) => match state.services.insert(*k, *v) {
            Some(old) => Op::PutSlot(*k, old),
            None => Op::DelSlot(*k),
        },
        Op::PutMaglev(id, t) => match state.maglev.insert(*id, t.clone()) {
            Some(old) => Op::PutMaglev(*id, old),
            None => Op::DelMaglev(*id),
        },
        Op::DelSlot(k) => match state.services.remove(k) {
            Some(old) => Op::PutSlot(*k, old),
            None => Op::DelSlot(*k),
        },
        Op::DelBackend(id) => match state.backends.remove(id) {
            Some(old) => Op::PutBackend(*id, old),
            None => Op::DelBackend(*id),
        },
        Op::DelMaglev(id) => match state.maglev.remove(id) {
            Some(old) => Op::PutMaglev(*id, old),
            None => Op::DelMaglev(*id),
        },
        Op::DelNodeAddr(a) => {
            state.node_addrs.remove(a);
            Op::PutNodeAddr(*a)
        }
    }
}

#[cfg(test)]
mod tests;
