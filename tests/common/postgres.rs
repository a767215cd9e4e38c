//! PostgreSQL for the suites: the server named by `KEYGATE_TEST_POSTGRES` and databases on it
//! (one per data dir for `KEYGATE_TEST_STORE=postgres`, or a fresh one per test).

use std::path::Path;

use sqlx::{Connection, Executor, PgConnection};

/// The server named by `KEYGATE_TEST_POSTGRES` (e.g. `postgres://postgres@127.0.0.1:5432`).
/// Required: tests that need it fail rather than skip.
pub fn pg_base() -> String {
    std::env::var("KEYGATE_TEST_POSTGRES").unwrap_or_else(|_| {
        panic!(
            "KEYGATE_TEST_POSTGRES is not set: run ./scripts/test (PostgreSQL at 127.0.0.1:5432)"
        )
    })
}

/// A connection to the server's `postgres` database, to create and drop others.
async fn maintenance_connection(base: &str) -> PgConnection {
    PgConnection::connect(&format!("{base}/postgres"))
        .await
        .unwrap_or_else(|e| panic!("connecting to {base}/postgres: {e}"))
}

async fn create_database(admin: &mut PgConnection, db: &str) {
    admin
        .execute(format!("CREATE DATABASE {db}").as_str())
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {db}: {e}"));
}

/// With `KEYGATE_TEST_STORE=postgres` (./scripts/test runs the admin suite that way too), the
/// same suites run on PostgreSQL: one database per data dir (so a restart on the same data dir
/// finds its store), created on the server named by `KEYGATE_TEST_POSTGRES`.
pub async fn postgres_for(data_dir: &Path) -> String {
    use sha2::Digest;
    let base = pg_base();
    let digest = sha2::Sha256::digest(data_dir.display().to_string().as_bytes());
    let db = format!("kg_suite_{}", hex::encode(&digest[..8]));
    let mut admin = maintenance_connection(&base).await;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&db)
        .fetch_optional(&mut admin)
        .await
        .unwrap();
    if exists.is_none() {
        create_database(&mut admin, &db).await;
    }
    format!("{base}/{db}")
}

/// A fresh database `<prefix>_<uuid>` on that server; returns its URL.
pub async fn fresh_postgres_database(prefix: &str) -> String {
    let base = pg_base();
    let db = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let mut admin = maintenance_connection(&base).await;
    create_database(&mut admin, &db).await;
    let _ = admin.close().await;
    format!("{base}/{db}")
}

/// Drops a database made by [`fresh_postgres_database`] (best effort, for tidy servers).
pub async fn drop_postgres_database(url: &str) {
    let base = pg_base();
    let Some(db) = url.rsplit('/').next() else {
        return;
    };
    if let Ok(mut admin) = PgConnection::connect(&format!("{base}/postgres")).await {
        let _ = admin
            .execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str())
            .await;
        let _ = admin.close().await;
    }
}

/// Replaces the database `to` (a URL on that server) by a copy of `from` (`CREATE DATABASE …
/// TEMPLATE`: nothing may be connected to `from`). Sessions on `to` are ended: a backup
/// restored under running processes, which reconnect.
pub async fn copy_postgres_database(from: &str, to: &str) {
    let base = pg_base();
    let name = |url: &str| url.rsplit('/').next().unwrap().to_string();
    let (from, to) = (name(from), name(to));
    let mut admin = maintenance_connection(&base).await;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {to} WITH (FORCE)").as_str())
        .await
        .unwrap_or_else(|e| panic!("DROP DATABASE {to}: {e}"));
    admin
        .execute(format!("CREATE DATABASE {to} TEMPLATE {from}").as_str())
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {to} TEMPLATE {from}: {e}"));
    let _ = admin.close().await;
}

/// The two store backends a suite runs each test on (with [`on_both_backends!`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs each named `async fn name(backend: Backend)` once per backend, as `sqlite::<name>` and
/// `postgres::<name>` (the suite imports `Backend`).
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await;
                }
            )*
        }
    };
}
