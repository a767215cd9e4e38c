use super::*;
use proptest::prelude::*;

fn price(text: &str) -> PricePerMtok {
    PricePerMtok::parse("f", text).unwrap_or_else(|e| panic!("{text}: {e:?}"))
}

fn entry(model: &str, input: &str, output: &str, cached: &str) -> ModelPriceInput {
    ModelPriceInput {
        model: model.into(),
        input_per_mtok: input.into(),
        output_per_mtok: output.into(),
        cached_input_per_mtok: cached.into(),
    }
}

#[test]
fn prices_parse_to_exact_micro_usd_and_print_canonically() {
    for (text, micro, shown) in [
        ("2.50", 2_500_000, "2.5"),
        ("0", 0, "0"),
        ("0.000001", 1, "0.000001"),
        ("15", 15_000_000, "15"),
        ("007.25", 7_250_000, "7.25"),
        ("00000000000000000000000000000000002.5", 2_500_000, "2.5"),
        ("000.000000", 0, "0"),
        ("10000", 10_000_000_000, "10000"),
        ("10000.000000", 10_000_000_000, "10000"),
        ("0.1", 100_000, "0.1"),
    ] {
        let p = price(text);
        assert_eq!(p.micro_usd(), micro, "{text}");
        assert_eq!(p.to_string(), shown, "{text}");
    }
}

#[test]
fn bad_prices_name_the_field_and_the_rule() {
    for (text, why) in [
        ("-1", "negative"),
        ("", "not a decimal"),
        ("abc", "not a decimal"),
        ("1e3", "not a decimal"),
        ("1_000", "not a decimal"),
        (" 2.5", "not a decimal"),
        ("+2.5", "not a decimal"),
        (".5", "not a decimal"),
        ("5.", "not a decimal"),
        ("1.2.3", "not a decimal"),
        ("NaN", "not a decimal"),
        ("0.0000001", "fractional digits"),
        ("10000.000001", "at most 10000"),
        ("99999999999999999999999999999999", "at most 10000"),
    ] {
        let v = PricePerMtok::parse("pricing[1].output_per_mtok", text).unwrap_err();
        assert_eq!(v.field, "pricing[1].output_per_mtok");
        assert!(v.description.contains(why), "{text:?}: {}", v.description);
    }
}

#[test]
fn price_lists_report_every_broken_entry_by_field() {
    let ok = parse_pricing(
        "pricing",
        &[
            entry("gpt-4o", "2.50", "10", ""),
            entry("o3-*", "2", "8", "0.5"),
        ],
    )
    .unwrap();
    assert_eq!(
        ok[0].cached_input, None,
        "empty cached price: the input price"
    );
    assert_eq!(ok[1].cached_input, Some(price("0.5")));
    let bad = parse_pricing(
        "model_service.pricing",
        &[
            entry("gpt-4o", "2.50", "10", ""),
            entry("gpt-4o", "", "x", "-1"),
            entry("gpt *", "1", "1", ""),
        ],
    )
    .unwrap_err();
    let fields: Vec<&str> = bad.iter().map(|v| v.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "model_service.pricing[1].model",
            "model_service.pricing[1].input_per_mtok",
            "model_service.pricing[1].output_per_mtok",
            "model_service.pricing[1].cached_input_per_mtok",
            "model_service.pricing[2].model",
        ]
    );
    assert!(bad[0].description.contains("priced twice"), "{:?}", bad[0]);
    let many = vec![entry("m", "1", "1", ""); PRICING_MAX_ENTRIES + 1];
    assert_eq!(
        parse_pricing("pricing", &many).unwrap_err()[0].field,
        "pricing"
    );
}

