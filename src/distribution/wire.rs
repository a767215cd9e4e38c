//! `Update` ⇄ `keygate.snapshot.v1.SnapshotMessage`. Consumer keys travel as HMACs, model
//! keys as ciphertext; nothing here ever holds a plaintext secret.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use uuid::Uuid;

use crate::crypto::KeyHash;
use crate::domain::ModelSource;
use crate::domain::Timestamp;
use crate::proto::snapshot::v1 as pb;
use crate::snapshot::{
    ApplyError, ConsumerRecord, ContentDigest, EntryLimits, KeyEntry, ModelKeyRecord, ModelRule,
    PreviousHash, ScopeList, ScopeSet, ServiceRecord, Update,
};

/// Keys per message of a full snapshot (~100 bytes each: well under gRPC's 4 MB default).
pub const KEYS_PER_CHUNK: usize = 20_000;

fn malformed(what: impl Into<String>) -> ApplyError {
    ApplyError::Malformed(what.into())
}

fn uuid_in(field: &str, b: &[u8]) -> Result<Uuid, ApplyError> {
    Uuid::from_slice(b).map_err(|_| malformed(format!("{field} is not a 16-byte id")))
}

fn scope_out(s: &ScopeSet) -> Option<pb::Scope> {
    match s {
        ScopeSet::All => None,
        ScopeSet::Only(list) => Some(pb::Scope {
            model_service_ids: list
                .services
                .iter()
                .map(|u| u.as_bytes().to_vec())
                .collect(),
            models: list
                .models
                .iter()
                .map(|r| pb::ModelRule {
                    model_service_id: r.service.as_bytes().to_vec(),
                    pattern: r.pattern.to_string(),
                })
                .collect(),
        }),
    }
}

fn scope_in(s: Option<pb::Scope>) -> Result<ScopeSet, ApplyError> {
    let Some(s) = s else {
        return Ok(ScopeSet::All);
    };
    let services = s
        .model_service_ids
        .iter()
        .map(|b| uuid_in("scope id", b))
        .collect::<Result<_, _>>()?;
    let models = s
        .models
        .into_iter()
        .map(|r| {
            // As for service lists: an entry this data plane would not accept matches nothing.
            Ok(ModelRule {
                service: uuid_in("scope model service id", &r.model_service_id)?,
                pattern: r.pattern.into(),
            })
        })
        .collect::<Result<_, ApplyError>>()?;
    Ok(ScopeSet::Only(Arc::new(ScopeList { services, models })))
}

/// `BODY` travels as 0 (unspecified): a snapshot that uses no model feature then encodes
/// exactly as before model-level scope, so a data plane built before it still verifies the
/// stream's MACs (which cover prost's encoding, where unknown fields are lost).
fn model_source_out(s: ModelSource) -> i32 {
    match s {
        ModelSource::Body => pb::ModelSource::Unspecified as i32,
        ModelSource::Path => pb::ModelSource::Path as i32,
        ModelSource::None => pb::ModelSource::None as i32,
    }
}

/// A source this data plane does not know reads as `NONE`: requests then never name a model,
/// so model-narrowed scopes and service lists refuse (fail closed) while the rest of the
/// snapshot still applies.
fn model_source_in(code: i32) -> ModelSource {
    ModelSource::from_code(i64::from(code)).unwrap_or(ModelSource::None)
}

fn key_out(h: &KeyHash, e: &KeyEntry) -> pb::ConsumerKey {
    pb::ConsumerKey {
        hash: h.to_vec(),
        id: e.id.as_bytes().to_vec(),
        name: e.name.to_string(),
        enabled: e.enabled,
        expire_time_us: e.expire_time.map(|t| t.0).unwrap_or(0),
        consumer_id: e
            .consumer
            .map(|c| c.as_bytes().to_vec())
            .unwrap_or_default(),
        scope: scope_out(&e.scope),
        ip_allowlist: e.ip_allowlist.iter().map(|n| n.to_string()).collect(),
        // Absent unless rotated: a snapshot without rotations encodes as before them.
        previous_hash: e.previous.map(|p| p.hash.to_vec()).unwrap_or_default(),
        previous_expire_time_us: e.previous.map(|p| p.until.0).unwrap_or(0),
        requests_per_minute: e.limits.requests_per_minute.unwrap_or(0),
        tokens_per_minute: e.limits.tokens_per_minute.unwrap_or(0),
    }
}

/// Rate limits from the wire: 0 is none.
fn limits_in(requests_per_minute: u32, tokens_per_minute: u64) -> EntryLimits {
    EntryLimits {
        requests_per_minute: (requests_per_minute > 0).then_some(requests_per_minute),
        tokens_per_minute: (tokens_per_minute > 0).then_some(tokens_per_minute),
    }
}

