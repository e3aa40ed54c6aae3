"""`tokenbus apply -f FILE`: the file's validation (every error names the file, line and field; an error anywhere
changes nothing) and its effect on a real head's desired state (create, update, no-op, prune, dry run)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from controlplane_helpers import REPO_ROOT, LoggedProcess, admin

from schemas.deployment import MAX_ENGINE_ARGS_BYTES, DeploymentSpec
from tools import cli
from tools.apply import MAX_DEPLOYMENTS, MAX_DEPTH, MAX_FILE_BYTES, SpecFileError, load, plan
from tools.up import TINY_MODEL, demo_deployment


def write(tmp_path: Path, text: str, name: str = "tokenbus.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- validation --------------------------------------------------------------------------------------------------

CHAT = "deployments:\n  - name: chat\n    engine: sim\n"  # the entry starts on line 2; its next field is line 4

ERRORS = [
    # (the file, the line, what the error says after "FILE:LINE: ")
    (CHAT + "    replics: 2\n", 4, "deployments[0] (chat) replics: unknown field (known: name, engine, "),
    (CHAT + "    replicas: two\n", 4, "deployments[0] (chat) replicas: Expected `int`, got `str`"),
    (CHAT + "    replicas: true\n", 4, "deployments[0] (chat) replicas: Expected `int`, got `bool`"),
    (CHAT + "    replicas: -1\n", 4, "deployments[0] (chat) replicas: Expected `int` >= 0"),
    (CHAT + "    replicas: 5000\n", 4, "deployments[0] (chat) replicas: Expected `int` <= 1024"),
    (CHAT + "    max_concurrency: 0\n", 4, "deployments[0] (chat) max_concurrency: Expected `int` >= 1"),
    (CHAT + "    idle_timeout_s: -0.5\n", 4, "deployments[0] (chat) idle_timeout_s: Expected `float` >= 0.0"),
    (CHAT + "    placement: tight\n", 4, "deployments[0] (chat) placement: Invalid enum value 'tight' (one of: spre"),
    ("deployments:\n  - name: chat\n    engine: gpt\n", 3, "deployments[0] (chat) engine: Invalid enum value 'gpt' "),
    ("deployments:\n  - name: chat\n", 2, "deployments[0] (chat) engine: missing (required)"),
    ("deployments:\n  - name: a b\n    engine: sim\n", 2, "deployments[0] name: Expected `str` matching regex"),
    (CHAT + "    engine_args: [1]\n", 4, "deployments[0] (chat) engine_args: Expected `object`, got `array`"),
    (CHAT + "    engine_args: {1: x}\n", 4, "deployments[0] (chat) engine_args: a key: Expected `str`, got `int`"),
    (  # a check of the whole spec: the entry's line, the message names the field
        CHAT + f"    engine_args: {{model: {'x' * MAX_ENGINE_ARGS_BYTES}}}\n",
        2,
        f"deployments[0] (chat): engine_args is {MAX_ENGINE_ARGS_BYTES + 12} bytes of JSON, more than",
    ),
    ("deployments:\n  - [chat]\n", 2, "deployments[0]: Expected `object`, got `array`"),
    (CHAT + "  - name: chat\n    engine: vllm\n", 4, "deployments[1] (chat) name: deployments[0] at line 2 has it too"),
    (CHAT + "    replicas: 1\n    replicas: 2\n", 5, "YAML: duplicate key 'replicas'"),
    (CHAT + "    replicas: [1, 2\n", 5, "YAML: while parsing a flow sequence at line 4; expected ',' or ']'"),
    (CHAT + "   replicas: 2\n", 4, "YAML: "),  # indented wrong
    ("deployments:\n  - &base {name: a, engine: sim}\n  - *base\n", 3, "YAML: aliases (*name) are not supported"),
    ("deployments:\n  - !!python/object/apply:os.system [echo]\n", 2, "YAML: could not determine a constructor"),
    (CHAT + "    engine_args: {blob: !!binary aGk=}\n", 4, "YAML: tag:yaml.org,2002:binary values are not supp"),
    ("deployments:\n- {name: a, engine: sim}\n---\ndeployments: []\n", 3, "YAML: expected a single document"),
    ("", 1, "the file is a map with one key, deployments: a list of deployments"),
    ("deployments: {chat: sim}\n", 1, "deployments must be a list"),
    (CHAT + "services: []\n", 4, "unknown key 'services': the file is a map with one key, deployments"),
    ("[1, 2]\n", 1, "the file is a map with one key"),
]


@pytest.mark.parametrize(("text", "line", "error"), ERRORS, ids=[error[:50] for _, _, error in ERRORS])
def test_an_error_names_the_file_line_and_field(tmp_path: Path, text: str, line: int, error: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SpecFileError) as e:
        load(path)
    assert any(found.startswith(f"{path}:{line}: {error}") for found in e.value.errors), e.value.errors


def test_every_entry_is_checked_and_every_error_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "deployments:\n"
        "  - {name: a, engine: sim, replicas: -1}\n"
        "  - {name: b, engine: sim}\n"
        "  - {name: c, engine: sim, idle_timeout_s: x}\n"
        "  - {name: a, engine: sim}\n",
    )
    with pytest.raises(SpecFileError) as e:
        load(path)
    assert [found.split(": ", 2)[:2] for found in e.value.errors] == [
        [f"{path}:2", "deployments[0] (a) replicas"],
        [f"{path}:4", "deployments[2] (c) idle_timeout_s"],
        [f"{path}:5", "deployments[3] (a) name"],
    ]


def test_limits(tmp_path: Path) -> None:
    entries = "".join(f"  - {{name: d{i}, engine: sim}}\n" for i in range(MAX_DEPLOYMENTS + 1))
    path = write(tmp_path, "deployments:\n" + entries)
    with pytest.raises(SpecFileError, match=f"{MAX_DEPLOYMENTS + 1} deployments, more than {MAX_DEPLOYMENTS}"):
        load(path)
    path = write(tmp_path, "deployments: []\n" + "#" * MAX_FILE_BYTES)
    with pytest.raises(SpecFileError, match=f"larger than {MAX_FILE_BYTES} bytes"):
        load(path)
    deep = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    path = write(tmp_path, f"deployments:\n  - {{name: a, engine: sim, engine_args: {{x: {deep}}}}}\n")
    with pytest.raises(SpecFileError, match=f":2: YAML: nested more than {MAX_DEPTH} levels deep"):
        load(path)
    with pytest.raises(SpecFileError, match="cannot read"):
        load(tmp_path / "missing.yaml")
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"deployments:\n  - name: caf\xe9\n")
    with pytest.raises(SpecFileError, match=":2: not UTF-8 text"):
        load(path)


def test_values_are_plain_data_with_the_specs_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, CHAT + "    engine_args: {revision: 2024-01-01, ratio: 0.5, stop: [x], warm: true}\n")
    assert load(path) == [
        DeploymentSpec(
            name="chat", engine="sim", engine_args={"revision": "2024-01-01", "ratio": 0.5, "stop": ["x"], "warm": True}
        )
    ]
    assert load(write(tmp_path, "deployments: []\n")) == []
    merged = load(write(tmp_path, CHAT + "    engine_args: {<<: {a: 1, b: 2}, b: 3}\n"))  # a merge's key overridden
    assert merged[0].engine_args == {"a": 1, "b": 3}


def test_the_repositorys_example_serves_the_tiny_model_as_up_does() -> None:
    [spec] = load(REPO_ROOT / "tokenbus.yaml")
    demo = demo_deployment("vllm", 2, Path(".tokenbus") / TINY_MODEL)
    assert (spec.name, spec.engine.value, spec.replicas, spec.engine_args) == (
        demo["name"],
        demo["engine"],
        demo["replicas"],
        demo["engine_args"],
    )
    assert spec.gpus_needed() == 0  # this machine class has no GPU


# --- against a real head -----------------------------------------------------------------------------------------


class HeadProcess:
    """`python -m head` on free loopback ports with its own database; stopped by PID."""

    def __init__(self, tmp_path: Path) -> None:
        args = ["--router", "tcp://127.0.0.1:*", "--pub", "tcp://127.0.0.1:*", "--db", str(tmp_path / "head.db")]
        self.proc = LoggedProcess("head", args, tmp_path / "head.log")
        self.router = asyncio.run(self.proc.wait_for_log(r"router bound on ([^\s,]+)")).group(1)

    def specs(self) -> dict[str, DeploymentSpec]:
        status = asyncio.run(admin(self.router, "status"))
        return {d["name"]: msgspec.convert(d["spec"], DeploymentSpec) for d in status["deployments"]}

    def deploy_lines(self) -> list[str]:
        """The head's log line per change of a deployment's spec."""
        return re.findall(r"deployment \S+ (?:created|updated)", self.proc.log_text())


@pytest.fixture
def head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HeadProcess]:
    monkeypatch.setenv("COLUMNS", "200")
    h = HeadProcess(tmp_path)
    try:
        yield h
    finally:
        h.proc.stop()


def apply(head: HeadProcess, path: Path, *flags: str) -> int:
    return cli.main(["apply", "-f", str(path), "--head", head.router, *flags])


def out_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


V1 = """\
deployments:
  - name: chat
    engine: sim
    replicas: 2
    engine_args: {token_delay_ms: 5}
  - name: code
    engine: sim
    max_concurrency: 64
