"""The agent: the replicas this node runs (one ReplicaProcess each), driven by the head's commands."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from node_agent.head_link import HeadLink
from node_agent.replica_process import TERM_GRACE_S, ReplicaProcess
from schemas.messages import ReplicaEvent, ReplicaState, ReplicaStatus, StartReplica, StopReplica

log = logging.getLogger("node_agent")

SHUTDOWN_GRACE_S = TERM_GRACE_S + 5.0  # the bound on stopping every replica at the agent's own exit
# How often each replica's Stats are read; a change of its running or waiting requests goes to the head at once,
# so the routing snapshot follows load within about this (plus the publish), not a heartbeat.
LOAD_POLL_S = 0.25


class Agent:
    def __init__(self, node_id: str, host: str, bin_dir: Path) -> None:
        self.node_id = node_id
        self._host = host
        self._bin_dir = bin_dir
        self._link: HeadLink | None = None
        self._replicas: dict[str, ReplicaProcess] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def attach(self, link: HeadLink) -> None:
        self._link = link

    def statuses(self) -> tuple[ReplicaStatus, ...]:
        """Every replica not yet exited, for Register and Heartbeat."""
        return tuple(r.status() for r in self._replicas.values() if r.state is not ReplicaState.EXITED)

    def on_command(self, msg: StartReplica | StopReplica) -> None:
        if isinstance(msg, StartReplica):
            self._start(msg)
        else:
            self._stop(msg)

    def _start(self, msg: StartReplica) -> None:
        rid = msg.replica_id
        if rid in self._replicas:
            log.info("StartReplica %s: already running here, ignored", rid)
            return
        assert self._link is not None
        log.info("starting replica %s of %s (engine %s %s)", rid, msg.deployment, msg.engine, msg.engine_args)
        replica = ReplicaProcess(
            msg,
            host=self._host,
            bin_dir=self._bin_dir,
            stats_interval_s=LOAD_POLL_S,
            on_change=self._changed,
            on_load=self._load_changed,
        )
        self._replicas[rid] = replica
        task = asyncio.create_task(replica.run(), name=f"replica-{rid}")
        self._tasks[rid] = task
        task.add_done_callback(lambda _: self._forget(rid))

    def _stop(self, msg: StopReplica) -> None:
        replica = self._replicas.get(msg.replica_id)
        if replica is None:
            # the head thinks it is here: tell it otherwise so it stops waiting for an exit
            log.info("StopReplica %s: not running here; reporting it exited", msg.replica_id)
            if self._link is not None:
                gone = ReplicaStatus(msg.replica_id, "", ReplicaState.EXITED, detail="not running on this node")
                self._link.send(ReplicaEvent(self.node_id, gone))
            return
        log.info("stopping replica %s (%s)", msg.replica_id, "drain" if msg.drain else "no drain")
        replica.stop(msg.drain, reason="stopped by the head")

    def _changed(self, replica: ReplicaProcess) -> None:
        exited = replica.state is ReplicaState.EXITED
        code = f" (exit code {replica.exit_code})" if exited else ""
        log.info("replica %s is %s%s", replica.replica_id, replica.state.value, code)
        if self._link is not None:
            self._link.send(ReplicaEvent(self.node_id, replica.status()))

    def _load_changed(self, replica: ReplicaProcess) -> None:
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
