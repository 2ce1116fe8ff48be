//! capstan-proxy: the frontends a Service has and what clients see through them.
//!
//! ClusterIP (v4, v6, dual-stack), NodePort (node addresses, addresses added later,
//! localhost), ExternalIPs, LoadBalancer ingress IPs, TCP and UDP on one port number,
//! multiport Services, Maglev, hairpin, and the Services the agent must leave alone
//! (headless, ExternalName, another proxy's).
//!
//! Run as root: `cargo test -p capstan-tests --test proxy_basic`.

use anyhow::{Context, Result, ensure};
use capstan_tests::proxy::k8s::set_path;
use capstan_tests::proxy::*;
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const VIP4: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";

/// A ClusterIP Service, dual-stack, TCP and UDP: every backend is used (random choice), the
/// backend sees the client's own address, and the client sees the ClusterIP (getpeername,
/// recvfrom), for unconnected and connected UDP too.
#[test]
fn clusterip_dual_stack_tcp_udp() -> Result<()> {
    let fx = ProxyFixture::with_backends(3)?;
    fx.write("web.yaml", &fx.web_service("web", VIP4, VIP6, &[0, 1, 2]))?;
    let all = ["b0", "b1", "b2"];
    let cases: [(IpAddr, IpAddr); 2] = [(ip(VIP4), CLIENT_V4.into()), (ip(VIP6), CLIENT_V6.into())];
    for (vip, client) in cases {
        let http = sa(vip, 80);
        let dns = sa(vip, 53);
        fx.wait_backends("tcp", http, &all)?;
        for (proto, addr) in [("tcp", http), ("udp", dns), ("udpc", dns)] {
            let r = fx.request(proto, addr)?;
            fx.check_reply(&r, &all, client, addr)?;
            ensure!(
                r.peer.is_some() || proto == "udp",
                "{proto}: no peer in {}",
                r.raw
            );
            ensure!(
                r.from.is_some() || proto == "tcp",
                "{proto}: no from in {}",
                r.raw
            );
            // Random balancing: 150 requests reach each of 3 backends.
            fx.expect_spread(proto, addr, 150, &all, true)?;
        }
        // An IPv6 socket to the IPv4-mapped ClusterIP is balanced too, and sees the mapped
        // ClusterIP as its peer.
        if let IpAddr::V4(v4) = vip {
            let mapped = IpAddr::from(v4.to_ipv6_mapped());
            for (proto, port) in [("tcp", 80), ("udp", 53), ("udpc", 53)] {
                let addr = sa(mapped, port);
                let r = fx.request(proto, addr)?;
                fx.check_reply(&r, &all, client, addr)
                    .with_context(|| format!("{proto} to the v4-mapped ClusterIP {addr}"))?;
            }
        }
        // A port the Service does not have is not translated: the VIP is then routed like
        // any address and goes nowhere.
        let r = fx.request("tcp", sa(vip, 81))?;
        ensure!(
            !r.ok && is_untranslated_errno(r.errno.as_deref()),
            "port 81 of the ClusterIP must not be translated: {}",
            r.raw
        );
        // The protocol is part of the frontend: UDP to the TCP-only port 80 goes nowhere.
        let r = fx.request("udp", sa(vip, 80))?;
        ensure!(!r.ok, "udp to the tcp-only port 80 answered: {}", r.raw);
    }
    Ok(())
}

