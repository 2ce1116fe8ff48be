//! `cargo xtask bench apiserver`: capstan-server with the embedded store and with etcd,
//! side by side in one run: creates per second with 1 and 16 concurrent clients, get and
//! list latency at each object count, watch delivery latency with 100 watchers, and the
//! server's memory idle and at the largest count. A benchmark, not a test: it prints a
//! table and writes JSON.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;

/// Kills the child on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        0.0
    } else {
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn wait_port(port: u16, what: &str, log: &Path) -> Result<()> {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t.elapsed() > Duration::from_secs(30) {
            bail!(
                "{what} did not listen on {port}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn configmap(name: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "annotations": {"bench/sent-ns": now_ns().to_string()}},
        "data": {"key": "value"}
    }))
    .expect("a ConfigMap")
}

struct Backend {
    name: &'static str,
    _etcd: Option<Running>,
    server: Running,
    kubeconfig: PathBuf,
}

fn start(root: &Path, scratch: &Path, name: &'static str) -> Result<Backend> {
    let dir = scratch.join(name);
    std::fs::create_dir_all(&dir)?;
    let mut etcd = None;
    let mut server_args: Vec<String> = Vec::new();
    if name == "etcd" {
        let (client, peer) = (free_port()?, free_port()?);
        let log = dir.join("etcd.log");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.join("etcd-data"))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer}"),
            ])
            .args(["--quota-backend-bytes", "8589934592"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting etcd (apt-get install etcd-server)")?;
        let running = Running(child);
        wait_port(client, "etcd", &log)?;
        server_args.extend([
            "--etcd-servers".into(),
            format!("http://127.0.0.1:{client}"),
        ]);
        etcd = Some(running);
    }
    let port = free_port()?;
    let log = dir.join("server.log");
    let child = Command::new(root.join("target/release/capstan-server"))
        .arg("--data-dir")
        .arg(dir.join("server"))
        .args([
            "--bind-address",
            "127.0.0.1",
            "--secure-port",
            &port.to_string(),
        ])
        .args(&server_args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let server = Running(child);
    wait_port(port, "capstan-server", &log)?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(Backend {
        name,
        _etcd: etcd,
        server,
        kubeconfig: dir.join("server/admin.kubeconfig"),
    })
}

async fn client(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(cfg)?)
}

/// Creates `n` ConfigMaps named `{prefix}-{i}` with `clients` concurrent clients; creates/s.
async fn creates(api: &Api<ConfigMap>, prefix: &str, n: usize, clients: usize) -> Result<f64> {
    let t = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (api, next, prefix) = (api.clone(), next.clone(), prefix.to_string());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), anyhow::Error>(());
                }
                api.create(&PostParams::default(), &configmap(&format!("{prefix}-{i}")))
                    .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

async fn measure(b: &Backend, counts: &[usize], watchers: usize) -> Result<serde_json::Value> {
    let client = client(&b.kubeconfig).await?;
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    ns.create(
        &PostParams::default(),
        &serde_json::from_value(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}}),
        )?,
    )
    .await?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "bench");
    let idle = rss_kib(b.server.0.id());
    let one = creates(&api, "one", 500, 1).await?;
    let sixteen = creates(&api, "many", 4000, 16).await?;

    // Watch delivery: `watchers` watches, then creates spaced out; latency from the
    // create being sent to each watcher seeing it.
    let mut watch_tasks = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<f64>();
    let start_rv = api
        .list(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    for _ in 0..watchers {
        let (api, tx, rv) = (api.clone(), tx.clone(), start_rv.clone());
        watch_tasks.push(tokio::spawn(async move {
            let mut s = api
                .watch(&WatchParams::default().timeout(120), &rv)
                .await?
                .boxed();
            while let Some(ev) = s.try_next().await? {
                if let WatchEvent::Added(cm) = ev
                    && cm
                        .metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| n.starts_with("watched-"))
                    && let Some(sent) = cm
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get("bench/sent-ns"))
                        .and_then(|s| s.parse::<u128>().ok())
                {
                    let _ = tx.send(now_ns().saturating_sub(sent) as f64 / 1e6);
                }
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    drop(tx);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = 50;
    for i in 0..events {
        api.create(&PostParams::default(), &configmap(&format!("watched-{i}")))
            .await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut lat = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while lat.len() < events * watchers && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(v)) => lat.push(v),
            _ => break,
        }
    }
    for t in watch_tasks {
        t.abort();
    }
    let delivered = lat.len();
    let (w50, w99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));

    // Get and list latency at each object count.
    let mut at = Vec::new();
    let mut have = 4500 + events;
    for &n in counts {
        if n > have {
            creates(&api, &format!("fill{n}"), n - have, 16).await?;
            have = n;
        }
        let mut gets = Vec::new();
        for i in 0..200 {
            let t = Instant::now();
            api.get(&format!("many-{}", (i * 37) % 4000)).await?;
            gets.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let mut lists = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let l = api.list(&ListParams::default()).await?;
            lists.push(t.elapsed().as_secs_f64() * 1e3);
            if l.items.len() < n {
                bail!("list returned {} of {n} objects", l.items.len());
            }
        }
        at.push(json!({"objects": n, "get_p50_ms": pct(&mut gets.clone(), 0.5), "get_p99_ms": pct(&mut gets, 0.99),
            "list_p50_ms": pct(&mut lists, 0.5), "rss_kib": rss_kib(b.server.0.id())}));
    }
    Ok(json!({
        "backend": b.name,
        "creates_per_s_1_client": one,
        "creates_per_s_16_clients": sixteen,
        "watch_p50_ms": w50, "watch_p99_ms": w99, "watchers": watchers,
        "watch_events_delivered": delivered, "watch_events_expected": events * watchers,
        "idle_rss_kib": idle,
        "at": at,
    }))
}