/// A key's previous value: both fields or neither, a 32-byte HMAC other than the key's own.
fn previous_in(
    hash: &KeyHash,
    previous_hash: &[u8],
    until_us: i64,
) -> Result<Option<PreviousHash>, ApplyError> {
    if previous_hash.is_empty() && until_us == 0 {
        return Ok(None);
    }
    let p: KeyHash = previous_hash
        .try_into()
        .map_err(|_| malformed("consumer key previous hash is not 32 bytes"))?;
    if p == *hash {
        return Err(malformed(
            "consumer key previous hash is the key's own hash",
        ));
    }
    Ok(Some(PreviousHash {
        hash: p,
        until: Timestamp(until_us),
    }))
}

fn key_in(k: pb::ConsumerKey) -> Result<(KeyHash, KeyEntry), ApplyError> {
    let hash: KeyHash = k
        .hash
        .as_slice()
        .try_into()
        .map_err(|_| malformed("consumer key hash is not 32 bytes"))?;
    let ip_allowlist = k
        .ip_allowlist
        .iter()
        .map(|e| {
            e.parse::<IpNet>()
                .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                .map(crate::domain::validate::canonical_net)
                .map_err(|_| malformed(format!("allowlist entry {e:?}")))
        })
        .collect::<Result<Box<[IpNet]>, _>>()?;
    Ok((
        hash,
        KeyEntry {
            id: uuid_in("consumer key id", &k.id)?,
            consumer: if k.consumer_id.is_empty() {
                None
            } else {
                Some(uuid_in("consumer id", &k.consumer_id)?)
            },
            enabled: k.enabled,
            expire_time: (k.expire_time_us != 0).then_some(Timestamp(k.expire_time_us)),
            name: k.name.into_boxed_str(),
            scope: scope_in(k.scope)?,
            ip_allowlist,
            limits: limits_in(k.requests_per_minute, k.tokens_per_minute),
            usage: Default::default(),
            previous: previous_in(&hash, &k.previous_hash, k.previous_expire_time_us)?,
        },
    ))
}

fn services_out(s: &[ServiceRecord]) -> pb::Services {
    pb::Services {
        items: s
            .iter()
            .map(|s| pb::ModelService {
                id: s.id.as_bytes().to_vec(),
                name: s.name.clone(),
                auth_header: s.auth_header.clone(),
                auth_value_template: s.auth_value_template.clone(),
                model_keys: s
                    .model_keys
                    .iter()
                    .map(|k| pb::ModelKey {
                        id: k.id.as_bytes().to_vec(),
                        name: k.name.clone(),
                        ciphertext: k.ciphertext.clone(),
                    })
                    .collect(),
                models: s.models.clone(),
                model_source: model_source_out(s.model_source),
            })
            .collect(),
    }
}

fn services_in(s: pb::Services) -> Result<Vec<ServiceRecord>, ApplyError> {
    s.items
        .into_iter()
        .map(|s| {
            if s.auth_header.is_empty() || s.auth_value_template.matches("{key}").count() != 1 {
                return Err(malformed(format!(
                    "model service {:?} header or template",
                    s.name
                )));
            }
            Ok(ServiceRecord {
                id: uuid_in("model service id", &s.id)?,
                name: s.name,
                auth_header: s.auth_header,
                auth_value_template: s.auth_value_template,
                model_keys: s
                    .model_keys
                    .into_iter()
                    .map(|k| {
                        Ok(ModelKeyRecord {
                            id: uuid_in("model key id", &k.id)?,
                            name: k.name,
                            ciphertext: k.ciphertext,
                        })
                    })
                    .collect::<Result<_, ApplyError>>()?,
                // Kept as stored: an entry that is not a valid pattern (a list written before
                // the rules existed) matches no model, never every model.
                models: s.models,
                model_source: model_source_in(s.model_source),
            })
        })
        .collect()
}

