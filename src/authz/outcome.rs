//! What a data plane does with a request once `decide()` has spoken, in terms of HTTP rather
//! than of any one API: the header to set, the credentials to remove, the dynamic metadata,
//! or the local reply. Each adapter (ext_authz, the Envoy module) only translates an
//! [`Outcome`] into its own calls, so the two can never drift apart. Depends on `decision`
//! and `snapshot`; allocation-free (ids are formatted into caller buffers).

use uuid::Uuid;

use super::decision::{
    Allowed, Decision, DecisionConfig, DenyReason, RequestView, credential_headers_present,
    credential_param_present,
};
use super::model::ModelName;
use super::ratelimit::{Admission, LimitKind, RateLimiter};
use crate::snapshot::KeyEntry;

/// The dynamic-metadata namespace of the fields below
/// (`%DYNAMIC_METADATA(keygate:consumer)%` in the module; ext_authz puts them under the filter's
/// own namespace).
pub const METADATA_NAMESPACE: &str = "keygate";

/// The metadata fields of an allowed request, in their fixed order (names and ids, never
/// values).
pub const METADATA_FIELDS: [&str; 7] = [
    "consumer",
    "consumer_id",
    "consumer_key",
    "consumer_key_id",
    "model_service",
    "model_key",
    "model",
];

/// Which of [`METADATA_FIELDS`] an allowed request gets (all by default).
pub type MetadataSelection = [bool; METADATA_FIELDS.len()];

/// Every metadata field on.
pub const ALL_METADATA: MetadataSelection = [true; METADATA_FIELDS.len()];

/// Set on every metered request toward the vendor: a response is metered from its bytes, so
/// it must come uncompressed (the SDKs ask for gzip). Envoy's compressor filter, placed before
/// keygate's, can still compress toward the client after metering.
pub const METERED_ACCEPT_ENCODING: (&str, &str) = ("accept-encoding", "identity");

/// The content type of every local reply.
pub const REPLY_CONTENT_TYPE: (&str, &str) = ("content-type", "application/json");

/// A metadata value: a name borrowed from the snapshot, or an id formatted on demand.
#[derive(Clone, Copy, Debug)]
pub enum MetaValue<'s> {
    Text(&'s str),
    Id(Uuid),
}

impl<'s> MetaValue<'s> {
    /// The value as text; an id is written into `buf` (no allocation).
    pub fn as_str<'b>(&'b self, buf: &'b mut [u8; 36]) -> &'b str
    where
        's: 'b,
    {
        match self {
            MetaValue::Text(s) => s,
            MetaValue::Id(id) => id.hyphenated().encode_lower(buf),
        }
    }
}

/// The decision, as something to apply.
#[derive(Debug)]
pub enum Outcome<'s, 'c> {
    Admit(Admit<'s, 'c>),
    Refuse(Refusal<'s>),
}

impl<'s, 'c> Outcome<'s, 'c> {
    /// The outcome of `decision` for `req` under `cfg`.
    pub fn of(decision: Decision<'s>, cfg: &'c DecisionConfig) -> Self {
        match decision {
            Decision::Allow(allowed) => Outcome::Admit(Admit { allowed, cfg }),
            Decision::Deny(d) => Outcome::Refuse(Refusal {
                reason: d.reason,
                key: d.key,
                model: d.model,
                retry_after_secs: None,
            }),
            // A data plane that decides without reading the body refuses what needs it.
            Decision::NeedBody => Outcome::Refuse(Refusal {
                reason: DenyReason::ModelUnknown,
                key: None,
                model: None,
                retry_after_secs: None,
            }),
        }
    }

    /// The rate limits of an admitted request (SPEC §8.3), taken from `limiter` at `now`: the
    /// key's and its consumer's requests per minute are taken now, and a spent token allowance
    /// refuses (429 `rate_limit_exceeded`, with `retry-after`). A refusal takes nothing. Keys
    /// and consumers without per-minute limits cost a branch.
    #[inline]
    pub fn rate_limited(self, limiter: &RateLimiter, now: crate::domain::Timestamp) -> Self {
        let Outcome::Admit(a) = self else {
            return self;
        };
        let key = a.allowed.key;
        let consumer = a.allowed.consumer;
        if key.limits.is_rate_unlimited() && consumer.limits.is_rate_unlimited() {
            return Outcome::Admit(a);
        }
        let (key_limits, consumer_limits) = (key.limits.per_minute(), consumer.limits.per_minute());
        match limiter.admit(
            (key.id, &key_limits),
            Some((consumer.id, &consumer_limits)),
            now.0,
        ) {
            Admission::Admit => Outcome::Admit(a),
            Admission::Refuse {
                kind,
                retry_after_secs,
            } => Outcome::Refuse(Refusal {
                reason: match kind {
                    LimitKind::Requests => DenyReason::RequestRateLimited,
                    LimitKind::Tokens => DenyReason::TokenRateLimited,
                },
                key: Some(key),
                model: a.allowed.model,
                retry_after_secs: Some(retry_after_secs),
            }),
        }
    }

