"""The `tokenbus` CLI: argument parsing, pass-through, admin commands against a real ZeroMQ ROUTER, and the
process supervision `tokenbus up` relies on (real child processes)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from cluster_harness import UP_READY_S, Up, shm_entries

from node_agent.binaries import bin_dir
from schemas.messages import AdminReply, AdminRequest, decode
from tools import cli
from tools.local_cluster import port_free
from tools.procs import RESTART_CAP_S, Children, Supervisor, alive, restart_delay
from tools.up import curl_commands, demo_deployment

# --- parsing -------------------------------------------------------------------------------------------------


def parse(*argv: str) -> Any:
    return cli.build_parser().parse_args(list(argv))


def test_deploy_engine_args_are_json_when_they_parse() -> None:
    opts = parse(
        "deploy",
        "chat",
        "--replicas",
        "3",
        "--max-concurrency",
        "64",
        "--engine-arg",
        "token_delay_ms=5",
        "--engine-arg",
        "model=tiny-llama",
        "--engine-arg",
        'stop=["x"]',
        "--engine-arg",
        "warm=true",
        "--engine-arg",
        "ratio=0.5",
    )
    assert opts.name == "chat" and opts.engine == "sim" and opts.replicas == 3 and opts.max_concurrency == 64
    assert dict(opts.engine_arg) == {
        "token_delay_ms": 5,
        "model": "tiny-llama",
        "stop": ["x"],
        "warm": True,
        "ratio": 0.5,
    }
    assert opts.head == "tcp://127.0.0.1:5555"


@pytest.mark.parametrize(
    "argv",
    [
        ["deploy", "x", "--engine-arg", "no-equals-sign"],
        ["deploy", "x", "--engine-arg", "=5"],
        ["deploy", "x", "--engine", "gpt"],
        ["deploy", "x", "--replicas", "-1"],
        ["deploy", "x", "--gpus-per-replica", "-1"],
        ["deploy", "x", "--placement", "random"],
        ["scale", "x", "many"],
        ["scale", "x"],
        ["bench", "--concurrency", "0"],
        ["bench", "--duration", "-3"],
        ["bench", "--endpoint", "grpc"],
        [],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_other_commands_parse() -> None:
    assert parse("scale", "demo", "4").replicas == 4
    assert parse("delete", "demo", "--head", "tcp://10.0.0.1:6000").head == "tcp://10.0.0.1:6000"
    up = parse("up")
    assert (up.engine, up.replicas, up.port, up.state_dir, up.prometheus) == ("vllm", 2, 8000, ".tokenbus", False)
    assert parse("up", "--prometheus").prometheus
    bench = parse("bench", "-c", "256", "-d", "30", "--plot", "x.png", "--pushgateway", "http://127.0.0.1:9091")
    assert (bench.concurrency, bench.duration, bench.max_tokens, bench.endpoint) == (256, 30.0, 32, "chat")
    assert (bench.url, bench.model, bench.plot) == ("http://127.0.0.1:8000", "demo", "x.png")


def test_head_and_agent_get_the_rest_of_argv_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, list[str]] = {}
    for name in ("head", "node_agent"):
        fake = types.ModuleType(name)
        fake.main = lambda argv, name=name: seen.setdefault(name, argv) and 7  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, name, fake)
    assert cli.main(["head", "--router", "tcp://127.0.0.1:1", "--help"]) == 7
    assert cli.main(["agent", "--node-id", "n1"]) == 7
    assert seen == {"head": ["--router", "tcp://127.0.0.1:1", "--help"], "node_agent": ["--node-id", "n1"]}


def test_up_deploys_demo_and_prints_both_curls() -> None:
    assert demo_deployment("sim", 2) == {
        "name": "demo",
        "engine": "sim",
        "engine_args": {"token_delay_ms": 20},
        "replicas": 2,
        "gpus_per_replica": 0,
        "max_concurrency": 256,
    }
    plain, sse = curl_commands(8123)
    assert plain == (
        "curl -N -X POST http://127.0.0.1:8123/v1/chat/demo -H 'Content-Type: text/plain' "
        "--data 'What is machine learning?'"
    )
    assert sse.startswith("curl -N http://127.0.0.1:8123/v1/chat/completions ") and '"stream":true' in sse


def test_up_port_check_ignores_a_previous_runs_time_wait_but_not_a_listener() -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy binds
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        assert not port_free(port)  # a listener: in use
    served.close()  # the server side closes first: its end of the connection stays in TIME_WAIT
    client.close()
    assert "TIME-WAIT" in subprocess.run(["ss", "-tan", f"sport = :{port}"], capture_output=True, text=True).stdout
    assert port_free(port)


# --- admin commands against a real ROUTER ----------------------------------------------------------------------

STATUS = {
    "epoch": 3,
    "version": (3 << 32) | 17,
    "nodes": [
        {"node_id": "n1", "host": "127.0.0.1", "cpu_slots": 4, "used_slots": 2, "alive": True, "last_seen_s": 0.4}
    ],
    "deployments": [
        {
            "name": "demo",
            "engine": "sim",
            "engine_args": {"token_delay_ms": 20},
            "replicas": 2,
            "max_concurrency": 256,
            "ready": 1,
            "replicas_list": [
                {
                    "id": "demo-1",
                    "node": "n1",
                    "state": "READY",
                    "addr": "127.0.0.1:40001",
                    "load": {"running": 12, "waiting": 3, "kv_usage": 0.25},
                },
                {
                    "id": "demo-2",
                    "node": "n1",
                    "state": "STARTING",
                    "addr": "",
                    "load": {"running": 0, "waiting": 0, "kv_usage": 0.0},
                },
            ],
        }
    ],
}


class FakeHead:
    """A ROUTER answering admin requests: `status` with STATUS, `delete` of "ghost" with an error, else ok."""

    def __init__(self) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.requests: list[AdminRequest] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            frames = self.sock.recv_multipart()
            identity, body = frames[0], frames[1:]
            envelope = []
            if body and body[0] == b"":  # a REQ-style empty delimiter, if the client sends one
                envelope, body = [b""], body[1:]
            msg = decode(body)
            assert isinstance(msg, AdminRequest)
            self.requests.append(msg)
            if msg.op == "delete" and msg.args.get("name") == "ghost":
                reply = AdminReply(msg.request_id, False, error="no deployment named 'ghost'")
            else:
                reply = AdminReply(msg.request_id, True, data=STATUS if msg.op == "status" else {})
            self.sock.send_multipart([identity, *envelope, *reply.encode()])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def head() -> Iterator[FakeHead]:
    pytest.importorskip("bus.admin")
    fake = FakeHead()
    yield fake
    fake.close()


def test_deploy_scale_delete_send_the_admin_ops(head: FakeHead, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli.main(["deploy", "chat", "--replicas", "2", "--engine-arg", "token_delay_ms=5", "--head", head.endpoint])
        == 0
    )
    wide = ["deploy", "big", "--engine", "vllm", "--gpus-per-replica", "2", "--placement", "pack", "--max-concurrency"]
    assert cli.main([*wide, "9", "--idle-timeout", "0", "--head", head.endpoint]) == 0
    assert cli.main(["scale", "chat", "5", "--head", head.endpoint]) == 0
    assert cli.main(["delete", "chat", "--head", head.endpoint]) == 0
    # the whole spec goes: the flags given, the spec's defaults (schemas/deployment.py) for the others
    defaults = {
        "gpus_per_replica": None,
        "max_concurrency": 256,
        "first_token_timeout_s": 120.0,
        "idle_timeout_s": 60.0,
    }
    assert [(r.op, r.args) for r in head.requests] == [
        (
            "deploy",
            {
                "name": "chat",
                "engine": "sim",
                "engine_args": {"token_delay_ms": 5},
                "replicas": 2,
                **defaults,
                "placement": "spread",
            },
        ),
        (
            "deploy",
            {
                "name": "big",
                "engine": "vllm",
                "engine_args": {},
                "replicas": 1,
                "gpus_per_replica": 2,
                "max_concurrency": 9,
                "first_token_timeout_s": 120.0,
                "idle_timeout_s": 0.0,
                "placement": "pack",
            },
        ),
        ("scale", {"name": "chat", "replicas": 5}),
        ("delete", {"name": "chat"}),
    ]
    assert "scaled to 5" in capsys.readouterr().out


def test_deploy_refuses_a_bad_spec_without_asking_the_head(
    head: FakeHead, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich's width when output is not a terminal
    assert cli.main(["deploy", "bad name", "--head", head.endpoint]) == 1
    assert cli.main(["deploy", "x", "--max-concurrency", str(1 << 30), "--head", head.endpoint]) == 1
    out = capsys.readouterr().out
    assert "matching regex '^[a-zA-Z0-9_-]{1,64}$' - at `$.name`" in out and "at `$.max_concurrency`" in out
    assert head.requests == []


def test_admin_error_is_reported_with_exit_1(head: FakeHead, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["delete", "ghost", "--head", head.endpoint]) == 1
    assert "no deployment named 'ghost'" in capsys.readouterr().out


def test_status_renders_nodes_deployments_replicas(
    head: FakeHead, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich's width when output is not a terminal
    assert cli.main(["status", "--head", head.endpoint]) == 0
    out = capsys.readouterr().out
    for text in ("n1", "2/4", "demo-1", "127.0.0.1:40001", "READY", "STARTING", "25%", "1/2", "epoch 3"):
        assert text in out, text


def test_no_head_times_out_with_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("bus.admin")
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.ROUTER) as silent:  # bound but never answers
        port = silent.bind_to_random_port("tcp://127.0.0.1")
        assert cli.main(["status", "--head", f"tcp://127.0.0.1:{port}", "--timeout", "0.3"]) == 1
    assert "status failed" in capsys.readouterr().out


# --- child processes -------------------------------------------------------------------------------------------

CHILD = """
import os, signal, subprocess, sys, time
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if sys.argv[1] == "parent":  # leaves a grandchild behind in its process group
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
    g = subprocess.Popen([sys.executable, "-c", code])
    print("grandchild", g.pid, flush=True)
