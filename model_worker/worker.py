"""The model worker: consumes the request ring, drives an engine, produces the response ring.

One event loop, no thread: the receive task turns SUBMIT/CANCEL records into engine calls, and the engine
reports through this worker (it is the engine's OutputSink), which packs TOKENS/FINISH records straight onto
the response ring. Load goes out as STATS when it changes, coalesced to at most one record per 100 ms, and at least
once every STATS_MAX_GAP_S even when nothing changes: the replica reports the age of the last one, so a worker that
is alive but stuck (or SIGSTOPped) shows a growing age that its agent's health check catches.

Tokens travel batched (schemas/README.md section 3): every token the engine reports in one event-loop iteration, for
all requests, goes out as one TOKENS record of groups `id, text, n_tokens, produced_ns`, written at the iteration's end
(a callback scheduled by its first token) with one wake-up of the replica. A request's FINISH first flushes the batch
when it holds that request's groups, so its tokens always precede it; a batch that would outgrow the ring's largest
record is sent and a new one started. The first group of each request carries the wall-clock time (ns since the
epoch) at which the engine's output with its first token reached the worker (0 in later groups): the proxy's per-hop
first-token timing reads it as the "engine produced" stamp.

The worker serves its metrics (model_worker/metrics.py) on `--metrics-host`, a free port, and prints
`METRICS host:port` on stdout, which is its log file: its agent reads the line there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import time
from typing import Any

from bus.endpoints import DEFAULT_BIND, host_port
from bus.metrics_http import serve_metrics
from model_worker import metrics, records
from model_worker.engine import DuplicateRequestError, Engine, EngineInfo, EngineStats, FinishReason, Request
from model_worker.ring import PeerGone, RingReceiver, RingSender, parse_ring_fds
from model_worker.sim_engine import SimEngine
from schemas import ring

log = logging.getLogger("model_worker")

# Bounds of a TOKENS record's packed size, so the batch is split before it outgrows the ring's largest record without
# packing it twice: the array header, and per group the text's at most 4 UTF-8 bytes a character plus its header (5)
# and three uint64s (9 each).
TOKENS_RECORD_OVERHEAD = 6
TOKENS_GROUP_OVERHEAD = 32

STATS_INTERVAL_S = 0.1
STATS_MAX_GAP_S = 1.0  # schemas/README.md section 3: the longest time between two STATS records
DRAIN_TIMEOUT_S = 2.0
ENGINES = ("sim", "vllm")


class Worker:
    """The engine's OutputSink over the response ring, and the dispatcher of request-ring records."""

    def __init__(self, replica_id: str, sender: RingSender, loop: asyncio.AbstractEventLoop) -> None:
        self._replica_id = replica_id
        self._sender = sender
        self._loop = loop
        self.engine: Engine | None = None  # set once built: the engine needs this sink to be built
        self._stats_timer: asyncio.TimerHandle | None = None
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._stats_sent: EngineStats | None = None
        self._stats_sent_at = float("-inf")
        self.replica_gone = asyncio.Event()  # set when the response ring's consumer is found gone
        # requests with no TOKENS record yet -> loop time their SUBMIT was read: the first one is stamped (C1)
        self._awaiting_first: dict[int, float] = {}
        self.engine_dead = asyncio.Event()  # set when the engine reports it can serve nothing more
        # this iteration's TOKENS record: the kind, then the groups; the ids it names; its size bound; its tokens
        self._batch: list[Any] = [ring.TOKENS]
        self._batch_ids: set[int] = set()
        self._batch_bytes = TOKENS_RECORD_OVERHEAD
        self._batch_tokens = 0
        self._max_record = sender.max_payload
        self._flush_handle: asyncio.Handle | None = None

    def _send(self, record: list[Any], *, wake_now: bool = False) -> None:
        # called from engine callbacks: a failure here must not escape into the engine's bookkeeping
        try:
            self._sender.send(record, wake_now=wake_now)
        except PeerGone:
            self.replica_gone.set()
        except ValueError as e:  # larger than the ring's largest record: drop it, loudly
            log.error("worker %s dropping a record of kind %s for the replica: %s", self._replica_id, record[0], e)

    def ready(self, info: EngineInfo) -> None:
        """READY, then a first STATS, so the replica knows the load from the start."""
        self._send(ring.ready_record(ring.Ready(info["engine"], info["model"], info["max_model_len"])))
        self.load_changed()
        self._keepalive()

    def close(self) -> None:
        """Cancels the STATS timers and the batch's flush (the worker is stopping)."""
        for timer in (self._stats_timer, self._keepalive_timer, self._flush_handle):
            if timer is not None:
                timer.cancel()
        self._stats_timer = self._keepalive_timer = self._flush_handle = None

    # --- OutputSink -------------------------------------------------------------------------------------
    def engine_failed(self, message: str) -> None:
        log.error("worker %s engine failed: %s", self._replica_id, message)
        self.engine_dead.set()

    def tokens(self, request_id: int, text: str, n_tokens: int) -> None:
        submitted = self._awaiting_first.pop(request_id, None)
        produced_ns = 0
        if submitted is not None:
            produced_ns = time.time_ns()
            metrics.TIME_TO_FIRST_TOKEN.observe(self._loop.time() - submitted)
        size = 4 * len(text) + TOKENS_GROUP_OVERHEAD
        if self._batch_ids and self._batch_bytes + size > self._max_record:
            self._flush_tokens()
        self._batch += (request_id, text, n_tokens, produced_ns)
        self._batch_ids.add(request_id)
        self._batch_bytes += size
        self._batch_tokens += n_tokens
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush_tokens)

    def _flush_tokens(self) -> None:
        """Sends the batch of TOKENS groups, if any, and wakes the replica."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._batch_ids:
            return
        record = self._batch
        metrics.GENERATED_TOKENS.inc(self._batch_tokens)
        self._batch, self._batch_ids = [ring.TOKENS], set()
        self._batch_bytes, self._batch_tokens = TOKENS_RECORD_OVERHEAD, 0
        self._send(record, wake_now=True)

    def finish(
        self,
        request_id: int,
        reason: FinishReason,
        prompt_tokens: int,
        completion_tokens: int,
        error_code: int = 0,
        error_message: str = "",
    ) -> None:
        self._awaiting_first.pop(request_id, None)
        if request_id in self._batch_ids:  # its tokens go first
            self._flush_tokens()
        self._send(
            ring.finish_record(
                ring.Finish(request_id, reason, prompt_tokens, completion_tokens, error_code, error_message)
            )
        )
        metrics.FINISHED[reason].inc()

    def load_changed(self) -> None:
        if self._stats_timer is None:
            when = max(self._loop.time(), self._stats_sent_at + STATS_INTERVAL_S)
            self._stats_timer = self._loop.call_at(when, self._send_stats)

    def engine_step(self, seconds: float) -> None:
        metrics.ENGINE_STEP.observe(seconds)

    def _send_stats(self, *, unchanged_too: bool = False) -> None:
        self._stats_timer = None
        assert self.engine is not None
        stats = self.engine.stats()
        if unchanged_too or stats != self._stats_sent:
            self._send(ring.stats_record(ring.Stats(stats.running, stats.waiting, stats.kv_usage)))
            self._stats_sent, self._stats_sent_at = stats, self._loop.time()
            metrics.RUNNING.set(stats.running)
            metrics.WAITING.set(stats.waiting)
            metrics.KV_USAGE.set(stats.kv_usage)

    def _keepalive(self) -> None:
        """Sends STATS when none went out for STATS_MAX_GAP_S, and runs again when the next one is due."""
        now = self._loop.time()
        if now >= self._stats_sent_at + STATS_MAX_GAP_S:
            self._send_stats(unchanged_too=True)
        self._keepalive_timer = self._loop.call_at(self._stats_sent_at + STATS_MAX_GAP_S, self._keepalive)

    # --- request ring -----------------------------------------------------------------------------------
    async def receive(self, receiver: RingReceiver) -> None:
        """Dispatch request-ring records until the replica is gone (PeerGone propagates)."""
        while True:
            for record in await receiver.next_batch():
                self.handle(record)

    def handle(self, record: Any) -> None:
        assert self.engine is not None
        kind = record[0] if isinstance(record, list) and record else None
        try:
            if kind == records.SUBMIT:
                self._submit(records.decode_submit(record))
            else:  # a CANCEL, or a RecordError naming what it is not
                self.engine.abort(records.decode_cancel(record))
        except records.RecordError as e:
            log.warning("worker %s bad record from replica (kind %r): %s", self._replica_id, kind, e)
            if kind == records.SUBMIT and e.request_id is not None:
                self.finish(e.request_id, "error", 0, 0, 400, str(e))
        except DuplicateRequestError as e:
            log.warning("worker %s ignoring SUBMIT from replica: %s", self._replica_id, e)

    def _submit(self, request: Request) -> None:
        assert self.engine is not None
        earlier = self._awaiting_first.get(request.id)
        self._awaiting_first[request.id] = self._loop.time()  # before: the engine may finish it at once (a 400)
        try:
            self.engine.submit(request)
        except DuplicateRequestError:  # the request already open under that id keeps what it had
            if earlier is None:
                self._awaiting_first.pop(request.id, None)
            else:
                self._awaiting_first[request.id] = earlier
            raise


def build_engine(name: str, args: dict[str, Any], sink: Worker, loop: asyncio.AbstractEventLoop) -> Engine:
    """The engine by name; ValueError for a bad configuration or an engine that is not installed."""
    if name == "sim":
        return SimEngine(args, sink, loop)
    if name == "vllm":
        try:  # imported on use: the sim needs no vLLM, and importing it takes seconds
            from model_worker.vllm_engine import VllmEngine
        except ImportError as e:
            raise ValueError(f"engine vllm needs vLLM installed (`make deps` installs it): {e}") from e
        return VllmEngine(args, sink)
    raise ValueError(f"unknown engine {name!r} (known: {', '.join(ENGINES)})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model_worker", description="tokenbus model worker")
    p.add_argument("--replica-id", required=True)
    p.add_argument("--engine", required=True, choices=ENGINES)
    p.add_argument("--engine-args", default="{}", help="JSON object of engine arguments")
    p.add_argument("--req-ring", required=True, type=parse_ring_fds, help="MEM,DATA,SPACE of the request ring")
    p.add_argument("--resp-ring", required=True, type=parse_ring_fds, help="MEM,DATA,SPACE of the response ring")
    p.add_argument(
        "--metrics-host",
        default=DEFAULT_BIND,
        metavar="HOST",
        help="serve Prometheus /metrics on a free port of this address, printed as `METRICS host:port` on stdout "
        "(default %(default)s)",
    )
    opts = p.parse_args(argv)
    try:
        opts.engine_args = json.loads(opts.engine_args)
    except json.JSONDecodeError as e:
        p.error(f"--engine-args is not JSON: {e}")
    if not isinstance(opts.engine_args, dict):
        p.error("--engine-args must be a JSON object")
    return opts


async def serve(opts: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT or until the replica is gone; the exit code."""
    rid = opts.replica_id
    try:
        port = serve_metrics(opts.metrics_host, 0)
    except OSError as e:
        log.error("worker %s cannot serve metrics on %s: %s", rid, opts.metrics_host, e)
        return 2
    print(f"METRICS {host_port(opts.metrics_host, port)}", flush=True)  # for its agent, which follows this output
    try:
        receiver = RingReceiver(opts.req_ring)
    except Exception as e:
        log.error("worker %s cannot attach to its request ring %s: %s", rid, opts.req_ring, e)
        return 2
    try:
        sender = RingSender(opts.resp_ring)
    except Exception as e:
        receiver.close()
        log.error("worker %s cannot attach to its response ring %s: %s", rid, opts.resp_ring, e)
        return 2
    log.info(
        "worker %s attached to its rings (request %s, response %s)",
        rid,
        ",".join(map(str, opts.req_ring)),
        ",".join(map(str, opts.resp_ring)),
    )
    try:
        return await _run(opts, receiver, sender)
    except Exception:
        log.exception("worker %s failed", rid)
        return 1
    finally:
        sender.close()
        receiver.close()


