//! Consumer keys: create (one value per key, never shared), read, list, update, enable and
//! disable, bind to and unbind from a consumer (within its quota), rotate (a new value, the
//! previous one authorizing for an overlap), delete (disabled and unbound first), and
//! recording last use. Depends on `domain` and `crypto`.

use ipnet::IpNet;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::audit::Audit;
use super::lifecycle::refuse_key_delete;
use super::limits::{spend_of, write_limits};
use super::lookup::{ensure_unique_name, find, find_ref};
use super::mutation::{Mutation, rename_and_describe, touch};
use super::rows::{
    CONSUMER_KEY_COLUMNS, SqlCode, consumer_key_base, decode, encode_allowlist, new_id, scope_mode,
};
use super::scopes::{read_scope, resolve_scope, update_scope, write_scope};
use super::secret_values::{resolved, value_in_use, value_in_use_error};
use super::usage::remember_deleted_name;
use super::{Actor, Page, PageRequest, Result, Store};
use crate::crypto::{self, KeyHash, Secret};
use crate::domain::input::{ConsumerKeyPatch, KeySource, NewConsumerKey, Rotation};
use crate::domain::{
    ConsumerKey, GenerationMethod, KeyStatus, Named, ResourceKind, RuleError, Scope, SecretRef,
    Selector, Timestamp, mask,
};

const KIND: ResourceKind = ResourceKind::ConsumerKey;

#[derive(Clone, Debug, Default)]
pub struct ConsumerKeyFilter {
    pub consumer: Option<String>,
    pub status: Option<KeyStatus>,
}

/// The result of creating a consumer key: the record and the one-time value.
#[derive(Debug)]
pub struct CreatedConsumerKey {
    pub key: ConsumerKey,
    pub value: Option<Secret>,
}

/// The result of rotating a consumer key: the record and, for an AUTO key, the new value
/// (shown once; a CUSTOM key's came from the operator).
#[derive(Debug)]
pub struct RotatedConsumerKey {
    pub key: ConsumerKey,
    pub value: Option<Secret>,
}

/// A rotation's new value: generated for an AUTO key, the request's for a CUSTOM key.
fn new_value(
    name: &str,
    method: GenerationMethod,
    requested: Option<Secret>,
) -> std::result::Result<Secret, RuleError> {
    match (method, requested) {
        (GenerationMethod::SecretRef, _) => Err(RuleError::FailedPrecondition(format!(
            "consumer key {name:?} is a SECRET_REF key: it rotates through its secret (publish the new value in the secret store, or point secret_ref at a new version with UpdateConsumerKey)"
        ))),
        (GenerationMethod::Auto, None) => Ok(crypto::generate_consumer_key()),
        (GenerationMethod::Auto, Some(_)) => Err(RuleError::invalid(
            "value",
            "must be empty for an AUTO key (keygate generates its new value)",
        )),
        (GenerationMethod::Custom, Some(v)) => Ok(v),
        (GenerationMethod::Custom, None) => Err(RuleError::invalid(
            "value",
            "is required to rotate a CUSTOM key (the new value)",
        )),
    }
}

/// How many keys a change adds to a consumer, which words its quota refusal.
pub(super) enum Adding {
    /// One key (create or bind).
    One,
    /// Many at once (an import).
    Many(usize),
}

/// A new key's stored values beside the request's own fields.
struct NewKeyRow<'a> {
    hash: KeyHash,
    masked: String,
    consumer: Option<&'a Named>,
    scope: &'a Scope,
    allowlist: &'a [IpNet],
    reference: Option<&'a SecretRef>,
}

