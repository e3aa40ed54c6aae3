"""`python -m tools.chaos` as a real process, briefly: faults are struck, what they kill is restarted as `tokenbus
up` would, it stops by itself, and it prints its table of what the clients saw."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(240)


def test_a_short_chaos_run_strikes_restarts_and_reports() -> None:
    # seed 0: the first fault (about 1.5 s in) is a SIGKILL, of the head or a proxy, which only a restart brings back
    cmd = [sys.executable, "-m", "tools.chaos", "--duration", "8", "--interval", "1", "2", "--concurrency", "8"]
    out = subprocess.run(
        [*cmd, "--targets", "head,proxy", "--seed", "0"],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "200"},
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text  # 1 would mean a silent failure
    strikes = [line.split() for line in text.splitlines() if line.strip().endswith(")") and " s  SIG" in line]
    assert strikes and strikes[0][2] == "SIGKILL", text
    assert f"restarted {strikes[0][3]}: pid {strikes[0][5].rstrip(')')} exited with code -9" in text
    for heading in ("faults injected", "completed", "retried before the first token", "failed any other way"):
        assert heading in text
    assert "task failed" not in text
