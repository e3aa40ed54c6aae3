"""The fault suite's helpers: the deployment every case serves, loads that keep what every client saw
(tools.chaos.stream_request classifies each request), polling, and the checks every case makes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from cluster_harness import replica_stats

from tools.chaos import Outcome, Result, Via, stream_request
from tools.local_cluster import LocalCluster
from tools.procs import alive

DEPLOYMENT = "f"
TOKEN_DELAY_MS = 5
MAX_TOKENS = 40  # 200 ms a stream: many streams are in flight whenever a fault strikes
# the proxy's deadlines for the suite's deployments: short, so a stalled stream ends within the case
FIRST_TOKEN_TIMEOUT_S = 3.0
IDLE_TIMEOUT_S = 2.0
SLACK_S = 10.0  # on top of any timeout the cluster should keep: the CI box is a busy 2-core machine
# a token the failed replica sent just before the fault reaches the client this much later at most (a busy CI box)
TOKEN_IN_FLIGHT_S = 1.0


def sim_spec(replicas: int = 2, max_concurrency: int = 64, **extra: Any) -> dict[str, Any]:
    return {
        "name": DEPLOYMENT,
        "engine": "sim",
        "engine_args": {"token_delay_ms": TOKEN_DELAY_MS},
        "replicas": replicas,
        "max_concurrency": max_concurrency,
        "first_token_timeout_s": FIRST_TOKEN_TIMEOUT_S,
        "idle_timeout_s": IDLE_TIMEOUT_S,
        **extra,
    }


# --- clients ---------------------------------------------------------------------------------------------------


async def burst(urls: list[str], n: int, max_tokens: int = MAX_TOKENS) -> list[Result]:
    """`n` requests at once, half plain text and half SSE, spread over the proxies."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        return list(
            await asyncio.gather(
                *(
                    stream_request(
                        session, urls[i % len(urls)], ("plain", "sse")[i % 2], max_tokens, f"burst {i}", DEPLOYMENT
                    )
                    for i in range(n)
                )
            )
        )


class Load:
    """Closed-loop streams over the proxies, from `start()` until `stop()`; every result kept."""

    def __init__(
        self, urls: list[str], concurrency: int = 16, max_tokens: int = MAX_TOKENS, deployment: str = DEPLOYMENT
    ) -> None:
        self.urls = urls
        self.deployment = deployment
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.results: list[Result] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> Load:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._tasks = [asyncio.create_task(self._client(i), name=f"client-{i}") for i in range(self.concurrency)]
        return self

    async def _client(self, i: int) -> None:
        assert self._session is not None
        n = 0
        while not self._stop.is_set():
            n += 1
            url, kind = self.urls[i % len(self.urls)], ("plain", "sse")[i % 2]
            prompt = f"client {i} #{n}"
            res = await stream_request(self._session, url, kind, self.max_tokens, prompt, self.deployment)
            self.results.append(res)
            if res.via in (Via.CONNECT, Via.STATUS):
                await asyncio.sleep(0.1)  # refused: come back a little later, as a client would (not synchronisation)

    async def stop(self) -> list[Result]:
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.gather(*self._tasks), 60.0)
        finally:
            assert self._session is not None
            await self._session.close()
        return self.results

    async def completed_since(self, since: float, n: int, deadline_s: float = 30.0) -> None:
        """Polls until `n` requests started after `since` have completed (the load is flowing again)."""
        deadline = time.monotonic() + deadline_s
        while sum(r.started >= since and r.outcome in OK for r in self.results) < n:
            assert time.monotonic() < deadline, f"fewer than {n} completions since the fault: {summary(self.results)}"
            await asyncio.sleep(0.05)


OK = (Outcome.COMPLETED, Outcome.RETRIED)


def summary(results: list[Result]) -> str:
    counts = {o.value: sum(r.outcome is o for r in results) for o in Outcome}
    firsts = [str(r) for r in results if r.outcome not in OK][:5]
    return f"{len(results)} requests {counts}; first failures: {firsts}"


async def until(predicate: Callable[[], Awaitable[bool]], deadline_s: float, what: str) -> float:
    """Polls `predicate` until true; the seconds it took."""
    t0 = time.monotonic()
    while not await predicate():
        assert time.monotonic() - t0 < deadline_s, f"not within {deadline_s} s: {what}"
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


async def replicas_by_load(c: LocalCluster) -> list[tuple[str, str, int]]:
    """(id, address, calls in flight) of each READY replica, busiest first."""
    found = []
    for r in await c.ready_replicas(DEPLOYMENT):
        found.append((r["id"], r["addr"], (await replica_stats(r["addr"])).in_flight))
    return sorted(found, key=lambda t: -t[2])


def alive_pids(c: LocalCluster) -> dict[str, dict[str, int]]:
    """replica id -> its processes' pids, for the replicas whose processes all run."""
    return {rid: procs for rid, procs in c.replica_processes().items() if all(alive(p) for p in procs.values())}


# --- what every case checks, and the table at the end ------------------------------------------------------------


@dataclass
class CaseReport:
    name: str
    results: list[Result] = field(default_factory=list)
    recovery_s: dict[str, float] = field(default_factory=dict)

    def check(
        self,
        results: list[Result],
        max_errors: int | None = 0,
        proxy_killed: bool = False,
        streaming_at: float | None = None,
        note: str = "",
    ) -> None:
        """Every request completed, was retried before its first token, or ended with an explicit error (an SSE
        stream with an error event, unless its proxy was killed); at most `max_errors` explicit errors; given the
        time a replica failed (`streaming_at`), only streams that had their first token by then may fail: any other
        could have been retried on a healthy replica. `note` is added to a failure's message."""
        self.results += results
        silent = [r for r in results if r.outcome is Outcome.SILENT]
        assert not silent, f"{len(silent)} silent failures: {summary(results)}"
        if not proxy_killed:
            cut_sse = [r for r in results if r.kind == "sse" and r.via in (Via.CUT, Via.NO_RESPONSE, Via.CONNECT)]
            assert not cut_sse, f"SSE streams cut without an error event: {[str(r) for r in cut_sse[:5]]}"
        errors = [r for r in results if r.outcome is Outcome.ERROR]
        if max_errors is not None:
            assert len(errors) <= max_errors, (
                f"{len(errors)} explicit errors (at most {max_errors}): {summary(results)} {note}"
            )
        if streaming_at is not None:
            limit = streaming_at + TOKEN_IN_FLIGHT_S
            avoidable = [r for r in errors if r.first_token_s is None or r.started + r.first_token_s > limit]
            shown = [str(r) for r in avoidable[:3]]
            assert not avoidable, f"{len(avoidable)} failed, not streaming when the replica failed: {shown} {note}"


async def proxy_metrics(url: str, prefix: str) -> list[str]:
    """The lines of the proxy's /metrics that start with `prefix`."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        return [line for line in (await resp.text()).splitlines() if line.startswith(prefix)]


async def proxy_metric(url: str, name: str) -> float:
    """The value of an unlabelled metric on the proxy's /metrics."""
    for line in await proxy_metrics(url, f"{name} "):
        return float(line.split()[1])
    raise AssertionError(f"{name} not in {url}/metrics")


REPORTS: list[CaseReport] = []  # every case of this run, for the table at its end
