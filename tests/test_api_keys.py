"""API keys on the proxy (`--api-keys FILE`): every /v1/ route wants `Authorization: Bearer KEY` and answers 401 in
OpenAI's error shape without it; /healthz and /readyz stay open; SIGHUP reloads the file (a bad one keeps the keys
held); requests are counted per key name in /metrics.

Real processes (head, agent, proxy, a sim replica); the proxy is signalled by its PID.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cluster_harness import LocalCluster

from tools.up import curl_commands

pytestmark = pytest.mark.timeout(180)

ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-0123456789abcdef"
CAROL = "sk-carol-0123456789abcdef"
RELOAD_DEADLINE_S = 30.0  # a reload takes milliseconds; the machine is shared and busy
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys") / "api-keys"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, keys_file: Path) -> Iterator[LocalCluster]:
    keys_file.write_text(f"# the test's keys\n{ALICE} alice\n\n{BOB}\n")
    c = LocalCluster(tmp_path_factory.mktemp("api-keys"), api_keys=keys_file)
    c.start()
    try:
        spec = {"name": "demo", "engine": "sim", "engine_args": {"seed": 3}, "replicas": 1, "max_concurrency": 64}
        asyncio.run(c.deploy(spec))
        yield c
    finally:
        c.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def chat(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers or {}) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}{path}", headers=headers or {}) as resp:
        return resp.status, await resp.text()


def assert_invalid_api_key(status: int, body: Any) -> None:
    assert status == 401, body
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_api_key"
    assert isinstance(body["error"]["message"], str)


def test_v1_routes_need_a_key_and_health_stays_open(cluster: LocalCluster) -> None:
    url = cluster.proxy_url

    async def run() -> None:
        assert_invalid_api_key(*await chat(url))
        assert_invalid_api_key(*await chat(url, bearer(CAROL)))  # not in the file
        assert_invalid_api_key(*await chat(url, {"Authorization": ALICE}))  # no Bearer scheme
        status, _ = await get(url, "/v1/models")
        assert status == 401
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{url}/v1/chat/demo", data="hi", headers={"Content-Type": "text/plain"}) as resp,
        ):
            assert resp.status == 401
        assert (await get(url, "/healthz"))[0] == 200
        assert (await get(url, "/readyz"))[0] == 200

        status, body = await chat(url, bearer(ALICE))
        assert status == 200, body
        assert body["choices"][0]["message"]["content"]
        assert (await chat(url, bearer(BOB)))[0] == 200
        assert (await get(url, "/v1/models", bearer(ALICE)))[0] == 200

        status, metrics = await get(url, "/metrics")  # open: no --metrics-auth
        assert status == 200
        by_key = {
            line.split()[0]: float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("tokenbus_proxy_requests_by_key_total{")
        }
        assert by_key['tokenbus_proxy_requests_by_key_total{key="alice"}'] >= 2
        assert by_key['tokenbus_proxy_requests_by_key_total{key="key-4"}'] >= 1  # BOB has no name: its line
        assert ALICE not in metrics and BOB not in metrics

    asyncio.run(run())
    log = (cluster.state_dir / "logs" / "proxy.log").read_text(errors="replace")
    assert "401 to" in log
    assert ALICE not in log and BOB not in log and CAROL not in log


def test_sighup_reloads_the_key_file(cluster: LocalCluster, keys_file: Path) -> None:
    url = cluster.proxy_url

    async def status_with(key: str) -> int:
        return (await get(url, "/v1/models", bearer(key)))[0]

    async def poll_until(key: str, want: int) -> None:
        deadline = time.monotonic() + RELOAD_DEADLINE_S
        while (got := await status_with(key)) != want:
            assert time.monotonic() < deadline, f"still {got} after the reload, not {want}"
            await asyncio.sleep(0.05)

    async def run() -> None:
        assert await status_with(CAROL) == 401
        keys_file.write_text(f"{ALICE} alice\n{CAROL} carol\n")
        cluster.signal("proxy", signal.SIGHUP)
        await poll_until(CAROL, 200)
        await poll_until(BOB, 401)  # no longer in the file

        # a bad file: the keys held stay, and the log says why (file and line, not the key)
        keys_file.write_text(f"{BOB} bob\nsk-short\n")
        log_path = cluster.state_dir / "logs" / "proxy.log"
        cluster.signal("proxy", signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_DEADLINE_S
        while "API keys not reloaded" not in log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, "no log line for the bad reload"
            await asyncio.sleep(0.05)
        log = log_path.read_text(errors="replace")
        assert f"{keys_file}: line 2: the key is 8 bytes long" in log
        assert "sk-short" not in log and BOB not in log
        assert await status_with(CAROL) == 200
        assert await status_with(BOB) == 401
        assert (await get(url, "/healthz"))[0] == 200  # the same proxy, still serving

    asyncio.run(run())


def test_up_prints_requests_that_send_a_key() -> None:
    assert all('-H "Authorization: Bearer $TOKENBUS_API_KEY"' in cmd for cmd in curl_commands(8123, api_key=True))
    assert not any("Authorization" in cmd for cmd in curl_commands(8123))
