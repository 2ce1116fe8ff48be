//! Sources of Services, EndpointSlices and Nodes: the Kubernetes API (kube-rs watches) or
//! a directory of manifests. A source publishes whole, consistent [`Snapshot`]s; it knows
//! nothing about the kernel.
pub mod kube;
pub mod manifests;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::model::Snapshot;

/// One consistent view of the cluster, and when it changed.
#[derive(Clone, Debug)]
pub struct Update {
    pub snapshot: Arc<Snapshot>,
    /// When the source noticed the change (start of the network-programming latency).
    pub observed_at: Instant,
    /// The newest `endpoints.kubernetes.io/last-change-trigger-time` among the slices,
    /// when the cluster sets it (kube-proxy's definition of programming latency).
    pub trigger_time: Option<SystemTime>,
}

pub type Sender = tokio::sync::watch::Sender<Option<Update>>;
pub type Receiver = tokio::sync::watch::Receiver<Option<Update>>;

/// The annotation the EndpointSlice controller stamps with the time of the change that
/// triggered the slice update.
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

pub fn trigger_time(snap: &Snapshot) -> Option<SystemTime> {
    snap.endpoint_slices
        .iter()
        .filter_map(|s| {
            s.metadata
                .annotations
                .as_ref()?
                .get(ANNOTATION_TRIGGER_TIME)
        })
        .filter_map(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
        .max()
}
