"""A bounded receive for the bus: a multipart message over the size or frame limit is dropped as a whole.

ZMQ_MAXMSGSIZE bounds each frame, not the message, so a peer can send 200 MB in 64 frames of 3 MB each. This
receive reads a message frame by frame without copying (`copy=False`), keeps a running total, and once the
total passes `MAX_MESSAGE_BYTES`, or the count passes `MAX_FRAMES`, releases what it held and discards the
rest of the message frame by frame: no copy of an oversized message is ever made, and each discarded frame
goes back to libzmq at once. The drop is counted in `tokenbus_bus_dropped_messages_total{socket, reason}` and
logged once with the peer and the size.

What it cannot bound: libzmq makes a multipart message readable only once all of its frames have arrived, so
the receiving process briefly holds the whole message inside libzmq before the first frame can be read.
`limit_frames` (ZMQ_MAXMSGSIZE per frame) stays the first line of defence: a peer sending one frame over it is
disconnected by libzmq before any of it is buffered.

A message received keeps its first frame, whose `User-Id` property (set by the head's ZAP handler, bus/curve.py)
names the CURVE key its sender authenticated with: the drop's log line, and the head's for a message it cannot
decode, name the peer by it as well as by its routing identity.
"""

from __future__ import annotations

import logging

import zmq
import zmq.asyncio
from prometheus_client import Counter

from schemas.messages import MAX_PAYLOAD_BYTES

log = logging.getLogger(__name__)

# Room beside the payload: the one-byte kind frame and a ROUTER's routing identity (at most 255 bytes).
ENVELOPE_BYTES = 256
MAX_MESSAGE_BYTES = MAX_PAYLOAD_BYTES + ENVELOPE_BYTES  # all frames of one message together, identity included
MAX_FRAMES = 4  # the most a valid bus message has: routing identity, REQ-style empty delimiter, kind, payload

DROPPED_MESSAGES = Counter(
    "tokenbus_bus_dropped_messages",
    "Bus messages dropped whole on receive, by socket and reason (too_large, too_many_frames)",
    ["socket", "reason"],
)

_sync_recv = zmq.Socket.recv  # the remaining frames are already queued: read them without a future each


class Frames(list[bytes]):
    """A received message's frames, and who sent it."""

    def __init__(self, first: zmq.Frame) -> None:
        super().__init__()
        self._first = first

    @property
    def user_id(self) -> str | None:
        """The name of the CURVE key the sender authenticated with, None without CURVE."""
        return user_id(self._first)


def user_id(frame: zmq.Frame) -> str | None:
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:  # EINVAL: no such property, the peer did not authenticate
        return None


def describe_peer(name: str, key: str | None) -> str:
    """A peer in a log line: its routing identity or endpoint, and the name of its key when it has one."""
    return name if key is None else f"{name} (key {key})"


def limit_frames(sock: zmq.Socket) -> None:
    """Sets ZMQ_MAXMSGSIZE so that libzmq disconnects a peer sending any single frame over the message limit."""
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)


async def recv_bounded(sock: zmq.asyncio.Socket, socket_name: str, flags: int = 0) -> Frames | None:
    """Receives one multipart message, as recv_multipart would, or None when it was over a limit and dropped.

    `socket_name` labels the drop counter and the log line (for example "head-router"). With zmq.NOBLOCK it
    raises zmq.Again when no message is waiting, as recv_multipart does.
    """
    frame = await sock.recv(flags, copy=False)
    frames = Frames(frame)
    total = 0
    while True:
        total += len(frame)
        if total > MAX_MESSAGE_BYTES or len(frames) == MAX_FRAMES:
            reason = "too_large" if total > MAX_MESSAGE_BYTES else "too_many_frames"
            _drop(sock, socket_name, reason, frames, frame, total)
            return None
        frames.append(frame.bytes)  # the only copy, made once the frame is known to fit
        if not frame.more:
            return frames
        # libzmq delivers a message only once all of its frames are there, so this never waits
        frame = _sync_recv(sock, zmq.NOBLOCK, copy=False)


def _drop(sock: zmq.asyncio.Socket, socket_name: str, reason: str, kept: Frames, frame: zmq.Frame, total: int) -> None:
    """Releases the frames kept so far, discards the rest of the message, then counts and logs the drop once."""
    # the first frame is the peer's routing identity on a ROUTER; elsewhere the connected endpoint names the peer
    name = kept[0].hex() if kept and sock.type == zmq.ROUTER else sock.getsockopt_string(zmq.LAST_ENDPOINT)
    peer = describe_peer(name, user_id(frame))
    count = len(kept) + 1
    kept.clear()
    while frame.more:
        frame = _sync_recv(sock, zmq.NOBLOCK, copy=False)
        total += len(frame)
        count += 1
    DROPPED_MESSAGES.labels(socket_name, reason).inc()
    log.warning(
        "dropped a bus message on %s from peer %s: %d bytes in %d frames (limits: %d bytes, %d frames)",
        socket_name,
        peer,
        total,
        count,
        MAX_MESSAGE_BYTES,
        MAX_FRAMES,
    )
