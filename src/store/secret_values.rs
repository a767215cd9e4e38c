//! Key values that live in an external secret store (SECRET_REF keys): re-pointing a key at
//! another reference, a consumer key's HMAC following its value (never two keys with one
//! value), and the background refresh's reads and writes. The store never resolves a
//! reference itself: callers pass the value they resolved. Depends on `domain` and `crypto`.

use sqlx::Row;

use super::audit::Audit;
use super::mutation::{Mutation, touch};
use super::rows::{SqlCode, secret_ref_of, stored_key_hash, table_of};
use super::{Actor, Result, Store, StoreError};
use crate::crypto::{KeyHash, Secret};
use crate::domain::{GenerationMethod, ResourceKind, RuleError, SecretRef, mask};

/// The audit actor of changes the background secret refresh makes.
pub const SECRET_REFRESH_ACTOR: &str = "keygate:secret-refresh";

/// What `Store::secret_value_changed` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refreshed {
    /// The key now has the new value (a new revision).
    Applied,
    /// Nothing to do: the key is gone, re-pointed, already holds the value, or was changed
    /// by someone else since the caller read it.
    Skipped,
    /// Another consumer key holds the value: this key's old HMAC was dropped and it
    /// authorizes nothing until its secret changes.
    Collision,
}

/// A SECRET_REF key as the background refresh sees it.
#[derive(Clone, Debug)]
pub struct SecretKey {
    pub kind: ResourceKind,
    pub id: String,
    pub name: String,
    pub reference: SecretRef,
    /// A consumer key's stored HMAC (of the value last resolved).
    pub key_hash: Option<KeyHash>,
}

/// What `Store::set_consumer_key_value` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ValueSet {
    Unchanged,
    Set,
    /// Another consumer key holds the value: nothing written.
    InUse,
}

/// What a refresh of one key comes to: commit the change and answer, or answer at once
/// (nothing written).
enum Step {
    Commit(Refreshed),
    Answer(Refreshed),
}

/// The value of a SECRET_REF source; the caller must have resolved it first.
pub(super) fn resolved(r: &SecretRef, v: &Option<Secret>) -> Result<Secret> {
    v.clone().ok_or_else(|| {
        RuleError::FailedPrecondition(format!(
            "secret_ref ({r}) was not resolved before the change"
        ))
        .into()
    })
}

/// A SECRET_REF consumer key whose secret holds another consumer key's value.
pub(super) fn value_in_use_error(r: &SecretRef) -> RuleError {
    RuleError::FailedPrecondition(format!(
        "secret_ref ({r}) resolves to a value already in use by another consumer key"
    ))
}

/// Refuses a reference change on a key whose value is not a SECRET_REF: every other key's
/// value is fixed for life.
async fn require_secret_ref(
    conn: &mut sqlx::AnyConnection,
    kind: ResourceKind,
    id: &str,
) -> Result<()> {
    let method: i64 = sqlx::query_scalar(&format!(
        "SELECT generation_method FROM {} WHERE id = $1",
        table_of(kind)
    ))
    .bind(id)
    .fetch_one(&mut *conn)
    .await?;
    if method != GenerationMethod::SecretRef.code() {
        let field = match kind {
            ResourceKind::ModelKey => "model_key.secret_ref",
            _ => "consumer_key.secret_ref",
        };
        return Err(RuleError::invalid(
            field,
            "only a SECRET_REF key has a reference to change (another consumer key rotates with RotateConsumerKey; another model key's value is never editable: create a new key)",
        )
        .into());
    }
    Ok(())
}

/// Stores a key's new reference (its value, already applied, came from it).
async fn write_reference(
    m: &mut Mutation,
    kind: ResourceKind,
    id: &str,
    r: &SecretRef,
) -> Result<()> {
    sqlx::query(&format!(
        "UPDATE {} SET secret_provider = $1, secret_name = $2, secret_version = $3 WHERE id = $4",
        table_of(kind)
    ))
    .bind(&r.provider)
    .bind(&r.name)
    .bind(&r.version)
    .bind(id)
    .execute(&mut *m.tx)
    .await?;
    Ok(())
}

