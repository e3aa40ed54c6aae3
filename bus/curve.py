"""The closed control plane: ZeroMQ CURVE keys, the sockets' security options, and the head's ZAP handler.

A key directory (`tokenbus keys gen DIR`) holds the head's key pair (`head.key`, `head.key_secret`), one pair per
client name (`agent.key`, `agent.key_secret`, ...) and, in `authorized/`, the public keys the head accepts. Files are
ZeroMQ's certificate text format (`public-key = "Z85"`, `secret-key = "Z85"`), which the C++ proxy reads too.

The head's ROUTER and PUB are CURVE servers. Every handshake is put to the ZAP handler below, which runs in the
head's own process and event loop: it accepts a client whose public key is one of `authorized/*.key` and names it
by that file's name (the ZAP user id, readable on each message it sends as the `User-Id` property), and refuses any
other. A client without keys does not get past the handshake at all (a NULL client meets a CURVE server). The
server sockets enforce ZAP (ZMQ_ZAP_ENFORCE_DOMAIN): without a handler bound they refuse everyone rather than
accepting everyone, which is libzmq's default.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)

KEYS_ENV = "TOKENBUS_KEYS"  # the default of every --keys
HEAD_KEY = "head"
DEFAULT_CLIENTS = ("agent", "proxy", "cli")
AUTHORIZED = "authorized"  # the subdirectory of the public keys the head accepts
KEY_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a key's name is a file name and a user id in the logs
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP protocol (RFC 27)
ZAP_VERSION = b"1.0"
ZAP_DOMAIN = b"tokenbus"
# A refused client retries every reconnect interval (100 ms): its address is logged once, then at most once a
# minute with the refusals in between; the addresses remembered for that are bounded.
REFUSAL_LOG_INTERVAL_S = 60.0
MAX_REFUSED_PEERS = 1024
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class CurveKeyError(Exception):
    """A key directory or key file that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class ServerKeys:
    secret: bytes  # Z85
    authorized: dict[bytes, str]  # client public key (raw, 32 bytes) -> its name


@dataclass(frozen=True)
class ClientKeys:
    name: str
    public: bytes  # Z85
    secret: bytes  # Z85
    server_public: bytes  # Z85, the head's


def check_key_name(name: str) -> str:
    if not KEY_NAME_RE.fullmatch(name):
        raise CurveKeyError(f"a key name must be 1-64 characters of [A-Za-z0-9_-], got {name!r}")
    return name


# --- files ---------------------------------------------------------------------------------------------------


def generate(directory: Path, clients: list[str]) -> list[str]:
    """Writes the head's key pair and each client's into `directory` (created if needed), and each client's public
    key into `directory/authorized/`. Keys already there are kept, never overwritten: the directory's other holders
    keep working. Returns one line per key pair saying what was done."""
    for name in clients:
        check_key_name(name)
    authorized = directory / AUTHORIZED
    authorized.mkdir(parents=True, exist_ok=True)
    done = []
    for name in (HEAD_KEY, *clients):
        public = directory / f"{name}.key"
        if public.exists():
            done.append(f"{name}: kept {public}")
            continue
        # made in a private directory, then moved in: a secret is never readable by others, not even for a moment
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            tmp_public, tmp_secret = zmq.auth.create_certificates(tmp, name)
            os.chmod(tmp_secret, 0o600)
            os.chmod(tmp_public, 0o644)
            if name != HEAD_KEY:
                shutil.copy2(tmp_public, authorized / public.name)
            os.replace(tmp_secret, directory / f"{name}.key_secret")
            os.replace(tmp_public, public)
        done.append(f"{name}: wrote {public} and {public}_secret" + ("" if name == HEAD_KEY else ", authorized"))
    return done


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise CurveKeyError(f"cannot read the key file {path}: {e}") from None
    if secret and secret_key is None:
        raise CurveKeyError(f"{path} holds no secret key")
    if secret and path.stat().st_mode & 0o077:  # as ssh warns of a private key others can read (copied without -p)
        log.warning("%s holds a secret key and others can read it: chmod 600 %s", path, path)
    for key in (public, secret_key):
        if key is not None and not _is_z85_key(key):
            raise CurveKeyError(f"{path} holds a key that is not 40 characters of Z85")
    return public, secret_key


def _is_z85_key(key: bytes) -> bool:
    if len(key) != 40:  # a 32-byte key is 40 characters of Z85
        return False
    try:
        z85.decode(key)
    except KeyError:  # a character outside Z85's alphabet
        return False
    return True


def load_server(directory: Path) -> ServerKeys:
    """The head's secret key and the clients it accepts (`authorized/*.key`, named by their file names)."""
    _, secret = _load(directory / f"{HEAD_KEY}.key_secret", secret=True)
    assert secret is not None
    authorized: dict[bytes, str] = {}
    for path in sorted((directory / AUTHORIZED).glob("*.key")):
        public, _ = _load(path, secret=False)
        authorized[z85.decode(public)] = path.stem
    if not authorized:
        raise CurveKeyError(f"no client keys in {directory / AUTHORIZED}: the head would accept no one")
    return ServerKeys(secret, authorized)


def load_client(directory: Path, name: str) -> ClientKeys:
    """The head's public key and the key pair `name` of `directory`."""
    server_public, _ = _load(directory / f"{HEAD_KEY}.key", secret=False)
    public, secret = _load(directory / f"{check_key_name(name)}.key_secret", secret=True)
    assert secret is not None
    return ClientKeys(name, public, secret, server_public)


