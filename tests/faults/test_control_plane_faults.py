"""Faults of the control plane and of a proxy, under load: the head killed and restarted (once, twice, on a fresh
database), an agent killed and restarted, a proxy killed and restarted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from faults.harness import (
    DEPLOYMENT,
    OK,
    CaseReport,
    Load,
    alive_pids,
    burst,
    proxy_metric,
    sim_spec,
    until,
)
from tools.local_cluster import LocalCluster

pytestmark = pytest.mark.timeout(240)

HEAD_DOWN_S = 3.0  # how long the head stays dead: several heartbeats and liveness periods of the suite's clusters
VERSION = "tokenbus_proxy_snapshot_version"


class VersionWatch:
    """Samples every proxy's applied snapshot version while a case runs: within one head's life it never goes
    backwards."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.seen: dict[str, list[float]] = {u: [] for u in urls}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> VersionWatch:
        self._task = asyncio.create_task(self._run(), name="version-watch")
        return self

    async def _run(self) -> None:
        while True:
            for url in self.urls:
                try:
                    self.seen[url].append(await proxy_metric(url, VERSION))
                except (aiohttp.ClientError, AssertionError):
                    pass  # a proxy restarting
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def assert_never_backwards(self) -> None:
        for url, versions in self.seen.items():
            assert versions == sorted(versions), f"{url} applied a lower snapshot version: {versions}"


async def same_replicas_ready(c: LocalCluster, ids: set[str]) -> bool:
    ready = await c.ready_replicas(DEPLOYMENT)
    return {r["id"] for r in ready} == ids and len(ready) == len(ids)


async def head_restart_case(c: LocalCluster, case: CaseReport, restarts: int) -> None:
    """Kills the head under load `restarts` times, each for HEAD_DOWN_S; no request fails, no replica is started
    or stopped, and the versions the proxies apply only grow."""
    ids = {r["id"] for r in await c.ready_replicas(DEPLOYMENT)}
    pids = alive_pids(c)
    watch = VersionWatch(list(c.proxy_urls.values())).start()
    load = await Load(list(c.proxy_urls.values()), concurrency=16).start()
    try:
        await load.completed_since(0.0, 16)
        for n in range(1, restarts + 1):
            before = await proxy_metric(c.proxy_url, VERSION)
            c.kill("head")
            killed = time.monotonic()
            await asyncio.sleep(HEAD_DOWN_S)  # the fault's length
            await load.completed_since(killed, 16)  # the proxies served while the head was down
            c.restart("head")
            restarted = time.monotonic()
            await until(lambda: same_replicas_ready(c, ids), 30.0, f"the head re-adopts {sorted(ids)}")
            case.recovery_s[f"head {n} re-adopted"] = time.monotonic() - restarted

            async def newer(before: float = before) -> bool:
                return await proxy_metric(c.proxy_url, VERSION) > before

            await until(newer, 30.0, "the proxy applies the new head's snapshot")
            case.recovery_s[f"head {n} snapshot applied"] = time.monotonic() - restarted
        await load.completed_since(time.monotonic(), 16)
    finally:
        results = await load.stop()
        await watch.stop()
    case.check(results, max_errors=0)
    watch.assert_never_backwards()
    assert alive_pids(c) == pids, "a replica was started or stopped across the head's restart"


async def test_head_sigkill_under_load_and_restart(
    make_cluster: Callable[..., Awaitable[LocalCluster]], case: CaseReport
) -> None:
    # two agents: a head restart once started a duplicate there and stopped a warm replica
    await head_restart_case(await make_cluster(sim_spec(replicas=2), agents=2), case, restarts=1)


async def test_head_restarted_twice(make_cluster: Callable[..., Awaitable[LocalCluster]], case: CaseReport) -> None:
    await head_restart_case(await make_cluster(sim_spec(replicas=2), agents=2), case, restarts=2)


