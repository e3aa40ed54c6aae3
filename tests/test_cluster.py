"""End to end through real processes: head, agent, proxy, and replicas (tokenbus-replica + sim worker)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import aiohttp
import pytest
from cluster_harness import LocalCluster, deployed_cluster, replica_stats

from model_worker.sim_engine import sim_words

pytestmark = pytest.mark.timeout(180)

TOKEN_DELAY_MS = 5
SIM_SEED = 11
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def replica_addresses(cluster: LocalCluster) -> list[str]:
    spec = {
        "name": "demo",
        "engine": "sim",
        "engine_args": {"token_delay_ms": TOKEN_DELAY_MS, "seed": SIM_SEED},
        "replicas": 2,
        "max_concurrency": 256,
    }
    return asyncio.run(cluster.deploy(spec))


async def plain_stream(session: aiohttp.ClientSession, url: str, prompt: str) -> tuple[list[str], float]:
    """The chunks of one plain-text stream and when the first arrived (seconds after the request)."""
    t0 = time.monotonic()
    first = 0.0
    chunks: list[str] = []
    async with session.post(
        f"{url}/v1/chat/demo",
        params={"max_tokens": str(MAX_TOKENS)},
        data=prompt,
        headers={"Content-Type": "text/plain"},
    ) as resp:
        assert resp.status == 200, await resp.text()
        async for data, _ in resp.content.iter_chunks():
            if data and not chunks:
                first = time.monotonic() - t0
            chunks.append(data.decode())
    return chunks, first


async def sse_stream(session: aiohttp.ClientSession, url: str, seed: int) -> list[dict]:
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": f"stream {seed}"}],
        "stream": True,
        "max_tokens": MAX_TOKENS,
        "seed": seed,
        "stream_options": {"include_usage": True},
    }
    events: list[dict] = []
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        done = False
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line:
                continue
            assert line.startswith("data: "), line
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                done = True
                continue
            assert not done, "data after [DONE]"
            events.append(json.loads(payload))
        assert done, "stream did not end with [DONE]"
    return events


async def test_64_concurrent_streams_are_complete_and_in_order(
    cluster: LocalCluster, replica_addresses: list[str]
) -> None:
    async with aiohttp.ClientSession() as session:
        plain = [plain_stream(session, cluster.proxy_url, f"question number {i}") for i in range(32)]
        sse = [sse_stream(session, cluster.proxy_url, seed) for seed in range(32)]
        results = await asyncio.gather(*plain, *sse)

    for i, (chunks, _) in enumerate(results[:32]):
        expected = sim_words(SIM_SEED, None, f"question number {i}", MAX_TOKENS)
        assert "".join(chunks) == "".join(expected), f"plain stream {i}"
        assert len(chunks) > 1, "the plain stream arrived in one piece, not streamed"
    for seed, events in enumerate(results[32:]):
        content = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
        assert "".join(content) == "".join(sim_words(SIM_SEED, seed, "", MAX_TOKENS)), f"sse stream {seed}"
        assert events[0]["choices"][0]["delta"].get("role") == "assistant"
        finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
        assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
        usage = events[-1]["usage"]
        assert events[-1]["choices"] == [] and usage["completion_tokens"] == MAX_TOKENS
        assert usage["total_tokens"] == usage["prompt_tokens"] + MAX_TOKENS

    # both replicas served: the least-loaded choice spreads 64 concurrent requests
    served = [await replica_stats(a) for a in replica_addresses]
    assert all(s.in_flight == 0 for s in served)


async def test_client_disconnect_leaves_no_request_in_the_engine(
    cluster: LocalCluster, replica_addresses: list[str]
) -> None:
    reader, writer = await asyncio.open_connection(*cluster.proxy_url.removeprefix("http://").split(":"))
    prompt = b"a long answer please"
    writer.write(
        b"POST /v1/chat/demo?max_tokens=2000 HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
        b"Content-Length: " + str(len(prompt)).encode() + b"\r\n\r\n" + prompt
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    await asyncio.wait_for(reader.read(64), 10)  # tokens are flowing

    async def running() -> int:
        return sum([(await replica_stats(a)).running for a in replica_addresses])

    deadline = time.monotonic() + 3.0
    while await running() != 1:  # the engine's load reaches the replica's Stats within 100 ms
        assert time.monotonic() < deadline, "the request should be generating before the disconnect"
        await asyncio.sleep(0.02)
    writer.close()  # 2000 tokens at 5 ms would run 10 s: only a cancellation ends it sooner
    deadline = time.monotonic() + 3.0
    while await running() != 0 or sum([(await replica_stats(a)).in_flight for a in replica_addresses]):
        assert time.monotonic() < deadline, f"request still running after disconnect\n{cluster.logs()}"
        await asyncio.sleep(0.05)


@pytest.fixture
def slow_heartbeat_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = {"name": "slow", "engine": "sim", "engine_args": {"token_delay_ms": 20}, "max_concurrency": 16}
    with deployed_cluster(tmp_path_factory.mktemp("load"), spec, heartbeat_s=10.0) as (c, _):
        yield c


async def test_engine_load_reaches_the_head_between_heartbeats(slow_heartbeat_cluster: LocalCluster) -> None:
    # Heartbeats 10 s apart: a load the head sees within 3 s came (most likely) by the agent's load reports.
    c = slow_heartbeat_cluster

    async def head_running() -> int:
        status = await c.admin("status")
        dep = next(d for d in status["deployments"] if d["name"] == "slow")
        return sum(r["load"]["running"] for r in dep["replicas_list"])

    async def until_running(n: int) -> None:
        deadline = time.monotonic() + 3.0  # load reports take ~0.25 s; a heartbeat would land in it 3 times in 10
        while (seen := await head_running()) != n:
            assert time.monotonic() < deadline, f"the head still sees {seen} running, not {n}"
            await asyncio.sleep(0.05)

    async with aiohttp.ClientSession() as session:
        responses = [
            await session.post(f"{c.proxy_url}/v1/chat/slow", params={"max_tokens": "500"}, data=f"long {i}")
            for i in range(4)
        ]
        try:
            assert [r.status for r in responses] == [200] * 4
            await until_running(4)  # 500 tokens x 20 ms: all four run for 10 s
        finally:
            for r in responses:
                r.close()  # the client goes: the streams are cancelled
        await until_running(0)
