//! capstan-proxy: the agent's own life.
//!
//! Restart under load (SIGTERM, same bpffs dir: no failed request, kept connections keep
//! working, the restarted agent rewrites nothing), the agent down or crashed (traffic keeps
//! flowing, changes made meanwhile are caught up), /healthz and /livez in kube-proxy's
//! shape, /metrics with kube-proxy's histograms, and `--cleanup`.
//!
//! Run as root: `cargo test -p capstan-tests --test proxy_lifecycle`.

use anyhow::{Context, Result, ensure};
use capstan_tests::proxy::*;
use capstan_tests::{LoopSummary, wait_until};
use serde_json::Value;
use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const VIP4: &str = "10.96.3.10";
const VIP6: &str = "fd00:96::3:10";

/// The web Service plus a NodePort Service with Maglev and session affinity, so a restart
/// has service ids, Maglev tables and NodePort entries to carry over.
fn rich_state(fx: &ProxyFixture, web_backends: &[usize]) -> Result<()> {
    fx.write("web.yaml", &fx.web_service("web", VIP4, VIP6, web_backends))?;
    let mg = Service::new("mg", &["10.96.3.11", "fd00:96::3:11"])
        .node_port("http", 80, "TCP", ECHO_PORT, 30080)
        .node_port("dns", 53, "UDP", ECHO_PORT, 30053)
        .annotate("service.capstan.io/lb-algorithm", "maglev")
        .affinity(true, Some(600));
    let mut docs = vec![mg.json()];
    docs.extend(fx.slices("mg", &[("http", "TCP"), ("dns", "UDP")], &[0, 1]));
    fx.write("mg.yaml", &docs)
}

/// Waits until the current agent has synced at least once (capstan_sync_total ≥ 1).
fn wait_synced_once(fx: &ProxyFixture) -> Result<()> {
    let mut last = None;
    wait_until(SETTLE, || {
        last = fx.metric_value("capstan_sync_total", "").ok().flatten();
        Ok(last.is_some_and(|v| v >= 1.0))
    })
    .with_context(|| {
        format!(
            "the agent never synced (capstan_sync_total {last:?})\n{}",
            fx.agent_log()
        )
    })
}

