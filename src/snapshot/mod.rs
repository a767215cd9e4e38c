//! The immutable in-memory index the data plane decides from, the updates that move it from
//! one store revision to the next, and where it is published (`arc-swap`: readers never
//! lock). Updates cost what changed: consumer keys live in a large sorted base plus a small
//! overlay of recent changes, merged into a new base only once the overlay has grown.
//! Depends on `domain` and `crypto`; the builder (store → updates) also on `store`.

#[cfg(feature = "server")]
mod builder;
mod digest;
#[cfg(any(test, feature = "server"))]
#[doc(hidden)]
pub mod fixtures;
mod index;
mod scope;
mod update;

#[cfg(feature = "server")]
pub use builder::{BuildError, SnapshotBuilder, load_full_update};
pub use digest::ContentDigest;
pub use index::KeyIndex;
pub use scope::{Grant, ModelRule, ScopeList, ScopeSet};
pub use update::{ApplyError, ConsumerRecord, ModelKeyRecord, ServiceRecord, Update};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use ipnet::IpNet;
use uuid::Uuid;

use crate::authz::ratelimit::PerMinute;
use crate::crypto::{KeyHash, Secret};
use crate::domain::{ModelSource, Timestamp};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerEntry {
    pub id: Uuid,
    pub name: Box<str>,
    pub scope: ScopeSet,
    /// Its rate limits, over every key bound to it.
    pub limits: EntryLimits,
    /// Usage counters per model service, resolved on first use (metrics).
    pub usage: UsageCells,
}

/// One lazily resolved counter per model service for a consumer: after the first request
/// the hot path increments a handle it already holds (no lock, no label formatting).
#[derive(Clone, Default)]
pub struct UsageCells(Arc<[(Uuid, OnceLock<prometheus::IntCounter>)]>);

impl UsageCells {
    pub fn new(service_ids: impl IntoIterator<Item = Uuid>) -> Self {
        UsageCells(
            service_ids
                .into_iter()
                .map(|id| (id, OnceLock::new()))
                .collect(),
        )
    }

    /// The counter for `service_id`, made by `init` the first time.
    #[inline]
    pub fn counter(
        &self,
        service_id: &Uuid,
        init: impl FnOnce() -> prometheus::IntCounter,
    ) -> Option<&prometheus::IntCounter> {
        self.0
            .iter()
            .find(|(id, _)| id == service_id)
            .map(|(_, cell)| cell.get_or_init(init))
    }
}

impl std::fmt::Debug for UsageCells {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UsageCells({} services)", self.0.len())
    }
}

/// Counters are caches, not data: two entries compare equal whatever they hold.
impl PartialEq for UsageCells {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for UsageCells {}

/// A consumer key as the data plane sees it (its value is only the HMAC it is indexed by).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEntry {
    pub id: Uuid,
    pub consumer: Option<Uuid>,
    pub enabled: bool,
    pub expire_time: Option<Timestamp>,
    pub name: Box<str>,
    /// The key's own scope (`All` when unset: the consumer's scope then decides).
    pub scope: ScopeSet,
    pub ip_allowlist: Box<[IpNet]>,
    /// Its own rate limits (the consumer's apply besides).
    pub limits: EntryLimits,
    /// When the key was last used (allocated on first use; carried across updates).
    pub usage: UsageSlot,
    /// After a rotation (SPEC §8.4): the previous value, which finds this same entry until it
    /// expires (the index holds the entry under both HMACs).
    pub previous: Option<PreviousHash>,
}

impl KeyEntry {
    /// Whether `hash`, by which this entry was found, is its previous value and that value no
    /// longer authorizes at `now`: then it is answered exactly as a value in no snapshot.
    #[inline]
    pub fn previous_expired(&self, hash: &KeyHash, now: Timestamp) -> bool {
        self.previous
            .as_ref()
            .is_some_and(|p| p.hash == *hash && p.until <= now)
    }
}

/// A rotated key's previous value: its HMAC, authorizing before `until` and never from then.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PreviousHash {
    pub hash: KeyHash,
    pub until: Timestamp,
}

/// An HMAC is not a value, but it is shown only by a prefix all the same.
impl std::fmt::Debug for PreviousHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PreviousHash {{ hash: {}…, until: {:?} }}",
            hex_prefix(&self.hash),
            self.until
        )
    }
}

