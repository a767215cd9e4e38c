//! Usage and spend (SPEC §8.2): model prices, the cost of usage in exact integer arithmetic,
//! the usage reports data planes send, and the usage query. Pure data and functions.
//!
//! Money is integers: a price is micro-USD per million tokens (`"2.50"` = 2 500 000), so
//! tokens × price is a cost in picodollars (10⁻¹² USD) exactly. Decimal strings are parsed
//! and formatted with `rust_decimal`; nothing is ever a float.

use std::collections::HashSet;
use std::fmt;

use rust_decimal::Decimal;
use uuid::Uuid;

use super::model::{check_pattern, pattern_matches};
use super::validate::FieldViolation;
use super::{Named, RuleError, Timestamp};

/// Fractional digits a price may have: micro-USD per million tokens.
pub const PRICE_FRACTION_DIGITS: u32 = 6;
/// The highest price accepted, in USD per million tokens (one cent a token): far above any
/// vendor's, low enough to catch a price typed in the wrong unit.
pub const PRICE_MAX_USD_PER_MTOK: u64 = 10_000;
/// Price entries one model service may have.
pub const PRICING_MAX_ENTRIES: usize = 1000;

/// Rows one usage report may carry.
pub const REPORT_MAX_ROWS: usize = 100_000;
/// The largest value of any counter of one report row: a trillion. A data plane reports every
/// few seconds; more is a broken data plane, and refusing it keeps every stored sum far
/// inside 64 bits.
pub const REPORT_MAX_COUNT: u64 = 1_000_000_000_000;
/// The longest model name a report row may carry, in bytes (the data plane's own limit).
pub const REPORT_MODEL_MAX: usize = 256;

/// One hour and one day, in microseconds (`Timestamp`'s unit).
pub const HOUR_MICROS: i64 = 3_600_000_000;
pub const DAY_MICROS: i64 = 24 * HOUR_MICROS;
/// The most hours an `HOUR` query may span (31 days).
pub const HOUR_QUERY_MAX_HOURS: i64 = 744;
/// The most rows one usage query answers.
pub const USAGE_QUERY_MAX_ROWS: usize = 10_000;

/// A price in micro-USD per million tokens (`"2.50"` is 2 500 000). At most
/// [`PRICE_MAX_USD_PER_MTOK`] USD.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PricePerMtok(u64);

impl PricePerMtok {
    pub const MAX: PricePerMtok = PricePerMtok(PRICE_MAX_USD_PER_MTOK * 1_000_000);

    /// The price of `micro_usd` micro-USD per million tokens, if within the maximum.
    pub fn from_micro_usd(micro_usd: u64) -> Option<Self> {
        (micro_usd <= Self::MAX.0).then_some(PricePerMtok(micro_usd))
    }

    pub fn micro_usd(self) -> u64 {
        self.0
    }

    /// Parses a price as operators write it: digits, optionally a `.` and 1 to 6 digits
    /// (`"2.50"`, `"0.000001"`, `"15"`); never a sign, an exponent, spaces or separators.
    /// `field` names the field in the violation.
    pub fn parse(field: &str, text: &str) -> Result<Self, FieldViolation> {
        let shown: String = text.chars().take(40).collect();
        let rule = |why: &str| {
            FieldViolation::new(
                field,
                format!(
                    "{why}: a price is a non-negative decimal number of USD per million tokens \
                     with at most {PRICE_FRACTION_DIGITS} fractional digits, e.g. \"2.50\" (got {shown:?})"
                ),
            )
        };
        let too_large = || {
            FieldViolation::new(
                field,
                format!(
                    "must be at most {PRICE_MAX_USD_PER_MTOK} USD per million tokens (got {shown:?})"
                ),
            )
        };
        match parse_micro(text, Self::MAX.0) {
            Ok(micro) => Ok(PricePerMtok(micro)),
            Err(DecimalError::Negative) => Err(rule("must not be negative")),
            Err(DecimalError::NotDecimal) => Err(rule("is not a decimal number")),
            Err(DecimalError::FractionDigits) => Err(rule(&format!(
                "has more than {PRICE_FRACTION_DIGITS} fractional digits"
            ))),
            Err(DecimalError::TooLarge) => Err(too_large()),
        }
    }
}

/// Why a decimal amount of USD did not parse ([`parse_micro`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecimalError {
    Negative,
    NotDecimal,
    /// More than [`PRICE_FRACTION_DIGITS`] fractional digits.
    FractionDigits,
    /// Above the maximum asked for.
    TooLarge,
}

