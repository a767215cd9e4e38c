//! `keygate bench seed`: loads N consumer keys with the deterministic values of
//! `requests::seeded_key` into a store, bound to one consumer, plus a model service with one
//! model key, so the load generator has something to present. Depends on `server` (opening the
//! store), `store`, `domain` and `crypto`.

use std::time::Instant;

use super::requests::seeded_key;
use crate::config::SeedArgs;
use crate::crypto::Secret;
use crate::domain::input::{KeySource, NewConsumer, NewModelKey, NewModelService};
use crate::domain::limits::LimitsInput;
use crate::domain::{Limits, RuleError, Selector};
use crate::server::StartError;
use crate::store::{Actor, Store, StoreError};

/// Keys imported per transaction.
const BATCH: u64 = 50_000;

pub(super) async fn run(args: SeedArgs) -> Result<(), StartError> {
    let limits = Limits {
        max_keys_per_consumer: usize::MAX,
        ..Limits::default()
    };
    let (store, _master) = crate::server::open_store(&args.store, limits).await?;
    let actor = Actor("bench-seed".into());
    create_resources(&store, &actor, &args)
        .await
        .map_err(StartError::Store)?;
    store
        .get_consumer(&Selector::Name(args.consumer.clone()))
        .await
        .map_err(StartError::Store)?;
    let started = Instant::now();
    let mut i = args.first;
    let last = args.first.saturating_add(args.keys);
    while i < last {
        let end = (i + BATCH).min(last);
        let keys = (i..end)
            .map(|k| (format!("bench-{k}"), Secret::new(seeded_key(k))))
            .collect();
        store
            .import_consumer_keys(&actor, &args.consumer, keys)
            .await
            .map_err(StartError::Store)?;
        i = end;
    }
    println!(
        "seeded {} consumer keys in {:.1} s",
        args.keys,
        started.elapsed().as_secs_f64()
    );
    store.close().await;
    Ok(())
}

/// The consumer, the model service and its one model key, each unless it already exists.
async fn create_resources(store: &Store, actor: &Actor, args: &SeedArgs) -> Result<(), StoreError> {
    let exists = |r: Result<(), StoreError>| match r {
        Ok(()) | Err(StoreError::Rule(RuleError::AlreadyExists { .. })) => Ok(()),
        Err(e) => Err(e),
    };
    let consumer = NewConsumer {
        name: args.consumer.clone(),
        limits: LimitsInput {
            requests_per_minute: args.requests_per_minute,
            tokens_per_minute: args.tokens_per_minute,
            ..Default::default()
        },
        ..Default::default()
    };
    exists(store.create_consumer(actor, consumer).await.map(drop))?;
    let service = NewModelService {
        name: args.model_service.clone(),
        ..Default::default()
    };
    exists(store.create_model_service(actor, service).await.map(drop))?;
    let model_key = NewModelKey {
        name: format!("{}-vendor", args.model_service),
        description: String::new(),
        source: KeySource::Custom(Secret::new("sk-bench-0123456789abcdef0123456789".into())),
        model_services: vec![args.model_service.clone()],
    };
    exists(store.create_model_key(actor, model_key).await.map(drop))
}
