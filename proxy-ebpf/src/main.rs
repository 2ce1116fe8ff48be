//! capstan's eBPF programs.
//!
//! One entry module per attach point (`sock`: the cgroup socket hooks) and the logic they
//! share in libraries (`lb`: frontend lookup and backend selection; `maps`: the maps).
//! Built only for `bpfel-unknown-none` (`cargo xtask build-ebpf`); on the host this crate
//! is an empty binary so that workspace-wide commands still work.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod sock;

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual BSD/GPL\0";

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no way here; keep the object free of panic paths.
    unsafe { core::hint::unreachable_unchecked() }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