"""
V2 = V1.replace("replicas: 2", "replicas: 3")


def test_create_then_reapply_changes_nothing(head: HeadProcess, tmp_path: Path, capsys: Any) -> None:
    path = write(tmp_path, V1)
    assert apply(head, path) == 0
    assert out_lines(capsys) == ["chat: created", "code: created"]
    assert head.specs() == {spec.name: spec for spec in load(path)}
    assert len(head.deploy_lines()) == 2
    assert apply(head, path) == 0
    assert out_lines(capsys) == ["chat: unchanged", "code: unchanged"]
    assert len(head.deploy_lines()) == 2  # no deploy was sent


def test_update_redeploys_only_what_changed(head: HeadProcess, tmp_path: Path, capsys: Any) -> None:
    assert apply(head, write(tmp_path, V1)) == 0
    capsys.readouterr()
    before = head.deploy_lines()
    path = write(tmp_path, V2.replace("token_delay_ms: 5", "token_delay_ms: 7"))
    assert apply(head, path) == 0
    assert out_lines(capsys) == ["chat: updated (engine_args.token_delay_ms, replicas 2 -> 3)", "code: unchanged"]
    assert head.deploy_lines() == [*before, "deployment chat updated"]
    assert head.specs()["chat"] == load(path)[0]


def test_prune_deletes_what_the_file_no_longer_lists(head: HeadProcess, tmp_path: Path, capsys: Any) -> None:
    assert apply(head, write(tmp_path, V1)) == 0
    assert cli.main(["deploy", "extra", "--head", head.router]) == 0  # made by hand, not in the file
    capsys.readouterr()
    only_chat = write(tmp_path, V1.split("  - name: code")[0])
    assert apply(head, only_chat) == 0
    assert out_lines(capsys) == [
        "chat: unchanged",
        "code: not in the file, kept (--prune deletes it)",
        "extra: not in the file, kept (--prune deletes it)",
    ]
    assert apply(head, only_chat, "--prune", "--dry-run") == 0
    assert out_lines(capsys) == [
        "chat: unchanged",
        "code: would be pruned",
        "extra: would be pruned",
        "dry run: nothing was changed",
    ]
    assert set(head.specs()) == {"chat", "code", "extra"}
    assert apply(head, only_chat, "--prune") == 0
    assert out_lines(capsys) == ["chat: unchanged", "code: pruned", "extra: pruned"]
    assert set(head.specs()) == {"chat"}


def test_an_invalid_file_changes_nothing_on_the_head(head: HeadProcess, tmp_path: Path, capsys: Any) -> None:
    assert apply(head, write(tmp_path, V1)) == 0
    before, deploys = head.specs(), head.deploy_lines()
    # valid changes (an update, a new deployment, code pruned) next to one bad entry
    valid = V2.split("  - name: code")[0] + "  - name: new\n    engine: sim\n"
    for bad_entry, line, error in [
        ("    replics: 2\n", 10, "deployments[2] (bad) replics: unknown field"),
        ("    replicas: two\n", 10, "deployments[2] (bad) replicas: Expected `int`, got `str`"),
        ("    placement: tight\n", 10, "deployments[2] (bad) placement: Invalid enum value 'tight'"),
        ("  - name: chat\n    engine: sim\n", 10, "deployments[3] (chat) name: deployments[0] at line 2 has it too"),
        ("    replicas: [1\n", 11, "YAML: while parsing a flow sequence at line 10"),
    ]:
        path = write(tmp_path, valid + "  - name: bad\n    engine: sim\n" + bad_entry)
        capsys.readouterr()
        assert apply(head, path, "--prune") == 2
        err = capsys.readouterr().err.splitlines()
        assert err[0].startswith(f"{path}:{line}: {error}"), err
        assert err[-1].startswith("nothing was applied")
        assert head.specs() == before and head.deploy_lines() == deploys


def test_the_repositorys_example_validates_against_a_head(head: HeadProcess, capsys: Any) -> None:
    assert apply(head, REPO_ROOT / "tokenbus.yaml", "--dry-run") == 0
    assert out_lines(capsys) == ["demo: would be created", "dry run: nothing was changed"]
    assert head.specs() == {}


def test_no_head_is_exit_1(tmp_path: Path, capsys: Any) -> None:
    with zmq.Context.instance().socket(zmq.ROUTER) as silent:  # bound but never answers
        port = silent.bind_to_random_port("tcp://127.0.0.1")
        path = write(tmp_path, V1)
        assert cli.main(["apply", "-f", str(path), "--head", f"tcp://127.0.0.1:{port}", "--timeout", "0.3"]) == 1
    assert "apply failed" in capsys.readouterr().out


def test_plan_from_a_status_reply() -> None:
    declared = [
        DeploymentSpec(name="chat", engine="sim", gpus_per_replica=0, placement="pack"),
        DeploymentSpec(name="same", engine="sim"),
        DeploymentSpec(name="ours", engine="sim"),
        DeploymentSpec(name="new", engine="vllm"),
    ]
    status = {
        "deployments": [
            {"name": "chat", "adopted": False, "spec": {"name": "chat", "engine": "sim"}},
            {"name": "same", "adopted": False, "spec": msgspec.to_builtins(declared[1])},
            {"name": "ours", "adopted": True},  # runs, with no spec on this head
            {"name": "gone", "adopted": False, "spec": {"name": "gone", "engine": "sim"}},
        ]
    }
    shown = [(c.name, c.action.value, c.fields) for c in plan(declared, status, prune=True)]
    assert shown == [
        ("chat", "updated", ["gpus_per_replica null -> 0", "placement spread -> pack"]),
        ("same", "unchanged", []),
        ("ours", "created", ["adopts its running replicas"]),
        ("new", "created", []),
        ("gone", "pruned", []),
    ]
    assert [c.action.value for c in plan(declared, status, prune=False)][-1] == "kept"


def test_keys_that_cannot_be_read_are_exit_1(tmp_path: Path, capsys: Any) -> None:
    path = write(tmp_path, V1)
    assert cli.main(["apply", "-f", str(path), "--keys", str(tmp_path / "no-keys")]) == 1
    assert f"apply failed: cannot read the key file {tmp_path / 'no-keys'}" in capsys.readouterr().out
