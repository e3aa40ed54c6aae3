"""`tokenbus status` tables: what an operator must see after faults (adopted deployments, unhealthy replicas, lost
nodes, a head still waiting for its agents, per-deployment stream timeouts)."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from tools.status_view import status_tables


def render(data: dict[str, Any]) -> str:
    console = Console(record=True, width=200)
    for table in status_tables(data):
        console.print(table)
    return console.export_text()


def status(synced: bool) -> dict[str, Any]:
    replica = {"id": "demo-1", "node": "n1", "state": "READY", "healthy": False, "addr": "127.0.0.1:7", "load": {}}
    return {
        "head_id": "abc123",
        "epoch": 4,
        "version": (4 << 32) | 9,
        "synced": synced,
        "nodes": [
            {"node_id": "n1", "host": "h", "cpu_slots": 4, "used_slots": 1, "alive": True, "last_seen_s": 0.2},
            {"node_id": "n2", "host": "h", "cpu_slots": 4, "used_slots": 0, "alive": False, "last_seen_s": 9.0}
            | {"lost_s": 6.0},
        ],
        "deployments": [
            {
                "name": "demo",
                "adopted": True,
                "engine": "",
                "engine_args": {},
                "replicas": 1,
                "ready": 1,
                "max_concurrency": 256,
                "max_model_len": 2048,
                "first_token_timeout_s": 120.0,
                "idle_timeout_s": 0.0,
                "replicas_list": [replica],
            }
        ],
    }


def test_shows_what_faults_leave_behind() -> None:
    text = render(status(synced=False))
    assert "head abc123" in text
    assert "waiting for its agents" in " ".join(text.split())  # the title may wrap
    assert "lost 6 s ago" in text
    assert "adopted" in text
    assert "unhealthy" in text
    assert "2048" in text
    assert "first 120 s, idle none" in text


def test_a_synced_head_says_nothing_of_waiting() -> None:
    assert "waiting for its agents" not in render(status(synced=True))


def test_shows_gpus_and_why_replicas_are_unplaced() -> None:
    data = status(synced=True)
    data["nodes"][0] |= {"gpus": [{"index": i, "name": "A100", "memory_bytes": 0} for i in range(4)]}
    data["nodes"][0] |= {"free_gpus": [3]}
    data["deployments"][0] |= {"adopted": False, "unplaced": 2, "unplaced_reason": "needs 2 free GPUs on one node"}
    data["deployments"][0]["replicas_list"][0] |= {"gpus": [0, 1, 2]}
    text = render(data)
    assert "1/4 (A100)" in text
    assert "2 unplaced: needs 2 free GPUs on one node" in text
    assert "0,1,2" in text


def test_shows_the_proxies_and_the_restarts() -> None:
    data = status(synced=True)
    data["deployments"][0] |= {"restarts": 3}
    data["proxies"] = [
        {"id": "edge-1", "addr": "10.0.0.5:8000", "metrics": "10.0.0.5:8000", "snapshot_version": 77}
        | {"open_streams": 12, "last_seen_s": 0.4}
    ]
    text = render(data)
    assert "edge-1" in text and "10.0.0.5:8000" in text and "0.4 s ago" in text
    row = next(line for line in text.splitlines() if "edge-1" in line)
    assert "12" in row and "77" in row
    demo = next(line for line in text.splitlines() if "demo" in line and "2048" in line)
    assert demo.rstrip(" │|").split()[-1] == "3"  # the restarts column, last
