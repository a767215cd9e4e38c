//! Budgets and rate limits of consumers and consumer keys (SPEC §8.3): the limits as operators
//! write them and as they are kept, the UTC calendar periods budgets count in, and the spend
//! of a period against its budgets. Pure data and functions.
//!
//! Money is integers, as for prices (`usage`): a budget is whole micro-USD, a spend is
//! picodollars; nothing is ever a float. Every limit is optional: unset, `0` or `""` is no
//! limit.
//!
//! (Not to be confused with [`super::Limits`], the operator's tunables of the store: keys per
//! consumer, allowlist entries.)

use super::Timestamp;
use super::usage::{
    DAY_MICROS, DecimalError, PRICE_FRACTION_DIGITS, Picodollars, micro_text, parse_micro,
};
use super::validate::FieldViolation;
use crate::authz::ratelimit::{MAX_PER_MINUTE, PerMinute};

/// The highest budget accepted, in USD (a billion): far above any consumer's, low enough that
/// every amount stays far inside 64 bits of micro-USD.
pub const BUDGET_MAX_USD: u64 = 1_000_000_000;
/// The same, in micro-USD.
pub const BUDGET_MAX_MICRO_USD: u64 = BUDGET_MAX_USD * 1_000_000;
/// The highest token budget accepted (10¹⁵ tokens).
pub const BUDGET_MAX_TOKENS: u64 = 1_000_000_000_000_000;
/// The highest `tokens_per_minute` accepted (10¹²: the rate limiter's own maximum).
pub const TOKENS_PER_MINUTE_MAX: u64 = MAX_PER_MINUTE;

/// The period a budget counts in: a UTC calendar day, week (from Monday 00:00) or month, or
/// the whole history (never resets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BudgetPeriod {
    Day,
    Week,
    Month,
    Total,
}

impl BudgetPeriod {
    /// The stored / wire code (0 is never stored: it means "unspecified" on the wire).
    pub fn code(self) -> i64 {
        match self {
            BudgetPeriod::Day => 1,
            BudgetPeriod::Week => 2,
            BudgetPeriod::Month => 3,
            BudgetPeriod::Total => 4,
        }
    }

    /// The period of a stored / wire code (none for 0 or an unknown code).
    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            1 => BudgetPeriod::Day,
            2 => BudgetPeriod::Week,
            3 => BudgetPeriod::Month,
            4 => BudgetPeriod::Total,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "DAY",
            BudgetPeriod::Week => "WEEK",
            BudgetPeriod::Month => "MONTH",
            BudgetPeriod::Total => "TOTAL",
        }
    }
}

/// A consumer's or consumer key's limits, each `None` when not limited. A budget
/// (`budget_micro_usd`, `budget_tokens` or both) always has a `period`, and a period always
/// has a budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Limits {
    /// The spend allowed per period, in micro-USD.
    pub budget_micro_usd: Option<u64>,
    /// The input + output tokens allowed per period.
    pub budget_tokens: Option<u64>,
    pub period: Option<BudgetPeriod>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

impl Limits {
    /// No limit at all.
    pub fn is_unlimited(&self) -> bool {
        *self == Limits::default()
    }

    /// Whether a budget (of USD, tokens or both) is set.
    pub fn has_budget(&self) -> bool {
        self.budget_micro_usd.is_some() || self.budget_tokens.is_some()
    }

    /// The per-minute limits, as the rate limiter takes them.
    pub fn per_minute(&self) -> PerMinute {
        PerMinute {
            requests: self.requests_per_minute,
            tokens: self.tokens_per_minute,
        }
    }

    /// The USD budget as a canonical decimal (`"12.5"`), empty when unset.
    pub fn budget_usd_text(&self) -> String {
        self.budget_micro_usd.map(micro_text).unwrap_or_default()
    }

    /// Whether `cost` or `tokens` has reached a budget (never without one).
    pub fn is_exhausted(&self, cost: Picodollars, tokens: u64) -> bool {
        let usd = self
            .budget_micro_usd
            .is_some_and(|b| cost.0 >= u128::from(b) * Picodollars::PER_MICRO_USD);
        usd || self.budget_tokens.is_some_and(|b| tokens >= b)
    }

