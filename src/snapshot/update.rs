//! Updates: what moves a snapshot from one store revision to the next. A full update holds
//! everything; an incremental one only what changed. The same updates feed the local
//! snapshot and (serialised) remote data planes; model key values travel encrypted and are
//! decrypted only here, when applied.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use uuid::Uuid;

use super::digest::{self, ContentDigest};
use super::{
    ConsumerEntry, EntryLimits, InjectedKey, KeyEntry, KeyIndex, ScopeSet, ServiceEntry, Snapshot,
    UsageCells,
};
use crate::crypto::{KeyHash, Keys, Secret};
use crate::domain::ModelSource;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerRecord {
    pub id: Uuid,
    pub name: String,
    pub scope: ScopeSet,
    /// Its rate limits (SPEC §8.3).
    pub limits: EntryLimits,
}

/// An enabled model key bound to a service, value encrypted under the master key's model-key
/// cipher with the key's id as associated data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelKeyRecord {
    pub id: Uuid,
    pub name: String,
    pub ciphertext: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    pub id: Uuid,
    pub name: String,
    pub auth_header: String,
    pub auth_value_template: String,
    /// Enabled bound model keys in binding order.
    pub model_keys: Vec<ModelKeyRecord>,
    /// The model patterns the service may be asked for (empty: any model).
    pub models: Vec<String>,
    /// Where its requests name their model.
    pub model_source: ModelSource,
}

/// A change of snapshot. `full`: the records are everything (nothing else survives);
/// otherwise they replace or remove only what they name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    pub store_id: String,
    /// The store's history the version belongs to: versions compare only within one
    /// (store id, epoch); a restored store starts a new epoch (SPEC §5 "Versions").
    pub epoch: String,
    pub version: i64,
    pub full: bool,
    /// Consumer keys to insert or replace, by HMAC.
    pub keys: Vec<(KeyHash, KeyEntry)>,
    pub removed_keys: Vec<KeyHash>,
    pub consumers: Vec<ConsumerRecord>,
    pub removed_consumers: Vec<Uuid>,
    /// Every service with its keys, when any service or model key changed (services are few).
    pub services: Option<Vec<ServiceRecord>>,
    /// How many model keys the store holds (for status and metrics).
    pub model_key_count: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    #[error("update for version {update} is older than the snapshot's version {current}")]
    Stale { current: i64, update: i64 },
    #[error(
        "incremental update from store {update} cannot apply to a snapshot of store {current} (another store, or another epoch of it)"
    )]
    OtherStore { current: String, update: String },
    #[error("model key {id} does not decrypt under this master key (is it the control plane's?)")]
    Decrypt { id: Uuid },
    #[error("malformed update: {0}")]
    Malformed(String),
    #[error(
        "the state at version {version} is not the control plane's (content digest {actual}, the control plane's {expected}): this data plane's state diverged from the store's (a restored store)"
    )]
    Diverged {
        version: i64,
        expected: ContentDigest,
        actual: ContentDigest,
    },
}

fn consumer_entry(
    r: &ConsumerRecord,
    services: &HashMap<Box<str>, Arc<ServiceEntry>>,
) -> Arc<ConsumerEntry> {
    Arc::new(ConsumerEntry {
        id: r.id,
        name: r.name.as_str().into(),
        scope: r.scope.clone(),
        limits: r.limits,
        usage: UsageCells::new(services.values().map(|s| s.id)),
    })
}

/// Services by name, as the decision uses them (model key values decrypted).
type ServiceMap = HashMap<Box<str>, Arc<ServiceEntry>>;

