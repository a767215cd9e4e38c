//! keygate: consumer-key authorization and vendor-key injection for Envoy AI gateways.
//!
//! Data flows one way: `admin` → `store` → `snapshot` (built and swapped) → `authz` reads.
#![forbid(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod bench;
pub mod config;
pub mod crypto;
pub mod distribution;
pub mod domain;
pub mod metrics;
pub mod proto;
pub mod secret;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod usage;
