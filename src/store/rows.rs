//! How resources sit in SQL rows: the integer codes of domain enums, table names, column
//! lists, the text encodings of lists, and one decoder per resource from a row to its domain
//! value. Depends on `domain` and `crypto`.

use ipnet::IpNet;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::contents::KeyRow;
use super::limits::{exhausted_of, limits_of};
use super::{Result, StoreError};
use crate::crypto::KeyHash;
use crate::domain::usage::{ModelPrice, PricePerMtok};
use crate::domain::validate::ip_entry_display;
use crate::domain::{
    AuditEvent, Consumer, ConsumerKey, GenerationMethod, KeyStatus, ModelGrant, ModelKey,
    ModelService, ModelSource, Named, PreviousValue, ResourceKind, Scope, SecretRef, Timestamp,
};

/// A domain enum stored as an integer. The codes are part of the schema: never renumber.
pub(super) trait SqlCode: Sized {
    fn code(self) -> i64;
    fn from_code(code: i64) -> Option<Self>;
}

impl SqlCode for ResourceKind {
    fn code(self) -> i64 {
        match self {
            ResourceKind::Consumer => 1,
            ResourceKind::ConsumerKey => 2,
            ResourceKind::ModelService => 3,
            ResourceKind::ModelKey => 4,
            ResourceKind::AdminToken => 5,
            ResourceKind::Store => 6,
        }
    }

    fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            1 => ResourceKind::Consumer,
            2 => ResourceKind::ConsumerKey,
            3 => ResourceKind::ModelService,
            4 => ResourceKind::ModelKey,
            5 => ResourceKind::AdminToken,
            6 => ResourceKind::Store,
            _ => return None,
        })
    }
}

impl SqlCode for KeyStatus {
    fn code(self) -> i64 {
        match self {
            KeyStatus::Enabled => 1,
            KeyStatus::Disabled => 2,
        }
    }

    fn from_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(KeyStatus::Enabled),
            2 => Some(KeyStatus::Disabled),
            _ => None,
        }
    }
}

impl SqlCode for GenerationMethod {
    fn code(self) -> i64 {
        match self {
            GenerationMethod::Auto => 1,
            GenerationMethod::Custom => 2,
            GenerationMethod::SecretRef => 3,
        }
    }

    fn from_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(GenerationMethod::Auto),
            2 => Some(GenerationMethod::Custom),
            3 => Some(GenerationMethod::SecretRef),
            _ => None,
        }
    }
}

/// The domain's own codes (they are also the wire's).
impl SqlCode for ModelSource {
    fn code(self) -> i64 {
        ModelSource::code(self)
    }

    fn from_code(code: i64) -> Option<Self> {
        ModelSource::from_code(code)
    }
}

impl SqlCode for crate::domain::Role {
    fn code(self) -> i64 {
        use crate::domain::Role;
        match self {
            Role::Viewer => 1,
            Role::Operator => 2,
            Role::Admin => 3,
        }
    }

    fn from_code(code: i64) -> Option<Self> {
        use crate::domain::Role;
        Some(match code {
            1 => Role::Viewer,
            2 => Role::Operator,
            3 => Role::Admin,
            _ => return None,
        })
    }
}

/// A stored code read back; `what` names the column in the corruption error.
pub(super) fn decode<T: SqlCode>(code: i64, what: &str) -> Result<T> {
    T::from_code(code).ok_or_else(|| StoreError::Corrupt(what.into()))
}

/// `scope_mode`: 0 unset, 1 all, 2 a list: the services in `scope_entries` and the model
/// entries in `scope_models` (either may be empty).
pub(super) fn scope_mode(scope: &Scope) -> i64 {
    match scope {
        Scope::Unset => 0,
        Scope::All => 1,
        Scope::List { .. } => 2,
    }
}

/// The scope a `scope_mode` stands for on its own; `None` when it is a list (the caller
/// reads it from `scope_entries` and `scope_models`).
pub(super) fn fixed_scope(mode: i64) -> Option<Scope> {
    match mode {
        0 => Some(Scope::Unset),
        1 => Some(Scope::All),
        _ => None,
    }
}

pub(super) fn table_of(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Consumer => "consumers",
        ResourceKind::ConsumerKey => "consumer_keys",
        ResourceKind::ModelService => "model_services",
        ResourceKind::ModelKey => "model_keys",
        ResourceKind::AdminToken => "admin_tokens",
        ResourceKind::Store => "store_meta",
    }
}

/// `n` bind placeholders from `$from` on, for an `IN (…)` list: `"$3, $4, $5"`.
pub(super) fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

pub(super) const CONSUMER_COLUMNS: &str = "id, name, description, scope_mode, create_time, \
     update_time, budget_micro_usd, budget_tokens, budget_period, requests_per_minute, \
     tokens_per_minute, budget_exhausted_until";

pub(super) const SERVICE_COLUMNS: &str = "id, name, description, provider, auth_header, \
     auth_value_template, models, model_source, pricing, create_time, update_time";

