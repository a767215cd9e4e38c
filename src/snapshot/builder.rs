//! Keeps the published snapshot in step with the store: after every committed change (a
//! burst coalesces: one update takes every commit made while the previous one was applied)
//! and on a periodic check, which also picks up other replicas' commits. Each step reads
//! only what changed since the snapshot's revision and applies it as an `Update`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use uuid::Uuid;

use super::{
    ConsumerRecord, EntryLimits, KeyEntry, ModelKeyRecord, ModelRule, PreviousHash, Published,
    ScopeList, ScopeSet, SeenAhead, ServiceRecord, Snapshot, SnapshotCell, Update,
};
use crate::crypto::{KeyHash, Keys};
use crate::domain::validate::ip_entry;
use crate::domain::{Consumer, KeyStatus, ModelKey, ModelService, Scope, SecretRef};
use crate::secret::Secrets;
use crate::store::{Changes, Increment, KeyRow, Store, StoreError};

/// Change records kept (revisions); a replica further behind than this reloads fully.
const KEEP_CHANGES: i64 = 100_000;
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// More changed resources than this since the last snapshot: reload everything instead.
const MAX_INCREMENTAL_CHANGES: usize = 50_000;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store record cannot be distributed: {0}")]
    Record(String),
    #[error(transparent)]
    Apply(#[from] super::ApplyError),
}

fn uuid(id: &str) -> Result<Uuid, BuildError> {
    Uuid::parse_str(id).map_err(|_| BuildError::Record(format!("id {id:?} is not a UUID")))
}

fn scope_set(scope: &Scope) -> Result<ScopeSet, BuildError> {
    Ok(match scope {
        Scope::Unset | Scope::All => ScopeSet::All,
        Scope::List { services, models } => ScopeSet::Only(Arc::new(ScopeList {
            services: services
                .iter()
                .map(|n| uuid(&n.id))
                .collect::<Result<_, _>>()?,
            models: models
                .iter()
                .map(|g| {
                    Ok(ModelRule {
                        service: uuid(&g.service.id)?,
                        pattern: g.pattern.as_str().into(),
                    })
                })
                .collect::<Result<_, BuildError>>()?,
        })),
    })
}

fn key_entry(k: KeyRow) -> Result<(KeyHash, KeyEntry), BuildError> {
    let ip_allowlist: Box<[IpNet]> = k
        .ip_allowlist
        .iter()
        .map(|e| ip_entry("ip_allowlist", e).map_err(|v| BuildError::Record(v.description)))
        .collect::<Result<_, _>>()?;
    Ok((
        k.hash,
        KeyEntry {
            id: uuid(&k.id)?,
            consumer: k.consumer_id.as_deref().map(uuid).transpose()?,
            enabled: k.status == KeyStatus::Enabled,
            expire_time: k.expire_time,
            name: k.name.into_boxed_str(),
            scope: scope_set(&k.scope)?,
            ip_allowlist,
            limits: EntryLimits::new(&k.limits, k.budget_exhausted_until),
            usage: Default::default(),
            previous: k.previous.map(|(hash, until)| PreviousHash { hash, until }),
        },
    ))
}

fn consumer_record(c: &Consumer) -> Result<ConsumerRecord, BuildError> {
    Ok(ConsumerRecord {
        id: uuid(&c.id)?,
        name: c.name.clone(),
        scope: scope_set(&c.scope)?,
        limits: EntryLimits::new(&c.limits, c.budget_exhausted_until),
    })
}

/// Seals every SECRET_REF model key's value like a stored model key's, so distribution and
/// data planes cannot tell the two apart. Values come from the secret cache only — the
/// builder never waits on a provider (a stuck one would stall every update): the background
/// refresh and admin requests read references; a failed read keeps the last good value. A
/// reference that never resolved in this process leaves its key out (keygate never serves a
/// key it could not resolve) and wakes the refresh, whose first read then commits a change.
fn resolve_secret_keys(
    keys: &mut [(ModelKey, Vec<u8>)],
    secrets: Option<&Secrets>,
    store_keys: &Keys,
) {
    let mut values: HashMap<SecretRef, Option<crate::crypto::Secret>> = HashMap::new();
    for (k, ct) in keys.iter_mut() {
        let Some(r) = &k.secret_ref else { continue };
        // Disabled or unbound keys are marked too: the background refresh compares with
        // what was applied here (no needless change at start).
        let served = k.status == KeyStatus::Enabled && !k.model_services.is_empty();
        let value = match values.get(r) {
            Some(v) => v.clone(),
            None => {
                let v = secrets.and_then(|s| s.for_snapshot(r));
                values.insert(r.clone(), v.clone());
                v
            }
        };
        match value {
            Some(v) => {
                *ct = store_keys.cipher.encrypt(&k.id, &v);
                if let Some(s) = secrets {
                    s.mark_applied(r, &v);
                }
            }
            None => {
                ct.clear();
                if served {
                    tracing::error!(
                        model_key = %k.name,
                        reference = %r,
                        "model key left out of the snapshot: its secret has never resolved here"
                    );
                }
            }
        }
    }
}