/// SIGTERM and restart with the same bpffs dir while three clients loop (TCP v4, UDP v4,
/// TCP v6): zero failed requests; a connection opened before the restart keeps working
/// (and still shows the ClusterIP as its peer); the restarted agent finds the state in the
/// pinned maps and its first sync writes nothing; later changes are applied as usual.
#[test]
fn restart_under_load_keeps_traffic_and_rewrites_nothing() -> Result<()> {
    let mut fx = ProxyFixture::new()?;
    rich_state(&fx, &[0, 1])?;
    let http4 = sa(ip(VIP4), 80);
    fx.wait_backends("tcp", http4, &["b0", "b1"])?;
    fx.wait_backends("tcp", sa(ip(VIP6), 80), &["b0", "b1"])?;
    fx.wait_backends("tcp", sa(fx.node.addr_v4(), 30080), &["b0", "b1"])
        .or_else(|_| {
            // Session affinity: one backend per client.
            wait_until(SETTLE, || {
                let s = fx.run_loop("tcp", sa(fx.node.addr_v4(), 30080), 10)?;
                Ok(s.fail == 0)
            })
        })?;

    let keep = fx.probe.tcpkeep(http4)?;
    ensure!(keep.ok, "tcpkeep: {}", keep.raw);
    let conn = keep.conn.context("no conn id")?;
    ensure!(
        keep.peer_addr() == Some(http4),
        "kept connection peer: {}",
        keep.raw
    );
    let first = fx.probe.send(conn)?;
    ensure!(first.ok, "{}", first.raw);

    let tcp = fx.topo.probe(fx.client.netns(), true)?;
    let udp = fx.topo.probe(fx.client.netns(), true)?;
    let tcp6 = fx.topo.probe(fx.client.netns(), true)?;
    let np = fx.topo.probe(fx.client.netns(), true)?;
    let np_addr = sa(fx.node.addr_v4(), 30080);
    let stop = AtomicBool::new(false);
    let (results, restart) = std::thread::scope(|s| {
        let handles = [
            (
                "tcp v4",
                s.spawn(|| loop_until_stopped(&tcp, "tcp", http4, &stop)),
            ),
            (
                "udp v4",
                s.spawn(|| loop_until_stopped(&udp, "udp", sa(ip(VIP4), 53), &stop)),
            ),
            (
                "tcp v6",
                s.spawn(|| loop_until_stopped(&tcp6, "tcp", sa(ip(VIP6), 80), &stop)),
            ),
            (
                "nodeport maglev+affinity",
                s.spawn(|| loop_until_stopped(&np, "tcp", np_addr, &stop)),
            ),
        ];
        let restart = (|| -> Result<()> {
            std::thread::sleep(Duration::from_millis(500));
            fx.restart_agent()?;
            wait_synced_once(&fx)?;
            std::thread::sleep(Duration::from_millis(1500));
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        let results: Vec<(&str, Result<Vec<LoopSummary>>)> = handles
            .into_iter()
            .map(|(n, h)| {
                (
                    n,
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("thread panicked"))),
                )
            })
            .collect();
        (results, restart)
    });
    restart?;
    for (what, r) in results {
        let LoopSummary {
            n,
            fail,
            backends,
            errors,
            ..
        } = merge_summaries(&r?);
        ensure!(
            fail == 0 && n >= 100,
            "{what}: {fail} of {n} requests failed across the agent restart ({errors:?}), \
             backends {backends:?}\n{}",
            fx.agent_log()
        );
    }

    // The kept connection still works, on the same backend, still showing the ClusterIP.
    let after = fx.probe.send(conn)?;
    ensure!(
        after.ok && after.backend == first.backend,
        "kept connection after the restart: {} (before: {})",
        after.raw,
        first.raw
    );
    ensure!(
        after.peer.is_none() || after.peer_addr() == Some(http4),
        "kept connection peer after restart: {}",
        after.raw
    );
    fx.probe.close(conn)?;

    // The restarted agent read the state back and had nothing to write.
    let log = fx.agent_stderr();
    let ready = log
        .lines()
        .find(|l| l.contains("eBPF data plane ready"))
        .unwrap_or_default();
    ensure!(
        !ready.contains("frontends=0"),
        "the restarted agent did not find the pinned state: {ready}"
    );
    let writes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("synced") || l.contains("applying map changes"))
        .collect();
    ensure!(
        writes.iter().all(|l| l.contains("writes=0")),
        "the first sync after the restart rewrote map entries (it must find everything in \
         place): {writes:#?}\n{}",
        fx.agent_log()
    );

    // And it applies changes as usual.
    fx.write("web.yaml", &fx.web_service("web", VIP4, VIP6, &[1]))?;
    fx.wait_backends("tcp", http4, &["b1"])?;
    fx.wait_backends("udp", sa(ip(VIP6), 53), &["b1"])?;
    Ok(())
}

