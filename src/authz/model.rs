//! The model a request names (SPEC §8.1): the top-level `model` string of a JSON request body,
//! or the model segment of an Azure OpenAI or Gemini/Vertex path. Pure functions over bytes,
//! shared by every data plane; no dependency beyond `std`.
//!
//! The body scanner reads the whole body once, left to right, validating it as JSON without
//! building a document: nested values, numbers and literals are only checked and skipped, and
//! strings are skipped eight bytes at a time. Nesting is tracked in a 128-bit stack, so depth
//! is bounded ([`MAX_DEPTH`]) and nothing recurses. It allocates only when the model itself is
//! written with escapes.
//!
//! Rules (each refusal is its own [`ModelError`]; the first problem in body order is reported):
//! - the body is one JSON value (RFC 8259 grammar: no control characters inside strings, valid
//!   escapes and numbers) with nothing but whitespace after it; bytes ≥ 0x80 inside strings
//!   are not checked for UTF-8 validity (they cannot be part of a valid model);
//! - that value is an object, with exactly one top-level key that is `model` once unescaped
//!   (`"mo\u0064el"` is `model`, for finding it and for the duplicate rule: upstream parsers
//!   compare unescaped keys and disagree on which of two wins); a top-level key that differs
//!   from `model` only in ASCII letter case (`"Model"`, `"MODEL"`) is refused too, since some
//!   upstream parsers (Go's `encoding/json`) match field names case-insensitively and would read
//!   it as the model; `model` keys in nested values are ignored;
//! - its value is a string which, once unescaped, is 1 to [`MAX_MODEL_LEN`] bytes of visible
//!   ASCII (`!`..=`~`: no space, no control or non-ASCII character), e.g. `gpt-4o-mini`,
//!   `claude-sonnet-4-5`, `models/gemini-2.5-pro`.

use std::borrow::Cow;

/// The deepest nesting of objects and arrays accepted, the top-level object included (what
/// `serde_json` accepts, 127, is always accepted).
pub const MAX_DEPTH: usize = 128;

/// The longest model name accepted, in bytes after unescaping.
pub const MAX_MODEL_LEN: usize = 256;

/// Why a request's model could not be determined. Never carries body content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A byte that JSON does not allow where it stands.
    #[error("syntax: the body is not JSON (unexpected byte at offset {offset})")]
    Syntax { offset: usize },
    /// The body (possibly empty) ends inside the JSON value.
    #[error("truncated: the body ends before its JSON value does")]
    Truncated,
    /// Something other than whitespace follows the JSON value.
    #[error("trailing_data: the JSON value is followed by more data at offset {offset}")]
    TrailingData { offset: usize },
    /// The JSON value is not an object.
    #[error("not_object: the body's JSON value is not an object")]
    NotObject,
    /// Objects and arrays are nested deeper than [`MAX_DEPTH`].
    #[error("too_deep: the body nests objects and arrays deeper than {MAX_DEPTH}")]
    TooDeep,
    /// The top-level object has no `model` key.
    #[error("missing: the body has no top-level \"model\"")]
    Missing,
    /// The top-level `model` is not a string.
    #[error("not_string: the top-level \"model\" is not a string")]
    NotString,
    /// The top-level object has `model` more than once.
    #[error("duplicate: the top-level \"model\" appears more than once")]
    Duplicate,
    /// The top-level object has a key that is `model` in another letter case.
    #[error("case_variant: a top-level key differs from \"model\" only in letter case")]
    CaseVariant,
    /// The model is the empty string.
    #[error("empty: the model is an empty string")]
    Empty,
    /// The model is longer than [`MAX_MODEL_LEN`] bytes.
    #[error("too_long: the model is longer than {MAX_MODEL_LEN} bytes")]
    TooLong,
    /// The model has a character outside visible ASCII.
    #[error("not_visible_ascii: the model has a character outside visible ASCII")]
    NotVisibleAscii,
}

