//! The store and snapshot pipeline against both backends: SQLite (a temp file) and
//! PostgreSQL (a fresh database per test on the server named by KEYGATE_TEST_POSTGRES,
//! which ./scripts/test sets). The same assertions run on both.

use std::collections::BTreeMap;

use keygate::crypto::{MasterKey, Secret};
use keygate::domain::input::{
    ConsumerKeyPatch, ConsumerPatch, KeySource, NewConsumer, NewConsumerKey, NewModelKey,
    NewModelService, Rotation,
};
use keygate::domain::limits::{BudgetPeriod, LimitsInput};
use keygate::domain::{KeyStatus, Limits, RuleError, ScopeInput, Selector};
use keygate::snapshot::{Snapshot, SnapshotBuilder, SnapshotCell, load_full_update};
use keygate::store::{Actor, Store, StoreError};

/// A fresh store of each backend. PostgreSQL is required: set KEYGATE_TEST_POSTGRES
/// (./scripts/test does) — these tests fail rather than skip without it.
struct Fixture {
    _tmp: Option<tempfile::TempDir>,
    url: String,
}

fn pg_base() -> String {
    std::env::var("KEYGATE_TEST_POSTGRES").unwrap_or_else(|_| {
        panic!(
            "KEYGATE_TEST_POSTGRES is not set: run ./scripts/test (PostgreSQL at 127.0.0.1:5432)"
        )
    })
}

async fn fixture(backend: &str) -> Fixture {
    match backend {
        "sqlite" => {
            let tmp = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", tmp.path().join("kg.db").display());
            Fixture {
                _tmp: Some(tmp),
                url,
            }
        }
        "postgres" => {
            use sqlx::Connection;
            let base = pg_base();
            let db = format!("kg_test_{}", uuid::Uuid::new_v4().simple());
            let mut admin = sqlx::PgConnection::connect(&format!("{base}/postgres"))
                .await
                .unwrap();
            sqlx::Executor::execute(&mut admin, format!("CREATE DATABASE {db}").as_str())
                .await
                .unwrap();
            Fixture {
                _tmp: None,
                url: format!("{base}/{db}"),
            }
        }
        _ => unreachable!(),
    }
}

async fn open(url: &str, master: &MasterKey) -> Store {
    Store::open(url, &master.fingerprint(), master.keys(), Limits::default())
        .await
        .unwrap()
}

/// An AUTO key of `consumer`, nothing else set.
fn auto_key(name: &str, consumer: &str) -> NewConsumerKey {
    NewConsumerKey {
        name: name.into(),
        description: String::new(),
        source: KeySource::Auto,
        consumer: Some(consumer.into()),
        scope: ScopeInput::Unset,
        ip_allowlist: vec![],
        expire_time: None,
        limits: LimitsInput::default(),
    }
}

fn actor() -> Actor {
    Actor("test".into())
}

/// Everything a decision can observe, in a comparable form.
fn canonical(s: &Snapshot) -> String {
    let mut keys: BTreeMap<String, String> = BTreeMap::new();
    for (h, e) in s.key_index().iter() {
        // A rotated key is also found by its previous value (SPEC §8.4).
        let previous = e
            .previous
            .map(|p| s.key(&p.hash).map(|by_previous| by_previous.id));
        keys.insert(hex::encode(h), format!("{e:?} previous finds {previous:?}"));
    }
    let mut consumers: BTreeMap<String, String> = BTreeMap::new();
    for c in s.consumers() {
        consumers.insert(c.id.to_string(), format!("{c:?}"));
    }
    let mut services: BTreeMap<String, String> = BTreeMap::new();
    for svc in s.services() {
        let keys: Vec<String> = svc
            .keys
            .iter()
            .map(|k| format!("{}={}", k.name, k.header_value.expose()))
            .collect();
        services.insert(
            svc.name.to_string(),
            format!("{} {} {:?}", svc.id, svc.auth_header, keys),
        );
    }
    format!("{keys:#?}\n{consumers:#?}\n{services:#?}\n{:?}", s.counts())
}

