"""`tokenbus apply -f FILE [--prune] [--dry-run]`: the head's deployments become those a YAML file lists.

The whole file is read and validated first (YAML, each entry as a DeploymentSpec, names unique), so a mistake anywhere
changes nothing; every error names the file, the line and the field. Only the deployments whose spec differs from the
head's are then deployed, so applying the same file twice sends no deploy at all.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import yaml
from rich.console import Console
from rich.markup import escape

from bus.curve import CurveKeyError, client_keys
from schemas.deployment import NAME_PATTERN, DeploymentSpec
from tools import admin_cmds

MAX_FILE_BYTES = 1 << 20
MAX_DEPLOYMENTS = 1024
MAX_DEPTH = 32  # of nested maps and lists: PyYAML composes recursively, so a deeper file would exhaust the stack
TOP_KEY = "deployments"

FIELDS = DeploymentSpec.__struct_fields__
_FIELD_TYPES = {f.name: f.type for f in msgspec.structs.fields(DeploymentSpec)}
# msgspec's ValidationError texts: "<problem> - at `$.path`", or "... - at `key` in `$.path`" for a bad map key
_AT = re.compile(r" - at `(?:key` in `)?(\$[^`]*)`$")
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_UNKNOWN = re.compile(r"^Object contains unknown field `(.*)`$")
_MISSING = re.compile(r"^Object missing required field `(.*)`$")


class SpecFileError(Exception):
    """The file cannot be applied; each error is one line, `FILE:LINE: ...`."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _refuse(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(
        None, None, f"{node.tag} values are not supported (engine_args are passed on as JSON)", node.start_mark
    )


class _Loader(yaml.SafeLoader):
    """YAML's safe subset (no object tags), narrowed to plain data: no aliases (a small file must not expand into a
    huge one), no duplicate keys (PyYAML would let the last one win silently), timestamps kept as the text written
    (they are passed on as JSON), binary, sets and ordered maps refused."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not supported: write it out", mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:  # the map's own keys: one may override what a merge (<<) brings, as in YAML
            # a merge key is resolved by the constructor; any but a scalar key is refused by it as unhashable
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)
for _tag in ("binary", "set", "omap", "pairs"):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse)


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _child(node: yaml.Node, step: str | int, *, key: bool = False) -> yaml.Node | None:
    """The value (or with `key`, the key) node at `step` of a map or list node, if there is one."""
    if isinstance(node, yaml.MappingNode) and isinstance(step, str):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == step:
                return k if key else v
    if isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
        return node.value[step]
    return None


def _locate(entry: yaml.Node, message: str) -> tuple[int, str, str]:
    """Where in an entry a msgspec validation error points: its line, the field's path and the problem."""
    if m := _UNKNOWN.match(message):
        name = m.group(1)
        return _line(_child(entry, name, key=True) or entry), name, f"unknown field (known: {', '.join(FIELDS)})"
    if m := _MISSING.match(message):
        return _line(entry), m.group(1), "missing (required)"
    at = _AT.search(message)
    if at is None:  # a check of the whole spec (__post_init__): the message says which field
        return _line(entry), "", message
    path, problem = at.group(1), message[: at.start()]
    if at.group(0).startswith(" - at `key`"):
        problem = f"a key: {problem}"
    node = entry
    for name, index in _STEP.findall(path):  # as deep as the file's nodes follow the path
        child = _child(node, name or int(index))
        if child is None:
            break
        node = child
    field_type = _FIELD_TYPES.get(path.removeprefix("$."))
    if isinstance(field_type, type) and issubclass(field_type, enum.Enum):
        problem += f" (one of: {', '.join(e.value for e in field_type)})"
    return _line(node), path.removeprefix("$.").removeprefix("$"), problem


