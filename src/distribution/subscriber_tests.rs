//! Tests of the data plane's subscriber: ordering, epochs, refusals, reconnection.

use super::*;
use crate::crypto::MasterKey;

fn subscriber(keys: &Keys) -> Subscriber {
    Subscriber::new(
        SubscriberConfig {
            endpoint: Endpoint::from_static("http://127.0.0.1:9"),
            token: Arc::new(Secret::new("subscriber-token-0123456789".into())),
            data_dir: std::env::temp_dir(),
            name: "test".into(),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        },
        SnapshotCell::new(),
        keys.clone(),
        "fingerprint".into(),
    )
}

fn full(version: i64) -> Update {
    let mut u = crate::snapshot::fixtures::synthetic_update(3);
    u.version = version;
    u
}

#[test]
fn stale_and_malformed_updates_are_refused_and_the_served_snapshot_stays() {
    let keys = MasterKey::generate().keys();
    let s = subscriber(&keys);
    assert_eq!(
        s.apply(0, full(5)).unwrap(),
        Applied::Swapped { version: 5 }
    );
    // An older full snapshot of the same store: refused, version 5 stays.
    assert!(matches!(
        s.apply(0, full(4)),
        Err(ApplyError::Stale {
            current: 5,
            update: 4
        })
    ));
    assert_eq!(s.cell.load().unwrap().version, 5);
    // An incremental update that does not start from the served version: refused.
    let mut gap = Update {
        store_id: "bench".into(),
        version: 9,
        ..Default::default()
    };
    assert!(matches!(
        s.apply(7, gap.clone()),
        Err(ApplyError::Malformed(_))
    ));
    assert_eq!(s.cell.load().unwrap().version, 5);
    // An old incremental one: stale.
    gap.version = 3;
    assert!(matches!(s.apply(2, gap), Err(ApplyError::Stale { .. })));
    // A model key that does not decrypt under this master key: refused as a whole.
    let mut bad = full(6);
    bad.services.as_mut().unwrap()[0]
        .model_keys
        .push(crate::snapshot::ModelKeyRecord {
            id: uuid::Uuid::from_u128(9),
            name: "vendor".into(),
            ciphertext: MasterKey::generate().keys().cipher.encrypt(
                &uuid::Uuid::from_u128(9).to_string(),
                &Secret::new("sk-0123456789abcdef".into()),
            ),
        });
    assert!(matches!(s.apply(0, bad), Err(ApplyError::Decrypt { .. })));
    let served = s.cell.load().unwrap();
    assert_eq!(served.version, 5);
    assert_eq!(served.counts().consumer_keys, 3);
    // The next good incremental update applies.
    let next = Update {
        store_id: "bench".into(),
        version: 6,
        removed_keys: vec![served.key_index().iter().next().map(|(h, _)| *h).unwrap()],
        ..Default::default()
    };
    assert_eq!(s.apply(5, next).unwrap(), Applied::Swapped { version: 6 });
    assert_eq!(s.cell.load().unwrap().counts().consumer_keys, 2);
}

#[test]
fn a_version_implausibly_far_ahead_is_refused() {
    let keys = MasterKey::generate().keys();
    let s = subscriber(&keys);
    s.apply(0, full(5)).unwrap();
    let pinned = Update {
        store_id: "bench".into(),
        version: i64::MAX,
        ..Default::default()
    };
    assert!(matches!(s.apply(5, pinned), Err(ApplyError::Malformed(_))));
    let far = full(5 + MAX_VERSION_JUMP + 1);
    assert!(matches!(s.apply(0, far), Err(ApplyError::Malformed(_))));
    assert_eq!(s.cell.load().unwrap().version, 5);
    let v = 5 + MAX_VERSION_JUMP;
    assert_eq!(
        s.apply(0, full(v)).unwrap(),
        Applied::Swapped { version: v }
    );
}

#[test]
fn a_full_snapshot_of_another_epoch_replaces_the_served_one_whatever_its_version() {
    let keys = MasterKey::generate().keys();
    let s = subscriber(&keys);
    s.apply(0, full(50)).unwrap();
    // The store restored to version 30 and a new epoch started at 31.
    let mut restored = full(31);
    restored.epoch = "after-restore".into();
    restored.keys.truncate(1);
    assert_eq!(
        s.apply(0, restored).unwrap(),
        Applied::Swapped { version: 31 }
    );
    let served = s.cell.load().unwrap();
    assert_eq!(
        (served.epoch.as_str(), served.counts().consumer_keys),
        ("after-restore", 1)
    );
    // An incremental update of the old epoch does not apply, whatever its version.
    let old = Update {
        store_id: "bench".into(),
        version: 51,
        ..Default::default()
    };
    assert!(matches!(
        s.apply(31, old),
        Err(ApplyError::OtherStore { .. })
    ));
    assert_eq!(s.cell.load().unwrap().version, 31);
}

#[test]
fn a_full_snapshot_from_another_store_replaces_the_served_one() {
    let keys = MasterKey::generate().keys();
    let s = subscriber(&keys);
    s.apply(0, full(50)).unwrap();
    let mut other = full(3);
    other.store_id = "restored".into();
    assert_eq!(s.apply(0, other).unwrap(), Applied::Swapped { version: 3 });
    assert_eq!(s.cell.load().unwrap().store_id, "restored");
}

/// A refused message is counted where operators see it: the status and the data plane's
/// `keygate_snapshot_messages_rejected_total` (the counter is process-wide, so only its growth
/// is asserted).
#[test]
fn refused_messages_are_counted_in_metrics() {
    let keys = MasterKey::generate().keys();
    let s = subscriber(&keys);
    let (persist, _rx) = tokio::sync::watch::channel(None);
    let mut assembler = wire::Assembler::default();
    for m in wire::encode(&full(5), 0, 10) {
        assert!(s.take(&mut assembler, m, &persist));
    }
    let before = crate::metrics::METRICS.snapshot_rejected.get();
    let status_before = s.status.rejected_messages.load(Ordering::Relaxed);
    // An incremental update that does not start from the served version ends the session.
    let gap = Update {
        store_id: "bench".into(),
        version: 9,
        ..Default::default()
    };
    let msg = wire::encode(&gap, 7, 10).remove(0);
    assert!(!s.take(&mut assembler, msg, &persist));
    assert_eq!(
        s.status.rejected_messages.load(Ordering::Relaxed),
        status_before + 1
    );
    assert!(crate::metrics::METRICS.snapshot_rejected.get() > before);
    assert_eq!(s.cell.load().unwrap().version, 5);
}
