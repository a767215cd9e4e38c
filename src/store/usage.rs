//! Usage and spend (SPEC §8.2): data planes' usage reports applied exactly once into hourly
//! buckets and priced as they arrive, the usage query, and the names deleted resources leave
//! behind for it. Depends on `domain`.
//!
//! Exactly once: each data plane numbers its reports; `usage_cursors` keeps the last sequence
//! applied per data plane, and a report is applied only by the transaction that moves that
//! cursor forward, together with its buckets. On PostgreSQL the cursor row's lock makes two
//! replicas applying the same report wait for each other, and the second finds the cursor
//! already moved: a duplicate, which changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sqlx::Row;
use sqlx::any::AnyRow;
use uuid::Uuid;

use super::lookup::find;
use super::rows::{SqlCode, decode_pricing, placeholders, table_of};
use super::{Result, Store, StoreError};
use crate::domain::usage::{
    AppliedUsage, DAY_MICROS, Granularity, ModelPrice, Picodollars, USAGE_QUERY_MAX_ROWS,
    UsageApplied, UsageCharge, UsageDimension, UsageQuery, UsageReportInput, UsageSummary,
    UsageTotals, price_for,
};
use crate::domain::{Named, ResourceKind, RuleError, Selector, Timestamp};

/// A data plane's cursor may be pruned once it has sent nothing for this long (30 days): a
/// data plane that then resends a report it sent before the pruning has it applied again.
pub const USAGE_CURSOR_IDLE_MICROS: i64 = 30 * DAY_MICROS;

/// Ids per `IN (…)` list.
const IN_CHUNK: usize = 500;

/// One bucket's counters as a report adds them.
#[derive(Clone, Copy, Default)]
struct Counts {
    requests: u64,
    error_responses: u64,
    unparsed: u64,
    input: u64,
    output: u64,
    cached: u64,
}

/// (consumer key, consumer or '', model service, model or '') as stored.
type BucketKey = (String, String, String, String);

const UPSERT_BUCKET: &str = "INSERT INTO usage_buckets (hour, consumer_key_id, consumer_id, \
     model_service_id, model, requests, error_responses, unparsed, input_tokens, output_tokens, \
     cached_input_tokens, unpriced_requests, cost_micro_usd, cost_pico_usd) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
     ON CONFLICT (hour, consumer_key_id, consumer_id, model_service_id, model) DO UPDATE SET \
     requests = usage_buckets.requests + excluded.requests, \
     error_responses = usage_buckets.error_responses + excluded.error_responses, \
     unparsed = usage_buckets.unparsed + excluded.unparsed, \
     input_tokens = usage_buckets.input_tokens + excluded.input_tokens, \
     output_tokens = usage_buckets.output_tokens + excluded.output_tokens, \
     cached_input_tokens = usage_buckets.cached_input_tokens + excluded.cached_input_tokens, \
     unpriced_requests = usage_buckets.unpriced_requests + excluded.unpriced_requests, \
     cost_micro_usd = usage_buckets.cost_micro_usd + excluded.cost_micro_usd \
        + (usage_buckets.cost_pico_usd + excluded.cost_pico_usd) / 1000000, \
     cost_pico_usd = (usage_buckets.cost_pico_usd + excluded.cost_pico_usd) % 1000000";

/// A stored integer: every count a validated report adds is far inside 63 bits.
fn int(v: impl TryInto<i64>, what: &str) -> Result<i64> {
    v.try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what} out of range")))
}

fn count(r: &AnyRow, column: &str) -> Result<u64> {
    let v: i64 = r.try_get(column)?;
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative usage {column}")))
}

