"""Child processes started by `tokenbus up` and the local test cluster: started with their output in log files,
restarted when they die, stopped by PID.

Each child leads its own process group (so a Ctrl-C in the terminal reaches only `tokenbus up`, which then
stops the children in reverse order) and gets SIGTERM from the kernel if its parent itself dies.

Processes a child starts in sessions of their own (an agent's replicas, which outlive an agent crash) are not
in its group: `Children` notes every descendant it sees (`note_descendants`), and after stopping its children
kills, by PID, any of them still alive, so a stop leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 10.0
STOP_MARGIN_S = 5.0  # a child with a bounded shutdown of its own gets this long on top of it before SIGKILL
GROUP_KILL_WAIT_S = 2.0
# Restarts: the first after RESTART_BASE_S, doubling with each death in a row up to RESTART_CAP_S; a child that
# ran RESTART_STABLE_S is healthy again and its next death restarts at once after the base delay.
RESTART_BASE_S = 0.5
RESTART_CAP_S = 30.0
RESTART_STABLE_S = 30.0


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child, between fork and exec, only calls it


def _die_with_parent() -> None:
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    cmd: list[str]
    env: dict[str, str] | None
    stop_timeout_s: float = STOP_TIMEOUT_S  # how long a stop waits after SIGTERM before SIGKILL
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0

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


def restart_delay(deaths_in_a_row: int) -> float:
    """The backoff before restarting a child that died `deaths_in_a_row` times (>= 1) without running stably."""
    return min(RESTART_CAP_S, RESTART_BASE_S * 2 ** (deaths_in_a_row - 1))


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (with the pid, an identity PID reuse cannot fake)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in parentheses may hold spaces


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process on the machine."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:  # it exited while we looked
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def alive(pid: int, start_time: int | None = None) -> bool:
    """Whether `pid` exists (and, given its start time, is still that process); a zombie counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and (start_time is None or _start_time(pid) == start_time)


class Children:
    """The processes this run started, in start order; the only owner of their Popen handles."""

    def __init__(self) -> None:
        self._children: list[Child] = []
        self._descendants: dict[int, tuple[int | None, str]] = {}  # pid -> (start time, the child it came from)

    def __iter__(self) -> Iterator[Child]:
        return iter(self._children)

    def get(self, name: str) -> Child:
        return next(c for c in self._children if c.name == name)

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> Child:
        child = Child(name, _spawn(cmd, log_path, env), log_path, list(cmd), env, stop_timeout_s)
        self._children.append(child)
        return child

    def restart(self, child: Child, cmd: Sequence[str] | None = None) -> Child:
        """Starts `child`'s command (or `cmd`) again in its place (the stop order stays the start order); the
        old process must have exited."""
        assert child.proc.poll() is not None, f"{child.name} (pid {child.pid}) is still running"
        self.note_descendants()
        _kill_group(child.pid)  # what it left in its group dies with it, as in a stop
        new_cmd = list(cmd) if cmd is not None else child.cmd
        proc = _spawn(new_cmd, child.log_path, child.env)
        new = Child(child.name, proc, child.log_path, new_cmd, child.env, child.stop_timeout_s)
        new.restarts = child.restarts + 1
        self._children[self._children.index(child)] = new
        return new

    def first_exited(self) -> Child | None:
        return next((c for c in self._children if c.proc.poll() is not None), None)

    def note_descendants(self) -> None:
        """Remembers every process now descended from a child, so a stop can find it even after its parent died."""
        parents = _parents()
        by_parent: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            by_parent.setdefault(ppid, []).append(pid)
        for child in self._children:
            todo = list(by_parent.get(child.pid, []))
            while todo:
                pid = todo.pop()
                todo.extend(by_parent.get(pid, []))
                if pid not in self._descendants:
                    self._descendants[pid] = (_start_time(pid), child.name)

    def stop_all(self, timeout_s: float | None = None) -> list[StopReport]:
        """Stop every child, newest first: SIGTERM, wait up to its stop timeout (or `timeout_s`), then SIGKILL its
        process group; then SIGKILL (by PID, with its group) any process a child started that is still alive."""
        self.note_descendants()
        reports = []
        while self._children:
            child = self._children.pop()
            reports.append(_stop(child, child.stop_timeout_s if timeout_s is None else timeout_s))
        for pid, (start_time, parent) in sorted(self._descendants.items()):
            if alive(pid, start_time):
                _kill_leftover(pid, start_time)
                reports.append(StopReport(f"{parent}'s child", pid, "left behind: SIGKILL", None))
        self._descendants.clear()
        return reports


class Supervisor:
    """Restarts children that exited, after a capped exponential backoff, reporting each restart in one line."""

    def __init__(
        self,
        children: Children,
        report: Callable[[str], None],
        restart_cmd: Callable[[Child], Sequence[str] | None] = lambda child: None,
    ) -> None:
        self._children = children
        self._report = report
        self._restart_cmd = restart_cmd  # the command a child restarts with (None: the one it had)
        self._due: dict[str, float] = {}  # child name -> when it restarts
        self._deaths: dict[str, int] = {}  # child name -> deaths in a row without a stable run

    def check(self, now: float | None = None) -> None:
        """Called periodically: schedules a restart for each child found dead and performs those that are due."""
        now = time.monotonic() if now is None else now
        self._children.note_descendants()
        for child in list(self._children):
            if child.proc.poll() is None:
                continue
            if child.name not in self._due:
                stable = now - child.started_at >= RESTART_STABLE_S
                deaths = 1 if stable else self._deaths.get(child.name, 0) + 1
                self._deaths[child.name] = deaths
                self._due[child.name] = now + restart_delay(deaths)
            if now >= self._due[child.name]:
                del self._due[child.name]
                try:
                    new = self._children.restart(child, self._restart_cmd(child))
                except OSError as e:  # cannot spawn now (no memory, no descriptors): the next check tries again
                    self._deaths[child.name] += 1
                    self._due[child.name] = now + restart_delay(self._deaths[child.name])
                    self._report(
                        f"cannot restart {child.name}: {e}; next try in {restart_delay(self._deaths[child.name]):.1f} s"
                    )
                    continue
                self._report(
                    f"restarted {child.name}: pid {child.pid} exited with code {child.proc.returncode} after "
                    f"{now - child.started_at:.1f} s; new pid {new.pid} (restart {new.restarts}, "
                    f"after {restart_delay(self._deaths[child.name]):.1f} s)"
                )


def _spawn(cmd: Sequence[str], log_path: Path, env: dict[str, str] | None) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:  # the child holds its own copy of the descriptor
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


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
    deadline = time.monotonic() + GROUP_KILL_WAIT_S
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def _kill_leftover(pid: int, start_time: int | None) -> None:
    """SIGKILL to a process a child left behind, and to its group when it leads one (an engine's own children);
    waits until it is gone or a zombie (an orphan is reaped by its new parent, not by us)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + GROUP_KILL_WAIT_S
    while alive(pid, start_time) and time.monotonic() < deadline:
        time.sleep(0.02)
