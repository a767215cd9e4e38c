//! Rate limits shared between data planes through Redis, end to end (SPEC §8.3), in both shapes:
//! one `keygate serve` feeding two Envoys with the keygate module, or `keygate serve` and a
//! `keygate authz` subscribed to it, each behind its own Envoy (two data planes, each with its
//! own limiter), all given the same Redis (`rate_limit_redis` / `--rate-limit-redis`, a
//! redis-server of the test's own).
//!
//! With Redis up, 120 requests in 10 s on a key limited to 60 a minute, alternating between the
//! Envoys, admit one bucket's worth between them: the minute's allowance (60) plus its refill
//! during the run (1 a second). Counted alone, each Envoy would admit its 60 on its own (≈120).
//! With Redis stopped mid-run, both keep answering from their own counts (200 or 429, never an
//! error), `keygate_rate_limit_shared` reads 0 and sync failures are counted, and an unknown key
//! is still refused 401: nothing fails open.
//!
//! The load is paced (12 requests a second); every wait for a state is a bounded poll.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::admin::{
    bearer, create_consumer, create_consumer_key, create_model_key, create_service,
};
use common::envoy::{Envoy, EnvoyRun, HttpResponse, ModuleFiles, free_port, http_get, http_post};
use common::gateway::{Gateway, Plane, SUBSCRIBER_TOKEN};
use common::redis::OwnRedis;
use common::split::{DataPlane, DataPlaneOptions};
use common::{poll_until, tail};
use keygate::proto::admin::v1 as pb;

const TARGET: &str = "/openai/v1/chat/completions";
const BODY: &[u8] = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
const RPM: u32 = 60;
/// The load: `REQUESTS` requests, `PER_SECOND` a second, alternating between the Envoys.
const REQUESTS: usize = 120;
const PER_SECOND: u64 = 12;
const SHARED: &str = "keygate_rate_limit_shared";
const FAILURES: &str = "keygate_rate_limit_sync_failures_total";

/// The value of the unlabelled sample `name` on `addr`'s `/metrics`.
async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let r = http_get(addr, "/metrics", &[]).await.ok()?;
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
}

/// The second of the current UTC minute.
fn utc_second() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.unwrap().as_secs() % 60
}

/// What one paced run got: (Envoy index, request index, response), and its elapsed time from
/// the first request sent to the last.
struct Run {
    answers: Vec<(usize, usize, HttpResponse)>,
    elapsed: Duration,
}

impl Run {
    fn count(&self, envoy: Option<usize>, status: u16, from: usize) -> usize {
        self.answers
            .iter()
            .filter(|(e, i, r)| envoy.is_none_or(|x| x == *e) && *i >= from && r.status == status)
            .count()
    }
}

/// Sends `REQUESTS` POSTs with `key`, `PER_SECOND` a second, alternating between `planes`;
/// before request `i`, `before(i)` runs (to stop Redis mid-run).
async fn paced_run(planes: [SocketAddr; 2], key: &str, mut before: impl FnMut(usize)) -> Run {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / PER_SECOND));
    let mut sent = Vec::new();
    let (mut first, mut last) = (None, Instant::now());
    for i in 0..REQUESTS {
        tick.tick().await;
        before(i);
        let (envoy, auth) = (i % 2, bearer(key));
        last = Instant::now();
        first.get_or_insert(last);
        sent.push(tokio::spawn(async move {
            let r = http_post(planes[envoy], TARGET, &[("authorization", &auth)], BODY).await;
            (
                envoy,
                i,
                r.unwrap_or_else(|e| panic!("POST #{i} to Envoy {envoy}: {e}")),
            )
        }));
    }
    let mut answers = Vec::new();
    for s in sent {
        answers.push(s.await.unwrap());
    }
    Run {
        answers,
        elapsed: last - first.unwrap(),
    }
}

/// Every answer is 200 or a 429 `rate_limit_exceeded` of type `requests` with `retry-after` ≥ 1.
fn check_answers(run: &Run, what: &str) {
    for (e, i, r) in &run.answers {
        match r.status {
            200 => {}
            429 => {
                let v = r.json();
                assert_eq!(v["error"]["type"], "requests", "{what}: #{i} {}", r.text());
                assert_eq!(
                    v["error"]["code"],
                    "rate_limit_exceeded",
                    "{what}: #{i} {}",
                    r.text()
                );
                let retry: Vec<u64> = r
                    .values("retry-after")
                    .iter()
                    .filter_map(|v| v.parse().ok())
                    .collect();
                assert!(
                    retry.len() == 1 && retry[0] >= 1,
                    "{what}: #{i} (Envoy {e}) 429 needs one retry-after ≥ 1 s: {:?}",
                    r.headers
                );
            }
            s => panic!("{what}: #{i} to Envoy {e} got HTTP {s} {}", r.text()),
        }
    }
}

