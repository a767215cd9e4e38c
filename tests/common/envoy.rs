//! Envoy end-to-end pieces shared by the suites that run a real Envoy: a recording HTTP
//! upstream standing in for the model vendors, a minimal HTTP/1.1 client (so what is asserted
//! is exactly what a client sees on the wire), and Envoy itself running a shipped config from
//! `envoy/` with only its ports rewritten.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::envoy_bin;

// ---------------------------------------------------------------------------------------------
// Recording upstream (the "model vendor").

/// One request as the upstream received it.
#[derive(Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query, exactly as sent on the wire.
    pub target: String,
    pub headers: HeaderMap,
    /// The request body, as received (everything received when the request was cut short).
    pub body: Vec<u8>,
    /// The status the upstream answered and the tokens its answer reported.
    pub status: u16,
    pub usage: Option<VendorUsage>,
}

impl Recorded {
    /// Every value of header `name`.
    pub fn values(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    /// Panics if `secret` appears anywhere in the path, query or any header.
    pub fn assert_never_carries(&self, secret: &str, what: &str) {
        assert!(
            !self.target.contains(secret),
            "the upstream received the {what} in the path/query: {}",
            self.target
        );
        for (name, value) in &self.headers {
            assert!(
                !String::from_utf8_lossy(value.as_bytes()).contains(secret),
                "the upstream received the {what} in header {name}"
            );
        }
    }

    /// The body as JSON (panics if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "the upstream received a body that is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// A request the upstream has started to receive: its head, and its body so far.
#[derive(Clone)]
pub struct Arriving {
    pub method: String,
    pub target: String,
    /// The body bytes received so far.
    pub body: Vec<u8>,
    /// The body has ended (the whole request is in).
    pub ended: bool,
}

impl std::fmt::Debug for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorded")
            .field("method", &self.method)
            .field("target", &self.target)
            .field("headers", &self.headers)
            .field("body", &BodyText(&self.body))
            .finish()
    }
}

impl std::fmt::Debug for Arriving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arriving")
            .field("method", &self.method)
            .field("target", &self.target)
            .field("body", &BodyText(&self.body))
            .field("ended", &self.ended)
            .finish()
    }
}

/// A body in panic messages: as text, its first 200 bytes and its length.
struct BodyText<'a>(&'a [u8]);

impl std::fmt::Debug for BodyText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = String::from_utf8_lossy(&self.0[..self.0.len().min(200)]);
        if self.0.len() > 200 {
            write!(f, "{shown:?}… ({} bytes)", self.0.len())
        } else {
            write!(f, "{shown:?}")
        }
    }
}

/// The upstream's answer to anything that is not a vendor call an SDK parses.
pub const UPSTREAM_BODY: &str =
    r#"{"id":"chatcmpl-e2e","object":"chat.completion","upstream":"recording"}"#;

/// The text of the vendor answers ([`vendor_answer`]).
pub const UPSTREAM_REPLY_TEXT: &str = "Hello from the recording upstream.";

/// The tokens a vendor answer reported, normalised like keygate's metering: `input`
/// includes `cached_input`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VendorUsage {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
}

/// One answer of the recording vendor: status, content type, the body in the chunks it is
/// written in (one write each, so a stream arrives event by event), and the usage it reports.
pub struct VendorReply {
    pub status: u16,
    pub content_type: &'static str,
    /// A `content-encoding` the answer claims (its bytes are sent as they are).
    pub content_encoding: Option<&'static str>,
    pub chunks: Vec<String>,
    pub usage: Option<VendorUsage>,
}

/// A request model that makes the vendor answer 429 `rate_limit_exceeded` (an error response).
pub const MODEL_RATE_LIMITED: &str = "vendor-says-429";

/// A request model that makes the vendor answer its usual `chat.completion`, usage included,
/// labelled `content-encoding: gzip` (as a vendor that ignored `accept-encoding` would): a
/// meter that read the bytes anyway would count tokens it must not trust.
pub const MODEL_COMPRESSED: &str = "vendor-says-gzip";