/// Points a SECRET_REF model key at `r` (whose value is `value`): only the mask follows,
/// as a SECRET_REF key never stores its value.
pub(super) async fn point_model_key(
    m: &mut Mutation,
    id: &str,
    r: &SecretRef,
    value: &Secret,
) -> Result<()> {
    require_secret_ref(&mut m.tx, ResourceKind::ModelKey, id).await?;
    write_reference(m, ResourceKind::ModelKey, id, r).await?;
    set_model_key_mask(m, id, value).await
}

async fn set_model_key_mask(m: &mut Mutation, id: &str, value: &Secret) -> Result<()> {
    sqlx::query("UPDATE model_keys SET masked_value = $1 WHERE id = $2")
        .bind(mask(value.expose()))
        .bind(id)
        .execute(&mut *m.tx)
        .await?;
    Ok(())
}

/// The stored HMAC of a consumer key (none: it has no value).
async fn stored_hash(conn: &mut sqlx::AnyConnection, id: &str) -> Result<Option<Vec<u8>>> {
    Ok(
        sqlx::query_scalar("SELECT key_hash FROM consumer_keys WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *conn)
            .await?,
    )
}

/// Whether another consumer key (any but `except`) holds the value hashing to `hash`, as its
/// value or as the previous value a rotation left it (SPEC §8.4; even one that no longer
/// authorizes: a recorded previous value is never given to another key).
pub(super) async fn value_in_use(
    conn: &mut sqlx::AnyConnection,
    hash: &KeyHash,
    except: Option<&str>,
) -> Result<bool> {
    let found: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM consumer_keys WHERE (key_hash = $1 OR previous_hash = $1) AND id <> $2",
    )
    .bind(hash.to_vec())
    .bind(except.unwrap_or(""))
    .fetch_optional(&mut *conn)
    .await?;
    Ok(found.is_some())
}

impl Store {
    /// Points a SECRET_REF consumer key at `r` (whose value is `value`): the key's HMAC and
    /// mask follow, and the old HMAC is recorded so data planes drop it.
    pub(super) async fn point_consumer_key(
        &self,
        m: &mut Mutation,
        id: &str,
        r: &SecretRef,
        value: &Secret,
    ) -> Result<()> {
        require_secret_ref(&mut m.tx, ResourceKind::ConsumerKey, id).await?;
        let old = stored_hash(&mut m.tx, id).await?;
        if self.set_consumer_key_value(m, id, old, value).await? == ValueSet::InUse {
            return Err(value_in_use_error(r).into());
        }
        write_reference(m, ResourceKind::ConsumerKey, id, r).await
    }

    /// Gives a consumer key (whose stored HMAC is `old`) the HMAC and mask of `value`.
    async fn set_consumer_key_value(
        &self,
        m: &mut Mutation,
        id: &str,
        old: Option<Vec<u8>>,
        value: &Secret,
    ) -> Result<ValueSet> {
        let hash = self.keys.hasher.hash(value.expose().as_bytes());
        if old.as_deref() == Some(&hash[..]) {
            return Ok(ValueSet::Unchanged);
        }
        if value_in_use(&mut m.tx, &hash, Some(id)).await? {
            return Ok(ValueSet::InUse);
        }
        sqlx::query("UPDATE consumer_keys SET key_hash = $1, masked_value = $2 WHERE id = $3")
            .bind(hash.to_vec())
            .bind(mask(value.expose()))
            .bind(id)
            .execute(&mut *m.tx)
            .await?;
        if let Some(h) = old {
            m.removed_hashes.push(h);
        }
        Ok(ValueSet::Set)
    }

