//! Usage and spend (SPEC §8.2) on both backends: model service pricing through the admin API
//! (set, replaced, shown, audited, refused by field), usage reports applied exactly once (a
//! resend, an older sequence, two control planes at once), priced at arrival, and `GetUsage`
//! summing them exactly per hour, day or in total, grouped and filtered, deleted resources
//! included. Each test runs the real `keygate serve` on SQLite and on PostgreSQL (a fresh
//! database each time), and applies reports through a second `Store` on the same database, as
//! a second control plane would (`ReportUsage` is the distribution server's).

mod common;

use std::collections::BTreeMap;

use common::postgres::{Backend, fresh_postgres_database};
use common::{Admin, Keygate, Options};
use keygate::crypto::MasterKey;
use keygate::domain::usage::{UsageApplied, UsageDelta, UsageReportInput};
use keygate::domain::{Limits, RuleError, Timestamp};
use keygate::proto::admin::v1 as pb;
use keygate::store::{Store, StoreError};
use pb::get_usage_request::Granularity;
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;
/// 2030-01-01T00:00:00Z, a UTC midnight: every test's clock starts here.
const T0: i64 = 1_893_456_000_000_000;

fn at(hours: i64, micros: i64) -> Timestamp {
    Timestamp(T0 + hours * HOUR + micros)
}

fn pb_ts(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.0.div_euclid(1_000_000),
        nanos: (t.0.rem_euclid(1_000_000) * 1000) as i32,
    }
}

// ------------------------------------------------------------------------------ fixture

/// `keygate serve` on a fresh store of `backend`, an admin client, and a second store handle
/// on the same database (a second control plane).
struct Env {
    kg: Keygate,
    admin: Admin,
    store: Store,
    url: String,
    master: MasterKey,
    _tmp: tempfile::TempDir,
}

impl Env {
    async fn start(backend: Backend) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let url = match backend {
            Backend::Sqlite => format!("sqlite://{}", tmp.path().join("usage.db").display()),
            Backend::Postgres => fresh_postgres_database("kg_usage").await,
        };
        let kg = Keygate::start_with(Options {
            args: vec!["--store".into(), url.clone()],
            data_dir: Some(data_dir.clone()),
            ..Default::default()
        })
        .await;
        let master = MasterKey::load(&data_dir.join("master.key")).unwrap();
        let store = open(&url, &master).await;
        let admin = kg.admin().await;
        Env {
            kg,
            admin,
            store,
            url,
            master,
            _tmp: tmp,
        }
    }

    async fn second_store(&self) -> Store {
        open(&self.url, &self.master).await
    }
}

async fn open(url: &str, master: &MasterKey) -> Store {
    Store::open(url, &master.fingerprint(), master.keys(), Limits::default())
        .await
        .unwrap()
}

on_both_backends!(
    pricing_is_set_at_create_replaced_by_update_shown_and_audited,
    bad_prices_are_refused_naming_the_field_and_change_nothing,
    usage_totals_are_exact_grouped_by_every_dimension,
    hour_day_and_total_split_time_in_utc_hours_and_days,
    a_report_is_applied_once_however_often_it_is_resent,
    two_control_planes_applying_the_same_report_apply_it_once,
    a_price_change_applies_only_to_usage_arriving_after_it,
    usage_of_a_model_without_a_price_costs_nothing_and_is_counted_unpriced,
    deleted_resources_usage_stays_queryable_by_name_and_id,
    a_viewer_can_get_usage,
    usage_queries_outside_the_rules_are_refused_naming_the_field,
    costs_are_exact_to_the_picodollar,
    a_report_outside_the_rules_is_refused_and_changes_nothing,
    idle_data_planes_cursors_are_pruned,
);

// ------------------------------------------------------------------------------ helpers

fn price(model: &str, input: &str, output: &str, cached: &str) -> pb::ModelPrice {
    pb::ModelPrice {
        model: model.into(),
        input_per_mtok: input.into(),
        output_per_mtok: output.into(),
        cached_input_per_mtok: cached.into(),
    }
}

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

fn id(s: &str) -> Uuid {
    Uuid::parse_str(s).unwrap()
}

