//! Snapshot fixtures for unit tests and benchmarks: synthetic updates of many consumer keys,
//! built through the same `Update` records the store distributes. Compiled for tests and with
//! the `server` feature (benches, `keygate bench snapshot`), never into the Envoy module.
//! Depends on `snapshot` only.

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{ConsumerRecord, KeyEntry, ScopeSet, ServiceRecord, Update};

/// An enabled consumer key of `consumer` with no expiry, scope or allowlist of its own.
pub fn key_entry(id: Uuid, consumer: Option<Uuid>, name: impl Into<Box<str>>) -> KeyEntry {
    KeyEntry {
        id,
        consumer,
        enabled: true,
        expire_time: None,
        name: name.into(),
        scope: ScopeSet::All,
        ip_allowlist: Box::new([]),
        limits: Default::default(),
        usage: Default::default(),
        previous: None,
    }
}

/// A full update with `n` synthetic consumer keys bound to one consumer, and one service
/// with no model keys: what snapshot build and memory benchmarks measure.
pub fn synthetic_update(n: u64) -> Update {
    let consumer = Uuid::from_u128(1);
    let keys = (0..n)
        .map(|i| {
            (
                <[u8; 32]>::from(Sha256::digest(i.to_le_bytes())),
                key_entry(
                    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | i as u128),
                    Some(consumer),
                    format!("bench-{i}"),
                ),
            )
        })
        .collect();
    Update {
        store_id: "bench".into(),
        version: 1,
        full: true,
        keys,
        consumers: vec![ConsumerRecord {
            id: consumer,
            name: "bench".into(),
            scope: ScopeSet::All,
            limits: Default::default(),
        }],
        services: Some(vec![ServiceRecord {
            id: Uuid::from_u128(2),
            name: "bench".into(),
            auth_header: "authorization".into(),
            auth_value_template: "Bearer {key}".into(),
            model_keys: vec![],
            models: vec![],
            model_source: Default::default(),
        }]),
        ..Default::default()
    }
}
