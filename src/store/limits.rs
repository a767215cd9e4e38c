//! Budgets and rate limits of consumers and consumer keys (SPEC §8.3): their columns, and the
//! spend of a budget's current period summed from the usage buckets. Depends on `domain`.
//!
//! A key's spend is the usage reported for it (`usage_buckets.consumer_key_id`); a consumer's
//! is the usage of its keys while they were bound to it (`usage_buckets.consumer_id`), so a
//! key moved to another consumer takes none of its history along. Both are exact: whole
//! micro-USD plus picodollars, tokens as input + output.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::lookup::find;
use super::mutation::Mutation;
use super::rows::{placeholders, table_of};
use super::{Result, Store, StoreError};
use crate::domain::limits::{BudgetPeriod, Limits, Spend, period_bounds};
use crate::domain::usage::Picodollars;
use crate::domain::{ResourceKind, RuleError, Selector, Timestamp};

/// The limit columns of `consumers` and `consumer_keys` (NULL: no limit), with `prefix`
/// (`""` or `"k."`).
pub(super) fn limit_columns(prefix: &str) -> String {
    [
        "budget_micro_usd",
        "budget_tokens",
        "budget_period",
        "requests_per_minute",
        "tokens_per_minute",
    ]
    .map(|c| format!("{prefix}{c}"))
    .join(", ")
}

/// The limits of a row selected with [`limit_columns`].
pub(super) fn limits_of(r: &AnyRow) -> Result<Limits> {
    let int = |column: &str| -> Result<Option<i64>> { Ok(r.try_get(column)?) };
    let corrupt = |column: &str| StoreError::Corrupt(format!("limit {column} out of range"));
    let unsigned = |column: &str| -> Result<Option<u64>> {
        int(column)?
            .map(|v| u64::try_from(v).map_err(|_| corrupt(column)))
            .transpose()
    };
    let period = int("budget_period")?
        .map(|c| BudgetPeriod::from_code(c).ok_or_else(|| corrupt("budget_period")))
        .transpose()?;
    Ok(Limits {
        budget_micro_usd: unsigned("budget_micro_usd")?,
        budget_tokens: unsigned("budget_tokens")?,
        period,
        requests_per_minute: unsigned("requests_per_minute")?
            .map(|v| u32::try_from(v).map_err(|_| corrupt("requests_per_minute")))
            .transpose()?,
        tokens_per_minute: unsigned("tokens_per_minute")?,
    })
}

/// Until when a row's budget refuses (`budget_exhausted_until`), NULL while open.
pub(super) fn exhausted_of(r: &AnyRow) -> Result<Option<Timestamp>> {
    Ok(r.try_get::<Option<i64>, _>("budget_exhausted_until")?
        .map(Timestamp))
}

/// A subject's exhaustion as stored and as its limits and spend at `now` make it (`None`: no
/// such row). An exhaustion of a past period is stale and re-read like an open budget.
struct Exhaustion {
    spend: Option<Spend>,
    stored: Option<Timestamp>,
    due: Option<Timestamp>,
}

