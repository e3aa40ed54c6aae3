"""Prometheus for a local cluster (`tokenbus up --prometheus`): Debian's `prometheus` with a generated configuration
whose targets follow the cluster.

The targets are a file-based service discovery file written from the head's admin `status` (the metrics address
every process announced: head, agents, replicas, workers, proxies) and rewritten when that view changes; Prometheus
re-reads it on its own (it watches the file's directory), so a new replica is scraped without a restart. Each target
is labelled `job` (its kind), and `node`, `deployment`, `replica` or `proxy` where they apply; `honor_labels` keeps
a scraped series' own labels (a proxy's per-replica `deployment`, `replica`) when they meet a target's.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from bus.admin import AdminError
from tools.local_cluster import POLL_INTERVAL_S, LocalCluster, StartupError, child_died, free_port
from tools.procs import Child

BINARY = "prometheus"  # Debian's package installs /usr/bin/prometheus
SCRAPE_INTERVAL = "1s"
# the file's own refresh: a fallback, as Prometheus also watches the file's directory for changes
FILE_SD_REFRESH = "5s"
FOLLOW_INTERVAL_S = 1.0  # how often the targets are read from the head
READY_TIMEOUT_S = 60.0
TARGETS_FILE = "targets.json"
NAME = "prometheus"  # the child's name in its cluster (and its log's)


def scrape_targets(status: dict[str, Any]) -> list[dict[str, Any]]:
    """The file_sd target groups of every process the head's status lists with a metrics address (contract C2: an
    address not known yet is ""); replicas that have exited are left out."""
    groups: list[dict[str, Any]] = []

    def add(address: str, **labels: str) -> None:
        if address:
            groups.append({"targets": [address], "labels": labels})

    add(status["head"]["metrics"], job="head")
    for node in status["nodes"]:
        add(node["metrics"], job="agent", node=node["node_id"])
    for dep in status["deployments"]:
        for r in dep["replicas_list"]:
            if r["state"] == "EXITED":
                continue
            labels = {"node": r["node"], "deployment": dep["name"], "replica": r["id"]}
            add(r["metrics"]["replica"], job="replica", **labels)
            add(r["metrics"]["worker"], job="worker", **labels)
    for proxy in status["proxies"]:
        add(proxy["metrics"], job="proxy", proxy=proxy["id"])
    return groups


def write_config(directory: Path, targets_path: Path) -> Path:
    """The scrape configuration, written as JSON (which YAML reads) to `directory`/prometheus.yml; its path."""
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL},
        "scrape_configs": [
            {
                "job_name": "tokenbus",  # each target's own `job` label (its kind) takes the place of this one
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(targets_path)], "refresh_interval": FILE_SD_REFRESH}],
            }
        ],
    }
    path = directory / "prometheus.yml"
    path.write_text(json.dumps(config, indent=1) + "\n")
    return path


class TargetsFile:
    """The file_sd file, rewritten (by rename, so never read half-written) only when the targets change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._written: str | None = None
        self.write([])  # none until the head is asked: not the last run's

    def update(self, status: dict[str, Any]) -> bool:
        """The targets of the head's `status`; whether the file changed."""
        return self.write(scrape_targets(status))

    def write(self, groups: list[dict[str, Any]]) -> bool:
        text = json.dumps(groups, indent=1, sort_keys=True) + "\n"
        if text == self._written:
            return False
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)
        self._written = text
        return True

    async def follow(self, status: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        """Forever: the targets from `status()` (the head's admin status) each FOLLOW_INTERVAL_S. While the head does
        not answer, or is a starting head that has not heard from its agents yet, the targets stay as they were."""
        while True:
            try:
                reply = await status()
                if reply["synced"]:
                    self.update(reply)
            except (AdminError, TimeoutError):  # AdminTimeout is both
                pass
            await asyncio.sleep(FOLLOW_INTERVAL_S)


class Prometheus:
    """A Prometheus process of a LocalCluster (stopped and restarted with its other children), its configuration
    and targets file under `<state_dir>/prometheus/` (its database in `data/` there)."""

    def __init__(self, cluster: LocalCluster) -> None:
        binary = shutil.which(BINARY)
        if binary is None:
            raise StartupError(f"`{BINARY}` not found on PATH: `apt-get install prometheus` (`make deps` does)")
        directory = cluster.state_dir / "prometheus"
        directory.mkdir(parents=True, exist_ok=True)
        self.targets = TargetsFile(directory / TARGETS_FILE)
        config_path = write_config(directory, self.targets.path)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._cluster = cluster
        cluster.add_child(
            NAME,
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
        )

    @property
    def child(self) -> Child:
        """Its process now (the cluster's supervisor may have restarted it)."""
        return self._cluster.children.get(NAME)

    async def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until its /-/ready answers 200; StartupError when it exits or the deadline passes."""
        deadline = time.monotonic() + timeout
        last = "not polled yet"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
            while time.monotonic() < deadline:
                if self.child.proc.poll() is not None:
                    raise child_died(self.child)
                try:
                    async with session.get(f"{self.url}/-/ready") as resp:
                        if resp.status == 200:
                            return
                        last = f"HTTP {resp.status}"
                except (aiohttp.ClientError, TimeoutError) as e:
                    last = f"{type(e).__name__}: {e}"
                await asyncio.sleep(POLL_INTERVAL_S)
        raise StartupError(f"prometheus at {self.url} not ready ({last}):\n{self.child.log_tail()}")
