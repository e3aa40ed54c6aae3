"""`tokenbus chat` in tmux against a sim cluster: tokens as they come, a second turn that carries the first, /reset,
and Ctrl-C that ends the answer in the engine but not the session.

The sim engine counts a chat prompt's tokens as the words of every message sent, and each token it writes is one
word: so turn 2's prompt, as the proxy reports it in the usage the dim line shows, is turn 1's prompt + turn 1's
answer + turn 2's question exactly when the history went with it."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Iterator

import pytest

from model_worker.sim_engine import sim_words
from tests.cluster_harness import LocalCluster, replica_stats
from tests.tmux_pane import Pane

API_KEY = "chat-test-key-0123456789"
SUMMARY_RE = re.compile(r"TTFT \d+ ms · [\d.]+ tokens/s · (\d+) tokens · prompt (\d+) tokens")
PROMPT = "you>"  # as captured: tmux drops the space at the end of a line


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, str]]:
    state = tmp_path_factory.mktemp("chat")
    (state / "api-keys").write_text(f"{API_KEY} chat-test\n")
    c = LocalCluster(state, api_keys=state / "api-keys")  # chat must send the key (TOKENBUS_API_KEY)
    try:
        c.start()
        # answers of 5000 tokens (100 s) unless asked for fewer: one Ctrl-C stops is still running without it
        spec = {"name": "chat", "engine": "sim", "replicas": 1, "engine_args": {"default_max_tokens": 5000}}
        (address,) = asyncio.run(c.deploy(spec))
        yield c, address
    finally:
        c.stop()


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENBUS_API_KEY", API_KEY)  # the panes' environment


def chat(cluster: LocalCluster, *flags: str) -> Pane:
    return Pane([sys.executable, "-m", "tools", "chat", "chat", "--url", cluster.proxy_url, *flags], width=200)


def at_prompt(screen: str) -> bool:
    """Waiting for a line: keys typed before it may be lost (a Ctrl-D is, while readline has the terminal cooked)."""
    return screen.rstrip().endswith(PROMPT)


def summaries(screen: str) -> list[tuple[int, int]]:
    """(answer tokens, prompt tokens) of each answer's dim line, in order."""
    return [(int(c), int(p)) for c, p in SUMMARY_RE.findall(screen)]


def test_the_second_turn_carries_the_first(cluster: tuple[LocalCluster, str]) -> None:
    pane = chat(cluster[0], "--max-tokens", "8")
    try:
        pane.wait_for(at_prompt, "the prompt")
        pane.keys("hello there", "Enter")
        screen = pane.wait_for(lambda s: len(summaries(s)) == 1 and at_prompt(s), "the first answer's line")
        assert "".join(sim_words(0, None, "hello there", 8)) in screen  # the tokens, printed as they came
        pane.keys("and again now", "Enter")
        pane.wait_for(lambda s: len(summaries(s)) == 2 and at_prompt(s), "the second answer's line")
        pane.keys("/reset", "Enter")
        pane.wait_for(lambda s: "history cleared" in s and at_prompt(s), "the history cleared")
        pane.keys("and again now", "Enter")
        screen = pane.wait_for(lambda s: len(summaries(s)) == 3 and at_prompt(s), "the third answer's line")
        (answer1, prompt1), (_, prompt2), (_, prompt3) = summaries(screen)
        assert (answer1, prompt1) == (8, 2)
        assert prompt2 == prompt1 + answer1 + 3, screen  # question, answer, question: the first turn went along
        assert prompt3 == 3, screen  # after /reset, the question alone
        pane.keys("/quit", "Enter")
        assert pane.wait_exit() == 0
    finally:
        pane.close()


def test_ctrl_c_stops_the_answer_in_the_engine_and_not_the_session(cluster: tuple[LocalCluster, str]) -> None:
    c, address = cluster
    pane = chat(c)
    try:
        pane.wait_for(at_prompt, "the prompt")
        first_words = "".join(sim_words(0, None, "tell me everything", 3))
        pane.keys("tell me everything", "Enter")
        pane.wait_for(lambda s: first_words in s, "the answer streaming")
        assert asyncio.run(replica_stats(address)).running == 1
        pane.keys("C-c")
        pane.wait_for(lambda s: "stopped after" in s and at_prompt(s), "the answer stopped")
        deadline = time.monotonic() + 10.0
        while asyncio.run(replica_stats(address)).running != 0:  # 100 s of tokens left, had the stream stayed
            assert time.monotonic() < deadline, "the engine still generates the stopped answer"
            time.sleep(0.1)
        pane.keys("/reset", "Enter")
        pane.wait_for(lambda s: "history cleared" in s and at_prompt(s), "the session going on")
        pane.keys("C-d")
        assert pane.wait_exit() == 0
    finally:
        pane.close()


def test_a_refused_question_says_why_and_the_session_goes_on(
    cluster: tuple[LocalCluster, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOKENBUS_API_KEY")
    pane = chat(cluster[0])
    try:
        pane.wait_for(at_prompt, "the prompt")
        pane.keys("hello", "Enter")
        pane.wait_for(lambda s: "error: 401: " in s and at_prompt(s), "the proxy's refusal")
        pane.keys("/quit", "Enter")
        assert pane.wait_exit() == 0
    finally:
        pane.close()