impl Store {
    /// Applies a data plane's usage report once: if its sequence is above the last one
    /// applied for its data plane, its rows are added to the buckets of the hour of
    /// `min(r.time, now)`, each priced at its model service's price in force now, and the
    /// cursor moves to it, all in one transaction; otherwise nothing changes and the answer
    /// is `Duplicate`. A report outside the rules (`UsageReportInput::validate`) is refused
    /// and changes nothing.
    pub async fn apply_usage_report(
        &self,
        r: &UsageReportInput,
        now: Timestamp,
    ) -> Result<UsageApplied> {
        r.validate()?;
        let hour = r.bucket(now);
        let data_plane = r.data_plane.to_string();
        let mut merged: BTreeMap<BucketKey, Counts> = BTreeMap::new();
        for d in &r.rows {
            let key = (
                d.consumer_key.to_string(),
                d.consumer.map(|c| c.to_string()).unwrap_or_default(),
                d.model_service.to_string(),
                d.model.clone(),
            );
            // Validated counters (≤ 10^12 each, ≤ 10^5 rows) cannot overflow.
            let c = merged.entry(key).or_default();
            c.requests += d.requests;
            c.error_responses += d.error_responses;
            c.unparsed += d.unparsed;
            c.input += d.input_tokens;
            c.output += d.output_tokens;
            c.cached += d.cached_input_tokens;
        }

        let mut tx = self.pool.begin().await?;
        // The serialisation point: only the transaction that moves the cursor applies.
        let advanced = sqlx::query(
            "INSERT INTO usage_cursors (data_plane, last_sequence, update_time) VALUES ($1, $2, $3) \
             ON CONFLICT (data_plane) DO UPDATE SET last_sequence = excluded.last_sequence, \
             update_time = excluded.update_time \
             WHERE usage_cursors.last_sequence < excluded.last_sequence",
        )
        .bind(&data_plane)
        .bind(int(r.sequence, "sequence")?)
        .bind(now.0)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if advanced == 0 {
            let last: i64 =
                sqlx::query_scalar("SELECT last_sequence FROM usage_cursors WHERE data_plane = $1")
                    .bind(&data_plane)
                    .fetch_one(&mut *tx)
                    .await?;
            tx.rollback().await?;
            return Ok(UsageApplied::Duplicate {
                last_sequence: last.max(0) as u64,
            });
        }

        // The prices in force now, per service the report names (none for a deleted one).
        let mut prices: HashMap<&str, Vec<ModelPrice>> = HashMap::new();
        for (_, _, service, _) in merged.keys() {
            if prices.contains_key(service.as_str()) {
                continue;
            }
            let text: Option<String> =
                sqlx::query_scalar("SELECT pricing FROM model_services WHERE id = $1")
                    .bind(service)
                    .fetch_optional(&mut *tx)
                    .await?;
            let list = text.as_deref().map(decode_pricing).transpose()?;
            prices.insert(service, list.unwrap_or_default());
        }

        let mut charges: BTreeMap<(&str, &str), UsageCharge> = BTreeMap::new();
        let mut unpriced_models = BTreeSet::new();
        let mut unpriced_requests = 0;
        for ((key, consumer, service, model), c) in &merged {
            let price = price_for(&prices[service.as_str()], model);
            let cost = price.map_or(Picodollars(0), |p| p.cost(c.input, c.cached, c.output));
            let unpriced = if price.is_none() {
                unpriced_models.insert((service.as_str(), model.as_str()));
                c.requests
            } else {
                0
            };
            unpriced_requests += unpriced;
            let (micro, pico) = cost.split_micro();
            sqlx::query(UPSERT_BUCKET)
                .bind(hour.0)
                .bind(key)
                .bind(consumer)
                .bind(service)
                .bind(model)
                .bind(int(c.requests, "requests")?)
                .bind(int(c.error_responses, "error_responses")?)
                .bind(int(c.unparsed, "unparsed")?)
                .bind(int(c.input, "input_tokens")?)
                .bind(int(c.output, "output_tokens")?)
                .bind(int(c.cached, "cached_input_tokens")?)
                .bind(int(unpriced, "unpriced_requests")?)
                .bind(int(micro, "cost")?)
                .bind(int(pico, "cost")?)
                .execute(&mut *tx)
                .await?;
            let charge = charges
                .entry((consumer.as_str(), service.as_str()))
                .or_default();
            charge.requests += c.requests;
            charge.input_tokens += c.input;
            charge.output_tokens += c.output;
            charge.cached_input_tokens += c.cached;
            charge.unpriced_requests += unpriced;
            charge.cost += cost;
        }

        // Names for the metrics' labels: the live name, a deleted resource's last one, or
        // (never known by name) the id.
        let consumer_ids: BTreeSet<String> = charges.keys().map(|k| k.0.to_string()).collect();
        let service_ids: BTreeSet<String> = charges.keys().map(|k| k.1.to_string()).collect();
        let consumers = names_of(&mut tx, ResourceKind::Consumer, &consumer_ids).await?;
        let services = names_of(&mut tx, ResourceKind::ModelService, &service_ids).await?;
        tx.commit().await?;

        let label = |names: &HashMap<String, String>, id: &str| {
            names.get(id).cloned().unwrap_or_else(|| id.to_string())
        };
        let charges = charges
            .into_iter()
            .map(|((consumer, service), c)| UsageCharge {
                consumer: label(&consumers, consumer),
                model_service: label(&services, service),
                ..c
            })
            .collect();
        let unpriced_models = unpriced_models
            .into_iter()
            .map(|(s, m)| (label(&services, s), m.to_string()))
            .collect();
        Ok(UsageApplied::Applied(AppliedUsage {
            hour,
            rows: merged.len(),
            charges,
            unpriced_requests,
            unpriced_models,
        }))
    }

