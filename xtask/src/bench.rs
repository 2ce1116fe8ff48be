//! `cargo xtask bench clusterip`: TCP connect-request-response through a ClusterIP versus
//! to the pod IP directly, at several Service counts, side by side in one run; plus the
//! time to program Services from nothing, the EndpointSlice-change-to-data-path latency
//! and the agent's memory. A benchmark, not a test: it prints a table and writes JSON.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use capstan_tests::{Proc, Topology, bin_path, require_root};
use clap::Subcommand;
use serde_json::json;

#[derive(Subcommand)]
pub enum Which {
    /// ClusterIP versus direct pod IP.
    Clusterip {
        /// Service counts to measure at.
        #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,100000")]
        counts: Vec<usize>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// Alternating rounds per Service count (medians are reported).
        #[arg(long, default_value_t = 8)]
        rounds: usize,
        /// EndpointSlice changes timed per Service count.
        #[arg(long, default_value_t = 100)]
        changes: usize,
        /// Where the figures go as JSON.
        #[arg(long, default_value = "target/bench/clusterip.json")]
        json: PathBuf,
    },
    /// capstan-server, embedded store versus etcd.
    Apiserver {
        /// Object counts to measure get and list at.
        #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
        counts: Vec<usize>,
        /// Concurrent watchers for the delivery latency.
        #[arg(long, default_value_t = 100)]
        watchers: usize,
        /// Where the figures go as JSON.
        #[arg(long, default_value = "target/bench/apiserver.json")]
        json: PathBuf,
    },
}

const TARGET_VIP: &str = "10.96.0.1";
const ENDPOINTS_PER_SERVICE: usize = 10;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 0 => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        n => v[n / 2],
    }
}

/// The geometric mean: with rounds alternating which path goes first, an effect of going
/// first multiplies half the ratios by k and the other half by 1/k, and cancels here.
fn geomean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    (v.iter().map(|x| x.ln()).sum::<f64>() / v.len() as f64).exp()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        0.0
    } else {
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
}

/// `n` filler Services with 10 (unreachable) endpoints each, as one JSON List.
fn fillers(n: usize) -> String {
    let mut items = Vec::with_capacity(2 * n);
    for i in 0..n {
        let ip = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
        let name = format!("svc-{i}");
        items.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }));
        let endpoints: Vec<_> = (0..ENDPOINTS_PER_SERVICE)
            .map(|e| {
                let k = i * ENDPOINTS_PER_SERVICE + e;
                json!({"addresses": [format!("10.{}.{}.{}", 200 + k / 65536 % 50, (k / 256) % 256, k % 256)], "conditions": {"ready": true}})
            })
            .collect();
        items.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-1"), "namespace": "bench", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": endpoints
        }));
    }
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// The measured Service: one backend, so both paths reach the same server.
fn target(backend: &str) -> String {
    json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "target", "namespace": "bench"},
         "spec": {"clusterIP": TARGET_VIP, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "target-1", "namespace": "bench", "labels": {"kubernetes.io/service-name": "target"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
         "endpoints": [{"addresses": [backend], "conditions": {"ready": true}}]}
    ]})
    .to_string()
}

fn write_atomic(dir: &Path, name: &str, text: &str) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

/// One "synced" log line of the agent.
struct Synced {
    frontends: usize,
    took_us: u64,
    model_us: u64,
    diff_us: u64,
    apply_us: u64,
    /// From the source noticing the change to the maps holding it.
    since_change_us: u64,
    /// When the sync ended (the log line's timestamp), ns since the epoch.
    at_ns: u128,
}

/// The agent's "synced" log lines so far, parsed.
fn synced_lines(agent: &Proc) -> Vec<Synced> {
    agent
        .stderr()
        .lines()
        .filter(|l| l.contains("synced"))
        .map(|l| {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{k}=")))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            Synced {
                frontends: field("frontends") as usize,
                took_us: field("took_us"),
                model_us: field("model_us"),
                diff_us: field("diff_us"),
                apply_us: field("apply_us"),
                since_change_us: field("since_change_us"),
                at_ns: l
                    .split_whitespace()
                    .next()
                    .and_then(|t| humantime::parse_rfc3339(t).ok())
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            }
        })
        .collect()
}

