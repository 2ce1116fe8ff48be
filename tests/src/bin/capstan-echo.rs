//! `capstan-echo`: the backend of capstan's integration tests.
//!
//! ```text
//! capstan-echo --name NAME [--tcp ADDR:PORT]... [--udp ADDR:PORT]...
//! ```
//!
//! * TCP: one thread per connection; for every line received it answers `NAME <peer_ip>\n`,
//!   `peer_ip` being the client address the server sees (no port), until EOF.
//! * UDP: every datagram gets `NAME <peer_ip>\n` back, sent from the address the datagram was
//!   addressed to (`IP_PKTINFO`/`IPV6_PKTINFO`), so wildcard sockets answer correctly on
//!   multi-address namespaces.
//!
//! Addresses are `0.0.0.0:80`, `10.0.0.1:80`, `[::]:80`, `[fd00::1]:80`… All sockets use
//! `SO_REUSEADDR`; IPv6 sockets set `IPV6_V6ONLY` so `0.0.0.0:P` and `[::]:P` coexist.
//! Once every socket is bound, `ready` is printed on stdout; errors go to stderr.

use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    SockaddrStorage, bind, listen, recvmsg, sendmsg, setsockopt, socket, sockopt,
};
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

const USAGE: &str = "usage: capstan-echo --name NAME [--tcp ADDR:PORT]... [--udp ADDR:PORT]...";

struct Args {
    name: String,
    tcp: Vec<SocketAddr>,
    udp: Vec<SocketAddr>,
}

fn parse_args() -> Result<Args, String> {
    let mut name = None;
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.to_string());
        }
        let value = match inline.or_else(|| it.next()) {
            Some(v) => v,
            None => return Err(format!("{flag} needs a value\n{USAGE}")),
        };
        let addr = || -> Result<SocketAddr, String> {
            value
                .parse()
                .map_err(|e| format!("{flag} {value:?}: {e} (want e.g. 0.0.0.0:80 or [::]:80)"))
        };
        match flag.as_str() {
            "--name" => {
                if value.is_empty() || value.contains(char::is_whitespace) {
                    return Err(format!("--name {value:?}: must be non-empty, no spaces"));
                }
                name = Some(value.clone());
            }
            "--tcp" => tcp.push(addr()?),
            "--udp" => udp.push(addr()?),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let name = name.ok_or_else(|| format!("--name is required\n{USAGE}"))?;
    if tcp.is_empty() && udp.is_empty() {
        return Err(format!("give at least one --tcp or --udp\n{USAGE}"));
    }
    Ok(Args { name, tcp, udp })
}

/// A socket of `ty` bound to `addr` with SO_REUSEADDR (and IPV6_V6ONLY for IPv6).
fn bound_socket(addr: SocketAddr, ty: SockType) -> nix::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, ty, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(fd)
}

fn tcp_listener(addr: SocketAddr) -> Result<TcpListener, String> {
    let fd = bound_socket(addr, SockType::Stream).map_err(|e| format!("tcp {addr}: {e}"))?;
    let backlog = Backlog::new(1024).map_err(|e| format!("tcp {addr}: backlog: {e}"))?;
    listen(&fd, backlog).map_err(|e| format!("tcp {addr}: listen: {e}"))?;
    Ok(TcpListener::from(fd))
}

fn udp_socket(addr: SocketAddr) -> Result<UdpSocket, String> {
    let fd = bound_socket(addr, SockType::Datagram).map_err(|e| format!("udp {addr}: {e}"))?;
    let r = match addr {
        SocketAddr::V4(_) => setsockopt(&fd, sockopt::Ipv4PacketInfo, &true),
        SocketAddr::V6(_) => setsockopt(&fd, sockopt::Ipv6RecvPacketInfo, &true),
    };
    r.map_err(|e| format!("udp {addr}: pktinfo: {e}"))?;
    Ok(UdpSocket::from(fd))
}