/// The top-level `model` string of a JSON object body (see the module documentation for the
/// rules). Borrowed from `body` unless the model is written with escapes.
pub fn model_from_json(body: &[u8]) -> Result<Cow<'_, str>, ModelError> {
    let mut scan = Scanner { body, at: 0 };
    scan.skip_whitespace();
    match scan.peek() {
        Some(b'{') => {}
        Some(b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => {
            return Err(ModelError::NotObject);
        }
        Some(_) => return Err(ModelError::Syntax { offset: scan.at }),
        None => return Err(ModelError::Truncated),
    }
    let model = scan.object_body()?;
    scan.skip_whitespace();
    if scan.at < body.len() {
        return Err(ModelError::TrailingData { offset: scan.at });
    }
    model.ok_or(ModelError::Missing)
}

/// The model named by a request path: the segment after `/deployments/` (Azure OpenAI,
/// `/openai/deployments/{name}/chat/completions`), else the part of the segment after
/// `/models/` up to `:` (Gemini and Vertex, `/v1beta/models/{name}:generateContent`). The query
/// string is ignored. `None` when neither form is present, or the name is empty,
/// percent-encoded, or breaks the body's rule (1–256 bytes of visible ASCII).
pub fn model_from_path(path: &str) -> Option<&str> {
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    // A path the upstream could resolve to another segment than the one read here (dot
    // segments, empty segments, backslashes) names no model. Envoy's `normalize_path` and
    // `merge_slashes` remove these first in keygate's configs; this holds without them too.
    if path.contains('\\')
        || path.contains("//")
        || path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
    {
        return None;
    }
    let name = if let Some((_, rest)) = path.split_once("/deployments/") {
        rest.split_once('/').map_or(rest, |(name, _)| name)
    } else {
        let (_, rest) = path.split_once("/models/")?;
        let segment = rest.split_once('/').map_or(rest, |(segment, _)| segment);
        segment.split_once(':')?.0
    };
    let valid = !name.is_empty()
        && name.len() <= MAX_MODEL_LEN
        && !name.contains('%')
        && name.bytes().all(is_visible_ascii);
    valid.then_some(name)
}

/// A request's model, held inline (no allocation on the decision path): 1 to
/// [`MAX_MODEL_LEN`] bytes of visible ASCII, the rule every source of a model follows.
#[derive(Clone, Copy)]
pub struct ModelName {
    len: u16,
    bytes: [u8; MAX_MODEL_LEN],
}

impl ModelName {
    /// `model` if it follows the rule.
    pub fn new(model: &str) -> Option<Self> {
        let mut slot = None;
        Self::store(&mut slot, model.as_bytes());
        slot
    }

    /// Puts `bytes` in `slot` if they follow the rule (the one place it is checked), answering
    /// whether they did. A model
    /// already in the slot is overwritten in place: only the new bytes are copied (the
    /// response meter keeps the last model it reads).
    pub fn store(slot: &mut Option<Self>, bytes: &[u8]) -> bool {
        let valid = !bytes.is_empty()
            && bytes.len() <= MAX_MODEL_LEN
            && bytes.iter().copied().all(is_visible_ascii);
        if !valid {
            return false;
        }
        match slot {
            Some(m) => {
                m.bytes[..bytes.len()].copy_from_slice(bytes);
                m.len = bytes.len() as u16;
            }
            None => {
                let mut m = ModelName {
                    len: bytes.len() as u16,
                    bytes: [0; MAX_MODEL_LEN],
                };
                m.bytes[..bytes.len()].copy_from_slice(bytes);
                *slot = Some(m);
            }
        }
        true
    }

