//! capstan-proxy: which endpoints a Service uses.
//!
//! Endpoint conditions (ready, serving, terminating) and publishNotReadyAddresses,
//! internalTrafficPolicy Local, topology hints (PreferSameZone, PreferSameNode), several
//! EndpointSlices merged with named target ports resolved per slice, refusal when nothing is
//! usable, endpoint churn under load without a failed request, and 10,000 endpoints (also
//! with maps too small for them).
//!
//! Run as root: `cargo test -p capstan-tests --test proxy_endpoints`.

use anyhow::{Context, Result, ensure};
use capstan_tests::proxy::*;
use capstan_tests::{LoopSummary, wait_until};
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const VIP4: &str = "10.96.1.10";
const VIP6: &str = "fd00:96::1:10";

/// A Service `web` at VIP4/VIP6 (http 80/TCP, dns 53/UDP) with these v4 and v6 endpoints
/// (the closure makes an endpoint of backend `i` in a family).
fn web_with(fx: &ProxyFixture, svc: Service, eps: &[(usize, &dyn Fn(Ep) -> Ep)]) -> Vec<Value> {
    let mut docs = vec![svc.json()];
    for (fam, suffix) in [("IPv4", "v4"), ("IPv6", "v6")] {
        let mut s = Slice::new(&format!("web-{suffix}"), "web", fam)
            .port("http", ECHO_PORT, "TCP")
            .port("dns", ECHO_PORT, "UDP");
        for (i, f) in eps {
            let a: IpAddr = if fam == "IPv4" {
                backend_v4(*i).into()
            } else {
                backend_v6(*i).into()
            };
            s = s.endpoint(f(Ep::ready(a).node(fx.node_name())));
        }
        docs.push(s.json());
    }
    docs
}

fn web_svc() -> Service {
    Service::new("web", &[VIP4, VIP6])
        .port("http", 80, "TCP", ECHO_PORT)
        .port("dns", 53, "UDP", ECHO_PORT)
}

/// Waits until both families and both protocols of `web` are served by exactly `want`.
fn wait_web(fx: &ProxyFixture, want: &[&str]) -> Result<()> {
    for vip in [VIP4, VIP6] {
        fx.wait_backends("tcp", sa(ip(vip), 80), want)?;
        fx.wait_backends("udp", sa(ip(vip), 53), want)?;
    }
    Ok(())
}

/// Waits until every protocol of `web` is refused at once, in both families.
fn wait_web_refused(fx: &ProxyFixture) -> Result<()> {
    for vip in [VIP4, VIP6] {
        for (proto, port) in [("tcp", 80), ("udp", 53), ("udpc", 53)] {
            let r = fx.wait_refused(proto, sa(ip(vip), port))?;
            ensure!(
                r.micros < 500_000,
                "{proto} {vip}: refused, but only after {} us (must be at once): {}",
                r.micros,
                r.raw
            );
        }
    }
    Ok(())
}

fn id(e: Ep) -> Ep {
    e
}
fn not_ready(e: Ep) -> Ep {
    e.not_ready()
}
fn terminating_serving(e: Ep) -> Ep {
    e.conditions(false, true, true)
}
fn terminating_not_serving(e: Ep) -> Ep {
    e.conditions(false, false, true)
}

