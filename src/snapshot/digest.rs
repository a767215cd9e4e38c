//! The digest of a snapshot's content (SPEC §5 "Versions"): what tells two snapshots of the
//! same (store, epoch, version) apart when their content differs — a store restored from a
//! backup (its epoch row included) and changed back up to a revision some data plane or
//! cache already holds with other content.
//!
//! Order-independent and incremental: the lane-wise wrapping sum (four 64-bit lanes) of one
//! SHA-256 per record — each consumer key (its HMAC and entry), each consumer — plus one
//! HMAC-SHA256 (under `Keys::digest`) of the services block, which holds the model keys'
//! values. An update adds the records it brings and subtracts those it replaces or removes,
//! so it costs what changed; a full build costs one hash per record. Computed only where a
//! snapshot is made (`Snapshot::apply`), the same way on control and data planes; nothing on
//! the Check path. The services term being keyed, the sum reveals nothing about the content
//! to whoever sees it on the wire.
//!
//! Digest v1 covers the records as a protocol-2 data plane holds them. A later keygate that
//! adds a field or an enum value computes v1 over that projection (new fields left out, new
//! model sources as `NONE`, as such a data plane reads them), or defines a v2 for the data
//! planes that ask for a later protocol: the digest must never differ for content a data
//! plane holds exactly as sent.
//!
//! Rate limits (SPEC §8.3) extend a key's or consumer's record with a suffix, only when the
//! record has a limit: every record without one hashes exactly as in v1, so a snapshot that
//! uses no limit digests the same on every protocol-2 data plane. A data plane built before
//! limits does not hold a record's limits and digests that record without them: it sees the
//! first full snapshot with a limit as a version skew (served, digests then off on it, logged
//! and counted: `Subscriber::apply_checked`) until it is upgraded.
//! Depends on `crypto` and the snapshot's record types.

use std::fmt;

use ipnet::IpNet;
use sha2::{Digest, Sha256};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::{ConsumerEntry, EntryLimits, InjectedKey, KeyEntry, ScopeSet, ServiceRecord};
use crate::crypto::{KeyHash, KeyHasher};

/// The digest of a snapshot's content (see the module documentation).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ContentDigest([u64; 4]);

impl ContentDigest {
    /// The 32 bytes that travel on the wire.
    pub fn to_bytes(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, lane) in self.0.iter().enumerate() {
            out[i * 8..(i + 1) * 8].copy_from_slice(&lane.to_le_bytes());
        }
        out
    }

    /// A digest from its wire form (`None` unless exactly 32 bytes).
    pub fn from_bytes(b: &[u8]) -> Option<ContentDigest> {
        let b: &[u8; 32] = b.try_into().ok()?;
        let mut lanes = [0u64; 4];
        for (i, lane) in lanes.iter_mut().enumerate() {
            *lane = u64::from_le_bytes(b[i * 8..(i + 1) * 8].try_into().expect("8 bytes"));
        }
        Some(ContentDigest(lanes))
    }

    pub(super) fn add(&mut self, other: ContentDigest) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.wrapping_add(b);
        }
    }

    pub(super) fn sub(&mut self, other: ContentDigest) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.wrapping_sub(b);
        }
    }

    fn of(hash: [u8; 32]) -> ContentDigest {
        ContentDigest::from_bytes(&hash).expect("32 bytes")
    }
}

/// The first 8 bytes, in hex: enough to tell digests apart in a log line.
impl fmt::Display for ContentDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.to_bytes()[..8]))
    }
}

impl fmt::Debug for ContentDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentDigest({self})")
    }
}

/// The canonical encoding records are hashed over: fixed-width integers, length-prefixed
/// strings and lists, one tag per record kind. Frozen: see `digest_v1_is_frozen`.
struct Enc<'a>(&'a mut Vec<u8>);

