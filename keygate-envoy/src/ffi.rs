//! The C ABI between Envoy 1.40.0 and this module (dynamic-module HTTP filter, ABI "v0.2.0").
//!
//! This is the only file of the crate that contains `unsafe`. It holds:
//! - the `#[repr(C)]` types and `extern "C"` declarations of the Envoy callbacks the module uses,
//!   copied from `source/extensions/dynamic_modules/abi/abi.h` (see each declaration);
//! - every `envoy_dynamic_module_on_*` hook Envoy 1.40 resolves for an HTTP filter, each of which
//!   catches unwinding and fails closed (a panic never crosses into Envoy);
//! - a small safe API (`FilterModule`, `ConfigEnvoy`, `Request`, `log`) for the rest of the crate.
//!
//! The ABI is pre-1.0 and changes between Envoy minor versions; Envoy does not check argument
//! types, so these declarations are pinned to Envoy 1.40.0
//! (commit 9e5580933739775e8bce696a57a2e1bc99368f23) and must be re-checked on any upgrade.
//! The crate must be built with `panic = "unwind"` (the default): with `panic = "abort"` the
//! `catch_unwind` guards below cannot catch anything and a panic kills Envoy.

use std::ffi::{CStr, c_char, c_void};
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;

/// The type implementing [`FilterModule`] that the hooks dispatch to.
type M = crate::Module;
type ModuleConfig = <M as FilterModule>::Config;
type ModulePerRoute = <M as FilterModule>::PerRoute;

/// Returned from `envoy_dynamic_module_on_program_init`; Envoy 1.40 logs
/// "Dynamic module ABI version v0.2.0 matched" for an exact match.
const ABI_VERSION: &CStr = c"v0.2.0";

/// Most metadata entries one batch call carries (kept on the stack).
pub const MAX_METADATA_BATCH: usize = 8;

/// Most headers a local reply may carry (kept on the stack).
pub const MAX_REPLY_HEADERS: usize = 8;

/// Most label names a counter may have (label buffers are built on the stack, no allocation).
pub const MAX_COUNTER_LABELS: usize = 8;

/// The local reply sent when `on_request_headers` panics.
pub(crate) const INTERNAL_ERROR_BODY: &str =
    r#"{"error":{"message":"internal error","type":"internal_error","code":"keygate_internal"}}"#;
const INTERNAL_ERROR_DETAILS: &str = "keygate_internal_error";

// =================================================================================================
// Raw ABI (abi.h of Envoy 1.40). Layouts are x86-64/aarch64 LP64; C enums are 32-bit integers and
// are carried as `u32` so that a value Envoy adds later can never be an invalid Rust enum.
// =================================================================================================

mod abi {
    use std::ffi::{c_char, c_void};