/// Parses a decimal as operators write amounts of USD (prices, budgets) into integer
/// millionths (`"2.50"` is 2 500 000): digits, optionally a `.` and 1 to 6 digits; never a
/// sign, an exponent, spaces or separators. At most `max` millionths. Exact: `rust_decimal`,
/// never a float.
pub fn parse_micro(text: &str, max: u64) -> Result<u64, DecimalError> {
    if text.starts_with('-') {
        return Err(DecimalError::Negative);
    }
    let (whole, fraction) = match text.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (text, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !fraction.is_none_or(digits) {
        return Err(DecimalError::NotDecimal);
    }
    if fraction.is_some_and(|f| f.len() > PRICE_FRACTION_DIGITS as usize) {
        return Err(DecimalError::FractionDigits);
    }
    // Leading zeros aside, more than 14 whole digits is above any u64 of millionths (and
    // could be more than a Decimal holds): parse without them.
    let whole = match whole.trim_start_matches('0') {
        "" => "0",
        w if w.len() > 14 => return Err(DecimalError::TooLarge),
        w => w,
    };
    let exact = match fraction {
        Some(f) => format!("{whole}.{f}"),
        None => whole.to_string(),
    };
    let d = Decimal::from_str_exact(&exact).map_err(|_| DecimalError::NotDecimal)?;
    let micro = d
        .checked_mul(Decimal::from(1_000_000u32))
        .filter(|m| m.fract().is_zero())
        .and_then(|m| u64::try_from(m).ok())
        .ok_or(DecimalError::TooLarge)?;
    if micro > max {
        return Err(DecimalError::TooLarge);
    }
    Ok(micro)
}

/// `micro` millionths as the canonical decimal: no trailing fractional zeros (`"2.5"`,
/// `"0.000001"`, `"0"`).
pub fn micro_text(micro: u64) -> String {
    struct Text(u64);
    impl fmt::Display for Text {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write_scaled(f, u128::from(self.0), PRICE_FRACTION_DIGITS)
        }
    }
    Text(micro).to_string()
}

/// The canonical decimal: no trailing fractional zeros (`"2.5"`, `"0.000001"`, `"0"`).
impl fmt::Display for PricePerMtok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_scaled(f, u128::from(self.0), PRICE_FRACTION_DIGITS)
    }
}

/// An amount of money in picodollars (10⁻¹² USD): what tokens × a price per million tokens
/// come to, exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Picodollars(pub u128);

impl Picodollars {
    pub const PER_MICRO_USD: u128 = 1_000_000;

    /// Whole micro-USD and the picodollars left over (`0..1_000_000`).
    pub fn split_micro(self) -> (u128, u128) {
        (self.0 / Self::PER_MICRO_USD, self.0 % Self::PER_MICRO_USD)
    }
}

impl std::ops::Add for Picodollars {
    type Output = Picodollars;
    fn add(self, o: Picodollars) -> Picodollars {
        Picodollars(self.0 + o.0)
    }
}

impl std::ops::AddAssign for Picodollars {
    fn add_assign(&mut self, o: Picodollars) {
        self.0 += o.0;
    }
}

impl std::iter::Sum for Picodollars {
    fn sum<I: Iterator<Item = Picodollars>>(it: I) -> Picodollars {
        it.fold(Picodollars(0), |a, b| a + b)
    }
}

/// USD as a decimal with trailing fractional zeros trimmed (`"0.0125"`, `"3"`, `"0"`).
impl fmt::Display for Picodollars {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_scaled(f, self.0, 12)
    }
}

/// `value × 10^-scale` as a decimal without trailing fractional zeros: through `rust_decimal`
/// while it holds the value (96 bits, ≈ 7.9 × 10²⁸), digit by digit beyond.
fn write_scaled(f: &mut fmt::Formatter<'_>, value: u128, scale: u32) -> fmt::Result {
    if let Ok(v) = i128::try_from(value)
        && let Ok(d) = Decimal::try_from_i128_with_scale(v, scale)
    {
        return write!(f, "{}", d.normalize());
    }
    let digits = value.to_string();
    let scale = scale as usize;
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = padded.split_at(padded.len() - scale);
    let fraction = fraction.trim_end_matches('0');
    if fraction.is_empty() {
        f.write_str(whole)
    } else {
        write!(f, "{whole}.{fraction}")
    }
}

/// A model service's price for the models `model` matches (a name, or a prefix ending in
/// `*`). `cached_input` unset: cached input tokens cost the input price.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelPrice {
    pub model: String,
    pub input: PricePerMtok,
    pub output: PricePerMtok,
    pub cached_input: Option<PricePerMtok>,
}