/// With the agent stopped (SIGTERM) or crashed (SIGKILL), Services keep working from the
/// pinned programs and maps; changes made meanwhile (endpoints, a new Service, a deleted
/// Service) are applied when it comes back, and nothing stale is left behind.
#[test]
fn agent_down_keeps_serving_and_catches_up() -> Result<()> {
    let mut fx = ProxyFixture::with_backends(3)?;
    rich_state(&fx, &[0, 1])?;
    fx.write(
        "old.yaml",
        &fx.web_service("old", "10.96.3.20", "fd00:96::3:20", &[2]),
    )?;
    let http4 = sa(ip(VIP4), 80);
    let old = sa(ip("10.96.3.20"), 80);
    let new = sa(ip("10.96.3.21"), 80);
    fx.wait_backends("tcp", http4, &["b0", "b1"])?;
    fx.wait_backends("tcp", old, &["b2"])?;

    for crash in [false, true] {
        let what = if crash { "SIGKILL" } else { "SIGTERM" };
        if crash {
            fx.agent().kill();
            let _ = fx.stop_agent();
        } else {
            let st = fx.stop_agent()?;
            ensure!(
                st.success(),
                "agent exit status on SIGTERM: {st}\n{}",
                fx.agent_log()
            );
        }
        // Still served while no agent runs.
        fx.expect_spread("tcp", http4, 40, &["b0", "b1"], true)
            .with_context(|| format!("while the agent is down ({what})"))?;
        fx.expect_spread("udp", sa(ip(VIP6), 53), 40, &["b0", "b1"], true)?;

        // Changes while it is down.
        let (web_now, old_present) = if crash {
            (vec![2], true)
        } else {
            (vec![0], false)
        };
        fx.write("web.yaml", &fx.web_service("web", VIP4, VIP6, &web_now))?;
        if old_present {
            fx.write(
                "old.yaml",
                &fx.web_service("old", "10.96.3.20", "fd00:96::3:20", &[2]),
            )?;
            fx.remove("new.yaml")?;
        } else {
            fx.remove("old.yaml")?;
            fx.write(
                "new.yaml",
                &fx.web_service("new", "10.96.3.21", "fd00:96::3:21", &[1]),
            )?;
        }
        std::thread::sleep(Duration::from_millis(300));
        // Nothing changes until the agent is back.
        fx.expect_spread("tcp", http4, 40, &["b0", "b1"], true)?;

        fx.start_agent()?;
        let want: Vec<String> = web_now.iter().map(|i| bname(*i)).collect();
        let want: Vec<&str> = want.iter().map(|s| s.as_str()).collect();
        fx.wait_backends("tcp", http4, &want)
            .with_context(|| format!("catching up after {what}"))?;
        fx.wait_backends("udp", sa(ip(VIP6), 53), &want)?;
        if old_present {
            fx.wait_backends("tcp", old, &["b2"])?;
            fx.wait_untranslated(new)?;
        } else {
            fx.wait_backends("tcp", new, &["b1"])?;
            fx.wait_untranslated(old)?;
        }
        // Back to the starting point for the next round.
        fx.write("web.yaml", &fx.web_service("web", VIP4, VIP6, &[0, 1]))?;
        fx.wait_backends("tcp", http4, &["b0", "b1"])?;
    }
    Ok(())
}

/// Checks an RFC 3339 UTC timestamp (`2024-05-01T10:11:12.123Z`).
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && s.ends_with('Z')
        && s[..4].parse::<u32>().is_ok()
}

/// GET `path` on `addr` and parse the JSON body; returns (status, content type, object).
fn get_json(
    fx: &ProxyFixture,
    addr: &str,
    path: &str,
) -> Result<(u16, String, serde_json::Map<String, Value>)> {
    let (code, ctype, body) = fx.http_get(&format!("http://{addr}{path}"))?;
    let v: Value = serde_json::from_str(&body).with_context(|| {
        format!("{path} answered {code} with a body that is not JSON: {body:?}")
    })?;
    let obj = v
        .as_object()
        .cloned()
        .with_context(|| format!("{path}: not a JSON object: {body}"))?;
    Ok((code, ctype, obj))
}