async def test_head_on_a_fresh_database(make_cluster: Callable[..., Awaitable[LocalCluster]], case: CaseReport) -> None:
    c = await make_cluster(sim_spec(replicas=2))
    old_version = await proxy_metric(c.proxy_url, VERSION)
    c.kill("head")
    c.restart("head", fresh_db=True)
    restarted = time.monotonic()

    async def follows() -> bool:  # the new head's versions start again at epoch 1: lower than the old head's
        return await proxy_metric(c.proxy_url, VERSION) < old_version

    await until(follows, 30.0, "the proxy follows the new head once the old one has been silent")
    case.recovery_s["new head followed"] = time.monotonic() - restarted
    # whatever the new head knows, the proxy never says ready while it cannot route
    async with aiohttp.ClientSession() as session, session.get(f"{c.proxy_url}/readyz") as resp:
        ready = resp.status == 200
    results = await burst([c.proxy_url], 10)
    if ready:
        case.check(results, max_errors=0)
    else:
        case.check(results, max_errors=None)
        assert all(r.status == 503 for r in results), "not ready: every request refused with 503"
    # the operator deploys again on the new head: its agents' replicas serve it
    await c.deploy(sim_spec(replicas=2))
    case.recovery_s["redeployed and ready"] = time.monotonic() - restarted
    case.check(await burst([c.proxy_url], 20), max_errors=0)


async def test_agent_sigkill_and_restart(
    make_cluster: Callable[..., Awaitable[LocalCluster]], case: CaseReport
) -> None:
    c = await make_cluster(sim_spec(replicas=2))
    ids = {r["id"] for r in await c.ready_replicas(DEPLOYMENT)}
    pids = alive_pids(c)
    load = await Load([c.proxy_url], concurrency=16).start()
    try:
        await load.completed_since(0.0, 16)
        c.kill("agent")
        killed = time.monotonic()
        await load.completed_since(killed, 16)  # its replicas serve on without it
        assert alive_pids(c) == pids, "the agent's replicas died with it"
        agent_log = c.state_dir / "logs" / "agent.log"
        offset = agent_log.stat().st_size
        c.restart("agent")
        restarted = time.monotonic()

        async def re_adopted() -> bool:  # the agent's own word (node_agent/replica_process.py)
            with agent_log.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace").count(f" of {DEPLOYMENT} re-adopted") == len(ids)

        await until(re_adopted, 30.0, "the restarted agent re-adopts its replicas")
        case.recovery_s["replicas re-adopted"] = time.monotonic() - restarted
        await until(lambda: same_replicas_ready(c, ids), 30.0, "the head keeps them READY")
        await load.completed_since(time.monotonic(), 16)
    finally:
        results = await load.stop()
    case.check(results, max_errors=0)
    assert alive_pids(c) == pids, "a replica was replaced instead of re-adopted"


async def test_proxy_sigkill_and_restart(
    make_cluster: Callable[..., Awaitable[LocalCluster]], case: CaseReport
) -> None:
    c = await make_cluster(sim_spec(replicas=2), proxies=2)
    load = await Load(list(c.proxy_urls.values()), concurrency=16).start()
    try:
        await load.completed_since(0.0, 16)
        c.kill("proxy-2")
        killed = time.monotonic()
        await load.completed_since(killed, 16)  # the other proxy serves on
        c.restart("proxy-2")

        async def serving() -> bool:
            url = c.proxy_urls["proxy-2"]
            return any(r.proxy == url and r.started > killed and r.outcome in OK for r in load.results)

        await until(serving, 30.0, "the restarted proxy serves")
        case.recovery_s["proxy serving again"] = time.monotonic() - killed
    finally:
        results = await load.stop()
    survivor = [r for r in results if r.proxy == c.proxy_urls["proxy"]]
    case.check(survivor, max_errors=0)
    # the killed proxy's own streams are cut (a dead process sends no error event) and its port refuses a while
    case.check([r for r in results if r.proxy != c.proxy_urls["proxy"]], max_errors=None, proxy_killed=True)
