use proptest::prelude::*;

use super::*;

const SEC: i64 = 1_000_000;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn rpm(n: u32) -> PerMinute {
    PerMinute {
        requests: Some(n),
        tokens: None,
    }
}

fn tpm(n: u64) -> PerMinute {
    PerMinute {
        requests: None,
        tokens: Some(n),
    }
}

fn admitted(l: &RateLimiter, key: &PerMinute, n: usize, now: i64) -> usize {
    (0..n)
        .filter(|_| l.admit((id(1), key), None, now) == Admission::Admit)
        .count()
}

#[test]
fn a_minutes_allowance_bursts_then_refills_at_the_limits_pace() {
    let l = RateLimiter::default();
    let limits = rpm(60);
    assert_eq!(
        admitted(&l, &limits, 100, 0),
        60,
        "a whole minute's allowance at once"
    );
    assert_eq!(
        l.admit((id(1), &limits), None, 0),
        Admission::Refuse {
            kind: LimitKind::Requests,
            retry_after_secs: 1
        }
    );
    // One request a second comes back, exactly.
    assert_eq!(admitted(&l, &limits, 5, SEC - 1), 0);
    assert_eq!(admitted(&l, &limits, 5, SEC), 1);
    assert_eq!(admitted(&l, &limits, 100, 11 * SEC), 10);
    // Never more than a minute's allowance, however long it rested.
    assert_eq!(admitted(&l, &limits, 1000, 3600 * SEC), 60);
}

#[test]
fn tokens_are_charged_after_the_response_and_may_go_below_zero() {
    let l = RateLimiter::default();
    let limits = tpm(1000);
    assert_eq!(l.admit((id(1), &limits), None, 0), Admission::Admit);
    // A large answer: 1,500 tokens against 1,000 a minute.
    l.charge_tokens((id(1), &limits), None, 1500, 0);
    // 500 below zero at 1,000 a minute: 30 s to wait.
    assert_eq!(
        l.admit((id(1), &limits), None, 0),
        Admission::Refuse {
            kind: LimitKind::Tokens,
            retry_after_secs: 30
        }
    );
    assert!(matches!(
        l.admit((id(1), &limits), None, 30 * SEC - 1),
        Admission::Refuse { .. }
    ));
    assert_eq!(l.admit((id(1), &limits), None, 30 * SEC), Admission::Admit);
}

#[test]
fn a_consumer_limit_binds_all_its_keys_and_a_refusal_takes_nothing() {
    let l = RateLimiter::default();
    let none = PerMinute::default();
    let consumer = rpm(3);
    let key_a = rpm(10);
    let c = Some((id(100), &consumer));
    assert_eq!(l.admit((id(1), &key_a), c, 0), Admission::Admit);
    assert_eq!(l.admit((id(2), &none), c, 0), Admission::Admit);
    assert_eq!(l.admit((id(2), &none), c, 0), Admission::Admit);
    assert!(matches!(
        l.admit((id(1), &key_a), c, 0),
        Admission::Refuse { .. }
    ));
    // Key a was charged once only: with the consumer limit gone it has 9 left.
    assert_eq!(admitted(&l, &key_a, 20, 0), 9);
}

#[test]
fn unlimited_subjects_cost_nothing_and_are_not_tracked() {
    let l = RateLimiter::default();
    let none = PerMinute::default();
    for _ in 0..1000 {
        assert_eq!(
            l.admit((id(1), &none), Some((id(2), &none)), 0),
            Admission::Admit
        );
    }
    l.charge_tokens((id(1), &none), None, 10, 0);
    assert!(l.is_empty());
}

#[test]
fn idle_subjects_are_forgotten_once_full_again_but_not_while_in_debt() {
    let l = RateLimiter::default();
    let limits = tpm(60);
    assert_eq!(l.admit((id(1), &limits), None, 0), Admission::Admit);
    l.charge_tokens((id(1), &limits), None, 1200, 0); // twenty minutes' worth
    l.take_unsynced(0);
    // Past the hold after its admission, but still 9 minutes in debt: kept.
    l.forget_idle(11 * 60 * SEC);
    assert_eq!(l.len(), 1, "still 9 minutes in debt");
    l.forget_idle(20 * 60 * SEC);
    assert!(l.is_empty());
}

#[test]
fn a_subject_is_held_after_its_admission_so_a_long_answers_tokens_are_charged() {
    let l = RateLimiter::default();
    let limits = tpm(60);
    assert_eq!(l.admit((id(1), &limits), None, 0), Admission::Admit);
    l.take_unsynced(0);
    // Its bucket is full and nothing is unsynchronised, but it admitted a request 9 minutes
    // ago whose answer may still be streaming: kept.
    l.forget_idle(HOLD_MICROS - SEC);
    assert_eq!(l.len(), 1);
    // The answer ends: its tokens are charged to the bucket that admitted it.
    l.charge_admitted(id(1), None, 120, HOLD_MICROS - SEC);
    assert!(matches!(
        l.admit((id(1), &limits), None, HOLD_MICROS - SEC),
        Admission::Refuse {
            kind: LimitKind::Tokens,
            ..
        }
    ));
}

