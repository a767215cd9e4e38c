//! keygate: consumer-key authorization and vendor-key injection for Envoy AI gateways.
//!
//! Data flows one way: `admin` → `store` → `snapshot` (built and swapped) → `authz` reads.
#![forbid(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod proto;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod bench;
pub mod distribution;
pub mod metrics;
pub mod usage;
