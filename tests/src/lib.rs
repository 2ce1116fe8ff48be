//! # capstan-tests: the integration-test harness for capstan
//!
//! capstan replaces kube-proxy by load-balancing Service traffic at the socket level with eBPF.
//! Testing that needs real kernels objects — network namespaces, veth pairs, cgroups, bpffs —
//! and real processes talking to each other. This crate builds those, per test, and cleans them
//! up again:
//!
//! * [`Topology`] — one per test. Owns a unique name prefix, a scratch directory under `/tmp`,
//!   a cgroup v2 directory and a (not yet created) bpffs directory. It creates [`Node`]s
//!   (network namespaces with forwarding on and a node address on `lo`) and [`Pod`]s (network
//!   namespaces wired to a node by a veth pair), spawns processes inside them ([`Proc`]),
//!   and tears everything down on drop, also while a test panics.
//! * Two helper binaries of this crate: `capstan-echo` (a TCP/UDP server that answers with its
//!   name and the client address it saw) and `capstan-probe` (a client driven line by line over
//!   stdin, wrapped by [`Probe`]).
//! * [`bin_path`] finds (and if needed builds) those binaries and the agent `capstan-proxy`.
//! * [`proxy`] — the fixture of the agent's integration tests (`tests/proxy_*.rs`): a node
//!   with backend pods, a client in the cgroup, a manifest directory with small builders
//!   for Services and EndpointSlices, and the agent started, stopped and restarted.
//!
//! ## Safety rules the harness follows
//!
//! * Everything it creates has a name that starts with the topology's prefix
//!   (`c<pid in hex>-<counter>`), so tests run in parallel (threads or processes) never collide.
//! * It never touches the host's own interfaces or routes: veth pairs are created directly
//!   inside the node namespace (`ip -n NODE link add … peer … netns POD`), and every route it
//!   adds points at the test's own addresses. No namespace gets a default route off the
//!   machine: a pod's default route leads to its node, and the node has no default route, so
//!   an untranslated Service VIP fails with `ENETUNREACH`/`EHOSTUNREACH` instead of leaving.
//! * Processes enter a namespace with `nsenter --net=/run/netns/NAME`, which changes only the
//!   network namespace (`ip netns exec` would also remount `/sys` and hide the cgroup2 and
//!   bpffs mounts from the process).
//!
//! ## Example
//!
//! ```no_run
//! use capstan_tests::*;
//! use std::net::SocketAddr;
//!
//! # fn main() -> anyhow::Result<()> {
//! require_root();
//! let topo = Topology::new()?;
//! let node = topo.node("n1")?;
//! let a = topo.pod(&node, "a", "10.244.0.10".parse()?, "fd00:244::10".parse()?)?;
//! let b = topo.pod(&node, "b", "10.244.0.11".parse()?, "fd00:244::11".parse()?)?;
//! let _echo = topo.spawn_echo(a.netns(), false, "a", &["0.0.0.0:80".parse()?], &[])?;
//! let probe = topo.probe(b.netns(), true)?;
//! let reply = probe.tcp("10.244.0.10:80".parse::<SocketAddr>()?)?;
//! assert!(reply.ok, "{}", reply.raw);
//! assert_eq!(reply.backend.as_deref(), Some("a"));
//! assert_eq!(reply.seen_ip.as_deref(), Some("10.244.0.11"));
//! # Ok(()) }
//! ```
//!
//! ## Extending to several nodes
//!
//! Nodes are independent namespaces created by [`Topology::node`] (each gets its own node
//! addresses, by default `10.200.0.<n>` / `fd00:200::<n>`). Connecting two nodes later only
//! needs one more method that adds a veth pair between two node namespaces plus `/32`/`/128`
//! routes to the other node's addresses and pods; nothing else has to change.

pub mod proxy;

use anyhow::{Context, Result, anyhow, bail, ensure};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

pub use nix::sys::signal::Signal;

/// If this environment variable is set (to anything), a topology keeps its scratch directory
/// (process logs) after it is dropped, and says where on stderr.
pub const ENV_KEEP_TEST_DIRS: &str = "CAPSTAN_KEEP_TEST_DIRS";

/// If set, [`bin_path`] looks for binaries in this directory first.
pub const ENV_BIN_DIR: &str = "CAPSTAN_BIN_DIR";

/// Longest Linux interface name (`IFNAMSIZ - 1`).
pub const MAX_IFNAME_LEN: usize = 15;

/// Link-local address every node-side veth carries; pods use it as their IPv6 default gateway
/// (IPv6 neighbour discovery only answers for addresses on the receiving link, so the node's
/// own address on `lo` cannot serve as an on-link IPv6 gateway).
pub const POD_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Where `ip netns` keeps its namespace handles.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Where bpffs is expected (and mounted by [`ensure_bpffs`]).
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Default time [`Probe::cmd`] waits for a result line.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// Panics with a clear message unless the process runs as root (every test here creates
/// namespaces, links and cgroups).
pub fn require_root() {
    if !nix::unistd::Uid::effective().is_root() {
        panic!(
            "capstan integration tests must run as root: they create network namespaces, \
             veth pairs and cgroups (run e.g. `sudo -E cargo test -p capstan-tests`)"
        );
    }
}

/// Locks a mutex, ignoring poisoning: the harness must keep cleaning up after a panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `f` every 20 ms until it returns `Ok(true)` or `timeout` passes (an error from `f`
/// ends the wait at once).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Mounts: cgroup2 and bpffs
// ---------------------------------------------------------------------------------------------

/// One line of `/proc/self/mountinfo`, reduced to what the harness needs.
#[derive(Debug, Clone)]
struct MountEntry {
    mount_point: PathBuf,
    fs_type: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mountinfo() -> Result<Vec<MountEntry>> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines() {
        // "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mp) = left.split(' ').nth(4) else {
            continue;
        };
        let Some(fs_type) = right.split(' ').next() else {
            continue;
        };
        out.push(MountEntry {
            mount_point: PathBuf::from(unescape_mountinfo(mp)),
            fs_type: fs_type.to_string(),
        });
    }
    Ok(out)
}