impl ModelPrice {
    /// The cost of usage at this price: input tokens not cached at the input price, cached
    /// ones at the cached price, output tokens at the output price. `input_tokens` includes
    /// the cached ones (a larger `cached_input_tokens` counts as all input cached).
    pub fn cost(
        &self,
        input_tokens: u64,
        cached_input_tokens: u64,
        output_tokens: u64,
    ) -> Picodollars {
        let cached = cached_input_tokens.min(input_tokens);
        let uncached = input_tokens - cached;
        let cached_price = self.cached_input.unwrap_or(self.input);
        // Each product is below 2^64 × 2^34 and their sum far below 2^128.
        Picodollars(
            u128::from(uncached) * u128::from(self.input.0)
                + u128::from(cached) * u128::from(cached_price.0)
                + u128::from(output_tokens) * u128::from(self.output.0),
        )
    }
}

/// The price for `model` among a service's `prices`: the entry naming it exactly, else the
/// longest prefix pattern matching it, else none (the usage is unpriced).
pub fn price_for<'p>(prices: &'p [ModelPrice], model: &str) -> Option<&'p ModelPrice> {
    prices.iter().find(|p| p.model == model).or_else(|| {
        prices
            .iter()
            .filter(|p| p.model.ends_with('*') && pattern_matches(&p.model, model))
            .max_by_key(|p| p.model.len())
    })
}

/// A price entry as the operator wrote it (the wire's strings).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelPriceInput {
    pub model: String,
    pub input_per_mtok: String,
    pub output_per_mtok: String,
    pub cached_input_per_mtok: String,
}

impl From<&ModelPrice> for ModelPriceInput {
    fn from(p: &ModelPrice) -> Self {
        ModelPriceInput {
            model: p.model.clone(),
            input_per_mtok: p.input.to_string(),
            output_per_mtok: p.output.to_string(),
            cached_input_per_mtok: p.cached_input.map(|c| c.to_string()).unwrap_or_default(),
        }
    }
}

/// Parses a service's price list; `field` is the list's path (`pricing`,
/// `model_service.pricing`). Each entry's pattern follows the model pattern rules and appears
/// once; input and output prices are required (`"0"` for free); an empty cached input price
/// means the input price. Every broken rule is reported, by its field
/// (`pricing[1].output_per_mtok`).
pub fn parse_pricing(
    field: &str,
    list: &[ModelPriceInput],
) -> Result<Vec<ModelPrice>, Vec<FieldViolation>> {
    let mut bad = Vec::new();
    if list.len() > PRICING_MAX_ENTRIES {
        bad.push(FieldViolation::new(
            field,
            format!(
                "has {} entries; at most {PRICING_MAX_ENTRIES} are allowed",
                list.len()
            ),
        ));
        return Err(bad);
    }
    let mut out = Vec::with_capacity(list.len());
    let mut seen: HashSet<&str> = HashSet::new();
    for (i, p) in list.iter().enumerate() {
        let f = |name: &str| format!("{field}[{i}].{name}");
        if let Err(v) = check_pattern(&f("model"), &p.model) {
            bad.push(v);
        } else if !seen.insert(&p.model) {
            let first = list.iter().position(|q| q.model == p.model).unwrap_or(0);
            bad.push(FieldViolation::new(
                &f("model"),
                format!(
                    "{:?} is priced twice (also {field}[{first}].model): give each model pattern one price",
                    p.model
                ),
            ));
        }
        let mut required = |name: &str, text: &str| {
            if text.is_empty() {
                bad.push(FieldViolation::new(
                    &f(name),
                    "is required: USD per million tokens, e.g. \"2.50\" (\"0\" for free)",
                ));
                None
            } else {
                PricePerMtok::parse(&f(name), text)
                    .map_err(|v| bad.push(v))
                    .ok()
            }
        };
        let input = required("input_per_mtok", &p.input_per_mtok);
        let output = required("output_per_mtok", &p.output_per_mtok);
        let cached = if p.cached_input_per_mtok.is_empty() {
            Some(None)
        } else {
            PricePerMtok::parse(&f("cached_input_per_mtok"), &p.cached_input_per_mtok)
                .map(Some)
                .map_err(|v| bad.push(v))
                .ok()
        };
        if let (Some(input), Some(output), Some(cached_input)) = (input, output, cached) {
            out.push(ModelPrice {
                model: p.model.clone(),
                input,
                output,
                cached_input,
            });
        }
    }
    if bad.is_empty() { Ok(out) } else { Err(bad) }
}

