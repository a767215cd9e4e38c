//! The checks the load generator and the tests present: deterministic seeded key values and
//! `CheckRequest`s shaped as Envoy sends them. Depends on the Envoy protos only.

use std::collections::HashMap;

use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};

/// The value of the i-th seeded bench key (deterministic, so the load generator can
/// present keys without a file of secrets).
pub fn seeded_key(i: u64) -> String {
    format!("kg-bench-{i:020}-0123456789abcdef")
}

/// A `CheckRequest` as Envoy sends it for `authorization: Bearer <key>` on a route whose
/// model service is `service`, from `peer`.
pub fn check_request(key: &str, service: &str, peer: &str) -> CheckRequest {
    let mut headers = HashMap::new();
    headers.insert("authorization".to_string(), format!("Bearer {key}"));
    headers.insert(":method".to_string(), "POST".to_string());
    headers.insert(":path".to_string(), "/v1/chat/completions".to_string());
    headers.insert("content-type".to_string(), "application/json".to_string());
    headers.insert("x-request-id".to_string(), "4f6a1c2e-bench".to_string());
    let mut ext = HashMap::new();
    ext.insert("model_service".to_string(), service.to_string());
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: peer.to_string(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path: "/v1/chat/completions".into(),
                    host: "gateway.local".into(),
                    protocol: "HTTP/1.1".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: ext,
            ..Default::default()
        }),
    }
}