/// The first cgroup2 mount point of this mount namespace, from `/proc/self/mountinfo`
/// (on the CI machines `/sys/fs/cgroup/unified`, on pure v2 hosts `/sys/fs/cgroup`).
pub fn cgroup2_mount() -> Result<PathBuf> {
    mountinfo()?
        .into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
        .ok_or_else(|| anyhow!("no cgroup2 mount found in /proc/self/mountinfo"))
}

/// Whether a bpffs is mounted exactly at `path`.
pub fn is_bpffs_mounted(path: &Path) -> Result<bool> {
    Ok(mountinfo()?
        .iter()
        .any(|m| m.fs_type == "bpf" && m.mount_point == path))
}

/// Mounts bpffs at `/sys/fs/bpf` if no bpffs is mounted there yet; returns whether it mounted.
///
/// Mounting bpffs is the agent's job in production; this helper exists for the harness's own
/// self-test (and for tests that pin things without running the agent).
pub fn ensure_bpffs() -> Result<bool> {
    static GUARD: Mutex<()> = Mutex::new(());
    let _g = lock(&GUARD);
    let root = Path::new(BPFFS_ROOT);
    if is_bpffs_mounted(root)? {
        return Ok(false);
    }
    fs::create_dir_all(root).with_context(|| format!("creating {BPFFS_ROOT}"))?;
    nix::mount::mount(
        Some("bpffs"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .with_context(|| format!("mounting bpffs at {BPFFS_ROOT}"))?;
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------------------------

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The cargo package that builds binary `name`.
fn package_of_bin(name: &str) -> Result<&'static str> {
    match name {
        "capstan-echo" | "capstan-probe" => Ok("capstan-tests"),
        "capstan-proxy" => Ok("capstan-proxy"),
        "capstan-server" => Ok("capstan-controlplane"),
        other => bail!("bin_path: don't know which package builds binary {other:?}"),
    }
}

fn bin_candidates(name: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os(ENV_BIN_DIR) {
        dirs.push(PathBuf::from(d));
    }
    // Test executables live in target/debug/deps/, binaries in target/debug/.
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        dirs.push(dir.to_path_buf());
        if let Some(up) = dir.parent() {
            dirs.push(up.to_path_buf());
        }
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(t).join("debug"));
    }
    dirs.push(workspace_root().join("target").join("debug"));
    dirs.into_iter().map(|d| d.join(name)).collect()
}

fn find_bin(name: &str) -> Option<PathBuf> {
    bin_candidates(name).into_iter().find(|p| p.is_file())
}

/// Path of a workspace binary: `capstan-echo`, `capstan-probe` (this crate) or
/// `capstan-proxy` (the agent).
///
/// Looks in `$CAPSTAN_BIN_DIR`, next to the running test executable (and one directory up,
/// since tests run from `target/debug/deps/`), in `$CARGO_TARGET_DIR/debug` and in
/// `<workspace>/target/debug`. If none has it, runs `cargo build -p <package> --bin <name>`
/// once (debug profile) and looks again. An existing binary is used as is: build the agent
/// before the tests if it may be stale.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    static BUILD: Mutex<()> = Mutex::new(());
    if let Some(p) = find_bin(name) {
        return Ok(p);
    }
    let package = package_of_bin(name)?;
    let _g = lock(&BUILD);
    if let Some(p) = find_bin(name) {
        return Ok(p);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args(["build", "-p", package, "--bin", name])
        .current_dir(workspace_root())
        .output()
        .with_context(|| format!("running cargo build -p {package} --bin {name}"))?;
    ensure!(
        out.status.success(),
        "cargo build -p {package} --bin {name} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    find_bin(name).ok_or_else(|| {
        anyhow!(
            "built {name} but cannot find it; looked at {:?}",
            bin_candidates(name)
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Command helpers
// ---------------------------------------------------------------------------------------------

/// Runs a command and fails (with its stdout/stderr in the error) unless it exits 0;
/// returns stdout.
fn run_checked(cmd: &mut Command) -> Result<String> {
    let desc = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {desc}"))?;
    ensure!(
        out.status.success(),
        "{desc} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Path of the handle of a named network namespace.
pub fn netns_path(netns: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(netns)
}

/// Builds `nsenter --net=/run/netns/<netns> -- <program> <args>` from `cmd`, keeping its
/// environment changes and working directory (an `env_clear` cannot be seen and is lost).
fn nsenter_command(netns: &str, cmd: &Command) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns_path(netns).display()))
        .arg("--")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        c.current_dir(d);
    }
    c
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut v = Vec::new();
    loop {
        v.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    v.reverse();
    String::from_utf8_lossy(&v).into_owned()
}

fn check_name(what: &str, name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'),
        "{what} name {name:?} must be 1-32 chars of [a-z0-9-]"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Topology
// ---------------------------------------------------------------------------------------------

/// Addresses of a node (see [`Topology::node_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeOptions {
    /// Node IPv4 address, put on the node namespace's `lo` as a `/32`.
    pub addr_v4: Ipv4Addr,
    /// Node IPv6 address, put on the node namespace's `lo` as a `/128`.
    pub addr_v6: Ipv6Addr,
}

impl NodeOptions {
    /// The default addresses of the `index`-th node (0-based): `10.200.0.<index+1>` and
    /// `fd00:200::<index+1>`.
    pub fn for_index(index: usize) -> NodeOptions {
        let n = (index + 1) as u16;
        NodeOptions {
            addr_v4: Ipv4Addr::new(10, 200, (n >> 8) as u8, n as u8),
            addr_v6: Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, n),
        }
    }
}

/// A node: a network namespace with `lo` up, IPv4/IPv6 forwarding on and the node addresses
/// on `lo`. Pods hang off it by veth pairs. Cheap to clone; it does not own anything (the
/// [`Topology`] does).
#[derive(Debug, Clone)]
pub struct Node {
    name: String,
    netns: String,
    addr_v4: Ipv4Addr,
    addr_v6: Ipv6Addr,
}

impl Node {
    /// The short name given to [`Topology::node`].
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The network namespace name (`<prefix>-<name>`), usable with [`Topology::spawn`] etc.
    pub fn netns(&self) -> &str {
        &self.netns
    }
    /// The node's IPv4 address (on its `lo`).
    pub fn addr_v4(&self) -> Ipv4Addr {
        self.addr_v4
    }
    /// The node's IPv6 address (on its `lo`).
    pub fn addr_v6(&self) -> Ipv6Addr {
        self.addr_v6
    }
}

/// A pod: a network namespace with `lo` up and `eth0`, one end of a veth pair whose other end
/// (`host_veth`) is in the node namespace. `eth0` has the pod's `/32` and `/128` (no DAD);
/// default routes go to the node (`via <node v4> onlink`, `via fe80::1`), and the node routes
/// the pod's two addresses over the veth. Cheap to clone; owned by the [`Topology`].
#[derive(Debug, Clone)]
pub struct Pod {
    name: String,
    netns: String,
    node_netns: String,
    host_veth: String,
    addr_v4: Ipv4Addr,
    addr_v6: Ipv6Addr,
}

impl Pod {
    /// The short name given to [`Topology::pod`].
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The pod's network namespace name (`<prefix>-<name>`).
    pub fn netns(&self) -> &str {
        &self.netns
    }
    /// The network namespace of the node the pod is attached to.
    pub fn node_netns(&self) -> &str {
        &self.node_netns
    }
    /// Name of the node-side end of the pod's veth pair (in the node namespace).
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }
    /// The pod's IPv4 address.
    pub fn addr_v4(&self) -> Ipv4Addr {
        self.addr_v4
    }
    /// The pod's IPv6 address.
    pub fn addr_v6(&self) -> Ipv6Addr {
        self.addr_v6
    }
}