/// Waits for a sync that leaves `frontends` frontends; returns (sync µs, wall time).
fn wait_synced(
    agent: &Proc,
    seen: usize,
    frontends: usize,
    start: Instant,
    timeout: Duration,
) -> Result<(Synced, Duration)> {
    loop {
        let lines = synced_lines(agent);
        if let Some(l) = lines
            .into_iter()
            .skip(seen)
            .find(|l| l.frontends == frontends)
        {
            return Ok((l, start.elapsed()));
        }
        if start.elapsed() > timeout {
            bail!(
                "no sync to {frontends} frontends within {timeout:?}\n{}",
                agent.log()
            );
        }
        if !agent.is_running() {
            bail!("the agent exited\n{}", agent.log());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// CPU time (user + system) of a process, in clock ticks (10 ms).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

struct Rr {
    rate: f64,
    p50: f64,
    p99: f64,
    errors: u64,
}

fn rr(topo: &Topology, netns: &str, addr: &str, seconds: f64) -> Result<Rr> {
    let bench = bin_path("capstan-bench")?;
    let out = topo.spawn(
        netns,
        true,
        Command::new(&bench).args(["rr", addr, &seconds.to_string()]),
    )?;
    out.wait_timeout(Duration::from_secs_f64(seconds + 30.0))?;
    let line = out.stdout();
    let field = |k: &str| -> f64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    if field("requests") == 0.0 {
        bail!("no request succeeded to {addr}: {line} {}", out.log());
    }
    Ok(Rr {
        rate: field("rate"),
        p50: field("p50_us"),
        p99: field("p99_us"),
        errors: field("errors") as u64,
    })
}

pub fn run(root: &Path, which: Which) -> Result<()> {
    if let Which::Apiserver {
        counts,
        watchers,
        json,
    } = which
    {
        return crate::bench_apiserver::run(root, counts, watchers, json);
    }
    let Which::Clusterip {
        counts,
        seconds,
        rounds,
        changes,
        json: json_path,
    } = which
    else {
        unreachable!("handled above")
    };
    require_root();
    crate::build_bins(root, true)?;
    // SAFETY: single-threaded here; the harness reads it when it looks for binaries.
    unsafe { std::env::set_var(capstan_tests::ENV_BIN_DIR, root.join("target/release")) };

    let topo = Topology::new()?;
    let node = topo.node("node1")?;
    let b1 = topo.pod(&node, "b1", "10.244.1.10".parse()?, "fd00:244::10".parse()?)?;
    let b2 = topo.pod(&node, "b2", "10.244.1.11".parse()?, "fd00:244::11".parse()?)?;
    let client = topo.pod(
        &node,
        "client",
        "10.244.1.20".parse()?,
        "fd00:244::20".parse()?,
    )?;
    let bench = bin_path("capstan-bench")?;
    let s1 = topo.spawn(
        b1.netns(),
        false,
        Command::new(&bench).args(["serve", "b1", "0.0.0.0:8080"]),
    )?;
    s1.wait_for_line("ready", Duration::from_secs(10))?;
    let s2 = topo.spawn(
        b2.netns(),
        false,
        Command::new(&bench).args(["serve", "b2", "0.0.0.0:8080"]),
    )?;
    s2.wait_for_line("ready", Duration::from_secs(10))?;

    let dir = topo.scratch_dir().join("manifests");
    std::fs::create_dir_all(&dir)?;
    let max = counts.iter().copied().max().unwrap_or(1).max(10_000);
    let map_size = ((max + 1) * (ENDPOINTS_PER_SERVICE + 1) + 1024) as u32;
    let mut cmd = crate::agent_command(&topo, crate::AgentSource::Manifests(&dir))?;
    cmd.arg("--bpf-lb-service-map-max")
        .arg(map_size.to_string());
    cmd.arg("--bpf-lb-backend-map-max")
        .arg(map_size.to_string());
    let agent = topo.spawn(node.netns(), false, &mut cmd)?;
    crate::wait_for_log(&agent, "watching manifests", Duration::from_secs(20))?;
    let direct = "10.244.1.10:8080";
    let vip = format!("{TARGET_VIP}:80");
    let mut report = String::new();
    let mut results = Vec::new();

    // Programming 10,000 Services x 10 endpoints from nothing.
    eprintln!("bench: programming 10,000 x {ENDPOINTS_PER_SERVICE} from nothing");
    let seen = synced_lines(&agent).len();
    let text = fillers(10_000);
    let t = Instant::now();
    write_atomic(&dir, "fillers.json", &text)?;
    let (prog, prog_wall) = wait_synced(&agent, seen, 10_000, t, Duration::from_secs(120))?;
    let (prog_sync_us, prog_model_us) = (prog.took_us, prog.model_us);
    let (prog_diff_us, prog_apply_us) = (prog.diff_us, prog.apply_us);
    let seen = synced_lines(&agent).len();
    std::fs::remove_file(dir.join("fillers.json"))?;
    wait_synced(&agent, seen, 0, Instant::now(), Duration::from_secs(120))?;

    let mut current_backend = "b1";
    let mut first = true;
    for &n in &counts {
        eprintln!("bench: {n} Services");
        let seen = synced_lines(&agent).len();
        let t = Instant::now();
        if std::mem::take(&mut first) {
            write_atomic(&dir, "target.json", &target("10.244.1.10"))?;
        }
        if n > 1 {
            write_atomic(&dir, "fillers.json", &fillers(n - 1))?;
        } else {
            let _ = std::fs::remove_file(dir.join("fillers.json"));
        }
        let (synced, wall) = wait_synced(&agent, seen, n, t, Duration::from_secs(600))?;
        let sync_us = synced.took_us;
        // The measured Service must reach b1 for the side-by-side runs.
        if current_backend != "b1" {
            write_atomic(&dir, "target.json", &target("10.244.1.10"))?;
            current_backend = "b1";
        }
        capstan_tests::wait_until(Duration::from_secs(30), || {
            Ok(rr(&topo, client.netns(), &vip, 0.05).is_ok())
        })?;
        let (mut d_rate, mut d_p50, mut d_p99, mut c_rate, mut c_p50, mut c_p99) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let mut errors = 0;
        // Each round measures both paths back to back (in alternating order, so neither
        // always goes first) and gives one ratio; the machine's noise moves both halves
        // of a round together, so the median of the rounds' ratios is the steadiest figure.
        let mut ratios = Vec::new();
        let agent_ticks_before = cpu_ticks(agent.pid());
        let rounds_start = Instant::now();
        for round in 0..rounds {
            let (d, c) = if round % 2 == 0 {
                let d = rr(&topo, client.netns(), direct, seconds)?;
                (d, rr(&topo, client.netns(), &vip, seconds)?)
            } else {
                let c = rr(&topo, client.netns(), &vip, seconds)?;
                (rr(&topo, client.netns(), direct, seconds)?, c)
            };
            ratios.push(c.rate / d.rate);
            errors += d.errors + c.errors;
            d_rate.push(d.rate);
            d_p50.push(d.p50);
            d_p99.push(d.p99);
            c_rate.push(c.rate);
            c_p50.push(c.p50);
            c_p99.push(c.p99);
        }
        // The agent's own CPU use while the paths were measured (it shares the machine).
        let agent_cpu_pct = (cpu_ticks(agent.pid()).saturating_sub(agent_ticks_before)) as f64
            * 10.0
            / rounds_start.elapsed().as_millis().max(1) as f64
            * 100.0;
        // EndpointSlice change -> data path: flip the target between b1 and b2.
        let mut lat_ms = Vec::new();
        // Per change: the write and when the client first reached the new backend.
        let mut change_times: Vec<(u128, u128)> = Vec::new();
        let seen_before_changes = synced_lines(&agent).len();
        for _ in 0..changes {
            let (next, addr) = if current_backend == "b1" {
                ("b2", "10.244.1.11")
            } else {
                ("b1", "10.244.1.10")
            };
            let watcher = topo.spawn(
                client.netns(),
                true,
                Command::new(&bench).args(["until", &vip, next, "10000"]),
            )?;
            watcher.wait_for_line("ready", Duration::from_secs(10))?;
            let t0 = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
            write_atomic(&dir, "target.json", &target(addr))?;
            let line = watcher
                .wait_for_line("at_ns=", Duration::from_secs(15))
                .with_context(|| agent.log())?;
            let at: u128 = line
                .trim()
                .trim_start_matches("at_ns=")
                .parse()
                .context("at_ns")?;
            lat_ms.push((at.saturating_sub(t0)) as f64 / 1e6);
            change_times.push((t0, at));
            current_backend = next;
        }
        // The agent's own share of each change: source noticed -> maps written.
        let lines = synced_lines(&agent);
        let mut agent_ms: Vec<f64> = lines
            .iter()
            .skip(seen_before_changes)
            .map(|l| l.since_change_us as f64 / 1e3)
            .collect();
        let mut model_ms: Vec<f64> = lines
            .iter()
            .skip(seen_before_changes)
            .map(|l| l.model_us as f64 / 1e3)
            .collect();
        // Where the time went: write -> maps written (inotify, re-read, model, maps) and
        // maps written -> the client's first connection to the new backend.
        let mut to_maps_ms = Vec::new();
        let mut to_client_ms = Vec::new();
        for (t0, at) in &change_times {
            if let Some(l) = lines
                .iter()
                .skip(seen_before_changes)
                .find(|l| l.at_ns >= *t0)
            {
                to_maps_ms.push(l.at_ns.saturating_sub(*t0) as f64 / 1e6);
                to_client_ms.push(at.saturating_sub(l.at_ns) as f64 / 1e6);
            }
        }
        let (rss, hwm) = rss_kib(agent.pid());
        let r = json!({
            "services": n,
            "direct": {"rate": median(&mut d_rate), "p50_us": median(&mut d_p50), "p99_us": median(&mut d_p99)},
            "clusterip": {"rate": median(&mut c_rate), "p50_us": median(&mut c_p50), "p99_us": median(&mut c_p99)},
            "ratio": geomean(&ratios),
            "ratio_median": median(&mut ratios.clone()),
            "round_ratios": ratios,
            "ratio_of_medians": median(&mut c_rate) / median(&mut d_rate),
            "errors": errors,
            "agent_cpu_pct_during_rounds": agent_cpu_pct,
            "sync_us": sync_us,
            "program_wall_ms": wall.as_secs_f64() * 1e3,
            "slice_change_ms": {"p50": percentile(&mut lat_ms, 0.5), "p99": percentile(&mut lat_ms, 0.99), "max": percentile(&mut lat_ms, 1.0)},
            "slice_change_agent_ms": {"p50": percentile(&mut agent_ms, 0.5), "p99": percentile(&mut agent_ms, 0.99), "model_p50": percentile(&mut model_ms, 0.5),
                "write_to_maps_p50": percentile(&mut to_maps_ms.clone(), 0.5), "write_to_maps_max": percentile(&mut to_maps_ms, 1.0),
                "maps_to_client_p50": percentile(&mut to_client_ms.clone(), 0.5), "maps_to_client_max": percentile(&mut to_client_ms, 1.0),
                "write_to_maps_each": to_maps_ms},
            "agent_rss_kib": rss,
            "agent_peak_rss_kib": hwm,
        });
        eprintln!("bench: {r}");
        results.push(r);
    }

    let _ = writeln!(
        report,
        "capstan bench clusterip: {rounds} rounds of {seconds} s per path (order alternating), medians; ratio = geometric mean of the rounds' ClusterIP/direct ratios; {ENDPOINTS_PER_SERVICE} endpoints per filler Service; {changes} slice changes per count"
    );
    let _ = writeln!(
        report,
        "{:>8} | {:>10} {:>8} {:>8} | {:>10} {:>8} {:>8} | {:>6} | {:>9} | {:>12} {:>12} | {:>9}",
        "services",
        "direct/s",
        "p50 µs",
        "p99 µs",
        "cluster/s",
        "p50 µs",
        "p99 µs",
        "ratio",
        "sync ms",
        "change p50ms",
        "change p99ms",
        "rss MiB"
    );
    for r in &results {
        let f = |p: &str| r.pointer(p).and_then(|v| v.as_f64()).unwrap_or(0.0);
        let _ = writeln!(
            report,
            "{:>8} | {:>10.0} {:>8.1} {:>8.1} | {:>10.0} {:>8.1} {:>8.1} | {:>6.3} | {:>9.1} | {:>12.2} {:>12.2} | {:>9.1}",
            f("/services"),
            f("/direct/rate"),
            f("/direct/p50_us"),
            f("/direct/p99_us"),
            f("/clusterip/rate"),
            f("/clusterip/p50_us"),
            f("/clusterip/p99_us"),
            f("/ratio"),
            f("/sync_us") / 1e3,
            f("/slice_change_ms/p50"),
            f("/slice_change_ms/p99"),
            f("/agent_rss_kib") / 1024.0
        );
    }
    let _ = writeln!(
        report,
        "programming 10,000 Services x {ENDPOINTS_PER_SERVICE} endpoints from nothing: {:.1} ms in the agent's sync ({:.1} ms model, {:.1} ms diff, {:.1} ms map writes), {:.1} ms from the manifest write (incl. parsing {} MB of JSON)",
        prog_sync_us as f64 / 1e3,
        prog_model_us as f64 / 1e3,
        prog_diff_us as f64 / 1e3,
        prog_apply_us as f64 / 1e3,
        prog_wall.as_secs_f64() * 1e3,
        text.len() / 1_000_000
    );
    print!("{report}");
    let out = json!({"results": results, "program_10k_from_nothing": {"sync_ms": prog_sync_us as f64 / 1e3, "model_ms": prog_model_us as f64 / 1e3, "diff_ms": prog_diff_us as f64 / 1e3, "apply_ms": prog_apply_us as f64 / 1e3, "wall_ms": prog_wall.as_secs_f64() * 1e3}});
    let path = root.join(json_path);
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
    println!("figures written to {}", path.display());
    drop(agent);
    Ok(())
}
