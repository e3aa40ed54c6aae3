"""CPU accounting for `tokenbus bench --cpu-pids`: the cores tokenbus processes used during a run.

Read from /proc/PID/stat (utime + stime, in clock ticks) at the start and the end of the run, so the figure
covers exactly the measured window and costs nothing while the load runs. `auto` finds this user's
tokenbus processes by their command line, narrowed to one cluster when the proxy behind the bench's URL
was started by `tokenbus up` (others may run their own clusters on a shared machine). A process that exits
during the run is left out (its CPU after the first sample is unknown) and named in the report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# Process kinds, in report order.
KINDS = ("proxy", "replica", "worker", "head", "agent")


@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    kind: str


def classify(argv: list[str]) -> str | None:
    """The tokenbus process kind of a command line, or None when it is not one of ours."""
    if not argv:
        return None
    exe = os.path.basename(argv[0])
    if exe == "tokenbus-proxy":
        return "proxy"
    if exe == "tokenbus-replica":
        return "replica"
    if not exe.startswith("python"):
        return None
    args = argv[1:]
    if args[:2] == ["-m", "model_worker"]:
        return "worker"
    # `python -m tools head` (how `tokenbus up` starts it) or the `tokenbus head` console script
    if args[:2] == ["-m", "tools"]:
        sub = args[2:3]
    elif args and os.path.basename(args[0]) == "tokenbus":
        sub = args[1:2]
    else:
        return None
    return sub[0] if sub and sub[0] in ("head", "agent") else None


def _argv(pid: int) -> list[str]:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _ppid(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _listener_inodes(port: int) -> set[str]:
    """Socket inodes listening on `port` (TCP, IPv4 or IPv6)."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(inode)
    return inodes


def _owner_of(inodes: set[str], candidates: list[int]) -> int | None:
    wanted = {f"socket:[{i}]" for i in inodes}
    for pid in candidates:
        try:
            fds = list((PROC / str(pid) / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in wanted:
                    return pid
            except OSError:
                continue
    return None


def _cluster_root(proxy_pid: int) -> int | None:
    """The `tokenbus up` that started this proxy, if one did."""
    parent = _ppid(proxy_pid)
    if parent is None:
        return None
    argv = _argv(parent)
    if argv[1:4] == ["-m", "tools", "up"] or (
        len(argv) > 2 and os.path.basename(argv[1]) == "tokenbus" and argv[2] == "up"
    ):
        return parent
    return None


def _descends_from(pid: int, root: int) -> bool:
    seen = 0
    while pid > 1 and seen < 64:  # bounded: a PID reused mid-walk cannot loop us
        if pid == root:
            return True
        parent = _ppid(pid)
        if parent is None:
            return False
        pid, seen = parent, seen + 1
    return False


def find_auto(port: int | None = None) -> list[Proc]:
    """This user's tokenbus processes (`--cpu-pids auto`); with `port`, only the cluster of the `tokenbus up`
    whose proxy listens there, when there is one."""
    uid = os.getuid()
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
        except OSError:
            continue  # exited while we looked
        pid = int(entry.name)
        kind = classify(_argv(pid))
        if kind is not None:
            found.append(Proc(pid, kind))
    if port is not None:
        proxy = _owner_of(_listener_inodes(port), [p.pid for p in found if p.kind == "proxy"])
        root = _cluster_root(proxy) if proxy is not None else None
        if root is not None:
            found = [p for p in found if _descends_from(p.pid, root)]
    return sorted(found, key=lambda p: (KINDS.index(p.kind), p.pid))


def parse_pids(spec: str, port: int | None = None) -> list[Proc]:
    """`auto` (see find_auto; `port`: the proxy's), or a comma-separated PID list (each PID's kind from its
    command line, else "other")."""
    if spec == "auto":
        return find_auto(port)
    procs = []
    for part in spec.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"--cpu-pids wants 'auto' or PIDs separated by commas, got {part!r}")
        pid = int(part)
        if not (PROC / part).exists():
            raise ValueError(f"--cpu-pids: no process {pid}")
        procs.append(Proc(pid, classify(_argv(pid)) or "other"))
    return procs


def descendants(root: int) -> list[int]:
    """The processes now descended from `root` (nginx's workers from its master), found by their parents."""
    by_parent: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (parent := _ppid(int(entry.name))) is not None:
            by_parent.setdefault(parent, []).append(int(entry.name))
    found, todo = [], list(by_parent.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(by_parent.get(pid, []))
    return sorted(found)


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores since boot, from /proc/stat (idle and iowait are not busy)."""
    fields = [int(v) for v in (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return total - fields[3] - fields[4], total


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process in seconds; None once it is gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # fields 14 and 15 of proc(5)


class CpuMeter:
    """Samples the processes at start() and stop(); cores() divides the CPU time by the wall time."""

    def __init__(self, procs: list[Proc]) -> None:
        self._procs = procs
        self._start: dict[int, float] = {}
        self._end: dict[int, float] = {}

    def start(self) -> None:
        for p in self._procs:
            value = cpu_seconds(p.pid)
            if value is not None:
                self._start[p.pid] = value

    def stop(self) -> None:
        for p in self._procs:
            value = cpu_seconds(p.pid)
            if value is not None:
                self._end[p.pid] = value

    def summary(self, wall_s: float) -> dict[str, object]:
        """{"total": cores, "by_kind": {kind: cores}, "processes": {kind: count}, "exited": [pids]}."""
        by_kind: dict[str, float] = {}
        counts: dict[str, int] = {}
        exited = []
        for p in self._procs:
            if p.pid not in self._start:
                continue
            if p.pid not in self._end:
                exited.append(p.pid)
                continue
            used = self._end[p.pid] - self._start[p.pid]
            by_kind[p.kind] = by_kind.get(p.kind, 0.0) + used / wall_s
            counts[p.kind] = counts.get(p.kind, 0) + 1
        return {
            "total": round(sum(by_kind.values()), 3),
            "by_kind": {k: round(v, 3) for k, v in by_kind.items()},
            "processes": counts,
            "exited": exited,
        }