    /// `envoy_dynamic_module_type_envoy_buffer`: bytes owned by Envoy.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct EnvoyBuffer {
        pub ptr: *const c_char,
        pub length: usize,
    }

    /// `envoy_dynamic_module_type_module_buffer`: bytes owned by the module (Envoy copies them).
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct ModuleBuffer {
        pub ptr: *const c_char,
        pub length: usize,
    }

    /// `envoy_dynamic_module_type_module_key_value_pair`: `{ module_buffer key; module_buffer
    /// value; }` (32 bytes on LP64; see the batch setter's declaration).
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct ModuleKeyValuePair {
        pub key: ModuleBuffer,
        pub value: ModuleBuffer,
    }

    /// `envoy_dynamic_module_type_module_http_header`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct ModuleHttpHeader {
        pub key_ptr: *const c_char,
        pub key_length: usize,
        pub value_ptr: *const c_char,
        pub value_length: usize,
    }

    /// `envoy_dynamic_module_type_envoy_http_header` (only appears in hooks this module ignores).
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct EnvoyHttpHeader {
        pub key_ptr: *const c_char,
        pub key_length: usize,
        pub value_ptr: *const c_char,
        pub value_length: usize,
    }

    // envoy_dynamic_module_type_http_header_type
    pub const HEADER_TYPE_REQUEST_HEADER: u32 = 0;
    // envoy_dynamic_module_type_on_http_filter_request_headers_status (= FilterHeadersStatus)
    pub const HEADERS_STATUS_CONTINUE: u32 = 0;
    pub const HEADERS_STATUS_STOP_ITERATION: u32 = 1;
    // request_body / request_trailers / response_* statuses: 0 = Continue for all of them.
    pub const STATUS_CONTINUE: u32 = 0;
    // envoy_dynamic_module_type_metrics_result
    pub const METRICS_SUCCESS: u32 = 0;
    // envoy_dynamic_module_type_attribute_id_SourceAddress ("source.address"), the 25th entry.
    pub const ATTRIBUTE_SOURCE_ADDRESS: u32 = 24;

    unsafe extern "C" {
        // void envoy_dynamic_module_callback_log(envoy_dynamic_module_type_log_level level,
        //                                        envoy_dynamic_module_type_module_buffer message);
        pub fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);

        // bool envoy_dynamic_module_callback_log_enabled(envoy_dynamic_module_type_log_level level);
        pub fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;

        // envoy_dynamic_module_type_metrics_result
        // envoy_dynamic_module_callback_http_filter_config_define_counter(
        //     envoy_dynamic_module_type_http_filter_config_envoy_ptr filter_config_envoy_ptr,
        //     envoy_dynamic_module_type_module_buffer name,
        //     envoy_dynamic_module_type_module_buffer* label_names, size_t label_names_length,
        //     size_t* counter_id_ptr);
        // (label_names is non-const in abi.h; Envoy only reads it.)
        pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
            filter_config_envoy_ptr: *mut c_void,
            name: ModuleBuffer,
            label_names: *const ModuleBuffer,
            label_names_length: usize,
            counter_id_ptr: *mut usize,
        ) -> u32;

        // envoy_dynamic_module_type_metrics_result
        // envoy_dynamic_module_callback_http_filter_config_define_gauge(
        //     envoy_dynamic_module_type_http_filter_config_envoy_ptr filter_config_envoy_ptr,
        //     envoy_dynamic_module_type_module_buffer name,
        //     envoy_dynamic_module_type_module_buffer* label_names, size_t label_names_length,
        //     size_t* gauge_id_ptr);
        pub fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
            filter_config_envoy_ptr: *mut c_void,
            name: ModuleBuffer,
            label_names: *const ModuleBuffer,
            label_names_length: usize,
            gauge_id_ptr: *mut usize,
        ) -> u32;

        // envoy_dynamic_module_type_metrics_result
        // envoy_dynamic_module_callback_http_filter_set_gauge(
        //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr, size_t id,
        //     envoy_dynamic_module_type_module_buffer* label_values, size_t label_values_length,
        //     uint64_t value);
        pub fn envoy_dynamic_module_callback_http_filter_set_gauge(
            filter_envoy_ptr: *mut c_void,
            id: usize,
            label_values: *const ModuleBuffer,
            label_values_length: usize,
            value: u64,
        ) -> u32;

        // envoy_dynamic_module_type_metrics_result
        // envoy_dynamic_module_callback_http_filter_increment_counter(
        //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr, size_t id,
        //     envoy_dynamic_module_type_module_buffer* label_values, size_t label_values_length,
        //     uint64_t value);
        pub fn envoy_dynamic_module_callback_http_filter_increment_counter(
            filter_envoy_ptr: *mut c_void,
            id: usize,
            label_values: *const ModuleBuffer,
            label_values_length: usize,
            value: u64,
        ) -> u32;

        // bool envoy_dynamic_module_callback_http_get_header(
        //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr,
        //     envoy_dynamic_module_type_http_header_type header_type,
        //     envoy_dynamic_module_type_module_buffer key,
        //     envoy_dynamic_module_type_envoy_buffer* result_buffer, size_t index,
        //     size_t* optional_size);
        pub fn envoy_dynamic_module_callback_http_get_header(
            filter_envoy_ptr: *mut c_void,
            header_type: u32,
            key: ModuleBuffer,
            result_buffer: *mut EnvoyBuffer,
            index: usize,
            optional_size: *mut usize,
        ) -> bool;

        // bool envoy_dynamic_module_callback_http_set_header(
        //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr,
        //     envoy_dynamic_module_type_http_header_type header_type,
        //     envoy_dynamic_module_type_module_buffer key,
        //     envoy_dynamic_module_type_module_buffer value);
        // A null/empty value removes every value of the header; otherwise setCopy (one value).
        pub fn envoy_dynamic_module_callback_http_set_header(
            filter_envoy_ptr: *mut c_void,
            header_type: u32,
            key: ModuleBuffer,
            value: ModuleBuffer,
        ) -> bool;

        // void envoy_dynamic_module_callback_http_send_response(
        //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr, uint32_t status_code,
        //     envoy_dynamic_module_type_module_http_header* headers_vector,
        //     size_t headers_vector_size, envoy_dynamic_module_type_module_buffer body,
        //     envoy_dynamic_module_type_module_buffer details);
        // (headers_vector is non-const in abi.h; Envoy only reads it.)
        pub fn envoy_dynamic_module_callback_http_send_response(
            filter_envoy_ptr: *mut c_void,
            status_code: u32,
            headers_vector: *const ModuleHttpHeader,
            headers_vector_size: usize,
            body: ModuleBuffer,
            details: ModuleBuffer,
        );

        // void envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
        //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr,
        //     envoy_dynamic_module_type_module_buffer ns,
        //     envoy_dynamic_module_type_module_buffer key,
        //     envoy_dynamic_module_type_module_buffer value);
        pub fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
            filter_envoy_ptr: *mut c_void,
            ns: ModuleBuffer,
            key: ModuleBuffer,
            value: ModuleBuffer,
        );

        // void envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
        //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr,
        //     envoy_dynamic_module_type_module_buffer ns,
        //     const envoy_dynamic_module_type_module_key_value_pair* pairs, size_t pairs_size);
        // Not in the abi.h this crate could read (it predates the batch setter); checked
        // against the Envoy 1.40.0 binary itself (objdump of the exported symbol): rdi =
        // filter, rsi:rdx = ns, rcx = pairs, r8 = count (0: returns at once), each pair 32 bytes
        // read as key {ptr, len} at +0 and value {ptr, len} at +16, nothing returned in rax on
        // the count-0 path (void). Shown at run time by the access-log metadata tests.
        pub fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
            filter_envoy_ptr: *mut c_void,
            ns: ModuleBuffer,
            pairs: *const ModuleKeyValuePair,
            pairs_size: usize,
        );

        // envoy_dynamic_module_type_http_filter_per_route_config_module_ptr
        // envoy_dynamic_module_callback_get_most_specific_route_config(
        //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr);
        pub fn envoy_dynamic_module_callback_get_most_specific_route_config(
            filter_envoy_ptr: *mut c_void,
        ) -> *const c_void;

        // bool envoy_dynamic_module_callback_http_filter_get_attribute_string(
        //     envoy_dynamic_module_type_http_filter_envoy_ptr filter_envoy_ptr,
        //     envoy_dynamic_module_type_attribute_id attribute_id,
        //     envoy_dynamic_module_type_envoy_buffer* result);
        pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
            filter_envoy_ptr: *mut c_void,
            attribute_id: u32,
            result: *mut EnvoyBuffer,
        ) -> bool;
    }
}

