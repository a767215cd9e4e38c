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
use super::rows::table_of;
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

/// Sets every limit column of a consumer or consumer key (unset limits to NULL).
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