    /// Forgets the cursors of data planes that reported nothing since `idle_before`; answers
    /// how many. See [`USAGE_CURSOR_IDLE_MICROS`].
    pub async fn prune_usage_cursors(&self, idle_before: Timestamp) -> Result<u64> {
        Ok(
            sqlx::query("DELETE FROM usage_cursors WHERE update_time < $1")
                .bind(idle_before.0)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }

    /// The usage `q` asks for, summed per period and group, sorted by period then group
    /// (names, then ids). A filter names a live resource (by id or name), or a deleted one
    /// by id or by the last name it had; anything else is `NOT_FOUND`.
    pub async fn get_usage(&self, q: &UsageQuery) -> Result<Vec<UsageSummary>> {
        q.validate()?;
        let mut conn = self.pool.acquire().await?;
        let mut filters: Vec<(&str, Vec<String>)> = Vec::new();
        for (text, kind, column) in [
            (&q.consumer, ResourceKind::Consumer, "consumer_id"),
            (
                &q.consumer_key,
                ResourceKind::ConsumerKey,
                "consumer_key_id",
            ),
            (
                &q.model_service,
                ResourceKind::ModelService,
                "model_service_id",
            ),
        ] {
            if let Some(text) = text {
                filters.push((column, resolve_filter(&mut conn, kind, text).await?));
            }
        }
        if let Some(model) = &q.model {
            filters.push(("model", vec![model.clone()]));
        }

        let mut group_by: Vec<UsageDimension> = q.group_by.clone();
        group_by.sort();
        group_by.dedup();
        let column_of = |d: UsageDimension| match d {
            UsageDimension::Consumer => "consumer_id",
            UsageDimension::ConsumerKey => "consumer_key_id",
            UsageDimension::ModelService => "model_service_id",
            UsageDimension::Model => "model",
        };
        let day = format!("hour - hour % {DAY_MICROS}");
        let period = match q.granularity {
            Granularity::Hour => Some("hour"),
            Granularity::Day => Some(day.as_str()),
            Granularity::Total => None,
        };
        let mut keys: Vec<String> = period.map(str::to_string).into_iter().collect();
        keys.extend(group_by.iter().map(|d| column_of(*d).to_string()));
        let mut select: Vec<String> = period
            .map(|p| format!("{p} AS period"))
            .into_iter()
            .collect();
        select.extend(group_by.iter().map(|d| column_of(*d).to_string()));
        for c in [
            "requests",
            "error_responses",
            "unparsed",
            "input_tokens",
            "output_tokens",
            "cached_input_tokens",
            "unpriced_requests",
            "cost_micro_usd",
            "cost_pico_usd",
        ] {
            select.push(format!("CAST(SUM({c}) AS BIGINT) AS {c}"));
        }
        select.push("COUNT(*) AS buckets".into());
        let mut sql = format!(
            "SELECT {} FROM usage_buckets WHERE hour >= $1 AND hour < $2",
            select.join(", ")
        );
        let mut n = 2;
        for (column, values) in &filters {
            let marks: Vec<String> = values
                .iter()
                .map(|_| {
                    n += 1;
                    format!("${n}")
                })
                .collect();
            sql += &format!(" AND {column} IN ({})", marks.join(", "));
        }
        if !keys.is_empty() {
            sql += &format!(" GROUP BY {}", keys.join(", "));
        }
        sql += &format!(" LIMIT {}", USAGE_QUERY_MAX_ROWS + 1);

        let (start, end) = q.hours();
        let mut query = sqlx::query(&sql).bind(start).bind(end);
        for (_, values) in &filters {
            for v in values {
                query = query.bind(v);
            }
        }
        let rows = query.fetch_all(&mut *conn).await?;
        if rows.len() > USAGE_QUERY_MAX_ROWS {
            return Err(RuleError::invalid(
                "group_by",
                format!(
                    "the answer would have more than {USAGE_QUERY_MAX_ROWS} rows: narrow \
                     start_time/end_time or the filters, group by fewer dimensions, or use a \
                     coarser granularity"
                ),
            )
            .into());
        }

        let has = |d: UsageDimension| group_by.contains(&d);
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            // An aggregate over no bucket at all (no GROUP BY) still answers one row.
            if r.try_get::<i64, _>("buckets")? == 0 {
                continue;
            }
            let id = |column: &str| r.try_get::<String, _>(column);
            let named = |column: &str| -> Result<Named> {
                Ok(Named {
                    id: id(column)?,
                    name: String::new(),
                })
            };
            let (micro, pico) = (count(r, "cost_micro_usd")?, count(r, "cost_pico_usd")?);
            out.push(UsageSummary {
                start: period
                    .map(|_| r.try_get::<i64, _>("period").map(Timestamp))
                    .transpose()?,
                consumer: has(UsageDimension::Consumer)
                    .then(|| named("consumer_id"))
                    .transpose()?,
                consumer_key: has(UsageDimension::ConsumerKey)
                    .then(|| named("consumer_key_id"))
                    .transpose()?,
                model_service: has(UsageDimension::ModelService)
                    .then(|| named("model_service_id"))
                    .transpose()?,
                model: has(UsageDimension::Model)
                    .then(|| id("model"))
                    .transpose()?,
                totals: UsageTotals {
                    requests: count(r, "requests")?,
                    error_responses: count(r, "error_responses")?,
                    unparsed: count(r, "unparsed")?,
                    input_tokens: count(r, "input_tokens")?,
                    output_tokens: count(r, "output_tokens")?,
                    cached_input_tokens: count(r, "cached_input_tokens")?,
                    unpriced_requests: count(r, "unpriced_requests")?,
                    cost: Picodollars(
                        u128::from(micro) * Picodollars::PER_MICRO_USD + u128::from(pico),
                    ),
                },
            });
        }

        name_resources(&mut conn, &mut out).await?;
        out.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        Ok(out)
    }
}