use abi::{EnvoyBuffer, EnvoyHttpHeader, ModuleBuffer, ModuleHttpHeader};

/// A module buffer borrowing `bytes`. Envoy copies whatever it keeps, so the borrow only has to
/// outlive the callback it is passed to.
fn module_buffer(bytes: &[u8]) -> ModuleBuffer {
    ModuleBuffer {
        ptr: bytes.as_ptr().cast(),
        length: bytes.len(),
    }
}

/// The bytes of an Envoy buffer (empty for a null pointer).
///
/// # Safety
/// Unless `buf.ptr` is null, it must point to `buf.length` initialized bytes that stay valid and
/// unmodified for the caller-chosen lifetime `'b`.
unsafe fn envoy_bytes<'b>(buf: EnvoyBuffer) -> &'b [u8] {
    if buf.ptr.is_null() || buf.length == 0 {
        &[]
    } else {
        // SAFETY: non-null, and the caller guarantees `length` readable bytes valid for 'b.
        unsafe { std::slice::from_raw_parts(buf.ptr.cast::<u8>(), buf.length) }
    }
}

// =================================================================================================
// Safe API
// =================================================================================================

/// What the filter tells Envoy after looking at the request headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadersStatus {
    /// Pass the request on to the next filter (and the upstream).
    Continue,
    /// Stop the filter chain (use after `send_local_reply`).
    StopIteration,
}

/// Envoy log levels (`envoy_dynamic_module_type_log_level`); messages appear under Envoy's
/// `dynamic_modules` logger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

impl LogLevel {
    fn to_abi(self) -> u32 {
        match self {
            LogLevel::Trace => 0,
            LogLevel::Debug => 1,
            LogLevel::Info => 2,
            LogLevel::Warn => 3,
            LogLevel::Error => 4,
            LogLevel::Critical => 5,
        }
    }
}

/// Logs `msg` through Envoy's logger (`[dynamic_modules]`). Callable from any thread.
pub fn log(level: LogLevel, msg: &str) {
    // SAFETY: the buffer borrows `msg` for the duration of the call; Envoy copies it (abi.h:
    // module buffers are owned by the module) and the callback is thread-safe.
    unsafe { abi::envoy_dynamic_module_callback_log(level.to_abi(), module_buffer(msg.as_bytes())) }
}

/// Whether Envoy would print a message at `level` (cheap; use it to skip formatting).
pub fn log_enabled(level: LogLevel) -> bool {
    // SAFETY: takes a plain integer and reads Envoy's logger level; no pointers involved.
    unsafe { abi::envoy_dynamic_module_callback_log_enabled(level.to_abi()) }
}

/// The module's behaviour, implemented by `crate::Module`.
pub trait FilterModule {
    /// One filter configuration (shared by all worker threads).
    type Config: Send + Sync + 'static;
    /// One route's `typed_per_filter_config` (shared by all worker threads).
    type PerRoute: Send + Sync + 'static;
    /// Called once from on_program_init; false refuses the load.
    fn program_init() -> bool;
    /// filter_config bytes (a StringValue arrives as its string). Err(msg) rejects the config (log msg at error first).
    fn new_config(
        name: &str,
        config: &[u8],
        envoy: &mut ConfigEnvoy<'_>,
    ) -> Result<Self::Config, String>;
    /// A route's per-filter config bytes. Err(msg) rejects the route configuration.
    fn new_per_route(name: &str, config: &[u8]) -> Result<Self::PerRoute, String>;
    /// Runs on a worker thread for every request. A panic here becomes a local 500.
    fn on_request_headers(
        config: &Self::Config,
        req: &mut Request<'_, Self::PerRoute>,
        end_of_stream: bool,
    ) -> HeadersStatus;
}

/// Envoy's side of a filter configuration while `new_config` runs (the only time Envoy accepts new
/// metrics: it freezes stat creation once `on_http_filter_config_new` returns).
pub struct ConfigEnvoy<'a> {
    /// `envoy_dynamic_module_type_http_filter_config_envoy_ptr`.
    raw: *mut c_void,
    _lifetime: PhantomData<&'a mut ()>,
}

/// A counter defined by [`ConfigEnvoy::define_counter`]. Only valid with requests of the filter
/// configuration that defined it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterId {
    /// Envoy's id. Counters with and without labels live in separate id spaces in Envoy.
    id: usize,
    /// How many label names the counter was defined with.
    labels: usize,
}

/// A gauge without labels defined by [`ConfigEnvoy::define_gauge`]. Only valid with requests of
/// the filter configuration that defined it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GaugeId(usize);

/// `names` as module buffers on the stack (`None` if there are more than MAX_COUNTER_LABELS).
fn label_buffers(names: &[&str]) -> Option<[ModuleBuffer; MAX_COUNTER_LABELS]> {
    if names.len() > MAX_COUNTER_LABELS {
        return None;
    }
    let mut out = [module_buffer(&[]); MAX_COUNTER_LABELS];
    for (slot, name) in out.iter_mut().zip(names) {
        *slot = module_buffer(name.as_bytes());
    }
    Some(out)
}

