//! Fuzz target of the response meter (`keygate::authz::metering`): arbitrary bytes as a
//! response body, read as JSON or as SSE, whole and in arbitrary chunks.
//!
//! Invariants: it never panics; the reading does not depend on how the body is chunked;
//! cached input never exceeds input; and, as a differential check, when serde_json parses a
//! JSON body (without escapes or repeated keys of interest) as an object whose `usage` holds
//! `prompt_tokens` as an unsigned integer, the meter reads that same number as input.
#![no_main]

use keygate::authz::metering::{Reading, ResponseMeter};
use libfuzzer_sys::fuzz_target;

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).filter(|w| *w == needle).count()
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, body)) = data.split_first() else {
        return;
    };
    let sse = control & 1 == 1;
    let content_type: &[u8] = if sse { b"text/event-stream" } else { b"application/json" };
    let status = if control & 2 == 2 { 500 } else { 200 };
    let step = usize::from(control >> 2) + 1;

    let mut whole = ResponseMeter::new(status, Some(content_type), None);
    whole.feed(body);
    let whole = whole.finish();

    let mut chunked = ResponseMeter::new(status, Some(content_type), None);
    for chunk in body.chunks(step) {
        chunked.feed(chunk);
    }
    let chunked = chunked.finish();
    assert_eq!(whole, chunked, "the reading depends on chunking");
    assert!(whole.tokens.cached_input <= whole.tokens.input);
    if status >= 400 {
        assert_eq!(whole.reading, Reading::Error);
    }

    if sse
        || body.contains(&b'\\')
        || count(body, b"\"usage\"") != 1
        || count(body, b"\"prompt_tokens\"") != 1
        || count(body, b"\"message\"") + count(body, b"\"response\"") != 0
    {
        return;
    }
    let Ok(serde_json::Value::Object(doc)) = serde_json::from_slice::<serde_json::Value>(body)
    else {
        return;
    };
    let prompt = doc
        .get("usage")
        .and_then(|u| u.get("prompt_tokens"))
        .and_then(|p| p.as_u64());
    if let Some(prompt) = prompt {
        // serde_json reads 1.0 or 1e2 as floats (no u64), so a u64 here is an integer token.
        assert_eq!(whole.tokens.input, prompt, "input differs from serde_json's prompt_tokens");
    }
});
