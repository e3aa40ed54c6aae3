"""A run's results: percentiles per stage and overall, the JSON result, and their rich tables.

Latencies are over successful requests. A request counts in the stage it started in; a stage lasts from its
start to the next one's (the last one to the run's end, its requests' drain included), and its rates are over
that. Inter-token latency (`itl_ms`) is each request's mean gap between content chunks, so its percentiles are
over requests, not over single gaps.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from tools.bench.load import BenchConfig, Stage
from tools.bench.records import HOPS, RequestResult, Run

QUANTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
HOP_QUANTILES = QUANTILES[:2]
TOP_ERRORS = 5


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def quantiles_ms(
    values_s: Sequence[float], quantiles: Sequence[tuple[str, float]] = QUANTILES
) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, q in quantiles:
        v = percentile(values_s, q)
        out[name] = None if v is None else round(v * 1000.0, 3)
    return out


def summarize(
    results: Sequence[RequestResult], duration_s: float, concurrency: int | None = None, rate: float | None = None
) -> dict[str, Any]:
    """One stage's (or the whole run's) figures. `hops_ms` has the hops the proxy reported, {} when it sent no
    timing; `proxy_ttft_ms` is the TTFT the proxy saw, which the hops add up to."""
    good = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in good)
    timed = [r.hops_s for r in good if r.hops_s is not None]
    hops_ms = {}
    for hop in HOPS:
        values = [v for hops in timed if (v := hops.get(hop)) is not None]
        if values:
            hops_ms[hop] = quantiles_ms(values, HOP_QUANTILES)
    return {
        "concurrency": concurrency,
        "rate": rate,
        "duration_s": round(duration_s, 3),
        "requests": len(results),
        "failures": len(results) - len(good),
        "tokens_per_s": round(tokens / duration_s, 2) if duration_s > 0 else 0.0,
        "requests_per_s": round(len(good) / duration_s, 3) if duration_s > 0 else 0.0,
        "ttft_ms": quantiles_ms([r.ttft_s for r in good if r.ttft_s is not None]),
        "itl_ms": quantiles_ms([v for r in good if (v := r.itl_mean_s) is not None]),
        "e2e_ms": quantiles_ms([r.e2e_s for r in good]),
        "hops_ms": hops_ms,
        "proxy_ttft_ms": quantiles_ms([v for r in good if (v := r.proxy_ttft_s) is not None], HOP_QUANTILES),
    }


def stage_bounds(run: Run) -> list[tuple[float, float]]:
    """(start_s, end_s) of each stage begun: to the next one's start, the last one to the run's end."""
    starts = run.stage_starts_s
    ends = [*starts[1:], run.duration_s] if starts else []
    return list(zip(starts, ends, strict=True))


def _common(values: Sequence[Any]) -> Any:
    """The value every stage has, else None (the overall of a ramp has no one concurrency)."""
    return values[0] if values and all(v == values[0] for v in values) else None


def result(cfg: BenchConfig, run: Run, client: str) -> dict[str, Any]:
    """The run's result: `--json`'s content and the JSON line on stdout."""
    stages: list[dict[str, Any]] = []
    for index, (start, end) in enumerate(stage_bounds(run)):
        stage: Stage = cfg.stages[index]
        mine = [r for r in run.results if r.stage == index]
        stages.append({"index": index, **summarize(mine, end - start, stage.concurrency, stage.rate)})
    overall = summarize(
        run.results,
        run.duration_s,
        _common([s.concurrency for s in cfg.stages]),
        _common([s.rate for s in cfg.stages]),
    )
    errors = Counter(r.error for r in run.results if not r.ok)
    return {
        "config": {**cfg.to_json(), "client": client},
        "stages": stages,
        "overall": overall,
        "client_loop_lag_ms": quantiles_ms(run.lags_s),
        "errors": dict(errors.most_common(TOP_ERRORS)),
    }


def _ms(v: float | None) -> str:
    """Hundredths below 10 ms: a hop of a few tens of microseconds still shows."""
    if v is None:
        return "-"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def summary_table(title: str, summary: dict[str, Any], lag_ms: dict[str, float | None] | None = None) -> Table:
    """A stage's or the overall's figures; the TTFT's hops when the proxy reported them."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for name, _ in QUANTILES:
        table.add_column(name, justify="right")
    table.add_row("TTFT (ms)", *(_ms(summary["ttft_ms"][n]) for n, _ in QUANTILES))
    table.add_row("inter-token (ms)", *(_ms(summary["itl_ms"][n]) for n, _ in QUANTILES))
    table.add_row("end-to-end (ms)", *(_ms(summary["e2e_ms"][n]) for n, _ in QUANTILES))
    table.add_section()
    table.add_row("requests", str(summary["requests"]), "", "")
    failures = summary["failures"]
    table.add_row("failures", f"[red]{failures}[/red]" if failures else "0", "", "")
    table.add_row("tokens/s", f"{summary['tokens_per_s']:.1f}", "", "")
    table.add_row("requests/s", f"{summary['requests_per_s']:.2f}", "", "")
    if summary["hops_ms"]:
        table.add_section()
        for hop, q in summary["hops_ms"].items():
            table.add_row(f"TTFT hop {hop} (ms)", _ms(q["p50"]), _ms(q["p95"]), "")
        proxy = summary["proxy_ttft_ms"]
        table.add_row("TTFT in the proxy (ms)", _ms(proxy["p50"]), _ms(proxy["p95"]), "")
    if lag_ms is not None:
        table.add_section()
        table.add_row("client loop lag (ms)", *(_ms(lag_ms[n]) for n, _ in QUANTILES))
    return table


def result_tables(cfg: BenchConfig, res: dict[str, Any]) -> list[Table]:
    """A table per stage, then the overall one (the only one for a one-stage run)."""
    tables = []
    stages = res["stages"]
    if len(stages) > 1:
        for s in stages:
            stage = cfg.stages[s["index"]]
            title = f"stage {s['index']}: {stage.describe()}, {s['duration_s']:.1f} s"
            tables.append(summary_table(title, s))
    overall = res["overall"]
    what = f"{len(stages)} stages" if len(stages) > 1 else cfg.stages[0].describe()
    tables.append(
        summary_table(f"tokenbus bench: {what}, {overall['duration_s']:.1f} s", overall, res["client_loop_lag_ms"])
    )
    return tables


def cpu_table(cpu: dict[str, Any]) -> Table:
    """The `cpu_cores` part of the result: cores per process kind, the total, and the bench client apart."""
    table = Table(title="CPU during the run (cores)", title_justify="left")
    table.add_column("processes")
    table.add_column("count", justify="right")
    table.add_column("cores", justify="right")
    for kind, cores in cpu["by_kind"].items():
        table.add_row(kind, str(cpu["processes"][kind]), f"{cores:.3f}")
    table.add_section()
    table.add_row("all tokenbus", str(sum(cpu["processes"].values())), f"{cpu['total']:.3f}")
    table.add_row("bench client (not in total)", str(cpu.get("client_processes", 1)), f"{cpu['client']:.3f}")
    if cpu["exited"]:
        table.add_row(f"[yellow]exited during the run: {cpu['exited']}[/yellow]", "", "")
    return table
