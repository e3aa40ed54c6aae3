"""`tokenbus bench` against a real sim cluster (head, agent, proxy, replicas: tools.local_cluster), driven by the
C++ tokenbus-loadgen: three stages give three stage results and a timeline PNG, the TTFT's hops come back from
the proxy, an open-loop rate sends about rate x duration requests, and both endpoints count every token."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tools.bench.load import BenchConfig, LengthDist, Stage
from tools.bench.loadgen import loadgen_path, run_loadgen
from tools.bench.records import HOPS, Live

SIM_MAX_TOKENS = 16
PREFILL_MS = 10.0  # the sim's wait before its first token: the engine hop of the TTFT
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sim_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from cluster_harness import deployed_cluster

    engine_args = {"token_delay_ms": 2, "prefill_ms": PREFILL_MS}
    spec = {"name": "demo", "engine": "sim", "engine_args": engine_args, "replicas": 2, "max_concurrency": 128}
    with deployed_cluster(tmp_path_factory.mktemp("bench-cluster"), spec) as (c, _):
        yield c


async def _bench(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tools", "bench", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.timeout(300)
async def test_three_stages_give_three_results_a_timeline_and_the_ttft_hops(sim_cluster: Any, tmp_path: Path) -> None:
    out_json, plot = tmp_path / "ramp.json", tmp_path / "ramp.png"
    args = ("--client", "cpp", "--url", sim_cluster.proxy_url, "--stages", "4:1s,16:2s,4:1s")
    args += ("--max-tokens", str(SIM_MAX_TOKENS), "--json", str(out_json), "--plot", str(plot), "--cpu-pids", "auto")
    code, out, err = await _bench(*args)
    assert code == 0, f"{err}\n{sim_cluster.logs()}"
    res = json.loads(out_json.read_text())
    assert json.loads(out) == res
    stages = res["stages"]
    assert [(s["index"], s["concurrency"]) for s in stages] == [(0, 4), (1, 16), (2, 4)]
    for s, planned_s in zip(stages, (1.0, 2.0, 1.0), strict=True):
        assert s["failures"] == 0 and s["requests"] >= s["concurrency"]
        assert s["duration_s"] >= planned_s * 0.9  # the last one also holds its requests' drain
        assert s["ttft_ms"]["p50"] >= PREFILL_MS and s["itl_ms"]["p50"] is not None
    assert stages[1]["tokens_per_s"] > stages[0]["tokens_per_s"]  # 4x the streams of a 2 ms-per-token engine
    overall = res["overall"]
    assert overall["requests"] == sum(s["requests"] for s in stages)
    expected_rate = overall["requests"] * SIM_MAX_TOKENS / overall["duration_s"]
    assert overall["tokens_per_s"] == pytest.approx(expected_rate, rel=0.01)
    assert res["cpu_cores"]["by_kind"]["proxy"] > 0 and res["cpu_cores"]["client_processes"] == 2
    assert plot.read_bytes()[:8] == PNG_MAGIC and plot.stat().st_size > 20_000

    # The proxy answered X-Tokenbus-Timing on every stage: all six hops, the sim's prefill in the engine's,
    # and the proxy's share of the TTFT within what the client saw.
    for s in stages:
        hops = s["hops_ms"]
        assert set(hops) == set(HOPS), f"hops missing: {sorted(set(HOPS) - set(hops))}"
        assert hops["engine"]["p50"] >= PREFILL_MS * 0.9
        assert max(hops, key=lambda h: hops[h]["p50"]) == "engine"
        assert s["proxy_ttft_ms"]["p50"] <= s["ttft_ms"]["p50"]
    assert "TTFT hop engine" in err and "stage 1: 16 streams" in err


@pytest.mark.timeout(300)
async def test_open_loop_rate_sends_about_rate_times_duration(sim_cluster: Any) -> None:
    rate, duration_s = 20.0, 2.0
    args = ("--client", "cpp", "--url", sim_cluster.proxy_url, "--rate", str(rate), "-d", str(duration_s))
    code, out, err = await _bench(*args, "--max-tokens-dist", "uniform:4:12", "--seed", "3")
    assert code == 0, f"{err}\n{sim_cluster.logs()}"
    res = json.loads(out)
    (stage,) = res["stages"]
    assert stage["rate"] == rate and stage["concurrency"] is None
    # Poisson arrivals: 40 expected, standard deviation ~6.3; the band is more than 3 of them each way
    assert 20 <= stage["requests"] <= 60 and stage["failures"] == 0
    assert res["config"]["max_tokens"] == "uniform:4:12" and res["config"]["seed"] == 3


@pytest.mark.timeout(180)
@pytest.mark.parametrize("endpoint", ["chat", "plain"])
async def test_loadgen_counts_every_token_of_the_sim(sim_cluster: Any, endpoint: str) -> None:
    stages = (Stage(1.0, concurrency=16),)
    cfg = BenchConfig(sim_cluster.proxy_url, "demo", stages, LengthDist("fixed", (SIM_MAX_TOKENS,)), endpoint)
    live = Live()
    run = await asyncio.wait_for(run_loadgen(loadgen_path(), cfg, 30.0, live), 120)
    errors = {r.error for r in run.results if not r.ok}
    assert not errors, f"{errors}\n{sim_cluster.logs()}"
    assert len(run.results) >= 16 and live.requests == len(run.results)
    assert all(r.tokens == SIM_MAX_TOKENS for r in run.results)
    assert all(r.ttft_s is not None and 0 < r.ttft_s <= r.e2e_s for r in run.results)
    # the running total: words (plain), or content chunks (chat), which the proxy may coalesce under
    # backpressure (usage still counts every token)
    if endpoint == "plain":
        assert live.tokens == SIM_MAX_TOKENS * len(run.results)
    else:
        assert 0 < live.tokens <= SIM_MAX_TOKENS * len(run.results)
    assert max(r.itl_sum_s for r in run.results) > 0.01  # tokens timed as they came
    assert 1.0 <= run.duration_s < 30.0 and run.client_cpu_s > 0 and run.lags_s
    assert len(run.stage_starts_s) == 1 and run.stage_starts_s[0] < 0.1 and run.samples[-1].in_flight == 0
