use std::process::ExitCode;

use clap::Parser;
use tracing::{error, info};

use capstan_proxy::config::Flags;
use capstan_proxy::{app, dataplane::ebpf};

fn init_logging(v: u8) {
    let level = match v {
        0..=3 => "info",
        4..=5 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAPSTAN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("capstan_proxy={level},warn"))
    });
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    init_logging(flags.verbosity);
    if flags.cleanup {
        return match ebpf::cleanup(&flags.bpffs_dir) {
            Ok(n) => {
                info!(removed = n, dir = %flags.bpffs_dir.display(), "cleaned up: programs detached, maps unpinned");
                ExitCode::SUCCESS
            }
            Err(e) => {
                error!(dir = %flags.bpffs_dir.display(), error = %e, "cleanup failed");
                ExitCode::FAILURE
            }
        };
    }
    let settings = match flags.settings() {
        Ok(s) => s,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(app::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