/// A usage report from a data plane. Reports of one data plane carry strictly increasing
/// `sequence` numbers; a report is resent unchanged until acknowledged, and applied once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageReportInput {
    /// The reporting data plane's id (its process).
    pub data_plane: Uuid,
    pub sequence: u64,
    /// The data plane's clock at the end of the report.
    pub time: Timestamp,
    pub rows: Vec<UsageDelta>,
}

/// Usage of one consumer key on one model service and model since the previous report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageDelta {
    pub consumer_key: Uuid,
    /// The consumer the key was bound to (none: unbound).
    pub consumer: Option<Uuid>,
    pub model_service: Uuid,
    /// The model asked for; empty: unknown.
    pub model: String,
    pub requests: u64,
    /// Answers that were not 2xx.
    pub error_responses: u64,
    /// Answers whose token usage could not be read.
    pub unparsed: u64,
    /// Input tokens, cached ones included.
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The cached part of `input_tokens`.
    pub cached_input_tokens: u64,
}

impl UsageReportInput {
    /// The rules a report must follow to be applied: a time after 1970, a sequence number
    /// within 63 bits, at most [`REPORT_MAX_ROWS`] rows, each counter at most
    /// [`REPORT_MAX_COUNT`], cached input tokens within input tokens, a model name of at most
    /// [`REPORT_MODEL_MAX`] bytes.
    pub fn validate(&self) -> Result<(), RuleError> {
        let mut bad = Vec::new();
        if self.time.0 < 0 {
            bad.push(FieldViolation::new("time", "must not be before 1970"));
        }
        if i64::try_from(self.sequence).is_err() {
            bad.push(FieldViolation::new("sequence", "must be below 2^63"));
        }
        if self.rows.len() > REPORT_MAX_ROWS {
            bad.push(FieldViolation::new(
                "rows",
                format!(
                    "has {} rows; at most {REPORT_MAX_ROWS} are allowed",
                    self.rows.len()
                ),
            ));
            return Err(RuleError::Invalid(bad));
        }
        for (i, r) in self.rows.iter().enumerate() {
            for (name, v) in r.counters() {
                if v > REPORT_MAX_COUNT {
                    bad.push(FieldViolation::new(
                        &format!("rows[{i}].{name}"),
                        format!("must be at most {REPORT_MAX_COUNT} (got {v})"),
                    ));
                }
            }
            if r.cached_input_tokens > r.input_tokens {
                bad.push(FieldViolation::new(
                    &format!("rows[{i}].cached_input_tokens"),
                    format!(
                        "must not exceed input_tokens ({} > {}): input tokens include the cached ones",
                        r.cached_input_tokens, r.input_tokens
                    ),
                ));
            }
            if r.model.len() > REPORT_MODEL_MAX {
                bad.push(FieldViolation::new(
                    &format!("rows[{i}].model"),
                    format!("must be at most {REPORT_MODEL_MAX} bytes"),
                ));
            } else if !r.model.bytes().all(|b| b.is_ascii_graphic()) {
                // The data planes' own rule for a model name: it becomes a query group and
                // appears in logs, so no space, control or non-ASCII character.
                bad.push(FieldViolation::new(
                    &format!("rows[{i}].model"),
                    "must be visible ASCII characters (no space or control character)",
                ));
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(RuleError::Invalid(bad))
        }
    }

    /// The hour the report's usage is counted in: that of its time, or of `now` when the
    /// data plane's clock is ahead (usage never lands in the future).
    pub fn bucket(&self, now: Timestamp) -> Timestamp {
        hour_of(self.time.min(now))
    }
}

impl UsageDelta {
    fn counters(&self) -> [(&'static str, u64); 6] {
        [
            ("requests", self.requests),
            ("error_responses", self.error_responses),
            ("unparsed", self.unparsed),
            ("input_tokens", self.input_tokens),
            ("output_tokens", self.output_tokens),
            ("cached_input_tokens", self.cached_input_tokens),
        ]
    }
}

/// What applying a report did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UsageApplied {
    /// Its usage is counted now (this call counted it).
    Applied(AppliedUsage),
    /// A report with this sequence number or a later one was applied before: nothing changed.
    Duplicate { last_sequence: u64 },
}

/// A report's usage as applied: the hour it went to and what it came to per consumer and
/// model service (the metrics' labels: names, or ids of resources never known by name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedUsage {
    pub hour: Timestamp,
    pub rows: usize,
    pub charges: Vec<UsageCharge>,
    /// Requests of models the service has no price for, and which (service, model) those were.
    pub unpriced_requests: u64,
    pub unpriced_models: Vec<(String, String)>,
}

