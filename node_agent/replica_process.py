"""One replica: the `tokenbus-replica` binary (gRPC face) and its `model_worker` process, joined by two
shared-memory rings, started, watched and stopped together.

Lifecycle (one task, `run`): spawn both → STARTING → the binary's "LISTENING host:port" → gRPC Health until
serving → READY → Stats every interval (the load for heartbeats) and a health check every HEALTH_CHECK_S → on a
stop: DRAINING until no call is in flight (bounded), then SIGTERM, SIGKILL after a grace → EXITED. Either process
exiting on its own ends the other and the replica (EXITED with that exit code). Every state change is reported
through `on_change`, a change of load or of the health verdict through `on_update`.

Both processes run in sessions of their own and outlive the agent: the replica's pids, address and spec are kept in
the state directory (node_agent/state.py) from the spawn until they have exited, and a restarted agent re-adopts a
replica that still serves (`ReplicaProcess.adopt`), watching its processes by pidfd since they are not its children.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc

from bus.endpoints import host_port
from node_agent import metrics
from node_agent.state import PROCESS_NAMES, ReplicaRecord, StateDir, process_start_ticks
from schemas.messages import ReplicaLoad, ReplicaState, ReplicaStatus, StartReplica

log = logging.getLogger("node_agent")

REPLICA_BINARY = "tokenbus-replica"
LISTEN_DEADLINE_S = 30.0  # the binary prints LISTENING within this, or the replica fails
DEFAULT_READY_TIMEOUT_S = 120.0  # Health must turn serving within this (vLLM loads slowly)
READY_TIMEOUT_ARG = "ready_timeout_s"  # engine arg read by the agent (and not passed to the worker) to change it
DRAIN_TIMEOUT_S = 30.0
TERM_GRACE_S = 10.0  # after SIGTERM, this long before SIGKILL
RPC_TIMEOUT_S = 2.0
PIPE_CLOSE_S = 2.0
LOG_POLL_S = 0.2  # how often the processes' log files are read for new lines to forward
HEALTH_POLL_S = 0.2
# Active health of a READY replica: a check (gRPC Health serving, then Stats with a worker report younger than
# STATS_AGE_LIMIT_MS; the worker reports at least every second even when idle) every HEALTH_CHECK_S, each RPC
# bounded by HEALTH_RPC_TIMEOUT_S. HEALTH_FAILURES failed checks in a row make it unhealthy; one passing check
# makes it healthy again. A stuck or SIGSTOPped worker is so found within about 3 + 3 = 6 s.
HEALTH_CHECK_S = 1.0
HEALTH_RPC_TIMEOUT_S = 1.0
HEALTH_FAILURES = 3
STATS_AGE_LIMIT_MS = 3000
PID_POLL_S = 0.5  # how often an adopted process is looked at where pidfd_open is not available
MAX_LINE = 64 * 1024  # a longer output line is dropped (with a note) rather than buffered
LISTENING_RE = re.compile(r"LISTENING (\S+:\d+)")
METRICS_RE = re.compile(r"METRICS (\S+:\d+)")  # where a process of the replica serves /metrics (both print it)

T = TypeVar("T")


class ReplicaFailed(Exception):
    """The replica could not start or serve; the message says why."""


class _Interrupted(Exception):
    """A wait ended because a process exited or a stop was requested."""


class _Process(Protocol):
    """One of a replica's two processes, spawned by this agent or adopted by it."""

    pid: int

    @property
    def returncode(self) -> int | None:
        """None while it runs; its exit code after (-N for signal N), None too for an adopted one that exited."""

    @property
    def running(self) -> bool: ...

    async def wait(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...


class _Child:
    """A process this agent spawned (and so can reap: its exit code is known)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    async def wait(self) -> int | None:
        return await self.proc.wait()

    def send_signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)


class AdoptedProcess:
    """A replica's process from before an agent restart: not this agent's child, so it is watched through a pidfd
    (readable once it exits; signals sent through it cannot reach a reused pid), or polled where there is none.
    Its exit code cannot be known (its new parent reaps it)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._exited = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._pidfd: int | None = None
        self._poll: asyncio.Task[None] | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._exited.set()
            return
        except (AttributeError, OSError):  # Python without it, or a kernel before 5.3
            self._poll = asyncio.create_task(self._poll_exit(), name=f"watch-pid-{pid}")
            return
        self._loop.add_reader(self._pidfd, self._on_exit)

    @property
    def returncode(self) -> int | None:
        return None

    @property
    def running(self) -> bool:
        return not self._exited.is_set()

    async def wait(self) -> int | None:
        await self._exited.wait()
        return None

    def send_signal(self, sig: int) -> None:
        if not self.running:
            return
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def _on_exit(self) -> None:
        assert self._pidfd is not None
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        self._exited.set()

    async def _poll_exit(self) -> None:
        while process_start_ticks(self.pid) is not None:
            await asyncio.sleep(PID_POLL_S)  # the poll period where no pidfd tells us
        self._exited.set()


def reached_at(advertise: str, listening: str) -> str:
    """The address proxies and the agent use: the port the binary listens on ("HOST:PORT") at the advertised host."""
    return host_port(advertise, listening.rsplit(":", 1)[1])


@dataclass(frozen=True)
class ReplicaSettings:
    """What every replica of one agent shares: where it listens and is reached, its binaries and state directory, and
    whom it tells of its changes."""

    bind: str  # the host its gRPC server binds
    advertise: str  # the host proxies reach it at
    bin_dir: Path
    state: StateDir
    orphan_timeout_s: float | None
    node_has_gpus: bool  # then CUDA_VISIBLE_DEVICES names exactly its GPUs (none for a replica given none)
    stats_interval_s: float
    on_change: Callable[[ReplicaProcess], None]  # its state changed
    on_update: Callable[[ReplicaProcess], None]  # its load or health verdict changed


class ReplicaProcess:
    def __init__(self, spec: StartReplica, settings: ReplicaSettings) -> None:
        self.replica_id = spec.replica_id
        self.deployment = spec.deployment
        self._spec = spec
        self._bind = settings.bind
        self._advertise = settings.advertise
        self._bin_dir = settings.bin_dir
        self._state = settings.state
        self._orphan_timeout_s = settings.orphan_timeout_s
        self._node_has_gpus = settings.node_has_gpus
        self.gpus = tuple(spec.gpus)
        self._stats_interval = settings.stats_interval_s
        self._on_change = settings.on_change
        self._on_update = settings.on_update
        self.state = ReplicaState.STARTING
        self.address = ""
        self.load = ReplicaLoad()
        self.healthy = True
        self.max_model_len = 0
        self.started_at = 0.0
        self.exit_code: int | None = None
        self.detail = ""
        self.exit_cause = ""  # why it ended, once EXITED: a label of tokenbus_agent_replica_exits_total
        # "host:port" of the binary's and the worker's /metrics (their METRICS lines), "" until known
        self.replica_metrics = ""
        self.worker_metrics = ""
        self._procs: dict[str, _Process] = {}  # "replica", "worker"
        self._pipes: list[asyncio.Task[None]] = []  # the binary's stdout, and the followers of both log files
        self._exited = asyncio.Event()  # both processes are gone: the followers read what is left and end
        self._listening: asyncio.Future[str] | None = None
        self._first_exit: asyncio.Task[tuple[str, int | None]] | None = None
        self._stop = asyncio.Event()
        self._drain = True

    @classmethod
    def adopt(
        cls, record: ReplicaRecord, serving: bool, max_model_len: int, settings: ReplicaSettings
    ) -> ReplicaProcess:
        """A replica a previous agent started, found answering Health: READY at once when it serves, else STARTING
        (an engine still loading) with a new ready timeout; its processes are watched by pid."""
        replica = cls(StartReplica.from_wire(record.spec), settings)
        replica.address = record.address
        replica.started_at = record.started_at
        replica.replica_metrics = record.replica_metrics
        replica.worker_metrics = record.worker_metrics
        replica.max_model_len = max_model_len
        replica.state = ReplicaState.READY if serving else ReplicaState.STARTING
        for name, pid in (("replica", record.replica_pid), ("worker", record.worker_pid)):
            replica._procs[name] = AdoptedProcess(pid)
            log.info("replica %s: %s re-adopted, pid %d", replica.replica_id, name, pid)
        return replica

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(
            self.replica_id,
            self.deployment,
            self.state,
            self.address,
            self.load,
            self.exit_code,
            self.detail,
            healthy=self.healthy,
            max_model_len=self.max_model_len,
            started_at=self.started_at,
            gpus=self.gpus,
            replica_metrics=self.replica_metrics,
            worker_metrics=self.worker_metrics,
        )

    def stop(self, drain: bool, reason: str = "") -> None:
        """Asks the replica to stop; a later stop without drain cuts a drain short. `reason` goes in its EXITED."""
        self.detail = self.detail or reason
        if not self._stop.is_set():
            self._drain = drain
            self._stop.set()
        elif not drain:
            self._drain = False

    # --- lifecycle ---------------------------------------------------------------------------------------------

    async def run(self) -> None:
        rid = self.replica_id
        channel: grpc.aio.Channel | None = None
        try:
            if self._procs:  # adopted: READY, or STARTING and waited for below
                self._first_exit = asyncio.create_task(self._wait_first_exit())
                self._follow_logs(from_end=True)
                self._report(self.state)
            else:
                await self._spawn()
                self._report(ReplicaState.STARTING)
                assert self._listening is not None
                listening = await self._until(self._listening, LISTEN_DEADLINE_S, "LISTENING from the binary")
                self.address = reached_at(self._advertise, listening)
                self._save_record()
                log.info("replica %s listening on %s", rid, self.address)
            channel = grpc.aio.insecure_channel(self.address)
            from schemas.rpc import pb_grpc  # generated code: imported where used (codegen runs at build)

            stub = pb_grpc.ReplicaStub(channel)
            if self.state is ReplicaState.STARTING:
                await self._until(self._wait_serving(stub), self._ready_timeout(), "gRPC Health serving")
                self._report(ReplicaState.READY)
            await self._until(self._watch(stub), None, "")
        except _Interrupted:
            self.exit_cause = "asked"
        except ReplicaFailed as e:
            self.exit_cause = "crashed" if self.state is ReplicaState.READY else "failed_start"
            self.detail = str(e)
            log.error("replica %s failed: %s", rid, e)
        except Exception as e:  # whatever went wrong, the processes are still ended below
            self.exit_cause = "agent_error"
            self.detail = f"agent error: {e!r}"
            log.exception("replica %s: unexpected error", rid)
        try:
            if self._stop.is_set() and self._drain and self.state is ReplicaState.READY and channel is not None:
                await self._drain_calls(channel)
        finally:
            await self._terminate()
            if channel is not None:
                await channel.close()
            self._state.remove(rid)  # both processes are gone: nothing left to re-adopt
            metrics.REPLICA_EXITS.labels(self.exit_cause or "agent_error").inc()
            self._report(ReplicaState.EXITED)

    async def discard(self) -> None:
        """Ends an adopted replica that does not answer, and forgets it (no state change is reported)."""
        await self._terminate()
        self._state.remove(self.replica_id)
        metrics.REPLICA_EXITS.labels("unresponsive").inc()

    def _save_record(self) -> None:
        """Writes (or rewrites, with the address) the replica's entry in the state directory."""
        spawned = {name: p for name, p in self._procs.items() if isinstance(p, _Child)}
        ticks = {name: process_start_ticks(p.pid) for name, p in spawned.items()}
        if None in ticks.values() or len(ticks) != 2:
            return  # a process already exited: the replica is ending, there is nothing to re-adopt
        record = ReplicaRecord(
            replica_id=self.replica_id,
            spec=self._spec.to_wire(),
            replica_pid=spawned["replica"].pid,
            replica_start=ticks["replica"] or 0,
            worker_pid=spawned["worker"].pid,
            worker_start=ticks["worker"] or 0,
            address=self.address,
            started_at=self.started_at,
            replica_metrics=self.replica_metrics,
            worker_metrics=self.worker_metrics,
        )
        try:
            self._state.save(record)
        except OSError as e:  # it still serves; it only cannot be re-adopted after an agent crash
            log.error("replica %s: cannot write its state file: %s", self.replica_id, e)

    async def _spawn(self) -> None:
        binary = self._bin_dir / REPLICA_BINARY
        if not os.access(binary, os.X_OK):
            raise ReplicaFailed(f"{binary} not found (build with `make build`, or set TOKENBUS_BIN_DIR)")
        try:
            from model_worker.ring import create_ring_fds
        except ImportError as e:
            raise ReplicaFailed(f"the ring binding is not available (build with `make build`): {e}") from None
        engine_args = {k: v for k, v in self._spec.engine_args.items() if k != READY_TIMEOUT_ARG}
        try:
            engine_args_json = json.dumps(engine_args)
        except (TypeError, ValueError) as e:
            raise ReplicaFailed(f"engine args cannot be passed to the worker as JSON: {e}") from None
        fds: list[int] = []
        logs: dict[str, Any] = {}
        try:
            for name in PROCESS_NAMES:
                logs[name] = open(self._state.log_path(self.replica_id, name), "ab")  # closed below, once passed on
            req, resp = create_ring_fds(), create_ring_fds()
            fds = [*req, *resp]
            rings = ["--req-ring", ",".join(map(str, req)), "--resp-ring", ",".join(map(str, resp))]
            rid = self.replica_id
            replica_cmd = [str(binary), "--listen", host_port(self._bind, 0), "--replica-id", rid, *rings]
            replica_cmd += ["--metrics-bind", host_port(self._bind, 0)]
            if self._orphan_timeout_s is not None:
                replica_cmd += ["--orphan-timeout", str(self._orphan_timeout_s)]
            worker_cmd = [sys.executable, "-m", "model_worker", "--replica-id", rid, "--engine", self._spec.engine]
            worker_cmd += ["--engine-args", engine_args_json, "--metrics-host", self._bind, *rings]
            self.started_at = time.time()
            for name, cmd in (("replica", replica_cmd), ("worker", worker_cmd)):
                # its own session: a signal to the agent's process group (a Ctrl-C on its terminal) does not reach
                # it, it outlives an agent crash, and the whole group (vLLM's engine processes too) is signalled
                # on stop. Its output goes to a file that outlives the agent; the binary's stdout alone is a pipe,
                # for its one LISTENING line.
                proc = await asyncio.create_subprocess_exec(
                    *cmd,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE if name == "replica" else logs[name],
                    stderr=logs[name],
                    pass_fds=fds,
                    env=self._env(),
                    start_new_session=True,
                    limit=MAX_LINE,
                )
                self._procs[name] = _Child(proc)
                log.info("replica %s: %s started, pid %d", rid, name, proc.pid)
            metrics.REPLICA_STARTS.inc()
        except OSError as e:
            raise ReplicaFailed(f"cannot start the replica's processes: {e}") from None
        finally:
            for fd in fds:  # the children hold their own copies
                os.close(fd)
            for f in logs.values():
                f.close()
        self._save_record()  # from now on a restarted agent finds them, even before they serve
        self._listening = asyncio.get_running_loop().create_future()
        self._follow_logs(from_end=False)
        binary_out = self._procs["replica"]
        assert isinstance(binary_out, _Child) and binary_out.proc.stdout is not None
        self._pipes.append(asyncio.create_task(self._forward("replica", binary_out.proc.stdout)))
        self._first_exit = asyncio.create_task(self._wait_first_exit())

    def _env(self) -> dict[str, str]:
        """Its processes' environment: on a node with GPUs, exactly the GPUs the head gave it (none for a replica
        given none), numbered as NVML numbers them, which is how the agent registered them."""
        if not self._node_has_gpus:
            return dict(os.environ)
        visible = ",".join(map(str, self.gpus))
        return {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": visible}

    def _follow_logs(self, *, from_end: bool) -> None:
        """Forwards what both processes write to their log files; an adopted replica's from the current end (what it
        wrote while no agent ran stays in the file)."""
        for name in PROCESS_NAMES:
            path = self._state.log_path(self.replica_id, name)
            try:
                offset = path.stat().st_size if from_end else 0
            except OSError as e:
                log.warning("replica %s: its %s log %s cannot be read: %s", self.replica_id, name, path, e)
                continue
            self._pipes.append(asyncio.create_task(self._follow(name, path, offset), name=f"log-{self.replica_id}"))

    async def _follow(self, name: str, path: Path, offset: int) -> None:
        """Forwards the lines appended to `path` to the agent's log until the processes are gone and all is read."""
        pending = b""
        try:
            f = open(path, "rb")  # closed by the with below
        except OSError as e:
            log.warning("replica %s: its %s log %s cannot be read: %s", self.replica_id, name, path, e)
            return
        with f:
            f.seek(offset)
            while True:
                last = self._exited.is_set()  # before the read: a read after both exited gets everything
                chunk = f.read(MAX_LINE)
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                if len(pending) >= MAX_LINE:  # no newline in a whole buffer: forwarded in pieces
                    lines.append(pending)
                    pending = b""
                for line in lines:
                    text = line.decode(errors="replace").rstrip()
                    if name == "worker" and not self.worker_metrics:
                        m = METRICS_RE.fullmatch(text.strip())
                        if m:
                            self._metrics_found(name, m.group(1))
                    log.info("[%s %s] %s", self.replica_id, name, text)
                if last and not chunk:
                    if pending:
                        log.info("[%s %s] %s", self.replica_id, name, pending.decode(errors="replace").rstrip())
                    return
                if not chunk:
                    await asyncio.sleep(LOG_POLL_S)  # the poll period of a file that has no readiness to wait on

    async def _forward(self, name: str, stream: asyncio.StreamReader) -> None:
        """Forwards the binary's stdout lines to the agent's log, and finds its LISTENING line."""
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # longer than MAX_LINE: the buffer was dropped
                log.info("[%s %s] (a line over %d bytes, dropped)", self.replica_id, name, MAX_LINE)
                continue
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            if self._listening is not None and not self._listening.done():
                m = LISTENING_RE.fullmatch(line.strip())
                if m:
                    self._listening.set_result(m.group(1))
                    continue
            if not self.replica_metrics:
                m = METRICS_RE.fullmatch(line.strip())
                if m:
                    self._metrics_found(name, m.group(1))
                    continue
            log.info("[%s %s] %s", self.replica_id, name, line)

    def _metrics_found(self, name: str, printed: str) -> None:
        """A process of the replica printed where it serves /metrics: kept (in the state file too, for a re-adopting
        agent, which reads its logs from their end) and reported at once."""
        address = reached_at(self._advertise, printed)
        if name == "replica":
            self.replica_metrics = address
        else:
            self.worker_metrics = address
        log.info("replica %s: its %s serves metrics on %s", self.replica_id, name, address)
        self._save_record()
        self._on_update(self)

    async def _wait_first_exit(self) -> tuple[str, int | None]:
        waits = {asyncio.create_task(p.wait()): name for name, p in self._procs.items()}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        task = next(iter(done))
        return waits[task], task.result()

    async def _until(self, aw: Awaitable[T], timeout: float | None, what: str) -> T:
        """Awaits `aw`, unless a process exits or a stop is requested first (_Interrupted) or the timeout passes."""
        assert self._first_exit is not None
        work = asyncio.ensure_future(aw)
        stop = asyncio.create_task(self._stop.wait())
        try:
            waits = {work, stop, self._first_exit}
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if work in done:
            return work.result()
        work.cancel()
        if self._first_exit in done:
            name, code = self._first_exit.result()
            raise ReplicaFailed(f"its {name} process exited" + (f" with code {code}" if code is not None else ""))
        if stop in done:
            raise _Interrupted
        raise ReplicaFailed(f"no {what} within {timeout} s")

    def _ready_timeout(self) -> float:
        value = self._spec.engine_args.get(READY_TIMEOUT_ARG, DEFAULT_READY_TIMEOUT_S)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ReplicaFailed(f"engine arg {READY_TIMEOUT_ARG} must be a positive number, got {value!r}")
        return float(value)

    async def _wait_serving(self, stub: Any) -> None:
        from schemas.rpc import pb

        while True:
            try:
                reply = await stub.Health(pb.HealthRequest(), timeout=RPC_TIMEOUT_S)
                if reply.serving:
                    self.max_model_len = reply.max_model_len
                    return
            except grpc.aio.AioRpcError as e:
                log.debug("replica %s health: %s", self.replica_id, e.code())
            await asyncio.sleep(HEALTH_POLL_S)  # the poll period, not synchronisation

    async def _watch(self, stub: Any) -> None:
        """A READY replica's two loops, until cancelled: its load and its health."""
        loops = [
            asyncio.create_task(self._poll_stats(stub), name=f"stats-{self.replica_id}"),
            asyncio.create_task(self._check_health(stub), name=f"health-{self.replica_id}"),
        ]
        try:
            await asyncio.gather(*loops)
        finally:  # cancelled (or one failed): neither outlives the other
            for task in loops:
                task.cancel()

    async def _check_health(self, stub: Any) -> None:
        """A check every HEALTH_CHECK_S; the verdict flips to unhealthy after HEALTH_FAILURES failures in a row and
        back at the first pass, and each flip is reported at once (`on_update`)."""
        failures = 0
        while True:
            try:
                failures = self._judge(await self._health_problem(stub), failures)
            except Exception:  # the agent's own error: no verdict from it, and the checks go on
                log.exception("replica %s: health check error", self.replica_id)
            await asyncio.sleep(HEALTH_CHECK_S)  # the check period

    def _judge(self, problem: str | None, failures: int) -> int:
        """Applies one check's outcome to the verdict; the failures in a row now."""
        failures = failures + 1 if problem else 0
        if problem and failures < HEALTH_FAILURES:
            log.info("replica %s failed a health check (%d in a row): %s", self.replica_id, failures, problem)
        elif problem and failures == HEALTH_FAILURES:
            log.warning(
                "replica %s is unhealthy: %d failed checks in a row, the last: %s",
                self.replica_id,
                failures,
                problem,
            )
            self.healthy = False
            self._on_update(self)
        elif not problem and not self.healthy:
            log.info("replica %s is healthy again", self.replica_id)
            self.healthy = True
            self._on_update(self)
        return failures

    async def _health_problem(self, stub: Any) -> str | None:
        """Why the replica fails a check now, or None when it passes."""
        from schemas.rpc import pb

        try:
            health = await stub.Health(pb.HealthRequest(), timeout=HEALTH_RPC_TIMEOUT_S)
            if not health.serving:
                return "Health says not serving"
            stats = await stub.Stats(pb.StatsRequest(), timeout=HEALTH_RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            return f"RPC failed: {e.code().name}"
        if stats.stats_age_ms > STATS_AGE_LIMIT_MS:
            return f"no load report from its worker for {stats.stats_age_ms} ms (limit {STATS_AGE_LIMIT_MS})"
        return None

    async def _poll_stats(self, stub: Any) -> None:
        """Refreshes `load` every stats interval until cancelled; a change of running or waiting is reported at once
        (`on_update`), so routing sees a burst or its end within an interval rather than at the next heartbeat."""
        from schemas.rpc import pb

        while True:
            try:
                s = await stub.Stats(pb.StatsRequest(), timeout=RPC_TIMEOUT_S)
                before, self.load = self.load, ReplicaLoad(s.running, s.waiting, float(s.kv_usage))
                if (before.running, before.waiting) != (s.running, s.waiting):
                    self._on_update(self)
            except grpc.aio.AioRpcError as e:
                log.warning("replica %s stats failed: %s", self.replica_id, e.code())
            except Exception:  # the agent's own error: logged, and the polling goes on
                log.exception("replica %s: stats poll error", self.replica_id)
            await asyncio.sleep(self._stats_interval)

    async def _drain_calls(self, channel: grpc.aio.Channel) -> None:
        from schemas.rpc import pb, pb_grpc

        self._report(ReplicaState.DRAINING)
        stub = pb_grpc.ReplicaStub(channel)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self._drain and time.monotonic() < deadline:
            assert self._first_exit is not None
            if self._first_exit.done():
                return
            try:
                s = await stub.Stats(pb.StatsRequest(), timeout=RPC_TIMEOUT_S)
                if s.in_flight == 0:
                    log.info("replica %s drained", self.replica_id)
                    return
            except grpc.aio.AioRpcError as e:
                log.warning("replica %s stats while draining failed: %s", self.replica_id, e.code())
            await asyncio.sleep(HEALTH_POLL_S)
        log.warning("replica %s: drain ended with calls still open", self.replica_id)

    async def _terminate(self) -> None:
        """SIGTERM to both processes, SIGKILL to their groups after the grace; records the exit code.

        SIGTERM goes to the two processes alone, not their groups: an engine's own children (vLLM's engine core and
        workers) must be shut down by the engine, which also frees their shared memory; signalled directly they die
        and leave their /dev/shm segments behind. The groups' SIGKILL then ends whatever is left.
        """
        first: tuple[str, int | None] | None = None
        if self._first_exit is not None and self._first_exit.done() and not self._first_exit.cancelled():
            first = self._first_exit.result()
        for proc in self._procs.values():
            if proc.running:
                proc.send_signal(signal.SIGTERM)
        waits = [p.wait() for p in self._procs.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), TERM_GRACE_S)
        except asyncio.TimeoutError:
            log.warning("replica %s: still running %.0f s after SIGTERM, killing", self.replica_id, TERM_GRACE_S)
            self._signal(signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in self._procs.values()))
        self._signal(signal.SIGKILL)  # whatever is left in the groups (an engine's own children)
        if self._first_exit is not None:
            self._first_exit.cancel()
        self._exited.set()
        # the stdout pipe closes with the last process holding it; one that left the group must not hang the stop
        _, pending = await asyncio.wait(self._pipes, timeout=PIPE_CLOSE_S) if self._pipes else (set(), set())
        for t in pending:
            t.cancel()
        if first is not None:
            self.exit_code = first[1]
        elif "replica" in self._procs:
            self.exit_code = self._procs["replica"].returncode
        codes = ", ".join(
            f"{n} {'(adopted: code unknown)' if isinstance(p, AdoptedProcess) else p.returncode}"
            for n, p in self._procs.items()
        )
        if codes:
            log.info("replica %s: processes exited (%s)", self.replica_id, codes)

    def _signal(self, sig: signal.Signals) -> None:
        for proc in self._procs.values():
            try:
                os.killpg(proc.pid, sig)  # the group this agent created for the child (start_new_session)
            except (ProcessLookupError, PermissionError):
                pass

    def _report(self, state: ReplicaState) -> None:
        self.state = state
        self._on_change(self)
