"""node_agent/ in-process: the state directory's records (atomic, validated, locked), the health verdict's rule
(3 failed checks in a row, one pass to recover), and a command whose handling fails (logged with its traceback,
reported, and the next command still handled)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node_agent import agent as agent_module
from node_agent.agent import Agent
from node_agent.replica_process import HEALTH_FAILURES, ReplicaProcess, ReplicaSettings
from node_agent.state import ReplicaRecord, StateDir, StateDirError, default_state_dir, process_start_ticks
from schemas.messages import Message, ReplicaEvent, ReplicaState, StartReplica, StopReplica


def record(replica_id: str = "demo-1", **changes: Any) -> ReplicaRecord:
    me = process_start_ticks(os.getpid())
    assert me is not None
    fields: dict[str, Any] = {
        "replica_id": replica_id,
        "spec": StartReplica(replica_id, "demo", "sim", {"seed": 1}, 8).to_wire(),
        "replica_pid": os.getpid(),
        "replica_start": me,
        "worker_pid": os.getpid(),
        "worker_start": me,
        "address": "127.0.0.1:1234",
        "started_at": 1700000000.5,
    }
    return ReplicaRecord(**{**fields, **changes})


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateDir]:
    s = StateDir(tmp_path / "state")
    yield s
    s.close()


def test_records_round_trip_and_are_written_whole(state: StateDir) -> None:
    state.save(record("demo-1"))
    state.save(record("demo-2", address=""))
    state.save(record("demo-1", address="127.0.0.1:999"))  # rewritten in place
    assert sorted(os.listdir(state.path / "replicas")) == ["demo-1.json", "demo-2.json"]  # no temporary left
    loaded = {r.replica_id: r for r in state.load_all()}
    assert loaded["demo-1"] == record("demo-1", address="127.0.0.1:999") and loaded["demo-2"].address == ""
    state.remove("demo-2")
    state.remove("demo-2")  # twice is harmless
    assert [r.replica_id for r in state.load_all()] == ["demo-1"]


def test_a_record_from_before_the_metrics_addresses_loads_with_none(state: StateDir) -> None:
    written = record("demo-1", replica_metrics="127.0.0.1:9201", worker_metrics="127.0.0.1:9202")
    state.save(written)
    assert state.load_all() == [written]
    old = json.loads((state.path / "replicas" / "demo-1.json").read_text())
    del old["replica_metrics"], old["worker_metrics"]
    (state.path / "replicas" / "demo-1.json").write_text(json.dumps(old))
    (loaded,) = state.load_all()
    assert (loaded.replica_metrics, loaded.worker_metrics) == ("", "") and loaded.address == written.address


def test_unreadable_or_mismatched_records_are_logged_and_removed(
    state: StateDir, caplog: pytest.LogCaptureFixture
) -> None:
    replicas = state.path / "replicas"
    state.save(record("good"))
    (replicas / "torn.json").write_text('{"replica_id": "torn", "spec"')
    (replicas / "other.json").write_text((replicas / "good.json").read_text())  # names replica "good"
    wrong_type = json.loads((replicas / "good.json").read_text()) | {"replica_id": "typed", "replica_pid": "12"}
    (replicas / "typed.json").write_text(json.dumps(wrong_type))
    (replicas / "good.tmp").write_text("left by a crash mid-write")
    with caplog.at_level(logging.WARNING, "node_agent"):
        assert [r.replica_id for r in state.load_all()] == ["good"]
    assert sorted(os.listdir(replicas)) == ["good.json"]
    assert caplog.text.count("removing unreadable state file") == 4


def test_unsafe_replica_ids_never_name_a_file(state: StateDir) -> None:
    for bad in ("../escape", ".hidden", "a/b", "", "x" * 200):
        with pytest.raises(ValueError, match="not a safe file name"):
            state.save(record(bad))
    assert os.listdir(state.path / "replicas") == []


def test_one_agent_per_state_directory(tmp_path: Path) -> None:
    first = StateDir(tmp_path / "s")
    try:
        with pytest.raises(StateDirError, match="in use by another agent"):
            StateDir(tmp_path / "s")
    finally:
        first.close()
    StateDir(tmp_path / "s").close()  # free again once the first let go


def test_default_state_dir_is_per_node(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir("n1") == tmp_path / "tokenbus" / "agent-n1"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_state_dir("n1") == Path.home() / ".local" / "state" / "tokenbus" / "agent-n1"


def test_a_record_is_alive_only_while_both_of_its_processes_run() -> None:
    assert record().alive()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_start_ticks(child.pid) is None
    assert not record(worker_pid=child.pid).alive()
    assert not record(replica_start=record().replica_start + 1).alive()  # the same pid, another process


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send(self, msg: Message) -> None:
        self.sent.append(msg)


def replica_process(state: StateDir, updates: list[ReplicaProcess]) -> ReplicaProcess:
    settings = ReplicaSettings(
        bind="127.0.0.1",
        advertise="127.0.0.1",
        bin_dir=Path("/nonexistent"),
        state=state,
        orphan_timeout_s=None,
        node_has_gpus=False,
        stats_interval_s=0.25,
        on_change=lambda r: None,
        on_update=updates.append,
    )
    return ReplicaProcess(StartReplica("demo-1", "demo", "sim", {}, 8), settings)


def test_the_health_verdict_flips_after_3_failures_in_a_row_and_back_at_one_pass(state: StateDir) -> None:
    updates: list[ReplicaProcess] = []
    replica = replica_process(state, updates)
    failures = 0
    for outcome in ["stuck", "stuck", None, "stuck", "stuck"]:  # a pass in between starts the count over
        failures = replica._judge(outcome, failures)
    assert replica.healthy and updates == []
    failures = replica._judge("stuck", failures)
    assert failures == HEALTH_FAILURES and not replica.healthy and len(updates) == 1
    assert replica.status().healthy is False
    for _ in range(5):  # still failing: reported once, not at every check
        failures = replica._judge("stuck", failures)
    assert len(updates) == 1
    failures = replica._judge(None, failures)
    assert failures == 0 and replica.healthy and len(updates) == 2


async def test_a_command_that_fails_is_logged_reported_and_the_next_one_handled(
    state: StateDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> ReplicaProcess:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(agent_module, "ReplicaProcess", broken)
    agent = Agent("n1", "127.0.0.1", "127.0.0.1", Path("/nonexistent"), state, None)
    link = FakeLink()
    agent.attach(link)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, "node_agent"):
        agent.on_command(StartReplica("demo-1", "demo", "sim", {}, 8))
        agent.on_command(StopReplica("demo-9"))
    assert "StartReplica for replica demo-1 failed" in caplog.text and "RuntimeError: injected failure" in caplog.text
    events = [m.replica for m in link.sent if isinstance(m, ReplicaEvent)]
    assert [(e.replica_id, e.state) for e in events] == [
        ("demo-1", ReplicaState.EXITED),
        ("demo-9", ReplicaState.EXITED),
    ]
    assert "injected failure" in events[0].detail
    assert agent.statuses() == ()