/// What the upstream answers, like the vendor whose endpoint was called where a client parses
/// the answer: `POST …/chat/completions`, an OpenAI `chat.completion`, or with `"stream": true`
/// its SSE chunks (the usage chunk only with `stream_options.include_usage`, as OpenAI does);
/// `POST …/messages`, an Anthropic `message`, or its event stream (`message_start` with the
/// input and cache-read tokens, `message_delta` with the output). Each names the model the
/// request asked for and reports tokens that depend on the request body (so sums are not
/// trivially equal). Anything else gets [`UPSTREAM_BODY`].
pub fn vendor_reply(method: &str, target: &str, body: &[u8]) -> VendorReply {
    let path = target.split('?').next().unwrap_or("");
    let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let model = req["model"].as_str().unwrap_or("unknown").to_string();
    let stream = req["stream"] == true;
    let n = body.len() as u64;
    let usage = VendorUsage {
        input: 10 + n % 50,
        output: 3 + n % 11,
        cached_input: n % 7,
    };
    let json = |v: serde_json::Value, usage| VendorReply {
        status: 200,
        content_type: "application/json",
        content_encoding: None,
        chunks: vec![v.to_string()],
        usage,
    };
    let sse = |events: Vec<String>, usage| VendorReply {
        status: 200,
        content_type: "text/event-stream; charset=utf-8",
        content_encoding: None,
        chunks: events,
        usage,
    };
    let text_parts = ["Hello ", "from the ", "recording upstream."];
    let is_chat = method == "POST" && path.ends_with("/chat/completions");
    let is_messages = method == "POST" && path.ends_with("/messages");
    if (is_chat || is_messages) && model == MODEL_RATE_LIMITED {
        return VendorReply {
            status: 429,
            content_type: "application/json",
            content_encoding: None,
            chunks: vec![serde_json::json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}).to_string()],
            usage: None,
        };
    }
    if is_chat && stream {
        let include = req["stream_options"]["include_usage"] == true;
        let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
            let mut c = serde_json::json!({
                "id": "chatcmpl-e2e", "object": "chat.completion.chunk", "created": 1_700_000_000,
                "model": model, "system_fingerprint": null,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
            });
            if include {
                c["usage"] = serde_json::Value::Null;
            }
            format!("data: {c}\n\n")
        };
        let mut events = vec![chunk(
            serde_json::json!({"role": "assistant", "content": ""}),
            serde_json::Value::Null,
        )];
        for t in text_parts {
            events.push(chunk(
                serde_json::json!({"content": t}),
                serde_json::Value::Null,
            ));
        }
        events.push(chunk(serde_json::json!({}), "stop".into()));
        if include {
            let u = serde_json::json!({
                "id": "chatcmpl-e2e", "object": "chat.completion.chunk", "created": 1_700_000_000,
                "model": model, "choices": [],
                "usage": {"prompt_tokens": usage.input, "completion_tokens": usage.output,
                          "total_tokens": usage.input + usage.output,
                          "prompt_tokens_details": {"cached_tokens": usage.cached_input}}
            });
            events.push(format!("data: {u}\n\n"));
        }
        events.push("data: [DONE]\n\n".into());
        sse(events, include.then_some(usage))
    } else if is_chat {
        let mut reply = json(
            serde_json::json!({
                "id": "chatcmpl-e2e",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": model,
                "system_fingerprint": null,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": UPSTREAM_REPLY_TEXT, "refusal": null},
                    "logprobs": null,
                    "finish_reason": "stop"
                }],
                "usage": {"prompt_tokens": usage.input, "completion_tokens": usage.output,
                          "total_tokens": usage.input + usage.output,
                          "prompt_tokens_details": {"cached_tokens": usage.cached_input}}
            }),
            Some(usage),
        );
        if model == MODEL_COMPRESSED {
            reply.content_encoding = Some("gzip");
        }
        reply
    } else if is_messages && stream {
        let ev = |name: &str, data: serde_json::Value| format!("event: {name}\ndata: {data}\n\n");
        let mut events = vec![ev(
            "message_start",
            serde_json::json!({"type": "message_start", "message": {
                "id": "msg_e2e", "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": usage.input - usage.cached_input,
                          "cache_creation_input_tokens": 0,
                          "cache_read_input_tokens": usage.cached_input, "output_tokens": 1}}}),
        )];
        events.push(ev("content_block_start", serde_json::json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})));
        events.push(ev("ping", serde_json::json!({"type": "ping"})));
        for t in text_parts {
            events.push(ev("content_block_delta", serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}})));
        }
        events.push(ev(
            "content_block_stop",
            serde_json::json!({"type": "content_block_stop", "index": 0}),
        ));
        events.push(ev("message_delta", serde_json::json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": usage.output}})));
        events.push(ev(
            "message_stop",
            serde_json::json!({"type": "message_stop"}),
        ));
        sse(events, Some(usage))
    } else if is_messages {
        json(
            serde_json::json!({
                "id": "msg_e2e",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": UPSTREAM_REPLY_TEXT}],
                "stop_reason": "end_turn",
                "stop_sequence": null,
                "usage": {"input_tokens": usage.input - usage.cached_input,
                          "cache_creation_input_tokens": 0,
                          "cache_read_input_tokens": usage.cached_input,
                          "output_tokens": usage.output}
            }),
            Some(usage),
        )
    } else {
        VendorReply {
            status: 200,
            content_type: "application/json",
            content_encoding: None,
            chunks: vec![UPSTREAM_BODY.to_string()],
            usage: None,
        }
    }
}

