//! The scanner's fast path: one object member (`"key": value` and the `,` or `}` after it) read
//! in one step when it is all in the bytes at hand — most of a vendor's answer, whose members
//! are short keys with strings, numbers and literals. It leaves the scanner in exactly the state
//! [`Json::byte`] would have reached over the same bytes, and hands over to it at the first
//! thing it does not take whole: a container value, a string that is captured (the model) or
//! escaped, a number that is not a plain integer, a member cut by the end of the bytes. The
//! meter's tests and fuzz target compare a whole body with the same bytes fed one at a time
//! (where this path never sees a whole member).

use super::{Json, St, classify, quote_or_backslash, whitespace};
use crate::authz::metering::vocab::Raw;

impl Json {
    /// Reads the member starting at `rest[0]` (a `"`, in state `Key` or `KeyOrClose`, at a
    /// level with frames) as far as it is in `rest`, answering how many bytes it used (at
    /// least the opening quote).
    pub(super) fn member(&mut self, rest: &[u8], raw: &mut Raw) -> usize {
        debug_assert!(rest[0] == b'"' && matches!(self.st, St::Key | St::KeyOrClose));
        debug_assert!(self.extra_depth == 0 && self.depth > 0);
        // The opening quote, as `byte` takes it.
        self.key_len = 0;
        self.key_other = false;
        self.escape = false;
        self.st = St::InKey;
        let key_and_after = &rest[1..];
        let key = match quote_or_backslash(key_and_after) {
            Some(end) if key_and_after[end] == b'"' => &key_and_after[..end],
            _ => return 1, // escaped or cut: the key is read byte by byte
        };
        if key.iter().any(|&b| b < 0x20) {
            self.st = St::Broken;
            return rest.len();
        }
        // (A key longer than any of ours classifies as `Other`, as when read byte by byte.)
        self.frames[self.depth - 1].key = classify(key);
        self.st = St::Colon;
        let mut j = 1 + key.len() + 1;
        j += whitespace(&rest[j..]);
        if rest.get(j) != Some(&b':') {
            return j;
        }
        self.st = St::Value;
        j += 1;
        j += whitespace(&rest[j..]);
        let Some(value) = rest.get(j..).filter(|v| !v.is_empty()) else {
            return j;
        };
        // The value, taken whole or left to `byte` from its first byte (state `Value`).
        let used = match value[0] {
            b'"' => {
                if self.value_target().is_some() {
                    return j;
                }
                match quote_or_backslash(&value[1..]) {
                    Some(end) if value[1 + end] == b'"' => 1 + end + 1,
                    _ => return j,
                }
            }
            b'0'..=b'9' => {
                let Some(len) = value.iter().position(|b| !b.is_ascii_digit()) else {
                    return j; // it may go on in the next bytes
                };
                if matches!(value[len], b'.' | b'e' | b'E' | b'+' | b'-') {
                    return j; // not a count: `byte` reads it to its end
                }
                // As `byte` reads it: its target, its digits, its end.
                self.target = self.value_target();
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
        j += whitespace(&rest[j..]);
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
