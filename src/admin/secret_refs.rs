//! Key values from the request and SECRET_REF references: the value source a create asks
//! for, reading a reference before anything is committed, and the control plane's view of a
//! reference on keys it answers with. Depends on `domain`, `crypto`, `secret` and `proto`.

use tonic::Status;

use super::AdminService;
use super::convert::{consumer_key_out, invalid, model_key_out, ts_out};
use crate::crypto::Secret;
use crate::domain::input::KeySource;
use crate::domain::{self, GenerationMethod, SecretRef, Timestamp};
use crate::proto::admin::v1 as pb;

impl AdminService {
    /// Reads a reference before anything is committed: a malformed one is
    /// `INVALID_ARGUMENT`, one that does not resolve `FAILED_PRECONDITION` naming provider,
    /// name and version. The value is cached (and the status shown) from here on.
    async fn resolve(&self, field: &str, r: &SecretRef) -> Result<Secret, Status> {
        match self.secrets.fetch(r).await {
            Ok(v) => {
                self.secrets.record_success(r, &v);
                Ok(v)
            }
            Err(e) => Err(e.to_rule(field, r).into()),
        }
    }

    pub(super) fn consumer_key_out(
        &self,
        k: domain::ConsumerKey,
        now: Timestamp,
    ) -> pb::ConsumerKey {
        let status = self.secret_status(&k.secret_ref);
        pb::ConsumerKey {
            secret_status: status,
            ..consumer_key_out(k, now)
        }
    }

    pub(super) fn model_key_out(&self, k: domain::ModelKey) -> pb::ModelKey {
        let status = self.secret_status(&k.secret_ref);
        pb::ModelKey {
            secret_status: status,
            ..model_key_out(k)
        }
    }

    /// This control plane's view of a reference: the last successful resolution and the last
    /// error (empty when the last attempt succeeded).
    fn secret_status(&self, r: &Option<SecretRef>) -> Option<pb::SecretStatus> {
        let r = r.as_ref()?;
        Some(match self.secrets.status(r) {
            Some(s) => pb::SecretStatus {
                last_refresh_time: s.last_refresh_time.map(ts_out),
                last_error: s.last_error,
            },
            None => pb::SecretStatus {
                last_refresh_time: None,
                last_error: "not resolved by this control plane yet".into(),
            },
        })
    }

    /// A SECRET_REF source with its value resolved (other sources unchanged).
    pub(super) async fn resolve_source(&self, source: KeySource) -> Result<KeySource, Status> {
        match source {
            KeySource::SecretRef(r, None) => {
                let v = self.resolve("secret_ref", &r).await?;
                Ok(KeySource::SecretRef(r, Some(v)))
            }
            other => Ok(other),
        }
    }

    /// The new reference of an update, resolved; the key must be a SECRET_REF key.
    pub(super) async fn resolve_update_ref(
        &self,
        field: &str,
        method: GenerationMethod,
        r: Option<pb::SecretRef>,
    ) -> Result<(SecretRef, Secret), Status> {
        if method != GenerationMethod::SecretRef {
            return Err(invalid(
                field,
                "only a SECRET_REF key has a reference to change (another consumer key rotates with RotateConsumerKey; another model key's value is never editable: create a new key)",
            ));
        }
        let r = r.unwrap_or_default();
        let r = SecretRef {
            provider: r.provider,
            name: r.name,
            version: r.version,
        };
        let mut missing = Vec::new();
        if r.provider.is_empty() {
            missing.push((format!("{field}.provider"), "is required"));
        }
        if r.name.is_empty() {
            missing.push((format!("{field}.name"), "is required"));
        }
        if let Some((f, why)) = missing.first() {
            return Err(invalid(f, *why));
        }
        let v = self.resolve(field, &r).await?;
        Ok((r, v))
    }
}

/// The key's value source from the request's generation method and fields.
#[allow(clippy::result_large_err)]
pub(super) fn key_source(
    method: i32,
    value: String,
    secret_ref: Option<pb::SecretRef>,
    consumer_key: bool,
) -> Result<KeySource, Status> {
    use pb::GenerationMethod as M;
    let method =
        M::try_from(method).map_err(|_| invalid("generation_method", "is not a known method"))?;
    let method = match method {
        M::Unspecified if !value.is_empty() => M::Custom,
        M::Unspecified if secret_ref.is_some() => M::SecretRef,
        M::Unspecified if consumer_key => M::Auto,
        M::Unspecified => {
            return Err(invalid(
                "generation_method",
                "is required for a model key: CUSTOM (with value) or SECRET_REF (with secret_ref)",
            ));
        }
        m => m,
    };
    match method {
        M::Auto => {
            if !consumer_key {
                return Err(invalid(
                    "generation_method",
                    "a model key is CUSTOM (the vendor's value) or SECRET_REF; AUTO is for consumer keys",
                ));
            }
            if !value.is_empty() || secret_ref.is_some() {
                return Err(invalid(
                    "value",
                    "must be empty with generation_method AUTO (keygate generates the value)",
                ));
            }
            Ok(KeySource::Auto)
        }
        M::Custom => {
            if secret_ref.is_some() {
                return Err(invalid(
                    "secret_ref",
                    "is only for generation_method SECRET_REF",
                ));
            }
            if value.is_empty() {
                return Err(invalid(
                    "value",
                    "is required with generation_method CUSTOM",
                ));
            }
            Ok(KeySource::Custom(Secret::new(value)))
        }
        M::SecretRef => {
            if !value.is_empty() {
                return Err(invalid(
                    "value",
                    "must be empty with generation_method SECRET_REF (the value lives in the secret store)",
                ));
            }
            let r = secret_ref.ok_or_else(|| {
                invalid(
                    "secret_ref",
                    "is required with generation_method SECRET_REF",
                )
            })?;
            Ok(KeySource::SecretRef(
                SecretRef {
                    provider: r.provider,
                    name: r.name,
                    version: r.version,
                },
                None,
            ))
        }
        M::Unspecified => unreachable!("resolved above"),
    }
}
