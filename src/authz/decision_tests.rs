//! Unit tests of the decision (every branch of SPEC §2).
//!
//! The snapshot is built through the public update path (`Snapshot::from_full` over key
//! entries, `ConsumerRecord`s and `ServiceRecord`s), with model keys encrypted exactly as the
//! store distributes them, so these tests exercise what a data plane really decides from.

use super::*;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use ipnet::IpNet;
use proptest::prelude::*;
use uuid::Uuid;

use crate::crypto::{Keys, MasterKey, Secret};
use crate::snapshot::{ConsumerRecord, ModelKeyRecord, ScopeSet, ServiceRecord, Update};

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

/// The decision time used throughout (an arbitrary instant, in µs since the epoch).
const NOW: Timestamp = Timestamp(1_700_000_000_000_000);

// Consumer key values (visible ASCII, 16+ characters, random-looking so that no fragment of
// them appears by accident in a response body).
const GOOD: &str = "kg-Qm7xV2pLr9TzW4nB8cYh";
const DISABLED: &str = "kg-Jd3KsZ8qWv1MxP6rTgNf";
const EXPIRING: &str = "kg-Hb5NcR2yLq7VzX9mWkDs";
const UNBOUND: &str = "kg-Pf4GtY7wQs2KxM8vZrBj";
const DANGLING: &str = "kg-Wn6DzL3hVq9TcR1xKpMy";
const IP_V4: &str = "kg-Rc8MvT1zNq5XwB7kLhPd";
const IP_V6: &str = "kg-Ty2BqW9kMz4RxV6nDcLs";
const KEY_SCOPED: &str = "kg-Lx9PwN4vKr2ZqT7mBcHy";
const CONSUMER_SCOPED: &str = "kg-Zv1RmK8tWq3NyX5pDhLc";
const BOTH_SCOPED: &str = "kg-Mq4TzX7bVn2KwR9yLpHd";
/// Allowlisted for one host written the way a dual-stack Envoy reports it (`::ffff:a.b.c.d`).
const IP_MAPPED: &str = "kg-Vd5XkQ1nRz8WmT3yBcGp";
/// A well-formed value that is in no snapshot.
const UNKNOWN: &str = "kg-Bn8WqZ3xTm6RvK1yPcLj";

const ALL_CONSUMER_KEYS: [&str; 11] = [
    GOOD,
    DISABLED,
    EXPIRING,
    UNBOUND,
    DANGLING,
    IP_V4,
    IP_V6,
    KEY_SCOPED,
    CONSUMER_SCOPED,
    BOTH_SCOPED,
    IP_MAPPED,
];

// Model key plaintexts (vendor keys: must never leave the snapshot except as the header value).
const MK_OPENAI_1: &str = "sk-openai-AAAA1111bbbb2222cccc";
const MK_OPENAI_2: &str = "sk-openai-DDDD3333eeee4444ffff";
const MK_ANTHROPIC: &str = "sk-ant-GGGG5555hhhh6666iiii";
const MK_AZURE: &str = "az-JJJJ7777kkkk8888llll";
const ALL_MODEL_KEYS: [&str; 4] = [MK_OPENAI_1, MK_OPENAI_2, MK_ANTHROPIC, MK_AZURE];

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

// Service ids.
const S_OPENAI: u128 = 0x100;
const S_ANTHROPIC: u128 = 0x101;
const S_AZURE: u128 = 0x102;
const S_EMPTY: u128 = 0x103;
// Consumer ids.
const C_ALL: u128 = 0x200;
const C_OPENAI_ONLY: u128 = 0x201;
const C_OPENAI_AZURE: u128 = 0x202;
const C_MISSING: u128 = 0x2ff;
// Model key ids.
const MK_OPENAI_1_ID: u128 = 0x300;
const MK_OPENAI_2_ID: u128 = 0x301;
const MK_ANTHROPIC_ID: u128 = 0x302;
const MK_AZURE_ID: u128 = 0x303;

struct World {
    keys: Keys,
    snap: Snapshot,
    /// Consumer key value → its record id.
    key_ids: HashMap<&'static str, Uuid>,
}

impl World {
    fn hash(&self, k: &[u8]) -> [u8; 32] {
        self.keys.hasher.hash(k)
    }

    fn decide_at<'s>(&'s self, cfg: &DecisionConfig, req: &Req, now: Timestamp) -> Decision<'s> {
        decide(&self.snap, cfg, req, now, |k| self.hash(k))
    }

    fn decide<'s>(&'s self, req: &Req) -> Decision<'s> {
        self.decide_at(&DecisionConfig::default(), req, NOW)
    }

    fn key_id(&self, value: &str) -> Uuid {
        self.key_ids[value]
    }
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn build_world() -> World {
    let keys = MasterKey::generate().keys();

    let mk = |n: u128, name: &str, value: &str| ModelKeyRecord {
        id: id(n),
        name: name.into(),
        ciphertext: keys
            .cipher
            .encrypt(&id(n).to_string(), &Secret::new(value.into())),
    };
    let services = vec![
        ServiceRecord {
            id: id(S_OPENAI),
            name: "openai-prod".into(),
            auth_header: "authorization".into(),
            auth_value_template: "Bearer {key}".into(),
            model_keys: vec![
                mk(MK_OPENAI_1_ID, "openai-key-1", MK_OPENAI_1),
                mk(MK_OPENAI_2_ID, "openai-key-2", MK_OPENAI_2),
            ],
            models: vec![],
            model_source: Default::default(),
        },
        ServiceRecord {
            id: id(S_ANTHROPIC),
            name: "anthropic".into(),
            auth_header: "x-api-key".into(),
            auth_value_template: "{key}".into(),
            model_keys: vec![mk(MK_ANTHROPIC_ID, "anthropic-key", MK_ANTHROPIC)],
            models: vec![],
            model_source: Default::default(),
        },
        ServiceRecord {
            id: id(S_AZURE),
            name: "azure".into(),
            auth_header: "api-key".into(),
            auth_value_template: "{key}".into(),
            model_keys: vec![mk(MK_AZURE_ID, "azure-key", MK_AZURE)],
            models: vec![],
            model_source: Default::default(),
        },
        ServiceRecord {
            id: id(S_EMPTY),
            name: "no-keys".into(),
            auth_header: "authorization".into(),
            auth_value_template: "Bearer {key}".into(),
            model_keys: vec![],
            models: vec![],
            model_source: Default::default(),
        },
    ];
    let consumers = vec![
        ConsumerRecord {
            id: id(C_ALL),
            name: "billing-app".into(),
            scope: ScopeSet::All,
            limits: Default::default(),
        },
        ConsumerRecord {
            id: id(C_OPENAI_ONLY),
            name: "openai-only-app".into(),
            scope: ScopeSet::services(vec![id(S_OPENAI)]),
            limits: Default::default(),
        },
        ConsumerRecord {
            id: id(C_OPENAI_AZURE),
            name: "openai-azure-app".into(),
            scope: ScopeSet::services(vec![id(S_OPENAI), id(S_AZURE)]),
            limits: Default::default(),
        },
    ];

    let mut key_ids = HashMap::new();
    let mut records = Vec::new();
    let mut add = |n: u128, value: &'static str, f: &dyn Fn(&mut KeyEntry)| {
        let mut e = KeyEntry {
            id: id(0x400 + n),
            consumer: Some(id(C_ALL)),
            enabled: true,
            expire_time: None,
            name: format!("key-{n}").into(),
            scope: ScopeSet::All,
            ip_allowlist: Box::new([]),
            limits: Default::default(),
            usage: Default::default(),
            previous: None,
        };
        f(&mut e);
        key_ids.insert(value, e.id);
        records.push((keys.hasher.hash(value.as_bytes()), e));
    };
    add(0, GOOD, &|_| {});
    add(1, DISABLED, &|r| r.enabled = false);
    add(2, EXPIRING, &|r| r.expire_time = Some(NOW));
    add(3, UNBOUND, &|r| r.consumer = None);
    add(4, DANGLING, &|r| r.consumer = Some(id(C_MISSING)));
    add(5, IP_V4, &|r| {
        r.ip_allowlist = nets(&["10.0.0.0/8", "192.168.1.5/32"]).into();
    });
    add(6, IP_V6, &|r| {
        r.ip_allowlist = nets(&["2001:db8::/32"]).into()
    });
    add(7, KEY_SCOPED, &|r| {
        r.scope = ScopeSet::services(vec![id(S_ANTHROPIC)])
    });
    add(8, CONSUMER_SCOPED, &|r| {
        r.consumer = Some(id(C_OPENAI_ONLY))
    });
    add(9, BOTH_SCOPED, &|r| {
        r.consumer = Some(id(C_OPENAI_AZURE));
        r.scope = ScopeSet::services(vec![id(S_OPENAI), id(S_ANTHROPIC)]);
    });
    add(10, IP_MAPPED, &|r| {
        // Parsed exactly as the snapshot builder parses stored allowlist entries.
        r.ip_allowlist =
            vec![crate::domain::validate::ip_entry("ip_allowlist", "::ffff:10.1.2.3").unwrap()]
                .into();
    });

    let update = Update {
        store_id: "test-store".into(),
        epoch: String::new(),
        version: 7,
        full: true,
        keys: records,
        removed_keys: vec![],
        consumers,
        removed_consumers: vec![],
        services: Some(services),
        model_key_count: 4,
    };
    let snap = Snapshot::from_full(update, &keys).expect("a well-formed full update applies");
    World {
        keys,
        snap,
        key_ids,
    }
}

