//! The `keygate.admin.v1.KeyAdmin` gRPC service: proto ⇄ domain conversion, the admin-token
//! check, and error mapping. Rules live in `domain`, transactions in `store`.

pub mod convert;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::crypto::{Keys, Secret, credentials_equal};
use crate::domain::input::{
    ConsumerKeyPatch, ConsumerPatch, KeySource, ModelKeyPatch, ModelServicePatch, NewConsumer,
    NewConsumerKey, NewModelKey, NewModelService,
};
use crate::domain::{KeyStatus, SecretRef, Selector, Timestamp};
use crate::proto::admin::v1 as pb;
use crate::proto::admin::v1::key_admin_server::{KeyAdmin, KeyAdminServer};
use crate::secret::Secrets;
use crate::snapshot::SnapshotCell;
use crate::store::{Actor, AuditFilter, ConsumerKeyFilter, ModelKeyFilter, Store};
use convert::*;

/// The admin token, checked in constant time; its fingerprint names the actor in audit rows.
#[derive(Clone)]
pub struct AdminAuth {
    token: Arc<Secret>,
    actor: Actor,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("actor", &self.actor)
            .finish_non_exhaustive()
    }
}

impl AdminAuth {
    pub fn new(token: Secret, keys: &Keys) -> Self {
        let actor = Actor(keys.actor_fingerprint(token.expose()));
        AdminAuth {
            token: Arc::new(token),
            actor,
        }
    }

    /// The interceptor: `authorization: Bearer <admin token>` or `UNAUTHENTICATED`.
    #[allow(clippy::result_large_err)]
    pub fn check(&self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        match presented {
            Some(t) if credentials_equal(t.as_bytes(), self.token.expose().as_bytes()) => {
                req.extensions_mut().insert(self.actor.clone());
                Ok(req)
            }
            Some(_) => Err(Status::unauthenticated("invalid admin token")),
            None => Err(Status::unauthenticated(
                "missing admin token: send \"authorization: Bearer <admin token>\"",
            )),
        }
    }
}

/// The KeyAdmin implementation.
#[derive(Clone, Debug)]
pub struct AdminService {
    store: Store,
    snapshots: SnapshotCell,
    secrets: Secrets,
}

impl AdminService {
    pub fn new(store: Store, snapshots: SnapshotCell, secrets: Secrets) -> Self {
        AdminService {
            store,
            snapshots,
            secrets,
        }
    }

    /// Reads a reference before anything is committed: a malformed one is
    /// `INVALID_ARGUMENT`, one that does not resolve `FAILED_PRECONDITION` naming provider,
    /// name and version. The value is cached (and the status shown) from here on.
    async fn resolve(&self, field: &str, r: &SecretRef) -> Result<Secret, Status> {
        match self.secrets.fetch(r).await {
            Ok(v) => {
                self.secrets.record_success(r, &v);
                Ok(v)
            }
            Err(e) => Err(rule_status(e.to_rule(field, r))),
        }
    }

    fn consumer_key_out(&self, k: crate::domain::ConsumerKey, now: Timestamp) -> pb::ConsumerKey {
        let status = self.secret_status(&k.secret_ref);
        pb::ConsumerKey {
            secret_status: status,
            ..consumer_key_out(k, now)
        }
    }

