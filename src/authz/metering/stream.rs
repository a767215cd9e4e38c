//! One allowed request's metering, as both data planes hold it per stream, and the tag that lets
//! the ext_proc service trust an attribution it did not decide.

use super::{Metered, Reading, ResponseMeter, Tokens};
use std::sync::Arc;

use crate::authz::ratelimit::RateLimiter;
use crate::usage::{Counts, Tally, UsageKey, UsageKeyRef};

/// The metering of one allowed request, from the decision to the end of its response: what
/// both data planes hold per stream. Created on an allow, fed the response, and recorded into
/// the [`Tally`] exactly once — at the end of the response, or when the stream is torn down
/// earlier (a client that goes away mid-stream is still charged what the vendor reported).
#[derive(Debug)]
pub struct StreamMetering {
    key: UsageKey,
    /// Boxed: the metering is moved from the decision into the stream's state while the meter
    /// (most of a kilobyte) is made only when the response starts; moving it inline cost
    /// more than the allocation.
    meter: Option<Box<ResponseMeter>>,
    /// The rate limiter its tokens are charged to at the end (SPEC §8.3).
    charge: Option<Arc<RateLimiter>>,
}

impl StreamMetering {
    /// The metering of an allowed request; `model` is the requested model when the decision
    /// knew it (it wins over the response's).
    pub fn new(
        consumer_key: uuid::Uuid,
        consumer: Option<uuid::Uuid>,
        model_service: uuid::Uuid,
        model: Option<&str>,
    ) -> Self {
        StreamMetering {
            key: UsageKey {
                consumer_key,
                consumer,
                model_service,
                model: model.unwrap_or_default().to_owned(),
            },
            meter: None,
            charge: None,
        }
    }

    /// Also charges the response's tokens (input + output) to the token limits of the key and
    /// consumer in `limiter` when it is recorded.
    pub fn charging(mut self, limiter: Arc<RateLimiter>) -> Self {
        self.charge = Some(limiter);
        self
    }

    /// The metering of an allowed decision.
    pub fn of(allowed: &crate::authz::decision::Allowed<'_>) -> Self {
        StreamMetering::new(
            allowed.key.id,
            allowed.key.consumer,
            allowed.service.id,
            allowed.model.as_ref().map(|m| m.as_str()),
        )
    }

    /// The response's headers arrived.
    pub fn response_headers(
        &mut self,
        status: u16,
        content_type: Option<&[u8]>,
        content_encoding: Option<&[u8]>,
    ) {
        self.meter = Some(Box::new(ResponseMeter::new(
            status,
            content_type,
            content_encoding,
        )));
    }

    /// The next chunk of the response body.
    pub fn response_body(&mut self, chunk: &[u8]) {
        if let Some(m) = &mut self.meter {
            m.feed(chunk);
        }
    }

    /// Records the request into `tally` (consumes the metering: once per request). A request
    /// whose response never started (the client left first) is a request without counts.
    pub fn finish(self, tally: &Tally) {
        let metered = match self.meter {
            Some(m) => m.finish(),
            None => Metered {
                reading: Reading::Unreadable,
                tokens: Tokens::default(),
                model: None,
            },
        };
        if let Some(reason) = metered.reading.unparsed_reason() {
            crate::metrics::METRICS
                .usage_unparsed
                .with_label_values(&[reason])
                .inc();
        }
        if let Some(limiter) = &self.charge {
            let tokens = metered.tokens.input.saturating_add(metered.tokens.output);
            limiter.charge_admitted(
                self.key.consumer_key,
                self.key.consumer,
                tokens,
                crate::domain::Timestamp::now().0,
            );
        }
        // The request's model, else the response's.
        let model = match &metered.model {
            Some(m) if self.key.model.is_empty() => m.as_str(),
            _ => &self.key.model,
        };
        let key = UsageKeyRef {
            consumer_key: self.key.consumer_key,
            consumer: self.key.consumer,
            model_service: self.key.model_service,
            model,
        };
        tally.record_ref(key, Counts::from(&metered));
    }
}

/// The metadata field ext_authz adds to an allowed request for the ext_proc metering: a MAC
/// (under the pepper only keygate holds) over what the usage will be attributed to, so a caller
/// of the ExternalProcessor cannot bill another key by writing its id into the metadata.
pub const METERING_TAG_FIELD: &str = "metering_tag";

/// The metadata field ext_authz adds (`"1"`) when the key or its consumer has a tokens-per-minute
/// limit: the ext_proc metering then charges the answer's tokens to the rate limiter (SPEC §8.3).
pub const TOKEN_LIMITED_FIELD: &str = "token_limited";

/// The tag of an allowed request's attribution (hex): key id, consumer id (empty when
/// unbound), model service name, model (empty when not read).
pub fn metering_tag(
    hasher: &crate::crypto::KeyHasher,
    key: uuid::Uuid,
    consumer: Option<uuid::Uuid>,
    service: &str,
    model: &str,
) -> String {
    let consumer = consumer.map(|c| *c.as_bytes());
    let tag = hasher.hash_parts(&[
        b"keygate metering tag v1",
        key.as_bytes(),
        consumer.as_ref().map_or(&[][..], |c| &c[..]),
        service.as_bytes(),
        model.as_bytes(),
    ]);
    hex::encode(&tag[..16])
}

impl From<&Metered> for Counts {
    /// One request and its tokens: an error response counts in `error_responses`, a success
    /// without counts in `unparsed`.
    fn from(m: &Metered) -> Self {
        Counts {
            requests: 1,
            error_responses: u64::from(m.reading == Reading::Error),
            unparsed: u64::from(m.reading.unparsed_reason().is_some()),
            input_tokens: m.tokens.input,
            output_tokens: m.tokens.output,
            cached_input_tokens: m.tokens.cached_input,
        }
    }
}
