//! Sources of Services, EndpointSlices and Nodes: the Kubernetes API (kube-rs watches) or
//! a directory of manifests. A source publishes whole, consistent [`Snapshot`]s; it knows
//! nothing about the kernel.
pub mod kube;
pub mod manifests;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use imbl::ordmap::DiffItem;

use crate::model::{Objects, Snapshot};

/// One consistent view of the cluster, and when it changed.
#[derive(Clone, Debug)]
pub struct Update {
    pub snapshot: Arc<Snapshot>,
    /// When the source noticed the change (start of the network-programming latency).
    pub observed_at: Instant,
    /// The newest `endpoints.kubernetes.io/last-change-trigger-time` among the slices this
    /// update changed, when the cluster sets it (kube-proxy's definition of programming
    /// latency); see [`trigger_time`].
    pub trigger_time: Option<SystemTime>,
}

pub type Sender = tokio::sync::watch::Sender<Option<Update>>;
pub type Receiver = tokio::sync::watch::Receiver<Option<Update>>;

/// The annotation the EndpointSlice controller stamps with the time of the change that
/// triggered the slice update.
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The trigger time of a change: the newest `last-change-trigger-time` among the slices
/// that are new in `snap` or carry another trigger time than in `prev`, ignoring times
/// before `since` (when the source started), as kube-proxy does. Slices that did not
/// change keep their old trigger times; counting those would measure an unrelated change
/// (a Service edit, another Service's endpoints) from a long-past trigger.
pub fn trigger_time(
    prev: Option<&Snapshot>,
    snap: &Snapshot,
    since: SystemTime,
) -> Option<SystemTime> {
    fn annotation(s: &EndpointSlice) -> Option<&String> {
        s.metadata
            .annotations
            .as_ref()?
            .get(ANNOTATION_TRIGGER_TIME)
    }
    let empty = Objects::<EndpointSlice>::new();
    let before = prev.map(|p| &p.endpoint_slices).unwrap_or(&empty);
    // Only the slices that are not the very same objects as before can carry a new
    // trigger time, and the diff visits only those.
    before
        .diff(&snap.endpoint_slices)
        .filter_map(|d| match d {
            DiffItem::Add(_, n) => annotation(n),
            DiffItem::Update { old, new } => {
                annotation(new.1).filter(|t| annotation(old.1) != Some(*t))
            }
            DiffItem::Remove(..) => None,
        })
        .filter_map(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
        .filter(|t| *t >= since)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::time::Duration;

    fn slice(name: &str, trigger: Option<&str>) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                annotations: trigger.map(|t| {
                    [(ANNOTATION_TRIGGER_TIME.to_string(), t.to_string())]
                        .into_iter()
                        .collect()
                }),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: Default::default(),
            ports: None,
        }
    }

    fn snap(slices: Vec<EndpointSlice>) -> Snapshot {
        Snapshot::of(vec![], slices, vec![])
    }

    #[test]
    fn trigger_time_counts_only_changed_slices_after_the_start() {
        let t = |s: &str| humantime::parse_rfc3339_weak(s).unwrap();
        let start = t("2024-01-01T00:00:00");
        let a1 = snap(vec![slice("a", Some("2024-01-01T00:00:10Z"))]);
        assert_eq!(
            trigger_time(None, &a1, start),
            Some(t("2024-01-01T00:00:10"))
        );
        // Triggered before the source started: not counted.
        assert_eq!(
            trigger_time(None, &a1, start + Duration::from_secs(60)),
            None
        );
        // Nothing about slice a changed; b has no trigger time: no trigger time.
        let a1b = snap(vec![
            slice("a", Some("2024-01-01T00:00:10Z")),
            slice("b", None),
        ]);
        assert_eq!(trigger_time(Some(&a1), &a1b, start), None);
        // b changes with a newer trigger time: b's.
        let a1b2 = snap(vec![
            slice("a", Some("2024-01-01T00:00:10Z")),
            slice("b", Some("2024-01-01T00:00:20Z")),
        ]);
        assert_eq!(
            trigger_time(Some(&a1b), &a1b2, start),
            Some(t("2024-01-01T00:00:20"))
        );
        // a changes again, with an older time than b's unchanged one: a's.
        let a2b2 = snap(vec![
            slice("a", Some("2024-01-01T00:00:15Z")),
            slice("b", Some("2024-01-01T00:00:20Z")),
        ]);
        assert_eq!(
            trigger_time(Some(&a1b2), &a2b2, start),
            Some(t("2024-01-01T00:00:15"))
        );
    }
}