/// A single-stack IPv6 Service and an IPv4-only one, each with its own backends.
#[test]
fn clusterip_single_stack_each_family() -> Result<()> {
    let fx = ProxyFixture::new()?;
    let v6 = Service::new("six", &["fd00:96::20"]).port("http", 80, "TCP", ECHO_PORT);
    let v4 = Service::new("four", &["10.96.0.20"]).port("http", 80, "TCP", ECHO_PORT);
    let mut docs = vec![v6.json(), v4.json()];
    docs.extend(fx.slices("six", &[("http", "TCP")], &[1]));
    docs.extend(fx.slices("four", &[("http", "TCP")], &[0]));
    fx.write("svc.yaml", &docs)?;
    let six = sa(ip("fd00:96::20"), 80);
    let four = sa(ip("10.96.0.20"), 80);
    fx.wait_backends("tcp", six, &["b1"])?;
    fx.wait_backends("tcp", four, &["b0"])?;
    fx.check_reply(&fx.request("tcp", six)?, &["b1"], CLIENT_V6.into(), six)?;
    fx.check_reply(&fx.request("tcp", four)?, &["b0"], CLIENT_V4.into(), four)?;
    Ok(())
}

/// NodePort: answers on the node's addresses (v4 and v6) for pods, on addresses added to
/// the node later, and on localhost only for clients in the node's own network namespace
/// (a pod's 127.0.0.1 is its own).
#[test]
fn nodeport_on_node_addresses_and_localhost() -> Result<()> {
    let mut fx = ProxyFixture::new()?;
    let svc = Service::new("np", &["10.96.0.30", "fd00:96::30"])
        .node_port("http", 80, "TCP", ECHO_PORT, 30080)
        .node_port("dns", 53, "UDP", ECHO_PORT, 30053);
    let mut docs = vec![svc.json()];
    docs.extend(fx.slices("np", &[("http", "TCP"), ("dns", "UDP")], &[0, 1]));
    fx.write("np.yaml", &docs)?;
    let all = ["b0", "b1"];
    let node4: IpAddr = fx.node.addr_v4().into();
    let node6: IpAddr = fx.node.addr_v6().into();

    // From a pod, to the node's addresses.
    for (node_ip, client) in [(node4, IpAddr::from(CLIENT_V4)), (node6, CLIENT_V6.into())] {
        fx.wait_backends("tcp", sa(node_ip, 30080), &all)?;
        for (proto, port) in [("tcp", 30080), ("udp", 30053), ("udpc", 30053)] {
            let addr = sa(node_ip, port);
            fx.check_reply(&fx.request(proto, addr)?, &all, client, addr)?;
            fx.expect_spread(proto, addr, 60, &all, true)?;
        }
    }
    // The ClusterIP of a NodePort Service works as well.
    fx.expect_spread("tcp", sa(ip("10.96.0.30"), 80), 40, &all, true)?;

    // From the node itself (a host-network client in the cgroup): localhost NodePorts.
    let host = fx.topo.probe(fx.node.netns(), true)?;
    for lo in [
        IpAddr::from(Ipv4Addr::LOCALHOST),
        Ipv6Addr::LOCALHOST.into(),
    ] {
        for (proto, port) in [("tcp", 30080), ("udp", 30053)] {
            let addr = sa(lo, port);
            let r = fx.request_with(&host, proto, addr)?;
            ensure!(
                r.ok && r.backend.as_deref().is_some_and(|b| all.contains(&b)),
                "{proto} {addr} from the node must reach a backend: {}\n{}",
                r.raw,
                fx.agent_log()
            );
            if let Some(p) = r.peer_addr().or(r.from_addr()) {
                ensure!(
                    p == addr,
                    "the node client saw {p}, expected {addr}: {}",
                    r.raw
                );
            }
        }
        let s = fx.loop_with(&host, "tcp", sa(lo, 30080), 40)?;
        ensure!(s.fail == 0 && s.backends.len() == 2, "{}", s.raw);
    }
    // ... and the node's own addresses from the node.
    let s = fx.loop_with(&host, "tcp", sa(node4, 30080), 20)?;
    ensure!(
        s.fail == 0 && s.backends.len() <= 2 && s.n == 20,
        "{}",
        s.raw
    );

    // From a pod, localhost is the pod's own: a server on the pod's 127.0.0.1:30080 answers,
    // not a backend.
    fx.echoes.push(fx.topo.spawn_echo(
        fx.client.netns(),
        false,
        "pod-lo",
        &[
            sa(Ipv4Addr::LOCALHOST, 30080),
            sa(Ipv6Addr::LOCALHOST, 30080),
        ],
        &[],
    )?);
    for lo in [
        IpAddr::from(Ipv4Addr::LOCALHOST),
        Ipv6Addr::LOCALHOST.into(),
    ] {
        let r = fx.request("tcp", sa(lo, 30080))?;
        ensure!(
            r.ok && r.backend.as_deref() == Some("pod-lo"),
            "a pod's localhost:30080 must stay the pod's own (expected pod-lo): {}\n{}",
            r.raw,
            fx.agent_log()
        );
    }

    // An address added to the node after the agent started carries NodePorts too.
    let extra4 = "10.200.0.99";
    let extra6 = "fd00:200::99";
    fx.topo.ip(
        fx.node.netns(),
        &["addr", "add", &format!("{extra4}/32"), "dev", "lo"],
    )?;
    fx.topo.ip(
        fx.node.netns(),
        &[
            "-6",
            "addr",
            "add",
            &format!("{extra6}/128"),
            "dev",
            "lo",
            "nodad",
        ],
    )?;
    for a in [extra4, extra6] {
        fx.wait_backends("tcp", sa(ip(a), 30080), &all)
            .context("NodePort on a node address added later")?;
        fx.expect_spread("udp", sa(ip(a), 30053), 30, &all, true)?;
    }
    // ... and stops when the address goes away again.
    fx.topo.ip(
        fx.node.netns(),
        &["addr", "del", &format!("{extra4}/32"), "dev", "lo"],
    )?;
    fx.wait_untranslated(sa(ip(extra4), 30080))
        .context("NodePort on a removed node address")?;
    fx.ensure_agent_alive()
}

