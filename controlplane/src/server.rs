//! capstan-server wired together: the store, the API, TLS and authentication.
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use ipnet::IpNet;
use serde_json::json;
use tracing::{debug, info, warn};

use crate::api::{self, Api, admission::Allocator, status::ApiError};
use crate::auth::{self, Tokens};
use crate::pki::Pki;
use crate::store::{self, Embedded, Store};

/// What capstan-server is started with.
#[derive(Clone, Debug)]
pub struct Options {
    pub data_dir: PathBuf,
    pub bind: SocketAddr,
    /// The address other machines reach the server on (the `kubernetes` EndpointSlice).
    pub advertise: Option<IpAddr>,
    pub service_ranges: Vec<IpNet>,
    pub node_ports: (u16, u16),
    pub anonymous: bool,
    /// Where the admin kubeconfig is written.
    pub kubeconfig_out: PathBuf,
    pub extra_sans: Vec<String>,
    /// etcd client URLs (`--etcd-servers`); the embedded store when `None`.
    pub etcd_servers: Option<Vec<String>>,
}

#[derive(Clone)]
struct AuthState {
    tokens: Arc<Tokens>,
    anonymous: bool,
}

async fn authenticate(State(a): State<AuthState>, req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match token {
        Some(t) if a.tokens.user(t).is_some() => {
            let user = a.tokens.user(t).cloned();
            let mut req = req;
            if let Some(u) = user {
                req.extensions_mut().insert(u);
            }
            next.run(req).await
        }
        None if a.anonymous => next.run(req).await,
        _ => {
            debug!(path = %req.uri().path(), "unauthenticated request refused");
            // Read (and drop) what the client is sending before answering, so that it
            // gets the 401 instead of a reset connection halfway through its body.
            let _ = axum::body::to_bytes(req.into_body(), api::MAX_BODY_BYTES).await;
            ApiError::unauthorized().into_response()
        }
    }
}

async fn ok() -> &'static str {
    "ok"
}

async fn version() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        api::discovery::version().to_string(),
    )
        .into_response()
}

fn json_ok(v: serde_json::Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

async fn openapi_v3(axum::extract::Path(gv): axum::extract::Path<String>) -> Response {
    let segs: Vec<&str> = gv.split('/').collect();
    let doc = match segs.as_slice() {
        ["api", v] => api::discovery::openapi_v3("", v),
        ["apis", g, v] => api::discovery::openapi_v3(g, v),
        _ => None,
    };
    match doc {
        Some(d) => json_ok(d),
        None => openapi_missing().await,
    }
}

async fn openapi_missing() -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
    )
    .into_response()
}

