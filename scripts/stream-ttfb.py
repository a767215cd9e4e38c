#!/usr/bin/env python3
"""The client of scripts/bench-envoy's stream phase (issue 16): time to first byte and pacing
of SSE streams through several Envoy configs, measured alternately in the same run.

    stream-ttfb.py KEY REQUESTS INTERVAL_MS EVENTS OUT.tsv LABEL=URL [LABEL=URL ...]

REQUESTS rounds; each round makes one streamed request to every LABEL's URL (POST, HTTP/1.1,
one keep-alive connection per config, `Authorization: Bearer KEY`), the order rotated each
round, one request at a time. Per request it records, from just before the request is written:
  ttfb_head   first byte of the response (what curl calls time_starttransfer);
  ttfb_event  the first SSE event complete (its blank line received);
  span        first event to the end of the stream (the upstream, scripts/sse-upstream.py,
              paces it over (EVENTS + 1) x INTERVAL_MS);
  arrivals    how many separate reads brought events (EVENTS + 2 when every chunk arrives on
              its own, 1 or 2 when the stream was held and sent at the end);
  late        the largest delay of an event behind its pace (arrival - first - k x interval).
Each response must be 200, end with `data: [DONE]` and carry the `usage` chunk; otherwise the
script exits 1. Writes one TSV row per request to OUT.tsv and prints a summary per config
(median and p99 of both TTFBs, medians of span, arrivals and lateness) and, for each pair of
configs, the median of the per-round differences of first-event TTFB. Standard library only.
"""
import socket
import statistics
import sys
import time
from urllib.parse import urlsplit

key, requests, interval_ms, events, out = sys.argv[1:6]
REQUESTS, INTERVAL, EVENTS = int(requests), float(interval_ms) / 1000, int(events)
TARGETS = []
for arg in sys.argv[6:]:
    label, _, url = arg.partition("=")
    u = urlsplit(url)
    TARGETS.append((label, u.hostname, u.port, u.path or "/"))
BODY = (b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},'
        b'"messages":[{"role":"user","content":"Say this is a test"}]}')


class Conn:
    def __init__(self, host, port, path):
        self.host, self.port, self.path, self.sock = host, port, path, None

    def request(self):
        """One streamed request; returns the measurements."""
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req = (b"POST %s HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer %s\r\n"
               b"content-type: application/json\r\naccept: text/event-stream\r\n"
               b"content-length: %d\r\n\r\n" % (self.path.encode(), key.encode(), len(BODY)) + BODY)
        t0 = time.perf_counter_ns()
        self.sock.sendall(req)
        buf = b""          # raw bytes not yet parsed
        head = None        # response head, once complete
        body = bytearray() # decoded body
        state, need = "size", 0
        t_head = None
        event_times = []   # arrival time of each complete event
        arrivals = set()
        seen_events = 0
        done = False
        while not done:
            data = self.sock.recv(65536)
            now = time.perf_counter_ns()
            if not data:
                raise RuntimeError("connection closed mid-response")
            if t_head is None:
                t_head = now
            buf += data
            if head is None:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                head, buf = buf[:end].decode("latin-1"), buf[end + 4:]
                status = int(head.split(" ", 2)[1])
                if status != 200:
                    raise RuntimeError("HTTP %d: %s" % (status, head))
                if "chunked" not in head.lower():
                    raise RuntimeError("not a chunked response: %s" % head)
            # Chunked decoding of what has arrived.
            while True:
                if state == "size":
                    end = buf.find(b"\r\n")
                    if end < 0:
                        break
                    need = int(buf[:end].split(b";")[0], 16)
                    buf = buf[end + 2:]
                    state = "data" if need else "trailer"
                elif state == "data":
                    if len(buf) < need + 2:
                        break
                    body += buf[:need]
                    buf = buf[need + 2:]
                    state = "size"
                else:  # trailer: the empty line ending the stream
                    if buf.find(b"\r\n") < 0:
                        break
                    done = True
                    break
            n = body.count(b"\n\n")
            if n > seen_events:
                event_times.extend([now] * (n - seen_events))
                arrivals.add(now)
                seen_events = n
        text = bytes(body)
        if not text.rstrip().endswith(b"data: [DONE]") or b'"usage":{"prompt_tokens"' not in text:
            raise RuntimeError("stream without usage chunk or [DONE]: %r" % text[-200:])
        if seen_events != EVENTS + 4:
            raise RuntimeError("%d events, want %d" % (seen_events, EVENTS + 4))
        first = event_times[0]
        # Event k (k = 0 first, 1..EVENTS content, then the three final ones) is due at
        # first + k x interval (the final ones all at EVENTS + 1).
        due = [min(k, EVENTS + 1) * INTERVAL * 1e9 for k in range(len(event_times))]
        late = max(t - first - d for t, d in zip(event_times, due))
        return dict(ttfb_head=(t_head - t0) / 1e3, ttfb_event=(first - t0) / 1e3,
                    span=(event_times[-1] - first) / 1e6, arrivals=len(arrivals),
                    late=late / 1e6)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


