//! Unit tests of rotation with overlap (SPEC §8.4) in the decision: after a rotation a key is
//! found by its new value at once and by its previous value until an instant, from which on
//! the previous value is answered exactly like a value in no snapshot. Time is an input
//! (`now`); snapshots move by the same updates the control plane distributes.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use uuid::Uuid;

use super::*;
use crate::crypto::{KeyHash, Keys, MasterKey, Secret};
use crate::snapshot::{
    ConsumerRecord, KeyEntry, ModelKeyRecord, PreviousHash, ScopeSet, ServiceRecord, Update,
};

/// The rotation's commit time; the previous value expires `OVERLAP` after it.
const T0: Timestamp = Timestamp(1_700_000_000_000_000);
const OVERLAP_US: i64 = 2_000_000;
const UNTIL: Timestamp = Timestamp(T0.0 + OVERLAP_US);

const OLD: &str = "kg-rotationOldValue-Qm7xV2pLr9T";
const NEW: &str = "kg-rotationNewValue-Jd3KsZ8qWv1";
const NEWER: &str = "kg-rotationNewerValue-Hb5NcR2yL";

const KEY_ID: Uuid = Uuid::from_u128(0x400);
const CONSUMER_ID: Uuid = Uuid::from_u128(0x200);
const SERVICE_ID: Uuid = Uuid::from_u128(0x100);

struct Req(String);

impl RequestView for Req {
    fn header(&self, name: &str) -> Option<&str> {
        (name == "authorization").then_some(self.0.as_str())
    }
    fn query(&self) -> &str {
        ""
    }
    fn peer_ip(&self) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)))
    }
    fn model_service(&self) -> Option<&str> {
        Some("openai")
    }
}

struct World {
    keys: Keys,
}

impl World {
    fn new() -> World {
        World {
            keys: MasterKey::generate().keys(),
        }
    }

    fn hash(&self, value: &str) -> KeyHash {
        self.keys.hasher.hash(value.as_bytes())
    }

    fn decide<'s>(&self, snap: &'s Snapshot, value: &str, now: Timestamp) -> Decision<'s> {
        let req = Req(format!("Bearer {value}"));
        decide(snap, &DecisionConfig::default(), &req, now, |k| {
            self.keys.hasher.hash(k)
        })
    }

    /// The key as the control plane describes it, with `previous` (a value and its expiry).
    fn entry(&self, previous: Option<(&str, Timestamp)>) -> KeyEntry {
        KeyEntry {
            id: KEY_ID,
            consumer: Some(CONSUMER_ID),
            enabled: true,
            expire_time: None,
            name: "billing-prod".into(),
            scope: ScopeSet::All,
            ip_allowlist: Box::new([]),
            limits: Default::default(),
            usage: Default::default(),
            previous: previous.map(|(v, until)| PreviousHash {
                hash: self.hash(v),
                until,
            }),
        }
    }

    /// A snapshot (version 1) holding the key with value `value`.
    fn before_rotation(&self, value: &str) -> Snapshot {
        let mk = ModelKeyRecord {
            id: Uuid::from_u128(0x300),
            name: "openai-main".into(),
            ciphertext: self.keys.cipher.encrypt(
                &Uuid::from_u128(0x300).to_string(),
                &Secret::new("sk-vendor-0000111122223333".into()),
            ),
        };
        let update = Update {
            store_id: "test-store".into(),
            version: 1,
            full: true,
            keys: vec![(self.hash(value), self.entry(None))],
            consumers: vec![ConsumerRecord {
                id: CONSUMER_ID,
                name: "billing-app".into(),
                scope: ScopeSet::All,
                limits: Default::default(),
            }],
            services: Some(vec![ServiceRecord {
                id: SERVICE_ID,
                name: "openai".into(),
                auth_header: "authorization".into(),
                auth_value_template: "Bearer {key}".into(),
                model_keys: vec![mk],
                models: vec![],
                model_source: Default::default(),
            }]),
            model_key_count: 1,
            ..Default::default()
        };
        Snapshot::from_full(update, &self.keys).unwrap()
    }

    /// `snap` after the incremental update of a rotation to `new` (the previous value and
    /// its expiry in `previous`), with the HMACs the store removed.
    fn rotated(
        &self,
        snap: &Snapshot,
        new: &str,
        previous: Option<(&str, Timestamp)>,
        removed: &[&str],
    ) -> Snapshot {
        let update = Update {
            store_id: snap.store_id.clone(),
            epoch: snap.epoch.clone(),
            version: snap.version + 1,
            full: false,
            keys: vec![(self.hash(new), self.entry(previous))],
            removed_keys: removed.iter().map(|v| self.hash(v)).collect(),
            model_key_count: 1,
            ..Default::default()
        };
        snap.apply(update, &self.keys).unwrap()
    }
}