fn service_records(
    services: &[ModelService],
    keys: &[(ModelKey, Vec<u8>)],
) -> Result<Vec<ServiceRecord>, BuildError> {
    let by_id: std::collections::HashMap<&str, &(ModelKey, Vec<u8>)> =
        keys.iter().map(|k| (k.0.id.as_str(), k)).collect();
    services
        .iter()
        .map(|s| {
            let model_keys = s
                .model_keys
                .iter()
                .filter_map(|n| by_id.get(n.id.as_str()))
                .filter(|(k, ct)| k.status == KeyStatus::Enabled && !ct.is_empty())
                .map(|(k, ct)| {
                    Ok(ModelKeyRecord {
                        id: uuid(&k.id)?,
                        name: k.name.clone(),
                        ciphertext: ct.clone(),
                    })
                })
                .collect::<Result<_, BuildError>>()?;
            Ok(ServiceRecord {
                id: uuid(&s.id)?,
                name: s.name.clone(),
                auth_header: s.auth_header.clone(),
                auth_value_template: s.auth_value_template.clone(),
                model_keys,
                models: s.models.clone(),
                model_source: s.model_source,
            })
        })
        .collect()
}

/// A full update from everything in the store (keys streamed straight into entries).
pub async fn load_full_update(
    store: &Store,
    secrets: Option<&Secrets>,
) -> Result<Update, BuildError> {
    Ok(load_full_update_marked(store, secrets).await?.0)
}

/// `load_full_update`, and the history mark of its version.
async fn load_full_update_marked(
    store: &Store,
    secrets: Option<&Secrets>,
) -> Result<(Update, i64), BuildError> {
    let mut keys = Vec::new();
    let mut bad: Option<BuildError> = None;
    let contents = store
        .load_contents(|row| {
            match key_entry(row) {
                Ok(e) => keys.push(e),
                Err(e) => {
                    let msg = e.to_string();
                    bad.get_or_insert(e);
                    return Err(msg);
                }
            }
            Ok(())
        })
        .await;
    if let Some(e) = bad {
        return Err(e);
    }
    let mut c = contents?;
    resolve_secret_keys(&mut c.model_keys, secrets, store.keys());
    let update = Update {
        store_id: c.store_id.clone(),
        epoch: c.epoch.clone(),
        version: c.revision,
        full: true,
        keys,
        removed_keys: vec![],
        consumers: c
            .consumers
            .iter()
            .map(consumer_record)
            .collect::<Result<_, _>>()?,
        removed_consumers: vec![],
        services: Some(service_records(&c.model_services, &c.model_keys)?),
        model_key_count: c.model_keys.len() as u64,
    };
    Ok((update, c.mark))
}

/// The update for an incremental change set.
async fn increment_to_update(
    mut i: Increment,
    model_key_count: u64,
    secrets: Option<&Secrets>,
    keys: &Keys,
) -> Result<Update, BuildError> {
    if let Some((_, model_keys)) = &mut i.services {
        resolve_secret_keys(model_keys, secrets, keys);
    }
    Ok(Update {
        store_id: i.store_id.clone(),
        epoch: i.epoch.clone(),
        version: i.revision,
        full: false,
        keys: i
            .consumer_keys
            .into_iter()
            .map(key_entry)
            .collect::<Result<_, _>>()?,
        removed_keys: i.removed_key_hashes.clone(),
        consumers: i
            .consumers
            .iter()
            .map(consumer_record)
            .collect::<Result<_, _>>()?,
        removed_consumers: i
            .removed_consumer_ids
            .iter()
            .map(|id| uuid(id))
            .collect::<Result<_, _>>()?,
        model_key_count: match &i.services {
            Some((_, k)) => k.len() as u64,
            None => model_key_count,
        },
        services: i
            .services
            .as_ref()
            .map(|(s, k)| service_records(s, k))
            .transpose()?,
    })
}

/// Why a control plane starts a new epoch (SPEC §5 "Versions").
#[derive(Clone, Copy)]
enum NewEpoch {
    /// The store's revision is below a version published or held by a data plane.
    WentBack,
    /// The store holds another history at the published version.
    Diverged,
}

