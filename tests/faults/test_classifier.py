"""The suite's client (tools.chaos.stream_request) against a real aiohttp server answering each way a proxy can:
every form of success and of explicit failure, and the silent failures it must call silent."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tools.chaos import Outcome, Via, stream_request

TOKENS = 4


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def _delta(finish: str | None = None) -> bytes:
    return _sse({"choices": [{"index": 0, "delta": {"content": " w"}, "finish_reason": finish}]})


def _end(completion_tokens: int) -> list[bytes]:
    usage = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": completion_tokens}}
    return [_sse(usage), b"data: [DONE]\n\n"]


ERROR_EVENT = _sse({"error": {"message": "replica failed", "type": "server_error"}})
# the prompt names the answer: (chunks, cut without the terminating chunk, X-Tokenbus-Attempts)
ANSWERS: dict[str, tuple[list[bytes], bool, int]] = {
    "plain complete": ([b" w"] * TOKENS, False, 1),
    "plain retried": ([b" w"] * TOKENS, False, 2),
    "plain cut": ([b" w"] * 2, True, 1),
    "plain short": ([b" w"] * 2, False, 1),
    "sse complete": ([_delta()] * (TOKENS - 1) + [_delta("length"), *_end(TOKENS)], False, 1),
    "sse error event": ([_delta(), ERROR_EVENT], False, 1),
    "sse no done": ([_delta("length"), _sse({"choices": [], "usage": {"completion_tokens": TOKENS}})], False, 1),
    "sse abort as stop": ([_delta("stop"), *_end(1)], False, 1),
    "sse cut": ([_delta()], True, 1),
}


async def answer(request: web.Request) -> web.StreamResponse:
    if request.match_info.get("deployment") == "gone":  # the connection dies before any response
        assert request.transport is not None
        request.transport.close()
        raise web.HTTPInternalServerError  # never sent: the transport is closed
    if request.match_info.get("deployment") == "busy":
        return web.Response(status=429, headers={"Retry-After": "2"}, text='{"error": {"message": "busy"}}')
    if request.content_type == "application/json":
        prompt = json.loads(await request.read())["messages"][0]["content"]
    else:
        prompt = await request.text()
    chunks, cut, attempts = ANSWERS[prompt]
    resp = web.StreamResponse(headers={"X-Tokenbus-Attempts": str(attempts)})
    await resp.prepare(request)
    for chunk in chunks:
        await resp.write(chunk)
    if cut:
        assert request.transport is not None
        request.transport.close()  # no terminating chunk
    else:
        await resp.write_eof()
    return resp


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    app.router.add_post("/v1/chat/{deployment}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


@pytest.mark.parametrize(
    ("prompt", "outcome", "via"),
    [
        ("plain complete", Outcome.COMPLETED, None),
        ("plain retried", Outcome.RETRIED, None),
        ("plain cut", Outcome.ERROR, Via.CUT),
        ("plain short", Outcome.SILENT, None),  # a clean end with tokens missing
        ("sse complete", Outcome.COMPLETED, None),
        ("sse error event", Outcome.ERROR, Via.SSE_EVENT),
        ("sse no done", Outcome.SILENT, None),
        ("sse abort as stop", Outcome.SILENT, None),  # an abort reported as "stop" reads as success
        ("sse cut", Outcome.ERROR, Via.CUT),
    ],
)
async def test_each_answer_is_classified_by_what_its_client_can_tell(
    server: str, prompt: str, outcome: Outcome, via: Via | None
) -> None:
    kind = prompt.split()[0]
    async with aiohttp.ClientSession() as session:
        res = await stream_request(session, server, kind, TOKENS, prompt, "d", deadline_s=10.0)
    assert (res.outcome, res.via) == (outcome, via), res.detail


async def test_an_error_status_and_a_refused_or_lost_connection_are_explicit(server: str) -> None:
    async with aiohttp.ClientSession() as session:
        busy = await stream_request(session, server, "plain", TOKENS, "plain complete", "busy", deadline_s=10.0)
        assert (busy.outcome, busy.via, busy.status, busy.retry_after) == (Outcome.ERROR, Via.STATUS, 429, "2")
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            closed = f"http://127.0.0.1:{s.getsockname()[1]}"
            refused = await stream_request(session, closed, "plain", TOKENS, "plain complete", "d", deadline_s=10.0)
        assert (refused.outcome, refused.via) == (Outcome.ERROR, Via.CONNECT)
        lost = await stream_request(session, server, "plain", TOKENS, "plain complete", "gone", deadline_s=10.0)
        assert (lost.outcome, lost.via, lost.status) == (Outcome.ERROR, Via.NO_RESPONSE, 0)


async def test_a_stalled_stream_is_silent() -> None:
    # a server that never ends: the client's deadline ends it, and that is no answer the client can trust
    app = web.Application()
    released = asyncio.Event()  # set only at the end, so the server's cleanup does not wait out the handler

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b" w")
        await released.wait()
        return resp

    app.router.add_post("/v1/chat/{deployment}", stall)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            res = await stream_request(session, url, "plain", TOKENS, "x", "d", deadline_s=0.5)
        assert res.outcome is Outcome.SILENT and "stalled" in res.detail
    finally:
        released.set()
        await runner.cleanup()
