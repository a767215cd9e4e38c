//! The module's configuration as operators write it in Envoy YAML: the filter's
//! `filter_config` (a JSON object in a `google.protobuf.StringValue`) and each route's
//! `{"model_service": …, "model": …}`. Unknown keys and bad values refuse Envoy's config load with a
//! message naming the key.

use std::path::PathBuf;

use keygate::authz::model::ModelName;
use keygate::authz::outcome::{ALL_METADATA, METADATA_FIELDS, MetadataSelection};
use keygate::authz::{ClientIpSource, DecisionConfig};
use keygate::crypto::SecretUrl;
use keygate::distribution::subscriber::ClientTls;
use serde::Deserialize;

/// A URL that may carry a password: shown without it by `Debug` (see [`SecretUrl`]).
fn secret_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SecretUrl>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.map(SecretUrl::new))
}

/// The filter-level `filter_config`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSettings {
    /// The control plane's snapshot stream, e.g. `http://127.0.0.1:9002`.
    pub control_plane: String,
    /// The control plane's master key (decrypts model keys and the cache).
    pub master_key_file: PathBuf,
    /// Where the encrypted last-good snapshot is kept (created, or tightened, to mode 0700).
    pub data_dir: PathBuf,
    /// The subscriber token (at least 16 characters, as for `keygate authz`);
    /// `KEYGATE_SUBSCRIBER_TOKEN` in Envoy's environment otherwise.
    #[serde(default)]
    pub subscriber_token_file: Option<PathBuf>,
    /// Headers carrying the consumer key, in order (default authorization, x-api-key, api-key).
    #[serde(default)]
    pub credential_headers: Option<Vec<String>>,
    /// A query parameter carrying the consumer key (off unless set).
    #[serde(default)]
    pub credential_query_param: Option<String>,
    /// `peer` (default) or `xff:N`.
    #[serde(default)]
    pub client_ip_from: Option<String>,
    /// TLS toward an https:// control plane.
    #[serde(default)]
    pub control_plane_ca: Option<PathBuf>,
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Where the module's thread serves `/metrics` (Prometheus; the same metric names as
    /// `keygate authz`), `/healthz` and `/readyz`, e.g. `127.0.0.1:9103`. Off unless set.
    #[serde(default)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Which of SPEC §2's six dynamic-metadata fields an allowed request gets (default: all;
    /// `[]`: none). Envoy's cost of merging metadata is per field and is the largest part of
    /// the module's per-request cost; operators who neither log nor rate-limit on a field can
    /// leave it out. Denials always carry `deny_reason` (and the key's name and id).
    #[serde(default)]
    pub dynamic_metadata: Option<Vec<String>>,
    /// Meter allowed requests' responses (tokens per key, service and model, SPEC §8.2):
    /// on unless `false`.
    #[serde(default)]
    pub metering: Option<bool>,
    /// How often metered usage is reported to the control plane, e.g. `"1s"` (default) or
    /// `"500ms"`; between 100 ms and 1 h.
    #[serde(default)]
    pub usage_report_interval: Option<String>,
    /// Share rate-limit counts with the other data planes through this Redis
    /// (`redis://HOST:PORT[/DB]` or `redis+unix:///PATH`), as `keygate authz
    /// --rate-limit-redis`. Unset: this Envoy counts on its own.
    #[serde(default, deserialize_with = "secret_url")]
    pub rate_limit_redis: Option<SecretUrl>,
    /// How often rate-limit counts are synchronised through `rate_limit_redis`, e.g.
    /// `"200ms"` (default); between 10 ms and 60 s.
    #[serde(default)]
    pub rate_limit_sync_interval: Option<String>,
}

impl FilterSettings {
    /// Parses and checks `filter_config`; errors name the key.
    pub fn parse(bytes: &[u8]) -> Result<FilterSettings, String> {
        let s: FilterSettings =
            serde_json::from_slice(bytes).map_err(|e| format!("keygate filter_config: {e}"))?;
        if s.control_plane.is_empty() {
            return Err("keygate filter_config: control_plane must not be empty".into());
        }
        s.decision()?;
        s.metadata_fields()?;
        s.report_interval()?;
        s.rate_limit_sync_interval()?;
        if let Some(url) = &s.rate_limit_redis {
            keygate::authz::ratelimit_redis::RedisSync::new(url.expose(), "")
                .map_err(|e| format!("keygate filter_config: {e}"))?;
        }
        Ok(s)
    }

    /// `rate_limit_sync_interval` (200 ms unless set).
    pub fn rate_limit_sync_interval(&self) -> Result<std::time::Duration, String> {
        let Some(v) = &self.rate_limit_sync_interval else {
            return Ok(std::time::Duration::from_millis(200));
        };
        let d = humantime::parse_duration(v).map_err(|e| {
            format!(
                "keygate filter_config: rate_limit_sync_interval: {v:?} is not a duration ({e})"
            )
        })?;
        if d < std::time::Duration::from_millis(10) || d > std::time::Duration::from_secs(60) {
            return Err(format!(
                "keygate filter_config: rate_limit_sync_interval: {v:?} must be between 10ms and 60s"
            ));
        }
        Ok(d)
    }

    /// `usage_report_interval` (1 s unless set).
    pub fn report_interval(&self) -> Result<std::time::Duration, String> {
        let Some(v) = &self.usage_report_interval else {
            return Ok(std::time::Duration::from_secs(1));
        };
        let d = humantime::parse_duration(v).map_err(|e| {
            format!("keygate filter_config: usage_report_interval: {v:?} is not a duration ({e})")
        })?;
        if d < std::time::Duration::from_millis(100) || d > std::time::Duration::from_secs(3600) {
            return Err(format!(
                "keygate filter_config: usage_report_interval: {v:?} must be between 100ms and 1h"
            ));
        }
        Ok(d)
    }