/// Ready endpoints are used; without any, serving+terminating ones; without those,
/// connections are refused. A ready endpoint wins over terminating ones again.
#[test]
fn ready_serving_terminating() -> Result<()> {
    let fx = ProxyFixture::with_backends(3)?;
    fx.write(
        "web.yaml",
        &web_with(
            &fx,
            web_svc(),
            &[(0, &id), (1, &not_ready), (2, &terminating_serving)],
        ),
    )?;
    wait_web(&fx, &["b0"])?;
    // No ready endpoint: fall back to the serving, terminating one (b2), not to b1.
    fx.write(
        "web.yaml",
        &web_with(
            &fx,
            web_svc(),
            &[(1, &not_ready), (2, &terminating_serving)],
        ),
    )?;
    wait_web(&fx, &["b2"])?;
    // Terminating but no longer serving: nothing usable, refused at once.
    fx.write(
        "web.yaml",
        &web_with(
            &fx,
            web_svc(),
            &[(1, &not_ready), (2, &terminating_not_serving)],
        ),
    )?;
    wait_web_refused(&fx)?;
    // A pod becomes ready.
    fx.write(
        "web.yaml",
        &web_with(&fx, web_svc(), &[(1, &id), (2, &terminating_serving)]),
    )?;
    wait_web(&fx, &["b1"])?;
    // Conditions left out mean ready (the API's defaults).
    let mut docs = web_with(&fx, web_svc(), &[(0, &id), (1, &id)]);
    for d in docs.iter_mut().skip(1) {
        for ep in d["endpoints"].as_array_mut().expect("endpoints") {
            ep.as_object_mut().expect("endpoint").remove("conditions");
        }
    }
    fx.write("web.yaml", &docs)?;
    wait_web(&fx, &["b0", "b1"])?;
    Ok(())
}

/// publishNotReadyAddresses: unready endpoints are served when true, not when false.
#[test]
fn publish_not_ready_addresses() -> Result<()> {
    let fx = ProxyFixture::with_backends(3)?;
    let eps: [(usize, &dyn Fn(Ep) -> Ep); 3] =
        [(0, &id), (1, &not_ready), (2, &terminating_not_serving)];
    fx.write(
        "web.yaml",
        &web_with(&fx, web_svc().publish_not_ready(true), &eps),
    )?;
    wait_web(&fx, &["b0", "b1", "b2"])?;
    fx.write(
        "web.yaml",
        &web_with(&fx, web_svc().publish_not_ready(false), &eps),
    )?;
    wait_web(&fx, &["b0"])?;
    // Only unready endpoints and publishNotReadyAddresses: they serve.
    let eps: [(usize, &dyn Fn(Ep) -> Ep); 1] = [(1, &not_ready)];
    fx.write(
        "web.yaml",
        &web_with(&fx, web_svc().publish_not_ready(true), &eps),
    )?;
    wait_web(&fx, &["b1"])?;
    fx.write(
        "web.yaml",
        &web_with(&fx, web_svc().publish_not_ready(false), &eps),
    )?;
    wait_web_refused(&fx)?;
    Ok(())
}

/// internalTrafficPolicy Local: the ClusterIP uses only this node's endpoints (falling back
/// to local terminating ones, refusing when there is none), while the NodePort (external
/// traffic, policy Cluster) uses all of them.
#[test]
fn internal_traffic_policy_local() -> Result<()> {
    let fx = ProxyFixture::with_backends(3)?;
    let me = fx.node_name().to_string();
    let svc = || {
        Service::new("web", &[VIP4, VIP6])
            .node_port("http", 80, "TCP", ECHO_PORT, 30080)
            .node_port("dns", 53, "UDP", ECHO_PORT, 30053)
            .itp_local()
    };
    let write = |eps: &[(usize, &str, bool)]| -> Result<()> {
        let mut docs = vec![svc().json()];
        for (fam, suffix) in [("IPv4", "v4"), ("IPv6", "v6")] {
            let mut s = Slice::new(&format!("web-{suffix}"), "web", fam)
                .port("http", ECHO_PORT, "TCP")
                .port("dns", ECHO_PORT, "UDP");
            for (i, node, ready) in eps {
                let a: IpAddr = if fam == "IPv4" {
                    backend_v4(*i).into()
                } else {
                    backend_v6(*i).into()
                };
                let ep = Ep::ready(a).node(node);
                s = s.endpoint(if *ready {
                    ep
                } else {
                    ep.conditions(false, true, true)
                });
            }
            docs.push(s.json());
        }
        fx.write("web.yaml", &docs)
    };
    let node4 = sa(fx.node.addr_v4(), 30080);
    let node6 = sa(fx.node.addr_v6(), 30080);

    write(&[
        (0, &me, true),
        (1, "other-node", true),
        (2, "other-node", true),
    ])?;
    wait_web(&fx, &["b0"])?;
    fx.wait_backends("tcp", node4, &["b0", "b1", "b2"])?;
    fx.wait_backends("tcp", node6, &["b0", "b1", "b2"])?;
    fx.wait_backends("udp", sa(fx.node.addr_v4(), 30053), &["b0", "b1", "b2"])?;

    // The local endpoint is terminating (still serving): it is still used for the
    // ClusterIP, although ready remote ones exist.
    write(&[
        (0, &me, false),
        (1, "other-node", true),
        (2, "other-node", true),
    ])?;
    fx.wait_backends("tcp", node4, &["b1", "b2"])?;
    wait_web(&fx, &["b0"])?;

    // No local endpoint at all: the ClusterIP refuses, the NodePort still works.
    write(&[(1, "other-node", true), (2, "other-node", true)])?;
    wait_web_refused(&fx)?;
    fx.wait_backends("tcp", node4, &["b1", "b2"])?;
    Ok(())
}

