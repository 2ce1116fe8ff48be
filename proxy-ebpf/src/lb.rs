//! Frontend lookup and backend selection, shared by every entry point.
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use capstan_proxy_common::*;

use crate::maps::*;

/// An address as the maps hold it (network byte order words, v4 in word 0).
#[derive(Clone, Copy)]
pub struct Addr {
    pub addr: [u32; 4],
    pub family: u8,
}

/// What a socket hook does with a destination.
pub enum Verdict {
    /// Not a frontend: leave the socket alone.
    Pass,
    /// A frontend without a usable endpoint: fail the call with ECONNREFUSED.
    Refuse,
    /// Send to this backend instead.
    Translate(Backend, u32),
}

/// Who is connecting: the client's network namespace (one pod, one IP) and the socket.
pub struct Client {
    pub netns_cookie: u64,
    pub sock_cookie: u64,
}

#[inline(always)]
fn is_loopback(a: &Addr) -> bool {
    if a.family == FAMILY_V4 {
        // 127.0.0.0/8: first byte in memory is 127.
        (a.addr[0] & 0xff) == 127
    } else {
        // ::1
        a.addr[0] == 0 && a.addr[1] == 0 && a.addr[2] == 0 && a.addr[3] == 1u32.to_be()
    }
}

/// Finds the frontend for a destination: an exact (address, port, protocol) entry, else a
/// NodePort when the address is one of the node's (loopback only for the node's own
/// network namespace: a pod's 127.0.0.1 is its own).
#[inline(always)]
pub fn lookup_frontend(
    dst: &Addr,
    port: u16,
    proto: u8,
    netns_cookie: impl FnOnce() -> u64,
) -> Option<(ServiceKey, ServiceValue)> {
    let mut key = ServiceKey {
        addr: dst.addr,
        port,
        proto,
        family: dst.family,
        slot: 0,
        _pad: 0,
    };
    if let Some(v) = SERVICES.get_ptr(&key) {
        return Some((key, unsafe { *v }));
    }
    if is_loopback(dst) {
        let host = match CONFIG.get(0) {
            Some(c) => c.host_netns_cookie,
            None => return None,
        };
        if host == 0 || host != netns_cookie() {
            return None;
        }
    }
    let nk = NodeAddrKey {
        addr: dst.addr,
        family: dst.family,
        _pad: [0; 3],
    };
    NODE_ADDRS.get_ptr(&nk)?;
    key.addr = [0; 4];
    let v = SERVICES.get_ptr(&key)?;
    let v = unsafe { *v };
    if v.flags & flags::NODEPORT == 0 {
        return None;
    }
    Some((key, v))
}

#[inline(always)]
fn backend_in_slot(key: &ServiceKey, slot: u16) -> Option<(u32, Backend)> {
    let k = ServiceKey { slot, ..*key };
    let id = unsafe { (*SERVICES.get_ptr(&k)?).backend_id };
    let b = BACKENDS.get_ptr(&id)?;
    Some((id, unsafe { *b }))
}

/// A 32-bit mix of the socket cookie (splitmix64 finaliser): the hash Maglev indexes with.
#[inline(always)]
fn hash64(mut x: u64) -> u32 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58476d1ce4e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d049bb133111eb);
    x ^= x >> 31;
    x as u32
}

#[inline(always)]
fn pick_slot(svc: &ServiceValue, client: &Client) -> u16 {
    let count = svc.count as u32;
    if svc.flags & flags::MAGLEV != 0 {
        if let Some(t) = MAGLEV.get_ptr(&svc.service_id) {
            let m = unsafe { (*t).m };
            if m != 0 {
                let idx = (hash64(client.sock_cookie) % m) as usize;
                if idx < MAGLEV_MAX_TABLE {
                    let slot = unsafe { (*t).table[idx] };
                    if slot != 0 && (slot as u32) <= count {
                        return slot;
                    }
                }
            }
        }
    }
    (unsafe { bpf_get_prandom_u32() } % count) as u16 + 1
}

/// Chooses the backend for one new connection or datagram.
#[inline(always)]
pub fn select(key: &ServiceKey, svc: &ServiceValue, client: &Client) -> Verdict {
    if svc.count == 0 {
        count(counter::REFUSED_NO_ENDPOINT);
        return Verdict::Refuse;
    }
    let affinity = svc.flags & flags::AFFINITY != 0;
    let akey = AffinityKey {
        netns_cookie: client.netns_cookie,
        service_id: svc.service_id,
        _pad: 0,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if affinity {
        if let Some(a) = AFFINITY.get_ptr_mut(&akey) {
            let (id, last) = unsafe { ((*a).backend_id, (*a).last_used_ns) };
            let timeout_ns = svc.affinity_timeout as u64 * 1_000_000_000;
            if now.wrapping_sub(last) <= timeout_ns {
                // Only a backend of this Service: ids of removed backends can be reused.
                if let Some(b) = BACKENDS
                    .get_ptr(&id)
                    .filter(|b| unsafe { (**b).service_id } == svc.service_id)
                {
                    unsafe { (*a).last_used_ns = now };
                    count(counter::AFFINITY_HIT);
                    return Verdict::Translate(unsafe { *b }, svc.service_id);
                }
            }
        }
    }
    let slot = pick_slot(svc, client);
    // A slot can vanish between reading the count and reading the slot while the agent
    // shrinks a Service; slot 1 is the last to go.
    let chosen = match backend_in_slot(key, slot) {
        Some(x) => x,
        None => {
            count(counter::SLOT_MISS);
            match backend_in_slot(key, 1) {
                Some(x) => x,
                None => return Verdict::Pass,
            }
        }
    };
    if affinity {
        let v = AffinityValue {
            backend_id: chosen.0,
            _pad: 0,
            last_used_ns: now,
        };
        let _ = AFFINITY.insert(&akey, &v, 0);
    }
    count(counter::TRANSLATED);
    Verdict::Translate(chosen.1, svc.service_id)
}

/// Remembers which frontend a socket addressed, for recvmsg and getpeername.
#[inline(always)]
pub fn remember(cookie: u64, backend: &Backend, frontend: &Addr, port: u16, service_id: u32) {
    let k = ReverseKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        family: backend.family,
        _pad: [0; 5],
    };
    let v = ReverseValue {
        addr: frontend.addr,
        port,
        family: frontend.family,
        _pad: 0,
        service_id,
    };
    if REVERSE.insert(&k, &v, 0).is_err() {
        count(counter::REVERSE_FULL);
    }
}

/// The frontend a socket's peer stands for, if the peer is a backend it was sent to.
#[inline(always)]
pub fn recall(cookie: u64, peer: &Addr, port: u16) -> Option<ReverseValue> {
    let k = ReverseKey {
        cookie,
        addr: peer.addr,
        port,
        family: peer.family,
        _pad: [0; 5],
    };
    REVERSE.get_ptr(&k).map(|v| unsafe { *v })
}

/// Whether a destination lies in a Service CIDR (and, not being a frontend, is refused).
#[inline(always)]
pub fn in_service_cidr(dst: &Addr) -> bool {
    let key = aya_ebpf::maps::lpm_trie::Key {
        prefix_len: 32 + if dst.family == FAMILY_V4 { 32 } else { 128 },
        data: [
            dst.family as u32,
            dst.addr[0],
            dst.addr[1],
            dst.addr[2],
            dst.addr[3],
        ],
    };
    SERVICE_CIDRS.get(&key).is_some()
}
