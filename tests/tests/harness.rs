//! Self-tests of the integration-test harness: topologies route what they should, helper
//! binaries answer correctly, cgroup membership is real, and teardown leaves nothing behind
//! (also after a panic, and with topologies built in parallel).
//!
//! Run as root: `cargo test -p capstan-tests --test harness`.

use anyhow::{Context, Result, ensure};
use capstan_tests::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const A4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
const B4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
const A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x10);
const B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x11);

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Echo on v4 and v6 wildcard addresses, TCP 8080 and UDP 5353.
fn wildcard_echo(topo: &Topology, netns: &str, name: &str) -> Result<Proc> {
    topo.spawn_echo(
        netns,
        false,
        name,
        &[
            sa(Ipv4Addr::UNSPECIFIED, 8080),
            sa(Ipv6Addr::UNSPECIFIED, 8080),
        ],
        &[
            sa(Ipv4Addr::UNSPECIFIED, 5353),
            sa(Ipv6Addr::UNSPECIFIED, 5353),
        ],
    )
}

/// Checks a successful reply from `backend`, which saw the client as `seen`.
fn check_ok(r: &Reply, backend: &str, seen: IpAddr) -> Result<()> {
    ensure!(r.ok, "expected ok, got {:?}", r.raw);
    ensure!(
        r.backend.as_deref() == Some(backend),
        "wrong backend in {:?}",
        r.raw
    );
    ensure!(
        r.seen_ip.as_deref() == Some(seen.to_string().as_str()),
        "wrong seen ip in {:?} (want {seen})",
        r.raw
    );
    Ok(())
}

#[test]
fn pods_and_node_talk_tcp_udp_v4_v6() -> Result<()> {
    require_root();
    let topo = Topology::new()?;
    let node = topo.node("node")?;
    let a = topo.pod(&node, "a", A4, A6)?;
    let b = topo.pod(&node, "b", B4, B6)?;
    assert!(a.host_veth().len() <= MAX_IFNAME_LEN);
    let echo = wildcard_echo(&topo, a.netns(), "a")?;

    let from_b = topo.probe(b.netns(), false)?;
    let from_node = topo.probe(node.netns(), false)?;
    let cases: [(&Probe, IpAddr, IpAddr); 4] = [
        (&from_b, A4.into(), B4.into()),
        (&from_b, A6.into(), B6.into()),
        (&from_node, A4.into(), node.addr_v4().into()),
        (&from_node, A6.into(), node.addr_v6().into()),
    ];
    for (probe, target, seen) in cases {
        let r = probe.tcp(sa(target, 8080))?;
        check_ok(&r, "a", seen).with_context(|| echo.log())?;
        assert_eq!(r.peer_addr(), Some(sa(target, 8080)), "{}", r.raw);

        let r = probe.udp(sa(target, 5353))?;
        check_ok(&r, "a", seen).with_context(|| echo.log())?;
        assert_eq!(r.from_addr(), Some(sa(target, 5353)), "{}", r.raw);

        let r = probe.udpc(sa(target, 5353))?;
        check_ok(&r, "a", seen).with_context(|| echo.log())?;
        assert_eq!(r.peer_addr(), Some(sa(target, 5353)), "{}", r.raw);
        assert_eq!(r.from_addr(), Some(sa(target, 5353)), "{}", r.raw);
    }

    // Pod to node address, both families (echo in the node netns).
    let _node_echo = wildcard_echo(&topo, node.netns(), "node")?;
    check_ok(&from_b.tcp(sa(node.addr_v4(), 8080))?, "node", B4.into())?;
    check_ok(&from_b.tcp(sa(node.addr_v6(), 8080))?, "node", B6.into())?;
    check_ok(&from_b.udp(sa(node.addr_v6(), 5353))?, "node", B6.into())?;

    // Kept connections.
    let k = from_b.tcpkeep(sa(A6, 8080))?;
    assert!(k.ok, "{}", k.raw);
    let id = k.conn.context("tcpkeep without conn id")?;
    for _ in 0..3 {
        check_ok(&from_b.send(id)?, "a", B6.into())?;
    }
    assert!(from_b.close(id)?.ok);
    assert_eq!(from_b.send(id)?.errno.as_deref(), Some("BADID"));

    // Loops.
    let s = from_b.loop_tcp(sa(A4, 8080), 50)?;
    assert_eq!((s.n, s.fail), (50, 0), "{}", s.raw);
    assert_eq!(s.backends.get("a"), Some(&50), "{}", s.raw);
    let s = from_b.loop_proto("udp", sa(A6, 5353), 20)?;
    assert_eq!(s.backends.get("a"), Some(&20), "{}", s.raw);

    // Errors: closed port, and a VIP nobody translates (must not leave the topology).
    assert_eq!(
        from_b.tcp(sa(A4, 9))?.errno.as_deref(),
        Some("ECONNREFUSED")
    );
    assert_eq!(
        from_b.udpc(sa(A6, 9))?.errno.as_deref(),
        Some("ECONNREFUSED")
    );
    for vip in [
        IpAddr::from(Ipv4Addr::new(10, 96, 0, 1)),
        "fd00:96::1".parse()?,
    ] {
        let r = from_b.tcp(sa(vip, 80))?;
        assert!(
            matches!(r.errno.as_deref(), Some("ENETUNREACH" | "EHOSTUNREACH")),
            "untranslated VIP from pod: {}",
            r.raw
        );
        let r = from_node.tcp(sa(vip, 80))?;
        assert_eq!(r.errno.as_deref(), Some("ENETUNREACH"), "{}", r.raw);
    }

    // Bad input is an err line, and the probe keeps working.
    for bad in [
        "tcp nonsense",
        "frobnicate",
        "loop tcp 1.2.3.4:5 x",
        "send 99",
    ] {
        let r = Reply::parse(&from_b.cmd(bad)?)?;
        assert!(!r.ok, "{bad}: {}", r.raw);
    }
    check_ok(&from_b.tcp(sa(A4, 8080))?, "a", B4.into())?;
    assert_eq!(from_b.cmd("quit")?, "ok bye");
    from_b.proc().wait_timeout(Duration::from_secs(5))?;
    topo.close()
}