fn hex_prefix(h: &KeyHash) -> String {
    h[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// What a data plane enforces of a consumer's or consumer key's limits (SPEC §8.3): requests
/// and tokens per minute, each `None` when not limited, and until when its budget refuses
/// (set by the control plane when the spend reaches the budget; the largest instant for a
/// `TOTAL` budget).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EntryLimits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub exhausted_until: Option<Timestamp>,
}

impl EntryLimits {
    /// A record's limits as the store keeps them.
    pub fn new(l: &crate::domain::limits::Limits, exhausted_until: Option<Timestamp>) -> Self {
        EntryLimits {
            requests_per_minute: l.requests_per_minute,
            tokens_per_minute: l.tokens_per_minute,
            exhausted_until,
        }
    }

    /// The per-minute limits, as the rate limiter takes them.
    #[inline]
    pub fn per_minute(&self) -> PerMinute {
        PerMinute {
            requests: self.requests_per_minute,
            tokens: self.tokens_per_minute,
        }
    }

    /// No per-minute limit (the rate limiter is not asked).
    #[inline]
    pub fn is_rate_unlimited(&self) -> bool {
        self.requests_per_minute.is_none() && self.tokens_per_minute.is_none()
    }

    /// Whether its budget refuses at `now` (until the period's end, then open again with no
    /// word from the control plane).
    #[inline]
    pub fn budget_exhausted(&self, now: Timestamp) -> bool {
        self.exhausted_until.is_some_and(|t| now < t)
    }

    /// Nothing limited (the record then digests and encodes as before limits existed).
    pub fn is_unlimited(&self) -> bool {
        *self == EntryLimits::default()
    }
}

/// The last-use stamp of one consumer key, shared by every snapshot version that holds it.
#[derive(Debug, Default)]
pub struct UsageStamp {
    /// Unix microseconds of the latest allowed request (0: not since the last flush).
    pub last_used_us: std::sync::atomic::AtomicI64,
    /// Queued for the next flush (so a busy key is queued once per flush, not per request).
    pub queued: std::sync::atomic::AtomicBool,
}

/// A key's `UsageStamp`, created the first time the key authorizes a request.
#[derive(Clone, Default)]
pub struct UsageSlot(Arc<OnceLock<Arc<UsageStamp>>>);

impl UsageSlot {
    pub fn stamp(&self) -> &Arc<UsageStamp> {
        self.0.get_or_init(Arc::default)
    }
}

impl std::fmt::Debug for UsageSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UsageSlot")
    }
}

/// Usage is runtime state, not data: it never makes two entries differ.
impl PartialEq for UsageSlot {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for UsageSlot {}

/// An enabled model key as injected for one service: the rendered header value.
#[derive(Debug)]
pub struct InjectedKey {
    pub id: Uuid,
    pub name: Box<str>,
    /// The service's template with the key substituted, e.g. `Bearer sk-…`.
    pub header_value: Secret,
}

#[derive(Debug)]
pub struct ServiceEntry {
    pub id: Uuid,
    pub name: Box<str>,
    pub auth_header: Box<str>,
    /// Enabled bound model keys, in binding order.
    pub keys: Box<[InjectedKey]>,
    /// The model patterns the service may be asked for (empty: any model).
    pub models: Box<[Box<str>]>,
    /// Where its requests name their model.
    pub model_source: ModelSource,
    next: AtomicUsize,
}

impl ServiceEntry {
    pub fn new(id: Uuid, name: &str, auth_header: &str, keys: Vec<InjectedKey>) -> Self {
        ServiceEntry {
            id,
            name: name.into(),
            auth_header: auth_header.into(),
            keys: keys.into_boxed_slice(),
            models: Box::default(),
            model_source: ModelSource::Body,
            next: AtomicUsize::new(0),
        }
    }

    /// The service with a model list (enforced when non-empty) and a model source.
    pub fn with_models(mut self, models: &[String], source: ModelSource) -> Self {
        self.models = models.iter().map(|m| m.as_str().into()).collect();
        self.model_source = source;
        self
    }

    /// Whether the service's own model list admits `model` (an empty list admits any).
    #[inline]
    pub fn admits_model(&self, model: &str) -> bool {
        self.models.is_empty()
            || self
                .models
                .iter()
                .any(|p| crate::domain::model::pattern_matches(p, model))
    }

    /// Round-robin over the enabled keys (`None` when there are none).
    pub fn pick(&self) -> Option<&InjectedKey> {
        match self.keys.len() {
            0 => None,
            1 => self.keys.first(),
            n => Some(&self.keys[self.next.fetch_add(1, Ordering::Relaxed) % n]),
        }
    }
}

/// Counts shown by `GetSnapshotStatus` and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotCounts {
    pub consumer_keys: u64,
    pub model_keys: u64,
    pub model_services: u64,
    pub consumers: u64,
}

/// One immutable view of every key, consumer and service, at one store revision.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub store_id: String,
    /// Which history of the store's revisions `version` counts in (see `Update::epoch`).
    pub epoch: String,
    pub version: i64,
    pub build_time: SystemTime,
    /// How long the last update (or full build) took to apply.
    pub build_duration: Duration,
    keys: KeyIndex,
    consumers: Arc<HashMap<Uuid, Arc<ConsumerEntry>>>,
    services: Arc<HashMap<Box<str>, Arc<ServiceEntry>>>,
    /// The services as distributed (model keys still encrypted), for full updates.
    service_records: Arc<Vec<ServiceRecord>>,
    model_keys: u64,
    /// The digest of the content (`digest`), and the services block's term of it.
    digest: ContentDigest,
    services_term: ContentDigest,
}