    /// Which of [`METADATA_FIELDS`] to set (all unless `dynamic_metadata` says otherwise).
    pub fn metadata_fields(&self) -> Result<MetadataSelection, String> {
        let Some(list) = &self.dynamic_metadata else {
            return Ok(ALL_METADATA);
        };
        let mut on = [false; METADATA_FIELDS.len()];
        for f in list {
            match METADATA_FIELDS.iter().position(|n| n == f) {
                Some(i) => on[i] = true,
                None => {
                    return Err(format!(
                        "keygate filter_config: dynamic_metadata: {f:?} is not a field; expected any of {}",
                        METADATA_FIELDS.join(", ")
                    ));
                }
            }
        }
        Ok(on)
    }

    /// The decision settings (credential sources, client address).
    pub fn decision(&self) -> Result<DecisionConfig, String> {
        let client_ip: ClientIpSource = match &self.client_ip_from {
            None => ClientIpSource::Peer,
            Some(v) => v
                .parse()
                .map_err(|e| format!("keygate filter_config: client_ip_from: {e}"))?,
        };
        let headers = self
            .credential_headers
            .clone()
            .unwrap_or_else(|| DecisionConfig::default().credential_headers);
        DecisionConfig::new(&headers, self.credential_query_param.clone(), client_ip)
            .map_err(|(field, why)| format!("keygate filter_config: {field}: {why}"))
    }

    pub fn tls(&self) -> ClientTls {
        ClientTls {
            ca: self.control_plane_ca.clone(),
            cert: self.client_cert.clone(),
            key: self.client_key.clone(),
        }
    }
}

/// A route's `typed_per_filter_config`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// The model service this route's requests are authorized for (SPEC §2 step 4).
    #[serde(default)]
    pub model_service: Option<String>,
    /// The model this route's requests are for, whatever their body or path says (SPEC §8.1:
    /// a route's fixed model wins).
    #[serde(default)]
    pub model: Option<String>,
}

impl RouteSettings {
    pub fn parse(bytes: &[u8]) -> Result<RouteSettings, String> {
        let r: RouteSettings = serde_json::from_slice(bytes)
            .map_err(|e| format!("keygate per-route filter_config: {e}"))?;
        if r.model_service.as_deref() == Some("") {
            return Err(
                "keygate per-route filter_config: model_service must not be empty (omit it to refuse the route)"
                    .into(),
            );
        }
        if let Some(m) = &r.model
            && ModelName::new(m).is_none()
        {
            return Err(format!(
                "keygate per-route filter_config: model {m:?} must be 1 to {} visible ASCII characters",
                keygate::authz::model::MAX_MODEL_LEN
            ));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rate_limit_redis` may carry a password: kept for connecting, never in `Debug`.
    #[test]
    fn a_redis_password_never_shows_in_debug() {
        let json = br#"{"control_plane":"http://127.0.0.1:9002","master_key_file":"/k","data_dir":"/d","rate_limit_redis":"redis://:redis-s3cr3t@10.0.0.7:6379/1"}"#;
        let s = FilterSettings::parse(json).unwrap();
        assert_eq!(
            s.rate_limit_redis.as_ref().map(|u| u.expose()),
            Some("redis://:redis-s3cr3t@10.0.0.7:6379/1")
        );
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("10.0.0.7:6379/1"), "{shown}");
    }

    #[test]
    fn settings_errors_name_the_key() {
        let ok =
            br#"{"control_plane":"http://127.0.0.1:9002","master_key_file":"/k","data_dir":"/d"}"#;
        let s = FilterSettings::parse(ok).unwrap();
        assert_eq!(
            s.decision().unwrap().credential_headers,
            vec!["authorization", "x-api-key", "api-key"]
        );
        for (bad, names) in [
            (&br#"{"master_key_file":"/k","data_dir":"/d"}"#[..], "control_plane"),
            (
                br#"{"control_plane":"http://x","master_key_file":"/k","data_dir":"/d","colour":1}"#,
                "colour",
            ),
            (
                br#"{"control_plane":"http://x","master_key_file":"/k","data_dir":"/d","client_ip_from":"xff:0"}"#,
                "client_ip_from",
            ),
            (
                br#"{"control_plane":"http://x","master_key_file":"/k","data_dir":"/d","credential_headers":["a b"]}"#,
                "credential_headers",
            ),
            (b"not json", "filter_config"),
        ] {
            let e = FilterSettings::parse(bad).unwrap_err();
            assert!(e.contains(names), "{names} in {e}");
        }
        let some = br#"{"control_plane":"http://x","master_key_file":"/k","data_dir":"/d","dynamic_metadata":["consumer_id","model_service"]}"#;
        assert_eq!(
            FilterSettings::parse(some)
                .unwrap()
                .metadata_fields()
                .unwrap(),
            [false, true, false, false, true, false, false]
        );
        let bad = br#"{"control_plane":"http://x","master_key_file":"/k","data_dir":"/d","dynamic_metadata":["consumer_email"]}"#;
        let e = FilterSettings::parse(bad).unwrap_err();
        assert!(
            e.contains("dynamic_metadata") && e.contains("consumer_email"),
            "{e}"
        );
        assert!(RouteSettings::parse(br#"{"model_service":""}"#).is_err());
        assert!(
            RouteSettings::parse(br#"{"model_servce":"x"}"#)
                .unwrap_err()
                .contains("model_servce")
        );
        assert_eq!(
            RouteSettings::parse(br#"{"model_service":"openai"}"#)
                .unwrap()
                .model_service
                .as_deref(),
            Some("openai")
        );
    }
}
