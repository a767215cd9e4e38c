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

use super::model::{MAX_MODEL_LEN, ModelName};
use crate::usage::{Counts, Tally, UsageKey};

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
            Format::Json => {
                for &b in chunk {
                    self.json.byte(b, &mut self.raw, &mut self.model);
                }
            }
            Format::Sse => {
                for &b in chunk {
                    self.sse_byte(b);
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

/// The keys the scanner recognises; every other key is `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum Key {
    #[default]
    Other,
    Usage,
    UsageMetadata,
    Message,
    Response,
    Model,
    ModelVersion,
    PromptTokens,
    CompletionTokens,
    PromptTokensDetails,
    InputTokensDetails,
    CachedTokens,
    InputTokens,
    OutputTokens,
    CacheRead,
    CacheCreation,
    PromptTokenCount,
    CandidatesTokenCount,
    ThoughtsTokenCount,
    CachedContentTokenCount,
    ToolUsePromptTokenCount,
}

/// The longest key recognised (`cache_creation_input_tokens`).
const KEY_BUF: usize = 32;

fn classify(key: &[u8]) -> Key {
    match key {
        b"usage" => Key::Usage,
        b"usageMetadata" => Key::UsageMetadata,
        b"message" => Key::Message,
        b"response" => Key::Response,
        b"model" => Key::Model,
        b"modelVersion" => Key::ModelVersion,
        b"prompt_tokens" => Key::PromptTokens,
        b"completion_tokens" => Key::CompletionTokens,
        b"prompt_tokens_details" => Key::PromptTokensDetails,
        b"input_tokens_details" => Key::InputTokensDetails,
        b"cached_tokens" => Key::CachedTokens,
        b"input_tokens" => Key::InputTokens,
        b"output_tokens" => Key::OutputTokens,
        b"cache_read_input_tokens" => Key::CacheRead,
        b"cache_creation_input_tokens" => Key::CacheCreation,
        b"promptTokenCount" => Key::PromptTokenCount,
        b"candidatesTokenCount" => Key::CandidatesTokenCount,
        b"thoughtsTokenCount" => Key::ThoughtsTokenCount,
        b"cachedContentTokenCount" => Key::CachedContentTokenCount,
        b"toolUsePromptTokenCount" => Key::ToolUsePromptTokenCount,
        _ => Key::Other,
    }
}

/// The raw counts, each the last value seen.
#[derive(Clone, Copy, Debug, Default)]
struct Raw {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    details_cached: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read: Option<u64>,
    cache_creation: Option<u64>,
    gemini_prompt: Option<u64>,
    gemini_tool_prompt: Option<u64>,
    gemini_candidates: Option<u64>,
    gemini_thoughts: Option<u64>,
    gemini_cached: Option<u64>,
}

impl Raw {
    fn slot(&mut self, field: Field) -> &mut Option<u64> {
        match field {
            Field::PromptTokens => &mut self.prompt_tokens,
            Field::CompletionTokens => &mut self.completion_tokens,
            Field::DetailsCached => &mut self.details_cached,
            Field::InputTokens => &mut self.input_tokens,
            Field::OutputTokens => &mut self.output_tokens,
            Field::CacheRead => &mut self.cache_read,
            Field::CacheCreation => &mut self.cache_creation,
            Field::GeminiPrompt => &mut self.gemini_prompt,
            Field::GeminiToolPrompt => &mut self.gemini_tool_prompt,
            Field::GeminiCandidates => &mut self.gemini_candidates,
            Field::GeminiThoughts => &mut self.gemini_thoughts,
            Field::GeminiCached => &mut self.gemini_cached,
        }
    }

    /// The normalised counts, if the response reported any.
    fn tokens(&self) -> Option<Tokens> {
        let n = |v: Option<u64>| v.unwrap_or(0);
        let t = if self.prompt_tokens.is_some() || self.completion_tokens.is_some() {
            // OpenAI chat / completions: prompt_tokens includes the cached tokens.
            Tokens {
                input: n(self.prompt_tokens),
                output: n(self.completion_tokens),
                cached_input: n(self.details_cached),
            }
        } else if self.gemini_prompt.is_some()
            || self.gemini_candidates.is_some()
            || self.gemini_thoughts.is_some()
            || self.gemini_tool_prompt.is_some()
        {
            Tokens {
                input: n(self.gemini_prompt).saturating_add(n(self.gemini_tool_prompt)),
                output: n(self.gemini_candidates).saturating_add(n(self.gemini_thoughts)),
                cached_input: n(self.gemini_cached),
            }
        } else if self.input_tokens.is_some()
            || self.output_tokens.is_some()
            || self.cache_read.is_some()
            || self.cache_creation.is_some()
        {
            // Anthropic (cache fields apart from input_tokens) or OpenAI Responses (cached
            // tokens part of input_tokens, detailed in input_tokens_details).
            Tokens {
                input: n(self.input_tokens)
                    .saturating_add(n(self.cache_read))
                    .saturating_add(n(self.cache_creation)),
                output: n(self.output_tokens),
                cached_input: n(self.cache_read).saturating_add(n(self.details_cached)),
            }
        } else {
            return None;
        };
        // Cached input is part of input, whatever a vendor's numbers say.
        Some(Tokens {
            cached_input: t.cached_input.min(t.input),
            ..t
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    PromptTokens,
    CompletionTokens,
    DetailsCached,
    InputTokens,
    OutputTokens,
    CacheRead,
    CacheCreation,
    GeminiPrompt,
    GeminiToolPrompt,
    GeminiCandidates,
    GeminiThoughts,
    GeminiCached,
}

/// What a value at `path` (object keys from a document's root) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Count(Field),
    Model,
}

fn target(path: &[Key]) -> Option<Target> {
    use Key::*;
    // Anthropic's message_start nests the message; OpenAI's Responses stream the response.
    let path = match path {
        [Message | Response, rest @ ..] if !rest.is_empty() => rest,
        _ => path,
    };
    let count = |f| Some(Target::Count(f));
    match path {
        [Model] | [ModelVersion] => Some(Target::Model),
        [Usage, PromptTokens] => count(Field::PromptTokens),
        [Usage, CompletionTokens] => count(Field::CompletionTokens),
        [
            Usage,
            PromptTokensDetails | InputTokensDetails,
            CachedTokens,
        ] => count(Field::DetailsCached),
        [Usage, InputTokens] => count(Field::InputTokens),
        [Usage, OutputTokens] => count(Field::OutputTokens),
        [Usage, CacheRead] => count(Field::CacheRead),
        [Usage, CacheCreation] => count(Field::CacheCreation),
        [UsageMetadata, PromptTokenCount] => count(Field::GeminiPrompt),
        [UsageMetadata, ToolUsePromptTokenCount] => count(Field::GeminiToolPrompt),
        [UsageMetadata, CandidatesTokenCount] => count(Field::GeminiCandidates),
        [UsageMetadata, ThoughtsTokenCount] => count(Field::GeminiThoughts),
        [UsageMetadata, CachedContentTokenCount] => count(Field::GeminiCached),
        _ => None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum St {
    /// Before a document's value.
    #[default]
    Start,
    /// A value is expected (after `:` or `,` in an array).
    Value,
    /// A value or `]` (just after `[`).
    ValueOrClose,
    /// A key or `}` (just after `{`).
    KeyOrClose,
    /// A key (after `,` in an object).
    Key,
    InKey,
    Colon,
    InString,
    InNumber,
    InLiteral,
    /// After a value: `,`, a closing bracket, or (at depth 0) the end.
    After,
    /// The document is over (depth 0): only whitespace may follow.
    Done,
    /// Not JSON; the rest of the document is ignored.
    Broken,
}

#[derive(Clone, Copy, Debug, Default)]
struct Frame {
    array: bool,
    key: Key,
}

/// A streaming JSON scanner that validates structure and picks out the values at the paths of
/// [`target`]. Literals are only skipped; strings are checked for escapes only where captured.
#[derive(Clone, Debug)]
struct Json {
    st: St,
    depth: usize,
    frames: [Frame; MAX_DEPTH],
    /// Levels beyond `MAX_DEPTH`: one bit each (1: array), the innermost highest.
    extra: u128,
    extra_depth: u32,
    key_buf: [u8; KEY_BUF],
    key_len: usize,
    /// The key being read can be none of ours (too long, or escaped).
    key_other: bool,
    escape: bool,
    /// Where the current string or number goes.
    target: Option<Target>,
    num: Option<u64>,
    str_buf: [u8; MAX_MODEL_LEN],
    str_len: usize,
    /// The string being captured cannot be a model (escaped, too long, not visible ASCII).
    str_bad: bool,
}

impl Default for Json {
    fn default() -> Self {
        Json {
            st: St::Start,
            depth: 0,
            frames: [Frame::default(); MAX_DEPTH],
            extra: 0,
            extra_depth: 0,
            key_buf: [0; KEY_BUF],
            key_len: 0,
            key_other: false,
            escape: false,
            target: None,
            num: None,
            str_buf: [0; MAX_MODEL_LEN],
            str_len: 0,
            str_bad: false,
        }
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Json {
    /// The document was read to its end without error.
    fn complete(&self) -> bool {
        self.st == St::Done
    }

    /// What a value starting now at the current position is.
    fn value_target(&self) -> Option<Target> {
        if self.extra_depth > 0 {
            return None;
        }
        // The root array of a Gemini stream: its elements are documents.
        let frames = &self.frames[..self.depth];
        let frames = match frames {
            [first, rest @ ..] if first.array => rest,
            _ => frames,
        };
        if frames.len() > 4 || frames.iter().any(|f| f.array) {
            return None;
        }
        let mut path = [Key::Other; 4];
        for (p, f) in path.iter_mut().zip(frames) {
            *p = f.key;
        }
        target(&path[..frames.len()])
    }

    fn push(&mut self, array: bool) -> St {
        if self.depth < MAX_DEPTH {
            self.frames[self.depth] = Frame {
                array,
                key: Key::Other,
            };
            self.depth += 1;
        } else if self.extra_depth < MAX_EXTRA_DEPTH {
            self.extra |= u128::from(array) << self.extra_depth;
            self.extra_depth += 1;
        } else {
            return St::Broken;
        }
        if array {
            St::ValueOrClose
        } else {
            St::KeyOrClose
        }
    }

    /// Whether the innermost open container is an array.
    fn top_is_array(&self) -> bool {
        if self.extra_depth > 0 {
            (self.extra >> (self.extra_depth - 1)) & 1 == 1
        } else {
            self.frames[self.depth - 1].array
        }
    }

    fn pop(&mut self, array: bool) -> St {
        if self.extra_depth > 0 {
            if self.top_is_array() != array {
                return St::Broken;
            }
            self.extra_depth -= 1;
            self.extra &= !(1u128 << self.extra_depth);
            return St::After;
        }
        match self.depth.checked_sub(1) {
            Some(top) if self.frames[top].array == array => {
                self.depth = top;
                if top == 0 { St::Done } else { St::After }
            }
            _ => St::Broken,
        }
    }

    /// After a complete value: the end of the document at depth 0.
    fn after_value(&self) -> St {
        if self.depth == 0 { St::Done } else { St::After }
    }

    fn start_value(&mut self, b: u8) -> St {
        match b {
            b'{' => self.push(false),
            b'[' => self.push(true),
            b'"' => {
                self.target = self.value_target();
                self.str_len = 0;
                self.str_bad = false;
                self.escape = false;
                St::InString
            }
            b'-' => {
                self.target = None; // a negative count is no count
                St::InNumber
            }
            b'0'..=b'9' => {
                self.target = self.value_target();
                self.num = Some(u64::from(b - b'0'));
                St::InNumber
            }
            b't' | b'f' | b'n' => St::InLiteral,
            _ => St::Broken,
        }
    }

    fn end_number(&mut self, raw: &mut Raw) {
        if let (Some(Target::Count(field)), Some(n)) = (self.target, self.num) {
            *raw.slot(field) = Some(n);
        }
        self.target = None;
        self.num = None;
    }

    fn end_string(&mut self, model: &mut Option<ModelName>) {
        if self.target == Some(Target::Model) && !self.str_bad {
            let s = std::str::from_utf8(&self.str_buf[..self.str_len]).unwrap_or("");
            if let Some(m) = ModelName::new(s) {
                *model = Some(m);
            }
        }
        self.target = None;
    }

    fn byte(&mut self, b: u8, raw: &mut Raw, model: &mut Option<ModelName>) {
        self.st = match self.st {
            St::Broken => St::Broken,
            St::Start | St::Value if is_ws(b) => self.st,
            St::Start | St::Value => self.start_value(b),
            St::ValueOrClose if is_ws(b) => self.st,
            St::ValueOrClose if b == b']' => self.pop(true),
            St::ValueOrClose => self.start_value(b),
            St::KeyOrClose | St::Key if is_ws(b) => self.st,
            St::KeyOrClose if b == b'}' => self.pop(false),
            St::KeyOrClose | St::Key if b == b'"' => {
                self.key_len = 0;
                self.key_other = false;
                self.escape = false;
                St::InKey
            }
            St::KeyOrClose | St::Key => St::Broken,
            St::InKey => {
                if self.escape {
                    self.escape = false;
                    St::InKey
                } else if b == b'\\' {
                    self.escape = true;
                    self.key_other = true;
                    St::InKey
                } else if b == b'"' {
                    if self.extra_depth == 0 {
                        let key = if self.key_other {
                            Key::Other
                        } else {
                            classify(&self.key_buf[..self.key_len])
                        };
                        self.frames[self.depth - 1].key = key;
                    }
                    St::Colon
                } else if b < 0x20 {
                    St::Broken
                } else {
                    if self.key_len < KEY_BUF {
                        self.key_buf[self.key_len] = b;
                        self.key_len += 1;
                    } else {
                        self.key_other = true;
                    }
                    St::InKey
                }
            }
            St::Colon if is_ws(b) => St::Colon,
            St::Colon if b == b':' => St::Value,
            St::Colon => St::Broken,
            St::InString => {
                if self.escape {
                    self.escape = false;
                    St::InString
                } else if b == b'\\' {
                    self.escape = true;
                    self.str_bad = true; // vendors never escape a model name
                    St::InString
                } else if b == b'"' {
                    self.end_string(model);
                    self.after_value()
                } else if b < 0x20 {
                    St::Broken
                } else {
                    if self.target == Some(Target::Model) && !self.str_bad {
                        if self.str_len < MAX_MODEL_LEN && (b'!'..=b'~').contains(&b) {
                            self.str_buf[self.str_len] = b;
                            self.str_len += 1;
                        } else {
                            self.str_bad = true;
                        }
                    }
                    St::InString
                }
            }
            St::InNumber => match b {
                b'0'..=b'9' => {
                    self.num = self
                        .num
                        .and_then(|n| n.checked_mul(10))
                        .and_then(|n| n.checked_add(u64::from(b - b'0')));
                    St::InNumber
                }
                // A fraction or exponent: not a count.
                b'.' | b'e' | b'E' | b'+' | b'-' => {
                    self.num = None;
                    St::InNumber
                }
                _ => {
                    self.end_number(raw);
                    let next = self.after_value();
                    self.st = next;
                    return self.byte(b, raw, model);
                }
            },
            St::InLiteral => {
                if b.is_ascii_lowercase() {
                    St::InLiteral
                } else {
                    self.st = self.after_value();
                    return self.byte(b, raw, model);
                }
            }
            St::After if is_ws(b) => St::After,
            St::After => match b {
                b',' if self.top_is_array() => St::Value,
                b',' => St::Key,
                b'}' => self.pop(false),
                b']' => self.pop(true),
                _ => St::Broken,
            },
            St::Done if is_ws(b) => St::Done,
            St::Done => St::Broken,
        };
    }
}

/// The metering of one allowed request, from the decision to the end of its response: what
/// both data planes hold per stream. Created on an allow, fed the response, and recorded into
/// the [`Tally`] exactly once — at the end of the response, or when the stream is torn down
/// earlier (a client that goes away mid-stream is still charged what the vendor reported).
#[derive(Debug)]
pub struct StreamMetering {
    key: UsageKey,
    meter: Option<ResponseMeter>,
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
        }
    }

    /// The metering of an allowed decision.
    pub fn of(allowed: &super::decision::Allowed<'_>) -> Self {
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
        self.meter = Some(ResponseMeter::new(status, content_type, content_encoding));
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
        let mut key = self.key;
        if key.model.is_empty()
            && let Some(m) = &metered.model
        {
            key.model = m.as_str().to_owned();
        }
        tally.record(key, Counts::from(&metered));
    }
}

/// The metadata field ext_authz adds to an allowed request for the ext_proc metering: a MAC
/// (under the pepper only keygate holds) over what the usage will be attributed to, so a caller
/// of the ExternalProcessor cannot bill another key by writing its id into the metadata.
pub const METERING_TAG_FIELD: &str = "metering_tag";

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

#[cfg(test)]
#[path = "metering_tests.rs"]
mod tests;