impl Store {
    pub async fn create_consumer_key(
        &self,
        actor: &Actor,
        req: NewConsumerKey,
    ) -> Result<CreatedConsumerKey> {
        let allowlist = req.validate(&self.limits, Timestamp::now())?;
        let limits = req.limits.parse("limits").map_err(RuleError::Invalid)?;
        let (value, reference) = match &req.source {
            KeySource::Auto => (crypto::generate_consumer_key(), None),
            KeySource::Custom(v) => (v.clone(), None),
            KeySource::SecretRef(r, v) => (resolved(r, v)?, Some(r)),
        };
        let hash = self.keys.hasher.hash(value.expose().as_bytes());
        let mut m = self.begin(actor).await?;
        ensure_unique_name(&mut m.tx, KIND, &req.name, None).await?;
        if value_in_use(&mut m.tx, &hash, None).await? {
            // Never say which key holds the value: that would confirm a guessed key.
            return Err(match reference {
                None => RuleError::invalid(
                    "value",
                    "this value is already in use by another consumer key; choose another",
                ),
                Some(r) => value_in_use_error(r),
            }
            .into());
        }
        let consumer = match &req.consumer {
            Some(c) => Some(find_ref(&mut m.tx, ResourceKind::Consumer, c).await?),
            None => None,
        };
        if let Some(c) = &consumer {
            self.check_key_quota(&mut m.tx, c, Adding::One).await?;
        }
        let scope = resolve_scope(&mut m.tx, "scope", &req.scope).await?;
        let id = new_id();
        let row = NewKeyRow {
            hash,
            masked: mask(value.expose()),
            consumer: consumer.as_ref(),
            scope: &scope,
            allowlist: &allowlist,
            reference,
        };
        insert_key(&mut m, &id, &req, &row).await?;
        let mut fields = created_fields(&req, &row);
        if !limits.is_unlimited() {
            write_limits(&mut m, KIND, &id, &limits).await?;
            fields.push("limits");
        }
        // Read inside the transaction: once it commits, nothing may stand between the caller
        // and the only copy of a generated value.
        let key = consumer_key_by_id(&mut m.tx, &id).await?;
        let audit = Audit::new("CreateConsumerKey", KIND, &id, &req.name, &fields);
        self.commit(m, audit).await?;
        // Only a value keygate generated is shown: a CUSTOM value came from the operator and
        // a SECRET_REF value lives in their secret store.
        let shown = match req.source {
            KeySource::Auto => Some(value),
            _ => None,
        };
        Ok(CreatedConsumerKey { key, value: shown })
    }

