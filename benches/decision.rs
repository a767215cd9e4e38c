//! The ext_authz decision (SPEC §2) at 1k and 1M consumer keys: an allowed request, an
//! unknown key, and two denials of a known key (disabled; out of scope), each including the
//! HMAC of the presented key, since that is what a real check costs; `hit_spread` cycles
//! through 65,536 distinct valid keys so that, at 1M keys, index lookups miss the CPU caches
//! as they do under real traffic (the other cases repeat one key, a warm-cache best case).
//! Plus the HMAC alone, and model-level scope (SPEC §8.1): a key scoped to one model, decided
//! from a 10 KB JSON body whose `model` comes after its `messages` (allowed and refused), to
//! compare with `hit` (a service-wide key, decided from headers alone) in the same run.
//!
//! Budgets and rate limits (SPEC §8.3), group `limits` at 1M keys: the whole admission a data
//! plane runs (`decide`, then `Outcome::rate_limited`) for a key without limits (one branch),
//! a key and consumer with requests- and tokens-per-minute limits (the rate limiter's buckets),
//! a spent budget (429), and 65,536 distinct keys in turn with and without limits (cold caches,
//! a bucket per key).
//!
//! `cargo bench --bench decision -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use uuid::Uuid;

use keygate::authz::decision::Body;
use keygate::authz::outcome::Outcome;
use keygate::authz::ratelimit::RateLimiter;
use keygate::authz::{Decision, DecisionConfig, RequestView, decide};
use keygate::crypto::{KeyHasher, Keys, MasterKey, Secret};
use keygate::domain::Timestamp;
use keygate::snapshot::fixtures::key_entry;
use keygate::snapshot::{
    ConsumerRecord, EntryLimits, KeyEntry, ModelKeyRecord, ModelRule, ScopeList, ScopeSet,
    ServiceRecord, Snapshot, Update,
};

/// Presented keys (46 characters, like generated `kg-` keys).
const HIT: &str = "kg-benchHITxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
const DISABLED: &str = "kg-benchDISABLEDxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
const SCOPED: &str = "kg-benchSCOPEDxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
const UNKNOWN: &str = "kg-benchUNKNOWNxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
/// Scoped to `openai-prod/gpt-4o-mini` only.
const MODEL_SCOPED: &str = "kg-benchMODELxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
/// Requests and tokens per minute on the key and its consumer (never reached in a run).
const LIMITED: &str = "kg-benchLIMITEDxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
/// Its budget is spent until far in the future.
const SPENT: &str = "kg-benchSPENTxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

const SERVICE: &str = "openai-prod";
/// How many distinct valid keys `hit_spread` cycles through (cold index lookups at 1M).
const SPREAD: usize = 65_536;
const CONSUMERS: u128 = 1_000;
/// Consumers from this index on have rate limits (the limited keys' consumers).
const LIMITED_CONSUMERS: u128 = 500;

/// Limits no benchmark run reaches: every admission goes through the buckets and admits.
fn per_minute() -> EntryLimits {
    EntryLimits {
        requests_per_minute: Some(u32::MAX),
        tokens_per_minute: Some(1_000_000_000_000),
        exhausted_until: None,
    }
}

/// A request as the ext_authz adapter presents it: a few headers, the peer, the route.
struct Req {
    headers: Vec<(&'static str, String)>,
    peer: IpAddr,
    /// The body, when the data plane has read it.
    body: Option<Vec<u8>>,
}

impl RequestView for Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
    fn query(&self) -> &str {
        ""
    }
    fn peer_ip(&self) -> Option<IpAddr> {
        Some(self.peer)
    }
    fn model_service(&self) -> Option<&str> {
        Some(SERVICE)
    }
    fn body(&self) -> Body<'_> {
        match &self.body {
            Some(b) => Body::Complete(b),
            None => Body::Unread,
        }
    }
}

