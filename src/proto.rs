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
        CreateModelKeyRequest, RotateConsumerKeyRequest, RotateConsumerKeyResponse,
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

    impl fmt::Debug for RotateConsumerKeyRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            use super::admin::v1::rotate_consumer_key_request::Selector;
            let selector = match &self.selector {
                Some(Selector::Id(v)) => format!("id {v:?}"),
                Some(Selector::Name(v)) => format!("name {v:?}"),
                None => String::new(),
            };
            f.debug_struct("RotateConsumerKeyRequest")
                .field("selector", &selector)
                .field("overlap", &self.overlap)
                .field("value", &redacted(&self.value))
                .finish()
        }
    }

    impl fmt::Debug for RotateConsumerKeyResponse {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("RotateConsumerKeyResponse")
                .field("key", &self.key)
                .field("value", &redacted(&self.value))
                .finish()
        }
    }

    #[cfg(test)]
    #[test]
    fn a_rotated_value_never_shows_in_debug() {
        let secret = "kg-rotated-secret-value-0123456789";
        let req = RotateConsumerKeyRequest {
            selector: None,
            overlap: None,
            value: secret.into(),
        };
        let resp = RotateConsumerKeyResponse {
            key: None,
            value: secret.into(),
        };
        for shown in [format!("{req:?}"), format!("{resp:?}")] {
            assert!(!shown.contains("rotated-secret"), "{shown}");
            assert!(shown.contains("[redacted]"), "{shown}");
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
