//! Versioned schema migrations. One schema text for both backends; only the binary column
//! type differs (`BLOB` on SQLite, `BYTEA` on PostgreSQL). Integers are `BIGINT` everywhere
//! so both drivers decode them as `i64`.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};

use super::Backend;

const V1: &str = r#"
CREATE TABLE store_meta (
    id BIGINT PRIMARY KEY,
    store_id TEXT NOT NULL,
    revision BIGINT NOT NULL,
    master_key_fingerprint TEXT NOT NULL
);

CREATE TABLE consumers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    scope_mode BIGINT NOT NULL,
    create_time BIGINT NOT NULL,
    update_time BIGINT NOT NULL
);

CREATE TABLE model_services (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    provider TEXT NOT NULL,
    auth_header TEXT NOT NULL,
    auth_value_template TEXT NOT NULL,
    models TEXT NOT NULL,
    create_time BIGINT NOT NULL,
    update_time BIGINT NOT NULL
);

CREATE TABLE consumer_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    status BIGINT NOT NULL,
    generation_method BIGINT NOT NULL,
    key_hash {BLOB} UNIQUE,
    masked_value TEXT NOT NULL,
    secret_provider TEXT,
    secret_name TEXT,
    secret_version TEXT,
    consumer_id TEXT REFERENCES consumers(id),
    scope_mode BIGINT NOT NULL,
    ip_allowlist TEXT NOT NULL,
    expire_time BIGINT,
    create_time BIGINT NOT NULL,
    update_time BIGINT NOT NULL,
    last_used_time BIGINT
);
CREATE INDEX consumer_keys_consumer ON consumer_keys (consumer_id);

CREATE TABLE model_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    status BIGINT NOT NULL,
    generation_method BIGINT NOT NULL,
    ciphertext {BLOB},
    masked_value TEXT NOT NULL,
    secret_provider TEXT,
    secret_name TEXT,
    secret_version TEXT,
    create_time BIGINT NOT NULL,
    update_time BIGINT NOT NULL
);

CREATE TABLE model_key_bindings (
    model_key_id TEXT NOT NULL REFERENCES model_keys(id),
    model_service_id TEXT NOT NULL REFERENCES model_services(id),
    create_time BIGINT NOT NULL,
    PRIMARY KEY (model_key_id, model_service_id)
);
CREATE INDEX model_key_bindings_service ON model_key_bindings (model_service_id);

CREATE TABLE scope_entries (
    owner_kind BIGINT NOT NULL,
    owner_id TEXT NOT NULL,
    model_service_id TEXT NOT NULL REFERENCES model_services(id),
    position BIGINT NOT NULL,
    PRIMARY KEY (owner_id, model_service_id)
);
CREATE INDEX scope_entries_service ON scope_entries (model_service_id);

CREATE TABLE audit_events (
    revision BIGINT PRIMARY KEY,
    time BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    kind BIGINT NOT NULL,
    resource_id TEXT NOT NULL,
    resource_name TEXT NOT NULL,
    changed_fields TEXT NOT NULL
);
CREATE INDEX audit_events_resource ON audit_events (kind, resource_name);
CREATE INDEX audit_events_time ON audit_events (time);

-- What each revision touched, so snapshots update incrementally. kind 0 = reload everything;
-- key_hash = a consumer key HMAC the revision removed (a deleted key).
CREATE TABLE changes (
    revision BIGINT NOT NULL,
    kind BIGINT NOT NULL,
    resource_id TEXT NOT NULL,
    key_hash {BLOB}
);
CREATE INDEX changes_revision ON changes (revision);
"#;

/// SPEC §9 operator identities: named admin credentials, kept as HMACs of their values.
const V2: &str = r#"
CREATE TABLE admin_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role BIGINT NOT NULL,
    token_hash {BLOB} NOT NULL UNIQUE,
    masked_value TEXT NOT NULL,
    expire_time BIGINT,
    create_time BIGINT NOT NULL,
    last_used_time BIGINT
);
"#;

/// SPEC §5 "Versions": the epoch names one history of revisions ('' until a restore is
/// first detected; then a random id). See `epoch`.
const V3: &str = r#"
ALTER TABLE store_meta ADD COLUMN epoch TEXT NOT NULL DEFAULT '';
"#;

/// SPEC §8.1 model-level scope: a scope's `models` entries (one row per service and pattern,
/// by service id so a rename shows through), and where a service's requests name their model
/// (`ModelSource` codes: 1 body, 2 path, 3 none).
const V4: &str = r#"
CREATE TABLE scope_models (
    owner_kind BIGINT NOT NULL,
    owner_id TEXT NOT NULL,
    model_service_id TEXT NOT NULL REFERENCES model_services(id),
    pattern TEXT NOT NULL,
    position BIGINT NOT NULL,
    PRIMARY KEY (owner_id, model_service_id, pattern)
);
CREATE INDEX scope_models_service ON scope_models (model_service_id);

ALTER TABLE model_services ADD COLUMN model_source BIGINT NOT NULL DEFAULT 1;

-- `models` was informational before this version and is enforced from it on: lists written
-- before are moved aside (kept, not enforced, named in a warning at every start) until an
-- operator sets `models` again.
ALTER TABLE model_services ADD COLUMN legacy_models TEXT NOT NULL DEFAULT '[]';
UPDATE model_services SET legacy_models = models, models = '[]';
"#;