pub struct Upstream {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    arriving: Arc<Mutex<Vec<Arriving>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let arriving = Arc::new(Mutex::new(Vec::new()));
        let (sink, progress) = (requests.clone(), arriving.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                // Like a real vendor's server: no Nagle delay on small responses.
                let _ = stream.set_nodelay(true);
                let (sink, progress) = (sink.clone(), progress.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (sink, progress) = (sink.clone(), progress.clone());
                        async move {
                            let (parts, mut body) = req.into_parts();
                            let method = parts.method.to_string();
                            let target = parts
                                .uri
                                .path_and_query()
                                .map(|p| p.as_str().to_string())
                                .unwrap_or_default();
                            // Seen from its head on, its body recorded as it arrives.
                            let slot = {
                                let mut p = progress.lock().unwrap();
                                p.push(Arriving {
                                    method: method.clone(),
                                    target: target.clone(),
                                    body: Vec::new(),
                                    ended: false,
                                });
                                p.len() - 1
                            };
                            let mut ended = true;
                            while let Some(frame) = body.frame().await {
                                match frame {
                                    Ok(frame) => {
                                        if let Ok(data) = frame.into_data() {
                                            progress.lock().unwrap()[slot]
                                                .body
                                                .extend_from_slice(&data);
                                        }
                                    }
                                    Err(_) => {
                                        ended = false;
                                        break;
                                    }
                                }
                            }
                            let received = {
                                let mut p = progress.lock().unwrap();
                                p[slot].ended = ended;
                                p[slot].body.clone()
                            };
                            let reply = vendor_reply(&method, &target, &received);
                            sink.lock().unwrap().push(Recorded {
                                method,
                                target,
                                headers: parts.headers,
                                body: received,
                                status: reply.status,
                                usage: reply.usage,
                            });
                            // A stream is written event by event, as the vendors do.
                            let pace = reply.chunks.len() > 1;
                            let frames =
                                futures::stream::iter(reply.chunks).then(move |c| async move {
                                    if pace {
                                        tokio::time::sleep(Duration::from_millis(2)).await;
                                    }
                                    Ok::<_, Infallible>(Frame::data(Bytes::from(c)))
                                });
                            let mut answer = Response::builder()
                                .status(reply.status)
                                .header("content-type", reply.content_type);
                            if let Some(e) = reply.content_encoding {
                                answer = answer.header("content-encoding", e);
                            }
                            Ok::<_, Infallible>(answer.body(StreamBody::new(frames)).unwrap())
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            requests,
            arriving,
            task,
        }
    }

    /// Requests received whole (answered).
    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn all(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn last(&self) -> Recorded {
        self.requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream received no request")
    }

    /// Every request the upstream has begun to receive (head in), with its body so far, in
    /// arrival order; unlike [`Upstream::all`], requests still arriving are included.
    pub fn arriving(&self) -> Vec<Arriving> {
        self.arriving.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 client (one request per connection, `Connection: close`).

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn values(&self, name: &str) -> Vec<&str> {
        super::header_values(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {:?}", self.text()))
    }
}

const EXCHANGE_LIMIT: Duration = Duration::from_secs(10);

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "no HTTP response within 10 s")
}

/// The request head: `method target`, Host, `Connection: close`, `headers`.
fn request_head(method: &str, target: &str, headers: &[(&str, &str)], extra: &str) -> String {
    let mut head =
        format!("{method} {target} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(extra);
    head.push_str("\r\n");
    head
}

pub async fn http_get(
    addr: SocketAddr,
    target: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let req = request_head("GET", target, headers, "");
        stream.write_all(req.as_bytes()).await?;
        read_response(&mut stream).await
    };
    tokio::time::timeout(EXCHANGE_LIMIT, exchange)
        .await
        .map_err(|_| timed_out())?
}

/// POST `body` with its `content-length`. The response is read while the body is still being
/// written, as an HTTP client does: Envoy may answer (413) before it has read all of it.
pub async fn http_post(
    addr: SocketAddr,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let head = request_head(
            "POST",
            target,
            headers,
            &format!("Content-Length: {}\r\n", body.len()),
        );
        let (mut rd, mut wr) = stream.split();
        let write = async move {
            if wr.write_all(head.as_bytes()).await.is_ok() {
                let _ = wr.write_all(body).await;
            }
            // The write side stays open (a half-close would end the request for Envoy) until
            // the response is read.
            std::future::pending::<()>().await
        };
        tokio::select! {
            r = read_response(&mut rd) => r,
            _ = write => unreachable!(),
        }
    };
    tokio::time::timeout(EXCHANGE_LIMIT, exchange)
        .await
        .map_err(|_| timed_out())?
}

/// A request whose body goes out in chunks (`Transfer-Encoding: chunked`) when the test says
/// so: to see what the upstream receives before the client has finished sending.
pub struct ChunkedRequest {
    stream: TcpStream,
    /// Bytes written on the connection so far (head, chunk framing and data).
    pub sent: u64,
}

impl ChunkedRequest {
    /// Connects and sends the head.
    pub async fn start(
        addr: SocketAddr,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<ChunkedRequest> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let head = request_head(method, target, headers, "Transfer-Encoding: chunked\r\n");
        stream.write_all(head.as_bytes()).await?;
        Ok(ChunkedRequest {
            stream,
            sent: head.len() as u64,
        })
    }

