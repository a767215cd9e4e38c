//! `keygate bench churn`: admin churn (consumer keys toggled at a fixed rate) and
//! disable→first-deny propagation trials against a running keygate, through its admin and
//! ext_authz listeners. Depends on `config` (its arguments), `server` (start-up errors) and the
//! generated admin and Envoy protos.

use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::CheckResponse;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::load::connect;
use super::requests::check_request;
use crate::config::ChurnArgs;
use crate::proto::admin::v1 as pb;
use crate::proto::admin::v1::key_admin_client::KeyAdminClient;
use crate::server::StartError;

/// Togglers running side by side, each on its own key, so the rate does not depend on one
/// RPC's latency (a commit waits for fsync).
const WORKERS: u32 = 4;

type Admin = KeyAdminClient<InterceptedService<Channel, BearerToken>>;

/// Presents the admin token on every call.
#[derive(Clone)]
struct BearerToken(MetadataValue<Ascii>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

fn failed(e: tonic::Status) -> StartError {
    StartError::Config(format!("admin call failed: {e}"))
}

pub(super) async fn run(args: ChurnArgs) -> Result<(), StartError> {
    let mut admin = admin_client(&args).await?;
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    if args.rate > 0 {
        churn(&mut admin, &args, &run_id[..8]).await?;
    }
    if args.trials > 0 {
        propagation_trials(&mut admin, &args, &run_id[..8]).await?;
    }
    Ok(())
}

async fn admin_client(args: &ChurnArgs) -> Result<Admin, StartError> {
    let token = std::fs::read_to_string(&args.admin_token_file)
        .map_err(|source| StartError::Io {
            context: format!("reading {}", args.admin_token_file.display()),
            source,
        })?
        .trim()
        .to_string();
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| StartError::Config("admin token is not a valid header value".into()))?;
    let channel = connect(args.admin)
        .await
        .map_err(|e| StartError::Config(format!("connecting to {}: {e}", args.admin)))?;
    Ok(KeyAdminClient::with_interceptor(
        channel,
        BearerToken(bearer),
    ))
}

/// Toggles `WORKERS` fresh keys for `args.duration` at `args.rate` changes per second in all.
async fn churn(admin: &mut Admin, args: &ChurnArgs, run_id: &str) -> Result<(), StartError> {
    let per = (args.rate as f64 / WORKERS as f64).max(0.1);
    let end = Instant::now() + args.duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let name = format!("churn-{run_id}-{w}");
        admin
            .create_consumer_key(pb::CreateConsumerKeyRequest {
                name: name.clone(),
                consumer: args.consumer.clone(),
                ..Default::default()
            })
            .await
            .map_err(failed)?;
        tasks.push(tokio::spawn(toggle(admin.clone(), name, per, end)));
    }
    let mut changes = 0;
    for t in tasks {
        changes += t.await.unwrap_or(0);
    }
    println!(
        "churn: {changes} admin changes in {:.1} s ({:.0}/s)",
        started.elapsed().as_secs_f64(),
        changes as f64 / started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Disables and enables key `name` in turn, `per_second` times a second until `end`; returns
/// how many changes succeeded.
async fn toggle(mut admin: Admin, name: String, per_second: f64, end: Instant) -> u64 {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut changes = 0u64;
    let mut enabled = true;
    while Instant::now() < end {
        tick.tick().await;
        let r = if enabled {
            admin
                .disable_consumer_key(pb::DisableConsumerKeyRequest {
                    selector: Some(pb::disable_consumer_key_request::Selector::Name(
                        name.clone(),
                    )),
                })
                .await
                .map(drop)
        } else {
            admin
                .enable_consumer_key(pb::EnableConsumerKeyRequest {
                    selector: Some(pb::enable_consumer_key_request::Selector::Name(
                        name.clone(),
                    )),
                })
                .await
                .map(drop)
        };
        if r.is_ok() {
            enabled = !enabled;
            changes += 1;
        }
    }
    changes
}

/// `args.trials` times: creates a key, waits until it is allowed, disables it and measures
/// until the first deny; prints the percentiles.
async fn propagation_trials(
    admin: &mut Admin,
    args: &ChurnArgs,
    run_id: &str,
) -> Result<(), StartError> {
    let channel = connect(args.authz)
        .await
        .map_err(|e| StartError::Config(format!("connecting to {}: {e}", args.authz)))?;
    let mut authz = AuthorizationClient::new(channel);
    let allowed = |r: &CheckResponse| r.status.as_ref().map(|s| s.code).unwrap_or(0) == 0;
    let mut samples = Vec::with_capacity(args.trials as usize);
    for t in 0..args.trials {
        let name = format!("prop-{run_id}-{t}");
        let created = admin
            .create_consumer_key(pb::CreateConsumerKeyRequest {
                name: name.clone(),
                consumer: args.consumer.clone(),
                ..Default::default()
            })
            .await
            .map_err(failed)?
            .into_inner();
        let req = check_request(&created.value, &args.model_service, "127.0.0.1");
        // Wait (bounded) until the new key is live, then disable and time the first deny.
        let live_by = Instant::now() + Duration::from_secs(10);
        loop {
            let r = authz.check(req.clone()).await.map_err(failed)?.into_inner();
            if allowed(&r) {
                break;
            }
            if Instant::now() > live_by {
                return Err(StartError::Config(format!("key {name} never became live")));
            }
        }
        admin
            .disable_consumer_key(pb::DisableConsumerKeyRequest {
                selector: Some(pb::disable_consumer_key_request::Selector::Name(
                    name.clone(),
                )),
            })
            .await
            .map_err(failed)?;
        let disabled_at = Instant::now();
        loop {
            let r = authz.check(req.clone()).await.map_err(failed)?.into_inner();
            if !allowed(&r) {
                break;
            }
            if disabled_at.elapsed() > Duration::from_secs(10) {
                return Err(StartError::Config(format!(
                    "key {name} still allowed 10 s after disable"
                )));
            }
        }
        samples.push(disabled_at.elapsed());
    }
    print_percentiles(samples);
    Ok(())
}

fn print_percentiles(mut samples: Vec<Duration>) {
    samples.sort();
    let q =
        |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0;
    println!(
        "disable→first deny over {} trials: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        samples.len(),
        q(0.5),
        q(0.99),
        q(1.0)
    );
}
