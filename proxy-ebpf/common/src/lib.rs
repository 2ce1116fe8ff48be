//! Map keys and values shared by capstan's eBPF programs and the capstan-proxy agent.
//!
//! Everything here is `#[repr(C)]`, free of implicit padding, and `no_std`: the same
//! definitions are compiled into the eBPF object and into userspace (feature `user`,
//! which derives `aya::Pod`). Addresses are kept in network byte order exactly as the
//! kernel hands them to socket hooks: an IPv4 address is `addr[0]` (the other words
//! zero), an IPv6 address all four words. Ports are network byte order too.
//!
//! The layout follows Cilium's load-balancer maps: a Service frontend has one entry per
//! backend slot; slot 0 describes the frontend (backend count, flags, affinity), slots
//! 1..=count name backend ids, and backends live in their own map by id. Updating slots
//! before slot 0 is what lets the agent change a Service without a connecting client
//! ever seeing a half-written one.
#![no_std]

/// Bumped whenever a map's layout changes; part of every pinned map's name so an agent
/// never reads a map written with another layout.
pub const MAPS_VERSION: u32 = 1;

pub const SERVICES_MAP: &str = "CS_SVC_V1";
pub const BACKENDS_MAP: &str = "CS_BACKEND_V1";
pub const REVERSE_MAP: &str = "CS_REVSK_V1";
pub const AFFINITY_MAP: &str = "CS_AFFINITY_V1";
pub const MAGLEV_MAP: &str = "CS_MAGLEV_V1";
pub const NODE_ADDRS_MAP: &str = "CS_NODEADDR_V1";
pub const CONFIG_MAP: &str = "CS_CONFIG_V1";
pub const SERVICE_CIDRS_MAP: &str = "CS_SVCCIDR_V1";
pub const COUNTERS_MAP: &str = "CS_COUNT_V1";

/// Names of the socket programs, one per cgroup hook (kernel object names are at most
/// 15 characters, map names too).
pub const PROGRAMS: [&str; 8] = [
    "cs_connect4",
    "cs_connect6",
    "cs_sendmsg4",
    "cs_sendmsg6",
    "cs_recvmsg4",
    "cs_recvmsg6",
    "cs_getpeername4",
    "cs_getpeername6",
];

/// Default sizes (flags on the agent override them at map creation). The Service map
/// holds one entry per frontend plus one per backend slot; both it and the backend map are
/// preallocated (about 20 MiB and 10 MiB of kernel memory at these sizes).
pub const DEFAULT_SERVICES_MAX: u32 = 1 << 18;
pub const DEFAULT_BACKENDS_MAX: u32 = 1 << 17;
pub const DEFAULT_REVERSE_MAX: u32 = 1 << 18;
pub const DEFAULT_AFFINITY_MAX: u32 = 1 << 16;
pub const DEFAULT_MAGLEV_MAX: u32 = 1024;
pub const DEFAULT_NODE_ADDRS_MAX: u32 = 256;
pub const SERVICE_CIDRS_MAX: u32 = 64;

/// Largest Maglev table a frontend may use (Cilium's default M). Tables are sized per
/// Service up to this, with a prime M chosen by the agent.
pub const MAGLEV_MAX_TABLE: usize = 16381;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Frontend flags (slot 0 `flags`).
pub mod flags {
    /// sessionAffinity: ClientIP; `affinity_timeout` holds timeoutSeconds.
    pub const AFFINITY: u16 = 1 << 0;
    /// Backends are chosen through the frontend's Maglev table instead of at random.
    pub const MAGLEV: u16 = 1 << 1;
    /// A NodePort: the key's address is zero and the frontend answers on every address in
    /// the node-address map.
    pub const NODEPORT: u16 = 1 << 2;
}

/// Key of the Service map: a frontend (address, port, protocol) and a backend slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    /// 0 for the frontend's description, 1..=count for its backends.
    pub slot: u16,
    pub _pad: u16,
}

/// Value of the Service map. Slot 0 uses `count`, `flags`, `service_id` and
/// `affinity_timeout`; slots 1.. use `backend_id` (and carry `service_id` too).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub count: u16,
    pub flags: u16,
    /// Identifies the Service port across its frontends (affinity, Maglev, reverse NAT).
    pub service_id: u32,
    /// Seconds (sessionAffinityConfig.clientIP.timeoutSeconds).
    pub affinity_timeout: u32,
}

/// A backend (endpoint address and target port) by id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Backend {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    /// The Service port this backend belongs to: an affinity entry is honoured only for
    /// a backend of the same Service.
    pub service_id: u32,
}

/// Key of the reverse map: the socket and the backend it was sent to, so recvmsg and
/// getpeername can show the application the address it asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReverseKey {
    pub cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}

/// The frontend a socket originally addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ReverseValue {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
    pub service_id: u32,
}

/// Session affinity: one client (its network namespace, i.e. one pod IP) and one Service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub service_id: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// bpf_ktime_get_ns() of the last connection that used this entry.
    pub last_used_ns: u64,
}

/// A node address on which NodePorts answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeAddrKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Key of the Service CIDR trie (`bpf_lpm_trie_key` layout): a destination inside a
/// Service CIDR that is no frontend is refused at once, as kube-proxy's nftables mode does.
/// `data[0]` is the family, so the prefix length is 32 + the CIDR's length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceCidrKey {
    pub prefix_len: u32,
    pub data: [u32; 5],
}

/// A frontend's Maglev lookup table: `table[hash % m]` is a backend slot (1-based).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MaglevTable {
    pub m: u32,
    pub table: [u16; MAGLEV_MAX_TABLE],
    pub _pad: u16,
}

/// Single-entry configuration array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Cookie of the node's own network namespace: NodePorts on loopback addresses are
    /// translated only for sockets in it (a pod's 127.0.0.1 is its own).
    pub host_netns_cookie: u64,
}

/// Indexes into the per-CPU counters array.
pub mod counter {
    pub const TRANSLATED: u32 = 0;
    pub const REFUSED_NO_ENDPOINT: u32 = 1;
    pub const AFFINITY_HIT: u32 = 2;
    pub const REVERSE_FULL: u32 = 3;
    pub const SLOT_MISS: u32 = 4;
    pub const REFUSED_UNKNOWN_FRONTEND: u32 = 5;
    pub const COUNT: u32 = 6;
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for ReverseKey {}
    unsafe impl aya::Pod for ReverseValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for NodeAddrKey {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for ServiceCidrKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // No implicit padding: the kernel compares keys byte for byte.
    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<ServiceKey>(), 24);
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(size_of::<Backend>(), 24);
        assert_eq!(size_of::<ServiceCidrKey>(), 24);
        assert_eq!(size_of::<ReverseKey>(), 32);
        assert_eq!(size_of::<ReverseValue>(), 24);
        assert_eq!(size_of::<AffinityKey>(), 16);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<NodeAddrKey>(), 20);
        assert_eq!(size_of::<MaglevTable>(), 4 + 2 * MAGLEV_MAX_TABLE + 2);
    }
}
