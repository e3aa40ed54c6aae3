"""`tokenbus up --prometheus`: Debian's Prometheus scraping every process of the cluster, found through the targets
file written from the head's status, checked through Prometheus's own HTTP API."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cluster_harness import UP_READY_S, Up

from node_agent.binaries import bin_dir
from tools.admin_cmds import admin_request
from tools.procs import alive
from tools.prometheus import TargetsFile, scrape_targets, write_config

# A status as the head answers it (contract C2), trimmed to what the targets are made of.
STATUS: dict[str, Any] = {
    "synced": True,
    "head": {"router": "tcp://127.0.0.1:5555", "pub": "tcp://127.0.0.1:5556", "metrics": "127.0.0.1:9100"},
    "nodes": [{"node_id": "n1", "metrics": "127.0.0.1:9101"}, {"node_id": "n2", "metrics": ""}],
    "deployments": [
        {
            "name": "demo",
            "replicas_list": [
                {
                    "id": "r1",
                    "node": "n1",
                    "state": "READY",
                    "metrics": {"replica": "127.0.0.1:9102", "worker": "127.0.0.1:9103"},
                },
                {"id": "r2", "node": "n1", "state": "STARTING", "metrics": {"replica": "127.0.0.1:9104", "worker": ""}},
                {"id": "r0", "node": "n1", "state": "EXITED", "metrics": {"replica": "127.0.0.1:9105", "worker": ""}},
            ],
        }
    ],
    "proxies": [{"id": "p1", "addr": "127.0.0.1:8000", "metrics": "127.0.0.1:8000"}],
}
JOBS = {"head": 1, "agent": 1, "replica": 1, "worker": 1, "proxy": 1}  # what `up --engine sim --replicas 1` runs
DEADLINE_S = 60.0  # for what takes a few scrapes (1 s each): 10x room on 2 busy cores


def test_targets_are_every_process_with_a_known_metrics_address_labelled_by_kind() -> None:
    assert scrape_targets(STATUS) == [
        {"targets": ["127.0.0.1:9100"], "labels": {"job": "head"}},
        {"targets": ["127.0.0.1:9101"], "labels": {"job": "agent", "node": "n1"}},
        {
            "targets": ["127.0.0.1:9102"],
            "labels": {"job": "replica", "node": "n1", "deployment": "demo", "replica": "r1"},
        },
        {
            "targets": ["127.0.0.1:9103"],
            "labels": {"job": "worker", "node": "n1", "deployment": "demo", "replica": "r1"},
        },
        {
            "targets": ["127.0.0.1:9104"],
            "labels": {"job": "replica", "node": "n1", "deployment": "demo", "replica": "r2"},
        },
        {"targets": ["127.0.0.1:8000"], "labels": {"job": "proxy", "proxy": "p1"}},
    ]


def test_targets_file_is_rewritten_only_when_the_targets_change(tmp_path: Path) -> None:
    targets = TargetsFile(tmp_path / "targets.json")
    assert json.loads(targets.path.read_text()) == []
    assert targets.update(STATUS)
    written = targets.path.stat().st_mtime_ns, targets.path.stat().st_ino
    assert not targets.update({**STATUS, "version": 7})  # nothing a target is made of changed
    assert (targets.path.stat().st_mtime_ns, targets.path.stat().st_ino) == written
    assert targets.update({**STATUS, "proxies": []})
    assert "127.0.0.1:8000" not in targets.path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["targets.json"]  # no temporary file left


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian's prometheus package)")
def test_promtool_accepts_the_generated_configuration_and_targets(tmp_path: Path) -> None:
    targets = TargetsFile(tmp_path / "targets.json")
    targets.update(STATUS)
    config = write_config(tmp_path, targets.path)
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


# --- end to end: tokenbus up --prometheus ----------------------------------------------------------------------


def _api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


def _until(check: Any, what: str, seen: Any = lambda: "", deadline_s: float = DEADLINE_S) -> Any:
    """Polls `check()` until it returns something true; that. The failure says what `seen()` shows then."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.25)
    raise AssertionError(f"{what} not reached in {deadline_s} s; {seen()}")


