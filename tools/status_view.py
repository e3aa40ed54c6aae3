"""The head's `status` answer as rich tables: nodes, deployments, replicas, proxies."""

from __future__ import annotations

from typing import Any

from rich.table import Table

STATE_STYLE = {"READY": "green", "STARTING": "yellow", "DRAINING": "magenta", "EXITED": "red"}


def status_tables(data: dict[str, Any]) -> list[Table]:
    # a head still waiting for its agents after a start publishes no routing table yet
    syncing = "" if data.get("synced", True) else ", [yellow]waiting for its agents[/yellow]"
    head = f"head {data.get('head_id', '?')}, epoch {data.get('epoch')}, version {data.get('version')}{syncing}"
    nodes = Table(title=f"nodes ({head})")
    for col in ("node", "host", "slots used", "GPUs free", "alive", "last seen"):
        nodes.add_column(col)
    for n in data.get("nodes", []):
        lost = n.get("lost_s")
        nodes.add_row(
            str(n["node_id"]),
            str(n["host"]),
            f"{n['used_slots']}/{n['cpu_slots']}",
            _gpus_free(n),
            "[green]yes[/green]" if n["alive"] else f"[red]lost {lost:.0f} s ago[/red]" if lost else "[red]no[/red]",
            f"{n['last_seen_s']:.1f} s ago",
        )

    deployments = Table(title="deployments")
    for col in (
        "name",
        "engine",
        "engine args",
        "ready/replicas",
        "max concurrency",
        "context",
        "timeouts",
        "restarts",
    ):
        deployments.add_column(col)
    replicas = Table(title="replicas")
    for col in ("replica", "deployment", "node", "GPUs", "state", "address", "running", "waiting", "kv usage"):
        replicas.add_column(col, no_wrap=col in ("replica", "address"))  # ids and addresses are copied from here
    for d in data.get("deployments", []):
        engine = "[yellow]adopted[/yellow]" if d.get("adopted") else d["engine"]
        timeouts = f"first {_limit(d.get('first_token_timeout_s'))}, idle {_limit(d.get('idle_timeout_s'))}"
        ready = f"{d['ready']}/{d['replicas']}"
        if d.get("unplaced"):  # replicas no node has room for: say which resource is short
            ready += f"\n[red]{d['unplaced']} unplaced: {d.get('unplaced_reason', '')}[/red]"
        deployments.add_row(
            d["name"],
            engine,
            str(d["engine_args"]),
            ready,
            str(d["max_concurrency"]),
            str(d.get("max_model_len") or "-"),
            timeouts,
            str(d.get("restarts", 0)),
        )
        for r in d.get("replicas_list", []):
            load = r.get("load") or {}
            style = STATE_STYLE.get(r["state"], "")
            state = f"[{style}]{r['state']}[/{style}]" if style else r["state"]
            if not r.get("healthy", True):
                state += " [red]unhealthy[/red]"
            replicas.add_row(
                r["id"],
                d["name"],
                r["node"],
                ",".join(map(str, r.get("gpus", []))) or "-",
                state,
                r.get("addr") or "-",
                str(load.get("running", 0)),
                str(load.get("waiting", 0)),
                f"{load.get('kv_usage', 0.0):.0%}",
            )
    proxies = Table(title="proxies (those that reported in the last 10 s)")
    for col in ("proxy", "address", "open streams", "snapshot", "last seen"):
        proxies.add_column(col, no_wrap=col == "address")
    for p in data.get("proxies", []):
        proxies.add_row(
            str(p["id"]),
            str(p["addr"]),
            str(p["open_streams"]),
            str(p["snapshot_version"]),
            f"{p['last_seen_s']:.1f} s ago",
        )
    return [nodes, deployments, replicas, proxies]


def _gpus_free(node: dict[str, Any]) -> str:
    """Free of all, with their names when the node has any: "2/4 (A100)"."""
    gpus = node.get("gpus", [])
    if not gpus:
        return "-"
    names = ", ".join(sorted({g["name"] for g in gpus}))
    return f"{len(node.get('free_gpus', []))}/{len(gpus)} ({names})"


def _limit(seconds: float | None) -> str:
    """A stream timeout as shown: 0 (or none reported) is no limit."""
    return f"{seconds:g} s" if seconds else "none"