/// The services as the decision uses them, and their term of the content digest.
fn services(
    records: &[ServiceRecord],
    keys: &Keys,
) -> Result<(ServiceMap, ContentDigest), ApplyError> {
    let mut decrypted = Vec::with_capacity(records.len());
    for s in records {
        let mut injected = Vec::with_capacity(s.model_keys.len());
        for mk in &s.model_keys {
            let value = keys
                .cipher
                .decrypt(&mk.id.to_string(), &mk.ciphertext)
                .map_err(|_| ApplyError::Decrypt { id: mk.id })?;
            injected.push(InjectedKey {
                id: mk.id,
                name: mk.name.as_str().into(),
                header_value: Secret::new(s.auth_value_template.replacen(
                    "{key}",
                    value.expose(),
                    1,
                )),
            });
        }
        decrypted.push((s, injected));
    }
    let term = digest::services_record(
        &keys.digest,
        &decrypted
            .iter()
            .map(|(s, k)| (*s, k.as_slice()))
            .collect::<Vec<_>>(),
    );
    let mut out = HashMap::with_capacity(records.len());
    for (s, injected) in decrypted {
        out.insert(
            s.name.as_str().into(),
            Arc::new(
                ServiceEntry::new(s.id, &s.name, &s.auth_header, injected)
                    .with_models(&s.models, s.model_source),
            ),
        );
    }
    Ok((out, term))
}

/// The content digest of everything: one hash per key and consumer, and the services term.
fn full_digest(
    keys: &KeyIndex,
    consumers: &HashMap<Uuid, Arc<ConsumerEntry>>,
    services_term: ContentDigest,
) -> ContentDigest {
    let mut d = services_term;
    let mut buf = Vec::with_capacity(256);
    for (h, e) in keys.iter() {
        d.add(digest::key_record(&mut buf, h, e));
    }
    for c in consumers.values() {
        d.add(digest::consumer_record(&mut buf, c));
    }
    d
}

impl Snapshot {
    /// Builds a snapshot from a full update.
    pub fn from_full(update: Update, keys: &Keys) -> Result<Snapshot, ApplyError> {
        if !update.full {
            return Err(ApplyError::Malformed(
                "the first update must be a full one".into(),
            ));
        }
        let mut empty = Snapshot::empty(&update.store_id, i64::MIN);
        empty.epoch = update.epoch.clone();
        empty.apply(update, keys)
    }

