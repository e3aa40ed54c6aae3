"""The asyncio face of the shared-memory rings (schemas/README.md section 3) over the C++ ring (`_ring`).

A `RingReceiver` consumes a ring: it decodes each MessagePack record straight from the shared-memory view and
sleeps on the ring's data eventfd through `loop.add_reader` when the ring is empty. A `RingSender` produces
one: it writes at once and, when the ring is full, queues records in order and flushes them as the consumer
frees space (add_reader on the space eventfd). Either notices a peer process that is gone on a wait that
times out, every `PEER_CHECK_INTERVAL` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import msgpack

from model_worker import _ring

log = logging.getLogger(__name__)

HEADER_SIZE = 256
MIN_CAPACITY = 4096
PEER_CHECK_INTERVAL = 0.5  # seconds a wait lasts before the peer's process is checked
MAX_BATCH = 4096  # records one next_batch() returns at most, so a fast producer cannot starve the loop


class PeerGone(Exception):
    """The process at the other end of a ring is gone."""


class RingFds(NamedTuple):
    mem: int
    data: int
    space: int


def parse_ring_fds(text: str) -> RingFds:
    """Parses "MEM,DATA,SPACE" (three descriptor numbers)."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError(f"ring descriptors must be MEM,DATA,SPACE (three non-negative integers), got {text!r}")
    mem, data, space = (int(p) for p in parts)
    return RingFds(mem, data, space)


def create_ring_fds(capacity: int = 1 << 22) -> RingFds:
    """Creates a ring's memfd (zero-filled: an empty ring) and its two non-blocking eventfds.

    The descriptors are close-on-exec: hand them to a child with `pass_fds`. The caller closes them.
    """
    if capacity < MIN_CAPACITY or capacity & (capacity - 1):
        raise ValueError(f"ring capacity must be a power of two >= {MIN_CAPACITY}, got {capacity}")
    created: list[int] = []
    try:
        created.append(os.memfd_create("tokenbus-ring", os.MFD_CLOEXEC))
        os.ftruncate(created[0], HEADER_SIZE + capacity)
        for _ in range(2):
            created.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
    except OSError:
        for fd in created:
            os.close(fd)
        raise
    return RingFds(*created)


