//! Response metering (SPEC §8.2): the tokens a vendor reports in a response, read as the
//! response passes, chunk by chunk. One parser for every data plane (the module's response
//! hooks and the ext_proc service feed it the same bytes); pure, no dependency beyond `std`
//! and [`ModelName`].
//!
//! What it reads, whatever the vendor (the format is recognised from the fields, not from the
//! route):
//! - OpenAI-compatible chat and completions JSON, and the SSE chunk that carries `usage`:
//!   `usage.prompt_tokens` (cached input included), `usage.completion_tokens`,
//!   `usage.prompt_tokens_details.cached_tokens`;
//! - OpenAI's Responses API (`usage.input_tokens`, `usage.output_tokens`,
//!   `usage.input_tokens_details.cached_tokens`), also inside a stream event's `response`;
//! - Anthropic JSON and SSE (`message_start`'s `message.usage`, `message_delta`'s `usage`):
//!   `input_tokens` does NOT include `cache_read_input_tokens` nor
//!   `cache_creation_input_tokens`, so keygate's input is their sum and its cached input the
//!   cache reads (cache writes are input, priced as input);
//! - Gemini `usageMetadata` (JSON, SSE or a JSON array of responses): input is
//!   `promptTokenCount` + `toolUsePromptTokenCount`, output `candidatesTokenCount` +
//!   `thoughtsTokenCount`, cached input `cachedContentTokenCount`.
//!
//! Every vendor reports totals (a stream's later event repeats and raises the earlier counts),
//! so the last value seen of each field wins; nothing is summed across events, and a count is
//! never taken twice. The model is the response's `model` (also `message.model`,
//! `response.model`) or Gemini's `modelVersion`.
//!
//! Memory is fixed (a few hundred bytes per response, whatever its size): the JSON scanner
//! keeps one small frame per open object or array ([`MAX_DEPTH`], deeper is unreadable), the
//! current key only if it is one of the few it looks for, a number being read and the model
//! string. An SSE stream is cut into events by a line state machine that feeds each event's
//! `data` to a fresh scanner. Nothing is buffered and nothing is ever written to the response.

mod json;
mod stream;
mod vocab;

use super::model::ModelName;
use json::Json;
use vocab::Raw;

pub use stream::{METERING_TAG_FIELD, StreamMetering, TOKEN_LIMITED_FIELD, metering_tag};

/// The nesting tracked with keys (vendors' usage sits at depth four at most).
pub const MAX_DEPTH: usize = 32;

/// Nesting beyond [`MAX_DEPTH`] tracked by bracket type only (no counts are read there): a
/// response may echo a deeply nested request (a JSON schema, tool definitions) before its usage.
/// Deeper than both is unreadable.
pub const MAX_EXTRA_DEPTH: u32 = 128;

/// Token counts, normalised across vendors: `input` includes `cached_input`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
}

impl Tokens {
    /// Input plus output: what a token budget counts.
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }
}

/// What a response gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reading {
    /// Token counts.
    Usage,
    /// A readable success response with no counts in it (a model list; an OpenAI stream
    /// requested without `stream_options.include_usage`).
    NoUsage,
    /// Not readable: malformed or truncated before any count, compressed
    /// (`content-encoding`), or not JSON / SSE.
    Unreadable,
    /// The vendor answered 4xx or 5xx (counts it reported, if any, are kept).
    Error,
}

impl Reading {
    /// The label of `keygate_usage_unparsed_total` for a success response without counts.
    pub fn unparsed_reason(self) -> Option<&'static str> {
        match self {
            Reading::NoUsage => Some("no_usage"),
            Reading::Unreadable => Some("unreadable"),
            Reading::Usage | Reading::Error => None,
        }
    }
}

/// The metering of one response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metered {
    pub reading: Reading,
    pub tokens: Tokens,
    /// The model the response names, when it names a valid one.
    pub model: Option<ModelName>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Sse,
    /// Compressed or otherwise unreadable: bytes are ignored.
    Opaque,
}

/// Reads one response: [`ResponseMeter::new`] with the response headers, [`feed`] with every
/// body chunk in order, [`finish`] once (at end of stream, or when the stream is torn down).
///
/// [`feed`]: ResponseMeter::feed
/// [`finish`]: ResponseMeter::finish
#[derive(Clone, Debug)]
pub struct ResponseMeter {
    status: u16,
    format: Format,
    sse: SseLines,
    json: Json,
    raw: Raw,
    model: Option<ModelName>,
    /// Documents (an SSE event's data, or the body) read to their end without error.
    good_docs: u32,
}

