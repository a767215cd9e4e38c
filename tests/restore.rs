//! State that goes back in time, with real processes. A data plane's encrypted snapshot cache
//! replaced by an older copy of itself must not bring back what it had already moved past: a
//! data plane restarting while its control plane is away refuses a cache below its high-water
//! mark (and waits for the control plane) rather than serve a key that was disabled since.
//!
//! A store restored from a backup (its revision goes back, its store id stays) must not leave
//! an already-connected data plane on the state it had moved past: the control plane starts a
//! new epoch and every data plane takes the restored store's full snapshot, then every later
//! change (a leaked key disabled) within the normal propagation time: `keygate authz` on
//! SQLite and on PostgreSQL, and Envoy with the keygate module. The new epoch is audited
//! (`StartEpoch` on the `STORE`) and counted (`keygate_store_epoch_changes_total`).
//!
//! Equal versions with different content: a data plane holding (store, epoch, N) from before
//! the restore meets a control plane whose store was restored, epoch row included, and changed
//! back up to revision N with the leaked key disabled. No version tells them apart; the
//! content digest does, and the data plane takes the store's state.
//!
//! Every test has its own processes, ports and data dirs. Nothing sleeps to wait for a state.

mod common;

use std::time::Duration;

use keygate::proto::admin::v1 as pb;

use common::admin::{
    bearer, create_bound_key, create_consumer, create_model_key, create_service,
    disable_consumer_key, latest_revision, snapshot_reaches,
};
use common::envoy::{Envoy, EnvoyRun, ModuleFiles, Upstream, http_get};
use common::postgres::{copy_postgres_database, drop_postgres_database, fresh_postgres_database};
use common::split::{
    ControlPlane, ControlPlaneOptions, DataPlane, DataPlaneOptions, subscriber_token,
};
use common::{poll_until, tail};