/// trafficDistribution PreferSameZone: endpoints hinted for this node's zone (from the Node
/// object's topology.kubernetes.io/zone label); all endpoints when hints are incomplete or
/// none matches; follows the Node's label when it changes.
#[test]
fn prefer_same_zone() -> Result<()> {
    let fx = ProxyFixture::with_backends(3)?;
    let me = fx.node_name().to_string();
    let write =
        |dist: Option<&str>, zone: Option<&str>, hints: &[(usize, Option<&str>)]| -> Result<()> {
            let mut svc = web_svc();
            if let Some(d) = dist {
                svc = svc.traffic_distribution(d);
            }
            let mut docs = vec![svc.json(), k8s::node(&me, zone)];
            for (fam, suffix) in [("IPv4", "v4"), ("IPv6", "v6")] {
                let mut s = Slice::new(&format!("web-{suffix}"), "web", fam)
                    .port("http", ECHO_PORT, "TCP")
                    .port("dns", ECHO_PORT, "UDP");
                for (i, hint) in hints {
                    let a: IpAddr = if fam == "IPv4" {
                        backend_v4(*i).into()
                    } else {
                        backend_v6(*i).into()
                    };
                    let mut ep = Ep::ready(a);
                    if let Some(z) = hint {
                        ep = ep.zone_hint(z);
                    }
                    s = s.endpoint(ep);
                }
                docs.push(s.json());
            }
            fx.write("web.yaml", &docs)
        };
    let hints = [
        (0, Some("zone-a")),
        (1, Some("zone-b")),
        (2, Some("zone-a")),
    ];
    write(Some("PreferSameZone"), Some("zone-a"), &hints)?;
    wait_web(&fx, &["b0", "b2"])?;
    // The node moves to zone-b.
    write(Some("PreferSameZone"), Some("zone-b"), &hints)?;
    wait_web(&fx, &["b1"])?;
    // PreferClose is the older name of the same thing.
    write(Some("PreferClose"), Some("zone-a"), &hints)?;
    wait_web(&fx, &["b0", "b2"])?;
    // No endpoint for this zone: all endpoints.
    write(Some("PreferSameZone"), Some("zone-c"), &hints)?;
    wait_web(&fx, &["b0", "b1", "b2"])?;
    // An endpoint without hints: hints are not trusted, all endpoints.
    write(
        Some("PreferSameZone"),
        Some("zone-a"),
        &[(0, Some("zone-a")), (1, Some("zone-b")), (2, None)],
    )?;
    wait_web(&fx, &["b0", "b1", "b2"])?;
    // Without trafficDistribution the hints are ignored.
    write(None, Some("zone-a"), &hints)?;
    wait_web(&fx, &["b0", "b1", "b2"])?;
    Ok(())
}

