//! capstan-proxy: changes to the manifests while clients use the Services.
//!
//! Ports changed, added and removed; Services added, deleted (also a whole collection) and
//! recreated; type changes ExternalName ↔ ClusterIP ↔ NodePort; session affinity switched
//! on and off, and its timeout; bad input (malformed YAML, invalid IP, port 70000,
//! duplicate objects across files) that must leave the last good state serving.
//!
//! Run as root: `cargo test -p capstan-tests --test proxy_changes`.

use anyhow::{Context, Result, bail, ensure};
use capstan_tests::proxy::*;
use capstan_tests::{Probe, wait_until};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

/// A Service with ports http 80/TCP and dns 53/UDP at `vip`, slices for `backends`.
fn svc_docs(
    fx: &ProxyFixture,
    name: &str,
    vip: &str,
    backends: &[usize],
) -> Vec<serde_json::Value> {
    let fam = if vip.contains(':') { "IPv6" } else { "IPv4" };
    let mut docs = vec![
        Service::new(name, &[vip])
            .port("http", 80, "TCP", ECHO_PORT)
            .port("dns", 53, "UDP", ECHO_PORT)
            .json(),
    ];
    let slices = fx.slices(name, &[("http", "TCP"), ("dns", "UDP")], backends);
    docs.extend(slices.into_iter().filter(|s| s["addressType"] == fam));
    docs
}

/// Checks that `addr` (TCP) goes nowhere: not translated, no backend answers.
fn ensure_untranslated(fx: &ProxyFixture, addr: SocketAddr) -> Result<()> {
    let r = fx.request("tcp", addr)?;
    ensure!(
        !r.ok && is_untranslated_errno(r.errno.as_deref()),
        "{addr} must not be translated any more: {}\n{}",
        r.raw,
        fx.agent_log()
    );
    Ok(())
}

/// Service ports changed, added and removed (and a target port changed) are applied; the
/// old port stops being translated.
#[test]
fn service_ports_changed_added_removed() -> Result<()> {
    let mut fx = ProxyFixture::new()?;
    fx.extra_echo(0, "b0-9090", 9090)?;
    fx.extra_echo(1, "b1-9090", 9090)?;
    let vip = ip("10.96.2.10");
    let write = |ports: &[(&str, u16, &str, u16)]| -> Result<()> {
        let mut svc = Service::new("web", &["10.96.2.10"]);
        let mut slice = Slice::new("web-v4", "web", "IPv4");
        for (name, port, proto, target) in ports {
            svc = svc.port(name, *port, proto, *target);
            slice = slice.port(name, *target, proto);
        }
        slice = slice
            .endpoint(Ep::ready(backend_v4(0)))
            .endpoint(Ep::ready(backend_v4(1)));
        fx.write("web.yaml", &[svc.json(), slice.json()])
    };
    write(&[
        ("http", 80, "TCP", ECHO_PORT),
        ("dns", 53, "UDP", ECHO_PORT),
    ])?;
    fx.wait_backends("tcp", sa(vip, 80), &["b0", "b1"])?;
    fx.wait_backends("udp", sa(vip, 53), &["b0", "b1"])?;

    // Port 80 becomes 8081.
    write(&[
        ("http", 8081, "TCP", ECHO_PORT),
        ("dns", 53, "UDP", ECHO_PORT),
    ])?;
    fx.wait_backends("tcp", sa(vip, 8081), &["b0", "b1"])?;
    fx.wait_untranslated(sa(vip, 80))?;
    fx.expect_spread("udp", sa(vip, 53), 30, &["b0", "b1"], true)?;

    // A port is added.
    write(&[
        ("http", 8081, "TCP", ECHO_PORT),
        ("dns", 53, "UDP", ECHO_PORT),
        ("alt", 81, "TCP", 9090),
    ])?;
    fx.wait_backends("tcp", sa(vip, 81), &["b0-9090", "b1-9090"])?;
    fx.expect_spread("tcp", sa(vip, 8081), 30, &["b0", "b1"], true)?;

    // The target port of http changes.
    write(&[
        ("http", 8081, "TCP", 9090),
        ("dns", 53, "UDP", ECHO_PORT),
        ("alt", 81, "TCP", 9090),
    ])?;
    fx.wait_backends("tcp", sa(vip, 8081), &["b0-9090", "b1-9090"])?;

    // Ports are removed.
    write(&[("dns", 53, "UDP", ECHO_PORT)])?;
    fx.wait_untranslated(sa(vip, 81))?;
    fx.wait_untranslated(sa(vip, 8081))?;
    fx.expect_spread("udp", sa(vip, 53), 30, &["b0", "b1"], true)?;
    Ok(())
}