pub(super) const MODEL_KEY_COLUMNS: &str = "id, name, description, status, generation_method, \
     masked_value, secret_provider, secret_name, secret_version, create_time, update_time";

/// Selected from `consumer_keys k LEFT JOIN consumers c ON c.id = k.consumer_id`.
pub(super) const CONSUMER_KEY_COLUMNS: &str = "k.id, k.name, k.description, k.status, \
     k.generation_method, k.masked_value, k.secret_provider, k.secret_name, k.secret_version, \
     k.consumer_id, c.name AS consumer_name, k.scope_mode, k.ip_allowlist, k.expire_time, \
     k.create_time, k.update_time, k.last_used_time, k.previous_masked_value, \
     k.previous_expire_time, k.budget_micro_usd, k.budget_tokens, k.budget_period, \
     k.requests_per_minute, k.tokens_per_minute, k.budget_exhausted_until";

/// What the data plane needs of a consumer key, selected from `consumer_keys k`.
pub(super) const KEY_ROW_COLUMNS: &str = "k.id, k.name, k.status, k.key_hash, k.consumer_id, \
     k.scope_mode, k.ip_allowlist, k.expire_time, k.previous_hash, k.previous_expire_time, \
     k.budget_micro_usd, k.budget_tokens, k.budget_period, k.requests_per_minute, \
     k.tokens_per_minute, k.budget_exhausted_until";

/// The JSON text of a model service's `models`.
pub(super) fn encode_list(items: &[String]) -> String {
    serde_json::to_string(items).expect("a list of strings serialises")
}

/// The JSON text of a model service's `pricing`: integer micro-USD per million tokens
/// (`cached_input` null when unset), never a decimal or a float.
pub(super) fn encode_pricing(prices: &[ModelPrice]) -> String {
    let list: Vec<serde_json::Value> = prices
        .iter()
        .map(|p| {
            serde_json::json!({
                "model": p.model,
                "input": p.input.micro_usd(),
                "output": p.output.micro_usd(),
                "cached_input": p.cached_input.map(PricePerMtok::micro_usd),
            })
        })
        .collect();
    serde_json::Value::Array(list).to_string()
}

pub(super) fn decode_pricing(s: &str) -> Result<Vec<ModelPrice>> {
    let corrupt = || StoreError::Corrupt(format!("pricing list: {s:?}"));
    let value: serde_json::Value = serde_json::from_str(s).map_err(|_| corrupt())?;
    let price = |v: &serde_json::Value| {
        v.as_u64()
            .and_then(PricePerMtok::from_micro_usd)
            .ok_or_else(corrupt)
    };
    value
        .as_array()
        .ok_or_else(corrupt)?
        .iter()
        .map(|p| {
            Ok(ModelPrice {
                model: p["model"].as_str().ok_or_else(corrupt)?.to_string(),
                input: price(&p["input"])?,
                output: price(&p["output"])?,
                cached_input: match &p["cached_input"] {
                    serde_json::Value::Null => None,
                    v => Some(price(v)?),
                },
            })
        })
        .collect()
}

fn decode_list(s: &str) -> Result<Vec<String>> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("models list: {e}")))
}

/// An allowlist as stored: canonical entries joined by commas.
pub(super) fn encode_allowlist(list: &[IpNet]) -> String {
    list.iter()
        .map(ip_entry_display)
        .collect::<Vec<_>>()
        .join(",")
}

/// A comma-joined list (an allowlist, an audit row's fields) read back.
fn split_commas(text: &str) -> Vec<String> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

pub(super) fn named(r: &AnyRow) -> Result<Named> {
    Ok(Named {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
    })
}

/// A scope's model entry: the service (`id`, `name`) and its `pattern`.
pub(super) fn model_grant(r: &AnyRow) -> Result<ModelGrant> {
    Ok(ModelGrant {
        service: named(r)?,
        pattern: r.try_get("pattern")?,
    })
}

fn key_hash(r: &AnyRow) -> Result<Option<KeyHash>> {
    hash_column(r, "key_hash")
}

fn hash_column(r: &AnyRow, column: &str) -> Result<Option<KeyHash>> {
    Ok(r.try_get::<Option<Vec<u8>>, _>(column)?
        .and_then(|h| <KeyHash>::try_from(h.as_slice()).ok()))
}

pub(super) fn secret_ref_of(r: &AnyRow) -> Result<Option<SecretRef>> {
    let provider: Option<String> = r.try_get("secret_provider")?;
    Ok(match provider {
        Some(provider) => Some(SecretRef {
            provider,
            name: r
                .try_get::<Option<String>, _>("secret_name")?
                .unwrap_or_default(),
            version: r
                .try_get::<Option<String>, _>("secret_version")?
                .unwrap_or_default(),
        }),
        None => None,
    })
}

fn status_of(r: &AnyRow) -> Result<KeyStatus> {
    decode(r.try_get("status")?, "key status")
}

fn method_of(r: &AnyRow) -> Result<GenerationMethod> {
    decode(r.try_get("generation_method")?, "generation method")
}

