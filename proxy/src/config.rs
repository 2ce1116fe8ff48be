//! Command line and `--config` (KubeProxyConfiguration v1alpha1): kube-proxy's interface,
//! plus capstan's own eBPF flags. Flags given on the command line win over the file.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ipnet::IpNet;
use tracing::warn;

use crate::model::Algorithm;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProxyMode {
    Ebpf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LbAlgorithm {
    Random,
    Maglev,
}

/// capstan-proxy: a kube-proxy replacement that balances Services in the kernel with eBPF.
#[derive(Clone, Debug, Parser)]
#[command(name = "capstan-proxy", version)]
pub struct Flags {
    /// Path to a kubeconfig file (else in-cluster config or $KUBECONFIG).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Address of the Kubernetes API server (overrides the kubeconfig's).
    #[arg(long)]
    pub master: Option<String>,
    /// Standalone: read Services, EndpointSlices and Nodes from YAML/JSON files in this
    /// directory instead of the API, and follow its changes.
    #[arg(long, conflicts_with_all = ["kubeconfig", "master"])]
    pub manifests: Option<PathBuf>,
    /// A KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This node's name, if not the hostname.
    #[arg(long)]
    pub hostname_override: Option<String>,
    /// Which proxy mode to use.
    #[arg(long, value_enum)]
    pub proxy_mode: Option<ProxyMode>,
    /// The CIDR range of pods in the cluster (comma-separated for dual-stack).
    #[arg(long, value_delimiter = ',')]
    pub cluster_cidr: Vec<IpNet>,
    /// CIDRs of node addresses NodePorts answer on (default: every address of the node).
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// Where /healthz and /livez answer.
    #[arg(long)]
    pub healthz_bind_address: Option<SocketAddr>,
    /// Where /metrics answers (Prometheus text).
    #[arg(long)]
    pub metrics_bind_address: Option<SocketAddr>,
    /// Remove every program, link and pinned map capstan-proxy made, then exit.
    #[arg(long)]
    pub cleanup: bool,
    /// Log verbosity, as kube-proxy's -v (0-2 info, 4 debug, 6 trace).
    #[arg(short = 'v', long = "v", default_value_t = 0)]
    pub verbosity: u8,
    /// Service CIDRs (comma-separated, as kube-apiserver's flag): a connection to an address
    /// in them that no Service serves is refused at once instead of routed nowhere.
    #[arg(long, value_delimiter = ',')]
    pub service_cluster_ip_range: Vec<IpNet>,
    /// How often the full state is re-checked against the maps (e.g. 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub sync_period: Option<Duration>,
    /// Services labelled service.kubernetes.io/service-proxy-name=<this> are handled;
    /// Services with any other proxy name are left alone.
    #[arg(long)]
    pub service_proxy_name: Option<String>,

    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/capstan")]
    pub bpffs_dir: PathBuf,
    /// cgroup v2 directory whose sockets are balanced (default: the cgroup2 root).
    #[arg(long)]
    pub cgroup_path: Option<PathBuf>,
    /// Default backend selection for Services without the service.capstan.io/lb-algorithm
    /// annotation.
    #[arg(long, value_enum, default_value = "random")]
    pub lb_algorithm: LbAlgorithm,
    /// Maglev table size: a prime, at most 16381.
    #[arg(long, default_value_t = crate::model::maglev::DEFAULT_TABLE_SIZE)]
    pub maglev_table_size: u32,
    /// Maximum frontend + backend-slot entries.
    #[arg(long, default_value_t = capstan_proxy_common::DEFAULT_SERVICES_MAX)]
    pub bpf_lb_service_map_max: u32,
    /// Maximum backends.
    #[arg(long, default_value_t = capstan_proxy_common::DEFAULT_BACKENDS_MAX)]
    pub bpf_lb_backend_map_max: u32,
    /// Maximum sockets remembered for getpeername/recvmsg.
    #[arg(long, default_value_t = capstan_proxy_common::DEFAULT_REVERSE_MAX)]
    pub bpf_sock_rev_map_max: u32,
    /// Maximum session-affinity entries.
    #[arg(long, default_value_t = capstan_proxy_common::DEFAULT_AFFINITY_MAX)]
    pub bpf_lb_affinity_map_max: u32,
    /// Maximum Services using Maglev.
    #[arg(long, default_value_t = capstan_proxy_common::DEFAULT_MAGLEV_MAX)]
    pub bpf_lb_maglev_map_max: u32,
}

/// Where the Services come from.
#[derive(Clone, Debug)]
pub enum SourceKind {
    Manifests(PathBuf),
    Api(crate::source::kube::Connection),
}

/// Flags and config file merged and checked.
#[derive(Clone, Debug)]
pub struct Settings {
    pub source: SourceKind,
    pub node_name: String,
    pub cluster_cidrs: Vec<IpNet>,
    /// Empty: every node address.
    pub nodeport_cidrs: Vec<IpNet>,
    pub healthz: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub sync_period: Duration,
    pub service_proxy_name: Option<String>,
    pub service_cidrs: Vec<IpNet>,
    pub bpffs_dir: PathBuf,
    pub cgroup_path: Option<PathBuf>,
    pub algorithm: Algorithm,
    pub maglev_m: u32,
    pub sizes: crate::dataplane::ebpf::MapSizes,
}

/// KubeProxyConfiguration fields capstan honours; any other field is warned about.
const HONOURED: &[&str] = &[
    "apiVersion",
    "kind",
    "hostnameOverride",
    "clusterCIDR",
    "healthzBindAddress",
    "metricsBindAddress",
    "mode",
    "nodePortAddresses",
    "clientConnection",
    "syncPeriod",
];

fn parse_bind(s: &str, default_port: u16) -> Result<Option<SocketAddr>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(Some(a));
    }
    // kube-proxy also accepts a bare IP, or a CIDR meaning "an address in it".
    let ip = s.split('/').next().unwrap_or(s);
    ip.parse::<std::net::IpAddr>()
        .map(|ip| Some(SocketAddr::new(ip, default_port)))
        .map_err(|_| format!("invalid bind address {s:?}"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Parses `--nodeport-addresses`: CIDRs, or `primary` (kube-proxy's keyword; here: every
/// address, as capstan does not yet tell primary from secondary ones).
pub fn parse_nodeport_cidrs(values: &[String]) -> Result<Vec<IpNet>, String> {
    let mut out = Vec::new();
    for v in values.iter().map(|v| v.trim()).filter(|v| !v.is_empty()) {
        if v == "primary" {
            continue;
        }
        out.push(
            v.parse::<IpNet>()
                .map_err(|_| format!("invalid --nodeport-addresses CIDR {v:?}"))?,
        );
    }
    Ok(out)
}

impl Flags {
    /// Merges the config file (if any) under the flags and validates everything.
    pub fn settings(&self) -> Result<Settings, String> {
        let file: serde_json::Value = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("--config {}: {e}", path.display()))?;
                let v: serde_json::Value = serde_yaml::from_str(&text)
                    .map_err(|e| format!("--config {}: {e}", path.display()))?;
                if v.get("kind").and_then(|k| k.as_str()) != Some("KubeProxyConfiguration") {
                    return Err(format!(
                        "--config {}: kind is not KubeProxyConfiguration",
                        path.display()
                    ));
                }
                if let Some(obj) = v.as_object() {
                    for key in obj.keys().filter(|k| !HONOURED.contains(&k.as_str())) {
                        warn!(field = %key, "KubeProxyConfiguration field not used by capstan-proxy");
                    }
                }
                v
            }
            None => serde_json::Value::Null,
        };
        let s = |k: &str| file.get(k).and_then(|v| v.as_str()).map(str::to_string);

        if let Some(mode) = s("mode").filter(|m| !m.is_empty())
            && mode != "ebpf"
            && self.proxy_mode.is_none()
        {
            return Err(format!(
                "proxy mode {mode:?} is not available yet; use ebpf"
            ));
        }
        let node_name = match self
            .hostname_override
            .clone()
            .or_else(|| s("hostnameOverride"))
            .filter(|h| !h.is_empty())
        {
            Some(h) => h,
            None => nix::unistd::gethostname()
                .map_err(|e| format!("hostname: {e}"))?
                .to_string_lossy()
                .into_owned(),
        }
        .to_lowercase();

        let mut cluster_cidrs = self.cluster_cidr.clone();
        if cluster_cidrs.is_empty() {
            for c in s("clusterCIDR")
                .unwrap_or_default()
                .split(',')
                .filter(|c| !c.is_empty())
            {
                cluster_cidrs.push(
                    c.trim()
                        .parse()
                        .map_err(|_| format!("invalid clusterCIDR {c:?}"))?,
                );
            }
        }
        let np_values: Vec<String> = if !self.nodeport_addresses.is_empty() {
            self.nodeport_addresses.clone()
        } else {
            file.get("nodePortAddresses")
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let nodeport_cidrs = parse_nodeport_cidrs(&np_values)?;

        let healthz = match self.healthz_bind_address {
            Some(a) => Some(a),
            None => match s("healthzBindAddress") {
                Some(v) => parse_bind(&v, 10256)?,
                None => Some("0.0.0.0:10256".parse().expect("constant")),
            },
        };
        let metrics = match self.metrics_bind_address {
            Some(a) => Some(a),
            None => match s("metricsBindAddress") {
                Some(v) => parse_bind(&v, 10249)?,
                None => Some("127.0.0.1:10249".parse().expect("constant")),
            },
        };
        let sync_period = match (self.sync_period, s("syncPeriod")) {
            (Some(d), _) => d,
            (None, Some(v)) => parse_duration(&v)?,
            (None, None) => Duration::from_secs(30),
        };
        let kubeconfig = self.kubeconfig.clone().or_else(|| {
            file.get("clientConnection")?
                .get("kubeconfig")?
                .as_str()
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        });
        let source = match &self.manifests {
            Some(dir) => {
                if !dir.is_dir() {
                    return Err(format!("--manifests {}: not a directory", dir.display()));
                }
                SourceKind::Manifests(dir.clone())
            }
            None => SourceKind::Api(crate::source::kube::Connection {
                kubeconfig,
                master: self.master.clone(),
            }),
        };
        let m = self.maglev_table_size;
        if !crate::model::maglev::is_prime(m)
            || m as usize > capstan_proxy_common::MAGLEV_MAX_TABLE
            || m < 7
        {
            return Err(format!(
                "--maglev-table-size {m}: must be a prime between 7 and {}",
                capstan_proxy_common::MAGLEV_MAX_TABLE
            ));
        }
        for (name, v) in [
            ("--bpf-lb-service-map-max", self.bpf_lb_service_map_max),
            ("--bpf-lb-backend-map-max", self.bpf_lb_backend_map_max),
            ("--bpf-sock-rev-map-max", self.bpf_sock_rev_map_max),
            ("--bpf-lb-affinity-map-max", self.bpf_lb_affinity_map_max),
            ("--bpf-lb-maglev-map-max", self.bpf_lb_maglev_map_max),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.bpffs_dir.parent().is_none() || !self.bpffs_dir.is_absolute() {
            return Err(format!(
                "--bpffs-dir {}: must be an absolute path below a bpffs",
                self.bpffs_dir.display()
            ));
        }
        Ok(Settings {
            source,
            node_name,
            cluster_cidrs,
            nodeport_cidrs,
            healthz,
            metrics,
            sync_period,
            service_proxy_name: self.service_proxy_name.clone(),
            service_cidrs: self
                .service_cluster_ip_range
                .iter()
                .map(|n| n.trunc())
                .collect(),
            bpffs_dir: self.bpffs_dir.clone(),
            cgroup_path: self.cgroup_path.clone(),
            algorithm: match self.lb_algorithm {
                LbAlgorithm::Random => Algorithm::Random,
                LbAlgorithm::Maglev => Algorithm::Maglev,
            },
            maglev_m: m,
            sizes: crate::dataplane::ebpf::MapSizes {
                services: self.bpf_lb_service_map_max,
                backends: self.bpf_lb_backend_map_max,
                reverse: self.bpf_sock_rev_map_max,
                affinity: self.bpf_lb_affinity_map_max,
                maglev: self.bpf_lb_maglev_map_max,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        let mut v = vec!["capstan-proxy"];
        v.extend_from_slice(args);
        Flags::parse_from(v)
    }

    #[test]
    fn config_file_fills_what_flags_leave_out() {
        let dir = std::env::temp_dir().join(format!("capstan-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("kp.yaml");
        std::fs::write(
            &cfg,
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nhostnameOverride: node-a\nclusterCIDR: 10.244.0.0/16,fd00:244::/56\nhealthzBindAddress: 0.0.0.0:10266\nmetricsBindAddress: 127.0.0.1\nsyncPeriod: 15s\nnodePortAddresses: [192.168.0.0/16]\niptables: {masqueradeAll: true}\n",
        )
        .unwrap();
        let s = flags(&[
            "--config",
            cfg.to_str().unwrap(),
            "--manifests",
            dir.to_str().unwrap(),
            "--hostname-override",
            "Node-B",
        ])
        .settings()
        .unwrap();
        assert_eq!(s.node_name, "node-b");
        assert_eq!(s.cluster_cidrs.len(), 2);
        assert_eq!(s.healthz, Some("0.0.0.0:10266".parse().unwrap()));
        assert_eq!(s.metrics, Some("127.0.0.1:10249".parse().unwrap()));
        assert_eq!(s.sync_period, Duration::from_secs(15));
        assert_eq!(
            s.nodeport_cidrs,
            vec!["192.168.0.0/16".parse::<IpNet>().unwrap()]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_values_are_clear_errors() {
        assert!(
            flags(&["--manifests", "/nonexistent-capstan"])
                .settings()
                .unwrap_err()
                .contains("not a directory")
        );
        assert!(
            flags(&["--maglev-table-size", "16383"])
                .settings()
                .unwrap_err()
                .contains("prime")
        );
        assert!(parse_nodeport_cidrs(&["10.0.0.0/33".into()]).is_err());
        assert!(Flags::try_parse_from(["capstan-proxy", "--proxy-mode", "iptables"]).is_err());
    }
}