    /// The spend of the period at `now` that `cost` and `tokens` come to; `None` without a
    /// budget (there is no period to count in).
    pub fn spend(&self, now: Timestamp, cost: Picodollars, tokens: u64) -> Option<Spend> {
        let period = self.period.filter(|_| self.has_budget())?;
        let (period_start, period_end) = period_bounds(period, now);
        Some(Spend {
            period_start,
            period_end,
            cost,
            tokens,
            exhausted: self.is_exhausted(cost, tokens),
        })
    }
}

/// What was spent in a budget's current period: from `period_start` (inclusive) to
/// `period_end` (exclusive; none for `TOTAL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spend {
    pub period_start: Timestamp,
    pub period_end: Option<Timestamp>,
    /// The cost of the usage, exact.
    pub cost: Picodollars,
    /// Input + output tokens (cached input is part of input).
    pub tokens: u64,
    /// The spend has reached a budget (USD or tokens).
    pub exhausted: bool,
}

impl Spend {
    /// Until when an exhausted budget refuses: the period's end (the latest instant there is
    /// for `TOTAL`, which never ends); `None` while not exhausted.
    pub fn exhausted_until(&self) -> Option<Timestamp> {
        self.exhausted
            .then(|| self.period_end.unwrap_or(Timestamp(i64::MAX)))
    }
}

/// Limits as an operator writes them (the wire's values): `""` / `0` for no limit, the period
/// by its code (`0`: unspecified).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitsInput {
    pub budget_usd: String,
    pub budget_tokens: u64,
    pub budget_period: i64,
    pub requests_per_minute: u32,
    pub tokens_per_minute: u64,
}

impl LimitsInput {
    /// Parses and checks limits; `field` is their path in the request (`limits`,
    /// `consumer_key.limits`). Every broken rule is reported by its field
    /// (`limits.budget_period`).
    pub fn parse(&self, field: &str) -> Result<Limits, Vec<FieldViolation>> {
        let mut bad = Vec::new();
        let f = |name: &str| format!("{field}.{name}");
        let shown: String = self.budget_usd.chars().take(40).collect();
        // Ok(None): no USD budget ("" or zero); Err: written but refused.
        let usd = if self.budget_usd.is_empty() {
            Ok(None)
        } else {
            let rule = |why: String| {
                FieldViolation::new(
                    &f("budget_usd"),
                    format!(
                        "{why}: a budget is a non-negative decimal number of USD with at most \
                         {PRICE_FRACTION_DIGITS} fractional digits, e.g. \"100\" or \"12.50\" (got {shown:?})"
                    ),
                )
            };
            parse_micro(&self.budget_usd, BUDGET_MAX_MICRO_USD)
                .map(|micro| (micro > 0).then_some(micro))
                .map_err(|e| match e {
                    DecimalError::Negative => rule("must not be negative".into()),
                    DecimalError::NotDecimal => rule("is not a decimal number".into()),
                    DecimalError::FractionDigits => rule(format!(
                        "has more than {PRICE_FRACTION_DIGITS} fractional digits"
                    )),
                    DecimalError::TooLarge => FieldViolation::new(
                        &f("budget_usd"),
                        format!("must be at most {BUDGET_MAX_USD} USD (got {shown:?})"),
                    ),
                })
        };
        // A budget written but refused still counts as written: its own violation says why,
        // and the period rule must not add a misleading second one.
        let usd_written = !matches!(usd, Ok(None));
        let budget_micro_usd = match usd {
            Ok(v) => v,
            Err(v) => {
                bad.push(v);
                None
            }
        };
        if self.budget_tokens > BUDGET_MAX_TOKENS {
            bad.push(FieldViolation::new(
                &f("budget_tokens"),
                format!(
                    "must be at most {BUDGET_MAX_TOKENS} tokens (got {})",
                    self.budget_tokens
                ),
            ));
        }
        let budget_tokens = (self.budget_tokens > 0).then_some(self.budget_tokens);
        let has_budget = usd_written || budget_tokens.is_some();
        let period = match (
            self.budget_period,
            BudgetPeriod::from_code(self.budget_period),
        ) {
            (0, _) => None,
            (_, Some(p)) => Some(p),
            (code, None) => {
                bad.push(FieldViolation::new(
                    &f("budget_period"),
                    format!("must be DAY, WEEK, MONTH or TOTAL (got {code})"),
                ));
                None
            }
        };
        match (has_budget, self.budget_period) {
            (true, 0) => bad.push(FieldViolation::new(
                &f("budget_period"),
                "is required with a budget (budget_usd or budget_tokens): DAY, WEEK or MONTH \
                 (UTC calendar periods, a week from Monday) or TOTAL (never resets)",
            )),
            (false, _) if period.is_some() => bad.push(FieldViolation::new(
                &f("budget_period"),
                "is set without a budget: set budget_usd or budget_tokens, or leave \
                 budget_period unspecified",
            )),
            _ => {}
        }
        if self.tokens_per_minute > TOKENS_PER_MINUTE_MAX {
            bad.push(FieldViolation::new(
                &f("tokens_per_minute"),
                format!(
                    "must be at most {TOKENS_PER_MINUTE_MAX} (got {})",
                    self.tokens_per_minute
                ),
            ));
        }
        if !bad.is_empty() {
            return Err(bad);
        }
        Ok(Limits {
            budget_micro_usd,
            budget_tokens,
            period: period.filter(|_| has_budget),
            requests_per_minute: (self.requests_per_minute > 0).then_some(self.requests_per_minute),
            tokens_per_minute: (self.tokens_per_minute > 0).then_some(self.tokens_per_minute),
        })
    }
}