async def _run(opts: argparse.Namespace, receiver: RingReceiver, sender: RingSender) -> int:
    loop = asyncio.get_running_loop()
    rid = opts.replica_id
    worker = Worker(rid, sender, loop)
    try:
        worker.engine = build_engine(opts.engine, opts.engine_args, worker, loop)
    except ValueError as e:
        log.error("worker %s bad engine configuration: %s", rid, e)
        return 2
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    stop_wait = asyncio.create_task(stopping.wait(), name="stop-signal")
    gone_wait = asyncio.create_task(worker.replica_gone.wait(), name="replica-gone")
    dead_wait = asyncio.create_task(worker.engine_dead.wait(), name="engine-dead")
    try:
        log.info("worker %s starting engine %s", rid, opts.engine)
        start = asyncio.create_task(worker.engine.start(), name="engine-start")
        await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            start.cancel()
            log.info("worker %s stopped (signal) while its engine was starting", rid)
            return 0
        info = start.result()
        worker.ready(info)
        log.info(
            "worker %s ready: engine %s model %s max_model_len %d",
            rid,
            info["engine"],
            info["model"],
            info["max_model_len"],
        )
        receive = asyncio.create_task(worker.receive(receiver), name="receive")
        await asyncio.wait({receive, stop_wait, gone_wait, dead_wait}, return_when=asyncio.FIRST_COMPLETED)
        if receive.done() and not isinstance(receive.exception(), PeerGone):
            receive.result()  # an unexpected failure: raise it, logged by serve()
        peer_gone = receive.done() or worker.replica_gone.is_set()
        receive.cancel()
        await worker.engine.shutdown()  # every open request gets its FINISH "abort"
        if not peer_gone:
            try:
                await asyncio.wait_for(sender.drain(), DRAIN_TIMEOUT_S)
            except (TimeoutError, PeerGone):
                log.warning("worker %s replica did not take the last %d records", rid, sender.queued)
        if worker.engine_dead.is_set():
            log.info("worker %s stopped (engine failed)", rid)
            return 1
        log.info("worker %s stopped (%s)", rid, "replica gone" if peer_gone else "signal")
        return 0
    finally:
        worker.close()
        stop_wait.cancel()
        dead_wait.cancel()
        gone_wait.cancel()