#[test]
fn the_exact_pattern_wins_then_the_longest_prefix() {
    let prices = parse_pricing(
        "pricing",
        &[
            entry("*", "1", "1", ""),
            entry("gpt-*", "2", "2", ""),
            entry("gpt-4o-*", "3", "3", ""),
            entry("gpt-4o-mini", "4", "4", ""),
        ],
    )
    .unwrap();
    let model_of = |m: &str| price_for(&prices, m).map(|p| p.model.as_str());
    assert_eq!(model_of("gpt-4o-mini"), Some("gpt-4o-mini"));
    assert_eq!(model_of("gpt-4o-mini-2024"), Some("gpt-4o-*"));
    assert_eq!(model_of("gpt-4.1"), Some("gpt-*"));
    assert_eq!(model_of("claude"), Some("*"));
    assert_eq!(model_of(""), Some("*"), "'*' prices an unknown model too");
    assert_eq!(price_for(&prices[1..], "claude"), None);
    assert_eq!(price_for(&[], "gpt-4o"), None);
}

#[test]
fn cost_charges_cached_input_apart_from_the_rest_of_the_input() {
    let p = ModelPrice {
        model: "m".into(),
        input: price("2.50"),
        output: price("10"),
        cached_input: Some(price("1.25")),
    };
    // 1000 input of which 200 cached, 500 output:
    // 800 × 2.50 + 200 × 1.25 + 500 × 10 = 2000 + 250 + 5000 = 7250 USD per Mtok-units.
    let c = p.cost(1000, 200, 500);
    assert_eq!(c, Picodollars(7_250 * 1_000_000));
    assert_eq!(c.to_string(), "0.00725");
    // Without a cached price, cached tokens cost the input price.
    let no_cache = ModelPrice {
        cached_input: None,
        ..p.clone()
    };
    assert_eq!(no_cache.cost(1000, 200, 0), no_cache.cost(1000, 0, 0));
    // One token at the smallest price is 10^-12 USD.
    let tiny = ModelPrice {
        model: "m".into(),
        input: price("0.000001"),
        output: price("0"),
        cached_input: None,
    };
    assert_eq!(tiny.cost(1, 0, 0), Picodollars(1));
    assert_eq!(tiny.cost(1, 0, 0).to_string(), "0.000000000001");
    let million: Picodollars = (0..1_000_000).map(|_| tiny.cost(1, 0, 0)).sum();
    assert_eq!(million.to_string(), "0.000001");
}

#[test]
fn money_prints_exactly_even_beyond_what_a_decimal_holds() {
    assert_eq!(Picodollars(0).to_string(), "0");
    assert_eq!(Picodollars(12_500_000_000).to_string(), "0.0125");
    assert_eq!(Picodollars(3_000_000_000_000).to_string(), "3");
    assert_eq!(Picodollars(3_000_000_000_001).to_string(), "3.000000000001");
    assert_eq!(
        Picodollars(u128::MAX).to_string(),
        "340282366920938463463374607.431768211455"
    );
    assert_eq!(
        Picodollars(10u128.pow(30)).to_string(),
        "1000000000000000000"
    );
    assert_eq!(Picodollars(1_234_567).split_micro(), (1, 234_567));
}

#[test]
fn reports_outside_the_rules_are_refused_by_field() {
    let row = UsageDelta {
        consumer_key: Uuid::nil(),
        model: "gpt-4o".into(),
        requests: 1,
        input_tokens: 10,
        cached_input_tokens: 4,
        ..Default::default()
    };
    let good = UsageReportInput {
        data_plane: Uuid::nil(),
        sequence: 1,
        time: Timestamp(0),
        rows: vec![row.clone()],
    };
    assert!(good.validate().is_ok());
    let bad = UsageReportInput {
        sequence: u64::MAX,
        time: Timestamp(-1),
        rows: vec![
            row.clone(),
            UsageDelta {
                cached_input_tokens: 11,
                output_tokens: REPORT_MAX_COUNT + 1,
                model: "m".repeat(REPORT_MODEL_MAX + 1),
                ..row
            },
        ],
        ..good
    };
    let RuleError::Invalid(v) = bad.validate().unwrap_err() else {
        panic!("expected field violations");
    };
    let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "time",
            "sequence",
            "rows[1].output_tokens",
            "rows[1].cached_input_tokens",
            "rows[1].model"
        ]
    );
}