    pub fn as_str(&self) -> &str {
        // Checked visible ASCII in `new`, so always UTF-8.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::fmt::Debug for ModelName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl PartialEq for ModelName {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}
impl Eq for ModelName {}

fn is_visible_ascii(byte: u8) -> bool {
    (0x21..=0x7e).contains(&byte)
}

/// What the scanner expects next inside a container.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A value, or `]` (just after `[`).
    FirstValue,
    /// A value (after `,` in an array).
    Value,
    /// A key, or `}` (just after `{`).
    FirstKey,
    /// A key (after `,` in an object).
    Key,
    /// `,` or the close of the innermost container.
    CommaOrClose,
}

struct Scanner<'a> {
    body: &'a [u8],
    at: usize,
}

/// Eight copies of a byte.
pub(crate) const fn splat(byte: u8) -> u64 {
    0x0101_0101_0101_0101 * byte as u64
}

/// The high bit of every byte of `word` equal to `byte` (the zero bytes of `word ^ splat(byte)`).
/// Only the lowest set bit is exact (borrows may set higher ones): search with
/// `trailing_zeros` of little-endian words. Shared with the response meter.
#[inline(always)]
pub(crate) const fn bytes_equal(word: u64, byte: u8) -> u64 {
    let x = word ^ splat(byte);
    x.wrapping_sub(splat(1)) & !x & splat(0x80)
}

