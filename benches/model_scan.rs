//! The request model scan (issue 15, SPEC §8.1) over a chat-completions body of 10 KB and of
//! 1 MB (a long `messages` array, `model` last, so the whole body is read), in bytes per
//! second, beside `memchr` searching the same bytes for a byte they do not contain: the speed
//! of reading the body at all, which the scan's figure is quoted against.
//!
//! `cargo bench --bench model_scan -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

use keygate::authz::model::model_from_json;

/// A chat body of at least `size` bytes: messages of a few hundred bytes of prose (with a
/// quote and a newline escape each, as real transcripts have), then `"model"` last.
fn chat_body(size: usize) -> Vec<u8> {
    let sentence = "The quick brown fox jumps over the lazy dog, then asks \\\"why?\\\" \
                    and writes it down.\\n";
    let mut body = String::from(r#"{"messages":["#);
    let mut turn = 0usize;
    while body.len() < size {
        let role = if turn.is_multiple_of(2) {
            "user"
        } else {
            "assistant"
        };
        let content = sentence.repeat(2 + turn % 5);
        if turn > 0 {
            body.push(',');
        }
        body.push_str(&format!(r#"{{"role":"{role}","content":"{content}"}}"#));
        turn += 1;
    }
    body.push_str(r#"],"temperature":0.7,"stream":true,"model":"gpt-4o-mini"}"#);
    body.into_bytes()
}

fn bench_model_scan(c: &mut Criterion) {
    let mut group = c.benchmark_group("model_scan");
    for (label, size) in [("10KB", 10 * 1024), ("1MB", 1024 * 1024)] {
        let body = chat_body(size);
        assert_eq!(model_from_json(&body).as_deref(), Ok("gpt-4o-mini"));
        assert!(memchr::memchr(0xff, &body).is_none());
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("scan", label), &body, |b, body| {
            b.iter(|| model_from_json(black_box(body)).is_ok())
        });
        group.bench_with_input(
            BenchmarkId::new("memchr_absent", label),
            &body,
            |b, body| b.iter(|| memchr::memchr(0xff, black_box(body))),
        );
    }
    group.finish();
}

criterion_group!(benches, bench_model_scan);
criterion_main!(benches);