#[track_caller]
fn allowed_id(d: &Decision<'_>) -> Uuid {
    match d {
        Decision::Allow(a) => a.key.id,
        other => panic!("expected allow, got {:?}", other.deny_reason()),
    }
}

/// The previous value is refused as a value in no snapshot is: same reason, same (empty)
/// key, same 401 body.
#[track_caller]
fn assert_refused_like_unknown(d: &Decision<'_>) {
    match d {
        Decision::Deny(den) => {
            assert_eq!(den.reason, DenyReason::UnknownKey);
            assert!(den.key.is_none(), "an unknown key names no key");
            assert_eq!(den.reason.http_status(), 401);
        }
        other => panic!("expected unknown_key, got {:?}", other.deny_reason()),
    }
}

#[test]
fn the_previous_value_authorizes_until_the_instant_and_is_an_unknown_key_from_it() {
    let w = World::new();
    let before = w.before_rotation(OLD);
    let snap = w.rotated(&before, NEW, Some((OLD, UNTIL)), &[]);
    assert_eq!(snap.counts().consumer_keys, 1, "a rotated key is one key");

    // The new value works at once, the old one still works: both are the same key.
    assert_eq!(allowed_id(&w.decide(&snap, NEW, T0)), KEY_ID);
    assert_eq!(allowed_id(&w.decide(&snap, OLD, T0)), KEY_ID);
    assert_eq!(
        allowed_id(&w.decide(&snap, OLD, Timestamp(UNTIL.0 - 1))),
        KEY_ID
    );
    // From the instant on the old value is refused exactly like an unknown key.
    for now in [
        UNTIL,
        Timestamp(UNTIL.0 + 1),
        Timestamp(UNTIL.0 + 86_400_000_000),
    ] {
        assert_refused_like_unknown(&w.decide(&snap, OLD, now));
        let unknown = w.decide(&snap, "kg-neverIssuedValue-000000000", now);
        assert_refused_like_unknown(&unknown);
        assert_eq!(allowed_id(&w.decide(&snap, NEW, now)), KEY_ID);
    }
}

#[test]
fn usage_and_last_use_of_both_values_land_on_the_same_key() {
    let w = World::new();
    let before = w.before_rotation(OLD);
    // The key's last-use stamp before the rotation...
    let stamp = match w.decide(&before, OLD, T0) {
        Decision::Allow(a) => a.key.usage.stamp().clone(),
        other => panic!("{:?}", other.deny_reason()),
    };
    let snap = w.rotated(&before, NEW, Some((OLD, UNTIL)), &[]);
    let (old, new) = (w.decide(&snap, OLD, T0), w.decide(&snap, NEW, T0));
    let (Decision::Allow(old), Decision::Allow(new)) = (&old, &new) else {
        panic!("both values authorize during the overlap");
    };
    // ... is the one both values stamp: last use is one key's, whatever value was presented.
    assert_eq!((old.key.id, new.key.id), (KEY_ID, KEY_ID));
    assert!(Arc::ptr_eq(old.key.usage.stamp(), &stamp));
    assert!(Arc::ptr_eq(new.key.usage.stamp(), &stamp));
    new.key
        .usage
        .stamp()
        .last_used_us
        .store(T0.0 + 5, Ordering::Relaxed);
    assert_eq!(stamp.last_used_us.load(Ordering::Relaxed), T0.0 + 5);
    // Metering is keyed by the key and consumer ids the decision returns: the same.
    assert_eq!(old.consumer.id, new.consumer.id);
}

