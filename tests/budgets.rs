//! Budgets through a real Envoy on both data planes (SPEC §8.3, issue 17): the official `openai`
//! SDK drives a key with a budget of 1,000 tokens a day until it is refused; the first 429
//! `insufficient_quota` must arrive within 2 s of the vendor's reported tokens crossing the
//! budget, and the overshoot (tokens admitted beyond it) is measured and printed. A consumer's
//! budget stops every key of the consumer, and raising it re-opens them. Rate limits refuse
//! with `rate_limit_exceeded` and `retry-after`, which the SDK reads.
//!
//! The client paces its calls (a steady 20 a second, as an application would send them);
//! nothing sleeps to wait for a state: re-opening is polled with a bound.

mod common;

use std::time::Duration;

use keygate::proto::admin::v1 as pb;

use common::admin::{create_consumer_key, create_priced_vendor_services};
use common::gateway::{Gateway, Plane};
use common::sdk::run_python;
use common::{Admin, poll_until};

on_both_planes!(
    a_token_budget_stops_the_key_within_two_seconds_of_being_spent,
    a_consumer_budget_stops_all_its_keys_and_a_raise_reopens_them,
    rate_limits_refuse_with_retry_after_as_the_sdk_reads_it,
);

const OPENAI_KEY: &str = "sk-proj-budgetsOpenAi000000000000000001";
const ANTHROPIC_KEY: &str = "sk-ant-api03-budgetsAnthropic000000002";

/// Reports every 200 ms: budget enforcement lags by the report interval plus propagation.
const SETTINGS: &[(&str, &str)] = &[("usage_report_interval", "200ms")];

/// Calls `chat.completions.create` until the first 429 `insufficient_quota` (or `limit`
/// calls), one every `pace` seconds; prints one JSON entry per call: the wall-clock time its
/// answer came, its status, the tokens the vendor reported, and a refusal's type and code.
const DRIVE: &str = r#"
import json, os, time
import openai
client = openai.OpenAI(base_url=os.environ["BASE_URL"], api_key=os.environ["API_KEY"],
                       max_retries=int(os.environ.get("RETRIES", "0")), timeout=20.0)
