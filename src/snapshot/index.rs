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

/// Whether slot `h` holding `e` is `e`'s previous value (SPEC §8.4): the same entry reached
/// through the value a rotation replaced, not a key of its own.
#[inline]
fn is_alias(h: &KeyHash, e: &KeyEntry) -> bool {
    e.previous.as_ref().is_some_and(|p| p.hash == *h)
}

/// An entry whose previous value is its own value has no previous value.
fn normalized(h: &KeyHash, mut e: KeyEntry) -> KeyEntry {
    if is_alias(h, &e) {
        e.previous = None;
    }
    e
}

/// Every slot of `entries`: each key under its HMAC and, after a rotation, under its
/// previous value's HMAC too (a clone sharing its usage stamp).
fn with_aliases(entries: Vec<(KeyHash, KeyEntry)>) -> Vec<(KeyHash, KeyEntry)> {
    let mut out = Vec::with_capacity(entries.len());
    for (h, e) in entries {
        let e = normalized(&h, e);
        if let Some(p) = &e.previous {
            out.push((p.hash, e.clone()));
        }
        out.push((h, e));
    }
    out
}

#[derive(Debug, Default)]
struct Base {
    /// Keys under their HMACs, and rotated keys also under their previous HMACs (aliases).
    entries: Vec<(KeyHash, KeyEntry)>,
    /// `dir[b]..dir[b + 1]` is the range of entries whose prefix >> shift == b.
    dir: Vec<u32>,
    shift: u32,
}

impl Base {
    /// A base holding exactly `slots`; when two share a hash, a key's own slot wins over
    /// another's previous value.
    fn new(mut entries: Vec<(KeyHash, KeyEntry)>) -> Base {
        entries.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then(is_alias(&a.0, &a.1).cmp(&is_alias(&b.0, &b.1)))
        });
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

    /// Keys held (aliases are not keys).
    fn keys(&self) -> usize {
        self.entries.iter().filter(|(h, e)| !is_alias(h, e)).count()
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
///
/// A rotated key is found by either of its HMACs (the entry carries its previous value's
/// HMAC and expiry: the decision refuses that one from its expiry on); it counts, lists and
/// distributes once, under its own HMAC. The aliases follow their key: an update of a key
/// moves them, a removal takes them along.
#[derive(Debug, Clone, Default)]
pub struct KeyIndex {
    base: Arc<Base>,
    overlay: Arc<Overlay>,
    /// Keys held (aliases are not counted).
    len: usize,
}

/// An index being changed: the base it shares, its own copy of the overlay.
struct Editing<'a> {
    base: &'a Base,
    overlay: Overlay,
    len: usize,
}

impl Editing<'_> {
    fn get(&self, h: &KeyHash) -> Option<&KeyEntry> {
        match self.overlay.get(h) {
            Some(slot) => slot.as_deref(),
            None => self.base.get(h),
        }
    }

    /// Empties slot `h`.
    fn clear(&mut self, h: &KeyHash) {
        if self.base.get(h).is_some() {
            self.overlay.insert(*h, None);
        } else {
            self.overlay.remove(h);
        }
    }

    /// Empties slot `h` if it is the previous value of key `id`.
    fn clear_alias(&mut self, h: &KeyHash, id: uuid::Uuid) {
        if self.get(h).is_some_and(|e| e.id == id && is_alias(h, e)) {
            self.clear(h);
        }
    }

    /// Removes what slot `h` holds: a key (with its previous value) or a previous value.
    fn remove(&mut self, h: &KeyHash) {
        let Some(old) = self.get(h) else { return };
        let alias = is_alias(h, old);
        let (id, previous) = (old.id, old.previous.map(|p| p.hash));
        if !alias {
            self.len -= 1;
            if let Some(p) = previous {
                self.clear_alias(&p, id);
            }
        }
        self.clear(h);
    }

    /// Puts key `e` under `h` (and its previous value), replacing what it held there before.
    fn upsert(&mut self, h: KeyHash, e: KeyEntry) {
        let mut e = normalized(&h, e);
        let new_previous = e.previous.map(|p| p.hash);
        // The same key as held before, under this HMAC or (just rotated) under the previous.
        let before = [Some(h), new_previous]
            .into_iter()
            .flatten()
            .find_map(|k| self.get(&k).filter(|old| old.id == e.id))
            .map(|old| (old.usage.clone(), old.previous.map(|p| p.hash)));
        if let Some((usage, old_previous)) = before {
            e.usage = usage;
            // A previous value the key no longer has (rotated again) goes.
            if let Some(p) = old_previous.filter(|p| Some(*p) != new_previous && *p != h) {
                self.clear_alias(&p, e.id);
            }
        }
        if self.get(&h).is_none_or(|old| is_alias(&h, old)) {
            self.len += 1;
        }
        let e = Arc::new(e);
        self.overlay.insert(h, Some(e.clone()));
        if let Some(p) = new_previous {
            match self.get(&p) {
                // The key's own old slot becomes its previous value.
                Some(old) if !is_alias(&p, old) && old.id == e.id => self.len -= 1,
                // Never shadow another key's value (the store never lets this happen).
                Some(old) if !is_alias(&p, old) => return,
                _ => {}
            }
            self.overlay.insert(p, Some(e));
        }
    }
}

