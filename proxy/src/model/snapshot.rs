//! [`Snapshot`]: everything the model reads, held in persistent maps so that a source can
//! publish a new snapshot after one change in O(log n), and the model can find what
//! changed between two snapshots in time proportional to the change, not to the cluster.
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use k8s_openapi::Metadata;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// An object shared between snapshots. It equals only itself (identity), which is what a
/// source guarantees for an object that did not change: comparing two snapshots never
/// looks inside an object.
pub struct Shared<T>(pub Arc<T>);

impl<T> Shared<T> {
    pub fn new(obj: T) -> Self {
        Shared(Arc::new(obj))
    }
    pub fn as_ptr(&self) -> *const T {
        Arc::as_ptr(&self.0)
    }
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<T> Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> PartialEq for Shared<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl<T> Eq for Shared<T> {}

impl<T: fmt::Debug> fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// (namespace, name); cluster-scoped objects have an empty namespace.
pub type ObjectKey = (String, String);

/// Objects of one kind by key, in key order.
pub type Objects<T> = imbl::OrdMap<ObjectKey, Shared<T>>;

/// The key of an object; a namespaced object without a namespace is in `default`, as the
/// API server would have put it.
pub fn key_of(meta: &ObjectMeta, namespaced: bool) -> ObjectKey {
    let ns = match (&meta.namespace, namespaced) {
        (_, false) => String::new(),
        (Some(ns), true) => ns.clone(),
        (None, true) => "default".to_string(),
    };
    (ns, meta.name.clone().unwrap_or_default())
}

/// What a snapshot holds of one kind: its key and scope.
pub trait Kind: Metadata<Ty = ObjectMeta> + Sized {
    const NAMESPACED: bool;
    fn key(&self) -> ObjectKey {
        key_of(self.metadata(), Self::NAMESPACED)
    }
    fn objects(snap: &Snapshot) -> &Objects<Self>;
    fn objects_mut(snap: &mut Snapshot) -> &mut Objects<Self>;
}

impl Kind for Service {
    const NAMESPACED: bool = true;
    fn objects(snap: &Snapshot) -> &Objects<Self> {
        &snap.services
    }
    fn objects_mut(snap: &mut Snapshot) -> &mut Objects<Self> {
        &mut snap.services
    }
}

impl Kind for EndpointSlice {
    const NAMESPACED: bool = true;
    fn objects(snap: &Snapshot) -> &Objects<Self> {
        &snap.endpoint_slices
    }
    fn objects_mut(snap: &mut Snapshot) -> &mut Objects<Self> {
        &mut snap.endpoint_slices
    }
}

impl Kind for Node {
    const NAMESPACED: bool = false;
    fn objects(snap: &Snapshot) -> &Objects<Self> {
        &snap.nodes
    }
    fn objects_mut(snap: &mut Snapshot) -> &mut Objects<Self> {
        &mut snap.nodes
    }
}

/// Everything the model reads. Objects are taken as they are; invalid ones are skipped
/// with a log line. Cloning is O(1); two snapshots that share most objects share most of
/// their structure, and [`imbl::OrdMap::diff`] skips what they share.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Objects<Service>,
    pub endpoint_slices: Objects<EndpointSlice>,
    pub nodes: Objects<Node>,
}

impl Snapshot {
    /// A snapshot of fresh objects (for tests and one-off evaluations).
    pub fn of(
        services: Vec<Service>,
        endpoint_slices: Vec<EndpointSlice>,
        nodes: Vec<Node>,
    ) -> Self {
        let mut snap = Snapshot::default();
        for s in services {
            snap.put(Shared::new(s));
        }
        for s in endpoint_slices {
            snap.put(Shared::new(s));
        }
        for n in nodes {
            snap.put(Shared::new(n));
        }
        snap
    }

    /// Puts an object in place of the one with its key. Putting the very object already
    /// there changes nothing (the maps keep sharing their structure).
    pub fn put<K: Kind>(&mut self, obj: Shared<K>) {
        let key = obj.key();
        let map = K::objects_mut(self);
        if map.get(&key) != Some(&obj) {
            map.insert(key, obj);
        }
    }

    /// Removes the object with this key, if any.
    pub fn remove<K: Kind>(&mut self, key: &ObjectKey) -> Option<Shared<K>> {
        K::objects_mut(self).remove(key)
    }

    pub fn get<K: Kind>(&self, key: &ObjectKey) -> Option<&Shared<K>> {
        K::objects(self).get(key)
    }
}
