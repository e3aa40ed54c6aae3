"""What a bench run measured, whichever client ran it: one record per request, the stages' start times, the
running totals sampled while it ran, and the live counters the progress display reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# The proxy's first-token stamps of a stream (its `: tokenbus-timing {...}` SSE comment), in order, and the hops
# between consecutive ones: the hops add up to proxy_sent - proxy_received, the proxy's TTFT.
STAMPS = (
    "proxy_received",
    "routed",
    "replica_received",
    "ring_written",
    "engine_produced",
    "ring_read",
    "proxy_sent",
)
HOPS = ("queue_and_route", "proxy_to_replica", "replica_to_ring", "engine", "ring_to_replica", "replica_to_client")


def hops_from_stamps(stamps_ns: Mapping[str, int]) -> dict[str, float | None]:
    """Each hop's seconds from the stamps (`<stamp>_ns` keys); None when a stamp it spans was not taken (absent
    or 0). Across nodes a hop can be negative (clock skew): it is kept as measured, as the loadgen does."""
    values = [stamps_ns.get(f"{name}_ns") or None for name in STAMPS]
    return {
        hop: None if a is None or b is None else (b - a) / 1e9
        for hop, a, b in zip(HOPS, values[:-1], values[1:], strict=True)
    }


def proxy_ttft_s(stamps_ns: Mapping[str, int]) -> float | None:
    """The TTFT the proxy saw: proxy_received to proxy_sent (what the hops add up to)."""
    received, sent = stamps_ns.get("proxy_received_ns"), stamps_ns.get("proxy_sent_ns")
    return (sent - received) / 1e9 if received and sent else None


@dataclass(frozen=True, slots=True)
class RequestResult:
    ok: bool
    e2e_s: float
    ttft_s: float | None = None  # to the first content token
    tokens: int = 0
    error: str = ""
    start_s: float = 0.0  # since the run's start
    stage: int = 0  # the stage it started in
    chunks: int = 0  # content chunks received (the proxy may coalesce tokens into one under backpressure)
    itl_sum_s: float = 0.0  # first to last chunk: the sum of the chunks - 1 gaps between them
    itl_max_s: float = 0.0  # the longest gap
    hops_s: dict[str, float | None] | None = None  # when the proxy answered X-Tokenbus-Timing
    proxy_ttft_s: float | None = None  # proxy_received to proxy_sent

    @property
    def itl_mean_s(self) -> float | None:
        """The mean gap between the stream's chunks (None with fewer than 2)."""
        return self.itl_sum_s / (self.chunks - 1) if self.chunks > 1 else None

    @property
    def end_s(self) -> float:
        return self.start_s + self.e2e_s


@dataclass(frozen=True, slots=True)
class Sample:
    """The running totals at `elapsed_s` (since the run's start); tokens are content chunks received so far."""

    elapsed_s: float
    stage: int
    requests: int
    failures: int
    tokens: int
    in_flight: int


@dataclass
class Live:
    """What the progress display shows, updated by the client as the run goes (one event loop: no locks)."""

    started_at: float | None = None  # time.perf_counter() at the run's start
    stage: int = 0
    stage_started_at: float | None = None
    requests: int = 0
    failures: int = 0
    tokens: int = 0
    in_flight: int = 0

    def sample(self, elapsed_s: float) -> Sample:
        return Sample(elapsed_s, self.stage, self.requests, self.failures, self.tokens, self.in_flight)


@dataclass
class Run:
    """A finished run. `duration_s`: the run's start to its last request's end (or the hard deadline)."""

    results: list[RequestResult] = field(default_factory=list)
    stage_starts_s: list[float] = field(default_factory=list)  # since the run's start, one per stage begun
    samples: list[Sample] = field(default_factory=list)
    duration_s: float = 0.0
    lags_s: list[float] = field(default_factory=list)  # the client's event-loop lag samples
    client_cpu_s: float = 0.0  # CPU of the client's processes other than this one (the loadgen)
    client_processes: int = 1
    log: str = ""  # the client's log (the loadgen's stderr)
