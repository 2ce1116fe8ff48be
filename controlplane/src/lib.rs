//! capstan-server: a compact Kubernetes-compatible API server.
//!
//! - [`store`]: the etcd-shaped storage (pure MVCC core, embedded write-ahead-log backend);
//! - [`api`]: the REST machinery over it, driven by the resource table;
//! - [`pki`] and [`auth`]: TLS material and who is asking;
//! - [`server`]: HTTPS, authentication and the routes, wired together.
pub mod api;
pub mod auth;
pub mod pki;
pub mod server;
pub mod store;