/// Services come and go: a new file is picked up, a deleted Service stops answering at
/// once (no backend is reached; the address is then routed like any other), a whole
/// collection of Services is deleted with its file, and recreated Services work again.
#[test]
fn services_added_deleted_recreated() -> Result<()> {
    let fx = ProxyFixture::new()?;
    fx.write("a.yaml", &svc_docs(&fx, "a", "10.96.2.20", &[0]))?;
    let a = sa(ip("10.96.2.20"), 80);
    fx.wait_backends("tcp", a, &["b0"])?;

    // A collection of three Services in one file, v4 and v6.
    let collection = |fx: &ProxyFixture| -> Vec<serde_json::Value> {
        let mut docs = svc_docs(fx, "c1", "10.96.2.21", &[1]);
        docs.extend(svc_docs(fx, "c2", "fd00:96::2:22", &[0, 1]));
        docs.extend(svc_docs(fx, "c3", "10.96.2.23", &[0]));
        docs
    };
    let members = [
        (sa(ip("10.96.2.21"), 80), vec!["b1"]),
        (sa(ip("fd00:96::2:22"), 80), vec!["b0", "b1"]),
        (sa(ip("10.96.2.23"), 80), vec!["b0"]),
    ];
    fx.write("collection.yaml", &collection(&fx))?;
    for (addr, want) in &members {
        fx.wait_backends("tcp", *addr, want)?;
    }

    // Delete the collection.
    fx.remove("collection.yaml")?;
    for (addr, _) in &members {
        fx.wait_untranslated(*addr)?;
        // UDP to a deleted Service gets no answer from a backend either.
        let r = fx.request("udp", sa(addr.ip(), 53))?;
        ensure!(!r.ok, "udp to deleted Service {addr} answered: {}", r.raw);
    }
    fx.expect_spread("tcp", a, 20, &["b0"], true)?;

    // Recreate it.
    fx.write("collection.yaml", &collection(&fx))?;
    for (addr, want) in &members {
        fx.wait_backends("tcp", *addr, want)?;
    }

    // Delete a single Service (its file) and recreate it with other endpoints.
    fx.remove("a.yaml")?;
    let r = fx.wait_untranslated(a)?;
    ensure!(r.backend.is_none(), "{}", r.raw);
    fx.write("a.yaml", &svc_docs(&fx, "a", "10.96.2.20", &[1]))?;
    fx.wait_backends("tcp", a, &["b1"])?;
    fx.wait_backends("udp", sa(ip("10.96.2.20"), 53), &["b1"])?;
    Ok(())
}