pub fn run(root: &Path, counts: Vec<usize>, watchers: usize, json_path: PathBuf) -> Result<()> {
    capstan_tests::require_root();
    crate::run(crate::cargo().current_dir(root).args([
        "build",
        "--release",
        "-p",
        "capstan-controlplane",
        "-p",
        "xtask",
    ]))?;
    // The client side (100 watchers decoding every event) is part of what is measured:
    // it runs optimized, as the server does.
    if cfg!(debug_assertions) {
        let counts: Vec<String> = counts.iter().map(|c| c.to_string()).collect();
        return crate::run(
            Command::new(root.join("target/release/xtask"))
                .current_dir(root)
                .args(["bench", "apiserver", "--counts", &counts.join(",")])
                .args(["--watchers", &watchers.to_string(), "--json"])
                .arg(&json_path),
        );
    }
    let scratch =
        std::env::temp_dir().join(format!("capstan-bench-apiserver-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut results = Vec::new();
    for name in ["embedded", "etcd"] {
        eprintln!("bench: capstan-server with the {name} store");
        let b = start(root, &scratch, name)?;
        let r = rt.block_on(measure(&b, &counts, watchers))?;
        eprintln!("bench: {r}");
        results.push(r);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let mut report = String::new();
    let _ = writeln!(
        report,
        "capstan bench apiserver: ConfigMaps in one namespace; {watchers} watchers; latencies in ms"
    );
    let _ = writeln!(
        report,
        "{:>9} | {:>9} {:>10} | {:>8} {:>8} | {:>8} | {:>8} {:>8} {:>8} {:>8} {:>9}",
        "store",
        "create/s 1",
        "create/s 16",
        "watch p50",
        "watch p99",
        "idle MiB",
        "objects",
        "get p50",
        "get p99",
        "list p50",
        "rss MiB"
    );
    for r in &results {
        let f = |p: &str| r.pointer(p).and_then(|v| v.as_f64()).unwrap_or(0.0);
        for (i, a) in r["at"].as_array().into_iter().flatten().enumerate() {
            let g = |p: &str| a.pointer(p).and_then(|v| v.as_f64()).unwrap_or(0.0);
            let head = if i == 0 {
                format!(
                    "{:>9} | {:>9.0} {:>10.0} | {:>8.2} {:>8.2} | {:>8.1}",
                    r["backend"].as_str().unwrap_or(""),
                    f("/creates_per_s_1_client"),
                    f("/creates_per_s_16_clients"),
                    f("/watch_p50_ms"),
                    f("/watch_p99_ms"),
                    f("/idle_rss_kib") / 1024.0
                )
            } else {
                format!(
                    "{:>9} | {:>9} {:>10} | {:>8} {:>8} | {:>8}",
                    "", "", "", "", "", ""
                )
            };
            let _ = writeln!(
                report,
                "{head} | {:>8.0} {:>8.2} {:>8.2} {:>8.1} {:>9.1}",
                g("/objects"),
                g("/get_p50_ms"),
                g("/get_p99_ms"),
                g("/list_p50_ms"),
                g("/rss_kib") / 1024.0
            );
        }
    }
    print!("{report}");
    let path = root.join(json_path);
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({"results": results}))?,
    )?;
    println!("figures written to {}", path.display());
    Ok(())
}
