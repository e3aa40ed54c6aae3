"""Emulated hosts on one machine: Linux network namespaces joined by veth pairs to a bridge.

The bridge lives in a namespace of its own (the "switch"), so nothing here touches the machine's own network: no
interface, address or route is added to the namespace the tests run in. Each host is a namespace with loopback up
and one veth, `eth0`, whose other end is a port of the bridge named after the host; the hosts share a private /24,
10.213.X.0/24 with X chosen at random among those not already used by the machine. Cutting a host off sets its
bridge port down: its packets are dropped silently, as when a cable is pulled, so peers see timeouts, not refusals.

Processes run on a host through `ip netns exec NS ...`, as a user would run them on that machine. The test process
itself can enter a host's namespace for a while (`Network.entered`): the sockets it opens there belong to that host.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import ipaddress
import os
import random
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000  # <sched.h>: setns() into a network namespace
SUBNET_PREFIX = "10.213"  # the hosts' /24 is 10.213.X.0/24
IP_TIMEOUT_S = 30.0  # one `ip` command (the machine is busy, and namespace teardown can take a while)
BRIDGE = "br0"
HOST_DEV = "eth0"

_setns = ctypes.CDLL(None, use_errno=True).setns


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")


class NetnsError(Exception):
    """An `ip` command failed; the message holds the command and what it printed."""


@functools.cache
def unavailable() -> str | None:
    """Why network namespaces cannot be made here (not root, no CAP_NET_ADMIN, no `ip`), or None; checked once."""
    probe = f"tb-probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as e:
        return f"cannot create a network namespace (needs root or CAP_NET_ADMIN, and iproute2): {e}"
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.213.X.0/24 that none of the machine's addresses or routes overlaps."""
    used: list[ipaddress.IPv4Network] = []
    for cmd in (["ip", "-4", "-o", "addr"], ["ip", "-4", "route"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=True).stdout
        for word in out.split():
            with contextlib.suppress(ValueError):
                used.append(ipaddress.IPv4Network(word, strict=False))
    candidates = [ipaddress.IPv4Network(f"{SUBNET_PREFIX}.{x}.0/24") for x in range(256)]
    free = [net for net in candidates if not any(net.overlaps(u) for u in used)]
    if not free:
        raise NetnsError(f"every {SUBNET_PREFIX}.X.0/24 overlaps an address or route of this machine")
    return random.choice(free)


@dataclass(frozen=True)
class Host:
    name: str  # "head", "n1", ...: also the name of its port on the bridge
    netns: str  # tb-<random>-<name>
    ip: str


class Network:
    """One switch namespace with a bridge and one namespace per host; `create()` builds it, `destroy()` removes every
    namespace it made (and so every veth: an interface goes with its namespace). Processes must be gone first: a
    namespace whose name is deleted lives on while a process runs in it."""

    def __init__(self, hosts: Sequence[str]) -> None:
        self.tag = f"tb-{secrets.token_hex(3)}"
        self.subnet = _free_subnet()
        addresses = self.subnet.hosts()
        self.hosts = {name: Host(name, f"{self.tag}-{name}", str(next(addresses))) for name in hosts}
        self.switch = f"{self.tag}-sw"
        self._made: list[str] = []  # namespaces created, in order

    def create(self) -> Network:
        self._add_netns(self.switch)
        _ip("-n", self.switch, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", self.switch, "link", "set", BRIDGE, "up")
        for host in self.hosts.values():
            self._add_netns(host.netns)
            _ip("-n", host.netns, "link", "set", "lo", "up")
            # both ends made where they belong: no name is ever taken in the machine's own namespace
            _ip(
                "-n",
                self.switch,
                "link",
                "add",
                host.name,
                "type",
                "veth",
                "peer",
                "name",
                HOST_DEV,
                "netns",
                host.netns,
            )
            _ip("-n", self.switch, "link", "set", host.name, "master", BRIDGE, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.ip}/{self.subnet.prefixlen}", "dev", HOST_DEV)
            _ip("-n", host.netns, "link", "set", HOST_DEV, "up")
        return self

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def destroy(self) -> None:
        errors = []
        while self._made:
            name = self._made.pop()
            try:
                _ip("netns", "del", name)
            except NetnsError as e:
                errors.append(str(e))
        if errors:
            raise NetnsError("; ".join(errors))

    def exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """`argv` run on `host`."""
        return ["ip", "netns", "exec", self.hosts[host].netns, *argv]

    def set_link(self, host: str, up: bool) -> None:
        """Connects (`up`) or cuts off `host`: its port on the bridge, so the host itself notices nothing at once."""
        _ip("-n", self.switch, "link", "set", host, "up" if up else "down")

    @contextlib.contextmanager
    def entered(self, host: str) -> Iterator[None]:
        """The calling thread in `host`'s namespace, and back where it was after. Sockets opened meanwhile stay on
        `host`; so do threads started meanwhile (libzmq's I/O threads: give such code a context of its own)."""
        with open("/proc/thread-self/ns/net", "rb") as home, open(f"/run/netns/{self.hosts[host].netns}", "rb") as ns:
            _enter(ns.fileno())
            try:
                yield
            finally:
                _enter(home.fileno())


def _enter(fd: int) -> None:
    if _setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")
