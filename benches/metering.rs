//! Response metering (issue 16, SPEC §8.2): what reading a vendor's answer for its token counts
//! costs, in bytes per second and per response.
//!
//! - `meter/sse/1MB`: an OpenAI chat-completions stream (`text/event-stream`, one
//!   `chat.completion.chunk` event per token, the `usage` chunk and `[DONE]` at the end) of
//!   about 1 MB, fed in 16 KiB pieces as Envoy hands a large body over;
//! - `meter/sse_events/1MB`: the same bytes fed one event at a time, as a paced stream arrives
//!   (one hook call per event);
//! - `meter/json/1KB`: a non-streaming `chat.completion` of about 1 KB with `usage`, fed in one
//!   piece: [`ResponseMeter::new`] + `feed` + `finish`, i.e. the whole per-response cost;
//! - `meter/json/bench-envoy-625B`: the compact answer `scripts/bench-envoy`'s direct responses
//!   carry (`envoy/bench/chat-completion.json`), to set beside the Envoy measurement;
//! - `stream_metering/json/1KB`: the same answer through [`StreamMetering`] as the module runs
//!   it for an allowed request: the usage key, the meter, and the record into a [`Tally`] at the
//!   end (a short lock and a map entry);
//! - `memchr_absent/*`: `memchr` searching the same bytes for a byte they do not contain, the
//!   speed of just reading them (as in `benches/model_scan.rs`).
//!
//! `cargo bench --bench metering -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

use keygate::authz::metering::{Reading, ResponseMeter, StreamMetering, Tokens};
use keygate::usage::Tally;

const SSE: &[u8] = b"text/event-stream; charset=utf-8";
const ENVOY_BENCH_ANSWER: &[u8] = include_bytes!("../envoy/bench/chat-completion.json");
const JSON: &[u8] = b"application/json";

/// The words a streamed answer is made of (one per event, as OpenAI streams tokens).
const WORDS: [&str; 12] = [
    " The",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " the",
    " lazy",
    " dog",
    ",",
    " then",
    " asks \\\"why?\\\"\\n",
];

/// An OpenAI chat-completions SSE stream of at least `size` bytes, split into its events.
/// Every content chunk carries `"usage":null` (what OpenAI sends with
/// `stream_options.include_usage`); the last chunk has the counts, then `[DONE]`.
fn sse_events(size: usize) -> Vec<Vec<u8>> {
    let head = r#"{"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741569952,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_06737a9306","choices":["#;
    let mut events = vec![
        format!(
            "data: {head}{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
        )
        .into_bytes(),
    ];
    let mut len = events[0].len();
    let mut i = 0usize;
    while len < size {
        let e = format!(
            "data: {head}{{\"index\":0,\"delta\":{{\"content\":\"{}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n",
            WORDS[i % WORDS.len()]
        );
        len += e.len();
        events.push(e.into_bytes());
        i += 1;
    }
    events.push(
        format!(
            "data: {head}{{\"index\":0,\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"stop\"}}],\"usage\":null}}\n\n"
        )
        .into_bytes(),
    );
    events.push(
        format!(
            "data: {head}],\"usage\":{{\"prompt_tokens\":1117,\"completion_tokens\":{i},\"total_tokens\":{},\"prompt_tokens_details\":{{\"cached_tokens\":1024,\"audio_tokens\":0}},\"completion_tokens_details\":{{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}}}}\n\n",
            1117 + i
        )
        .into_bytes(),
    );
    events.push(b"data: [DONE]\n\n".to_vec());
    events
}

/// A non-streaming `chat.completion` of about 1 KB, shaped like OpenAI's.
fn chat_json() -> Vec<u8> {
    let content = "The quick brown fox jumps over the lazy dog, then asks \\\"why?\\\" and writes it down.\\n"
        .repeat(5);
    format!(
        r#"{{
  "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
  "object": "chat.completion",
  "created": 1741569952,
  "model": "gpt-4o-mini-2024-07-18",
  "choices": [
    {{
      "index": 0,
      "message": {{
        "role": "assistant",
        "content": "{content}",
        "refusal": null,
        "annotations": []
      }},
      "logprobs": null,
      "finish_reason": "stop"
    }}
  ],
  "usage": {{
    "prompt_tokens": 1117,
    "completion_tokens": 105,
    "total_tokens": 1222,
    "prompt_tokens_details": {{ "cached_tokens": 1024, "audio_tokens": 0 }},
    "completion_tokens_details": {{
      "reasoning_tokens": 0,
      "audio_tokens": 0,
      "accepted_prediction_tokens": 0,
      "rejected_prediction_tokens": 0
    }}
  }},
  "service_tier": "default",
  "system_fingerprint": "fp_06737a9306"
}}
"#
    )
    .into_bytes()
}