impl ConfigEnvoy<'_> {
    /// Defines an Envoy counter. It shows in Envoy's `/stats` as
    /// `dynamicmodulescustom.<name>` (no labels) or, with label names, as
    /// `dynamicmodulescustom.<name>.<label>.<value>...` (Prometheus: `<name>{<label>="<value>"}`).
    /// Returns `None` if Envoy refuses it or there are more than MAX_COUNTER_LABELS labels.
    /// Increment with [`Request::increment_counter`] (no labels) or
    /// [`Request::increment_counter_labeled`].
    pub fn define_counter(&mut self, name: &str, labels: &[&str]) -> Option<CounterId> {
        let label_bufs = label_buffers(labels)?;
        let mut id: usize = 0;
        // SAFETY: `self.raw` is the filter_config_envoy_ptr Envoy passed to the running
        // on_http_filter_config_new (ConfigEnvoy cannot outlive that call). The name and label
        // buffers borrow live data for the duration of the call (Envoy copies them into its stat
        // name pool), `labels.len()` of them are initialized, and `id` is a valid out-pointer.
        let result = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_define_counter(
                self.raw,
                module_buffer(name.as_bytes()),
                label_bufs.as_ptr(),
                labels.len(),
                &mut id,
            )
        };
        (result == abi::METRICS_SUCCESS).then_some(CounterId {
            id,
            labels: labels.len(),
        })
    }

    /// Defines an Envoy gauge without labels (`dynamicmodulescustom.<name>` in `/stats`).
    /// Set it with [`Request::set_gauge`].
    pub fn define_gauge(&mut self, name: &str) -> Option<GaugeId> {
        let mut id: usize = 0;
        // SAFETY: as in `define_counter`: `self.raw` is the live filter_config_envoy_ptr of the
        // running on_http_filter_config_new; the name buffer borrows `name` for the call (Envoy
        // copies it); no label names (null pointer with length 0, which abi.h allows); `id` is a
        // valid out-pointer.
        let result = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_define_gauge(
                self.raw,
                module_buffer(name.as_bytes()),
                ptr::null(),
                0,
                &mut id,
            )
        };
        (result == abi::METRICS_SUCCESS).then_some(GaugeId(id))
    }
}

/// Tag at the start of every per-route object this module hands to Envoy. Envoy looks per-route
/// configs up by filter name only, so a misconfigured route could pair this filter with another
/// module's per-route object; the tag turns that into "no per-route config" instead of a type
/// confusion.
const PER_ROUTE_TAG: u64 = 0x6b65_7967_6174_6531; // "keygate1"

#[repr(C)]
struct PerRouteBox<P> {
    tag: u64,
    value: P,
}

/// One request while `on_request_headers` runs (worker thread; not `Send`).
pub struct Request<'a, P> {
    /// `envoy_dynamic_module_type_http_filter_envoy_ptr`.
    raw: *mut c_void,
    /// A local reply was sent: the hook must return StopIteration and not reply again.
    replied: bool,
    _lifetime: PhantomData<&'a P>,
}

impl<'a, P> Request<'a, P> {
    fn new(raw: *mut c_void) -> Self {
        Request {
            raw,
            replied: false,
            _lifetime: PhantomData,
        }
    }

