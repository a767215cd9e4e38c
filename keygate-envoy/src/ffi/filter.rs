//! What a module implements to be an Envoy HTTP filter: the [`FilterModule`] trait and the
//! statuses its hooks return. No `unsafe`; depends on the safe API (`config`, `request`) only.
//! `declare_filter_module!` exports the hooks that dispatch to one implementation.

use super::{ConfigEnvoy, Request};

/// What the filter tells Envoy after looking at request or response headers (or trailers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadersStatus {
    /// Pass the headers on to the next filter (and the upstream or the client).
    Continue,
    /// Stop the filter chain: after `send_local_reply`, or to hold the headers until a body
    /// hook decides (Envoy keeps calling the body hooks).
    StopIteration,
}

impl HeadersStatus {
    pub(super) fn code(self) -> u32 {
        match self {
            HeadersStatus::Continue => super::abi::STATUS_CONTINUE,
            HeadersStatus::StopIteration => super::abi::HEADERS_STATUS_STOP_ITERATION,
        }
    }
}

/// What the filter tells Envoy after looking at a chunk of a request or response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyStatus {
    /// Pass the chunk on to the next filter (at the end of a held body: the headers and the
    /// whole body go on).
    Continue,
    /// Hold the chunk in Envoy's buffer (bounded by the stream's buffer limit: over it Envoy
    /// answers 413 itself) and wait for more.
    StopIterationAndBuffer,
    /// Stop without buffering (use after `send_local_reply`).
    StopIterationNoBuffer,
}

impl BodyStatus {
    pub(super) fn code(self) -> u32 {
        match self {
            BodyStatus::Continue => super::abi::STATUS_CONTINUE,
            BodyStatus::StopIterationAndBuffer => super::abi::BODY_STATUS_STOP_ITERATION_AND_BUFFER,
            BodyStatus::StopIterationNoBuffer => super::abi::BODY_STATUS_STOP_ITERATION_NO_BUFFER,
        }
    }
}

/// The module's behaviour. Only the request-headers hook is required: every other stream hook
/// defaults to "continue", so a module overrides only those it needs. A hook that replies locally
/// stops the stream whatever it returns; a hook that panics fails closed (a local 500).
pub trait FilterModule {
    /// One filter configuration (shared by all worker threads).
    type Config: Send + Sync + 'static;
    /// One route's `typed_per_filter_config` (shared by all worker threads).
    type PerRoute: Send + Sync + 'static;
    /// One stream's state, made when Envoy creates the stream's filter and dropped with it
    /// (hooks of one stream run one at a time on one worker thread).
    type Stream: Default + 'static;

    /// Called once from on_program_init; false refuses the load.
    fn program_init() -> bool;

    /// filter_config bytes (a StringValue arrives as its string). Err(msg) rejects the config
    /// (msg is logged at error level).
    fn new_config(
        name: &str,
        config: &[u8],
        envoy: &mut ConfigEnvoy<'_>,
    ) -> Result<Self::Config, String>;

    /// A route's per-filter config bytes. Err(msg) rejects the route configuration.
    fn new_per_route(name: &str, config: &[u8]) -> Result<Self::PerRoute, String>;

    /// Runs on a worker thread for every request.
    fn on_request_headers(
        config: &Self::Config,
        stream: &mut Self::Stream,
        req: &mut Request<'_, Self::PerRoute>,
        end_of_stream: bool,
    ) -> HeadersStatus;

    /// Runs on a worker thread for each chunk of a request body.
    fn on_request_body(
        _config: &Self::Config,
        _stream: &mut Self::Stream,
        _req: &mut Request<'_, Self::PerRoute>,
        _end_of_stream: bool,
    ) -> BodyStatus {
        BodyStatus::Continue
    }

    /// Runs on a worker thread when the request ends with trailers (its body hooks then never
    /// see the end of the stream).
    fn on_request_trailers(
        _config: &Self::Config,
        _stream: &mut Self::Stream,
        _req: &mut Request<'_, Self::PerRoute>,
    ) -> HeadersStatus {
        HeadersStatus::Continue
    }

    /// Runs on a worker thread for the response headers.
    fn on_response_headers(
        _config: &Self::Config,
        _stream: &mut Self::Stream,
        _req: &mut Request<'_, Self::PerRoute>,
        _end_of_stream: bool,
    ) -> HeadersStatus {
        HeadersStatus::Continue
    }

    /// Runs on a worker thread for each chunk of a response body.
    fn on_response_body(
        _config: &Self::Config,
        _stream: &mut Self::Stream,
        _req: &mut Request<'_, Self::PerRoute>,
        _end_of_stream: bool,
    ) -> BodyStatus {
        BodyStatus::Continue
    }
}