/// A chat-completions body of about 10 KB whose `model` follows the `messages` (the scanner
/// reads all of it).
fn body_10kb(model: &str) -> Vec<u8> {
    let turn = r#"{"role":"user","content":"Summarise the quarterly report in three bullet points, with figures where the report gives them."}"#;
    let mut turns = vec![turn; 80].join(",");
    turns.truncate(turns.rfind("},").map_or(turns.len(), |i| i + 1));
    let body =
        format!(r#"{{"messages":[{turns}],"temperature":0.2,"stream":true,"model":"{model}"}}"#);
    assert!((9_000..11_000).contains(&body.len()), "{}", body.len());
    body.into_bytes()
}

fn req(key: &str) -> Req {
    Req {
        headers: vec![
            ("authorization", format!("Bearer {key}")),
            ("content-type", "application/json".into()),
            ("user-agent", "bench/1.0".into()),
            (
                "x-request-id",
                "0b7e5a4c-1f64-4a53-9d5e-3c2f0e6f8a11".into(),
            ),
        ],
        peer: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
        body: None,
    }
}

/// SplitMix64: fast, deterministic filler hashes (uniform, like real HMAC outputs).
fn filler_hash(state: &mut u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    for chunk in out.chunks_exact_mut(8) {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out
}

struct Fixture {
    keys: Keys,
    snap: Snapshot,
    /// How many `spread_key`s the snapshot holds.
    spread: usize,
}

/// A key without limits, of a consumer without limits.
fn record(hash: [u8; 32], n: u128) -> ([u8; 32], KeyEntry) {
    let entry = key_entry(
        Uuid::from_u128(0x1_0000_0000 + n),
        Some(Uuid::from_u128(0x1000 + n % LIMITED_CONSUMERS)),
        format!("key-{n}"),
    );
    (hash, entry)
}

/// A key with rate limits, of a consumer with rate limits.
fn limited_record(hash: [u8; 32], n: u128) -> ([u8; 32], KeyEntry) {
    let consumer = LIMITED_CONSUMERS + n % (CONSUMERS - LIMITED_CONSUMERS);
    let mut entry = key_entry(
        Uuid::from_u128(0x1_0000_0000 + n),
        Some(Uuid::from_u128(0x1000 + consumer)),
        format!("key-{n}"),
    );
    entry.limits = per_minute();
    (hash, entry)
}

/// The i-th valid key with limits (46 characters).
fn limited_spread_key(i: usize) -> String {
    format!("kg-benchL-{i:036}")
}

/// The i-th valid key of the `hit_spread` set (46 characters).
fn spread_key(i: usize) -> String {
    format!("kg-bench-{i:037}")
}

/// A snapshot with `n` consumer keys: three fixed real ones (hit, disabled, out of scope), up
/// to `SPREAD` more real ones (`spread_key`), the rest filler hashes no presented key matches.
fn build(n: usize, keys: Keys) -> Fixture {
    let service_id = Uuid::from_u128(1);
    let other_service = Uuid::from_u128(2);
    let mk = |id: u128, value: &str| ModelKeyRecord {
        id: Uuid::from_u128(id),
        name: format!("mk-{id}"),
        ciphertext: keys
            .cipher
            .encrypt(&Uuid::from_u128(id).to_string(), &Secret::new(value.into())),
    };
    let services = vec![
        ServiceRecord {
            id: service_id,
            name: SERVICE.into(),
            auth_header: "authorization".into(),
            auth_value_template: "Bearer {key}".into(),
            model_keys: vec![
                mk(0x10, "sk-bench-0000000000000000000000000000"),
                mk(0x11, "sk-bench-1111111111111111111111111111"),
            ],
            models: vec![],
            model_source: Default::default(),
        },
        ServiceRecord {
            id: other_service,
            name: "anthropic".into(),
            auth_header: "x-api-key".into(),
            auth_value_template: "{key}".into(),
            model_keys: vec![mk(0x12, "sk-ant-bench-2222222222222222222222")],
            models: vec![],
            model_source: Default::default(),
        },
    ];
    let consumers = (0..CONSUMERS)
        .map(|i| ConsumerRecord {
            id: Uuid::from_u128(0x1000 + i),
            name: format!("consumer-{i}"),
            scope: ScopeSet::All,
            limits: if i >= LIMITED_CONSUMERS {
                per_minute()
            } else {
                Default::default()
            },
        })
        .collect();

    let mut records = Vec::with_capacity(n);
    records.push(record(keys.hasher.hash(HIT.as_bytes()), 0));
    let mut r = record(keys.hasher.hash(DISABLED.as_bytes()), 1);
    r.1.enabled = false;
    records.push(r);
    let mut r = record(keys.hasher.hash(SCOPED.as_bytes()), 2);
    r.1.scope = ScopeSet::services(vec![other_service]);
    records.push(r);
    let mut r = record(keys.hasher.hash(MODEL_SCOPED.as_bytes()), 3);
    r.1.scope = ScopeSet::Only(Arc::new(ScopeList {
        services: Box::default(),
        models: vec![ModelRule {
            service: service_id,
            pattern: "gpt-4o-mini".into(),
        }]
        .into(),
    }));
    records.push(r);
    records.push(limited_record(keys.hasher.hash(LIMITED.as_bytes()), 4));
    let mut r = record(keys.hasher.hash(SPENT.as_bytes()), 5);
    r.1.limits.exhausted_until = Some(Timestamp(i64::MAX));
    records.push(r);
    let spread = SPREAD.min((n - records.len()) / 2);
    for i in 0..spread {
        let idx = records.len() as u128;
        records.push(record(keys.hasher.hash(spread_key(i).as_bytes()), idx));
        let idx = records.len() as u128;
        let hash = keys.hasher.hash(limited_spread_key(i).as_bytes());
        records.push(limited_record(hash, idx));
    }
    let mut state = 0x5EED_u64;
    for i in records.len()..n {
        records.push(record(filler_hash(&mut state), i as u128));
    }

    let update = Update {
        store_id: "bench".into(),
        epoch: String::new(),
        version: 1,
        full: true,
        keys: records,
        removed_keys: vec![],
        consumers,
        removed_consumers: vec![],
        services: Some(services),
        model_key_count: 3,
    };
    let snap = Snapshot::from_full(update, &keys).expect("full update applies");
    assert_eq!(snap.counts().consumer_keys, n as u64);
    Fixture { keys, snap, spread }
}

/// Both snapshots, built once per process (the 1M one takes a while).
fn fixtures() -> &'static [(&'static str, Fixture)] {
    static F: OnceLock<Vec<(&'static str, Fixture)>> = OnceLock::new();
    F.get_or_init(|| {
        let keys = MasterKey::generate().keys();
        vec![
            ("1k", build(1_000, keys.clone())),
            ("1M", build(1_000_000, keys)),
        ]
    })
}

fn bench_decide(c: &mut Criterion) {
    let cfg = DecisionConfig::default();
    let now = Timestamp::now();
    // (name, presented key, expected refusal, the body's model when the body is read)
    let cases = [
        ("hit", HIT, None, None),
        ("miss_unknown_key", UNKNOWN, Some("unknown_key"), None),
        ("denied_disabled", DISABLED, Some("disabled"), None),
        (
            "denied_out_of_scope",
            SCOPED,
            Some("model_service_not_allowed"),
            None,
        ),
        ("hit_model_10kb", MODEL_SCOPED, None, Some("gpt-4o-mini")),
        (
            "denied_model_10kb",
            MODEL_SCOPED,
            Some("model_not_allowed"),
            Some("gpt-4o"),
        ),
    ];
    let mut group = c.benchmark_group("decide");
    for (size, f) in fixtures() {
        for (name, key, expected, model) in cases {
            let mut r = req(key);
            r.body = model.map(body_10kb);
            let hasher: &KeyHasher = &f.keys.hasher;
            // The fixture decides as the benchmark expects before it is measured.
            let d = decide(&f.snap, &cfg, &r, now, |k| hasher.hash(k));
            assert_eq!(
                d.deny_reason().map(|r| r.as_str()),
                expected,
                "{name} at {size}"
            );
            group.bench_with_input(BenchmarkId::new(name, size), &r, |b, r| {
                b.iter(|| {
                    let d = decide(&f.snap, &cfg, black_box(r), now, |k| hasher.hash(k));
                    matches!(black_box(d), Decision::Allow(_))
                })
            });
        }
        // Many distinct valid keys in turn: the index lookup misses the CPU caches at 1M,
        // as under real traffic from many consumers.
        let reqs: Vec<Req> = (0..f.spread).map(|i| req(&spread_key(i))).collect();
        let hasher: &KeyHasher = &f.keys.hasher;
        for r in &reqs {
            let d = decide(&f.snap, &cfg, r, now, |k| hasher.hash(k));
            assert!(d.deny_reason().is_none(), "spread key at {size}");
        }
        group.bench_function(BenchmarkId::new("hit_spread", size), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) % reqs.len();
                let d = decide(&f.snap, &cfg, black_box(&reqs[i]), now, |k| hasher.hash(k));
                matches!(black_box(d), Decision::Allow(_))
            })
        });
    }
    group.finish();
}

