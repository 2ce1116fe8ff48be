//! Socket termination: connected UDP sockets whose backend left its Service are destroyed
//! (sock_diag SOCK_DESTROY), so that applications such as DNS resolvers open a new socket
//! and are balanced again instead of talking to a removed backend forever. The hooks
//! cannot re-balance them: a connected socket's sends pass no socket-address hook.
//!
//! Sockets live in the clients' network namespaces: every namespace used by a process of
//! the balanced cgroup is visited, from a thread that enters it (setns is per thread).
//! netlink-packet-sock-diag does not cover SOCK_DESTROY, so the messages are built here.
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use tracing::{debug, warn};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const REQ_LEN: usize = 16 + 56;

/// The network namespaces of the processes in `cgroup` and below, one file each.
fn namespaces(cgroup: &Path) -> BTreeMap<String, File> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let link = format!("/proc/{pid}/ns/net");
                let Ok(id) = std::fs::read_link(&link) else {
                    continue;
                };
                let id = id.to_string_lossy().into_owned();
                if !out.contains_key(&id)
                    && let Ok(f) = File::open(&link)
                {
                    out.insert(id, f);
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
        }
    }
    out
}

fn request(kind: u16, flags: u16, family: u8, id: &[u8; 48]) -> [u8; REQ_LEN] {
    let mut m = [0u8; REQ_LEN];
    m[0..4].copy_from_slice(&(REQ_LEN as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&kind.to_ne_bytes());
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m[16] = family;
    m[17] = libc::IPPROTO_UDP as u8;
    m[20..24].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
    m[24..72].copy_from_slice(id);
    m
}

/// The destination in an inet_diag_sockid (bytes 4..6 port, 24..40 address).
fn destination(family: u8, id: &[u8]) -> SocketAddr {
    let port = u16::from_be_bytes([id[2], id[3]]);
    let ip = if family == libc::AF_INET as u8 {
        IpAddr::from([id[20], id[21], id[22], id[23]])
    } else {
        let mut o = [0u8; 16];
        o.copy_from_slice(&id[20..36]);
        let v6 = Ipv6Addr::from(o);
        v6.to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6))
    };
    SocketAddr::new(ip, port)
}

/// Destroys, in the calling thread's network namespace, the UDP sockets connected to any
/// of `targets`. Returns how many.
fn destroy_here(targets: &BTreeSet<SocketAddr>) -> io::Result<usize> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let send = |m: &[u8]| -> io::Result<()> {
        // SAFETY: valid buffer and descriptor; the kernel is the default destination.
        let r = unsafe { libc::send(sock.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let mut found: Vec<(u8, [u8; 48])> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        send(&request(
            SOCK_DIAG_BY_FAMILY,
            (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            family,
            &[0; 48],
        ))?;
        'dump: loop {
            // SAFETY: valid buffer.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut off = 0usize;
            let n = n as usize;
            while off + 16 <= n {
                let len =
                    u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
                let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                if len < 16 || off + len > n {
                    break 'dump;
                }
                match kind {
                    NLMSG_DONE | NLMSG_ERROR => break 'dump,
                    SOCK_DIAG_BY_FAMILY if len >= 16 + 4 + 48 => {
                        let msg = &buf[off + 16..off + len];
                        let mut id = [0u8; 48];
                        id.copy_from_slice(&msg[4..52]);
                        if targets.contains(&destination(msg[0], &id)) {
                            found.push((msg[0], id));
                        }
                    }
                    _ => {}
                }
                off += (len + 3) & !3;
            }
        }
    }
    let mut destroyed = 0;
    for (family, id) in found {
        send(&request(
            SOCK_DESTROY,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            family,
            &id,
        ))?;
        // SAFETY: valid buffer.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
            let err = i32::from_ne_bytes(buf[16..20].try_into().unwrap_or_default());
            if err == 0 {
                destroyed += 1;
            } else {
                debug!(error = %io::Error::from_raw_os_error(-err), "SOCK_DESTROY refused");
            }
        }
    }
    Ok(destroyed)
}

/// Destroys the connected UDP sockets to `targets` in every network namespace used by a
/// process of `cgroup`. Errors are logged; returns the number destroyed.
pub fn destroy_udp_sockets(cgroup: &Path, targets: &BTreeSet<SocketAddr>) -> usize {
    if targets.is_empty() {
        return 0;
    }
    let mut total = 0;
    for (id, ns) in namespaces(cgroup) {
        let targets = targets.clone();
        let r = std::thread::spawn(move || -> io::Result<usize> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)?;
            destroy_here(&targets)
        })
        .join();
        match r {
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => warn!(netns = %id, error = %e, "cannot terminate UDP sockets"),
            Err(_) => warn!(netns = %id, "socket termination thread failed"),
        }
    }
    total
}