/// The high bit of every byte of `word` that is `"`, `\` or a control character (< 0x20).
/// Only the lowest set bit is exact (borrows may set higher ones), which is all we use. Shared
/// with the response meter.
#[inline(always)]
pub(crate) fn string_stops(word: u64) -> u64 {
    let control = word.wrapping_sub(splat(0x20)) & !word & splat(0x80);
    bytes_equal(word, b'"') | bytes_equal(word, b'\\') | control
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.body.get(self.at).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// The next non-whitespace byte (not consumed), or `Truncated`.
    fn next_token(&mut self) -> Result<u8, ModelError> {
        self.skip_whitespace();
        self.peek().ok_or(ModelError::Truncated)
    }

    fn syntax(&self) -> ModelError {
        ModelError::Syntax { offset: self.at }
    }

    /// From the top-level `{` to just after its `}`: the whole document, iteratively. Returns
    /// the top-level model, if any.
    fn object_body(&mut self) -> Result<Option<Cow<'a, str>>, ModelError> {
        // Bit `d` of `objects` is set when the container at depth `d + 1` is an object.
        let mut objects: u128 = 1;
        let mut depth = 1usize;
        let mut expect = Expect::FirstKey;
        let mut model = None;
        self.at += 1;
        loop {
            let byte = self.next_token()?;
            match expect {
                Expect::FirstKey | Expect::Key => {
                    if byte == b'}' && expect == Expect::FirstKey {
                        expect = Expect::CommaOrClose;
                        depth -= 1;
                        self.at += 1;
                    } else if byte != b'"' {
                        return Err(self.syntax());
                    } else {
                        match self.key(depth)? {
                            KeyIs::Model if model.is_some() => return Err(ModelError::Duplicate),
                            KeyIs::Model => {
                                model = Some(self.model_value()?);
                                expect = Expect::CommaOrClose;
                            }
                            KeyIs::CaseVariant => return Err(ModelError::CaseVariant),
                            KeyIs::Other => expect = Expect::Value,
                        }
                    }
                }
                Expect::FirstValue | Expect::Value => {
                    if byte == b']' && expect == Expect::FirstValue {
                        expect = Expect::CommaOrClose;
                        depth -= 1;
                        self.at += 1;
                    } else if byte == b'{' || byte == b'[' {
                        if depth == MAX_DEPTH {
                            return Err(ModelError::TooDeep);
                        }
                        let is_object = byte == b'{';
                        objects = objects & !(1 << depth) | (u128::from(is_object) << depth);
                        depth += 1;
                        expect = if is_object {
                            Expect::FirstKey
                        } else {
                            Expect::FirstValue
                        };
                        self.at += 1;
                    } else {
                        self.scalar(byte)?;
                        expect = Expect::CommaOrClose;
                    }
                }
                Expect::CommaOrClose => {
                    let in_object = objects >> (depth - 1) & 1 == 1;
                    match (byte, in_object) {
                        (b',', true) => expect = Expect::Key,
                        (b',', false) => expect = Expect::Value,
                        (b'}', true) | (b']', false) => depth -= 1,
                        _ => return Err(self.syntax()),
                    }
                    self.at += 1;
                }
            }
            if depth == 0 {
                return Ok(model);
            }
        }
    }

    /// A key at `self.at` (its `"`) and the `:` after it, compared with `model` when it is
    /// top-level (nested keys are always `Other`).
    fn key(&mut self, depth: usize) -> Result<KeyIs, ModelError> {
        let start = self.at + 1;
        let escaped = self.string()?;
        let raw = &self.body[start..self.at - 1];
        let is = if depth != 1 {
            KeyIs::Other
        } else if escaped {
            classify_escaped_key(raw)
        } else if raw == b"model" {
            KeyIs::Model
        } else if raw.eq_ignore_ascii_case(b"model") {
            KeyIs::CaseVariant
        } else {
            KeyIs::Other
        };
        if self.next_token()? != b':' {
            return Err(self.syntax());
        }
        self.at += 1;
        Ok(is)
    }

    /// The value of the top-level `model`, which must be a valid model string.
    fn model_value(&mut self) -> Result<Cow<'a, str>, ModelError> {
        match self.next_token()? {
            b'"' => {}
            b'{' | b'[' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                return Err(ModelError::NotString);
            }
            _ => return Err(self.syntax()),
        }
        let start = self.at + 1;
        let escaped = self.string()?;
        let raw = &self.body[start..self.at - 1];
        if escaped {
            return unescape_model(raw).map(Cow::Owned);
        }
        check_model_units(raw.iter().map(|&byte| u32::from(byte)))?;
        std::str::from_utf8(raw)
            .map(Cow::Borrowed)
            .map_err(|_| ModelError::NotVisibleAscii)
    }

    /// A string, number or literal starting with `byte` at `self.at`.
    fn scalar(&mut self, byte: u8) -> Result<(), ModelError> {
        match byte {
            b'"' => self.string().map(drop),
            b'-' | b'0'..=b'9' => self.number(),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => Err(self.syntax()),
        }
    }

    /// A string from its opening `"` at `self.at` to just after its closing one; true when it
    /// has escapes. Eight bytes at a time until a `"`, `\` or control character.
    fn string(&mut self) -> Result<bool, ModelError> {
        let body = self.body;
        let mut at = self.at + 1;
        let mut escaped = false;
        loop {
            while let Some(chunk) = body.get(at..at + 8) {
                let word = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
                let stops = string_stops(word);
                if stops != 0 {
                    at += (stops.trailing_zeros() / 8) as usize;
                    break;
                }
                at += 8;
            }
            match body.get(at) {
                None => return Err(ModelError::Truncated),
                Some(b'"') => {
                    self.at = at + 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    escaped = true;
                    at = escape_end(body, at)?;
                }
                Some(0..=0x1f) => return Err(ModelError::Syntax { offset: at }),
                Some(_) => at += 1,
            }
        }
    }

    /// A number (RFC 8259 grammar) starting at `self.at`.
    fn number(&mut self) -> Result<(), ModelError> {
        let digits = |scan: &mut Self| -> Result<(), ModelError> {
            match scan.peek() {
                Some(b'0'..=b'9') => {}
                Some(_) => return Err(scan.syntax()),
                None => return Err(ModelError::Truncated),
            }
            while let Some(b'0'..=b'9') = scan.peek() {
                scan.at += 1;
            }
            Ok(())
        };
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        if self.peek() == Some(b'0') {
            self.at += 1;
        } else {
            digits(self)?;
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            digits(self)?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            digits(self)?;
        }
        Ok(())
    }

    /// `true`, `false` or `null` at `self.at`.
    fn literal(&mut self, word: &[u8]) -> Result<(), ModelError> {
        let rest = &self.body[self.at..];
        if rest.starts_with(word) {
            self.at += word.len();
            return Ok(());
        }
        let matched = rest.iter().zip(word).take_while(|(a, b)| a == b).count();
        if matched == rest.len() {
            return Err(ModelError::Truncated);
        }
        Err(ModelError::Syntax {
            offset: self.at + matched,
        })
    }
}

