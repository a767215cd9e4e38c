//! Generated protobuf and gRPC code for keygate's own APIs, and the descriptor set that
//! gRPC reflection serves.
#![allow(clippy::all, missing_docs)]

pub mod admin {
    pub mod v1 {
        tonic::include_proto!("keygate.admin.v1");
    }
}

pub mod snapshot {
    pub mod v1 {
        tonic::include_proto!("keygate.snapshot.v1");
    }
}

/// Every keygate proto file, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/keygate_descriptor.bin"));

mod redacted_debug {
    //! `Debug` for the messages that carry key values: every field but the value.
    use super::admin::v1::{
        CreateAdminTokenResponse, CreateConsumerKeyRequest, CreateConsumerKeyResponse,
        CreateModelKeyRequest,
    };
    use std::fmt;

    fn redacted(v: &str) -> &'static str {
        if v.is_empty() { "" } else { "[redacted]" }
    }

    impl fmt::Debug for CreateConsumerKeyRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("CreateConsumerKeyRequest")
                .field("name", &self.name)
                .field("description", &self.description)
                .field("generation_method", &self.generation_method)
                .field("value", &redacted(&self.value))
                .field("secret_ref", &self.secret_ref)
                .field("consumer", &self.consumer)
                .field("scope", &self.scope)
                .field("ip_allowlist", &self.ip_allowlist)
                .field("expire_time", &self.expire_time)
                .finish()
        }
    }

    impl fmt::Debug for CreateConsumerKeyResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("CreateConsumerKeyResponse")
                .field("key", &self.key)
                .field("value", &redacted(&self.value))
                .finish()
        }
    }

    impl fmt::Debug for CreateAdminTokenResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("CreateAdminTokenResponse")
                .field("token", &self.token)
                .field("value", &redacted(&self.value))
                .finish()
        }
    }

    #[cfg(test)]
    #[test]
    fn an_admin_token_value_never_shows_in_debug() {
        let r = CreateAdminTokenResponse {
            token: None,
            value: "kga-secret-value-0123456789abcdef".into(),
        };
        let shown = format!("{r:?}");
        assert!(!shown.contains("kga-secret"), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
    }

    impl fmt::Debug for CreateModelKeyRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("CreateModelKeyRequest")
                .field("name", &self.name)
                .field("description", &self.description)
                .field("generation_method", &self.generation_method)
                .field("value", &redacted(&self.value))
                .field("secret_ref", &self.secret_ref)
                .field("model_services", &self.model_services)
                .finish()
        }
    }
}