/// ExternalIPs (not assigned to any node) and LoadBalancer ingress IPs are translated for
/// clients in the cluster; an ingress with ipMode Proxy is left to the load balancer.
#[test]
fn external_ips_and_load_balancer_ingress() -> Result<()> {
    let fx = ProxyFixture::new()?;
    let mut svc = Service::new("lb", &["10.96.0.40", "fd00:96::40"])
        .external_ips(&["203.0.113.10", "2001:db8::10"])
        .node_port("http", 80, "TCP", ECHO_PORT, 30081)
        .port("dns", 53, "UDP", ECHO_PORT)
        .lb_ingress(&["198.51.100.10", "2001:db8:1::10", "198.51.100.11"])
        .json();
    set_path(
        &mut svc,
        "status/loadBalancer/ingress/2/ipMode",
        json!("Proxy"),
    );
    let mut docs = vec![svc];
    docs.extend(fx.slices("lb", &[("http", "TCP"), ("dns", "UDP")], &[0, 1]));
    fx.write("lb.yaml", &docs)?;
    let all = ["b0", "b1"];
    for (vip, client) in [
        ("203.0.113.10", IpAddr::from(CLIENT_V4)),
        ("2001:db8::10", CLIENT_V6.into()),
        ("198.51.100.10", CLIENT_V4.into()),
        ("2001:db8:1::10", CLIENT_V6.into()),
    ] {
        let http = sa(ip(vip), 80);
        let dns = sa(ip(vip), 53);
        fx.wait_backends("tcp", http, &all)
            .with_context(|| format!("frontend {vip}"))?;
        fx.check_reply(&fx.request("tcp", http)?, &all, client, http)?;
        fx.check_reply(&fx.request("udp", dns)?, &all, client, dns)?;
        fx.check_reply(&fx.request("udpc", dns)?, &all, client, dns)?;
        fx.expect_spread("udp", dns, 40, &all, true)?;
    }
    // The NodePort of the LoadBalancer.
    fx.expect_spread("tcp", sa(fx.node.addr_v4(), 30081), 40, &all, true)?;
    // ipMode: Proxy — the node must send the traffic to the load balancer, not short-cut it.
    let r = fx.request("tcp", sa(ip("198.51.100.11"), 80))?;
    ensure!(
        !r.ok && is_untranslated_errno(r.errno.as_deref()),
        "an ipMode Proxy ingress IP must not be translated: {}\n{}",
        r.raw,
        fx.agent_log()
    );
    Ok(())
}

