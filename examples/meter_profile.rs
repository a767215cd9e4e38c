//! The response meter run a fixed number of times over one body, for an instruction count
//! under callgrind (repeatable whatever else the machine is doing, unlike a timing):
//!
//! ```text
//! cargo build --release --example meter_profile
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/meter.out \
//!     target/release/examples/meter_profile envoy/bench/chat-completion.json 10000
//! ```
//!
//! Arguments: the body's file, how many times, and `sse` to read it as `text/event-stream`
//! (else `application/json`). Each run is `ResponseMeter::new` + one `feed` + `finish`; the
//! total divided by the count is the meter's instructions per response (docs/BENCHMARKS.md).

use keygate::authz::metering::ResponseMeter;

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: meter_profile BODY_FILE COUNT [sse]";
    let path = args.next().expect(usage);
    let count: usize = args.next().and_then(|n| n.parse().ok()).expect(usage);
    let content_type: &[u8] = match args.next().as_deref() {
        Some("sse") => b"text/event-stream",
        _ => b"application/json",
    };
    let body = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut tokens = 0u64;
    for _ in 0..count {
        let mut m = ResponseMeter::new(200, Some(std::hint::black_box(content_type)), None);
        m.feed(std::hint::black_box(&body));
        let metered = m.finish();
        tokens += metered.tokens.input + metered.tokens.output;
    }
    println!("{count} responses metered, {tokens} tokens in all");
}