/// A deleted Service's ClusterIP is refused at once, for TCP and UDP, like a Service
/// without endpoints (kube-proxy's nftables mode rejects unallocated ClusterIPs) — not
/// routed off the node, where it goes nowhere (here ENETUNREACH; in a real network a
/// connect timeout).
#[test]
fn deleted_service_is_refused_at_once() -> Result<()> {
    // With the Service CIDR known, an address in it that no Service serves is refused.
    let fx = ProxyFixture::with(FixtureOptions {
        agent_args: vec![
            "--service-cluster-ip-range".into(),
            "10.96.2.0/24,fd00:96::2:0/112".into(),
        ],
        ..Default::default()
    })?;
    fx.write("gone.yaml", &svc_docs(&fx, "gone", "10.96.2.110", &[0, 1]))?;
    fx.write("stays.yaml", &svc_docs(&fx, "stays", "10.96.2.111", &[0]))?;
    let vip = sa(ip("10.96.2.110"), 80);
    fx.wait_backends("tcp", vip, &["b0", "b1"])?;
    fx.wait_backends("tcp", sa(ip("10.96.2.111"), 80), &["b0"])?;
    fx.remove("gone.yaml")?;
    let mut last = None;
    let r = wait_until(SETTLE, || {
        let r = fx.request("tcp", vip)?;
        let done = !r.ok;
        last = Some(r);
        Ok(done)
    });
    r.with_context(|| format!("the deleted Service still answers: {last:?}"))?;
    let mut problems = Vec::new();
    for (proto, port) in [("tcp", 80), ("udp", 53), ("udpc", 53)] {
        let r = fx.request(proto, sa(ip("10.96.2.110"), port))?;
        if r.errno.as_deref() != Some("ECONNREFUSED") || r.micros > 500_000 {
            problems.push(format!("{proto}: {}", r.raw));
        }
    }
    ensure!(
        problems.is_empty(),
        "requests to the deleted Service's ClusterIP must be refused at once, got: {problems:?}"
    );
    fx.expect_spread("tcp", sa(ip("10.96.2.111"), 80), 20, &["b0"], true)?;
    Ok(())
}

/// type changes: ExternalName → ClusterIP → ExternalName → NodePort → ClusterIP →
/// NodePort → ExternalName; proxying (ClusterIP and NodePort) starts and stops with them.
#[test]
fn type_changes_externalname_clusterip_nodeport() -> Result<()> {
    let mut fx = ProxyFixture::new()?;
    // A server on the node's own port 30080 shows when the NodePort is not translated.
    fx.echoes
        .push(echo_on(&fx.topo, fx.node.netns(), "node-itself", 30080)?);
    let vip = sa(ip("10.96.2.30"), 80);
    let np = sa(fx.node.addr_v4(), 30080);
    let np6 = sa(fx.node.addr_v6(), 30080);
    let write = |kind: &str| -> Result<()> {
        let base = Service::new("chameleon", &["10.96.2.30", "fd00:96::2:30"]);
        let svc = match kind {
            "ExternalName" => base
                .port("http", 80, "TCP", ECHO_PORT)
                .external_name("backend.example.com"),
            "ClusterIP" => base.port("http", 80, "TCP", ECHO_PORT),
            "NodePort" => base.node_port("http", 80, "TCP", ECHO_PORT, 30080),
            other => bail!("unknown type {other}"),
        };
        let mut docs = vec![svc.json()];
        docs.extend(fx.slices("chameleon", &[("http", "TCP")], &[0, 1]));
        fx.write("svc.yaml", &docs)
    };
    let all = ["b0", "b1"];
    let node_itself = |fx: &ProxyFixture, addr: SocketAddr| -> Result<()> {
        fx.wait_backends("tcp", addr, &["node-itself"])
            .with_context(|| format!("{addr} must reach the node's own server (no NodePort)"))
    };

    write("ExternalName")?;
    fx.wait_agent_log("manifest loaded", SETTLE)?;
    std::thread::sleep(Duration::from_millis(300));
    ensure_untranslated(&fx, vip)?;
    node_itself(&fx, np)?;

    write("ClusterIP")?;
    fx.wait_backends("tcp", vip, &all)?;
    node_itself(&fx, np)?;

    write("ExternalName")?;
    fx.wait_untranslated(vip)?;

    write("NodePort")?;
    fx.wait_backends("tcp", np, &all)?;
    fx.wait_backends("tcp", np6, &all)?;
    fx.wait_backends("tcp", vip, &all)?;

    write("ClusterIP")?;
    node_itself(&fx, np)?;
    fx.expect_spread("tcp", vip, 20, &all, true)?;

    write("NodePort")?;
    fx.wait_backends("tcp", np, &all)?;

    write("ExternalName")?;
    node_itself(&fx, np)?;
    fx.wait_untranslated(vip)?;
    fx.wait_untranslated(sa(ip("fd00:96::2:30"), 80))?;
    fx.ensure_agent_alive()
}

