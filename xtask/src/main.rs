//! `cargo xtask`: capstan's build, test, demo and benchmark driver.
//!
//! - `build`: installs what the eBPF build lacks (rust-src for the nightly, bpf-linker
//!   against the nightly's own LLVM), builds the eBPF object into `proxy/bpf/` and the
//!   release binaries.
//! - `build-ebpf [--check]`: only the eBPF object; `--check` fails when the committed
//!   object differs from a fresh, reproducible build of the source.
//! - `test`: everything CI runs: the stale-object check and every test in the workspace.
//! - `demo`: capstan-server, kubectl and capstan-proxy: a ClusterIP working in namespaces.
//! - `bench clusterip`: the ClusterIP benchmark; `bench apiserver`: capstan-server with the
//!   embedded store and with etcd (benchmarks, not tests).
mod bench;
mod bench_apiserver;
mod demo;
mod ebpf;

use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain pieces if missing, build the eBPF object and the binaries.
    Build,
    /// Build the eBPF object (reproducibly) into proxy/bpf/.
    BuildEbpf {
        /// Do not write: fail if the committed object differs from a fresh build.
        #[arg(long)]
        check: bool,
    },
    /// Run every test (root needed for the integration tests) and the stale-object check.
    Test {
        /// Extra arguments for `cargo test` (after --).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Start capstan-proxy standalone against backends in namespaces and show a ClusterIP.
    Demo,
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Waits until a process's stderr (where capstan-proxy logs) has a line containing `needle`.
pub fn wait_for_log(
    p: &capstan_tests::Proc,
    needle: &str,
    timeout: std::time::Duration,
) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while !p.stderr().contains(needle) {
        if std::time::Instant::now() > deadline || !p.is_running() {
            bail!("no {needle:?} in the log within {timeout:?}\n{}", p.log());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}

/// capstan-proxy standalone on a topology's node `node1`: its manifests, cgroup and bpffs
/// directory, health and metrics inside the node's namespace.
/// Where the agent reads Services from.
pub enum AgentSource<'a> {
    Manifests(&'a std::path::Path),
    Kubeconfig(&'a std::path::Path),
}

pub fn agent_command(topo: &capstan_tests::Topology, source: AgentSource<'_>) -> Result<Command> {
    let mut cmd = Command::new(capstan_tests::bin_path("capstan-proxy")?);
    match source {
        AgentSource::Manifests(dir) => cmd.arg("--manifests").arg(dir),
        AgentSource::Kubeconfig(path) => cmd.arg("--kubeconfig").arg(path),
    };
    cmd.arg("--bpffs-dir")
        .arg(topo.bpffs_dir())
        .arg("--cgroup-path")
        .arg(topo.cgroup_path())
        .args(["--hostname-override", "node1"])
        .args(["--healthz-bind-address", "127.0.0.1:10256"])
        .args(["--metrics-bind-address", "127.0.0.1:10249"]);
    Ok(cmd)
}

/// Builds the binaries the harness runs (the agent and the test helpers).
pub fn build_bins(root: &std::path::Path, release: bool) -> Result<()> {
    let mut cmd = cargo();
    cmd.current_dir(root).arg("build");
    if release {
        cmd.arg("--release");
    }
    run(cmd.args([
        "-p",
        "capstan-proxy",
        "-p",
        "capstan-controlplane",
        "-p",
        "capstan-tests",
        "--bins",
    ]))
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = capstan_tests::workspace_root();
    let result = match cli.cmd {
        Cmd::Build => ebpf::ensure_toolchain()
            .and_then(|_| ebpf::build(&root, false))
            .and_then(|_| run(cargo().current_dir(&root).args(["build", "--release"]))),
        Cmd::BuildEbpf { check } => {
            ebpf::ensure_toolchain().and_then(|_| ebpf::build(&root, check))
        }
        Cmd::Test { args } => test(&root, &args),
        Cmd::Demo => demo::run(&root),
        Cmd::Bench { which } => bench::run(&root, which),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn test(root: &std::path::Path, args: &[String]) -> Result<()> {
    ebpf::ensure_toolchain()?;
    ebpf::build(root, true)?;
    // The integration tests run the real binaries: build them first so none is stale.
    build_bins(root, false)?;
    let mut cmd = cargo();
    cmd.current_dir(root).args(["test", "--no-fail-fast"]); // default members: proxy-ebpf builds only for BPF
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    run(&mut cmd)
}
