//! Prometheus metrics, with kube-proxy's names where capstan does the same job.
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub network_programming: Histogram,
    pub last_sync: IntGauge,
    pub sync_total: IntCounter,
    pub map_full: IntCounterVec,
    pub map_errors: IntCounter,
    pub map_entries: IntGaugeVec,
    pub datapath: IntGaugeVec,
    pub services: IntGauge,
    pub endpoints: IntGauge,
}

fn buckets() -> Vec<f64> {
    // kube-proxy's: exponential from 1 ms.
    prometheus::exponential_buckets(0.001, 2.0, 15).expect("constant buckets")
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let sync_duration = Histogram::with_opts(
            HistogramOpts::new(
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
            )
            .buckets(buckets()),
        )
        .expect("metric");
        let network_programming = Histogram::with_opts(
            HistogramOpts::new(
                "kubeproxy_network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 20).expect("constant buckets")),
        )
        .expect("metric");
        let last_sync = IntGauge::new(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
        )
        .expect("metric");
        let sync_total =
            IntCounter::new("capstan_sync_total", "Syncs of the data path").expect("metric");
        let map_full = IntCounterVec::new(
            Opts::new(
                "capstan_bpf_map_full_errors_total",
                "Map writes refused because the map was full",
            ),
            &["map"],
        )
        .expect("metric");
        let map_errors = IntCounter::new(
            "capstan_bpf_map_errors_total",
            "Map writes that failed for another reason",
        )
        .expect("metric");
        let map_entries = IntGaugeVec::new(
            Opts::new(
                "capstan_bpf_map_entries",
                "Entries the agent keeps in each map",
            ),
            &["map"],
        )
        .expect("metric");
        let datapath = IntGaugeVec::new(
            Opts::new(
                "capstan_datapath_events_total",
                "Socket-level events counted by the eBPF programs",
            ),
            &["event"],
        )
        .expect("metric");
        let services = IntGauge::new("capstan_frontends", "Frontends programmed").expect("metric");
        let endpoints = IntGauge::new("capstan_backends", "Backends programmed").expect("metric");
        for c in [
            Box::new(sync_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(network_programming.clone()),
            Box::new(last_sync.clone()),
            Box::new(sync_total.clone()),
            Box::new(map_full.clone()),
            Box::new(map_errors.clone()),
            Box::new(map_entries.clone()),
            Box::new(datapath.clone()),
            Box::new(services.clone()),
            Box::new(endpoints.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Metrics {
            registry,
            sync_duration,
            network_programming,
            last_sync,
            sync_total,
            map_full,
            map_errors,
            map_entries,
            datapath,
            services,
            endpoints,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