#[derive(Default)]
struct TopoState {
    /// Every namespace name the topology created (or tried to), in creation order.
    netns: Vec<String>,
    /// Number of nodes created so far (for default node addresses).
    nodes: usize,
    /// Counter for veth names.
    veths: u64,
    /// Every process spawned; `Weak` because a dropped [`Proc`] has already been reaped.
    procs: Vec<Weak<ProcShared>>,
}

/// The network/cgroup world of one test. See the crate docs.
///
/// All methods take `&self`, so a topology can be shared with helper threads. Everything it
/// creates is destroyed when it is dropped (also during a panic); [`Topology::close`] does the
/// same but reports cleanup errors.
pub struct Topology {
    prefix: String,
    scratch: PathBuf,
    cgroup: PathBuf,
    bpffs: PathBuf,
    state: Mutex<TopoState>,
    proc_seq: AtomicU32,
    torn_down: bool,
}

static TOPOLOGY_COUNTER: AtomicU32 = AtomicU32::new(0);

impl Topology {
    /// Creates a topology with a fresh prefix `c<pid hex>-<counter base36>`, its scratch
    /// directory `/tmp/capstan-test-<prefix>` and its cgroup `<cgroup2>/capstan-test-<prefix>`.
    ///
    /// Leftovers of an earlier process with the same pid (a crashed run) are detected and the
    /// counter skips past them.
    pub fn new() -> Result<Topology> {
        let cgroup_root = cgroup2_mount()?;
        let pid = std::process::id();
        let prefix = loop {
            let n = TOPOLOGY_COUNTER.fetch_add(1, Ordering::Relaxed);
            let p = format!("c{pid:x}-{}", base36(n as u64));
            let taken = Path::new(&format!("/tmp/capstan-test-{p}")).exists()
                || cgroup_root.join(format!("capstan-test-{p}")).exists()
                || Path::new(BPFFS_ROOT)
                    .join(format!("capstan-test-{p}"))
                    .exists()
                || fs::read_dir(NETNS_RUN_DIR)
                    .map(|d| {
                        d.flatten().any(|e| {
                            e.file_name()
                                .to_string_lossy()
                                .starts_with(&format!("{p}-"))
                        })
                    })
                    .unwrap_or(false);
            if !taken {
                break p;
            }
        };
        let name = format!("capstan-test-{prefix}");
        let topo = Topology {
            scratch: PathBuf::from("/tmp").join(&name),
            cgroup: cgroup_root.join(&name),
            bpffs: Path::new(BPFFS_ROOT).join(&name),
            prefix,
            state: Mutex::new(TopoState::default()),
            proc_seq: AtomicU32::new(0),
            torn_down: false,
        };
        // From here on, an error drops `topo`, which removes whatever was made.
        fs::create_dir_all(&topo.scratch)
            .with_context(|| format!("creating scratch dir {}", topo.scratch.display()))?;
        fs::create_dir(&topo.cgroup)
            .with_context(|| format!("creating cgroup {}", topo.cgroup.display()))?;
        Ok(topo)
    }