/// trafficDistribution PreferSameNode: endpoints hinted for this node; else the zone hints;
/// else all.
#[test]
fn prefer_same_node() -> Result<()> {
    let fx = ProxyFixture::with_backends(3)?;
    let me = fx.node_name().to_string();
    let write = |hints: &[(usize, &str, &str)]| -> Result<()> {
        let svc = web_svc().traffic_distribution("PreferSameNode");
        let mut docs = vec![svc.json(), k8s::node(&me, Some("zone-a"))];
        for (fam, suffix) in [("IPv4", "v4"), ("IPv6", "v6")] {
            let mut s = Slice::new(&format!("web-{suffix}"), "web", fam)
                .port("http", ECHO_PORT, "TCP")
                .port("dns", ECHO_PORT, "UDP");
            for (i, node, zone) in hints {
                let a: IpAddr = if fam == "IPv4" {
                    backend_v4(*i).into()
                } else {
                    backend_v6(*i).into()
                };
                s = s.endpoint(Ep::ready(a).node(node).node_hint(node).zone_hint(zone));
            }
            docs.push(s.json());
        }
        fx.write("web.yaml", &docs)
    };
    write(&[
        (0, "other-1", "zone-a"),
        (1, &me, "zone-b"),
        (2, "other-2", "zone-b"),
    ])?;
    wait_web(&fx, &["b1"])?;
    // Nothing on this node: same zone.
    write(&[
        (0, "other-1", "zone-a"),
        (1, "other-3", "zone-b"),
        (2, "other-2", "zone-b"),
    ])?;
    wait_web(&fx, &["b0"])?;
    // Nothing in this zone either: all.
    write(&[
        (0, "other-1", "zone-c"),
        (1, "other-3", "zone-b"),
        (2, "other-2", "zone-b"),
    ])?;
    wait_web(&fx, &["b0", "b1", "b2"])?;
    Ok(())
}

/// Several EndpointSlices of one Service are merged; a named targetPort resolves per slice
/// (the same port name with different numbers); the same endpoint in two slices counts
/// once, ready copy first; a deleted slice's endpoints go away.
#[test]
fn slices_merged_and_named_ports_resolved_per_endpoint() -> Result<()> {
    let mut fx = ProxyFixture::with_backends(3)?;
    // Every backend also listens on 9090 under another name, so the port used is visible.
    for i in 0..3 {
        fx.extra_echo(i, &format!("b{i}-9090"), 9090)?;
    }
    let svc = Service::new("web", &[VIP4])
        .port_named_target("http", 80, "TCP", "web")
        .port_named_target("dns", 53, "UDP", "web-udp");
    let slice = |name: &str, port: u16, i: usize| {
        Slice::new(name, "web", "IPv4")
            .port("http", port, "TCP")
            .port("dns", port, "UDP")
            .endpoint(Ep::ready(backend_v4(i)))
            .json()
    };
    fx.write(
        "web.yaml",
        &[
            svc.json(),
            slice("web-a", ECHO_PORT, 0),
            slice("web-b", 9090, 1),
        ],
    )?;
    fx.write("web-c.yaml", &[slice("web-c", ECHO_PORT, 2)])?;
    let http = sa(ip(VIP4), 80);
    let dns = sa(ip(VIP4), 53);
    let want = ["b0", "b1-9090", "b2"];
    fx.wait_backends("tcp", http, &want)?;
    fx.wait_backends("udp", dns, &want)?;
    fx.expect_spread("tcp", http, 90, &want, true)?;
    fx.expect_spread("udpc", dns, 90, &want, true)?;

    // The slice in the other file goes away.
    fx.remove("web-c.yaml")?;
    fx.wait_backends("tcp", http, &["b0", "b1-9090"])?;
    fx.wait_backends("udp", dns, &["b0", "b1-9090"])?;

    // b2 appears in two slices: unready in one, ready in the other (a slice being
    // replaced): it is used.
    let unready = Slice::new("web-d", "web", "IPv4")
        .port("http", ECHO_PORT, "TCP")
        .endpoint(Ep::ready(backend_v4(2)).not_ready())
        .json();
    let ready = Slice::new("web-e", "web", "IPv4")
        .port("http", ECHO_PORT, "TCP")
        .endpoint(Ep::ready(backend_v4(2)))
        .json();
    fx.write("web-c.yaml", &[unready.clone(), ready])?;
    fx.wait_backends("tcp", http, &["b0", "b1-9090", "b2"])?;
    fx.write("web-c.yaml", &[unready])?;
    fx.wait_backends("tcp", http, &["b0", "b1-9090"])?;
    Ok(())
}