#[test]
fn a_second_rotation_ends_the_earlier_previous_value_at_once() {
    let w = World::new();
    let day = Timestamp(T0.0 + 86_400_000_000);
    let before = w.before_rotation(OLD);
    let first = w.rotated(&before, NEW, Some((OLD, day)), &[]);
    assert_eq!(allowed_id(&w.decide(&first, OLD, T0)), KEY_ID);
    // The store removes the earlier previous value's HMAC with the second rotation...
    let second = w.rotated(&first, NEWER, Some((NEW, day)), &[OLD]);
    // ... and the index drops it even when an update does not say so.
    let second_unsaid = w.rotated(&first, NEWER, Some((NEW, day)), &[]);
    for snap in [&second, &second_unsaid] {
        assert_refused_like_unknown(&w.decide(snap, OLD, T0));
        assert_eq!(allowed_id(&w.decide(snap, NEW, T0)), KEY_ID);
        assert_eq!(allowed_id(&w.decide(snap, NEWER, T0)), KEY_ID);
        assert_eq!(snap.counts().consumer_keys, 1);
        assert_eq!(snap.key_index().iter().count(), 1);
    }
}

#[test]
fn without_an_overlap_the_old_value_stops_with_the_update() {
    let w = World::new();
    let before = w.before_rotation(OLD);
    let snap = w.rotated(&before, NEW, None, &[OLD]);
    assert_refused_like_unknown(&w.decide(&snap, OLD, T0));
    assert_eq!(allowed_id(&w.decide(&snap, NEW, T0)), KEY_ID);
    assert_eq!(snap.counts().consumer_keys, 1);
}

#[test]
fn the_previous_value_is_the_same_key_in_every_other_respect() {
    let w = World::new();
    let before = w.before_rotation(OLD);
    let snap = w.rotated(&before, NEW, Some((OLD, UNTIL)), &[]);
    // The key disabled afterwards (an update of the key, previous value kept): both values
    // are refused as disabled while the previous one lasts, the old one as unknown after.
    let mut disabled = w.entry(Some((OLD, UNTIL)));
    disabled.enabled = false;
    let snap = snap
        .apply(
            Update {
                store_id: snap.store_id.clone(),
                version: snap.version + 1,
                keys: vec![(w.hash(NEW), disabled)],
                model_key_count: 1,
                ..Default::default()
            },
            &w.keys,
        )
        .unwrap();
    for v in [OLD, NEW] {
        let d = w.decide(&snap, v, T0);
        assert_eq!(d.deny_reason(), Some(DenyReason::Disabled), "{v}");
    }
    assert_refused_like_unknown(&w.decide(&snap, OLD, UNTIL));
    assert_eq!(
        w.decide(&snap, NEW, UNTIL).deny_reason(),
        Some(DenyReason::Disabled)
    );
}

#[test]
fn a_full_snapshot_carries_the_previous_value_and_keeps_the_key_once() {
    let w = World::new();
    let before = w.before_rotation(OLD);
    let snap = w.rotated(&before, NEW, Some((OLD, UNTIL)), &[]);
    let full = snap.to_full_update();
    assert_eq!(full.keys.len(), 1, "listed once, under its own HMAC");
    assert_eq!(full.keys[0].0, w.hash(NEW));
    assert_eq!(
        full.keys[0].1.previous,
        Some(PreviousHash {
            hash: w.hash(OLD),
            until: UNTIL
        })
    );
    let rebuilt = Snapshot::from_full(full.clone(), &w.keys).unwrap();
    assert_eq!(allowed_id(&w.decide(&rebuilt, OLD, T0)), KEY_ID);
    assert_refused_like_unknown(&w.decide(&rebuilt, OLD, UNTIL));
    assert_eq!(rebuilt.counts().consumer_keys, 1);
    // A full update applied over the snapshot keeps the key's last-use stamp.
    let stamp = snap.key(&w.hash(NEW)).unwrap().usage.stamp().clone();
    let mut again = full;
    again.version += 1;
    let next = snap.apply(again, &w.keys).unwrap();
    assert!(Arc::ptr_eq(
        next.key(&w.hash(OLD)).unwrap().usage.stamp(),
        &stamp
    ));
}
