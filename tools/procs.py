"""Child processes started by `tokenbus up`: started with their output in log files, stopped by PID.

Each child leads its own process group (so a Ctrl-C in the terminal reaches only `tokenbus up`, which then
stops the children in reverse order) and gets SIGTERM from the kernel if `tokenbus up` itself dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 10.0


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child, between fork and exec, only calls it


def _die_with_parent() -> None:
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, self.log_path.stat().st_size - 8192))
                return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(log unreadable: {e})"


@dataclass(frozen=True)
class StopReport:
    name: str
    pid: int
    how: str  # "already exited", "SIGTERM", "SIGKILL"
    exit_code: int | None


class Children:
    """The processes this run started, in start order; the only owner of their Popen handles."""

    def __init__(self) -> None:
        self._children: list[Child] = []

    def __iter__(self) -> Iterator[Child]:
        return iter(self._children)

    def start(self, name: str, cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> Child:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:  # the child holds its own copy of the descriptor
            proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        child = Child(name, proc, log_path)
        self._children.append(child)
        return child

    def first_exited(self) -> Child | None:
        return next((c for c in self._children if c.proc.poll() is not None), None)

    def stop_all(self, timeout_s: float = STOP_TIMEOUT_S) -> list[StopReport]:
        """Stop every child, newest first: SIGTERM, wait up to `timeout_s`, then SIGKILL its process group."""
        reports = []
        while self._children:
            child = self._children.pop()
            reports.append(_stop(child, timeout_s))
        return reports


def _stop(child: Child, timeout_s: float) -> StopReport:
    proc = child.proc
    if proc.poll() is not None:
        how = "already exited"
    else:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
            how = "SIGTERM"
        except subprocess.TimeoutExpired:
            how = "SIGKILL"
            _kill_group(proc.pid)
            proc.wait()
    # anything it started and left in its group (it led the group; see Children.start) goes too
    _kill_group(proc.pid)
    return StopReport(child.name, proc.pid, how, proc.returncode)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