class Cluster:
    """`tokenbus up --engine sim --prometheus` and what the test reads of it."""

    def __init__(self, up: Up) -> None:
        self.up = up
        self.prometheus = up.wait_for("prometheus http://").split()[1]

    def status(self) -> dict[str, Any]:
        return asyncio.run(admin_request(self.up.router, "status", {}, timeout=5.0))

    def expected(self) -> dict[str, dict[str, str]]:
        """address -> labels of every process the head's status lists."""
        return {g["targets"][0]: g["labels"] for g in scrape_targets(self.status())}

    def up_targets(self) -> dict[str, dict[str, str]]:
        """address -> labels of every target Prometheus scraped successfully last time."""
        active = _api(self.prometheus, "targets", state="active")["activeTargets"]
        return {t["labels"]["instance"]: t["labels"] for t in active if t["health"] == "up"}

    def every_process_up(self, jobs: dict[str, int]) -> dict[str, dict[str, str]] | None:
        """The targets, once the head lists `jobs` processes of each kind and Prometheus scrapes each of them."""
        expected = self.expected()
        if Counter(labels["job"] for labels in expected.values()) != jobs:
            return None
        scraped = self.up_targets()
        if all(labels.items() <= scraped.get(address, {}).items() for address, labels in expected.items()):
            return expected
        return None

    def seen(self) -> str:
        return f"the head lists {self.expected()}, Prometheus scrapes {self.up_targets()}"

    def query(self, promql: str) -> list[dict[str, Any]]:
        return _api(self.prometheus, "query", query=promql)["result"]


needs_binaries = pytest.mark.skipif(
    not (bin_dir() / "tokenbus-proxy").exists(), reason="binaries not built (make build)"
)


@needs_binaries
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (Debian's package)")
@pytest.mark.timeout(300)
def test_up_prometheus_scrapes_every_process_and_follows_a_scale_up(tmp_path: Path) -> None:
    up = Up(tmp_path / "state", "--prometheus", "--replicas", "1")  # a slot left for the scale-up (2 cores)
    try:
        up.wait_for("Ctrl-C stops everything", 2 * UP_READY_S)
        c = Cluster(up)
        prometheus_pid = up.pids()["prometheus"]

        targets = _until(lambda: c.every_process_up(JOBS), f"Prometheus scraping {JOBS}", c.seen)
        for job in JOBS:  # the `up` series of each kind, one per process, each 1
            ups = _until(lambda job=job: c.query(f'up{{job="{job}"}}'), f"up{{job={job}}}")
            assert {(r["metric"]["instance"], r["value"][1]) for r in ups} == {
                (address, "1") for address, labels in targets.items() if labels["job"] == job
            }

        def ttft_p95() -> float | None:
            assert up.request() == 8  # traffic while the rate's window fills
            result = c.query("histogram_quantile(0.95, sum by (le) (rate(tokenbus_proxy_ttft_seconds_bucket[30s])))")
            value = float(result[0]["value"][1]) if result else math.nan
            return value if math.isfinite(value) else None

        assert 0 < _until(ttft_p95, "a TTFT p95 from Prometheus") < 10
        (count,) = c.query("sum(tokenbus_proxy_ttft_seconds_count)")
        assert float(count["value"][1]) >= 1

        asyncio.run(admin_request(up.router, "scale", {"name": "demo", "replicas": 2}, timeout=5.0))
        grown = {**JOBS, "replica": 2, "worker": 2}
        after = _until(lambda: c.every_process_up(grown), f"Prometheus scraping {grown} after the scale-up", c.seen)
        assert len(set(after) - set(targets)) == 2  # the new replica and its worker
        assert up.pids()["prometheus"] == prometheus_pid and alive(prometheus_pid)  # found without a restart
        assert "restarted prometheus" not in "".join(up.lines)
        rest = up.interrupt()
    finally:
        up.kill()
    assert up.proc.returncode == 0, rest
    assert "stopped prometheus" in rest and not alive(prometheus_pid)