/// No usable endpoint: connect() and sendto() fail at once with ECONNREFUSED (TCP,
/// unconnected and connected UDP, v4 and v6, ClusterIP and NodePort); a Service whose
/// last endpoint goes away starts refusing; endpoints coming back are used again.
#[test]
fn no_endpoints_refused_at_once() -> Result<()> {
    let fx = ProxyFixture::new()?;
    let svc = || {
        Service::new("web", &[VIP4, VIP6])
            .node_port("http", 80, "TCP", ECHO_PORT, 30080)
            .node_port("dns", 53, "UDP", ECHO_PORT, 30053)
    };
    // No slice at all.
    fx.write("web.yaml", &[svc().json()])?;
    wait_web_refused(&fx)?;
    for (proto, port) in [("tcp", 30080), ("udp", 30053), ("udpc", 30053)] {
        for host in [IpAddr::from(fx.node.addr_v4()), fx.node.addr_v6().into()] {
            let r = fx.wait_refused(proto, sa(host, port))?;
            ensure!(r.micros < 500_000, "NodePort refused late: {}", r.raw);
        }
    }
    // The data path counted the refusals.
    let refused = fx
        .metric_value(
            "capstan_datapath_events_total",
            "event=\"refused_no_endpoint\"",
        )?
        .unwrap_or(0.0);
    let mut last = refused;
    wait_until(SETTLE, || {
        last = fx
            .metric_value(
                "capstan_datapath_events_total",
                "event=\"refused_no_endpoint\"",
            )?
            .unwrap_or(0.0);
        Ok(last > 0.0)
    })
    .with_context(|| {
        format!(
            "refused_no_endpoint counter stays {last}\n{}",
            fx.agent_log()
        )
    })?;

    // Endpoints appear.
    let mut docs = vec![svc().json()];
    docs.extend(fx.slices("web", &[("http", "TCP"), ("dns", "UDP")], &[0, 1]));
    fx.write("web.yaml", &docs)?;
    wait_web(&fx, &["b0", "b1"])?;
    // Slices with no endpoints in them.
    let mut docs = vec![svc().json()];
    docs.extend(fx.slices("web", &[("http", "TCP"), ("dns", "UDP")], &[]));
    fx.write("web.yaml", &docs)?;
    wait_web_refused(&fx)?;
    // A loop against a refusing Service fails fast every time.
    let s = fx.run_loop("tcp", sa(ip(VIP4), 80), 200)?;
    ensure!(
        s.fail == 200 && s.errors.get("ECONNREFUSED") == Some(&200) && s.micros < 5_000_000,
        "200 requests to a Service without endpoints must all be refused quickly: {}",
        s.raw
    );
    Ok(())
}

