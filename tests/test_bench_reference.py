"""`python -m tools.bench_reference` for real with small numbers: the two reference servers directly, behind
Debian's nginx, and tokenbus with 2 sim replicas, one scenario, measured by the bench's client. Each system's
requests all succeed with the tokens asked for, the overheads are computed against the direct run, and every
process group shows up in the CPU figures; the table names the three systems. No assertion on speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench.reference import SYSTEMS

MAX_TOKENS = 8
STREAMS = 8
GROUPS = {
    "direct": {"servers": 2},
    "nginx": {"servers": 2, "nginx": 2},  # nginx: the master and at least one worker
    "tokenbus": {"proxy": 1, "replica": 2, "worker": 2, "head": 1, "agent": 1},
}


@pytest.mark.timeout(240)
def test_three_systems_measured_with_every_token_and_the_cpu_of_every_group(tmp_path: Path) -> None:
    out = tmp_path / "reference.json"
    cmd = [sys.executable, "-m", "tools.bench_reference", "--scenarios", f"{STREAMS}:5", "--duration", "1"]
    cmd += ["--max-tokens", str(MAX_TOKENS), "--quiet-deadline", "0", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["config"]["max_tokens"] == MAX_TOKENS
    (scenario,) = res["scenarios"]
    assert (scenario["streams"], scenario["token_delay_ms"]) == (STREAMS, 5.0)
    (run,) = scenario["runs"]
    assert set(run) == set(SYSTEMS)
    for system in SYSTEMS:
        s = run[system]
        assert s["errors"] == 0, (system, s["error_kinds"])
        assert s["requests"] >= STREAMS, system
        assert s["tokens_per_request"] == {"min": MAX_TOKENS, "max": MAX_TOKENS}, system
        assert all(s[m][q] is not None for m in ("ttft_ms", "e2e_ms") for q in ("p50", "p95", "p99")), system
        for group, at_least in GROUPS[system].items():
            assert s["processes"][group] >= at_least, (system, s["processes"])
        assert set(s["cpu_pct"]) == set(GROUPS[system]), system
        assert s["cpu_total_pct"] > 0 and s["cpu_us_per_token"]["total"] > 0, system
        assert set(s["cpu_us_per_token"]) == set(GROUPS[system]) | {"total"}, system
        assert s["client_cpu_pct"] > 0 and isinstance(s["others_cpu_pct"], float), system
    for system in SYSTEMS[1:]:
        for metric in ("ttft_ms", "e2e_ms"):
            expected = {q: round(run[system][metric][q] - run["direct"][metric][q], 3) for q in ("p50", "p95", "p99")}
            assert run[system]["overhead_ms"][metric] == pytest.approx(expected, abs=1e-6)
    assert all(name in proc.stdout for name in SYSTEMS)
