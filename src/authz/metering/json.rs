//! The JSON scanner of the response meter: validates a document's structure as it streams by
//! and picks out the values at the paths of [`target`]: the usage counts and the model. Fixed
//! memory. A byte state machine ([`Json::byte`]) is the reference; [`Json::scan`] takes what
//! it can in runs and whole object members (`member.rs`), leaving the same state.

use super::vocab::{KEY_BUF, Key, Raw, Target, classify, may_hold_target, target};
use super::{MAX_DEPTH, MAX_EXTRA_DEPTH};
use crate::authz::model::{MAX_MODEL_LEN, ModelName, bytes_equal, string_stops};

mod member;

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
    /// Inside an object or array no usage path can be in: only its brackets and strings are
    /// followed, to find its end ([`Json::skip_run`]).
    Skipping,
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
pub(super) struct Json {
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
    /// The string being captured cannot be a model (escaped or too long; the rest of the rule
    /// is checked at its end).
    str_bad: bool,
    /// While `Skipping`: the open brackets of the skipped subtree, one bit each (1: array), and
    /// how many (the nesting limit is the scanner's: [`MAX_DEPTH`] + [`MAX_EXTRA_DEPTH`] in
    /// all); whether in a string, and after a backslash in it.
    skip_stack: [u64; 3],
    skip_depth: u32,
    skip_in_string: bool,
    skip_escape: bool,
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
            skip_stack: [0; 3],
            skip_depth: 0,
            skip_in_string: false,
            skip_escape: false,
        }
    }
}

/// JSON whitespace: space, tab, newline, carriage return (one shift and mask).
#[inline]
fn is_ws(b: u8) -> bool {
    const WS: u64 = 1 << b' ' | 1 << b'\t' | 1 << b'\n' | 1 << b'\r';
    b <= b' ' && (WS >> b) & 1 == 1
}

/// How many whitespace bytes `bytes` starts with.
#[inline]
fn whitespace(bytes: &[u8]) -> usize {
    bytes.iter().position(|&b| !is_ws(b)).unwrap_or(bytes.len())
}