    /// The snapshot after `update`. A full update from another store or another epoch of it
    /// replaces everything (a replaced or restored database); an older version of the same
    /// (store, epoch) is refused.
    pub fn apply(&self, update: Update, keys: &Keys) -> Result<Snapshot, ApplyError> {
        let started = Instant::now();
        let same_store = self.same_history(&update.store_id, &update.epoch);
        if !same_store && !update.full {
            return Err(ApplyError::OtherStore {
                current: self.store_id.clone(),
                update: update.store_id,
            });
        }
        if same_store && update.version < self.version {
            return Err(ApplyError::Stale {
                current: self.version,
                update: update.version,
            });
        }
        let (services, service_records, services_term) = match update.services {
            Some(s) => {
                let (entries, term) = services(&s, keys)?;
                (Arc::new(entries), Arc::new(s), term)
            }
            None if update.full => (Arc::default(), Arc::default(), ContentDigest::default()),
            None => (
                self.services.clone(),
                self.service_records.clone(),
                self.services_term,
            ),
        };
        // What an incremental update touches, for the digest (taken before it is consumed).
        // A rotated key's previous HMAC changes too (its old slot becomes an alias, which is
        // never digested), as does the previous HMAC of an entry an update replaces.
        let touched_keys = (!update.full).then(|| {
            let mut t: Vec<KeyHash> = update.removed_keys.clone();
            for (h, e) in &update.keys {
                t.push(*h);
                t.extend(e.previous.map(|p| p.hash));
            }
            let held: Vec<KeyHash> = t
                .iter()
                .filter_map(|h| self.keys.get(h).and_then(|e| e.previous.map(|p| p.hash)))
                .collect();
            t.extend(held);
            t.sort_unstable();
            t.dedup();
            t
        });
        let (key_index, consumers) = if update.full {
            let consumers: HashMap<Uuid, Arc<ConsumerEntry>> = update
                .consumers
                .iter()
                .map(|c| (c.id, consumer_entry(c, &services)))
                .collect();
            let mut keys_in = update.keys;
            if same_store && !self.keys.is_empty() {
                for (h, e) in keys_in.iter_mut() {
                    if let Some(old) = self.keys.held(h, e) {
                        e.usage = old.usage.clone();
                    }
                }
            }
            (KeyIndex::from_entries(keys_in), Arc::new(consumers))
        } else {
            let services_changed = !Arc::ptr_eq(&services, &self.services);
            let consumers = if update.consumers.is_empty()
                && update.removed_consumers.is_empty()
                && !services_changed
            {
                self.consumers.clone()
            } else {
                let mut c = (*self.consumers).clone();
                if services_changed {
                    // Usage cells follow the service set.
                    for e in c.values_mut() {
                        let mut n = (**e).clone();
                        n.usage = UsageCells::new(services.values().map(|s| s.id));
                        *e = Arc::new(n);
                    }
                }
                for id in &update.removed_consumers {
                    c.remove(id);
                }
                for r in &update.consumers {
                    c.insert(r.id, consumer_entry(r, &services));
                }
                Arc::new(c)
            };
            let index = if update.keys.is_empty() && update.removed_keys.is_empty() {
                self.keys.clone()
            } else {
                self.keys.with_changes(&update.removed_keys, update.keys)
            };
            (index, consumers)
        };
        let digest = match touched_keys {
            None => full_digest(&key_index, &consumers, services_term),
            Some(touched) => {
                let mut d = self.digest;
                d.sub(self.services_term);
                d.add(services_term);
                let mut buf = Vec::with_capacity(256);
                // Aliases (a rotated key under its previous HMAC) are not records.
                let record = |h: &KeyHash, e: &KeyEntry| e.previous.is_none_or(|p| p.hash != *h);
                for h in &touched {
                    if let Some(old) = self.keys.get(h).filter(|e| record(h, e)) {
                        d.sub(digest::key_record(&mut buf, h, old));
                    }
                    if let Some(new) = key_index.get(h).filter(|e| record(h, e)) {
                        d.add(digest::key_record(&mut buf, h, new));
                    }
                }
                if !Arc::ptr_eq(&consumers, &self.consumers) {
                    let mut ids: Vec<Uuid> = update.removed_consumers.clone();
                    ids.extend(update.consumers.iter().map(|c| c.id));
                    ids.sort_unstable();
                    ids.dedup();
                    for id in &ids {
                        if let Some(old) = self.consumers.get(id) {
                            d.sub(digest::consumer_record(&mut buf, old));
                        }
                        if let Some(new) = consumers.get(id) {
                            d.add(digest::consumer_record(&mut buf, new));
                        }
                    }
                }
                d
            }
        };
        Ok(Snapshot {
            store_id: update.store_id,
            epoch: update.epoch,
            version: update.version,
            build_time: SystemTime::now(),
            build_duration: started.elapsed(),
            keys: key_index,
            consumers,
            services,
            service_records,
            model_keys: update.model_key_count,
            digest,
            services_term,
        })
    }

    /// The content digest computed from every record again, as a full build does (what
    /// `digest` keeps incrementally; for tests and the snapshot benchmark).
    #[doc(hidden)]
    pub fn digest_from_scratch(&self) -> ContentDigest {
        full_digest(&self.keys, &self.consumers, self.services_term)
    }

    /// The full update that rebuilds this snapshot elsewhere (model key values encrypted).
    pub fn to_full_update(&self) -> Update {
        Update {
            keys: self.keys.iter().map(|(h, e)| (*h, e.clone())).collect(),
            ..self.to_update_without_keys()
        }
    }

    /// [`Snapshot::to_full_update`] without its consumer keys (which senders stream in
    /// chunks from the snapshot itself), so the keys are never copied for it.
    pub fn to_update_without_keys(&self) -> Update {
        Update {
            store_id: self.store_id.clone(),
            epoch: self.epoch.clone(),
            version: self.version,
            full: true,
            keys: Vec::new(),
            removed_keys: vec![],
            consumers: self
                .consumers
                .values()
                .map(|c| ConsumerRecord {
                    id: c.id,
                    name: c.name.to_string(),
                    scope: c.scope.clone(),
                    limits: c.limits,
                })
                .collect(),
            removed_consumers: vec![],
            services: Some((*self.service_records).clone()),
            model_key_count: self.model_keys,
        }
    }
}
