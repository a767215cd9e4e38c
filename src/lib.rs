//! keygate: consumer-key authorization and vendor-key injection for Envoy AI gateways.
//!
//! Data flows one way: `admin` → `store` → `snapshot` (built and swapped) → `authz` reads.
#![forbid(unsafe_code)]

//! Feature `server` (default) adds the store, the admin API, the servers, secret providers and
//! the CLI; without it the crate is the data-plane core the Envoy module links: the snapshot,
//! the decision, crypto and the snapshot subscriber.

#[cfg(feature = "server")]
pub mod admin;
pub mod authz;
#[cfg(feature = "server")]
pub mod bench;
#[cfg(feature = "server")]
pub mod config;
pub mod crypto;
pub mod distribution;
pub mod domain;
pub mod fsperm;
pub mod health;
pub mod metrics;
pub mod proto;
#[cfg(feature = "server")]
pub mod secret;
#[cfg(feature = "server")]
pub mod server;
pub mod snapshot;
#[cfg(feature = "server")]
pub mod store;
pub mod usage;
