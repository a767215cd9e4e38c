//! One HTTP stream while a hook runs: reading and editing request headers, the route's per-route
//! config, the peer address, dynamic metadata, local replies and the stats a configuration
//! defined. Depends on `abi`, `config` and `log`.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::ptr;

use super::abi::{
    self, EnvoyBuffer, EnvoyHttpHeader, ModuleBuffer, ModuleHttpHeader, envoy_bytes, module_buffer,
};
use super::{CounterId, GaugeId, LogLevel, log};

/// Most metadata entries one batch call carries (kept on the stack).
pub const MAX_METADATA_BATCH: usize = 8;

/// Most headers a local reply may carry (kept on the stack).
pub const MAX_REPLY_HEADERS: usize = 8;

/// Tag at the start of every per-route object this module hands to Envoy. Envoy looks per-route
/// configs up by filter name only, so a misconfigured route could pair this filter with another
/// module's per-route object; the tag turns that into "no per-route config" instead of a type
/// confusion.
const PER_ROUTE_TAG: u64 = 0x6b65_7967_6174_6531; // "keygate1"

/// The per-route object handed to Envoy: the module's per-route value behind [`PER_ROUTE_TAG`].
#[repr(C)]
pub(super) struct PerRouteBox<P> {
    tag: u64,
    value: P,
}

impl<P> PerRouteBox<P> {
    pub(super) fn new(value: P) -> Self {
        PerRouteBox {
            tag: PER_ROUTE_TAG,
            value,
        }
    }
}

/// One request's stream while one of its hooks runs (worker thread; not `Send`).
pub struct Request<'a, P> {
    /// `envoy_dynamic_module_type_http_filter_envoy_ptr`.
    raw: *mut c_void,
    /// A local reply was sent: the hook must return a stop status and not reply again.
    replied: bool,
    _lifetime: PhantomData<&'a P>,
}

impl<'a, P> Request<'a, P> {
    /// Wraps the filter_envoy_ptr of a running stream hook; the value must not outlive that
    /// hook, and `P` must be the per-route type of the module whose hooks run (`hooks` builds
    /// every `Request`).
    pub(super) fn new(raw: *mut c_void) -> Self {
        Request {
            raw,
            replied: false,
            _lifetime: PhantomData,
        }
    }

    /// Whether a local reply was sent during this hook.
    pub(super) fn replied(&self) -> bool {
        self.replied
    }