/// An endpoint is replaced (new one added ready, then the old one removed, then its pod
/// stops) twice while clients loop over TCP and UDP: not one request fails, and the removed
/// pods get no traffic after they stopped.
#[test]
fn endpoint_churn_under_load_zero_failures() -> Result<()> {
    let fx = ProxyFixture::with_backends(3)?;
    let write = |eps: &[usize]| {
        fx.write(
            "web.yaml",
            &web_with(
                &fx,
                web_svc(),
                &eps.iter()
                    .map(|i| (*i, &id as &dyn Fn(Ep) -> Ep))
                    .collect::<Vec<_>>(),
            ),
        )
    };
    write(&[0])?;
    wait_web(&fx, &["b0"])?;

    let tcp_probe = fx.topo.probe(fx.client.netns(), true)?;
    let udp_probe = fx.topo.probe(fx.client.netns(), true)?;
    let tcp6_probe = fx.topo.probe(fx.client.netns(), true)?;
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let (tcp, udp, tcp6, steps) = std::thread::scope(|s| {
        let t = s.spawn(|| loop_until_stopped(&tcp_probe, "tcp", sa(ip(VIP4), 80), &stop));
        let u = s.spawn(|| loop_until_stopped(&udp_probe, "udp", sa(ip(VIP4), 53), &stop));
        let t6 = s.spawn(|| loop_until_stopped(&tcp6_probe, "tcp", sa(ip(VIP6), 80), &stop));
        let steps = (|| -> Result<()> {
            std::thread::sleep(Duration::from_millis(300));
            // Replace b0 by b1.
            write(&[0, 1])?;
            wait_web(&fx, &["b0", "b1"])?;
            write(&[1])?;
            wait_web(&fx, &["b1"])?;
            std::thread::sleep(Duration::from_millis(200));
            fx.echoes[0].kill();
            std::thread::sleep(Duration::from_millis(500));
            // Replace b1 by b2.
            write(&[1, 2])?;
            wait_web(&fx, &["b1", "b2"])?;
            write(&[2])?;
            wait_web(&fx, &["b2"])?;
            std::thread::sleep(Duration::from_millis(200));
            fx.echoes[1].kill();
            std::thread::sleep(Duration::from_millis(500));
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        (t.join(), u.join(), t6.join(), steps)
    });
    steps?;
    let took = started.elapsed();
    for (what, r) in [("tcp v4", tcp), ("udp v4", udp), ("tcp v6", tcp6)] {
        let sums = r.map_err(|_| anyhow::anyhow!("{what} loop thread panicked"))??;
        let LoopSummary {
            n,
            fail,
            backends,
            errors,
            ..
        } = merge_summaries(&sums);
        ensure!(
            fail == 0,
            "{what}: {fail} of {n} requests failed during endpoint churn ({errors:?}); \
             backends {backends:?}; took {took:?}\n{}",
            fx.agent_log()
        );
        for b in ["b0", "b1", "b2"] {
            ensure!(
                backends.contains_key(b),
                "{what}: {b} never answered, so the churn did not happen under load: \
                 {backends:?} in {n} requests"
            );
        }
    }
    Ok(())
}

/// A long-lived connected UDP socket (a DNS client's) that sends a request every 100 ms:
/// prints `ok NAME SEEN_IP` or `err ERROR` per request. Like a resolver, it opens a new
/// socket when its socket is torn down (an error other than a timeout).
const CONNECTED_UDP_CLIENT: &str = r#"
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
def connect():
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(0.5)
    s.connect((host, port))
    return s
s = connect()
print("peer", s.getpeername()[0], flush=True)
while True:
    try:
        s.send(b"hi\n")
        print("ok", s.recv(200).decode().strip(), flush=True)
    except socket.timeout:
        print("err timeout", flush=True)
    except OSError as e:
        print("err", type(e).__name__, flush=True)
        s.close()
        s = connect()
    time.sleep(0.1)
"#;

/// A connected UDP socket (DNS clients keep one) whose backend is removed from the Service
/// must move to a remaining backend instead of staying pinned to the
/// deleted one (the kube-proxy replacements' most reported UDP problem).
#[test]
fn connected_udp_socket_leaves_a_deleted_backend() -> Result<()> {
    let fx = ProxyFixture::new()?;
    let write = |eps: &[usize]| {
        fx.write(
            "web.yaml",
            &web_with(
                &fx,
                web_svc(),
                &eps.iter()
                    .map(|i| (*i, &id as &dyn Fn(Ep) -> Ep))
                    .collect::<Vec<_>>(),
            ),
        )
    };
    write(&[0])?;
    wait_web(&fx, &["b0"])?;
    let client = fx.topo.spawn(
        fx.client.netns(),
        true,
        std::process::Command::new("python3").args(["-u", "-c", CONNECTED_UDP_CLIENT, VIP4, "53"]),
    )?;
    client.wait_for_line("ok b0", Duration::from_secs(10))?;
    ensure!(
        client.stdout().lines().next() == Some(&format!("peer {VIP4}")),
        "the connected socket's peer is not the ClusterIP: {}",
        client.log()
    );
    // b0 leaves the Service, b1 joins. b0's pod keeps answering (a terminating pod still
    // serves), so only socket termination can move the client.
    write(&[1])?;
    wait_web(&fx, &["b1"])?;
    let mark = client.stdout().lines().count();
    let moved = wait_until(Duration::from_secs(10), || {
        Ok(client
            .stdout()
            .lines()
            .skip(mark)
            .any(|l| l.starts_with("ok b1")))
    });
    let after: Vec<String> = client
        .stdout()
        .lines()
        .skip(mark)
        .take(20)
        .map(String::from)
        .collect();
    moved.with_context(|| {
        format!(
            "a connected UDP socket stayed pinned to the deleted backend b0 for 10 s after it \
             left the Service; its requests since: {after:?}\n{}",
            fx.agent_log()
        )
    })?;
    Ok(())
}

/// A Service with 10,000 endpoints (one pod answering on all of 10.245.0.0/18) is
/// programmed and serves; the agent stays healthy.
#[test]
fn ten_thousand_endpoints() -> Result<()> {
    let fx = ProxyFixture::with_backends(1)?;
    let bulk = add_bulk_pod(&fx)?;
    let _echo = echo_on(&fx.topo, bulk.netns(), "bulk", ECHO_PORT)?;
    let svc = Service::new("big", &["10.96.1.100"])
        .port("http", 80, "TCP", ECHO_PORT)
        .port("dns", 53, "UDP", ECHO_PORT);
    let mut docs = vec![svc.json()];
    docs.extend(bulk_slices("big", 10_000));
    let started = Instant::now();
    fx.write("big.yaml", &docs)?;
    let vip = sa(ip("10.96.1.100"), 80);
    fx.wait_backends("tcp", vip, &["bulk"])?;
    let programmed = started.elapsed();
    let s = fx.expect_spread("tcp", vip, 300, &["bulk"], true)?;
    ensure!(s.n == 300, "{}", s.raw);
    fx.expect_spread("udp", sa(ip("10.96.1.100"), 53), 100, &["bulk"], true)?;
    let backends = fx.metric_value("capstan_backends", "")?;
    ensure!(
        backends == Some(20_000.0),
        "expected 20000 backends (10000 per port), metrics say {backends:?}"
    );
    ensure!(
        programmed < Duration::from_secs(15),
        "programming 10,000 endpoints took {programmed:?}"
    );
    // Shrinking it again works.
    let mut docs = vec![
        Service::new("big", &["10.96.1.100"])
            .port("http", 80, "TCP", ECHO_PORT)
            .json(),
    ];
    docs.push(
        Slice::new("big-small", "big", "IPv4")
            .port("http", ECHO_PORT, "TCP")
            .endpoint(Ep::ready(backend_v4(0)))
            .json(),
    );
    fx.write("big.yaml", &docs)?;
    fx.wait_backends("tcp", vip, &["b0"])?;
    fx.ensure_agent_alive()
}

/// Maps too small for a 10,000-endpoint Service: the agent reports the full map (log and
/// metric), keeps running, the Service keeps its last complete state, other Services still
/// get programmed, and the Service recovers once it fits again.
#[test]
fn map_exhaustion_is_reported_not_fatal() -> Result<()> {
    let fx = ProxyFixture::with(FixtureOptions {
        backends: 2,
        start_agent: true,
        agent_args: vec!["--bpf-lb-backend-map-max".into(), "256".into()],
    })?;
    let bulk = add_bulk_pod(&fx)?;
    let _echo = echo_on(&fx.topo, bulk.netns(), "bulk", ECHO_PORT)?;
    let big_svc = || Service::new("big", &["10.96.1.100"]).port("http", 80, "TCP", ECHO_PORT);
    let vip = sa(ip("10.96.1.100"), 80);
    let small = |eps: &[usize]| {
        let mut s = Slice::new("big-small", "big", "IPv4").port("http", ECHO_PORT, "TCP");
        for i in eps {
            s = s.endpoint(Ep::ready(backend_v4(*i)));
        }
        s.json()
    };
    fx.write("big.yaml", &[big_svc().json(), small(&[0, 1])])?;
    fx.wait_backends("tcp", vip, &["b0", "b1"])?;

    let mut docs = vec![big_svc().json()];
    docs.extend(bulk_slices("big", 10_000));
    fx.write("big.yaml", &docs)?;
    fx.wait_agent_log("map is full", SETTLE)?;
    let mut full = None;
    wait_until(SETTLE, || {
        full = fx.metric_value("capstan_bpf_map_full_errors_total", "")?;
        Ok(full.is_some_and(|v| v > 0.0))
    })
    .with_context(|| {
        format!(
            "capstan_bpf_map_full_errors_total is {full:?}\n{}",
            fx.agent_log()
        )
    })?;
    fx.ensure_agent_alive()?;
    // The last complete state keeps serving.
    fx.expect_spread("tcp", vip, 60, &["b0", "b1"], true)?;

    // Another Service added now still gets programmed.
    let mut other = vec![
        Service::new("other", &["10.96.1.101"])
            .port("http", 80, "TCP", ECHO_PORT)
            .json(),
    ];
    other.extend(fx.slices("other", &[("http", "TCP")], &[1]));
    fx.write("other.yaml", &other)?;
    // (Checked without stopping the test, so the recovery below is checked as well.)
    let starved = fx
        .wait_backends("tcp", sa(ip("10.96.1.101"), 80), &["b1"])
        .context("a small Service added while another one does not fit was not programmed")
        .err();
    fx.expect_spread("tcp", vip, 30, &["b0", "b1"], true)?;
    let full_lines = fx.agent_stderr().matches("map is full").count();

    // It fits again: applied.
    let mut docs = vec![big_svc().json()];
    docs.extend(bulk_slices("big", 100));
    fx.write("big.yaml", &docs)?;
    fx.wait_backends("tcp", vip, &["bulk"])?;
    fx.wait_backends("tcp", sa(ip("10.96.1.101"), 80), &["b1"])?;
    fx.ensure_agent_alive()?;
    let (code, _, body) = fx.http_get(&format!("http://{HEALTHZ}/healthz"))?;
    ensure!(
        code == 200,
        "healthz after recovering from a full map: {code} {body}"
    );
    let mut problems = Vec::new();
    if let Some(e) = starved {
        problems.push(format!("{e:#}"));
    }
    // One full map is one problem: the log must stay readable.
    if full_lines > 100 {
        problems.push(format!(
            "a full map was reported in {full_lines} log lines (one per refused entry)"
        ));
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n\n"));
    Ok(())
}

/// A pod `bulk` that answers on every address of 10.245.0.0/18 (a local route), reachable
/// from the node.
fn add_bulk_pod(fx: &ProxyFixture) -> Result<capstan_tests::Pod> {
    let bulk = fx.topo.pod(
        &fx.node,
        "bulk",
        Ipv4Addr::new(10, 244, 0, 200),
        "fd00:244::200".parse()?,
    )?;
    fx.topo.ip(
        bulk.netns(),
        &["route", "add", "local", "10.245.0.0/18", "dev", "lo"],
    )?;
    fx.topo.ip(
        fx.node.netns(),
        &["route", "add", "10.245.0.0/18", "dev", bulk.host_veth()],
    )?;
    Ok(bulk)
}

/// `n` endpoints 10.245.0.1… in slices of 1000 (the EndpointSlice controller's maximum).
fn bulk_slices(svc: &str, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let addrs: Vec<Ipv4Addr> = (1..=n as u32)
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + i))
        .collect();
    for (k, chunk) in addrs.chunks(1000).enumerate() {
        let s = Slice::new(&format!("{svc}-bulk-{k}"), svc, "IPv4")
            .port("http", ECHO_PORT, "TCP")
            .port("dns", ECHO_PORT, "UDP")
            .endpoints(chunk.iter().map(Ep::ready));
        out.push(s.json());
    }
    out
}
