"""`tokenbus top`'s numbers: per-deployment rates and percentiles over the last seconds of proxy metrics.

Each proxy's /metrics is kept as a short history of samples. A rate is the growth of a counter between the oldest
sample inside the window and the newest, over the time between them; a percentile is taken from the growth of a
histogram's buckets, as PromQL's `histogram_quantile(rate(...))` does. Rates are summed across proxies, bucket counts
are added across proxies before the percentile is taken. A counter that went down means the proxy restarted: its
history starts again from that sample.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

WINDOW_S = 10.0

Labels = frozenset[tuple[str, str]]
Series = dict[tuple[str, Labels], float]  # (sample name, labels) -> value: one scrape, flattened

REQUESTS = "tokenbus_proxy_requests_total"
TOKENS = "tokenbus_proxy_tokens_total"
TTFT_BUCKET = "tokenbus_proxy_ttft_seconds_bucket"
ITL_BUCKET = "tokenbus_proxy_inter_token_seconds_bucket"
REPLICA_TOKENS = "tokenbus_proxy_replica_tokens_total"
# samples that only grow while a process lives: one that shrank says the process restarted
MONOTONIC_SUFFIXES = ("_total", "_bucket", "_count")


def parse(text: str) -> Series:
    """A Prometheus text exposition, flattened; raises ValueError on text that is not one."""
    series: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return series


def gauge(series: Series, name: str) -> float | None:
    """The value of an unlabelled sample, None when the scrape has none."""
    return series.get((name, frozenset()))


class History:
    """One proxy's recent scrapes, oldest first, spanning a little more than the window."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, Series]] = deque()

    def add(self, at: float, series: Series) -> None:
        if self._samples and _restarted(self._samples[-1][1], series):
            self._samples.clear()
        self._samples.append((at, series))
        # keep the newest sample at or before the window's start: the window's rates are measured from it
        while len(self._samples) > 2 and self._samples[1][0] <= at - self._window_s:
            self._samples.popleft()

    @property
    def latest(self) -> Series | None:
        return self._samples[-1][1] if self._samples else None

    def delta(self) -> tuple[float, Series] | None:
        """(seconds, growth of every sample) between the window's first scrape and the last; None before two."""
        if len(self._samples) < 2:
            return None
        (t0, first), (t1, last) = self._samples[0], self._samples[-1]
        # a series born inside the window (a new deployment, a new status code) started at 0
        return t1 - t0, {key: value - first.get(key, 0.0) for key, value in last.items()}


def _restarted(before: Series, after: Series) -> bool:
    return any(key[0].endswith(MONOTONIC_SUFFIXES) and after.get(key, value) < value for key, value in before.items())


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile of a histogram given as upper bound -> cumulative count (with +Inf); None when empty.

    Linear inside the bucket holding the rank, as PromQL's histogram_quantile; in the +Inf bucket, the highest finite
    bound."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


@dataclass(frozen=True)
class DeploymentRates:
    """One deployment over the window, summed across proxies; None where no proxy measured it."""

    requests_s: float | None = None
    tokens_s: float | None = None
    errors_s: float | None = None  # answers with a status >= 500
    rejected_s: float | None = None  # 429s: queue full or queue timeout
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    itl_p95_s: float | None = None


@dataclass(frozen=True)
class Rates:
    deployments: dict[str, DeploymentRates]
    replica_tokens_s: dict[str, float]  # replica address -> tokens/s streamed from it


def rates(deltas: list[tuple[float, Series]]) -> Rates:
    """The window's numbers from each proxy's (seconds, growth); proxies with no time measured are left out."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    buckets: dict[str, dict[str, dict[float, float]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    replica_tokens: dict[str, float] = defaultdict(float)
    for seconds, growth in deltas:
        if seconds <= 0:
            continue
        for (name, label_set), value in growth.items():
            labels = dict(label_set)
            if name == REPLICA_TOKENS and "address" in labels:
                replica_tokens[labels["address"]] += value / seconds
            deployment = labels.get("deployment")
            if not deployment:  # "" is every request not for a known deployment
                continue
            if name == REQUESTS:
                status = int(labels.get("status", "0") or 0)
                sums[deployment]["requests"] += value / seconds
                sums[deployment]["errors"] += value / seconds if status >= 500 else 0.0
                sums[deployment]["rejected"] += value / seconds if status == 429 else 0.0
            elif name == TOKENS:
                sums[deployment]["tokens"] += value / seconds
            elif name in (TTFT_BUCKET, ITL_BUCKET) and "le" in labels:
                buckets[deployment][name][float(labels["le"])] += value
    result = {}
    for deployment in sums.keys() | buckets.keys():
        s, b = sums.get(deployment, {}), buckets.get(deployment, {})
        result[deployment] = DeploymentRates(
            requests_s=s.get("requests"),
            tokens_s=s.get("tokens"),
            errors_s=s.get("errors"),
            rejected_s=s.get("rejected"),
            ttft_p50_s=histogram_quantile(0.5, b.get(TTFT_BUCKET, {})),
            ttft_p95_s=histogram_quantile(0.95, b.get(TTFT_BUCKET, {})),
            itl_p95_s=histogram_quantile(0.95, b.get(ITL_BUCKET, {})),
        )
    return Rates(result, dict(replica_tokens))