    /// The refusal of a data plane that has no snapshot yet.
    pub fn not_ready() -> Self {
        Outcome::Refuse(Refusal::not_ready())
    }
}

/// An allowed request: inject the vendor header, strip the consumer's credentials, tag it.
#[derive(Debug)]
pub struct Admit<'s, 'c> {
    pub allowed: Allowed<'s>,
    cfg: &'c DecisionConfig,
}

impl<'s, 'c> Admit<'s, 'c> {
    /// The vendor header, set with overwrite semantics (the upstream receives exactly one value).
    pub fn vendor_header(&self) -> (&'s str, &'s str) {
        (
            &self.allowed.service.auth_header,
            self.allowed.model_key.header_value.expose(),
        )
    }

    /// Every credential header present on the request except the vendor header (which is
    /// overwritten, not removed). What is accepted as a credential is what is removed.
    pub fn headers_to_remove<'r, R: RequestView>(
        &'r self,
        req: &'r R,
    ) -> impl Iterator<Item = &'c str> + use<'r, 'c, R> {
        credential_headers_present(self.cfg, req, &self.allowed.service.auth_header)
    }

    /// The credential query parameter, when the request carries it.
    pub fn query_param_to_remove(&self, req: &impl RequestView) -> Option<&'c str> {
        credential_param_present(self.cfg, req)
    }

    /// The selected metadata fields with their values, in [`METADATA_FIELDS`] order (`model`
    /// only when the requested model is known).
    pub fn metadata<'a>(
        &'a self,
        selection: &MetadataSelection,
    ) -> impl Iterator<Item = (&'static str, MetaValue<'a>)> + use<'a, 's, 'c> {
        let a = &self.allowed;
        let values = [
            Some(MetaValue::Text(&a.consumer.name)),
            Some(MetaValue::Id(a.consumer.id)),
            Some(MetaValue::Text(&a.key.name)),
            Some(MetaValue::Id(a.key.id)),
            Some(MetaValue::Text(&a.service.name)),
            Some(MetaValue::Text(&a.model_key.name)),
            a.model.as_ref().map(|m| MetaValue::Text(m.as_str())),
        ];
        METADATA_FIELDS
            .into_iter()
            .zip(values)
            .zip(*selection)
            .filter_map(|((field, value), on)| Some((field, value?)).filter(|_| on))
    }
}

/// A refused request: a local reply with SPEC §2's body, and the reason in metadata.
#[derive(Debug)]
pub struct Refusal<'s> {
    pub reason: DenyReason,
    /// The presented key's record when it was recognised (for logs and metadata).
    pub key: Option<&'s KeyEntry>,
    /// The requested model, when it was read.
    pub model: Option<ModelName>,
    /// A rate limit's refusal: whole seconds until it admits again (`retry-after`).
    pub retry_after_secs: Option<u64>,
}

impl<'s> Refusal<'s> {
    /// The refusal of a data plane that has no snapshot yet (`keygate_not_ready`).
    pub fn not_ready() -> Self {
        Refusal {
            reason: DenyReason::NotReady,
            key: None,
            model: None,
            retry_after_secs: None,
        }
    }

    /// The headers of the local reply besides the content type: `retry-after` on a rate
    /// limit's refusal; `x-should-retry: false` on a spent budget, which the vendors' SDKs
    /// obey (a budget does not re-open in the seconds their retries wait). `buf` holds the
    /// number's text.
    pub fn extra_headers<'b>(
        &self,
        buf: &'b mut itoa::Buffer,
    ) -> impl Iterator<Item = (&'static str, &'b str)> + use<'b> {
        let retry_after = self
            .retry_after_secs
            .map(|secs| ("retry-after", buf.format(secs)));
        let no_retry =
            (self.reason == DenyReason::InsufficientQuota).then_some(("x-should-retry", "false"));
        retry_after.into_iter().chain(no_retry)
    }

    /// The HTTP status of the local reply.
    pub fn status(&self) -> u16 {
        self.reason.http_status()
    }

    /// The JSON body of the local reply (every 401 body is the same bytes).
    pub fn body(&self) -> &'static str {
        self.reason.body()
    }

    /// `deny_reason`, then the recognised key's name and id, then the model when it was read.
    pub fn metadata<'a>(
        &'a self,
    ) -> impl Iterator<Item = (&'static str, MetaValue<'a>)> + use<'a, 's> {
        let reason = std::iter::once(("deny_reason", MetaValue::Text(self.reason.as_str())));
        let key = self.key.into_iter().flat_map(|k| {
            [
                ("consumer_key", MetaValue::Text(&k.name)),
                ("consumer_key_id", MetaValue::Id(k.id)),
            ]
        });
        let model = self
            .model
            .as_ref()
            .map(|m| ("model", MetaValue::Text(m.as_str())));
        reason.chain(key).chain(model)
    }
}
