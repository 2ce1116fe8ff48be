//! capstan-bench: the load generator and server behind `cargo xtask bench`.
//!
//! - `capstan-bench serve NAME ADDR...`: answers every TCP connection with one line
//!   (`NAME\n`) after reading one request line, then closes. A few accept threads per
//!   address, no per-connection thread.
//! - `capstan-bench rr ADDR SECONDS`: sequential connect-request-response for SECONDS;
//!   prints `requests=N errors=E rate=R p50_us=X p99_us=Y`. Each connection is closed with
//!   an RST (SO_LINGER 0) so that no TIME_WAIT piles up on the client.
//! - `capstan-bench until ADDR NAME TIMEOUT_MS`: connects every 250 µs until NAME answers;
//!   prints `at_ns=<CLOCK_REALTIME ns of that answer>` (the data path has changed).
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn usage() -> ! {
    eprintln!(
        "usage: capstan-bench serve NAME ADDR... | rr ADDR SECONDS | until ADDR NAME TIMEOUT_MS"
    );
    std::process::exit(2)
}

fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket and option buffer.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn serve(name: String, addrs: Vec<SocketAddr>) -> std::io::Result<()> {
    let reply = format!("{name}\n");
    let mut threads = Vec::new();
    for addr in addrs {
        let l = TcpListener::bind(addr)?;
        for _ in 0..2 {
            let l = l.try_clone()?;
            let reply = reply.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                loop {
                    let Ok((mut s, _)) = l.accept() else { continue };
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut got = 0;
                    while got < buf.len() {
                        match s.read(&mut buf[got..]) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                got += n;
                                if buf[..got].contains(&b'\n') {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = s.write_all(reply.as_bytes());
                }
            }));
        }
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// One connect-request-response; returns the answer.
fn one(addr: SocketAddr, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    set_linger_zero(&s);
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET\n")?;
    let mut got = 0;
    loop {
        let n = s.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
        if buf[..got].contains(&b'\n') || got == buf.len() {
            break;
        }
    }
    Ok(got)
}

fn rr(addr: SocketAddr, seconds: f64) {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut lat: Vec<u32> = Vec::with_capacity(200_000);
    let mut errors = 0u64;
    let mut buf = [0u8; 64];
    let start = Instant::now();
    while Instant::now() < end {
        let t = Instant::now();
        match one(addr, &mut buf) {
            Ok(n) if n > 0 => lat.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32),
            _ => errors += 1,
        }
    }
    let took = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0
        }
    };
    println!(
        "requests={} errors={} rate={:.1} p50_us={:.1} p99_us={:.1}",
        lat.len(),
        errors,
        lat.len() as f64 / took,
        pct(0.50),
        pct(0.99)
    );
}

/// How often `until` probes: the resolution of the change-latency measurement.
const PROBE_PACE: Duration = Duration::from_micros(250);

fn until(addr: SocketAddr, name: &str, timeout_ms: u64) {
    let end = Instant::now() + Duration::from_millis(timeout_ms);
    let mut buf = [0u8; 64];
    println!("ready");
    let _ = std::io::stdout().flush();
    while Instant::now() < end {
        // One probe every PROBE_PACE at most: a client spinning flat out would take a
        // whole core from the agent whose latency it measures (two cores here).
        let next = Instant::now() + PROBE_PACE;
        if let Ok(n) = one(addr, &mut buf)
            && std::str::from_utf8(&buf[..n]).map(|s| s.trim()) == Ok(name)
        {
            let at = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            println!("at_ns={at}");
            return;
        }
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    println!("timeout");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = |s: &String| s.parse::<SocketAddr>().unwrap_or_else(|_| usage());
    match args.first().map(|s| s.as_str()) {
        Some("serve") if args.len() >= 3 => {
            let addrs = args[2..].iter().map(addr).collect();
            if let Err(e) = serve(args[1].clone(), addrs) {
                eprintln!("serve: {e}");
                std::process::exit(1);
            }
        }
        Some("rr") if args.len() == 3 => {
            rr(addr(&args[1]), args[2].parse().unwrap_or_else(|_| usage()))
        }
        Some("until") if args.len() == 4 => until(
            addr(&args[1]),
            &args[2],
            args[3].parse().unwrap_or_else(|_| usage()),
        ),
        _ => usage(),
    }
}