    /// The unique prefix of every name this topology creates (`c<pid hex>-<n>`, typically
    /// 6-10 chars; interface names built from it are checked against [`MAX_IFNAME_LEN`]).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The per-topology scratch directory (process logs live here); removed on drop unless
    /// `CAPSTAN_KEEP_TEST_DIRS` is set.
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch
    }

    /// The topology's cgroup v2 directory (exists; removed on drop after killing its members).
    /// Give it to the agent as the cgroup to attach socket programs to.
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup
    }

    /// A unique bpffs path `/sys/fs/bpf/capstan-test-<prefix>` for the agent's pins. Not
    /// created here (the agent does that); removed recursively on drop if present.
    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs
    }

    /// Full namespace name for a short name: `<prefix>-<name>`.
    pub fn netns_name(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// The pids currently in the topology's cgroup (`cgroup.procs`).
    pub fn cgroup_pids(&self) -> Result<Vec<u32>> {
        read_cgroup_procs(&self.cgroup)
    }

    fn add_netns(&self, name: &str) -> Result<String> {
        check_name("namespace", name)?;
        let ns = self.netns_name(name);
        {
            let mut st = lock(&self.state);
            ensure!(
                !st.netns.contains(&ns),
                "namespace {name:?} already exists in this topology"
            );
            // Registered before creation so that a half-made namespace is deleted too.
            st.netns.push(ns.clone());
        }
        run_checked(Command::new("ip").args(["netns", "add", &ns]))?;
        self.ip(&ns, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Creates a node named `<prefix>-<name>` with the default addresses of the next node
    /// index (see [`NodeOptions::for_index`]: the first node is `10.200.0.1`/`fd00:200::1`).
    pub fn node(&self, name: &str) -> Result<Node> {
        let index = lock(&self.state).nodes;
        self.node_with(name, NodeOptions::for_index(index))
    }

    /// Creates a node with explicit addresses: namespace `<prefix>-<name>`, `lo` up with the
    /// node `/32` and `/128`, `ip_forward` and IPv6 forwarding on, DAD off for new links.
    pub fn node_with(&self, name: &str, opts: NodeOptions) -> Result<Node> {
        let netns = self
            .add_netns(name)
            .with_context(|| format!("creating node {name}"))?;
        lock(&self.state).nodes += 1;
        self.sysctl(
            &netns,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
                ("net.ipv6.conf.default.forwarding", "1"),
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
            ],
        )?;
        self.ip(
            &netns,
            &["addr", "add", &format!("{}/32", opts.addr_v4), "dev", "lo"],
        )?;
        self.ip(
            &netns,
            &[
                "-6",
                "addr",
                "add",
                &format!("{}/128", opts.addr_v6),
                "dev",
                "lo",
                "nodad",
            ],
        )?;
        Ok(Node {
            name: name.to_string(),
            netns,
            addr_v4: opts.addr_v4,
            addr_v6: opts.addr_v6,
        })
    }

    /// Creates a pod `<prefix>-<name>` on `node` with addresses `v4`/32 and `v6`/128 on its
    /// `eth0`. See [`Pod`] for the wiring.
    pub fn pod(&self, node: &Node, name: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<Pod> {
        self.make_pod(node, name, v4, v6)
            .with_context(|| format!("creating pod {name} ({v4}, {v6}) on {}", node.netns))
    }

    fn make_pod(&self, node: &Node, name: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<Pod> {
        let netns = self.add_netns(name)?;
        self.sysctl(
            &netns,
            &[
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ],
        )?;
        let host_veth = {
            let mut st = lock(&self.state);
            st.veths += 1;
            format!("{}v{}", self.prefix, base36(st.veths))
        };
        ensure!(
            host_veth.len() <= MAX_IFNAME_LEN,
            "interface name {host_veth} is longer than {MAX_IFNAME_LEN}"
        );
        let (v4p, v6p) = (format!("{v4}/32"), format!("{v6}/128"));
        let gw4 = node.addr_v4.to_string();
        let gw6 = POD_GATEWAY_V6.to_string();
        // Created inside the node namespace, the peer directly inside the pod: the pair never
        // exists in the host namespace.
        self.ip(
            &node.netns,
            &[
                "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        )?;
        self.ip(&node.netns, &["link", "set", &host_veth, "up"])?;
        self.ip(
            &node.netns,
            &[
                "-6",
                "addr",
                "add",
                &format!("{gw6}/64"),
                "dev",
                &host_veth,
                "nodad",
            ],
        )?;
        self.ip(&netns, &["addr", "add", &v4p, "dev", "eth0"])?;
        self.ip(&netns, &["-6", "addr", "add", &v6p, "dev", "eth0", "nodad"])?;
        self.ip(&netns, &["link", "set", "eth0", "up"])?;
        self.ip(
            &netns,
            &[
                "route", "add", "default", "via", &gw4, "dev", "eth0", "onlink",
            ],
        )?;
        self.ip(
            &netns,
            &["-6", "route", "add", "default", "via", &gw6, "dev", "eth0"],
        )?;
        self.ip(&node.netns, &["route", "add", &v4p, "dev", &host_veth])?;
        self.ip(
            &node.netns,
            &["-6", "route", "add", &v6p, "dev", &host_veth],
        )?;
        Ok(Pod {
            name: name.to_string(),
            netns,
            node_netns: node.netns.clone(),
            host_veth,
            addr_v4: v4,
            addr_v6: v6,
        })
    }

    /// Runs `ip -n <netns> <args…>`; fails with ip's stderr unless it exits 0; returns stdout.
    pub fn ip(&self, netns: &str, args: &[&str]) -> Result<String> {
        run_checked(Command::new("ip").arg("-n").arg(netns).args(args))
    }

    /// Sets sysctls inside `netns` (`sysctl -qw k=v …` under nsenter).
    pub fn sysctl(&self, netns: &str, settings: &[(&str, &str)]) -> Result<()> {
        let mut c = Command::new("sysctl");
        c.arg("-qw");
        for (k, v) in settings {
            c.arg(format!("{k}={v}"));
        }
        run_checked(&mut nsenter_command(netns, &c))?;
        Ok(())
    }

    /// Runs `cmd` to completion inside `netns` (via `nsenter --net`) and returns its output,
    /// whatever the exit status. Stdin is null.
    pub fn run(&self, netns: &str, cmd: &mut Command) -> Result<Output> {
        ensure_netns(netns)?;
        let mut c = nsenter_command(netns, cmd);
        c.stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {cmd:?} in {netns}"))
    }

    /// Runs `sh -c <script>` inside `netns`; fails (showing stdout and stderr) unless it exits
    /// 0; returns stdout.
    pub fn sh(&self, netns: &str, script: &str) -> Result<String> {
        ensure_netns(netns)?;
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        run_checked(&mut nsenter_command(netns, &c)).with_context(|| format!("in netns {netns}"))
    }

    /// Starts `cmd` inside `netns` (via `nsenter --net=/run/netns/<netns>`, the host mount
    /// namespace is kept), as a member of [`Topology::cgroup_path`] if `in_cgroup`.
    ///
    /// Returns once the process runs inside `netns` (or has already exited).
    /// Stdin is null; stdout and stderr go to files in the scratch dir ([`Proc::log`]). The
    /// process leads its own process group and gets `PR_SET_PDEATHSIG(SIGKILL)`, so it dies
    /// with the calling *thread* if the test process is killed: spawn from the thread that
    /// owns the topology (the test's own thread), not from a short-lived helper thread.
    /// The program, arguments, environment changes and working directory of `cmd` are used
    /// (its stdio settings and an `env_clear` are not).
    pub fn spawn(&self, netns: &str, in_cgroup: bool, cmd: &mut Command) -> Result<Proc> {
        Ok(self.spawn_inner(netns, in_cgroup, cmd, false)?.0)
    }

    fn spawn_inner(
        &self,
        netns: &str,
        in_cgroup: bool,
        cmd: &Command,
        interactive: bool,
    ) -> Result<(Proc, Option<ProbePipes>)> {
        ensure_netns(netns)?;
        let label: String = Path::new(cmd.get_program())
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "proc".into())
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let seq = self.proc_seq.fetch_add(1, Ordering::Relaxed);
        let stdout_path = self.scratch.join(format!("{seq:03}-{label}.stdout"));
        let stderr_path = self.scratch.join(format!("{seq:03}-{label}.stderr"));
        let out = File::create(&stdout_path)
            .with_context(|| format!("creating {}", stdout_path.display()))?;
        let err = File::create(&stderr_path)
            .with_context(|| format!("creating {}", stderr_path.display()))?;

        let mut c = nsenter_command(netns, cmd);
        c.stderr(err);
        if interactive {
            c.stdin(Stdio::piped()).stdout(Stdio::piped());
        } else {
            c.stdin(Stdio::null()).stdout(out.try_clone()?);
        }
        c.process_group(0);
        let cgroup_procs = if in_cgroup {
            let p = self.cgroup.join("cgroup.procs");
            Some(CString::new(p.as_os_str().as_bytes()).context("cgroup path contains NUL")?)
        } else {
            None
        };
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // system calls (prctl, open, write, close) on data prepared before the fork.
        unsafe {
            c.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(path) = &cgroup_procs {
                    // Writing "0" to cgroup.procs moves the writing process itself.
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let r = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let e = std::io::Error::last_os_error();
                    libc::close(fd);
                    if r != 1 {
                        return Err(e);
                    }
                }
                Ok(())
            });
        }
        let desc = format!("{cmd:?}");
        let mut child = c
            .spawn()
            .with_context(|| format!("spawning {desc} in netns {netns}"))?;
        let pid = child.id();

        let io = if interactive {
            let stdin = child.stdin.take().context("child has no stdin pipe")?;
            let stdout = child.stdout.take().context("child has no stdout pipe")?;
            let (tx, rx) = mpsc::channel();
            let mut file = out;
            std::thread::Builder::new()
                .name(format!("{label}-stdout"))
                .spawn(move || {
                    let mut r = BufReader::new(stdout);
                    let mut buf = Vec::new();
                    loop {
                        buf.clear();
                        match r.read_until(b'\n', &mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {
                                let _ = file.write_all(&buf);
                                let line = String::from_utf8_lossy(&buf)
                                    .trim_end_matches(['\n', '\r'])
                                    .to_string();
                                let _ = tx.send(line);
                            }
                        }
                    }
                })
                .context("starting stdout reader thread")?;
            Some((stdin, rx))
        } else {
            None
        };

        let shared = Arc::new(ProcShared {
            label: format!("{label} in {netns}"),
            pid,
            stdout_path,
            stderr_path,
            state: Mutex::new(ChildState {
                child,
                status: None,
            }),
            log_dumped: Default::default(),
        });
        lock(&self.state).procs.push(Arc::downgrade(&shared));
        let proc = Proc { shared };
        wait_in_netns(&proc, netns)?;
        Ok((proc, io))
    }

    /// Starts `capstan-echo --name <name> --tcp … --udp …` in `netns` and waits (10 s) until
    /// it printed `ready`.
    pub fn spawn_echo(
        &self,
        netns: &str,
        in_cgroup: bool,
        name: &str,
        tcp: &[SocketAddr],
        udp: &[SocketAddr],
    ) -> Result<Proc> {
        let mut c = Command::new(bin_path("capstan-echo")?);
        c.arg("--name").arg(name);
        for a in tcp {
            c.arg("--tcp").arg(a.to_string());
        }
        for a in udp {
            c.arg("--udp").arg(a.to_string());
        }
        let p = self.spawn(netns, in_cgroup, &mut c)?;
        p.wait_for_line("ready", Duration::from_secs(10))
            .with_context(|| format!("echo server {name} in {netns} did not get ready"))?;
        Ok(p)
    }

    /// Starts a `capstan-probe` client in `netns` (in the topology cgroup if `in_cgroup`).
    pub fn probe(&self, netns: &str, in_cgroup: bool) -> Result<Probe> {
        let c = Command::new(bin_path("capstan-probe")?);
        let (proc, io) = self.spawn_inner(netns, in_cgroup, &c, true)?;
        let (stdin, lines) = io.context("probe spawned without pipes")?;
        Ok(Probe {
            proc,
            io: Mutex::new(ProbeIo {
                stdin,
                lines,
                broken: None,
            }),
            timeout: DEFAULT_PROBE_TIMEOUT,
        })
    }

    /// Tears the topology down now and reports every cleanup step that failed (dropping does
    /// the same but can only print the errors).
    pub fn close(mut self) -> Result<()> {
        let errors = self.teardown();
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("topology {} teardown: {}", self.prefix, errors.join("; "))
        }
    }

    fn teardown(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let mut errors = Vec::new();
        let procs: Vec<Arc<ProcShared>> = lock(&self.state)
            .procs
            .drain(..)
            .filter_map(|w| w.upgrade())
            .collect();
        for p in &procs {
            p.dump_log_if_panicking();
            p.kill();
        }

        // Kill whatever is left in the cgroup (daemons, children that escaped the group).
        if self.cgroup.exists() {
            if let Err(e) = kill_cgroup(&self.cgroup) {
                errors.push(format!("{e:#}"));
            }
            if let Err(e) = remove_cgroup_tree(&self.cgroup) {
                errors.push(format!("{e:#}"));
            }
        }

        let netns: Vec<String> = lock(&self.state).netns.drain(..).rev().collect();
        for ns in netns {
            if netns_path(&ns).exists()
                && let Err(e) = run_checked(Command::new("ip").args(["netns", "del", &ns]))
            {
                errors.push(format!("{e:#}"));
            }
        }

        if self.bpffs.exists()
            && let Err(e) = fs::remove_dir_all(&self.bpffs)
        {
            errors.push(format!("removing {}: {e}", self.bpffs.display()));
        }

        if std::env::var_os(ENV_KEEP_TEST_DIRS).is_some() {
            eprintln!(
                "capstan-tests: keeping scratch dir {} ({ENV_KEEP_TEST_DIRS} is set)",
                self.scratch.display()
            );
        } else if self.scratch.exists()
            && let Err(e) = fs::remove_dir_all(&self.scratch)
        {
            errors.push(format!("removing {}: {e}", self.scratch.display()));
        }
        errors
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for e in self.teardown() {
            eprintln!("capstan-tests: topology {} teardown: {e}", self.prefix);
        }
    }
}

/// Waits until `proc` runs in `netns` (nsenter has called `setns`), or has exited: a test
/// may rely on the process being in its namespace as soon as `spawn` returns.
fn wait_in_netns(proc: &Proc, netns: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let target = fs::metadata(netns_path(netns))
        .with_context(|| format!("stat {}", netns_path(netns).display()))?
        .ino();
    let ns_link = format!("/proc/{}/ns/net", proc.pid());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if fs::metadata(&ns_link).is_ok_and(|m| m.ino() == target) || !proc.is_running() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not enter netns {netns}\n{}",
                proc.shared.label,
                proc.log()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Stdin and the stdout lines of an interactive process (the probe).
type ProbePipes = (ChildStdin, Receiver<String>);

fn ensure_netns(netns: &str) -> Result<()> {
    ensure!(
        !netns.is_empty() && !netns.contains('/') && netns_path(netns).exists(),
        "network namespace {netns:?} does not exist (pass node.netns() / pod.netns())"
    );
    Ok(())
}

fn read_cgroup_procs(cgroup: &Path) -> Result<Vec<u32>> {
    let p = cgroup.join("cgroup.procs");
    let text = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Kills every process in `cgroup` and its descendants and waits (5 s) until it is empty.
fn kill_cgroup(cgroup: &Path) -> Result<()> {
    let kill_file = cgroup.join("cgroup.kill");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut pids = Vec::new();
        collect_cgroup_pids(cgroup, &mut pids)?;
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "processes {pids:?} still in {} after SIGKILL",
                cgroup.display()
            );
        }
        if kill_file.exists() {
            fs::write(&kill_file, "1")
                .with_context(|| format!("writing {}", kill_file.display()))?;
        } else {
            for pid in pids {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn collect_cgroup_pids(cgroup: &Path, out: &mut Vec<u32>) -> Result<()> {
    out.extend(read_cgroup_procs(cgroup)?);
    for e in fs::read_dir(cgroup).with_context(|| format!("listing {}", cgroup.display()))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            collect_cgroup_pids(&e.path(), out)?;
        }
    }
    Ok(())
}

/// Removes a cgroup and its child cgroups, deepest first (cgroup directories are removed with
/// `rmdir` even though they contain the interface files). Retries briefly on `EBUSY`.
fn remove_cgroup_tree(cgroup: &Path) -> Result<()> {
    for e in fs::read_dir(cgroup).with_context(|| format!("listing {}", cgroup.display()))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            remove_cgroup_tree(&e.path())?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", cgroup.display())),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

struct ChildState {
    child: Child,
    status: Option<ExitStatus>,
}

/// Shared between a [`Proc`] and its topology, so that whichever goes first kills and reaps
/// the process exactly once (never signalling a pid that has been reaped and maybe reused).
struct ProcShared {
    label: String,
    pid: u32,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    state: Mutex<ChildState>,
    log_dumped: std::sync::atomic::AtomicBool,
}

fn read_lossy(p: &Path) -> String {
    fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `max` bytes of `s` (on a char boundary).
pub fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = s.len() - max;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

impl ProcShared {
    fn kill(&self) {
        let mut st = lock(&self.state);
        if st.status.is_some() {
            return;
        }
        if let Ok(Some(s)) = st.child.try_wait() {
            st.status = Some(s);
            return;
        }
        // The process leads its own group: take its children along.
        let _ =
            nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        let _ = st.child.kill();
        st.status = st.child.wait().ok();
    }

    fn try_status(&self) -> Option<ExitStatus> {
        let mut st = lock(&self.state);
        if st.status.is_none()
            && let Ok(Some(s)) = st.child.try_wait()
        {
            st.status = Some(s);
        }
        st.status
    }

    /// A failing test is much easier to debug with the logs of what was running: while the
    /// thread panics, print the log (once; libtest shows it with the failure).
    fn dump_log_if_panicking(&self) {
        if std::thread::panicking() && !self.log_dumped.swap(true, Ordering::Relaxed) {
            eprintln!(
                "capstan-tests: test failed; log of {} (set {ENV_KEEP_TEST_DIRS}=1 to keep the files):\n{}",
                self.label,
                self.log(8192)
            );
        }
    }

    /// Stdout and stderr (their last `max` bytes each) with a header.
    fn log(&self, max: usize) -> String {
        let status = match self.try_status() {
            Some(s) => format!("exited: {s}"),
            None => "running".into(),
        };
        let (out, err) = (read_lossy(&self.stdout_path), read_lossy(&self.stderr_path));
        format!(
            "----- {} (pid {}, {status}) stdout: {} -----\n{}\n----- stderr: {} -----\n{}\n-----",
            self.label,
            self.pid,
            self.stdout_path.display(),
            tail(out.trim_end(), max),
            self.stderr_path.display(),
            tail(err.trim_end(), max),
        )
    }
}

/// A process started by [`Topology::spawn`]. Killed (SIGKILL to its process group) and reaped
/// when dropped or when the topology is dropped, whichever comes first. If that happens while
/// the test panics, the tail of its stdout/stderr is printed to stderr first.
pub struct Proc {
    shared: Arc<ProcShared>,
}

impl Proc {
    /// The process id (the command's own pid: nsenter execs it).
    pub fn pid(&self) -> u32 {
        self.shared.pid
    }

    /// Sends `sig` to the process (not its group). Fails if it has already exited.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        let st = lock(&self.shared.state);
        ensure!(
            st.status.is_none(),
            "{} (pid {}) has already exited",
            self.shared.label,
            self.shared.pid
        );
        // Holding the lock: the process cannot be reaped meanwhile, so the pid is still ours.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.shared.pid as i32), sig)
            .with_context(|| {
                format!(
                    "sending {sig} to {} (pid {})",
                    self.shared.label, self.shared.pid
                )
            })
    }

    /// Kills the process (and its process group) with SIGKILL and reaps it. Idempotent.
    pub fn kill(&self) {
        self.shared.kill();
    }

    /// The exit status if the process has exited (and reaps it), `None` while it runs.
    pub fn try_status(&self) -> Option<ExitStatus> {
        self.shared.try_status()
    }

    /// Whether the process is still running.
    pub fn is_running(&self) -> bool {
        self.try_status().is_none()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {}) still running after {timeout:?}\n{}",
                    self.shared.label,
                    self.shared.pid,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.shared.stdout_path)
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.shared.stderr_path)
    }

    /// Path of the stdout log file (in the topology's scratch dir).
    pub fn stdout_path(&self) -> &Path {
        &self.shared.stdout_path
    }

    /// Path of the stderr log file (in the topology's scratch dir).
    pub fn stderr_path(&self) -> &Path {
        &self.shared.stderr_path
    }

    /// Stdout and stderr (last 64 KiB of each) with a header, for assertion messages.
    pub fn log(&self) -> String {
        self.shared.log(64 * 1024)
    }

    /// Waits until a stdout line contains `needle` and returns that line. Fails early (with
    /// the log) if the process exits first, or after `timeout`.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            // Read the status before the output, so output written just before exiting is seen.
            let exited = self.try_status();
            let out = self.stdout();
            // Only complete lines count.
            let complete = match out.rfind('\n') {
                Some(i) => &out[..i],
                None => "",
            };
            if let Some(line) = complete.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            if exited.is_some() {
                bail!(
                    "{} exited before printing {needle:?}\n{}",
                    self.shared.label,
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}\n{}",
                    self.shared.label,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.shared.dump_log_if_panicking();
        self.shared.kill();
    }
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("label", &self.shared.label)
            .field("pid", &self.shared.pid)
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Probe
// ---------------------------------------------------------------------------------------------

struct ProbeIo {
    stdin: ChildStdin,
    lines: Receiver<String>,
    /// Set once a command timed out: replies could be out of step from then on.
    broken: Option<String>,
}

/// A running `capstan-probe` (see [`Topology::probe`]): send it commands, get one result line
/// each. Commands are serialised, so a probe can be shared between threads.
pub struct Probe {
    proc: Proc,
    io: Mutex<ProbeIo>,
    timeout: Duration,
}

/// One parsed probe result line.
///
/// `ok <NAME> <seen_ip> peer=<ip:port> from=<ip:port> conn=<id> us=<micros>` or
/// `err <ERRNO> us=<micros>`; fields a command does not print are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    /// `true` for `ok …` lines.
    pub ok: bool,
    /// The name of the echo server that answered.
    pub backend: Option<String>,
    /// The client address the echo server saw (no port).
    pub seen_ip: Option<String>,
    /// `getpeername()` of the client socket (`ip:port`, v6 as `[ip]:port`).
    pub peer: Option<String>,
    /// Source address of the UDP reply (`recvfrom`).
    pub from: Option<String>,
    /// Connection id of a `tcpkeep` connection.
    pub conn: Option<u64>,
    /// Errno name of an `err` line (`ECONNREFUSED`, `ETIMEDOUT`, `EOF`, …).
    pub errno: Option<String>,
    /// Microseconds the operation took.
    pub micros: u64,
    /// The unparsed line.
    pub raw: String,
}