/// Keeps a `SnapshotCell` in step with a `Store`.
pub struct SnapshotBuilder {
    store: Store,
    cell: SnapshotCell,
    keys: Keys,
    /// Resolves SECRET_REF model keys (none: such keys are left out).
    secrets: Option<Secrets>,
    poll_interval: Duration,
    /// Applied updates are also sent here (distribution to data planes).
    updates: Option<tokio::sync::broadcast::Sender<Published>>,
    /// Versions data planes presented that this snapshot's history never reached here.
    ahead: Option<tokio::sync::mpsc::Receiver<SeenAhead>>,
    /// The history mark of the published version: (epoch, version, mark).
    published_mark: std::sync::Mutex<Option<(String, i64, i64)>>,
}

impl SnapshotBuilder {
    pub fn new(store: Store, cell: SnapshotCell) -> Self {
        let keys = store.keys().clone();
        SnapshotBuilder {
            store,
            cell,
            keys,
            secrets: None,
            poll_interval: Duration::from_secs(1),
            updates: None,
            ahead: None,
            published_mark: std::sync::Mutex::new(None),
        }
    }

    /// Check every version a data plane presents ahead of the store (`SeenAhead`): the
    /// store went back (a restore while this builder was away), so a new epoch starts.
    pub fn with_seen_ahead(mut self, rx: tokio::sync::mpsc::Receiver<SeenAhead>) -> Self {
        self.ahead = Some(rx);
        self
    }

    /// Starts a new epoch after the store `epoch` was found at `revision` with a history that
    /// is not the one of `version` (published, or held by a data plane): `why`. Another
    /// replica may have started it already.
    async fn start_epoch(
        &self,
        epoch: &str,
        revision: i64,
        version: i64,
        why: NewEpoch,
    ) -> Result<(), BuildError> {
        let (reason, started, by_other) = match why {
            NewEpoch::WentBack => (
                format!(
                    "the store's revision {revision} is below version {version}, published or held by a data plane"
                ),
                "the store's revision went back (restored from an older backup or failed over to a lagging replica): started a new epoch; every data plane takes the store's state in full",
                "the store's revision went back; another replica started the new epoch",
            ),
            NewEpoch::Diverged => (
                format!(
                    "the store's history at the published version {version} is another (restored and changed back up to it; now at revision {revision})"
                ),
                "the store holds another history at the published version (restored from a backup and changed back up to it): started a new epoch; every data plane takes the store's state in full",
                "the store holds another history at the published version; another replica started the new epoch",
            ),
        };
        match self.store.bump_epoch(epoch, &reason).await? {
            Some(new) => {
                crate::metrics::METRICS.epoch_changed();
                tracing::warn!(revision, published_version = version, epoch = %new, "{started}")
            }
            None => tracing::info!(revision, "{by_other}"),
        }
        Ok(())
    }

    /// A data plane presented `seen`: when it is of the store's current epoch but ahead of
    /// the store's revision, the store lost history that data plane has; start a new epoch.
    async fn check_seen_ahead(&self, seen: SeenAhead) -> Result<(), BuildError> {
        let (epoch, revision) = self.store.epoch().await?;
        if seen.store_id == self.store.store_id() && seen.epoch == epoch && seen.version > revision
        {
            self.start_epoch(&epoch, revision, seen.version, NewEpoch::WentBack)
                .await?;
        }
        Ok(())
    }

    /// The history mark of the published `(epoch, version)`, when this builder published it.
    fn mark_of(&self, epoch: &str, version: i64) -> Option<i64> {
        match &*self.published_mark.lock().expect("not poisoned") {
            Some((e, v, mark)) if e == epoch && *v == version => Some(*mark),
            _ => None,
        }
    }

    /// Resolve SECRET_REF model keys through `secrets`.
    pub fn with_secrets(mut self, secrets: Secrets) -> Self {
        self.secrets = Some(secrets);
        self
    }

    /// Also publish every applied update on `tx`.
    pub fn with_updates(mut self, tx: tokio::sync::broadcast::Sender<Published>) -> Self {
        self.updates = Some(tx);
        self
    }

