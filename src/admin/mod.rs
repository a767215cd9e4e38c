//! The `keygate.admin.v1.KeyAdmin` gRPC service: proto ⇄ domain conversion, the admin-token
//! check, and error mapping. Rules live in `domain`, transactions in `store`.
//! Depends on `domain`, `crypto`, `secret`, `store`, `snapshot` and `proto`.
//!
//! One file per resource holds its handlers (`consumers`, `model_services`, `consumer_keys`,
//! `model_keys`, `inspect` for references, audit and snapshot status, `usage` for GetUsage and
//! applying data planes' usage reports); `auth` checks the
//! token, `secret_refs` reads references and key sources, `convert` translates messages and
//! `status` maps every error to its gRPC status.

mod admin_tokens;
mod auth;
mod cert_identities;
mod consumer_keys;
mod consumers;
pub mod convert;
mod inspect;
mod model_keys;
mod model_services;
mod secret_refs;
mod status;
mod usage;

use tonic::{Request, Response, Status};

use crate::domain::{KeyStatus, Role, Selector};
use crate::proto::admin::v1 as pb;
use crate::proto::admin::v1::key_admin_server::{KeyAdmin, KeyAdminServer};
use crate::secret::Secrets;
use crate::snapshot::SnapshotCell;
use crate::store::Store;

pub use auth::{AdminAuth, Identity};
pub use cert_identities::CertIdentities;
pub use usage::apply_usage_report_and_count;

/// The KeyAdmin implementation.
#[derive(Clone, Debug)]
pub struct AdminService {
    store: Store,
    snapshots: SnapshotCell,
    secrets: Secrets,
    auth: AdminAuth,
}

impl AdminService {
    pub fn new(store: Store, snapshots: SnapshotCell, secrets: Secrets, auth: AdminAuth) -> Self {
        AdminService {
            store,
            snapshots,
            secrets,
            auth,
        }
    }

    /// The gRPC service with the admin-token interceptor in front; each RPC then checks its
    /// caller's role (`AdminAuth::allow`) before it reads the request.
    pub fn into_server(
        self,
    ) -> tonic::service::interceptor::InterceptedService<
        KeyAdminServer<Self>,
        impl tonic::service::Interceptor + Clone,
    > {
        let auth = self.auth.clone();
        KeyAdminServer::with_interceptor(self, move |req| auth.check(req))
    }
}

type R<T> = Result<Response<T>, Status>;

fn ok<T>(v: T) -> R<T> {
    Ok(Response::new(v))
}

#[tonic::async_trait]
impl KeyAdmin for AdminService {
    async fn create_consumer(&self, req: Request<pb::CreateConsumerRequest>) -> R<pb::Consumer> {
        let req = self.auth.allow(req, Role::Operator).await?;
        consumers::create(self, req).await
    }

    async fn get_consumer(&self, req: Request<pb::GetConsumerRequest>) -> R<pb::Consumer> {
        let req = self.auth.allow(req, Role::Viewer).await?;
        consumers::get(self, req).await
    }

    async fn list_consumers(
        &self,
        req: Request<pb::ListConsumersRequest>,
    ) -> R<pb::ListConsumersResponse> {
        let req = self.auth.allow(req, Role::Viewer).await?;
        consumers::list(self, req).await
    }

    async fn update_consumer(&self, req: Request<pb::UpdateConsumerRequest>) -> R<pb::Consumer> {
        let req = self.auth.allow(req, Role::Operator).await?;
        consumers::update(self, req).await
    }

    async fn delete_consumer(
        &self,
        req: Request<pb::DeleteConsumerRequest>,
    ) -> R<pb::DeleteResponse> {
        let req = self.auth.allow(req, Role::Operator).await?;
        consumers::delete(self, req).await
    }

    async fn create_model_service(
        &self,
        req: Request<pb::CreateModelServiceRequest>,
    ) -> R<pb::ModelService> {
        let req = self.auth.allow(req, Role::Operator).await?;
        model_services::create(self, req).await
    }

    async fn get_model_service(
        &self,
        req: Request<pb::GetModelServiceRequest>,
    ) -> R<pb::ModelService> {
        let req = self.auth.allow(req, Role::Viewer).await?;
        model_services::get(self, req).await
    }