on_both_planes!(two_data_planes_share_one_allowance_through_redis_and_keep_answering_without_it);

/// The second data plane beside the gateway's: in the module shape another Envoy with the module
/// (its own data_dir, the same keygate); in the ext_authz shape a `keygate authz` subscribed to
/// the gateway's keygate and an Envoy calling it. Both with `settings` (Redis, metrics).
struct SecondPlane {
    envoy: Envoy,
    authz: Option<DataPlane>,
    _dir: tempfile::TempDir,
}

impl SecondPlane {
    async fn start(gw: &Gateway, settings: &[(&str, String)]) -> SecondPlane {
        let dir = tempfile::tempdir().unwrap();
        match gw.plane {
            Plane::Module => {
                let token = dir.path().join("subscriber.token");
                common::write_private(&token, SUBSCRIBER_TOKEN);
                let files = ModuleFiles {
                    control_plane: format!("http://{}", gw.keygate.admin_addr),
                    master_key_file: gw.keygate.data_dir.join("master.key"),
                    data_dir: dir.path().join("module-data"),
                    subscriber_token_file: token,
                    extra_settings: settings
                        .iter()
                        .map(|(k, v)| format!("\"{k}\":\"{v}\""))
                        .collect::<Vec<_>>()
                        .join(","),
                };
                let envoy =
                    Envoy::start_module(&files, gw.upstream.addr, &EnvoyRun::module()).await;
                SecondPlane {
                    envoy,
                    authz: None,
                    _dir: dir,
                }
            }
            Plane::ExtAuthz => {
                let mut opts = DataPlaneOptions::new(
                    "data plane 2",
                    &format!("http://{}", gw.keygate.admin_addr),
                    &dir.path().join("dp-data"),
                    &gw.keygate.data_dir.join("master.key"),
                    SUBSCRIBER_TOKEN,
                );
                for (k, v) in settings {
                    opts.args.push(format!("--{}", k.replace('_', "-")));
                    opts.args.push(v.clone());
                }
                let dp = DataPlane::start(&opts).await;
                let envoy = Envoy::start(dp.authz_addr, gw.upstream.addr).await;
                SecondPlane {
                    envoy,
                    authz: Some(dp),
                    _dir: dir,
                }
            }
        }
    }

    fn logs(&self) -> String {
        let authz = self
            .authz
            .as_ref()
            .map(|d| tail(&d.logs(), 30))
            .unwrap_or_default();
        format!("{authz}\n{}", tail(&self.envoy.stderr(), 30))
    }
}