impl KeyIndex {
    /// An index holding exactly `entries`, each under its HMAC and, after a rotation, its
    /// previous HMAC too (a later duplicate hash replaces an earlier one).
    pub fn from_entries(entries: Vec<(KeyHash, KeyEntry)>) -> KeyIndex {
        Self::from_slots(with_aliases(entries))
    }

    fn from_slots(slots: Vec<(KeyHash, KeyEntry)>) -> KeyIndex {
        let base = Base::new(slots);
        KeyIndex {
            len: base.keys(),
            base: Arc::new(base),
            overlay: Arc::default(),
        }
    }

    /// The entry `h` finds: a key by its HMAC, or a rotated key by its previous HMAC (see
    /// [`KeyEntry::previous_expired`]).
    #[inline]
    pub fn get(&self, h: &KeyHash) -> Option<&KeyEntry> {
        if !self.overlay.is_empty()
            && let Some(slot) = self.overlay.get(h)
        {
            return slot.as_deref();
        }
        self.base.get(h)
    }

    /// This index's entry for the key `e` describes (same id), found by `h` or by `e`'s
    /// previous HMAC: what an update of it carries its usage stamp from.
    pub fn held(&self, h: &KeyHash, e: &KeyEntry) -> Option<&KeyEntry> {
        [Some(*h), e.previous.map(|p| p.hash)]
            .into_iter()
            .flatten()
            .find_map(|k| self.get(&k).filter(|old| old.id == e.id))
    }

    /// Keys held (a rotated key counts once).
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

    /// A new index with `removals` removed (a key's HMAC takes its previous value along),
    /// then `upserts` inserted or replaced (each with its previous value, if any).
    pub fn with_changes(
        &self,
        removals: &[KeyHash],
        upserts: Vec<(KeyHash, KeyEntry)>,
    ) -> KeyIndex {
        let mut edit = Editing {
            base: &self.base,
            overlay: (*self.overlay).clone(),
            len: self.len,
        };
        for h in removals {
            edit.remove(h);
        }
        for (h, e) in upserts {
            edit.upsert(h, e);
        }
        let next = KeyIndex {
            base: self.base.clone(),
            overlay: Arc::new(edit.overlay),
            len: edit.len,
        };
        if next.overlay.len() > (next.base.entries.len() / 32).max(4096) {
            next.compacted()
        } else {
            next
        }
    }

    /// The same contents with the overlay merged into a new base.
    pub fn compacted(&self) -> KeyIndex {
        let mut slots = Vec::with_capacity(self.len);
        for (h, e) in &self.base.entries {
            if !self.overlay.contains_key(h) {
                slots.push((*h, e.clone()));
            }
        }
        for (h, slot) in self.overlay.iter() {
            if let Some(e) = slot {
                slots.push((*h, (**e).clone()));
            }
        }
        Self::from_slots(slots)
    }

    /// Every key (base and overlay), each once under its own HMAC, in no particular order.
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
            .filter(|(h, e)| !is_alias(h, e))
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
            previous: None,
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

    fn rotated(n: u8, previous: u8, until: i64) -> KeyEntry {
        KeyEntry {
            previous: Some(crate::snapshot::PreviousHash {
                hash: hash(previous),
                until: crate::domain::Timestamp(until),
            }),
            ..entry(n)
        }
    }

    /// SPEC §8.4: a rotated key is found by both HMACs, counted and listed once, and its
    /// previous value follows it through rotations, removals and compaction.
    #[test]
    fn a_rotated_key_is_found_by_both_values_and_counted_once() {
        let idx = KeyIndex::from_entries((0..10).map(|i| (hash(i), entry(i))).collect());
        // Key 3 rotated from value 3 to value 103 (what the store sends: no removal).
        let stamp = idx.get(&hash(3)).unwrap().usage.stamp().clone();
        let r1 = idx.with_changes(&[], vec![(hash(103), rotated(3, 3, 50))]);
        assert_eq!(r1.len(), 10);
        assert_eq!(r1.iter().count(), 10);
        for h in [hash(3), hash(103)] {
            let e = r1.get(&h).unwrap();
            assert_eq!(e.id, entry(3).id);
            assert!(Arc::ptr_eq(e.usage.stamp(), &stamp), "one key, one stamp");
        }
        let listed: Vec<_> = r1.iter().filter(|(_, e)| e.id == entry(3).id).collect();
        assert_eq!(listed.len(), 1);
        assert_eq!(*listed[0].0, hash(103), "listed under its own HMAC");
        // Rotated again (value 203), the store removing value 3: value 103 is the previous.
        let r2 = r1.with_changes(&[hash(3)], vec![(hash(203), rotated(3, 103, 60))]);
        assert_eq!(r2.len(), 10);
        assert!(r2.get(&hash(3)).is_none());
        assert_eq!(r2.get(&hash(103)).unwrap().id, entry(3).id);
        // The same without the removal: the index drops the stale previous value itself.
        let r2b = r1.with_changes(&[], vec![(hash(203), rotated(3, 103, 60))]);
        assert!(r2b.get(&hash(3)).is_none());
        assert_eq!(r2b.len(), 10);
        for idx in [r2.compacted(), r2b.compacted()] {
            assert_eq!(idx.len(), 10);
            assert_eq!(idx.iter().count(), 10);
            assert_eq!(idx.get(&hash(103)).unwrap().id, entry(3).id);
            assert_eq!(idx.get(&hash(203)).unwrap().id, entry(3).id);
        }
        // Removing the key's HMAC takes its previous value along.
        let gone = r2.with_changes(&[hash(203)], vec![]);
        assert_eq!(gone.len(), 9);
        assert!(gone.get(&hash(103)).is_none());
        assert!(gone.get(&hash(203)).is_none());
        // A full build holds both as well.
        let full = KeyIndex::from_entries(vec![(hash(203), rotated(3, 103, 60))]);
        assert_eq!((full.len(), full.iter().count()), (1, 1));
        assert!(full.get(&hash(103)).is_some());
        // A previous value never shadows another key's value.
        let clash = idx.with_changes(&[], vec![(hash(150), rotated(4, 5, 70))]);
        assert_eq!(clash.get(&hash(5)).unwrap().id, entry(5).id);
        assert_eq!(clash.len(), 11);
    }

