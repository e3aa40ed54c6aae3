"""The fault suite's fixtures: sim clusters started as LocalCluster starts them (real head, agents, proxies,
replicas and workers), a report per case, and a table of every case at the end of the run."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from faults.harness import REPORTS, CaseReport, Outcome, proxy_metrics, until
from tools.local_cluster import LocalCluster


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Awaitable[LocalCluster]]]:
    """`await make_cluster(spec, agents=.., proxies=..)`: a started cluster with `spec` deployed and READY."""
    clusters: list[LocalCluster] = []

    async def make(spec: dict[str, Any], **cluster_args: Any) -> LocalCluster:
        c = LocalCluster(tmp_path / f"cluster{len(clusters)}", **cluster_args)
        clusters.append(c)
        c.start()
        await c.deploy(spec)
        # The head has them READY; each proxy applies them a snapshot later. Faults start once every proxy routes
        # to every replica, so that a retry has somewhere to go.
        for url in c.proxy_urls.values():

            async def routes_to_all(url: str = url) -> bool:
                lines = await proxy_metrics(url, "tokenbus_proxy_replica_routable{")
                return sum(line.endswith(" 1") for line in lines) >= spec["replicas"]

            await until(routes_to_all, 30.0, f"{url} routing to {spec['replicas']} replicas")
        return c

    yield make
    for c in clusters:
        c.stop()


@pytest.fixture
def case(request: pytest.FixtureRequest) -> CaseReport:
    report = CaseReport(request.node.name.removeprefix("test_"))
    REPORTS.append(report)
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORTS:
        return
    tr = terminalreporter
    tr.section("fault cases: what the clients saw")
    tr.write_line(f"{'case':36} {'sent':>5} {'ok':>5} {'retried':>7} {'errors':>6} {'silent':>6}  recovery")
    for rep in REPORTS:
        counts = {o: sum(r.outcome is o for r in rep.results) for o in Outcome}
        recovery = ", ".join(f"{k} {v:.2f} s" for k, v in rep.recovery_s.items())
        tr.write_line(
            f"{rep.name[:36]:36} {len(rep.results):5} {counts[Outcome.COMPLETED]:5} {counts[Outcome.RETRIED]:7} "
            f"{counts[Outcome.ERROR]:6} {counts[Outcome.SILENT]:6}  {recovery}"
        )
    if path := os.environ.get("TOKENBUS_FAULT_REPORT"):  # the same table as JSON, for the note
        rows = [
            {
                "case": rep.name,
                "sent": len(rep.results),
                **{o.name.lower(): sum(r.outcome is o for r in rep.results) for o in Outcome},
                "recovery_s": rep.recovery_s,
            }
            for rep in REPORTS
        ]
        Path(path).write_text(json.dumps(rows, indent=1))