/// A second client pod (its own network namespace) with a probe in the cgroup.
fn second_client(fx: &ProxyFixture, name: &str, n: u8) -> Result<(capstan_tests::Pod, Probe)> {
    let pod = fx.topo.pod(
        &fx.node,
        name,
        std::net::Ipv4Addr::new(10, 244, 0, n),
        std::net::Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, n as u16),
    )?;
    let probe = fx.topo.probe(pod.netns(), true)?;
    Ok((pod, probe))
}

/// The backends `n` requests from `p` reached, if all succeeded (for waits).
fn backends_if_ok(
    p: &Probe,
    proto: &str,
    addr: SocketAddr,
    n: u64,
) -> Result<Option<BTreeSet<String>>> {
    let s = p.loop_proto(proto, addr, n)?;
    Ok((s.fail == 0).then(|| s.backends.keys().cloned().collect()))
}

/// The backends `n` requests from `p` reached (all must succeed).
fn backends_of(
    fx: &ProxyFixture,
    p: &Probe,
    proto: &str,
    addr: SocketAddr,
    n: u64,
) -> Result<BTreeSet<String>> {
    let s = fx.loop_with(p, proto, addr, n)?;
    ensure!(s.fail == 0, "{proto} {addr}: {}\n{}", s.raw, fx.agent_log());
    Ok(s.backends.keys().cloned().collect())
}

/// sessionAffinity ClientIP: every connection of a client (a network namespace) goes to
/// one backend, for TCP and UDP, v4 and v6, ClusterIP and NodePort; switched off, the
/// clients spread again; switched on again, they stick again.
#[test]
fn session_affinity_on_then_off() -> Result<()> {
    let fx = ProxyFixture::with_backends(3)?;
    let (_pod2, probe2) = second_client(&fx, "client2", 3)?;
    let write = |on: bool| -> Result<()> {
        let svc = Service::new("sticky", &["10.96.2.40", "fd00:96::2:40"])
            .node_port("http", 80, "TCP", ECHO_PORT, 30080)
            .node_port("dns", 53, "UDP", ECHO_PORT, 30053)
            .affinity(on, None);
        let mut docs = vec![svc.json()];
        docs.extend(fx.slices("sticky", &[("http", "TCP"), ("dns", "UDP")], &[0, 1, 2]));
        fx.write("sticky.yaml", &docs)
    };
    let frontends = [
        ("tcp", sa(ip("10.96.2.40"), 80)),
        ("udp", sa(ip("10.96.2.40"), 53)),
        ("udpc", sa(ip("10.96.2.40"), 53)),
        ("tcp", sa(ip("fd00:96::2:40"), 80)),
        ("udp", sa(ip("fd00:96::2:40"), 53)),
        ("tcp", sa(fx.node.addr_v4(), 30080)),
        ("udp", sa(fx.node.addr_v6(), 30053)),
    ];
    let clients = [&fx.probe, &probe2];
    let wait_sticky = |what: &str| -> Result<()> {
        for (proto, addr) in frontends {
            for p in clients {
                let mut last = BTreeSet::new();
                wait_until(SETTLE, || {
                    last = backends_if_ok(p, proto, addr, 30)?.unwrap_or_default();
                    Ok(last.len() == 1)
                })
                .with_context(|| {
                    format!(
                        "{what}: {proto} {addr} does not stick to one backend: {last:?}\n{}",
                        fx.agent_log()
                    )
                })?;
                // And it stays there.
                let again = backends_of(&fx, p, proto, addr, 60)?;
                ensure!(
                    again == last,
                    "{what}: {proto} {addr} moved from {last:?} to {again:?}"
                );
            }
        }
        Ok(())
    };
    let wait_spread = |what: &str| -> Result<()> {
        for (proto, addr) in frontends {
            for p in clients {
                let mut last = BTreeSet::new();
                wait_until(SETTLE, || {
                    last = backends_if_ok(p, proto, addr, 60)?.unwrap_or_default();
                    Ok(last.len() == 3)
                })
                .with_context(|| {
                    format!(
                        "{what}: {proto} {addr} does not spread over the 3 backends: {last:?}\n{}",
                        fx.agent_log()
                    )
                })?;
            }
        }
        Ok(())
    };

    write(true)?;
    wait_sticky("affinity on")?;
    write(false)?;
    wait_spread("affinity off")?;
    write(true)?;
    wait_sticky("affinity on again")?;
    Ok(())
}