limit, pace = int(os.environ["LIMIT"]), float(os.environ["PACE"])
out = []
for i in range(limit):
    started = time.time()
    try:
        r = client.chat.completions.create(model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Call %d: say hello." % i}])
        out.append({"t": time.time(), "status": 200,
                    "tokens": r.usage.prompt_tokens + r.usage.completion_tokens})
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        out.append({"t": time.time(), "status": e.status_code, "type": body.get("type"),
                    "code": body.get("code"), "error": type(e).__name__,
                    "retry_after": e.response.headers.get("retry-after")})
        if body.get("code") == "insufficient_quota" or os.environ.get("STOP_AT_FIRST") == "1":
            break
    time.sleep(max(0.0, pace - (time.time() - started)))
print(json.dumps(out))
"#;

/// Runs [`DRIVE`] with `key` against the gateway's OpenAI route.
async fn drive(
    gw: &Gateway,
    key: &str,
    limit: usize,
    pace: f64,
    extra: &[(&str, &str)],
) -> Vec<serde_json::Value> {
    let mut env = vec![
        ("BASE_URL", format!("http://{}/openai/v1", gw.listener())),
        ("API_KEY", key.to_string()),
        ("LIMIT", limit.to_string()),
        ("PACE", pace.to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    let out = run_python(DRIVE, &env).await;
    serde_json::from_str::<Vec<serde_json::Value>>(out.trim())
        .unwrap_or_else(|e| panic!("the SDK script printed no JSON ({e}): {out}"))
}

fn token_budget(tokens: u64) -> Option<pb::Limits> {
    Some(pb::Limits {
        budget_tokens: tokens,
        budget_period: pb::limits::Period::Day as i32,
        ..Default::default()
    })
}

async fn consumer(admin: &mut Admin, name: &str, limits: Option<pb::Limits>) {
    admin
        .create_consumer(pb::CreateConsumerRequest {
            name: name.into(),
            limits,
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn key(admin: &mut Admin, name: &str, consumer: &str, limits: Option<pb::Limits>) -> String {
    create_consumer_key(
        admin,
        pb::CreateConsumerKeyRequest {
            name: name.into(),
            consumer: consumer.into(),
            limits,
            ..Default::default()
        },
    )
    .await
}

#[track_caller]
fn assert_insufficient_quota(r: &serde_json::Value) {
    assert_eq!(r["status"], 429, "{r}");
    assert_eq!(r["type"], "insufficient_quota", "{r}");
    assert_eq!(r["code"], "insufficient_quota", "{r}");
    assert_eq!(r["error"], "RateLimitError", "the SDK's own class: {r}");
}

async fn a_token_budget_stops_the_key_within_two_seconds_of_being_spent(plane: Plane) {
    let mut gw = Gateway::start_with(plane, SETTINGS).await;
    create_priced_vendor_services(&mut gw.admin, OPENAI_KEY, ANTHROPIC_KEY).await;
    consumer(&mut gw.admin, "app", None).await;
    let k = key(&mut gw.admin, "k", "app", token_budget(1000)).await;
    gw.settle().await;

    let calls = drive(&gw, &k, 400, 0.05, &[]).await;
    let refused = calls.last().unwrap();
    assert_insufficient_quota(refused);
    // Every call before the refusal was answered by the vendor.
    let answered = &calls[..calls.len() - 1];
    assert!(answered.iter().all(|c| c["status"] == 200), "{calls:?}");
    // When the vendor's reported tokens crossed 1,000, and what was admitted after.
    let mut total = 0;
    let mut crossed = None;
    for c in answered {
        total += c["tokens"].as_u64().unwrap();
        if crossed.is_none() && total >= 1000 {
            crossed = Some(c["t"].as_f64().unwrap());
        }
    }
    let crossed =
        crossed.unwrap_or_else(|| panic!("refused before the budget was spent: {calls:?}"));
    let lag = refused["t"].as_f64().unwrap() - crossed;
    let overshoot = total - 1000;
    eprintln!(
        "{plane:?}: budget 1000 tokens, {} calls admitted with {total} tokens; first 429 {:.0} ms \
         after the spend crossed the budget; overshoot {overshoot} tokens",
        answered.len(),
        lag * 1000.0
    );
    assert!(lag < 2.0, "first 429 {lag:.3} s after the budget was spent");
    assert_eq!(
        gw.upstream.count(),
        answered.len(),
        "the refused call never reached the vendor"
    );

    // Refused for the rest of the day, with the SDK's retries on: it obeys x-should-retry.
    let again = drive(&gw, &k, 1, 0.0, &[("RETRIES", "2")]).await;
    assert_insufficient_quota(&again[0]);
    assert_eq!(gw.upstream.count(), answered.len());

    // Raising the budget re-opens the key at once (polled: the snapshot propagates).
    let mut admin = gw.admin.clone();
    admin
        .update_consumer_key(pb::UpdateConsumerKeyRequest {
            selector: Some(pb::update_consumer_key_request::Selector::Name("k".into())),
            consumer_key: Some(pb::ConsumerKey {
                limits: token_budget(1_000_000),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["limits".into()],
            }),
        })
        .await
        .unwrap();
    reopens(&gw, &k).await;
}

/// Polls (bounded) until `key` is answered 200 again.
async fn reopens(gw: &Gateway, key: &str) {
    poll_until(
        Duration::from_secs(10),
        "the key to be allowed again",
        || async {
            let r = drive(gw, key, 1, 0.0, &[]).await;
            (r[0]["status"] == 200).then_some(())
        },
    )
    .await;
}

async fn a_consumer_budget_stops_all_its_keys_and_a_raise_reopens_them(plane: Plane) {
    let mut gw = Gateway::start_with(plane, SETTINGS).await;
    create_priced_vendor_services(&mut gw.admin, OPENAI_KEY, ANTHROPIC_KEY).await;
    consumer(&mut gw.admin, "team", token_budget(300)).await;
    let a = key(&mut gw.admin, "a", "team", None).await;
    let b = key(&mut gw.admin, "b", "team", None).await;
    gw.settle().await;

    let calls = drive(&gw, &a, 200, 0.05, &[]).await;
    assert_insufficient_quota(calls.last().unwrap());
    // The other key, never used, is stopped too: the consumer's budget is spent.
    let other = drive(&gw, &b, 1, 0.0, &[]).await;
    assert_insufficient_quota(&other[0]);

    let mut admin = gw.admin.clone();
    admin
        .update_consumer(pb::UpdateConsumerRequest {
            selector: Some(pb::update_consumer_request::Selector::Name("team".into())),
            consumer: Some(pb::Consumer {
                limits: token_budget(1_000_000),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["limits".into()],
            }),
        })
        .await
        .unwrap();
    reopens(&gw, &b).await;
    reopens(&gw, &a).await;
}

async fn rate_limits_refuse_with_retry_after_as_the_sdk_reads_it(plane: Plane) {
    let mut gw = Gateway::start_with(plane, SETTINGS).await;
    create_priced_vendor_services(&mut gw.admin, OPENAI_KEY, ANTHROPIC_KEY).await;
    consumer(&mut gw.admin, "app", None).await;
    let rpm = key(
        &mut gw.admin,
        "rpm",
        "app",
        Some(pb::Limits {
            requests_per_minute: 3,
            ..Default::default()
        }),
    )
    .await;
    let tpm = key(
        &mut gw.admin,
        "tpm",
        "app",
        Some(pb::Limits {
            tokens_per_minute: 30,
            ..Default::default()
        }),
    )
    .await;
    gw.settle().await;

    // A minute's allowance of 3 in a burst, then refused until one request refills (20 s).
    let calls = drive(&gw, &rpm, 5, 0.0, &[]).await;
    let statuses: Vec<_> = calls
        .iter()
        .map(|c| c["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429], "{calls:?}");
    for c in &calls[3..] {
        assert_eq!(
            (&c["type"], &c["code"]),
            (&"requests".into(), &"rate_limit_exceeded".into()),
            "{c}"
        );
        assert_eq!(c["error"], "RateLimitError", "{c}");
        let secs: u64 = c["retry_after"].as_str().unwrap().parse().unwrap();
        assert!((1..=20).contains(&secs), "retry-after {secs}");
    }

    // 30 tokens a minute: the first answer (more than 30 tokens) is admitted and charged
    // after it; then requests are refused on tokens until the debt refills. (In the ext_authz
    // shape the charge comes from Envoy's ext_proc stream, which may trail the client's copy
    // of the answer by a moment: a call or two more can be admitted; the client paces.)
    let calls = drive(&gw, &tpm, 20, 0.1, &[("STOP_AT_FIRST", "1")]).await;
    assert_eq!(calls[0]["status"], 200, "{calls:?}");
    assert!(calls[0]["tokens"].as_u64().unwrap() > 30, "{calls:?}");
    let refused = calls.last().unwrap();
    assert_eq!(refused["status"], 429, "{calls:?}");
    assert!(
        calls.len() <= 3,
        "refused only after {} calls: {calls:?}",
        calls.len()
    );
    assert_eq!(
        (&refused["type"], &refused["code"]),
        (&"tokens".into(), &"rate_limit_exceeded".into())
    );
    let secs: u64 = refused["retry_after"].as_str().unwrap().parse().unwrap();
    assert!((1..=120).contains(&secs), "retry-after {secs}");
}
