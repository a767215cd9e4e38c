//! Usage and spend (SPEC §8.2, issue 16) through a real Envoy on both data planes: the
//! module meters responses natively; in the ext_authz shape Envoy's ext_proc filter
//! (observability mode) streams each response to keygate's ExternalProcessor. Clients are the
//! vendors' own Python SDKs, plain and streaming; the recording upstream answers and streams
//! like OpenAI and Anthropic and remembers the tokens it reported, and `GetUsage` must show
//! exactly those, per key and model, with the cost the prices give.
//!
//! Nothing sleeps to wait for a state: usage is polled with a bound.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use keygate::proto::admin::v1 as pb;

use common::admin::{bearer, create_consumer_key, create_priced_vendor_services};
use common::envoy::{MODEL_COMPRESSED, MODEL_RATE_LIMITED, Recorded, VendorUsage};
use common::gateway::{Gateway, Plane};
use common::sdk::{Sdk, SdkCall, sdk_run};
use common::{Admin, poll_until};

on_both_planes!(
    sdk_calls_plain_and_streaming_are_metered_to_the_token_and_priced,
    errors_unreadable_answers_and_refusals_are_counted_as_documented,
);

const OPENAI_KEY: &str = "sk-proj-meteringOpenAi00000000000000001";
const ANTHROPIC_KEY: &str = "sk-ant-api03-meteringAnthropic00000002";

/// Reports every 200 ms, so the tests do not wait a second per step.
const SETTINGS: &[(&str, &str)] = &[("usage_report_interval", "200ms")];

/// Prices in micro-USD per million tokens, as the test computes cost: (input, output, cached).
const GPT_4O_MINI: (u64, u64, u64) = (150_000, 600_000, 75_000);
const CLAUDE: (u64, u64, u64) = (3_000_000, 15_000_000, 300_000);