/// sessionAffinityConfig.clientIP.timeoutSeconds = 2: a client that keeps coming back
/// within 2 s stays on its backend; after more than 2 s of silence it is balanced afresh.
#[test]
fn session_affinity_timeout() -> Result<()> {
    let fx = ProxyFixture::with_backends(4)?;
    let (_p2, probe2) = second_client(&fx, "client2", 3)?;
    let (_p3, probe3) = second_client(&fx, "client3", 4)?;
    let svc = Service::new("sticky", &["10.96.2.50"])
        .port("http", 80, "TCP", ECHO_PORT)
        .affinity(true, Some(2));
    let mut docs = vec![svc.json()];
    docs.extend(
        fx.slices("sticky", &[("http", "TCP")], &[0, 1, 2, 3])
            .into_iter()
            .take(1),
    );
    fx.write("sticky.yaml", &docs)?;
    let vip = sa(ip("10.96.2.50"), 80);
    let clients = [&fx.probe, &probe2, &probe3];
    let one = |p: &Probe| -> Result<String> {
        let r = fx.request_with(p, "tcp", vip)?;
        ensure!(r.ok, "{}\n{}", r.raw, fx.agent_log());
        Ok(r.backend.unwrap_or_default())
    };
    for p in clients {
        let mut last = BTreeSet::new();
        wait_until(SETTLE, || {
            last = backends_if_ok(p, "tcp", vip, 10)?.unwrap_or_default();
            Ok(last.len() == 1)
        })
        .with_context(|| format!("affinity not applied: {last:?}\n{}", fx.agent_log()))?;
    }

    // Coming back every 1.2 s (< 2 s): always the same backend.
    let mut current: Vec<String> = clients.iter().map(|p| one(p)).collect::<Result<_>>()?;
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1200));
        for (i, p) in clients.iter().enumerate() {
            let b = one(p)?;
            ensure!(
                b == current[i],
                "client {i} moved from {} to {b} although it came back within the 2 s timeout\n{}",
                current[i],
                fx.agent_log()
            );
        }
    }

    // Silent for 2.6 s (> 2 s): the next connection is balanced again. With 4 backends and
    // 3 clients × 3 rounds, staying on the same backend every time by chance has a
    // probability of (1/4)^9.
    let mut changes = 0;
    let mut history = vec![current.clone()];
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(2600));
        for (i, p) in clients.iter().enumerate() {
            let b = one(p)?;
            if b != current[i] {
                changes += 1;
            }
            // Sticky again right away.
            let again = backends_of(&fx, p, "tcp", vip, 5)?;
            ensure!(
                again.len() == 1 && again.contains(&b),
                "client {i}: new affinity to {b} did not hold: {again:?}"
            );
            current[i] = b;
        }
        history.push(current.clone());
    }
    ensure!(
        changes > 0,
        "after the 2 s timeout, no client ever moved to another backend (history per round: \
         {history:?}): the affinity does not expire\n{}",
        fx.agent_log()
    );
    Ok(())
}