/// The UTC bounds of the period `now` falls in: start inclusive, end exclusive. `DAY`: from
/// midnight; `WEEK`: from Monday midnight; `MONTH`: from the first of the month; `TOTAL`:
/// from the Unix epoch, with no end.
pub fn period_bounds(period: BudgetPeriod, now: Timestamp) -> (Timestamp, Option<Timestamp>) {
    let day = now.0.div_euclid(DAY_MICROS);
    let at = |days: i64| Timestamp(days.saturating_mul(DAY_MICROS));
    match period {
        BudgetPeriod::Day => (at(day), Some(at(day + 1))),
        BudgetPeriod::Week => {
            // 1970-01-01 was a Thursday: three days after a Monday.
            let monday = day - (day + 3).rem_euclid(7);
            (at(monday), Some(at(monday + 7)))
        }
        BudgetPeriod::Month => {
            let (y, m, _) = civil_from_days(day);
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            (
                at(days_from_civil(y, m, 1)),
                Some(at(days_from_civil(ny, nm, 1))),
            )
        }
        BudgetPeriod::Total => (Timestamp(0), None),
    }
}

/// The (year, month, day) of a day counted from 1970-01-01 (proleptic Gregorian; H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
}

/// The day counted from 1970-01-01 of a (year, month, day) (`days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let (m, d) = (i64::from(m), i64::from(d));
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The timestamp of a UTC date and time.
    fn utc(y: i64, m: u32, d: u32, h: i64, min: i64) -> Timestamp {
        Timestamp(days_from_civil(y, m, d) * DAY_MICROS + (h * 60 + min) * 60_000_000)
    }

    fn bounds(p: BudgetPeriod, now: Timestamp) -> (Timestamp, Timestamp) {
        let (s, e) = period_bounds(p, now);
        (s, e.expect("a calendar period ends"))
    }

    #[test]
    fn the_calendar_matches_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        // 2030-01-01T00:00:00Z (the tests' usual clock).
        assert_eq!(utc(2030, 1, 1, 0, 0), Timestamp(1_893_456_000_000_000));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(days_from_civil(2000, 2, 29)), (2000, 2, 29));
        for d in -800_000..800_000 {
            let (y, m, day) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, day), d);
        }
    }

    #[test]
    fn a_day_is_its_utc_midnights() {
        let now = utc(2030, 3, 15, 23, 59);
        assert_eq!(
            bounds(BudgetPeriod::Day, now),
            (utc(2030, 3, 15, 0, 0), utc(2030, 3, 16, 0, 0))
        );
        // Midnight itself starts the new day.
        let midnight = utc(2030, 3, 16, 0, 0);
        assert_eq!(bounds(BudgetPeriod::Day, midnight).0, midnight);
        let before = Timestamp(midnight.0 - 1);
        assert_eq!(bounds(BudgetPeriod::Day, before).1, midnight);
    }

    #[test]
    fn a_week_starts_on_monday() {
        // 2030-01-07 is a Monday; 2030-01-13 a Sunday.
        let monday = utc(2030, 1, 7, 0, 0);
        let next = utc(2030, 1, 14, 0, 0);
        for (d, h) in [(7, 0), (9, 12), (13, 23)] {
            assert_eq!(
                bounds(BudgetPeriod::Week, utc(2030, 1, d, h, 59)),
                (monday, next),
                "2030-01-{d}"
            );
        }
        assert_eq!(bounds(BudgetPeriod::Week, next).0, next);
        // A week across a month and a year: Monday 2029-12-31 to Monday 2030-01-07.
        assert_eq!(
            bounds(BudgetPeriod::Week, utc(2030, 1, 1, 0, 0)),
            (utc(2029, 12, 31, 0, 0), monday)
        );
        // The epoch was a Thursday: its week started Monday 1969-12-29.
        assert_eq!(
            bounds(BudgetPeriod::Week, Timestamp(0)).0,
            utc(1969, 12, 29, 0, 0)
        );
    }

    #[test]
    fn months_have_their_lengths_and_leap_years_their_february() {
        let days = |y: i64, m: u32| {
            let (s, e) = bounds(BudgetPeriod::Month, utc(y, m, 10, 8, 0));
            assert_eq!(s, utc(y, m, 1, 0, 0));
            (e.0 - s.0) / DAY_MICROS
        };
        let lengths = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
        for (i, n) in lengths.iter().enumerate() {
            assert_eq!(days(2030, i as u32 + 1), *n, "2030-{}", i + 1);
        }
        assert_eq!(days(2028, 2), 29, "2028 is a leap year");
        assert_eq!(days(2000, 2), 29, "2000 is (divisible by 400)");
        assert_eq!(days(2100, 2), 28, "2100 is not (divisible by 100)");
        // December ends at the next year's January.
        assert_eq!(
            bounds(BudgetPeriod::Month, utc(2030, 12, 31, 23, 59)),
            (utc(2030, 12, 1, 0, 0), utc(2031, 1, 1, 0, 0))
        );
        // The last microsecond of February 2028 and the first of March.
        let march = utc(2028, 3, 1, 0, 0);
        assert_eq!(
            bounds(BudgetPeriod::Month, Timestamp(march.0 - 1)),
            (utc(2028, 2, 1, 0, 0), march)
        );
        assert_eq!(bounds(BudgetPeriod::Month, march).0, march);
    }

    #[test]
    fn total_is_from_the_epoch_and_never_ends() {
        assert_eq!(
            period_bounds(BudgetPeriod::Total, utc(2030, 6, 1, 0, 0)),
            (Timestamp(0), None)
        );
    }

    fn input(usd: &str, tokens: u64, period: i64) -> LimitsInput {
        LimitsInput {
            budget_usd: usd.into(),
            budget_tokens: tokens,
            budget_period: period,
            ..Default::default()
        }
    }

    fn fields(r: Result<Limits, Vec<FieldViolation>>) -> Vec<String> {
        r.expect_err("refused")
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    #[test]
    fn limits_parse_to_integers_and_zero_is_no_limit() {
        let l = LimitsInput {
            budget_usd: "12.50".into(),
            budget_tokens: 1_000_000,
            budget_period: BudgetPeriod::Month.code(),
            requests_per_minute: 60,
            tokens_per_minute: 100_000,
        }
        .parse("limits")
        .unwrap();
        assert_eq!(
            l,
            Limits {
                budget_micro_usd: Some(12_500_000),
                budget_tokens: Some(1_000_000),
                period: Some(BudgetPeriod::Month),
                requests_per_minute: Some(60),
                tokens_per_minute: Some(100_000),
            }
        );
        assert_eq!(l.budget_usd_text(), "12.5");
        assert_eq!(
            l.per_minute(),
            PerMinute {
                requests: Some(60),
                tokens: Some(100_000)
            }
        );
        assert!(
            LimitsInput::default()
                .parse("limits")
                .unwrap()
                .is_unlimited()
        );
        // "0" and "0.000" are no budget, so no period either.
        for zero in ["0", "0.000", "000"] {
            assert!(input(zero, 0, 0).parse("limits").unwrap().is_unlimited());
        }
        let smallest = input("0.000001", 0, 4).parse("limits").unwrap();
        assert_eq!(smallest.budget_micro_usd, Some(1));
        assert_eq!(smallest.budget_usd_text(), "0.000001");
        let max = input("1000000000", BUDGET_MAX_TOKENS, 1)
            .parse("limits")
            .unwrap();
        assert_eq!(max.budget_micro_usd, Some(BUDGET_MAX_MICRO_USD));
        let rpm = LimitsInput {
            requests_per_minute: u32::MAX,
            tokens_per_minute: TOKENS_PER_MINUTE_MAX,
            ..Default::default()
        };
        assert!(rpm.parse("limits").unwrap().period.is_none());
    }

    #[test]
    fn bad_limits_name_their_field_and_rule() {
        for (usd, why) in [
            ("-1", "negative"),
            ("abc", "not a decimal"),
            ("1e3", "not a decimal"),
            (" 5", "not a decimal"),
            ("5.", "not a decimal"),
            ("0.0000001", "fractional digits"),
            ("1000000000.000001", "at most 1000000000"),
            ("99999999999999999999999999999", "at most 1000000000"),
        ] {
            let e = input(usd, 0, 1).parse("consumer.limits").unwrap_err();
            assert_eq!(
                e.len(),
                1,
                "{usd:?}: only the budget's own violation: {e:?}"
            );
            assert_eq!(e[0].field, "consumer.limits.budget_usd");
            assert!(
                e[0].description.contains(why),
                "{usd:?}: {}",
                e[0].description
            );
        }
        assert_eq!(
            fields(input("10", 0, 0).parse("limits")),
            ["limits.budget_period"]
        );
        assert_eq!(
            fields(input("", 5, 0).parse("limits")),
            ["limits.budget_period"]
        );
        let without = input("", 0, 2).parse("limits").unwrap_err();
        assert_eq!(without[0].field, "limits.budget_period");
        assert!(without[0].description.contains("without a budget"));
        assert_eq!(
            fields(input("0", 0, 3).parse("limits")),
            ["limits.budget_period"],
            "a zero budget is none: a period without it is refused"
        );
        assert_eq!(
            fields(input("10", 0, 9).parse("limits")),
            ["limits.budget_period"]
        );
        let all = LimitsInput {
            budget_usd: "x".into(),
            budget_tokens: BUDGET_MAX_TOKENS + 1,
            budget_period: 0,
            requests_per_minute: 1,
            tokens_per_minute: TOKENS_PER_MINUTE_MAX + 1,
        };
        assert_eq!(
            fields(all.parse("consumer_key.limits")),
            [
                "consumer_key.limits.budget_usd",
                "consumer_key.limits.budget_tokens",
                "consumer_key.limits.budget_period",
                "consumer_key.limits.tokens_per_minute",
            ]
        );
    }

    #[test]
    fn spend_is_exhausted_at_either_budget_exactly() {
        let l = input("1.5", 1000, BudgetPeriod::Day.code())
            .parse("limits")
            .unwrap();
        let usd = |micro: u128, pico: u128| Picodollars(micro * 1_000_000 + pico);
        assert!(!l.is_exhausted(usd(1_499_999, 999_999), 999));
        assert!(
            l.is_exhausted(usd(1_500_000, 0), 0),
            "the USD budget reached"
        );
        assert!(
            l.is_exhausted(Picodollars(0), 1000),
            "the token budget reached"
        );
        let now = Timestamp(5 * DAY_MICROS + 7);
        let s = l.spend(now, usd(2, 0), 10).unwrap();
        assert_eq!(
            (s.period_start, s.period_end),
            (Timestamp(5 * DAY_MICROS), Some(Timestamp(6 * DAY_MICROS)))
        );
        assert!(!s.exhausted);
        assert_eq!(s.exhausted_until(), None);
        let spent = l.spend(now, usd(1_500_000, 0), 0).unwrap();
        assert_eq!(spent.exhausted_until(), Some(Timestamp(6 * DAY_MICROS)));
        let total = Limits {
            period: Some(BudgetPeriod::Total),
            ..l
        };
        assert_eq!(
            total
                .spend(now, Picodollars(0), 1000)
                .unwrap()
                .exhausted_until(),
            Some(Timestamp(i64::MAX)),
            "TOTAL never ends"
        );
        assert_eq!(Limits::default().spend(now, usd(9, 0), 9), None);
        assert!(!Limits::default().is_exhausted(usd(u128::from(u64::MAX), 0), u64::MAX));
        let rpm_only = Limits {
            requests_per_minute: Some(5),
            ..Default::default()
        };
        assert_eq!(rpm_only.spend(now, Picodollars(0), 0), None);
    }
}
