"""The model worker's Prometheus metrics (served by bus/metrics_http.py on `--metrics-host`, a free port).

The per-token path pays one counter increment per TOKENS record; the load gauges are set when a STATS record goes
out (at most every 100 ms, at least every second), and the rest once per request or per engine step.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from model_worker.engine import FINISH_REASONS

RUNNING = Gauge("tokenbus_worker_running_requests", "Requests the engine is generating for (its last STATS)")
WAITING = Gauge("tokenbus_worker_waiting_requests", "Requests the engine holds queued (its last STATS)")
KV_USAGE = Gauge("tokenbus_worker_kv_usage_ratio", "The engine's KV-cache use, 0 to 1 (its last STATS)")
GENERATED_TOKENS = Counter("tokenbus_worker_generated_tokens", "Tokens the engine generated (sent in TOKENS records)")
_FINISHED = Counter(
    "tokenbus_worker_requests_finished", "Requests ended, by finish reason (stop, length, abort, error)", ["reason"]
)
FINISHED = {reason: _FINISHED.labels(reason) for reason in FINISH_REASONS}  # bound once: no lookup per request
TIME_TO_FIRST_TOKEN = Histogram(
    "tokenbus_worker_time_to_first_token_seconds",
    "From a request's SUBMIT read off the ring to its first token out of the engine (queueing and prefill)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
ENGINE_STEP = Histogram(
    "tokenbus_worker_engine_step_seconds",
    "Time of one engine step: vLLM's, between two steps that gave a running request a token; the sim's, its token "
    "period plus its timer's lateness (one token in 64 is measured)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5),
)
