"""A proxy SIGTERMed with streams open drains: it stops accepting, lets every open stream finish, then exits 0.

Real processes (head, agent, proxy, sim replicas); the proxy is signalled by its PID.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import aiohttp
import pytest
from cluster_harness import LocalCluster

pytestmark = pytest.mark.timeout(180)

TOKEN_DELAY_MS = 50
MAX_TOKENS = 30  # 1.5 s a stream: long enough to be open when the signal lands
STREAMS = 8


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("drain"))
    c.start()
    try:
        spec = {
            "name": "demo",
            "engine": "sim",
            "engine_args": {"token_delay_ms": TOKEN_DELAY_MS, "seed": 3},
            "replicas": 1,
            "max_concurrency": 64,
        }
        asyncio.run(c.deploy(spec))
        yield c
    finally:
        c.stop()


async def stream(session: aiohttp.ClientSession, url: str, first: asyncio.Event) -> tuple[int, int, bool]:
    """(status, chunks received, whether the body ended with its terminating chunk)."""
    chunks = 0
    async with session.post(
        f"{url}/v1/chat/demo", params={"max_tokens": str(MAX_TOKENS)}, data="hi", headers={"Content-Type": "text/plain"}
    ) as resp:
        try:
            async for data, _ in resp.content.iter_chunks():
                if data:
                    chunks += 1
                    first.set()
        except aiohttp.ClientPayloadError:
            return resp.status, chunks, False
        return resp.status, chunks, True


def test_sigterm_lets_open_streams_finish_then_exits(cluster: LocalCluster) -> None:
    url = cluster.proxy_url

    async def run() -> list[tuple[int, int, bool]]:
        async with aiohttp.ClientSession() as session:
            firsts = [asyncio.Event() for _ in range(STREAMS)]
            tasks = [asyncio.create_task(stream(session, url, e)) for e in firsts]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), 30)
            cluster.signal("proxy", signal.SIGTERM)
            # a new connection is refused while the open streams go on
            deadline = time.monotonic() + 30
            refused = False
            while time.monotonic() < deadline and not refused:
                try:
                    async with aiohttp.ClientSession() as fresh, fresh.get(f"{url}/healthz") as r:
                        await r.read()
                except aiohttp.ClientConnectionError:
                    refused = True
                else:
                    await asyncio.sleep(0.02)
            assert refused, "the draining proxy still accepted connections"
            return await asyncio.wait_for(asyncio.gather(*tasks), 60)

    results = asyncio.run(run())
    for status, chunks, complete in results:
        assert status == 200
        assert complete, "a stream was cut during the drain"
        assert chunks >= 1
    assert cluster.wait("proxy", 60) == 0
