"""Benchmark results: percentiles and the summary, its rich table, the latency plot, the Pushgateway push."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from tools.bench.python_client import RequestResult

QUANTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def quantiles_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, q in QUANTILES:
        v = percentile(values_s, q)
        out[name] = None if v is None else round(v * 1000.0, 3)
    return out


def summarize(results: Sequence[RequestResult], concurrency: int, duration_s: float) -> dict[str, Any]:
    """The JSON summary; latencies are over successful requests, rates over the measured duration."""
    good = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in good)
    return {
        "concurrency": concurrency,
        "duration_s": round(duration_s, 3),
        "requests": len(results),
        "failures": len(results) - len(good),
        "ttft_ms": quantiles_ms([r.ttft_s for r in good if r.ttft_s is not None]),
        "e2e_ms": quantiles_ms([r.e2e_s for r in good]),
        "tokens_per_s": round(tokens / duration_s, 2) if duration_s > 0 else 0.0,
        "requests_per_s": round(len(good) / duration_s, 3) if duration_s > 0 else 0.0,
    }


def summary_table(summary: dict[str, Any]) -> Table:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    table = Table(title=f"tokenbus bench: {summary['concurrency']} streams, {summary['duration_s']:.1f} s")
    table.add_column("metric")
    for name, _ in QUANTILES:
        table.add_column(name, justify="right")
    table.add_row("TTFT (ms)", *(ms(summary["ttft_ms"][n]) for n, _ in QUANTILES))
    table.add_row("end-to-end (ms)", *(ms(summary["e2e_ms"][n]) for n, _ in QUANTILES))
    table.add_section()
    table.add_row("requests", str(summary["requests"]), "", "")
    failures = summary["failures"]
    table.add_row("failures", f"[red]{failures}[/red]" if failures else "0", "", "")
    table.add_row("tokens/s", f"{summary['tokens_per_s']:.1f}", "", "")
    table.add_row("requests/s", f"{summary['requests_per_s']:.2f}", "", "")
    if "client_loop_lag_ms" in summary:
        lag = summary["client_loop_lag_ms"]
        table.add_section()
        table.add_row("client loop lag (ms)", *(ms(lag[n]) for n, _ in QUANTILES))
    return table


def cpu_table(cpu: dict[str, Any]) -> Table:
    """The `cpu_cores` part of the summary: cores per process kind, the total, and the bench client apart."""
    table = Table(title="CPU during the run (cores)")
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


def plot_latencies(results: Sequence[RequestResult], path: str) -> None:
    """Histograms of TTFT and end-to-end latency of the successful requests, with p50/p95/p99 marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    good = [r for r in results if r.ok]
    series = (
        ("TTFT", [r.ttft_s * 1000.0 for r in good if r.ttft_s is not None]),
        ("end-to-end", [r.e2e_s * 1000.0 for r in good]),
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (name, values) in zip(axes, series, strict=True):
        ax.set_title(f"{name} latency ({len(values)} requests)")
        ax.set_xlabel("ms")
        ax.set_ylabel("requests")
        if values:
            ax.hist(values, bins=50, color="tab:blue", alpha=0.8)
            for (label, q), color in zip(QUANTILES, ("green", "orange", "red"), strict=True):
                v = percentile(values, q)
                ax.axvline(v, color=color, linestyle="--", label=f"{label} {v:.1f} ms")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def push_summary(summary: dict[str, Any], gateway: str, model: str) -> None:
    """Push the summary as gauges to a Prometheus Pushgateway (job "tokenbus_bench", grouped by model)."""
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

    registry = CollectorRegistry()
    for name in ("concurrency", "duration_s", "requests", "failures", "tokens_per_s", "requests_per_s"):
        Gauge(f"tokenbus_bench_{name}", f"tokenbus bench {name}", registry=registry).set(summary[name])
    for metric in ("ttft_ms", "e2e_ms"):
        gauge = Gauge(f"tokenbus_bench_{metric}", f"tokenbus bench {metric} quantiles", ["quantile"], registry=registry)
        for name, q in QUANTILES:
            value = summary[metric][name]
            gauge.labels(quantile=str(q)).set(math.nan if value is None else value)
    push_to_gateway(gateway, job="tokenbus_bench", registry=registry, grouping_key={"model": model})