def _read(path: Path) -> str:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise SpecFileError([f"{path}: cannot read: {e.strerror or e}"]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise SpecFileError([f"{path}: larger than {MAX_FILE_BYTES} bytes"])
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise SpecFileError([f"{path}:{line}: not UTF-8 text: {e.reason}"]) from None


def _parse(path: Path, text: str) -> tuple[yaml.Node | None, Any]:
    """The document's node tree (for line numbers) and its data."""
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as e:  # an unprintable character: found before any parsing
        raise SpecFileError([f"{path}:{text.count(chr(10), 0, e.position) + 1}: YAML: {e.reason}"]) from None
    try:
        root = loader.get_single_node()
        return root, loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        context = e.context or ""
        if e.context_mark and e.problem_mark and e.context_mark.line != e.problem_mark.line:
            context += f" at line {e.context_mark.line + 1}"  # e.g. the start of a list the error is the end of
        problem = "; ".join(p for p in (context, e.problem) if p)
        where = f"{mark.line + 1}: YAML: {problem} (column {mark.column + 1})" if mark else f"1: YAML: {problem}"
        raise SpecFileError([f"{path}:{where}"]) from None
    finally:
        loader.dispose()


def load(path: Path) -> list[DeploymentSpec]:
    """Every deployment the file lists, or SpecFileError with every error found (nothing is partly valid)."""
    text = _read(path)
    root, data = _parse(path, text)
    shape = f"the file is a map with one key, {TOP_KEY}: a list of deployments"
    if not isinstance(root, yaml.MappingNode):
        raise SpecFileError([f"{path}:{_line(root) if root else 1}: {shape}"])
    errors = [
        f"{path}:{_line(k)}: unknown key {k.value!r}: {shape}"
        for k, _ in root.value
        if not (isinstance(k, yaml.ScalarNode) and k.value == TOP_KEY)
    ]
    seq = _child(root, TOP_KEY)
    if seq is None:
        errors.append(f"{path}:1: no {TOP_KEY}: {shape}")
    elif not isinstance(seq, yaml.SequenceNode):
        errors.append(f"{path}:{_line(seq)}: {TOP_KEY} must be a list")
    elif len(seq.value) > MAX_DEPLOYMENTS:
        errors.append(f"{path}:{_line(seq)}: {len(seq.value)} deployments, more than {MAX_DEPLOYMENTS}")
    if errors:
        raise SpecFileError(errors)
    assert isinstance(seq, yaml.SequenceNode)
    declared: list[DeploymentSpec] = []
    first_of: dict[str, int] = {}  # a name's first entry, valid or not: a duplicate is an error either way
    for i, (node, entry) in enumerate(zip(seq.value, data[TOP_KEY], strict=True)):
        name = entry.get("name") if isinstance(entry, dict) else None
        label = f"{TOP_KEY}[{i}]" + (f" ({name})" if isinstance(name, str) and re.match(NAME_PATTERN, name) else "")
        if isinstance(name, str) and name in first_of:
            first = first_of[name]
            errors.append(
                f"{path}:{_line(_child(node, 'name') or node)}: {label} name: "
                f"{TOP_KEY}[{first}] at line {_line(seq.value[first])} has it too"
            )
        elif isinstance(name, str):
            first_of[name] = i
        try:
            declared.append(msgspec.convert(entry, DeploymentSpec))
        except msgspec.ValidationError as e:
            line, where, problem = _locate(node, str(e))
            errors.append(f"{path}:{line}: {label}{' ' + where if where else ''}: {problem}")
    if errors:
        raise SpecFileError(errors)
    return declared


# --- what changes ------------------------------------------------------------------------------------------------


class Action(str, enum.Enum):
    CREATE = "created"
    UPDATE = "updated"
    UNCHANGED = "unchanged"
    PRUNE = "pruned"
    KEEP = "kept"  # on the head, not in the file, and no --prune


@dataclass(frozen=True)
class Change:
    name: str
    action: Action
    spec: DeploymentSpec | None = None  # what to deploy (create, update)
    fields: list[str] = field(default_factory=list)  # what an update changes


_ABSENT = object()


def _differences(old: DeploymentSpec, new: DeploymentSpec) -> list[str]:
    """The fields that differ: a map's keys that differ, other fields with their values."""
    out = []
    for name in FIELDS:
        a, b = getattr(old, name), getattr(new, name)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{name}.{key}" for key in sorted({*a, *b}) if a.get(key, _ABSENT) != b.get(key, _ABSENT)]
        elif a != b:
            out.append(f"{name} {_shown(a)} -> {_shown(b)}")
    return out


def _shown(value: Any) -> str:
    """As the file writes it."""
    return "null" if value is None else str(value.value if isinstance(value, enum.Enum) else value)


def plan(declared: list[DeploymentSpec], status: dict[str, Any], prune: bool) -> list[Change]:
    """What applying `declared` to a head whose `status` reply this is changes, in the file's order, then the rest
    of the head's deployments (pruned or kept)."""
    current = {d["name"]: d for d in status.get("deployments", [])}
    changes = []
    for spec in declared:
        entry = current.get(spec.name)
        if entry is None:
            changes.append(Change(spec.name, Action.CREATE, spec))
            continue
        if entry.get("adopted"):  # its replicas run but the head has no spec for it: deploying gives it one
            changes.append(Change(spec.name, Action.CREATE, spec, ["adopts its running replicas"]))
            continue
        old = msgspec.convert(entry["spec"], DeploymentSpec)
        if old == spec:
            changes.append(Change(spec.name, Action.UNCHANGED))
        else:
            changes.append(Change(spec.name, Action.UPDATE, spec, _differences(old, spec)))
    listed = {spec.name for spec in declared}
    for name in current:
        if name not in listed:
            changes.append(Change(name, Action.PRUNE if prune else Action.KEEP))
    return changes


# --- the command ----------------------------------------------------------------------------------------------------

_STYLE = {
    Action.CREATE: "green",
    Action.UPDATE: "yellow",
    Action.UNCHANGED: "dim",
    Action.PRUNE: "red",
    Action.KEEP: "dim",
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("apply", help="create, update (and with --prune, delete) deployments to match a YAML file")
    p.add_argument("-f", "--file", type=Path, required=True, help="the deployments file (see tokenbus.yaml)")
    p.add_argument("--prune", action="store_true", help="delete the head's deployments the file does not list")
    p.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    admin_cmds._common(p)
    p.set_defaults(func=main)


def _line_for(change: Change, dry_run: bool) -> str:
    if change.action is Action.KEEP:
        return f"{change.name}: [dim]not in the file, kept (--prune deletes it)[/dim]"
    verb = change.action.value
    if dry_run and change.action is not Action.UNCHANGED:
        verb = "would be " + verb
    detail = escape(f" ({', '.join(change.fields)})") if change.fields else ""
    return f"{change.name}: [{_STYLE[change.action]}]{verb}[/{_STYLE[change.action]}]{detail}"


async def _apply(opts: argparse.Namespace, declared: list[DeploymentSpec], console: Console) -> int:
    from bus.admin import AdminClient, AdminError  # imported on use, as by the other admin commands

    try:
        keys = client_keys(opts)
    except CurveKeyError as e:
        console.print(f"[red]apply failed:[/red] {escape(str(e))}", highlight=False)
        return 1
    client = AdminClient(opts.head, keys=keys)  # one connection for the status read and every change
    try:
        try:
            changes = plan(declared, await client.request("status", {}, opts.timeout), opts.prune)
        except (AdminError, TimeoutError) as e:
            console.print(f"[red]apply failed:[/red] status: {escape(str(e))}", highlight=False)
            return 1
        except (KeyError, msgspec.ValidationError) as e:
            console.print(f"[red]apply failed:[/red] the head's status has no valid spec: {escape(str(e))}")
            return 1
        for change in changes:
            if not opts.dry_run and change.action in (Action.CREATE, Action.UPDATE, Action.PRUNE):
                op, args = (
                    ("delete", {"name": change.name})
                    if change.action is Action.PRUNE
                    else ("deploy", msgspec.to_builtins(change.spec))
                )
                try:
                    reply = await client.request(op, args, opts.timeout)
                except (AdminError, TimeoutError) as e:
                    console.print(f"{change.name}: [red]{op} failed:[/red] {escape(str(e))}", highlight=False)
                    return 1
                if op == "deploy" and not reply["changed"]:  # someone deployed the same since the status read
                    change = Change(change.name, Action.UNCHANGED)
            console.print(_line_for(change, opts.dry_run), highlight=False)
    finally:
        client.close()
    if opts.dry_run:
        console.print("dry run: nothing was changed")
    return 0


def main(opts: argparse.Namespace) -> int:
    try:
        declared = load(opts.file)
    except SpecFileError as e:
        err = Console(stderr=True, highlight=False, soft_wrap=True)  # an error line stays whole, for editors
        for line in e.errors:
            err.print(line, markup=False)
        err.print(f"nothing was applied ({len(e.errors)} error{'s' if len(e.errors) > 1 else ''})", markup=False)
        return 2
    return asyncio.run(_apply(opts, declared, Console(soft_wrap=True)))