/// Meters `pieces` as one response.
fn meter(content_type: &[u8], pieces: &[&[u8]]) -> Tokens {
    let mut m = ResponseMeter::new(200, Some(content_type), None);
    for p in pieces {
        m.feed(black_box(p));
    }
    let got = m.finish();
    debug_assert_eq!(got.reading, Reading::Usage);
    got.tokens
}

fn bench_metering(c: &mut Criterion) {
    let events = sse_events(1024 * 1024);
    let stream: Vec<u8> = events.concat();
    let per_event: Vec<&[u8]> = events.iter().map(Vec::as_slice).collect();
    let per_16k: Vec<&[u8]> = stream.chunks(16 * 1024).collect();
    let json = chat_json();
    assert!(
        (900..1300).contains(&json.len()),
        "json is {} bytes",
        json.len()
    );
    assert!(memchr::memchr(0xff, &stream).is_none());

    // The counts are read, and the same whichever way the bytes are cut.
    let completion = (events.len() - 4) as u64;
    let want = Tokens {
        input: 1117,
        output: completion,
        cached_input: 1024,
    };
    assert_eq!(meter(SSE, &per_16k), want);
    assert_eq!(meter(SSE, &per_event), want);
    assert_eq!(meter(SSE, &[&stream]), want);
    let want_json = Tokens {
        input: 1117,
        output: 105,
        cached_input: 1024,
    };
    assert_eq!(meter(JSON, &[&json]), want_json);
    assert_eq!(meter(JSON, &[ENVOY_BENCH_ANSWER]).input, 19);

    eprintln!(
        "metering bench: SSE stream {} bytes in {} events; chat JSON {} bytes",
        stream.len(),
        events.len(),
        json.len()
    );
    let mut group = c.benchmark_group("meter");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_with_input(BenchmarkId::new("sse", "1MB"), &per_16k, |b, p| {
        b.iter(|| meter(SSE, p))
    });
    group.bench_with_input(BenchmarkId::new("sse_events", "1MB"), &per_event, |b, p| {
        b.iter(|| meter(SSE, p))
    });
    group.bench_with_input(BenchmarkId::new("memchr_absent", "1MB"), &stream, |b, s| {
        b.iter(|| memchr::memchr(0xff, black_box(s)))
    });
    group.throughput(Throughput::Bytes(json.len() as u64));
    group.bench_with_input(BenchmarkId::new("json", "1KB"), &json, |b, j| {
        b.iter(|| meter(JSON, &[j]))
    });
    group.bench_with_input(BenchmarkId::new("memchr_absent", "1KB"), &json, |b, j| {
        b.iter(|| memchr::memchr(0xff, black_box(j)))
    });
    // The answer of scripts/bench-envoy's direct responses (625 bytes, compact).
    group.throughput(Throughput::Bytes(ENVOY_BENCH_ANSWER.len() as u64));
    group.bench_function(BenchmarkId::new("json", "bench-envoy-625B"), |b| {
        b.iter(|| meter(JSON, &[ENVOY_BENCH_ANSWER]))
    });
    group.finish();

    // The whole per-request cost in the module: usage key, meter, and the record into the
    // tally (the same key every time, as one busy consumer key; the map entry exists after
    // the first iteration).
    let tally = Tally::default();
    let (key, service) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
    let mut group = c.benchmark_group("stream_metering");
    group.throughput(Throughput::Bytes(json.len() as u64));
    group.bench_with_input(BenchmarkId::new("json", "1KB"), &json, |b, j| {
        b.iter(|| {
            let mut m = StreamMetering::new(key, Some(key), service, None);
            m.response_headers(200, Some(JSON), None);
            m.response_body(black_box(j));
            m.finish(&tally);
        })
    });
    group.finish();
}

criterion_group!(benches, bench_metering);
criterion_main!(benches);