#[test]
fn tokens_metered_for_another_data_planes_request_are_shared_not_dropped() {
    // This data plane never admitted the key (no bucket): the tokens go to the shared
    // counter, where the admitting data plane takes them from its bucket.
    let l = RateLimiter::default();
    l.charge_admitted(id(7), Some(id(8)), 500, 0);
    let mut batch = l.take_unsynced(0);
    batch.sort_by_key(|u| u.subject);
    assert_eq!(
        batch,
        vec![
            Unsynced {
                subject: Subject::Key(id(7)),
                requests: None,
                tokens: Some(500),
            },
            Unsynced {
                subject: Subject::Consumer(id(8)),
                requests: None,
                tokens: Some(500),
            },
        ]
    );
    // Inactive subjects are not synchronised every interval forever.
    assert_eq!(l.take_unsynced(SYNC_ACTIVE_MICROS - 1).len(), 2);
    assert!(l.take_unsynced(SYNC_ACTIVE_MICROS).is_empty());
}

#[test]
fn shared_counts_give_each_data_plane_the_others_share() {
    // Two data planes and one shared counter, as Redis INCRBY would answer.
    let (a, b) = (RateLimiter::default(), RateLimiter::default());
    let (mut sa, mut sb) = (SharedCounts::default(), SharedCounts::default());
    // One counter per minute with a field per data plane, as the store keeps them.
    let mut counters: HashMap<(i64, &str), u64> = HashMap::new();
    let limits = rpm(60);
    let mut sync = |me: &'static str, l: &RateLimiter, shared: &mut SharedCounts, now: i64| {
        for u in l.take_unsynced(now) {
            let r = u.requests.expect("a request limit");
            assert_eq!(u.tokens, None, "no token limit: nothing to share");
            *counters.entry((window(now), me)).or_default() += r;
            let others_total: u64 = counters
                .iter()
                .filter(|((w, dp), _)| *w == window(now) && *dp != me)
                .map(|(_, n)| *n)
                .sum();
            let others = shared.others(u.subject, LimitKind::Requests, window(now), others_total);
            l.take_remote(u.subject, others, 0, now);
        }
    };
    // Each takes 20, then both synchronise (a first, then b, then a again).
    assert_eq!(admitted(&a, &limits, 20, 0), 20);
    assert_eq!(admitted(&b, &limits, 20, 0), 20);
    sync("a", &a, &mut sa, 0);
    sync("b", &b, &mut sb, 0);
    sync("a", &a, &mut sa, 0);
    // Each has seen all 40: b has 20 left; it takes 10.
    assert_eq!(admitted(&b, &limits, 100, 0), 20);
    sync("b", &b, &mut sb, 0);
    sync("a", &a, &mut sa, 0);
    // a: 60 − 20 (own) − 40 (b's) = 0: the key's 60 were taken once across both.
    assert_eq!(admitted(&a, &limits, 100, 0), 0);
    // A minute later both have their allowance back, and the new minute's counter starts
    // from zero.
    assert_eq!(admitted(&a, &limits, 100, 60 * SEC), 60);
    sync("a", &a, &mut sa, 60 * SEC);
    sync("b", &b, &mut sb, 60 * SEC);
    assert_eq!(
        admitted(&b, &limits, 100, 60 * SEC),
        0,
        "b saw a's 60 of the new minute"
    );
}

#[test]
fn shared_counters_count_the_others_share_per_minute() {
    let mut shared = SharedCounts::default();
    let s = Subject::Consumer(id(7));
    // First look at minute 0: the others' 5 so far.
    assert_eq!(shared.others(s, LimitKind::Tokens, 0, 5), 5);
    assert_eq!(shared.others(s, LimitKind::Tokens, 0, 12), 7);
    // Fields that read less (expired) count nothing more.
    assert_eq!(shared.others(s, LimitKind::Tokens, 0, 3), 0);
    // A new minute: its own counter.
    assert_eq!(shared.others(s, LimitKind::Tokens, 1, 2), 2);
    assert_eq!(shared.others(s, LimitKind::Tokens, 1, 2), 0);
}

proptest! {
    /// Over any schedule, a bucket never admits more than a minute's allowance plus what the
    /// elapsed time refilled, and never refuses a request the allowance covers.
    #[test]
    fn admissions_follow_the_bucket_exactly(
        limit in 1u32..500,
        steps in proptest::collection::vec((0i64..5_000_000, 1usize..20), 1..50),
    ) {
        let l = RateLimiter::default();
        let limits = rpm(limit);
        let mut now = 0i64;
        let mut total = 0u128;
        for (dt, n) in steps {
            now += dt;
            total += admitted(&l, &limits, n, now) as u128;
            // Allowance: a minute's worth plus the refill since 0, in whole requests.
            let bound = u128::from(limit) + (now as u128 * u128::from(limit)) / 60_000_000;
            prop_assert!(total <= bound, "admitted {total} > {bound}");
        }
        // Saturated: after a long rest exactly a minute's allowance again.
        prop_assert_eq!(admitted(&l, &limits, limit as usize + 10, now + 3_600_000_000), limit as usize);
    }
}