impl Enc<'_> {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u32(&mut self, v: usize) -> &mut Self {
        self.0.extend_from_slice(&(v as u32).to_be_bytes());
        self
    }
    fn i64(&mut self, v: i64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        match v {
            Some(v) => self.u8(1).raw(&v.to_be_bytes()),
            None => self.u8(0),
        }
    }
    /// Rate limits: nothing at all without one (the v1 record), else a tagged suffix. Every
    /// record's v1 part ends self-delimited (a length-prefixed list or string), so a suffix
    /// never reads as another record's v1 part.
    fn limits(&mut self, l: &EntryLimits) -> &mut Self {
        if l.is_unlimited() {
            return self;
        }
        self.raw(b"kgd1 limits")
            .opt_u64(l.requests_per_minute.map(u64::from))
            .opt_u64(l.tokens_per_minute);
        // A spent budget, only when there is one: records without digest as before budgets.
        if let Some(t) = l.exhausted_until {
            self.raw(b"exhausted").i64(t.0);
        }
        self
    }
    fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len()).raw(v)
    }
    fn uuid(&mut self, v: &Uuid) -> &mut Self {
        self.raw(v.as_bytes())
    }
    fn opt_uuid(&mut self, v: Option<&Uuid>) -> &mut Self {
        match v {
            Some(u) => self.u8(1).uuid(u),
            None => self.u8(0),
        }
    }
    fn net(&mut self, n: &IpNet) -> &mut Self {
        match n {
            IpNet::V4(v4) => self.u8(4).raw(&v4.addr().octets()),
            IpNet::V6(v6) => self.u8(6).raw(&v6.addr().octets()),
        }
        .u8(n.prefix_len())
    }
    fn scope(&mut self, s: &ScopeSet) -> &mut Self {
        match s {
            ScopeSet::All => self.u8(0),
            ScopeSet::Only(list) => {
                self.u8(1).u32(list.services.len());
                for id in list.services.iter() {
                    self.uuid(id);
                }
                self.u32(list.models.len());
                for r in list.models.iter() {
                    self.uuid(&r.service).bytes(r.pattern.as_bytes());
                }
                self
            }
        }
    }
}

/// The hash one consumer key adds to the digest. `buf` is scratch space (reused).
pub(super) fn key_record(buf: &mut Vec<u8>, hash: &KeyHash, e: &KeyEntry) -> ContentDigest {
    buf.clear();
    let mut w = Enc(buf);
    w.raw(b"kgd1 key")
        .raw(hash)
        .uuid(&e.id)
        .opt_uuid(e.consumer.as_ref())
        .u8(e.enabled as u8);
    match e.expire_time {
        Some(t) => w.u8(1).i64(t.0),
        None => w.u8(0),
    };
    w.bytes(e.name.as_bytes())
        .scope(&e.scope)
        .u32(e.ip_allowlist.len());
    for n in e.ip_allowlist.iter() {
        w.net(n);
    }
    // A rotated key's previous value (SPEC §8.4), only when it has one: keys never rotated
    // digest as before rotation existed.
    if let Some(p) = &e.previous {
        w.raw(b"previous").raw(&p.hash).i64(p.until.0);
    }
    w.limits(&e.limits);
    ContentDigest::of(Sha256::digest(&buf[..]).into())
}

/// The hash one consumer adds to the digest.
pub(super) fn consumer_record(buf: &mut Vec<u8>, c: &ConsumerEntry) -> ContentDigest {
    buf.clear();
    Enc(buf)
        .raw(b"kgd1 consumer")
        .uuid(&c.id)
        .bytes(c.name.as_bytes())
        .scope(&c.scope)
        .limits(&c.limits);
    ContentDigest::of(Sha256::digest(&buf[..]).into())
}

