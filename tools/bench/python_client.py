"""One streaming request of the benchmark, timed: OpenAI SSE or the plain-text endpoint.

Parsing is kept minimal on purpose (the client shares the machine with the system under test): lines are
split by aiohttp, and `json.loads` runs only on `data:` lines.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

DONE = object()  # the `data: [DONE]` sentinel
MAX_ERROR_BODY = 200
MAX_LINE = 1 << 20  # longest SSE line accepted from the server


@dataclass(frozen=True, slots=True)
class RequestResult:
    ok: bool
    e2e_s: float
    ttft_s: float | None = None  # to the first content token
    tokens: int = 0
    error: str = ""


class TokenCounter:
    """Content chunks seen so far by every client: the live tok/s readout."""

    __slots__ = ("chunks",)

    def __init__(self) -> None:
        self.chunks = 0


def parse_sse_line(line: bytes) -> Any:
    """A `data:` line's JSON object, DONE for `[DONE]`, None for anything else (comments, blank lines, event:)."""
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if payload == b"[DONE]":
        return DONE
    return json.loads(payload)


async def sse_lines(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The stream's lines, split from whatever arrived: one wake-up per network read, not one per line."""
    pending = b""
    async for data in content.iter_any():
        pending += data
        if b"\n" not in data:
            if len(pending) > MAX_LINE:
                raise ValueError(f"an SSE line longer than {MAX_LINE} bytes")
            continue
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line


def chunk_content(event: dict[str, Any]) -> str:
    """The new text of a chat or completions stream chunk ("" for a usage-only chunk)."""
    choices = event.get("choices")
    if not choices:
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    if delta is not None:
        return delta.get("content") or ""
    return choice.get("text") or ""


async def _error_of(resp: aiohttp.ClientResponse) -> str:
    body = await resp.content.read(MAX_ERROR_BODY)
    return f"HTTP {resp.status}: {body.decode(errors='replace').strip()}"


async def openai_stream(
    session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int, counter: TokenCounter
) -> RequestResult:
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    start = time.perf_counter()
    ttft: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    try:
        async with session.post(f"{url}/v1/chat/completions", json=payload) as resp:
            if resp.status != 200:
                return RequestResult(False, time.perf_counter() - start, error=await _error_of(resp))
            async for line in sse_lines(resp.content):
                event = parse_sse_line(line)
                if event is None:
                    continue
                if event is DONE:
                    tokens = usage_tokens if usage_tokens is not None else chunks
                    return RequestResult(True, time.perf_counter() - start, ttft, tokens)
                if "error" in event:
                    error = f"error event: {event['error']}"
                    return RequestResult(False, time.perf_counter() - start, ttft, chunks, error)
                if chunk_content(event):
                    chunks += 1
                    counter.chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
                usage = event.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
        return RequestResult(False, time.perf_counter() - start, ttft, chunks, "incomplete stream (no [DONE])")
    except (aiohttp.ClientError, ValueError) as e:  # ValueError: a data line that is not JSON
        return RequestResult(False, time.perf_counter() - start, ttft, chunks, f"{type(e).__name__}: {e}")


async def plain_stream(
    session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int, counter: TokenCounter
) -> RequestResult:
    """POST /v1/chat/{model}?max_tokens=N with a text/plain prompt. Tokens are the words of the text (one per sim
    token). A stream cut before its last chunk surfaces as a ClientPayloadError from aiohttp.
    """
    start = time.perf_counter()
    ttft: float | None = None
    parts: list[bytes] = []
    try:
        async with session.post(
            f"{url}/v1/chat/{model}",
            params={"max_tokens": str(max_tokens)},
            data=prompt.encode(),
            headers={"Content-Type": "text/plain"},
        ) as resp:
            if resp.status != 200:
                return RequestResult(False, time.perf_counter() - start, error=await _error_of(resp))
            async for data in resp.content.iter_any():
                if data:
                    parts.append(data)
                    counter.chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
        text = b"".join(parts).decode(errors="replace")
        return RequestResult(True, time.perf_counter() - start, ttft, len(text.split()))
    except aiohttp.ClientError as e:
        return RequestResult(False, time.perf_counter() - start, ttft, 0, f"{type(e).__name__}: {e}")
