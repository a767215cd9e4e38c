//! The control plane's background refresh of SECRET_REF keys: each reference is read again
//! shortly before its TTL runs out; a changed value becomes a store change (audited as
//! `RefreshSecret`), so every replica and every data plane takes it as a new snapshot
//! version. A failed read keeps the last good value (see `Secrets::record_failure`). This is
//! where references are read (with `prime` at start): the snapshot builder only takes values
//! from the cache, so a stuck provider delays no snapshot.
//! A control-plane task beside the snapshot builder: it reads secrets and writes the store, so
//! it sits above both. Depends on `domain`, `secret` and `store`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::crypto::Secret;
use crate::domain::{ResourceKind, SecretRef};
use crate::secret::Secrets;
use crate::store::{Refreshed, SecretKey, Store};

/// How often references are checked: a fifth of the TTL, between 100 ms and 30 s. A value is
/// read again once it is within one period of expiring; a failed one is retried each period.
pub fn refresh_period(ttl: Duration) -> Duration {
    (ttl / 5).clamp(Duration::from_millis(100), Duration::from_secs(30))
}

/// Runs until `shutdown` resolves.
pub async fn run_refresh(
    store: Store,
    secrets: Secrets,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let period = refresh_period(secrets.ttl());
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {}
            // The builder met a reference it holds no value for (e.g. a key another replica
            // created): read it now rather than at the next tick.
            _ = secrets.wanted() => {}
        }
        if let Err(e) = refresh_once(&store, &secrets, period).await {
            tracing::warn!(error = %e, "secret refresh round failed; retrying next period");
        }
    }
}

/// Reads every reference a key uses, all at once, before the first snapshot is built: each
/// outcome is recorded (the value cached, or the error shown on the key) and nothing is
/// committed — the first snapshot takes these values as they are. A stuck provider costs at
/// most the read deadline here.
pub async fn prime(store: &Store, secrets: &Secrets) -> Result<(), crate::store::StoreError> {
    let refs: HashSet<SecretRef> = store
        .secret_keys()
        .await?
        .into_iter()
        .map(|k| k.reference)
        .collect();
    let reads = refs.into_iter().map(|r| async move {
        match secrets.fetch(&r).await {
            Ok(v) => {
                secrets.record_success(&r, &v);
            }
            Err(e) => secrets.record_failure(&r, &e),
        }
    });
    futures::future::join_all(reads).await;
    Ok(())
}

/// One round: reads every due reference, records the outcome, and commits a change for each
/// key whose value changed.
pub async fn refresh_once(
    store: &Store,
    secrets: &Secrets,
    period: Duration,
) -> Result<(), crate::store::StoreError> {
    let listed = Instant::now();
    let keys = store.secret_keys().await?;
    let mut by_ref: HashMap<SecretRef, Vec<SecretKey>> = HashMap::new();
    for k in keys {
        by_ref.entry(k.reference.clone()).or_default().push(k);
    }
    secrets.retain(&by_ref.keys().cloned().collect::<HashSet<_>>(), listed);
    let now = Instant::now();
    for (r, keys) in by_ref {
        if !secrets.due(&r, now, period, period) {
            continue;
        }
        let value = match secrets.fetch(&r).await {
            Ok(v) => v,
            Err(e) => {
                secrets.record_failure(&r, &e);
                continue;
            }
        };
        secrets.record_success(&r, &value);
        // Compared with what was last applied, not with the previous read: an admin request
        // or a failed commit may have read the new value already without applying it.
        if !secrets.differs_from_applied(&r, &value) {
            continue;
        }
        let applied = apply_value(store, secrets, &r, &value, keys).await;
        // Every key now holds the value, or has a change committed that makes the builder
        // resolve it afresh: the next round compares with this value.
        if applied {
            secrets.mark_applied(&r, &value);
        }
    }
    Ok(())
}

/// Commits `value` for each of `keys` that does not hold it yet. True when every key now
/// holds it (or has a committed change that makes the builder resolve it afresh).
async fn apply_value(
    store: &Store,
    secrets: &Secrets,
    r: &SecretRef,
    value: &Secret,
    keys: Vec<SecretKey>,
) -> bool {
    let hash = store.keys().hasher.hash(value.expose().as_bytes());
    let mut applied = true;
    for k in keys {
        let stale = match k.kind {
            // The store holds the HMAC: compare with it.
            ResourceKind::ConsumerKey => k.key_hash != Some(hash),
            // The builder resolves model keys afresh on any change of a model key.
            _ => true,
        };
        if !stale {
            continue;
        }
        match store
            .secret_value_changed(k.kind, &k.id, r, value, k.key_hash)
            .await
        {
            Ok(Refreshed::Applied) => tracing::info!(
                kind = %k.kind,
                key = %k.name,
                reference = %r,
                "secret value changed; the key follows in the next snapshot"
            ),
            Ok(Refreshed::Skipped) => applied = false, // changed meanwhile: next round
            Ok(Refreshed::Collision) => {
                applied = false;
                secrets.record_apply_failure(
                    r,
                    format!(
                        "consumer key {:?}: the new value is already used by another consumer key; this key authorizes nothing until its secret changes",
                        k.name
                    ),
                );
            }
            Err(e) => {
                applied = false;
                // The store's error stays in the log; the key shows only that it failed.
                tracing::warn!(key = %k.name, error = %e, "secret value not applied");
                secrets.record_apply_failure(
                    r,
                    "the new value could not be applied (store error; see the control plane log)"
                        .into(),
                );
            }
        }
    }
    applied
}