    async fn list_model_services(
        &self,
        req: Request<pb::ListModelServicesRequest>,
    ) -> R<pb::ListModelServicesResponse> {
        let req = self.auth.allow(req, Role::Viewer).await?;
        model_services::list(self, req).await
    }

    async fn update_model_service(
        &self,
        req: Request<pb::UpdateModelServiceRequest>,
    ) -> R<pb::ModelService> {
        let req = self.auth.allow(req, Role::Operator).await?;
        model_services::update(self, req).await
    }

    async fn delete_model_service(
        &self,
        req: Request<pb::DeleteModelServiceRequest>,
    ) -> R<pb::DeleteResponse> {
        let req = self.auth.allow(req, Role::Operator).await?;
        model_services::delete(self, req).await
    }

    async fn create_consumer_key(
        &self,
        req: Request<pb::CreateConsumerKeyRequest>,
    ) -> R<pb::CreateConsumerKeyResponse> {
        let req = self.auth.allow(req, Role::Operator).await?;
        consumer_keys::create(self, req).await
    }

    async fn get_consumer_key(
        &self,
        req: Request<pb::GetConsumerKeyRequest>,
    ) -> R<pb::ConsumerKey> {
        let req = self.auth.allow(req, Role::Viewer).await?;
        consumer_keys::get(self, req).await
    }

    async fn list_consumer_keys(
        &self,
        req: Request<pb::ListConsumerKeysRequest>,
    ) -> R<pb::ListConsumerKeysResponse> {
        let req = self.auth.allow(req, Role::Viewer).await?;
        consumer_keys::list(self, req).await
    }

    async fn update_consumer_key(
        &self,
        req: Request<pb::UpdateConsumerKeyRequest>,
    ) -> R<pb::ConsumerKey> {
        let req = self.auth.allow(req, Role::Operator).await?;
        consumer_keys::update(self, req).await
    }

    async fn enable_consumer_key(
        &self,
        req: Request<pb::EnableConsumerKeyRequest>,
    ) -> R<pb::ConsumerKey> {
        let req = self.auth.allow(req, Role::Operator).await?;
        let sel = |r: pb::EnableConsumerKeyRequest| r.selector.map(Selector::from);
        consumer_keys::set_status(self, req, sel, KeyStatus::Enabled).await
    }

    async fn disable_consumer_key(
        &self,
        req: Request<pb::DisableConsumerKeyRequest>,
    ) -> R<pb::ConsumerKey> {
        let req = self.auth.allow(req, Role::Operator).await?;
        let sel = |r: pb::DisableConsumerKeyRequest| r.selector.map(Selector::from);
        consumer_keys::set_status(self, req, sel, KeyStatus::Disabled).await
    }

    async fn bind_consumer_key(
        &self,
        req: Request<pb::BindConsumerKeyRequest>,
    ) -> R<pb::ConsumerKey> {
        let req = self.auth.allow(req, Role::Operator).await?;
        consumer_keys::bind(self, req).await
    }

    async fn unbind_consumer_key(
        &self,
        req: Request<pb::UnbindConsumerKeyRequest>,
    ) -> R<pb::ConsumerKey> {
        let req = self.auth.allow(req, Role::Operator).await?;
        consumer_keys::unbind(self, req).await
    }

    async fn delete_consumer_key(
        &self,
        req: Request<pb::DeleteConsumerKeyRequest>,
    ) -> R<pb::DeleteResponse> {
        let req = self.auth.allow(req, Role::Operator).await?;
        consumer_keys::delete(self, req).await
    }

    async fn rotate_consumer_key(
        &self,
        req: Request<pb::RotateConsumerKeyRequest>,
    ) -> R<pb::RotateConsumerKeyResponse> {
        let req = self.auth.allow(req, Role::Operator).await?;
        consumer_keys::rotate(self, req).await
    }

    async fn create_model_key(&self, req: Request<pb::CreateModelKeyRequest>) -> R<pb::ModelKey> {
        let req = self.auth.allow(req, Role::Operator).await?;
        model_keys::create(self, req).await
    }

