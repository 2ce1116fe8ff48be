//! The Kubernetes API as a source: kube-rs reflectors on Services, EndpointSlices (without
//! headless ones) and this node's Node object. A snapshot is published only once every
//! initial list has arrived, so a restart never programs a half-known cluster; while the
//! API server is unreachable the watchers retry with backoff and the data path keeps its
//! last state.
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config};
use tracing::{info, warn};

use super::{Sender, Update, trigger_time};
use crate::model::{Kind, LABEL_HEADLESS, Objects, Shared, Snapshot};

/// How to reach the API server (kube-proxy's flags).
#[derive(Clone, Debug, Default)]
pub struct Connection {
    pub kubeconfig: Option<std::path::PathBuf>,
    pub master: Option<String>,
}

pub async fn client(conn: &Connection) -> anyhow::Result<Client> {
    let mut config = match &conn.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)?;
            Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => match Config::infer().await {
            Ok(c) => c,
            Err(e) if conn.master.is_some() => {
                warn!(error = %e, "no kubeconfig or in-cluster config; using --master alone");
                Config::new(conn.master.clone().unwrap_or_default().parse()?)
            }
            Err(e) => return Err(e.into()),
        },
    };
    if let Some(master) = &conn.master {
        config.cluster_url = master.parse()?;
    }
    Ok(Client::try_from(config)?)
}

/// One kind's objects as the watch reports them. After a (re)list, objects whose
/// resourceVersion did not change keep their shared instance, so a relist costs the model
/// nothing for them.
pub struct Mirror<K: Kind> {
    objects: Objects<K>,
    /// The objects of a list in progress.
    listing: Option<Objects<K>>,
    /// Whether a first list has completed.
    pub ready: bool,
}

impl<K: Kind> Default for Mirror<K> {
    fn default() -> Self {
        Mirror {
            objects: Objects::new(),
            listing: None,
            ready: false,
        }
    }
}

impl<K: Kind> Mirror<K> {
    /// Applies one watch event; returns whether the mirrored objects changed.
    pub fn apply(&mut self, event: watcher::Event<K>) -> bool {
        match event {
            watcher::Event::Init => {
                self.listing = Some(Objects::new());
                false
            }
            watcher::Event::InitApply(obj) => {
                let obj = self.reuse(obj);
                let key = obj.key();
                self.listing
                    .get_or_insert_with(Objects::new)
                    .insert(key, obj);
                false
            }
            watcher::Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let changed = !self.ready || listed.diff(&self.objects).next().is_some();
                self.objects = listed;
                self.ready = true;
                changed
            }
            watcher::Event::Apply(obj) => {
                let obj = self.reuse(obj);
                let key = obj.key();
                if self.objects.get(&key) == Some(&obj) {
                    return false;
                }
                self.objects.insert(key, obj);
                true
            }
            watcher::Event::Delete(obj) => self.objects.remove(&obj.key()).is_some(),
        }
    }

    /// The shared instance already held when the object's resourceVersion is the same.
    fn reuse(&self, obj: K) -> Shared<K> {
        if let Some(old) = self.objects.get(&obj.key())
            && old.metadata().resource_version.is_some()
            && old.metadata().resource_version == obj.metadata().resource_version
        {
            return old.clone();
        }
        Shared::new(obj)
    }

    pub fn objects(&self) -> &Objects<K> {
        &self.objects
    }
}

/// An event from one of the three watches.
enum Watched {
    Service(Box<watcher::Event<Service>>),
    EndpointSlice(Box<watcher::Event<EndpointSlice>>),
    Node(Box<watcher::Event<Node>>),
}

#[derive(Default)]
struct Mirrors {
    services: Mirror<Service>,
    slices: Mirror<EndpointSlice>,
    nodes: Mirror<Node>,
}

impl Mirrors {
    fn apply(&mut self, ev: Result<Watched, watcher::Error>) -> bool {
        match ev {
            Ok(Watched::Service(e)) => self.services.apply(*e),
            Ok(Watched::EndpointSlice(e)) => self.slices.apply(*e),
            Ok(Watched::Node(e)) => self.nodes.apply(*e),
            Err(e) => {
                warn!(error = %e, "watch failed; retrying");
                false
            }
        }
    }

