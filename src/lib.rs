//! keygate: consumer-key authorization and vendor-key injection for Envoy AI gateways.
//!
//! Data flows one way: `admin` → `store` → `snapshot` (built and swapped) → `authz` reads.
#![forbid(unsafe_code)]

pub mod crypto;
pub mod domain;
pub mod store;
pub mod authz;
pub mod snapshot;
pub mod proto;
pub mod admin;
pub mod config;
pub mod server;
