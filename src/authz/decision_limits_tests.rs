//! Unit tests of budgets and rate limits at the decision (SPEC §8.3): a spent budget, the
//! key's or its consumer's, refuses 429 `insufficient_quota` until the instant the snapshot
//! carries and allows again from that instant with no update; rate limits turn an admission
//! into 429 `rate_limit_exceeded` with `retry-after`, and tokens charged after a response
//! refuse the next request. Time is an input (`now`).

use std::net::{IpAddr, Ipv4Addr};

use uuid::Uuid;

use super::*;
use crate::authz::outcome::{Outcome, Refusal};
use crate::authz::ratelimit::RateLimiter;
use crate::crypto::{KeyHash, Keys, MasterKey, Secret};
use crate::snapshot::{
    ConsumerRecord, EntryLimits, KeyEntry, ModelKeyRecord, ScopeSet, ServiceRecord, Update,
};

const NOW: Timestamp = Timestamp(1_764_979_200_000_000); // 2025-12-06T00:00:00Z
const DAY_US: i64 = 86_400_000_000;
const VALUE: &str = "kg-budgetTestValue-Qm7xV2pLr9T";
const OTHER: &str = "kg-budgetOtherValue-Jd3KsZ8qW";
const KEY_ID: Uuid = Uuid::from_u128(0x400);
const OTHER_ID: Uuid = Uuid::from_u128(0x401);
const CONSUMER_ID: Uuid = Uuid::from_u128(0x200);

struct Req(String);

impl RequestView for Req {
    fn header(&self, name: &str) -> Option<&str> {
        (name == "authorization").then_some(self.0.as_str())
    }
    fn query(&self) -> &str {
        ""
    }
    fn peer_ip(&self) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)))
    }
    fn model_service(&self) -> Option<&str> {
        Some("openai")
    }
}

struct World {
    keys: Keys,
}

impl World {
    fn new() -> World {
        World {
            keys: MasterKey::generate().keys(),
        }
    }

    fn hash(&self, value: &str) -> KeyHash {
        self.keys.hasher.hash(value.as_bytes())
    }

    fn entry(&self, id: Uuid, limits: EntryLimits) -> KeyEntry {
        KeyEntry {
            id,
            consumer: Some(CONSUMER_ID),
            enabled: true,
            expire_time: None,
            name: format!("key-{id}").into(),
            scope: ScopeSet::All,
            ip_allowlist: Box::new([]),
            limits,
            usage: Default::default(),
            previous: None,
        }
    }

    /// Two keys of one consumer: `VALUE` (limits `key`) and `OTHER` (none); the consumer has
    /// limits `consumer`.
    fn snapshot(&self, key: EntryLimits, consumer: EntryLimits) -> Snapshot {
        let mk = ModelKeyRecord {
            id: Uuid::from_u128(0x300),
            name: "openai-main".into(),
            ciphertext: self.keys.cipher.encrypt(
                &Uuid::from_u128(0x300).to_string(),
                &Secret::new("sk-vendor-0000111122223333".into()),
            ),
        };
        let update = Update {
            store_id: "test-store".into(),
            version: 1,
            full: true,
            keys: vec![
                (self.hash(VALUE), self.entry(KEY_ID, key)),
                (
                    self.hash(OTHER),
                    self.entry(OTHER_ID, EntryLimits::default()),
                ),
            ],
            consumers: vec![ConsumerRecord {
                id: CONSUMER_ID,
                name: "billing-app".into(),
                scope: ScopeSet::All,
                limits: consumer,
            }],
            services: Some(vec![ServiceRecord {
                id: Uuid::from_u128(0x100),
                name: "openai".into(),
                auth_header: "authorization".into(),
                auth_value_template: "Bearer {key}".into(),
                model_keys: vec![mk],
                models: vec![],
                model_source: Default::default(),
            }]),
            model_key_count: 1,
            ..Default::default()
        };
        Snapshot::from_full(update, &self.keys).unwrap()
    }

    fn decide<'s>(&self, snap: &'s Snapshot, value: &str, now: Timestamp) -> Decision<'s> {
        let req = Req(format!("Bearer {value}"));
        decide(snap, &DecisionConfig::default(), &req, now, |k| {
            self.keys.hasher.hash(k)
        })
    }

    /// The outcome with rate limits taken from `limiter`.
    fn outcome<'s>(
        &self,
        snap: &'s Snapshot,
        cfg: &'s DecisionConfig,
        limiter: &RateLimiter,
        value: &str,
        now: Timestamp,
    ) -> Outcome<'s, 's> {
        Outcome::of(self.decide(snap, value, now), cfg).rate_limited(limiter, now)
    }
}

