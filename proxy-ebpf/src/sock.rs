//! Entry points on the cgroup v2 socket hooks: connect4/6 and sendmsg4/6 translate a
//! frontend to a backend before the socket ever sends a packet; recvmsg4/6 and
//! getpeername4/6 show the application the frontend it asked for, not the backend.
use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use capstan_proxy_common::*;

use crate::lb::{self, Addr, Client, Verdict};

const ECONNREFUSED: i32 = 111;
/// Allow the call to go on (possibly with a rewritten address).
const ALLOW: i32 = 1;
/// Fail the call; `bpf_set_retval` chose the error.
const DENY: i32 = 0;

#[inline(always)]
fn v4_mapped_prefix() -> u32 {
    0xffffu32.to_be()
}

#[inline(always)]
fn ctx_ptr(ctx: &SockAddrContext) -> *mut c_void {
    ctx.sock_addr as *mut c_void
}

/// The destination the application gave, and whether it is an IPv4-mapped IPv6 address
/// on an IPv6 socket (then it is looked up and rewritten as IPv4).
#[inline(always)]
fn user_dst(ctx: &SockAddrContext, v6: bool) -> (Addr, bool) {
    let sa = ctx.sock_addr;
    unsafe {
        if !v6 {
            return (
                Addr {
                    addr: [(*sa).user_ip4, 0, 0, 0],
                    family: FAMILY_V4,
                },
                false,
            );
        }
        let a = [
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
        ];
        if a[0] == 0 && a[1] == 0 && a[2] == v4_mapped_prefix() {
            (
                Addr {
                    addr: [a[3], 0, 0, 0],
                    family: FAMILY_V4,
                },
                true,
            )
        } else {
            (
                Addr {
                    addr: a,
                    family: FAMILY_V6,
                },
                false,
            )
        }
    }
}

#[inline(always)]
fn set_user_addr(ctx: &SockAddrContext, v6: bool, mapped: bool, addr: &[u32; 4], port: u16) {
    let sa = ctx.sock_addr;
    unsafe {
        if !v6 {
            (*sa).user_ip4 = addr[0];
        } else if mapped {
            (*sa).user_ip6[0] = 0;
            (*sa).user_ip6[1] = 0;
            (*sa).user_ip6[2] = v4_mapped_prefix();
            (*sa).user_ip6[3] = addr[0];
        } else {
            (*sa).user_ip6[0] = addr[0];
            (*sa).user_ip6[1] = addr[1];
            (*sa).user_ip6[2] = addr[2];
            (*sa).user_ip6[3] = addr[3];
        }
        (*sa).user_port = port as u32;
    }
}

/// connect and sendmsg: translate a frontend to a backend, or refuse at once.
#[inline(always)]
fn forward(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    let proto = unsafe { (*sa).protocol } as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return ALLOW;
    }
    let (dst, mapped) = user_dst(ctx, v6);
    let port = unsafe { (*sa).user_port } as u16;
    let netns_cookie = || unsafe { bpf_get_netns_cookie(ctx_ptr(ctx)) };
    let Some((key, svc)) = lb::lookup_frontend(&dst, port, proto, netns_cookie) else {
        // A Service address nobody serves (a deleted Service, a wrong port): refused at
        // once instead of routed nowhere.
        if lb::in_service_cidr(&dst) {
            crate::maps::count(counter::REFUSED_UNKNOWN_FRONTEND);
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            return DENY;
        }
        return ALLOW;
    };
    let client = Client {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx_ptr(ctx)) },
        sock_cookie: unsafe { bpf_get_socket_cookie(ctx_ptr(ctx)) },
    };
    match lb::select(&key, &svc, &client) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => {
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            DENY
        }
        Verdict::Translate(backend, service_id) => {
            if backend.family != dst.family {
                return ALLOW;
            }
            lb::remember(client.sock_cookie, &backend, &dst, port, service_id);
            set_user_addr(ctx, v6, mapped, &backend.addr, backend.port);
            ALLOW
        }
    }
}

/// recvmsg and getpeername: show the frontend in place of the backend it was sent to.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, v6: bool) -> i32 {
    let (peer, mapped) = user_dst(ctx, v6);
    let port = unsafe { (*ctx.sock_addr).user_port } as u16;
    let cookie = unsafe { bpf_get_socket_cookie(ctx_ptr(ctx)) };
    if let Some(front) = lb::recall(cookie, &peer, port) {
        set_user_addr(ctx, v6, mapped, &front.addr, front.port);
    }
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn cs_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn cs_connect6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn cs_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn cs_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn cs_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn cs_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn cs_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn cs_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true)
}