    /// First value of a request header (`name` in lower case). The bytes are Envoy's own and are
    /// borrowed from `self`: Envoy keeps them valid until the hook returns *unless a header setter
    /// runs*, so the borrow checker forbids calling `set_header`/`remove_header` (or any `&mut self`
    /// method) while they are held; copy them first if needed.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        let mut out = EnvoyBuffer {
            ptr: ptr::null(),
            length: 0,
        };
        // SAFETY: `self.raw` is the filter_envoy_ptr of the running on_request_headers hook
        // (Request cannot outlive it); the key buffer borrows `name` for the call; `out` is a
        // valid out-pointer and optional_size may be null (abi.h).
        let found = unsafe {
            abi::envoy_dynamic_module_callback_http_get_header(
                self.raw,
                abi::HEADER_TYPE_REQUEST_HEADER,
                module_buffer(name.as_bytes()),
                &mut out,
                0,
                ptr::null_mut(),
            )
        };
        // SAFETY: on success `out` points into the request header map, which abi.h guarantees
        // valid until the end of the current hook unless a setter is called; the result borrows
        // `&self`, and every setter takes `&mut self`, so neither can happen while it is alive.
        found.then(|| unsafe { envoy_bytes(out) })
    }

    /// How many values the request header `name` has.
    pub fn header_count(&self, name: &str) -> usize {
        let mut out = EnvoyBuffer {
            ptr: ptr::null(),
            length: 0,
        };
        let mut count: usize = 0;
        // SAFETY: as in `header`; `count` is a valid out-pointer for optional_size, which Envoy
        // sets to the number of values even when index 0 does not exist.
        unsafe {
            abi::envoy_dynamic_module_callback_http_get_header(
                self.raw,
                abi::HEADER_TYPE_REQUEST_HEADER,
                module_buffer(name.as_bytes()),
                &mut out,
                0,
                &mut count,
            );
        }
        count
    }

    /// Replaces every value of a request header with `value`: the upstream receives exactly one.
    /// An empty `value` removes the header instead (Envoy's rule for this callback).
    #[must_use = "a header that was not set must fail the request closed"]
    pub fn set_header(&mut self, name: &str, value: &[u8]) -> bool {
        // SAFETY: `self.raw` is the live filter_envoy_ptr; both buffers borrow live data for the
        // call and Envoy copies them (setCopy). `&mut self` guarantees no borrowed header bytes
        // from `header()` are alive across this mutation.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                self.raw,
                abi::HEADER_TYPE_REQUEST_HEADER,
                module_buffer(name.as_bytes()),
                module_buffer(value),
            )
        };
        if !ok {
            log(
                LogLevel::Warn,
                "keygate: request headers unavailable; set_header failed",
            );
        }
        ok
    }

    /// Removes every value of a request header (set_header with a null value).
    #[must_use = "a credential that was not removed must fail the request closed"]
    pub fn remove_header(&mut self, name: &str) -> bool {
        let null_value = ModuleBuffer {
            ptr: ptr::null(),
            length: 0,
        };
        // SAFETY: as in `set_header`; a null value is the documented "remove" form (abi.h).
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_header(
                self.raw,
                abi::HEADER_TYPE_REQUEST_HEADER,
                module_buffer(name.as_bytes()),
                null_value,
            )
        }
    }

    /// The most specific `typed_per_filter_config` of the request's route (route, then virtual
    /// host, ...), or `None` when it has none. Valid for the whole hook: the stream holds the route.
    pub fn per_route(&self) -> Option<&'a P> {
        // SAFETY: `self.raw` is the live filter_envoy_ptr; the callback only reads the route.
        let raw =
            unsafe { abi::envoy_dynamic_module_callback_get_most_specific_route_config(self.raw) };
        if raw.is_null() {
            return None;
        }
        let boxed = raw.cast::<PerRouteBox<P>>();
        // SAFETY: a non-null pointer returned here is the `config_` Envoy stored from an
        // on_http_filter_per_route_config_new call for this filter's name: for this module a live
        // `Box<PerRouteBox<ModulePerRoute>>` (`#[repr(C)]`, tag first). Reading the tag is a plain
        // read of 8 bytes at the start of that heap object; should a misconfiguration pair this
        // filter with another module's per-route object, it reads 8 bytes of that heap object.
        let tag = unsafe { (*boxed).tag };
        if tag != PER_ROUTE_TAG {
            log(
                LogLevel::Error,
                "keygate: per-route config of another module ignored",
            );
            return None;
        }
        // SAFETY: the tag identifies our own `PerRouteBox`, and P is always ModulePerRoute
        // (Requests are only built by the request_headers hook below). Envoy frees it only in
        // on_http_filter_per_route_config_destroy, and the route holding it is kept alive by the
        // stream for the whole hook ('a); it is only ever shared (`&`), and P is Sync.
        Some(unsafe { &(*boxed).value })
    }

    /// The downstream peer address: Envoy's `source.address` attribute, i.e. the stream's
    /// downstream remote address. With `use_remote_address: true` (keygate's Envoy configs) that
    /// is the connection's peer (after a PROXY-protocol listener filter, if any), the same address
    /// ext_authz sends as `source.address`; with `use_remote_address: false` Envoy derives it from
    /// `x-forwarded-for` instead.
    pub fn downstream_remote_ip(&self) -> Option<IpAddr> {
        let mut out = EnvoyBuffer {
            ptr: ptr::null(),
            length: 0,
        };
        // SAFETY: `self.raw` is the live filter_envoy_ptr and `out` a valid out-pointer.
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.raw,
                abi::ATTRIBUTE_SOURCE_ADDRESS,
                &mut out,
            )
        };
        if !ok {
            return None;
        }
        // SAFETY: on success `out` points at the address string owned by the stream's connection
        // info, alive for the whole hook; it is parsed here and not kept.
        let text = unsafe { envoy_bytes(out) };
        // "1.2.3.4:5678" or "[::1]:5678"; a pipe path or anything else is not an IP.
        let addr: SocketAddr = std::str::from_utf8(text).ok()?.parse().ok()?;
        Some(addr.ip())
    }

    /// Sets string dynamic metadata `namespace.key = value` (readable in access logs as
    /// `%DYNAMIC_METADATA(namespace:key)%` and by later filters).
    pub fn set_metadata_string(&mut self, namespace: &str, key: &str, value: &str) {
        // SAFETY: `self.raw` is the live filter_envoy_ptr; the three buffers borrow live data for
        // the call and Envoy copies them into the stream's metadata.
        unsafe {
            abi::envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
                self.raw,
                module_buffer(namespace.as_bytes()),
                module_buffer(key.as_bytes()),
                module_buffer(value.as_bytes()),
            );
        }
    }

    /// Sets several string dynamic metadata entries under one namespace in one crossing (Envoy
    /// resolves the namespace and merges into its struct once). At most
    /// [`MAX_METADATA_BATCH`] entries (the pairs are built on the stack); extra ones are set
    /// one by one.
    pub fn set_metadata_strings(&mut self, namespace: &str, entries: &[(&str, &str)]) {
        let empty = abi::ModuleKeyValuePair {
            key: module_buffer(&[]),
            value: module_buffer(&[]),
        };
        let mut pairs = [empty; MAX_METADATA_BATCH];
        let n = entries.len().min(MAX_METADATA_BATCH);
        for (slot, (k, v)) in pairs.iter_mut().zip(entries) {
            *slot = abi::ModuleKeyValuePair {
                key: module_buffer(k.as_bytes()),
                value: module_buffer(v.as_bytes()),
            };
        }
        if n > 0 {
            // SAFETY: `self.raw` is the live filter_envoy_ptr; `pairs` holds `n` initialized
            // pairs whose buffers borrow `entries` (live for the call; Envoy copies them), laid
            // out as the 1.40 binary reads them (see the declaration).
            unsafe {
                abi::envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
                    self.raw,
                    module_buffer(namespace.as_bytes()),
                    pairs.as_ptr(),
                    n,
                );
            }
        }
        for (k, v) in entries.iter().skip(n) {
            self.set_metadata_string(namespace, k, v);
        }
    }

    /// Answers the request locally (Envoy adds content-length). `details` is logged as
    /// `%RESPONSE_CODE_DETAILS%` and must not contain whitespace. Return
    /// `HeadersStatus::StopIteration` afterwards (the adapter enforces it). Only the first reply
    /// of a request is sent.
    pub fn send_local_reply(
        &mut self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
        details: &str,
    ) {
        if self.replied {
            log(
                LogLevel::Error,
                "keygate: second local reply for one request ignored",
            );
            return;
        }
        let details = if details.is_empty() || details.contains(char::is_whitespace) {
            "keygate_local_reply"
        } else {
            details
        };
        // On the stack: a worker thread allocates nothing it can avoid.
        let empty = ModuleHttpHeader {
            key_ptr: ptr::null(),
            key_length: 0,
            value_ptr: ptr::null(),
            value_length: 0,
        };
        let mut raw = [empty; MAX_REPLY_HEADERS];
        if headers.len() > MAX_REPLY_HEADERS {
            log(
                LogLevel::Error,
                "keygate: local reply with too many headers; extra headers dropped",
            );
        }
        let n = headers.len().min(MAX_REPLY_HEADERS);
        for (slot, (k, v)) in raw.iter_mut().zip(headers) {
            *slot = ModuleHttpHeader {
                key_ptr: k.as_ptr().cast(),
                key_length: k.len(),
                value_ptr: v.as_ptr().cast(),
                value_length: v.len(),
            };
        }
        let raw_headers = &raw[..n];
        self.replied = true;
        // SAFETY: `self.raw` is the live filter_envoy_ptr; `raw_headers` holds `len()` initialized
        // headers whose pointers borrow `headers`, and body/details borrow live data, all for the
        // duration of the call (Envoy copies them into the reply). Envoy only reads the array.
        unsafe {
            abi::envoy_dynamic_module_callback_http_send_response(
                self.raw,
                status,
                raw_headers.as_ptr(),
                raw_headers.len(),
                module_buffer(body),
                module_buffer(details.as_bytes()),
            );
        }
    }

    /// Sets a gauge defined by this request's filter configuration.
    pub fn set_gauge(&mut self, id: GaugeId, value: u64) {
        // SAFETY: `self.raw` is the live filter_envoy_ptr of the running hook; no label values
        // (null with length 0, as the gauge has no labels). An id from another config is not UB:
        // Envoy bounds-checks it (MetricNotFound).
        let _ = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_set_gauge(
                self.raw,
                id.0,
                ptr::null(),
                0,
                value,
            )
        };
    }

    /// Adds `by` to a counter defined without labels. Ignored for a labeled counter.
    pub fn increment_counter(&mut self, id: CounterId, by: u64) {
        self.increment_counter_labeled(id, &[], by);
    }

    /// Adds `by` to a counter; `label_values` must match the label names it was defined with
    /// (same number, same order). Ignored (with an error log) otherwise.
    pub fn increment_counter_labeled(&mut self, id: CounterId, label_values: &[&str], by: u64) {
        if label_values.len() != id.labels {
            log(
                LogLevel::Error,
                "keygate: counter incremented with the wrong number of labels",
            );
            return;
        }
        let Some(values) = label_buffers(label_values) else {
            return;
        };
        // SAFETY: `self.raw` is the live filter_envoy_ptr; `values` holds `label_values.len()`
        // initialized buffers borrowing live strings for the call. An id from another config is
        // not UB: Envoy bounds-checks it (MetricNotFound).
        let result = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_increment_counter(
                self.raw,
                id.id,
                values.as_ptr(),
                label_values.len(),
                by,
            )
        };
        if result != abi::METRICS_SUCCESS {
            log(
                LogLevel::Debug,
                "keygate: counter increment refused by Envoy",
            );
        }
    }
}