    /// Sends `data` as one chunk.
    pub async fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        assert!(!data.is_empty(), "an empty chunk would end the body");
        let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
        chunk.extend_from_slice(data);
        chunk.extend_from_slice(b"\r\n");
        self.stream.write_all(&chunk).await?;
        self.sent += chunk.len() as u64;
        Ok(())
    }

    /// Sends the last chunk and reads the response.
    pub async fn finish(mut self) -> std::io::Result<HttpResponse> {
        let exchange = async {
            self.stream.write_all(b"0\r\n\r\n").await?;
            read_response(&mut self.stream).await
        };
        tokio::time::timeout(EXCHANGE_LIMIT, exchange)
            .await
            .map_err(|_| timed_out())?
    }
}

/// Reads like an HTTP client: up to the end of the message (content-length or the last chunk),
/// not to the connection's close, which Envoy may delay after a local reply.
async fn read_response(stream: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<HttpResponse> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if message_complete(&raw) {
            break;
        }
    }
    parse_response(&raw)
}

/// Whether `raw` holds a whole response: headers, and a body of its content-length or up to
/// the last chunk. Without either, the message ends with the connection.
fn message_complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let body = &raw[split + 4..];
    for line in head.split("\r\n") {
        if let Some(v) = line.strip_prefix("content-length:") {
            return v.trim().parse::<usize>().is_ok_and(|n| body.len() >= n);
        }
        if line.starts_with("transfer-encoding:") && line.contains("chunked") {
            return body.ends_with(b"0\r\n\r\n");
        }
    }
    false
}

fn parse_response(raw: &[u8]) -> std::io::Result<HttpResponse> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("non-UTF-8 head"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("empty response"))?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(rest).ok_or_else(|| bad("bad chunked body"))?
    } else if let Some((_, len)) = headers.iter().find(|(k, _)| k == "content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad content-length"))?;
        rest.get(..len).ok_or_else(|| bad("short body"))?.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_str = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Envoy running a shipped config (`envoy/*.yaml`, only its ports rewritten).