/// Fills in the names of the consumers, keys and services of `rows` (ids never known by name
/// keep an empty name).
async fn name_resources(conn: &mut sqlx::AnyConnection, rows: &mut [UsageSummary]) -> Result<()> {
    fn slot(s: &mut UsageSummary, kind: ResourceKind) -> Option<&mut Named> {
        match kind {
            ResourceKind::Consumer => s.consumer.as_mut(),
            ResourceKind::ConsumerKey => s.consumer_key.as_mut(),
            _ => s.model_service.as_mut(),
        }
    }
    for kind in [
        ResourceKind::Consumer,
        ResourceKind::ConsumerKey,
        ResourceKind::ModelService,
    ] {
        let ids: BTreeSet<String> = rows
            .iter_mut()
            .filter_map(|s| slot(s, kind).map(|n| n.id.clone()))
            .collect();
        if ids.is_empty() {
            continue;
        }
        let names = names_of(conn, kind, &ids).await?;
        for s in rows.iter_mut() {
            if let Some(n) = slot(s, kind)
                && let Some(name) = names.get(&n.id)
            {
                n.name = name.clone();
            }
        }
    }
    Ok(())
}

/// Keeps the last name of a deleted consumer, consumer key or model service, so the usage
/// it leaves behind is still shown (and can be asked for) by name.
pub(super) async fn remember_deleted_name(
    conn: &mut sqlx::AnyConnection,
    kind: ResourceKind,
    id: &str,
    name: &str,
    now: Timestamp,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO usage_names (id, kind, name, time) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (id) DO UPDATE SET name = excluded.name, time = excluded.time",
    )
    .bind(id)
    .bind(kind.code())
    .bind(name)
    .bind(now.0)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The names of `ids` of `kind`: live resources' current names, then deleted ones' last
