//! Builds snapshots from the store and keeps the published one current: after every
//! committed change (bursts coalesce: a build takes every commit made while the previous
//! build ran) and on a periodic check, which also picks up other replicas' commits.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;

use super::{
    ConsumerEntry, InjectedKey, KeyEntry, KeyMap, ScopeSet, ServiceEntry, Snapshot, SnapshotCell,
    SnapshotCounts,
};
use crate::crypto::{Keys, Secret};
use crate::domain::{KeyStatus, Scope};
use crate::store::{Store, StoreContents, StoreError};

fn scope_set(scope: &Scope, ids: &mut HashMap<String, Arc<str>>) -> ScopeSet {
    match scope {
        Scope::Unset | Scope::All => ScopeSet::All,
        Scope::Services(list) => ScopeSet::Only(
            list.iter()
                .map(|n| {
                    ids.entry(n.id.clone())
                        .or_insert_with(|| n.id.as_str().into())
                        .clone()
                })
                .collect(),
        ),
    }
}

/// Builds a snapshot from store contents, decrypting model keys with `keys`.
/// A model key that does not decrypt is left out and logged (by id, never value).
pub fn build_snapshot(contents: StoreContents, keys: &Keys) -> Snapshot {
    let started = Instant::now();
    let mut ids: HashMap<String, Arc<str>> = HashMap::new();

    let consumers: HashMap<String, Arc<ConsumerEntry>> = contents
        .consumers
        .iter()
        .map(|c| {
            let entry = Arc::new(ConsumerEntry {
                id: c.id.as_str().into(),
                name: c.name.as_str().into(),
                scope: scope_set(&c.scope, &mut ids),
            });
            (c.id.clone(), entry)
        })
        .collect();

    let mut plaintexts: HashMap<&str, Secret> = HashMap::new();
    for (k, blob) in &contents.model_keys {
        if k.status != KeyStatus::Enabled {
            continue;
        }
        match keys.cipher.decrypt(&k.id, blob) {
            Ok(s) => {
                plaintexts.insert(k.id.as_str(), s);
            }
            Err(e) => {
                tracing::error!(model_key_id = %k.id, model_key = %k.name, error = %e, "model key left out of the snapshot")
            }
        }
    }
    let model_key_names: HashMap<&str, &str> = contents
        .model_keys
        .iter()
        .map(|(k, _)| (k.id.as_str(), k.name.as_str()))
        .collect();

    let mut services = HashMap::with_capacity(contents.model_services.len());
    for s in &contents.model_services {
        let injected: Vec<InjectedKey> = s
            .model_keys
            .iter()
            .filter_map(|mk| {
                let value = plaintexts.get(mk.id.as_str())?;
                Some(InjectedKey {
                    id: mk.id.as_str().into(),
                    name: model_key_names
                        .get(mk.id.as_str())
                        .copied()
                        .unwrap_or(&mk.name)
                        .into(),
                    header_value: Secret::new(s.auth_value_template.replacen(
                        "{key}",
                        value.expose(),
                        1,
                    )),
                })
            })
            .collect();
        let name: Arc<str> = s.name.as_str().into();
        let id = ids
            .entry(s.id.clone())
            .or_insert_with(|| s.id.as_str().into())
            .clone();
        services.insert(
            name.clone(),
            Arc::new(ServiceEntry::new(
                id,
                name,
                s.auth_header.as_str().into(),
                injected,
            )),
        );
    }

    let mut key_map: KeyMap<KeyEntry> =
        KeyMap::with_capacity_and_hasher(contents.consumer_keys.len(), Default::default());
    for (k, hash) in &contents.consumer_keys {
        let allowlist: Box<[IpNet]> = k
            .ip_allowlist
            .iter()
            .filter_map(|e| crate::domain::validate::ip_entry("ip_allowlist", e).ok())
            .collect();
        key_map.insert(
            *hash,
            KeyEntry {
                id: k.id.as_str().into(),
                name: k.name.as_str().into(),
                enabled: k.status == KeyStatus::Enabled,
                expire_time: k.expire_time,
                consumer: k
                    .consumer
                    .as_ref()
                    .and_then(|c| consumers.get(&c.id).cloned()),
                scope: scope_set(&k.scope, &mut ids),
                ip_allowlist: allowlist,
            },
        );
    }

    Snapshot {
        counts: SnapshotCounts {
            consumer_keys: key_map.len() as u64,
            model_keys: contents.model_keys.len() as u64,
            model_services: services.len() as u64,
            consumers: consumers.len() as u64,
        },
        store_id: contents.store_id,
        version: contents.revision,
        build_time: SystemTime::now(),
        build_duration: started.elapsed(),
        keys: key_map,
        services,
    }
}

/// Keeps a `SnapshotCell` in step with a `Store`.
pub struct SnapshotBuilder {
    store: Store,
    cell: SnapshotCell,
    poll_interval: Duration,
}

impl SnapshotBuilder {
    pub fn new(store: Store, cell: SnapshotCell) -> Self {
        SnapshotBuilder {
            store,
            cell,
            poll_interval: Duration::from_secs(1),
        }
    }

    /// Builds and publishes one snapshot of the store as it is now.
    pub async fn rebuild(&self) -> Result<Arc<Snapshot>, StoreError> {
        let contents = self.store.load_contents().await?;
        let keys = self.store.keys().clone();
        let snap = tokio::task::spawn_blocking(move || build_snapshot(contents, &keys))
            .await
            .expect("snapshot build does not panic");
        let snap = Arc::new(snap);
        if self.cell.publish(snap.clone()) {
            tracing::debug!(
                version = snap.version,
                consumer_keys = snap.counts.consumer_keys,
                build_ms = snap.build_duration.as_secs_f64() * 1000.0,
                "snapshot published"
            );
        }
        Ok(snap)
    }

    /// Runs until `shutdown` resolves: rebuilds after commits and on each poll interval
    /// when the store revision moved (another replica wrote).
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let mut commits = self.store.subscribe_commits();
        let mut poll = tokio::time::interval(self.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        let mut built: Option<i64> = self.cell.load().map(|s| s.version);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                changed = commits.changed() => {
                    if changed.is_err() { return; }
                }
                _ = poll.tick() => {
                    match self.store.revision().await {
                        Ok(r) if Some(r) == built => continue,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "store revision check failed; serving the last snapshot");
                            continue;
                        }
                    }
                }
            }
            commits.borrow_and_update();
            match self.rebuild().await {
                Ok(s) => built = Some(s.version),
                Err(e) => {
                    tracing::error!(error = %e, "snapshot build failed; serving the last snapshot")
                }
            }
        }
    }
}