    async fn get_model_key(&self, req: Request<pb::GetModelKeyRequest>) -> R<pb::ModelKey> {
        let req = self.auth.allow(req, Role::Viewer).await?;
        model_keys::get(self, req).await
    }

    async fn list_model_keys(
        &self,
        req: Request<pb::ListModelKeysRequest>,
    ) -> R<pb::ListModelKeysResponse> {
        let req = self.auth.allow(req, Role::Viewer).await?;
        model_keys::list(self, req).await
    }

    async fn update_model_key(&self, req: Request<pb::UpdateModelKeyRequest>) -> R<pb::ModelKey> {
        let req = self.auth.allow(req, Role::Operator).await?;
        model_keys::update(self, req).await
    }

    async fn enable_model_key(&self, req: Request<pb::EnableModelKeyRequest>) -> R<pb::ModelKey> {
        let req = self.auth.allow(req, Role::Operator).await?;
        let sel = |r: pb::EnableModelKeyRequest| r.selector.map(Selector::from);
        model_keys::set_status(self, req, sel, KeyStatus::Enabled).await
    }

    async fn disable_model_key(&self, req: Request<pb::DisableModelKeyRequest>) -> R<pb::ModelKey> {
        let req = self.auth.allow(req, Role::Operator).await?;
        let sel = |r: pb::DisableModelKeyRequest| r.selector.map(Selector::from);
        model_keys::set_status(self, req, sel, KeyStatus::Disabled).await
    }

    async fn bind_model_key(&self, req: Request<pb::BindModelKeyRequest>) -> R<pb::ModelKey> {
        let req = self.auth.allow(req, Role::Operator).await?;
        model_keys::bind(self, req).await
    }

    async fn unbind_model_key(&self, req: Request<pb::UnbindModelKeyRequest>) -> R<pb::ModelKey> {
        let req = self.auth.allow(req, Role::Operator).await?;
        model_keys::unbind(self, req).await
    }

    async fn delete_model_key(
        &self,
        req: Request<pb::DeleteModelKeyRequest>,
    ) -> R<pb::DeleteResponse> {
        let req = self.auth.allow(req, Role::Operator).await?;
        model_keys::delete(self, req).await
    }

    async fn get_key_references(
        &self,
        req: Request<pb::GetKeyReferencesRequest>,
    ) -> R<pb::GetKeyReferencesResponse> {
        let req = self.auth.allow(req, Role::Viewer).await?;
        inspect::references(self, req).await
    }

    async fn list_audit_events(
        &self,
        req: Request<pb::ListAuditEventsRequest>,
    ) -> R<pb::ListAuditEventsResponse> {
        let req = self.auth.allow(req, Role::Viewer).await?;
        inspect::audit_events(self, req).await
    }

    async fn get_snapshot_status(
        &self,
        req: Request<pb::GetSnapshotStatusRequest>,
    ) -> R<pb::GetSnapshotStatusResponse> {
        self.auth.allow(req, Role::Viewer).await?;
        inspect::snapshot_status(self).await
    }

    async fn get_usage(&self, req: Request<pb::GetUsageRequest>) -> R<pb::GetUsageResponse> {
        let req = self.auth.allow(req, Role::Viewer).await?;
        usage::get(self, req).await
    }

    async fn create_admin_token(
        &self,
        req: Request<pb::CreateAdminTokenRequest>,
    ) -> R<pb::CreateAdminTokenResponse> {
        let req = self.auth.allow(req, Role::Admin).await?;
        admin_tokens::create(self, req).await
    }

    async fn list_admin_tokens(
        &self,
        req: Request<pb::ListAdminTokensRequest>,
    ) -> R<pb::ListAdminTokensResponse> {
        let req = self.auth.allow(req, Role::Admin).await?;
        admin_tokens::list(self, req).await
    }

    async fn revoke_admin_token(
        &self,
        req: Request<pb::RevokeAdminTokenRequest>,
    ) -> R<pb::DeleteResponse> {
        let req = self.auth.allow(req, Role::Admin).await?;
        admin_tokens::revoke(self, req).await
    }
}