#[test]
fn usage_lands_in_the_hour_of_the_report_never_in_the_future() {
    let t = Timestamp(5 * HOUR_MICROS + 123);
    let r = UsageReportInput {
        data_plane: Uuid::nil(),
        sequence: 0,
        time: t,
        rows: vec![],
    };
    assert_eq!(
        r.bucket(Timestamp(9 * HOUR_MICROS)),
        Timestamp(5 * HOUR_MICROS)
    );
    assert_eq!(
        r.bucket(Timestamp(3 * HOUR_MICROS + 1)),
        Timestamp(3 * HOUR_MICROS),
        "a clock ahead of ours counts at our time"
    );
    assert_eq!(day_of(Timestamp(DAY_MICROS + 5)), Timestamp(DAY_MICROS));
}

#[test]
fn queries_check_their_range() {
    let h = |n: i64| Some(Timestamp(n * HOUR_MICROS));
    let q = |start, end, granularity| UsageQuery {
        start,
        end,
        granularity,
        ..Default::default()
    };
    let field = |q: UsageQuery| match q.validate() {
        Err(RuleError::Invalid(v)) => v[0].field.clone(),
        other => panic!("expected a field violation, got {other:?}"),
    };
    assert_eq!(field(q(h(5), h(5), Granularity::Total)), "end_time");
    assert!(q(None, None, Granularity::Total).validate().is_ok());
    assert!(q(None, None, Granularity::Day).validate().is_ok());
    assert_eq!(field(q(None, h(5), Granularity::Hour)), "start_time");
    assert_eq!(field(q(h(0), None, Granularity::Hour)), "end_time");
    assert!(q(h(0), h(744), Granularity::Hour).validate().is_ok());
    // The start is rounded down: 743.5 hours touch 744 hours, 744.5 touch 745.
    let half = HOUR_MICROS / 2;
    let at = |n: i64, plus: i64| Some(Timestamp(n * HOUR_MICROS + plus));
    assert!(
        q(at(0, half), at(744, 0), Granularity::Hour)
            .validate()
            .is_ok()
    );
    let e = q(h(0), at(744, half), Granularity::Hour)
        .validate()
        .unwrap_err();
    assert!(e.to_string().contains("at most 744 hours"), "{e}");
}

proptest! {
    /// Cost is linear: the cost of summed usage is the sum of the costs, to the
    /// picodollar, so merging rows or buckets never changes an amount.
    #[test]
    fn cost_of_a_sum_is_the_sum_of_costs(
        input in 0u64..=PricePerMtok::MAX.micro_usd(),
        output in 0u64..=PricePerMtok::MAX.micro_usd(),
        cached in proptest::option::of(0u64..=PricePerMtok::MAX.micro_usd()),
        rows in proptest::collection::vec(
            (0u64..=REPORT_MAX_COUNT, 0u64..=REPORT_MAX_COUNT, 0u64..=REPORT_MAX_COUNT), 0..20),
    ) {
        let p = ModelPrice {
            model: "m".into(),
            input: PricePerMtok::from_micro_usd(input).unwrap(),
            output: PricePerMtok::from_micro_usd(output).unwrap(),
            cached_input: cached.map(|c| PricePerMtok::from_micro_usd(c).unwrap()),
        };
        // (input, cached ≤ input, output) per row.
        let rows: Vec<(u64, u64, u64)> = rows
            .into_iter()
            .map(|(i, c, o)| (i.max(c), i.min(c), o))
            .collect();
        let each: Picodollars = rows.iter().map(|&(i, c, o)| p.cost(i, c, o)).sum();
        let (i, c, o) = rows.iter().fold((0, 0, 0), |a, r| (a.0 + r.0, a.1 + r.1, a.2 + r.2));
        prop_assert_eq!(p.cost(i, c, o), each);
        // And the decimal shown is that amount exactly.
        let shown: Decimal = each.to_string().parse().unwrap();
        let exact = Decimal::try_from_i128_with_scale(each.0 as i128, 12).unwrap();
        prop_assert_eq!(shown, exact);
    }
}
