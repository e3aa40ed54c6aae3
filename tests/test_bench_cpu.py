"""`tokenbus bench --cpu-pids`: finding tokenbus processes and measuring their CPU from /proc, on real processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tools.bench.cpu import CpuMeter, Proc, classify, cpu_seconds, find_auto, parse_pids

# Burns `seconds` of its own CPU time after reading a line, then says so and waits for stdin to close.
BURNER = """
import sys, time
sys.stdin.readline()
end = time.process_time() + float(sys.argv[1])
while time.process_time() < end:
    pass
print("burnt", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize(
    ("argv", "kind"),
    [
        (["/work/build/bin/tokenbus-proxy", "--bind", "127.0.0.1:0"], "proxy"),
        (["tokenbus-replica", "--replica-id", "r1"], "replica"),
        (["/venv/bin/python3", "-m", "model_worker", "--replica-id", "r1"], "worker"),
        (["/venv/bin/python", "-m", "tools", "head", "--db", "x"], "head"),
        (["/venv/bin/python", "/venv/bin/tokenbus", "agent", "--node-id", "n"], "agent"),
        (["/venv/bin/python", "-m", "tools", "bench"], None),
        (["/venv/bin/python", "-m", "pytest"], None),
        (["/usr/bin/proxy"], None),
        ([], None),
    ],
)
def test_classify(argv: list[str], kind: str | None) -> None:
    assert classify(argv) == kind


@pytest.fixture
def burner() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", BURNER, "0.3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    yield proc
    proc.kill()
    proc.wait()


def test_meter_counts_the_cpu_a_process_burns(burner: subprocess.Popen[str]) -> None:
    assert burner.stdin is not None and burner.stdout is not None
    meter = CpuMeter(parse_pids(str(burner.pid)))
    meter.start()
    burner.stdin.write("go\n")
    burner.stdin.flush()
    assert burner.stdout.readline() == "burnt\n"
    meter.stop()
    summary = meter.summary(wall_s=1.0)
    assert summary["processes"] == {"other": 1}
    assert summary["exited"] == []
    assert summary["total"] >= 0.29  # 0.3 s of CPU over a 1 s window, less one clock tick of rounding
    assert summary["by_kind"]["other"] == summary["total"]


def test_a_process_gone_before_the_end_is_reported(burner: subprocess.Popen[str]) -> None:
    meter = CpuMeter([Proc(burner.pid, "worker")])
    meter.start()
    burner.kill()
    burner.wait()
    assert cpu_seconds(burner.pid) is None
    meter.stop()
    assert meter.summary(wall_s=1.0) == {"total": 0.0, "by_kind": {}, "processes": {}, "exited": [burner.pid]}


def test_auto_finds_processes_by_their_command_line() -> None:
    # argv[0] chosen at exec: the process looks like a proxy in /proc/PID/cmdline once it says it is up
    fake = subprocess.Popen(
        ["tokenbus-proxy", "-c", "print('up', flush=True); import sys; sys.stdin.read()"],
        executable=sys.executable,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None and fake.stdout.readline() == "up\n"
        assert Proc(fake.pid, "proxy") in find_auto()
    finally:
        fake.kill()
        fake.wait()


def test_parse_pids_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="PIDs separated by commas"):
        parse_pids("1,abc")  # PID 1 always exists: the bad part is what fails
    with pytest.raises(ValueError, match="no process"):
        parse_pids("999999999")