async fn exhaustion(
    conn: &mut sqlx::AnyConnection,
    kind: ResourceKind,
    id: &str,
    now: Timestamp,
) -> Result<Option<Exhaustion>> {
    let Some(row) = sqlx::query(&format!(
        "SELECT {}, budget_exhausted_until FROM {} WHERE id = $1",
        limit_columns(""),
        table_of(kind)
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let limits = limits_of(&row)?;
    let stored = exhausted_of(&row)?;
    let spend = spend_of(conn, kind, id, &limits, now).await?;
    let due = spend.as_ref().and_then(Spend::exhausted_until);
    Ok(Some(Exhaustion { spend, stored, due }))
}

/// Brings `id`'s stored exhaustion up to date with its limits and its spend at `now` (inside
/// the caller's transaction, which holds the store's revision row: every such change is
/// serialised, so replicas agree). Answers the spend and whether the exhaustion changed.
pub(super) async fn refresh_exhaustion(
    conn: &mut sqlx::AnyConnection,
    kind: ResourceKind,
    id: &str,
    now: Timestamp,
) -> Result<Option<(Option<Spend>, bool)>> {
    let Some(e) = exhaustion(conn, kind, id, now).await? else {
        return Ok(None);
    };
    if e.due == e.stored {
        return Ok(Some((e.spend, false)));
    }
    sqlx::query(&format!(
        "UPDATE {} SET budget_exhausted_until = $1 WHERE id = $2",
        table_of(kind)
    ))
    .bind(e.due.map(|t| t.0))
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(Some((e.spend, true)))
}

/// Sets every limit column of a consumer or consumer key (unset limits to NULL), and its
/// exhaustion under the new limits: raising a budget re-opens at once, lowering it below
/// the spend refuses at once.
pub(super) async fn write_limits(
    m: &mut Mutation,
    kind: ResourceKind,
    id: &str,
    limits: &Limits,
) -> Result<()> {
    // Validated limits are at most 10^15: far inside 63 bits.
    let int = |v: Option<u64>| v.map(|v| v.min(i64::MAX as u64) as i64);
    sqlx::query(&format!(
        "UPDATE {} SET budget_micro_usd = $1, budget_tokens = $2, budget_period = $3, \
         requests_per_minute = $4, tokens_per_minute = $5 WHERE id = $6",
        table_of(kind)
    ))
    .bind(int(limits.budget_micro_usd))
    .bind(int(limits.budget_tokens))
    .bind(limits.period.map(BudgetPeriod::code))
    .bind(limits.requests_per_minute.map(i64::from))
    .bind(int(limits.tokens_per_minute))
    .bind(id)
    .execute(&mut *m.tx)
    .await?;
    refresh_exhaustion(&mut m.tx, kind, id, m.now).await?;
    Ok(())
}

/// The spend of `id`'s (a consumer's or consumer key's) budget period at `now`: the usage of
/// the buckets from the period's start to `now`. `None` without a budget.
pub(super) async fn spend_of(
    conn: &mut sqlx::AnyConnection,
    kind: ResourceKind,
    id: &str,
    limits: &Limits,
    now: Timestamp,
) -> Result<Option<Spend>> {
    let Some(period) = limits.period.filter(|_| limits.has_budget()) else {
        return Ok(None);
    };
    let column = match kind {
        ResourceKind::Consumer => "consumer_id",
        _ => "consumer_key_id",
    };
    let (start, _) = period_bounds(period, now);
    let sum = |c: &str| format!("CAST(COALESCE(SUM({c}), 0) AS BIGINT) AS {c}");
    let row = sqlx::query(&format!(
        "SELECT {}, {}, {}, {} FROM usage_buckets WHERE {column} = $1 AND hour >= $2 AND hour <= $3",
        sum("input_tokens"),
        sum("output_tokens"),
        sum("cost_micro_usd"),
        sum("cost_pico_usd"),
    ))
    .bind(id)
    .bind(start.0)
    .bind(now.0)
    .fetch_one(&mut *conn)
    .await?;
    let count = |c: &str| -> Result<u64> {
        let v: i64 = row.try_get(c)?;
        u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative usage {c}")))
    };
    let cost = Picodollars(
        u128::from(count("cost_micro_usd")?) * Picodollars::PER_MICRO_USD
            + u128::from(count("cost_pico_usd")?),
    );
    let tokens = count("input_tokens")?.saturating_add(count("output_tokens")?);
    Ok(limits.spend(now, cost, tokens))
}

impl Store {
    /// The spend of a consumer's or consumer key's budget in the period `now` falls in (what
    /// Get shows for the present): `None` when it has no budget.
    pub async fn spend(
        &self,
        kind: ResourceKind,
        sel: &Selector,
        now: Timestamp,
    ) -> Result<Option<Spend>> {
        if !matches!(kind, ResourceKind::Consumer | ResourceKind::ConsumerKey) {
            return Err(RuleError::invalid(
                "kind",
                "only consumers and consumer keys have budgets",
            )
            .into());
        }
        let mut conn = self.pool.acquire().await?;
        let id = find(&mut conn, kind, sel).await?.id;
        let row = sqlx::query(&format!(
            "SELECT {} FROM {} WHERE id = $1",
            limit_columns(""),
            table_of(kind)
        ))
        .bind(&id)
        .fetch_one(&mut *conn)
        .await?;
        let limits = limits_of(&row)?;
        spend_of(&mut conn, kind, &id, &limits, now).await
    }
}

/// A budget's state changed by usage (not by an operator): what [`Store::refresh_budgets`]
/// changed, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetChange {
    pub kind: ResourceKind,
    pub id: String,
    pub name: String,
    /// Refusing until this instant (`None`: re-opened).
    pub exhausted_until: Option<Timestamp>,
}

/// Ids looked up per query when a report's subjects are checked for budgets.
const BUDGET_LOOKUP_CHUNK: usize = 500;

/// The actor of the audit rows budget changes leave (no admin request made them).
pub const BUDGET_ACTOR: &str = "keygate:budget";

impl Store {
    /// Re-reads the spend of the given consumer keys and consumers (those a usage report just
    /// charged) and publishes what reached a budget (or re-opened): one mutation per changed
    /// subject, audited under [`BUDGET_ACTOR`]; nothing at all (no lock taken, no revision
    /// spent) when no exhaustion changes, which is most reports. A change is checked again
    /// under the store's revision row, so two control planes applying reports at once agree,
    /// and a second refresh of the same spend changes nothing.
    pub async fn refresh_budgets(
        &self,
        consumer_keys: &[String],
        consumers: &[String],
        now: Timestamp,
    ) -> Result<Vec<BudgetChange>> {
        // Only subjects with a budget: most reports charge none, and then take no lock.
        let mut subjects = Vec::new();
        {
            let mut conn = self.pool.acquire().await?;
            for (kind, ids) in [
                (ResourceKind::ConsumerKey, consumer_keys),
                (ResourceKind::Consumer, consumers),
            ] {
                for chunk in ids.chunks(BUDGET_LOOKUP_CHUNK) {
                    let sql = format!(
                        "SELECT id FROM {} WHERE budget_period IS NOT NULL AND id IN ({})",
                        table_of(kind),
                        placeholders(1, chunk.len())
                    );
                    let mut q = sqlx::query_scalar::<_, String>(&sql);
                    for id in chunk {
                        q = q.bind(id);
                    }
                    for id in q.fetch_all(&mut *conn).await? {
                        subjects.push((kind, id));
                    }
                }
            }
        }
        if subjects.is_empty() {
            return Ok(Vec::new());
        }
        subjects.sort();
        subjects.dedup();
        let mut out = Vec::new();
        for (kind, id) in subjects {
            // Read without the store's lock: most refreshes find nothing to change.
            let due = {
                let mut conn = self.pool.acquire().await?;
                exhaustion(&mut conn, kind, &id, now).await?
            };
            if due.is_none_or(|e| e.due == e.stored) {
                continue;
            }
            // A change is due: one mutation of its own (one audit row per revision), checked
            // again under the lock, at the later of `now` and the mutation's clock.
            let mut m = self.begin(&super::Actor(BUDGET_ACTOR.into())).await?;
            let at = now.max(m.now);
            let Some((spend, true)) = refresh_exhaustion(&mut m.tx, kind, &id, at).await? else {
                m.tx.rollback().await?;
                continue;
            };
            let name: String = sqlx::query_scalar(&format!(
                "SELECT name FROM {} WHERE id = $1",
                table_of(kind)
            ))
            .bind(&id)
            .fetch_one(&mut *m.tx)
            .await?;
            let until = spend.as_ref().and_then(Spend::exhausted_until);
            let details = budget_details(spend.as_ref(), until);
            let action = if until.is_some() {
                "BudgetExhausted"
            } else {
                "BudgetReopened"
            };
            super::audit::Audit::new(action, kind, &id, &name, &["budget_exhausted_until"])
                .with_details(&details)
                .write(&mut m.tx, m.revision, m.now, &m.actor)
                .await?;
            m.changed.push((kind, id.clone()));
            self.commit_unaudited(m).await?;
            out.push(BudgetChange {
                kind,
                id,
                name,
                exhausted_until: until,
            });
        }
        Ok(out)
    }
}

/// What an exhaustion audit row says: the spend that reached the budget and until when.
fn budget_details(spend: Option<&Spend>, until: Option<Timestamp>) -> String {
    let Some(s) = spend else {
        return "budget removed".into();
    };
    let (micro, pico) = s.cost.split_micro();
    let spent = format!(
        "spent {} tokens and {}.{:06}{:06} USD since {}",
        s.tokens,
        micro / 1_000_000,
        micro % 1_000_000,
        pico,
        time_text(s.period_start)
    );
    match until {
        Some(Timestamp(i64::MAX)) => format!("{spent}; refused for good (TOTAL budget)"),
        Some(t) => format!("{spent}; refused until {}", time_text(t)),
        None => format!("{spent}; open again"),
    }
}

fn time_text(t: Timestamp) -> String {
    humantime::format_rfc3339_seconds(t.to_system()).to_string()
}