// =================================================================================================
// Hooks exported to Envoy. Every one catches unwinding; none lets a panic reach Envoy.
// =================================================================================================

/// Runs `f`, turning a panic into `fallback` (for hooks with nothing to fail closed on).
fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

/// Routes panic messages to Envoy's log instead of stderr.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        log(LogLevel::Critical, &format!("keygate: {info}"));
    }));
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    let ok = guard(false, || {
        install_panic_hook();
        M::program_init()
    });
    if ok {
        ABI_VERSION.as_ptr()
    } else {
        ptr::null()
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    filter_config_envoy_ptr: *mut c_void,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    let created = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: (covers the next two blocks) Envoy passes views of the filter name and config strings it owns for the
        // whole call (filter_config.cc passes string_views of the config's own members).
        let name_bytes = unsafe { envoy_bytes(name) };
        // SAFETY: see above.
        let config_bytes = unsafe { envoy_bytes(config) };
        let Ok(name) = std::str::from_utf8(name_bytes) else {
            log(
                LogLevel::Error,
                "keygate: filter_name is not UTF-8; config rejected",
            );
            return ptr::null();
        };
        let mut envoy = ConfigEnvoy {
            raw: filter_config_envoy_ptr,
            _lifetime: PhantomData,
        };
        match M::new_config(name, config_bytes, &mut envoy) {
            Ok(cfg) => Box::into_raw(Box::new(cfg)).cast_const().cast::<c_void>(),
            Err(msg) => {
                log(
                    LogLevel::Error,
                    &format!("keygate: filter config rejected: {msg}"),
                );
                ptr::null()
            }
        }
    }));
    created.unwrap_or_else(|_| {
        log(
            LogLevel::Error,
            "keygate: filter config creation panicked; config rejected",
        );
        ptr::null()
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(
    filter_config_ptr: *const c_void,
) {
    guard((), || {
        if !filter_config_ptr.is_null() {
            // SAFETY: a non-null pointer here is one returned by on_http_filter_config_new
            // (Box<ModuleConfig>::into_raw); Envoy destroys each config exactly once, after the
            // last filter holding its shared_ptr is gone (filter.h `config_`).
            drop(unsafe { Box::from_raw(filter_config_ptr.cast_mut().cast::<ModuleConfig>()) });
        }
    });
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    let created = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: (covers the next two blocks) Envoy passes views of strings it owns for the whole call
        // (filter_config.cc passes string_views of the per-route proto's fields).
        let name_bytes = unsafe { envoy_bytes(name) };
        // SAFETY: see above.
        let config_bytes = unsafe { envoy_bytes(config) };
        let Ok(name) = std::str::from_utf8(name_bytes) else {
            log(
                LogLevel::Error,
                "keygate: per-route filter_name is not UTF-8; rejected",
            );
            return ptr::null();
        };
        match M::new_per_route(name, config_bytes) {
            Ok(value) => Box::into_raw(Box::new(PerRouteBox {
                tag: PER_ROUTE_TAG,
                value,
            }))
            .cast_const()
            .cast::<c_void>(),
            Err(msg) => {
                log(
                    LogLevel::Error,
                    &format!("keygate: per-route config rejected: {msg}"),
                );
                ptr::null()
            }
        }
    }));
    created.unwrap_or_else(|_| {
        log(
            LogLevel::Error,
            "keygate: per-route config creation panicked; rejected",
        );
        ptr::null()
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(
    filter_config_ptr: *const c_void,
) {
    guard((), || {
        if !filter_config_ptr.is_null() {
            // SAFETY: a non-null pointer here is one returned by
            // on_http_filter_per_route_config_new (Box<PerRouteBox<ModulePerRoute>>::into_raw),
            // destroyed exactly once by ~DynamicModuleHttpPerRouteFilterConfig.
            drop(unsafe {
                Box::from_raw(
                    filter_config_ptr
                        .cast_mut()
                        .cast::<PerRouteBox<ModulePerRoute>>(),
                )
            });
        }
    });
}

/// No per-request allocation: the "filter" Envoy keeps for a stream is the config pointer itself,
/// and `on_http_filter_destroy` is a no-op. Sound because the C++ DynamicModuleHttpFilter holds a
/// `shared_ptr` to its DynamicModuleHttpFilterConfig (filter.h `config_`), and the config calls
/// on_http_filter_config_destroy only in its destructor (filter_config.cc), i.e. after every filter
/// created from it has called on_http_filter_destroy. (A zero-sized Config still yields a non-null
/// pointer, so Envoy never mistakes it for a failure.)
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    filter_config_ptr: *const c_void,
    _filter_envoy_ptr: *mut c_void,
) -> *const c_void {
    filter_config_ptr
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(_filter_module_ptr: *const c_void) {}

/// Sends the fixed 500 reply without allocating (so it cannot panic itself).
fn send_internal_error(filter_envoy_ptr: *mut c_void) {
    const CT_KEY: &str = "content-type";
    const CT_VALUE: &str = "application/json";
    let headers = [ModuleHttpHeader {
        key_ptr: CT_KEY.as_ptr().cast(),
        key_length: CT_KEY.len(),
        value_ptr: CT_VALUE.as_ptr().cast(),
        value_length: CT_VALUE.len(),
    }];
    // SAFETY: `filter_envoy_ptr` is the live pointer of the running hook; every buffer points at
    // 'static data and the header array has exactly one initialized element.
    unsafe {
        abi::envoy_dynamic_module_callback_http_send_response(
            filter_envoy_ptr,
            500,
            headers.as_ptr(),
            headers.len(),
            module_buffer(INTERNAL_ERROR_BODY.as_bytes()),
            module_buffer(INTERNAL_ERROR_DETAILS.as_bytes()),
        );
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    end_of_stream: bool,
) -> u32 {
    let mut req = Request::<ModulePerRoute>::new(filter_envoy_ptr);
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        if filter_module_ptr.is_null() {
            panic!("on_http_filter_request_headers without a filter config");
        }
        // SAFETY: filter_module_ptr is what on_http_filter_new returned: the live
        // Box<ModuleConfig> from on_http_filter_config_new, which outlives this stream (see
        // on_http_filter_new). It is only ever read (shared `&`), and ModuleConfig is Sync.
        let config = unsafe { &*filter_module_ptr.cast::<ModuleConfig>() };
        M::on_request_headers(config, &mut req, end_of_stream)
    }));
    match outcome {
        Ok(HeadersStatus::Continue) if !req.replied => abi::HEADERS_STATUS_CONTINUE,
        Ok(_) => abi::HEADERS_STATUS_STOP_ITERATION,
        Err(_) => {
            // Fail closed. If the module had already replied, that reply stands.
            if !req.replied {
                guard((), || send_internal_error(filter_envoy_ptr));
            }
            abi::HEADERS_STATUS_STOP_ITERATION
        }
    }
}

