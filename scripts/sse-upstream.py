#!/usr/bin/env python3
"""A streaming upstream for scripts/bench-envoy's stream phase (issue 16): answers every
request with an OpenAI-style chat-completions SSE stream, paced like a model emitting tokens.

    sse-upstream.py PORT [EVENTS] [INTERVAL_MS]

For each request (HTTP/1.1, keep-alive; any method and path; a request body is read and
ignored): status 200, `content-type: text/event-stream`, `transfer-encoding: chunked`. The
response headers and the first event (`delta.role`) are written at once; then EVENTS content
events (one word each, `"usage":null`), one every INTERVAL_MS milliseconds; then, after one more
interval, the `finish_reason: stop` chunk, the `usage` chunk and `data: [DONE]` together, and
the end of the stream. So a stream lasts (EVENTS + 1) x INTERVAL_MS from its first to its last
byte, and a client that gets its chunks later than that sees them delayed or buffered.
Defaults: 10 events, 20 ms. The usage chunk reports prompt_tokens 1117 (1024 cached) and
completion_tokens = EVENTS. Each chunk is written on its own (TCP_NODELAY).

Prints "listening PORT" on stdout once it accepts connections. Standard library only.
"""
import asyncio
import socket
import sys

PORT = int(sys.argv[1])
EVENTS = int(sys.argv[2]) if len(sys.argv) > 2 else 10
INTERVAL = (int(sys.argv[3]) if len(sys.argv) > 3 else 20) / 1000.0

HEAD = ('{"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk",'
        '"created":1741569952,"model":"gpt-4o-mini-2024-07-18","service_tier":"default",'
        '"system_fingerprint":"fp_06737a9306","choices":[')
WORDS = [" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]


def event(doc):
    return ("data: " + doc + "\n\n").encode()


FIRST = event(HEAD + '{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
              '"logprobs":null,"finish_reason":null}],"usage":null}')
CONTENT = [event(HEAD + '{"index":0,"delta":{"content":"%s"},"logprobs":null,'
                 '"finish_reason":null}],"usage":null}' % WORDS[i % len(WORDS)])
           for i in range(EVENTS)]
LAST = (event(HEAD + '{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],'
              '"usage":null}')
        + event(HEAD + '],"usage":{"prompt_tokens":1117,"completion_tokens":%d,"total_tokens":%d,'
                '"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},'
                '"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
                '"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}'
                % (EVENTS, 1117 + EVENTS))
        + event("[DONE]"))
HEADERS = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
           b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")


def chunk(data):
    return b"%x\r\n" % len(data) + data + b"\r\n"


async def handle(reader, writer):
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length:
                await reader.readexactly(length)
            loop = asyncio.get_running_loop()
            start = loop.time()
            writer.write(HEADERS + chunk(FIRST))
            await writer.drain()
            for i, e in enumerate(CONTENT):
                await asyncio.sleep(max(0.0, start + (i + 1) * INTERVAL - loop.time()))
                writer.write(chunk(e))
                await writer.drain()
            await asyncio.sleep(max(0.0, start + (EVENTS + 1) * INTERVAL - loop.time()))
            writer.write(chunk(LAST) + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", PORT)
    print("listening", PORT, flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
