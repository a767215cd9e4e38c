//! Budgets and rate limits of consumers and consumer keys (SPEC §8.3, issue 17) on both
//! backends: `limits` set at create, replaced by the update mask path `limits` (or cleared),
//! shown by Get and List with the current period's `spend`, audited as `limits`; limits
//! outside the rules refused naming the field, writing nothing; and the spend of each period
//! (DAY, WEEK from Monday, MONTH, TOTAL) summed exactly from applied usage reports, with time
//! as an input, across day, week, month and year boundaries. Each test runs the real
//! `keygate serve` on SQLite and on PostgreSQL (a fresh database each time) and reads spend
//! at chosen instants through a second `Store` on the same database.

mod common;

use common::admin::latest_revision;
use common::postgres::{Backend, fresh_postgres_database};
use common::{Admin, Keygate, Options};
use keygate::crypto::MasterKey;
use keygate::domain::limits::Spend;
use keygate::domain::usage::{UsageDelta, UsageReportInput};
use keygate::domain::{Limits as StoreLimits, ResourceKind, Selector, Timestamp};
use keygate::proto::admin::v1 as pb;
use keygate::store::Store;
use pb::limits::Period;
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

const MINUTE: i64 = 60_000_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;
/// 2030-01-01T00:00:00Z, a Tuesday.
const JAN_1_2030: i64 = 1_893_456_000_000_000;

/// 2030-`month`-`day` `hour`:`minute` UTC (January or February 2030).
fn utc(month: i64, day: i64, hour: i64, minute: i64) -> Timestamp {
    let days = match month {
        1 => day - 1,
        2 => 31 + day - 1,
        _ => unreachable!("January or February"),
    };
    Timestamp(JAN_1_2030 + days * DAY + hour * HOUR + minute * MINUTE)
}

// ------------------------------------------------------------------------------ fixture

/// `keygate serve` on a fresh store of `backend`, an admin client, and a second store handle
/// on the same database.
struct Env {
    _kg: Keygate,
    admin: Admin,
    store: Store,
    _tmp: tempfile::TempDir,
}

impl Env {
    async fn start(backend: Backend) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let url = match backend {
            Backend::Sqlite => format!("sqlite://{}", tmp.path().join("limits.db").display()),
            Backend::Postgres => fresh_postgres_database("kg_limits").await,
        };
        let kg = Keygate::start_with(Options {
            args: vec!["--store".into(), url.clone()],
            data_dir: Some(data_dir.clone()),
            ..Default::default()
        })
        .await;
        let master = MasterKey::load(&data_dir.join("master.key")).unwrap();
        let store = Store::open(
            &url,
            &master.fingerprint(),
            master.keys(),
            StoreLimits::default(),
        )
        .await
        .unwrap();
        let admin = kg.admin().await;
        Env {
            _kg: kg,
            admin,
            store,
            _tmp: tmp,
        }
    }
}

on_both_backends!(
    limits_are_set_at_create_replaced_by_the_mask_shown_and_audited,
    limits_outside_the_rules_are_refused_by_field_and_write_nothing,
    spend_counts_each_period_from_its_utc_start,
);

// ------------------------------------------------------------------------------ helpers

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

fn limits(usd: &str, tokens: u64, period: Period, rpm: u32, tpm: u64) -> Option<pb::Limits> {
    Some(pb::Limits {
        budget_usd: usd.into(),
        budget_tokens: tokens,
        budget_period: period as i32,
        requests_per_minute: rpm,
        tokens_per_minute: tpm,
    })
}

