"""A minimal OpenAI streaming server on the sim engine's schedule: the reference `python -m tools.bench_reference`
measures tokenbus against, directly and behind nginx.

`python -m tools.bench.reference_server --port P [--shared-port Q] --token-delay-ms T [--prefill-ms F]`

It answers the request the bench client sends (POST /v1/chat/completions, stream: true, max_tokens N) with the
SSE events the proxy writes (proxy_cpp/proxy/openai_response.cpp: a role on the first delta, one event per token,
the finish event, the usage event when stream_options.include_usage asks, [DONE]), chunked, on keep-alive
connections. Token k (1-based) of a request read at `start` is written at start + prefill + k * T on the event
loop's clock, as model_worker/sim_engine.py schedules its tokens: absolute deadlines (a late wake-up never
delays the next token), one timer per stream at a time, the sim's words. (The sim also emits the tokens due
within one millisecond from one callback; both stay within a millisecond of the schedule.) GET /healthz
answers 200.

Besides its own port (nginx's upstream), it listens with SO_REUSEPORT on `--shared-port`, which its twin also
binds: the kernel spreads the direct run's connections over the two, so one client URL reaches both.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import resource
import sys
import time
from typing import Any

import uvloop

from model_worker.sim_engine import VOCAB, SimConfig, token_rng

HOST = "127.0.0.1"
MAX_HEAD = 64 * 1024  # a request head longer than this is refused (the bench client's is a few hundred bytes)
MAX_BODY = 1 << 20
CHAT_PATH = b"/v1/chat/completions"
HEALTHZ = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"
TOKEN_TAIL = ',"logprobs":null,"finish_reason":null}]}\n\n'  # the end of a token's event, after its delta
_ids = itertools.count(1)


def _chunk(payload: str) -> bytes:
    data = payload.encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


def _error(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": status}}).encode()
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"Connection: close\r\n\r\n" + body


class _Stream:
    """One streamed completion: its schedule, its words and its events' common prefix."""

    def __init__(self, request: dict[str, Any], start: float, schedule: SimConfig) -> None:
        messages = request.get("messages") or []
        prompt = " ".join(m.get("content") or "" for m in messages if isinstance(m, dict))
        self.limit = int(request.get("max_tokens") or schedule.default_max_tokens)
        self.prompt_tokens = len(prompt.split())
        self.usage = bool((request.get("stream_options") or {}).get("include_usage"))
        self.rng: random.Random = token_rng(schedule.seed, request.get("seed"), prompt)
        self.start = start
        self.generated = 0
        model = json.dumps(str(request.get("model", "")))
        self.prefix = (
            f'data: {{"id":"chatcmpl-ref-{next(_ids)}","object":"chat.completion.chunk",'
            f'"created":{int(time.time())},"model":{model},"choices":['
        )

    def token_event(self, word: str) -> str:
        role = '"role":"assistant",' if self.generated == 1 else ""
        return f'{self.prefix}{{"index":0,"delta":{{{role}"content":{json.dumps(word)}}}{TOKEN_TAIL}'

    def end_events(self) -> str:
        out = f'{self.prefix}{{"index":0,"delta":{{"content":""}},"logprobs":null,"finish_reason":"length"}}]}}\n\n'
        if self.usage:
            n, p = self.generated, self.prompt_tokens
            out += (
                f'{self.prefix}],"usage":{{"prompt_tokens":{p},"completion_tokens":{n},"total_tokens":{p + n}}}}}\n\n'
            )
        return out + "data: [DONE]\n\n"


class _Connection(asyncio.Protocol):
    """One client connection: requests one after the other (a request that arrives while a stream runs waits)."""

    def __init__(self, schedule: SimConfig) -> None:
        self._schedule = schedule
        self._prefill_s = schedule.prefill_ms / 1000.0
        self._delay_s = schedule.token_delay_ms / 1000.0
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._stream: _Stream | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a TCP transport (uvloop's is no asyncio.Transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._stream is None:
            self._next_request()

    def _refuse(self, status: int, reason: str, message: str) -> None:
        assert self._transport is not None
        self._transport.write(_error(status, reason, message))
        self._transport.close()

    def _next_request(self) -> None:
        """Takes the buffered request, if it is complete, and answers it."""
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                self._refuse(431, "Request Header Fields Too Large", "request head too long")
            return
        lines = bytes(self._buf[:end]).split(b"\r\n")
        parts = lines[0].split(b" ")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                if not value.strip().isdigit():
                    self._refuse(400, "Bad Request", "Content-Length is not a number")
                    return
                length = int(value)
        if length > MAX_BODY:
            self._refuse(413, "Payload Too Large", "request body too long")
            return
        if len(self._buf) < end + 4 + length:
            return
        body = bytes(self._buf[end + 4 : end + 4 + length])
        del self._buf[: end + 4 + length]
        assert self._transport is not None
        if len(parts) < 2:
            self._refuse(400, "Bad Request", "malformed request line")
        elif parts[0] == b"GET" and parts[1] == b"/healthz":
            self._transport.write(HEALTHZ)
            self._next_request()
        elif parts[0] == b"POST" and parts[1] == CHAT_PATH:
            self._begin(body)
        else:
            self._refuse(404, "Not Found", f"only POST {CHAT_PATH.decode()} is served")

    def _begin(self, body: bytes) -> None:
        try:
            request = json.loads(body)
        except ValueError:
            self._refuse(400, "Bad Request", "the body is not JSON")
            return
        if not isinstance(request, dict) or request.get("stream") is not True:
            self._refuse(400, "Bad Request", "only streamed completions (stream: true) are served")
            return
        assert self._transport is not None
        self._transport.write(STREAM_HEAD)
        self._stream = _Stream(request, self._loop.time(), self._schedule)
        self._schedule_next(self._stream)

    def _schedule_next(self, stream: _Stream) -> None:
        due = stream.start + self._prefill_s + (stream.generated + 1) * self._delay_s
        self._timer = self._loop.call_at(due, self._emit, stream)

    def _emit(self, stream: _Stream) -> None:
        self._timer = None
        if self._transport is None:
            return
        stream.generated += 1
        event = stream.token_event(stream.rng.choice(VOCAB))
        if stream.generated < stream.limit:
            self._transport.write(_chunk(event))
            self._schedule_next(stream)
            return
        self._transport.write(_chunk(event + stream.end_events()) + LAST_CHUNK)
        self._stream = None
        self._next_request()


async def serve(port: int, shared_port: int | None, schedule: SimConfig) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(lambda: _Connection(schedule), HOST, port, backlog=4096)]
    if shared_port is not None:
        servers.append(
            await loop.create_server(lambda: _Connection(schedule), HOST, shared_port, reuse_port=True, backlog=4096)
        )
    print(f"LISTENING {HOST}:{servers[0].sockets[0].getsockname()[1]}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--shared-port", type=int, help="also listen here, with SO_REUSEPORT (its twin's port too)")
    p.add_argument("--token-delay-ms", type=float, required=True)
    p.add_argument("--prefill-ms", type=float, default=0.0)
    opts = p.parse_args(argv)
    # a connection per stream: raise the soft limit on open files to the hard one
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    schedule = SimConfig(prefill_ms=opts.prefill_ms, token_delay_ms=opts.token_delay_ms)
    uvloop.run(serve(opts.port, opts.shared_port, schedule))
    return 0


if __name__ == "__main__":
    sys.exit(main())
