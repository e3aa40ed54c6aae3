"""`--pushgateway URL`: the run's per-stage results pushed to a Prometheus Pushgateway.

Job `tokenbus_bench`, grouped by `model` (a later run of the same model replaces the group). Every series is
a gauge (the results of one finished run, not a process's running counts), labelled `stage` ("0", "1", ...);
quantiles are in the metric's name, not in a label (a `quantile` label belongs to summaries), in base units:

    tokenbus_bench_stage_concurrency{stage}                closed-loop clients (closed-loop stages only)
    tokenbus_bench_stage_rate_requests_per_second{stage}   open-loop arrival rate (open-loop stages only)
    tokenbus_bench_stage_duration_seconds{stage}
    tokenbus_bench_requests{stage}, tokenbus_bench_failures{stage}
    tokenbus_bench_tokens_per_second{stage}
    tokenbus_bench_{ttft,itl,e2e}_{p50,p95,p99}_seconds{stage}
    tokenbus_bench_ttft_hop_{p50,p95}_seconds{stage,hop}   when the proxy reported its per-hop timing
    tokenbus_bench_last_run_timestamp_seconds              when the run ended (Unix time)
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

from tools.bench.report import HOP_QUANTILES, QUANTILES

JOB = "tokenbus_bench"
PREFIX = "tokenbus_bench_"
# result key: (metric name without the prefix, help); the values are in base units already
_PLAIN = {
    "concurrency": ("stage_concurrency", "closed-loop clients of the stage"),
    "rate": ("stage_rate_requests_per_second", "open-loop arrival rate of the stage"),
    "duration_s": ("stage_duration_seconds", "the stage's length, its last requests' drain included"),
    "requests": ("requests", "requests started in the stage"),
    "failures": ("failures", "failed requests of those"),
    "tokens_per_s": ("tokens_per_second", "tokens of the stage's successful requests per second"),
}
_LATENCIES = {
    "ttft_ms": ("ttft", "time to the first token"),
    "itl_ms": ("itl", "mean time between a request's tokens"),
    "e2e_ms": ("e2e", "request start to its last token"),
}


def registry_of(result: dict[str, Any]) -> CollectorRegistry:
    """The gauges of `result` (tools.bench.report.result); None values (nothing measured) are left out."""
    registry = CollectorRegistry()

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ("stage",)) -> Gauge:
        return Gauge(PREFIX + name, f"tokenbus bench: {doc}", labels, registry=registry)

    plain = {key: gauge(name, doc) for key, (name, doc) in _PLAIN.items()}
    quantiles = {
        (key, q): gauge(f"{name}_{q}_seconds", f"{q} of the {doc}, over the stage's successful requests")
        for key, (name, doc) in _LATENCIES.items()
        for q, _ in QUANTILES
    }
    hops = {
        q: gauge(f"ttft_hop_{q}_seconds", f"{q} of the time the first token spent in each hop", ("stage", "hop"))
        for q, _ in HOP_QUANTILES
    }
    for stage in result["stages"]:
        label = str(stage["index"])
        for key, g in plain.items():
            if stage[key] is not None:
                g.labels(stage=label).set(stage[key])
        for (key, q), g in quantiles.items():
            if (ms := stage[key][q]) is not None:
                g.labels(stage=label).set(ms / 1000.0)
        for hop, values in stage["hops_ms"].items():
            for q, g in hops.items():
                if (ms := values[q]) is not None:
                    g.labels(stage=label, hop=hop).set(ms / 1000.0)
    Gauge(PREFIX + "last_run_timestamp_seconds", "tokenbus bench: when the run ended", registry=registry).set(
        time.time()
    )
    return registry


def push_result(result: dict[str, Any], gateway: str) -> None:
    """PUT the run's gauges to the gateway (replacing the model's previous run); OSError when it fails."""
    push_to_gateway(gateway, job=JOB, registry=registry_of(result), grouping_key={"model": result["config"]["model"]})
