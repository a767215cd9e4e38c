//! The scanner's fast path: one object member (`"key": value` and the `,` or `}` after it) read
//! in one step when it is all in the bytes at hand — most of a vendor's answer, whose members
//! are short keys with strings, numbers and literals. It leaves the scanner in exactly the state
//! [`Json::byte`] would have reached over the same bytes, and hands over to it at the first
//! thing it does not take whole: an escaped string, a number that is not a plain integer, a
//! member cut by the end of the bytes. A container value is entered (or skipped) as `byte`
//! would, and the scanner reads on inside it; the model string is checked and kept here. The
//! meter's tests and fuzz target compare a whole body with the same bytes fed one at a time
//! (where this path never sees a whole member).

use super::{Json, St, classify, is_ws, quote_or_backslash, string_stop, whitespace};
use crate::authz::metering::vocab::{Key, Raw, Target};
use crate::authz::model::ModelName;

impl Json {
    /// Reads the member starting at `rest[0]` (a `"`, in state `Key` or `KeyOrClose`, at a
    /// level with frames) as far as it is in `rest`, answering how many bytes it used (at
    /// least the opening quote).
    pub(super) fn member(
        &mut self,
        rest: &[u8],
        raw: &mut Raw,
        model: &mut Option<ModelName>,
    ) -> usize {
        debug_assert!(rest[0] == b'"' && matches!(self.st, St::Key | St::KeyOrClose));
        debug_assert!(self.extra_depth == 0 && self.depth > 0);
        // The opening quote, as `byte` takes it.
        self.key_len = 0;
        self.key_other = false;
        self.escape = false;
        self.st = St::InKey;
        let key_and_after = &rest[1..];
        let key = match string_stop(key_and_after) {
            Some(end) if key_and_after[end] == b'"' => &key_and_after[..end],
            Some(end) if key_and_after[end] < 0x20 => {
                self.st = St::Broken;
                return rest.len();
            }
            _ => return 1, // escaped or cut: the key is read byte by byte
        };
        // (A key longer than any of ours classifies as `Other`, as when read byte by byte.)
        let mut j = 1 + key.len() + 1;
        let key = classify(key);
        self.frames[self.depth - 1].key = key;
        self.st = St::Colon;
        j += skip_ws(&rest[j..]);
        if rest.get(j) != Some(&b':') {
            return j;
        }
        self.st = St::Value;
        j += 1;
        j += skip_ws(&rest[j..]);
        let Some(value) = rest.get(j..).filter(|v| !v.is_empty()) else {
            return j;
        };
        // The value, taken whole or left to `byte` from its first byte (state `Value`).
        let used = match value[0] {
            b'"' => {
                let end = match quote_or_backslash(&value[1..]) {
                    Some(end) if value[1 + end] == b'"' => end,
                    _ => return j,
                };
                // As `byte` reads a string: the model's bytes are checked (a control byte
                // breaks the document) and kept when they make a model.
                // (Only a model key can lead to one: the path is looked at for those alone.)
                if matches!(key, Key::Model | Key::ModelVersion)
                    && self.value_target() == Some(Target::Model)
                {
                    let s = &value[1..1 + end];
                    if s.iter().any(|&b| b < 0x20) {
                        self.st = St::Broken;
                        return rest.len();
                    }
                    ModelName::store(model, s);
                }
                1 + end + 1
            }
            // A container: entered (or skipped) as `byte` does, then read on by the scanner.
            b'{' | b'[' => {
                self.st = self.start_value(value[0]);
                return j + 1;
            }
            b'0'..=b'9' => {
                let Some(len) = value.iter().position(|b| !b.is_ascii_digit()) else {
                    return j; // it may go on in the next bytes
                };
                if matches!(value[len], b'.' | b'e' | b'E' | b'+' | b'-') {
                    return j; // not a count: `byte` reads it to its end
                }
                // As `byte` reads it: its target, its digits, its end.
                self.target = match key {
                    Key::Other => None, // what `value_target` answers at once
                    _ => self.value_target(),
                };
                self.num = Some(0);
                self.digits(&value[..len]);
                self.end_number(raw);
                len
            }
            b't' | b'f' | b'n' => match value.iter().position(|b| !b.is_ascii_lowercase()) {
                Some(len) => len,
                None => return j,
            },
            _ => return j,
        };
        self.target = None;
        self.num = None;
        // After the value, inside an object (frames, depth > 0): `,` or `}`.
        self.st = St::After;
        j += used;
        j += skip_ws(&rest[j..]);
        match rest.get(j) {
            Some(b',') => {
                self.st = St::Key;
                j + 1
            }
            Some(b'}') => {
                self.st = self.pop(false);
                j + 1
            }
            _ => j,
        }
    }
}

/// How many whitespace bytes `bytes` starts with; most often none, answered at once.
#[inline]
fn skip_ws(bytes: &[u8]) -> usize {
    match bytes.first() {
        Some(&b) if is_ws(b) => whitespace(bytes),
        _ => 0,
    }
}
