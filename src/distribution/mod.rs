//! Control plane → data plane snapshot distribution (`keygate.snapshot.v1`): the streaming
//! server, the data plane's subscriber and its start-up (`bootstrap`, shared by `keygate authz`
//! and the Envoy module), bearer tokens, the wire format and the encrypted on-disk cache.
//! Depends on `snapshot`, `crypto`, `usage` and the generated protos.

pub mod bootstrap;
pub mod cache;
pub mod seal;
#[cfg(feature = "server")]
pub mod server;
pub mod subscriber;
pub mod token;
pub mod usage_wire;
pub mod wire;

pub use bootstrap::{BootstrapError, DataPlaneFeed, DataPlaneSettings, bootstrap};
#[cfg(feature = "server")]
pub use server::{DistributionService, SubscriberAuth};
pub use subscriber::{Subscriber, SubscriberConfig, SubscriberStatus};
