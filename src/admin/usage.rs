//! Usage and spend (SPEC §8.2): the GetUsage handler, and applying a data plane's usage
//! report with its metrics (`apply_usage_report_and_count`, for the distribution server's
//! ReportUsage). Depends on `domain`, `store`, `metrics` and `proto`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{LazyLock, Mutex};

use tonic::Request;

use super::convert::{optional_reference, ts_in, ts_out};
use super::{AdminService, R, ok};
use crate::domain::usage::{
    AppliedUsage, Granularity, HOUR_MICROS, Picodollars, UsageApplied, UsageDimension, UsageQuery,
    UsageReportInput, UsageSummary,
};
use crate::domain::{FieldViolation, RuleError, Timestamp};
use crate::metrics::METRICS;
use crate::proto::admin::v1 as pb;
use crate::store::{Store, StoreError, USAGE_CURSOR_IDLE_MICROS};

/// Unpriced models named in one report's log line, at most.
const UNPRICED_LOGGED: usize = 10;

/// Applies a data plane's usage report (`Store::apply_usage_report`, exactly once) and counts
/// it: `keygate_usage_reports_total{result}` (`applied`, `duplicate`, or `refused` for a report
/// outside the rules; a store failure is not counted: the data plane sends the report again),
/// and for an applied one its tokens and cost per consumer and model service. A report with
/// unpriced usage is logged once, naming the models. About once an hour it also prunes the
/// cursors of data planes silent for 30 days.
pub async fn apply_usage_report_and_count(
    store: &Store,
    report: &UsageReportInput,
    now: Timestamp,
) -> Result<UsageApplied, StoreError> {
    prune_now_and_then(store, now).await;
    let applied = match store.apply_usage_report(report, now).await {
        Ok(a) => a,
        Err(StoreError::Rule(rule)) => {
            METRICS.usage_reports.with_label_values(&["refused"]).inc();
            tracing::warn!(
                data_plane = %report.data_plane,
                sequence = report.sequence,
                error = %rule,
                "usage report refused"
            );
            return Err(rule.into());
        }
        Err(e) => return Err(e),
    };
    match &applied {
        UsageApplied::Applied(a) => {
            METRICS.usage_reports.with_label_values(&["applied"]).inc();
            count_usage(a);
            if a.unpriced_requests > 0 {
                let models: Vec<String> = a
                    .unpriced_models
                    .iter()
                    .take(UNPRICED_LOGGED)
                    .map(|(service, model)| format!("{service}/{model}"))
                    .collect();
                tracing::warn!(
                    data_plane = %report.data_plane,
                    sequence = report.sequence,
                    unpriced_requests = a.unpriced_requests,
                    unpriced_models = a.unpriced_models.len(),
                    models = %models.join(","),
                    "usage of models without a price counted at cost 0: set the model service's pricing"
                );
            }
        }
        UsageApplied::Duplicate { last_sequence } => {
            METRICS
                .usage_reports
                .with_label_values(&["duplicate"])
                .inc();
            tracing::debug!(
                data_plane = %report.data_plane,
                sequence = report.sequence,
                last_sequence,
                "usage report already applied"
            );
        }
    }
    // Also after a duplicate: the control plane that applied it may have stopped before
    // refreshing the budgets it charged.
    refresh_budgets(store, report, now).await;
    Ok(applied)
}

/// Publishes the budgets `report` brought to exhaustion (SPEC §8.3). A failure is logged and
/// counted, never the report's: the next report of the same key refreshes it again.
async fn refresh_budgets(store: &Store, report: &UsageReportInput, now: Timestamp) {
    let mut keys: Vec<String> = report
        .rows
        .iter()
        .map(|r| r.consumer_key.to_string())
        .collect();
    let mut consumers: Vec<String> = report
        .rows
        .iter()
        .filter_map(|r| r.consumer.map(|c| c.to_string()))
        .collect();
    keys.sort();
    keys.dedup();
    consumers.sort();
    consumers.dedup();
    match store.refresh_budgets(&keys, &consumers, now).await {
        Ok(changes) => {
            for c in changes {
                let state = if c.exhausted_until.is_some() {
                    "exhausted"
                } else {
                    "reopened"
                };
                METRICS.budget_changes.with_label_values(&[state]).inc();
                tracing::info!(
                    kind = c.kind.label(),
                    id = %c.id,
                    name = %c.name,
                    until = c.exhausted_until.map(|t| t.0),
                    "budget {state}"
                );
            }
        }
        Err(e) => {
            METRICS.budget_changes.with_label_values(&["failed"]).inc();
            tracing::warn!(error = %e, "budget refresh failed; the next usage report retries it");
        }
    }
}

/// Picodollars below a whole micro-USD not yet counted, per (consumer, model service).
static COST_REMAINDERS: LazyLock<Mutex<HashMap<(String, String), u128>>> =
    LazyLock::new(Mutex::default);