// ---- Hooks Envoy 1.40 requires for an HTTP filter that this module does not use. ----

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    guard(abi::STATUS_CONTINUE, || abi::STATUS_CONTINUE)
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
) -> u32 {
    guard(abi::STATUS_CONTINUE, || abi::STATUS_CONTINUE)
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    guard(abi::STATUS_CONTINUE, || abi::STATUS_CONTINUE)
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    guard(abi::STATUS_CONTINUE, || abi::STATUS_CONTINUE)
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
) -> u32 {
    guard(abi::STATUS_CONTINUE, || abi::STATUS_CONTINUE)
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
) {
    guard((), || ());
}

#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _callout_id: u64,
    _result: u32,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _body_chunks: *mut EnvoyBuffer,
    _body_chunks_size: usize,
) {
    guard((), || ());
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _stream_id: u64,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
    guard((), || ());
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
    guard((), || ());
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _stream_id: u64,
    _trailers: *mut EnvoyHttpHeader,
    _trailers_size: usize,
) {
    guard((), || ());
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _stream_id: u64,
) {
    guard((), || ());
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _stream_id: u64,
    _reason: u32,
) {
    guard((), || ());
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _event_id: u64,
) {
    guard((), || ());
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
) {
    guard((), || ());
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
) {
    guard((), || ());
}