/// The term the services block adds: every service (in id order) with its model keys in
/// binding order, each key by its rendered header value (what is injected: the same on every
/// replica, where ciphertexts of a secret reference differ), keyed under `key`. No services:
/// nothing (so an empty snapshot's digest is zero).
pub(super) fn services_record(
    key: &KeyHasher,
    services: &[(&ServiceRecord, &[InjectedKey])],
) -> ContentDigest {
    if services.is_empty() {
        return ContentDigest::default();
    }
    let mut order: Vec<&(&ServiceRecord, &[InjectedKey])> = services.iter().collect();
    order.sort_by_key(|(s, _)| s.id);
    let mut buf = Zeroizing::new(Vec::new());
    let mut w = Enc(&mut buf);
    w.raw(b"kgd1 services").u32(order.len());
    for (s, keys) in order {
        w.uuid(&s.id)
            .bytes(s.name.as_bytes())
            .bytes(s.auth_header.as_bytes())
            .bytes(s.auth_value_template.as_bytes())
            .u32(s.models.len());
        for m in &s.models {
            w.bytes(m.as_bytes());
        }
        w.i64(s.model_source.code()).u32(keys.len());
        for k in keys.iter() {
            w.uuid(&k.id)
                .bytes(k.name.as_bytes())
                .bytes(k.header_value.expose().as_bytes());
        }
    }
    ContentDigest::of(key.hash(&buf))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;
    use uuid::Uuid;

    use super::*;
    use crate::crypto::{Keys, MasterKey, Secret};
    use crate::domain::{ModelSource, Timestamp};
    use crate::snapshot::fixtures::{key_entry, synthetic_update};
    use crate::snapshot::{ConsumerRecord, ModelKeyRecord, ModelRule, ScopeList, Snapshot, Update};

    fn keys() -> Keys {
        MasterKey::from_bytes([3; 32]).keys()
    }

    fn hash(n: u8) -> KeyHash {
        Sha256::digest([n, 0xd1]).into()
    }

    fn service(keys: &Keys, value: &str) -> ServiceRecord {
        let id = Uuid::from_u128(0x51);
        ServiceRecord {
            id: Uuid::from_u128(2),
            name: "openai".into(),
            auth_header: "authorization".into(),
            auth_value_template: "Bearer {key}".into(),
            model_keys: vec![ModelKeyRecord {
                id,
                name: "primary".into(),
                ciphertext: keys
                    .cipher
                    .encrypt(&id.to_string(), &Secret::new(value.into())),
            }],
            models: vec!["gpt-4o*".into()],
            model_source: ModelSource::Path,
        }
    }

    /// A snapshot using every field a record has.
    fn rich(keys: &Keys) -> Update {
        let mut u = synthetic_update(4);
        let scope = ScopeSet::Only(Arc::new(ScopeList {
            services: vec![Uuid::from_u128(2)].into(),
            models: vec![ModelRule {
                service: Uuid::from_u128(2),
                pattern: "claude-*".into(),
            }]
            .into(),
        }));
        u.keys[0].1.scope = scope.clone();
        u.keys[1].1.ip_allowlist = vec!["10.0.0.0/8".parse().unwrap()].into();
        u.keys[2].1.expire_time = Some(Timestamp(1_900_000_000_000_000));
        u.keys[3].1.enabled = false;
        u.consumers[0].scope = scope;
        u.services = Some(vec![service(keys, "sk-proj-digest-0001")]);
        u.model_key_count = 1;
        u
    }

    /// The v1 encoding is a contract between control and data planes of different builds:
    /// this digest of a fixed snapshot must never change (a new field goes into a v2).
    #[test]
    fn digest_v1_is_frozen() {
        let keys = keys();
        let snap = Snapshot::from_full(rich(&keys), &keys).unwrap();
        assert_eq!(
            hex::encode(snap.digest().to_bytes()),
            "78c9b37a42750629751f578753cc8389fdad013e336cd1654105d1cde4049b08"
        );
        assert_eq!(
            ContentDigest::from_bytes(&snap.digest().to_bytes()),
            Some(snap.digest())
        );
        assert_eq!(Snapshot::empty("s", 0).digest(), ContentDigest::default());
    }

    /// Every field of every record is in the digest; a model key's ciphertext is not (its
    /// value is: a secret reference re-encrypted by another replica digests the same).
    #[test]
    fn every_field_changes_the_digest_and_a_new_ciphertext_does_not() {
        let keys = keys();
        let digest = |u: Update| Snapshot::from_full(u, &keys).unwrap().digest();
        let base = digest(rich(&keys));
        type Change<'a> = (&'a str, Box<dyn Fn(&mut Update) + 'a>);
        let changes: Vec<Change> = vec![
            ("key hash", Box::new(|u| u.keys[0].0[31] ^= 1)),
            ("key id", Box::new(|u| u.keys[0].1.id = Uuid::from_u128(9))),
            ("key consumer", Box::new(|u| u.keys[0].1.consumer = None)),
            ("key enabled", Box::new(|u| u.keys[3].1.enabled = true)),
            ("key expiry", Box::new(|u| u.keys[2].1.expire_time = None)),
            ("key name", Box::new(|u| u.keys[0].1.name = "other".into())),
            (
                "key previous value",
                Box::new(|u| {
                    u.keys[0].1.previous = Some(crate::snapshot::PreviousHash {
                        hash: [5; 32],
                        until: Timestamp(1_900_000_000_000_000),
                    })
                }),
            ),
            ("key scope", Box::new(|u| u.keys[0].1.scope = ScopeSet::All)),
            (
                "key allowlist",
                Box::new(|u| u.keys[1].1.ip_allowlist = Box::new([])),
            ),
            (
                "consumer name",
                Box::new(|u| u.consumers[0].name = "x".into()),
            ),
            (
                "consumer scope",
                Box::new(|u| u.consumers[0].scope = ScopeSet::All),
            ),
            (
                "service models",
                Box::new(|u| u.services.as_mut().unwrap()[0].models.clear()),
            ),
            (
                "service source",
                Box::new(|u| u.services.as_mut().unwrap()[0].model_source = ModelSource::Body),
            ),
            (
                "service template",
                Box::new(|u| u.services.as_mut().unwrap()[0].auth_value_template = "{key}".into()),
            ),
            (
                "model key value",
                Box::new(|u| u.services = Some(vec![service(&keys, "sk-proj-digest-0002")])),
            ),
            ("a key less", Box::new(|u| drop(u.keys.pop()))),
            (
                "key requests per minute",
                Box::new(|u| u.keys[0].1.limits.requests_per_minute = Some(60)),
            ),
            (
                "key tokens per minute",
                Box::new(|u| u.keys[0].1.limits.tokens_per_minute = Some(60)),
            ),
            (
                "consumer requests per minute",
                Box::new(|u| u.consumers[0].limits.requests_per_minute = Some(60)),
            ),
            (
                "consumer tokens per minute",
                Box::new(|u| u.consumers[0].limits.tokens_per_minute = Some(60)),
            ),
            (
                "key budget exhausted",
                Box::new(|u| u.keys[0].1.limits.exhausted_until = Some(Timestamp(1))),
            ),
            (
                "consumer budget exhausted",
                Box::new(|u| u.consumers[0].limits.exhausted_until = Some(Timestamp(i64::MAX))),
            ),
        ];
        for (what, change) in changes {
            let mut u = rich(&keys);
            change(&mut u);
            assert_ne!(digest(u), base, "{what}");
        }
        let mut u = rich(&keys);
        u.services = Some(vec![service(&keys, "sk-proj-digest-0001")]);
        assert_eq!(digest(u), base, "the same value under a new ciphertext");
    }

    /// Limits are a suffix of their record, pinned like v1: each limit and its value count,
    /// and which of the two a number limits.
    #[test]
    fn limits_digest_frozen_and_apart() {
        let keys = keys();
        let digest = |u: Update| Snapshot::from_full(u, &keys).unwrap().digest();
        let with = |rpm: Option<u32>, tpm: Option<u64>, consumer: bool| {
            let mut u = rich(&keys);
            let l = EntryLimits {
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
                exhausted_until: None,
            };
            if consumer {
                u.consumers[0].limits = l;
            } else {
                u.keys[1].1.limits = l;
            }
            digest(u)
        };
        assert_eq!(
            hex::encode(with(Some(600), Some(90_000), false).to_bytes()),
            "fd6c536ec68ea9e091efde1b50e19213f78e7d2cbe32f14f8481569d3b42f509"
        );
        let all = [
            with(None, None, false),
            with(Some(5), None, false),
            with(None, Some(5), false),
            with(Some(5), Some(5), false),
            with(Some(6), Some(5), false),
            with(Some(5), None, true),
            with(None, Some(5), true),
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(all[0], digest(rich(&keys)), "no limit: the v1 record");
    }

    proptest! {
        /// Whatever increments lead to a state, its digest is the one a full build of that
        /// state has (what the control plane computes, or a data plane loading its cache).
        #[test]
        fn incremental_digests_equal_a_full_build(
            ops in proptest::collection::vec((0u8..6, 0u8..12, any::<bool>()), 1..40),
        ) {
            let keys = keys();
            let mut snap = Snapshot::from_full(rich(&keys), &keys).unwrap();
            for chunk in ops.chunks(3) {
                let mut u = Update {
                    store_id: snap.store_id.clone(),
                    version: snap.version + 1,
                    model_key_count: 1,
                    ..Default::default()
                };
                for &(op, n, flag) in chunk {
                    match op {
                        0 => {
                            let mut e = key_entry(Uuid::from_u128(n.into()), None, format!("k{n}"));
                            e.enabled = flag;
                            e.limits.tokens_per_minute = flag.then_some(u64::from(n) + 1);
                            u.keys.push((hash(n), e));
                        }
                        1 => u.removed_keys.push(hash(n)),
                        2 => u.consumers.push(ConsumerRecord {
                            id: Uuid::from_u128(n.into()),
                            name: format!("c{n}{flag}"),
                            scope: ScopeSet::All,
                            limits: EntryLimits {
                                requests_per_minute: (!flag).then_some(u32::from(n) + 1),
                                tokens_per_minute: None,
                                exhausted_until: flag.then_some(Timestamp(i64::from(n))),
                            },
                        }),
                        3 => u.removed_consumers.push(Uuid::from_u128(n.into())),
                        4 => {
                            let value = if flag { "sk-proj-digest-0001" } else { "sk-proj-digest-0003" };
                            u.services = Some(vec![service(&keys, value)]);
                        }
                        _ => {
                            // A synthetic key changed, or removed.
                            let (h, mut e) = rich(&keys).keys[usize::from(n % 4)].clone();
                            if flag {
                                e.name = format!("renamed{n}").into();
                                u.keys.push((h, e));
                            } else {
                                u.removed_keys.push(h);
                            }
                        }
                    }
                }
                snap = snap.apply(u, &keys).unwrap();
                let rebuilt = Snapshot::from_full(snap.to_full_update(), &keys).unwrap();
                prop_assert_eq!(snap.digest(), rebuilt.digest());
                prop_assert_eq!(snap.digest(), snap.digest_from_scratch());
            }
        }
    }
}
