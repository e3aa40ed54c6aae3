"""The agent's state directory: one file per replica it runs, so that a restarted agent (after a crash or a SIGKILL)
finds the replicas that outlived it and re-adopts them instead of losing their streams and their loaded models.

Layout: `<state dir>/lock` (held with flock by the one agent using the directory), `<state dir>/replicas/<id>.json`
(a `ReplicaRecord`) and `<state dir>/logs/<id>.<replica|worker>.log` (the processes' output: a file, not a pipe to
the agent, so that it outlives the agent too). Records are written whole to a temporary name, fsynced and renamed
over the old one, so a reader sees the old record or the new one, never a torn one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("node_agent")

# A replica id names a file here: anything else (a path separator, a leading dot) is refused before it is used.
REPLICA_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


PROCESS_NAMES = ("replica", "worker")  # a replica's two processes, as records and logs name them


class StateDirError(Exception):
    """The state directory cannot be used (not writable, or held by another agent)."""


def default_state_dir(node_id: str) -> Path:
    """`$XDG_STATE_HOME/tokenbus/agent-<node id>`, with XDG's default `~/.local/state`."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tokenbus" / f"agent-{node_id}"


def process_start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks after boot, /proc/PID/stat field 22), None when there is no such process.

    Stored with each pid, so that a pid reused by an unrelated process after a reboot or a long absence is never
    taken for a replica (and never signalled)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": field 3 is fields[0]
    if len(fields) < 20 or fields[0] == "Z":  # a zombie has exited already
        return None
    return int(fields[19])


@dataclass(frozen=True)
class ReplicaRecord:
    """What a restarted agent needs to find, check, watch and stop a replica it did not start itself."""

    replica_id: str
    spec: dict[str, Any]  # the StartReplica it was started with, as on the wire
    replica_pid: int
    replica_start: int  # process_start_ticks(replica_pid) at spawn
    worker_pid: int
    worker_start: int
    address: str  # host:port of its gRPC server, "" until it printed LISTENING
    started_at: float  # unix time of the spawn
    # host:port of its binary's and its worker's /metrics, "" until they printed METRICS (or in a record written by an
    # agent from before them: defaults, so such a record still loads)
    replica_metrics: str = ""
    worker_metrics: str = ""

    def alive(self) -> bool:
        """Both processes still run, and are the ones this record was written for."""
        return (
            process_start_ticks(self.replica_pid) == self.replica_start
            and process_start_ticks(self.worker_pid) == self.worker_start
        )

    @classmethod
    def from_json(cls, text: str) -> ReplicaRecord:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        record = cls(**d)  # a missing or unknown field raises TypeError
        for name, kind in _FIELD_TYPES.items():
            if isinstance(getattr(record, name), bool) or not isinstance(getattr(record, name), kind):
                raise ValueError(f"field {name} has the wrong type")
        return record


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "replica_id": str,
    "spec": dict,
    "replica_pid": int,
    "replica_start": int,
    "worker_pid": int,
    "worker_start": int,
    "address": str,
    "started_at": (int, float),
    "replica_metrics": str,
    "worker_metrics": str,
}


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._replicas = path / "replicas"
        self._logs = path / "logs"
        try:
            self._replicas.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._logs.mkdir(exist_ok=True, mode=0o700)
            self._lock_fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StateDirError(f"cannot use state dir {path}: {e}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise StateDirError(f"state dir {path} is in use by another agent (give each agent its own)") from None

    def close(self) -> None:
        os.close(self._lock_fd)  # releases the lock

    def save(self, record: ReplicaRecord) -> None:
        """Writes the record atomically (temporary file, fsync, rename); OSError when it cannot."""
        final = self._file(record.replica_id)
        tmp = final.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(record), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(self._replicas, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash of the machine
        finally:
            os.close(dir_fd)

    def remove(self, replica_id: str) -> None:
        """Removes the replica's record and its log files."""
        for path in (self._file(replica_id), *(self.log_path(replica_id, name) for name in PROCESS_NAMES)):
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                log.warning("cannot remove %s of replica %s: %s", path, replica_id, e)

    def log_path(self, replica_id: str, process: str) -> Path:
        """The file a replica's process ("replica" or "worker") writes its output to."""
        self._file(replica_id)  # the id's check
        return self._logs / f"{replica_id}.{process}.log"

    def last_lines(self, replica_id: str, process: str, n: int) -> list[str]:
        """The last `n` lines of that log (read from its last 64 KiB); none when it cannot be read."""
        try:
            with open(self.log_path(replica_id, process), "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
                return f.read().decode(errors="replace").splitlines()[-n:]
        except OSError:
            return []

    def load_all(self) -> list[ReplicaRecord]:
        """Every readable record; an unreadable one (or a leftover temporary file) is logged and removed."""
        records = []
        for path in sorted(self._replicas.iterdir()):
            try:
                if path.suffix != ".json":
                    raise ValueError("not a record file")
                record = ReplicaRecord.from_json(path.read_text())
                if path.stem != record.replica_id:
                    raise ValueError(f"it names replica {record.replica_id!r}")
                records.append(record)
            except (OSError, ValueError, TypeError) as e:
                log.warning("removing unreadable state file %s: %s", path, e)
                path.unlink(missing_ok=True)
        return records

    def _file(self, replica_id: str) -> Path:
        if not REPLICA_ID_RE.fullmatch(replica_id):
            raise ValueError(f"replica id {replica_id!r} is not a safe file name")
        return self._replicas / f"{replica_id}.json"