/// names. Ids never known by name (and '') are left out.
async fn names_of(
    conn: &mut sqlx::AnyConnection,
    kind: ResourceKind,
    ids: &BTreeSet<String>,
) -> Result<HashMap<String, String>> {
    let ids: Vec<&String> = ids.iter().filter(|i| !i.is_empty()).collect();
    let mut out = HashMap::new();
    for chunk in ids.chunks(IN_CHUNK) {
        let marks = |from: usize| placeholders(from, chunk.len());
        let live = format!(
            "SELECT id, name FROM {} WHERE id IN ({})",
            table_of(kind),
            marks(1)
        );
        let deleted = format!(
            "SELECT id, name FROM usage_names WHERE kind = $1 AND id IN ({})",
            marks(2)
        );
        let mut q = sqlx::query(&live);
        for id in chunk {
            q = q.bind(*id);
        }
        for r in q.fetch_all(&mut *conn).await? {
            out.insert(r.try_get("id")?, r.try_get("name")?);
        }
        let mut q = sqlx::query(&deleted).bind(kind.code());
        for id in chunk {
            q = q.bind(*id);
        }
        for r in q.fetch_all(&mut *conn).await? {
            out.entry(r.try_get("id")?).or_insert(r.try_get("name")?);
        }
    }
    Ok(out)
}

/// The ids a usage filter stands for: a live resource by id or name (an id wins); else any
/// id, live or not (usage outlives its key); else the deleted resources last named so.
async fn resolve_filter(
    conn: &mut sqlx::AnyConnection,
    kind: ResourceKind,
    text: &str,
) -> Result<Vec<String>> {
    match find(conn, kind, &Selector::IdOrName(text.to_string())).await {
        Ok(found) => return Ok(vec![found.id]),
        Err(StoreError::Rule(RuleError::NotFound { .. })) => {}
        Err(e) => return Err(e),
    }
    if let Ok(id) = Uuid::parse_str(text) {
        return Ok(vec![id.to_string()]);
    }
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT id FROM usage_names WHERE kind = $1 AND name = $2 ORDER BY id")
            .bind(kind.code())
            .bind(text)
            .fetch_all(&mut *conn)
            .await?;
    if ids.is_empty() {
        return Err(RuleError::not_found(kind, &Selector::Name(text.to_string())).into());
    }
    Ok(ids)
}
