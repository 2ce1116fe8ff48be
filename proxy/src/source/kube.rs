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
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config};
use tracing::{info, warn};

use super::{Sender, Update, trigger_time};
use crate::model::{LABEL_HEADLESS, Snapshot};

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

fn reflect<K>(api: Api<K>, cfg: watcher::Config) -> (Store<K>, impl futures::Stream<Item = ()>)
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, cfg)
        .default_backoff()
        .reflect(writer)
        .filter_map(|ev| async move {
            match ev {
                Ok(_) => Some(()),
                Err(e) => {
                    warn!(error = %e, "watch failed; retrying");
                    None
                }
            }
        });
    (reader, stream)
}

pub async fn run(conn: Connection, node_name: String, tx: Sender) -> anyhow::Result<()> {
    // Trigger times from before this moment belong to changes made before we ran.
    let started = std::time::SystemTime::now();
    let client = client(&conn).await?;
    let (services, s1) = reflect(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    );
    let (slices, s2) = reflect(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(&format!("!{LABEL_HEADLESS}")),
    );
    let (nodes, s3) = reflect(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
    );
    let mut events =
        futures::stream::select(futures::stream::select(s1.boxed(), s2.boxed()), s3.boxed());
    let ready = futures::future::join3(
        services.wait_until_ready(),
        slices.wait_until_ready(),
        nodes.wait_until_ready(),
    );
    tokio::pin!(ready);
    // Drive the watches until every initial list is in.
    loop {
        tokio::select! {
            r = &mut ready => { let _ = r; break; }
            ev = events.next() => if ev.is_none() { return Ok(()) },
        }
    }
    info!(
        services = services.state().len(),
        endpoint_slices = slices.state().len(),
        "initial lists received"
    );
    let mut previous: Option<Arc<Snapshot>> = None;
    let mut publish = |tx: &Sender| {
        let snapshot = Arc::new(Snapshot {
            services: services.state(),
            endpoint_slices: slices.state(),
            nodes: nodes.state(),
        });
        let update = Update {
            trigger_time: trigger_time(previous.as_deref(), &snapshot, started),
            snapshot: snapshot.clone(),
            observed_at: Instant::now(),
        };
        previous = Some(snapshot);
        tx.send(Some(update)).is_ok()
    };
    if !publish(&tx) {
        return Ok(());
    }
    while events.next().await.is_some() {
        // Coalesce whatever else is already queued.
        while let Some(Some(())) = futures::FutureExt::now_or_never(events.next()) {}
        if !publish(&tx) {
            break;
        }
    }
    Ok(())
}
