"""Writes the fuzz targets' seed corpus (corpus/<target>/) from real messages.

Snapshots are the golden vectors of schemas/golden; ring records are packed as the model worker packs them
and written through the real ring (the Python binding of ring/shm_ring); HTTP requests and bodies are what
the README's curl lines, the OpenAI client and a careless client send. Run from the repository root with the
project's venv after `make build`: `.venv/bin/python proxy_cpp/fuzz/make_seeds.py`. Deterministic.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import msgpack

from model_worker import _ring, records
from model_worker.ring import HEADER_SIZE, MIN_CAPACITY, create_ring_fds

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"

# The worker's response records (model_worker/worker.py _send), one of each kind and shape.
RESPONSE_RECORDS: list[list[Any]] = [
    # TOKENS: groups of (id, text, n_tokens, produced_ns), produced_ns set on a request's first group only
    [records.TOKENS, 7, "Hello", 1, 1764500000000000000],
    [records.TOKENS, 7, " wörld ✓", 2, 0],
    [records.TOKENS, 7, " more", 1, 0, 8, "Hi", 1, 1764500000000000001, 2**40, "", 0, 0],
    [records.FINISH, 7, "stop", 3, 5, 0, ""],
    [records.FINISH, 8, "length", 12, 64, 0, ""],
    [records.FINISH, 9, "abort", 3, 1, 0, ""],
    [records.FINISH, 10, "error", 4097, 0, 400, "the prompt is longer than the context (4097 > 4096 tokens)"],
    [records.STATS, 3, 1, 0.25],
    [records.STATS, 0, 0, 0.0],
    [records.READY, {"engine": "sim", "model": "sim", "max_model_len": 4096}],
    [records.READY, {"engine": "vllm", "model": "/models/tiny-llama", "max_model_len": 2048}],
]

OPENAI_BODIES: list[dict[str, Any]] = [
    {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    {
        "model": "demo",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is ML?"}],
        "max_tokens": 32,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["\n", "END"],
        "seed": 9,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
    {"model": "demo", "prompt": "Once upon a time", "max_tokens": 16, "n": 1, "logprobs": None, "echo": False},
    {"model": "demo", "prompt": ["a", "b"], "presence_penalty": 0.5, "frequency_penalty": -0.5, "user": "u1"},
    {"model": "demo", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
    {
        "model": "demo",
        "max_completion_tokens": 8,
        "messages": [{"role": "user", "content": "\u00e9\u4e2d\ud83d\ude00"}],
    },
]

# Key files as operators write them (proxy/api_keys.hpp) and as `tokenbus keys gen` writes certificates (pyzmq's
# format; this pair is a throwaway made for the corpus).
KEY_FILES: list[bytes] = [
    b"# the team's keys\nsk-alice-0123456789abcdef alice\n\nsk-bob-0123456789abcdef\n",
    b"sk-carol-0123456789abcdef ops.team_1-x # trailing comment\r\nsk-dave-0123456789abcdef\tdave\r\n",
    b"#   ****  Generated on 2026-11-30 08:29:49.697395 by pyzmq  ****\n#   ZeroMQ CURVE **Secret** Certificate\n\n"
    b'metadata\ncurve\n    public-key = "W+8Tu=qxUZnGT$/)uPvfMtE#0Y]p3k>&s=<1n>LU"\n'
    b'    secret-key = "H&w9xRH1hE*@2j23F*!vP!EjgL20w=N4UIP2Gz9]"\n',
]


def http_request(method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1:8000"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def http_requests() -> list[bytes]:
    chat = json.dumps(OPENAI_BODIES[0]).encode()
    plain = b"What is machine learning?"
    chunked_body = b"5\r\nWhat \r\n14\r\nis machine learning?\r\n0\r\n\r\n"
    return [
        http_request("GET", "/healthz"),
        http_request("GET", "/readyz"),
        http_request("GET", "/v1/models"),
        http_request("GET", "/metrics"),
        http_request("POST", "/v1/chat/demo", plain, {"Content-Type": "text/plain"}),
        http_request("POST", "/v1/chat/demo?max_tokens=5", plain, {"Content-Type": "text/plain"}),
        http_request("POST", "/v1/chat/completions", chat, {"Content-Type": "application/json"}),
        http_request(
            "POST", "/v1/completions", json.dumps(OPENAI_BODIES[2]).encode(), {"Content-Type": "application/json"}
        ),
        http_request(
            "POST", "/v1/chat/completions", chat, {"Content-Type": "application/json", "Expect": "100-continue"}
        ),
        b"POST /v1/chat/demo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked_body,
        b"GET /healthz HTTP/1.0\r\n\r\n",
        http_request("GET", "/healthz") + http_request("GET", "/readyz", headers={"Connection": "close"}),
        http_request("DELETE", "/v1/chat/completions"),
        http_request("GET", "/v1/chat/demo/extra"),
        # smuggling: both framings
        b"POST /v1/chat/demo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ]


def framed_ring_images() -> list[bytes]:
    """Ring images (write_pos, read_pos, data) as the real producer leaves them: the fuzz input format."""
    images = []
    packed = [msgpack.packb(r) for r in RESPONSE_RECORDS]
    for consumed_before in (0, 3, 9):  # records written and consumed first: later ones wrap round the end
        fds = create_ring_fds(MIN_CAPACITY)
        try:
            producer = _ring.Producer(fds.mem, fds.data, fds.space)
            consumer = _ring.Consumer(fds.mem, fds.data, fds.space)
            filler = msgpack.packb([records.TOKENS, 1, "x" * 300, 1, 0])
            for _ in range(consumed_before):
                assert producer.try_write(filler, wake=False)
                assert consumer.read() is not None
                consumer.release()
            for data in packed:
                if not producer.try_write(data, wake=False):
                    break
            with mmap.mmap(fds.mem, HEADER_SIZE + MIN_CAPACITY) as m:
                write_pos, read_pos = struct.unpack_from("<Q", m, 0)[0], struct.unpack_from("<Q", m, 64)[0]
                images.append(struct.pack("<QQ", write_pos, read_pos) + m[HEADER_SIZE:])
            producer.close()
            consumer.close()
        finally:
            for fd in fds:
                os.close(fd)
    return images


# Inputs the fuzzers found that once broke a target (Makefile: FUZZ_BUILD/crash-*), kept as seeds so that the
# bug stays fixed: "regression-" files survive a regeneration of the corpus.
REGRESSION_PREFIX = "regression-"


def write(target: str, seeds: list[bytes]) -> None:
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if not old.name.startswith(REGRESSION_PREFIX):
            old.unlink()
    for seed in seeds:
        (folder / hashlib.sha1(seed).hexdigest()).write_bytes(seed)


def main() -> None:
    golden = ROOT / "schemas" / "golden"
    write("snapshot_fuzz", [(golden / n).read_bytes() for n in ("snapshot.msgpack", "snapshot_empty.msgpack")])
    write("ring_records_fuzz", [msgpack.packb(r) for r in RESPONSE_RECORDS])
    write("ring_consumer_fuzz", framed_ring_images())
    write("openai_request_fuzz", [json.dumps(b).encode() for b in OPENAI_BODIES])
    write("http_front_fuzz", http_requests())
    write("key_files_fuzz", KEY_FILES)


if __name__ == "__main__":
    main()
