use super::*;

#[test]
fn full_updates_round_trip_in_chunks() {
    let mut u = crate::snapshot::fixtures::synthetic_update(45);
    u.keys[3].1.scope = ScopeSet::services(vec![Uuid::from_u128(2)]);
    u.keys[4].1.ip_allowlist = vec![
        "10.0.0.0/8".parse().unwrap(),
        "192.168.1.7/32".parse().unwrap(),
    ]
    .into();
    u.keys[5].1.expire_time = Some(Timestamp(1_900_000_000_000_000));
    u.keys[6].1.limits = EntryLimits {
        requests_per_minute: Some(u32::MAX),
        tokens_per_minute: Some(1_000_000_000_000),
        exhausted_until: Some(Timestamp(i64::MAX)),
    };
    u.keys[8].1.limits.exhausted_until = Some(Timestamp(1_900_000_000_000_000));
    u.consumers[0].limits.exhausted_until = Some(Timestamp(1_800_000_000_000_000));
    u.keys[7].1.limits.tokens_per_minute = Some(1);
    u.consumers[0].limits.requests_per_minute = Some(60);
    let msgs = encode(&u, 0, 10);
    assert_eq!(msgs.len(), 5);
    let mut a = Assembler::default();
    let mut out = None;
    for m in msgs {
        if let Some(x) = a.push(m).unwrap() {
            out = Some(x);
        }
    }
    let back = out.expect("an update after the last chunk").update;
    assert_eq!(back, u);
}

#[test]
fn model_scopes_and_service_lists_round_trip() {
    let mut u = crate::snapshot::fixtures::synthetic_update(3);
    let service = Uuid::from_u128(2);
    u.keys[0].1.scope = ScopeSet::Only(Arc::new(ScopeList {
        services: vec![Uuid::from_u128(9)].into(),
        models: vec![ModelRule {
            service,
            pattern: "claude-*".into(),
        }]
        .into(),
    }));
    u.consumers[0].scope = u.keys[0].1.scope.clone();
    let services = u.services.as_mut().unwrap();
    services[0].models = vec!["gpt-4o-mini".into(), "o3-*".into()];
    services[0].model_source = ModelSource::Path;
    let mut a = Assembler::default();
    let back = encode(&u, 0, 10)
        .into_iter()
        .find_map(|m| a.push(m).unwrap())
        .expect("an update")
        .update;
    assert_eq!(back, u);
}

/// A data plane's snapshot of what a control plane sent has the control plane's content
/// digest (every field survives the wire as the digest sees it), in full and after an
/// increment.
#[test]
fn the_digest_survives_the_wire() {
    let master = crate::crypto::MasterKey::generate();
    let keys = master.keys();
    let mut u = crate::snapshot::fixtures::synthetic_update(5);
    let service = Uuid::from_u128(2);
    u.keys[0].1.scope = ScopeSet::Only(Arc::new(ScopeList {
        services: vec![Uuid::from_u128(9)].into(),
        models: vec![ModelRule {
            service,
            pattern: "claude-*".into(),
        }]
        .into(),
    }));
    u.keys[1].1.ip_allowlist = vec![
        "10.0.0.0/8".parse().unwrap(),
        "2001:db8::/32".parse().unwrap(),
        "192.168.1.7/32".parse().unwrap(),
    ]
    .into();
    u.keys[2].1.expire_time = Some(Timestamp(1_900_000_000_000_000));
    u.keys[3].1.enabled = false;
    u.keys[4].1.consumer = None;
    u.keys[4].1.limits = EntryLimits {
        requests_per_minute: Some(600),
        tokens_per_minute: Some(90_000),
        exhausted_until: Some(Timestamp(1_700_000_000_000_000)),
    };
    u.consumers[0].scope = u.keys[0].1.scope.clone();
    u.consumers[0].limits.tokens_per_minute = Some(1_000_000);
    let s = &mut u.services.as_mut().unwrap()[0];
    s.models = vec!["gpt-4o-mini".into(), "o3-*".into()];
    s.model_source = ModelSource::Path;
    let id = Uuid::from_u128(0x51);
    s.model_keys.push(crate::snapshot::ModelKeyRecord {
        id,
        name: "primary".into(),
        ciphertext: keys.cipher.encrypt(
            &id.to_string(),
            &crate::crypto::Secret::new("sk-wire-1".into()),
        ),
    });
    let cp = crate::snapshot::Snapshot::from_full(u.clone(), &keys).unwrap();
    let through = |u: &Update, base: i64| {
        let mut a = Assembler::default();
        encode(u, base, 2)
            .into_iter()
            .find_map(|m| a.push(m).unwrap())
            .unwrap()
            .update
    };
    let dp = crate::snapshot::Snapshot::from_full(through(&u, 0), &keys).unwrap();
    assert_eq!(dp.digest(), cp.digest());
    let mut inc = Update {
        store_id: u.store_id.clone(),
        version: 2,
        keys: vec![u.keys[3].clone()],
        removed_keys: vec![u.keys[4].0],
        ..Default::default()
    };
    inc.keys[0].1.enabled = true;
    inc.keys[0].1.limits.requests_per_minute = Some(1);
    let cp2 = cp.apply(inc.clone(), &keys).unwrap();
    let dp2 = dp.apply(through(&inc, 1), &keys).unwrap();
    assert_eq!(dp2.digest(), cp2.digest());
    assert_ne!(cp2.digest(), cp.digest());
}