/// A service pricing gpt-4o at 2.50 USD per million input tokens and 10 per million output.
async fn create_service(admin: &mut Admin) -> Uuid {
    let s = admin
        .create_model_service(pb::CreateModelServiceRequest {
            name: "openai".into(),
            provider: "openai".into(),
            pricing: vec![pb::ModelPrice {
                model: "gpt-4o".into(),
                input_per_mtok: "2.50".into(),
                output_per_mtok: "10".into(),
                cached_input_per_mtok: String::new(),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    Uuid::parse_str(&s.id).unwrap()
}

async fn create_consumer(admin: &mut Admin, name: &str, l: Option<pb::Limits>) -> pb::Consumer {
    admin
        .create_consumer(pb::CreateConsumerRequest {
            name: name.into(),
            limits: l,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("CreateConsumer {name}: {e}"))
        .into_inner()
}

async fn create_key(
    admin: &mut Admin,
    name: &str,
    consumer: &str,
    l: Option<pb::Limits>,
) -> pb::ConsumerKey {
    admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: name.into(),
            consumer: consumer.into(),
            limits: l,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("CreateConsumerKey {name}: {e}"))
        .into_inner()
        .key
        .unwrap()
}

async fn get_key(admin: &mut Admin, name: &str) -> Result<pb::ConsumerKey, tonic::Status> {
    admin
        .get_consumer_key(pb::GetConsumerKeyRequest {
            selector: Some(pb::get_consumer_key_request::Selector::Name(name.into())),
        })
        .await
        .map(|r| r.into_inner())
}

async fn get_consumer(admin: &mut Admin, name: &str) -> Result<pb::Consumer, tonic::Status> {
    admin
        .get_consumer(pb::GetConsumerRequest {
            selector: Some(pb::get_consumer_request::Selector::Name(name.into())),
        })
        .await
        .map(|r| r.into_inner())
}

async fn update_key(
    admin: &mut Admin,
    name: &str,
    key: pb::ConsumerKey,
    paths: &[&str],
) -> Result<pb::ConsumerKey, tonic::Status> {
    admin
        .update_consumer_key(pb::UpdateConsumerKeyRequest {
            selector: Some(pb::update_consumer_key_request::Selector::Name(name.into())),
            consumer_key: Some(key),
            update_mask: if paths.is_empty() { None } else { mask(paths) },
        })
        .await
        .map(|r| r.into_inner())
}

async fn update_consumer(
    admin: &mut Admin,
    name: &str,
    consumer: pb::Consumer,
    paths: &[&str],
) -> Result<pb::Consumer, tonic::Status> {
    admin
        .update_consumer(pb::UpdateConsumerRequest {
            selector: Some(pb::update_consumer_request::Selector::Name(name.into())),
            consumer: Some(consumer),
            update_mask: mask(paths),
        })
        .await
        .map(|r| r.into_inner())
}

/// The fields of the BadRequest violations of an INVALID_ARGUMENT, each named in the message.
fn violations(r: Result<impl std::fmt::Debug, tonic::Status>, what: &str) -> Vec<String> {
    let s = r.expect_err(what);
    assert_eq!(s.code(), Code::InvalidArgument, "{what}: {}", s.message());
    let bad = s
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("{what}: no BadRequest details: {}", s.message()));
    let fields: Vec<String> = bad
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    for f in &fields {
        assert!(
            s.message().contains(f.as_str()),
            "{what}: {f} in {}",
            s.message()
        );
    }
    fields
}

/// (action, resource, changed fields) of the audit trail, newest first.
async fn audit(admin: &mut Admin) -> Vec<(String, String, Vec<String>)> {
    admin
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .items
        .into_iter()
        .map(|e| (e.action, e.resource_name, e.changed_fields))
        .collect()
}

/// A usage report of `rows` at `time`, applied with the control plane's clock at `time`.
async fn report(store: &Store, sequence: u64, time: Timestamp, rows: Vec<UsageDelta>) {
    let r = UsageReportInput {
        data_plane: Uuid::from_u128(0xd1),
        sequence,
        time,
        rows,
    };
    store
        .apply_usage_report(&r, time)
        .await
        .unwrap_or_else(|e| panic!("report {sequence}: {e}"));
}

// ------------------------------------------------------------------------------ scenarios

async fn limits_are_set_at_create_replaced_by_the_mask_shown_and_audited(backend: Backend) {
    let mut env = Env::start(backend).await;
    let admin = &mut env.admin;
    let service = create_service(admin).await;

    // Created with limits: shown canonically, with the spend of the period under way.
    let c = create_consumer(admin, "app", limits("100.50", 0, Period::Month, 600, 0)).await;
    assert_eq!(
        c.limits,
        limits("100.5", 0, Period::Month, 600, 0),
        "the budget in canonical form"
    );
    let spend = c.spend.expect("a consumer with a budget shows its spend");
    assert_eq!((spend.cost_usd.as_str(), spend.tokens), ("0", 0));
    assert!(!spend.exhausted);
    let (start, end) = (spend.period_start.unwrap(), spend.period_end.unwrap());
    assert!(start.seconds < end.seconds && end.seconds - start.seconds >= 28 * 86_400);
    let k = create_key(
        admin,
        "k1",
        "app",
        limits("", 5_000, Period::Total, 0, 90_000),
    )
    .await;
    assert_eq!(k.limits, limits("", 5_000, Period::Total, 0, 90_000));
    let spend = k
        .spend
        .clone()
        .expect("a key with a budget shows its spend");
    assert_eq!(
        spend.period_start.unwrap().seconds,
        0,
        "TOTAL: from the epoch"
    );
    assert_eq!(spend.period_end, None, "TOTAL never ends");
    // No limits: neither limits nor spend in the answer.
    let plain = create_key(admin, "k2", "app", None).await;
    assert_eq!((plain.limits, plain.spend), (None, None));
    let rpm_only = create_key(admin, "k3", "", limits("", 0, Period::Unspecified, 60, 0)).await;
    assert_eq!(
        rpm_only.spend, None,
        "no budget, no period to count spend in"
    );

    // Usage now: Get shows it as spend, exactly, and exhausted at the token budget.
    let now = Timestamp::now();
    let row = |key: &pb::ConsumerKey, input: u64, output: u64| UsageDelta {
        consumer_key: Uuid::parse_str(&key.id).unwrap(),
        consumer: Some(Uuid::parse_str(&c.id).unwrap()),
        model_service: service,
        model: "gpt-4o".into(),
        requests: 1,
        input_tokens: input,
        output_tokens: output,
        ..Default::default()
    };
    report(&env.store, 1, now, vec![row(&k, 4_000, 1_000)]).await;
    let k1 = get_key(admin, "k1").await.unwrap();
    let spend = k1.spend.clone().unwrap();
    // 4000 × 2.50 + 1000 × 10 per million = 0.01 + 0.01 USD.
    assert_eq!((spend.cost_usd.as_str(), spend.tokens), ("0.02", 5_000));
    assert!(spend.exhausted, "5000 tokens reach the 5000-token budget");
    let app = get_consumer(admin, "app").await.unwrap();
    let spend = app.spend.clone().unwrap();
    assert_eq!((spend.cost_usd.as_str(), spend.tokens), ("0.02", 5_000));
    assert!(!spend.exhausted, "0.02 of 100.5 USD");

    // List shows limits and spend too.
    let items = admin
        .list_consumer_keys(pb::ListConsumerKeysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    let listed = items.iter().find(|i| i.name == "k1").unwrap();
    assert_eq!((&listed.limits, &listed.spend), (&k1.limits, &k1.spend));
    let consumers = admin
        .list_consumers(pb::ListConsumersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(consumers[0].spend, app.spend);

    // The mask path "limits" replaces them all: what is left out is no longer limited.
    let key = |l: Option<pb::Limits>| pb::ConsumerKey {
        limits: l,
        ..Default::default()
    };
    let raised = update_key(
        admin,
        "k1",
        key(limits("0.05", 0, Period::Day, 120, 0)),
        &["limits"],
    )
    .await
    .unwrap();
    assert_eq!(raised.limits, limits("0.05", 0, Period::Day, 120, 0));
    let spend = raised.spend.unwrap();
    assert!(
        !spend.exhausted,
        "raising (replacing) a budget re-opens the key"
    );
    assert_eq!(
        spend.period_end.unwrap().seconds - spend.period_start.unwrap().seconds,
        86_400
    );
    // Without a mask, limits set in the resource are updated (nothing else changes).
    let again = update_key(
        admin,
        "k1",
        key(limits("", 0, Period::Unspecified, 7, 0)),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(again.limits, limits("", 0, Period::Unspecified, 7, 0));
    assert_eq!(again.spend, None);
    // The mask with no limits in the resource removes them.
    let cleared = update_key(admin, "k1", key(None), &["limits"])
        .await
        .unwrap();
    assert_eq!((cleared.limits, cleared.spend), (None, None));
    let consumer = pb::Consumer {
        limits: limits("", 1_000_000, Period::Week, 0, 10_000),
        ..Default::default()
    };
    let app = update_consumer(admin, "app", consumer, &["limits"])
        .await
        .unwrap();
    assert_eq!(app.limits, limits("", 1_000_000, Period::Week, 0, 10_000));
    let week = app.spend.unwrap();
    assert_eq!(
        week.period_end.unwrap().seconds - week.period_start.unwrap().seconds,
        7 * 86_400
    );
    // 1970-01-05 was a Monday: every week starts a multiple of 7 days after it.
    assert_eq!(
        (week.period_start.unwrap().seconds - 4 * 86_400) % (7 * 86_400),
        0
    );

    // `spend` is output only.
    let fields = violations(
        update_key(admin, "k2", key(None), &["spend"]).await,
        "mask path spend",
    );
    assert_eq!(fields, ["update_mask.paths[spend]"]);

    // Audited as "limits", never a value.
    let trail = audit(admin).await;
    let has = |action: &str, name: &str| {
        trail
            .iter()
            .filter(|(a, n, _)| a == action && n == name)
            .all(|(_, _, f)| f.iter().any(|f| f == "limits"))
            && trail.iter().any(|(a, n, _)| a == action && n == name)
    };
    assert!(has("CreateConsumer", "app"), "{trail:?}");
    assert!(has("CreateConsumerKey", "k1"), "{trail:?}");
    assert!(has("UpdateConsumerKey", "k1"), "{trail:?}");
    assert!(has("UpdateConsumer", "app"), "{trail:?}");
    let k2 = trail
        .iter()
        .find(|(a, n, _)| a == "CreateConsumerKey" && n == "k2")
        .unwrap();
    assert!(
        !k2.2.iter().any(|f| f == "limits"),
        "no limits, not audited"
    );
}

async fn limits_outside_the_rules_are_refused_by_field_and_write_nothing(backend: Backend) {
    let mut env = Env::start(backend).await;
    let admin = &mut env.admin;
    create_consumer(admin, "app", None).await;
    create_key(admin, "k", "", limits("10", 0, Period::Day, 5, 0)).await;
    let revision = latest_revision(admin).await;

    // Creates: each broken rule named, all of them at once, nothing created.
    let cases: &[(Option<pb::Limits>, &[&str])] = &[
        (
            limits("1.0000001", 0, Period::Day, 0, 0),
            &["limits.budget_usd"],
        ),
        (limits("-5", 0, Period::Day, 0, 0), &["limits.budget_usd"]),
        (limits("1e3", 0, Period::Day, 0, 0), &["limits.budget_usd"]),
        (
            limits("1000000001", 0, Period::Day, 0, 0),
            &["limits.budget_usd"],
        ),
        (
            limits("10", 0, Period::Unspecified, 0, 0),
            &["limits.budget_period"],
        ),
        (
            limits("", 10, Period::Unspecified, 0, 0),
            &["limits.budget_period"],
        ),
        (
            limits("", 0, Period::Week, 60, 0),
            &["limits.budget_period"],
        ),
        (
            limits("0", 0, Period::Week, 0, 0),
            &["limits.budget_period"],
        ),
        (
            limits("", 1_000_000_000_000_001, Period::Total, 0, 0),
            &["limits.budget_tokens"],
        ),
        (
            limits("", 0, Period::Unspecified, 0, 1_000_000_000_001),
            &["limits.tokens_per_minute"],
        ),
        (
            limits("x", 0, Period::Unspecified, 0, 1_000_000_000_001),
            &[
                "limits.budget_usd",
                "limits.budget_period",
                "limits.tokens_per_minute",
            ],
        ),
    ];
    for (l, want) in cases {
        let r = admin
            .create_consumer_key(pb::CreateConsumerKeyRequest {
                name: "new-key".into(),
                limits: l.clone(),
                ..Default::default()
            })
            .await;
        assert_eq!(violations(r, &format!("{l:?}")), *want, "{l:?}");
        let r = admin
            .create_consumer(pb::CreateConsumerRequest {
                name: "new-consumer".into(),
                limits: l.clone(),
                ..Default::default()
            })
            .await;
        assert_eq!(violations(r, &format!("{l:?}")), *want, "{l:?}");
    }
    // An unknown period number, and a bad name beside bad limits: every field at once.
    let mut unknown = limits("10", 0, Period::Day, 0, 0).unwrap();
    unknown.budget_period = 9;
    let r = admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "1bad".into(),
            limits: Some(unknown),
            ..Default::default()
        })
        .await;
    assert_eq!(
        violations(r, "bad name and period"),
        ["name", "limits.budget_period"]
    );
    assert_eq!(
        get_key(admin, "new-key").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        get_consumer(admin, "new-consumer")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Updates: the path inside the resource, and the stored limits unchanged.
    let key = pb::ConsumerKey {
        limits: limits("0.0000001", 0, Period::Day, 0, 0),
        ..Default::default()
    };
    let fields = violations(update_key(admin, "k", key, &["limits"]).await, "update key");
    assert_eq!(fields, ["consumer_key.limits.budget_usd"]);
    let consumer = pb::Consumer {
        limits: limits("5", 0, Period::Unspecified, 0, 0),
        ..Default::default()
    };
    let fields = violations(
        update_consumer(admin, "app", consumer, &["limits"]).await,
        "update consumer",
    );
    assert_eq!(fields, ["consumer.limits.budget_period"]);
    let fields = violations(
        update_key(
            admin,
            "k",
            pb::ConsumerKey::default(),
            &["limits.budget_usd"],
        )
        .await,
        "a path inside limits",
    );
    assert_eq!(fields, ["update_mask.paths[limits.budget_usd]"]);
    assert_eq!(
        get_key(admin, "k").await.unwrap().limits,
        limits("10", 0, Period::Day, 5, 0)
    );
    assert_eq!(get_consumer(admin, "app").await.unwrap().limits, None);
    assert_eq!(
        latest_revision(admin).await,
        revision,
        "no refused request wrote a revision or an audit row"
    );
}

/// Usage on both sides of each boundary (a Sunday and the Monday after, the last hour of
/// January and the first of February), read back at instants chosen on both sides too.
async fn spend_counts_each_period_from_its_utc_start(backend: Backend) {
    let mut env = Env::start(backend).await;
    let admin = &mut env.admin;
    let service = create_service(admin).await;
    let app = create_consumer(admin, "app", limits("1", 0, Period::Month, 0, 0)).await;
    let app_id = Uuid::parse_str(&app.id).unwrap();
    // One key per period; `day` has a USD budget, `week` a token budget, `total` both.
    let mut keys = Vec::new();
    for (name, l) in [
        ("day", limits("0.1", 0, Period::Day, 0, 0)),
        ("week", limits("", 10_000, Period::Week, 0, 0)),
        ("month", limits("100", 0, Period::Month, 0, 0)),
        ("total", limits("0.35", 1_000_000, Period::Total, 0, 0)),
    ] {
        let k = create_key(admin, name, "app", l).await;
        keys.push((name, Uuid::parse_str(&k.id).unwrap()));
    }
    // A key not bound to the consumer: its usage is its own, never the consumer's.
    let lone = create_key(admin, "lone", "", limits("1", 0, Period::Total, 0, 0)).await;
    let lone = Uuid::parse_str(&lone.id).unwrap();

    let rows = |input: u64, output: u64| -> Vec<UsageDelta> {
        let mut rows: Vec<UsageDelta> = keys
            .iter()
            .map(|(_, id)| UsageDelta {
                consumer_key: *id,
                consumer: Some(app_id),
                model_service: service,
                model: "gpt-4o".into(),
                requests: 1,
                input_tokens: input,
                output_tokens: output,
                ..Default::default()
            })
            .collect();
        rows.push(UsageDelta {
            consumer_key: lone,
            consumer: None,
            ..rows[0].clone()
        });
        rows
    };
    // At 2.50 USD per million input tokens and 10 per million output:
    // u1 Sunday 2030-01-06 12:00, 100 000 input: 0.25 USD;
    // u2 Monday 2030-01-07 00:30, 10 000 output: 0.1 USD;
    // u3 Thursday 2030-01-31 23:00, 1 000 input: 0.0025 USD;
    // u4 Friday 2030-02-01 00:10, 1 output: 0.00001 USD.
    report(&env.store, 1, utc(1, 6, 12, 0), rows(100_000, 0)).await;
    report(&env.store, 2, utc(1, 7, 0, 30), rows(0, 10_000)).await;
    report(&env.store, 3, utc(1, 31, 23, 0), rows(1_000, 0)).await;
    report(&env.store, 4, utc(2, 1, 0, 10), rows(0, 1)).await;

    let spend = |kind: ResourceKind, name: &'static str, now: Timestamp| {
        let store = env.store.clone();
        async move {
            store
                .spend(kind, &Selector::Name(name.into()), now)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{name} has a budget"))
        }
    };
    let key = |name, now| spend(ResourceKind::ConsumerKey, name, now);
    let show = |s: &Spend| (s.cost.to_string(), s.tokens, s.exhausted);
    let period = |s: &Spend| (s.period_start, s.period_end);

    // Sunday 23:59: the week is the one from Monday 2029-12-31, the month January.
    let sunday = utc(1, 6, 23, 59);
    let s = key("day", sunday).await;
    assert_eq!(period(&s), (utc(1, 6, 0, 0), Some(utc(1, 7, 0, 0))));
    assert_eq!(show(&s), ("0.25".into(), 100_000, true), "0.25 ≥ 0.1");
    let s = key("week", sunday).await;
    assert_eq!(
        period(&s),
        (Timestamp(utc(1, 1, 0, 0).0 - DAY), Some(utc(1, 7, 0, 0)))
    );
    assert_eq!(
        show(&s),
        ("0.25".into(), 100_000, true),
        "10 000 tokens reached"
    );
    let s = key("total", sunday).await;
    assert_eq!(period(&s), (Timestamp(0), None));
    assert_eq!(show(&s), ("0.25".into(), 100_000, false));

    // Monday 10:00: a new day and a new week; the month and the total keep counting.
    let monday = utc(1, 7, 10, 0);
    let s = key("day", monday).await;
    assert_eq!(
        show(&s),
        ("0.1".into(), 10_000, true),
        "0.1 reaches 0.1 exactly"
    );
    let s = key("week", monday).await;
    assert_eq!(period(&s), (utc(1, 7, 0, 0), Some(utc(1, 14, 0, 0))));
    assert_eq!(show(&s), ("0.1".into(), 10_000, true));
    let s = key("month", monday).await;
    assert_eq!(period(&s), (utc(1, 1, 0, 0), Some(utc(2, 1, 0, 0))));
    assert_eq!(show(&s), ("0.35".into(), 110_000, false));
    let s = key("total", monday).await;
    assert_eq!(show(&s), ("0.35".into(), 110_000, true), "0.35 USD reached");

    // The last hour of January.
    let jan31 = utc(1, 31, 23, 30);
    assert_eq!(
        show(&key("day", jan31).await),
        ("0.0025".into(), 1_000, false)
    );
    let s = key("week", jan31).await;
    assert_eq!(period(&s), (utc(1, 28, 0, 0), Some(utc(2, 4, 0, 0))));
    assert_eq!(show(&s), ("0.0025".into(), 1_000, false));
    assert_eq!(
        show(&key("month", jan31).await),
        ("0.3525".into(), 111_000, false)
    );

    // The first hour of February: a new day and month, the same week (Monday 01-28).
    let feb1 = utc(2, 1, 1, 0);
    assert_eq!(show(&key("day", feb1).await), ("0.00001".into(), 1, false));
    assert_eq!(
        show(&key("week", feb1).await),
        ("0.00251".into(), 1_001, false)
    );
    let s = key("month", feb1).await;
    assert_eq!(
        period(&s),
        (
            utc(2, 1, 0, 0),
            Some(Timestamp(utc(2, 1, 0, 0).0 + 28 * DAY))
        )
    );
    assert_eq!(show(&s), ("0.00001".into(), 1, false));
    assert_eq!(
        show(&key("total", feb1).await),
        ("0.35251".into(), 111_001, true)
    );

    // The consumer: its four keys' usage (never the unbound key's), against its own budget.
    let consumer = |now| spend(ResourceKind::Consumer, "app", now);
    assert_eq!(
        show(&consumer(monday).await),
        ("1.4".into(), 440_000, true),
        "4 × 0.35 USD ≥ 1"
    );
    assert_eq!(
        show(&consumer(feb1).await),
        ("0.00004".into(), 4, false),
        "a new month"
    );
    assert_eq!(
        show(&key("lone", feb1).await),
        ("0.35251".into(), 111_001, false)
    );

    // Before any usage: nothing spent.
    let before = utc(1, 6, 11, 59);
    assert_eq!(show(&key("total", before).await), ("0".into(), 0, false));
    // The spend of a resource without a budget is none; of another kind, refused.
    let plain = create_key(admin, "plain", "", None).await;
    assert_eq!(
        env.store
            .spend(ResourceKind::ConsumerKey, &Selector::Id(plain.id), feb1)
            .await
            .unwrap(),
        None
    );
    assert!(
        env.store
            .spend(
                ResourceKind::ModelService,
                &Selector::Name("openai".into()),
                feb1
            )
            .await
            .is_err()
    );
}
