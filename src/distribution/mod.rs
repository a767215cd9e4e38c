//! Control plane → data plane snapshot distribution (`keygate.snapshot.v1`): the streaming
//! server, the data plane's subscriber, the wire format and the encrypted on-disk cache.
//! Depends on `snapshot`, `crypto` and the generated protos.

pub mod cache;
#[cfg(feature = "server")]
pub mod server;
pub mod subscriber;
pub mod wire;

#[cfg(feature = "server")]
pub use server::{DistributionService, SubscriberAuth};
pub use subscriber::{Subscriber, SubscriberConfig, SubscriberStatus};
