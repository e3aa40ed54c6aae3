"""`--plot FILE.png`: the run as one timeline, per 1 s bucket, with the stage borders marked.

Panels, top to bottom: TTFT p50/p95 (requests by when their first token came) and inter-token p95 (each
request's mean gap, by when it ended); tokens/s (content chunks received, from the client's running totals);
requests in flight (sampled every 250 ms) with each stage's closed-loop concurrency; failed requests per second
(by when they ended).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from tools.bench.load import BenchConfig
from tools.bench.records import RequestResult, Run
from tools.bench.report import percentile, stage_bounds

BUCKET_S = 1.0


def _buckets(run: Run) -> int:
    return max(1, math.ceil(run.duration_s / BUCKET_S))


def _by_bucket(
    n: int, results: Sequence[RequestResult], at: Callable[[RequestResult], float | None]
) -> list[list[RequestResult]]:
    out: list[list[RequestResult]] = [[] for _ in range(n)]
    for r in results:
        t = at(r)
        if t is not None:
            out[min(n - 1, max(0, int(t // BUCKET_S)))].append(r)
    return out


def _ms_quantile(values: list[float], q: float) -> float:
    v = percentile(values, q)
    return math.nan if v is None else v * 1000.0  # NaN: a gap in the line, not a fake 0


def _tokens_per_s(run: Run, n: int) -> list[float]:
    """Chunks received in each bucket, from the running totals interpolated at the bucket edges."""
    import numpy as np

    times = [0.0, *(s.elapsed_s for s in run.samples)]
    totals = [0.0, *(float(s.tokens) for s in run.samples)]
    edges = np.minimum(np.arange(n + 1) * BUCKET_S, max(run.duration_s, times[-1]))
    cumulative = np.interp(edges, times, totals)
    widths = np.diff(edges)
    return [float(d / w) if w > 0 else math.nan for d, w in zip(np.diff(cumulative), widths, strict=True)]


def plot_timeline(cfg: BenchConfig, run: Run, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    n = _buckets(run)
    x = [(i + 0.5) * BUCKET_S for i in range(n)]
    good = [r for r in run.results if r.ok]
    by_first_token = _by_bucket(n, good, lambda r: None if r.ttft_s is None else r.start_s + r.ttft_s)
    by_end = _by_bucket(n, good, lambda r: r.end_s)
    failed_by_end = _by_bucket(n, [r for r in run.results if not r.ok], lambda r: r.end_s)

    fig, (lat, tput, conc, err) = plt.subplots(4, 1, figsize=(12, 10), sharex=True)
    fig.suptitle(f"tokenbus bench: {cfg.model}, {len(run.stage_starts_s)} stages, {run.duration_s:.1f} s")
    ttft = [[r.ttft_s for r in b if r.ttft_s is not None] for b in by_first_token]
    for q, name, style in ((0.5, "TTFT p50", "-"), (0.95, "TTFT p95", "--")):
        lat.plot(x, [_ms_quantile(v, q) for v in ttft], style, color="tab:blue", label=name)
    itl = [[v for r in b if (v := r.itl_mean_s) is not None] for b in by_end]
    lat.plot(x, [_ms_quantile(v, 0.95) for v in itl], "-", color="tab:orange", label="inter-token p95")
    lat.set_ylabel("ms")
    lat.legend(loc="upper left", fontsize="small")

    tput.plot(x, _tokens_per_s(run, n), color="tab:green")
    tput.set_ylabel("tokens/s")

    times = [s.elapsed_s for s in run.samples]
    conc.step(times, [s.in_flight for s in run.samples], where="post", color="tab:purple", label="in flight")
    bounds = stage_bounds(run)
    targets = [(b, cfg.stages[i].concurrency) for i, b in enumerate(bounds) if cfg.stages[i].concurrency]
    for (start, end), c in targets:
        conc.hlines(c, start, end, colors="gray", linestyles="dotted")
    conc.set_ylabel("requests in flight")

    err.bar(x, [len(b) / BUCKET_S for b in failed_by_end], width=BUCKET_S * 0.9, color="tab:red")
    err.set_ylabel("failures/s")
    err.set_xlabel("seconds since the start")

    for i, (start, _) in enumerate(bounds):
        for ax in (lat, tput, conc, err):
            if i:
                ax.axvline(start, color="black", linewidth=0.8, alpha=0.6)
        lat.text(start, 1.01, f" {i}: {cfg.stages[i].describe()}", transform=lat.get_xaxis_transform(), fontsize=8)
    for ax in (lat, tput, conc, err):
        ax.set_xlim(0, n * BUCKET_S)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