/// One world per test process: building is cheap, but proptests decide thousands of times.
/// Rotation tests build their own so that their counters start fresh.
static WORLD: LazyLock<World> = LazyLock::new(build_world);

/// A minimal request for the decision.
#[derive(Clone, Debug, Default)]
struct Req {
    headers: HashMap<String, String>,
    query: String,
    peer: Option<IpAddr>,
    service: Option<String>,
}

impl Req {
    /// A request routed to `openai-prod` from 10.1.2.3 with no credential.
    fn new() -> Self {
        Req {
            peer: Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))),
            service: Some("openai-prod".into()),
            ..Default::default()
        }
    }
    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
    fn bearer(self, key: &str) -> Self {
        self.header("authorization", &format!("Bearer {key}"))
    }
    fn query(mut self, q: &str) -> Self {
        self.query = q.into();
        self
    }
    fn peer(mut self, ip: &str) -> Self {
        self.peer = Some(ip.parse().unwrap());
        self
    }
    fn no_peer(mut self) -> Self {
        self.peer = None;
        self
    }
    fn service(mut self, s: &str) -> Self {
        self.service = Some(s.into());
        self
    }
    fn no_service(mut self) -> Self {
        self.service = None;
        self
    }
}

impl RequestView for Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
    fn query(&self) -> &str {
        &self.query
    }
    fn peer_ip(&self) -> Option<IpAddr> {
        self.peer
    }
    fn model_service(&self) -> Option<&str> {
        self.service.as_deref()
    }
}

fn with_query_param(p: &str) -> DecisionConfig {
    DecisionConfig {
        credential_query_param: Some(p.into()),
        ..Default::default()
    }
}

fn xff(n: usize) -> DecisionConfig {
    DecisionConfig {
        client_ip: ClientIpSource::ForwardedFor(n),
        ..Default::default()
    }
}

#[track_caller]
fn allowed<'a, 's>(d: &'a Decision<'s>) -> &'a Allowed<'s> {
    match d {
        Decision::Allow(a) => a,
        Decision::Deny(d) => panic!("expected allow, got deny {:?}", d.reason),
        Decision::NeedBody => panic!("expected allow, got need-body"),
    }
}

#[track_caller]
fn denied<'a, 's>(d: &'a Decision<'s>) -> &'a Denied<'s> {
    match d {
        Decision::Deny(d) => d,
        Decision::Allow(a) => panic!(
            "expected deny, got allow (key {}, service {})",
            a.key.name, a.service.name
        ),
        Decision::NeedBody => panic!("expected deny, got need-body"),
    }
}

#[track_caller]
fn assert_deny(d: &Decision<'_>, reason: DenyReason) {
    assert_eq!(denied(d).reason, reason);
}

/// Every fragment of `key` at least 5 characters long.
fn fragments(key: &str) -> impl Iterator<Item = &str> {
    (0..key.len().saturating_sub(4)).map(move |i| &key[i..i + 5])
}

// ---------------------------------------------------------------------------------------------
// Step 1: the credential
// ---------------------------------------------------------------------------------------------

#[test]
fn no_credential_is_missing_credential_401() {
    let w = &*WORLD;
    let cases = [
        Req::new(),
        Req::new().header("authorization", "Basic dXNlcjpwYXNzd29yZA=="),
        Req::new().header("authorization", "Bearer "),
        Req::new().header("authorization", "Bearer    "),
        Req::new().header("authorization", "Bearer"),
        Req::new().header("authorization", ""),
        Req::new().header("authorization", GOOD), // no scheme: not a bearer credential
        Req::new().header("x-api-key", ""),
        Req::new().header("x-api-key", "   "),
        Req::new().header("api-key", ""),
        // The query parameter is off by default: a key there is not read.
        Req::new().query(&format!("key={GOOD}")),
        // Some other header carrying a valid key is not a credential source.
        Req::new().header("x-auth-token", GOOD),
    ];
    for req in cases {
        let d = w.decide(&req);
        let den = denied(&d);
        assert_eq!(den.reason, DenyReason::MissingCredential, "{req:?}");
        assert!(den.key.is_none());
        assert_eq!(den.reason.http_status(), 401);
        assert!(
            extract_credential(&DecisionConfig::default(), &req).is_none(),
            "{req:?}"
        );
    }
}

#[test]
fn each_credential_form_is_accepted() {
    let w = &*WORLD;
    let cases: Vec<(DecisionConfig, Req, CredentialSource<'static>)> = vec![
        (
            DecisionConfig::default(),
            Req::new().bearer(GOOD),
            CredentialSource::Header("authorization"),
        ),
        (
            DecisionConfig::default(),
            Req::new().header("authorization", &format!("bearer {GOOD}")),
            CredentialSource::Header("authorization"),
        ),
        (
            DecisionConfig::default(),
            Req::new().header("authorization", &format!("BEARER   {GOOD}  ")),
            CredentialSource::Header("authorization"),
        ),
        (
            DecisionConfig::default(),
            Req::new().header("x-api-key", GOOD),
            CredentialSource::Header("x-api-key"),
        ),
        (
            DecisionConfig::default(),
            Req::new().header("x-api-key", &format!(" {GOOD} ")),
            CredentialSource::Header("x-api-key"),
        ),
        (
            DecisionConfig::default(),
            Req::new().header("api-key", GOOD),
            CredentialSource::Header("api-key"),
        ),
        (
            with_query_param("key"),
            Req::new().query(&format!("key={GOOD}")),
            CredentialSource::Query("key"),
        ),
        (
            with_query_param("key"),
            Req::new().query(&format!("alt=json&key={GOOD}&x=1")),
            CredentialSource::Query("key"),
        ),
    ];
    for (cfg, req, source) in cases {
        let (cred, src) = extract_credential(&cfg, &req).expect("a credential");
        assert_eq!(cred, GOOD, "{req:?}");
        assert_eq!(src, source, "{req:?}");
        let d = w.decide_at(&cfg, &req, NOW);
        assert_eq!(allowed(&d).key.id, w.key_id(GOOD), "{req:?}");
    }
}