/// Where the first `"` or `\\` of `bytes` is. Keys and most values are short, where `memchr`'s
/// set-up costs more than the search: the first 32 bytes are searched eight at a time in a
/// word (as the request's model scan does), the rest with `memchr`.
#[inline]
pub(super) fn quote_or_backslash(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    loop {
        let Some(word) = bytes.get(i..i + 8) else {
            return bytes[i..]
                .iter()
                .position(|&b| b == b'"' || b == b'\\')
                .map(|p| i + p);
        };
        if i >= 32 {
            return memchr::memchr2(b'"', b'\\', &bytes[i..]).map(|p| i + p);
        }
        let w = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        let found = bytes_equal(w, b'"') | bytes_equal(w, b'\\');
        if found != 0 {
            return Some(i + (found.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
}

/// Where the first `"`, `\\` or control byte (< 0x20) of `bytes` is: the end of a key, which
/// is read whole only when none of the latter two come first. Eight bytes at a time in a word.
#[inline]
pub(super) fn string_stop(bytes: &[u8]) -> Option<usize> {
    let mut words = bytes.chunks_exact(8);
    for (n, word) in words.by_ref().enumerate() {
        let found = string_stops(u64::from_le_bytes(word.try_into().expect("eight bytes")));
        if found != 0 {
            return Some(n * 8 + (found.trailing_zeros() / 8) as usize);
        }
    }
    let tail = words.remainder();
    tail.iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|p| bytes.len() - tail.len() + p)
}

/// The rest of a string whose opening quote was read (`escape`: right after a backslash):
/// `Ok` with the bytes used, its closing quote included, or `Err` when it goes on past
/// `bytes`, telling whether they end right after a backslash.
#[inline]
fn string_rest(bytes: &[u8], mut escape: bool) -> Result<usize, bool> {
    let mut i = 0;
    loop {
        if escape {
            if i >= bytes.len() {
                return Err(true);
            }
            i += 1; // the escaped byte, whatever it is
        }
        let Some(n) = quote_or_backslash(&bytes[i..]) else {
            return Err(false);
        };
        i += n + 1;
        if bytes[i - 1] == b'"' {
            return Ok(i);
        }
        escape = true;
    }
}

impl Json {
    /// Reads `bytes`: a chunk of a JSON body, or of an SSE data line up to (not including) its
    /// end. What needs no state-machine step is taken in runs: a string's contents up to its
    /// next `"` or `\\` (unread in a string nobody reads — control bytes there are not checked:
    /// the scanner is not a validator — copied in a key or the model), a number's digits,
    /// whitespace between tokens, a skipped container, and a whole object member at a time
    /// ([`Json::member`]); everything else goes through [`Json::byte`].
    pub(super) fn scan(&mut self, bytes: &[u8], raw: &mut Raw, model: &mut Option<ModelName>) {
        let mut i = 0;
        while let Some(rest) = bytes.get(i..).filter(|r| !r.is_empty()) {
            match self.st {
                St::Broken => return,
                St::Skipping => i += self.skip_run(rest),
                St::InString | St::InKey if !self.escape => {
                    let end = quote_or_backslash(rest).unwrap_or(rest.len());
                    if self.st == St::InKey {
                        self.key_bytes(&rest[..end]);
                    } else if self.target == Some(Target::Model) {
                        self.model_bytes(&rest[..end]);
                    }
                    i += end;
                    if let Some(&b) = bytes.get(i) {
                        self.byte(b, raw, model);
                        i += 1;
                    }
                }
                St::InNumber => {
                    let n = rest
                        .iter()
                        .position(|b| !b.is_ascii_digit())
                        .unwrap_or(rest.len());
                    self.digits(&rest[..n]);
                    i += n;
                    if let Some(&b) = bytes.get(i) {
                        self.byte(b, raw, model);
                        i += 1;
                    }
                }
                St::Key | St::KeyOrClose if rest[0] == b'"' && self.extra_depth == 0 => {
                    i += self.member(rest, raw, model);
                }
                // The end of a value in an object or array (as `byte` reads it, without the call).
                St::After if matches!(rest[0], b',' | b'}' | b']') => {
                    self.st = self.after(rest[0]);
                    i += 1;
                }
                // Whitespace between tokens changes nothing (in a literal it ends it, after a
                // backslash it is the one escaped byte: `byte` takes those).
                St::Start
                | St::Value
                | St::ValueOrClose
                | St::KeyOrClose
                | St::Key
                | St::Colon
                | St::After
                | St::Done
                    if is_ws(rest[0]) =>
                {
                    i += whitespace(rest)
                }
                _ => {
                    self.byte(rest[0], raw, model);
                    i += 1;
                }
            }
        }
    }

    /// The next `bytes` of the key being read, none of them `"` or `\\` (what [`Json::byte`]
    /// does with each, at once).
    fn key_bytes(&mut self, bytes: &[u8]) {
        if bytes.iter().any(|&b| b < 0x20) {
            self.st = St::Broken;
            return;
        }
        match self
            .key_buf
            .get_mut(self.key_len..self.key_len + bytes.len())
        {
            Some(room) if !self.key_other => {
                room.copy_from_slice(bytes);
                self.key_len += bytes.len();
            }
            _ => self.key_other = true,
        }
    }

    /// The next `bytes` of the model string, none of them `"` or `\\`: a control byte breaks
    /// the document; bytes past the longest model make the string no model. (Whether the
    /// rest makes a model is [`ModelName::store`]'s rule, applied at the string's end.)
    fn model_bytes(&mut self, bytes: &[u8]) {
        if bytes.iter().any(|&b| b < 0x20) {
            self.st = St::Broken;
            return;
        }
        if self.str_bad {
            return;
        }
        match self
            .str_buf
            .get_mut(self.str_len..self.str_len + bytes.len())
        {
            Some(room) => {
                room.copy_from_slice(bytes);
                self.str_len += bytes.len();
            }
            _ => self.str_bad = true,
        }
    }

    /// The next `digits` (ASCII digits only) of the number being read, as [`Json::byte`] does
    /// with each.
    fn digits(&mut self, digits: &[u8]) {
        // (Stops at the first overflow: the number is no count.)
        self.num = self.num.and_then(|n| {
            digits.iter().try_fold(n, |n, &d| {
                n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
            })
        });
    }

    /// The document was read to its end without error.
    pub(super) fn complete(&self) -> bool {
        self.st == St::Done
    }

    /// What a value starting now at the current position is.
    fn value_target(&self) -> Option<Target> {
        // Every target is a value under a key of ours in an object: most values are not.
        match self.frames[..self.depth].last() {
            Some(top) if !top.array && top.key != Key::Other => {}
            _ => return None,
        }
        let (path, len) = self.key_path::<4>()?;
        target(&path[..len])
    }

    /// The keys from the root to the innermost open object (the root array of a Gemini
    /// stream left out: its elements are documents), when they are at most `N`, with no array
    /// among them and no level beyond [`MAX_DEPTH`].
    fn key_path<const N: usize>(&self) -> Option<([Key; N], usize)> {
        if self.extra_depth > 0 {
            return None;
        }
        let frames = &self.frames[..self.depth];
        let frames = match frames {
            [first, rest @ ..] if first.array => rest,
            _ => frames,
        };
        if frames.len() > N || frames.iter().any(|f| f.array) {
            return None;
        }
        let mut path = [Key::Other; N];
        for (p, f) in path.iter_mut().zip(frames) {
            *p = f.key;
        }
        Some((path, frames.len()))
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

    /// Whether an object (or array) starting now can hold a value [`target`] reads.
    fn container_relevant(&self, array: bool) -> bool {
        // Below the root, a usage path runs through keys of ours only.
        if let Some(top) = self.frames[..self.depth].last()
            && !top.array
            && top.key == Key::Other
        {
            return false;
        }
        if self.depth > 0 && array {
            return false; // values inside a nested array are never read
        }
        self.key_path::<3>()
            .is_some_and(|(path, len)| may_hold_target(&path[..len]))
    }

    /// Enters a container no usage path can be in: followed by its brackets only.
    fn skip(&mut self, array: bool) -> St {
        if self.depth as u32 + self.extra_depth >= MAX_DEPTH as u32 + MAX_EXTRA_DEPTH {
            return St::Broken;
        }
        self.skip_stack = [u64::from(array), 0, 0];
        self.skip_depth = 1;
        self.skip_in_string = false;
        self.skip_escape = false;
        St::Skipping
    }

    /// Inside a skipped container: moves over `chunk` to the end of the container (its
    /// closing bracket consumed), answering how many bytes were used; all of them when it goes
    /// on past the chunk. Only strings (whose brackets do not count) and brackets are read;
    /// mismatched or too deeply nested brackets break the document.
    pub(super) fn skip_run(&mut self, chunk: &[u8]) -> usize {
        debug_assert_eq!(self.st, St::Skipping);
        // The open brackets in locals (kept in registers), written back if the chunk ends first.
        let room = (MAX_DEPTH as u32 + MAX_EXTRA_DEPTH)
            .saturating_sub(self.depth as u32 + self.extra_depth);
        let (mut depth, mut stack) = (self.skip_depth, self.skip_stack);
        let mut i = 0;
        if self.skip_in_string {
            match string_rest(chunk, self.skip_escape) {
                Ok(used) => {
                    i = used;
                    self.skip_in_string = false;
                    self.skip_escape = false;
                }
                Err(escape) => {
                    self.skip_escape = escape;
                    return chunk.len();
                }
            }
        }
        while let Some(&b) = chunk.get(i) {
            i += 1;
            match b {
                b'"' => match string_rest(&chunk[i..], false) {
                    Ok(used) => i += used,
                    Err(escape) => {
                        self.skip_in_string = true;
                        self.skip_escape = escape;
                        break;
                    }
                },
                b'{' | b'[' => {
                    if depth >= room {
                        self.st = St::Broken;
                        return chunk.len();
                    }
                    let (word, bit) = ((depth / 64) as usize, depth % 64);
                    if b == b'[' {
                        stack[word] |= 1 << bit;
                    } else {
                        stack[word] &= !(1 << bit);
                    }
                    depth += 1;
                }
                b'}' | b']' => {
                    depth -= 1;
                    let (word, bit) = ((depth / 64) as usize, depth % 64);
                    if ((stack[word] >> bit) & 1 == 1) != (b == b']') {
                        self.st = St::Broken;
                        return chunk.len();
                    }
                    if depth == 0 {
                        self.skip_depth = 0;
                        self.st = self.after_value();
                        return i;
                    }
                }
                _ => {}
            }
        }
        (self.skip_depth, self.skip_stack) = (depth, stack);
        chunk.len()
    }

    fn start_value(&mut self, b: u8) -> St {
        match b {
            b'{' if !self.container_relevant(false) => self.skip(false),
            b'[' if !self.container_relevant(true) => self.skip(true),
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

    #[inline]
    fn end_number(&mut self, raw: &mut Raw) {
        if let (Some(Target::Count(field)), Some(n)) = (self.target, self.num) {
            *raw.slot(field) = Some(n);
        }
        self.target = None;
        self.num = None;
    }

    /// The state after `b`, the first byte (not whitespace) after a value in a container.
    #[inline]
    fn after(&mut self, b: u8) -> St {
        match b {
            b',' if self.top_is_array() => St::Value,
            b',' => St::Key,
            b'}' => self.pop(false),
            b']' => self.pop(true),
            _ => St::Broken,
        }
    }

    fn end_string(&mut self, model: &mut Option<ModelName>) {
        if self.target == Some(Target::Model) && !self.str_bad {
            ModelName::store(model, &self.str_buf[..self.str_len]);
        }
        self.target = None;
    }

    #[inline]
    pub(super) fn byte(&mut self, b: u8, raw: &mut Raw, model: &mut Option<ModelName>) {
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
                    if self.target == Some(Target::Model) {
                        self.model_bytes(&[b]);
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
            St::After => self.after(b),
            St::Done if is_ws(b) => St::Done,
            St::Done => St::Broken,
            St::Skipping => {
                self.skip_run(&[b]);
                return;
            }
        };
    }
}
