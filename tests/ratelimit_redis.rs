//! Rate-limit counts shared through a real Redis (SPEC §8.3): two data planes' limiters, each
//! with its own synchronisation, against the Redis at 127.0.0.1:6379 (a fresh key prefix per
//! test), and against a Redis of the test's own that it stops and starts again. Time is an
//! input (`now`); synchronisations are called directly, never waited for.

mod common;

use keygate::authz::ratelimit::{Admission, PerMinute, RateLimiter};
use keygate::authz::ratelimit_redis::RedisSync;
use keygate::domain::Timestamp;
use uuid::Uuid;

use common::envoy::free_port;
use common::redis::OwnRedis;

const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

fn rpm(n: u32) -> PerMinute {
    PerMinute {
        requests: Some(n),
        tokens: None,
    }
}

fn admit_n(l: &RateLimiter, key: Uuid, limits: &PerMinute, n: usize, now: i64) -> usize {
    (0..n)
        .filter(|_| l.admit((key, limits), None, now) == Admission::Admit)
        .count()
}

fn prefix() -> String {
    format!("keygate-test:{}:", Uuid::new_v4().simple())
}

#[tokio::test]
async fn two_data_planes_sharing_redis_admit_one_allowance_between_them() {
    let prefix = prefix();
    let (a, b) = (RateLimiter::default(), RateLimiter::default());
    let mut sa = RedisSync::new(SHARED_REDIS, &prefix).unwrap();
    let mut sb = RedisSync::new(SHARED_REDIS, &prefix).unwrap();
    let key = Uuid::new_v4();
    let limits = rpm(60);
    let now = Timestamp(1_800_000_000_000_000);
    // 120 requests, alternating between the data planes in batches of 5, each synchronising
    // after its batch (at a 200 ms interval that is 25 requests a second per data plane).
    let mut admitted = 0;
    for round in 0..12 {
        let (l, s) = if round % 2 == 0 {
            (&a, &mut sa)
        } else {
            (&b, &mut sb)
        };
        admitted += admit_n(l, key, &limits, 10, now.0);
        assert!(s.sync(l, now).await, "Redis at {SHARED_REDIS} must answer");
    }
    // One allowance of 60 for the key across both; what one batch took before the other saw
    // it is the most it can overshoot (10).
    assert!(
        (60..=70).contains(&admitted),
        "admitted {admitted} of 120 with a limit of 60 shared by two data planes"
    );
    // Without sharing, each would have admitted 60.
    let (c, d) = (RateLimiter::default(), RateLimiter::default());
    let alone = admit_n(&c, key, &limits, 60, now.0) + admit_n(&d, key, &limits, 60, now.0);
    assert_eq!(alone, 120);
}

#[tokio::test]
async fn with_redis_gone_each_data_plane_enforces_its_own_counts_and_says_so() {
    let port = free_port();
    let mut redis = OwnRedis::start(port);
    let url = redis.url.clone();
    let limiter = RateLimiter::default();
    let mut sync = RedisSync::new(&url, &prefix()).unwrap();
    let key = Uuid::new_v4();
    let limits = rpm(30);
    let now = Timestamp(1_800_000_000_000_000);
    assert_eq!(admit_n(&limiter, key, &limits, 10, now.0), 10);
    assert!(sync.sync(&limiter, now).await);

    redis.stop();
    // Requests are still decided from the local bucket (`admit` is not async: it cannot wait
    // on Redis): 20 more, then refused.
    assert_eq!(admit_n(&limiter, key, &limits, 50, now.0), 20);
    assert!(
        !sync.sync(&limiter, now).await,
        "a failed synchronisation says so"
    );
    assert!(matches!(
        limiter.admit((key, &limits), None, now.0),
        Admission::Refuse { .. }
    ));

    // Redis back: sharing resumes.
    let _redis = OwnRedis::start(port);
    let later = Timestamp(now.0 + 2_000_000);
    assert_eq!(admit_n(&limiter, key, &limits, 1, later.0), 1);
    assert!(sync.sync(&limiter, later).await);
}

/// A data plane with no limited traffic yet still says whether it could share: sharing when
/// Redis answers (no false alarm on an idle data plane), not sharing when it does not.
#[tokio::test]
async fn an_idle_data_plane_reports_whether_redis_answers() {
    let limiter = RateLimiter::default();
    let mut up = RedisSync::new(SHARED_REDIS, &prefix()).unwrap();
    assert!(
        up.sync(&limiter, Timestamp::now()).await,
        "Redis at {SHARED_REDIS} must answer"
    );
    let mut down =
        RedisSync::new(&format!("redis://127.0.0.1:{}", free_port()), &prefix()).unwrap();
    assert!(!down.sync(&limiter, Timestamp::now()).await);
}

#[test]
fn a_bad_redis_url_is_refused_naming_the_setting() {
    let e = RedisSync::new("http://not-redis", "p:").err().unwrap();
    assert!(e.contains("rate_limit_redis"), "{e}");
    // A password in the URL never reaches a message.
    let e = RedisSync::new("redis-nope://user:s3cret-pass@127.0.0.1:6379", "p:")
        .err()
        .unwrap();
    assert!(!e.contains("s3cret-pass"), "{e}");
}