#[test]
fn query_param_is_percent_decoded_and_only_the_named_param_counts() {
    let w = &*WORLD;
    let cfg = with_query_param("key");
    // Percent-encoded characters of a key decode before hashing.
    let encoded = GOOD.replace('-', "%2D");
    let req = Req::new().query(&format!("key={encoded}"));
    assert_eq!(extract_credential(&cfg, &req).unwrap().0, GOOD);
    allowed(&w.decide_at(&cfg, &req, NOW));
    // A different parameter, or an empty one, is no credential.
    for q in [
        format!("api_key={GOOD}"),
        format!("keys={GOOD}"),
        "key=".to_string(),
        "key".to_string(),
        String::new(),
    ] {
        let req = Req::new().query(&q);
        assert_deny(&w.decide_at(&cfg, &req, NOW), DenyReason::MissingCredential);
    }
    // A configured parameter with another name.
    let cfg = with_query_param("api_key");
    let req = Req::new().query(&format!("api_key={GOOD}"));
    allowed(&w.decide_at(&cfg, &req, NOW));
    let req = Req::new().query(&format!("key={GOOD}"));
    assert_deny(&w.decide_at(&cfg, &req, NOW), DenyReason::MissingCredential);
}

#[test]
fn credential_precedence_is_authorization_then_x_api_key_then_api_key_then_query() {
    let w = &*WORLD;
    let cfg = with_query_param("key");
    // The first present source wins, whatever the later ones carry.
    let req = Req::new()
        .bearer(GOOD)
        .header("x-api-key", UNKNOWN)
        .header("api-key", UNKNOWN)
        .query(&format!("key={UNKNOWN}"));
    assert_eq!(
        extract_credential(&cfg, &req).unwrap().1,
        CredentialSource::Header("authorization")
    );
    allowed(&w.decide_at(&cfg, &req, NOW));

    let req = Req::new()
        .header("x-api-key", GOOD)
        .header("api-key", UNKNOWN)
        .query(&format!("key={UNKNOWN}"));
    assert_eq!(
        extract_credential(&cfg, &req).unwrap().1,
        CredentialSource::Header("x-api-key")
    );
    allowed(&w.decide_at(&cfg, &req, NOW));

    let req = Req::new()
        .header("api-key", GOOD)
        .query(&format!("key={UNKNOWN}"));
    allowed(&w.decide_at(&cfg, &req, NOW));

    // The first present credential decides: a valid key later does not rescue an unknown one.
    let req = Req::new().bearer(UNKNOWN).header("x-api-key", GOOD);
    assert_deny(&w.decide_at(&cfg, &req, NOW), DenyReason::UnknownKey);
    let req = Req::new()
        .header("x-api-key", UNKNOWN)
        .header("api-key", GOOD);
    assert_deny(&w.decide_at(&cfg, &req, NOW), DenyReason::UnknownKey);
    let req = Req::new()
        .header("api-key", UNKNOWN)
        .query(&format!("key={GOOD}"));
    assert_deny(&w.decide_at(&cfg, &req, NOW), DenyReason::UnknownKey);

    // A non-bearer `authorization` (e.g. Basic) is not a consumer credential: the next source counts.
    let req = Req::new()
        .header("authorization", "Basic dXNlcjpwYXNzd29yZA==")
        .header("x-api-key", GOOD);
    assert_eq!(
        extract_credential(&cfg, &req).unwrap().1,
        CredentialSource::Header("x-api-key")
    );
    allowed(&w.decide_at(&cfg, &req, NOW));
}

#[test]
fn configured_header_order_is_respected() {
    let w = &*WORLD;
    let cfg = DecisionConfig {
        credential_headers: vec!["api-key".into(), "authorization".into()],
        ..Default::default()
    };
    let req = Req::new().bearer(UNKNOWN).header("api-key", GOOD);
    assert_eq!(
        extract_credential(&cfg, &req).unwrap(),
        (GOOD.into(), CredentialSource::Header("api-key"))
    );
    allowed(&w.decide_at(&cfg, &req, NOW));
    // x-api-key is not configured here, so it is ignored.
    let req = Req::new().header("x-api-key", GOOD);
    assert_deny(&w.decide_at(&cfg, &req, NOW), DenyReason::MissingCredential);
}

// ---------------------------------------------------------------------------------------------
// Step 2: lookup (401s)
// ---------------------------------------------------------------------------------------------

#[test]
fn unknown_disabled_expired_unbound_are_401_with_the_reason_kept_internally() {
    let w = &*WORLD;
    let cases = [
        (UNKNOWN, DenyReason::UnknownKey, false),
        (DISABLED, DenyReason::Disabled, true),
        (EXPIRING, DenyReason::Expired, true),
        (UNBOUND, DenyReason::Unbound, true),
        // Bound to a consumer the snapshot does not hold: refused, not a panic or an allow.
        (DANGLING, DenyReason::Unbound, true),
    ];
    for (value, reason, recognised) in cases {
        let d = w.decide(&Req::new().bearer(value));
        let den = denied(&d);
        assert_eq!(den.reason, reason, "{value}");
        assert_eq!(den.reason.http_status(), 401);
        // The record is kept for logs and metadata when it exists, never for unknown keys.
        assert_eq!(den.key.map(|k| k.id), recognised.then(|| w.key_id(value)));
    }
}

#[test]
fn a_valid_key_differing_in_case_or_by_a_character_is_unknown() {
    let w = &*WORLD;
    let mut near = vec![
        GOOD.to_uppercase(),
        GOOD.to_lowercase(),
        GOOD[..GOOD.len() - 1].to_string(),
    ];
    near.push(format!("{GOOD}x"));
    for v in near {
        assert_deny(&w.decide(&Req::new().bearer(&v)), DenyReason::UnknownKey);
    }
}

#[test]
fn expiry_is_refused_from_its_instant() {
    let w = &*WORLD;
    let req = Req::new().bearer(EXPIRING);
    let cfg = DecisionConfig::default();
    // expire_time == now: expired.
    assert_deny(&w.decide_at(&cfg, &req, NOW), DenyReason::Expired);
    // Later: expired.
    assert_deny(
        &w.decide_at(&cfg, &req, Timestamp(NOW.0 + 1)),
        DenyReason::Expired,
    );
    assert_deny(
        &w.decide_at(&cfg, &req, Timestamp(NOW.0 + 86_400_000_000)),
        DenyReason::Expired,
    );
    // One microsecond before: still valid.
    let d = w.decide_at(&cfg, &req, Timestamp(NOW.0 - 1));
    assert_eq!(allowed(&d).key.id, w.key_id(EXPIRING));
}

#[test]
fn disabled_wins_over_expired_and_unbound_but_all_look_the_same_outside() {
    // A disabled key that is also expired still answers exactly like an unknown key.
    let w = &*WORLD;
    let late = Timestamp(NOW.0 + 1_000_000);
    let d = w.decide_at(
        &DecisionConfig::default(),
        &Req::new().bearer(DISABLED),
        late,
    );
    assert_eq!(denied(&d).reason.body(), DenyReason::UnknownKey.body());
    assert_eq!(denied(&d).reason.http_status(), 401);
}