    /// First value of a request header (`name` in lower case). The bytes are Envoy's own and are
    /// borrowed from `self`: Envoy keeps them valid until the hook returns *unless a header setter
    /// runs*, so the borrow checker forbids calling `set_header`/`remove_header` (or any `&mut self`
    /// method) while they are held; copy them first if needed.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.header_of(abi::HEADER_TYPE_REQUEST_HEADER, name)
    }

    /// The first value of each of `names` (lower case) among the response headers, in a
    /// response hook; borrowed as in [`Self::header`]. One pass over the map: for the few
    /// names the meter reads this costs less than a `get_header` lookup each (measured in
    /// docs/BENCHMARKS.md), since Envoy builds a lower-case key and searches the map for each
    /// lookup, while this only copies pointers out.
    pub fn response_headers<const N: usize>(&self, names: [&str; N]) -> [Option<&[u8]>; N] {
        /// Entries read on the stack; a larger map goes to the heap.
        const ON_STACK: usize = 32;
        let mut found = [None; N];
        // SAFETY: `self.raw` is the filter_envoy_ptr of the running hook.
        let n = unsafe {
            abi::envoy_dynamic_module_callback_http_get_headers_size(
                self.raw,
                abi::HEADER_TYPE_RESPONSE_HEADER,
            )
        };
        if n == 0 {
            return found;
        }
        // Left uninitialised: Envoy writes every one of the `n` entries before they are read.
        let mut stack = [const { MaybeUninit::<EnvoyHttpHeader>::uninit() }; ON_STACK];
        let mut heap = Vec::new();
        let room: &mut [MaybeUninit<EnvoyHttpHeader>] = if n <= ON_STACK {
            &mut stack[..n]
        } else {
            heap.resize_with(n, MaybeUninit::uninit);
            &mut heap
        };
        // SAFETY: `room` has space for the `n` entries Envoy reported, and nothing edits the
        // map between the two calls (this hook holds `&self`).
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_get_headers(
                self.raw,
                abi::HEADER_TYPE_RESPONSE_HEADER,
                room.as_mut_ptr().cast(),
            )
        };
        if !ok {
            return found;
        }
        // SAFETY: on success Envoy wrote all `n` entries of the map (abi.h: the array is filled
        // with every header, and `n` is the map's size).
        let entries: &[EnvoyHttpHeader] =
            unsafe { std::slice::from_raw_parts(room.as_ptr().cast(), n) };
        for h in entries.iter() {
            // SAFETY: Envoy filled every entry with bytes of the response header map, valid
            // until the hook returns unless a setter runs; the results borrow `&self`, and every
            // setter takes `&mut self` (as in `header_of`).
            let key = unsafe {
                envoy_bytes(EnvoyBuffer {
                    ptr: h.key_ptr,
                    length: h.key_length,
                })
            };
            for (name, slot) in names.iter().zip(found.iter_mut()) {
                if slot.is_none() && key == name.as_bytes() {
                    // SAFETY: as for the key.
                    *slot = Some(unsafe {
                        envoy_bytes(EnvoyBuffer {
                            ptr: h.value_ptr,
                            length: h.value_length,
                        })
                    });
                }
            }
        }
        found
    }

    fn header_of(&self, header_type: u32, name: &str) -> Option<&[u8]> {
        let mut out = EnvoyBuffer {
            ptr: ptr::null(),
            length: 0,
        };
        // SAFETY: `self.raw` is the filter_envoy_ptr of the running hook (Request cannot
        // outlive it); the key buffer borrows `name` for the call; `out` is a valid out-pointer
        // and optional_size may be null (abi.h). Asking for a header map the stream does not
        // have yet answers false.
        let found = unsafe {
            abi::envoy_dynamic_module_callback_http_get_header(
                self.raw,
                header_type,
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

    /// The request body Envoy holds for this stream, copied into one buffer: what it buffered
    /// (earlier chunks, after the filter returned `StopIterationAndBuffer`) followed by the
    /// chunk of the running body hook, unless that chunk *is* the buffer (an earlier filter
    /// buffered and resumed). In a trailers hook only the buffer exists.
    pub fn request_body(&self) -> Vec<u8> {
        let mut body = Vec::new();
        self.append_body(abi::BODY_TYPE_BUFFERED_REQUEST, &mut body);
        // SAFETY: `self.raw` is the live filter_envoy_ptr; the callback only reads the stream.
        let received_is_buffer = unsafe {
            abi::envoy_dynamic_module_callback_http_received_buffered_request_body(self.raw)
        };
        if !received_is_buffer {
            self.append_body(abi::BODY_TYPE_RECEIVED_REQUEST, &mut body);
        }
        body
    }

    /// Calls `f` with each slice of the running response body hook's chunk, in order,
    /// without copying (no allocation for up to 16 slices).
    pub fn received_response_body(&self, mut f: impl FnMut(&[u8])) {
        let body_type = abi::BODY_TYPE_RECEIVED_RESPONSE;
        // SAFETY: `self.raw` is the live filter_envoy_ptr; the callback only reads the stream.
        let n = unsafe {
            abi::envoy_dynamic_module_callback_http_get_body_chunks_size(self.raw, body_type)
        };
        if n == 0 {
            return;
        }
        let empty = EnvoyBuffer {
            ptr: ptr::null(),
            length: 0,
        };
        let mut inline = [empty; 16];
        let mut spilled = Vec::new();
        let chunks: &mut [EnvoyBuffer] = if n <= inline.len() {
            &mut inline[..n]
        } else {
            spilled.resize(n, empty);
            &mut spilled
        };
        // SAFETY: `chunks` has exactly the `n` entries Envoy asked for; Envoy writes at most
        // that many (the count it just returned, with no body change in between).
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_get_body_chunks(
                self.raw,
                body_type,
                chunks.as_mut_ptr(),
            )
        };
        if !ok {
            return;
        }
        for c in chunks.iter() {
            // SAFETY: each entry is a slice of the response chunk, valid until the hook
            // returns (nothing here changes the body); `envoy_bytes` treats null as empty.
            f(unsafe { envoy_bytes(*c) });
        }
    }

    /// Appends the slices of one of the stream's bodies to `out`.
    fn append_body(&self, body_type: u32, out: &mut Vec<u8>) {
        // SAFETY: `self.raw` is the live filter_envoy_ptr; the callback only reads the stream.
        let n = unsafe {
            abi::envoy_dynamic_module_callback_http_get_body_chunks_size(self.raw, body_type)
        };
        if n == 0 {
            return;
        }
        let mut chunks = vec![
            EnvoyBuffer {
                ptr: ptr::null(),
                length: 0,
            };
            n
        ];
        // SAFETY: `chunks` has exactly the `n` entries Envoy asked for; Envoy writes at most
        // that many (the count it just returned, with no body change in between).
        let ok = unsafe {
            abi::envoy_dynamic_module_callback_http_get_body_chunks(
                self.raw,
                body_type,
                chunks.as_mut_ptr(),
            )
        };
        if !ok {
            return;
        }
        for c in chunks {
            // SAFETY: each entry is a slice of the stream's body, valid until the hook returns
            // (nothing here changes the body); `envoy_bytes` treats a null or empty one as empty.
            out.extend_from_slice(unsafe { envoy_bytes(c) });
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
        // `Box<PerRouteBox<M::PerRoute>>` (`#[repr(C)]`, tag first). Reading the tag is a plain
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
        // SAFETY: the tag identifies our own `PerRouteBox`, and P is always M::PerRoute: Requests
        // are only built by `hooks`, as `Request<M::PerRoute>` for the one module M that
        // `declare_filter_module!` exported (a second expansion would not link). Envoy frees it only in
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

    /// Adds `by` to a counter defined by this request's filter configuration.
    pub fn increment_counter(&mut self, id: CounterId, by: u64) {
        // SAFETY: `self.raw` is the live filter_envoy_ptr of the running hook; no label values
        // (null with length 0, as the counter has no labels). An id from another config is not
        // UB: Envoy bounds-checks it (MetricNotFound).
        let result = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_increment_counter(
                self.raw,
                id.0,
                ptr::null(),
                0,
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
