//! capstan-proxy: a kube-proxy replacement that balances Kubernetes Services in the kernel.
//!
//! - [`source`]: Services, EndpointSlices and Nodes from the API or from manifests;
//! - [`model`]: what they mean for the data path (pure);
//! - [`dataplane`]: how that reaches the kernel (eBPF today);
//! - [`app`]: the agent loop, with [`health`] and [`metrics`] beside it.
pub mod app;
pub mod config;
pub mod dataplane;
pub mod health;
pub mod metrics;
pub mod model;
pub mod node;
pub mod source;