/// The whole admission a data plane runs: the decision, then the rate limits.
fn admit(
    f: &Fixture,
    cfg: &DecisionConfig,
    limiter: &RateLimiter,
    r: &Req,
    now: Timestamp,
) -> bool {
    let hasher: &KeyHasher = &f.keys.hasher;
    let d = decide(&f.snap, cfg, r, now, |k| hasher.hash(k));
    let o = Outcome::of(d, cfg).rate_limited(limiter, now);
    matches!(black_box(o), Outcome::Admit(_))
}

fn bench_limits(c: &mut Criterion) {
    let cfg = DecisionConfig::default();
    let now = Timestamp::now();
    let (_, f) = fixtures()
        .iter()
        .find(|(size, _)| *size == "1M")
        .expect("1M");
    let limiter = RateLimiter::default();
    let mut group = c.benchmark_group("limits");
    for (name, key, admitted) in [
        ("hit_unlimited", HIT, true),
        ("hit_limited", LIMITED, true),
        ("denied_budget_spent", SPENT, false),
    ] {
        let r = req(key);
        assert_eq!(admit(f, &cfg, &limiter, &r, now), admitted, "{name}");
        group.bench_function(BenchmarkId::new(name, "1M"), |b| {
            b.iter(|| admit(f, &cfg, &limiter, black_box(&r), now))
        });
    }
    for (name, key) in [
        ("hit_spread_unlimited", spread_key as fn(usize) -> String),
        ("hit_spread_limited", limited_spread_key),
    ] {
        let reqs: Vec<Req> = (0..f.spread).map(|i| req(&key(i))).collect();
        for r in &reqs {
            assert!(admit(f, &cfg, &limiter, r, now), "{name}");
        }
        group.bench_function(BenchmarkId::new(name, "1M"), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) % reqs.len();
                admit(f, &cfg, &limiter, black_box(&reqs[i]), now)
            })
        });
    }
    group.finish();
}

fn bench_hmac(c: &mut Criterion) {
    let hasher = MasterKey::generate().keys().hasher;
    c.bench_function("hmac_presented_key", |b| {
        b.iter(|| hasher.hash(black_box(HIT.as_bytes())))
    });
}

criterion_group!(benches, bench_hmac, bench_decide, bench_limits);
criterion_main!(benches);