# --- sockets -------------------------------------------------------------------------------------------------


def secure_server(sock: zmq.Socket, keys: ServerKeys | None) -> None:
    """Makes `sock` (before it binds) a CURVE server whose clients are put to the ZAP handler; no keys: as it is."""
    if keys is None:
        return
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def secure_client(sock: zmq.Socket, keys: ClientKeys | None) -> None:
    """Makes `sock` (before it connects) a CURVE client of the head; no keys: as it is."""
    if keys is None:
        return
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


class HandshakeWatch:
    """A client socket's failed handshakes with the head (a socket monitor), told as why the head refuses the client:
    a client sees only silence otherwise. Made before the socket connects."""

    def __init__(self, sock: zmq.Socket, keys: ClientKeys | None) -> None:
        self._sock = sock
        self._keys = keys
        self._monitor = sock.get_monitor_socket(HANDSHAKE_FAILED)

    def refusal(self) -> str | None:
        """Why the latest handshake since the last call failed; None when none did."""
        event = None
        while True:
            try:  # the sync reads of zmq.Socket: no future, no wait (an event's two frames arrive together)
                frames = [zmq.Socket.recv(self._monitor, zmq.NOBLOCK)]
            except zmq.Again:
                break
            frames.append(zmq.Socket.recv(self._monitor, zmq.NOBLOCK))
            event = parse_monitor_message(frames)["event"]
        if event is None:
            return None
        if self._keys is None:
            return "the head ended the handshake: it may want CURVE keys (--keys DIR)"
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return f"the head refused the key {self._keys.name!r}: it is not among the head's authorized keys"
        return "the CURVE handshake failed: is DIR/head.key this head's public key, and does the head run with --keys?"

    def close(self) -> None:
        self._sock.disable_monitor()
        self._monitor.close(linger=0)


# --- command lines -------------------------------------------------------------------------------------------


def add_client_args(p: argparse.ArgumentParser, default_name: str) -> None:
    """--keys and --key-name, for a process that connects to the head."""
    p.add_argument(
        "--keys",
        type=Path,
        default=os.environ.get(KEYS_ENV) or None,
        metavar="DIR",
        help=f"connect with CURVE, using DIR/head.key and DIR/NAME.key_secret (default ${KEYS_ENV} when set)",
    )
    p.add_argument("--key-name", default=default_name, metavar="NAME", help=f"default {default_name}")


def client_keys(opts: argparse.Namespace) -> ClientKeys | None:
    """The keys --keys and --key-name name, or None without --keys; raises CurveKeyError."""
    return load_client(opts.keys, opts.key_name) if opts.keys is not None else None


# --- the ZAP handler -----------------------------------------------------------------------------------------


class ZapHandler:
    """Answers libzmq's ZAP requests for the CURVE servers of its context: known public keys only."""

    def __init__(self, keys: ServerKeys, ctx: zmq.asyncio.Context) -> None:
        self._authorized = keys.authorized
        self._ctx = ctx
        self._sock: zmq.asyncio.Socket | None = None
        self._refused: dict[str, tuple[float, int]] = {}  # peer address -> (last logged, refusals since)
        self.refusals = 0

    def bind(self) -> None:
        """Binds the ZAP endpoint; must happen before the server sockets bind (they enforce ZAP)."""
        sock = self._ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(ZAP_ENDPOINT)
        self._sock = sock
        log.info("CURVE: %d client keys accepted (%s)", len(self._authorized), ", ".join(self._authorized.values()))

    async def run(self) -> None:
        """Answers requests until cancelled; the socket stays bound (close() ends it)."""
        assert self._sock is not None
        while True:
            request = await self._sock.recv_multipart()
            await self._sock.send_multipart(self._reply(request))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _reply(self, request: list[bytes]) -> list[bytes]:
        # version, request id, domain, address, routing id, mechanism, credentials (CURVE: the client's public key)
        if len(request) < 6 or request[0] != ZAP_VERSION:
            log.error("CURVE: a malformed ZAP request (%d frames) refused", len(request))
            return [ZAP_VERSION, request[1] if len(request) > 1 else b"", b"500", b"malformed request", b"", b""]
        request_id, address, mechanism, credentials = request[1], request[3], request[5], request[6:]
        name = self._authorized.get(credentials[0]) if mechanism == b"CURVE" and len(credentials) == 1 else None
        if name is not None:
            return [ZAP_VERSION, request_id, b"200", b"OK", name.encode(), b""]
        key = z85.encode(credentials[0]).decode() if len(credentials) == 1 and len(credentials[0]) == 32 else "-"
        self._log_refusal(address.decode(errors="replace"), mechanism.decode(errors="replace"), key)
        return [ZAP_VERSION, request_id, b"400", b"unknown key", b"", b""]

    def _log_refusal(self, address: str, mechanism: str, key: str) -> None:
        self.refusals += 1
        now = time.monotonic()
        last, since = self._refused.pop(address, (float("-inf"), 0))
        if now - last < REFUSAL_LOG_INTERVAL_S:
            self._refused[address] = (last, since + 1)
            return
        if len(self._refused) >= MAX_REFUSED_PEERS:
            del self._refused[next(iter(self._refused))]  # the address refused longest ago
        self._refused[address] = (now, 0)
        log.warning(
            "CURVE: refused peer %s (%s, public key %s): not an authorized key%s",
            address,
            mechanism,
            key,
            f"; {since} more refusals since the last line" if since else "",
        )
