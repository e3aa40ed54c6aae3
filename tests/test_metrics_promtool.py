"""Every process of a real local cluster serves /metrics that `promtool check metrics` passes, at the address the
head's `status` lists for it (head, agents, replicas, workers, proxies), and the numbers move with traffic.

promtool comes with Debian's `prometheus` package (`make deps` installs it). A missing HELP text is a lint warning
for promtool; here it fails the test like an error.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from cluster_harness import metric_samples

from tools.local_cluster import LocalCluster

pytestmark = pytest.mark.timeout(180)

PROMTOOL = shutil.which("promtool")
REQUESTS = 6
MAX_TOKENS = 8
FETCH_TIMEOUT_S = 10.0
ADDRESSES_KNOWN_S = 30.0  # until the head knows every process's metrics address


def fetch_metrics(address: str) -> str:
    """The text of http://ADDRESS/metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=FETCH_TIMEOUT_S) as resp:
        assert resp.status == 200
        return resp.read().decode()


def promtool_problems(text: str) -> str:
    """What `promtool check metrics` says of the text: errors and lint warnings (a metric without HELP, a counter
    not ending in _total, a unit that is not a base unit, ...); "" when it has nothing to say."""
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    said = (done.stdout + done.stderr).decode().strip()
    return said if done.returncode != 0 or said else ""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("metrics"))
    c.start()
    try:
        yield c
    finally:
        c.stop()


async def generate(url: str, prompt: str) -> str:
    def post() -> str:
        request = urllib.request.Request(
            f"{url}/v1/chat/demo?max_tokens={MAX_TOKENS}", data=prompt.encode(), headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as resp:
            return resp.read().decode()

    return await asyncio.to_thread(post)


@pytest.fixture(scope="module")
def status(cluster: LocalCluster) -> dict[str, Any]:
    """The head's status after a sim deployment served a few requests through the proxy."""

    async def run() -> dict[str, Any]:
        spec = {"name": "demo", "engine": "sim", "engine_args": {"token_delay_ms": 2}, "replicas": 2}
        await cluster.deploy(spec)
        await asyncio.gather(*(generate(cluster.proxy_url, f"prompt {i}") for i in range(REQUESTS)))
        # An address is "" until known (C2): the proxy reports itself every second, and an agent reads a worker's
        # METRICS line from its log file (polled) and reports it with its next heartbeat, which can be after READY.
        deadline = time.monotonic() + ADDRESSES_KNOWN_S
        while not ((status := await cluster.admin("status"))["proxies"] and all(endpoints(status).values())):
            assert time.monotonic() < deadline, f"addresses unknown after {ADDRESSES_KNOWN_S} s: {endpoints(status)}"
            await asyncio.sleep(0.1)
        return status

    return asyncio.run(run())


def endpoints(status: dict[str, Any]) -> dict[str, str]:
    """process name -> its /metrics address, for every process the status lists."""
    found = {"head": status["head"]["metrics"]}
    found.update({f"agent {n['node_id']}": n["metrics"] for n in status["nodes"]})
    for dep in status["deployments"]:
        for r in dep["replicas_list"]:
            found[f"replica {r['id']}"] = r["metrics"]["replica"]
            found[f"worker {r['id']}"] = r["metrics"]["worker"]
    found.update({f"proxy {p['id']}": p["metrics"] for p in status["proxies"]})
    return found


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_every_process_serves_metrics_that_promtool_passes(cluster: LocalCluster, status: dict[str, Any]) -> None:
    found = endpoints(status)
    assert found["head"] and len(status["nodes"]) == 1 and len(status["deployments"][0]["replicas_list"]) == 2
    assert all(found.values()) and any(name.startswith("proxy ") for name in found), found
    # the proxies as the cluster started them are checked whether or not the head lists them yet
    found.update({f"proxy {name} (started)": url.removeprefix("http://") for name, url in cluster.proxy_urls.items()})
    problems = {}
    for name, address in found.items():
        said = promtool_problems(fetch_metrics(address))
        if said:
            problems[name] = said
    assert not problems, json.dumps(problems, indent=1)


def test_the_numbers_moved(status: dict[str, Any]) -> None:
    head = metric_samples(fetch_metrics(status["head"]["metrics"]))
    assert head['tokenbus_head_admin_requests_total{"op": "deploy", "result": "ok"}'] >= 1
    assert head['tokenbus_head_replicas{"state": "ready"}'] == 2
    assert head['tokenbus_head_nodes{"state": "alive"}'] == 1
    assert head["tokenbus_head_snapshots_published_total"] >= 1 and head["tokenbus_head_snapshot_bytes"] > 0
    (node,) = status["nodes"]
    agent = metric_samples(fetch_metrics(node["metrics"]))
    assert agent["tokenbus_agent_replica_starts_total"] == 2 and agent["tokenbus_agent_registered"] == 1
    assert agent['tokenbus_agent_replicas{"state": "ready"}'] == 2
    workers = [metric_samples(fetch_metrics(r["metrics"]["worker"])) for r in status["deployments"][0]["replicas_list"]]
    # every request went to one of the two; each produced its MAX_TOKENS
    assert sum(w["tokenbus_worker_generated_tokens_total"] for w in workers) == REQUESTS * MAX_TOKENS
    assert sum(w['tokenbus_worker_requests_finished_total{"reason": "length"}'] for w in workers) == REQUESTS
    assert sum(w["tokenbus_worker_time_to_first_token_seconds_count"] for w in workers) == REQUESTS
    listed = status["deployments"][0]["replicas_list"]
    replicas = [metric_samples(fetch_metrics(r["metrics"]["replica"])) for r in listed]
    assert sum(r['tokenbus_replica_generate_calls_total{"result": "length"}'] for r in replicas) == REQUESTS


def test_status_json_is_the_status_reply(cluster: LocalCluster, status: dict[str, Any]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tools", "status", "--json", "--head", cluster.router],
        capture_output=True,
        timeout=60,
        check=True,
    )
    data = json.loads(done.stdout)
    assert data["head_id"] == status["head_id"] and data["head"]["metrics"] == status["head"]["metrics"]
    assert [n["metrics"] for n in data["nodes"]] == [n["metrics"] for n in status["nodes"]]
    assert {r["id"]: r["metrics"]["worker"] for r in data["deployments"][0]["replicas_list"]} == {
        r["id"]: r["metrics"]["worker"] for r in status["deployments"][0]["replicas_list"]
    }
    assert "proxies" in data and "restarts" in data["deployments"][0]