    /// Refuses a change that would give `consumer` more keys than its quota allows.
    pub(super) async fn check_key_quota(
        &self,
        conn: &mut sqlx::AnyConnection,
        consumer: &Named,
        adding: Adding,
    ) -> Result<()> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM consumer_keys WHERE consumer_id = $1")
                .bind(&consumer.id)
                .fetch_one(&mut *conn)
                .await?;
        let (n, max, name) = (
            n as usize,
            self.limits.max_keys_per_consumer,
            &consumer.name,
        );
        let refusal = match adding {
            Adding::One if n >= max => {
                format!(
                    "consumer {name:?} already has {n} consumer keys; at most {max} are allowed"
                )
            }
            Adding::Many(k) if n + k > max => format!(
                "consumer {name:?} would hold {} consumer keys; at most {max} are allowed",
                n + k
            ),
            _ => return Ok(()),
        };
        Err(RuleError::ResourceExhausted(refusal).into())
    }

    pub async fn get_consumer_key(&self, sel: &Selector) -> Result<ConsumerKey> {
        let mut conn = self.pool.acquire().await?;
        let id = find(&mut conn, KIND, sel).await?.id;
        consumer_key_by_id(&mut conn, &id).await
    }

    pub async fn list_consumer_keys(
        &self,
        filter: &ConsumerKeyFilter,
        page: &PageRequest,
    ) -> Result<Page<ConsumerKey>> {
        let mut conn = self.pool.acquire().await?;
        let consumer_id = match &filter.consumer {
            Some(c) => find_ref(&mut conn, ResourceKind::Consumer, c).await?.id,
            None => String::new(),
        };
        let rows = sqlx::query(&format!(
            "SELECT {CONSUMER_KEY_COLUMNS} FROM consumer_keys k LEFT JOIN consumers c ON c.id = k.consumer_id \
             WHERE k.name > $1 AND ($2 = '' OR k.consumer_id = $2) AND ($3 = 0 OR k.status = $3) \
             ORDER BY k.name LIMIT $4"
        ))
        .bind(page.cursor())
        .bind(consumer_id)
        .bind(filter.status.map(|s| s.code()).unwrap_or(0))
        .bind(page.limit())
        .fetch_all(&mut *conn)
        .await?;
        let (rows, more) = page.split(rows);
        let mut items = Vec::with_capacity(rows.len());
        for row in &rows {
            items.push(consumer_key_from_row(&mut conn, row).await?);
        }
        Ok(Page::new(items, more, |k| k.name.clone()))
    }

    pub async fn update_consumer_key(
        &self,
        actor: &Actor,
        sel: &Selector,
        patch: ConsumerKeyPatch,
    ) -> Result<ConsumerKey> {
        let allowlist = patch.validate(&self.limits, Timestamp::now())?;
        let limits = patch
            .limits
            .as_ref()
            .map(|l| l.parse("consumer_key.limits").map_err(RuleError::Invalid))
            .transpose()?;
        let mut m = self.begin(actor).await?;
        let found = find(&mut m.tx, KIND, sel).await?;
        let id = found.id;
        let mut fields = Vec::new();
        let (name, description) = (patch.name.as_deref(), patch.description.as_deref());
        rename_and_describe(&mut m, KIND, &id, name, description, &mut fields).await?;
        if let Some(s) = &patch.scope {
            update_scope(&mut m, KIND, &id, "consumer_key.scope", s, &mut fields).await?;
        }
        if let Some(list) = &allowlist {
            sqlx::query("UPDATE consumer_keys SET ip_allowlist = $1 WHERE id = $2")
                .bind(encode_allowlist(list))
                .bind(&id)
                .execute(&mut *m.tx)
                .await?;
            fields.push("ip_allowlist");
        }
        if let Some(exp) = patch.expire_time {
            sqlx::query("UPDATE consumer_keys SET expire_time = $1 WHERE id = $2")
                .bind(exp.map(|t| t.0))
                .bind(&id)
                .execute(&mut *m.tx)
                .await?;
            fields.push("expire_time");
        }
        if let Some((r, value)) = &patch.secret_ref {
            self.point_consumer_key(&mut m, &id, r, value).await?;
            fields.push("secret_ref");
        }
        if let Some(l) = &limits {
            write_limits(&mut m, KIND, &id, l).await?;
            fields.push("limits");
        }
        touch(&mut m, KIND, &id).await?;
        let name = patch.name.clone().unwrap_or(found.name);
        let audit = Audit::new("UpdateConsumerKey", KIND, &id, &name, &fields);
        self.commit(m, audit).await?;
        self.get_consumer_key(&Selector::Id(id)).await
    }

    pub async fn set_consumer_key_status(
        &self,
        actor: &Actor,
        sel: &Selector,
        status: KeyStatus,
    ) -> Result<ConsumerKey> {
        let id = self.set_status(actor, KIND, sel, status).await?;
        self.get_consumer_key(&Selector::Id(id)).await
    }

    pub async fn bind_consumer_key(
        &self,
        actor: &Actor,
        key: &str,
        consumer: &str,
    ) -> Result<ConsumerKey> {
        let mut m = self.begin(actor).await?;
        let key = find_ref(&mut m.tx, KIND, key).await?;
        let consumer = find_ref(&mut m.tx, ResourceKind::Consumer, consumer).await?;
        let bound: Option<String> = sqlx::query_scalar(
            "SELECT c.name FROM consumer_keys k JOIN consumers c ON c.id = k.consumer_id WHERE k.id = $1",
        )
        .bind(&key.id)
        .fetch_optional(&mut *m.tx)
        .await?;
        if let Some(current) = bound {
            return Err(RuleError::FailedPrecondition(format!(
                "consumer key {:?} is already bound to consumer {current:?}: unbind it first",
                key.name
            ))
            .into());
        }
        self.check_key_quota(&mut m.tx, &consumer, Adding::One)
            .await?;
        set_consumer(&mut m, &key.id, Some(&consumer.id)).await?;
        self.commit_binding(m, "BindConsumerKey", key).await
    }

    pub async fn unbind_consumer_key(&self, actor: &Actor, key: &str) -> Result<ConsumerKey> {
        let mut m = self.begin(actor).await?;
        let key = find_ref(&mut m.tx, KIND, key).await?;
        let bound: Option<Option<String>> =
            sqlx::query_scalar("SELECT consumer_id FROM consumer_keys WHERE id = $1")
                .bind(&key.id)
                .fetch_optional(&mut *m.tx)
                .await?;
        let Some(Some(_)) = bound else {
            return Err(RuleError::FailedPrecondition(format!(
                "consumer key {:?} is not bound to a consumer",
                key.name
            ))
            .into());
        };
        set_consumer(&mut m, &key.id, None).await?;
        self.commit_binding(m, "UnbindConsumerKey", key).await
    }

    async fn commit_binding(&self, m: Mutation, action: &str, key: Named) -> Result<ConsumerKey> {
        let audit = Audit::new(action, KIND, &key.id, &key.name, &["consumer"]);
        self.commit(m, audit).await?;
        self.get_consumer_key(&Selector::Id(key.id)).await
    }

    pub async fn delete_consumer_key(&self, actor: &Actor, sel: &Selector) -> Result<()> {
        let mut m = self.begin(actor).await?;
        let key = find(&mut m.tx, KIND, sel).await?;
        let row = sqlx::query(
            "SELECT k.status, k.key_hash, k.previous_hash, c.name AS consumer_name FROM consumer_keys k LEFT JOIN consumers c ON c.id = k.consumer_id WHERE k.id = $1",
        )
        .bind(&key.id)
        .fetch_one(&mut *m.tx)
        .await?;
        let consumer: Option<String> = row.try_get("consumer_name")?;
        let bound_to: Vec<_> = consumer
            .into_iter()
            .map(|c| (ResourceKind::Consumer, c))
            .collect();
        let status = row.try_get("status")?;
        refuse_key_delete(KIND, &key.name, status, &bound_to, "unbind the key first")?;
        write_scope(&mut m.tx, KIND, &key.id, &Scope::Unset).await?;
        sqlx::query("DELETE FROM consumer_keys WHERE id = $1")
            .bind(&key.id)
            .execute(&mut *m.tx)
            .await?;
        remember_deleted_name(&mut m.tx, KIND, &key.id, &key.name, m.now).await?;
        for column in ["key_hash", "previous_hash"] {
            if let Some(h) = row.try_get::<Option<Vec<u8>>, _>(column)? {
                m.removed_hashes.push(h);
            }
        }
        let audit = Audit::new("DeleteConsumerKey", KIND, &key.id, &key.name, &[]);
        self.commit(m, audit).await?;
        Ok(())
    }

    /// Gives a key a new value (SPEC §8.4), keeping everything else: an AUTO key's is
    /// generated, a CUSTOM key's is `rotation.value`; a SECRET_REF key rotates through its
    /// secret and is refused. The value it had becomes its previous value, which authorizes
    /// until the commit time plus `rotation.overlap_us` (none with no overlap); a previous
    /// value from an earlier rotation stops at once. The new value may be no key's value or
    /// previous value, this key's included.
    pub async fn rotate_consumer_key(
        &self,
        actor: &Actor,
        sel: &Selector,
        rotation: Rotation,
    ) -> Result<RotatedConsumerKey> {
        rotation.validate()?;
        let mut m = self.begin(actor).await?;
        let key = find(&mut m.tx, KIND, sel).await?;
        let row = sqlx::query(
            "SELECT generation_method, key_hash, masked_value, previous_hash FROM consumer_keys WHERE id = $1",
        )
        .bind(&key.id)
        .fetch_one(&mut *m.tx)
        .await?;
        let method = decode(row.try_get("generation_method")?, "generation method")?;
        let value = new_value(&key.name, method, rotation.value)?;
        let hash = self.keys.hasher.hash(value.expose().as_bytes());
        let current: Option<Vec<u8>> = row.try_get("key_hash")?;
        let previous: Option<Vec<u8>> = row.try_get("previous_hash")?;
        if [&current, &previous]
            .iter()
            .any(|h| h.as_deref() == Some(&hash[..]))
        {
            return Err(RuleError::invalid(
                "value",
                "must differ from the key's current and previous values",
            )
            .into());
        }
        if value_in_use(&mut m.tx, &hash, Some(&key.id)).await? {
            // Never say which key holds the value: that would confirm a guessed key.
            return Err(RuleError::AlreadyInUse(
                "value is already in use by another consumer key (as its value or its previous value); choose another"
                    .into(),
            )
            .into());
        }
        // The old previous value stops now; the current one becomes the previous value for
        // the overlap, or stops now too.
        m.removed_hashes.extend(previous.iter().cloned());
        let kept = match current {
            Some(h) if rotation.overlap_us > 0 => Some((
                h,
                row.try_get::<String, _>("masked_value")?,
                Timestamp(m.now.0.saturating_add(rotation.overlap_us)),
            )),
            Some(h) => {
                m.removed_hashes.push(h);
                None
            }
            None => None,
        };
        sqlx::query(
            "UPDATE consumer_keys SET key_hash = $1, masked_value = $2, previous_hash = $3, \
             previous_masked_value = $4, previous_expire_time = $5 WHERE id = $6",
        )
        .bind(hash.to_vec())
        .bind(mask(value.expose()))
        .bind(kept.as_ref().map(|k| k.0.clone()))
        .bind(kept.as_ref().map(|k| k.1.clone()))
        .bind(kept.as_ref().map(|k| k.2.0))
        .bind(&key.id)
        .execute(&mut *m.tx)
        .await?;
        touch(&mut m, KIND, &key.id).await?;
        let mut fields = vec!["value"];
        if kept.is_some() || previous.is_some() {
            fields.push("previous_value_expire_time");
        }
        // Read inside the transaction, like a create: nothing may stand between the caller
        // and the only copy of a generated value.
        let rotated = consumer_key_by_id(&mut m.tx, &key.id).await?;
        let audit = Audit::new("RotateConsumerKey", KIND, &key.id, &key.name, &fields);
        self.commit(m, audit).await?;
        Ok(RotatedConsumerKey {
            key: rotated,
            value: (method == GenerationMethod::Auto).then_some(value),
        })
    }

    /// Records consumer keys' last use (never moves a time backwards). Not a change of
    /// configuration: no revision, no audit row, no snapshot update.
    pub async fn record_last_used(&self, batch: &[(uuid::Uuid, Timestamp)]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for (id, t) in batch {
            sqlx::query(
                "UPDATE consumer_keys SET last_used_time = $1 WHERE id = $2 AND (last_used_time IS NULL OR last_used_time < $1)",
            )
            .bind(t.0)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

async fn insert_key(
    m: &mut Mutation,
    id: &str,
    req: &NewConsumerKey,
    row: &NewKeyRow<'_>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO consumer_keys (id, name, description, status, generation_method, key_hash, masked_value, \
         consumer_id, scope_mode, ip_allowlist, expire_time, create_time, update_time, \
         secret_provider, secret_name, secret_version) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13, $14, $15)",
    )
    .bind(id)
    .bind(&req.name)
    .bind(&req.description)
    .bind(KeyStatus::Enabled.code())
    .bind(req.source.method().code())
    .bind(row.hash.to_vec())
    .bind(&row.masked)
    .bind(row.consumer.map(|c| c.id.clone()))
    .bind(scope_mode(row.scope))
    .bind(encode_allowlist(row.allowlist))
    .bind(req.expire_time.map(|t| t.0))
    .bind(m.now.0)
    .bind(row.reference.map(|r| r.provider.clone()))
    .bind(row.reference.map(|r| r.name.clone()))
    .bind(row.reference.map(|r| r.version.clone()))
    .execute(&mut *m.tx)
    .await?;
    write_scope(&mut m.tx, KIND, id, row.scope).await
}

/// The audit's changed fields of a created key: its name, description and value, and
/// whichever optional fields it was given.
fn created_fields(req: &NewConsumerKey, row: &NewKeyRow<'_>) -> Vec<&'static str> {
    let value = if row.reference.is_some() {
        "secret_ref"
    } else {
        "value"
    };
    let mut fields = vec!["name", "description", "generation_method", value];
    let optional = [
        ("consumer", row.consumer.is_some()),
        ("scope", *row.scope != Scope::Unset),
        ("ip_allowlist", !row.allowlist.is_empty()),
        ("expire_time", req.expire_time.is_some()),
    ];
    fields.extend(optional.iter().filter(|(_, set)| *set).map(|(f, _)| *f));
    fields
}

/// Binds a key to a consumer (`None`: unbinds it).
async fn set_consumer(m: &mut Mutation, key_id: &str, consumer_id: Option<&str>) -> Result<()> {
    sqlx::query("UPDATE consumer_keys SET consumer_id = $1, update_time = $2 WHERE id = $3")
        .bind(consumer_id)
        .bind(m.now.0)
        .bind(key_id)
        .execute(&mut *m.tx)
        .await?;
    Ok(())
}

/// A consumer key as the admin API shows it.
pub(super) async fn consumer_key_by_id(
    conn: &mut sqlx::AnyConnection,
    id: &str,
) -> Result<ConsumerKey> {
    let row = sqlx::query(&format!(
        "SELECT {CONSUMER_KEY_COLUMNS} FROM consumer_keys k LEFT JOIN consumers c ON c.id = k.consumer_id WHERE k.id = $1"
    ))
    .bind(id)
    .fetch_one(&mut *conn)
    .await?;
    consumer_key_from_row(conn, &row).await
}

async fn consumer_key_from_row(
    conn: &mut sqlx::AnyConnection,
    row: &AnyRow,
) -> Result<ConsumerKey> {
    let id: String = row.try_get("id")?;
    let scope = read_scope(conn, &id, row.try_get("scope_mode")?).await?;
    let mut key = consumer_key_base(row, scope)?;
    key.spend = spend_of(conn, KIND, &id, &key.limits, Timestamp::now()).await?;
    Ok(key)
}