/// Tokens, cost and unpriced requests of an applied report. The cost counter moves by whole
/// micro-USD; the picodollars left below one are kept per label pair and carried into the
/// next report's, so the counter is always the exact floor of the cost this process applied.
fn count_usage(applied: &AppliedUsage) {
    let mut remainders = COST_REMAINDERS.lock().unwrap_or_else(|e| e.into_inner());
    for c in &applied.charges {
        let (consumer, service) = (c.consumer.as_str(), c.model_service.as_str());
        for (kind, n) in [
            ("input", c.input_tokens),
            ("output", c.output_tokens),
            ("cached_input", c.cached_input_tokens),
        ] {
            METRICS
                .usage_tokens
                .with_label_values(&[consumer, service, kind])
                .inc_by(n);
        }
        let carried = remainders
            .entry((c.consumer.clone(), c.model_service.clone()))
            .or_default();
        let (micro, rest) = (c.cost + Picodollars(*carried)).split_micro();
        *carried = rest;
        METRICS
            .usage_cost
            .with_label_values(&[consumer, service])
            .inc_by(u64::try_from(micro).unwrap_or(u64::MAX));
        if c.unpriced_requests > 0 {
            METRICS
                .usage_unpriced
                .with_label_values(&[service])
                .inc_by(c.unpriced_requests);
        }
    }
}

/// When this process last pruned usage cursors (microseconds).
static LAST_PRUNE: AtomicI64 = AtomicI64::new(i64::MIN);

/// Prunes idle data planes' cursors at most once an hour per process; a failure is logged
/// (pruning is housekeeping: the next hour tries again).
async fn prune_now_and_then(store: &Store, now: Timestamp) {
    let last = LAST_PRUNE.load(Ordering::Relaxed);
    if now.0.saturating_sub(last) < HOUR_MICROS
        || LAST_PRUNE
            .compare_exchange(last, now.0, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    match store
        .prune_usage_cursors(Timestamp(now.0.saturating_sub(USAGE_CURSOR_IDLE_MICROS)))
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            cursors = n,
            "pruned usage cursors of data planes silent for 30 days"
        ),
        Err(e) => tracing::warn!(error = %e, "could not prune usage cursors"),
    }
}

pub(super) async fn get(
    svc: &AdminService,
    req: Request<pb::GetUsageRequest>,
) -> R<pb::GetUsageResponse> {
    let r = req.into_inner();
    let mut bad = Vec::new();
    let mut group_by = Vec::new();
    for (i, name) in r.group_by.iter().enumerate() {
        match UsageDimension::parse(name) {
            Some(d) => group_by.push(d),
            None => bad.push(FieldViolation::new(
                &format!("group_by[{i}]"),
                format!(
                    "unknown dimension {name:?}: group by consumer, consumer_key, model_service or model"
                ),
            )),
        }
    }
    let granularity = match pb::get_usage_request::Granularity::try_from(r.granularity) {
        Ok(pb::get_usage_request::Granularity::Hour) => Granularity::Hour,
        Ok(pb::get_usage_request::Granularity::Day) => Granularity::Day,
        Ok(pb::get_usage_request::Granularity::Total)
        | Ok(pb::get_usage_request::Granularity::Unspecified) => Granularity::Total,
        Err(_) => {
            bad.push(FieldViolation::new(
                "granularity",
                format!("must be HOUR, DAY or TOTAL (got {})", r.granularity),
            ));
            Granularity::Total
        }
    };
    if !bad.is_empty() {
        return Err(RuleError::Invalid(bad).into());
    }
    let query = UsageQuery {
        consumer: optional_reference(r.consumer),
        consumer_key: optional_reference(r.consumer_key),
        model_service: optional_reference(r.model_service),
        model: (!r.model.is_empty()).then_some(r.model),
        start: r
            .start_time
            .as_ref()
            .map(|t| ts_in("start_time", t))
            .transpose()?,
        end: r
            .end_time
            .as_ref()
            .map(|t| ts_in("end_time", t))
            .transpose()?,
        group_by,
        granularity,
    };
    let rows = svc.store.get_usage(&query).await?;
    ok(pb::GetUsageResponse {
        rows: rows.into_iter().map(row_out).collect(),
    })
}

/// A usage row on the wire: only the grouped dimensions are set. A model service never known
/// by name (deleted before this version kept names) shows its id.
fn row_out(s: UsageSummary) -> pb::UsageRow {
    let t = s.totals;
    let (consumer_id, consumer) = s.consumer.map(|n| (n.id, n.name)).unwrap_or_default();
    let (consumer_key_id, consumer_key) =
        s.consumer_key.map(|n| (n.id, n.name)).unwrap_or_default();
    pb::UsageRow {
        start_time: s.start.map(ts_out),
        consumer_id,
        consumer,
        consumer_key_id,
        consumer_key,
        model_service: s
            .model_service
            .map(|n| if n.name.is_empty() { n.id } else { n.name })
            .unwrap_or_default(),
        model: s.model.unwrap_or_default(),
        requests: t.requests,
        input_tokens: t.input_tokens,
        output_tokens: t.output_tokens,
        cached_input_tokens: t.cached_input_tokens,
        cost_usd: t.cost.to_string(),
        error_responses: t.error_responses,
        unparsed_responses: t.unparsed,
        unpriced_requests: t.unpriced_requests,
    }
}
