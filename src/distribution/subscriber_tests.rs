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
    let before = crate::metrics::METRICS.snapshot_rejected("malformed").get();
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
    assert!(crate::metrics::METRICS.snapshot_rejected("malformed").get() > before);
    assert_eq!(s.cell.load().unwrap().version, 5);
}

/// A data plane holding content the store no longer has at its version (a restored store
/// changed back up to it): the control plane's next increment does not lead to the digest it
/// carries. The data plane refuses it, keeps serving what it had, counts it, and asks for a
/// full snapshot (version 0, nothing held), which then applies.
#[test]
fn an_increment_that_does_not_lead_to_the_control_planes_digest_is_refused() {
    let keys = MasterKey::generate().keys();
    let s = subscriber(&keys);
    s.apply(0, full(5)).unwrap();
    let held = s.cell.load().unwrap();
    // The control plane's state at version 5: one key disabled.
    let mut restored = full(5);
    restored.keys[0].1.enabled = false;
    let revoked = restored.keys[0].0;
    let cp = Snapshot::from_full(restored, &keys).unwrap();
    assert_ne!(cp.digest(), held.digest());
    let change = Update {
        store_id: "bench".into(),
        version: 6,
        consumers: vec![crate::snapshot::ConsumerRecord {
            id: uuid::Uuid::from_u128(77),
            name: "later".into(),
            scope: crate::snapshot::ScopeSet::All,
            limits: Default::default(),
        }],
        ..Default::default()
    };
    let cp6 = cp.apply(change.clone(), &keys).unwrap();
    let (persist, _rx) = tokio::sync::watch::channel(None);
    let before = crate::metrics::METRICS.snapshot_rejected("digest").get();
    let msgs = wire::with_digest(wire::encode(&change, 5, 10), cp6.digest());
    let mut assembler = wire::Assembler::default();
    assert!(
        !s.take(&mut assembler, msgs[0].clone(), &persist),
        "the session ends"
    );
    let served = s.cell.load().unwrap();
    assert_eq!(served.version, 5);
    assert_eq!(
        served.digest(),
        held.digest(),
        "the last good snapshot stays"
    );
    assert!(crate::metrics::METRICS.snapshot_rejected("digest").get() > before);
    let r = s.request(&[1; seal::NONCE_LEN]);
    assert_eq!(
        (r.store_id.as_str(), r.version, r.digest.len(), r.protocol),
        ("", 0, 0, seal::PROTOCOL),
        "it asks for everything, as a data plane holding nothing"
    );
    // The full snapshot comes with its digest and applies.
    let full6 = wire::with_digest(wire::encode(&cp6.to_full_update(), 0, 10), cp6.digest());
    let mut assembler = wire::Assembler::default();
    for m in full6 {
        assert!(s.take(&mut assembler, m, &persist));
    }
    let served = s.cell.load().unwrap();
    assert_eq!((served.version, served.digest()), (6, cp6.digest()));
    assert!(!served.key(&revoked).unwrap().enabled, "the store's state");
    let r = s.request(&[1; seal::NONCE_LEN]);
    assert_eq!(r.version, 6);
    assert_eq!(ContentDigest::from_bytes(&r.digest), Some(cp6.digest()));
}

/// A full snapshot replaces everything, so its digest cannot show a divergence: one that
/// differs (a data plane that digests unlike its control plane) is served, counted, and
/// digests are no longer presented or checked (no loop of full snapshots).
#[test]
fn a_full_snapshot_whose_digest_differs_is_served_and_digests_are_dropped() {
    let keys = MasterKey::generate().keys();
    let s = subscriber(&keys);
    let before = crate::metrics::METRICS.snapshot_rejected("digest").get();
    let wrong = ContentDigest::from_bytes(&[9; 32]).unwrap();
    assert_eq!(
        s.apply_checked(0, full(5), Some(wrong)).unwrap(),
        Applied::Swapped { version: 5 }
    );
    assert!(crate::metrics::METRICS.snapshot_rejected("digest").get() > before);
    assert!(s.request(&[1; seal::NONCE_LEN]).digest.is_empty());
    let next = Update {
        store_id: "bench".into(),
        version: 6,
        ..Default::default()
    };
    assert_eq!(
        s.apply_checked(5, next, Some(wrong)).unwrap(),
        Applied::Swapped { version: 6 }
    );
}
