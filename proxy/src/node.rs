//! What the agent learns from the node it runs on: where cgroup v2 is mounted and which
//! addresses NodePorts answer on.
use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use tracing::info;

/// Finds a cgroup2 mount in `mountinfo` text (the mount point, 5th field).
pub fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = pre.split_whitespace().nth(4)?;
        Some(PathBuf::from(mount_point.replace("\\040", " ")))
    })
}

/// The cgroup v2 root: an existing mount, or one mounted at /run/capstan/cgroupv2.
pub fn cgroup2_root() -> io::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    if let Some(p) = find_cgroup2(&mountinfo) {
        return Ok(p);
    }
    let p = Path::new("/run/capstan/cgroupv2");
    std::fs::create_dir_all(p)?;
    nix::mount::mount(
        Some("cgroup2"),
        p,
        Some("cgroup2"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(io::Error::from)?;
    info!(path = %p.display(), "mounted cgroup2");
    Ok(p.to_path_buf())
}

/// Whether an address may carry NodePorts: not link-local, inside the configured CIDRs
/// (when any), loopback included (localhost NodePorts for clients on the node).
pub fn nodeport_address(ip: &IpAddr, cidrs: &[IpNet]) -> bool {
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    if link_local || ip.is_unspecified() || ip.is_multicast() {
        return false;
    }
    cidrs.is_empty() || cidrs.iter().any(|c| c.contains(ip))
}

/// The node's addresses NodePorts answer on, read from the kernel now.
pub fn nodeport_addresses(cidrs: &[IpNet]) -> io::Result<BTreeSet<IpAddr>> {
    let mut out = BTreeSet::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if nodeport_address(&ip, cidrs) {
            out.insert(ip);
        }
    }
    // Localhost NodePorts, as kube-proxy allows them.
    for lo in [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ] {
        if cidrs.is_empty() || cidrs.iter().any(|c| c.contains(&lo)) {
            out.insert(lo);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_a_hybrid_layout() {
        let mi = "25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n\
                  35 34 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate\n\
                  36 34 0:31 / /sys/fs/cgroup/systemd rw shared:11 - cgroup cgroup rw,name=systemd\n";
        assert_eq!(
            find_cgroup2(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            find_cgroup2("25 30 0:23 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }

    #[test]
    fn nodeport_address_filter() {
        let cidrs: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(nodeport_address(&"10.1.2.3".parse().unwrap(), &cidrs));
        assert!(!nodeport_address(&"192.168.1.1".parse().unwrap(), &cidrs));
        assert!(!nodeport_address(&"fe80::1".parse().unwrap(), &[]));
        assert!(nodeport_address(&"fd00::1".parse().unwrap(), &[]));
    }
}