#[test]
fn no_route_leaves_the_topology() -> Result<()> {
    require_root();
    let topo = Topology::new()?;
    let node = topo.node("node")?;
    let pod = topo.pod(&node, "a", A4, A6)?;
    for ns in [node.netns(), pod.netns()] {
        for fam in ["-4", "-6"] {
            let routes = topo.ip(ns, &[fam, "route", "show", "table", "all"])?;
            for r in routes.lines() {
                let dst = r.split_whitespace().next().unwrap_or("");
                let dst = if ["local", "broadcast", "multicast", "anycast"].contains(&dst) {
                    continue;
                } else {
                    dst
                };
                let ok = match dst {
                    "default" => ns == pod.netns() && r.contains("dev eth0"),
                    // The test's pod and node addresses, link-local and loopback.
                    d => [
                        "10.244.",
                        "fd00:244::",
                        "10.200.",
                        "fd00:200::",
                        "fe80::",
                        "::1",
                    ]
                    .iter()
                    .any(|p| d.starts_with(p)),
                };
                ensure!(ok, "unexpected route in {ns}: {r}");
            }
        }
    }
    Ok(())
}

#[test]
fn cgroup_membership() -> Result<()> {
    require_root();
    let topo = Topology::new()?;
    let cg = topo.cgroup_path().to_path_buf();
    assert!(cg.join("cgroup.procs").is_file());
    assert!(
        cg.starts_with(cgroup2_mount()?),
        "{} not under the cgroup2 mount",
        cg.display()
    );
    let node = topo.node("node")?;
    let inside = topo.spawn(node.netns(), true, Command::new("sleep").arg("1000"))?;
    let outside = topo.spawn(node.netns(), false, Command::new("sleep").arg("1000"))?;
    let probe = topo.probe(node.netns(), true)?;
    let pids = topo.cgroup_pids()?;
    assert!(pids.contains(&inside.pid()), "{pids:?}");
    assert!(pids.contains(&probe.proc().pid()), "{pids:?}");
    assert!(!pids.contains(&outside.pid()), "{pids:?}");

    // The process really runs in the node's network namespace.
    let ns_of = |pid: u32| std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino());
    let node_ns = std::fs::metadata(netns_path(node.netns()))?.ino();
    assert_eq!(ns_of(inside.pid())?, node_ns);
    assert_eq!(ns_of(outside.pid())?, node_ns);

    // Signals and kill.
    inside.signal(Signal::SIGTERM)?;
    let st = inside.wait_timeout(Duration::from_secs(5))?;
    assert!(!st.success());
    assert!(inside.signal(Signal::SIGTERM).is_err());
    wait_until(Duration::from_secs(2), || {
        Ok(!topo.cgroup_pids()?.contains(&inside.pid()))
    })?;
    outside.kill();
    assert!(!outside.is_running());

    // Logs are captured.
    let sh = topo.spawn(
        node.netns(),
        true,
        Command::new("sh").args(["-c", "echo to-stdout; echo to-stderr >&2"]),
    )?;
    sh.wait_timeout(Duration::from_secs(5))?;
    assert_eq!(sh.stdout(), "to-stdout\n");
    assert_eq!(sh.stderr(), "to-stderr\n");
    assert!(sh.log().contains("to-stderr"));
    Ok(())
}