/// The same port number with TCP and UDP, on the ClusterIP and on the NodePort, each
/// protocol with its own endpoints.
#[test]
fn tcp_and_udp_on_the_same_port() -> Result<()> {
    let fx = ProxyFixture::new()?;
    let svc = Service::new("dns", &["10.96.0.53", "fd00:96::53"])
        .node_port("dns-tcp", 53, "TCP", ECHO_PORT, 30053)
        .node_port("dns-udp", 53, "UDP", ECHO_PORT, 30053);
    let mut docs = vec![svc.json()];
    // TCP endpoints only on b0, UDP endpoints only on b1.
    for (fam, a0, a1) in [
        (
            "IPv4",
            IpAddr::from(backend_v4(0)),
            IpAddr::from(backend_v4(1)),
        ),
        ("IPv6", backend_v6(0).into(), backend_v6(1).into()),
    ] {
        docs.push(
            Slice::new(&format!("dns-tcp-{fam}").to_lowercase(), "dns", fam)
                .port("dns-tcp", ECHO_PORT, "TCP")
                .endpoint(Ep::ready(a0))
                .json(),
        );
        docs.push(
            Slice::new(&format!("dns-udp-{fam}").to_lowercase(), "dns", fam)
                .port("dns-udp", ECHO_PORT, "UDP")
                .endpoint(Ep::ready(a1))
                .json(),
        );
    }
    fx.write("dns.yaml", &docs)?;
    for host in [
        ip("10.96.0.53"),
        ip("fd00:96::53"),
        fx.node.addr_v4().into(),
        fx.node.addr_v6().into(),
    ] {
        let port = if host.to_string().starts_with("10.96") || host.to_string().contains(":96:") {
            53
        } else {
            30053
        };
        let a = sa(host, port);
        fx.wait_backends("tcp", a, &["b0"])?;
        fx.wait_backends("udp", a, &["b1"])?;
        fx.expect_spread("tcp", a, 30, &["b0"], true)?;
        fx.expect_spread("udp", a, 30, &["b1"], true)?;
        fx.expect_spread("udpc", a, 30, &["b1"], true)?;
    }
    Ok(())
}

/// A Service with several ports, each going to its own target port.
#[test]
fn multiport_service() -> Result<()> {
    let mut fx = ProxyFixture::new()?;
    fx.extra_echo(0, "b0-9090", 9090)?;
    fx.extra_echo(1, "b1-9090", 9090)?;
    let svc = Service::new("multi", &["10.96.0.60", "fd00:96::60"])
        .port("http", 80, "TCP", ECHO_PORT)
        .port("alt", 81, "TCP", 9090)
        .port("alt-udp", 81, "UDP", 9090);
    let mut docs = vec![svc.json()];
    for (fam, suffix) in [("IPv4", "v4"), ("IPv6", "v6")] {
        let mut s = Slice::new(&format!("multi-{suffix}"), "multi", fam)
            .port("http", ECHO_PORT, "TCP")
            .port("alt", 9090, "TCP")
            .port("alt-udp", 9090, "UDP");
        for i in 0..2 {
            let a: IpAddr = if fam == "IPv4" {
                backend_v4(i).into()
            } else {
                backend_v6(i).into()
            };
            s = s.endpoint(Ep::ready(a));
        }
        docs.push(s.json());
    }
    fx.write("multi.yaml", &docs)?;
    for vip in [ip("10.96.0.60"), ip("fd00:96::60")] {
        fx.wait_backends("tcp", sa(vip, 81), &["b0-9090", "b1-9090"])?;
        fx.expect_spread("tcp", sa(vip, 80), 40, &["b0", "b1"], true)?;
        fx.expect_spread("tcp", sa(vip, 81), 40, &["b0-9090", "b1-9090"], true)?;
        fx.expect_spread("udp", sa(vip, 81), 40, &["b0-9090", "b1-9090"], true)?;
    }
    Ok(())
}

