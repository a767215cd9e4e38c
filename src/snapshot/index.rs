//! The consumer-key index: HMAC → key entry, for up to millions of keys.
//!
//! A sorted base array with a directory over the hash's leading bits (HMACs are uniform, so
//! each directory bucket holds ~2 entries: a lookup is two or three cache lines and the
//! index carries no hash-table slack), plus a small overlay map of recent upserts and
//! tombstones. An update clones only the overlay; once it outgrows `max(4096, n/32)` it is
//! merged into a new base, off the request path.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use super::KeyEntry;
use crate::crypto::KeyHash;

/// HMAC outputs are already uniformly random: their first 8 bytes are a perfect hash.
#[derive(Default, Clone, Copy)]
pub struct PrehashedKey(u64);

impl Hasher for PrehashedKey {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut b = [0u8; 8];
        let n = bytes.len().min(8);
        b[..n].copy_from_slice(&bytes[..n]);
        self.0 = self.0.rotate_left(8) ^ u64::from_le_bytes(b);
    }
}

type Overlay = HashMap<KeyHash, Option<Arc<KeyEntry>>, BuildHasherDefault<PrehashedKey>>;

#[inline]
fn prefix(h: &KeyHash) -> u64 {
    u64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
}

#[derive(Debug, Default)]
struct Base {
    entries: Vec<(KeyHash, KeyEntry)>,
    /// `dir[b]..dir[b + 1]` is the range of entries whose prefix >> shift == b.
    dir: Vec<u32>,
    shift: u32,
}

impl Base {
    fn new(mut entries: Vec<(KeyHash, KeyEntry)>) -> Base {
        entries.sort_unstable_by_key(|e| e.0);
        entries.dedup_by(|later, earlier| later.0 == earlier.0);
        let bits = (entries.len() / 2)
            .max(2)
            .next_power_of_two()
            .trailing_zeros()
            .min(31);
        let shift = 64 - bits;
        let buckets = 1usize << bits;
        let mut dir = Vec::with_capacity(buckets + 1);
        let mut i = 0usize;
        for b in 0..buckets {
            while i < entries.len() && (prefix(&entries[i].0) >> shift) < b as u64 {
                i += 1;
            }
            dir.push(i as u32);
        }
        dir.push(entries.len() as u32);
        Base {
            entries,
            dir,
            shift,
        }
    }

    #[inline]
    fn get(&self, h: &KeyHash) -> Option<&KeyEntry> {
        if self.entries.is_empty() {
            return None;
        }
        let b = (prefix(h) >> self.shift) as usize;
        let (lo, hi) = (self.dir[b] as usize, self.dir[b + 1] as usize);
        self.entries[lo..hi]
            .iter()
            .find(|(k, _)| k == h)
            .map(|(_, e)| e)
    }
}

/// HMAC → consumer key entry. Cloning is O(overlay).
#[derive(Debug, Clone, Default)]
pub struct KeyIndex {
    base: Arc<Base>,
    overlay: Arc<Overlay>,
    len: usize,
}

impl KeyIndex {
    /// An index holding exactly `entries` (a later duplicate hash replaces an earlier one).
    pub fn from_entries(entries: Vec<(KeyHash, KeyEntry)>) -> KeyIndex {
        let base = Base::new(entries);
        KeyIndex {
            len: base.entries.len(),
            base: Arc::new(base),
            overlay: Arc::default(),
        }
    }