impl Snapshot {
    /// A snapshot holding nothing (a store with no resources yet).
    pub fn empty(store_id: &str, version: i64) -> Self {
        Snapshot {
            store_id: store_id.to_string(),
            epoch: String::new(),
            version,
            build_time: SystemTime::now(),
            build_duration: Duration::ZERO,
            keys: KeyIndex::default(),
            consumers: Arc::default(),
            services: Arc::default(),
            service_records: Arc::default(),
            model_keys: 0,
            digest: ContentDigest::default(),
            services_term: ContentDigest::default(),
        }
    }

    /// The digest of what this snapshot holds (`snapshot::digest`): equal for equal content
    /// wherever it was built, control plane or data plane.
    pub fn digest(&self) -> ContentDigest {
        self.digest
    }

    /// Whether `version`s of `(store_id, epoch)` compare with this snapshot's.
    pub fn same_history(&self, store_id: &str, epoch: &str) -> bool {
        self.store_id == store_id && self.epoch == epoch
    }

    /// The consumer key whose HMAC is `hash`, or whose previous value's HMAC it is (whether
    /// that still authorizes is [`KeyEntry::previous_expired`]).
    #[inline]
    pub fn key(&self, hash: &KeyHash) -> Option<&KeyEntry> {
        self.keys.get(hash)
    }

    #[inline]
    pub fn consumer(&self, id: &Uuid) -> Option<&ConsumerEntry> {
        self.consumers.get(id).map(|c| &**c)
    }

    /// A model service by name (routes name services).
    #[inline]
    pub fn service(&self, name: &str) -> Option<&ServiceEntry> {
        self.services.get(name).map(|s| &**s)
    }

    pub fn counts(&self) -> SnapshotCounts {
        SnapshotCounts {
            consumer_keys: self.keys.len() as u64,
            model_keys: self.model_keys,
            model_services: self.services.len() as u64,
            consumers: self.consumers.len() as u64,
        }
    }

    pub fn key_index(&self) -> &KeyIndex {
        &self.keys
    }

    pub fn consumers(&self) -> impl Iterator<Item = &ConsumerEntry> {
        self.consumers.values().map(|c| &**c)
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceEntry> {
        self.services.values().map(|s| &**s)
    }
}

/// Where the live snapshot is published. `None` until the first one is built.
#[derive(Clone, Default)]
pub struct SnapshotCell {
    inner: Arc<ArcSwapOption<Snapshot>>,
    version: Arc<tokio::sync::watch::Sender<i64>>,
}

impl std::fmt::Debug for SnapshotCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotCell")
            .field("version", &*self.version.borrow())
            .finish()
    }
}

impl SnapshotCell {
    pub fn new() -> Self {
        Self::default()
    }

    /// The live snapshot, if any. Lock-free.
    pub fn load(&self) -> Option<Arc<Snapshot>> {
        self.inner.load_full()
    }

    /// A guard for the hot path (no reference-count traffic in the common case).
    pub fn load_guard(&self) -> arc_swap::Guard<Option<Arc<Snapshot>>> {
        self.inner.load()
    }

    /// Publishes `snap` unless it is older than the live one from the same store and epoch.
    /// Returns whether it was swapped in.
    pub fn publish(&self, snap: Arc<Snapshot>) -> bool {
        if let Some(cur) = self.inner.load().as_ref()
            && cur.same_history(&snap.store_id, &snap.epoch)
            && cur.version > snap.version
        {
            return false;
        }
        let v = snap.version;
        self.inner.store(Some(snap));
        self.version.send_replace(v);
        true
    }

    /// Resolves once a snapshot with at least `version` is live.
    pub async fn wait_for(&self, version: i64) {
        let mut rx = self.version.subscribe();
        let _ = rx
            .wait_for(|v| *v >= version && self.inner.load().is_some())
            .await;
    }
}

/// An applied update as the builder published it: `base_version` is the version it applied
/// on top of (`None` for a first or full build). A full update is only a marker (store and
/// version): subscribers are sent the published snapshot itself.
#[derive(Clone, Debug)]
pub struct Published {
    pub base_version: Option<i64>,
    pub update: Arc<Update>,
    /// The content digest of the snapshot it made, and (incremental) of the one it applied
    /// on top of: a subscriber is sent increments only from a state with that digest.
    pub digest: ContentDigest,
    pub base_digest: Option<ContentDigest>,
}

/// A version a data plane presented for `(store_id, epoch)` (distribution tells the builder,
/// which starts a new epoch if the store is in that epoch but below that version).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenAhead {
    pub store_id: String,
    pub epoch: String,
    pub version: i64,
}
