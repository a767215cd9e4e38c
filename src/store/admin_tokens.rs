//! Named admin credentials (SPEC §9): create (the value is returned once, only its HMAC under
//! the consumer-key pepper is kept), list, revoke (the row goes; the audit trail keeps the
//! history), and the lookup the admin API authenticates with. Creating and revoking are
//! audited mutations like any other; `last_used_time` is bookkeeping and bumps no revision.
//! Depends on `domain` and `crypto`.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::audit::Audit;
use super::lookup::{ensure_unique_name, find};
use super::rows::{SqlCode, decode, new_id};
use super::{Actor, Page, PageRequest, Result, Store};
use crate::crypto::{self, KeyHash, Secret};
use crate::domain::{
    ADMIN_TOKEN_PREFIX, AdminToken, NewAdminToken, ResourceKind, Role, Selector, Timestamp, mask,
};

const KIND: ResourceKind = ResourceKind::AdminToken;

const COLUMNS: &str = "id, name, role, masked_value, expire_time, create_time, last_used_time";

impl Store {
    /// Creates a named admin credential; the value is in the answer and nowhere else.
    pub async fn create_admin_token(
        &self,
        actor: &Actor,
        req: NewAdminToken,
    ) -> Result<(AdminToken, Secret)> {
        req.validate(Timestamp::now())?;
        let mut m = self.begin(actor).await?;
        ensure_unique_name(&mut m.tx, KIND, &req.name, None).await?;
        let value = Secret::new(format!("{ADMIN_TOKEN_PREFIX}{}", crypto::random_token()));
        let id = new_id();
        sqlx::query(
            "INSERT INTO admin_tokens (id, name, role, token_hash, masked_value, expire_time, create_time) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&id)
        .bind(&req.name)
        .bind(req.role.code())
        .bind(self.admin_token_hash(value.expose()).to_vec())
        .bind(mask(value.expose()))
        .bind(req.expire_time.map(|t| t.0))
        .bind(m.now.0)
        .execute(&mut *m.tx)
        .await?;
        let mut fields = vec!["name", "role"];
        if req.expire_time.is_some() {
            fields.push("expire_time");
        }
        let audit = Audit::new("CreateAdminToken", KIND, &id, &req.name, &fields);
        self.commit(m, audit).await?;
        let token = self.get_admin_token(&id).await?;
        Ok((token, value))
    }

    /// Admin credentials by name.
    pub async fn list_admin_tokens(&self, page: &PageRequest) -> Result<Page<AdminToken>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM admin_tokens WHERE name > $1 ORDER BY name LIMIT $2"
        ))
        .bind(page.cursor())
        .bind(page.limit())
        .fetch_all(&self.pool)
        .await?;
        let (rows, more) = page.split(rows);
        let items = rows.iter().map(admin_token).collect::<Result<Vec<_>>>()?;
        Ok(Page::new(items, more, |t| t.name.clone()))
    }

    /// Revokes (deletes) an admin credential; it stops working on every replica.
    pub async fn revoke_admin_token(&self, actor: &Actor, sel: &Selector) -> Result<()> {
        let mut m = self.begin(actor).await?;
        let target = find(&mut m.tx, KIND, sel).await?;
        sqlx::query("DELETE FROM admin_tokens WHERE id = $1")
            .bind(&target.id)
            .execute(&mut *m.tx)
            .await?;
        let audit = Audit::new("RevokeAdminToken", KIND, &target.id, &target.name, &[]);
        self.commit(m, audit).await?;
        Ok(())
    }

    /// The stored form of a presented admin token: its HMAC under the store's pepper.
    pub fn admin_token_hash(&self, value: &str) -> KeyHash {
        self.keys.hasher.hash(value.as_bytes())
    }

    /// The credential whose HMAC is `hash`, expired or not (the caller decides).
    pub async fn find_admin_token(&self, hash: &KeyHash) -> Result<Option<AdminToken>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM admin_tokens WHERE token_hash = $1"
        ))
        .bind(hash.to_vec())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(admin_token).transpose()
    }

    /// Records a use; not a change (no revision, no audit row).
    pub async fn note_admin_token_used(&self, id: &str, now: Timestamp) -> Result<()> {
        sqlx::query(
            "UPDATE admin_tokens SET last_used_time = $1 WHERE id = $2 \
             AND (last_used_time IS NULL OR last_used_time < $1)",
        )
        .bind(now.0)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Whether a named ADMIN credential that has not expired at `now` exists (the bootstrap
    /// token may be turned off only then).
    pub async fn has_named_admin(&self, now: Timestamp) -> Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM admin_tokens WHERE role = $1 \
             AND (expire_time IS NULL OR expire_time > $2)",
        )
        .bind(Role::Admin.code())
        .bind(now.0)
        .fetch_one(&self.pool)
        .await?;
        Ok(n > 0)
    }

    async fn get_admin_token(&self, id: &str) -> Result<AdminToken> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM admin_tokens WHERE id = $1"))
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        admin_token(&row)
    }
}

fn admin_token(r: &AnyRow) -> Result<AdminToken> {
    let role = decode(r.try_get("role")?, "admin token role")?;
    Ok(AdminToken {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        role,
        masked_value: r.try_get("masked_value")?,
        expire_time: r.try_get::<Option<i64>, _>("expire_time")?.map(Timestamp),
        create_time: Timestamp(r.try_get("create_time")?),
        last_used_time: r
            .try_get::<Option<i64>, _>("last_used_time")?
            .map(Timestamp),
    })
}