/// The text of `envoy/<name>` as shipped.
pub fn shipped_config(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("envoy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Rewrites every `port_value: <from>` line; panics unless there are `expected` of them.
/// `what` names the file in the panic message.
pub fn replace_port(what: &str, config: &str, from: u16, to: u16, expected: usize) -> String {
    let needle = format!("port_value: {from}");
    let mut found = 0;
    let out: Vec<String> = config
        .lines()
        .map(|line| {
            if line.trim() == needle {
                found += 1;
                line.replace(&needle, &format!("port_value: {to}"))
            } else {
                line.to_string()
            }
        })
        .collect();
    assert_eq!(
        found, expected,
        "{what}: expected {expected} `{needle}` line(s), found {found}"
    );
    out.join("\n") + "\n"
}

/// `envoy/envoy.yaml` (one `keygate serve`) with keygate's, the listener's, the upstream's
/// and the admin's ports.
pub fn render_single(authz: u16, listener: u16, upstream: u16, admin: u16) -> String {
    let f = "envoy/envoy.yaml";
    let c = shipped_config("envoy.yaml");
    let c = replace_port(f, &c, 9001, authz, 1);
    let c = replace_port(f, &c, 10000, listener, 1);
    let c = replace_port(f, &c, 8080, upstream, 5);
    replace_port(f, &c, 9901, admin, 1)
}

/// `envoy/envoy.yaml` with keygate on a Unix socket: its `socket_address` for keygate replaced
/// by the commented `pipe` example shipped beside it, pointing at `socket`.
pub fn render_single_pipe(socket: &Path, listener: u16, upstream: u16, admin: u16) -> String {
    let f = "envoy/envoy.yaml";
    let c = render_single(9001, listener, upstream, admin);
    let lines: Vec<&str> = c.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == "port_value: 9001")
        .unwrap_or_else(|| panic!("{f}: no keygate port_value"));
    assert_eq!(
        lines[at - 2].trim(),
        "socket_address:",
        "{f}: keygate's address block moved"
    );
    let mut out = Vec::new();
    let mut piped = 0;
    for (i, line) in lines.iter().enumerate() {
        if (at - 2..=at).contains(&i) {
            continue;
        }
        match line.trim() {
            "# pipe:" => {
                out.push(line.replacen("# pipe:", "pipe:", 1));
                piped += 1;
            }
            "#   path: /run/keygate/authz.sock" => {
                let path = format!("  path: {}", socket.display());
                out.push(line.replacen("#   path: /run/keygate/authz.sock", &path, 1));
                piped += 1;
            }
            _ => out.push(line.to_string()),
        }
    }
    assert_eq!(
        piped, 2,
        "{f}: the commented pipe example is not as expected"
    );
    out.join("\n") + "\n"
}

/// `envoy/split.yaml` (two `keygate authz` data planes) with the data planes', the
/// listener's, the upstream's and the admin's ports.
pub fn render_split(authz: [u16; 2], listener: u16, upstream: u16, admin: u16) -> String {
    let f = "envoy/split.yaml";
    let c = shipped_config("split.yaml");
    let c = replace_port(f, &c, 9011, authz[0], 1);
    let c = replace_port(f, &c, 9012, authz[1], 1);
    let c = replace_port(f, &c, 10000, listener, 1);
    let c = replace_port(f, &c, 8080, upstream, 4);
    replace_port(f, &c, 9901, admin, 1)
}

/// What the module test Envoys need: where the control plane is and the module's files.
#[derive(Clone, Debug)]
pub struct ModuleFiles {
    /// `http://host:port` of the control plane's snapshot stream.
    pub control_plane: String,
    pub master_key_file: PathBuf,
    /// The module's `data_dir` (its encrypted snapshot cache).
    pub data_dir: PathBuf,
    pub subscriber_token_file: PathBuf,
    /// Further `"key":value` pairs for `filter_config`, e.g. `"credential_query_param":"key"`.
    pub extra_settings: String,
}

/// `envoy/module.yaml` (the keygate dynamic module) with its ports, and the control plane URL
/// and paths in `filter_config`.
pub fn render_module(m: &ModuleFiles, listener: u16, upstream: u16, admin: u16) -> String {
    let f = "envoy/module.yaml";
    let c = shipped_config("module.yaml");
    let c = replace_port(f, &c, 10000, listener, 1);
    let c = replace_port(f, &c, 8080, upstream, 5);
    let c = replace_port(f, &c, 9901, admin, 1);
    let c = replace_quoted(f, &c, "http://127.0.0.1:9002", &m.control_plane);
    let c = replace_quoted(
        f,
        &c,
        "/etc/keygate/master.key",
        &m.master_key_file.display().to_string(),
    );
    let c = replace_quoted(
        f,
        &c,
        "/var/lib/keygate-envoy",
        &m.data_dir.display().to_string(),
    );
    let c = replace_quoted(
        f,
        &c,
        "/etc/keygate/subscriber.token",
        &m.subscriber_token_file.display().to_string(),
    );
    if m.extra_settings.is_empty() {
        c
    } else {
        let token = format!("\"{}\"}}'", m.subscriber_token_file.display());
        assert!(
            c.contains(&token),
            "{f}: filter_config does not end with subscriber_token_file"
        );
        c.replacen(
            &token,
            &format!(
                "\"{}\",{}}}'",
                m.subscriber_token_file.display(),
                m.extra_settings
            ),
            1,
        )
    }
}

/// Replaces the one `"from"` (a JSON string inside the YAML) with `"to"`.
fn replace_quoted(what: &str, config: &str, from: &str, to: &str) -> String {
    let needle = format!("\"{from}\"");
    assert_eq!(
        config.matches(&needle).count(),
        1,
        "{what}: expected one {needle}"
    );
    config.replacen(&needle, &format!("\"{to}\""), 1)
}

/// The directory holding `libkeygate_envoy.so` for the module tests: KEYGATE_TEST_MODULE_DIR,
/// or `target/debug` (./scripts/test builds it there with `cargo build -p keygate-envoy`).
pub fn module_dir() -> PathBuf {
    let dir = std::env::var("KEYGATE_TEST_MODULE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debug"));
    assert!(
        dir.join("libkeygate_envoy.so").exists(),
        "libkeygate_envoy.so not found in {}: run ./scripts/test (it builds the module with `cargo build -p keygate-envoy`) or set KEYGATE_TEST_MODULE_DIR",
        dir.display()
    );
    dir
}