    /// Brings the published snapshot up to the store's current revision: incrementally from
    /// the live snapshot when there is one, fully otherwise. Returns the live snapshot.
    pub async fn refresh(&self) -> Result<Arc<Snapshot>, BuildError> {
        let current = self.cell.load();
        let changes = match &current {
            Some(s) => {
                let mark = self.mark_of(&s.epoch, s.version);
                self.store
                    .load_changes(&s.epoch, s.version, mark, MAX_INCREMENTAL_CHANGES)
                    .await?
            }
            None => Changes::Full,
        };
        let model_keys = current.as_ref().map(|s| s.counts().model_keys).unwrap_or(0);
        let secrets = self.secrets.as_ref();
        let (update, mark) = match changes {
            Changes::UpToDate { .. } => {
                if let Some(s) = current {
                    return Ok(s);
                }
                load_full_update_marked(&self.store, secrets).await?
            }
            Changes::Full => load_full_update_marked(&self.store, secrets).await?,
            Changes::WentBack { epoch, revision } => {
                let seen = current.as_ref().map_or(0, |s| s.version);
                self.start_epoch(&epoch, revision, seen, NewEpoch::WentBack)
                    .await?;
                load_full_update_marked(&self.store, secrets).await?
            }
            Changes::Diverged { epoch, revision } => {
                let published = current.as_ref().map_or(0, |s| s.version);
                self.start_epoch(&epoch, revision, published, NewEpoch::Diverged)
                    .await?;
                load_full_update_marked(&self.store, secrets).await?
            }
            Changes::Incremental(i) => {
                let mark = i.mark;
                let update = increment_to_update(i, model_keys, secrets, &self.keys).await?;
                (update, mark)
            }
        };
        let marked = (update.epoch.clone(), update.version, mark);
        let keys = self.keys.clone();
        let base = current.clone();
        // What distribution needs: an incremental update as is (small); for a full one only
        // the marker, since subscribers are sent the published snapshot itself (no copy of
        // millions of keys here).
        let shared = Arc::new(if update.full {
            Update {
                store_id: update.store_id.clone(),
                epoch: update.epoch.clone(),
                version: update.version,
                full: true,
                ..Default::default()
            }
        } else {
            update.clone()
        });
        let snap = tokio::task::spawn_blocking(move || match base {
            Some(b) => b.apply(update, &keys),
            None => Snapshot::from_full(update, &keys),
        })
        .await
        .expect("applying an update does not panic")?;
        let snap = Arc::new(snap);
        if self.cell.publish(snap.clone()) {
            *self.published_mark.lock().expect("not poisoned") = Some(marked);
            tracing::debug!(
                version = snap.version,
                full = shared.full,
                consumer_keys = snap.counts().consumer_keys,
                apply_ms = snap.build_duration.as_secs_f64() * 1000.0,
                "snapshot published"
            );
            if let Some(tx) = &self.updates {
                let base = current
                    .as_ref()
                    .filter(|c| c.same_history(&shared.store_id, &shared.epoch) && !shared.full);
                let _ = tx.send(Published {
                    base_version: base.map(|c| c.version),
                    base_digest: base.map(|c| c.digest()),
                    digest: snap.digest(),
                    update: shared,
                });
            }
        }
        Ok(snap)
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        let mut ahead = self.ahead.take();
        let mut commits = self.store.subscribe_commits();
        let mut poll = tokio::time::interval(self.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first prune one period after start: nothing to do at start-up.
        let mut prune =
            tokio::time::interval_at(tokio::time::Instant::now() + PRUNE_EVERY, PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = prune.tick() => {
                    match self.store.prune_changes(KEEP_CHANGES).await {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(rows = n, "pruned the change log"),
                        Err(e) => tracing::warn!(error = %e, "change log not pruned"),
                    }
                    continue;
                }
                changed = commits.changed() => {
                    if changed.is_err() { return; }
                }
                Some(seen) = next_seen(&mut ahead) => {
                    if let Err(e) = self.check_seen_ahead(seen).await {
                        tracing::warn!(error = %e, "could not check a data plane's version against the store");
                    }
                }
                _ = poll.tick() => {
                    let live = self.cell.load().map(|s| s.version);
                    match self.store.revision().await {
                        Ok(r) if Some(r) == live => continue,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "store revision check failed; serving the last snapshot");
                            continue;
                        }
                    }
                }
            }
            commits.borrow_and_update();
            if let Err(e) = self.refresh().await {
                tracing::error!(error = %e, "snapshot update failed; serving the last snapshot");
            }
        }
    }
}

/// The next `SeenAhead`, or never (no channel, or it closed).
async fn next_seen(rx: &mut Option<tokio::sync::mpsc::Receiver<SeenAhead>>) -> Option<SeenAhead> {
    match rx {
        Some(r) => match r.recv().await {
            Some(s) => Some(s),
            None => {
                *rx = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}
