//! `capstan-probe`: the client of capstan's integration tests.
//!
//! A long-running process that reads one command per line on stdin, runs it, and prints
//! exactly one result line on stdout (flushed), so a test drives thousands of requests through
//! one process. Bad input gives an `err` line, never a crash.
//!
//! ```text
//! tcp ADDR:PORT          connect (2 s timeout), send "hi\n", read one line, close
//!                        -> ok NAME SEEN_IP peer=IP:PORT us=N | err ERRNO us=N
//! udp ADDR:PORT          unconnected socket: sendto, recvfrom (1 s timeout)
//!                        -> ok NAME SEEN_IP from=IP:PORT us=N | err ERRNO us=N
//! udpc ADDR:PORT         connected UDP socket: connect, send, recvfrom
//!                        -> ok NAME SEEN_IP peer=IP:PORT from=IP:PORT us=N | err …
//! tcpkeep ADDR:PORT      open a TCP connection and keep it -> ok conn=ID peer=IP:PORT us=N
//! send ID                request/reply on kept connection ID -> like tcp
//! close ID               close kept connection ID -> ok closed=ID us=0
//! loop PROTO ADDR:PORT N N sequential tcp/udp/udpc requests
//!                        -> ok n=N fail=F backends=a:3,b:5 errors=ETIMEDOUT:2 us=N
//! quit                   -> ok bye, then exit
//! ```
//!
//! `ERRNO` is a name (`ECONNREFUSED`, `ETIMEDOUT`, …, else `E<number>`), or `EOF` (the server
//! closed without answering), `BADREPLY` (answer not `NAME IP`), `BADARG`/`BADCMD`/`BADID`
//! (bad input). Timeouts waiting for a reply are `ETIMEDOUT`. `us` is the wall time of the
//! whole operation in microseconds.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const TCP_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
const UDP_REPLY_TIMEOUT: Duration = Duration::from_secs(1);
const REQUEST: &[u8] = b"hi\n";

/// Name of an errno value.
fn errno_name(n: i32) -> String {
    let name = match n {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::EMFILE => "EMFILE",
        libc::EPIPE => "EPIPE",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETDOWN => "ENETDOWN",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOBUFS => "ENOBUFS",
        libc::EISCONN => "EISCONN",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EHOSTDOWN => "EHOSTDOWN",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::EPROTO => "EPROTO",
        libc::ENOPROTOOPT => "ENOPROTOOPT",
        _ => return format!("E{n}"),
    };
    name.to_string()
}

/// Errno-ish name of an I/O error.
fn error_name(e: &io::Error) -> String {
    if let Some(n) = e.raw_os_error() {
        return errno_name(n);
    }
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "ETIMEDOUT".into(),
        io::ErrorKind::UnexpectedEof => "EOF".into(),
        io::ErrorKind::InvalidData => "BADREPLY".into(),
        io::ErrorKind::ConnectionRefused => "ECONNREFUSED".into(),
        io::ErrorKind::ConnectionReset => "ECONNRESET".into(),
        io::ErrorKind::InvalidInput => "EINVAL".into(),
        _ => "EIO".into(),
    }
}

/// A receive that ran into SO_RCVTIMEO reports EAGAIN: call it a timeout.
fn recv_err(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::from_raw_os_error(libc::ETIMEDOUT)
    } else {
        e
    }
}

/// Splits an echo reply `NAME IP` into its two words.
fn parse_reply(bytes: &[u8]) -> io::Result<(String, String)> {
    let text = String::from_utf8_lossy(bytes);
    let mut words = text.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(n), Some(ip), None) => Ok((n.to_string(), ip.to_string())),
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "bad reply")),
    }
}

fn micros(start: Instant) -> u128 {
    start.elapsed().as_micros()
}

/// Outcome of one request, before formatting.
struct Outcome {
    result: io::Result<(String, String)>,
    extra: String,
    us: u128,
}

impl Outcome {
    fn line(&self) -> String {
        match &self.result {
            Ok((name, ip)) => format!("ok {name} {ip}{} us={}", self.extra, self.us),
            Err(e) => format!("err {} us={}", error_name(e), self.us),
        }
    }
}

/// Sends the request line on a connected stream and reads one reply line.
fn tcp_exchange(r: &mut BufReader<TcpStream>) -> io::Result<(String, String)> {
    r.get_mut().write_all(REQUEST)?;
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line).map_err(recv_err)?;
    if !line.ends_with(b"\n") {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof"));
    }
    parse_reply(&line)
}

fn tcp_connect(addr: SocketAddr) -> io::Result<BufReader<TcpStream>> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_read_timeout(Some(TCP_REPLY_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(BufReader::new(s))
}

fn peer_of(s: &TcpStream) -> String {
    s.peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|e| format!("?{}", error_name(&e)))
}

fn do_tcp(addr: SocketAddr) -> Outcome {
    let start = Instant::now();
    let mut extra = String::new();
    let result = tcp_connect(addr).and_then(|mut r| {
        extra = format!(" peer={}", peer_of(r.get_ref()));
        tcp_exchange(&mut r)
    });
    Outcome {
        result,
        extra,
        us: micros(start),
    }
}

fn unspecified_for(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

fn udp_recv(s: &UdpSocket) -> io::Result<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf).map_err(recv_err)?;
    Ok((buf[..n].to_vec(), from))
}