conns = {label: Conn(h, p, path) for label, h, p, path in TARGETS}
labels = [t[0] for t in TARGETS]
rows = []
with open(out, "w") as f:
    f.write("round\tconfig\tttfb_head_us\tttfb_event_us\tspan_ms\tarrivals\tlate_ms\n")
    for r in range(REQUESTS):
        for i in range(len(labels)):
            label = labels[(i + r) % len(labels)]
            try:
                m = conns[label].request()
            except Exception as e:  # noqa: BLE001 - reported and fatal
                print("stream-ttfb: %s round %d: %s" % (label, r + 1, e), file=sys.stderr)
                sys.exit(1)
            rows.append((r, label, m))
            f.write("%d\t%s\t%.1f\t%.1f\t%.2f\t%d\t%.2f\n" % (
                r, label, m["ttfb_head"], m["ttfb_event"], m["span"], m["arrivals"], m["late"]))

print()
print("Streams: %d per config, alternating; upstream paces %d events + usage over %.0f ms "
      "(%d ms apart)" % (REQUESTS, EVENTS, (EVENTS + 1) * INTERVAL * 1000, INTERVAL * 1000))
print()
print("| config | TTFB (head) median | p99 | TTFB (first event) median | p99 | first→last byte "
      "median | arrivals median (of %d) | worst lateness median / max |" % (EVENTS + 2))
print("|---|---:|---:|---:|---:|---:|---:|---:|")
by = {label: [m for _, l2, m in rows if l2 == label] for label in labels}
for label in labels:
    ms = by[label]
    col = lambda k: [m[k] for m in ms]
    print("| %s | %.0f µs | %.0f µs | %.0f µs | %.0f µs | %.1f ms | %d | %.2f / %.2f ms |" % (
        label, statistics.median(col("ttfb_head")), pct(col("ttfb_head"), 99),
        statistics.median(col("ttfb_event")), pct(col("ttfb_event"), 99),
        statistics.median(col("span")), statistics.median(col("arrivals")),
        statistics.median(col("late")), max(col("late"))))
print()
# Differences of paired requests (same round: measured back to back).
for i, a in enumerate(labels):
    for b in labels[i + 1:]:
        at = {r: m for r, lx, m in rows if lx == a}
        d = [m["ttfb_event"] - at[r]["ttfb_event"] for r, lx, m in rows if lx == b and r in at]
        d = [-x for x in d]
        print("TTFB (first event) %s − %s: median of per-round differences %+.0f µs "
              "(quartiles %+.0f, %+.0f µs); medians %.0f vs %.0f µs" % (
                  a, b, statistics.median(d), pct(d, 25), pct(d, 75),
                  statistics.median(m["ttfb_event"] for m in by[a]),
                  statistics.median(m["ttfb_event"] for m in by[b])))