impl Reply {
    /// Parses a result line of `capstan-probe`.
    pub fn parse(line: &str) -> Result<Reply> {
        let mut toks = line.split_whitespace();
        let mut r = Reply {
            raw: line.to_string(),
            ..Reply::default()
        };
        r.ok = match toks.next() {
            Some("ok") => true,
            Some("err") => false,
            _ => bail!("not a probe result line: {line:?}"),
        };
        let mut positional = Vec::new();
        for t in toks {
            match t.split_once('=') {
                Some(("peer", v)) => r.peer = Some(v.to_string()),
                Some(("from", v)) => r.from = Some(v.to_string()),
                Some(("conn", v)) => {
                    r.conn = Some(v.parse().with_context(|| format!("conn in {line:?}"))?)
                }
                Some(("us", v)) => {
                    r.micros = v.parse().with_context(|| format!("us in {line:?}"))?
                }
                Some(_) => {}
                None => positional.push(t.to_string()),
            }
        }
        let mut positional = positional.into_iter();
        if r.ok {
            r.backend = positional.next();
            r.seen_ip = positional.next();
        } else {
            r.errno = positional.next();
        }
        Ok(r)
    }

    /// The peer address as a [`SocketAddr`], if present and well-formed.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer.as_deref().and_then(|p| p.parse().ok())
    }

    /// The reply source address as a [`SocketAddr`], if present and well-formed.
    pub fn from_addr(&self) -> Option<SocketAddr> {
        self.from.as_deref().and_then(|p| p.parse().ok())
    }
}