impl ResponseMeter {
    /// A meter for a response with this status, `content-type` and `content-encoding`.
    pub fn new(status: u16, content_type: Option<&[u8]>, content_encoding: Option<&[u8]>) -> Self {
        let encoded = content_encoding
            .map(|e| {
                let e = e.trim_ascii();
                !e.is_empty() && !e.eq_ignore_ascii_case(b"identity")
            })
            .unwrap_or(false);
        let sse = content_type
            .map(|t| {
                let t = t.trim_ascii_start();
                t.len() >= 17 && t[..17].eq_ignore_ascii_case(b"text/event-stream")
            })
            .unwrap_or(false);
        let format = if encoded {
            Format::Opaque
        } else if sse {
            Format::Sse
        } else {
            Format::Json
        };
        ResponseMeter {
            status,
            format,
            sse: SseLines::default(),
            json: Json::default(),
            raw: Raw::default(),
            model: None,
            good_docs: 0,
        }
    }

    /// Reads the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        match self.format {
            Format::Opaque => {}
            Format::Json => self.json.scan(chunk, &mut self.raw, &mut self.model),
            Format::Sse => {
                let mut i = 0;
                while i < chunk.len() {
                    if self.sse.state == SseState::Data && !self.sse.after_cr {
                        // The data line's value, up to its end, to the scanner.
                        let rest = &chunk[i..];
                        let end = memchr::memchr2(b'\n', b'\r', rest).unwrap_or(rest.len());
                        self.json.scan(&rest[..end], &mut self.raw, &mut self.model);
                        i += end;
                        if i == chunk.len() {
                            break;
                        }
                    }
                    self.sse_byte(chunk[i]);
                    i += 1;
                }
            }
        }
    }

    fn sse_byte(&mut self, b: u8) {
        let line_end = b == b'\n' || b == b'\r';
        if self.sse.after_cr {
            self.sse.after_cr = false;
            if b == b'\n' {
                return; // the \n of a \r\n
            }
        }
        if line_end {
            self.sse.after_cr = b == b'\r';
            match self.sse.state {
                // A blank line dispatches the event.
                SseState::Field if self.sse.field_len == 0 => self.end_event(),
                // "data" with no colon: a data line with an empty value.
                SseState::Field => {
                    if self.sse.field() == b"data" {
                        self.data_line_starts();
                    }
                }
                SseState::Data | SseState::DataStart | SseState::Skip => {}
            }
            self.sse.state = SseState::Field;
            self.sse.field_len = 0;
            return;
        }
        match self.sse.state {
            SseState::Field => {
                if b == b':' {
                    if self.sse.field_len == 0 {
                        self.sse.state = SseState::Skip; // a comment line
                    } else if self.sse.field() == b"data" {
                        self.data_line_starts();
                        self.sse.state = SseState::DataStart;
                    } else {
                        self.sse.state = SseState::Skip;
                    }
                } else if usize::from(self.sse.field_len) < self.sse.field_buf.len() {
                    self.sse.field_buf[usize::from(self.sse.field_len)] = b;
                    self.sse.field_len += 1;
                } else {
                    self.sse.state = SseState::Skip; // no field we read is this long
                }
            }
            SseState::DataStart => {
                self.sse.state = SseState::Data;
                if b != b' ' {
                    self.json.byte(b, &mut self.raw, &mut self.model);
                }
            }
            SseState::Data => self.json.byte(b, &mut self.raw, &mut self.model),
            SseState::Skip => {}
        }
    }

    /// A `data` line begins: the lines of one event are joined by a newline (whitespace to
    /// JSON).
    fn data_line_starts(&mut self) {
        if self.sse.event_has_data {
            self.json.byte(b'\n', &mut self.raw, &mut self.model);
        }
        self.sse.event_has_data = true;
    }

    fn end_event(&mut self) {
        if self.sse.event_has_data && self.json.complete() {
            self.good_docs += 1;
        }
        self.sse.event_has_data = false;
        self.json = Json::default();
    }

    /// What the response gave. Counts seen before a truncation or a malformed part are kept.
    pub fn finish(mut self) -> Metered {
        match self.format {
            Format::Json => {
                if self.json.complete() {
                    self.good_docs += 1;
                }
            }
            // A stream may end without the blank line after its last event.
            Format::Sse => self.end_event(),
            Format::Opaque => {}
        }
        let tokens = self.raw.tokens();
        let reading = if self.status >= 400 {
            Reading::Error
        } else if tokens.is_some() {
            Reading::Usage
        } else if self.good_docs > 0 {
            Reading::NoUsage
        } else {
            Reading::Unreadable
        };
        Metered {
            reading,
            tokens: tokens.unwrap_or_default(),
            model: self.model,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum SseState {
    /// Reading a line's field name.
    #[default]
    Field,
    /// After `data:`, before the optional space.
    DataStart,
    /// A data line's value, fed to the scanner.
    Data,
    /// A line of no interest (comment, `event`, `id`, `retry`, unknown).
    Skip,
}

#[derive(Clone, Copy, Debug, Default)]
struct SseLines {
    state: SseState,
    field_buf: [u8; 8],
    field_len: u8,
    after_cr: bool,
    event_has_data: bool,
}

impl SseLines {
    fn field(&self) -> &[u8] {
        &self.field_buf[..usize::from(self.field_len)]
    }
}

#[cfg(test)]
mod tests;