/// Just after the escape whose `\` is at `at`, once it is checked.
fn escape_end(body: &[u8], at: usize) -> Result<usize, ModelError> {
    match body.get(at + 1) {
        None => Err(ModelError::Truncated),
        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(at + 2),
        Some(b'u') => {
            for offset in at + 2..at + 6 {
                match body.get(offset) {
                    None => return Err(ModelError::Truncated),
                    Some(byte) if byte.is_ascii_hexdigit() => {}
                    Some(_) => return Err(ModelError::Syntax { offset }),
                }
            }
            Ok(at + 6)
        }
        Some(_) => Err(ModelError::Syntax { offset: at + 1 }),
    }
}

/// The units of an already checked string's content: its bytes, with each escape replaced by
/// the code unit it stands for (`\uXXXX` gives the UTF-16 unit: a surrogate, or any other
/// non-ASCII value, can never equal a visible ASCII character, so pairing them is not needed).
fn unescaped_units(raw: &[u8]) -> impl Iterator<Item = u32> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let byte = *raw.get(at)?;
        if byte != b'\\' {
            at += 1;
            return Some(u32::from(byte));
        }
        let kind = raw.get(at + 1).copied().unwrap_or(b'\\');
        at += 2;
        Some(match kind {
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => 0x0a,
            b'r' => 0x0d,
            b't' => 0x09,
            b'u' => {
                let hex = raw.get(at..at + 4).unwrap_or(b"0000");
                at += 4;
                let text = std::str::from_utf8(hex).unwrap_or("0000");
                u32::from_str_radix(text, 16).unwrap_or(0)
            }
            other => u32::from(other),
        })
    })
}

/// How a top-level key compares with `model`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyIs {
    /// `model` exactly (once unescaped).
    Model,
    /// `model` in another ASCII letter case (`Model`, `MODEL`, …).
    CaseVariant,
    Other,
}

/// An escaped key compared with `model` once unescaped.
fn classify_escaped_key(raw: &[u8]) -> KeyIs {
    let mut units = [0u32; 6];
    let mut n = 0;
    for unit in unescaped_units(raw).take(6) {
        units[n] = unit;
        n += 1;
    }
    if n != 5 {
        return KeyIs::Other;
    }
    let lower = |u: u32| u8::try_from(u).map(|b| b.to_ascii_lowercase());
    if units[..5]
        .iter()
        .zip(b"model")
        .all(|(&u, &m)| u == u32::from(m))
    {
        KeyIs::Model
    } else if units[..5]
        .iter()
        .zip(b"model")
        .all(|(&u, &m)| lower(u) == Ok(m))
    {
        KeyIs::CaseVariant
    } else {
        KeyIs::Other
    }
}

/// Checks the model rule over unescaped units, in order: the first bad character or the
/// 257th unit is reported, then emptiness.
fn check_model_units(units: impl Iterator<Item = u32>) -> Result<(), ModelError> {
    let mut count = 0;
    for unit in units {
        if !(0x21..=0x7e).contains(&unit) {
            return Err(ModelError::NotVisibleAscii);
        }
        if count == MAX_MODEL_LEN {
            return Err(ModelError::TooLong);
        }
        count += 1;
    }
    if count == 0 {
        return Err(ModelError::Empty);
    }
    Ok(())
}

/// A model written with escapes, unescaped (the one allocation of the scanner).
fn unescape_model(raw: &[u8]) -> Result<String, ModelError> {
    check_model_units(unescaped_units(raw))?;
    Ok(unescaped_units(raw)
        .filter_map(char::from_u32)
        .collect::<String>())
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