/// How a test Envoy is run beside its config.
#[derive(Clone, Debug)]
pub struct EnvoyRun {
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    /// The status a credential-less request must get before Envoy counts as ready
    /// (keygate's 401; 503 for a module that is expected to have no snapshot).
    pub ready_status: u16,
}

impl Default for EnvoyRun {
    fn default() -> Self {
        EnvoyRun {
            env: vec![],
            args: vec![],
            ready_status: 401,
        }
    }
}

impl EnvoyRun {
    /// Envoy with the keygate module: its search path, and the module's log lines (the ABI
    /// handshake) at info.
    pub fn module() -> EnvoyRun {
        EnvoyRun {
            env: vec![(
                "ENVOY_DYNAMIC_MODULES_SEARCH_PATH".into(),
                module_dir().display().to_string(),
            )],
            args: vec![
                "--component-log-level".into(),
                "dynamic_modules:info".into(),
            ],
            ready_status: 401,
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub type Lines = Arc<Mutex<Vec<String>>>;

/// Collects a child's output lines; the thread ends at EOF (when the child has exited).
pub fn capture(pipe: impl std::io::Read + Send + 'static) -> (Lines, std::thread::JoinHandle<()>) {
    use std::io::BufRead;
    let lines: Lines = Arc::default();
    let sink = lines.clone();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
    (lines, reader)
}

pub struct Envoy {
    child: Option<Child>,
    pub listener: SocketAddr,
    /// Envoy's own admin listener (stats, `/clusters`).
    pub admin: SocketAddr,
    stdout: Lines,
    stderr: Lines,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// `envoy/envoy.yaml` in front of one keygate ext_authz listener.
    pub async fn start(authz: SocketAddr, upstream: SocketAddr) -> Envoy {
        Self::start_rendered(|listener, admin| {
            render_single(authz.port(), listener, upstream.port(), admin)
        })
        .await
    }

    /// `envoy/split.yaml` in front of two `keygate authz` data planes.
    pub async fn start_split(authz: [SocketAddr; 2], upstream: SocketAddr) -> Envoy {
        Self::start_rendered(|listener, admin| {
            render_split(
                [authz[0].port(), authz[1].port()],
                listener,
                upstream.port(),
                admin,
            )
        })
        .await
    }

    /// Starts Envoy with the config `render(listener_port, admin_port)` on free ports and waits
    /// (bounded) until a request through it gets keygate's answer. Retries with other ports if
    /// a port picked as free was taken meanwhile.
    pub async fn start_rendered(render: impl Fn(u16, u16) -> String) -> Envoy {
        Self::start_rendered_with(render, &EnvoyRun::default()).await
    }

    /// `envoy/module.yaml`: the keygate module fed by the control plane in `m`.
    pub async fn start_module(m: &ModuleFiles, upstream: SocketAddr, run: &EnvoyRun) -> Envoy {
        Self::start_rendered_with(
            |listener, admin| render_module(m, listener, upstream.port(), admin),
            run,
        )
        .await
    }

    /// Like `start_rendered`, with extra environment, arguments and readiness status.
    pub async fn start_rendered_with(render: impl Fn(u16, u16) -> String, run: &EnvoyRun) -> Envoy {
        match Self::try_start(render, run).await {
            Ok(e) => e,
            Err(e) => panic!("Envoy did not start: {e}"),
        }
    }

    /// Starts Envoy, or reports why it did not (its stderr included): for tests of configs
    /// Envoy must refuse.
    pub async fn try_start(
        render: impl Fn(u16, u16) -> String,
        run: &EnvoyRun,
    ) -> Result<Envoy, String> {
        let mut last_failure = String::new();
        for _attempt in 0..3 {
            let (listener_port, admin_port) = (free_port(), free_port());
            if listener_port == admin_port {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            let config = dir.path().join("envoy.yaml");
            std::fs::write(&config, render(listener_port, admin_port)).unwrap();
            let mut child = Command::new(envoy_bin())
                .arg("-c")
                .arg(&config)
                .args(["--concurrency", "1"])
                // Unique per running Envoy: the listener port is held by this Envoy alone.
                .args(["--base-id", &listener_port.to_string()])
                .args(["-l", "warning"])
                // Access log lines reach stdout promptly (the default flush interval is 10 s).
                .args(["--file-flush-interval-msec", "50"])
                .args(&run.args)
                .envs(run.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("spawning {}: {e}", envoy_bin().display()));
            let (stdout, _) = capture(child.stdout.take().unwrap());
            let (stderr, stderr_reader) = capture(child.stderr.take().unwrap());
            let mut envoy = Envoy {
                child: Some(child),
                listener: SocketAddr::from(([127, 0, 0, 1], listener_port)),
                admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
                stdout,
                stderr,
                _dir: dir,
            };
            match envoy.wait_ready(run.ready_status).await {
                Ok(()) => return Ok(envoy),
                Err(e) => {
                    // Stop it and read its stderr to the end before deciding what went wrong.
                    if let Some(mut c) = envoy.child.take() {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    let _ = stderr_reader.join();
                    last_failure = format!("{e}\nEnvoy stderr:\n{}", envoy.stderr());
                    let port_clash = last_failure.contains("ddress already in use")
                        || last_failure.contains("unable to bind")
                        || last_failure.contains("shared memory")
                        || last_failure.contains("base-id");
                    if !port_clash {
                        break;
                    }
                }
            }
        }
        Err(last_failure)
    }

    /// Polls until a request without credentials gets keygate's 401 through Envoy (listener
    /// up, route table loaded, keygate reachable over gRPC). Bounded.
    async fn wait_ready(&mut self, status: u16) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last: String;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("Envoy exited with {status} before becoming ready"));
            }
            match http_get(self.listener, "/openai/v1/models", &[]).await {
                Ok(r) if r.status == status => return Ok(()),
                Ok(r) => last = format!("HTTP {} {}", r.status, r.text()),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "Envoy not ready within 30 s (last attempt: {last})"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().join("\n")
    }

    /// GET `path` on Envoy's admin listener; the body as text.
    pub async fn admin_get(&self, path: &str) -> String {
        let r = http_get(self.admin, path, &[])
            .await
            .unwrap_or_else(|e| panic!("Envoy admin GET {path}: {e}"));
        assert_eq!(r.status, 200, "Envoy admin GET {path}: {}", r.text());
        r.text()
    }

    /// One per-host value from the admin `/clusters` page, e.g. `health_flags` (`healthy`,
    /// `/failed_active_hc`, ...) or `rq_total`, for `host` in `cluster`.
    pub async fn host_stat(&self, cluster: &str, host: SocketAddr, stat: &str) -> Option<String> {
        let prefix = format!("{cluster}::{host}::{stat}::");
        self.admin_get("/clusters")
            .await
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
    }

    /// A counter or gauge from the admin `/stats` page (exact name), 0 when absent.
    pub async fn stat(&self, name: &str) -> u64 {
        let prefix = format!("{name}: ");
        self.admin_get("/stats")
            .await
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    }

    /// The access log lines (JSON, one per request) written so far.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Envoy {
    /// SIGKILL and wait for the exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.kill();
    }
}
