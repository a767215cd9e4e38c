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
        budget_exhausted_until_us: e.limits.exhausted_until.map_or(0, |t| t.0),
    }
}

/// Limits from the wire: 0 is none.
fn limits_in(
    requests_per_minute: u32,
    tokens_per_minute: u64,
    exhausted_until_us: i64,
) -> EntryLimits {
    EntryLimits {
        requests_per_minute: (requests_per_minute > 0).then_some(requests_per_minute),
        tokens_per_minute: (tokens_per_minute > 0).then_some(tokens_per_minute),
        exhausted_until: (exhausted_until_us != 0).then_some(Timestamp(exhausted_until_us)),
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
            limits: limits_in(
                k.requests_per_minute,
                k.tokens_per_minute,
                k.budget_exhausted_until_us,
            ),
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
                budget_exhausted_until_us: c.limits.exhausted_until.map_or(0, |t| t.0),
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
                                limits: limits_in(
                                    c.requests_per_minute,
                                    c.tokens_per_minute,
                                    c.budget_exhausted_until_us,
                                ),
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
#[path = "wire_tests.rs"]
mod tests;