const SETTLE: Duration = Duration::from_secs(15);
const MODEL_KEY: &str = "sk-proj-restoreRollback00000000000000000001";
const SQLITE_FILES: [&str; 3] = ["keygate.db", "keygate.db-wal", "keygate.db-shm"];
const REFUSED: &str = "snapshot cache refused: below its high-water mark; ignoring it";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_copy_of_the_cache_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let token = subscriber_token();
    let mut cp =
        ControlPlane::start(&ControlPlaneOptions::new(&dir.path().join("cp"), &token)).await;
    let mut admin = cp.admin().await;
    create_service(&mut admin, "openai", "", "").await;
    create_model_key(&mut admin, "openai-primary", MODEL_KEY, "openai").await;
    create_consumer(&mut admin, "app").await;
    let leaked = create_bound_key(&mut admin, "leaked", "app").await;
    let opts = DataPlaneOptions::new(
        "data plane",
        &cp.url(),
        &dir.path().join("dp"),
        &cp.master_key_file(),
        &token,
    );
    let mut dp = DataPlane::start(&opts).await;
    dp.wait_serving(SETTLE).await;
    let version = |admin: &mut common::Admin| {
        let mut admin = admin.clone();
        async move {
            admin
                .get_snapshot_status(pb::GetSnapshotStatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .version as u64
        }
    };
    poll_until(SETTLE, "the data plane to allow the key", || async {
        dp.verdict(&leaked, "openai").await.allowed().then_some(())
    })
    .await;
    dp.wait_cache_written(version(&mut admin).await, SETTLE)
        .await;
    let old_copy = std::fs::read(dp.cache_file()).unwrap();

    // The key leaks and is disabled; the data plane takes it and caches the new state.
    disable_consumer_key(&mut admin, "leaked").await;
    poll_until(
        SETTLE,
        "the data plane to refuse the disabled key",
        || async { (!dp.verdict(&leaked, "openai").await.allowed()).then_some(()) },
    )
    .await;
    dp.wait_cache_written(version(&mut admin).await, SETTLE)
        .await;

    // The older copy put back while the data plane is down, and no control plane to ask.
    dp.proc.kill();
    cp.kill();
    std::fs::write(dp.cache_file(), &old_copy).unwrap();
    let dp = DataPlane::start(&opts).await;
    poll_until(SETTLE, "the data plane to deal with its cache", || async {
        (dp.verdict(&leaked, "openai").await.allowed() || !dp.proc.log_messages(REFUSED).is_empty())
            .then_some(())
    })
    .await;
    let v = dp.verdict(&leaked, "openai").await;
    assert!(
        !v.allowed(),
        "the disabled key is allowed again from an older copy of the cache\n{}",
        tail(&dp.logs(), 20)
    );
    assert_eq!(v.error_code(), "keygate_not_ready", "{v:?}");
    let refused = dp.proc.log_messages(REFUSED);
    let line = refused.first().expect("the refusal is logged");
    assert!(
        line["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("high-water mark")),
        "{line}"
    );
}

/// Copies the control plane's SQLite files (it is stopped) from `from` to `to`; a file `from`
/// lacks is removed from `to`.
fn copy_sqlite(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in SQLITE_FILES {
        match std::fs::read(from.join(f)) {
            Ok(b) => common::write_private(&to.join(f), b),
            Err(_) => {
                let _ = std::fs::remove_file(to.join(f));
            }
        }
    }
}

/// Where the control plane's store is, and how it is backed up and restored.
enum Backup {
    /// The SQLite files in the control plane's data dir: copied while it is stopped; restored
    /// while it is stopped (it starts on the restored files and meets data planes that are
    /// ahead of them).
    Sqlite,
    /// A PostgreSQL database: copied while the control plane is stopped, restored under the
    /// running control plane (it reconnects and finds the revision below what it published).
    Postgres { store: String, backup: String },
}

impl Backup {
    async fn take(&self, cp: &mut ControlPlane, dir: &std::path::Path) {
        cp.proc.stop();
        match self {
            Backup::Sqlite => copy_sqlite(&cp.opts.data_dir, &dir.join("backup")),
            Backup::Postgres { store, backup } => copy_postgres_database(store, backup).await,
        }
        cp.restart().await;
    }

    /// The backup restored while the control plane is stopped; it starts on the restored
    /// store, remembering nothing of what it published.
    async fn restore_stopped(&self, cp: &mut ControlPlane, dir: &std::path::Path) {
        cp.proc.stop();
        match self {
            Backup::Sqlite => copy_sqlite(&dir.join("backup"), &cp.opts.data_dir),
            Backup::Postgres { store, backup } => copy_postgres_database(backup, store).await,
        }
        cp.restart().await;
    }

    async fn restore(&self, cp: &mut ControlPlane, dir: &std::path::Path) {
        match self {
            Backup::Sqlite => {
                cp.proc.stop();
                copy_sqlite(&dir.join("backup"), &cp.opts.data_dir);
                cp.restart().await;
            }
            Backup::Postgres { store, backup } => copy_postgres_database(backup, store).await,
        }
    }
}

/// Key A allowed → backup → key B created and more revisions → the backup restored → A
/// disabled: the data plane connected throughout refuses A (disabled) and B (the restored
/// store does not have it) within the normal propagation time.
async fn restored_store_scenario(backup: Backup, store: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let token = subscriber_token();
    let mut cp_opts = ControlPlaneOptions::new(&dir.path().join("cp"), &token);
    cp_opts.store = store;
    let mut cp = ControlPlane::start(&cp_opts).await;
    let mut admin = cp.admin().await;
    create_service(&mut admin, "openai", "", "").await;
    create_model_key(&mut admin, "openai-primary", MODEL_KEY, "openai").await;
    create_consumer(&mut admin, "app").await;
    let leaked = create_bound_key(&mut admin, "leaked", "app").await;
    let opts = DataPlaneOptions::new(
        "data plane",
        &cp.url(),
        &dir.path().join("dp"),
        &cp.master_key_file(),
        &token,
    );
    let dp = DataPlane::start(&opts).await;
    dp.wait_serving(SETTLE).await;
    poll_until(SETTLE, "the data plane to allow the key", || async {
        dp.verdict(&leaked, "openai").await.allowed().then_some(())
    })
    .await;

    backup.take(&mut cp, dir.path()).await;
    let mut admin = cp.admin().await;
    // Later changes the backup does not have, and the data plane takes them.
    let newer = create_bound_key(&mut admin, "newer", "app").await;
    for i in 0..5 {
        create_consumer(&mut admin, &format!("later-{i}")).await;
    }
    poll_until(SETTLE, "the data plane to allow the newer key", || async {
        dp.verdict(&newer, "openai").await.allowed().then_some(())
    })
    .await;

    // The restore, then the leaked key disabled on the restored store.
    backup.restore(&mut cp, dir.path()).await;
    // (On PostgreSQL the control plane's pooled connections died with the old database: the
    // first requests may fail until it has reconnected.)
    let admin = cp.admin().await;
    poll_until(
        SETTLE,
        "the restored store to take DisableConsumerKey",
        || {
            let mut admin = admin.clone();
            async move {
                admin
                    .disable_consumer_key(pb::DisableConsumerKeyRequest {
                        selector: Some(pb::disable_consumer_key_request::Selector::Name(
                            "leaked".into(),
                        )),
                    })
                    .await
                    .ok()
            }
        },
    )
    .await;
    poll_until(
        SETTLE,
        "the connected data plane to refuse the disabled key and the key the store lost",
        || async {
            (!dp.verdict(&leaked, "openai").await.allowed()
                && !dp.verdict(&newer, "openai").await.allowed())
            .then_some(())
        },
    )
    .await;

    // The new epoch is in the audit trail and in the control plane's metrics.
    let mut admin = cp.admin().await;
    let epochs = epoch_events(&mut admin).await;
    let e = epochs.first().unwrap_or_else(|| {
        panic!(
            "no StartEpoch audit event after the restore\n{}",
            tail(&cp.logs(), 30)
        )
    });
    assert_eq!(
        (e.actor.as_str(), e.kind, e.changed_fields.as_slice()),
        (
            "keygate:control-plane",
            pb::ResourceKind::Store as i32,
            ["epoch".to_string()].as_slice()
        ),
        "{e:?}"
    );
    assert!(
        e.details.starts_with("epoch (first) -> ") && e.details.contains("revision"),
        "the old and new epoch: {e:?}"
    );
    assert!(!e.resource_id.is_empty() && e.resource_id == e.resource_name);
    let changes = epoch_changes(&cp).await;
    assert!(
        changes >= 1.0,
        "keygate_store_epoch_changes_total = {changes}"
    );
}

/// The store's `StartEpoch` audit events, newest first (filtered by kind, as an operator would).
async fn epoch_events(admin: &mut common::Admin) -> Vec<pb::AuditEvent> {
    admin
        .list_audit_events(pb::ListAuditEventsRequest {
            kind: pb::ResourceKind::Store as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .items
        .into_iter()
        .filter(|e| e.action == "StartEpoch")
        .collect()
}

/// `keygate_store_epoch_changes_total` on the control plane's `/metrics`.
async fn epoch_changes(cp: &ControlPlane) -> f64 {
    let text = http_get(common::metrics_addr(&cp.logs()), "/metrics", &[])
        .await
        .unwrap()
        .text();
    text.lines()
        .find_map(|l| l.strip_prefix("keygate_store_epoch_changes_total "))
        .unwrap_or_else(|| panic!("no keygate_store_epoch_changes_total in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// A data plane holding version N of (store, epoch) stops; its control plane's store is
/// restored to an older backup (its epoch row included) and changed back up to revision N,
/// the leaked key disabled and the newer key gone. The data plane restarts from its cache
/// (the content it had at N) and subscribes at N: it takes the store's state within the
/// normal propagation time. No epoch starts (nothing went back that anyone saw): the content
/// digest alone tells the two states at N apart.
async fn equal_version_scenario(backup: Backup, store: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let token = subscriber_token();
    let mut cp_opts = ControlPlaneOptions::new(&dir.path().join("cp"), &token);
    cp_opts.store = store;
    let mut cp = ControlPlane::start(&cp_opts).await;
    let mut admin = cp.admin().await;
    create_service(&mut admin, "openai", "", "").await;
    create_model_key(&mut admin, "openai-primary", MODEL_KEY, "openai").await;
    create_consumer(&mut admin, "app").await;
    let leaked = create_bound_key(&mut admin, "leaked", "app").await;
    let opts = DataPlaneOptions::new(
        "data plane",
        &cp.url(),
        &dir.path().join("dp"),
        &cp.master_key_file(),
        &token,
    );
    backup.take(&mut cp, dir.path()).await;
    let mut admin = cp.admin().await;
    let newer = create_bound_key(&mut admin, "newer", "app").await;
    for i in 0..4 {
        create_consumer(&mut admin, &format!("later-{i}")).await;
    }
    let n = latest_revision(&mut admin).await;
    let mut dp = DataPlane::start(&opts).await;
    poll_until(SETTLE, "the data plane to allow both keys", || async {
        (dp.verdict(&leaked, "openai").await.allowed()
            && dp.verdict(&newer, "openai").await.allowed())
        .then_some(())
    })
    .await;
    dp.wait_cache_written(n, SETTLE).await;

    // The data plane goes away; the store goes back to the backup and is changed back up to
    // revision N, the leaked key disabled last.
    dp.proc.stop();
    backup.restore_stopped(&mut cp, dir.path()).await;
    let mut admin = cp.admin().await;
    let restored = latest_revision(&mut admin).await;
    assert!(
        restored + 1 < n,
        "the backup ({restored}) is older than N ({n})"
    );
    for i in 0..n - restored - 1 {
        create_consumer(&mut admin, &format!("restored-{i}")).await;
    }
    disable_consumer_key(&mut admin, "leaked").await;
    assert_eq!(latest_revision(&mut admin).await, n, "back at revision N");
    snapshot_reaches(&admin, n, SETTLE, "the control plane's snapshot at N").await;

    // The data plane starts from its cache (the old content at N) and subscribes at N.
    dp.restart().await;
    poll_until(
        SETTLE,
        "the data plane to refuse the disabled key and the key the store lost",
        || async {
            (!dp.verdict(&leaked, "openai").await.allowed()
                && !dp.verdict(&newer, "openai").await.allowed())
            .then_some(())
        },
    )
    .await;
    let told = cp.proc.log_messages(
        "a data plane holds the served version with other content (the store was restored and changed back up to it): sending it the full snapshot",
    );
    assert_eq!(
        told.first().map(|l| l["fields"]["version"].as_u64()),
        Some(Some(n)),
        "the control plane told the contents apart at version N\n{}",
        tail(&cp.logs(), 30)
    );
    assert!(
        epoch_events(&mut admin).await.is_empty(),
        "no epoch started: the versions were equal throughout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_versions_with_other_content_are_told_apart_on_sqlite() {
    equal_version_scenario(Backup::Sqlite, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_versions_with_other_content_are_told_apart_on_postgres() {
    let store = fresh_postgres_database("kg_equal").await;
    let backup = fresh_postgres_database("kg_equal_backup").await;
    equal_version_scenario(
        Backup::Postgres {
            store: store.clone(),
            backup: backup.clone(),
        },
        Some(store.clone()),
    )
    .await;
    drop_postgres_database(&store).await;
    drop_postgres_database(&backup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_sqlite_store_is_followed_by_a_connected_data_plane() {
    restored_store_scenario(Backup::Sqlite, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_postgres_store_is_followed_by_a_connected_data_plane() {
    let store = fresh_postgres_database("kg_restore").await;
    let backup = fresh_postgres_database("kg_restore_backup").await;
    restored_store_scenario(
        Backup::Postgres {
            store: store.clone(),
            backup: backup.clone(),
        },
        Some(store.clone()),
    )
    .await;
    drop_postgres_database(&store).await;
    drop_postgres_database(&backup).await;
}

/// The same restore with Envoy and the keygate module as the connected data plane (it runs
/// the same subscriber code as `keygate authz`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_store_is_followed_by_envoy_with_the_module() {
    let dir = tempfile::tempdir().unwrap();
    let token = subscriber_token();
    let mut cp =
        ControlPlane::start(&ControlPlaneOptions::new(&dir.path().join("cp"), &token)).await;
    let mut admin = cp.admin().await;
    create_service(&mut admin, "openai", "", "").await;
    create_model_key(&mut admin, "openai-primary", MODEL_KEY, "openai").await;
    create_consumer(&mut admin, "app").await;
    let leaked = create_bound_key(&mut admin, "leaked", "app").await;
    let token_file = dir.path().join("subscriber.token");
    common::write_private(&token_file, &token);
    let files = ModuleFiles {
        control_plane: cp.url(),
        master_key_file: cp.master_key_file(),
        data_dir: dir.path().join("module-data"),
        subscriber_token_file: token_file,
        extra_settings: String::new(),
    };
    let upstream = Upstream::start().await;
    let envoy = Envoy::start_module(&files, upstream.addr, &EnvoyRun::module()).await;
    let status = |key: String| {
        let listener = envoy.listener;
        async move {
            http_get(
                listener,
                "/openai/v1/models",
                &[("authorization", &bearer(&key))],
            )
            .await
            .map(|r| r.status)
            .unwrap_or(0)
        }
    };
    poll_until(SETTLE, "the module to allow the key", || async {
        (status(leaked.clone()).await == 200).then_some(())
    })
    .await;

    let backup = Backup::Sqlite;
    backup.take(&mut cp, dir.path()).await;
    let mut admin = cp.admin().await;
    let newer = create_bound_key(&mut admin, "newer", "app").await;
    for i in 0..5 {
        create_consumer(&mut admin, &format!("later-{i}")).await;
    }
    poll_until(SETTLE, "the module to allow the newer key", || async {
        (status(newer.clone()).await == 200).then_some(())
    })
    .await;

    backup.restore(&mut cp, dir.path()).await;
    let mut admin = cp.admin().await;
    disable_consumer_key(&mut admin, "leaked").await;
    poll_until(
        SETTLE,
        "the module to refuse the disabled key and the key the store lost",
        || async {
            (status(leaked.clone()).await == 401 && status(newer.clone()).await == 401)
                .then_some(())
        },
    )
    .await;
}
