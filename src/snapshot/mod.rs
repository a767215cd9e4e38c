//! The immutable in-memory index the data plane decides from, how it is built from the
//! store, and how it is published (`arc-swap`: readers never lock). Depends on `domain`,
//! `crypto` and `store` (the builder only; the `Snapshot` type itself is store-free).

mod builder;

pub use builder::{SnapshotBuilder, build_snapshot};

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use ipnet::IpNet;

use crate::crypto::{KeyHash, Secret};
use crate::domain::Timestamp;

/// Keys are HMAC outputs, already uniformly random: their first 8 bytes are a perfect hash.
#[derive(Default, Clone, Copy)]
pub struct PrehashedKey(u64);

impl Hasher for PrehashedKey {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its bytes (after no length prefix for arrays).
        let mut b = [0u8; 8];
        let n = bytes.len().min(8);
        b[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(b);
    }
}

pub type KeyMap<V> = HashMap<KeyHash, V, BuildHasherDefault<PrehashedKey>>;

/// Which model services a consumer or key may reach, by service id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScopeSet {
    All,
    Only(Box<[Arc<str>]>),
}

impl ScopeSet {
    pub fn allows(&self, service_id: &str) -> bool {
        match self {
            ScopeSet::All => true,
            ScopeSet::Only(ids) => ids.iter().any(|id| &**id == service_id),
        }
    }
}

#[derive(Debug)]
pub struct ConsumerEntry {
    pub id: Arc<str>,
    pub name: Arc<str>,
    pub scope: ScopeSet,
}

#[derive(Debug)]
pub struct KeyEntry {
    pub id: Arc<str>,
    pub name: Arc<str>,
    pub enabled: bool,
    pub expire_time: Option<Timestamp>,
    pub consumer: Option<Arc<ConsumerEntry>>,
    /// The key's own scope (`All` when unset: the consumer's scope then decides).
    pub scope: ScopeSet,
    pub ip_allowlist: Box<[IpNet]>,
}

/// An enabled model key as injected for one service: the rendered header value.
#[derive(Debug)]
pub struct InjectedKey {
    pub id: Arc<str>,
    pub name: Arc<str>,
    /// The service's template with the key substituted, e.g. `Bearer sk-…`.
    pub header_value: Secret,
}

#[derive(Debug)]
pub struct ServiceEntry {
    pub id: Arc<str>,
    pub name: Arc<str>,
    pub auth_header: Arc<str>,
    /// Enabled bound model keys, in binding order.
    pub keys: Box<[InjectedKey]>,
    next: AtomicUsize,
}

impl ServiceEntry {
    pub fn new(
        id: Arc<str>,
        name: Arc<str>,
        auth_header: Arc<str>,
        keys: Vec<InjectedKey>,
    ) -> Self {
        ServiceEntry {
            id,
            name,
            auth_header,
            keys: keys.into_boxed_slice(),
            next: AtomicUsize::new(0),
        }
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
#[derive(Debug)]
pub struct Snapshot {
    pub store_id: String,
    pub version: i64,
    pub build_time: SystemTime,
    pub build_duration: Duration,
    pub counts: SnapshotCounts,
    pub keys: KeyMap<KeyEntry>,
    pub services: HashMap<Arc<str>, Arc<ServiceEntry>>,
}

impl Snapshot {
    pub fn empty(store_id: &str, version: i64) -> Self {
        Snapshot {
            store_id: store_id.to_string(),
            version,
            build_time: SystemTime::now(),
            build_duration: Duration::ZERO,
            counts: SnapshotCounts::default(),
            keys: KeyMap::default(),
            services: HashMap::new(),
        }
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

    /// Publishes `snap` unless it is older than the live one from the same store.
    /// Returns whether it was swapped in.
    pub fn publish(&self, snap: Arc<Snapshot>) -> bool {
        if let Some(cur) = self.inner.load().as_ref()
            && cur.store_id == snap.store_id
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

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<i64> {
        self.version.subscribe()
    }
}