    fn model_key_out(&self, k: crate::domain::ModelKey) -> pb::ModelKey {
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
    async fn resolve_source(&self, source: KeySource) -> Result<KeySource, Status> {
        match source {
            KeySource::SecretRef(r, None) => {
                let v = self.resolve("secret_ref", &r).await?;
                Ok(KeySource::SecretRef(r, Some(v)))
            }
            other => Ok(other),
        }
    }

    /// The new reference of an update, resolved; the key must be a SECRET_REF key.
    async fn resolve_update_ref(
        &self,
        field: &str,
        method: crate::domain::GenerationMethod,
        r: Option<pb::SecretRef>,
    ) -> Result<(SecretRef, Secret), Status> {
        if method != crate::domain::GenerationMethod::SecretRef {
            return Err(invalid(
                field,
                "only a SECRET_REF key has a reference to change; any other key's value is never editable (create a new key to rotate)",
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

    /// The gRPC service with the admin-token interceptor in front.
    pub fn into_server(
        self,
        auth: AdminAuth,
    ) -> tonic::service::interceptor::InterceptedService<
        KeyAdminServer<Self>,
        impl tonic::service::Interceptor + Clone,
    > {
        KeyAdminServer::with_interceptor(self, move |req| auth.check(req))
    }
}

#[allow(clippy::result_large_err)]
fn actor<T>(req: &Request<T>) -> Result<Actor, Status> {
    req.extensions()
        .get::<Actor>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("missing admin token"))
}

type R<T> = Result<Response<T>, Status>;

fn ok<T>(v: T) -> R<T> {
    Ok(Response::new(v))
}

const CONSUMER_ELSEWHERE: &[(&str, &str)] = &[
    ("id", OUTPUT_ONLY),
    ("create_time", OUTPUT_ONLY),
    ("update_time", OUTPUT_ONLY),
    (
        "consumer_keys",
        "bind keys with BindConsumerKey / UnbindConsumerKey",
    ),
];

const SERVICE_ELSEWHERE: &[(&str, &str)] = &[
    ("id", OUTPUT_ONLY),
    ("create_time", OUTPUT_ONLY),
    ("update_time", OUTPUT_ONLY),
    ("model_keys", "bind keys with BindModelKey / UnbindModelKey"),
];

const CONSUMER_KEY_ELSEWHERE: &[(&str, &str)] = &[
    ("id", OUTPUT_ONLY),
    ("create_time", OUTPUT_ONLY),
    ("update_time", OUTPUT_ONLY),
    ("last_used_time", OUTPUT_ONLY),
    ("expired", OUTPUT_ONLY),
    (
        "masked_value",
        "a key's value is never editable: create a new key to rotate",
    ),
    (
        "generation_method",
        "a key's value is never editable: create a new key to rotate",
    ),
    ("secret_status", OUTPUT_ONLY),
    ("status", "use EnableConsumerKey / DisableConsumerKey"),
    ("consumer", "use BindConsumerKey / UnbindConsumerKey"),
    ("consumer_id", "use BindConsumerKey / UnbindConsumerKey"),
];

const MODEL_KEY_ELSEWHERE: &[(&str, &str)] = &[
    ("id", OUTPUT_ONLY),
    ("create_time", OUTPUT_ONLY),
    ("update_time", OUTPUT_ONLY),
    (
        "masked_value",
        "a key's value is never editable: create a new key to rotate",
    ),
    (
        "generation_method",
        "a key's value is never editable: create a new key to rotate",
    ),
    ("secret_status", OUTPUT_ONLY),
    ("status", "use EnableModelKey / DisableModelKey"),
    ("model_services", "use BindModelKey / UnbindModelKey"),
];

#[tonic::async_trait]
impl KeyAdmin for AdminService {
    // ------------------------------------------------------------------ consumers

    async fn create_consumer(&self, req: Request<pb::CreateConsumerRequest>) -> R<pb::Consumer> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let new = NewConsumer {
            name: r.name,
            description: r.description,
            scope: scope_input("scope", r.scope)?,
        };
        ok(consumer_out(
            self.store
                .create_consumer(&actor, new)
                .await
                .map_err(status)?,
        ))
    }

    async fn get_consumer(&self, req: Request<pb::GetConsumerRequest>) -> R<pb::Consumer> {
        let sel = selector(req.into_inner().selector, Selector::from)?;
        ok(consumer_out(
            self.store.get_consumer(&sel).await.map_err(status)?,
        ))
    }

    async fn list_consumers(
        &self,
        req: Request<pb::ListConsumersRequest>,
    ) -> R<pb::ListConsumersResponse> {
        let r = req.into_inner();
        let p = self
            .store
            .list_consumers(&page(r.page_size, &r.page_token)?)
            .await
            .map_err(status)?;
        ok(pb::ListConsumersResponse {
            items: p.items.into_iter().map(consumer_out).collect(),
            next_page_token: page_token(p.next),
        })
    }

    async fn update_consumer(&self, req: Request<pb::UpdateConsumerRequest>) -> R<pb::Consumer> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let sel = selector(r.selector, Selector::from)?;
        let c = r.consumer.unwrap_or_default();
        let mask = UpdateMask::new(
            r.update_mask,
            &[
                ("name", !c.name.is_empty()),
                ("description", !c.description.is_empty()),
                ("scope", c.scope.is_some()),
            ],
            &["name", "description", "scope"],
            CONSUMER_ELSEWHERE,
        )?;
        let patch = ConsumerPatch {
            name: mask.has("name").then(|| c.name.clone()),
            description: mask.has("description").then(|| c.description.clone()),
            scope: if mask.has("scope") {
                Some(scope_input("consumer.scope", c.scope.clone())?)
            } else {
                None
            },
        };
        ok(consumer_out(
            self.store
                .update_consumer(&actor, &sel, patch)
                .await
                .map_err(status)?,
        ))
    }

    async fn delete_consumer(
        &self,
        req: Request<pb::DeleteConsumerRequest>,
    ) -> R<pb::DeleteResponse> {
        let actor = actor(&req)?;
        let sel = selector(req.into_inner().selector, Selector::from)?;
        self.store
            .delete_consumer(&actor, &sel)
            .await
            .map_err(status)?;
        ok(pb::DeleteResponse {})
    }

    // ------------------------------------------------------------------ model services

    async fn create_model_service(
        &self,
        req: Request<pb::CreateModelServiceRequest>,
    ) -> R<pb::ModelService> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let new = NewModelService {
            name: r.name,
            description: r.description,
            provider: r.provider,
            auth_header: r.auth_header,
            auth_value_template: r.auth_value_template,
            models: r.models,
        };
        ok(service_out(
            self.store
                .create_model_service(&actor, new)
                .await
                .map_err(status)?,
        ))
    }

    async fn get_model_service(
        &self,
        req: Request<pb::GetModelServiceRequest>,
    ) -> R<pb::ModelService> {
        let sel = selector(req.into_inner().selector, Selector::from)?;
        ok(service_out(
            self.store.get_model_service(&sel).await.map_err(status)?,
        ))
    }

    async fn list_model_services(
        &self,
        req: Request<pb::ListModelServicesRequest>,
    ) -> R<pb::ListModelServicesResponse> {
        let r = req.into_inner();
        let p = self
            .store
            .list_model_services(&page(r.page_size, &r.page_token)?)
            .await
            .map_err(status)?;
        ok(pb::ListModelServicesResponse {
            items: p.items.into_iter().map(service_out).collect(),
            next_page_token: page_token(p.next),
        })
    }

    async fn update_model_service(
        &self,
        req: Request<pb::UpdateModelServiceRequest>,
    ) -> R<pb::ModelService> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let sel = selector(r.selector, Selector::from)?;
        let s = r.model_service.unwrap_or_default();
        let mask = UpdateMask::new(
            r.update_mask,
            &[
                ("name", !s.name.is_empty()),
                ("description", !s.description.is_empty()),
                ("provider", !s.provider.is_empty()),
                ("auth_header", !s.auth_header.is_empty()),
                ("auth_value_template", !s.auth_value_template.is_empty()),
                ("models", !s.models.is_empty()),
            ],
            &[
                "name",
                "description",
                "provider",
                "auth_header",
                "auth_value_template",
                "models",
            ],
            SERVICE_ELSEWHERE,
        )?;
        let patch = ModelServicePatch {
            name: mask.has("name").then(|| s.name.clone()),
            description: mask.has("description").then(|| s.description.clone()),
            provider: mask.has("provider").then(|| s.provider.clone()),
            auth_header: mask.has("auth_header").then(|| {
                if s.auth_header.is_empty() {
                    crate::domain::input::DEFAULT_AUTH_HEADER.to_string()
                } else {
                    s.auth_header.clone()
                }
            }),
            auth_value_template: mask.has("auth_value_template").then(|| {
                if s.auth_value_template.is_empty() {
                    crate::domain::input::DEFAULT_AUTH_VALUE_TEMPLATE.to_string()
                } else {
                    s.auth_value_template.clone()
                }
            }),
            models: mask.has("models").then(|| s.models.clone()),
        };
        ok(service_out(
            self.store
                .update_model_service(&actor, &sel, patch)
                .await
                .map_err(status)?,
        ))
    }

