//! Data-plane backends: each takes the same [`DesiredState`] and programs the kernel.
//! Today: `ebpf` (socket-level balancing on cgroup hooks).
pub mod ebpf;

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::model::{DesiredState, PlanKey};

/// What one sync did.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    /// Kernel writes made (0 when everything already matched).
    pub writes: usize,
    /// Plans that could not be committed (their frontends keep their last state).
    pub failed_plans: Vec<PlanKey>,
    /// Map name for every write refused because the map was full.
    pub full_maps: Vec<&'static str>,
    /// Other write errors.
    pub errors: usize,
    /// Time spent working out the writes, and making them (µs).
    pub diff_us: u64,
    pub apply_us: u64,
}

/// A data-plane mode.
pub trait Dataplane {
    /// Makes the kernel serve `desired`, with NodePorts on `node_addrs`.
    fn sync(&mut self, desired: &DesiredState, node_addrs: &BTreeSet<IpAddr>) -> SyncReport;
    /// Forgets what the last sync applied: the next sync compares everything with the
    /// kernel (the periodic full resync).
    fn resync(&mut self) {}
    /// Entries per map, for metrics.
    fn map_entries(&self) -> Vec<(&'static str, usize)>;
    /// Data-path counters (name, value), for metrics.
    fn counters(&self) -> Vec<(&'static str, u64)>;
}