/// Result of a `loop` command: `ok n=N fail=F backends=a:3,b:5 errors=ETIMEDOUT:2 us=…`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoopSummary {
    /// Requests made.
    pub n: u64,
    /// Requests that failed.
    pub fail: u64,
    /// Successful requests per answering backend name.
    pub backends: BTreeMap<String, u64>,
    /// Failed requests per errno name.
    pub errors: BTreeMap<String, u64>,
    /// Total microseconds.
    pub micros: u64,
    /// The unparsed line.
    pub raw: String,
}

impl LoopSummary {
    /// Parses the summary line of a `loop` command.
    pub fn parse(line: &str) -> Result<LoopSummary> {
        let mut s = LoopSummary {
            raw: line.to_string(),
            ..LoopSummary::default()
        };
        let mut toks = line.split_whitespace();
        ensure!(toks.next() == Some("ok"), "loop failed: {line:?}");
        let counts = |v: &str| -> Result<BTreeMap<String, u64>> {
            let mut m = BTreeMap::new();
            for item in v.split(',').filter(|i| !i.is_empty()) {
                let (k, c) = item
                    .rsplit_once(':')
                    .with_context(|| format!("bad count {item:?} in {line:?}"))?;
                m.insert(k.to_string(), c.parse()?);
            }
            Ok(m)
        };
        for t in toks {
            match t.split_once('=') {
                Some(("n", v)) => s.n = v.parse()?,
                Some(("fail", v)) => s.fail = v.parse()?,
                Some(("backends", v)) => s.backends = counts(v)?,
                Some(("errors", v)) => s.errors = counts(v)?,
                Some(("us", v)) => s.micros = v.parse()?,
                _ => {}
            }
        }
        Ok(s)
    }
}