/// /healthz and /livez answer 200 with kube-proxy's JSON (lastUpdated, currentTime and,
/// for /healthz, nodeEligible); the metrics port answers /healthz too; a Node being
/// deleted makes /healthz (not /livez) answer 503 with nodeEligible false.
#[test]
fn healthz_and_livez() -> Result<()> {
    let fx = ProxyFixture::new()?;
    fx.write("web.yaml", &fx.web_service("web", VIP4, VIP6, &[0]))?;
    fx.wait_backends("tcp", sa(ip(VIP4), 80), &["b0"])?;

    let check = |addr: &str, path: &str, want_code: u16, eligible: Option<bool>| -> Result<()> {
        let (code, ctype, obj) = get_json(&fx, addr, path)?;
        ensure!(
            code == want_code,
            "{addr}{path}: status {code}, expected {want_code}: {obj:?}\n{}",
            fx.agent_log()
        );
        ensure!(
            ctype.starts_with("application/json"),
            "{path}: content type {ctype:?}"
        );
        let mut want_keys = vec!["currentTime", "lastUpdated"];
        if eligible.is_some() {
            want_keys.push("nodeEligible");
        }
        let keys: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        ensure!(
            sorted == want_keys,
            "{path}: keys {keys:?}, expected {want_keys:?}"
        );
        for k in ["lastUpdated", "currentTime"] {
            let v = obj[k]
                .as_str()
                .with_context(|| format!("{path}: {k} is not a string"))?;
            ensure!(
                is_timestamp(v),
                "{path}: {k} = {v:?} is not an RFC 3339 timestamp"
            );
        }
        ensure!(
            !obj["lastUpdated"]
                .as_str()
                .unwrap_or("")
                .starts_with("0001"),
            "{path}: lastUpdated was never set although the agent synced: {obj:?}"
        );
        if let Some(e) = eligible {
            ensure!(
                obj["nodeEligible"] == Value::Bool(e),
                "{path}: {obj:?}, expected nodeEligible {e}"
            );
        }
        Ok(())
    };
    check(HEALTHZ, "/healthz", 200, Some(true))?;
    check(HEALTHZ, "/livez", 200, None)?;
    check(METRICS, "/healthz", 200, Some(true))?;
    let (code, _, _) = fx.http_get(&format!("http://{HEALTHZ}/nonexistent"))?;
    ensure!(code == 404, "an unknown path answered {code}");

    // The Node is being deleted.
    let mut node = k8s::node(fx.node_name(), None);
    node["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z".into();
    fx.write("node.yaml", &[node])?;
    wait_until(SETTLE, || {
        let (code, _, _) = fx.http_get(&format!("http://{HEALTHZ}/healthz"))?;
        Ok(code == 503)
    })
    .with_context(|| {
        format!(
            "/healthz stays healthy for a Node being deleted\n{}",
            fx.agent_log()
        )
    })?;
    check(HEALTHZ, "/healthz", 503, Some(false))?;
    check(HEALTHZ, "/livez", 200, None)?;
    fx.remove("node.yaml")?;
    wait_until(SETTLE, || {
        let (code, _, _) = fx.http_get(&format!("http://{HEALTHZ}/healthz"))?;
        Ok(code == 200)
    })?;
    check(HEALTHZ, "/healthz", 200, Some(true))?;
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a time (UTC).
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// /metrics: kube-proxy's sync and network-programming histograms (programming latency
/// measured from the EndpointSlice's last-change-trigger-time when it has one), the
/// last-sync timestamp, and capstan's own gauges and data-path counters.
#[test]
fn metrics_histograms_and_counters() -> Result<()> {
    let fx = ProxyFixture::new()?;
    fx.write("web.yaml", &fx.web_service("web", VIP4, VIP6, &[0, 1]))?;
    fx.wait_backends("tcp", sa(ip(VIP4), 80), &["b0", "b1"])?;
    fx.expect_spread("tcp", sa(ip(VIP4), 80), 20, &["b0", "b1"], false)?;

    let (code, ctype, text) = fx.http_get(&format!("http://{METRICS}/metrics"))?;
    ensure!(
        code == 200 && ctype.starts_with("text/plain"),
        "/metrics: {code} {ctype}"
    );
    for family in [
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_network_programming_duration_seconds",
    ] {
        ensure!(
            text.contains(&format!("# TYPE {family} histogram")),
            "/metrics has no histogram {family}:\n{text}"
        );
        let buckets = parse_metric(&text, &format!("{family}_bucket"));
        ensure!(
            buckets.iter().any(|(l, _)| l.contains("le=\"+Inf\"")) && buckets.len() > 5,
            "{family}: buckets {buckets:?}"
        );
        let count = parse_metric(&text, &format!("{family}_count"));
        ensure!(
            count.first().is_some_and(|(_, v)| *v >= 1.0),
            "{family}_count: {count:?} (the agent synced and programmed a change)"
        );
    }
    let last = parse_metric(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds");
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as f64;
    ensure!(
        last.first().is_some_and(|(_, v)| (now - v).abs() < 120.0),
        "last sync timestamp {last:?}, now {now}"
    );
    let translated = parse_metric(&text, "capstan_datapath_events_total")
        .into_iter()
        .find(|(l, _)| l.contains("translated"));
    // Counters are refreshed every second: poll.
    let mut seen = translated.map(|t| t.1).unwrap_or(0.0);
    wait_until(SETTLE, || {
        seen = fx
            .metric_value("capstan_datapath_events_total", "event=\"translated\"")?
            .unwrap_or(0.0);
        Ok(seen >= 20.0)
    })
    .with_context(|| format!("translated counter {seen} after 20+ requests"))?;
    ensure!(
        fx.metric_value("capstan_frontends", "")? == Some(4.0),
        "capstan_frontends: web has 4 frontends (2 ports x 2 families)"
    );
    ensure!(
        fx.metric_value("capstan_backends", "")? == Some(8.0),
        "capstan_backends"
    );

    // A change with a trigger time 2 s ago: programming latency counts from then.
    let count =
        |fx: &ProxyFixture, m: &str| -> Result<f64> { Ok(fx.metric_value(m, "")?.unwrap_or(0.0)) };
    let sync_before = count(&fx, "kubeproxy_sync_proxy_rules_duration_seconds_count")?;
    let prog_before = count(&fx, "kubeproxy_network_programming_duration_seconds_count")?;
    let sum_before = count(&fx, "kubeproxy_network_programming_duration_seconds_sum")?;
    let mut docs = fx.web_service("web", VIP4, VIP6, &[1]);
    // Well after the agent started (kube-proxy ignores trigger times from before its start).
    std::thread::sleep(Duration::from_secs(3));
    let trigger_at = SystemTime::now() - Duration::from_secs(2);
    let trigger = rfc3339(trigger_at);
    for d in docs.iter_mut().skip(1) {
        d["metadata"]["annotations"] =
            serde_json::json!({"endpoints.kubernetes.io/last-change-trigger-time": trigger});
    }
    fx.write("web.yaml", &docs)?;
    fx.wait_backends("tcp", sa(ip(VIP4), 80), &["b1"])?;
    let mut vals = (0.0, 0.0, 0.0);
    wait_until(SETTLE, || {
        vals = (
            count(&fx, "kubeproxy_sync_proxy_rules_duration_seconds_count")?,
            count(&fx, "kubeproxy_network_programming_duration_seconds_count")?,
            count(&fx, "kubeproxy_network_programming_duration_seconds_sum")?,
        );
        Ok(vals.0 > sync_before && vals.1 > prog_before)
    })
    .with_context(|| format!("counts did not grow: {vals:?} vs ({sync_before}, {prog_before})"))?;
    let latency = vals.2 - sum_before;
    ensure!(
        (1.5..10.0).contains(&latency),
        "programming latency of a change triggered 2 s ago ({trigger}) was recorded as {latency} s"
    );

    // An unrelated change later (a new Service, no trigger time of its own) is measured
    // from when the agent saw it, not from the older trigger time of another slice.
    std::thread::sleep(Duration::from_secs(4));
    let (prog_before, sum_before) = (vals.1, vals.2);
    let mut other = vec![
        Service::new("other", &["10.96.3.30"])
            .port("http", 80, "TCP", ECHO_PORT)
            .json(),
    ];
    other.extend(
        fx.slices("other", &[("http", "TCP")], &[0])
            .into_iter()
            .take(1),
    );
    fx.write("other.yaml", &other)?;
    fx.wait_backends("tcp", sa(ip("10.96.3.30"), 80), &["b0"])?;
    wait_until(SETTLE, || {
        vals.1 = count(&fx, "kubeproxy_network_programming_duration_seconds_count")?;
        vals.2 = count(&fx, "kubeproxy_network_programming_duration_seconds_sum")?;
        Ok(vals.1 > prog_before)
    })?;
    let latency = (vals.2 - sum_before) / (vals.1 - prog_before);
    ensure!(
        latency < 1.5,
        "programming latency of a change without a trigger time was recorded as {latency} s \
         (the other slice's trigger time, {trigger}, was {} s ago)",
        SystemTime::now().duration_since(trigger_at)?.as_secs()
    );
    Ok(())
}

/// Lists the capstan programs attached to the topology's cgroup (`bpftool cgroup show`).
fn attached_programs(fx: &ProxyFixture) -> Result<BTreeSet<String>> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(fx.topo.cgroup_path())
        .output()
        .context("running bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("cs_"))
        .map(|w| w.to_string())
        .collect())
}

/// `--cleanup` detaches the programs and removes the pins: the ClusterIP is no longer
/// translated. It is idempotent, and a new agent afterwards starts from scratch.
#[test]
fn cleanup_removes_programs_and_pins() -> Result<()> {
    let mut fx = ProxyFixture::new()?;
    fx.write("web.yaml", &fx.web_service("web", VIP4, VIP6, &[0, 1]))?;
    let http4 = sa(ip(VIP4), 80);
    fx.wait_backends("tcp", http4, &["b0", "b1"])?;
    let st = fx.stop_agent()?;
    ensure!(st.success(), "agent exit on SIGTERM: {st}");

    // Stopped: pins and programs stay, traffic still translated.
    let pins = fx.topo.bpffs_dir().to_path_buf();
    let links = pins.join("links");
    ensure!(
        links.join("cs_connect4").exists(),
        "no pinned link in {}",
        links.display()
    );
    ensure!(
        pins.join("CS_SVC_V1").exists(),
        "no pinned service map in {}",
        pins.display()
    );
    let progs = attached_programs(&fx)?;
    ensure!(
        progs.len() == 8,
        "expected 8 attached programs, bpftool shows {progs:?}"
    );
    fx.expect_spread("tcp", http4, 20, &["b0", "b1"], true)?;

    let cleanup = |fx: &ProxyFixture| -> Result<()> {
        let bin = capstan_tests::bin_path("capstan-proxy")?;
        let out = fx.topo.run(
            fx.node.netns(),
            Command::new(bin)
                .arg("--cleanup")
                .arg("--bpffs-dir")
                .arg(&pins),
        )?;
        ensure!(
            out.status.success(),
            "--cleanup failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    cleanup(&fx)?;
    ensure!(
        !pins.exists(),
        "{} still exists after --cleanup",
        pins.display()
    );
    let progs = attached_programs(&fx)?;
    ensure!(
        progs.is_empty(),
        "programs still attached after --cleanup: {progs:?}"
    );
    let r = fx.request("tcp", http4)?;
    ensure!(
        !r.ok && is_untranslated_errno(r.errno.as_deref()),
        "the ClusterIP is still translated after --cleanup: {}",
        r.raw
    );
    let r = fx.request("udp", sa(ip(VIP6), 53))?;
    ensure!(
        !r.ok,
        "UDP to the ClusterIP still answered after --cleanup: {}",
        r.raw
    );
    // Idempotent.
    cleanup(&fx)?;

    // A new agent starts from scratch.
    fx.start_agent()?;
    fx.wait_backends("tcp", http4, &["b0", "b1"])?;
    ensure!(
        attached_programs(&fx)?.len() == 8,
        "programs after the new start"
    );
    Ok(())
}

/// Session affinity must never send a client to a pod that is not an endpoint of the
/// Service it connects to, also when the agent restarted in between and handed out ids
/// again: a client affine to a backend that left Service X must not land on Service Y's
/// new backend.
#[test]
fn affinity_never_crosses_services_across_restart() -> Result<()> {
    let mut fx = ProxyFixture::with_backends(3)?;
    let x = sa(ip("10.96.3.40"), 80);
    let write_x = |fx: &ProxyFixture, eps: &[usize]| -> Result<()> {
        let svc = Service::new("x", &["10.96.3.40"])
            .port("http", 80, "TCP", ECHO_PORT)
            .affinity(true, None);
        let mut docs = vec![svc.json()];
        docs.extend(fx.slices("x", &[("http", "TCP")], eps).into_iter().take(1));
        fx.write("x.yaml", &docs)
    };
    write_x(&fx, &[0])?;
    fx.wait_backends("tcp", x, &["b0"])?;
    write_x(&fx, &[0, 1])?;
    // Clients (each its own network namespace) until one is affine to b1.
    let mut clients = Vec::new();
    let mut on_b1 = None;
    for n in 0..12u8 {
        let pod = fx.topo.pod(
            &fx.node,
            &format!("c{n}"),
            std::net::Ipv4Addr::new(10, 244, 0, 100 + n),
            std::net::Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x100 + n as u16),
        )?;
        let p = fx.topo.probe(pod.netns(), true)?;
        let mut got = BTreeSet::new();
        wait_until(SETTLE, || {
            let s = p.loop_proto("tcp", x, 10)?;
            got = s.backends.keys().cloned().collect();
            Ok(s.fail == 0 && got.len() == 1)
        })?;
        let b1 = got.contains("b1");
        clients.push((pod, p));
        if b1 {
            on_b1 = Some(clients.len() - 1);
            break;
        }
    }
    let Some(c) = on_b1 else {
        // 12 clients all on b0: (1/2)^12; nothing to check.
        return Ok(());
    };
    // b1 leaves X; the agent restarts; a new Service Y gets a backend (b2).
    write_x(&fx, &[0])?;
    fx.wait_backends("tcp", x, &["b0"])?;
    fx.restart_agent()?;
    let mut y = vec![
        Service::new("y", &["10.96.3.41"])
            .port("http", 80, "TCP", ECHO_PORT)
            .json(),
    ];
    y.extend(fx.slices("y", &[("http", "TCP")], &[2]).into_iter().take(1));
    fx.write("y.yaml", &y)?;
    fx.wait_backends("tcp", sa(ip("10.96.3.41"), 80), &["b2"])?;
    // The client that was affine to b1 connects to X again: only b0 is an endpoint of X.
    let s = clients[c].1.loop_proto("tcp", x, 20)?;
    ensure!(
        s.fail == 0 && s.backends.keys().all(|b| b == "b0"),
        "a client of Service x (endpoints: b0) reached {:?} after the agent restarted: {}\n{}",
        s.backends,
        s.raw,
        fx.agent_log()
    );
    Ok(())
}

/// An unreachable API server: the agent (started with `--kubeconfig`) keeps running,
/// says it retries, answers /healthz, and the data path keeps the state an earlier run
/// programmed — nothing is torn down because the cluster cannot be read.
#[test]
fn unreachable_api_server_keeps_the_last_state() -> Result<()> {
    let mut fx = ProxyFixture::new()?;
    fx.write("web.yaml", &fx.web_service("web", VIP4, VIP6, &[0, 1]))?;
    let vip = std::net::SocketAddr::new(VIP4.parse()?, 80);
    fx.wait_backends("tcp", vip, &["b0", "b1"])?;
    fx.stop_agent()?;

    let kubeconfig = fx.topo.scratch_dir().join("unreachable.kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: \"https://127.0.0.1:1\", insecure-skip-tls-verify: true}}]\n\
         users: [{name: u, user: {token: not-a-real-token}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n",
    )?;
    let agent = fx.topo.spawn(
        fx.node.netns(),
        false,
        Command::new(capstan_tests::bin_path("capstan-proxy")?)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--bpffs-dir")
            .arg(fx.topo.bpffs_dir())
            .arg("--cgroup-path")
            .arg(fx.topo.cgroup_path())
            .args([
                "--hostname-override",
                fx.node_name(),
                "--healthz-bind-address",
                HEALTHZ,
            ]),
    )?;
    wait_until(Duration::from_secs(20), || {
        Ok(agent.stderr().contains("watch failed"))
    })
    .with_context(|| format!("no retry logged\n{}", agent.log()))?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(agent.is_running(), "the agent exited:\n{}", agent.log());
    let (status, _, body) = fx.http_get(&format!("http://{HEALTHZ}/healthz"))?;
    ensure!(status == 200, "healthz {status}: {body}");
    fx.expect_spread("tcp", vip, 20, &["b0", "b1"], false)
        .with_context(|| agent.log())?;
    Ok(())
}

/// CPU time (user + system, in clock ticks) a process has used so far.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces): state is field 3,
    // utime 14 and stime 15.
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// An agent with nothing to do does nothing: re-reading the manifest directory must not
/// wake it up again (reading a directory raises inotify access events of its own).
#[test]
fn an_idle_agent_stays_idle() -> Result<()> {
    let fx = ProxyFixture::new()?;
    fx.write(
        "web.yaml",
        &fx.web_service("web", "10.96.9.10", "fd00:96::9:10", &[0]),
    )?;
    fx.wait_backends("tcp", sa(ip("10.96.9.10"), 80), &["b0"])?;
    let pid = fx.agent().pid();
    let before = cpu_ticks(pid)?;
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(pid)? - before;
    // 100 ticks per second: a busy loop would use ~300; the periodic work a few.
    ensure!(
        used < 30,
        "the idle agent used {used} ticks of CPU in 3 s\n{}",
        fx.agent_log()
    );
    fx.ensure_agent_alive()
}

/// max_entries of a pinned map (`bpftool map show pinned`).
fn pinned_max_entries(fx: &ProxyFixture, map: &str) -> Result<u64> {
    let path = fx.topo.bpffs_dir().join(map);
    let out = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(&path)
        .output()
        .context("running bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    v["max_entries"].as_u64().context("max_entries")
}

/// Changing a map size flag and restarting resizes the pinned map, keeps what it held
/// (traffic goes on through the restart) and fills the new size.
#[test]
fn restart_with_new_map_sizes_resizes_the_pinned_maps() -> Result<()> {
    let mut fx = ProxyFixture::new()?;
    let vip = sa(ip("10.96.9.20"), 80);
    fx.write(
        "web.yaml",
        &fx.web_service("web", "10.96.9.20", "fd00:96::9:20", &[0, 1]),
    )?;
    fx.wait_backends("tcp", vip, &["b0", "b1"])?;
    let before = pinned_max_entries(&fx, "CS_SVC_V1")?;
    fx.stop_agent()?;
    // The data path keeps serving while the agent is down, and after it comes back.
    fx.expect_spread("tcp", vip, 20, &["b0", "b1"], true)?;
    fx.start_agent_with(&[
        "--bpf-lb-service-map-max".into(),
        "4099".into(),
        "--bpf-lb-backend-map-max".into(),
        "2053".into(),
    ])?;
    fx.expect_spread("tcp", vip, 20, &["b0", "b1"], true)?;
    ensure!(before != 4099, "the default size is already 4099");
    ensure!(
        pinned_max_entries(&fx, "CS_SVC_V1")? == 4099,
        "services map not resized"
    );
    ensure!(
        pinned_max_entries(&fx, "CS_BACKEND_V1")? == 2053,
        "backends map not resized"
    );
    ensure!(
        fx.agent_log().contains("resizing a pinned map"),
        "no log line about the resize\n{}",
        fx.agent_log()
    );
    // Changes still apply with the new maps.
    fx.write(
        "web.yaml",
        &fx.web_service("web", "10.96.9.20", "fd00:96::9:20", &[1]),
    )?;
    fx.wait_backends("tcp", vip, &["b1"])?;
    fx.ensure_agent_alive()
}
