"""The agent: the replicas this node runs (one ReplicaProcess each), driven by the head's commands, and re-adopted
from its state directory when it restarts."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc

from bus.metrics_http import set_replica_states
from node_agent import metrics
from node_agent.head_link import HeadLink
from node_agent.replica_process import RPC_TIMEOUT_S, TERM_GRACE_S, ReplicaProcess, ReplicaSettings
from node_agent.state import PROCESS_NAMES, REPLICA_ID_RE, ReplicaRecord, StateDir
from schemas.messages import GpuInfo, ReplicaEvent, ReplicaState, ReplicaStatus, StartReplica, StopReplica

log = logging.getLogger("node_agent")

SHUTDOWN_GRACE_S = TERM_GRACE_S + 5.0  # the bound on stopping every replica at the agent's own exit
# How often each replica's Stats are read; a change of its running or waiting requests goes to the head at once,
# so the routing snapshot follows load within about this (plus the publish), not a heartbeat.
LOAD_POLL_S = 0.25
LAST_LINES = 5  # of each log of a replica that ended while no agent ran, logged when its entry is removed


class Agent:
    def __init__(
        self,
        node_id: str,
        bind: str,
        advertise: str,
        bin_dir: Path,
        state: StateDir,
        orphan_timeout_s: float | None,
        *,
        gpus: tuple[GpuInfo, ...] = (),
    ) -> None:
        self.node_id = node_id
        self._gpus = frozenset(g.index for g in gpus)
        self._state = state
        self._settings = ReplicaSettings(
            bind=bind,  # replicas listen here
            advertise=advertise,  # and are reached here (their address in the head's routing snapshot)
            bin_dir=bin_dir,
            state=state,
            orphan_timeout_s=orphan_timeout_s,
            node_has_gpus=bool(gpus),
            stats_interval_s=LOAD_POLL_S,
            on_change=self._changed,
            on_update=self._updated,
        )
        self._link: HeadLink | None = None
        self._replicas: dict[str, ReplicaProcess] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def attach(self, link: HeadLink) -> None:
        self._link = link

    def statuses(self) -> tuple[ReplicaStatus, ...]:
        """Every replica not yet exited, for Register and Heartbeat."""
        return tuple(r.status() for r in self._replicas.values() if r.state is not ReplicaState.EXITED)

    def on_command(self, msg: StartReplica | StopReplica) -> None:
        """Handles one command from the head; a failure is logged and reported, and the agent goes on."""
        try:
            if isinstance(msg, StartReplica):
                self._start(msg)
            else:
                self._stop(msg)
        except Exception as e:
            log.exception("%s for replica %s failed", type(msg).__name__, msg.replica_id)
            if msg.replica_id not in self._replicas:  # nothing runs for it: the head must not wait for it
                metrics.REPLICA_EXITS.labels("agent_error").inc()
                self._report_exited(msg.replica_id, f"the agent could not handle {type(msg).__name__}: {e!r}")

    async def adopt(self) -> None:
        """Re-adopts the replicas a previous agent left in the state directory that still answer Health; ends the others
        and removes their entries. Called once, before the first Register, so that it lists them."""
        records = self._state.load_all()
        if not records:
            return
        log.info("found %d replicas in the state directory %s", len(records), self._state.path)
        verdicts = await asyncio.gather(*(self._health(r) for r in records))
        ending = []
        for record, verdict in zip(records, verdicts, strict=True):
            rid = record.replica_id
            if verdict == "gone":  # its processes are gone: nothing to end (their pids may be reused)
                self._log_last_lines(rid)
                self._state.remove(rid)
                continue
            serving, max_model_len = (verdict.serving, verdict.max_model_len) if verdict != "end" else (False, 0)
            try:
                replica = ReplicaProcess.adopt(record, serving, max_model_len, self._settings)
            except Exception:  # a record it cannot use (a bad spec): its processes end by their orphan timeout
                log.exception("replica %s: cannot re-adopt it; removing its state entry", rid)
                self._state.remove(rid)
                continue
            if verdict == "end":
                ending.append(replica.discard())
            else:
                how = "serving" if serving else "still starting"
                log.info("replica %s of %s re-adopted, %s on %s", rid, replica.deployment, how, record.address)
                metrics.REPLICAS_ADOPTED.inc()
                self._run(replica)
        await asyncio.gather(*ending)

    async def _health(self, record: ReplicaRecord) -> Any:
        """Its gRPC HealthResponse when both its processes live and it answers; "end" when they live but it does not
        answer (it is to be ended); "gone" when they have exited."""
        rid = record.replica_id
        if not record.alive():
            log.info("replica %s: its processes are gone; removing its state entry", rid)
            return "gone"
        if not record.address:
            log.info("replica %s: it had not listened yet when its agent stopped; ending it", rid)
            return "end"
        from schemas.rpc import pb, pb_grpc

        try:
            async with grpc.aio.insecure_channel(record.address) as channel:
                return await pb_grpc.ReplicaStub(channel).Health(pb.HealthRequest(), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            log.info("replica %s: Health on %s failed (%s); ending it", rid, record.address, e.code().name)
            return "end"

    def _log_last_lines(self, replica_id: str) -> None:
        """What a replica that ended while no agent ran wrote last (its files go with its entry)."""
        for name in PROCESS_NAMES:
            for line in self._state.last_lines(replica_id, name, LAST_LINES):
                log.info("[%s %s] %s", replica_id, name, line)

    def _start(self, msg: StartReplica) -> None:
        rid = msg.replica_id
        if rid in self._replicas:
            log.info("StartReplica %s: already running here, ignored", rid)
            return
        if not REPLICA_ID_RE.fullmatch(rid):
            log.warning("StartReplica refused: replica id %r is not of the form %s", rid, REPLICA_ID_RE.pattern)
            metrics.REPLICA_EXITS.labels("refused").inc()
            self._report_exited(rid, f"refused: a replica id must match {REPLICA_ID_RE.pattern}")
            return
        refused = self._gpu_conflict(msg)
        if refused:
            log.warning("StartReplica %s refused: %s", rid, refused)
            metrics.REPLICA_EXITS.labels("refused").inc()
            self._report_exited(rid, f"refused: {refused}")
            return
        log.info(
            "starting replica %s of %s (engine %s %s%s)",
            rid,
            msg.deployment,
            msg.engine,
            msg.engine_args,
            f", GPUs {','.join(map(str, msg.gpus))}" if msg.gpus else "",
        )
        self._run(ReplicaProcess(msg, self._settings))

    def _gpu_conflict(self, msg: StartReplica) -> str:
        """Why the GPUs the head chose cannot be given (not on this node, or held by a replica that has not exited:
        a head's view can lag), or "". A replica's GPUs are free again once both its processes have exited."""
        unknown = sorted(set(msg.gpus) - self._gpus)
        if unknown:
            return f"GPUs {unknown} are not on this node (it has {sorted(self._gpus)})"
        held = {i: r.replica_id for r in self._replicas.values() if r.state is not ReplicaState.EXITED for i in r.gpus}
        taken = sorted(i for i in msg.gpus if i in held)
        if taken:
            return f"GPUs {taken} are held by replica(s) {', '.join(sorted({held[i] for i in taken}))}"
        return ""

    def _run(self, replica: ReplicaProcess) -> None:
        rid = replica.replica_id
        self._replicas[rid] = replica
        task = asyncio.create_task(replica.run(), name=f"replica-{rid}")
        self._tasks[rid] = task
        task.add_done_callback(lambda _: self._forget(rid))

    def _report_exited(self, replica_id: str, detail: str) -> None:
        if self._link is not None:
            gone = ReplicaStatus(replica_id, "", ReplicaState.EXITED, detail=detail)
            self._link.send(ReplicaEvent(self.node_id, gone))

    def _stop(self, msg: StopReplica) -> None:
        replica = self._replicas.get(msg.replica_id)
        if replica is None:
            # the head thinks it is here: tell it otherwise so it stops waiting for an exit
            log.info("StopReplica %s: not running here; reporting it exited", msg.replica_id)
            self._report_exited(msg.replica_id, "not running on this node")
            return
        log.info("stopping replica %s (%s)", msg.replica_id, "drain" if msg.drain else "no drain")
        replica.stop(msg.drain, reason="stopped by the head")

    def _changed(self, replica: ReplicaProcess) -> None:
        code = ""
        if replica.state is ReplicaState.EXITED:  # a re-adopted replica's exit code is its new parent's to know
            code = f" (exit code {'unknown' if replica.exit_code is None else replica.exit_code})"
        log.info("replica %s is %s%s", replica.replica_id, replica.state.value, code)
        set_replica_states(metrics.REPLICAS, (r.state for r in self._replicas.values()))
        if self._link is not None:
            self._link.send(ReplicaEvent(self.node_id, replica.status()))

    def _updated(self, replica: ReplicaProcess) -> None:
        """Its load, its health verdict or its metrics addresses changed (the verdict is logged by the replica)."""
        if self._link is not None:  # not logged: under load this is several times a second
            self._link.send(ReplicaEvent(self.node_id, replica.status()))

    def _forget(self, rid: str) -> None:
        self._replicas.pop(rid, None)
        self._tasks.pop(rid, None)

    async def stop_all(self) -> None:
        """Stops every replica without draining, bounded by SHUTDOWN_GRACE_S."""
        if not self._tasks:
            return
        log.info("stopping %d replicas", len(self._tasks))
        for replica in self._replicas.values():
            replica.stop(drain=False, reason="the agent is stopping")
        _, pending = await asyncio.wait(list(self._tasks.values()), timeout=SHUTDOWN_GRACE_S)
        for task in pending:
            log.error("replica %s did not stop in %.0f s", task.get_name(), SHUTDOWN_GRACE_S)