pub fn router(api: Arc<Api>, tokens: Arc<Tokens>, anonymous: bool) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/healthz", get(ok))
        .route("/livez", get(ok))
        .route("/readyz", get(ok))
        .route("/openapi/v2", get(openapi_missing))
        .route(
            "/openapi/v3",
            get(|| async { json_ok(api::discovery::openapi_v3_index()) }),
        )
        .route("/openapi/v3/{*gv}", get(openapi_v3))
        .route("/api", any(api::dispatch))
        .route("/api/{*rest}", any(api::dispatch))
        .route("/apis", any(api::dispatch))
        .route("/apis/{*rest}", any(api::dispatch))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(
            api::MAX_BODY_BYTES + 1,
        ))
        .layer(middleware::from_fn_with_state(
            AuthState { tokens, anonymous },
            authenticate,
        ))
        .with_state(api)
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// Runs the server until SIGTERM/SIGINT.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let store = Arc::new(match &opts.etcd_servers {
        Some(servers) => {
            let etcd = store::etcd::Etcd::connect(servers.clone())
                .await
                .map_err(|e| anyhow::anyhow!("connecting to etcd {servers:?}: {e}"))?;
            info!(servers = ?servers, "using etcd");
            Store::Etcd(Box::new(etcd))
        }
        None => Store::Embedded(
            Embedded::open(&opts.data_dir.join("store")).context("opening the store")?,
        ),
    });
    tokio::spawn(store::compact_periodically(
        store.clone(),
        Duration::from_secs(300),
    ));
    let api = Arc::new(Api {
        store,
        alloc: Mutex::new(Allocator::new(opts.service_ranges.clone(), opts.node_ports)),
        policy: Mutex::new(None),
    });
    let advertise = opts
        .advertise
        .or_else(|| (!opts.bind.ip().is_unspecified()).then_some(opts.bind.ip()));
    api.bootstrap(advertise, opts.bind.port())
        .await
        .context("bootstrapping")?;
    // The system namespaces and the `kubernetes` Service come back when deleted, as
    // kube-apiserver's bootstrap controller brings them back.
    {
        let (api, port) = (api.clone(), opts.bind.port());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = api.bootstrap(advertise, port).await {
                    warn!(error = %e, "cannot restore the system objects");
                }
            }
        });
    }

    let mut names = vec![
        "localhost".to_string(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        "kubernetes.default.svc.cluster.local".into(),
    ];
    names.extend(hostname());
    names.extend(
        opts.extra_sans
            .iter()
            .filter(|s| s.parse::<IpAddr>().is_err())
            .cloned(),
    );
    let mut addrs: Vec<IpAddr> = vec!["127.0.0.1".parse()?, "::1".parse()?];
    addrs.extend(
        opts.extra_sans
            .iter()
            .filter_map(|s| s.parse::<IpAddr>().ok()),
    );
    addrs.extend(advertise);
    if !opts.bind.ip().is_unspecified() {
        addrs.push(opts.bind.ip());
    }
    for r in &opts.service_ranges {
        let first = match r {
            IpNet::V4(n) => IpAddr::V4((u32::from(n.network()) + 1).into()),
            IpNet::V6(n) => IpAddr::V6((u128::from(n.network()) + 1).into()),
        };
        addrs.push(first);
    }
    addrs.sort();
    addrs.dedup();
    let pki =
        Pki::load_or_create(&opts.data_dir.join("pki"), &names, &addrs).context("TLS material")?;
    let (tokens, admin) = Tokens::load_or_create(&opts.data_dir).context("tokens")?;
    let server_url = match (opts.bind.ip().is_unspecified(), advertise) {
        (true, _) | (false, None) if opts.bind.ip().is_unspecified() => {
            format!("https://127.0.0.1:{}", opts.bind.port())
        }
        _ => format!(
            "https://{}",
            SocketAddr::new(opts.bind.ip(), opts.bind.port())
        ),
    };
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(p) = opts.kubeconfig_out.parent() {
            std::fs::create_dir_all(p)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&opts.kubeconfig_out)
            .with_context(|| format!("writing {}", opts.kubeconfig_out.display()))?;
        f.write_all(auth::kubeconfig(&server_url, &pki.ca_pem, "admin", &admin).as_bytes())?;
    }
    // capstan-proxy's kubeconfig: least privilege (system:node-proxier).
    if let Some(token) = tokens.token_of(auth::PROXY_USER) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = opts.data_dir.join("proxy.kubeconfig");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        f.write_all(
            auth::kubeconfig(&server_url, &pki.ca_pem, auth::PROXY_USER, token).as_bytes(),
        )?;
    }
    let tls = Arc::new(
        pki.server_config()
            .map_err(|e| anyhow::anyhow!("TLS configuration: {e}"))?,
    );
    let app = router(api, Arc::new(tokens), opts.anonymous);

    let listener = tokio::net::TcpListener::bind(opts.bind)
        .await
        .with_context(|| format!("listening on {}", opts.bind))?;
    info!(address = %opts.bind, url = %server_url, kubeconfig = %opts.kubeconfig_out.display(), "capstan-server serving");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { warn!(error = %e, "accept failed"); continue; }
            },
            _ = term.recv() => { info!("SIGTERM: exiting"); return Ok(()); }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: exiting"); return Ok(()); }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        debug!(peer = %peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), service)
                .await
            {
                debug!(peer = %peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// The JSON kube-apiserver answers /healthz with when asked verbosely (unused for now).
pub fn health_json() -> serde_json::Value {
    json!({"status": "ok"})
}
