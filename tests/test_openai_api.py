"""The proxy's OpenAI API as the official `openai` client sees it, through real processes (sim engine).

One cluster for the module: head, agent, proxy, and a `demo` deployment of sim replicas. The sim engine's
text is a pure function of (engine seed, request seed or prompt), so every expected text is computed with
`sim_words`; a sim token is one word with a leading space, so its token count is its word count.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest
from cluster_harness import LocalCluster, deployed_cluster
from openai import OpenAI

from model_worker.sim_engine import sim_words

pytestmark = pytest.mark.timeout(120)

SIM_SEED = 5
MAX_MODEL_LEN = 128  # sim tokens are words: a 200-word prompt is too long
CHAT = [{"role": "user", "content": "tell me about streams"}]
CHAT_PROMPT_TOKENS = 4  # the sim counts the words of the messages' contents


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = {
        "name": "demo",
        "engine": "sim",
        "engine_args": {"token_delay_ms": 1, "seed": SIM_SEED, "max_model_len": MAX_MODEL_LEN},
        "replicas": 2,
        "max_concurrency": 64,
    }
    with deployed_cluster(tmp_path_factory.mktemp("openai"), spec) as (c, _):
        yield c


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> Iterator[OpenAI]:
    # No retries: a 429/5xx must fail the test, not be retried into a pass.
    with OpenAI(base_url=cluster.proxy_url + "/v1", api_key="x", max_retries=0, timeout=30.0) as c:
        yield c


def expected_text(seed: int, n: int) -> str:
    return "".join(sim_words(SIM_SEED, seed, "", n))


def assert_recent(created: int) -> None:
    assert abs(created - time.time()) < 60, created


# --- models ---------------------------------------------------------------------------------------------


def test_models_list_names_the_deployments(client: OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    assert all(m.object == "model" and m.owned_by == "tokenbus" for m in models.data)


# --- chat completions -----------------------------------------------------------------------------------


def test_chat_non_streaming(client: OpenAI) -> None:
    r = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=7, seed=3)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "demo"
    assert_recent(r.created)
    [choice] = r.choices
    assert choice.index == 0 and choice.logprobs is None
    assert choice.message.role == "assistant"
    assert choice.message.content == expected_text(3, 7)
    assert choice.finish_reason == "length"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (CHAT_PROMPT_TOKENS, 7, 11)


def test_chat_streaming_chunks_have_openais_shape(client: OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="demo", messages=CHAT, max_tokens=9, seed=4, stream=True))
    assert len(chunks) > 1, "the answer should arrive in several chunks"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert len({c.created for c in chunks}) == 1
    assert_recent(chunks[0].created)
    for c in chunks:
        assert c.object == "chat.completion.chunk" and c.model == "demo"
        assert c.usage is None, "no usage chunk unless stream_options.include_usage"
        [choice] = c.choices
        assert choice.index == 0 and choice.logprobs is None
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_text(4, 9)
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


def test_chat_stream_usage_chunk_comes_last(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="demo", messages=CHAT, max_tokens=5, seed=5, stream=True, stream_options={"include_usage": True}
        )
    )
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        CHAT_PROMPT_TOKENS,
        5,
        CHAT_PROMPT_TOKENS + 5,
    )
    assert last.id == body[0].id
    assert all(c.usage is None for c in body)
    assert body[-1].choices[0].finish_reason == "length"


# --- completions ----------------------------------------------------------------------------------------


def test_completion_non_streaming(client: OpenAI) -> None:
    r = client.completions.create(model="demo", prompt="once upon a time", max_tokens=6, seed=6)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == "demo"
    assert_recent(r.created)
    [choice] = r.choices
    assert choice.index == 0 and choice.logprobs is None
    assert choice.text == expected_text(6, 6)
    assert choice.finish_reason == "length"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 6, 10)


def test_completion_streaming(client: OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model="demo",
            prompt="once upon a time",
            max_tokens=8,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *body, last = chunks
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert all(c.object == "text_completion" and c.model == "demo" for c in chunks)
    assert "".join(c.choices[0].text for c in body) == expected_text(7, 8)
    assert [c.choices[0].finish_reason for c in body] == [None] * (len(body) - 1) + ["length"]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (4, 8, 12)


def test_completion_accepts_the_clients_list_prompt(client: OpenAI) -> None:
    r = client.completions.create(model="demo", prompt=["once upon a time"], max_tokens=2, seed=6)
    assert r.choices[0].text == expected_text(6, 2)


# --- sampling parameters --------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 2, 17, 60])
def test_max_tokens_is_respected_exactly(client: OpenAI, max_tokens: int) -> None:
    r = client.completions.create(model="demo", prompt="count", max_tokens=max_tokens, seed=max_tokens)
    assert len(r.choices[0].text.split()) == max_tokens
    assert r.usage is not None and r.usage.completion_tokens == max_tokens
    stream = client.chat.completions.create(
        model="demo",
        messages=CHAT,
        max_completion_tokens=max_tokens,
        seed=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == max_tokens
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == max_tokens


def test_stop_string_ends_with_finish_reason_stop(client: OpenAI) -> None:
    words = sim_words(SIM_SEED, 8, "", 30)
    stop = words[10] + words[11]  # two words: unlikely to occur earlier in a 70-word vocabulary
    full = "".join(words)
    before = full[: full.find(stop)]
    r = client.completions.create(model="demo", prompt="x", max_tokens=30, seed=8, stop=stop)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (before, "stop")

    chunks = list(
        client.chat.completions.create(model="demo", messages=CHAT, max_tokens=30, seed=8, stop=[stop], stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == before
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_gives_the_same_text_twice(client: OpenAI) -> None:
    def text(seed: int) -> str:
        r = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=12, seed=seed, temperature=0.8)
        return r.choices[0].message.content or ""

    assert text(42) == text(42)
    assert text(42) != text(43)


def test_sampling_parameters_are_accepted(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model="demo",
        messages=CHAT,
        max_tokens=3,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=1,
        user="someone",
    )
    assert r.choices[0].message.content == expected_text(1, 3)


@pytest.mark.parametrize(("param", "value"), [("echo", True), ("best_of", 2), ("logprobs", 1)])
def test_unsupported_completion_options_are_400(client: OpenAI, param: str, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="demo", prompt="x", extra_body={param: value})
    assert info.value.body["param"] == param  # type: ignore[index]


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("temperature", -1),
        ("temperature", 2.5),
        ("top_p", 1.5),
        ("presence_penalty", 3),
        ("frequency_penalty", -2.5),
        ("max_tokens", -1),
        ("max_tokens", 0),  # OpenAI's minimum is 1; 0 must not mean "the engine's default"
        ("n", 2),  # several choices, log-probabilities: not supported, so refused rather than left out
        ("logprobs", True),
        ("top_logprobs", 3),
        ("temperature", "hot"),
        ("seed", "x"),
        ("stop", [1]),
        ("stop", [""]),  # each stop string holds at least one character (schemas/request_limits.json)
        ("top_p", 0),  # vLLM refuses 0: the minimum is exclusive
    ],
)
def test_out_of_range_parameters_are_400(client: OpenAI, param: str, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="demo", messages=CHAT, extra_body={param: value})
    assert info.value.status_code == 400
    assert info.value.body["param"] == param  # type: ignore[index]
    assert info.value.body["type"] == "invalid_request_error"  # type: ignore[index]


# --- errors ---------------------------------------------------------------------------------------------


def test_unknown_model_is_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert info.value.status_code == 404
    assert "nope" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", stream=True)


def test_prompt_longer_than_the_context_is_400(client: OpenAI) -> None:
    long_prompt = " ".join(["word"] * (MAX_MODEL_LEN + 10))
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="demo", prompt=long_prompt, max_tokens=4, stream=stream)
        assert info.value.status_code == 400
        assert "context" in info.value.message
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": long_prompt}], max_tokens=4, stream=stream
            )
    # the cluster serves on
    assert client.completions.create(model="demo", prompt="x", max_tokens=1, seed=1).choices[0].text


def test_wrong_types_are_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="demo", messages="hello")  # type: ignore[arg-type]
    assert info.value.body["param"] == "messages"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": 7}])  # type: ignore[list-item]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="demo", prompt="x", stream="yes")  # type: ignore[call-overload]


async def error_body(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The OpenAI error object of a response, checked for OpenAI's shape."""
    assert response.headers["Content-Type"].startswith("application/json")
    body = await response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_malformed_json_is_400_in_openais_shape(cluster: LocalCluster, path: str) -> None:
    bodies = (b'{"model": "demo", "messages": [', b"not json", b"[1, 2]", b'{"model": "demo", "x": "\xff"}')
    async with aiohttp.ClientSession(cluster.proxy_url) as http:
        for body in bodies:
            async with http.post(path, data=body, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400, body
                assert (await error_body(r))["type"] == "invalid_request_error"


async def test_unknown_plain_chat_deployment_is_404(cluster: LocalCluster) -> None:
    async with aiohttp.ClientSession(cluster.proxy_url) as http:
        async with http.post("/v1/chat/nope", data=b"hi", headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 404
            assert "nope" in (await error_body(r))["message"]
        async with http.post("/v1/chat/demo", params={"max_tokens": "2"}, data=b"hi") as r:
            assert r.status == 200 and await r.text()


async def test_raw_shapes_match_openais(cluster: LocalCluster) -> None:
    """The keys of a non-streamed body and of stream chunks, as OpenAI sends them."""
    body = {"model": "demo", "messages": CHAT, "max_tokens": 3, "seed": 1}
    async with aiohttp.ClientSession(cluster.proxy_url) as http:
        async with http.post("/v1/chat/completions", json=body) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
            whole = await r.json()
        async with http.post("/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            lines = [line.decode().rstrip("\n") async for line in r.content]
    assert {"id", "object", "created", "model", "choices", "usage"} <= set(whole)
    assert {"index", "message", "logprobs", "finish_reason"} <= set(whole["choices"][0])
    assert set(whole["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}

    events = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in events), events
    assert events[-1] == "data: [DONE]"
    for line in events[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        assert {"id", "object", "created", "model", "choices"} <= set(chunk)
        assert {"index", "delta", "logprobs", "finish_reason"} <= set(chunk["choices"][0])
