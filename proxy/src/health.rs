//! `/healthz` and `/livez` as kube-proxy serves them (load balancers and kubelet probe
//! these): healthy unless an update has waited longer than twice the sync period;
//! /healthz also reports whether the node is eligible for traffic.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

#[derive(Debug, Default)]
struct State {
    last_updated: Option<SystemTime>,
    oldest_queued: Option<SystemTime>,
    node_eligible: bool,
}

/// Shared between the sync loop (writer) and the HTTP servers (readers).
#[derive(Clone, Debug)]
pub struct Health {
    state: Arc<Mutex<State>>,
    timeout: Duration,
}

fn rfc3339(t: Option<SystemTime>) -> String {
    match t {
        Some(t) => humantime::format_rfc3339_nanos(t).to_string(),
        None => "0001-01-01T00:00:00Z".to_string(),
    }
}

impl Health {
    pub fn new(sync_period: Duration) -> Health {
        Health {
            state: Arc::new(Mutex::new(State {
                node_eligible: true,
                ..Default::default()
            })),
            timeout: sync_period * 2,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A change arrived and is waiting for a sync.
    pub fn queued(&self) {
        let mut s = self.lock();
        s.oldest_queued.get_or_insert_with(SystemTime::now);
    }

    /// A sync completed.
    pub fn updated(&self) {
        let mut s = self.lock();
        s.last_updated = Some(SystemTime::now());
        s.oldest_queued = None;
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    /// (healthy, lastUpdated, currentTime, nodeEligible)
    fn status(&self) -> (bool, String, String, bool) {
        let s = self.lock();
        let now = SystemTime::now();
        let healthy = match s.oldest_queued {
            Some(q) => now.duration_since(q).unwrap_or_default() <= self.timeout,
            None => true,
        };
        (
            healthy,
            rfc3339(s.last_updated),
            rfc3339(Some(now)),
            s.node_eligible,
        )
    }
}

async fn healthz(health: Health) -> impl IntoResponse {
    let (healthy, last, now, eligible) = health.status();
    let code = if healthy && eligible {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = format!(
        r#"{{"lastUpdated": "{last}","currentTime": "{now}", "nodeEligible": {eligible}}}"#
    );
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

async fn livez(health: Health) -> impl IntoResponse {
    let (healthy, last, now, _) = health.status();
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = format!(r#"{{"lastUpdated": "{last}","currentTime": "{now}"}}"#);
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// Serves /healthz and /livez until the task is dropped.
pub async fn serve_health(addr: SocketAddr, health: Health) -> std::io::Result<()> {
    let h1 = health.clone();
    let app = Router::new()
        .route("/healthz", get(move || healthz(h1.clone())))
        .route("/livez", get(move || livez(health.clone())));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

/// Serves /metrics (and /healthz, as kube-proxy's metrics port does) until dropped.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Health,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        m.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(move || healthz(health.clone())));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}