    fn ready(&self) -> bool {
        self.services.ready && self.slices.ready && self.nodes.ready
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            services: self.services.objects().clone(),
            endpoint_slices: self.slices.objects().clone(),
            nodes: self.nodes.objects().clone(),
        }
    }
}

pub async fn run(conn: Connection, node_name: String, tx: Sender) -> anyhow::Result<()> {
    // Trigger times from before this moment belong to changes made before we ran.
    let started = std::time::SystemTime::now();
    let client = client(&conn).await?;
    let services = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|r| r.map(|e| Watched::Service(Box::new(e))));
    let slices = watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(&format!("!{LABEL_HEADLESS}")),
    )
    .default_backoff()
    .map(|r| r.map(|e| Watched::EndpointSlice(Box::new(e))));
    let nodes = watcher(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
    )
    .default_backoff()
    .map(|r| r.map(|e| Watched::Node(Box::new(e))));
    let mut events = futures::stream::select(
        futures::stream::select(services.boxed(), slices.boxed()),
        nodes.boxed(),
    );
    let mut mirrors = Mirrors::default();
    let mut previous: Option<Arc<Snapshot>> = None;
    while let Some(ev) = events.next().await {
        let mut changed = mirrors.apply(ev);
        // Take in whatever else is already queued before publishing.
        while let Some(Some(ev)) = futures::FutureExt::now_or_never(events.next()) {
            changed |= mirrors.apply(ev);
        }
        // A snapshot is published only once every initial list is in: a restart never
        // programs a half-known cluster.
        if !mirrors.ready() || !(changed || previous.is_none()) {
            continue;
        }
        let snapshot = Arc::new(mirrors.snapshot());
        if previous.is_none() {
            info!(
                services = snapshot.services.len(),
                endpoint_slices = snapshot.endpoint_slices.len(),
                "initial lists received"
            );
        }
        let update = Update {
            trigger_time: trigger_time(previous.as_deref(), &snapshot, started),
            snapshot: snapshot.clone(),
            observed_at: Instant::now(),
        };
        previous = Some(snapshot);
        if tx.send(Some(update)).is_err() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(name: &str, rv: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn mirror_follows_the_watch_and_a_relist_keeps_unchanged_objects() {
        let mut m = Mirror::<Service>::default();
        assert!(!m.apply(watcher::Event::Init));
        assert!(!m.apply(watcher::Event::InitApply(svc("a", "1"))));
        assert!(!m.apply(watcher::Event::InitApply(svc("b", "1"))));
        assert!(!m.ready);
        // The first list completes: a change, even when empty.
        assert!(m.apply(watcher::Event::InitDone));
        assert!(m.ready);
        assert_eq!(m.objects().len(), 2);
        let a = m
            .objects()
            .get(&("default".into(), "a".into()))
            .unwrap()
            .clone();
        // The same version again changes nothing.
        assert!(!m.apply(watcher::Event::Apply(svc("a", "1"))));
        assert!(m.apply(watcher::Event::Apply(svc("a", "2"))));
        assert!(m.apply(watcher::Event::Delete(svc("b", "1"))));
        assert!(!m.apply(watcher::Event::Delete(svc("b", "1"))));
        // A relist with the same versions: no change, the same shared objects.
        let a2 = m
            .objects()
            .get(&("default".into(), "a".into()))
            .unwrap()
            .clone();
        assert!(a2 != a);
        m.apply(watcher::Event::Init);
        m.apply(watcher::Event::InitApply(svc("a", "2")));
        assert!(!m.apply(watcher::Event::InitDone));
        assert!(m.objects().get(&("default".into(), "a".into())) == Some(&a2));
        // A relist that misses an object (deleted while the watch was down) drops it.
        m.apply(watcher::Event::Init);
        assert!(m.apply(watcher::Event::InitDone));
        assert!(m.objects().is_empty());
    }
}