/// openai (priced for gpt-4o-mini only) and anthropic (priced for claude-*), one model key
/// each, consumer `app`, and its key `k` (returned).
async fn provision(admin: &mut Admin) -> String {
    create_priced_vendor_services(admin, OPENAI_KEY, ANTHROPIC_KEY).await;
    admin
        .create_consumer(pb::CreateConsumerRequest {
            name: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    create_consumer_key(
        admin,
        pb::CreateConsumerKeyRequest {
            name: "k".into(),
            consumer: "app".into(),
            ..Default::default()
        },
    )
    .await
}

/// Usage rows grouped by consumer key, service and model, over all time.
async fn usage(admin: &mut Admin) -> Vec<pb::UsageRow> {
    admin
        .get_usage(pb::GetUsageRequest {
            group_by: vec![
                "consumer_key".into(),
                "model_service".into(),
                "model".into(),
            ],
            ..Default::default()
        })
        .await
        .expect("GetUsage")
        .into_inner()
        .rows
}

/// Polls until the rows count `requests` requests in all (bounded), then returns them.
async fn usage_reaching(admin: &mut Admin, requests: u64) -> Vec<pb::UsageRow> {
    let rows = poll_until(
        Duration::from_secs(30),
        &format!("usage to reach {requests} requests"),
        || {
            let mut admin = admin.clone();
            async move {
                let rows = usage(&mut admin).await;
                (rows.iter().map(|r| r.requests).sum::<u64>() >= requests).then_some(rows)
            }
        },
    )
    .await;
    assert_eq!(
        rows.iter().map(|r| r.requests).sum::<u64>(),
        requests,
        "more requests than made: {rows:?}"
    );
    rows
}

/// A decimal USD string as an exact count of picodollars.
fn picodollars(usd: &str) -> u128 {
    let (whole, frac) = usd.split_once('.').unwrap_or((usd, ""));
    assert!(frac.len() <= 12, "more than 12 fractional digits: {usd}");
    let frac = format!("{frac:0<12}");
    whole.parse::<u128>().unwrap() * 1_000_000_000_000 + frac.parse::<u128>().unwrap()
}

/// The cost of `u` at `price` (micro-USD per million tokens): picodollars, exactly.
fn cost(u: VendorUsage, (input, output, cached): (u64, u64, u64)) -> u128 {
    u128::from(u.input - u.cached_input) * u128::from(input)
        + u128::from(u.cached_input) * u128::from(cached)
        + u128::from(u.output) * u128::from(output)
}

/// What the vendor reported, summed per (service, model).
fn vendor_sums(recorded: &[Recorded]) -> BTreeMap<(String, String), (u64, VendorUsage)> {
    let mut sums: BTreeMap<(String, String), (u64, VendorUsage)> = BTreeMap::new();
    for r in recorded {
        let service = if r.target.split('?').next().unwrap().ends_with("/messages") {
            "anthropic"
        } else {
            "openai"
        };
        let model = serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["model"]
            .as_str()
            .unwrap()
            .to_string();
        let e = sums.entry((service.into(), model)).or_default();
        e.0 += 1;
        if let Some(u) = r.usage {
            e.1.input += u.input;
            e.1.output += u.output;
            e.1.cached_input += u.cached_input;
        }
    }
    sums
}

async fn sdk_calls_plain_and_streaming_are_metered_to_the_token_and_priced(plane: Plane) {
    let mut gw = Gateway::start_with(plane, SETTINGS).await;
    let key = provision(&mut gw.admin).await;
    gw.settle().await;

    let openai = [
        SdkCall::plain("gpt-4o-mini"),
        SdkCall::plain("gpt-4o-mini").with_prompt("A longer prompt, so the counts differ."),
        SdkCall::streaming("gpt-4o-mini", true),
        SdkCall::streaming("gpt-4o-mini", true).with_prompt("Stream me a longer answer, please."),
        // No price for gpt-4o: counted, costs 0, unpriced.
        SdkCall::plain("gpt-4o"),
    ];
    let anthropic = [
        SdkCall::plain("claude-sonnet-4-5"),
        SdkCall::streaming("claude-sonnet-4-5", false),
        SdkCall::streaming("claude-haiku-4-5", false).with_prompt("Stream it."),
    ];
    let results = sdk_run(Sdk::OpenAi, gw.listener(), "/openai/v1", &key, &openai).await;
    for r in &results {
        assert!(r.ok(), "{}", r.0);
    }
    let results = sdk_run(
        Sdk::Anthropic,
        gw.listener(),
        "/anthropic",
        &key,
        &anthropic,
    )
    .await;
    for r in &results {
        assert!(r.ok(), "{}", r.0);
        assert_eq!(r.0["text"], common::envoy::UPSTREAM_REPLY_TEXT, "{}", r.0);
    }

    let recorded = gw.upstream.all();
    assert_eq!(recorded.len(), 8);
    let vendor = vendor_sums(&recorded);
    let rows = usage_reaching(&mut gw.admin, 8).await;
    assert_eq!(
        rows.len(),
        vendor.len(),
        "one row per (key, service, model): {rows:?}"
    );
    for row in &rows {
        assert_eq!(row.consumer_key, "k", "{row:?}");
        let (requests, sent) = *vendor
            .get(&(row.model_service.clone(), row.model.clone()))
            .unwrap_or_else(|| panic!("no vendor call for {row:?} among {vendor:?}"));
        assert_eq!(row.requests, requests, "{row:?}");
        assert_eq!(
            (row.input_tokens, row.output_tokens, row.cached_input_tokens),
            (sent.input, sent.output, sent.cached_input),
            "the tokens the vendor reported, exactly: {row:?}"
        );
        assert_eq!(
            (row.error_responses, row.unparsed_responses),
            (0, 0),
            "{row:?}"
        );
        let want = match row.model.as_str() {
            "gpt-4o-mini" => cost(sent, GPT_4O_MINI),
            m if m.starts_with("claude-") => cost(sent, CLAUDE),
            _ => 0,
        };
        assert_eq!(picodollars(&row.cost_usd), want, "exact cost: {row:?}");
        assert_eq!(
            row.unpriced_requests,
            u64::from(row.model == "gpt-4o"),
            "{row:?}"
        );
    }
    // The streamed calls' usage is among it: the vendor reported tokens for each of them.
    assert!(
        recorded
            .iter()
            .filter(|r| r.body.windows(13).any(|w| w == br#""stream":true"#))
            .all(|r| r.usage.is_some())
    );
}

async fn errors_unreadable_answers_and_refusals_are_counted_as_documented(plane: Plane) {
    let mut gw = Gateway::start_with(plane, SETTINGS).await;
    let key = provision(&mut gw.admin).await;
    gw.settle().await;

    let calls = [
        // The vendor answers 429: an error response, no tokens.
        SdkCall::plain(MODEL_RATE_LIMITED),
        // A stream without include_usage: the vendor reports no tokens; counted as a request
        // with zero tokens and unparsed (no_usage).
        SdkCall::streaming("gpt-4o-mini", false),
    ];
    let results = sdk_run(Sdk::OpenAi, gw.listener(), "/openai/v1", &key, &calls).await;
    assert!(!results[0].ok(), "{}", results[0].0);
    assert_eq!(results[0].0["status"], 429, "{}", results[0].0);
    assert!(results[1].ok(), "{}", results[1].0);
    // Refused requests are never metered: an unknown key (401), and a known key refused
    // (403: its scope has no openai), whose id the refusal's metadata carries.
    let r = gw
        .post(
            "/openai/v1/chat/completions",
            &[("authorization", &bearer("kg-not-a-key-at-all-0000000000"))],
            br#"{"model":"gpt-4o-mini"}"#,
        )
        .await;
    assert_eq!(r.status, 401);
    let narrow = create_consumer_key(
        &mut gw.admin,
        pb::CreateConsumerKeyRequest {
            name: "anthropic-only".into(),
            consumer: "app".into(),
            scope: Some(pb::Scope {
                model_services: vec!["anthropic".into()],
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    gw.settle().await;
    let refused = sdk_run(
        Sdk::OpenAi,
        gw.listener(),
        "/openai/v1",
        &narrow,
        &[SdkCall::plain("gpt-4o-mini")],
    )
    .await;
    assert_eq!(refused[0].0["status"], 403, "{}", refused[0].0);
    // A client asking for gzip: the vendor is asked for an uncompressed answer, and when it
    // compresses anyway (content-encoding: gzip) the answer is not read: unparsed, no tokens,
    // though its bytes here are the plain JSON with usage in it.
    let r = gw
        .post(
            "/openai/v1/chat/completions",
            &[
                ("authorization", &bearer(&key)),
                ("content-type", "application/json"),
                ("accept-encoding", "gzip, br"),
            ],
            format!(r#"{{"model":"{MODEL_COMPRESSED}","messages":[]}}"#).as_bytes(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let compressed = gw.upstream.last();
    assert_eq!(
        compressed
            .headers
            .get("accept-encoding")
            .map(|v| v.as_bytes()),
        Some(&b"identity"[..]),
        "the vendor is asked for an answer the meter can read"
    );
    assert!(compressed.usage.is_some(), "the body did carry usage");
    // One more allowed call after the refusals: once it is counted, anything the refusals
    // had added would be too (a data plane reports in order).
    let last = sdk_run(
        Sdk::OpenAi,
        gw.listener(),
        "/openai/v1",
        &key,
        &[SdkCall::plain("gpt-4o-mini")],
    )
    .await;
    assert!(last[0].ok(), "{}", last[0].0);

    let rows = usage_reaching(&mut gw.admin, 4).await;
    assert!(
        rows.iter().all(|r| r.consumer_key == "k"),
        "refusals are not metered: {rows:?}"
    );
    let by_model: BTreeMap<&str, &pb::UsageRow> =
        rows.iter().map(|r| (r.model.as_str(), r)).collect();
    // The 429 and the compressed answer name no model the meter read, and the request's was
    // not read (the key is not model-scoped): their usage has no model. One error response,
    // one unparsed.
    let limited = *by_model
        .get("")
        .unwrap_or_else(|| panic!("no row without a model: {rows:?}"));
    assert_eq!(
        (
            limited.requests,
            limited.error_responses,
            limited.unparsed_responses
        ),
        (2, 1, 1),
        "{limited:?}"
    );
    assert_eq!((limited.input_tokens, limited.output_tokens), (0, 0));
    // gpt-4o-mini: the stream without usage (zero tokens, unparsed) and the last call.
    let mini = by_model["gpt-4o-mini"];
    assert_eq!(
        (mini.requests, mini.error_responses, mini.unparsed_responses),
        (2, 0, 1),
        "{mini:?}"
    );
    let sent = gw
        .upstream
        .last()
        .usage
        .expect("the last call reported usage");
    assert_eq!(
        (
            mini.input_tokens,
            mini.output_tokens,
            mini.cached_input_tokens
        ),
        (sent.input, sent.output, sent.cached_input),
        "only the last call's tokens: {mini:?}"
    );
    assert_eq!(picodollars(&mini.cost_usd), cost(sent, GPT_4O_MINI));
}