/// Maglev by annotation (and as the agent's default with --lb-algorithm maglev): every
/// backend is used, a Maglev table is programmed per Service port, and switching back to
/// random removes it.
#[test]
fn maglev_by_annotation_and_by_flag() -> Result<()> {
    let mut fx = ProxyFixture::with_backends(3)?;
    let all = ["b0", "b1", "b2"];
    let vip = sa(ip("10.96.0.70"), 80);
    let svc = |algo: Option<&str>| {
        let s = Service::new("mg", &["10.96.0.70"]).port("http", 80, "TCP", ECHO_PORT);
        match algo {
            Some(a) => s.annotate("service.capstan.io/lb-algorithm", a),
            None => s,
        }
    };
    let write = |fx: &ProxyFixture, algo: Option<&str>| -> Result<()> {
        let mut docs = vec![svc(algo).json()];
        docs.push(fx.slices("mg", &[("http", "TCP")], &[0, 1, 2])[0].clone());
        fx.write("mg.yaml", &docs)
    };
    let tables = |fx: &ProxyFixture| -> Result<f64> {
        Ok(fx
            .metric_value("capstan_bpf_map_entries", "map=\"CS_MAGLEV_V1\"")?
            .unwrap_or(0.0))
    };
    let wait_tables = |fx: &ProxyFixture, n: f64| -> Result<()> {
        let mut last = -1.0;
        capstan_tests::wait_until(SETTLE, || {
            last = tables(fx)?;
            Ok(last == n)
        })
        .with_context(|| {
            format!(
                "expected {n} Maglev tables, metrics say {last}\n{}",
                fx.agent_log()
            )
        })
    };

    write(&fx, Some("maglev"))?;
    fx.wait_backends("tcp", vip, &all)?;
    wait_tables(&fx, 1.0)?;
    fx.expect_spread("tcp", vip, 150, &all, true)?;

    write(&fx, None)?;
    wait_tables(&fx, 0.0)?;
    fx.expect_spread("tcp", vip, 150, &all, true)?;

    // The agent's default algorithm.
    fx.stop_agent()?;
    fx.start_agent_with(&["--lb-algorithm".into(), "maglev".into()])?;
    wait_tables(&fx, 1.0)?;
    fx.expect_spread("tcp", vip, 150, &all, true)?;
    // The annotation overrides the default.
    write(&fx, Some("random"))?;
    wait_tables(&fx, 0.0)?;
    fx.expect_spread("tcp", vip, 150, &all, true)?;
    // An unknown algorithm makes the Service invalid: the file is rejected and the last
    // good content keeps serving.
    write(&fx, Some("round-robin"))?;
    fx.wait_agent_log("round-robin", SETTLE)?;
    fx.expect_spread("tcp", vip, 60, &all, true)?;
    fx.ensure_agent_alive()
}

/// A pod reaches itself through its own Service (hairpin), and sees its own address.
#[test]
fn hairpin_pod_reaches_itself_through_its_service() -> Result<()> {
    let fx = ProxyFixture::new()?;
    fx.write(
        "self.yaml",
        &fx.web_service("self", "10.96.0.80", "fd00:96::80", &[0]),
    )?;
    let inside = fx.topo.probe(fx.backends[0].netns(), true)?;
    for (vip, me) in [
        (ip("10.96.0.80"), IpAddr::from(backend_v4(0))),
        (ip("fd00:96::80"), backend_v6(0).into()),
    ] {
        fx.wait_backends_with(&inside, "tcp", sa(vip, 80), &["b0"])?;
        for (proto, port) in [("tcp", 80), ("udp", 53), ("udpc", 53)] {
            let a = sa(vip, port);
            let r = fx.request_with(&inside, proto, a)?;
            fx.check_reply(&r, &["b0"], me, a)?;
        }
    }
    Ok(())
}