class _Wakeup:
    """An eventfd watched by the running loop; `wait()` returns True when it fires, False on timeout."""

    def __init__(self, fd: int, on_fire: Callable[[], None] | None = None) -> None:
        self._fd = fd
        self._on_fire = on_fire  # called on every firing, after the eventfd is drained
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[bool] | None = None

    def watch(self) -> asyncio.AbstractEventLoop:
        """Registers the eventfd with the running loop (once) and returns the loop."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._fd, self._fired)
        return self._loop

    def _fired(self) -> None:
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:  # drained already (non-blocking eventfd)
            pass
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)
        if self._on_fire is not None:
            self._on_fire()

    async def wait(self, timeout: float) -> bool:
        loop = self.watch()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _resolve, waiter, False)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._loop = None


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


class RingReceiver:
    """The consumer of a ring (the worker's request ring). One next_batch() at a time, from the loop's thread."""

    def __init__(self, fds: RingFds) -> None:
        self._consumer = _ring.Consumer(fds.mem, fds.data, fds.space)
        self._wakeup = _Wakeup(self._consumer.data_fd)

    async def next_batch(self) -> list[Any]:
        """Waits until at least one record is there and returns every record available now, decoded.

        Raises PeerGone once the ring is empty and the producer's process is gone.
        """
        timed_out = False
        while True:
            batch = self._read_available()
            if batch:
                return batch
            if timed_out and not self._consumer.peer_alive():
                raise PeerGone("the ring's producer process is gone")
            timed_out = self._consumer.prepare_wait() and not await self._wakeup.wait(PEER_CHECK_INTERVAL)

    def _read_available(self) -> list[Any]:
        batch: list[Any] = []
        consumer = self._consumer
        while len(batch) < MAX_BATCH and (view := consumer.read()) is not None:
            try:
                batch.append(msgpack.unpackb(view))
            except (ValueError, TypeError) as e:  # msgpack's format errors and bad UTF-8 are ValueErrors
                log.error("dropping a malformed ring record of %d bytes from the producer: %s", len(view), e)
            finally:
                view.release()
                consumer.release()
        return batch

    def close(self) -> None:
        self._wakeup.close()
        self._consumer.close()


class RingSender:
    """The producer of a ring (the worker's response ring). Call it from the event loop's thread."""

    def __init__(self, fds: RingFds) -> None:
        self._producer = _ring.Producer(fds.mem, fds.data, fds.space)
        self._wakeup = _Wakeup(self._producer.space_fd, on_fire=self._flush)
        self._queue: deque[bytes] = deque()  # records the ring had no room for, in order
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._peer_check: asyncio.TimerHandle | None = None
        self._wake: asyncio.Handle | None = None  # the pending wake-up of the consumer, one per loop iteration
        self._gone = False

    @property
    def max_payload(self) -> int:
        """The largest record the ring takes, in bytes (capacity / 4)."""
        return self._producer.max_payload

    def send(self, record: Any, *, wake_now: bool = False) -> None:
        """Packs and writes `record` now, or queues it behind earlier ones when the ring is full.

        The consumer is woken once after this loop iteration's callbacks, or at once with `wake_now` (for a
        record written last in its iteration, such as the worker's batch of the iteration's tokens).
        Raises ValueError for a record larger than the ring's largest, PeerGone once the consumer is known gone.
        """
        if self._gone:
            raise PeerGone("the ring's consumer process is gone")
        data = msgpack.packb(record)
        if not self._producer.fits(len(data)):
            raise ValueError(f"a record of {len(data)} bytes exceeds the ring's largest ({self._producer.max_payload})")
        if self._queue or not self._producer.try_write(data, wake=False):
            self._queue.append(data)
            if len(self._queue) == 1:
                self._start_waiting()
        elif wake_now:
            self._producer.wake_consumer()
        elif self._wake is None:
            # One wake-up for everything this loop iteration writes (the sim engine's tokens due together, a
            # vLLM step's outputs): the consumer, if asleep, is woken once, right after the iteration's callbacks.
            self._wake = asyncio.get_running_loop().call_soon(self._wake_consumer)

    def _wake_consumer(self) -> None:
        self._wake = None
        self._producer.wake_consumer()

    async def drain(self) -> None:
        """Returns once every queued record is in the ring; raises PeerGone if the consumer is gone first."""
        if self._gone:
            raise PeerGone("the ring's consumer process is gone")
        if not self._queue:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    @property
    def queued(self) -> int:
        """Records waiting for room in the ring."""
        return len(self._queue)

    def _start_waiting(self) -> None:
        loop = self._wakeup.watch()
        self._peer_check = loop.call_later(PEER_CHECK_INTERVAL, self._check_peer)
        if not self._producer.prepare_wait():  # room appeared since the refusal
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        while self._queue:
            if self._producer.try_write(self._queue[0]):
                self._queue.popleft()
            elif self._producer.prepare_wait():
                return  # asleep until the consumer frees space and fires space_fd
        if self._peer_check is not None:
            self._peer_check.cancel()
            self._peer_check = None
        self._settle(None)

    def _check_peer(self) -> None:
        self._peer_check = None
        if not self._queue:
            return
        if self._producer.peer_alive():
            self._peer_check = self._wakeup.watch().call_later(PEER_CHECK_INTERVAL, self._check_peer)
            return
        log.error("ring consumer process is gone with %d records queued", len(self._queue))
        self._gone = True
        self._queue.clear()
        self._settle(PeerGone("the ring's consumer process is gone"))

    def _settle(self, error: Exception | None) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def close(self) -> None:
        if self._peer_check is not None:
            self._peer_check.cancel()
            self._peer_check = None
        for waiter in self._drain_waiters:
            waiter.cancel()
        self._drain_waiters = []
        self._queue.clear()
        if self._wake is not None:  # what was written before the close still reaches a sleeping consumer
            self._wake.cancel()
            self._wake_consumer()
        self._wakeup.close()
        self._producer.close()
