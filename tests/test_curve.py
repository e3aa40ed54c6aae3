"""The closed control plane (bus/curve.py): `tokenbus keys gen`, a head with --keys as a real process (`python -m
tools head`), and real agents, CLIs and subscribers with and without a known key.

Absence is shown against a sync point: a client without a known key is started before one with it, and once the
one with the key has been served (registered, answered, sent a snapshot) the one without has had as long and got
nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from cluster_harness import deployed_cluster
from controlplane_helpers import (
    DEADLINE_S,
    REPO_ROOT,
    TEST_HEARTBEAT_S,
    LoggedProcess,
    replica_path_missing,
    stopped_at_exit,
    wait_until,
)
from zmq.utils import z85

from bus.admin import AdminClient, AdminTimeout
from bus.bounded_recv import MAX_FRAMES
from bus.curve import AUTHORIZED, ZapHandler, generate, load_client, load_server, secure_client
from bus.snapshot_sub import SnapshotSubscriber
from schemas.messages import AdminReply, AdminRequest, decode

HB = str(TEST_HEARTBEAT_S)
NO_ANSWER_S = 3.0  # what a client without a known key waits for an answer that never comes


def tokenbus(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A `tokenbus` command run to its end; its output unwrapped (rich wraps at the terminal's width)."""
    env = {**os.environ, "COLUMNS": "300", **(env or {})}
    cmd = [sys.executable, "-m", "tools", *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cluster's keys, and beside them a second directory whose client keys the head does not know."""
    root = tmp_path_factory.mktemp("keys")
    assert tokenbus("keys", "gen", str(root / "cluster")).returncode == 0
    generate(root / "stranger", ["cli", "agent"])
    # a stranger knows the head's public key (it is public), not a key the head accepts
    shutil.copy(root / "cluster" / "head.key", root / "stranger" / "head.key")
    return root / "cluster"


def stranger(keys: Path) -> Path:
    return keys.parent / "stranger"


class Head(LoggedProcess):
    """`tokenbus head` on free ports, on loopback unless `extra` says where, with `extra` flags."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        args = ["head", "--heartbeat", HB, "--db", str(tmp / "head.db"), *extra]
        if "--bind" not in extra:
            args += ["--router", "tcp://127.0.0.1:*", "--pub", "tcp://127.0.0.1:*"]
        super().__init__("tools", args, tmp / "head.log")
        self.router = ""
        self.pub = ""

    async def started(self) -> Head:
        m = await self.wait_for_log(r"router bound on (\S+), snapshots published on (\S+)")
        self.router, self.pub = m.group(1), m.group(2)
        return self


@contextlib.asynccontextmanager
async def head_with_keys(tmp: Path, keys: Path, *extra: str) -> AsyncIterator[Head]:
    head = Head(tmp, "--keys", str(keys), *extra)
    with stopped_at_exit(head):
        yield await head.started()


def start_agent(tmp: Path, router: str, node_id: str, *key_args: str) -> LoggedProcess:
    args = ["agent", "--head", router, "--node-id", node_id, "--cpu-slots", "2", "--heartbeat", HB]
    return LoggedProcess(
        "tools", [*args, "--state-dir", str(tmp / f"state-{node_id}"), *key_args], tmp / f"{node_id}.log"
    )


async def request(router: str, op: str, keys_dir: Path | None, args: dict | None = None, timeout: float = 5.0) -> dict:
    client = AdminClient(router, keys=load_client(keys_dir, "cli") if keys_dir is not None else None)
    try:
        return await client.request(op, args, timeout)
    finally:
        client.close()


@contextlib.asynccontextmanager
async def subscribed(head: Head, keys_dir: Path | None, name: str = "proxy") -> AsyncIterator[SnapshotSubscriber]:
    keys = load_client(keys_dir, name) if keys_dir is not None else None
    sub = SnapshotSubscriber(head.router, head.pub, request_interval_s=0.2, keys=keys)
    await sub.start()
    try:
        yield sub
    finally:
        await sub.close()


# --- keys gen -------------------------------------------------------------------------------------------------


def test_keys_gen_writes_secrets_readable_by_their_owner_only_and_keeps_existing_keys(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    run = tokenbus("keys", "gen", str(d), "--client", "gpu-a", "--client", "gpu-b")
    assert run.returncode == 0, run.stdout + run.stderr
    for name in ("head", "gpu-a", "gpu-b"):
        assert stat.S_IMODE((d / f"{name}.key_secret").stat().st_mode) == 0o600
        assert stat.S_IMODE((d / f"{name}.key").stat().st_mode) == 0o644
    assert sorted(p.name for p in (d / AUTHORIZED).iterdir()) == ["gpu-a.key", "gpu-b.key"]  # the head's is not
    assert not [p for p in d.iterdir() if p.name.startswith("tmp")]  # the private staging directories are gone
    head_key = (d / "head.key_secret").read_text()
    # a second run adds a client and keeps every key already there: the head and the other clients keep working
    run = tokenbus("keys", "gen", str(d), "--client", "gpu-c")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "head: kept" in run.stdout
    assert (d / "head.key_secret").read_text() == head_key
    assert set(load_server(d).authorized.values()) == {"gpu-a", "gpu-b", "gpu-c"}
    assert load_client(d, "gpu-c").server_public == load_client(d, "gpu-a").server_public
    run = tokenbus("keys", "gen", str(d), "--client", "../evil")
    assert run.returncode == 1 and "key name" in run.stdout


@pytest.mark.parametrize("bad", ["", "short", "~" * 40], ids=["empty", "short", "not-z85"])
def test_a_bad_key_file_is_refused_naming_it(tmp_path: Path, keys: Path, bad: str) -> None:
    d = tmp_path / "keys"
    shutil.copytree(keys, d)
    (d / "cli.key_secret").write_text(f'curve\n    public-key = "{bad}"\n    secret-key = "{bad}"\n')
    run = tokenbus("status", "--head", "tcp://127.0.0.1:1", "--keys", str(d))
    assert run.returncode == 1, run.stdout
    assert f"status failed: {d}/cli.key_secret holds a key that is not 40 characters of Z85" in run.stdout, run.stdout


def test_a_secret_key_others_can_read_is_warned_about(keys: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = keys.parent / "copied"
    shutil.copytree(keys, d)
    (d / "agent.key_secret").chmod(0o644)  # as `scp` without -p leaves it
    with caplog.at_level(logging.WARNING, logger="bus.curve"):
        load_client(d, "cli")
        assert not caplog.records
        load_client(d, "agent")
    [record] = caplog.records
    assert (
        record.getMessage()
        == f"{d}/agent.key_secret holds a secret key and others can read it: chmod 600 {d}/agent.key_secret"
    )


# --- the head's exposure ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--bind", "0.0.0.0", "--router-port", "0", "--pub-port", "0", "--advertise", "head.example"],
        ["--router", "tcp://192.0.2.1:5555", "--pub", "tcp://127.0.0.1:*"],
        ["--router", "tcp://127.0.0.1:*", "--pub", "tcp://eth0:5556"],
    ],
    ids=["bind-all", "router-on-an-address", "pub-on-an-interface"],
)
def test_a_head_reachable_from_other_machines_refuses_to_start_without_keys(tmp_path: Path, flags: list[str]) -> None:
    run = tokenbus("head", *flags, "--db", str(tmp_path / "head.db"))
    assert run.returncode == 2, run.stdout + run.stderr
    assert "can be reached from other machines: start the head with --keys DIR" in run.stderr
    assert not (tmp_path / "head.db").exists()


def test_binding_every_interface_needs_an_address_to_advertise(tmp_path: Path, keys: Path) -> None:
    run = tokenbus("head", "--bind", "0.0.0.0", "--keys", str(keys), "--db", str(tmp_path / "head.db"))
    assert run.returncode == 2 and "needs --advertise HOST" in run.stderr, run.stderr


async def test_a_head_on_every_interface_with_keys_advertises_the_address_given(tmp_path: Path, keys: Path) -> None:
    flags = ["--bind", "0.0.0.0", "--router-port", "0", "--pub-port", "0", "--advertise", "head.example"]
    head = Head(tmp_path, "--keys", str(keys), *flags)
    with stopped_at_exit(head):
        await head.started()
        assert head.router.startswith("tcp://0.0.0.0:") and head.pub.startswith("tcp://0.0.0.0:")
        status = await request(head.router.replace("0.0.0.0", "127.0.0.1"), "status", keys)
    ports = {name: endpoint.rsplit(":", 1)[1] for name, endpoint in (("router", head.router), ("pub", head.pub))}
    # its /metrics too, bound on every interface like the rest, at the address given
    assert re.fullmatch(r"head\.example:\d+", status["head"].pop("metrics")), status["head"]
    assert status["head"] == {name: f"tcp://head.example:{port}" for name, port in ports.items()}
    assert "clients use {router} and {pub}".format(**status["head"]) in head.log_text()


# --- who gets in ------------------------------------------------------------------------------------------------


async def test_an_agent_without_a_known_key_is_never_registered(tmp_path: Path, keys: Path) -> None:
    async with head_with_keys(tmp_path, keys) as head:
        no_key = start_agent(tmp_path, head.router, "no-key")
        unknown = start_agent(tmp_path, head.router, "unknown", "--keys", str(stranger(keys)))
        with stopped_at_exit(no_key, unknown):
            await head.wait_for_log(
                r"CURVE: refused peer 127\.0\.0\.1 \(CURVE, public key \S+\): not an authorized key"
            )
            await unknown.wait_for_log("connecting to the head at .* as node unknown with key agent")
            await no_key.wait_for_log("connecting to the head at .* as node no-key\n")
            known = start_agent(tmp_path, head.router, "known", "--keys", str(keys))
            with stopped_at_exit(known):
                await known.wait_for_log("registered with the head")

                async def nodes() -> list[str]:
                    return [n["node_id"] for n in (await request(head.router, "status", keys))["nodes"]]

                assert await wait_until(nodes, what="the keyed agent in status") == ["known"]
                # as long again as the keyed agent took: still nothing from the others
                assert "registered with the head" not in no_key.log_text() + unknown.log_text()
                assert await nodes() == ["known"]
                # and they say why
                await unknown.wait_for_log(r"lost .*; the head refused the key 'agent': it is not among the head's")
                await no_key.wait_for_log(
                    r"lost .*; the head ended the handshake: it may want CURVE keys \(--keys DIR\)"
                )
        # a refused client retries every 100 ms: its refusals are logged once, not once per attempt
        assert len(re.findall("CURVE: refused peer", head.log_text())) == 1


async def test_a_cli_without_a_known_key_gets_no_answer(tmp_path: Path, keys: Path) -> None:
    async with head_with_keys(tmp_path, keys) as head:
        for keys_dir, why in ((None, "it may want CURVE keys"), (stranger(keys), "the head refused the key 'cli'")):
            with pytest.raises(AdminTimeout, match=why):
                await request(head.router, "status", keys_dir, timeout=NO_ANSWER_S)
        spec = {"name": "nope", "engine": "sim", "engine_args": {}, "replicas": 0, "max_concurrency": 4}
        with pytest.raises(AdminTimeout):
            await request(head.router, "deploy", stranger(keys), spec, timeout=NO_ANSWER_S)
        assert [d["name"] for d in (await request(head.router, "status", keys))["deployments"]] == []
        # the command line, through the common admin flags and TOKENBUS_KEYS
        for key_args in ([], ["--keys", str(stranger(keys))]):
            run = tokenbus("status", "--head", head.router, "--timeout", str(NO_ANSWER_S), *key_args)
            assert run.returncode == 1 and "no answer from the head" in run.stdout, run.stdout
        run = tokenbus("status", "--head", head.router, env={"TOKENBUS_KEYS": str(keys)})
        assert run.returncode == 0 and "nodes" in run.stdout, run.stdout + run.stderr
        run = tokenbus("status", "--head", head.router, "--keys", str(keys), "--key-name", "missing")
        assert run.returncode == 1 and "missing.key_secret" in run.stdout, run.stdout


async def test_a_subscriber_without_a_known_key_gets_no_snapshot(tmp_path: Path, keys: Path) -> None:
    async with head_with_keys(tmp_path, keys) as head:
        async with subscribed(head, None) as no_key, subscribed(head, stranger(keys), "agent") as unknown:
            async with subscribed(head, keys) as known:
                # nothing is known to wait for: the head publishes its first snapshot at its sync deadline
                await known.wait_for(lambda s: True, DEADLINE_S)
                await wait_until(lambda: known.confirmations > 0, what="a re-published snapshot")
            assert no_key.snapshot is None and unknown.snapshot is None
            assert no_key.requests_sent > 1 and unknown.requests_sent > 1  # they kept asking, unanswered


async def test_with_the_key_everything_works(tmp_path: Path, keys: Path) -> None:
    missing = replica_path_missing()
    if missing:
        pytest.skip(missing)
    async with head_with_keys(tmp_path, keys) as head:
        agent = start_agent(tmp_path, head.router, "n1", "--keys", str(keys))
        with stopped_at_exit(agent):
            await agent.wait_for_log("connecting to the head at .* as node n1 with key agent")
            spec = {"name": "chat", "engine": "sim", "engine_args": {}, "replicas": 1, "max_concurrency": 4}
            await request(head.router, "deploy", keys, spec)
            async with subscribed(head, keys) as sub:
                snapshot = await sub.wait_for(
                    lambda s: "chat" in s.deployments and len(s.deployments["chat"].replicas) == 1, 3 * DEADLINE_S
                )
            [replica] = snapshot.deployments["chat"].replicas
            status = await request(head.router, "status", keys)
            assert [n["node_id"] for n in status["nodes"]] == ["n1"]
            [dep] = status["deployments"]
            assert [(r["state"], r["addr"]) for r in dep["replicas_list"]] == [("READY", replica.grpc_address)]
            run = tokenbus("status", "--head", head.router, "--keys", str(keys))
            assert run.returncode == 0 and "chat" in run.stdout, run.stdout + run.stderr


def test_a_local_cluster_with_keys_serves_through_its_proxy(tmp_path: Path, keys: Path) -> None:
    """LocalCluster(keys=...) as `tokenbus up --keys` runs it: the head, the agent, the proxy and the admin calls all
    with their own keys; the proxy gets its snapshot, and a stream through it reaches the replica."""
    missing = replica_path_missing()
    if missing:
        pytest.skip(missing)
    spec = {"name": "chat", "engine": "sim", "engine_args": {}, "replicas": 1, "max_concurrency": 4}
    with deployed_cluster(tmp_path, spec, keys=keys) as (cluster, _):
        url = f"{cluster.proxy_url}/v1/chat/chat?max_tokens=4"
        with urllib.request.urlopen(urllib.request.Request(url, data=b"hello", method="POST"), timeout=30) as resp:
            assert resp.status == 200
            assert len(resp.read().split()) == 4
        head_log = (tmp_path / "logs" / "head.log").read_text()
        assert "CURVE, authorized keys only" in head_log and "refused" not in head_log


# --- bad frames from an authenticated peer ---------------------------------------------------------------------


@contextlib.contextmanager
def keyed_dealer(router: str, keys: Path, identity: bytes) -> Iterator[zmq.asyncio.Socket]:
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, identity)
        secure_client(sock, load_client(keys, "cli"))
        sock.connect(router)
        yield sock
    finally:
        sock.close(linger=0)


async def test_bad_frames_from_an_authenticated_peer_are_dropped_counted_and_named(tmp_path: Path, keys: Path) -> None:
    identity = b"mallory"
    peer = rf"{identity.hex()} \(key cli\)"
    async with head_with_keys(tmp_path, keys) as head:
        with keyed_dealer(head.router, keys, identity) as sock:
            await sock.send_multipart([b"\x7f", b"not a message"])
            await head.wait_for_log(rf"dropped a bad message from peer {peer}: .* \(1 bad messages so far\)")
            await sock.send_multipart([b"\x7f"] * (MAX_FRAMES + 1))
            await head.wait_for_log(rf"dropped a bus message on head-router from peer {peer}: \d+ bytes in 6 frames")
            # its messages are dropped, the peer is not cut off: the next valid one is answered as any other
            await sock.send_multipart(AdminRequest(1, "status", {}).encode())
            assert await sock.poll(DEADLINE_S * 1000, zmq.POLLIN), "no answer to a valid request"
            reply = decode(await sock.recv_multipart())
            assert isinstance(reply, AdminReply) and reply.ok and reply.request_id == 1
            await sock.send_multipart([b"\x7f", b"again"])
            await head.wait_for_log(r"\(2 bad messages so far\)")


# --- the ZAP handler's log --------------------------------------------------------------------------------------


def test_refusals_are_logged_once_per_address_then_at_most_once_a_minute(
    keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    handler = ZapHandler(load_server(keys), zmq.asyncio.Context.instance())
    unknown = load_client(stranger(keys), "cli")

    def zap(address: bytes, public: bytes) -> list[bytes]:
        return handler._reply([b"1.0", b"7", b"tokenbus", address, b"", b"CURVE", z85.decode(public)])

    with caplog.at_level(logging.WARNING, logger="bus.curve"):
        for _ in range(5):
            assert zap(b"10.0.0.9", unknown.public)[2:5] == [b"400", b"unknown key", b""]
        assert zap(b"10.0.0.8", unknown.public)[2] == b"400"
        assert zap(b"10.0.0.9", load_client(keys, "agent").public)[2:5] == [b"200", b"OK", b"agent"]
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[3] for line in lines] == ["10.0.0.9", "10.0.0.8"], lines
    assert unknown.public.decode() in lines[0]
    assert handler.refusals == 6
