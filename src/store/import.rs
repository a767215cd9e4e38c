//! Bulk import of consumer keys bound to one consumer, in one transaction (one revision, one
//! audit row, a full reload for data planes): for migrations and benchmarks. Depends on
//! `domain` and `crypto`.

use super::audit::Audit;
use super::consumer_keys::Adding;
use super::lookup::find_ref;
use super::mutation::Mutation;
use super::rows::{SqlCode, new_id};
use super::{Actor, Result, Store, StoreError};
use crate::crypto::Secret;
use crate::domain::validate;
use crate::domain::{GenerationMethod, KeyStatus, ResourceKind, RuleError, mask};

/// Rows per INSERT statement.
const ROWS: usize = 1000;

impl Store {
    /// Imports many consumer keys bound to one consumer in one transaction (one revision, one
    /// audit row): for migrations and benchmarks. Values are validated and stored as HMACs like
    /// any CUSTOM key; the consumer's quota still applies (`--max-keys-per-consumer`).
    pub async fn import_consumer_keys(
        &self,
        actor: &Actor,
        consumer: &str,
        keys: Vec<(String, Secret)>,
    ) -> Result<i64> {
        for (i, (name, value)) in keys.iter().enumerate() {
            validate::name(&format!("keys[{i}].name"), name)
                .and_then(|_| validate::key_value(&format!("keys[{i}].value"), value.expose()))
                .map_err(|v| RuleError::Invalid(vec![v]))?;
        }
        let mut m = self.begin(actor).await?;
        let consumer = find_ref(&mut m.tx, ResourceKind::Consumer, consumer).await?;
        self.check_key_quota(&mut m.tx, &consumer, Adding::Many(keys.len()))
            .await?;
        for chunk in keys.chunks(ROWS) {
            self.insert_chunk(&mut m, &consumer.id, chunk).await?;
        }
        // A rotated key's previous value is as taken as a value (SPEC §8.4).
        let crossed: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM consumer_keys a JOIN consumer_keys b ON b.previous_hash = a.key_hash LIMIT 1",
        )
        .fetch_optional(&mut *m.tx)
        .await?;
        if crossed.is_some() {
            return Err(RuleError::invalid(
                "keys",
                "a name or value is already in use by another consumer key",
            )
            .into());
        }
        m.full_reload = true;
        let audit = Audit::new(
            "ImportConsumerKeys",
            ResourceKind::Consumer,
            &consumer.id,
            &consumer.name,
            &["consumer_keys"],
        );
        self.commit(m, audit).await
    }

    /// One multi-row INSERT of CUSTOM keys, enabled, unscoped, bound to `consumer_id`.
    async fn insert_chunk(
        &self,
        m: &mut Mutation,
        consumer_id: &str,
        chunk: &[(String, Secret)],
    ) -> Result<()> {
        let mut sql = String::from(
            "INSERT INTO consumer_keys (id, name, description, status, generation_method, key_hash, masked_value, \
             consumer_id, scope_mode, ip_allowlist, expire_time, create_time, update_time) VALUES ",
        );
        for i in 0..chunk.len() {
            let b = i * 6;
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "(${}, ${}, '', {}, {}, ${}, ${}, ${}, 0, '', NULL, ${}, ${})",
                b + 1,
                b + 2,
                KeyStatus::Enabled.code(),
                GenerationMethod::Custom.code(),
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                b + 6
            ));
        }
        let mut q = sqlx::query(&sql);
        for (name, value) in chunk {
            q = q
                .bind(new_id())
                .bind(name.clone())
                .bind(self.keys.hasher.hash(value.expose().as_bytes()).to_vec())
                .bind(mask(value.expose()))
                .bind(consumer_id.to_string())
                .bind(m.now.0);
        }
        q.execute(&mut *m.tx).await.map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => {
                StoreError::Rule(RuleError::invalid(
                    "keys",
                    "a name or value is already in use by another consumer key",
                ))
            }
            _ => StoreError::Database(e),
        })?;
        Ok(())
    }
}