print("ready", flush=True)
time.sleep(300)
"""


def _wait_for_line(path: Path, prefix: str, deadline_s: float = 20.0) -> str:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if line.startswith(prefix):
                return line
        time.sleep(0.02)
    raise AssertionError(f"{prefix!r} never appeared in {path}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_children_stop_newest_first_escalating_to_sigkill(tmp_path: Path) -> None:
    children = Children()
    names = ("polite", "stubborn", "parent")
    for name in names:
        children.start(name, [sys.executable, "-c", CHILD, name], tmp_path / f"{name}.log")
    for name in names:
        _wait_for_line(tmp_path / f"{name}.log", "ready")
    grandchild = int(_wait_for_line(tmp_path / "parent.log", "grandchild").split()[1])
    reports = children.stop_all(timeout_s=1.0)
    assert [r.name for r in reports] == ["parent", "stubborn", "polite"]
    how = {r.name: (r.how, r.exit_code) for r in reports}
    assert how["polite"] == ("SIGTERM", -signal.SIGTERM)
    assert how["stubborn"] == ("SIGKILL", -signal.SIGKILL)
    assert how["parent"] == ("SIGTERM", -signal.SIGTERM)
    assert not any(_alive(r.pid) for r in reports)
    assert not _alive(grandchild)  # killed with its group (a zombie is reaped by init)
    assert children.stop_all() == []


def test_children_report_the_first_to_exit(tmp_path: Path) -> None:
    children = Children()
    children.start("sleeper", [sys.executable, "-c", "import time; time.sleep(300)"], tmp_path / "a.log")
    quitter = children.start("quitter", [sys.executable, "-c", "print('bye'); raise SystemExit(3)"], tmp_path / "b.log")
    quitter.proc.wait(20)
    dead = children.first_exited()
    assert dead is quitter and dead.log_tail() == "bye"
    reports = {r.name: r for r in children.stop_all()}
    assert (reports["quitter"].how, reports["quitter"].exit_code) == ("already exited", 3)
    assert reports["sleeper"].how == "SIGTERM"


def test_stop_all_kills_what_a_child_left_in_a_session_of_its_own(tmp_path: Path) -> None:
    # as an agent's replicas: their own session, so they outlive the agent and its group's SIGKILL
    code = (
        "import subprocess, sys, time; "
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True); "
        "print('orphan', g.pid, flush=True); time.sleep(300)"
    )
    children = Children()
    parent = children.start("agent", [sys.executable, "-c", code], tmp_path / "agent.log")
    orphan = int(_wait_for_line(tmp_path / "agent.log", "orphan").split()[1])
    children.note_descendants()
    os.kill(parent.pid, signal.SIGKILL)
    parent.proc.wait(20)
    assert alive(orphan)
    reports = children.stop_all()
    assert [(r.name, r.how) for r in reports] == [
        ("agent", "already exited"),
        ("agent's child", "left behind: SIGKILL"),
    ]
    assert not alive(orphan)


def test_restart_backoff_doubles_up_to_its_cap() -> None:
    delays = [restart_delay(n) for n in range(1, 12)]
    assert delays[:3] == [0.5, 1.0, 2.0]
    assert all(a <= b for a, b in zip(delays, delays[1:], strict=False)) and delays[-1] == RESTART_CAP_S


def test_supervisor_restarts_a_dead_child_after_its_backoff_and_reports_it(tmp_path: Path) -> None:
    children = Children()
    sleeper = children.start("head", [sys.executable, "-c", "import time; time.sleep(300)"], tmp_path / "h.log")
    lines: list[str] = []
    supervisor = Supervisor(children, lines.append)
    os.kill(sleeper.pid, signal.SIGKILL)
    sleeper.proc.wait(20)
    died = time.monotonic()
    supervisor.check(died)
    assert lines == [] and children.get("head") is sleeper  # the first restart waits restart_delay(1)
    supervisor.check(died + restart_delay(1))
    new = children.get("head")
    assert new is not sleeper and alive(new.pid) and new.restarts == 1 and new.cmd == sleeper.cmd
    assert len(lines) == 1 and f"pid {sleeper.pid} exited with code -9" in lines[0] and str(new.pid) in lines[0]
    os.kill(new.pid, signal.SIGKILL)  # dies again at once: the next restart waits twice as long
    new.proc.wait(20)
    again = time.monotonic()
    supervisor.check(again)
    supervisor.check(again + restart_delay(1))
    assert children.get("head") is new
    supervisor.check(again + restart_delay(2))
    assert children.get("head").restarts == 2 and len(lines) == 2
    assert [r.how for r in children.stop_all()] == ["SIGTERM"]


def test_supervisor_survives_a_restart_that_cannot_spawn_and_tries_again(tmp_path: Path) -> None:
    children = Children()
    quitter = children.start("proxy", [sys.executable, "-c", "pass"], tmp_path / "p.log")
    quitter.proc.wait(20)
    lines: list[str] = []
    commands = iter([[str(tmp_path / "missing-binary")], [sys.executable, "-c", "import time; time.sleep(300)"]])
    supervisor = Supervisor(children, lines.append, lambda child: next(commands))
    now = time.monotonic()
    supervisor.check(now)
    supervisor.check(now + restart_delay(1))
    assert children.get("proxy") is quitter and len(lines) == 1 and lines[0].startswith("cannot restart proxy:")
    supervisor.check(now + restart_delay(1) + restart_delay(2))
    assert alive(children.get("proxy").pid) and lines[1].startswith("restarted proxy:")
    assert [r.how for r in children.stop_all()] == ["SIGTERM"]


def test_bench_entry_point_runs_as_a_real_process() -> None:
    out = subprocess.run([sys.executable, "-m", "tools", "bench", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--concurrency" in out.stdout


# --- tokenbus up, end to end with the real binaries ------------------------------------------------------------

needs_binaries = pytest.mark.skipif(
    not (bin_dir() / "tokenbus-proxy").exists(), reason="binaries not built (make build)"
)


@needs_binaries
def test_up_serves_a_streamed_answer_and_stops_every_process_on_sigint(tmp_path: Path) -> None:
    shm_before = shm_entries()
    up = Up(tmp_path / "state")
    try:
        up.wait_for("Ctrl-C stops everything")
        out = "".join(up.lines)
        assert f"curl -N -X POST http://127.0.0.1:{up.port}/v1/chat/demo" in out
        pids = up.pids()
        assert set(pids) == {"head", "agent", "proxy"}
        assert all(alive(pid) for pid in pids.values())
        assert up.request() == 8  # eight sim tokens, one word each
        replica_pids = up.replica_pids()
        assert len(replica_pids) == 4  # two replicas, each a tokenbus-replica and a model worker
        rest = up.interrupt()
    finally:
        up.kill()
    assert up.proc.returncode == 0, rest
    assert [line.split()[1] for line in rest.splitlines() if line.startswith("stopped ")] == ["proxy", "agent", "head"]
    assert not any(alive(pid) for pid in [*pids.values(), *replica_pids])
    assert {p.name for p in (up.state / "logs").iterdir()} == {"head.log", "agent.log", "proxy.log"}
    assert "deployment demo" in (up.state / "logs" / "head.log").read_text()
    assert shm_entries() - shm_before == set()


@needs_binaries
def test_up_restarts_a_killed_head_and_agent_and_sigint_still_stops_everything(tmp_path: Path) -> None:
    shm_before = shm_entries()
    up = Up(tmp_path / "state")
    try:
        up.wait_for("Ctrl-C stops everything")
        first = up.pids()
        os.kill(first["head"], signal.SIGKILL)
        assert up.request() == 8  # the proxy serves from its last snapshot while the head is down
        line = up.wait_for("restarted head")
        assert f"pid {first['head']} exited with code -9" in line
        new_head = int(re.search(r"new pid (\d+)", line).group(1))  # type: ignore[union-attr]
        assert alive(new_head)
        os.kill(first["agent"], signal.SIGKILL)
        line = up.wait_for("restarted agent")
        new_agent = int(re.search(r"new pid (\d+)", line).group(1))  # type: ignore[union-attr]
        deadline = time.monotonic() + UP_READY_S
        while True:  # the cluster serves again once the new agent and head have found each other
            try:
                if up.request() == 8:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no answer after the head and agent restarts"
            time.sleep(0.2)
        replica_pids = up.replica_pids()
        assert replica_pids and alive(new_agent)
        rest = up.interrupt()
    finally:
        up.kill()
    assert up.proc.returncode == 0, rest
    assert [line.split()[1] for line in rest.splitlines() if line.startswith("stopped ")][:3] == [
        "proxy",
        "agent",
        "head",
    ]
    assert not any(alive(pid) for pid in [*first.values(), new_head, new_agent, *replica_pids])
    assert shm_entries() - shm_before == set()


def test_up_refuses_a_port_it_could_not_tell_the_user(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("0", "65536"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["up", "--port", bad])
        assert exit_info.value.code == 2
        assert "must be a port from 1 to 65535" in capsys.readouterr().err