/// The messages that carry `update` (a full one in chunks of `KEYS_PER_CHUNK` keys).
pub fn encode(update: &Update, base_version: i64, chunk: usize) -> Vec<pb::SnapshotMessage> {
    let head = pb::SnapshotMessage {
        store_id: update.store_id.clone(),
        epoch: update.epoch.clone(),
        version: update.version,
        base_version,
        full: update.full,
        last_chunk: true,
        keys: vec![],
        removed_keys: update.removed_keys.iter().map(|h| h.to_vec()).collect(),
        consumers: update
            .consumers
            .iter()
            .map(|c| pb::Consumer {
                id: c.id.as_bytes().to_vec(),
                name: c.name.clone(),
                scope: scope_out(&c.scope),
                requests_per_minute: c.limits.requests_per_minute.unwrap_or(0),
                tokens_per_minute: c.limits.tokens_per_minute.unwrap_or(0),
            })
            .collect(),
        removed_consumers: update
            .removed_consumers
            .iter()
            .map(|u| u.as_bytes().to_vec())
            .collect(),
        services: update.services.as_deref().map(services_out),
        model_key_count: update.model_key_count,
        heartbeat: false,
        master_key_fingerprint: String::new(),
        mac: vec![],
        sealed: vec![],
        digest: vec![],
    };
    let chunks: Vec<&[(KeyHash, KeyEntry)]> = if update.keys.is_empty() {
        vec![&[]]
    } else {
        update.keys.chunks(chunk.max(1)).collect()
    };
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, keys)| {
            let mut m = if i == 0 {
                head.clone()
            } else {
                pb::SnapshotMessage {
                    store_id: head.store_id.clone(),
                    epoch: head.epoch.clone(),
                    version: head.version,
                    base_version,
                    full: head.full,
                    ..Default::default()
                }
            };
            m.last_chunk = i + 1 == n;
            m.keys = keys.iter().map(|(h, e)| key_out(h, e)).collect();
            m
        })
        .collect()
}

/// Sets `digest` (protocol 2: the content digest of the state after this update) on the
/// last of an update's messages.
pub fn with_digest(
    mut msgs: Vec<pb::SnapshotMessage>,
    digest: ContentDigest,
) -> Vec<pb::SnapshotMessage> {
    if let Some(last) = msgs.last_mut() {
        last.digest = digest.to_bytes().to_vec();
    }
    msgs
}

/// One update as its messages brought it.
#[derive(Debug, PartialEq, Eq)]
pub struct Assembled {
    /// The version an incremental update applies on top of.
    pub base_version: i64,
    pub update: Update,
    /// The control plane's digest of the state after it (protocol 2; `None` from a control
    /// plane that sends none).
    pub digest: Option<ContentDigest>,
}

/// Assembles chunks into updates: feed every message; an update comes out at each last
/// chunk. A chunk that does not continue the one before is malformed.
#[derive(Debug, Default)]
pub struct Assembler {
    pending: Option<Update>,
}

impl Assembler {
    pub fn push(&mut self, m: pb::SnapshotMessage) -> Result<Option<Assembled>, ApplyError> {
        if m.heartbeat {
            return Ok(None);
        }
        let digest = match m.digest.as_slice() {
            [] => None,
            d => Some(
                ContentDigest::from_bytes(d)
                    .ok_or_else(|| malformed("a content digest is not 32 bytes"))?,
            ),
        };
        if m.store_id.is_empty() {
            return Err(malformed("message without a store id"));
        }
        let base = m.base_version;
        let last = m.last_chunk;
        let mut keys = Vec::with_capacity(m.keys.len());
        for k in m.keys {
            keys.push(key_in(k)?);
        }
        let removed_keys = m
            .removed_keys
            .iter()
            .map(|h| {
                KeyHash::try_from(h.as_slice())
                    .map_err(|_| malformed("removed key hash is not 32 bytes"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        match &mut self.pending {
            Some(p) => {
                if p.store_id != m.store_id
                    || p.epoch != m.epoch
                    || p.version != m.version
                    || p.full != m.full
                {
                    self.pending = None;
                    return Err(malformed(
                        "a snapshot chunk does not continue the previous one",
                    ));
                }
                p.keys.extend(keys);
                p.removed_keys.extend(removed_keys);
            }
            None => {
                self.pending = Some(Update {
                    store_id: m.store_id,
                    epoch: m.epoch,
                    version: m.version,
                    full: m.full,
                    keys,
                    removed_keys,
                    consumers: m
                        .consumers
                        .into_iter()
                        .map(|c| {
                            Ok(ConsumerRecord {
                                id: uuid_in("consumer id", &c.id)?,
                                name: c.name,
                                scope: scope_in(c.scope)?,
                                limits: limits_in(c.requests_per_minute, c.tokens_per_minute),
                            })
                        })
                        .collect::<Result<_, ApplyError>>()?,
                    removed_consumers: m
                        .removed_consumers
                        .iter()
                        .map(|b| uuid_in("removed consumer id", b))
                        .collect::<Result<_, _>>()?,
                    services: m.services.map(services_in).transpose()?,
                    model_key_count: m.model_key_count,
                });
            }
        }
        if last {
            Ok(self.pending.take().map(|update| Assembled {
                base_version: base,
                update,
                digest,
            }))
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
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
        };
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
}
