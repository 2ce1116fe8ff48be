use super::*;

use crate::model::{DEFAULT_AFFINITY_TIMEOUT, Plan, Protocol, Scope};
use capstan_proxy_common::{PROTO_TCP, PROTO_UDP};

const M: u32 = 251;

// ---------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------

fn pkey(name: &str, family: Family, scope: Scope) -> PlanKey {
    pkey_proto(name, Protocol::Tcp, family, scope)
}

fn pkey_proto(name: &str, protocol: Protocol, family: Family, scope: Scope) -> PlanKey {
    PlanKey {
        namespace: "default".into(),
        name: name.into(),
        port_name: "http".into(),
        protocol,
        family,
        scope,
    }
}

fn fe(ip: &str, port: u16) -> Frontend {
    fe_proto(ip, port, Protocol::Tcp)
}

fn fe_proto(ip: &str, port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr: FrontendAddr::Ip(ip.parse().unwrap()),
        port,
        protocol,
    }
}

fn np(family: Family, port: u16) -> Frontend {
    Frontend {
        addr: FrontendAddr::NodePort(family),
        port,
        protocol: Protocol::Tcp,
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A random-algorithm plan without affinity; backends sorted and unique as the model
/// hands them out.
fn plan<S: AsRef<str>>(frontends: &[Frontend], backends: &[S]) -> Plan {
    let mut b: Vec<SocketAddr> = backends.iter().map(|s| sa(s.as_ref())).collect();
    b.sort();
    b.dedup();
    Plan {
        frontends: frontends.iter().copied().collect(),
        backends: b,
        affinity_timeout: None,
        algorithm: Algorithm::Random,
    }
}

fn maglev_plan<S: AsRef<str>>(frontends: &[Frontend], backends: &[S]) -> Plan {
    Plan {
        algorithm: Algorithm::Maglev,
        ..plan(frontends, backends)
    }
}

/// `n` IPv4 backends 10.1.0.1:8080 ...
fn backends(n: usize) -> Vec<String> {
    (1..=n)
        .map(|i| format!("10.1.{}.{}:8080", i / 250, i % 250))
        .collect()
}

fn desired(plans: Vec<(PlanKey, Plan)>) -> DesiredState {
    DesiredState {
        plans: plans.into_iter().collect(),
    }
}

fn no_addrs() -> BTreeSet<IpAddr> {
    BTreeSet::new()
}

fn ips(v: &[&str]) -> BTreeSet<IpAddr> {
    v.iter().map(|s| s.parse().unwrap()).collect()
}

fn with_slot(k: &ServiceKey, slot: u16) -> ServiceKey {
    ServiceKey { slot, ..*k }
}

fn all_ops(ch: &Changes) -> impl Iterator<Item = &Tagged> {
    ch.prepare
        .iter()
        .chain(ch.commit.iter())
        .chain(ch.cleanup.iter())
}

/// Applies every operation, in order, to the mirror.
fn apply(state: &mut MapState, ch: &Changes) {
    for (_, op) in all_ops(ch) {
        apply_to_mirror(state, op);
    }
}

fn backend_addr(b: &Backend) -> SocketAddr {
    SocketAddr::new(words_addr(b.addr, b.family), host_port(b.port))
}

/// The backends a frontend resolves to, in slot order (panics on a hole).
fn resolve(state: &MapState, f: &Frontend) -> Vec<SocketAddr> {
    let k = frontend_key(f);
    let head = state
        .services
        .get(&k)
        .unwrap_or_else(|| panic!("no slot 0 for {f}"));
    (1..=head.count)
        .map(|s| {
            let v = state
                .services
                .get(&with_slot(&k, s))
                .unwrap_or_else(|| panic!("{f}: slot {s} of {} missing", head.count));
            let b = state
                .backends
                .get(&v.backend_id)
                .unwrap_or_else(|| panic!("{f}: slot {s}: backend {} missing", v.backend_id));
            backend_addr(b)
        })
        .collect()
}

fn head(state: &MapState, f: &Frontend) -> ServiceValue {
    *state
        .services
        .get(&frontend_key(f))
        .unwrap_or_else(|| panic!("no slot 0 for {f}"))
}

/// Backend id by address, as the slots of `f` use them.
fn ids_by_addr(state: &MapState, f: &Frontend) -> BTreeMap<SocketAddr, u32> {
    let k = frontend_key(f);
    let h = head(state, f);
    (1..=h.count)
        .map(|s| {
            let id = state.services[&with_slot(&k, s)].backend_id;
            (backend_addr(&state.backends[&id]), id)
        })
        .collect()
}

fn count_ops(ops: &[Tagged], pred: impl Fn(&Op) -> bool) -> usize {
    ops.iter().filter(|(_, op)| pred(op)).count()
}

/// The keys (any slot) an operation writes or deletes, if it touches the service map.
fn service_key_of(op: &Op) -> Option<ServiceKey> {
    match op {
        Op::PutSlot(k, _) | Op::DelSlot(k) => Some(*k),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------

/// The mirror is exactly what `desired` asks for: every frontend's slot 0 counts its
/// backends, slots 1..=count resolve to them, nothing else is left behind.
fn assert_realises(state: &MapState, d: &DesiredState, addrs: &BTreeSet<IpAddr>, m: u32) {
    let want_heads: BTreeSet<ServiceKey> = d
        .plans
        .values()
        .flat_map(|p| p.frontends.iter().map(frontend_key))
        .collect();
    let heads: BTreeSet<ServiceKey> = state
        .services
        .keys()
        .filter(|k| k.slot == 0)
        .copied()
        .collect();
    assert_eq!(heads, want_heads, "frontends in the maps");

    // No slot outside 1..=count of its frontend, and slots carry their service id.
    for (k, v) in &state.services {
        if k.slot == 0 {
            assert_eq!(v.backend_id, 0, "slot 0 names no backend: {k:?}");
            continue;
        }
        let h = state
            .services
            .get(&with_slot(k, 0))
            .unwrap_or_else(|| panic!("slot without frontend: {k:?}"));
        assert!(
            k.slot <= h.count,
            "slot {} past count {}: {k:?}",
            k.slot,
            h.count
        );
        assert_eq!(v.service_id, h.service_id, "slot service id {k:?}");
    }

    let mut service_ids = BTreeSet::new();
    let mut maglev_ids = BTreeSet::new();
    for (key, p) in &d.plans {
        let sids: BTreeSet<u32> = p
            .frontends
            .iter()
            .map(|f| head(state, f).service_id)
            .collect();
        assert_eq!(sids.len(), 1, "{key}: one service id for all frontends");
        let sid = *sids.iter().next().unwrap();
        assert_ne!(sid, 0, "{key}: service id 0");
        assert!(service_ids.insert(sid), "{key}: service id {sid} shared");
        let maglev_on = p.algorithm == Algorithm::Maglev && !p.backends.is_empty();
        for f in &p.frontends {
            let h = head(state, f);
            assert_eq!(h.count as usize, p.backends.len(), "{key} {f}: count");
            assert_eq!(
                h.affinity_timeout,
                p.affinity_timeout.unwrap_or(0),
                "{key} {f}"
            );
            let mut fl = 0;
            if p.affinity_timeout.is_some() {
                fl |= flags::AFFINITY;
            }
            if maglev_on {
                fl |= flags::MAGLEV;
            }
            if matches!(f.addr, FrontendAddr::NodePort(_)) {
                fl |= flags::NODEPORT;
            }
            assert_eq!(h.flags, fl, "{key} {f}: flags");
            let mut got = resolve(state, f);
            got.sort();
            assert_eq!(got, p.backends, "{key} {f}: backends");
            for s in 1..=h.count {
                let v = state.services[&with_slot(&frontend_key(f), s)];
                let b = state.backends[&v.backend_id];
                assert_eq!(b.proto, key.protocol.number(), "{key} {f}: backend proto");
                assert_eq!(
                    b.family,
                    frontend_key(f).family,
                    "{key} {f}: backend family"
                );
                assert_eq!(b.service_id, sid, "{key} {f}: backend's service id");
            }
        }
        if maglev_on {
            maglev_ids.insert(sid);
            let t = state
                .maglev
                .get(&sid)
                .unwrap_or_else(|| panic!("{key}: no Maglev table"));
            assert_eq!(t.len(), m as usize, "{key}: table size");
            let n = p.backends.len() as u16;
            assert!(
                t.iter().all(|e| (1..=n).contains(e)),
                "{key}: table entries"
            );
        }
    }
    let tables: BTreeSet<u32> = state.maglev.keys().copied().collect();
    assert_eq!(tables, maglev_ids, "Maglev tables");

    // Every backend is referenced, every referenced backend exists.
    let referenced: BTreeSet<u32> = state
        .services
        .iter()
        .filter(|(k, _)| k.slot != 0)
        .map(|(_, v)| v.backend_id)
        .collect();
    let present: BTreeSet<u32> = state.backends.keys().copied().collect();
    assert_eq!(present, referenced, "backends map vs slots");

    let want_addrs: BTreeSet<NodeAddrKey> = addrs.iter().map(|ip| node_addr_key(*ip)).collect();
    assert_eq!(state.node_addrs, want_addrs, "node addresses");
}

/// prepare writes only what clients cannot reach yet (backends, slots > 0, tables, node
/// addresses), commit only slot 0, cleanup only deletes; a frontend going away loses its
/// slot 0 before its other slots.
fn assert_phases(ch: &Changes) {
    for (_, op) in &ch.prepare {
        match op {
            Op::PutNodeAddr(_) | Op::PutBackend(..) | Op::PutMaglev(..) => {}
            Op::PutSlot(k, _) if k.slot > 0 => {}
            other => panic!("not a prepare operation: {other:?}"),
        }
    }
    for (_, op) in &ch.commit {
        match op {
            Op::PutSlot(k, _) if k.slot == 0 => {}
            other => panic!("not a commit operation: {other:?}"),
        }
    }
    for (i, (_, op)) in ch.cleanup.iter().enumerate() {
        match op {
            Op::DelSlot(k) if k.slot == 0 => {
                // No slot of this frontend may have been deleted before its slot 0.
                for (_, earlier) in &ch.cleanup[..i] {
                    if let Op::DelSlot(e) = earlier {
                        assert!(
                            with_slot(e, 0) != *k,
                            "slot {} deleted before slot 0 of {k:?}",
                            e.slot
                        );
                    }
                }
            }
            Op::DelSlot(_) | Op::DelBackend(_) | Op::DelMaglev(_) | Op::DelNodeAddr(_) => {}
            other => panic!("not a cleanup operation: {other:?}"),
        }
    }
}

/// Operations tagged with a plan belong to it.
fn assert_tags(ch: &Changes, d: &DesiredState) {
    let want_keys: Vec<PlanKey> = d.plans.keys().cloned().collect();
    let mut tagged_keys = ch.plans.clone();
    tagged_keys.sort();
    assert_eq!(tagged_keys, want_keys, "Changes::plans");
    for (tag, op) in ch.prepare.iter().chain(ch.commit.iter()) {
        let Some(i) = tag else {
            assert!(matches!(op, Op::PutNodeAddr(_)), "untagged {op:?}");
            continue;
        };
        let key = &ch.plans[*i];
        let p = &d.plans[key];
        match op {
            Op::PutSlot(k, _) => assert!(
                p.frontends
                    .iter()
                    .any(|f| frontend_key(f) == with_slot(k, 0)),
                "{op:?} tagged with {key}"
            ),
            Op::PutBackend(_, b) => assert_eq!(b.proto, key.protocol.number(), "{op:?}"),
            Op::PutMaglev(..) => assert_eq!(p.algorithm, Algorithm::Maglev),
            other => panic!("{other:?} tagged with {key}"),
        }
    }
    for (tag, _) in &ch.cleanup {
        if let Some(i) = tag {
            assert!(*i < ch.plans.len());
        }
    }
}

/// What each frontend may resolve to while a change is applied: its old backends or its
/// new ones.
fn allowed_backends(
    before: &MapState,
    d: &DesiredState,
) -> HashMap<ServiceKey, HashSet<SocketAddr>> {
    let mut allowed: HashMap<ServiceKey, HashSet<SocketAddr>> = HashMap::new();
    for k in before.services.keys().filter(|k| k.slot == 0) {
        let head = before.services[k];
        let set = allowed.entry(*k).or_default();
        for s in 1..=head.count {
            if let Some(v) = before.services.get(&with_slot(k, s))
                && let Some(b) = before.backends.get(&v.backend_id)
            {
                set.insert(backend_addr(b));
            }
        }
    }
    for p in d.plans.values() {
        for f in &p.frontends {
            allowed
                .entry(frontend_key(f))
                .or_default()
                .extend(p.backends.iter().copied());
        }
    }
    allowed
}

/// What a client could see at this moment is whole: every slot 0 counts slots that exist
/// and name existing backends among the frontend's old or new ones; a Maglev frontend has
/// its table.
fn assert_safe(state: &MapState, allowed: &HashMap<ServiceKey, HashSet<SocketAddr>>, at: &str) {
    for (k, h) in state.services.iter().filter(|(k, _)| k.slot == 0) {
        let ok = allowed
            .get(k)
            .unwrap_or_else(|| panic!("{at}: unexpected frontend {k:?}"));
        for s in 1..=h.count {
            let v = state
                .services
                .get(&with_slot(k, s))
                .unwrap_or_else(|| panic!("{at}: {k:?} slot {s} of {} missing", h.count));
            let b = state.backends.get(&v.backend_id).unwrap_or_else(|| {
                panic!("{at}: {k:?} slot {s}: backend {} missing", v.backend_id)
            });
            let a = backend_addr(b);
            assert!(
                ok.contains(&a),
                "{at}: {k:?} slot {s} reaches {a}, not one of its backends"
            );
            assert_eq!(b.proto, k.proto, "{at}: {k:?} slot {s}: protocol");
            assert_eq!(b.family, k.family, "{at}: {k:?} slot {s}: family");
        }
        if h.flags & flags::MAGLEV != 0 {
            assert!(
                state.maglev.contains_key(&h.service_id),
                "{at}: {k:?} is Maglev without a table"
            );
        }
    }
}

/// Diffs, checks the phases and tags, applies operation by operation checking that no
/// intermediate state is broken, checks the result realises `d` and that diffing again
/// (with the same ids, or with ids recovered from the maps as after a restart) finds
/// nothing to do.
fn step_m(
    state: &mut MapState,
    d: &DesiredState,
    addrs: &BTreeSet<IpAddr>,
    m: u32,
    ids: &mut Ids,
) -> Changes {
    let ch = diff(state, d, addrs, m, ids);
    assert_phases(&ch);
    assert_tags(&ch, d);
    let allowed = allowed_backends(state, d);
    assert_safe(state, &allowed, "before");
    for (i, (_, op)) in all_ops(&ch).enumerate() {
        if let Op::PutSlot(k, v) = op
            && k.slot > 0
        {
            assert!(
                state.backends.contains_key(&v.backend_id),
                "op {i}: slot {k:?} written before its backend {}",
                v.backend_id
            );
        }
        apply_to_mirror(state, op);
        assert_safe(state, &allowed, &format!("after op {i} {op:?}"));
    }
    assert_realises(state, d, addrs, m);
    let again = diff(state, d, addrs, m, &mut ids.clone());
    assert!(again.is_empty(), "second diff not empty: {again:?}");
    assert_eq!(again.len(), 0);
    let restarted = diff(state, d, addrs, m, &mut Ids::after(state));
    assert!(
        restarted.is_empty(),
        "diff after restart not empty: {restarted:?}"
    );
    ch
}

fn step(state: &mut MapState, d: &DesiredState, ids: &mut Ids) -> Changes {
    step_m(state, d, &no_addrs(), M, ids)
}

// ---------------------------------------------------------------------------------------
// Addresses and keys
// ---------------------------------------------------------------------------------------

#[test]
fn addr_words_round_trip() {
    for s in [
        "0.0.0.0",
        "10.1.2.3",
        "192.168.255.1",
        "255.255.255.255",
        "::",
        "::1",
        "2001:db8::1:2",
        "fd00:96::a",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        "::ffff:10.0.0.1",
    ] {
        let ip: IpAddr = s.parse().unwrap();
        let (w, fam) = addr_words(ip);
        assert_eq!(fam, if ip.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }, "{s}");
        assert_eq!(words_addr(w, fam), ip, "{s}");
    }
}

#[test]
fn addr_words_are_network_byte_order() {
    let (w, fam) = addr_words("10.1.2.3".parse().unwrap());
    assert_eq!(fam, FAMILY_V4);
    assert_eq!(w[0].to_ne_bytes(), [10, 1, 2, 3]);
    assert_eq!(&w[1..], &[0, 0, 0]);

    let v6: std::net::Ipv6Addr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
    let (w, fam) = addr_words(IpAddr::V6(v6));
    assert_eq!(fam, FAMILY_V6);
    let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_ne_bytes()).collect();
    assert_eq!(bytes, v6.octets());

    assert_eq!(net_port(80).to_ne_bytes(), [0, 80]);
    assert_eq!(net_port(0x1f90).to_ne_bytes(), [0x1f, 0x90]);
    for p in [1u16, 80, 8080, 30080, 65535] {
        assert_eq!(host_port(net_port(p)), p);
    }
}

#[test]
fn frontend_and_backend_keys() {
    let k = frontend_key(&fe("10.96.0.10", 80));
    assert_eq!(k.addr, addr_words("10.96.0.10".parse().unwrap()).0);
    assert_eq!(k.port, net_port(80));
    assert_eq!(k.proto, PROTO_TCP);
    assert_eq!(k.family, FAMILY_V4);
    assert_eq!(k.slot, 0);
    assert_eq!(k._pad, 0);

    let k = frontend_key(&fe_proto("fd00::a", 53, Protocol::Udp));
    assert_eq!(k.addr, addr_words("fd00::a".parse().unwrap()).0);
    assert_eq!(k.port, net_port(53));
    assert_eq!(k.proto, PROTO_UDP);
    assert_eq!(k.family, FAMILY_V6);

    let k4 = frontend_key(&np(Family::V4, 30080));
    assert_eq!(k4.addr, [0; 4]);
    assert_eq!(k4.family, FAMILY_V4);
    assert_eq!(k4.port, net_port(30080));
    let k6 = frontend_key(&np(Family::V6, 30080));
    assert_eq!(k6.addr, [0; 4]);
    assert_eq!(k6.family, FAMILY_V6);
    assert_ne!(k4, k6);

    let b = backend_value(sa("[fd00:1::5]:8443"), PROTO_TCP, 7);
    assert_eq!(b.family, FAMILY_V6);
    assert_eq!(b.service_id, 7);
    assert_eq!(b.port, net_port(8443));
    assert_eq!(b.proto, PROTO_TCP);
    assert_eq!(backend_addr(&b), sa("[fd00:1::5]:8443"));

    let n = node_addr_key("10.0.0.1".parse().unwrap());
    assert_eq!(n.addr, addr_words("10.0.0.1".parse().unwrap()).0);
    assert_eq!(n.family, FAMILY_V4);
}

// ---------------------------------------------------------------------------------------
// From empty, idempotence, layout
// ---------------------------------------------------------------------------------------

#[test]
fn from_empty_every_frontend_resolves_to_its_backends() {
    let web_fes = [fe("10.96.0.10", 80), np(Family::V4, 30080)];
    let web6_fes = [fe("fd00:96::a", 80)];
    let d = desired(vec![
        (
            pkey("web", Family::V4, Scope::Internal),
            plan(
                &web_fes[..1],
                &["10.0.0.2:8080", "10.0.0.1:8080", "10.0.0.3:8080"],
            ),
        ),
        (
            pkey("web", Family::V4, Scope::External),
            plan(
                &web_fes[1..],
                &["10.0.0.2:8080", "10.0.0.1:8080", "10.0.0.3:8080"],
            ),
        ),
        (
            pkey("web", Family::V6, Scope::Internal),
            plan(&web6_fes, &["[fd00:1::1]:8080", "[fd00:1::2]:8080"]),
        ),
    ]);
    let mut st = MapState::default();
    let mut ids = Ids::default();
    let ch = step(&mut st, &d, &mut ids);

    // 3 + 3 + 2 backends, one slot per backend and frontend, one head per frontend.
    assert_eq!(
        count_ops(&ch.prepare, |op| matches!(op, Op::PutBackend(..))),
        8
    );
    assert_eq!(
        count_ops(&ch.prepare, |op| matches!(op, Op::PutSlot(..))),
        8
    );
    assert_eq!(ch.commit.len(), 3);
    assert!(ch.cleanup.is_empty());

    for f in &web_fes {
        let h = head(&st, f);
        assert_eq!(h.count, 3);
        let k = frontend_key(f);
        let mut got = resolve(&st, f);
        got.sort();
        assert_eq!(
            got,
            vec![
                sa("10.0.0.1:8080"),
                sa("10.0.0.2:8080"),
                sa("10.0.0.3:8080")
            ]
        );
        for s in 1..=3 {
            let b = st.backends[&st.services[&with_slot(&k, s)].backend_id];
            assert_eq!(b.port, net_port(8080));
            assert_eq!(b.proto, PROTO_TCP);
            assert_eq!(b.family, FAMILY_V4);
        }
    }
    assert_eq!(head(&st, &web_fes[1]).flags, flags::NODEPORT);
    assert_eq!(head(&st, &web_fes[0]).flags, 0);
    let h6 = head(&st, &web6_fes[0]);
    assert_eq!(h6.count, 2);
    let mut got = resolve(&st, &web6_fes[0]);
    got.sort();
    assert_eq!(got, vec![sa("[fd00:1::1]:8080"), sa("[fd00:1::2]:8080")]);
}

#[test]
fn second_diff_is_empty() {
    let d = desired(vec![(
        pkey("web", Family::V4, Scope::Internal),
        plan(&[fe("10.96.0.10", 80), fe("10.96.0.11", 80)], &backends(7)),
    )]);
    let mut st = MapState::default();
    let mut ids = Ids::default();
    let ch = diff(&st, &d, &no_addrs(), M, &mut ids);
    assert!(!ch.is_empty());
    assert_eq!(
        ch.len(),
        ch.prepare.len() + ch.commit.len() + ch.cleanup.len()
    );
    apply(&mut st, &ch);
    let again = diff(&st, &d, &no_addrs(), M, &mut ids);
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(again.len(), 0);
    assert_realises(&st, &d, &no_addrs(), M);
}

#[test]
fn empty_desired_from_empty_is_empty() {
    let ch = diff(
        &MapState::default(),
        &DesiredState::default(),
        &no_addrs(),
        M,
        &mut Ids::default(),
    );
    assert!(ch.is_empty());
    assert!(ch.plans.is_empty());
}

#[test]
fn frontends_of_a_plan_share_a_service_id_and_plans_do_not() {
    let a = [
        fe("10.96.0.10", 80),
        np(Family::V4, 30080),
        fe("192.0.2.1", 80),
    ];
    let b = [fe("10.96.0.20", 80)];
    let d = desired(vec![
        (
            pkey("a", Family::V4, Scope::External),
            plan(&a, &backends(3)),
        ),
        (
            pkey("b", Family::V4, Scope::Internal),
            plan(&b, &backends(3)),
        ),
    ]);
    let mut st = MapState::default();
    step(&mut st, &d, &mut Ids::default());
    let sa_ = head(&st, &a[0]).service_id;
    assert!(a.iter().all(|f| head(&st, f).service_id == sa_));
    assert_ne!(head(&st, &b[0]).service_id, sa_);
    // The same backend addresses in two plans: separate backend ids.
    let ia: BTreeSet<u32> = ids_by_addr(&st, &a[0]).values().copied().collect();
    let ib: BTreeSet<u32> = ids_by_addr(&st, &b[0]).values().copied().collect();
    assert!(ia.is_disjoint(&ib));
    assert_eq!(st.backends.len(), 6);
}

#[test]
fn affinity_sets_flag_and_timeout_and_changes_only_the_head() {
    let f = [fe("10.96.0.10", 80), np(Family::V4, 30080)];
    let mut p = plan(&f, &backends(3));
    p.affinity_timeout = Some(300);
    let key = pkey("web", Family::V4, Scope::External);
    let mut st = MapState::default();
    let mut ids = Ids::default();
    step(&mut st, &desired(vec![(key.clone(), p.clone())]), &mut ids);
    assert_eq!(head(&st, &f[0]).flags, flags::AFFINITY);
    assert_eq!(head(&st, &f[0]).affinity_timeout, 300);
    assert_eq!(head(&st, &f[1]).flags, flags::AFFINITY | flags::NODEPORT);

    p.affinity_timeout = Some(DEFAULT_AFFINITY_TIMEOUT);
    let ch = step(&mut st, &desired(vec![(key.clone(), p.clone())]), &mut ids);
    assert!(ch.prepare.is_empty() && ch.cleanup.is_empty(), "{ch:?}");
    assert_eq!(ch.commit.len(), 2);
    assert_eq!(head(&st, &f[0]).affinity_timeout, DEFAULT_AFFINITY_TIMEOUT);

    p.affinity_timeout = None;
    let ch = step(&mut st, &desired(vec![(key, p)]), &mut ids);
    assert!(ch.prepare.is_empty() && ch.cleanup.is_empty(), "{ch:?}");
    assert_eq!(ch.commit.len(), 2);
    assert_eq!(head(&st, &f[0]).flags, 0);
    assert_eq!(head(&st, &f[0]).affinity_timeout, 0);
}

#[test]
fn tcp_and_udp_plans_on_one_address_and_port_are_separate() {
    let tcp = fe_proto("10.96.0.10", 53, Protocol::Tcp);
    let udp = fe_proto("10.96.0.10", 53, Protocol::Udp);
    let d = desired(vec![
        (
            pkey_proto("dns", Protocol::Tcp, Family::V4, Scope::Internal),
            plan(&[tcp], &["10.0.0.1:53"]),
        ),
        (
            pkey_proto("dns", Protocol::Udp, Family::V4, Scope::Internal),
            plan(&[udp], &["10.0.0.1:53"]),
        ),
    ]);
    let mut st = MapState::default();
    step(&mut st, &d, &mut Ids::default());
    assert_ne!(frontend_key(&tcp), frontend_key(&udp));
    let bt = ids_by_addr(&st, &tcp)[&sa("10.0.0.1:53")];
    let bu = ids_by_addr(&st, &udp)[&sa("10.0.0.1:53")];
    assert_ne!(bt, bu);
    assert_eq!(st.backends[&bt].proto, PROTO_TCP);
    assert_eq!(st.backends[&bu].proto, PROTO_UDP);
}

// ---------------------------------------------------------------------------------------
// Minimal changes
// ---------------------------------------------------------------------------------------

fn ten_backend_service() -> (PlanKey, [Frontend; 2], Vec<String>, MapState, Ids) {
    let key = pkey("web", Family::V4, Scope::External);
    let f = [fe("192.0.2.10", 80), np(Family::V4, 30080)];
    let b = backends(10);
    let mut st = MapState::default();
    let mut ids = Ids::default();
    step(
        &mut st,
        &desired(vec![(key.clone(), plan(&f, &b))]),
        &mut ids,
    );
    (key, f, b, st, ids)
}

#[test]
fn removing_one_of_ten_backends_is_minimal() {
    let (key, f, b, mut st, mut ids) = ten_backend_service();
    let before: Vec<BTreeMap<SocketAddr, u32>> = f.iter().map(|f| ids_by_addr(&st, f)).collect();
    let sid = head(&st, &f[0]).service_id;
    // Remove a backend that sits in a middle slot.
    let slot_of =
        |st: &MapState, a: SocketAddr| resolve(st, &f[0]).iter().position(|x| *x == a).unwrap() + 1;
    let gone = sa(&b[3]);
    assert!(slot_of(&st, gone) < 10, "test wants a middle slot");
    let gone_id = before[0][&gone];
    let rest: Vec<&String> = b.iter().filter(|s| sa(s) != gone).collect();

    let ch = step(&mut st, &desired(vec![(key, plan(&f, &rest))]), &mut ids);

    assert_eq!(
        count_ops(&ch.prepare, |op| matches!(op, Op::PutBackend(..))),
        0
    );
    for fr in &f {
        let fk = frontend_key(fr);
        let rewritten = ch
            .prepare
            .iter()
            .filter(|(_, op)| matches!(op, Op::PutSlot(k, _) if with_slot(k, 0) == fk))
            .count();
        assert!(rewritten <= 1, "{fr}: {rewritten} slots rewritten");
        let heads = ch
            .commit
            .iter()
            .filter(|(_, op)| matches!(op, Op::PutSlot(k, _) if *k == fk))
            .count();
        assert_eq!(heads, 1, "{fr}: head");
        let dels: Vec<u16> = ch
            .cleanup
            .iter()
            .filter_map(|(_, op)| match op {
                Op::DelSlot(k) if with_slot(k, 0) == fk => Some(k.slot),
                _ => None,
            })
            .collect();
        assert_eq!(dels, vec![10], "{fr}: the slot past the new count");
    }
    assert_eq!(ch.commit.len(), 2);
    assert!(ch.prepare.len() <= 2, "{:?}", ch.prepare);
    let del_backends: Vec<u32> = ch
        .cleanup
        .iter()
        .filter_map(|(_, op)| match op {
            Op::DelBackend(id) => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(del_backends, vec![gone_id]);
    assert_eq!(ch.cleanup.len(), 3);

    // Every other backend keeps its id, the service its id.
    for (i, fr) in f.iter().enumerate() {
        let mut expect = before[i].clone();
        expect.remove(&gone);
        assert_eq!(ids_by_addr(&st, fr), expect, "{fr}");
        assert_eq!(head(&st, fr).service_id, sid);
    }
}

#[test]
fn removing_the_backend_in_the_last_slot_rewrites_no_slot() {
    let (key, f, b, mut st, mut ids) = ten_backend_service();
    let last = resolve(&st, &f[0])[9];
    let rest: Vec<&String> = b.iter().filter(|s| sa(s) != last).collect();
    let ch = step(&mut st, &desired(vec![(key, plan(&f, &rest))]), &mut ids);
    assert!(ch.prepare.is_empty(), "{:?}", ch.prepare);
    assert_eq!(ch.commit.len(), 2);
    assert_eq!(
        count_ops(
            &ch.cleanup,
            |op| matches!(op, Op::DelSlot(k) if k.slot == 10)
        ),
        2
    );
    assert_eq!(
        count_ops(&ch.cleanup, |op| matches!(op, Op::DelBackend(_))),
        1
    );
    assert_eq!(ch.cleanup.len(), 3);
}

#[test]
fn adding_one_backend_is_minimal() {
    let (key, f, b, mut st, mut ids) = ten_backend_service();
    let before: Vec<BTreeMap<SocketAddr, u32>> = f.iter().map(|f| ids_by_addr(&st, f)).collect();
    let mut more = b.clone();
    more.push("10.2.0.1:8080".into());
    let ch = step(&mut st, &desired(vec![(key, plan(&f, &more))]), &mut ids);

    let puts: Vec<(u32, Backend)> = ch
        .prepare
        .iter()
        .filter_map(|(_, op)| match op {
            Op::PutBackend(id, b) => Some((*id, *b)),
            _ => None,
        })
        .collect();
    assert_eq!(puts.len(), 1);
    assert_eq!(backend_addr(&puts[0].1), sa("10.2.0.1:8080"));
    assert!(
        !before[0].values().any(|id| *id == puts[0].0),
        "new id is fresh"
    );
    for fr in &f {
        let fk = frontend_key(fr);
        let slots: Vec<u16> = ch
            .prepare
            .iter()
            .filter_map(|(_, op)| match op {
                Op::PutSlot(k, v) if with_slot(k, 0) == fk => {
                    assert_eq!(v.backend_id, puts[0].0);
                    Some(k.slot)
                }
                _ => None,
            })
            .collect();
        assert_eq!(slots, vec![11], "{fr}");
    }
    assert_eq!(ch.prepare.len(), 3);
    assert_eq!(ch.commit.len(), 2);
    assert!(ch.cleanup.is_empty(), "{:?}", ch.cleanup);
    for (i, fr) in f.iter().enumerate() {
        let now = ids_by_addr(&st, fr);
        for (a, id) in &before[i] {
            assert_eq!(now[a], *id, "{fr} {a}");
        }
    }
}

#[test]
fn replacing_a_backend_rewrites_its_slot_in_place() {
    let (key, f, b, mut st, mut ids) = ten_backend_service();
    let old = sa(&b[4]);
    let old_slot = resolve(&st, &f[0]).iter().position(|a| *a == old).unwrap() + 1;
    let mut next: Vec<String> = b.iter().filter(|s| sa(s) != old).cloned().collect();
    next.push("10.2.0.1:8080".into());
    let ch = step(&mut st, &desired(vec![(key, plan(&f, &next))]), &mut ids);
    assert_eq!(
        count_ops(&ch.prepare, |op| matches!(op, Op::PutBackend(..))),
        1
    );
    let slots: Vec<u16> = ch
        .prepare
        .iter()
        .filter_map(|(_, op)| match op {
            Op::PutSlot(k, _) => Some(k.slot),
            _ => None,
        })
        .collect();
    assert_eq!(slots, vec![old_slot as u16, old_slot as u16]);
    // Same count and flags: slot 0 stays as it is.
    assert!(ch.commit.is_empty(), "{:?}", ch.commit);
    assert_eq!(
        count_ops(&ch.cleanup, |op| matches!(op, Op::DelBackend(_))),
        1
    );
    assert_eq!(ch.cleanup.len(), 1);
}

#[test]
fn shrinking_to_no_backend_and_back() {
    let f = [fe("10.96.0.10", 80), np(Family::V4, 30080)];
    let key = pkey("web", Family::V4, Scope::External);
    let mut st = MapState::default();
    let mut ids = Ids::default();
    step(
        &mut st,
        &desired(vec![(key.clone(), plan(&f, &backends(3)))]),
        &mut ids,
    );
    let sid = head(&st, &f[0]).service_id;

    let none: [&str; 0] = [];
    let ch = step(
        &mut st,
        &desired(vec![(key.clone(), plan(&f, &none))]),
        &mut ids,
    );
    assert!(ch.prepare.is_empty());
    assert_eq!(ch.commit.len(), 2);
    assert_eq!(count_ops(&ch.cleanup, |op| matches!(op, Op::DelSlot(_))), 6);
    assert_eq!(
        count_ops(&ch.cleanup, |op| matches!(op, Op::DelBackend(_))),
        3
    );
    for fr in &f {
        let h = head(&st, fr);
        assert_eq!(h.count, 0, "{fr} refuses");
        assert_eq!(h.service_id, sid);
    }
    assert!(st.backends.is_empty());

    step(
        &mut st,
        &desired(vec![(key, plan(&f, &backends(2)))]),
        &mut ids,
    );
    assert_eq!(head(&st, &f[0]).service_id, sid);
    assert_eq!(head(&st, &f[0]).count, 2);
}

#[test]
fn a_new_frontend_joins_with_the_same_layout_and_leaves_the_others_alone() {
    let key = pkey("web", Family::V4, Scope::External);
    let f1 = np(Family::V4, 30080);
    let f2 = fe("198.51.100.1", 80);
    let mut st = MapState::default();
    let mut ids = Ids::default();
    step(
        &mut st,
        &desired(vec![(key.clone(), plan(&[f1], &backends(4)))]),
        &mut ids,
    );
    let sid = head(&st, &f1).service_id;
    let ids_before = ids_by_addr(&st, &f1);

    let ch = step(
        &mut st,
        &desired(vec![(key, plan(&[f1, f2], &backends(4)))]),
        &mut ids,
    );
    let k1 = frontend_key(&f1);
    assert!(
        all_ops(&ch).all(|(_, op)| service_key_of(op).is_none_or(|k| with_slot(&k, 0) != k1)),
        "the existing frontend is untouched: {ch:?}"
    );
    assert_eq!(
        count_ops(&ch.prepare, |op| matches!(op, Op::PutBackend(..))),
        0
    );
    assert_eq!(head(&st, &f2).service_id, sid);
    assert_eq!(ids_by_addr(&st, &f2), ids_before);
    assert_eq!(resolve(&st, &f1), resolve(&st, &f2));
}

// ---------------------------------------------------------------------------------------
// Ids
// ---------------------------------------------------------------------------------------

#[test]
fn ids_are_recovered_after_a_restart() {
    let a = [fe("10.96.0.10", 80), np(Family::V4, 30080)];
    let b = [fe("10.96.0.20", 443)];
    let d = desired(vec![
        (
            pkey("a", Family::V4, Scope::External),
            plan(&a, &backends(5)),
        ),
        (
            pkey("b", Family::V4, Scope::Internal),
            plan(&b, &backends(3)),
        ),
    ]);
    let mut st = MapState::default();
    let mut ids = Ids::default();
    step(&mut st, &d, &mut ids);
    // Some churn so that ids are not simply 1..n.
    let d2 = desired(vec![
        (
            pkey("a", Family::V4, Scope::External),
            plan(&a, &backends(7)[2..]),
        ),
        (
            pkey("b", Family::V4, Scope::Internal),
            plan(&b, &backends(3)),
        ),
    ]);
    step(&mut st, &d2, &mut ids);

    // A restarted agent reads the maps back and has nothing to do.
    let mut fresh = Ids::after(&st);
    assert!(diff(&st, &d2, &no_addrs(), M, &mut fresh).is_empty());

    // Its next change reuses every id in place and allocates only unused ones.
    let sids: BTreeMap<ServiceKey, u32> = st
        .services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(k, v)| (*k, v.service_id))
        .collect();
    let used_sids: BTreeSet<u32> = sids.values().copied().collect();
    let used_bids: BTreeSet<u32> = st.backends.keys().copied().collect();
    let a_ids = ids_by_addr(&st, &a[0]);
    let c = [fe("10.96.0.30", 80)];
    let mut a_more = backends(7)[2..].to_vec();
    a_more.push("10.2.0.1:8080".into());
    let d3 = desired(vec![
        (pkey("a", Family::V4, Scope::External), plan(&a, &a_more)),
        (
            pkey("b", Family::V4, Scope::Internal),
            plan(&b, &backends(3)),
        ),
        (
            pkey("c", Family::V4, Scope::Internal),
            plan(&c, &backends(2)),
        ),
    ]);
    let ch = step(&mut st, &d3, &mut fresh);
    for (_, op) in &ch.prepare {
        if let Op::PutBackend(id, _) = op {
            assert!(
                !used_bids.contains(id),
                "backend id {id} allocated while in use"
            );
        }
    }
    for (k, sid) in &sids {
        assert_eq!(st.services[k].service_id, *sid, "{k:?} kept its service id");
    }
    assert!(!used_sids.contains(&head(&st, &c[0]).service_id));
    let a_now = ids_by_addr(&st, &a[0]);
    for (addr, id) in &a_ids {
        assert_eq!(a_now[addr], *id);
    }
}

#[test]
fn fresh_ids_never_collide_with_ids_in_the_maps() {
    // Ids allocated after a restart for new plans must not hit ids of existing ones, even
    // when the existing ids are sparse.
    let mut st = MapState::default();
    let mut ids = Ids::default();
    let mut plans = Vec::new();
    for i in 0..6u8 {
        plans.push((
            pkey(&format!("s{i}"), Family::V4, Scope::Internal),
            plan(&[fe(&format!("10.96.0.{}", i + 1), 80)], &backends(3)),
        ));
    }
    step(&mut st, &desired(plans.clone()), &mut ids);
    // Remove every other Service.
    let kept: Vec<(PlanKey, Plan)> = plans.iter().step_by(2).cloned().collect();
    step(&mut st, &desired(kept.clone()), &mut ids);
    let used_sids: BTreeSet<u32> = st.services.values().map(|v| v.service_id).collect();
    let used_bids: BTreeSet<u32> = st.backends.keys().copied().collect();

    let mut fresh = Ids::after(&st);
    let mut more = kept.clone();
    for i in 10..14u8 {
        more.push((
            pkey(&format!("n{i}"), Family::V4, Scope::Internal),
            plan(&[fe(&format!("10.96.1.{i}"), 80)], &backends(4)),
        ));
    }
    let old_heads: BTreeMap<ServiceKey, u32> = st
        .services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(k, v)| (*k, v.service_id))
        .collect();
    let ch = step(&mut st, &desired(more.clone()), &mut fresh);
    for (_, op) in &ch.prepare {
        if let Op::PutBackend(id, _) = op {
            assert!(!used_bids.contains(id), "backend id {id} in use");
        }
    }
    for (k, sid) in &old_heads {
        assert_eq!(st.services[k].service_id, *sid, "{k:?} kept its service id");
    }
    let mut new_sids = BTreeSet::new();
    for (_, p) in &more[kept.len()..] {
        let f = p.frontends.iter().next().unwrap();
        let sid = head(&st, f).service_id;
        assert!(
            !used_sids.contains(&sid),
            "{f} took service id {sid} in use"
        );
        assert!(new_sids.insert(sid));
    }
}

#[test]
fn ids_are_not_reused_after_deletion_within_a_run() {
    // Service and backend ids of what was deleted are not handed out again by the same
    // allocator (stale affinity or reverse entries could otherwise name a new Service).
    let mut st = MapState::default();
    let mut ids = Ids::default();
    let a = [fe("10.96.0.10", 80)];
    let b = [fe("10.96.0.20", 80)];
    let ka = pkey("a", Family::V4, Scope::Internal);
    let kb = pkey("b", Family::V4, Scope::Internal);
    step(
        &mut st,
        &desired(vec![
            (ka.clone(), plan(&a, &backends(3))),
            (kb.clone(), plan(&b, &backends(3))),
        ]),
        &mut ids,
    );
    let mut seen_sids: BTreeSet<u32> = st.services.values().map(|v| v.service_id).collect();
    let mut seen_bids: BTreeSet<u32> = st.backends.keys().copied().collect();
    // b goes, then comes back; a loses and regains backends.
    step(
        &mut st,
        &desired(vec![(ka.clone(), plan(&a, &backends(1)))]),
        &mut ids,
    );
    let ch = step(
        &mut st,
        &desired(vec![
            (ka, plan(&a, &backends(3))),
            (kb, plan(&b, &backends(3))),
        ]),
        &mut ids,
    );
    for (_, op) in &ch.prepare {
        if let Op::PutBackend(id, _) = op {
            assert!(seen_bids.insert(*id), "backend id {id} reused");
        }
    }
    let sid_b = head(&st, &b[0]).service_id;
    assert!(seen_sids.insert(sid_b), "service id {sid_b} reused");
}

// ---------------------------------------------------------------------------------------
// Maglev
// ---------------------------------------------------------------------------------------

/// The backend every table entry reaches, through the slots of `f`.
fn maglev_reach(state: &MapState, f: &Frontend) -> Vec<SocketAddr> {
    let h = head(state, f);
    let slots = resolve(state, f);
    state.maglev[&h.service_id]
        .iter()
        .map(|e| slots[*e as usize - 1])
        .collect()
}

#[test]
fn maglev_plan_writes_a_table_of_slot_indexes() {
    let f = [fe("10.96.0.10", 80), np(Family::V4, 30080)];
    let key = pkey("web", Family::V4, Scope::External);
    let mut st = MapState::default();
    let mut ids = Ids::default();
    let ch = step(
        &mut st,
        &desired(vec![(key.clone(), maglev_plan(&f, &backends(5)))]),
        &mut ids,
    );
    let sid = head(&st, &f[0]).service_id;
    let tables: Vec<(u32, Vec<u16>)> = ch
        .prepare
        .iter()
        .filter_map(|(_, op)| match op {
            Op::PutMaglev(id, t) => Some((*id, t.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(tables.len(), 1);
    assert_eq!(tables[0].0, sid);
    assert_eq!(tables[0].1.len(), M as usize);
    assert!(tables[0].1.iter().all(|e| (1..=5).contains(e)));
    // Every slot gets a share.
    let used: BTreeSet<u16> = tables[0].1.iter().copied().collect();
    assert_eq!(used, (1..=5).collect());
    assert_eq!(head(&st, &f[0]).flags, flags::MAGLEV);
    assert_eq!(head(&st, &f[1]).flags, flags::MAGLEV | flags::NODEPORT);
    // Both frontends reach the same backends through the one table.
    assert_eq!(maglev_reach(&st, &f[0]), maglev_reach(&st, &f[1]));

    // Growing: a new table over 6 slots.
    let ch = step(
        &mut st,
        &desired(vec![(key.clone(), maglev_plan(&f, &backends(6)))]),
        &mut ids,
    );
    let t: Vec<&Vec<u16>> = ch
        .prepare
        .iter()
        .filter_map(|(_, op)| match op {
            Op::PutMaglev(id, t) if *id == sid => Some(t),
            _ => None,
        })
        .collect();
    assert_eq!(t.len(), 1);
    assert!(t[0].iter().all(|e| (1..=6).contains(e)));

    // Switching to random: the flag goes in commit, the table in cleanup.
    let ch = step(
        &mut st,
        &desired(vec![(key, plan(&f, &backends(6)))]),
        &mut ids,
    );
    assert_eq!(
        count_ops(&ch.prepare, |op| matches!(op, Op::PutMaglev(..))),
        0
    );
    assert_eq!(ch.commit.len(), 2);
    assert!(ch.commit.iter().all(|(_, op)| matches!(op,
        Op::PutSlot(_, v) if v.flags & flags::MAGLEV == 0)));
    let dels: Vec<&Op> = ch.cleanup.iter().map(|(_, op)| op).collect();
    assert_eq!(dels, vec![&Op::DelMaglev(sid)]);
    assert!(st.maglev.is_empty());
}

#[test]
fn maglev_table_follows_the_table_size_and_empty_backends() {
    let f = [fe("10.96.0.10", 80)];
    let key = pkey("web", Family::V4, Scope::Internal);
    let mut st = MapState::default();
    let mut ids = Ids::default();
    step(
        &mut st,
        &desired(vec![(key.clone(), maglev_plan(&f, &backends(3)))]),
        &mut ids,
    );
    let sid = head(&st, &f[0]).service_id;

    let ch = step_m(
        &mut st,
        &desired(vec![(key.clone(), maglev_plan(&f, &backends(3)))]),
        &no_addrs(),
        509,
        &mut ids,
    );
    assert_eq!(ch.len(), 1, "{ch:?}");
    assert_eq!(st.maglev[&sid].len(), 509);

    // No backend: no table and no Maglev flag; the old table goes.
    let none: [&str; 0] = [];
    let ch = step_m(
        &mut st,
        &desired(vec![(key.clone(), maglev_plan(&f, &none))]),
        &no_addrs(),
        509,
        &mut ids,
    );
    assert_eq!(count_ops(&ch.cleanup, |op| *op == Op::DelMaglev(sid)), 1);
    assert_eq!(head(&st, &f[0]).flags, 0);
    assert!(st.maglev.is_empty());

    step_m(
        &mut st,
        &desired(vec![(key, maglev_plan(&f, &backends(2)))]),
        &no_addrs(),
        509,
        &mut ids,
    );
    assert_eq!(head(&st, &f[0]).flags, flags::MAGLEV);
}

#[test]
fn maglev_removing_one_backend_keeps_the_others_connections() {
    // Maglev's point: when one of N backends goes, about 1/N of the table moves (the
    // entries of the removed backend) and the entries of the others mostly stay put.
    let m = maglev::DEFAULT_TABLE_SIZE;
    let f = [fe("10.96.0.10", 80)];
    let key = pkey("web", Family::V4, Scope::Internal);
    let b = backends(10);
    let mut st = MapState::default();
    let mut ids = Ids::default();
    step_m(
        &mut st,
        &desired(vec![(key.clone(), maglev_plan(&f, &b))]),
        &no_addrs(),
        m,
        &mut ids,
    );
    let before = maglev_reach(&st, &f[0]);
    // A backend in a middle slot, so that the slot layout changes.
    let gone = resolve(&st, &f[0])[2];
    let rest: Vec<&String> = b.iter().filter(|s| sa(s) != gone).collect();
    step_m(
        &mut st,
        &desired(vec![(key, maglev_plan(&f, &rest))]),
        &no_addrs(),
        m,
        &mut ids,
    );
    let after = maglev_reach(&st, &f[0]);
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(x, y)| **x != gone && x != y)
        .count();
    // Same bound as maglev's own test: little beyond the removed share may move.
    assert!(
        moved < m as usize / 50,
        "{moved} of {m} entries of surviving backends moved"
    );
}

// ---------------------------------------------------------------------------------------
// Node addresses
// ---------------------------------------------------------------------------------------

#[test]
fn node_addresses_are_added_and_removed() {
    let mut st = MapState::default();
    let mut ids = Ids::default();
    let d = DesiredState::default();
    let a1 = ips(&["10.0.0.1", "fd00::1"]);
    let ch = step_m(&mut st, &d, &a1, M, &mut ids);
    let mut puts: Vec<NodeAddrKey> = ch
        .prepare
        .iter()
        .map(|(tag, op)| {
            assert_eq!(*tag, None);
            match op {
                Op::PutNodeAddr(k) => *k,
                other => panic!("{other:?}"),
            }
        })
        .collect();
    puts.sort();
    let mut want: Vec<NodeAddrKey> = a1.iter().map(|ip| node_addr_key(*ip)).collect();
    want.sort();
    assert_eq!(puts, want);
    assert!(ch.commit.is_empty() && ch.cleanup.is_empty());

    let a2 = ips(&["10.0.0.2", "fd00::1"]);
    let ch = step_m(&mut st, &d, &a2, M, &mut ids);
    assert_eq!(
        ch.prepare,
        vec![(
            None,
            Op::PutNodeAddr(node_addr_key("10.0.0.2".parse().unwrap()))
        )]
    );
    assert!(ch.commit.is_empty());
    assert_eq!(
        ch.cleanup,
        vec![(
            None,
            Op::DelNodeAddr(node_addr_key("10.0.0.1".parse().unwrap()))
        )]
    );

    let ch = step_m(&mut st, &d, &no_addrs(), M, &mut ids);
    assert_eq!(
        count_ops(&ch.cleanup, |op| matches!(op, Op::DelNodeAddr(_))),
        2
    );
    assert!(st.node_addrs.is_empty());
}

// ---------------------------------------------------------------------------------------
// Removal
// ---------------------------------------------------------------------------------------

#[test]
fn removing_a_service_deletes_all_of_it_and_nothing_else() {
    let a = [fe("10.96.0.10", 80), np(Family::V4, 30080)];
    let b = [fe("10.96.0.20", 80)];
    let pa = maglev_plan(&a, &backends(3));
    let pb = plan(&b, &backends(2));
    let ka = pkey("a", Family::V4, Scope::External);
    let kb = pkey("b", Family::V4, Scope::Internal);
    let mut st = MapState::default();
    let mut ids = Ids::default();
    step(
        &mut st,
        &desired(vec![(ka, pa), (kb.clone(), pb.clone())]),
        &mut ids,
    );
    let sid_a = head(&st, &a[0]).service_id;
    let a_backends: BTreeSet<u32> = ids_by_addr(&st, &a[0]).values().copied().collect();
    let b_key = frontend_key(&b[0]);
    let b_entries: Vec<(ServiceKey, ServiceValue)> = st
        .services
        .iter()
        .filter(|(k, _)| with_slot(k, 0) == b_key)
        .map(|(k, v)| (*k, *v))
        .collect();
    let b_backends: BTreeMap<u32, Backend> = ids_by_addr(&st, &b[0])
        .values()
        .map(|id| (*id, st.backends[id]))
        .collect();

    let ch = step(&mut st, &desired(vec![(kb, pb)]), &mut ids);
    assert!(ch.prepare.is_empty(), "{:?}", ch.prepare);
    assert!(ch.commit.is_empty(), "{:?}", ch.commit);
    let deleted_slots: BTreeSet<ServiceKey> = ch
        .cleanup
        .iter()
        .filter_map(|(_, op)| match op {
            Op::DelSlot(k) => Some(*k),
            _ => None,
        })
        .collect();
    let mut want = BTreeSet::new();
    for f in &a {
        for s in 0..=3 {
            want.insert(with_slot(&frontend_key(f), s));
        }
    }
    assert_eq!(deleted_slots, want);
    let deleted_backends: BTreeSet<u32> = ch
        .cleanup
        .iter()
        .filter_map(|(_, op)| match op {
            Op::DelBackend(id) => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(deleted_backends, a_backends);
    assert_eq!(count_ops(&ch.cleanup, |op| *op == Op::DelMaglev(sid_a)), 1);
    assert_eq!(ch.cleanup.len(), 8 + 3 + 1);

    // The other Service is exactly as it was.
    for (k, v) in &b_entries {
        assert_eq!(st.services.get(k), Some(v));
    }
    for (id, be) in &b_backends {
        assert_eq!(st.backends.get(id), Some(be));
    }
    assert_eq!(st.services.len(), b_entries.len());
}

#[test]
fn removed_frontend_slot_zero_goes_before_its_slots() {
    let a = [
        fe("10.96.0.10", 80),
        fe("192.0.2.1", 80),
        np(Family::V4, 30080),
    ];
    let key = pkey("a", Family::V4, Scope::External);
    let mut st = MapState::default();
    let mut ids = Ids::default();
    step(
        &mut st,
        &desired(vec![(key.clone(), plan(&a, &backends(4)))]),
        &mut ids,
    );
    // Drop one frontend of the plan and shrink the backends at the same time.
    let ch = step(
        &mut st,
        &desired(vec![(key, plan(&a[..2], &backends(2)))]),
        &mut ids,
    );
    let gone = frontend_key(&a[2]);
    let positions: Vec<(usize, u16)> = ch
        .cleanup
        .iter()
        .enumerate()
        .filter_map(|(i, (_, op))| match op {
            Op::DelSlot(k) if with_slot(k, 0) == gone => Some((i, k.slot)),
            _ => None,
        })
        .collect();
    assert_eq!(positions.len(), 5, "{positions:?}");
    assert_eq!(positions[0].1, 0, "slot 0 first: {positions:?}");
    // No backend is deleted before the slots that name it.
    let last_slot_del = ch
        .cleanup
        .iter()
        .rposition(|(_, op)| matches!(op, Op::DelSlot(_)))
        .unwrap();
    let first_backend_del = ch
        .cleanup
        .iter()
        .position(|(_, op)| matches!(op, Op::DelBackend(_)))
        .unwrap();
    assert!(last_slot_del < first_backend_del);
}

// ---------------------------------------------------------------------------------------
// Sequences, interruptions, leftovers
// ---------------------------------------------------------------------------------------

fn scenario() -> Vec<(DesiredState, BTreeSet<IpAddr>)> {
    let web = [fe("10.96.0.10", 80), np(Family::V4, 30080)];
    let lb = fe("198.51.100.1", 80);
    let web6 = [fe("fd00:96::a", 80), np(Family::V6, 30080)];
    let api = [fe("10.96.0.20", 443)];
    let kw = pkey("web", Family::V4, Scope::External);
    let kw6 = pkey("web", Family::V6, Scope::External);
    let ka = pkey("api", Family::V4, Scope::Internal);
    let b6 = |n: usize| -> Vec<String> { (1..=n).map(|i| format!("[fd00:1::{i}]:8080")).collect() };
    let addrs = ips(&["10.0.0.1", "fd00::1"]);
    let none: [&str; 0] = [];
    let mut affinity = plan(&web, &backends(5));
    affinity.affinity_timeout = Some(60);
    vec![
        (
            desired(vec![(kw.clone(), plan(&web, &backends(3)))]),
            addrs.clone(),
        ),
        (
            desired(vec![(kw.clone(), plan(&web, &backends(8)))]),
            addrs.clone(),
        ),
        (
            desired(vec![(kw.clone(), plan(&web, &backends(8)[3..]))]),
            addrs.clone(),
        ),
        (
            desired(vec![
                (kw.clone(), maglev_plan(&web, &backends(8)[1..])),
                (kw6.clone(), plan(&web6, &b6(3))),
            ]),
            addrs.clone(),
        ),
        (
            desired(vec![
                (
                    kw.clone(),
                    maglev_plan(&[web[0], web[1], lb], &backends(9)[4..]),
                ),
                (kw6.clone(), maglev_plan(&web6, &b6(4))),
                (ka.clone(), plan(&api, &backends(2))),
            ]),
            ips(&["10.0.0.2"]),
        ),
        (
            desired(vec![
                (kw.clone(), affinity.clone()),
                (kw6.clone(), plan(&web6, &none)),
                (ka.clone(), maglev_plan(&api, &backends(6))),
            ]),
            ips(&["10.0.0.2"]),
        ),
        // The LB address moves from one Service to another.
        (
            desired(vec![
                (kw.clone(), plan(&web, &backends(4))),
                (ka.clone(), plan(&[api[0], lb], &backends(6)[1..])),
            ]),
            addrs.clone(),
        ),
        (desired(vec![(ka, plan(&[lb], &backends(1)))]), addrs),
        (DesiredState::default(), no_addrs()),
    ]
}

#[test]
fn a_sequence_of_changes_never_exposes_a_broken_state() {
    let mut st = MapState::default();
    let mut ids = Ids::default();
    for (i, (d, addrs)) in scenario().iter().enumerate() {
        let ch = step_m(&mut st, d, addrs, M, &mut ids);
        assert!(!ch.is_empty() || i == 0, "step {i} changed nothing");
    }
    assert_eq!(st, MapState::default());
}

#[test]
fn an_interrupted_apply_is_completed_by_the_next_diff() {
    // The agent applies a prefix of the operations (a write failed, it crashed, ...) and
    // diffs again from what the maps hold: the result is the desired state, and every
    // state in between is safe.
    let steps = scenario();
    for (i, window) in steps.windows(2).enumerate() {
        let mut base = MapState::default();
        let mut ids = Ids::default();
        for (d, a) in &steps[..=i] {
            step_m(&mut base, d, a, M, &mut ids);
        }
        let (d, a) = &window[1];
        let ch = diff(&base, d, a, M, &mut ids.clone());
        let ops: Vec<Op> = all_ops(&ch).map(|(_, op)| op.clone()).collect();
        for cut in 0..ops.len() {
            let mut st = base.clone();
            let allowed = allowed_backends(&st, d);
            for op in &ops[..cut] {
                apply_to_mirror(&mut st, op);
                assert_safe(&st, &allowed, &format!("step {i}, cut {cut}"));
            }
            // After a restart: ids recovered from the maps.
            let mut fresh = Ids::after(&st);
            step_m(&mut st, d, a, M, &mut fresh);
            // Without a restart: the ids the agent kept.
            let mut st = base.clone();
            for op in &ops[..cut] {
                apply_to_mirror(&mut st, op);
            }
            let mut kept = ids.clone();
            let _ = diff(&base, d, a, M, &mut kept);
            step_m(&mut st, d, a, M, &mut kept);
        }
    }
}

#[test]
fn slots_past_the_count_left_by_an_unfinished_apply_are_removed() {
    // The agent wrote the prepare stage of a growth (slots 4..=6) and stopped before its
    // commit (killed, or its rollback failed); the restarted agent reads the maps back and
    // the endpoints are back to 3. The slots past the count must go with their backends
    // ("slots past the new count: whatever of them the maps hold").
    let f = [fe("10.96.0.10", 80)];
    let key = pkey("web", Family::V4, Scope::Internal);
    let mut st = MapState::default();
    let mut ids = Ids::default();
    let small = desired(vec![(key.clone(), plan(&f, &backends(3)))]);
    step(&mut st, &small, &mut ids);
    let big = desired(vec![(key, plan(&f, &backends(6)))]);
    let ch = diff(&st, &big, &no_addrs(), M, &mut ids);
    for (_, op) in &ch.prepare {
        apply_to_mirror(&mut st, op);
    }
    assert_eq!(head(&st, &f[0]).count, 3);
    let mut restarted = Ids::after(&st);
    let ch = diff(&st, &small, &no_addrs(), M, &mut restarted);
    let k = frontend_key(&f[0]);
    for s in 4..=6 {
        assert!(
            ch.cleanup
                .iter()
                .any(|(_, op)| *op == Op::DelSlot(with_slot(&k, s))),
            "slot {s} not deleted"
        );
    }
    apply(&mut st, &ch);
    assert_realises(&st, &small, &no_addrs(), M);
}

#[test]
fn inverse_undoes_each_operation() {
    let mut st = MapState::default();
    let mut ids = Ids::default();
    for (i, (d, addrs)) in scenario().iter().enumerate() {
        let ch = diff(&st, d, addrs, M, &mut ids);
        // One operation at a time: the inverse restores the state before it.
        let mut walk = st.clone();
        for (_, op) in all_ops(&ch) {
            let before = walk.clone();
            let inv = inverse(&walk, op);
            let mut probe = walk.clone();
            // Applying returns the same undo operation.
            assert_eq!(apply_to_mirror(&mut probe, op), inv, "step {i}: {op:?}");
            apply_to_mirror(&mut probe, &inv);
            assert_eq!(probe, before, "step {i}: {op:?} undone by {inv:?}");
            apply_to_mirror(&mut walk, op);
        }
        // A whole plan's prepare rolled back in reverse order (what the applier does when
        // one of its writes fails): the maps are as before.
        let mut rolled = st.clone();
        let mut undo = Vec::new();
        for (tag, op) in &ch.prepare {
            if tag.is_some() {
                undo.push(inverse(&rolled, op));
                apply_to_mirror(&mut rolled, op);
            }
        }
        for op in undo.iter().rev() {
            apply_to_mirror(&mut rolled, op);
        }
        assert_eq!(rolled, st, "step {i}: prepare rolled back");
        apply(&mut st, &ch);
        assert_realises(&st, d, addrs, M);
    }
}

#[test]
fn leftover_slots_of_an_unwanted_frontend_are_removed() {
    // Slots without a slot 0 (a frontend whose head was deleted, the agent stopped before
    // its other slots): cleaned up.
    let f = fe("10.96.0.10", 80);
    let key = pkey("web", Family::V4, Scope::Internal);
    let mut st = MapState::default();
    let mut ids = Ids::default();
    step(
        &mut st,
        &desired(vec![(key, plan(&[f], &backends(3)))]),
        &mut ids,
    );
    st.services.remove(&frontend_key(&f));
    let ch = step(&mut st, &DesiredState::default(), &mut ids);
    assert_eq!(count_ops(&ch.cleanup, |op| matches!(op, Op::DelSlot(_))), 3);
    assert_eq!(
        count_ops(&ch.cleanup, |op| matches!(op, Op::DelBackend(_))),
        3
    );
}

/// A scoped diff over the plans that changed reaches the same maps as a full diff.
#[test]
fn scoped_diff_reaches_what_a_full_diff_reaches() {
    let a = pkey("a", Family::V4, Scope::Internal);
    let b = pkey("b", Family::V4, Scope::Internal);
    let c = pkey("c", Family::V4, Scope::Internal);
    let before = desired(vec![
        (a.clone(), plan(&[fe("10.96.0.1", 80)], &backends(3))),
        (b.clone(), plan(&[fe("10.96.0.2", 80)], &backends(5))),
        (c.clone(), plan(&[fe("10.96.0.3", 80)], &backends(2))),
    ]);
    let mut ids = Ids::default();
    let mut state = MapState::default();
    let first = diff(&state, &before, &no_addrs(), 251, &mut ids);
    apply(&mut state, &first);
    // a shrinks, b is removed, c is unchanged, d is new.
    let d = pkey("d", Family::V4, Scope::Internal);
    let after = desired(vec![
        (a.clone(), plan(&[fe("10.96.0.1", 80)], &backends(1))),
        (c.clone(), plan(&[fe("10.96.0.3", 80)], &backends(2))),
        (d.clone(), plan(&[fe("10.96.0.4", 80)], &backends(4))),
    ]);
    let changed = desired(vec![
        (a.clone(), after.plans.get(&a).unwrap().clone()),
        (d.clone(), after.plans.get(&d).unwrap().clone()),
    ]);
    let scope: HashSet<ServiceKey> = ["10.96.0.1", "10.96.0.2", "10.96.0.4"]
        .iter()
        .map(|ip| frontend_key(&fe(ip, 80)))
        .collect();
    let mut scoped = state.clone();
    let ch = diff_scoped(
        &scoped,
        &changed,
        &no_addrs(),
        251,
        &mut ids.clone(),
        &scope,
    );
    assert!(
        !ch.prepare
            .iter()
            .chain(&ch.commit)
            .chain(&ch.cleanup)
            .any(|(_, op)| service_key_of(op)
                .is_some_and(|k| k.addr == frontend_key(&fe("10.96.0.3", 80)).addr)),
        "c untouched"
    );
    apply(&mut scoped, &ch);
    assert_realises(&scoped, &after, &no_addrs(), 251);
    assert!(diff(&scoped, &after, &no_addrs(), 251, &mut Ids::after(&scoped)).is_empty());
}