/// Everything a topology owns, recorded before it is dropped.
struct Footprint {
    netns: Vec<(String, u64)>,
    veths: Vec<String>,
    cgroup: PathBuf,
    scratch: PathBuf,
    bpffs: PathBuf,
    pids: Vec<u32>,
}

/// Builds a topology with processes inside and outside the cgroup (one escaped into its own
/// session), a bpffs directory; records its footprint.
fn populate(topo: &Topology) -> Result<(Footprint, Vec<Proc>)> {
    let node = topo.node("node")?;
    let a = topo.pod(&node, "a", A4, A6)?;
    let b = topo.pod(&node, "b", B4, B6)?;
    let echo = wildcard_echo(topo, a.netns(), "a")?;
    let probe_proc = topo.spawn(b.netns(), true, Command::new("sleep").arg("1000"))?;
    // A daemon that left the process group: only the cgroup still knows about it.
    let daemon = topo.spawn(
        b.netns(),
        true,
        Command::new("sh").args(["-c", "setsid sleep 1000 & echo $!; wait"]),
    )?;
    let line = daemon.wait_for_line("", Duration::from_secs(5))?;
    let daemon_pid: u32 = line.trim().parse()?;
    ensure_bpffs()?;
    std::fs::create_dir_all(topo.bpffs_dir().join("maps"))?;
    let mut netns = Vec::new();
    for ns in [node.netns(), a.netns(), b.netns()] {
        netns.push((ns.to_string(), std::fs::metadata(netns_path(ns))?.ino()));
    }
    let fp = Footprint {
        netns,
        veths: vec![a.host_veth().to_string(), b.host_veth().to_string()],
        cgroup: topo.cgroup_path().to_path_buf(),
        scratch: topo.scratch_dir().to_path_buf(),
        bpffs: topo.bpffs_dir().to_path_buf(),
        pids: vec![echo.pid(), probe_proc.pid(), daemon.pid(), daemon_pid],
    };
    assert!(
        fp.pids
            .iter()
            .all(|p| Path::new(&format!("/proc/{p}")).exists())
    );
    Ok((fp, vec![echo, probe_proc, daemon]))
}

/// Whether any process or mount still references network namespace inode `ino`.
fn netns_referenced(ino: u64) -> bool {
    let needle = format!("net:[{ino}]");
    if std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.contains(&needle))
        .unwrap_or(false)
    {
        return true;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|e| {
        std::fs::read_link(e.path().join("ns/net"))
            .map(|l| l.to_string_lossy() == needle)
            .unwrap_or(false)
    })
}

fn pid_alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; it is not running though.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn assert_gone(fp: &Footprint) -> Result<()> {
    for (ns, ino) in &fp.netns {
        ensure!(!netns_path(ns).exists(), "netns {ns} still exists");
        ensure!(
            !netns_referenced(*ino),
            "netns {ns} (inode {ino}) still referenced"
        );
    }
    let host_links = Command::new("ip").args(["-o", "link", "show"]).output()?;
    let host_links = String::from_utf8_lossy(&host_links.stdout);
    for v in &fp.veths {
        ensure!(
            !host_links.contains(v.as_str()),
            "veth {v} in the host namespace"
        );
    }
    ensure!(
        !fp.cgroup.exists(),
        "cgroup {} still exists",
        fp.cgroup.display()
    );
    ensure!(
        !fp.scratch.exists(),
        "scratch {} still exists",
        fp.scratch.display()
    );
    ensure!(
        !fp.bpffs.exists(),
        "bpffs dir {} still exists",
        fp.bpffs.display()
    );
    wait_until(Duration::from_secs(5), || {
        Ok(fp.pids.iter().all(|p| !pid_alive(*p)))
    })
    .with_context(|| format!("processes {:?} survived", fp.pids))?;
    Ok(())
}

