//! Updates: what moves a snapshot from one store revision to the next. A full update holds
//! everything; an incremental one only what changed. The same updates feed the local
//! snapshot and (serialised) remote data planes; model key values travel encrypted and are
//! decrypted only here, when applied.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use uuid::Uuid;

use super::{
    ConsumerEntry, InjectedKey, KeyEntry, KeyIndex, ScopeSet, ServiceEntry, Snapshot, UsageCells,
};
use crate::crypto::{KeyHash, Keys, Secret};
use crate::domain::ModelSource;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerRecord {
    pub id: Uuid,
    pub name: String,
    pub scope: ScopeSet,
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
}

fn consumer_entry(
    r: &ConsumerRecord,
    services: &HashMap<Box<str>, Arc<ServiceEntry>>,
) -> Arc<ConsumerEntry> {
    Arc::new(ConsumerEntry {
        id: r.id,
        name: r.name.as_str().into(),
        scope: r.scope.clone(),
        usage: UsageCells::new(services.values().map(|s| s.id)),
    })
}

fn services(
    records: &[ServiceRecord],
    keys: &Keys,
) -> Result<HashMap<Box<str>, Arc<ServiceEntry>>, ApplyError> {
    let mut out = HashMap::with_capacity(records.len());
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
        out.insert(
            s.name.as_str().into(),
            Arc::new(
                ServiceEntry::new(s.id, &s.name, &s.auth_header, injected)
                    .with_models(&s.models, s.model_source),
            ),
        );
    }
    Ok(out)
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
        let (services, service_records) = match update.services {
            Some(s) => (Arc::new(services(&s, keys)?), Arc::new(s)),
            None if update.full => (Arc::default(), Arc::default()),
            None => (self.services.clone(), self.service_records.clone()),
        };
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
        })
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
                })
                .collect(),
            removed_consumers: vec![],
            services: Some((*self.service_records).clone()),
            model_key_count: self.model_keys,
        }
    }
}
