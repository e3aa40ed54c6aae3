"""`tokenbus top`'s screen: a View drawn as lines that fit the terminal exactly.

Nothing wraps: a table narrower than its columns drops its least important ones first (each column has a priority),
cells longer than their column are cut with an ellipsis, and the rows left to each table after titles and alerts
are shared out, the focused table getting what the others do not need.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.text import Text

from tools.status_view import STATE_STYLE
from tools.top_data import ProxyView, View
from tools.top_window import DeploymentRates, gauge

SortKey = str | float | None


@dataclass(frozen=True)
class Cell:
    text: str
    style: str = ""
    key: SortKey = None  # what sorting by its column compares; None sorts last


@dataclass(frozen=True)
class Column:
    header: str
    priority: int  # the lowest numbers stay longest when the screen is narrow
    right: bool = False
    max_width: int = 22


@dataclass
class Table:
    name: str
    columns: list[Column]
    rows: list[list[Cell]] = field(default_factory=list)


# each table, in screen order, with the headers `s` cycles its sort through (the first is the sort at start)
SORTABLE: dict[str, tuple[str, ...]] = {
    "deployments": ("name", "req/s", "tok/s", "TTFT95", "err/s"),
    "replicas": ("replica", "tok/s", "run", "wait", "KV"),
    "nodes": ("node", "seen", "slots"),
    "proxies": ("address", "streams", "age"),
}
TABLE_NAMES = tuple(SORTABLE)


@dataclass
class Ui:
    """What the keys change."""

    focus: int = 0  # index into TABLE_NAMES
    sort: dict[str, int] = field(default_factory=dict)  # table name -> index into its SORTABLE entry

    def press(self, key: str) -> None:
        """tab focuses the next table, s sorts the focused one by its next column."""
        if key == "\t":
            self.focus = (self.focus + 1) % len(TABLE_NAMES)
        elif key == "s":
            name = TABLE_NAMES[self.focus]
            self.sort[name] = (self.sort.get(name, 0) + 1) % len(SORTABLE[name])


MAX_ALERTS = 3
KEYS_HINT = "tab focus  s sort  q quit"


def render(view: View, ui: Ui, width: int, height: int) -> list[Text]:
    """The whole screen: at most `height` lines of at most `width` cells each."""
    tables = build_tables(view)
    lines = [_title(view, width)]
    alerts = _alerts(view)
    if len(alerts) > MAX_ALERTS:
        alerts = [*alerts[: MAX_ALERTS - 1], Text(f"... and {len(alerts) - MAX_ALERTS + 1} more", style="red")]
    lines += alerts
    focus = ui.focus % len(tables)
    budget = max(0, height - len(lines) - 2 * len(tables))  # a title and a header line each
    shown = _share_rows([len(t.rows) for t in tables], budget, focus)
    spare = budget - sum(shown)  # lines no table needs: a blank one before each title, while they last
    for index, (table, rows) in enumerate(zip(tables, shown, strict=True)):
        if spare > 0:
            lines.append(Text())
            spare -= 1
        sortable = SORTABLE[table.name]
        sort_by = sortable[ui.sort.get(table.name, 0) % len(sortable)]
        lines += _table_lines(table, sort_by, rows, width, focused=index == focus)
    for line in lines:
        line.no_wrap = True
        line.truncate(width, overflow="ellipsis")
    return lines[:height]


def _share_rows(wanted: list[int], budget: int, focus: int) -> list[int]:
    """Rows each table shows: an equal share each, then what is left to the focused table, then to the others."""
    share = budget // len(wanted) if wanted else 0
    shown = [min(w, share) for w in wanted]
    left = budget - sum(shown)
    for index in [focus, *(i for i in range(len(wanted)) if i != focus)]:
        more = min(wanted[index] - shown[index], left)
        shown[index] += more
        left -= more
    return shown


def _title(view: View, width: int) -> Text:
    status = view.status or {}
    version = status.get("version")
    clock = time.strftime("%H:%M:%S", time.localtime(view.polled_at)) if view.polled_at else "--:--:--"
    left = f"tokenbus top  {view.head}"
    if version is not None:
        left += f"  v{_version(version)}"
    left += f"  {clock}"
    pad = max(1, width - len(left) - len(KEYS_HINT))
    text = Text(left, style="bold")
    if len(left) + 1 + len(KEYS_HINT) <= width:
        text.append(" " * pad + KEYS_HINT, style="dim")
    return text


def _alerts(view: View) -> list[Text]:
    alerts = []
    if view.head_error:
        shown = f"; showing its answer of {view.status_age_s:.0f} s ago" if view.status is not None else ""
        alerts.append(Text(f"head {view.head} cannot be reached: {view.head_error}{shown}", style="bold red"))
    elif view.status is not None and not view.status.get("synced", True):
        alerts.append(Text("head is waiting for its agents (it publishes no routing table yet)", style="yellow"))
    for proxy in view.proxies:
        if proxy.error:
            alerts.append(Text(f"proxy {proxy.address} cannot be reached: {proxy.error}", style="red"))
    if view.status is not None and not view.proxies:
        alerts.append(Text("no proxy reports to the head: requests, tokens and latencies show as -", style="yellow"))
    return alerts


def _table_lines(table: Table, sort_by: str, rows: int, width: int, focused: bool) -> list[Text]:
    column = [c.header for c in table.columns].index(sort_by)
    table.rows.sort(key=lambda row: _sort_key(row[column].key))
    visible = table.rows[:rows]
    marker = ">" if focused else " "
    title = Text(f"{marker} {table.name} ({len(table.rows)}", style="bold reverse" if focused else "bold")
    title.append(f", {rows} shown)" if rows < len(table.rows) else ")")
    title.append(f"  sort: {sort_by}", style="dim")
    widths = [
        min(c.max_width, max([len(c.header), *(len(row[i].text) for row in visible)]))
        for i, c in enumerate(table.columns)
    ]
    keep = _fit(table.columns, widths, width)
    header = Text()
    for n, i in enumerate(keep):
        header.append(("" if n == 0 else " ") + _pad(table.columns[i].header, widths[i], table.columns[i].right))
    header.stylize("bold underline")
    lines = [title, header]
    for row in visible:
        line = Text()
        for n, i in enumerate(keep):
            if n:
                line.append(" ")
            line.append(_pad(row[i].text, widths[i], table.columns[i].right), style=row[i].style)
        lines.append(line)
    return lines


def _fit(columns: list[Column], widths: list[int], width: int) -> list[int]:
    """The columns kept, in their order: by priority, each that still fits (with a space before it)."""
    kept: list[int] = []
    used = -1
    for i in sorted(range(len(columns)), key=lambda i: (columns[i].priority, i)):
        if used + 1 + widths[i] <= width or not kept:
            kept.append(i)
            used += 1 + widths[i]
    return sorted(kept)


def _pad(text: str, width: int, right: bool) -> str:
    if len(text) > width:
        text = text[: max(0, width - 1)] + "…"
    return text.rjust(width) if right else text.ljust(width)


def _sort_key(key: SortKey) -> tuple[int, float, str]:
    """Numbers biggest first, then text in order, then the unknown."""
    if key is None:
        return (2, 0.0, "")
    if isinstance(key, str):
        return (1, 0.0, key)
    return (0, -key, "")


# --- the tables ------------------------------------------------------------------------------------------------


def build_tables(view: View) -> list[Table]:
    status = view.status or {}
    deployments = status.get("deployments", [])
    return [
        _deployments(deployments, view.rates.deployments),
        _replicas(deployments, view.rates.replica_tokens_s),
        _nodes(status.get("nodes", [])),
        _proxies(view.proxies),
    ]


def _deployments(deployments: list[dict[str, Any]], rates: dict[str, DeploymentRates]) -> Table:
    table = Table(
        "deployments",
        [
            Column("name", 0),
            Column("ready", 1, right=True),
            Column("req/s", 1, right=True),
            Column("tok/s", 1, right=True),
            Column("TTFT50", 3, right=True),
            Column("TTFT95", 2, right=True),
            Column("ITL95", 2, right=True),
            Column("err/s", 2, right=True),
            Column("429/s", 3, right=True),
            Column("restarts", 4, right=True),
        ],
    )
    for d in deployments:
        r = rates.get(d["name"], DeploymentRates())
        ready, wanted = d.get("ready", 0), d.get("replicas", 0)
        restarts = d.get("restarts")
        table.rows.append(
            [
                Cell(d["name"], key=d["name"]),
                Cell(f"{ready}/{wanted}", "" if ready >= wanted else "yellow", ready),
                _rate(r.requests_s),
                _rate(r.tokens_s),
                _seconds(r.ttft_p50_s),
                _seconds(r.ttft_p95_s),
                _seconds(r.itl_p95_s),
                _rate(r.errors_s, bad="red"),
                _rate(r.rejected_s, bad="yellow"),
                Cell("-" if restarts is None else str(restarts), "red" if restarts else "", restarts),
            ]
        )
    return table


def _replicas(deployments: list[dict[str, Any]], tokens_s: dict[str, float]) -> Table:
    table = Table(
        "replicas",
        [
            Column("replica", 0),
            Column("deployment", 4, max_width=14),
            Column("node", 3, max_width=14),
            Column("state", 1),
            Column("run", 2, right=True),
            Column("wait", 2, right=True),
            Column("KV", 3, right=True),
            Column("tok/s", 1, right=True),
        ],
    )
    for d in deployments:
        for r in d.get("replicas_list", []):
            load = r.get("load") or {}
            state = r.get("state", "?")
            healthy = r.get("healthy", True)
            table.rows.append(
                [
                    Cell(r["id"], key=r["id"]),
                    Cell(d["name"], key=d["name"]),
                    Cell(r.get("node", ""), key=r.get("node", "")),
                    Cell(state if healthy else f"{state} unhealthy", STATE_STYLE.get(state, "") if healthy else "red"),
                    _count(load.get("running")),
                    _count(load.get("waiting")),
                    Cell(f"{load['kv_usage']:.0%}", key=load["kv_usage"]) if "kv_usage" in load else Cell("-"),
                    _rate(tokens_s.get(r.get("addr", ""))),
                ]
            )
    return table


def _nodes(nodes: list[dict[str, Any]]) -> Table:
    table = Table(
        "nodes",
        [
            Column("node", 0),
            Column("address", 3),
            Column("slots", 1, right=True),
            Column("GPUs", 2, right=True),
            Column("seen", 2, right=True),
            Column("state", 1),
        ],
    )
    for n in nodes:
        gpus = n.get("gpus", [])
        free = len(n.get("free_gpus", []))
        lost = n.get("lost_s")
        alive = n.get("alive", False)
        state = Cell("alive", "green") if alive else Cell(f"lost {lost:.0f}s" if lost else "lost", "red")
        table.rows.append(
            [
                Cell(n["node_id"], key=n["node_id"]),
                Cell(n.get("host", "")),
                Cell(f"{n.get('used_slots', 0)}/{n.get('cpu_slots', 0)}", key=n.get("used_slots", 0)),
                Cell(f"{len(gpus) - free}/{len(gpus)}" if gpus else "-", key=len(gpus) - free),
                Cell(f"{n.get('last_seen_s', 0):.1f}s", key=n.get("last_seen_s")),
                state,
            ]
        )
    return table


def _proxies(proxies: list[ProxyView]) -> Table:
    table = Table(
        "proxies",
        [
            Column("proxy", 3),
            Column("address", 0),
            Column("streams", 1, right=True),
            Column("snapshot", 2, right=True),
            Column("age", 2, right=True),
            Column("seen", 3, right=True),
            Column("state", 1),
        ],
    )
    for p in proxies:
        listed = p.listed or {}
        metrics = p.metrics or {}
        streams = gauge(metrics, "tokenbus_proxy_in_flight_streams")
        if streams is None:
            streams = listed.get("open_streams")
        version = gauge(metrics, "tokenbus_proxy_snapshot_version")
        if version is None:
            version = listed.get("snapshot_version")
        age = gauge(metrics, "tokenbus_proxy_snapshot_staleness_seconds")
        seen = listed.get("last_seen_s")
        if p.error:
            state = Cell("unreachable", "red")
        else:
            state = Cell("up", "green") if p.listed is not None else Cell("not listed", "yellow")
        table.rows.append(
            [
                Cell(listed.get("id", "-")),
                Cell(p.address, key=p.address),
                _count(streams),
                Cell(_version(int(version)) if version is not None else "-"),
                Cell(f"{age:.1f}s" if age is not None else "-", key=age),
                Cell(f"{seen:.1f}s" if seen is not None else "-", key=seen),
                state,
            ]
        )
    return table


# --- numbers as shown ------------------------------------------------------------------------------------------


def _version(version: int) -> str:
    """A snapshot version is epoch << 32 | sequence: shown as epoch.sequence."""
    return f"{version >> 32}.{version & 0xFFFFFFFF}"


def _count(value: float | None) -> Cell:
    return Cell("-" if value is None else f"{value:.0f}", key=value)


def _rate(value: float | None, bad: str = "") -> Cell:
    if value is None:
        return Cell("-")
    if value >= 10_000:
        text = f"{value / 1000:.0f}k"
    elif value >= 100:
        text = f"{value:.0f}"
    else:
        text = f"{value:.1f}"
    return Cell(text, bad if bad and value > 0 else "", value)


def _seconds(value: float | None) -> Cell:
    if value is None:
        return Cell("-")
    if value >= 1:
        text = f"{value:.2f}s"
    elif value >= 0.01:
        text = f"{value * 1000:.0f}ms"
    else:
        text = f"{value * 1000:.1f}ms"
    return Cell(text, key=value)