    async fn delete_model_service(
        &self,
        req: Request<pb::DeleteModelServiceRequest>,
    ) -> R<pb::DeleteResponse> {
        let actor = actor(&req)?;
        let sel = selector(req.into_inner().selector, Selector::from)?;
        self.store
            .delete_model_service(&actor, &sel)
            .await
            .map_err(status)?;
        ok(pb::DeleteResponse {})
    }

    // ------------------------------------------------------------------ consumer keys

    async fn create_consumer_key(
        &self,
        req: Request<pb::CreateConsumerKeyRequest>,
    ) -> R<pb::CreateConsumerKeyResponse> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let source = key_source(r.generation_method, r.value, r.secret_ref, true)?;
        let mut new = NewConsumerKey {
            name: r.name,
            description: r.description,
            source,
            consumer: (!r.consumer.is_empty()).then_some(r.consumer),
            scope: scope_input("scope", r.scope)?,
            ip_allowlist: r.ip_allowlist,
            expire_time: r
                .expire_time
                .as_ref()
                .map(|t| ts_in("expire_time", t))
                .transpose()?,
        };
        // Every other rule first: a reference is only read for a request that is otherwise good.
        new.validate(self.store.limits(), Timestamp::now())
            .map_err(rule_status)?;
        new.source = self.resolve_source(new.source).await?;
        let created = self
            .store
            .create_consumer_key(&actor, new)
            .await
            .map_err(status)?;
        ok(pb::CreateConsumerKeyResponse {
            key: Some(self.consumer_key_out(created.key, Timestamp::now())),
            value: created
                .value
                .map(|v| v.expose().to_string())
                .unwrap_or_default(),
        })
    }

    async fn get_consumer_key(
        &self,
        req: Request<pb::GetConsumerKeyRequest>,
    ) -> R<pb::ConsumerKey> {
        let sel = selector(req.into_inner().selector, Selector::from)?;
        ok(self.consumer_key_out(
            self.store.get_consumer_key(&sel).await.map_err(status)?,
            Timestamp::now(),
        ))
    }

    async fn list_consumer_keys(
        &self,
        req: Request<pb::ListConsumerKeysRequest>,
    ) -> R<pb::ListConsumerKeysResponse> {
        let r = req.into_inner();
        let filter = ConsumerKeyFilter {
            consumer: (!r.consumer.is_empty()).then_some(r.consumer),
            status: status_filter(r.status)?,
        };
        let p = self
            .store
            .list_consumer_keys(&filter, &page(r.page_size, &r.page_token)?)
            .await
            .map_err(status)?;
        let now = Timestamp::now();
        ok(pb::ListConsumerKeysResponse {
            items: p
                .items
                .into_iter()
                .map(|k| self.consumer_key_out(k, now))
                .collect(),
            next_page_token: page_token(p.next),
        })
    }

    async fn update_consumer_key(
        &self,
        req: Request<pb::UpdateConsumerKeyRequest>,
    ) -> R<pb::ConsumerKey> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let sel = selector(r.selector, Selector::from)?;
        let k = r.consumer_key.unwrap_or_default();
        let mask = UpdateMask::new(
            r.update_mask,
            &[
                ("name", !k.name.is_empty()),
                ("description", !k.description.is_empty()),
                ("scope", k.scope.is_some()),
                ("ip_allowlist", !k.ip_allowlist.is_empty()),
                ("expire_time", k.expire_time.is_some()),
                ("status", k.status != 0),
                ("consumer", !k.consumer.is_empty()),
                ("secret_ref", k.secret_ref.is_some()),
            ],
            &[
                "name",
                "description",
                "scope",
                "ip_allowlist",
                "expire_time",
                "secret_ref",
            ],
            CONSUMER_KEY_ELSEWHERE,
        )?;
        let secret_ref = if mask.has("secret_ref") {
            let method = self
                .store
                .get_consumer_key(&sel)
                .await
                .map_err(status)?
                .generation_method;
            Some(
                self.resolve_update_ref("consumer_key.secret_ref", method, k.secret_ref.clone())
                    .await?,
            )
        } else {
            None
        };
        let patch = ConsumerKeyPatch {
            name: mask.has("name").then(|| k.name.clone()),
            description: mask.has("description").then(|| k.description.clone()),
            scope: if mask.has("scope") {
                Some(scope_input("consumer_key.scope", k.scope.clone())?)
            } else {
                None
            },
            ip_allowlist: mask.has("ip_allowlist").then(|| k.ip_allowlist.clone()),
            expire_time: if mask.has("expire_time") {
                Some(
                    k.expire_time
                        .as_ref()
                        .map(|t| ts_in("consumer_key.expire_time", t))
                        .transpose()?,
                )
            } else {
                None
            },
            secret_ref,
        };
        ok(self.consumer_key_out(
            self.store
                .update_consumer_key(&actor, &sel, patch)
                .await
                .map_err(status)?,
            Timestamp::now(),
        ))
    }

    async fn enable_consumer_key(
        &self,
        req: Request<pb::EnableConsumerKeyRequest>,
    ) -> R<pb::ConsumerKey> {
        let actor = actor(&req)?;
        let sel = selector(req.into_inner().selector, Selector::from)?;
        let k = self
            .store
            .set_consumer_key_status(&actor, &sel, KeyStatus::Enabled)
            .await
            .map_err(status)?;
        ok(self.consumer_key_out(k, Timestamp::now()))
    }

    async fn disable_consumer_key(
        &self,
        req: Request<pb::DisableConsumerKeyRequest>,
    ) -> R<pb::ConsumerKey> {
        let actor = actor(&req)?;
        let sel = selector(req.into_inner().selector, Selector::from)?;
        let k = self
            .store
            .set_consumer_key_status(&actor, &sel, KeyStatus::Disabled)
            .await
            .map_err(status)?;
        ok(self.consumer_key_out(k, Timestamp::now()))
    }

    async fn bind_consumer_key(
        &self,
        req: Request<pb::BindConsumerKeyRequest>,
    ) -> R<pb::ConsumerKey> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let key = reference("key", &r.key)?;
        let consumer = reference("consumer", &r.consumer)?;
        let k = self
            .store
            .bind_consumer_key(&actor, &key, &consumer)
            .await
            .map_err(status)?;
        ok(self.consumer_key_out(k, Timestamp::now()))
    }

    async fn unbind_consumer_key(
        &self,
        req: Request<pb::UnbindConsumerKeyRequest>,
    ) -> R<pb::ConsumerKey> {
        let actor = actor(&req)?;
        let key = reference("key", &req.get_ref().key)?;
        let k = self
            .store
            .unbind_consumer_key(&actor, &key)
            .await
            .map_err(status)?;
        ok(self.consumer_key_out(k, Timestamp::now()))
    }

    async fn delete_consumer_key(
        &self,
        req: Request<pb::DeleteConsumerKeyRequest>,
    ) -> R<pb::DeleteResponse> {
        let actor = actor(&req)?;
        let sel = selector(req.into_inner().selector, Selector::from)?;
        self.store
            .delete_consumer_key(&actor, &sel)
            .await
            .map_err(status)?;
        ok(pb::DeleteResponse {})
    }

    // ------------------------------------------------------------------ model keys

    async fn create_model_key(&self, req: Request<pb::CreateModelKeyRequest>) -> R<pb::ModelKey> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let source = key_source(r.generation_method, r.value, r.secret_ref, false)?;
        let mut new = NewModelKey {
            name: r.name,
            description: r.description,
            source,
            model_services: r.model_services,
        };
        new.validate().map_err(rule_status)?;
        new.source = self.resolve_source(new.source).await?;
        ok(self.model_key_out(
            self.store
                .create_model_key(&actor, new)
                .await
                .map_err(status)?,
        ))
    }

    async fn get_model_key(&self, req: Request<pb::GetModelKeyRequest>) -> R<pb::ModelKey> {
        let sel = selector(req.into_inner().selector, Selector::from)?;
        ok(self.model_key_out(self.store.get_model_key(&sel).await.map_err(status)?))
    }

    async fn list_model_keys(
        &self,
        req: Request<pb::ListModelKeysRequest>,
    ) -> R<pb::ListModelKeysResponse> {
        let r = req.into_inner();
        let filter = ModelKeyFilter {
            model_service: (!r.model_service.is_empty()).then_some(r.model_service),
            status: status_filter(r.status)?,
        };
        let p = self
            .store
            .list_model_keys(&filter, &page(r.page_size, &r.page_token)?)
            .await
            .map_err(status)?;
        ok(pb::ListModelKeysResponse {
            items: p.items.into_iter().map(|k| self.model_key_out(k)).collect(),
            next_page_token: page_token(p.next),
        })
    }

    async fn update_model_key(&self, req: Request<pb::UpdateModelKeyRequest>) -> R<pb::ModelKey> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let sel = selector(r.selector, Selector::from)?;
        let k = r.model_key.unwrap_or_default();
        let mask = UpdateMask::new(
            r.update_mask,
            &[
                ("name", !k.name.is_empty()),
                ("description", !k.description.is_empty()),
                ("status", k.status != 0),
                ("model_services", !k.model_services.is_empty()),
                ("secret_ref", k.secret_ref.is_some()),
            ],
            &["name", "description", "secret_ref"],
            MODEL_KEY_ELSEWHERE,
        )?;
        let secret_ref = if mask.has("secret_ref") {
            let method = self
                .store
                .get_model_key(&sel)
                .await
                .map_err(status)?
                .generation_method;
            Some(
                self.resolve_update_ref("model_key.secret_ref", method, k.secret_ref.clone())
                    .await?,
            )
        } else {
            None
        };
        let patch = ModelKeyPatch {
            name: mask.has("name").then(|| k.name.clone()),
            description: mask.has("description").then(|| k.description.clone()),
            secret_ref,
        };
        ok(self.model_key_out(
            self.store
                .update_model_key(&actor, &sel, patch)
                .await
                .map_err(status)?,
        ))
    }

    async fn enable_model_key(&self, req: Request<pb::EnableModelKeyRequest>) -> R<pb::ModelKey> {
        let actor = actor(&req)?;
        let sel = selector(req.into_inner().selector, Selector::from)?;
        ok(self.model_key_out(
            self.store
                .set_model_key_status(&actor, &sel, KeyStatus::Enabled)
                .await
                .map_err(status)?,
        ))
    }

    async fn disable_model_key(&self, req: Request<pb::DisableModelKeyRequest>) -> R<pb::ModelKey> {
        let actor = actor(&req)?;
        let sel = selector(req.into_inner().selector, Selector::from)?;
        ok(self.model_key_out(
            self.store
                .set_model_key_status(&actor, &sel, KeyStatus::Disabled)
                .await
                .map_err(status)?,
        ))
    }

    async fn bind_model_key(&self, req: Request<pb::BindModelKeyRequest>) -> R<pb::ModelKey> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let key = reference("key", &r.key)?;
        let service = reference("model_service", &r.model_service)?;
        ok(self.model_key_out(
            self.store
                .bind_model_key(&actor, &key, &service)
                .await
                .map_err(status)?,
        ))
    }

    async fn unbind_model_key(&self, req: Request<pb::UnbindModelKeyRequest>) -> R<pb::ModelKey> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let key = reference("key", &r.key)?;
        let service = reference("model_service", &r.model_service)?;
        ok(self.model_key_out(
            self.store
                .unbind_model_key(&actor, &key, &service)
                .await
                .map_err(status)?,
        ))
    }

    async fn delete_model_key(
        &self,
        req: Request<pb::DeleteModelKeyRequest>,
    ) -> R<pb::DeleteResponse> {
        let actor = actor(&req)?;
        let sel = selector(req.into_inner().selector, Selector::from)?;
        self.store
            .delete_model_key(&actor, &sel)
            .await
            .map_err(status)?;
        ok(pb::DeleteResponse {})
    }

    // ------------------------------------------------------------------ references, audit, snapshot

    async fn get_key_references(
        &self,
        req: Request<pb::GetKeyReferencesRequest>,
    ) -> R<pb::GetKeyReferencesResponse> {
        let r = req.into_inner();
        let kind = kind_in("kind", r.kind, true)?.expect("required kind");
        let sel = selector(r.selector, Selector::from)?;
        let (refs, secret_ref) = self.store.references(kind, &sel).await.map_err(status)?;
        ok(pb::GetKeyReferencesResponse {
            count: refs.len() as u32,
            references: refs
                .into_iter()
                .map(|(k, n)| pb::Reference {
                    kind: kind_out(k),
                    id: n.id,
                    name: n.name,
                })
                .collect(),
            secret_ref: secret_ref_out(&secret_ref),
        })
    }

    async fn list_audit_events(
        &self,
        req: Request<pb::ListAuditEventsRequest>,
    ) -> R<pb::ListAuditEventsResponse> {
        let r = req.into_inner();
        let p = page(r.page_size, "")?;
        let filter = AuditFilter {
            kind: kind_in("kind", r.kind, false)?,
            name: (!r.name.is_empty()).then_some(r.name),
            start: r
                .start_time
                .as_ref()
                .map(|t| ts_in("start_time", t))
                .transpose()?,
            end: r
                .end_time
                .as_ref()
                .map(|t| ts_in("end_time", t))
                .transpose()?,
        };
        let p = crate::store::PageRequest {
            size: p.size,
            after: (!r.page_token.is_empty()).then_some(r.page_token),
        };
        let page = self
            .store
            .list_audit_events(&filter, &p)
            .await
            .map_err(status)?;
        ok(pb::ListAuditEventsResponse {
            items: page.items.into_iter().map(audit_out).collect(),
            next_page_token: page.next.unwrap_or_default(),
        })
    }

    async fn get_snapshot_status(
        &self,
        _req: Request<pb::GetSnapshotStatusRequest>,
    ) -> R<pb::GetSnapshotStatusResponse> {
        let Some(s) = self.snapshots.load() else {
            return Err(Status::unavailable("no snapshot has been built yet"));
        };
        ok(pb::GetSnapshotStatusResponse {
            version: s.version as u64,
            build_time: Some(ts_out(Timestamp::from_system(s.build_time))),
            consumer_keys: s.counts().consumer_keys,
            model_keys: s.counts().model_keys,
            model_services: s.counts().model_services,
            store_id: s.store_id.clone(),
        })
    }
}

/// The key's value source from the request's generation method and fields.
#[allow(clippy::result_large_err)]
fn key_source(
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
                crate::domain::SecretRef {
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