fn do_udp(addr: SocketAddr, connected: bool) -> Outcome {
    let start = Instant::now();
    let mut extra = String::new();
    let result = (|| {
        let s = UdpSocket::bind(unspecified_for(addr))?;
        s.set_read_timeout(Some(UDP_REPLY_TIMEOUT))?;
        if connected {
            s.connect(addr)?;
            extra = format!(
                " peer={}",
                s.peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|e| format!("?{}", error_name(&e)))
            );
            s.send(REQUEST)?;
        } else {
            s.send_to(REQUEST, addr)?;
        }
        let (data, from) = udp_recv(&s)?;
        extra.push_str(&format!(" from={from}"));
        parse_reply(&data)
    })();
    Outcome {
        result,
        extra,
        us: micros(start),
    }
}

#[derive(Clone, Copy)]
enum Proto {
    Tcp,
    Udp,
    Udpc,
}

impl Proto {
    fn parse(s: &str) -> Option<Proto> {
        match s {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            "udpc" => Some(Proto::Udpc),
            _ => None,
        }
    }

    fn run(self, addr: SocketAddr) -> Outcome {
        match self {
            Proto::Tcp => do_tcp(addr),
            Proto::Udp => do_udp(addr, false),
            Proto::Udpc => do_udp(addr, true),
        }
    }
}

fn do_loop(proto: Proto, addr: SocketAddr, n: u64) -> String {
    let start = Instant::now();
    let mut backends: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut fail = 0;
    for _ in 0..n {
        match proto.run(addr).result {
            Ok((name, _)) => *backends.entry(name).or_default() += 1,
            Err(e) => {
                fail += 1;
                *errors.entry(error_name(&e)).or_default() += 1;
            }
        }
    }
    let join = |m: &BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        "ok n={n} fail={fail} backends={} errors={} us={}",
        join(&backends),
        join(&errors),
        micros(start)
    )
}

/// Replaces whitespace so a detail fits in one token.
fn token(s: &str) -> String {
    let t: String = s
        .chars()
        .take(80)
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect();
    if t.is_empty() { "-".into() } else { t }
}

fn bad(kind: &str, detail: &str) -> String {
    format!("err {kind} us=0 detail={}", token(detail))
}

struct Probe {
    kept: HashMap<u64, BufReader<TcpStream>>,
    next_id: u64,
}

impl Probe {
    /// Runs one command line; returns the result line and whether to exit.
    fn execute(&mut self, line: &str) -> (String, bool) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let addr = |i: usize| -> Result<SocketAddr, String> {
            let w = words
                .get(i)
                .ok_or_else(|| bad("BADARG", "missing address"))?;
            w.parse()
                .map_err(|_| bad("BADARG", &format!("bad address {w}")))
        };
        let id = |i: usize| -> Result<u64, String> {
            let w = words.get(i).ok_or_else(|| bad("BADARG", "missing id"))?;
            w.parse().map_err(|_| bad("BADARG", &format!("bad id {w}")))
        };
        let result: Result<String, String> = match words.as_slice() {
            [] => Err(bad("BADCMD", "empty line")),
            ["quit"] => return ("ok bye".into(), true),
            ["tcp", _] => addr(1).map(|a| do_tcp(a).line()),
            ["udp", _] => addr(1).map(|a| do_udp(a, false).line()),
            ["udpc", _] => addr(1).map(|a| do_udp(a, true).line()),
            ["tcpkeep", _] => addr(1).map(|a| self.keep(a)),
            ["send", _] => id(1).map(|i| self.send(i)),
            ["close", _] => id(1).map(|i| match self.kept.remove(&i) {
                Some(_) => format!("ok closed={i} us=0"),
                None => bad("BADID", &i.to_string()),
            }),
            ["loop", proto, _, count] => match Proto::parse(proto) {
                None => Err(bad("BADARG", &format!("bad protocol {proto}"))),
                Some(p) => addr(2).and_then(|a| match count.parse::<u64>() {
                    Ok(n) => Ok(do_loop(p, a, n)),
                    Err(_) => Err(bad("BADARG", &format!("bad count {count}"))),
                }),
            },
            [cmd, ..] => Err(bad("BADCMD", cmd)),
        };
        (result.unwrap_or_else(|e| e), false)
    }

    fn keep(&mut self, addr: SocketAddr) -> String {
        let start = Instant::now();
        match tcp_connect(addr) {
            Ok(r) => {
                self.next_id += 1;
                let id = self.next_id;
                let peer = peer_of(r.get_ref());
                self.kept.insert(id, r);
                format!("ok conn={id} peer={peer} us={}", micros(start))
            }
            Err(e) => format!("err {} us={}", error_name(&e), micros(start)),
        }
    }

    fn send(&mut self, id: u64) -> String {
        let Some(r) = self.kept.get_mut(&id) else {
            return bad("BADID", &id.to_string());
        };
        let start = Instant::now();
        let extra = format!(" peer={}", peer_of(r.get_ref()));
        Outcome {
            result: tcp_exchange(r),
            extra,
            us: micros(start),
        }
        .line()
    }
}

fn main() {
    let mut probe = Probe {
        kept: HashMap::new(),
        next_id: 0,
    };
    let stdin = io::stdin();
    let mut input = stdin.lock();
    let mut stdout = io::stdout().lock();
    let mut raw = Vec::new();
    loop {
        raw.clear();
        // Bounded line length: a runaway writer gets an error line, not an OOM.
        match (&mut input).take(64 * 1024).read_until(b'\n', &mut raw) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                eprintln!("capstan-probe: reading stdin: {e}");
                return;
            }
        }
        let line = String::from_utf8_lossy(&raw);
        let (out, quit) = probe.execute(line.trim());
        if writeln!(stdout, "{out}")
            .and_then(|_| stdout.flush())
            .is_err()
        {
            return;
        }
        if quit {
            return;
        }
    }
}
