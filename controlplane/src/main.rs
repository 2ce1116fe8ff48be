use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing::error;

use capstan_controlplane::server::{self, Options};

/// capstan-server: a compact Kubernetes-compatible API server (embedded store).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Flags {
    /// Where the store, TLS material and tokens live (created root-only).
    #[arg(long, default_value = "/var/lib/capstan/server")]
    data_dir: PathBuf,
    /// The address to serve HTTPS on (kube-apiserver's --bind-address and --secure-port).
    #[arg(long, default_value = "0.0.0.0")]
    bind_address: std::net::IpAddr,
    #[arg(long, default_value_t = 6443)]
    secure_port: u16,
    /// The address advertised to the cluster (the `kubernetes` Service's endpoint).
    #[arg(long)]
    advertise_address: Option<std::net::IpAddr>,
    /// ClusterIP ranges, one per family (dual-stack: comma-separated).
    #[arg(long, default_value = "10.96.0.0/12", value_delimiter = ',')]
    service_cluster_ip_range: Vec<ipnet::IpNet>,
    /// NodePort range, as kube-apiserver's (`30000-32767`).
    #[arg(long, default_value = "30000-32767")]
    service_node_port_range: String,
    /// Serve requests without credentials (off by default).
    #[arg(long, default_value_t = false)]
    anonymous_auth: bool,
    /// Where the admin kubeconfig is written (default: DATA_DIR/admin.kubeconfig).
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Extra names and addresses for the serving certificate.
    #[arg(long, value_delimiter = ',')]
    tls_san: Vec<String>,
    /// etcd client URLs (http://host:2379, comma-separated); without it the embedded store
    /// in DATA_DIR/store is used.
    #[arg(long, value_delimiter = ',')]
    etcd_servers: Vec<String>,
    /// Log verbosity (0-2 info, 4 debug, 6 trace).
    #[arg(short = 'v', long = "v", default_value_t = 0)]
    verbosity: u8,
}

fn node_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("--service-node-port-range {s:?}: expected FIRST-LAST"))?;
    let (a, b): (u16, u16) = (
        a.trim()
            .parse()
            .map_err(|_| format!("--service-node-port-range {s:?}: bad first port"))?,
        b.trim()
            .parse()
            .map_err(|_| format!("--service-node-port-range {s:?}: bad last port"))?,
    );
    if a == 0 || a > b {
        return Err(format!("--service-node-port-range {s:?}: empty range"));
    }
    Ok((a, b))
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    let level = match flags.verbosity {
        0..=3 => "info",
        4..=5 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAPSTAN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("capstan_controlplane={level},warn"))
    });
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let node_ports = match node_port_range(&flags.service_node_port_range) {
        Ok(r) => r,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    let families: Vec<bool> = flags
        .service_cluster_ip_range
        .iter()
        .map(|r| matches!(r, ipnet::IpNet::V6(_)))
        .collect();
    if families.len() > 2 || (families.len() == 2 && families[0] == families[1]) {
        error!("--service-cluster-ip-range: at most one range per IP family");
        return ExitCode::from(2);
    }
    let opts = Options {
        kubeconfig_out: flags
            .kubeconfig_out
            .clone()
            .unwrap_or_else(|| flags.data_dir.join("admin.kubeconfig")),
        data_dir: flags.data_dir,
        bind: SocketAddr::new(flags.bind_address, flags.secure_port),
        advertise: flags.advertise_address,
        service_ranges: flags.service_cluster_ip_range,
        node_ports,
        anonymous: flags.anonymous_auth,
        extra_sans: flags.tls_san,
        etcd_servers: (!flags.etcd_servers.is_empty()).then_some(flags.etcd_servers),
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(server::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
