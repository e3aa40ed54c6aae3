"""The head's `status` answer as rich tables: nodes, deployments, replicas."""

from __future__ import annotations

from typing import Any

from rich.table import Table

STATE_STYLE = {"READY": "green", "STARTING": "yellow", "DRAINING": "magenta", "EXITED": "red"}


def status_tables(data: dict[str, Any]) -> list[Table]:
    nodes = Table(title=f"nodes (epoch {data.get('epoch')}, version {data.get('version')})")
    for col in ("node", "host", "slots used", "alive", "last seen"):
        nodes.add_column(col)
    for n in data.get("nodes", []):
        nodes.add_row(
            str(n["node_id"]),
            str(n["host"]),
            f"{n['used_slots']}/{n['cpu_slots']}",
            "[green]yes[/green]" if n["alive"] else "[red]no[/red]",
            f"{n['last_seen_s']:.1f} s ago",
        )

    deployments = Table(title="deployments")
    for col in ("name", "engine", "engine args", "ready/replicas", "max concurrency"):
        deployments.add_column(col)
    replicas = Table(title="replicas")
    for col in ("replica", "deployment", "node", "state", "address", "running", "waiting", "kv usage"):
        replicas.add_column(col, no_wrap=col in ("replica", "address"))  # ids and addresses are copied from here
    for d in data.get("deployments", []):
        deployments.add_row(
            d["name"], d["engine"], str(d["engine_args"]), f"{d['ready']}/{d['replicas']}", str(d["max_concurrency"])
        )
        for r in d.get("replicas_list", []):
            load = r.get("load") or {}
            style = STATE_STYLE.get(r["state"], "")
            replicas.add_row(
                r["id"],
                d["name"],
                r["node"],
                f"[{style}]{r['state']}[/{style}]" if style else r["state"],
                r.get("addr") or "-",
                str(load.get("running", 0)),
                str(load.get("waiting", 0)),
                f"{load.get('kv_usage', 0.0):.0%}",
            )
    return [nodes, deployments, replicas]