/// Counts the log lines of the current agent that contain `needle`.
fn log_count(fx: &ProxyFixture, needle: &str) -> usize {
    fx.agent_stderr()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Waits until the agent logged `needle` more often than `before` times.
fn wait_log_count(fx: &ProxyFixture, needle: &str, before: usize) -> Result<()> {
    wait_until(SETTLE, || Ok(log_count(fx, needle) > before)).with_context(|| {
        format!(
            "the agent did not log another {needle:?}\n{}",
            fx.agent_log()
        )
    })
}

/// Bad input: a malformed file, an invalid IP, port 70000, an invalid endpoint address,
/// duplicate objects across two files. Each is rejected with an error in the log; the agent
/// keeps running and the last good content keeps serving; other files are still applied;
/// a fixed file is applied again.
#[test]
fn bad_input_keeps_last_good_state() -> Result<()> {
    let fx = ProxyFixture::new()?;
    let vip = sa(ip("10.96.2.60"), 80);
    let dns = sa(ip("10.96.2.60"), 53);
    fx.write("web.yaml", &svc_docs(&fx, "web", "10.96.2.60", &[0, 1]))?;
    fx.wait_backends("tcp", vip, &["b0", "b1"])?;
    let invalid = "invalid manifest";
    let still_serving = |what: &str| -> Result<()> {
        fx.ensure_agent_alive()
            .with_context(|| format!("after {what}"))?;
        fx.expect_spread("tcp", vip, 40, &["b0", "b1"], true)
            .with_context(|| format!("after {what}"))?;
        fx.expect_spread("udp", dns, 20, &["b0", "b1"], true)
            .with_context(|| format!("after {what}"))?;
        Ok(())
    };

    let bad_files: Vec<(&str, String)> = vec![
        (
            "malformed YAML",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web\nspec: [".to_string(),
        ),
        ("not a Kubernetes object", "just a string\n".to_string()),
        ("invalid clusterIP", {
            let mut d = svc_docs(&fx, "web", "10.96.2.60", &[0]);
            d[0]["spec"]["clusterIP"] = "10.96.2.300".into();
            d[0]["spec"]["clusterIPs"] = serde_json::json!(["10.96.2.300"]);
            docs_text(&d)
        }),
        ("port 70000", {
            let mut d = svc_docs(&fx, "web", "10.96.2.60", &[0]);
            d[0]["spec"]["ports"][0]["port"] = 70000.into();
            docs_text(&d)
        }),
        ("endpoint port 70000", {
            let mut d = svc_docs(&fx, "web", "10.96.2.60", &[0]);
            d[1]["ports"][0]["port"] = 70000.into();
            docs_text(&d)
        }),
        ("invalid endpoint address", {
            let mut d = svc_docs(&fx, "web", "10.96.2.60", &[0]);
            d[1]["endpoints"][0]["addresses"] = serde_json::json!(["10.244.0.999"]);
            docs_text(&d)
        }),
        ("IPv6 address in an IPv4 slice", {
            let mut d = svc_docs(&fx, "web", "10.96.2.60", &[0]);
            d[1]["endpoints"][0]["addresses"] = serde_json::json!(["fd00:244::10"]);
            docs_text(&d)
        }),
        ("unsupported protocol", {
            let mut d = svc_docs(&fx, "web", "10.96.2.60", &[0]);
            d[0]["spec"]["ports"][0]["protocol"] = "SCTP".into();
            docs_text(&d)
        }),
        ("duplicate port", {
            let mut d = svc_docs(&fx, "web", "10.96.2.60", &[0]);
            let p = d[0]["spec"]["ports"][0].clone();
            d[0]["spec"]["ports"].as_array_mut().expect("ports").push(p);
            docs_text(&d)
        }),
        ("a Service without a name", {
            let mut d = svc_docs(&fx, "web", "10.96.2.60", &[0]);
            d[0]["metadata"]
                .as_object_mut()
                .expect("meta")
                .remove("name");
            docs_text(&d)
        }),
    ];
    for (what, text) in &bad_files {
        let before = log_count(&fx, invalid);
        fx.write_raw("web.yaml", text)?;
        wait_log_count(&fx, invalid, before).with_context(|| format!("{what} was not reported"))?;
        let line = fx
            .agent_stderr()
            .lines()
            .rfind(|l| l.contains(invalid))
            .unwrap_or_default()
            .to_string();
        ensure!(
            line.contains("ERROR") && line.contains("web.yaml"),
            "{what}: the error line should be an ERROR naming the file: {line}"
        );
        still_serving(what)?;
    }

    // Another file is still applied while web.yaml is broken.
    fx.write("other.yaml", &svc_docs(&fx, "other", "10.96.2.61", &[1]))?;
    fx.wait_backends("tcp", sa(ip("10.96.2.61"), 80), &["b1"])?;

    // Unknown kinds and empty documents are ignored, not errors.
    fx.write_raw(
        "misc.yaml",
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {a: b}\n---\n---\n",
    )?;
    fx.write_raw("notes.txt", "not a manifest: ignored\n")?;

    // Duplicates across two files: the first file (by name) wins.
    let before = log_count(&fx, "duplicate object ignored");
    let mut dup = svc_docs(&fx, "web", "10.96.2.62", &[1]);
    dup[1]["metadata"]["name"] = "web-v4-dup".into();
    fx.write("zz-duplicate.yaml", &dup)?;
    wait_log_count(&fx, "duplicate object ignored", before)?;
    still_serving("a duplicate Service in a later file")?;
    ensure_untranslated(&fx, sa(ip("10.96.2.62"), 80))?;
    fx.remove("zz-duplicate.yaml")?;

    // A broken file that is deleted takes its last good content with it.
    fx.write_raw(
        "broken-new.yaml",
        "kind: Service\nmetadata: {name: x}\nspec: {ports: [{port: [1]}]}",
    )?;
    // Fixing web.yaml applies it.
    fx.write("web.yaml", &svc_docs(&fx, "web", "10.96.2.60", &[1]))?;
    fx.wait_backends("tcp", vip, &["b1"])?;
    fx.wait_backends("udp", dns, &["b1"])?;
    fx.expect_spread("tcp", sa(ip("10.96.2.61"), 80), 20, &["b1"], true)?;
    let (code, _, body) = fx.http_get(&format!("http://{HEALTHZ}/healthz"))?;
    ensure!(code == 200, "healthz after bad input: {code} {body}");
    fx.ensure_agent_alive()
}

/// An agent started while a broken file (and an empty one) is in the directory starts,
/// serves the good files and reports the broken one.
#[test]
fn agent_starts_with_a_broken_file_present() -> Result<()> {
    let mut fx = ProxyFixture::with(FixtureOptions {
        start_agent: false,
        ..Default::default()
    })?;
    fx.write_raw("aaa-broken.yaml", "{{{ not yaml")?;
    fx.write("web.yaml", &svc_docs(&fx, "web", "10.96.2.70", &[0, 1]))?;
    fx.write_raw("empty.yaml", "")?;
    fx.start_agent()?;
    fx.wait_backends("tcp", sa(ip("10.96.2.70"), 80), &["b0", "b1"])?;
    fx.wait_agent_log("invalid manifest", SETTLE)?;
    fx.ensure_agent_alive()
}

/// Every way of writing manifests a user may use is read: block YAML, a YAML flow mapping,
/// JSON documents separated by `---` (with and without a leading marker), a JSON List, and
/// a file of several JSON values.
#[test]
fn yaml_and_json_files_in_every_shape() -> Result<()> {
    let fx = ProxyFixture::new()?;
    let b0 = backend_v4(0);
    // Block YAML, with a single unnamed port (as most Services have) and no namespace.
    let block = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: block\nspec:\n  clusterIP: 10.96.2.80\n  ports:\n  - port: 80\n    targetPort: {ECHO_PORT}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: block-1\n  labels:\n    kubernetes.io/service-name: block\naddressType: IPv4\nports:\n- port: {ECHO_PORT}\nendpoints:\n- addresses: [\"{b0}\"]\n"
    );
    let flow = format!(
        "{{apiVersion: v1, kind: Service, metadata: {{name: flow}}, spec: {{clusterIP: 10.96.2.81, ports: [{{name: http, port: 80}}]}}}}\n---\n{{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {{name: flow-1, labels: {{kubernetes.io/service-name: flow}}}}, addressType: IPv4, ports: [{{name: http, port: {ECHO_PORT}}}], endpoints: [{{addresses: [\"{b0}\"]}}]}}\n"
    );
    let json_docs =
        |name: &str, vip: &str| -> Vec<serde_json::Value> { svc_docs(&fx, name, vip, &[0]) };
    let joined = |docs: &[serde_json::Value], pretty: bool| -> String {
        docs.iter()
            .map(|d| {
                if pretty {
                    serde_json::to_string_pretty(d).expect("json")
                } else {
                    d.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": json_docs("list", "10.96.2.84")});
    let stream: String = json_docs("stream", "10.96.2.85")
        .iter()
        .map(|d| serde_json::to_string_pretty(d).expect("json") + "\n")
        .collect();
    let files = [
        ("block.yaml", block, "10.96.2.80"),
        ("flow.yaml", flow, "10.96.2.81"),
        (
            "pretty.yaml",
            joined(&json_docs("pretty", "10.96.2.82"), true),
            "10.96.2.82",
        ),
        (
            "compact.json",
            joined(&json_docs("compact", "10.96.2.83"), false),
            "10.96.2.83",
        ),
        ("list.json", list.to_string(), "10.96.2.84"),
        ("stream.json", stream, "10.96.2.85"),
        (
            "leading.yaml",
            docs_text(&json_docs("leading", "10.96.2.86")),
            "10.96.2.86",
        ),
    ];
    for (file, text, _) in &files {
        fx.write_raw(file, text)?;
    }
    let mut problems = Vec::new();
    for (file, _, vip) in &files {
        if let Err(e) = fx.wait_backends("tcp", sa(ip(vip), 80), &["b0"]) {
            problems.push(format!("{file}: {e:#}"));
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n\n"));
    ensure!(
        !fx.agent_stderr().contains("invalid manifest"),
        "a valid file was reported invalid\n{}",
        fx.agent_log()
    );
    Ok(())
}

/// A file replaced by another version of the same size and the same modification time
/// (what `cp -p`, `rsync -t` or `tar x` do) is still noticed.
#[test]
fn replaced_file_with_same_size_and_mtime_is_reloaded() -> Result<()> {
    let fx = ProxyFixture::new()?;
    let vip = sa(ip("10.96.2.90"), 80);
    // Backends 10.244.0.10 and 10.244.0.11: the two versions have the same length.
    let a = docs_text(&svc_docs(&fx, "web", "10.96.2.90", &[0]));
    let b = docs_text(&svc_docs(&fx, "web", "10.96.2.90", &[1]));
    ensure!(
        a.len() == b.len() && a != b,
        "test setup: versions must differ at equal length"
    );
    fx.write_raw("web.yaml", &a)?;
    fx.wait_backends("tcp", vip, &["b0"])?;
    let dst = fx.manifests.join("web.yaml");
    let mtime = std::fs::metadata(&dst)?.modified()?;
    let tmp = fx.manifests.join(".web.yaml.tmp");
    std::fs::write(&tmp, &b)?;
    std::fs::File::options()
        .write(true)
        .open(&tmp)?
        .set_modified(mtime)?;
    std::fs::rename(&tmp, &dst)?;
    fx.wait_backends("tcp", vip, &["b1"])
        .context("the new version of web.yaml (same size, same mtime) was never applied")?;
    Ok(())
}

/// Two Services claiming the same ClusterIP: the older one (creationTimestamp) has it, the
/// conflict is logged, and the other one takes over when the first is deleted.
#[test]
fn conflicting_cluster_ips_older_service_wins() -> Result<()> {
    let fx = ProxyFixture::new()?;
    let vip = sa(ip("10.96.2.100"), 80);
    let with_time = |name: &str, t: &str, b: usize| -> Vec<serde_json::Value> {
        let mut d = svc_docs(&fx, name, "10.96.2.100", &[b]);
        d[0]["metadata"]["creationTimestamp"] = t.into();
        d
    };
    fx.write("young.yaml", &with_time("young", "2024-06-01T00:00:00Z", 1))?;
    fx.write("old.yaml", &with_time("old", "2024-01-01T00:00:00Z", 0))?;
    fx.wait_agent_log("frontend already taken", SETTLE)?;
    fx.wait_backends("tcp", vip, &["b0"])?;
    fx.wait_backends("udp", sa(ip("10.96.2.100"), 53), &["b0"])?;
    fx.remove("old.yaml")?;
    fx.wait_backends("tcp", vip, &["b1"])?;
    fx.wait_backends("udp", sa(ip("10.96.2.100"), 53), &["b1"])?;
    Ok(())
}

/// Text of a multi-document file.
fn docs_text(docs: &[serde_json::Value]) -> String {
    docs.iter()
        .map(|d| format!("---\n{}\n", serde_json::to_string_pretty(d).expect("json")))
        .collect()
}
