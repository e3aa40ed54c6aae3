"""The admin client: a DEALER to the head's ROUTER, one request at a time, replies matched by request_id."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import Any

import zmq
import zmq.asyncio

from bus.bounded_recv import limit_frames, recv_bounded
from bus.curve import ClientKeys, HandshakeWatch, secure_client
from schemas.messages import AdminReply, AdminRequest, MessageError, decode

log = logging.getLogger(__name__)


class AdminError(Exception):
    """The head refused the request (ok=false), or did not answer in time (AdminTimeout)."""


class AdminTimeout(AdminError, TimeoutError):
    """No answer from the head before the timeout."""


class AdminClient:
    def __init__(
        self, endpoint: str, *, keys: ClientKeys | None = None, ctx: zmq.asyncio.Context | None = None
    ) -> None:
        self._endpoint = endpoint
        self._keys = keys
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._watch: HandshakeWatch | None = None
        self._lock = asyncio.Lock()  # one request in flight: the reply read belongs to it
        # ids start at a per-process offset so two clients' stale replies are unlikely to match each other
        self._ids = itertools.count((os.getpid() & 0xFFFF) << 32 | 1)

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.DEALER)
            self._sock.setsockopt(zmq.LINGER, 0)
            limit_frames(self._sock)
            secure_client(self._sock, self._keys)  # a head with keys answers nothing without them
            self._watch = HandshakeWatch(self._sock, self._keys)
            self._sock.connect(self._endpoint)
        return self._sock

    async def request(self, op: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """Sends `op` and returns the reply's data; raises AdminError on ok=false, AdminTimeout on no answer."""
        async with self._lock:
            sock = self._socket()
            request_id = next(self._ids)
            await sock.send_multipart(AdminRequest(request_id, op, args or {}).encode())
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not await sock.poll(remaining * 1000, zmq.POLLIN):
                    assert self._watch is not None  # made with the socket
                    why = self._watch.refusal()
                    raise AdminTimeout(
                        f"no answer from the head at {self._endpoint} in {timeout} s" + (f": {why}" if why else "")
                    )
                frames = await recv_bounded(sock, "admin-dealer")
                if frames is None:
                    continue  # over the bus limits: counted and logged
                try:
                    reply = decode(frames)
                except MessageError as e:
                    log.warning("dropped a bad message from the head at %s: %s", self._endpoint, e)
                    continue
                if not isinstance(reply, AdminReply) or reply.request_id != request_id:
                    continue  # the late answer to an earlier request that timed out
                if not reply.ok:
                    raise AdminError(reply.error or f"{op} failed")
                return reply.data

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