/// A report's usage of one model service by one consumer.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct UsageCharge {
    /// The consumer's name; empty for keys bound to none.
    pub consumer: String,
    pub model_service: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub unpriced_requests: u64,
    pub cost: Picodollars,
}

/// What a usage query groups by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UsageDimension {
    Consumer,
    ConsumerKey,
    ModelService,
    Model,
}

impl UsageDimension {
    pub const ALL: [UsageDimension; 4] = [
        UsageDimension::Consumer,
        UsageDimension::ConsumerKey,
        UsageDimension::ModelService,
        UsageDimension::Model,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UsageDimension::Consumer => "consumer",
            UsageDimension::ConsumerKey => "consumer_key",
            UsageDimension::ModelService => "model_service",
            UsageDimension::Model => "model",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }
}

/// How finely a usage query splits time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Granularity {
    Hour,
    /// UTC days.
    Day,
    /// One row per group for the whole range.
    #[default]
    Total,
}

/// A usage query. Filters are a name or an id (`model`: an exact model name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageQuery {
    pub consumer: Option<String>,
    pub consumer_key: Option<String>,
    pub model_service: Option<String>,
    pub model: Option<String>,
    /// Rounded down to its hour; none: from the first usage.
    pub start: Option<Timestamp>,
    /// Exclusive: hours starting before it are included; none: to the last usage.
    pub end: Option<Timestamp>,
    pub group_by: Vec<UsageDimension>,
    pub granularity: Granularity,
}

impl UsageQuery {
    /// The hours the query covers: `[start rounded down to its hour, end)`.
    pub fn hours(&self) -> (i64, i64) {
        (
            self.start.map_or(i64::MIN, |s| hour_of(s).0),
            self.end.map_or(i64::MAX, |e| e.0),
        )
    }

    /// A range that is not empty, and at most [`HOUR_QUERY_MAX_HOURS`] hours for `HOUR`.
    pub fn validate(&self) -> Result<(), RuleError> {
        if let (Some(s), Some(e)) = (self.start, self.end)
            && s >= e
        {
            return Err(RuleError::invalid("end_time", "must be after start_time"));
        }
        if self.granularity == Granularity::Hour {
            let limit = format!(
                "with HOUR granularity a query spans at most {HOUR_QUERY_MAX_HOURS} hours (31 days)"
            );
            let (Some(_), Some(_)) = (self.start, self.end) else {
                let field = if self.start.is_none() {
                    "start_time"
                } else {
                    "end_time"
                };
                return Err(RuleError::invalid(
                    field,
                    format!("is required: {limit}; set start_time and end_time, or use DAY"),
                ));
            };
            let (start, end) = self.hours();
            let hours = (i128::from(end) - i128::from(start) + i128::from(HOUR_MICROS) - 1)
                / i128::from(HOUR_MICROS);
            if hours > i128::from(HOUR_QUERY_MAX_HOURS) {
                return Err(RuleError::invalid(
                    "end_time",
                    format!(
                        "{limit}; start_time to end_time spans {hours} hours: narrow it, or use DAY"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Summed usage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageTotals {
    pub requests: u64,
    pub error_responses: u64,
    pub unparsed: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub unpriced_requests: u64,
    pub cost: Picodollars,
}

/// One row of a usage answer: the period (none for `TOTAL`), the grouped dimensions (the
/// others are none) and the sums. A resource's name is empty when it was never known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageSummary {
    pub start: Option<Timestamp>,
    pub consumer: Option<Named>,
    pub consumer_key: Option<Named>,
    pub model_service: Option<Named>,
    pub model: Option<String>,
    pub totals: UsageTotals,
}

impl UsageSummary {
    /// The answer's order: period, then consumer, key, service (each by name, then id), model.
    pub fn sort_key(&self) -> impl Ord + '_ {
        let named = |n: &'_ Option<Named>| n.as_ref().map(|n| (n.name.clone(), n.id.clone()));
        (
            self.start,
            named(&self.consumer),
            named(&self.consumer_key),
            named(&self.model_service),
            self.model.clone(),
        )
    }
}

/// The start of `t`'s UTC hour.
pub fn hour_of(t: Timestamp) -> Timestamp {
    Timestamp(t.0.div_euclid(HOUR_MICROS) * HOUR_MICROS)
}

/// The start of `t`'s UTC day.
pub fn day_of(t: Timestamp) -> Timestamp {
    Timestamp(t.0.div_euclid(DAY_MICROS) * DAY_MICROS)
}

#[cfg(test)]
#[path = "usage_tests.rs"]
mod tests;