async fn incremental_matches_full(backend: &str) {
    let fx = fixture(backend).await;
    let master = MasterKey::generate();
    let store = open(&fx.url, &master).await;
    let cell = SnapshotCell::new();
    let builder = SnapshotBuilder::new(store.clone(), cell.clone());
    builder.refresh().await.unwrap();
    let a = actor();

    let step = |name: &'static str| name;
    let svc = |name: &str, header: &str, template: &str| NewModelService {
        name: name.into(),
        auth_header: header.into(),
        auth_value_template: template.into(),
        ..Default::default()
    };
    store
        .create_model_service(&a, svc("openai", "", ""))
        .await
        .unwrap();
    store
        .create_model_service(&a, svc("anthropic", "x-api-key", "{key}"))
        .await
        .unwrap();
    builder.refresh().await.unwrap();
    store
        .create_model_key(
            &a,
            NewModelKey {
                name: "oa-1".into(),
                description: String::new(),
                source: KeySource::Custom(Secret::new("sk-openai-0123456789abcdef".into())),
                model_services: vec!["openai".into()],
            },
        )
        .await
        .unwrap();
    store
        .create_consumer(
            &a,
            NewConsumer {
                name: "app".into(),
                scope: ScopeInput::List {
                    services: vec!["openai".into()],
                    models: vec![],
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    builder.refresh().await.unwrap();
    let mut values = Vec::new();
    for i in 0..5 {
        let created = store
            .create_consumer_key(
                &a,
                NewConsumerKey {
                    name: format!("k{i}"),
                    description: String::new(),
                    source: KeySource::Auto,
                    consumer: (i % 2 == 0).then(|| "app".to_string()),
                    scope: ScopeInput::Unset,
                    ip_allowlist: if i == 3 {
                        vec!["10.0.0.0/8".into()]
                    } else {
                        vec![]
                    },
                    expire_time: None,
                    limits: LimitsInput {
                        requests_per_minute: if i == 0 { 100 } else { 0 },
                        ..Default::default()
                    },
                },
            )
            .await
            .unwrap();
        values.push(created.value.unwrap());
        builder.refresh().await.unwrap();
    }
    let _ = step("lifecycle");
    store.bind_consumer_key(&a, "k1", "app").await.unwrap();
    store
        .set_consumer_key_status(&a, &Selector::Name("k2".into()), KeyStatus::Disabled)
        .await
        .unwrap();
    builder.refresh().await.unwrap();
    store
        .update_consumer_key(
            &a,
            &Selector::Name("k4".into()),
            ConsumerKeyPatch {
                name: Some("k4-renamed".into()),
                limits: Some(LimitsInput {
                    budget_usd: "5".into(),
                    budget_period: BudgetPeriod::Day.code(),
                    tokens_per_minute: 9_000,
                    ..Default::default()
                }),
                scope: Some(
                    ScopeInput::List {
                        services: vec!["anthropic".into()],
                        models: vec![],
                    }
                    .into(),
                ),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    store
        .update_consumer(
            &a,
            &Selector::Name("app".into()),
            ConsumerPatch {
                scope: Some(ScopeInput::All.into()),
                limits: Some(LimitsInput {
                    requests_per_minute: 7,
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    store
        .set_consumer_key_status(&a, &Selector::Name("k3".into()), KeyStatus::Disabled)
        .await
        .unwrap();
    builder.refresh().await.unwrap();
    store
        .delete_consumer_key(&a, &Selector::Name("k3".into()))
        .await
        .unwrap();
    // Rotations (SPEC §8.4): k0 twice with an overlap (the second drops the first previous
    // value), k1 with none; each applied incrementally.
    let rotate = |name: &'static str, overlap_us: i64| {
        let store = store.clone();
        let a = a.clone();
        async move {
            store
                .rotate_consumer_key(
                    &a,
                    &Selector::Name(name.into()),
                    Rotation {
                        overlap_us,
                        value: None,
                    },
                )
                .await
                .unwrap()
                .value
                .expect("an AUTO key's new value")
        }
    };
    let k0_second = rotate("k0", 3_600_000_000).await;
    builder.refresh().await.unwrap();
    let k0_third = rotate("k0", 3_600_000_000).await;
    let k1_second = rotate("k1", 0).await;
    store
        .set_model_key_status(&a, &Selector::Name("oa-1".into()), KeyStatus::Disabled)
        .await
        .unwrap();
    let incremental = builder.refresh().await.unwrap();
    assert!(
        incremental.key_index().overlay_len() > 0,
        "changes were applied incrementally, not by a full rebuild"
    );

    let full =
        Snapshot::from_full(load_full_update(&store, None).await.unwrap(), store.keys()).unwrap();
    assert_eq!(incremental.version, full.version);
    assert_eq!(canonical(&incremental), canonical(&full));
    assert_eq!(incremental.digest(), full.digest());
    assert_eq!(incremental.counts().consumer_keys, 4);
    assert!(
        incremental.service("openai").unwrap().keys.is_empty(),
        "disabled model key left out"
    );

    // The deleted key's HMAC is gone; a live one is found by its HMAC.
    let hash = |v: &Secret| store.keys().hasher.hash(v.expose().as_bytes());
    let h2 = hash(&values[2]);
    let h3 = hash(&values[3]);
    assert!(incremental.key(&h2).is_some());
    assert!(incremental.key(&h3).is_none());
    // A rotated key: by its value and its previous value, not by the one before (k0), nor
    // by a value replaced without an overlap (k1).
    for snap in [&incremental, &full] {
        let id = |v: &Secret| snap.key(&hash(v)).map(|e| e.name.to_string());
        assert_eq!(id(&k0_third).as_deref(), Some("k0"));
        assert_eq!(id(&k0_second).as_deref(), Some("k0"));
        assert_eq!(id(&values[0]), None);
        assert_eq!(id(&k1_second).as_deref(), Some("k1"));
        assert_eq!(id(&values[1]), None);
    }
    // Rate limits reach the snapshot, created and updated, on keys and consumers.
    let per_minute = |name: &str| {
        let (_, e) = incremental
            .key_index()
            .iter()
            .find(|(_, e)| &*e.name == name)
            .unwrap();
        e.limits.per_minute()
    };
    assert_eq!(per_minute("k0").requests, Some(100));
    assert_eq!(per_minute("k4-renamed").tokens, Some(9_000));
    assert!(per_minute("k1").is_unlimited());
    let app = incremental.consumers().find(|c| &*c.name == "app").unwrap();
    assert_eq!(app.limits.per_minute().requests, Some(7));
    store.close().await;
}

#[tokio::test]
async fn incremental_snapshot_equals_full_rebuild_sqlite() {
    incremental_matches_full("sqlite").await;
}

#[tokio::test]
async fn incremental_snapshot_equals_full_rebuild_postgres() {
    incremental_matches_full("postgres").await;
}

async fn master_key_mismatch_refuses(backend: &str) {
    let fx = fixture(backend).await;
    let master = MasterKey::generate();
    open(&fx.url, &master).await.close().await;
    let other = MasterKey::generate();
    let err = Store::open(
        &fx.url,
        &other.fingerprint(),
        other.keys(),
        Limits::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::MasterKeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("same master key"));
}

#[tokio::test]
async fn another_master_key_is_refused_sqlite() {
    master_key_mismatch_refuses("sqlite").await;
}

#[tokio::test]
async fn another_master_key_is_refused_postgres() {
    master_key_mismatch_refuses("postgres").await;
}

/// Concurrent binds of one key to two consumers: exactly one wins, the other is refused
/// with a lifecycle error, never a corrupt state. Two store handles = two replicas.
async fn concurrent_binds_serialise(backend: &str) {
    let fx = fixture(backend).await;
    let master = MasterKey::generate();
    let a_store = open(&fx.url, &master).await;
    let b_store = open(&fx.url, &master).await;
    let a = actor();
    for c in ["c1", "c2"] {
        a_store
            .create_consumer(
                &a,
                NewConsumer {
                    name: c.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    for round in 0..10 {
        let k = format!("key{round}");
        a_store
            .create_consumer_key(
                &a,
                NewConsumerKey {
                    name: k.clone(),
                    description: String::new(),
                    source: KeySource::Auto,
                    consumer: None,
                    scope: ScopeInput::Unset,
                    ip_allowlist: vec![],
                    expire_time: None,
                    limits: LimitsInput::default(),
                },
            )
            .await
            .unwrap();
        let (r1, r2) = tokio::join!(
            a_store.bind_consumer_key(&a, &k, "c1"),
            b_store.bind_consumer_key(&a, &k, "c2")
        );
        let oks = [r1.is_ok(), r2.is_ok()].iter().filter(|x| **x).count();
        assert_eq!(
            oks, 1,
            "round {round}: exactly one bind wins ({r1:?} / {r2:?})"
        );
        let loser = match (r1, r2) {
            (Ok(_), Err(e)) | (Err(e), Ok(_)) => e,
            _ => unreachable!("exactly one succeeded"),
        };
        assert!(
            matches!(loser, StoreError::Rule(RuleError::FailedPrecondition(ref m)) if m.contains("already bound")),
            "{loser}"
        );
    }
    a_store.close().await;
    b_store.close().await;
}

#[tokio::test]
async fn concurrent_binds_on_two_replicas_serialise_sqlite() {
    concurrent_binds_serialise("sqlite").await;
}

#[tokio::test]
async fn concurrent_binds_on_two_replicas_serialise_postgres() {
    concurrent_binds_serialise("postgres").await;
}

/// A store written before model-level scope (schema version 3) upgrades in place: its model
/// services read as BODY, their `models` lists (informational until then) are moved aside and
/// not enforced — kept in the store, named in a warning — until set again, other fields stay
/// editable, and existing scopes read as before.
async fn upgrades_from_before_model_scope(backend: &str) {
    use keygate::domain::input::ModelServicePatch;
    use keygate::domain::{ModelSource, Scope};
    use sqlx::{Connection, Executor};

    let fx = fixture(backend).await;
    let master = MasterKey::generate();
    let store = open(&fx.url, &master).await;
    let a = actor();
    let service = NewModelService {
        name: "legacy".into(),
        ..Default::default()
    };
    store.create_model_service(&a, service).await.unwrap();
    let consumer = NewConsumer {
        name: "app".into(),
        scope: ScopeInput::List {
            services: vec!["legacy".into()],
            models: vec![],
        },
        ..Default::default()
    };
    store.create_consumer(&a, consumer).await.unwrap();
    store.close().await;

    // Back to version 3, with a models list the old rule (1–200 printable characters) allowed.
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&fx.url).await.unwrap();
    for sql in UNDO_V8.iter().chain(&UNDO_V5).copied().chain([
        "DROP TABLE scope_models",
        "ALTER TABLE model_services DROP COLUMN model_source",
        "ALTER TABLE model_services DROP COLUMN legacy_models",
        "DELETE FROM _sqlx_migrations WHERE version = 4",
        r#"UPDATE model_services SET models = '["gpt 4o (legacy)"]'"#,
    ]) {
        conn.execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    conn.close().await.unwrap();

    let store = open(&fx.url, &master).await;
    let legacy = Selector::Name("legacy".into());
    let s = store.get_model_service(&legacy).await.unwrap();
    assert_eq!(s.model_source, ModelSource::Body);
    assert!(
        s.models.is_empty(),
        "a list from before is not enforced: {:?}",
        s.models
    );
    let moved_aside = || async {
        let mut conn = sqlx::AnyConnection::connect(&fx.url).await.unwrap();
        let row = sqlx::query("SELECT legacy_models FROM model_services")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        sqlx::Row::try_get::<String, _>(&row, "legacy_models").unwrap()
    };
    assert_eq!(
        moved_aside().await,
        r#"["gpt 4o (legacy)"]"#,
        "kept, not lost"
    );
    let patch = ModelServicePatch {
        description: Some("still editable".into()),
        ..Default::default()
    };
    store
        .update_model_service(&a, &legacy, patch)
        .await
        .unwrap();
    assert_eq!(moved_aside().await, r#"["gpt 4o (legacy)"]"#);
    // Setting the list (now a checked, enforced one) replaces the one moved aside.
    let patch = ModelServicePatch {
        models: Some(vec!["gpt-4o".into()]),
        ..Default::default()
    };
    let s = store
        .update_model_service(&a, &legacy, patch)
        .await
        .unwrap();
    assert_eq!(s.models, ["gpt-4o"]);
    assert_eq!(moved_aside().await, "[]");
    let c = store
        .get_consumer(&Selector::Name("app".into()))
        .await
        .unwrap();
    let Scope::List { services, models } = c.scope else {
        panic!("the list scope survives: {:?}", c.scope);
    };
    assert_eq!(
        services.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["legacy"]
    );
    assert!(models.is_empty());
    store.close().await;
}

#[tokio::test]
async fn a_store_from_before_model_scope_upgrades_sqlite() {
    upgrades_from_before_model_scope("sqlite").await;
}

#[tokio::test]
async fn a_store_from_before_model_scope_upgrades_postgres() {
    upgrades_from_before_model_scope("postgres").await;
}

/// What schema version 8 (budgets and rate limits) added, undone: a store back at version 7.
const UNDO_V8: [&str; 13] = [
    "DROP INDEX usage_buckets_key_hour",
    "DROP INDEX usage_buckets_consumer_hour",
    "ALTER TABLE consumers DROP COLUMN budget_micro_usd",
    "ALTER TABLE consumers DROP COLUMN budget_tokens",
    "ALTER TABLE consumers DROP COLUMN budget_period",
    "ALTER TABLE consumers DROP COLUMN requests_per_minute",
    "ALTER TABLE consumers DROP COLUMN tokens_per_minute",
    "ALTER TABLE consumer_keys DROP COLUMN budget_micro_usd",
    "ALTER TABLE consumer_keys DROP COLUMN budget_tokens",
    "ALTER TABLE consumer_keys DROP COLUMN budget_period",
    "ALTER TABLE consumer_keys DROP COLUMN requests_per_minute",
    "ALTER TABLE consumer_keys DROP COLUMN tokens_per_minute",
    "DELETE FROM _sqlx_migrations WHERE version = 8",
];

/// A store written before budgets and rate limits (schema version 7) upgrades in place: its
/// consumers and keys have no limits and no spend, usage reported before the upgrade counts
/// toward a budget set after it, and the snapshot carries limits set after it.
async fn upgrades_from_before_limits(backend: &str) {
    use keygate::domain::usage::{ModelPriceInput, UsageDelta, UsageReportInput};
    use keygate::domain::{ResourceKind, Timestamp};
    use sqlx::{Connection, Executor};

    let fx = fixture(backend).await;
    let master = MasterKey::generate();
    let store = open(&fx.url, &master).await;
    let a = actor();
    let service = NewModelService {
        name: "openai".into(),
        pricing: vec![ModelPriceInput {
            model: "gpt-4o".into(),
            input_per_mtok: "2.50".into(),
            output_per_mtok: "10".into(),
            cached_input_per_mtok: String::new(),
        }],
        ..Default::default()
    };
    let service_id = store.create_model_service(&a, service).await.unwrap().id;
    let consumer = NewConsumer {
        name: "app".into(),
        ..Default::default()
    };
    let consumer_id = store.create_consumer(&a, consumer).await.unwrap().id;
    let key = auto_key("k", "app");
    let created = store.create_consumer_key(&a, key).await.unwrap();
    store.close().await;

    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&fx.url).await.unwrap();
    for sql in UNDO_V8 {
        conn.execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    conn.close().await.unwrap();

    let store = open(&fx.url, &master).await;
    let k = Selector::Name("k".into());
    let app = Selector::Name("app".into());
    let got = store.get_consumer_key(&k).await.unwrap();
    assert!(got.limits.is_unlimited() && got.spend.is_none());
    let c = store.get_consumer(&app).await.unwrap();
    assert!(c.limits.is_unlimited() && c.spend.is_none());
    let now = Timestamp::now();
    let report = UsageReportInput {
        data_plane: uuid::Uuid::nil(),
        sequence: 1,
        time: now,
        rows: vec![UsageDelta {
            consumer_key: uuid::Uuid::parse_str(&created.key.id).unwrap(),
            consumer: Some(uuid::Uuid::parse_str(&consumer_id).unwrap()),
            model_service: uuid::Uuid::parse_str(&service_id).unwrap(),
            model: "gpt-4o".into(),
            requests: 1,
            input_tokens: 400_000,
            output_tokens: 100_000,
            ..Default::default()
        }],
    };
    store.apply_usage_report(&report, now).await.unwrap();
    let patch = ConsumerKeyPatch {
        limits: Some(LimitsInput {
            budget_usd: "2".into(),
            budget_period: BudgetPeriod::Total.code(),
            requests_per_minute: 30,
            ..Default::default()
        }),
        ..Default::default()
    };
    let got = store.update_consumer_key(&a, &k, patch).await.unwrap();
    assert_eq!(got.limits.budget_usd_text(), "2");
    // 400k input at 2.50 and 100k output at 10 per million: 1 + 1 = 2 USD, the whole budget.
    let spend = got.spend.expect("a budget has a spend");
    assert_eq!(
        (spend.cost.to_string(), spend.tokens, spend.exhausted),
        ("2".to_string(), 500_000, true)
    );
    assert_eq!(
        store
            .spend(ResourceKind::ConsumerKey, &k, Timestamp::now())
            .await
            .unwrap(),
        Some(spend)
    );
    let update = load_full_update(&store, None).await.unwrap();
    let (_, entry) = &update.keys[0];
    assert_eq!(entry.limits.per_minute().requests, Some(30));
    // Version 9: the budget (set by this update, over usage applied before it) is exhausted for
    // good (TOTAL): the update recomputes it.
    assert_eq!(entry.limits.exhausted_until, Some(Timestamp(i64::MAX)));
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut sqlx::AnyConnection::connect(&fx.url).await.unwrap())
            .await
            .unwrap();
    assert_eq!(versions.last(), Some(&9));
    store.close().await;
}

#[tokio::test]
async fn a_store_from_before_limits_upgrades_sqlite() {
    upgrades_from_before_limits("sqlite").await;
}

#[tokio::test]
async fn a_store_from_before_limits_upgrades_postgres() {
    upgrades_from_before_limits("postgres").await;
}

/// What schema versions 7 (consumer key rotation), 6 (audit event details) and 5 (usage and
/// spend) added, undone: a store back at version 4 (after `UNDO_V8`).
const UNDO_V5: [&str; 12] = [
    "DROP INDEX consumer_keys_previous_hash",
    "ALTER TABLE consumer_keys DROP COLUMN previous_hash",
    "ALTER TABLE consumer_keys DROP COLUMN previous_masked_value",
    "ALTER TABLE consumer_keys DROP COLUMN previous_expire_time",
    "DELETE FROM _sqlx_migrations WHERE version = 7",
    "ALTER TABLE audit_events DROP COLUMN details",
    "DELETE FROM _sqlx_migrations WHERE version = 6",
    "DROP TABLE usage_buckets",
    "DROP TABLE usage_cursors",
    "DROP TABLE usage_names",
    "ALTER TABLE model_services DROP COLUMN pricing",
    "DELETE FROM _sqlx_migrations WHERE version = 5",
];

/// A store written before usage and spend (schema version 4) upgrades in place: its model
/// services have no prices (usage of them is unpriced) until set, and usage reports apply
/// and sum at once.
async fn upgrades_from_before_usage(backend: &str) {
    use keygate::domain::input::ModelServicePatch;
    use keygate::domain::usage::{
        ModelPriceInput, UsageApplied, UsageDelta, UsageQuery, UsageReportInput,
    };
    use keygate::domain::{Named, Timestamp};
    use sqlx::{Connection, Executor};

    let fx = fixture(backend).await;
    let master = MasterKey::generate();
    let store = open(&fx.url, &master).await;
    let a = actor();
    let service = NewModelService {
        name: "openai".into(),
        ..Default::default()
    };
    let service_id = store.create_model_service(&a, service).await.unwrap().id;
    store.close().await;

    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&fx.url).await.unwrap();
    for &sql in UNDO_V8.iter().chain(&UNDO_V5) {
        conn.execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    conn.close().await.unwrap();

    let store = open(&fx.url, &master).await;
    let openai = Selector::Name("openai".into());
    assert!(
        store
            .get_model_service(&openai)
            .await
            .unwrap()
            .pricing
            .is_empty()
    );
    let row = UsageDelta {
        consumer_key: uuid::Uuid::now_v7(),
        model_service: uuid::Uuid::parse_str(&service_id).unwrap(),
        model: "gpt-4o".into(),
        requests: 2,
        input_tokens: 1_000_000,
        ..Default::default()
    };
    let report = |sequence, rows| UsageReportInput {
        data_plane: uuid::Uuid::nil(),
        sequence,
        time: Timestamp::now(),
        rows,
    };
    let UsageApplied::Applied(first) = store
        .apply_usage_report(&report(1, vec![row.clone()]), Timestamp::now())
        .await
        .unwrap()
    else {
        panic!("the first report applies");
    };
    assert_eq!(first.unpriced_requests, 2, "no price yet");
    let patch = ModelServicePatch {
        pricing: Some(vec![ModelPriceInput {
            model: "gpt-4o".into(),
            input_per_mtok: "2.50".into(),
            output_per_mtok: "10".into(),
            cached_input_per_mtok: String::new(),
        }]),
        ..Default::default()
    };
    let s = store
        .update_model_service(&a, &openai, patch)
        .await
        .unwrap();
    assert_eq!(s.pricing[0].input.to_string(), "2.5");
    store
        .apply_usage_report(&report(2, vec![row]), Timestamp::now())
        .await
        .unwrap();
    let q = UsageQuery {
        group_by: vec![keygate::domain::usage::UsageDimension::ModelService],
        ..Default::default()
    };
    let rows = store.get_usage(&q).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].model_service,
        Some(Named {
            id: service_id,
            name: "openai".into()
        })
    );
    assert_eq!(
        (rows[0].totals.requests, rows[0].totals.unpriced_requests),
        (4, 2)
    );
    assert_eq!(rows[0].totals.cost.to_string(), "2.5");
    store.close().await;
}

#[tokio::test]
async fn a_store_from_before_usage_upgrades_sqlite() {
    upgrades_from_before_usage("sqlite").await;
}

#[tokio::test]
async fn a_store_from_before_usage_upgrades_postgres() {
    upgrades_from_before_usage("postgres").await;
}

/// What a restore does to the history: the store back at `to` (later audit and change rows
/// gone, the revision counter back, `consumers` named here gone as the backup never had
/// them), its epoch row unchanged.
async fn restore_to(url: &str, to: i64, gone_consumers: &[&str]) {
    use sqlx::{Connection, Executor};
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    for sql in [
        format!("DELETE FROM audit_events WHERE revision > {to}"),
        format!("DELETE FROM changes WHERE revision > {to}"),
        format!("UPDATE store_meta SET revision = {to} WHERE id = 1"),
    ] {
        conn.execute(sql.as_str()).await.unwrap();
    }
    for name in gone_consumers {
        conn.execute(format!("DELETE FROM consumers WHERE name = '{name}'").as_str())
            .await
            .unwrap();
    }
    conn.close().await.unwrap();
}

/// Issue 14 H1, the case a version cannot see: the store restored (its epoch row included)
/// and changed back up to exactly the revision a running control plane published, or past
/// it, between two of its reads. The builder tells the histories apart by the revision's
/// audit row, starts a new epoch (audited) and publishes the store's actual state; a second
/// replica follows the new epoch. Before, the first case was "up to date" for good and the
/// second applied the later changes on top of the state the store no longer has.
async fn restore_changed_back(backend: &str) {
    let fx = fixture(backend).await;
    let master = MasterKey::generate();
    let store = open(&fx.url, &master).await;
    let replica = open(&fx.url, &master).await;
    let builder = SnapshotBuilder::new(store.clone(), SnapshotCell::new());
    let other = SnapshotBuilder::new(replica.clone(), SnapshotCell::new());
    let a = actor();
    store
        .create_model_service(
            &a,
            NewModelService {
                name: "openai".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let consumer = |name: &str| NewConsumer {
        name: name.into(),
        ..Default::default()
    };
    store.create_consumer(&a, consumer("app")).await.unwrap();
    let key = auto_key("leaked", "app");
    store.create_consumer_key(&a, key).await.unwrap();
    let (epoch0, backup) = store.epoch().await.unwrap();
    store
        .create_consumer(&a, consumer("later-1"))
        .await
        .unwrap();
    store
        .create_consumer(&a, consumer("later-2"))
        .await
        .unwrap();
    let published = builder.refresh().await.unwrap();
    other.refresh().await.unwrap();
    let n = published.version;
    assert_eq!(n, backup + 2);
    let leaked_enabled = |s: &Snapshot| {
        s.key_index()
            .iter()
            .find(|(_, e)| &*e.name == "leaked")
            .map(|(_, e)| e.enabled)
    };
    assert_eq!(leaked_enabled(&published), Some(true));

    // Restored to the backup, then changed back up to N: the leaked key disabled.
    restore_to(&fx.url, backup, &["later-1", "later-2"]).await;
    store
        .set_consumer_key_status(&a, &Selector::Name("leaked".into()), KeyStatus::Disabled)
        .await
        .unwrap();
    store
        .create_consumer(&a, consumer("restored-1"))
        .await
        .unwrap();
    assert_eq!(store.epoch().await.unwrap(), (epoch0.clone(), n));

    let after = builder.refresh().await.unwrap();
    let (epoch1, _) = store.epoch().await.unwrap();
    assert_ne!(epoch1, epoch0, "a new epoch started");
    assert_eq!(after.epoch, epoch1);
    let full =
        Snapshot::from_full(load_full_update(&store, None).await.unwrap(), store.keys()).unwrap();
    assert_eq!(
        canonical(&after),
        canonical(&full),
        "the store's actual state"
    );
    assert_eq!(after.digest(), full.digest());
    assert_eq!(leaked_enabled(&after), Some(false));
    // The other replica follows the new epoch (no second one starts).
    let followed = other.refresh().await.unwrap();
    assert_eq!(canonical(&followed), canonical(&full));
    assert_eq!(store.epoch().await.unwrap().0, epoch1);

    let first = epoch_starts(&store).await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(first[0].details.contains(&epoch1), "{first:?}");

    // Restored again, to one revision back, and changed past the published version: the
    // later change must not be applied on top of what the store no longer has.
    let m = after.version;
    restore_to(&fx.url, m - 1, &[]).await;
    store
        .set_consumer_key_status(&a, &Selector::Name("leaked".into()), KeyStatus::Enabled)
        .await
        .unwrap();
    store
        .create_consumer(&a, consumer("restored-2"))
        .await
        .unwrap();
    assert_eq!(store.epoch().await.unwrap(), (epoch1.clone(), m + 1));
    let past = builder.refresh().await.unwrap();
    let (epoch2, _) = store.epoch().await.unwrap();
    assert_ne!(epoch2, epoch1, "another epoch started");
    let full =
        Snapshot::from_full(load_full_update(&store, None).await.unwrap(), store.keys()).unwrap();
    assert_eq!(canonical(&past), canonical(&full));
    assert_eq!(leaked_enabled(&past), Some(true));
    // (The restore took the first epoch's audit row with it; the new one is there.)
    let second = epoch_starts(&store).await;
    assert_eq!(second.len(), 1, "{second:?}");
    assert!(second[0].details.contains(&epoch2), "{second:?}");

    store.close().await;
    replica.close().await;
}

/// The store's `StartEpoch` audit rows: by the control plane, naming the other history.
async fn epoch_starts(store: &Store) -> Vec<keygate::domain::AuditEvent> {
    let page = keygate::store::PageRequest {
        size: 100,
        after: None,
    };
    let events = store
        .list_audit_events(&Default::default(), &page)
        .await
        .unwrap()
        .items;
    let starts: Vec<_> = events
        .into_iter()
        .filter(|e| e.action == "StartEpoch")
        .collect();
    for e in &starts {
        assert_eq!(e.actor, "keygate:control-plane", "{e:?}");
        assert!(e.details.contains("another"), "{e:?}");
    }
    starts
}

#[tokio::test]
async fn a_restore_changed_back_to_the_published_revision_starts_an_epoch_sqlite() {
    restore_changed_back("sqlite").await;
}

#[tokio::test]
async fn a_restore_changed_back_to_the_published_revision_starts_an_epoch_postgres() {
    restore_changed_back("postgres").await;
}