async fn two_data_planes_share_one_allowance_through_redis_and_keep_answering_without_it(
    plane: Plane,
) {
    let mut redis = OwnRedis::start(free_port());
    // Each data plane's settings: the same Redis, its own metrics listener.
    let settings = |metrics: SocketAddr| {
        [
            ("rate_limit_redis", redis.url.clone()),
            ("rate_limit_sync_interval", "200ms".to_string()),
            ("metrics_addr", metrics.to_string()),
        ]
    };
    let metrics = [free_port(), free_port()].map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
    let first = settings(metrics[0]);
    let first = first.each_ref().map(|(k, v)| (*k, v.as_str()));
    let mut gw = Gateway::start_with(plane, &first).await;
    let other = SecondPlane::start(&gw, &settings(metrics[1])).await;
    let planes = [gw.listener(), other.envoy.listener];
    let diag = |gw: &Gateway| {
        format!(
            "{}\n--- second data plane:\n{}",
            gw.diagnostics(),
            other.logs()
        )
    };
    // Provisioning: the openai service, a consumer, two keys limited to 60 requests a minute
    // (one per phase, each starting with a full bucket) and an unlimited one for probing.
    create_service(&mut gw.admin, "openai", "", "").await;
    create_model_key(
        &mut gw.admin,
        "openai-main",
        "sk-proj-sharedLimits000000000000001",
        "openai",
    )
    .await;
    create_consumer(&mut gw.admin, "app").await;
    let mut keys = Vec::new();
    for (name, rpm) in [("rpm-1", Some(RPM)), ("rpm-2", Some(RPM)), ("probe", None)] {
        let limits = rpm.map(|rpm| pb::Limits {
            requests_per_minute: rpm,
            ..Default::default()
        });
        let req = pb::CreateConsumerKeyRequest {
            name: name.into(),
            consumer: "app".into(),
            limits,
            ..Default::default()
        };
        keys.push(create_consumer_key(&mut gw.admin, req).await);
    }
    let [limited_1, limited_2, probe] = <[String; 3]>::try_from(keys).unwrap();

    // Both data planes decide from the last commit: the probe key is allowed on each.
    gw.settle().await;
    for (n, addr) in planes.iter().enumerate() {
        poll_until(
            Duration::from_secs(10),
            &format!("the probe key to be allowed on Envoy {n}"),
            || async {
                let r = http_post(*addr, TARGET, &[("authorization", &bearer(&probe))], BODY).await;
                (r.ok()?.status == 200).then_some(())
            },
        )
        .await;
    }

    // Phase 1, Redis up: one allowance between the two data planes. (Shared counters are per
    // UTC minute; the second it starts at is printed, for reading the figures.)
    let started_at = utc_second();
    let run = paced_run(planes, &limited_1, |_| {}).await;
    check_answers(&run, "phase 1");
    let admitted = run.count(None, 200, 0);
    let per_envoy = [run.count(Some(0), 200, 0), run.count(Some(1), 200, 0)];
    let elapsed = run.elapsed.as_secs_f64();
    let expected = f64::from(RPM) + elapsed.floor();
    eprintln!(
        "{plane:?} phase 1 (Redis up, from :{started_at:02} UTC): admitted {admitted} of {REQUESTS} (Envoy 0: {}, Envoy 1: {}), refused {}, expected {expected} (60 + floor({elapsed:.3} s))",
        per_envoy[0],
        per_envoy[1],
        run.count(None, 429, 0)
    );
    assert!(
        (admitted as f64 - expected).abs() <= expected * 0.05,
        "phase 1: admitted {admitted} (Envoy 0: {}, Envoy 1: {}), expected {expected} ± 5% from one shared bucket\n{}",
        per_envoy[0],
        per_envoy[1],
        diag(&gw)
    );
    // Both data planes say they share, and how many syncs failed so far.
    let mut failures_before = [0.0; 2];
    for (n, m) in metrics.iter().enumerate() {
        poll_until(
            Duration::from_secs(10),
            &format!("{SHARED} 1 on Envoy {n}"),
            || async { (metric(*m, SHARED).await? == 1.0).then_some(()) },
        )
        .await;
        failures_before[n] = metric(*m, FAILURES).await.expect(FAILURES);
    }

    // Phase 2: a fresh limited key; Redis stopped after 3 s of the run.
    let stop_at = 3 * PER_SECOND as usize;
    let mut stopped = false;
    let run = paced_run(planes, &limited_2, |i| {
        if i == stop_at {
            redis.stop();
            stopped = true;
        }
    })
    .await;
    assert!(stopped);
    check_answers(&run, "phase 2");
    let admitted = run.count(None, 200, 0);
    let elapsed = run.elapsed.as_secs_f64();
    let after: Vec<(usize, usize)> = (0..2)
        .map(|e| {
            (
                run.count(Some(e), 200, stop_at),
                run.count(Some(e), 429, stop_at),
            )
        })
        .collect();
    eprintln!(
        "{plane:?} phase 2 (Redis stopped at request {stop_at}): admitted {admitted} of {REQUESTS} in {elapsed:.3} s (Envoy 0: {}, Envoy 1: {}); after the stop (admitted, refused): Envoy 0 {:?}, Envoy 1 {:?}",
        run.count(Some(0), 200, 0),
        run.count(Some(1), 200, 0),
        after[0],
        after[1]
    );
    let most = 2.0 * (f64::from(RPM) + elapsed);
    assert!(
        admitted >= RPM as usize && admitted as f64 <= most,
        "phase 2: admitted {admitted}, expected between {RPM} and {most} (each data plane's own bucket)\n{}",
        diag(&gw)
    );
    for (e, (ok, refused)) in after.iter().enumerate() {
        assert!(
            *ok > 0 && *refused > 0,
            "phase 2: Envoy {e} after the stop admitted {ok} and refused {refused}: it must keep enforcing its own counts\n{}",
            diag(&gw)
        );
    }
    for (n, m) in metrics.iter().enumerate() {
        poll_until(
            Duration::from_secs(10),
            &format!("{SHARED} 0 on Envoy {n} with Redis stopped"),
            || async { (metric(*m, SHARED).await? == 0.0).then_some(()) },
        )
        .await;
        let failures = metric(*m, FAILURES).await.expect(FAILURES);
        eprintln!(
            "Envoy {n}: {FAILURES} {} before the stop, {failures} after",
            failures_before[n]
        );
        assert!(
            failures > failures_before[n],
            "Envoy {n}: {FAILURES} did not grow with Redis stopped"
        );
        // Nothing fails open on authentication.
        let r = http_post(
            planes[n],
            TARGET,
            &[("authorization", &bearer("kg-not-a-key-0000000000000000"))],
            BODY,
        )
        .await
        .unwrap();
        assert_eq!(
            r.status,
            401,
            "Envoy {n}, Redis stopped, unknown key: {}",
            r.text()
        );
        let r = http_post(planes[n], TARGET, &[], BODY).await.unwrap();
        assert_eq!(
            r.status,
            401,
            "Envoy {n}, Redis stopped, no key: {}",
            r.text()
        );
    }
}