/// SPEC §8.4: a rotated key's previous HMAC and its expiry travel with the key.
#[test]
fn previous_values_round_trip() {
    let mut u = crate::snapshot::fixtures::synthetic_update(25);
    let previous = PreviousHash {
        hash: [7; 32],
        until: Timestamp(1_900_000_000_000_000),
    };
    u.keys[3].1.previous = Some(previous);
    u.keys[21].1.previous = Some(PreviousHash {
        hash: [8; 32],
        until: Timestamp(1),
    });
    let mut a = Assembler::default();
    let mut out = None;
    for m in encode(&u, 0, 10) {
        if let Some(x) = a.push(m).unwrap() {
            out = Some(x);
        }
    }
    let back = out.expect("an update after the last chunk").update;
    assert_eq!(back.keys[3].1.previous, Some(previous));
    assert_eq!(back, u);
    // Increments carry it too.
    let mut inc = u.clone();
    inc.full = false;
    inc.keys = vec![inc.keys[3].clone()];
    let back = encode(&inc, 1, 10)
        .into_iter()
        .find_map(|m| Assembler::default().push(m).unwrap())
        .unwrap()
        .update;
    assert_eq!(back, inc);
}

/// A key without a previous value encodes as before rotation existed; a previous value
/// that is not a 32-byte HMAC other than the key's own is malformed.
#[test]
fn previous_values_are_absent_unless_rotated_and_checked_when_present() {
    let u = crate::snapshot::fixtures::synthetic_update(2);
    let msgs = encode(&u, 0, 10);
    for k in &msgs[0].keys {
        assert!(k.previous_hash.is_empty());
        assert_eq!(k.previous_expire_time_us, 0);
    }
    for (hash, until) in [
        (vec![1, 2, 3], 5),
        (vec![], 5),
        (msgs[0].keys[0].hash.clone(), 5),
    ] {
        let mut bad = msgs.clone();
        bad[0].keys[0].previous_hash = hash;
        bad[0].keys[0].previous_expire_time_us = until;
        assert!(matches!(
            Assembler::default().push(bad[0].clone()),
            Err(ApplyError::Malformed(_))
        ));
    }
}

/// A snapshot that uses no model feature encodes as it did before model-level scope, so a
/// data plane built before it still verifies the stream (its MAC covers the encoding).
#[test]
fn a_snapshot_without_model_features_encodes_as_before() {
    let u = crate::snapshot::fixtures::synthetic_update(3);
    assert_eq!(
        u.services.as_ref().unwrap()[0].model_source,
        ModelSource::Body
    );
    for m in encode(&u, 0, 10) {
        for s in m.services.iter().flat_map(|s| &s.items) {
            assert_eq!(s.model_source, 0, "BODY travels as unspecified");
            assert!(s.models.is_empty());
        }
        for c in &m.consumers {
            assert!(c.scope.as_ref().is_none_or(|s| s.models.is_empty()));
            assert_eq!((c.requests_per_minute, c.tokens_per_minute), (0, 0));
        }
        for k in &m.keys {
            assert_eq!(
                (k.requests_per_minute, k.tokens_per_minute),
                (0, 0),
                "no limit: nothing on the wire"
            );
        }
    }
}

/// What this data plane cannot use of a newer control plane's services fails closed for
/// that service, without refusing the whole snapshot.
#[test]
fn unknown_sources_and_invalid_patterns_fail_closed_per_service() {
    let u = crate::snapshot::fixtures::synthetic_update(3);
    let mut msgs = encode(&u, 0, 10);
    let item = &mut msgs[0].services.as_mut().unwrap().items[0];
    item.model_source = 42;
    item.models = vec!["Claude 3.5 Sonnet".into()];
    let mut a = Assembler::default();
    let back = msgs
        .into_iter()
        .find_map(|m| a.push(m).unwrap())
        .expect("the snapshot still applies")
        .update;
    let s = &back.services.unwrap()[0];
    assert_eq!(s.model_source, ModelSource::None);
    let entry = crate::snapshot::ServiceEntry::new(s.id, &s.name, "authorization", vec![])
        .with_models(&s.models, s.model_source);
    for m in ["Claude 3.5 Sonnet", "claude-3-5-sonnet", "gpt-4o"] {
        assert!(
            !entry.admits_model(m) || m == "Claude 3.5 Sonnet",
            "an invalid entry admits only itself, never other models: {m}"
        );
    }
}