/// Services capstan must not proxy: headless, ExternalName (even with a clusterIP left in
/// the spec), labelled for another proxy; and slices labelled headless. With
/// --service-proxy-name the agent takes exactly the Services labelled with its name.
#[test]
fn services_that_are_not_proxied() -> Result<()> {
    let mut fx = ProxyFixture::new()?;
    // A normal Service whose second slice is labelled headless: that slice is ignored.
    let mut docs = vec![
        Service::new("normal", &["10.96.0.90"])
            .port("http", 80, "TCP", ECHO_PORT)
            .json(),
        Slice::new("normal-a", "normal", "IPv4")
            .port("http", ECHO_PORT, "TCP")
            .endpoint(Ep::ready(backend_v4(0)))
            .json(),
        Slice::new("normal-b", "normal", "IPv4")
            .port("http", ECHO_PORT, "TCP")
            .endpoint(Ep::ready(backend_v4(1)))
            .label("service.kubernetes.io/headless", "")
            .json(),
    ];
    // Headless.
    docs.push(
        Service::new("headless", &["None"])
            .port("http", 80, "TCP", ECHO_PORT)
            .json(),
    );
    docs.extend(fx.slices("headless", &[("http", "TCP")], &[0, 1]));
    // ExternalName with a stale clusterIP.
    docs.push(
        Service::new("extname", &["10.96.0.91"])
            .port("http", 80, "TCP", ECHO_PORT)
            .external_name("example.com")
            .json(),
    );
    docs.extend(fx.slices("extname", &[("http", "TCP")], &[0, 1]));
    // Another proxy's Services.
    for (name, vip, proxy) in [
        ("other", "10.96.0.92", "other"),
        ("third", "10.96.0.93", "third"),
    ] {
        docs.push(
            Service::new(name, &[vip])
                .port("http", 80, "TCP", ECHO_PORT)
                .label("service.kubernetes.io/service-proxy-name", proxy)
                .json(),
        );
        docs.extend(fx.slices(name, &[("http", "TCP")], &[0, 1]));
    }
    fx.write("svc.yaml", &docs)?;

    fx.wait_backends("tcp", sa(ip("10.96.0.90"), 80), &["b0"])?;
    fx.expect_spread("tcp", sa(ip("10.96.0.90"), 80), 40, &["b0"], true)?;
    for vip in ["10.96.0.91", "10.96.0.92", "10.96.0.93"] {
        let r = fx.request("tcp", sa(ip(vip), 80))?;
        ensure!(
            !r.ok && is_untranslated_errno(r.errno.as_deref()),
            "{vip} must not be proxied: {}\n{}",
            r.raw,
            fx.agent_log()
        );
    }
    // Only the one port of "normal" is programmed: the headless Service has no frontend.
    let frontends = fx.metric_value("capstan_frontends", "")?;
    ensure!(
        frontends == Some(1.0),
        "expected exactly 1 frontend (normal:80), metrics say {frontends:?}\n{}",
        fx.agent_log()
    );

    // An agent named "other" takes the Services labelled "other" (and the unlabelled ones).
    fx.stop_agent()?;
    fx.start_agent_with(&["--service-proxy-name".into(), "other".into()])?;
    fx.wait_backends("tcp", sa(ip("10.96.0.92"), 80), &["b0", "b1"])?;
    fx.wait_backends("tcp", sa(ip("10.96.0.90"), 80), &["b0"])?;
    fx.wait_untranslated(sa(ip("10.96.0.93"), 80))?;
    fx.wait_untranslated(sa(ip("10.96.0.91"), 80))?;
    Ok(())
}