impl Probe {
    /// The underlying process (pid, logs).
    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Changes how long [`Probe::cmd`] waits for a result line (default 15 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends one command line and returns its result line (default timeout). A timeout or a
    /// dead probe is an error carrying the probe's log; after a timeout the probe refuses
    /// further commands (its answers could be out of step).
    pub fn cmd(&self, line: &str) -> Result<String> {
        self.cmd_timeout(line, self.timeout)
    }

    /// [`Probe::cmd`] with an explicit timeout.
    pub fn cmd_timeout(&self, line: &str, timeout: Duration) -> Result<String> {
        ensure!(
            !line.contains('\n'),
            "probe command must be a single line: {line:?}"
        );
        let mut io = lock(&self.io);
        if let Some(why) = &io.broken {
            bail!("probe unusable: {why}");
        }
        // Drop stray output (none is expected: every command prints exactly one line).
        while io.lines.try_recv().is_ok() {}
        if let Err(e) = writeln!(io.stdin, "{line}").and_then(|_| io.stdin.flush()) {
            bail!("writing {line:?} to probe: {e}\n{}", self.proc.log());
        }
        match io.lines.recv_timeout(timeout) {
            Ok(l) => Ok(l),
            Err(RecvTimeoutError::Timeout) => {
                io.broken = Some(format!("command {line:?} timed out"));
                bail!(
                    "probe command {line:?} got no answer within {timeout:?}\n{}",
                    self.proc.log()
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                io.broken = Some("probe exited".into());
                bail!("probe exited while running {line:?}\n{}", self.proc.log())
            }
        }
    }

    fn reply(&self, line: &str) -> Result<Reply> {
        Reply::parse(&self.cmd(line)?)
    }

    /// `tcp ADDR`: connect, send a line, read the reply, close.
    pub fn tcp(&self, addr: SocketAddr) -> Result<Reply> {
        self.reply(&format!("tcp {addr}"))
    }

    /// `udp ADDR`: one datagram over an unconnected socket (`sendto`/`recvfrom`).
    pub fn udp(&self, addr: SocketAddr) -> Result<Reply> {
        self.reply(&format!("udp {addr}"))
    }

    /// `udpc ADDR`: one datagram over a connected UDP socket.
    pub fn udpc(&self, addr: SocketAddr) -> Result<Reply> {
        self.reply(&format!("udpc {addr}"))
    }

    /// `tcpkeep ADDR`: opens a connection that stays open; the id is in [`Reply::conn`].
    pub fn tcpkeep(&self, addr: SocketAddr) -> Result<Reply> {
        self.reply(&format!("tcpkeep {addr}"))
    }

    /// `send ID`: one request/reply on a `tcpkeep` connection.
    pub fn send(&self, conn: u64) -> Result<Reply> {
        self.reply(&format!("send {conn}"))
    }

    /// `close ID`: closes a `tcpkeep` connection.
    pub fn close(&self, conn: u64) -> Result<Reply> {
        self.reply(&format!("close {conn}"))
    }

    /// `loop tcp ADDR N`: `n` sequential `tcp` requests, summarised.
    pub fn loop_tcp(&self, addr: SocketAddr, n: u64) -> Result<LoopSummary> {
        self.loop_proto("tcp", addr, n)
    }

    /// `loop udp ADDR N` (or `udpc`): `n` sequential UDP requests, summarised.
    pub fn loop_proto(&self, proto: &str, addr: SocketAddr, n: u64) -> Result<LoopSummary> {
        // Worst case per request: 2 s connect + 2 s reply.
        let timeout = self.timeout + Duration::from_secs(5) * n.min(100_000) as u32;
        LoopSummary::parse(&self.cmd_timeout(&format!("loop {proto} {addr} {n}"), timeout)?)
    }
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe").field("proc", &self.proc).finish()
    }
}
