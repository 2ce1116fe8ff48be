//! The agent: wires a source, the model and a data plane together and keeps them in step.
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::config::{Settings, SourceKind};
use crate::dataplane::{Dataplane, ebpf};
use crate::health::{self, Health};
use crate::metrics::Metrics;
use crate::model::{self, NodeContext};
use crate::node;
use crate::source::{self, Update};

struct Syncer<D: Dataplane> {
    dp: D,
    model: model::Model,
    ctx: NodeContext,
    metrics: Arc<Metrics>,
    health: Health,
    latest: Option<Update>,
    /// Whether `latest` has been programmed yet (for the programming-latency metric).
    pending: bool,
    addrs: BTreeSet<IpAddr>,
    last_full: Instant,
    /// How long the last periodic full resync took.
    last_full_took: Duration,
}

impl<D: Dataplane> Syncer<D> {
    fn sync(&mut self) {
        let Some(update) = self.latest.clone() else {
            return;
        };
        let start = Instant::now();
        let desired = self.model.desired_state(&update.snapshot, &self.ctx);
        let model_us = start.elapsed().as_micros() as u64;
        let report = tokio::task::block_in_place(|| self.dp.sync(&desired, &self.addrs));
        let took = start.elapsed();
        self.metrics.sync_duration.observe(took.as_secs_f64());
        self.metrics.sync_total.inc();
        for map in &report.full_maps {
            self.metrics.map_full.with_label_values(&[map]).inc();
        }
        self.metrics.map_errors.inc_by(report.errors as u64);
        for (map, n) in self.dp.map_entries() {
            self.metrics
                .map_entries
                .with_label_values(&[map])
                .set(n as i64);
        }
        let (frontends, backends) = self.model.counts();
        self.metrics.services.set(frontends as i64);
        self.metrics.endpoints.set(backends as i64);
        if self.pending {
            self.pending = false;
            let latency = match update.trigger_time {
                Some(t) => SystemTime::now().duration_since(t).unwrap_or_default(),
                None => update.observed_at.elapsed(),
            };
            self.metrics
                .network_programming
                .observe(latency.as_secs_f64());
        }
        if report.failed_plans.is_empty() && report.errors == 0 {
            self.metrics.last_sync.set(
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0),
            );
            self.health.updated();
        }
        let eligible = !update.snapshot.nodes.values().any(|n| {
            n.metadata.name.as_deref() == Some(self.ctx.node_name.as_str())
                && n.metadata.deletion_timestamp.is_some()
        });
        self.health.set_node_eligible(eligible);
        if report.writes > 0 || !report.failed_plans.is_empty() {
            info!(
                plans = desired.plans.len(),
                frontends,
                backends,
                writes = report.writes,
                failed = report.failed_plans.len(),
                model_us,
                diff_us = report.diff_us,
                apply_us = report.apply_us,
                took_us = took.as_micros() as u64,
                since_change_us = update.observed_at.elapsed().as_micros() as u64,
                "synced"
            );
        }
    }

    fn refresh_counters(&self) {
        for (name, v) in self.dp.counters() {
            self.metrics
                .datapath
                .with_label_values(&[name])
                .set(v as i64);
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT. The programs stay attached after it exits.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let cgroup = match &settings.cgroup_path {
        Some(p) => p.clone(),
        None => node::cgroup2_root().context("finding a cgroup v2 mount")?,
    };
    let opts = ebpf::Options {
        pin_dir: settings.bpffs_dir.clone(),
        cgroup: cgroup.clone(),
        sizes: settings.sizes,
        maglev_m: settings.maglev_m,
        service_cidrs: settings.service_cidrs.clone(),
    };
    let dp = ebpf::EbpfDataplane::start(&opts).context("starting the eBPF data plane")?;
    info!(node = %settings.node_name, cgroup = %cgroup.display(), "capstan-proxy running in ebpf mode");

    let metrics = Arc::new(Metrics::new());
    let health = Health::new(settings.sync_period);
    if let Some(addr) = settings.healthz {
        let h = health.clone();
        tokio::spawn(async move {
            if let Err(e) = health::serve_health(addr, h).await {
                error!(address = %addr, error = %e, "healthz server failed");
            }
        });
    }
    if let Some(addr) = settings.metrics {
        let (m, h) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            if let Err(e) = health::serve_metrics(addr, m, h).await {
                error!(address = %addr, error = %e, "metrics server failed");
            }
        });
    }

    let (tx, mut rx) = tokio::sync::watch::channel(None);
    let mut source_task = match settings.source.clone() {
        SourceKind::Manifests(dir) => tokio::spawn(source::manifests::run(dir, tx)),
        SourceKind::Api(conn) => {
            tokio::spawn(source::kube::run(conn, settings.node_name.clone(), tx))
        }
    };

    let mut syncer = Syncer {
        dp,
        model: model::Model::default(),
        ctx: NodeContext {
            node_name: settings.node_name.clone(),
            service_proxy_name: settings.service_proxy_name.clone(),
            default_algorithm: settings.algorithm,
        },
        metrics,
        health,
        latest: None,
        pending: false,
        addrs: node::nodeport_addresses(&settings.nodeport_cidrs)
            .context("reading node addresses")?,
        last_full: Instant::now(),
        last_full_took: Duration::ZERO,
    };

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    // The source ended: report why.
                    let res = (&mut source_task).await;
                    return match res {
                        Ok(Ok(())) => Err(anyhow::anyhow!("the source of Services stopped")),
                        Ok(Err(e)) => Err(e.context("the source of Services failed")),
                        Err(e) => Err(anyhow::anyhow!("the source of Services panicked: {e}")),
                    };
                }
                syncer.latest = rx.borrow_and_update().clone();
                syncer.pending = true;
                syncer.health.queued();
                syncer.sync();
            }
            _ = tick.tick() => {
                match node::nodeport_addresses(&settings.nodeport_cidrs) {
                    Ok(addrs) if addrs != syncer.addrs => {
                        info!(count = addrs.len(), "node addresses changed");
                        syncer.addrs = addrs;
                        syncer.sync();
                    }
                    Ok(_) => {
                        // The periodic full resync (a safety net under the incremental
                        // diff) every sync period, but never more than 1% of a core: at
                        // 100,000 Services a full diff takes long enough to matter to the
                        // workloads sharing the node.
                        let due = settings.sync_period.max(syncer.last_full_took * 100);
                        if syncer.last_full.elapsed() >= due {
                            let t = Instant::now();
                            syncer.dp.resync();
                            syncer.sync();
                            syncer.last_full = Instant::now();
                            syncer.last_full_took = t.elapsed();
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot read node addresses"),
                }
                syncer.refresh_counters();
            }
            _ = term.recv() => { info!("SIGTERM: exiting; programs and maps stay pinned"); break; }
            _ = int.recv() => { info!("SIGINT: exiting; programs and maps stay pinned"); break; }
        }
    }
    Ok(())
}