    /// A key of the rotation model: `(id, value seed)`, previous value seed.
    type ModelKey = (u8, u16, Option<u16>);

    fn seeded(seed: u16) -> KeyHash {
        use sha2::Digest;
        sha2::Sha256::digest(seed.to_le_bytes()).into()
    }

    fn model_entry(id: u8, previous: Option<u16>) -> KeyEntry {
        KeyEntry {
            previous: previous.map(|p| crate::snapshot::PreviousHash {
                hash: seeded(p),
                until: crate::domain::Timestamp(1),
            }),
            ..entry(id)
        }
    }

    proptest! {
        /// Under any sequence of creates, rotations (with and without overlap), updates and
        /// deletes, sent as the store sends them (or without the removal of an earlier
        /// previous value), every key is found by its value and its previous value and by
        /// nothing else, and counts and lists once.
        #[test]
        fn rotations_keep_every_key_reachable_by_exactly_its_values(
            ops in proptest::collection::vec((0u8..5, 0u8..6, any::<bool>(), any::<bool>()), 0..120),
        ) {
            let mut model: StdMap<u8, ModelKey> = StdMap::new();
            let mut idx = KeyIndex::default();
            let mut next_seed = 0u16;
            let mut fresh = || { next_seed += 1; next_seed };
            for (op, id, flag, compact) in ops {
                let (removals, upserts): (Vec<KeyHash>, Vec<(KeyHash, KeyEntry)>) =
                    match (op, model.get(&id).copied()) {
                        (_, None) => {
                            let v = fresh();
                            model.insert(id, (id, v, None));
                            (vec![], vec![(seeded(v), model_entry(id, None))])
                        }
                        (0, Some((_, cur, prev))) => {
                            // Rotation with an overlap; `flag`: the store's removal of the
                            // earlier previous value is lost.
                            let v = fresh();
                            model.insert(id, (id, v, Some(cur)));
                            let removed = if flag { vec![] } else { prev.map(seeded).into_iter().collect() };
                            (removed, vec![(seeded(v), model_entry(id, Some(cur)))])
                        }
                        (1, Some((_, cur, prev))) => {
                            let v = fresh();
                            model.insert(id, (id, v, None));
                            let mut removed = vec![seeded(cur)];
                            removed.extend(prev.map(seeded));
                            (removed, vec![(seeded(v), model_entry(id, None))])
                        }
                        (2, Some((_, cur, prev))) => {
                            model.remove(&id);
                            let mut removed = vec![seeded(cur)];
                            if !flag {
                                removed.extend(prev.map(seeded));
                            }
                            (removed, vec![])
                        }
                        (_, Some((_, cur, prev))) => (vec![], vec![(seeded(cur), model_entry(id, prev))]),
                    };
                idx = idx.with_changes(&removals, upserts);
                if compact {
                    idx = idx.compacted();
                }
            }
            prop_assert_eq!(idx.len(), model.len());
            prop_assert_eq!(idx.iter().count(), model.len());
            for seed in 0..=next_seed {
                let want = model.values().find(|(_, cur, prev)| *cur == seed || *prev == Some(seed)).map(|k| entry(k.0).id);
                prop_assert_eq!(idx.get(&seeded(seed)).map(|e| e.id), want, "seed {}", seed);
            }
            for (h, e) in idx.iter() {
                let (_, cur, prev) = model.values().find(|k| entry(k.0).id == e.id).unwrap();
                prop_assert_eq!(*h, seeded(*cur));
                prop_assert_eq!(e.previous.map(|p| p.hash), prev.map(seeded));
            }
        }

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