#[test]
fn every_401_body_is_byte_identical_and_echoes_nothing_of_the_key() {
    let w = &*WORLD;
    let reqs = [
        Req::new(),
        Req::new().header("authorization", "Basic Zm9vOmJhcg=="),
        Req::new().bearer(UNKNOWN),
        Req::new().bearer(DISABLED),
        Req::new().bearer(EXPIRING),
        Req::new().bearer(UNBOUND),
        Req::new().bearer(DANGLING),
        Req::new().header("x-api-key", DISABLED),
        Req::new().header("api-key", UNBOUND),
    ];
    let mut bodies = HashSet::new();
    let mut statuses = HashSet::new();
    for req in &reqs {
        let d = w.decide(req);
        let reason = denied(&d).reason;
        statuses.insert(reason.http_status());
        let body = reason.body();
        bodies.insert(body);
        for value in ALL_CONSUMER_KEYS.iter().chain([&UNKNOWN]) {
            for frag in fragments(value) {
                assert!(!body.contains(frag), "401 body {body:?} contains {frag:?}");
            }
        }
    }
    assert_eq!(statuses, HashSet::from([401]));
    assert_eq!(bodies.len(), 1, "401 bodies differ: {bodies:?}");
    // And every 401 reason maps to that one body.
    let all_401: HashSet<&str> = DenyReason::ALL
        .iter()
        .filter(|r| r.http_status() == 401)
        .map(|r| r.body())
        .collect();
    assert_eq!(all_401, bodies);
}

// ---------------------------------------------------------------------------------------------
// Step 3: the client address
// ---------------------------------------------------------------------------------------------

#[test]
fn ip_allowlist_on_the_peer_address() {
    let w = &*WORLD;
    let allow = [
        (IP_V4, "10.0.0.1"),
        (IP_V4, "10.255.255.255"),
        (IP_V4, "192.168.1.5"),
        // IPv4-mapped IPv6 (dual-stack listeners) matches IPv4 entries.
        (IP_V4, "::ffff:10.1.2.3"),
        (IP_V4, "::ffff:192.168.1.5"),
        (IP_V6, "2001:db8::1"),
        (IP_V6, "2001:db8:ffff:ffff::42"),
        // No allowlist: any address, or none at all.
        (GOOD, "203.0.113.50"),
        (GOOD, "::1"),
    ];
    for (key, ip) in allow {
        let d = w.decide(&Req::new().bearer(key).peer(ip));
        assert_eq!(allowed(&d).key.id, w.key_id(key), "{key} from {ip}");
    }
    allowed(&w.decide(&Req::new().bearer(GOOD).no_peer()));

    let deny = [
        (IP_V4, "11.0.0.1"),
        (IP_V4, "192.168.1.6"),
        (IP_V4, "9.255.255.255"),
        (IP_V4, "::ffff:11.0.0.1"),
        // An IPv6 address is not inside an IPv4 range.
        (IP_V4, "::1"),
        (IP_V4, "2001:db8::1"),
        (IP_V6, "2001:db9::1"),
        (IP_V6, "10.1.2.3"),
        (IP_V6, "::ffff:10.1.2.3"),
    ];
    for (key, ip) in deny {
        let d = w.decide(&Req::new().bearer(key).peer(ip));
        let den = denied(&d);
        assert_eq!(den.reason, DenyReason::IpNotAllowed, "{key} from {ip}");
        assert_eq!(den.key.map(|k| k.id), Some(w.key_id(key)));
        assert_eq!(den.reason.http_status(), 403);
    }
    // No peer address at all with an allowlist: denied, never waved through.
    assert_deny(
        &w.decide(&Req::new().bearer(IP_V4).no_peer()),
        DenyReason::IpNotAllowed,
    );
}

/// SPEC §2 step 3: only an address *outside* the allowlist is refused. An entry written as an
/// IPv4-mapped IPv6 address (the form a dual-stack Envoy listener reports peers in, and which
/// the admin API accepts as "an IPv6 address") must admit that very address.
#[test]
fn ipv4_mapped_allowlist_entry_admits_the_same_address() {
    let w = &*WORLD;
    // The same host in either form is inside the entry.
    for peer in ["::ffff:10.1.2.3", "10.1.2.3"] {
        let d = w.decide(&Req::new().bearer(IP_MAPPED).peer(peer));
        assert_eq!(
            d.deny_reason(),
            None,
            "peer {peer} is inside allowlist entry ::ffff:10.1.2.3"
        );
    }
    // Any other host, in either form, is outside.
    for peer in ["::ffff:10.1.2.4", "10.1.2.4", "::1"] {
        let d = w.decide(&Req::new().bearer(IP_MAPPED).peer(peer));
        assert_eq!(d.deny_reason(), Some(DenyReason::IpNotAllowed), "{peer}");
    }
}

#[test]
fn ip_allowlist_on_x_forwarded_for() {
    let w = &*WORLD;
    // The peer is the load balancer, outside the allowlist: with xff:N it must not matter.
    let lb = "198.51.100.7";
    let r = |xff_value: &str| {
        Req::new()
            .bearer(IP_V4)
            .peer(lb)
            .header("x-forwarded-for", xff_value)
    };
    // xff:1: the rightmost address.
    allowed(&w.decide_at(&xff(1), &r("10.1.1.1"), NOW));
    allowed(&w.decide_at(&xff(1), &r("203.0.113.9, 10.1.1.1"), NOW));
    allowed(&w.decide_at(&xff(1), &r("203.0.113.9,10.1.1.1"), NOW));
    // A client cannot spoof its way in by prepending an allowed address.
    assert_deny(
        &w.decide_at(&xff(1), &r("10.1.1.1, 203.0.113.9"), NOW),
        DenyReason::IpNotAllowed,
    );
    // xff:2: the second from the right.
    allowed(&w.decide_at(&xff(2), &r("10.2.2.2, 203.0.113.7"), NOW));
    allowed(&w.decide_at(&xff(2), &r("203.0.113.1, 10.2.2.2, 203.0.113.7"), NOW));
    assert_deny(
        &w.decide_at(&xff(2), &r("10.9.9.9, 203.0.113.5, 10.1.1.1"), NOW),
        DenyReason::IpNotAllowed,
    );
    // Fewer hops than trusted, a missing header, or garbage: denied.
    assert_deny(
        &w.decide_at(&xff(2), &r("10.1.1.1"), NOW),
        DenyReason::IpNotAllowed,
    );
    assert_deny(&w.decide_at(&xff(1), &r(""), NOW), DenyReason::IpNotAllowed);
    assert_deny(
        &w.decide_at(&xff(1), &r("unknown"), NOW),
        DenyReason::IpNotAllowed,
    );
    assert_deny(
        &w.decide_at(&xff(1), &r("203.0.113.9, not-an-ip"), NOW),
        DenyReason::IpNotAllowed,
    );
    // Missing x-forwarded-for with an allowlist: denied, even when the peer would be allowed.
    let no_xff = Req::new().bearer(IP_V4).peer("10.1.2.3");
    assert_deny(
        &w.decide_at(&xff(1), &no_xff, NOW),
        DenyReason::IpNotAllowed,
    );
    // IPv6 in x-forwarded-for.
    let v6 = Req::new()
        .bearer(IP_V6)
        .peer(lb)
        .header("x-forwarded-for", "203.0.113.1, 2001:db8::7");
    allowed(&w.decide_at(&xff(1), &v6, NOW));
    // A key without an allowlist needs no x-forwarded-for.
    allowed(&w.decide_at(&xff(3), &Req::new().bearer(GOOD), NOW));
}

#[test]
fn client_ip_sources() {
    let req = Req::new()
        .peer("192.0.2.1")
        .header("x-forwarded-for", "10.0.0.1, 10.0.0.2 ,10.0.0.3");
    assert_eq!(
        client_ip(&DecisionConfig::default(), &req),
        Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)))
    );
    let at = |n| client_ip(&xff(n), &req);
    assert_eq!(at(1), Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3))));
    assert_eq!(at(2), Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))));
    assert_eq!(at(3), Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
    assert_eq!(at(4), None);
    assert_eq!(client_ip(&xff(1), &Req::new()), None);
    let v6 = Req::new().header("x-forwarded-for", "2001:db8::1");
    assert_eq!(
        client_ip(&xff(1), &v6),
        Some(IpAddr::V6("2001:db8::1".parse::<Ipv6Addr>().unwrap()))
    );
}