/// SPEC §8.2 usage and spend. `pricing`: a model service's prices (JSON, integer micro-USD per
/// million tokens). `usage_buckets`: usage per UTC hour (microseconds since the epoch at the
/// hour's start), consumer key, consumer ('' when the key was unbound), model service and model
/// ('' unknown), ids kept after their resource is deleted; the cost is whole micro-USD plus the
/// picodollars below one (0..999999), both exact. `usage_cursors`: per data plane, the last
/// report sequence applied (a report is applied iff its sequence is above it). `usage_names`:
/// the last name of each deleted consumer, consumer key and model service, so their usage
/// keeps a name.
const V5: &str = r#"
ALTER TABLE model_services ADD COLUMN pricing TEXT NOT NULL DEFAULT '[]';

CREATE TABLE usage_buckets (
    hour BIGINT NOT NULL,
    consumer_key_id TEXT NOT NULL,
    consumer_id TEXT NOT NULL,
    model_service_id TEXT NOT NULL,
    model TEXT NOT NULL,
    requests BIGINT NOT NULL,
    error_responses BIGINT NOT NULL,
    unparsed BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL,
    unpriced_requests BIGINT NOT NULL,
    cost_micro_usd BIGINT NOT NULL,
    cost_pico_usd BIGINT NOT NULL,
    PRIMARY KEY (hour, consumer_key_id, consumer_id, model_service_id, model)
);

CREATE TABLE usage_cursors (
    data_plane TEXT PRIMARY KEY,
    last_sequence BIGINT NOT NULL,
    update_time BIGINT NOT NULL
);

CREATE TABLE usage_names (
    id TEXT PRIMARY KEY,
    kind BIGINT NOT NULL,
    name TEXT NOT NULL,
    time BIGINT NOT NULL
);
CREATE INDEX usage_names_name ON usage_names (kind, name);
"#;

/// SPEC §5 "Versions": what an audit event that no admin request made says happened (a new
/// epoch's old and new epoch).
const V6: &str = r#"
ALTER TABLE audit_events ADD COLUMN details TEXT NOT NULL DEFAULT '';
"#;

/// SPEC §8.4 rotation with overlap: a consumer key's previous value (its HMAC and mask) and
/// the instant it stops authorizing; NULL before the first rotation and after a rotation with
/// no overlap. An HMAC is never both one key's value and another's previous value (checked
/// by the writes; each column is unique on its own).
const V7: &str = r#"
ALTER TABLE consumer_keys ADD COLUMN previous_hash {BLOB};
ALTER TABLE consumer_keys ADD COLUMN previous_masked_value TEXT;
ALTER TABLE consumer_keys ADD COLUMN previous_expire_time BIGINT;
CREATE UNIQUE INDEX consumer_keys_previous_hash ON consumer_keys (previous_hash);
"#;

/// SPEC §8.3 budgets and rate limits of consumers and consumer keys, each NULL when not
/// limited: a budget in whole micro-USD and/or tokens with its period (`BudgetPeriod` codes:
/// 1 day, 2 week, 3 month, 4 total), requests and tokens per minute. The spend of a budget's
/// period is summed from `usage_buckets` by key or consumer and hour: indexed so.
const V8: &str = r#"
ALTER TABLE consumers ADD COLUMN budget_micro_usd BIGINT;
ALTER TABLE consumers ADD COLUMN budget_tokens BIGINT;
ALTER TABLE consumers ADD COLUMN budget_period BIGINT;
ALTER TABLE consumers ADD COLUMN requests_per_minute BIGINT;
ALTER TABLE consumers ADD COLUMN tokens_per_minute BIGINT;

ALTER TABLE consumer_keys ADD COLUMN budget_micro_usd BIGINT;
ALTER TABLE consumer_keys ADD COLUMN budget_tokens BIGINT;
ALTER TABLE consumer_keys ADD COLUMN budget_period BIGINT;
ALTER TABLE consumer_keys ADD COLUMN requests_per_minute BIGINT;
ALTER TABLE consumer_keys ADD COLUMN tokens_per_minute BIGINT;

CREATE INDEX usage_buckets_key_hour ON usage_buckets (consumer_key_id, hour);
CREATE INDEX usage_buckets_consumer_hour ON usage_buckets (consumer_id, hour);
"#;

/// SPEC §8.3 budget exhaustion, kept by the control plane (never by an operator): until when a
/// consumer's or consumer key's budget refuses (µs; the largest value for a `TOTAL` budget, which
/// never ends; NULL while open). Published in the snapshot, so data planes refuse with no call
/// and re-open at that instant by themselves.
const V9: &str = r#"
ALTER TABLE consumers ADD COLUMN budget_exhausted_until BIGINT;
ALTER TABLE consumer_keys ADD COLUMN budget_exhausted_until BIGINT;
"#;

/// The migrator for `backend`, with the schema text embedded in the binary.
pub fn migrator(backend: Backend) -> Migrator {
    let blob = match backend {
        Backend::Sqlite => "BLOB",
        Backend::Postgres => "BYTEA",
    };
    let migrations = [
        (1, "initial schema", V1),
        (2, "admin tokens", V2),
        (3, "store epoch", V3),
        (4, "scope model entries and model source", V4),
        (5, "usage and spend", V5),
        (6, "audit event details", V6),
        (7, "consumer key rotation", V7),
        (8, "budgets and rate limits", V8),
        (9, "budget exhaustion", V9),
    ]
    .into_iter()
    .map(|(version, description, sql)| {
        Migration::new(
            version,
            Cow::Borrowed(description),
            MigrationType::Simple,
            Cow::Owned(sql.replace("{BLOB}", blob)),
            false,
        )
    })
    .collect();
    Migrator {
        migrations: Cow::Owned(migrations),
        ignore_missing: false,
        locking: true,
        no_tx: false,
    }
}