/// A consumer's own fields (`CONSUMER_COLUMNS`); `consumer_keys` is left empty.
pub(super) fn consumer_base(r: &AnyRow, scope: Scope) -> Result<Consumer> {
    Ok(Consumer {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        scope,
        consumer_keys: Vec::new(),
        create_time: Timestamp(r.try_get("create_time")?),
        update_time: Timestamp(r.try_get("update_time")?),
        limits: limits_of(r)?,
        spend: None,
        budget_exhausted_until: exhausted_of(r)?,
    })
}

/// A model service (`SERVICE_COLUMNS`); `model_keys` is left empty.
pub(super) fn service_base(r: &AnyRow) -> Result<ModelService> {
    Ok(ModelService {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        provider: r.try_get("provider")?,
        auth_header: r.try_get("auth_header")?,
        auth_value_template: r.try_get("auth_value_template")?,
        models: decode_list(&r.try_get::<String, _>("models")?)?,
        model_source: decode(r.try_get("model_source")?, "model source")?,
        pricing: decode_pricing(&r.try_get::<String, _>("pricing")?)?,
        model_keys: Vec::new(),
        create_time: Timestamp(r.try_get("create_time")?),
        update_time: Timestamp(r.try_get("update_time")?),
    })
}

/// A model key (`MODEL_KEY_COLUMNS`); `model_services` is left empty.
pub(super) fn model_key_base(r: &AnyRow) -> Result<ModelKey> {
    Ok(ModelKey {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        status: status_of(r)?,
        generation_method: method_of(r)?,
        masked_value: r.try_get("masked_value")?,
        secret_ref: secret_ref_of(r)?,
        model_services: Vec::new(),
        create_time: Timestamp(r.try_get("create_time")?),
        update_time: Timestamp(r.try_get("update_time")?),
    })
}

/// A consumer key (`CONSUMER_KEY_COLUMNS`) with the given scope.
pub(super) fn consumer_key_base(r: &AnyRow, scope: Scope) -> Result<ConsumerKey> {
    let consumer_id: Option<String> = r.try_get("consumer_id")?;
    let consumer_name: Option<String> = r.try_get("consumer_name")?;
    Ok(ConsumerKey {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        status: status_of(r)?,
        generation_method: method_of(r)?,
        masked_value: r.try_get("masked_value")?,
        secret_ref: secret_ref_of(r)?,
        consumer: consumer_id
            .zip(consumer_name)
            .map(|(id, name)| Named { id, name }),
        scope,
        ip_allowlist: split_commas(&r.try_get::<String, _>("ip_allowlist")?),
        expire_time: r.try_get::<Option<i64>, _>("expire_time")?.map(Timestamp),
        create_time: Timestamp(r.try_get("create_time")?),
        update_time: Timestamp(r.try_get("update_time")?),
        last_used_time: r
            .try_get::<Option<i64>, _>("last_used_time")?
            .map(Timestamp),
        previous: match (
            r.try_get::<Option<String>, _>("previous_masked_value")?,
            r.try_get::<Option<i64>, _>("previous_expire_time")?,
        ) {
            (Some(masked_value), Some(t)) => Some(PreviousValue {
                masked_value,
                expire_time: Timestamp(t),
            }),
            _ => None,
        },
        limits: limits_of(r)?,
        spend: None,
    })
}

/// A `KeyRow` (`KEY_ROW_COLUMNS`) with the given scope; `None` for a key with no value yet.
pub(super) fn key_row(r: &AnyRow, scope: Scope) -> Result<Option<KeyRow>> {
    let Some(hash) = key_hash(r)? else {
        return Ok(None);
    };
    Ok(Some(KeyRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        status: status_of(r)?,
        hash,
        consumer_id: r.try_get("consumer_id")?,
        scope,
        expire_time: r.try_get::<Option<i64>, _>("expire_time")?.map(Timestamp),
        ip_allowlist: split_commas(&r.try_get::<String, _>("ip_allowlist")?),
        previous: hash_column(r, "previous_hash")?.zip(
            r.try_get::<Option<i64>, _>("previous_expire_time")?
                .map(Timestamp),
        ),
        limits: limits_of(r)?,
        budget_exhausted_until: exhausted_of(r)?,
    }))
}

/// A SECRET_REF key's stored HMAC, if it has one (`NULL AS key_hash` for model keys).
pub(super) fn stored_key_hash(r: &AnyRow) -> Option<KeyHash> {
    key_hash(r).ok().flatten()
}

pub(super) fn audit_event(r: &AnyRow) -> Result<AuditEvent> {
    Ok(AuditEvent {
        revision: r.try_get("revision")?,
        time: Timestamp(r.try_get("time")?),
        actor: r.try_get("actor")?,
        action: r.try_get("action")?,
        kind: decode(r.try_get("kind")?, "audit kind")?,
        resource_id: r.try_get("resource_id")?,
        resource_name: r.try_get("resource_name")?,
        changed_fields: split_commas(&r.try_get::<String, _>("changed_fields")?),
        details: r.try_get("details")?,
    })
}