// =================================================================================================
// Unit-test stand-ins. A `cargo test` binary is an executable with no Envoy to resolve the
// callbacks, so code under test that reaches e.g. `log()` would not link. These definitions exist
// only in test builds (never in the cdylib Envoy loads): `log` prints to stderr, the rest report
// "not available" without touching their pointers.
// =================================================================================================

#[cfg(test)]
mod test_stubs {
    use super::abi::{EnvoyBuffer, ModuleBuffer, ModuleHttpHeader, ModuleKeyValuePair};
    use std::ffi::c_void;

    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_log(_level: u32, message: ModuleBuffer) {
        // SAFETY: `message` comes from `module_buffer`, i.e. a live Rust slice for this call.
        let bytes = unsafe {
            super::envoy_bytes(EnvoyBuffer {
                ptr: message.ptr,
                length: message.length,
            })
        };
        eprintln!("[envoy log stub] {}", String::from_utf8_lossy(bytes));
    }

    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_log_enabled(_level: u32) -> bool {
        true
    }

    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        _config: *mut c_void,
        _name: ModuleBuffer,
        _label_names: *const ModuleBuffer,
        _label_names_length: usize,
        _counter_id_ptr: *mut usize,
    ) -> u32 {
        1 // MetricNotFound
    }

    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_filter_increment_counter(
        _filter: *mut c_void,
        _id: usize,
        _label_values: *const ModuleBuffer,
        _label_values_length: usize,
        _value: u64,
    ) -> u32 {
        1 // MetricNotFound
    }

    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        _config: *mut c_void,
        _name: ModuleBuffer,
        _label_names: *const ModuleBuffer,
        _label_names_length: usize,
        _id: *mut usize,
    ) -> u32 {
        1 // MetricNotFound
    }

    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_filter_set_gauge(
        _filter: *mut c_void,
        _id: usize,
        _label_values: *const ModuleBuffer,
        _label_values_length: usize,
        _value: u64,
    ) -> u32 {
        1 // MetricNotFound
    }

    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_get_header(
        _filter: *mut c_void,
        _header_type: u32,
        _key: ModuleBuffer,
        _result: *mut EnvoyBuffer,
        _index: usize,
        _optional_size: *mut usize,
    ) -> bool {
        false
    }

    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_set_header(
        _filter: *mut c_void,
        _header_type: u32,
        _key: ModuleBuffer,
        _value: ModuleBuffer,
    ) -> bool {
        false
    }

    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_send_response(
        _filter: *mut c_void,
        _status_code: u32,
        _headers: *const ModuleHttpHeader,
        _headers_size: usize,
        _body: ModuleBuffer,
        _details: ModuleBuffer,
    ) {
    }

    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
        _filter: *mut c_void,
        _ns: ModuleBuffer,
        _pairs: *const ModuleKeyValuePair,
        _pairs_size: usize,
    ) {
    }

    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
        _filter: *mut c_void,
        _ns: ModuleBuffer,
        _key: ModuleBuffer,
        _value: ModuleBuffer,
    ) {
    }

    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_get_most_specific_route_config(
        _filter: *mut c_void,
    ) -> *const c_void {
        std::ptr::null()
    }

    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        _filter: *mut c_void,
        _attribute_id: u32,
        _result: *mut EnvoyBuffer,
    ) -> bool {
        false
    }

    #[test]
    fn log_links_and_runs_in_unit_tests() {
        super::log(super::LogLevel::Info, "hello from a unit test");
        assert!(super::log_enabled(super::LogLevel::Info));
    }

    #[test]
    fn label_buffers_cap() {
        assert!(super::label_buffers(&["a"; super::MAX_COUNTER_LABELS]).is_some());
        assert!(super::label_buffers(&["a"; super::MAX_COUNTER_LABELS + 1]).is_none());
    }
}