#[test]
fn teardown_after_drop() -> Result<()> {
    require_root();
    if std::env::var_os(ENV_KEEP_TEST_DIRS).is_some() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let (fp, procs) = populate(&topo)?;
    // Procs outliving the topology are fine: the topology kills them anyway.
    drop(topo);
    assert!(procs.iter().all(|p| !p.is_running()));
    drop(procs);
    assert_gone(&fp)
}

#[test]
fn teardown_after_panic() -> Result<()> {
    require_root();
    if std::env::var_os(ENV_KEEP_TEST_DIRS).is_some() {
        return Ok(());
    }
    let fp = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::new().expect("topology");
        let (f, _procs) = populate(&topo).expect("populate");
        *fp.lock().unwrap() = Some(f);
        panic!("deliberate panic inside a test body");
    }));
    assert!(result.is_err(), "the body should have panicked");
    let fp = fp.into_inner().unwrap().context("footprint not recorded")?;
    assert_gone(&fp)
}

#[test]
fn parallel_topologies_do_not_collide() -> Result<()> {
    require_root();
    // Same node/pod names and addresses in every topology; each must talk to its own echo.
    let results: Vec<Result<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|i| {
                s.spawn(move || -> Result<String> {
                    let topo = Topology::new()?;
                    let node = topo.node("node")?;
                    let a = topo.pod(&node, "a", A4, A6)?;
                    let b = topo.pod(&node, "b", B4, B6)?;
                    let name = format!("echo{i}");
                    let _echo = wildcard_echo(&topo, a.netns(), &name)?;
                    let probe = topo.probe(b.netns(), true)?;
                    for _ in 0..20 {
                        check_ok(&probe.tcp(sa(A4, 8080))?, &name, B4.into())?;
                        check_ok(&probe.udp(sa(A6, 5353))?, &name, B6.into())?;
                    }
                    let prefix = topo.prefix().to_string();
                    drop(probe);
                    topo.close()?;
                    Ok(prefix)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("thread panicked")))
            })
            .collect()
    });
    let mut prefixes = Vec::new();
    for r in results {
        prefixes.push(r?);
    }
    prefixes.sort();
    prefixes.dedup();
    assert_eq!(prefixes.len(), 3, "prefixes not unique: {prefixes:?}");
    Ok(())
}

#[test]
fn helpers() -> Result<()> {
    require_root();
    for name in ["capstan-echo", "capstan-probe"] {
        let p = bin_path(name)?;
        assert!(p.is_file(), "{}", p.display());
    }
    assert!(bin_path("no-such-binary").is_err());
    let r = Reply::parse("ok a 10.0.0.1 peer=10.0.0.2:80 from=[fd00::1]:53 us=12")?;
    assert_eq!(r.backend.as_deref(), Some("a"));
    assert_eq!(r.from_addr(), Some("[fd00::1]:53".parse()?));
    assert_eq!(r.micros, 12);
    let r = Reply::parse("err ETIMEDOUT us=2000000")?;
    assert_eq!((r.ok, r.errno.as_deref()), (false, Some("ETIMEDOUT")));
    let s = LoopSummary::parse("ok n=5 fail=1 backends=a:3,b:1 errors=EPERM:1 us=9")?;
    assert_eq!(s.backends.get("b"), Some(&1));
    assert_eq!(s.errors.get("EPERM"), Some(&1));
    let s = LoopSummary::parse("ok n=0 fail=0 backends= errors= us=1")?;
    assert!(s.backends.is_empty());

    // A spawn into a missing namespace fails cleanly.
    let topo = Topology::new()?;
    assert!(
        topo.spawn("nope", false, &mut Command::new("true"))
            .is_err()
    );
    assert!(
        topo.pod(&topo.node("n")?, "n", A4, A6).is_err(),
        "duplicate name"
    );
    Ok(())
}