fn exhausted(until: Timestamp) -> EntryLimits {
    EntryLimits {
        exhausted_until: Some(until),
        ..Default::default()
    }
}

fn reason(d: &Decision<'_>) -> Option<DenyReason> {
    d.deny_reason()
}

#[track_caller]
fn refusal<'a, 's>(o: &'a Outcome<'s, '_>) -> &'a Refusal<'s> {
    match o {
        Outcome::Refuse(r) => r,
        Outcome::Admit(_) => panic!("expected a refusal"),
    }
}

fn headers(r: &Refusal<'_>) -> Vec<(String, String)> {
    let mut buf = itoa::Buffer::new();
    r.extra_headers(&mut buf)
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

#[test]
fn a_spent_key_budget_refuses_429_until_the_period_end_then_allows_with_no_update() {
    let w = World::new();
    let end = Timestamp(NOW.0 + DAY_US);
    let snap = w.snapshot(exhausted(end), EntryLimits::default());
    let d = w.decide(&snap, VALUE, NOW);
    assert_eq!(reason(&d), Some(DenyReason::InsufficientQuota));
    assert_eq!(DenyReason::InsufficientQuota.http_status(), 429);
    // The refusal names the key (metadata, logs) but never a value.
    match &d {
        Decision::Deny(denied) => assert_eq!(denied.key.map(|k| k.id), Some(KEY_ID)),
        _ => unreachable!(),
    }
    // Up to the last microsecond of the period, refused; from its end, allowed: the same
    // snapshot, no control-plane action.
    assert_eq!(
        reason(&w.decide(&snap, VALUE, Timestamp(end.0 - 1))),
        Some(DenyReason::InsufficientQuota)
    );
    assert!(matches!(w.decide(&snap, VALUE, end), Decision::Allow(_)));
    // The consumer's other key is not the one out of budget.
    assert!(matches!(w.decide(&snap, OTHER, NOW), Decision::Allow(_)));
}

#[test]
fn a_spent_consumer_budget_stops_every_key_of_the_consumer() {
    let w = World::new();
    let snap = w.snapshot(EntryLimits::default(), exhausted(Timestamp(NOW.0 + DAY_US)));
    for value in [VALUE, OTHER] {
        assert_eq!(
            reason(&w.decide(&snap, value, NOW)),
            Some(DenyReason::InsufficientQuota),
            "{value}"
        );
    }
    // A TOTAL budget never re-opens by itself.
    let snap = w.snapshot(EntryLimits::default(), exhausted(Timestamp(i64::MAX)));
    assert_eq!(
        reason(&w.decide(&snap, OTHER, Timestamp(NOW.0 + 3650 * DAY_US))),
        Some(DenyReason::InsufficientQuota)
    );
}

#[test]
fn unknown_values_are_401_whatever_a_budget_says() {
    let w = World::new();
    let snap = w.snapshot(exhausted(Timestamp(NOW.0 + DAY_US)), EntryLimits::default());
    // An unknown value is 401 whatever any budget says.
    assert_eq!(
        reason(&w.decide(&snap, "kg-notAKeyAtAll-000000000000", NOW)),
        Some(DenyReason::UnknownKey)
    );
}

#[test]
fn the_budget_reply_tells_the_sdks_not_to_retry() {
    let w = World::new();
    let snap = w.snapshot(exhausted(Timestamp(NOW.0 + DAY_US)), EntryLimits::default());
    let cfg = DecisionConfig::default();
    let limiter = RateLimiter::default();
    let o = w.outcome(&snap, &cfg, &limiter, VALUE, NOW);
    let r = refusal(&o);
    assert_eq!((r.status(), r.reason), (429, DenyReason::InsufficientQuota));
    assert_eq!(
        headers(r),
        vec![("x-should-retry".to_string(), "false".to_string())]
    );
    let body: serde_json::Value = serde_json::from_str(r.body()).unwrap();
    assert_eq!(body["error"]["type"], "insufficient_quota");
    assert_eq!(body["error"]["code"], "insufficient_quota");
}

#[test]
fn requests_per_minute_admit_a_minutes_burst_then_refuse_with_retry_after() {
    let w = World::new();
    let rpm = EntryLimits {
        requests_per_minute: Some(3),
        ..Default::default()
    };
    let snap = w.snapshot(rpm, EntryLimits::default());
    let cfg = DecisionConfig::default();
    let limiter = RateLimiter::default();
    for i in 0..3 {
        assert!(
            matches!(
                w.outcome(&snap, &cfg, &limiter, VALUE, NOW),
                Outcome::Admit(_)
            ),
            "request {i} of the burst"
        );
    }
    let o = w.outcome(&snap, &cfg, &limiter, VALUE, NOW);
    let r = refusal(&o);
    assert_eq!(
        (r.status(), r.reason),
        (429, DenyReason::RequestRateLimited)
    );
    assert_eq!(r.key.map(|k| k.id), Some(KEY_ID));
    // 3 a minute: one request back every 20 s.
    assert_eq!(
        headers(r),
        vec![("retry-after".to_string(), "20".to_string())]
    );
    let body: serde_json::Value = serde_json::from_str(r.body()).unwrap();
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    // The other key of the consumer has no limit of its own and the consumer none.
    assert!(matches!(
        w.outcome(&snap, &cfg, &limiter, OTHER, NOW),
        Outcome::Admit(_)
    ));
    // 20 s later, one more.
    let later = Timestamp(NOW.0 + 20_000_000);
    assert!(matches!(
        w.outcome(&snap, &cfg, &limiter, VALUE, later),
        Outcome::Admit(_)
    ));
    assert!(matches!(
        w.outcome(&snap, &cfg, &limiter, VALUE, later),
        Outcome::Refuse(_)
    ));
}

#[test]
fn a_consumer_rate_limit_counts_every_key_and_a_refusal_takes_nothing() {
    let w = World::new();
    let consumer = EntryLimits {
        requests_per_minute: Some(2),
        ..Default::default()
    };
    let snap = w.snapshot(EntryLimits::default(), consumer);
    let cfg = DecisionConfig::default();
    let limiter = RateLimiter::default();
    assert!(matches!(
        w.outcome(&snap, &cfg, &limiter, VALUE, NOW),
        Outcome::Admit(_)
    ));
    assert!(matches!(
        w.outcome(&snap, &cfg, &limiter, OTHER, NOW),
        Outcome::Admit(_)
    ));
    for value in [VALUE, OTHER] {
        let o = w.outcome(&snap, &cfg, &limiter, value, NOW);
        assert_eq!(refusal(&o).reason, DenyReason::RequestRateLimited);
    }
    // Refused requests took nothing: 30 s refill one request (2 a minute), and one only.
    let later = Timestamp(NOW.0 + 30_000_000);
    assert!(matches!(
        w.outcome(&snap, &cfg, &limiter, OTHER, later),
        Outcome::Admit(_)
    ));
    assert!(matches!(
        w.outcome(&snap, &cfg, &limiter, VALUE, later),
        Outcome::Refuse(_)
    ));
}

#[test]
fn tokens_charged_after_a_response_refuse_the_next_request_until_refilled() {
    let w = World::new();
    let tpm = EntryLimits {
        tokens_per_minute: Some(600),
        ..Default::default()
    };
    let snap = w.snapshot(tpm, EntryLimits::default());
    let cfg = DecisionConfig::default();
    let limiter = RateLimiter::default();
    // Admitted while the allowance is not negative, whatever the answer will cost.
    assert!(matches!(
        w.outcome(&snap, &cfg, &limiter, VALUE, NOW),
        Outcome::Admit(_)
    ));
    assert!(matches!(
        w.outcome(&snap, &cfg, &limiter, VALUE, NOW),
        Outcome::Admit(_)
    ));
    // The two answers come back with 1,200 tokens between them: 600 in debt.
    limiter.charge_admitted(KEY_ID, Some(CONSUMER_ID), 500, NOW.0);
    limiter.charge_admitted(KEY_ID, Some(CONSUMER_ID), 700, NOW.0);
    let o = w.outcome(&snap, &cfg, &limiter, VALUE, NOW);
    let r = refusal(&o);
    assert_eq!((r.status(), r.reason), (429, DenyReason::TokenRateLimited));
    // 600 tokens of debt at 600 a minute: back to zero in 60 s.
    assert_eq!(
        headers(r),
        vec![("retry-after".to_string(), "60".to_string())]
    );
    let body: serde_json::Value = serde_json::from_str(r.body()).unwrap();
    assert_eq!(body["error"]["type"], "tokens");
    assert!(matches!(
        w.outcome(&snap, &cfg, &limiter, VALUE, Timestamp(NOW.0 + 59_999_999)),
        Outcome::Refuse(_)
    ));
    assert!(matches!(
        w.outcome(&snap, &cfg, &limiter, VALUE, Timestamp(NOW.0 + 60_000_000)),
        Outcome::Admit(_)
    ));
}