#[test]
fn a_chunk_from_another_version_is_malformed() {
    let u = crate::snapshot::fixtures::synthetic_update(30);
    let mut msgs = encode(&u, 0, 10);
    msgs[1].version += 1;
    let mut a = Assembler::default();
    assert!(a.push(msgs.remove(0)).unwrap().is_none());
    assert!(matches!(
        a.push(msgs.remove(0)),
        Err(ApplyError::Malformed(_))
    ));
}

#[test]
fn bad_hashes_and_ids_are_malformed() {
    let u = crate::snapshot::fixtures::synthetic_update(2);
    let mut msgs = encode(&u, 0, 10);
    msgs[0].keys[0].hash.truncate(5);
    assert!(matches!(
        Assembler::default().push(msgs[0].clone()),
        Err(ApplyError::Malformed(_))
    ));
    let mut msgs = encode(&u, 0, 10);
    msgs[0].keys[0].id = vec![1, 2, 3];
    assert!(matches!(
        Assembler::default().push(msgs[0].clone()),
        Err(ApplyError::Malformed(_))
    ));
}

/// Feeds each of `messages` through the data plane's path (decode, assemble, apply to
/// the snapshot so far). Never panics, whatever the bytes.
fn feed<'a>(messages: impl IntoIterator<Item = &'a [u8]>) {
    use prost::Message;
    let keys = crate::crypto::MasterKey::from_bytes([3; 32]).keys();
    let mut assembler = Assembler::default();
    let mut snap: Option<crate::snapshot::Snapshot> = None;
    for m in messages {
        let Ok(m) = pb::SnapshotMessage::decode(m) else {
            continue;
        };
        if let Ok(Some(Assembled { update: u, .. })) = assembler.push(m) {
            let next = match &snap {
                None => crate::snapshot::Snapshot::from_full(u, &keys),
                Some(s) => s.apply(u, &keys),
            };
            if let Ok(next) = next {
                snap = Some(next);
            }
        }
    }
}

/// A full snapshot in chunks and an increment on top of it, each message encoded.
fn genuine_messages() -> Vec<Vec<u8>> {
    use prost::Message;
    let mut u = crate::snapshot::fixtures::synthetic_update(4);
    u.keys[1].1.ip_allowlist = vec!["10.0.0.0/8".parse().unwrap()].into();
    u.keys[2].1.scope = ScopeSet::services(vec![Uuid::from_u128(2)]);
    u.keys[3].1.expire_time = Some(Timestamp(1_900_000_000_000_000));
    let mut inc = u.clone();
    inc.full = false;
    inc.version = 2;
    inc.keys.truncate(1);
    inc.removed_keys = vec![u.keys[3].0];
    inc.removed_consumers = vec![Uuid::from_u128(9)];
    encode(&u, 0, 2)
        .into_iter()
        .chain(encode(&inc, 1, 2))
        .map(|m| m.encode_to_vec())
        .collect()
}

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary bytes, cut into messages anywhere, never panic the wire decoder, the
    /// assembler or applying what they assemble.
    #[test]
    fn arbitrary_bytes_never_panic_the_wire_decoder(
        messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..5),
    ) {
        feed(messages.iter().map(Vec::as_slice));
    }

    /// Nor does a genuine stream with bits flipped, bytes dropped or inserted: fields
    /// reach the decoder with wrong but often well-framed values.
    #[test]
    fn mutated_genuine_messages_never_panic_the_wire_decoder(
        edits in proptest::collection::vec(
            (any::<proptest::sample::Index>(), any::<proptest::sample::Index>(), 0u8..3, any::<u8>()),
            1..8,
        ),
    ) {
        let mut messages = genuine_messages();
        for (m, at, op, b) in edits {
            let n = m.index(messages.len());
            let bytes = &mut messages[n];
            if bytes.is_empty() {
                bytes.push(b);
                continue;
            }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] ^= 1 << (b % 8),
                1 => {
                    bytes.remove(i);
                }
                _ => bytes.insert(i, b),
            }
        }
        feed(messages.iter().map(Vec::as_slice));
    }
}

/// The unmutated stream applies (the mutation test starts from something that works).
#[test]
fn the_genuine_stream_applies() {
    use prost::Message;
    let keys = crate::crypto::MasterKey::from_bytes([3; 32]).keys();
    let mut a = Assembler::default();
    let mut snap: Option<crate::snapshot::Snapshot> = None;
    for m in genuine_messages() {
        if let Some(Assembled { update: u, .. }) = a
            .push(pb::SnapshotMessage::decode(m.as_slice()).unwrap())
            .unwrap()
        {
            snap = Some(match &snap {
                None => crate::snapshot::Snapshot::from_full(u, &keys).unwrap(),
                Some(s) => s.apply(u, &keys).unwrap(),
            });
        }
    }
    let snap = snap.expect("a snapshot");
    assert_eq!(snap.version, 2);
    assert_eq!(snap.counts().consumer_keys, 3);
}