fn serve_tcp(listener: TcpListener, name: Arc<str>) {
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let name = name.clone();
                let spawned = std::thread::Builder::new()
                    .name("conn".into())
                    .spawn(move || handle_conn(stream, peer, &name));
                if let Err(e) = spawned {
                    eprintln!("capstan-echo: tcp {local}: cannot start thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("capstan-echo: tcp {local}: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn handle_conn(stream: TcpStream, peer: SocketAddr, name: &str) {
    let reply = format!("{name} {}\n", peer.ip());
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("capstan-echo: tcp from {peer}: {e}");
            return;
        }
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer.write_all(reply.as_bytes()).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

fn storage_to_socketaddr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(a) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4((*a).into()));
    }
    s.as_sockaddr_in6().map(|a| SocketAddr::V6((*a).into()))
}

fn serve_udp(sock: UdpSocket, name: Arc<str>) {
    let local = sock.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let fd = sock.as_raw_fd();
    let mut buf = [0u8; 65536];
    loop {
        let mut cmsg_buf = nix::cmsg_space!(libc::in6_pktinfo);
        let (peer, pkt4, pkt6) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<SockaddrStorage>(
                fd,
                &mut iov,
                Some(&mut cmsg_buf),
                MsgFlags::empty(),
            ) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("capstan-echo: udp {local}: recvmsg: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let (mut pkt4, mut pkt6) = (None, None);
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    match c {
                        ControlMessageOwned::Ipv4PacketInfo(i) => pkt4 = Some(i),
                        ControlMessageOwned::Ipv6PacketInfo(i) => pkt6 = Some(i),
                        _ => {}
                    }
                }
            }
            (
                msg.address.as_ref().and_then(storage_to_socketaddr),
                pkt4,
                pkt6,
            )
        };
        let Some(peer) = peer else { continue };
        let reply = format!("{name} {}\n", peer.ip());
        let iov = [IoSlice::new(reply.as_bytes())];
        let dest = SockaddrStorage::from(peer);
        // Answer from the address the datagram was sent to.
        let info4 = pkt4.map(|i| libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: i.ipi_spec_dst,
            ipi_addr: libc::in_addr { s_addr: 0 },
        });
        let info6 = pkt6.map(|i| {
            let is_link_local =
                i.ipi6_addr.s6_addr[0] == 0xfe && (i.ipi6_addr.s6_addr[1] & 0xc0) == 0x80;
            libc::in6_pktinfo {
                ipi6_addr: i.ipi6_addr,
                ipi6_ifindex: if is_link_local { i.ipi6_ifindex } else { 0 },
            }
        });
        let mut cmsgs = Vec::new();
        if let Some(i) = &info4 {
            cmsgs.push(ControlMessage::Ipv4PacketInfo(i));
        }
        if let Some(i) = &info6 {
            cmsgs.push(ControlMessage::Ipv6PacketInfo(i));
        }
        let sent = sendmsg(fd, &iov, &cmsgs, MsgFlags::empty(), Some(&dest));
        if let Err(e) = sent {
            // Fall back to letting the kernel pick the source.
            if let Err(e2) = sock.send_to(reply.as_bytes(), peer) {
                eprintln!("capstan-echo: udp {local}: reply to {peer}: {e} / {e2}");
            }
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("capstan-echo: {e}");
            return ExitCode::from(2);
        }
    };
    let name: Arc<str> = Arc::from(args.name.as_str());
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for a in &args.tcp {
        match tcp_listener(*a) {
            Ok(l) => tcp.push(l),
            Err(e) => {
                eprintln!("capstan-echo: {e}");
                return ExitCode::from(1);
            }
        }
    }
    for a in &args.udp {
        match udp_socket(*a) {
            Ok(s) => udp.push(s),
            Err(e) => {
                eprintln!("capstan-echo: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let mut threads = Vec::new();
    for l in tcp {
        eprintln!(
            "capstan-echo {name}: tcp {}",
            l.local_addr().map(|a| a.to_string()).unwrap_or_default()
        );
        let name = name.clone();
        threads.push(std::thread::spawn(move || serve_tcp(l, name)));
    }
    for s in udp {
        eprintln!(
            "capstan-echo {name}: udp {}",
            s.local_addr().map(|a| a.to_string()).unwrap_or_default()
        );
        let name = name.clone();
        threads.push(std::thread::spawn(move || serve_udp(s, name)));
    }
    let mut out = std::io::stdout().lock();
    if writeln!(out, "ready").and_then(|_| out.flush()).is_err() {
        return ExitCode::from(1);
    }
    drop(out);
    for t in threads {
        let _ = t.join();
    }
    ExitCode::SUCCESS
}