#[test]
fn client_ip_source_parses_from_flags() {
    assert_eq!("peer".parse::<ClientIpSource>(), Ok(ClientIpSource::Peer));
    assert_eq!(
        "xff:1".parse::<ClientIpSource>(),
        Ok(ClientIpSource::ForwardedFor(1))
    );
    assert_eq!(
        "xff:2".parse::<ClientIpSource>(),
        Ok(ClientIpSource::ForwardedFor(2))
    );
    for bad in ["xff:0", "xff:", "xff:-1", "xff", "", "forwarded"] {
        assert!(bad.parse::<ClientIpSource>().is_err(), "{bad:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Step 4: the route's model service
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_or_unknown_model_service_is_route_not_configured() {
    let w = &*WORLD;
    for req in [
        Req::new().bearer(GOOD).no_service(),
        Req::new().bearer(GOOD).service(""),
        Req::new().bearer(GOOD).service("openai-staging"),
        // Names are exact.
        Req::new().bearer(GOOD).service("OpenAI-Prod"),
        // Client headers naming a service do not count.
        Req::new()
            .bearer(GOOD)
            .no_service()
            .header("model_service", "openai-prod")
            .header("x-model-service", "openai-prod"),
    ] {
        let d = w.decide(&req);
        let den = denied(&d);
        assert_eq!(den.reason, DenyReason::RouteNotConfigured, "{req:?}");
        assert_eq!(den.reason.http_status(), 403);
        assert_eq!(den.key.map(|k| k.id), Some(w.key_id(GOOD)));
    }
}

#[test]
fn steps_run_in_spec_order() {
    let w = &*WORLD;
    // 401 before 403: an unknown key on an unrouted request is a 401.
    assert_deny(
        &w.decide(&Req::new().bearer(UNKNOWN).no_service()),
        DenyReason::UnknownKey,
    );
    // A disabled key is refused before its other properties are looked at.
    assert_deny(
        &w.decide(&Req::new().bearer(DISABLED).service("no-keys")),
        DenyReason::Disabled,
    );
    // Step 3 before step 4: the allowlist is checked before the route.
    assert_deny(
        &w.decide(&Req::new().bearer(IP_V4).peer("203.0.113.1").no_service()),
        DenyReason::IpNotAllowed,
    );
    // Step 4 before step 5.
    assert_deny(
        &w.decide(&Req::new().bearer(KEY_SCOPED).service("unknown-svc")),
        DenyReason::RouteNotConfigured,
    );
    // Step 5 before step 6: out of scope is a 403 even where no model key exists.
    assert_deny(
        &w.decide(&Req::new().bearer(CONSUMER_SCOPED).service("no-keys")),
        DenyReason::ModelServiceNotAllowed,
    );
}

// ---------------------------------------------------------------------------------------------
// Step 5: scope
// ---------------------------------------------------------------------------------------------

#[test]
fn scope_is_consumer_scope_intersected_with_key_scope() {
    let w = &*WORLD;
    let cases = [
        // Unrestricted consumer and key.
        (GOOD, "openai-prod", true),
        (GOOD, "anthropic", true),
        (GOOD, "azure", true),
        // Key scope only (consumer unrestricted).
        (KEY_SCOPED, "anthropic", true),
        (KEY_SCOPED, "openai-prod", false),
        (KEY_SCOPED, "azure", false),
        // Consumer scope only (key unrestricted).
        (CONSUMER_SCOPED, "openai-prod", true),
        (CONSUMER_SCOPED, "anthropic", false),
        (CONSUMER_SCOPED, "azure", false),
        // Both: consumer {openai, azure} ∩ key {openai, anthropic} = {openai}.
        (BOTH_SCOPED, "openai-prod", true),
        // In the key's scope, not the consumer's.
        (BOTH_SCOPED, "anthropic", false),
        // In the consumer's scope, not the key's.
        (BOTH_SCOPED, "azure", false),
    ];
    for (key, service, ok) in cases {
        let d = w.decide(&Req::new().bearer(key).service(service));
        if ok {
            let a = allowed(&d);
            assert_eq!(&*a.service.name, service);
            assert_eq!(a.key.id, w.key_id(key));
        } else {
            let den = denied(&d);
            assert_eq!(
                den.reason,
                DenyReason::ModelServiceNotAllowed,
                "{key} → {service}"
            );
            assert_eq!(den.reason.http_status(), 403);
            assert_eq!(den.key.map(|k| k.id), Some(w.key_id(key)));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Steps 6 and 7: the model key, and what the adapter injects and strips
// ---------------------------------------------------------------------------------------------

#[test]
fn no_enabled_model_key_is_503() {
    let w = &*WORLD;
    let d = w.decide(&Req::new().bearer(GOOD).service("no-keys"));
    let den = denied(&d);
    assert_eq!(den.reason, DenyReason::NoModelKey);
    assert_eq!(den.reason.http_status(), 503);
    assert_eq!(den.key.map(|k| k.id), Some(w.key_id(GOOD)));
}

#[test]
fn allow_returns_consumer_service_and_model_key() {
    let w = &*WORLD;
    let d = w.decide(&Req::new().bearer(GOOD).service("anthropic"));
    let a = allowed(&d);
    assert_eq!(a.key.id, w.key_id(GOOD));
    assert_eq!(&*a.key.name, "key-0");
    assert_eq!(a.consumer.id, id(C_ALL));
    assert_eq!(&*a.consumer.name, "billing-app");
    assert_eq!(a.service.id, id(S_ANTHROPIC));
    assert_eq!(&*a.service.name, "anthropic");
    assert_eq!(&*a.service.auth_header, "x-api-key");
    assert_eq!(a.model_key.id, id(MK_ANTHROPIC_ID));
    assert_eq!(&*a.model_key.name, "anthropic-key");
    assert_eq!(a.model_key.header_value.expose(), MK_ANTHROPIC);

    let d = w.decide(&Req::new().header("api-key", GOOD).service("azure"));
    let a = allowed(&d);
    assert_eq!(&*a.service.auth_header, "api-key");
    assert_eq!(a.model_key.id, id(MK_AZURE_ID));
    assert_eq!(a.model_key.header_value.expose(), MK_AZURE);

    // The consumer is the key's own, also for a narrower consumer.
    let d = w.decide(&Req::new().bearer(CONSUMER_SCOPED));
    let a = allowed(&d);
    assert_eq!(a.consumer.id, id(C_OPENAI_ONLY));
    assert_eq!(&*a.consumer.name, "openai-only-app");
    assert_eq!(&*a.service.auth_header, "authorization");
    let v = a.model_key.header_value.expose();
    assert!(
        v == format!("Bearer {MK_OPENAI_1}") || v == format!("Bearer {MK_OPENAI_2}"),
        "rendered template"
    );
}

#[test]
fn rotation_uses_every_model_key_of_a_service() {
    let w = build_world();
    let req = Req::new().bearer(GOOD);
    let picks: Vec<Uuid> = (0..8)
        .map(|_| allowed(&w.decide(&req)).model_key.id)
        .collect();
    let seen: HashSet<Uuid> = picks.iter().copied().collect();
    assert_eq!(
        seen,
        HashSet::from([id(MK_OPENAI_1_ID), id(MK_OPENAI_2_ID)])
    );
    // Evenly: each key serves half of the requests.
    for k in &seen {
        assert_eq!(picks.iter().filter(|p| *p == k).count(), 4, "{picks:?}");
    }
    // Each pick's header value is that key's own value.
    for _ in 0..4 {
        let d = w.decide(&req);
        let a = allowed(&d);
        let expected = if a.model_key.id == id(MK_OPENAI_1_ID) {
            MK_OPENAI_1
        } else {
            MK_OPENAI_2
        };
        assert_eq!(
            a.model_key.header_value.expose(),
            format!("Bearer {expected}")
        );
    }
    // A single key is always the one picked.
    let req = Req::new().bearer(GOOD).service("azure");
    for _ in 0..4 {
        assert_eq!(allowed(&w.decide(&req)).model_key.id, id(MK_AZURE_ID));
    }
}

#[test]
fn credentials_to_remove_strips_every_present_credential_but_the_overwritten_header() {
    let cfg = with_query_param("key");
    let all = Req::new()
        .bearer(GOOD)
        .header("x-api-key", "x")
        .header("api-key", "y")
        .query("a=1&key=z");
    // Vendor header `authorization` is set with overwrite: the other two go.
    let (h, p) = credentials_to_remove(&cfg, &all, "authorization");
    assert_eq!(h, vec!["x-api-key", "api-key"]);
    assert_eq!(p, Some("key"));
    // Anthropic-style `x-api-key`.
    let (h, _) = credentials_to_remove(&cfg, &all, "x-api-key");
    assert_eq!(h, vec!["authorization", "api-key"]);
    // Azure-style `api-key`.
    let (h, _) = credentials_to_remove(&cfg, &all, "api-key");
    assert_eq!(h, vec!["authorization", "x-api-key"]);
    // A vendor header that is no credential header: every present credential goes.
    let (h, _) = credentials_to_remove(&cfg, &all, "x-goog-api-key");
    assert_eq!(h, vec!["authorization", "x-api-key", "api-key"]);

    // Only what is present.
    let one = Req::new().header("x-api-key", GOOD);
    assert_eq!(
        credentials_to_remove(&cfg, &one, "authorization"),
        (vec!["x-api-key"], None)
    );
    assert_eq!(
        credentials_to_remove(&cfg, &one, "x-api-key"),
        (vec![], None)
    );
    // The query parameter, when present, even if empty.
    let q = Req::new().bearer(GOOD).query(&format!("key={GOOD}"));
    assert_eq!(
        credentials_to_remove(&cfg, &q, "authorization"),
        (vec![], Some("key"))
    );
    let q = Req::new().bearer(GOOD).query("key=");
    assert_eq!(
        credentials_to_remove(&cfg, &q, "authorization").1,
        Some("key")
    );
    // Not when absent, and never when the parameter is not configured.
    let q = Req::new().bearer(GOOD).query("keys=1&other=key");
    assert_eq!(credentials_to_remove(&cfg, &q, "authorization").1, None);
    let q = Req::new().bearer(GOOD).query(&format!("key={GOOD}"));
    assert_eq!(
        credentials_to_remove(&DecisionConfig::default(), &q, "authorization").1,
        None
    );
}

#[test]
fn allow_path_removal_for_each_vendor_header() {
    // End to end over the decision: the credential the consumer used is removed unless the
    // vendor header overwrites it.
    let w = &*WORLD;
    let cfg = DecisionConfig::default();
    let req = Req::new().header("x-api-key", GOOD).service("openai-prod");
    let d = w.decide_at(&cfg, &req, NOW);
    let a = allowed(&d);
    let (h, p) = credentials_to_remove(&cfg, &req, &a.service.auth_header);
    assert_eq!((h, p), (vec!["x-api-key"], None));

    let req = Req::new().header("x-api-key", GOOD).service("anthropic");
    let d = w.decide_at(&cfg, &req, NOW);
    let a = allowed(&d);
    let (h, p) = credentials_to_remove(&cfg, &req, &a.service.auth_header);
    assert_eq!((h, p), (vec![], None));

    let req = Req::new().bearer(GOOD).service("azure");
    let d = w.decide_at(&cfg, &req, NOW);
    let a = allowed(&d);
    assert_eq!(
        credentials_to_remove(&cfg, &req, &a.service.auth_header),
        (vec!["authorization"], None)
    );
}

// ---------------------------------------------------------------------------------------------
// Bodies, statuses, names
// ---------------------------------------------------------------------------------------------

#[test]
fn deny_bodies_are_openai_style_json_per_spec() {
    let expected = |r: DenyReason| -> (u16, &'static str, &'static str) {
        match r {
            DenyReason::MissingCredential
            | DenyReason::UnknownKey
            | DenyReason::Disabled
            | DenyReason::Expired
            | DenyReason::Unbound => (401, "authentication_error", "invalid_api_key"),
            DenyReason::IpNotAllowed => (403, "permission_error", "ip_not_allowed"),
            DenyReason::RouteNotConfigured => (403, "permission_error", "route_not_configured"),
            DenyReason::ModelServiceNotAllowed => {
                (403, "permission_error", "model_service_not_allowed")
            }
            DenyReason::NoModelKey => (503, "service_unavailable", "no_model_key"),
            DenyReason::NotReady => (503, "service_unavailable", "keygate_not_ready"),
            DenyReason::ModelNotAllowed | DenyReason::ModelUnknown => {
                (403, "permission_error", "model_not_allowed")
            }
            // SPEC §8.3: the types and codes OpenAI's clients already handle.
            DenyReason::InsufficientQuota => (429, "insufficient_quota", "insufficient_quota"),
            DenyReason::RequestRateLimited => (429, "requests", "rate_limit_exceeded"),
            DenyReason::TokenRateLimited => (429, "tokens", "rate_limit_exceeded"),
        }
    };
    for r in DenyReason::ALL {
        let (status, ty, code) = expected(r);
        assert_eq!(r.http_status(), status, "{r:?}");
        let v: serde_json::Value = serde_json::from_str(r.body())
            .unwrap_or_else(|e| panic!("{r:?} body is not JSON: {e}"));
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 1, "only `error` at the top level");
        let err = v["error"].as_object().expect("error object");
        assert_eq!(err["type"], ty, "{r:?}");
        assert_eq!(err["code"], code, "{r:?}");
        let msg = err["message"].as_str().expect("message string");
        assert!(!msg.is_empty());
    }
}

#[test]
fn reason_names_are_distinct_metric_labels() {
    let names: HashSet<&str> = DenyReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(names.len(), DenyReason::ALL.len());
    for n in &names {
        assert!(
            n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{n:?} is a snake_case label"
        );
    }
    assert_eq!(DenyReason::MissingCredential.as_str(), "missing_credential");
    assert_eq!(DenyReason::IpNotAllowed.as_str(), "ip_not_allowed");
    assert_eq!(DenyReason::NoModelKey.as_str(), "no_model_key");
}

#[test]
fn decision_config_defaults_match_spec() {
    let cfg = DecisionConfig::default();
    assert_eq!(
        cfg.credential_headers,
        vec!["authorization", "x-api-key", "api-key"]
    );
    assert_eq!(cfg.credential_query_param, None);
    assert_eq!(cfg.client_ip, ClientIpSource::Peer);
}

// ---------------------------------------------------------------------------------------------
// Secrecy
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn assert_no_secret(text: &str) {
    for v in ALL_MODEL_KEYS.iter().chain(ALL_CONSUMER_KEYS.iter()) {
        assert!(!text.contains(v), "debug output contains secret {v:?}");
        // Not even a distinctive tail of a model key.
        assert!(
            !text.contains(&v[v.len() - 12..]),
            "debug output contains part of {v:?}"
        );
    }
}

#[test]
fn debug_output_never_contains_key_values() {
    let w = &*WORLD;
    assert_no_secret(&format!("{:?}", w.snap));
    assert_no_secret(&format!("{:#?}", w.snap));
    for service in ["openai-prod", "anthropic", "azure"] {
        let d = w.decide(&Req::new().bearer(GOOD).service(service));
        assert_no_secret(&format!("{d:?}"));
        let a = allowed(&d);
        assert_no_secret(&format!("{a:#?}"));
        assert_no_secret(&format!("{:?}", a.model_key));
    }
    for key in [DISABLED, UNBOUND, IP_V4] {
        let d = w.decide(&Req::new().bearer(key).peer("203.0.113.1"));
        assert_no_secret(&format!("{d:?}"));
    }
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ \t]{0,3}(Bearer|bearer|Basic|BEARER)?[ \t]{0,3}[ -~]{0,40}[ \t]{0,3}",
        "[ \t\u{a0}\u{3000}]{0,2}[!-~]{0,30}[ \t\u{a0}\u{3000}]{0,2}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Header parsing never panics and never yields an empty credential or one with
    /// whitespace at either end.
    #[test]
    fn extracted_header_credentials_are_trimmed_and_non_empty(
        auth in proptest::option::of(header_value()),
        x in proptest::option::of(header_value()),
        api in proptest::option::of(header_value()),
    ) {
        let mut req = Req::new();
        for (n, v) in [("authorization", auth), ("x-api-key", x), ("api-key", api)] {
            if let Some(v) = v { req = req.header(n, &v); }
        }
        if let Some((cred, src)) = extract_credential(&DecisionConfig::default(), &req) {
            prop_assert!(!cred.is_empty());
            prop_assert!(!cred.starts_with(char::is_whitespace), "{:?}", cred);
            prop_assert!(!cred.ends_with(char::is_whitespace), "{:?}", cred);
            let CredentialSource::Header(h) = src else { panic!("no query param configured") };
            prop_assert!(RequestView::header(&req, h).unwrap().contains(&*cred));
        }
    }

    /// A visible-ASCII key sent in any credential form is extracted exactly.
    #[test]
    fn any_valid_key_value_round_trips(key in "[!-~]{16,80}", form in 0usize..3, spaces in 1usize..4) {
        let req = match form {
            0 => Req::new().header("authorization", &format!("Bearer{}{key}", " ".repeat(spaces))),
            1 => Req::new().header("x-api-key", &key),
            _ => Req::new().header("api-key", &key),
        };
        let (cred, _) = extract_credential(&DecisionConfig::default(), &req).unwrap();
        prop_assert_eq!(&*cred, key.as_str());
    }

    /// Query strings never panic the extractor, and `credentials_to_remove` agrees with it
    /// about the parameter being present whenever a credential came from it.
    #[test]
    fn query_parsing_never_panics(q in any::<String>()) {
        let cfg = with_query_param("key");
        let req = Req::new().query(&q);
        if let Some((cred, src)) = extract_credential(&cfg, &req) {
            prop_assert_eq!(src, CredentialSource::Query("key"));
            prop_assert!(!cred.is_empty());
            prop_assert_eq!(credentials_to_remove(&cfg, &req, "authorization").1, Some("key"));
        }
    }

    /// x-forwarded-for parsing never panics, for any header and any hop count.
    #[test]
    fn xff_parsing_never_panics(v in any::<String>(), n in 1usize..8) {
        let req = Req::new().header("x-forwarded-for", &v);
        let _ = client_ip(&xff(n), &req);
    }

    /// xff:N is the N-th address from the right of a well-formed list.
    #[test]
    fn xff_n_is_nth_from_the_right(
        addrs in proptest::collection::vec(any::<IpAddr>(), 1..6),
        n in 1usize..8,
        sep in prop_oneof![Just(","), Just(", "), Just(" , ")],
    ) {
        let v = addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(sep);
        let req = Req::new().header("x-forwarded-for", &v);
        let expected = addrs.len().checked_sub(n).map(|i| addrs[i]);
        prop_assert_eq!(client_ip(&xff(n), &req), expected);
    }

    /// Arbitrary requests never panic the decision and are never allowed: only a known key
    /// opens the gate.
    #[test]
    fn arbitrary_requests_are_never_allowed(
        auth in proptest::option::of(header_value()),
        x in proptest::option::of(header_value()),
        q in any::<String>(),
        service in proptest::option::of(prop_oneof![Just("openai-prod".to_string()), any::<String>()]),
        xff_value in any::<String>(),
    ) {
        let w = &*WORLD;
        let mut req = Req::new().query(&q).header("x-forwarded-for", &xff_value);
        req.service = service;
        if let Some(v) = auth { req = req.header("authorization", &v); }
        if let Some(v) = x { req = req.header("x-api-key", &v); }
        for cfg in [with_query_param("key"), xff(1)] {
            let d = w.decide_at(&cfg, &req, NOW);
            prop_assert!(matches!(d, Decision::Deny(_)));
        }
    }

    /// Expiry is a strict threshold: allowed before the instant, refused from it on.
    #[test]
    fn expiry_threshold(delta in -1_000_000_000i64..1_000_000_000) {
        let w = &*WORLD;
        let now = Timestamp(NOW.0 + delta);
        let d = w.decide_at(&DecisionConfig::default(), &Req::new().bearer(EXPIRING), now);
        if delta < 0 {
            prop_assert!(matches!(d, Decision::Allow(_)));
        } else {
            prop_assert_eq!(d.deny_reason(), Some(DenyReason::Expired));
        }
    }
}

#[test]
fn the_credential_parameter_is_cut_from_the_path_and_nothing_else() {
    assert_eq!(
        path_without_param("/v1/chat?key=kg-abc&model=gpt-4o", "key").as_deref(),
        Some("/v1/chat?model=gpt-4o")
    );
    assert_eq!(
        path_without_param("/v1/chat?a=1&key=x&b=%20&key=y", "key").as_deref(),
        Some("/v1/chat?a=1&b=%20")
    );
    assert_eq!(
        path_without_param("/v1/chat?key=x", "key").as_deref(),
        Some("/v1/chat")
    );
    assert_eq!(
        path_without_param("/v1/chat?k%65y=x&z", "key"),
        None,
        "an encoded name is another parameter (SPEC §9): never read, never cut"
    );
    assert_eq!(
        path_without_param("?key=x", "key").as_deref(),
        Some("/"),
        "never an empty :path"
    );
    assert_eq!(path_without_param("/v1/chat?keys=x", "key"), None);
    assert_eq!(path_without_param("/v1/chat", "key"), None);
}

#[test]
fn decision_settings_are_validated_naming_the_setting() {
    let c = DecisionConfig::new(
        &[
            "Authorization".into(),
            "x-api-key".into(),
            "authorization".into(),
        ],
        None,
        ClientIpSource::Peer,
    )
    .unwrap();
    assert_eq!(c.credential_headers, vec!["authorization", "x-api-key"]);
    assert_eq!(
        DecisionConfig::new(&["bad header".into()], None, ClientIpSource::Peer)
            .unwrap_err()
            .0,
        "credential_headers"
    );
    assert_eq!(
        DecisionConfig::new(&[], None, ClientIpSource::Peer)
            .unwrap_err()
            .0,
        "credential_headers"
    );
    assert_eq!(
        DecisionConfig::new(&[], Some(String::new()), ClientIpSource::Peer)
            .unwrap_err()
            .0,
        "credential_query_param"
    );
}

/// SPEC §9 "Credentials accepted are credentials removed": the parameter name is compared as
/// written on the wire. Envoy's `query_parameters_to_remove` removes the literal name only, so a
/// percent-encoded spelling of the name accepted here would travel to the upstream.
#[test]
fn an_encoded_parameter_name_is_no_credential_and_is_not_removed() {
    let w = &*WORLD;
    let cfg = with_query_param("key");
    for q in [
        format!("ke%79={GOOD}"),
        format!("%6B%65%79={GOOD}"),
        format!("%6b%65%79={GOOD}"),
        format!("k%65y={GOOD}&a=1"),
    ] {
        let req = Req::new().query(&q);
        assert!(extract_credential(&cfg, &req).is_none(), "{q}");
        assert_deny(&w.decide_at(&cfg, &req, NOW), DenyReason::MissingCredential);
        assert_eq!(credential_param_present(&cfg, &req), None, "{q}");
        assert_eq!(path_without_param(&format!("/v1?{q}"), "key"), None, "{q}");
    }
    // The literal name next to an encoded one: the literal one is read and removed, the
    // other (never a credential) is left as it is.
    let q = format!("ke%79=other&key={GOOD}");
    let req = Req::new().query(&q);
    assert_eq!(extract_credential(&cfg, &req).unwrap().0, GOOD);
    assert_eq!(credential_param_present(&cfg, &req), Some("key"));
    assert_eq!(
        path_without_param(&format!("/v1?{q}"), "key").as_deref(),
        Some("/v1?ke%79=other")
    );
}

/// A parameter name that would need encoding on the wire can never be matched literally: it
/// is refused when configured.
#[test]
fn a_credential_parameter_name_must_need_no_encoding() {
    for bad in [
        "api key", "k%65y", "a&b", "a=b", "k+y", "ключ", "a#b", "a?b",
    ] {
        let err = DecisionConfig::new(&[], Some(bad.into()), ClientIpSource::Peer).unwrap_err();
        assert_eq!(err.0, "credential_query_param", "{bad}");
    }
    for good in ["key", "api_key", "api-key", "X.Key~1"] {
        DecisionConfig::new(&[], Some(good.into()), ClientIpSource::Peer).unwrap();
    }
}

/// The query a pair-wise model of Envoy's removal (split on `&`, the name up to the first `=`,
/// compared literally) leaves.
fn envoy_removes(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter(|p| p.split('=').next() != Some(name))
        .collect::<Vec<_>>()
        .join("&")
}

fn query_piece() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        Just("key".to_string()),
        Just("ke%79".to_string()),
        Just("%6B%65%79".to_string()),
        Just("KEY".to_string()),
        Just("k".to_string()),
        "[a-z%0-9+]{0,5}",
    ];
    let value = prop_oneof![
        Just(GOOD.to_string()),
        Just(GOOD.replace('-', "%2D")),
        Just(String::new()),
        "[ -~]{0,8}".prop_map(|v| v.replace(['&', '#'], "")),
    ];
    (name, proptest::option::of(value)).prop_map(|(n, v)| match v {
        Some(v) => format!("{n}={v}"),
        None => n,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// What is accepted is what is removed, by both data planes: after the module's cut
    /// (`path_without_param`) or Envoy's literal removal, the query carries no credential and
    /// no pair under the configured name.
    #[test]
    fn accepted_query_credentials_are_removed_by_both_data_planes(
        pieces in proptest::collection::vec(query_piece(), 0..6),
    ) {
        let cfg = with_query_param("key");
        let q = pieces.join("&");
        let req = Req::new().query(&q);
        let accepted = extract_credential(&cfg, &req).is_some();
        let present = credential_param_present(&cfg, &req).is_some();
        prop_assert!(!accepted || present, "accepted but not removed: {q}");
        // The module's cut.
        let path = format!("/v1?{q}");
        let cut = path_without_param(&path, "key");
        prop_assert_eq!(cut.is_some(), present);
        let module_left = cut.as_deref().unwrap_or(&path).split_once('?').map_or("", |(_, q)| q);
        // Envoy's removal.
        let envoy_left = if present { envoy_removes(&q, "key") } else { q.clone() };
        for left in [module_left, envoy_left.as_str()] {
            let after = Req::new().query(left);
            prop_assert!(extract_credential(&cfg, &after).is_none(), "{q} -> {left}");
            prop_assert_eq!(credential_param_present(&cfg, &after), None);
        }
    }
}

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("authorization".to_string()),
        Just("x-api-key".to_string()),
        Just("api-key".to_string()),
        Just("x-goog-api-key".to_string()),
        Just("Authorization".to_string()),
        Just("X-Api-Key".to_string()),
        Just("proxy-authorization".to_string()),
        Just("api-key ".to_string()),
        Just("x-forwarded-for".to_string()),
        "[a-z0-9:-]{0,12}",
        any::<String>(),
    ]
}

/// Header values that often carry a real key, in every spelling a client might try.
fn credential_like_value() -> impl Strategy<Value = String> {
    let mut known = ALL_CONSUMER_KEYS.to_vec();
    known.push(UNKNOWN);
    let key = proptest::sample::select(known);
    prop_oneof![
        key.clone().prop_map(|k| format!("Bearer {k}")),
        key.clone().prop_map(String::from),
        (
            "[ \t]{0,2}",
            "(Bearer|bearer|BEARER|Basic|Token|)",
            "[ \t]{0,3}",
            key,
            "[ \t]{0,2}"
        )
            .prop_map(|(a, s, b, k, c)| format!("{a}{s}{b}{k}{c}")),
        header_value(),
    ]
}

/// SPEC §2's credential rule written out on its own: the first configured header (by its
/// exact lower-case name) that yields a non-empty value after trimming, `authorization` only
/// as `Bearer <key>` (scheme in any case, then one space).
fn rule_credential<'h>(
    cfg: &DecisionConfig,
    headers: &'h HashMap<String, String>,
) -> Option<(&'h str, String)> {
    cfg.credential_headers.iter().find_map(|name| {
        let v = headers.get(name)?;
        let v = if name == "authorization" {
            let scheme = v.get(..7)?;
            if !scheme.eq_ignore_ascii_case("bearer ") {
                return None;
            }
            v[7..].trim()
        } else {
            v.trim()
        };
        (!v.is_empty()).then(|| (v, name.clone()))
    })
}

/// What a decision is, for comparing two of them (not which model key: they rotate).
fn decision_summary(d: &Decision<'_>) -> (Option<DenyReason>, Option<Uuid>, Option<Uuid>) {
    match d {
        Decision::Allow(a) => (None, Some(a.key.id), Some(a.service.id)),
        Decision::Deny(x) => (Some(x.reason), x.key.map(|k| k.id), None),
        Decision::NeedBody => (Some(DenyReason::ModelUnknown), None, None),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary header maps (any names, any case, credential-like and random values) never
    /// panic the decision, which agrees with the credential rule: it reads the first
    /// configured header that yields a key, decides exactly as if that header were the only
    /// one, and every configured credential header present is one to remove.
    #[test]
    fn arbitrary_header_maps_decide_on_the_rules_credential(
        headers in proptest::collection::hash_map(header_name(), credential_like_value(), 0..8),
        which in 0usize..3,
        service in prop_oneof![Just("openai-prod"), Just("anthropic"), Just("azure")],
    ) {
        let w = &*WORLD;
        let custom = DecisionConfig::new(
            &["x-goog-api-key".into(), "api-key".into(), "authorization".into()],
            None,
            ClientIpSource::ForwardedFor(1),
        )
        .unwrap();
        let cfg = [DecisionConfig::default(), xff(1), custom][which].clone();
        let req = Req { headers, ..Req::new().service(service) };
        let d = w.decide_at(&cfg, &req, NOW);
        let rule = rule_credential(&cfg, &req.headers);
        let got = extract_credential(&cfg, &req);
        prop_assert_eq!(
            got.as_ref().map(|(v, s)| (&**v, *s)),
            rule.as_ref().map(|(v, h)| (*v, CredentialSource::Header(h.as_str())))
        );
        // The same request with only the credential header (and the address it came from).
        let mut alone = Req::new().service(service);
        if let Some((_, h)) = &rule {
            alone = alone.header(h, &req.headers[h]);
        }
        if let Some(x) = req.headers.get("x-forwarded-for") {
            alone = alone.header("x-forwarded-for", x);
        }
        prop_assert_eq!(
            decision_summary(&d),
            decision_summary(&w.decide_at(&cfg, &alone, NOW))
        );
        if let Decision::Allow(a) = &d {
            let (removed, _) = credentials_to_remove(&cfg, &req, &a.service.auth_header);
            let expected: Vec<&str> = cfg
                .credential_headers
                .iter()
                .filter(|h| req.headers.contains_key(*h) && **h != *a.service.auth_header)
                .map(String::as_str)
                .collect();
            prop_assert_eq!(removed, expected);
        }
    }
}