async fn create_service(admin: &mut Admin, name: &str, pricing: Vec<pb::ModelPrice>) -> Uuid {
    let s = admin
        .create_model_service(pb::CreateModelServiceRequest {
            name: name.into(),
            provider: "openai".into(),
            pricing,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("CreateModelService {name}: {e}"))
        .into_inner();
    id(&s.id)
}

async fn set_pricing(admin: &mut Admin, service: &str, pricing: Vec<pb::ModelPrice>) {
    admin
        .update_model_service(pb::UpdateModelServiceRequest {
            selector: Some(pb::update_model_service_request::Selector::Name(
                service.into(),
            )),
            model_service: Some(pb::ModelService {
                pricing,
                ..Default::default()
            }),
            update_mask: mask(&["pricing"]),
        })
        .await
        .unwrap_or_else(|e| panic!("UpdateModelService {service} pricing: {e}"));
}

async fn get_service(admin: &mut Admin, name: &str) -> Result<pb::ModelService, tonic::Status> {
    admin
        .get_model_service(pb::GetModelServiceRequest {
            selector: Some(pb::get_model_service_request::Selector::Name(name.into())),
        })
        .await
        .map(|r| r.into_inner())
}

async fn create_consumer(admin: &mut Admin, name: &str) -> Uuid {
    let c = admin
        .create_consumer(pb::CreateConsumerRequest {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("CreateConsumer {name}: {e}"))
        .into_inner();
    id(&c.id)
}

async fn create_key(admin: &mut Admin, name: &str, consumer: &str) -> Uuid {
    let k = admin
        .create_consumer_key(pb::CreateConsumerKeyRequest {
            name: name.into(),
            generation_method: pb::GenerationMethod::Auto as i32,
            consumer: consumer.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("CreateConsumerKey {name}: {e}"))
        .into_inner();
    id(&k.key.unwrap().id)
}

/// Usage of `key` (bound to `consumer`) on `service`'s `model`.
fn delta(key: Uuid, consumer: Option<Uuid>, service: Uuid, model: &str) -> UsageDelta {
    UsageDelta {
        consumer_key: key,
        consumer,
        model_service: service,
        model: model.into(),
        ..Default::default()
    }
}

/// `requests` requests with `input` input tokens (`cached` of them cached) and `output`.
fn tokens(d: UsageDelta, requests: u64, input: u64, cached: u64, output: u64) -> UsageDelta {
    UsageDelta {
        requests,
        input_tokens: input,
        cached_input_tokens: cached,
        output_tokens: output,
        ..d
    }
}

fn report(dp: Uuid, sequence: u64, time: Timestamp, rows: Vec<UsageDelta>) -> UsageReportInput {
    UsageReportInput {
        data_plane: dp,
        sequence,
        time,
        rows,
    }
}

async fn apply(store: &Store, r: &UsageReportInput, now: Timestamp) -> UsageApplied {
    store
        .apply_usage_report(r, now)
        .await
        .unwrap_or_else(|e| panic!("apply report {}: {e}", r.sequence))
}

fn applied(a: &UsageApplied) -> bool {
    matches!(a, UsageApplied::Applied(_))
}

/// A GetUsage request: `group_by` names, granularity, range in hours from T0 (None: unset).
fn query(group_by: &[&str], g: Granularity, range: Option<(i64, i64)>) -> pb::GetUsageRequest {
    pb::GetUsageRequest {
        group_by: group_by.iter().map(|s| s.to_string()).collect(),
        granularity: g as i32,
        start_time: range.map(|(s, _)| pb_ts(at(s, 0))),
        end_time: range.map(|(_, e)| pb_ts(at(e, 0))),
        ..Default::default()
    }
}

async fn usage(admin: &mut Admin, q: pb::GetUsageRequest) -> Vec<pb::UsageRow> {
    admin
        .get_usage(q.clone())
        .await
        .unwrap_or_else(|e| panic!("GetUsage {q:?}: {e}"))
        .into_inner()
        .rows
}

/// A row's sums: (requests, input, output, cached, cost).
type Sums = (u64, u64, u64, u64, String);

fn sums(r: &pb::UsageRow) -> Sums {
    (
        r.requests,
        r.input_tokens,
        r.output_tokens,
        r.cached_input_tokens,
        r.cost_usd.clone(),
    )
}

fn sums_of(s: (u64, u64, u64, u64, &str)) -> Sums {
    (s.0, s.1, s.2, s.3, s.4.to_string())
}

/// The one row of an ungrouped TOTAL query.
async fn total(admin: &mut Admin) -> Sums {
    let rows = usage(admin, query(&[], Granularity::Total, None)).await;
    assert_eq!(rows.len(), 1, "one total row: {rows:?}");
    sums(&rows[0])
}

fn hour_of(r: &pb::UsageRow) -> i64 {
    let t = r.start_time.as_ref().expect("a period");
    (t.seconds * 1_000_000 - T0) / HOUR
}

fn assert_invalid(s: &tonic::Status, field: &str, what: &str) -> String {
    assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
    let bad = s
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("{what}: no BadRequest details: {s:?}"));
    let v = bad
        .field_violations
        .iter()
        .find(|v| v.field == field)
        .unwrap_or_else(|| {
            panic!(
                "{what}: no violation on {field:?}: {:?}",
                bad.field_violations
            )
        });
    assert!(s.message().contains(field), "{what}: {}", s.message());
    v.description.clone()
}

/// The audit trail's events (newest first) as (action, resource name, changed fields).
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

/// Two consumers, three keys and two priced services; answers their ids by name.
async fn seed(admin: &mut Admin) -> BTreeMap<&'static str, Uuid> {
    let mut ids = BTreeMap::new();
    ids.insert(
        "openai",
        create_service(
            admin,
            "openai",
            vec![
                price("gpt-4o", "2.50", "10", "1.25"),
                price("gpt-4o-mini", "0.15", "0.60", ""),
            ],
        )
        .await,
    );
    ids.insert(
        "anthropic",
        create_service(
            admin,
            "anthropic",
            vec![price("claude-*", "3", "15", "0.30")],
        )
        .await,
    );
    ids.insert("billing", create_consumer(admin, "billing").await);
    ids.insert("support", create_consumer(admin, "support").await);
    ids.insert("billing-1", create_key(admin, "billing-1", "billing").await);
    ids.insert("billing-2", create_key(admin, "billing-2", "billing").await);
    ids.insert("support-1", create_key(admin, "support-1", "support").await);
    ids
}

// ------------------------------------------------------------------------------ pricing

async fn pricing_is_set_at_create_replaced_by_update_shown_and_audited(b: Backend) {
    let mut env = Env::start(b).await;
    let admin = &mut env.admin;
    create_service(
        admin,
        "openai",
        vec![
            price("gpt-4o", "2.50", "10.00", "1.250000"),
            price("o3-*", "2", "8", ""),
        ],
    )
    .await;
    let s = get_service(admin, "openai").await.unwrap();
    assert_eq!(
        s.pricing,
        [
            price("gpt-4o", "2.5", "10", "1.25"),
            price("o3-*", "2", "8", ""),
        ],
        "prices shown as exact canonical decimals; an empty cached price stays empty"
    );
    let listed = admin
        .list_model_services(pb::ListModelServicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(listed[0].pricing, s.pricing, "List shows the prices too");
    let events = audit(admin).await;
    assert_eq!(events[0].0, "CreateModelService");
    assert!(events[0].2.contains(&"pricing".to_string()), "{events:?}");

    // The path `pricing` replaces the whole list.
    set_pricing(admin, "openai", vec![price("*", "0.000001", "0", "0")]).await;
    let s = get_service(admin, "openai").await.unwrap();
    assert_eq!(s.pricing, [price("*", "0.000001", "0", "0")]);
    assert_eq!(s.description, "", "nothing else changed");
    let events = audit(admin).await;
    assert_eq!(
        (events[0].0.as_str(), events[0].2.clone()),
        ("UpdateModelService", vec!["pricing".to_string()])
    );
    // Without a mask, a non-empty list in the resource is the update.
    admin
        .update_model_service(pb::UpdateModelServiceRequest {
            selector: Some(pb::update_model_service_request::Selector::Name(
                "openai".into(),
            )),
            model_service: Some(pb::ModelService {
                pricing: vec![price("gpt-4.1", "2", "8", "")],
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap();
    assert_eq!(
        get_service(admin, "openai").await.unwrap().pricing,
        [price("gpt-4.1", "2", "8", "")]
    );
    // With the path and an empty list, the prices are removed.
    set_pricing(admin, "openai", vec![]).await;
    assert!(
        get_service(admin, "openai")
            .await
            .unwrap()
            .pricing
            .is_empty()
    );
}

async fn bad_prices_are_refused_naming_the_field_and_change_nothing(b: Backend) {
    let mut env = Env::start(b).await;
    let admin = &mut env.admin;
    let before = audit(admin).await.len();
    let s = admin
        .create_model_service(pb::CreateModelServiceRequest {
            name: "openai".into(),
            pricing: vec![
                price("gpt-4o", "2.50", "10", ""),
                price("gpt-4o-mini", "0.15", "-1", ""),
                price("gpt-4o", "1", "1", ""),
                price("o3-*", "", "8", "0.0000001"),
                price("gpt-*-mini", "1", "1e3", ""),
                price("o1", "10000.01", "1", ""),
            ],
            ..Default::default()
        })
        .await
        .unwrap_err();
    let why = assert_invalid(&s, "pricing[1].output_per_mtok", "negative");
    assert!(why.contains("negative"), "{why}");
    let why = assert_invalid(&s, "pricing[2].model", "duplicate pattern");
    assert!(why.contains("twice"), "{why}");
    let why = assert_invalid(&s, "pricing[3].input_per_mtok", "missing input price");
    assert!(why.contains("required"), "{why}");
    let why = assert_invalid(&s, "pricing[3].cached_input_per_mtok", "7 digits");
    assert!(why.contains("6 fractional digits"), "{why}");
    assert_invalid(&s, "pricing[4].model", "'*' inside a pattern");
    assert_invalid(&s, "pricing[4].output_per_mtok", "an exponent");
    let why = assert_invalid(&s, "pricing[5].input_per_mtok", "above the maximum");
    assert!(why.contains("at most 10000"), "{why}");
    assert_eq!(
        get_service(admin, "openai").await.unwrap_err().code(),
        Code::NotFound,
        "nothing created"
    );
    assert_eq!(audit(admin).await.len(), before, "nothing audited");

    create_service(admin, "openai", vec![price("gpt-4o", "2.50", "10", "")]).await;
    let before = get_service(admin, "openai").await.unwrap();
    let s = admin
        .update_model_service(pb::UpdateModelServiceRequest {
            selector: Some(pb::update_model_service_request::Selector::Name(
                "openai".into(),
            )),
            model_service: Some(pb::ModelService {
                description: "new".into(),
                pricing: vec![price("gpt-4o", "two", "10", "")],
                ..Default::default()
            }),
            update_mask: mask(&["description", "pricing"]),
        })
        .await
        .unwrap_err();
    assert_invalid(&s, "model_service.pricing[0].input_per_mtok", "update");
    assert_eq!(
        get_service(admin, "openai").await.unwrap(),
        before,
        "a refused update changes nothing, not even the description"
    );
}

// ------------------------------------------------------------------------------ usage

async fn usage_totals_are_exact_grouped_by_every_dimension(b: Backend) {
    let mut env = Env::start(b).await;
    let ids = seed(&mut env.admin).await;
    let (openai, anthropic) = (ids["openai"], ids["anthropic"]);
    let (billing, support) = (Some(ids["billing"]), Some(ids["support"]));
    let rows = vec![
        // gpt-4o: 800 × 2.50 + 200 × 1.25 + 500 × 10 = 7250 µ$/M-units → 0.00725 USD
        tokens(
            delta(ids["billing-1"], billing, openai, "gpt-4o"),
            2,
            1000,
            200,
            500,
        ),
        // gpt-4o-mini (no cached price: the input price): 1000 × 0.15 + 100 × 0.60 = 210 → 0.00021
        tokens(
            delta(ids["billing-2"], billing, openai, "gpt-4o-mini"),
            1,
            1000,
            300,
            100,
        ),
        // claude-sonnet-4 by prefix: 100 × 3 + 1000 × 0.30 + 10 × 15 = 750 → 0.00075
        tokens(
            delta(ids["support-1"], support, anthropic, "claude-sonnet-4"),
            3,
            1100,
            1000,
            10,
        ),
        // The same key and model again in the same report: summed into one bucket.
        tokens(
            delta(ids["billing-1"], billing, openai, "gpt-4o"),
            1,
            1000,
            200,
            500,
        ),
    ];
    let r = report(Uuid::now_v7(), 1, at(2, 5), rows);
    assert!(applied(&apply(&env.store, &r, at(3, 0)).await));
    let admin = &mut env.admin;
    assert_eq!(
        total(admin).await,
        sums_of((7, 4100, 1110, 1700, "0.01546")),
        "0.00725 × 2 + 0.00021 + 0.00075"
    );

    let by = |rows: &[pb::UsageRow], f: fn(&pb::UsageRow) -> String| -> Vec<(String, Sums)> {
        rows.iter().map(|r| (f(r), sums(r))).collect()
    };
    let rows = usage(admin, query(&["consumer"], Granularity::Total, None)).await;
    assert_eq!(
        by(&rows, |r| format!("{}/{}", r.consumer, r.consumer_id)),
        [
            (
                format!("billing/{}", ids["billing"]),
                sums_of((4, 3000, 1100, 700, "0.01471"))
            ),
            (
                format!("support/{}", ids["support"]),
                sums_of((3, 1100, 10, 1000, "0.00075"))
            ),
        ]
    );
    for r in &rows {
        assert!(
            r.consumer_key.is_empty() && r.model_service.is_empty() && r.model.is_empty(),
            "only grouped dimensions are set: {r:?}"
        );
        assert!(r.start_time.is_none(), "TOTAL rows have no period");
    }
    let rows = usage(admin, query(&["consumer_key"], Granularity::Total, None)).await;
    assert_eq!(
        by(&rows, |r| format!(
            "{}={}",
            r.consumer_key, r.consumer_key_id
        )),
        [
            (
                format!("billing-1={}", ids["billing-1"]),
                sums_of((3, 2000, 1000, 400, "0.0145"))
            ),
            (
                format!("billing-2={}", ids["billing-2"]),
                sums_of((1, 1000, 100, 300, "0.00021"))
            ),
            (
                format!("support-1={}", ids["support-1"]),
                sums_of((3, 1100, 10, 1000, "0.00075"))
            ),
        ]
    );
    assert!(rows.iter().all(|r| r.consumer.is_empty()));
    let rows = usage(admin, query(&["model_service"], Granularity::Total, None)).await;
    assert_eq!(
        by(&rows, |r| r.model_service.clone()),
        [
            ("anthropic".into(), sums_of((3, 1100, 10, 1000, "0.00075"))),
            ("openai".into(), sums_of((4, 3000, 1100, 700, "0.01471"))),
        ]
    );
    let rows = usage(admin, query(&["model"], Granularity::Total, None)).await;
    assert_eq!(
        rows.iter().map(|r| r.model.as_str()).collect::<Vec<_>>(),
        ["claude-sonnet-4", "gpt-4o", "gpt-4o-mini"]
    );
    // Combinations, in any order of group_by, sorted by the dimensions' values.
    let rows = usage(
        admin,
        query(&["model", "consumer"], Granularity::Total, None),
    )
    .await;
    assert_eq!(
        rows.iter()
            .map(|r| (r.consumer.as_str(), r.model.as_str(), r.requests))
            .collect::<Vec<_>>(),
        [
            ("billing", "gpt-4o", 3),
            ("billing", "gpt-4o-mini", 1),
            ("support", "claude-sonnet-4", 3)
        ]
    );
    let all = &["consumer", "consumer_key", "model_service", "model"];
    let rows = usage(admin, query(all, Granularity::Total, None)).await;
    assert_eq!(rows.len(), 3);
    assert_eq!(
        (
            rows[0].consumer.as_str(),
            rows[0].consumer_key.as_str(),
            rows[0].model_service.as_str(),
            rows[0].model.as_str()
        ),
        ("billing", "billing-1", "openai", "gpt-4o")
    );
    // Filters: by name, by id, and the model by its exact name.
    let filtered = |f: fn(&mut pb::GetUsageRequest)| {
        let mut q = query(&[], Granularity::Total, None);
        f(&mut q);
        q
    };
    let rows = usage(admin, filtered(|q| q.consumer = "support".into())).await;
    assert_eq!(sums(&rows[0]), sums_of((3, 1100, 10, 1000, "0.00075")));
    let mut q = query(&[], Granularity::Total, None);
    q.consumer_key = ids["billing-2"].to_string();
    assert_eq!(usage(admin, q).await[0].requests, 1);
    let rows = usage(
        admin,
        filtered(|q| {
            q.model_service = "openai".into();
            q.model = "gpt-4o".into();
        }),
    )
    .await;
    assert_eq!(sums(&rows[0]), sums_of((3, 2000, 1000, 400, "0.0145")));
    let rows = usage(admin, filtered(|q| q.model = "gpt-4".into())).await;
    assert!(rows.is_empty(), "the model filter is exact: {rows:?}");
}

async fn hour_day_and_total_split_time_in_utc_hours_and_days(b: Backend) {
    let mut env = Env::start(b).await;
    let ids = seed(&mut env.admin).await;
    let dp = Uuid::now_v7();
    let row = |n: u64| {
        tokens(
            delta(
                ids["billing-1"],
                Some(ids["billing"]),
                ids["openai"],
                "gpt-4o-mini",
            ),
            n,
            0,
            0,
            0,
        )
    };
    // Hours 1 and 1 (same hour), 5, 25 (the next day); one whose clock is ahead of ours is
    // counted at our time (hour 30), never in the future (hour 40).
    for (seq, (time, now, n)) in [
        (at(1, 10), at(1, 20), 1),
        (at(1, HOUR - 1), at(2, 0), 2),
        (at(5, 0), at(5, 1), 4),
        (at(25, 7), at(26, 0), 8),
        (at(40, 0), at(30, 9), 16),
    ]
    .into_iter()
    .enumerate()
    {
        let r = report(dp, seq as u64 + 1, time, vec![row(n)]);
        assert!(applied(&apply(&env.store, &r, now).await));
    }
    let admin = &mut env.admin;
    let rows = usage(admin, query(&[], Granularity::Hour, Some((0, 48)))).await;
    assert_eq!(
        rows.iter()
            .map(|r| (hour_of(r), r.requests))
            .collect::<Vec<_>>(),
        [(1, 3), (5, 4), (25, 8), (30, 16)]
    );
    let rows = usage(admin, query(&[], Granularity::Day, None)).await;
    assert_eq!(
        rows.iter()
            .map(|r| (hour_of(r), r.requests))
            .collect::<Vec<_>>(),
        [(0, 7), (24, 24)],
        "UTC days, each row starting at its midnight"
    );
    assert_eq!(total(admin).await.0, 31);
    // The start is rounded down to its hour; the end is exclusive.
    let mut q = query(&[], Granularity::Hour, None);
    q.start_time = Some(pb_ts(at(1, HOUR / 2)));
    q.end_time = Some(pb_ts(at(25, 0)));
    let rows = usage(admin, q).await;
    assert_eq!(
        rows.iter()
            .map(|r| (hour_of(r), r.requests))
            .collect::<Vec<_>>(),
        [(1, 3), (5, 4)]
    );
    // An end inside an hour includes that hour (it starts before the end).
    let mut q = query(&[], Granularity::Total, None);
    q.start_time = Some(pb_ts(at(2, 0)));
    q.end_time = Some(pb_ts(at(25, 1)));
    assert_eq!(usage(admin, q).await[0].requests, 12);
    // DAY over a range sums only the hours inside it.
    let rows = usage(admin, query(&[], Granularity::Day, Some((2, 26)))).await;
    assert_eq!(
        rows.iter()
            .map(|r| (hour_of(r), r.requests))
            .collect::<Vec<_>>(),
        [(0, 4), (24, 8)]
    );
    // No usage in the range: no rows.
    assert!(
        usage(admin, query(&[], Granularity::Total, Some((100, 200))))
            .await
            .is_empty()
    );
    // HOUR with a group: the period first, then the group.
    let rows = usage(
        admin,
        query(&["consumer_key"], Granularity::Hour, Some((0, 6))),
    )
    .await;
    assert_eq!(
        rows.iter()
            .map(|r| (hour_of(r), r.consumer_key.as_str()))
            .collect::<Vec<_>>(),
        [(1, "billing-1"), (5, "billing-1")]
    );
}

async fn a_report_is_applied_once_however_often_it_is_resent(b: Backend) {
    let mut env = Env::start(b).await;
    let ids = seed(&mut env.admin).await;
    let row = tokens(
        delta(
            ids["billing-1"],
            Some(ids["billing"]),
            ids["openai"],
            "gpt-4o",
        ),
        1,
        1000,
        0,
        0,
    );
    let (a, other) = (Uuid::now_v7(), Uuid::now_v7());
    let r5 = report(a, 5, at(1, 0), vec![row.clone()]);
    assert!(applied(&apply(&env.store, &r5, at(1, 0)).await));
    for _ in 0..3 {
        assert_eq!(
            apply(&env.store, &r5, at(1, 0)).await,
            UsageApplied::Duplicate { last_sequence: 5 },
            "the same report again is a duplicate"
        );
    }
    let r3 = report(a, 3, at(1, 0), vec![row.clone()]);
    assert_eq!(
        apply(&env.store, &r3, at(1, 0)).await,
        UsageApplied::Duplicate { last_sequence: 5 },
        "an older sequence is not applied"
    );
    assert_eq!(
        env.admin
            .get_usage(query(&[], Granularity::Total, None))
            .await
            .unwrap()
            .into_inner()
            .rows[0]
            .requests,
        1
    );
    // The next sequence applies, and another data plane's numbers are its own.
    assert!(applied(
        &apply(
            &env.store,
            &report(a, 6, at(1, 0), vec![row.clone()]),
            at(1, 0)
        )
        .await
    ));
    assert!(applied(
        &apply(
            &env.store,
            &report(other, 1, at(1, 0), vec![row.clone()]),
            at(1, 0)
        )
        .await
    ));
    assert!(
        applied(&apply(&env.store, &report(other, 2, at(1, 0), vec![]), at(1, 0)).await),
        "an empty report moves the cursor"
    );
    assert_eq!(
        apply(&env.store, &report(other, 1, at(1, 0), vec![row]), at(1, 0)).await,
        UsageApplied::Duplicate { last_sequence: 2 }
    );
    assert_eq!(
        total(&mut env.admin).await,
        sums_of((3, 3000, 0, 0, "0.0075"))
    );
}

async fn two_control_planes_applying_the_same_report_apply_it_once(b: Backend) {
    let mut env = Env::start(b).await;
    let ids = seed(&mut env.admin).await;
    let second = env.second_store().await;
    let dp = Uuid::now_v7();
    let row = tokens(
        delta(
            ids["billing-1"],
            Some(ids["billing"]),
            ids["openai"],
            "gpt-4o",
        ),
        1,
        10,
        0,
        1,
    );
    for seq in 1..=20 {
        let r = report(dp, seq, at(1, 0), vec![row.clone(); 3]);
        let (x, y) = tokio::join!(
            env.store.apply_usage_report(&r, at(1, 0)),
            second.apply_usage_report(&r, at(1, 0))
        );
        let (x, y) = (x.unwrap(), y.unwrap());
        assert_eq!(
            [applied(&x), applied(&y)].iter().filter(|a| **a).count(),
            1,
            "report {seq}: exactly one replica applies it ({x:?} / {y:?})"
        );
    }
    // 20 reports × 3 rows of 10 input tokens at 2.50 and 1 output token at 10, each once.
    assert_eq!(
        total(&mut env.admin).await,
        sums_of((60, 600, 60, 0, "0.0021"))
    );
    second.close().await;
}

async fn a_price_change_applies_only_to_usage_arriving_after_it(b: Backend) {
    let mut env = Env::start(b).await;
    let ids = seed(&mut env.admin).await;
    let dp = Uuid::now_v7();
    let row = tokens(
        delta(
            ids["billing-1"],
            Some(ids["billing"]),
            ids["openai"],
            "gpt-4o",
        ),
        1,
        1_000_000,
        0,
        0,
    );
    // Usage of hour 1 arriving before the change: 1M tokens at 2.50.
    assert!(applied(
        &apply(
            &env.store,
            &report(dp, 1, at(1, 0), vec![row.clone()]),
            at(1, 0)
        )
        .await
    ));
    set_pricing(
        &mut env.admin,
        "openai",
        vec![price("gpt-4o", "5", "10", "")],
    )
    .await;
    // Usage of the same hour arriving after the change is priced at 5; what was applied
    // keeps its price.
    assert!(applied(
        &apply(
            &env.store,
            &report(dp, 2, at(1, 1), vec![row.clone()]),
            at(1, 2)
        )
        .await
    ));
    assert_eq!(
        total(&mut env.admin).await,
        sums_of((2, 2_000_000, 0, 0, "7.5"))
    );
    // A resend of the first report after the change is still a duplicate: no repricing.
    assert!(!applied(
        &apply(&env.store, &report(dp, 1, at(1, 0), vec![row]), at(1, 3)).await
    ));
    assert_eq!(total(&mut env.admin).await.4, "7.5");
}

async fn usage_of_a_model_without_a_price_costs_nothing_and_is_counted_unpriced(b: Backend) {
    let mut env = Env::start(b).await;
    let ids = seed(&mut env.admin).await;
    let (key, consumer) = (ids["billing-1"], Some(ids["billing"]));
    let rows = vec![
        tokens(
            delta(key, consumer, ids["openai"], "gpt-3.5-turbo"),
            2,
            100,
            0,
            100,
        ),
        tokens(delta(key, consumer, ids["openai"], ""), 1, 0, 0, 0),
        tokens(
            delta(key, consumer, ids["openai"], "gpt-4o"),
            1,
            1_000_000,
            0,
            0,
        ),
    ];
    let UsageApplied::Applied(a) = apply(
        &env.store,
        &report(Uuid::now_v7(), 1, at(1, 0), rows),
        at(1, 0),
    )
    .await
    else {
        panic!("applied")
    };
    assert_eq!(a.unpriced_requests, 3);
    assert_eq!(
        a.unpriced_models,
        [
            ("openai".to_string(), String::new()),
            ("openai".to_string(), "gpt-3.5-turbo".to_string())
        ]
    );
    let rows = usage(&mut env.admin, query(&["model"], Granularity::Total, None)).await;
    assert_eq!(
        rows.iter()
            .map(|r| (r.model.as_str(), r.cost_usd.as_str(), r.unpriced_requests))
            .collect::<Vec<_>>(),
        [
            ("", "0", 1),
            ("gpt-3.5-turbo", "0", 2),
            ("gpt-4o", "2.5", 0)
        ]
    );
    // A price for every model ('*') prices what arrives next, the unknown model too.
    set_pricing(
        &mut env.admin,
        "openai",
        vec![price("gpt-4o", "2.5", "10", ""), price("*", "1", "1", "")],
    )
    .await;
    let row = tokens(delta(key, consumer, ids["openai"], ""), 1, 1_000_000, 0, 0);
    apply(
        &env.store,
        &report(Uuid::now_v7(), 1, at(1, 0), vec![row]),
        at(1, 0),
    )
    .await;
    let rows = usage(&mut env.admin, query(&[], Granularity::Total, None)).await;
    assert_eq!(
        (rows[0].cost_usd.as_str(), rows[0].unpriced_requests),
        ("3.5", 3)
    );
}

async fn deleted_resources_usage_stays_queryable_by_name_and_id(b: Backend) {
    let mut env = Env::start(b).await;
    let admin = &mut env.admin;
    let service = create_service(admin, "legacy", vec![price("*", "1", "1", "")]).await;
    let consumer = create_consumer(admin, "gone-app").await;
    let key = create_key(admin, "gone-key", "gone-app").await;
    let r = report(
        Uuid::now_v7(),
        1,
        at(1, 0),
        vec![tokens(
            delta(key, Some(consumer), service, "m"),
            4,
            1_000_000,
            0,
            0,
        )],
    );
    apply(&env.store, &r, at(1, 0)).await;
    // Delete the key (disable, unbind, delete), its consumer and the service.
    admin
        .disable_consumer_key(pb::DisableConsumerKeyRequest {
            selector: Some(pb::disable_consumer_key_request::Selector::Name(
                "gone-key".into(),
            )),
        })
        .await
        .unwrap();
    admin
        .unbind_consumer_key(pb::UnbindConsumerKeyRequest {
            key: "gone-key".into(),
        })
        .await
        .unwrap();
    admin
        .delete_consumer_key(pb::DeleteConsumerKeyRequest {
            selector: Some(pb::delete_consumer_key_request::Selector::Name(
                "gone-key".into(),
            )),
        })
        .await
        .unwrap();
    admin
        .delete_consumer(pb::DeleteConsumerRequest {
            selector: Some(pb::delete_consumer_request::Selector::Name(
                "gone-app".into(),
            )),
        })
        .await
        .unwrap();
    admin
        .delete_model_service(pb::DeleteModelServiceRequest {
            selector: Some(pb::delete_model_service_request::Selector::Name(
                "legacy".into(),
            )),
        })
        .await
        .unwrap();
    // Usage reported after the deletions is stored too (data planes lag), unpriced.
    let late = report(
        Uuid::now_v7(),
        1,
        at(2, 0),
        vec![tokens(delta(key, Some(consumer), service, "m"), 1, 5, 0, 0)],
    );
    assert!(applied(&apply(&env.store, &late, at(2, 0)).await));

    let all = &["consumer", "consumer_key", "model_service", "model"];
    let rows = usage(admin, query(all, Granularity::Total, None)).await;
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(
        (
            r.consumer.as_str(),
            r.consumer_id.as_str(),
            r.consumer_key.as_str(),
            r.consumer_key_id.as_str(),
            r.model_service.as_str(),
            r.requests,
            r.cost_usd.as_str(),
            r.unpriced_requests
        ),
        (
            "gone-app",
            consumer.to_string().as_str(),
            "gone-key",
            key.to_string().as_str(),
            "legacy",
            5,
            "1",
            1
        )
    );
    // Filters by the deleted resources' last names and by their ids.
    for q in [
        pb::GetUsageRequest {
            consumer_key: "gone-key".into(),
            ..Default::default()
        },
        pb::GetUsageRequest {
            consumer_key: key.to_string(),
            ..Default::default()
        },
        pb::GetUsageRequest {
            consumer: "gone-app".into(),
            model_service: "legacy".into(),
            ..Default::default()
        },
        pb::GetUsageRequest {
            model_service: service.to_string(),
            ..Default::default()
        },
    ] {
        assert_eq!(usage(admin, q.clone()).await[0].requests, 5, "{q:?}");
    }
    // A name that nothing ever had is NOT_FOUND; an id is accepted even if nothing had it.
    let s = admin
        .get_usage(pb::GetUsageRequest {
            consumer_key: "never-was".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    assert!(s.message().contains("never-was"), "{}", s.message());
    let rows = usage(
        admin,
        pb::GetUsageRequest {
            consumer_key: Uuid::now_v7().to_string(),
            ..Default::default()
        },
    )
    .await;
    assert!(rows.is_empty());
    // A new key taking the deleted one's name: the name now means the live key.
    create_key(admin, "gone-key", "").await;
    let rows = usage(
        admin,
        pb::GetUsageRequest {
            consumer_key: "gone-key".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(rows.is_empty(), "the live key has no usage: {rows:?}");
}

async fn a_viewer_can_get_usage(b: Backend) {
    let mut env = Env::start(b).await;
    let ids = seed(&mut env.admin).await;
    let row = tokens(
        delta(
            ids["support-1"],
            Some(ids["support"]),
            ids["anthropic"],
            "claude-x",
        ),
        1,
        10,
        0,
        10,
    );
    apply(
        &env.store,
        &report(Uuid::now_v7(), 1, at(0, 0), vec![row]),
        at(0, 0),
    )
    .await;
    let value = env
        .admin
        .create_admin_token(pb::CreateAdminTokenRequest {
            name: "vera".into(),
            role: pb::admin_token::Role::Viewer as i32,
            expire_time: None,
        })
        .await
        .unwrap()
        .into_inner()
        .value;
    let mut viewer = env.kg.admin_with_token(Some(value)).await;
    let rows = usage(&mut viewer, query(&["consumer"], Granularity::Day, None)).await;
    assert_eq!(rows[0].consumer, "support");
    assert_eq!(sums(&rows[0]), sums_of((1, 10, 10, 0, "0.00018")));
    // Reading prices is a read too; changing them is not for a VIEWER.
    assert!(
        !get_service(&mut viewer, "openai")
            .await
            .unwrap()
            .pricing
            .is_empty()
    );
    let s = viewer
        .update_model_service(pb::UpdateModelServiceRequest {
            selector: Some(pb::update_model_service_request::Selector::Name(
                "openai".into(),
            )),
            model_service: Some(pb::ModelService::default()),
            update_mask: mask(&["pricing"]),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let anonymous = env
        .kg
        .admin_with_token(None)
        .await
        .get_usage(pb::GetUsageRequest::default())
        .await;
    assert_eq!(anonymous.unwrap_err().code(), Code::Unauthenticated);
}

async fn usage_queries_outside_the_rules_are_refused_naming_the_field(b: Backend) {
    let mut env = Env::start(b).await;
    seed(&mut env.admin).await;
    let admin = &mut env.admin;
    let s = admin
        .get_usage(query(&["consumer", "region"], Granularity::Total, None))
        .await
        .unwrap_err();
    let why = assert_invalid(&s, "group_by[1]", "unknown dimension");
    assert!(why.contains("\"region\""), "{why}");
    let s = admin
        .get_usage(query(&[], Granularity::Total, Some((5, 5))))
        .await
        .unwrap_err();
    assert_invalid(&s, "end_time", "empty range");
    let s = admin
        .get_usage(query(&[], Granularity::Hour, Some((0, 745))))
        .await
        .unwrap_err();
    let why = assert_invalid(&s, "end_time", "too many hours");
    assert!(why.contains("744 hours") && why.contains("745"), "{why}");
    assert!(
        usage(admin, query(&[], Granularity::Hour, Some((0, 744))))
            .await
            .is_empty()
    );
    let s = admin
        .get_usage(query(&[], Granularity::Hour, None))
        .await
        .unwrap_err();
    assert_invalid(&s, "start_time", "unbounded HOUR query");
    let mut q = query(&[], Granularity::Total, None);
    q.granularity = 9;
    assert_invalid(
        &admin.get_usage(q).await.unwrap_err(),
        "granularity",
        "unknown granularity",
    );
    for (f, kind) in [
        (
            (|q: &mut pb::GetUsageRequest| q.consumer = "nobody".into())
                as fn(&mut pb::GetUsageRequest),
            "consumer",
        ),
        (|q| q.consumer_key = "no-key".into(), "consumer key"),
        (|q| q.model_service = "no-service".into(), "model service"),
    ] {
        let mut q = query(&[], Granularity::Total, None);
        f(&mut q);
        let s = admin.get_usage(q).await.unwrap_err();
        assert_eq!(s.code(), Code::NotFound, "{kind}: {s:?}");
        assert!(s.message().contains(kind), "{kind}: {}", s.message());
    }
}

async fn costs_are_exact_to_the_picodollar(b: Backend) {
    let mut env = Env::start(b).await;
    let service = create_service(
        &mut env.admin,
        "tiny",
        vec![
            price("nano", "0.000001", "0.000003", "0"),
            price("mid", "2.5", "0", ""),
        ],
    )
    .await;
    let key = create_key(&mut env.admin, "k", "").await;
    let dp = Uuid::now_v7();
    // One token at 0.000001 USD per million tokens: 10^-12 USD.
    let one = tokens(delta(key, None, service, "nano"), 1, 1, 0, 0);
    apply(
        &env.store,
        &report(dp, 1, at(0, 0), vec![one.clone()]),
        at(0, 0),
    )
    .await;
    assert_eq!(total(&mut env.admin).await.4, "0.000000000001");
    // 999 999 more such tokens, 37 037 a row, 3 rows a report, in hours 1 to 9: exactly
    // 10^-6 USD in all.
    for seq in 1..=9 {
        let row = tokens(delta(key, None, service, "nano"), 0, 37_037, 0, 0);
        let r = report(dp, seq + 1, at(seq as i64, 0), vec![row; 3]);
        apply(&env.store, &r, at(seq as i64, 1)).await;
    }
    let seq = 11;
    let rows = usage(&mut env.admin, query(&[], Granularity::Total, None)).await;
    assert_eq!(
        (rows[0].input_tokens, rows[0].cost_usd.as_str()),
        (1_000_000, "0.000001")
    );
    // Per hour the parts are exact too, and add up to the whole.
    let hours = usage(&mut env.admin, query(&[], Granularity::Hour, Some((0, 30)))).await;
    let pico: u128 = hours
        .iter()
        .map(|r| {
            let (whole, frac) = r.cost_usd.split_once('.').unwrap_or((&r.cost_usd, ""));
            assert_eq!(whole, "0");
            format!("{frac:0<12}").parse::<u128>().unwrap()
        })
        .sum();
    assert_eq!(pico, 1_000_000);
    // Output and a cached price of 0; 3 tokens at 2.5 is 0.0000075.
    let rows = vec![
        tokens(delta(key, None, service, "nano"), 1, 5, 5, 1),
        tokens(delta(key, None, service, "mid"), 1, 3, 0, 0),
    ];
    apply(&env.store, &report(dp, seq, at(40, 0), rows), at(40, 0)).await;
    let rows = usage(
        &mut env.admin,
        query(&["model"], Granularity::Total, Some((40, 41))),
    )
    .await;
    assert_eq!(
        rows.iter()
            .map(|r| (r.model.as_str(), r.cost_usd.as_str()))
            .collect::<Vec<_>>(),
        [("mid", "0.0000075"), ("nano", "0.000000000003")]
    );
}

async fn a_report_outside_the_rules_is_refused_and_changes_nothing(b: Backend) {
    let mut env = Env::start(b).await;
    let ids = seed(&mut env.admin).await;
    let dp = Uuid::now_v7();
    let good = tokens(
        delta(
            ids["billing-1"],
            Some(ids["billing"]),
            ids["openai"],
            "gpt-4o",
        ),
        1,
        10,
        0,
        0,
    );
    let bad = UsageDelta {
        cached_input_tokens: 11,
        ..good.clone()
    };
    let err = env
        .store
        .apply_usage_report(&report(dp, 1, at(0, 0), vec![good.clone(), bad]), at(0, 0))
        .await
        .unwrap_err();
    let StoreError::Rule(RuleError::Invalid(v)) = err else {
        panic!("expected a field violation, got {err}");
    };
    assert_eq!(v[0].field, "rows[1].cached_input_tokens");
    assert!(
        usage(&mut env.admin, query(&[], Granularity::Total, None))
            .await
            .is_empty()
    );
    // The cursor did not move: sequence 1 still applies.
    assert!(applied(
        &apply(&env.store, &report(dp, 1, at(0, 0), vec![good]), at(0, 0)).await
    ));
    assert_eq!(total(&mut env.admin).await.0, 1);
}

async fn idle_data_planes_cursors_are_pruned(b: Backend) {
    let env = Env::start(b).await;
    let (old, recent) = (Uuid::now_v7(), Uuid::now_v7());
    apply(&env.store, &report(old, 7, at(0, 0), vec![]), at(0, 0)).await;
    apply(
        &env.store,
        &report(recent, 7, at(0, 0), vec![]),
        at(30 * 24, 0),
    )
    .await;
    let pruned = env
        .store
        .prune_usage_cursors(Timestamp(at(31 * 24, 0).0 - 30 * DAY))
        .await
        .unwrap();
    assert_eq!(pruned, 1, "only the cursor silent for more than 30 days");
    assert!(!applied(
        &apply(
            &env.store,
            &report(recent, 7, at(0, 0), vec![]),
            at(31 * 24, 0)
        )
        .await
    ));
    // A pruned data plane starts afresh (documented: data planes never resend that late).
    assert!(applied(
        &apply(
            &env.store,
            &report(old, 7, at(0, 0), vec![]),
            at(31 * 24, 0)
        )
        .await
    ));
}

// ------------------------------------------------------------------------------ metrics

/// The metrics count applied usage per consumer and model service with the cost in whole
/// micro-USD, carrying what is below one to the next report; reports by result. One test for
/// both backends, in turn: the metrics are the process's.
#[tokio::test]
async fn applied_usage_is_counted_in_metrics_with_exact_micro_usd() {
    use keygate::admin::apply_usage_report_and_count;
    use keygate::metrics::METRICS;
    for b in [Backend::Sqlite, Backend::Postgres] {
        let mut env = Env::start(b).await;
        // Labels of this backend's own: the remainder carried is the process's, per label pair.
        let metered = format!("metered-{b:?}");
        let service =
            create_service(&mut env.admin, &metered, vec![price("m", "0.4", "0", "")]).await;
        create_consumer(&mut env.admin, "meter-app").await;
        let key = create_key(&mut env.admin, "meter-key", "meter-app").await;
        let consumer = env
            .admin
            .get_consumer(pb::GetConsumerRequest {
                selector: Some(pb::get_consumer_request::Selector::Name("meter-app".into())),
            })
            .await
            .unwrap()
            .into_inner()
            .id;
        let reports = |result: &str| METRICS.usage_reports.with_label_values(&[result]).get();
        let tokens_of = |kind: &str| {
            METRICS
                .usage_tokens
                .with_label_values(&["meter-app", metered.as_str(), kind])
                .get()
        };
        let cost = || {
            METRICS
                .usage_cost
                .with_label_values(&["meter-app", metered.as_str()])
                .get()
        };
        let before = (reports("applied"), reports("duplicate"), reports("refused"));
        let (input0, cached0, cost0) = (tokens_of("input"), tokens_of("cached_input"), cost());
        let dp = Uuid::now_v7();
        // Each report: 1 token at 0.4 USD per million = 0.4 micro-USD.
        let row = tokens(delta(key, Some(id(&consumer)), service, "m"), 1, 1, 1, 0);
        for seq in 1..=3 {
            let r = report(dp, seq, at(0, 0), vec![row.clone()]);
            let a = apply_usage_report_and_count(&env.store, &r, at(0, 0))
                .await
                .unwrap();
            assert!(applied(&a));
            let expected = [0, 0, 1][seq as usize - 1];
            assert_eq!(
                cost() - cost0,
                expected,
                "0.4 × {seq} µ$ floors to {expected}"
            );
        }
        let r = report(dp, 3, at(0, 0), vec![row.clone()]);
        let a = apply_usage_report_and_count(&env.store, &r, at(0, 0))
            .await
            .unwrap();
        assert!(!applied(&a));
        let bad = UsageDelta {
            cached_input_tokens: 2,
            ..row
        };
        let r = report(dp, 4, at(0, 0), vec![bad]);
        assert!(
            apply_usage_report_and_count(&env.store, &r, at(0, 0))
                .await
                .is_err()
        );
        assert_eq!(
            (reports("applied"), reports("duplicate"), reports("refused")),
            (before.0 + 3, before.1 + 1, before.2 + 1)
        );
        assert_eq!(
            (
                tokens_of("input") - input0,
                tokens_of("cached_input") - cached0
            ),
            (3, 3)
        );
        env.store.close().await;
    }
}