    /// Every SECRET_REF key with its reference (what the background refresh reads).
    pub async fn secret_keys(&self) -> Result<Vec<SecretKey>> {
        let mut out = Vec::new();
        for kind in [ResourceKind::ConsumerKey, ResourceKind::ModelKey] {
            let rows = sqlx::query(&format!(
                "SELECT id, name, secret_provider, secret_name, secret_version, {} FROM {} \
                 WHERE generation_method = $1 AND secret_provider IS NOT NULL",
                if kind == ResourceKind::ConsumerKey {
                    "key_hash"
                } else {
                    "NULL AS key_hash"
                },
                table_of(kind)
            ))
            .bind(GenerationMethod::SecretRef.code())
            .fetch_all(&self.pool)
            .await?;
            for r in rows {
                out.push(SecretKey {
                    kind,
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    reference: secret_ref_of(&r)?
                        .ok_or_else(|| StoreError::Corrupt("secret reference".into()))?,
                    key_hash: stored_key_hash(&r),
                });
            }
        }
        Ok(out)
    }

    /// The secret behind a SECRET_REF key changed (a background refresh saw a new value):
    /// a system change, audited and distributed like any other, so every replica and data
    /// plane takes the new value. Nothing is written when the key no longer uses
    /// `reference` or (consumer keys) the value is the one already stored. True when a change
    /// was committed.
    ///
    /// `expected_hash` (consumer keys): the HMAC the caller saw stored when it read the
    /// secret; if another change (an admin update, another replica) has replaced it since,
    /// nothing is written. A value another consumer key already holds is a collision: this
    /// key's HMAC is cleared (the old value must stop authorizing; the key authorizes nothing
    /// until its secret changes again) and `Collision` is answered.
    pub async fn secret_value_changed(
        &self,
        kind: ResourceKind,
        id: &str,
        reference: &SecretRef,
        value: &Secret,
        expected_hash: Option<KeyHash>,
    ) -> Result<Refreshed> {
        let actor = Actor(SECRET_REFRESH_ACTOR.to_string());
        let mut m = self.begin(&actor).await?;
        let row = sqlx::query(&format!(
            "SELECT name, secret_provider, secret_name, secret_version FROM {} WHERE id = $1",
            table_of(kind)
        ))
        .bind(id)
        .fetch_optional(&mut *m.tx)
        .await?;
        let Some(row) = row else {
            return Ok(Refreshed::Skipped);
        };
        if secret_ref_of(&row)?.as_ref() != Some(reference) {
            return Ok(Refreshed::Skipped); // re-pointed meanwhile: that change brought its own value
        }
        let name: String = row.try_get("name")?;
        let outcome = match kind {
            ResourceKind::ConsumerKey => {
                match self
                    .refresh_consumer_key(&mut m, id, value, expected_hash)
                    .await?
                {
                    Step::Commit(outcome) => outcome,
                    Step::Answer(outcome) => return Ok(outcome),
                }
            }
            ResourceKind::ModelKey => {
                set_model_key_mask(&mut m, id, value).await?;
                Refreshed::Applied
            }
            _ => return Ok(Refreshed::Skipped),
        };
        touch(&mut m, kind, id).await?;
        self.commit(m, Audit::new("RefreshSecret", kind, id, &name, &["value"]))
            .await?;
        Ok(outcome)
    }

    /// A refreshed value for a consumer key: its HMAC follows, unless the key changed since
    /// the caller read it or (a collision) another key holds the value, which clears it.
    async fn refresh_consumer_key(
        &self,
        m: &mut Mutation,
        id: &str,
        value: &Secret,
        expected_hash: Option<KeyHash>,
    ) -> Result<Step> {
        let stored = stored_hash(&mut m.tx, id).await?;
        if stored.as_deref() != expected_hash.as_ref().map(|h| &h[..]) {
            return Ok(Step::Answer(Refreshed::Skipped));
        }
        Ok(
            match self
                .set_consumer_key_value(m, id, stored.clone(), value)
                .await?
            {
                ValueSet::Set => Step::Commit(Refreshed::Applied),
                ValueSet::Unchanged => Step::Answer(Refreshed::Skipped),
                ValueSet::InUse => {
                    let Some(old) = stored else {
                        return Ok(Step::Answer(Refreshed::Collision)); // already cleared
                    };
                    sqlx::query("UPDATE consumer_keys SET key_hash = NULL WHERE id = $1")
                        .bind(id)
                        .execute(&mut *m.tx)
                        .await?;
                    m.removed_hashes.push(old);
                    Step::Commit(Refreshed::Collision)
                }
            },
        )
    }
}
