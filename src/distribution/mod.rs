//! Control plane → data plane snapshot distribution (`keygate.snapshot.v1`): the streaming
//! server, the data plane's subscriber, the wire format and the encrypted on-disk cache.
//! Depends on `snapshot`, `crypto` and the generated protos.

use std::sync::Arc;

use crate::snapshot::Update;

pub mod cache;
#[cfg(feature = "server")]
pub mod server;
pub mod subscriber;
pub mod wire;

#[cfg(feature = "server")]
pub use server::{DistributionService, SubscriberAuth};
pub use subscriber::{Subscriber, SubscriberConfig, SubscriberStatus};

/// An applied update as the builder published it: `base_version` is the version it applied
/// on top of (`None` for a first or full build). A full update is only a marker (store and
/// version): subscribers are sent the published snapshot itself.
#[derive(Clone, Debug)]
pub struct Published {
    pub base_version: Option<i64>,
    pub update: Arc<Update>,
}