    #[inline]
    pub fn get(&self, h: &KeyHash) -> Option<&KeyEntry> {
        if !self.overlay.is_empty()
            && let Some(slot) = self.overlay.get(h)
        {
            return slot.as_deref();
        }
        self.base.get(h)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries waiting in the overlay (for tests and metrics).
    pub fn overlay_len(&self) -> usize {
        self.overlay.len()
    }

    /// A new index with `removals` removed, then `upserts` inserted or replaced.
    pub fn with_changes(
        &self,
        removals: &[KeyHash],
        upserts: Vec<(KeyHash, KeyEntry)>,
    ) -> KeyIndex {
        let mut overlay: Overlay = (*self.overlay).clone();
        let mut len = self.len;
        for h in removals {
            let existed = match overlay.get(h) {
                Some(slot) => slot.is_some(),
                None => self.base.get(h).is_some(),
            };
            if existed {
                len -= 1;
            }
            if self.base.get(h).is_some() {
                overlay.insert(*h, None);
            } else {
                overlay.remove(h);
            }
        }
        for (h, mut e) in upserts {
            let existing = match overlay.get(&h) {
                Some(slot) => slot.as_deref(),
                None => self.base.get(&h),
            };
            match existing {
                // The same key, changed: it keeps its usage stamp.
                Some(old) if old.id == e.id => e.usage = old.usage.clone(),
                Some(_) => {}
                None => len += 1,
            }
            overlay.insert(h, Some(Arc::new(e)));
        }
        let next = KeyIndex {
            base: self.base.clone(),
            overlay: Arc::new(overlay),
            len,
        };
        if next.overlay.len() > (next.base.entries.len() / 32).max(4096) {
            next.compacted()
        } else {
            next
        }
    }

    /// The same contents with the overlay merged into a new base.
    pub fn compacted(&self) -> KeyIndex {
        let mut entries = Vec::with_capacity(self.len);
        for (h, e) in &self.base.entries {
            if !self.overlay.contains_key(h) {
                entries.push((*h, e.clone()));
            }
        }
        for (h, slot) in self.overlay.iter() {
            if let Some(e) = slot {
                entries.push((*h, (**e).clone()));
            }
        }
        KeyIndex::from_entries(entries)
    }

    /// Every entry (base and overlay), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&KeyHash, &KeyEntry)> {
        let overlay = &self.overlay;
        self.base
            .entries
            .iter()
            .filter(move |(h, _)| !overlay.contains_key(h))
            .map(|(h, e)| (h, e))
            .chain(
                overlay
                    .iter()
                    .filter_map(|(h, e)| e.as_deref().map(|e| (h, e))),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::ScopeSet;
    use proptest::prelude::*;
    use std::collections::HashMap as StdMap;
    use uuid::Uuid;

    fn entry(n: u8) -> KeyEntry {
        KeyEntry {
            id: Uuid::from_bytes([n; 16]),
            consumer: None,
            enabled: true,
            expire_time: None,
            name: format!("k{n}").into(),
            scope: ScopeSet::All,
            ip_allowlist: Box::new([]),
            limits: Default::default(),
            usage: Default::default(),
        }
    }

    fn hash(seed: u8) -> KeyHash {
        use sha2::Digest;
        sha2::Sha256::digest([seed]).into()
    }

    #[test]
    fn lookups_removals_and_compaction() {
        let idx = KeyIndex::from_entries((0..100).map(|i| (hash(i), entry(i))).collect());
        assert_eq!(idx.len(), 100);
        assert_eq!(idx.get(&hash(7)).unwrap().name.as_ref(), "k7");
        assert!(idx.get(&hash(200)).is_none());
        let next = idx.with_changes(
            &[hash(7), hash(250)],
            vec![(hash(200), entry(200)), (hash(8), entry(99))],
        );
        assert_eq!(next.len(), 100);
        assert!(next.get(&hash(7)).is_none());
        assert_eq!(next.get(&hash(8)).unwrap().name.as_ref(), "k99");
        assert!(idx.get(&hash(7)).is_some(), "the old index is unchanged");
        let c = next.compacted();
        assert_eq!(c.overlay_len(), 0);
        assert_eq!(c.len(), 100);
        assert_eq!(c.get(&hash(8)).unwrap().name.as_ref(), "k99");
        assert!(c.get(&hash(7)).is_none());
        assert_eq!(c.iter().count(), 100);
    }

    proptest! {
        /// The index behaves like a plain map under any sequence of changes.
        #[test]
        fn behaves_like_a_map(base in proptest::collection::vec(any::<u8>(), 0..60),
                              ops in proptest::collection::vec((any::<bool>(), any::<u8>()), 0..200)) {
            let mut model: StdMap<KeyHash, u8> = StdMap::new();
            for b in &base { model.insert(hash(*b), *b); }
            let mut idx = KeyIndex::from_entries(base.iter().map(|b| (hash(*b), entry(*b))).collect());
            for chunk in ops.chunks(7) {
                let mut removals = vec![];
                let mut upserts = vec![];
                for (insert, v) in chunk {
                    if *insert { upserts.push((hash(*v), entry(*v))); model.insert(hash(*v), *v); }
                    else { removals.push(hash(*v)); model.remove(&hash(*v)); upserts.retain(|(h, _)| *h != hash(*v)); }
                }
                idx = idx.with_changes(&removals, upserts);
                if chunk.len() % 3 == 0 { idx = idx.compacted(); }
            }
            prop_assert_eq!(idx.len(), model.len());
            prop_assert_eq!(idx.iter().count(), model.len());
            for v in 0..=255u8 {
                prop_assert_eq!(idx.get(&hash(v)).map(|e| e.id), model.get(&hash(v)).map(|n| Uuid::from_bytes([*n; 16])));
            }
        }
    }
}
