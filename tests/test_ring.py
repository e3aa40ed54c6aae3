"""model_worker.ring over the C++ ring binding, with real child processes at the other end.

Needs the binding built first (`make build`, or `cmake --build <build> --target _ring`).
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest

from model_worker import _ring
from model_worker.ring import PeerGone, RingFds, RingReceiver, RingSender, create_ring_fds, parse_ring_fds
from schemas.rpc import pb, pb_grpc

DEADLINE = 10.0  # seconds; only a broken wake-up or peer check comes near it

# A second process producing `count` records into the ring named by argv[1], through RingSender.
PRODUCER = """
import asyncio, sys
from model_worker.ring import RingSender, parse_ring_fds

async def main() -> None:
    sender = RingSender(parse_ring_fds(sys.argv[1]))
    for i in range(int(sys.argv[2])):
        sender.send([1, i, "x" * (i % 700), {"n": i}])
    await sender.drain()
    sender.close()

asyncio.run(main())
"""

# A process that attaches to the ring as `argv[2]` (producer or consumer), says so, and waits to be killed.
ATTACH_AND_SLEEP = """
import sys, time
from model_worker import _ring
fds = [int(x) for x in sys.argv[1].split(",")]
side = _ring.Producer(*fds) if sys.argv[2] == "producer" else _ring.Consumer(*fds)
print("attached", flush=True)
time.sleep(60)
"""


@pytest.fixture
def ring() -> Iterator[RingFds]:
    fds = create_ring_fds(4096)
    yield fds
    for fd in fds:
        os.close(fd)


def fds_arg(fds: RingFds) -> str:
    return f"{fds.mem},{fds.data},{fds.space}"


async def spawn(script: str, fds: RingFds, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, fds_arg(fds), *args, pass_fds=tuple(fds), stdout=asyncio.subprocess.PIPE
    )


async def spawn_attached(fds: RingFds, side: str) -> asyncio.subprocess.Process:
    proc = await spawn(ATTACH_AND_SLEEP, fds, side)
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), DEADLINE) == b"attached\n"
    return proc


def expected_record(i: int) -> list:
    return [1, i, "x" * (i % 700), {"n": i}]


def test_parse_ring_fds() -> None:
    assert parse_ring_fds("3,4,5") == RingFds(3, 4, 5)
    for bad in ["", "3,4", "3,4,5,6", "3,,5", "a,4,5", "-1,4,5", "3,4,５"]:
        with pytest.raises(ValueError, match="MEM,DATA,SPACE"):
            parse_ring_fds(bad)


def test_create_ring_fds_rejects_a_capacity_that_is_not_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        create_ring_fds(5000)


async def test_records_from_another_process_arrive_in_order(ring: RingFds) -> None:
    receiver = RingReceiver(ring)
    count = 3000  # ~1 MB through a 4 KiB ring: the child's sender queues and waits for space many times
    proc = await spawn(PRODUCER, ring, str(count))
    got: list = []
    while len(got) < count:
        got += await asyncio.wait_for(receiver.next_batch(), DEADLINE)
    assert got == [expected_record(i) for i in range(count)]
    assert await asyncio.wait_for(proc.wait(), DEADLINE) == 0
    with pytest.raises(PeerGone):  # the producer exited
        await asyncio.wait_for(receiver.next_batch(), DEADLINE)
    receiver.close()


def data_fd_fired(consumer: Any) -> bool:
    return bool(select.select([consumer.data_fd], [], [], 0)[0])


async def test_one_wake_up_per_loop_iteration_and_none_lost_at_close(ring: RingFds) -> None:
    consumer = _ring.Consumer(*ring)  # a consumer that has announced its sleep on data_fd
    assert consumer.prepare_wait()
    sender = RingSender(ring)
    sender.send([3, 1, "a", 1])
    sender.send([3, 1, "b", 1])
    assert not data_fd_fired(consumer)  # written, but the wake-up waits for the end of this loop iteration
    await asyncio.sleep(0)  # one loop iteration: the deferred wake-up runs
    assert data_fd_fired(consumer)
    os.eventfd_read(consumer.data_fd)  # back to zero: asleep again, with the two records still unread
    assert not consumer.prepare_wait()  # the ring is not empty: no sleep announced
    while consumer.read() is not None:
        consumer.release()
    assert consumer.prepare_wait()
    sender.send([3, 1, "last words", 1])
    sender.close()  # before the loop could run the deferred wake-up: close() wakes the consumer itself
    assert data_fd_fired(consumer)
    assert msgpack.unpackb(consumer.read()) == [3, 1, "last words", 1]
    consumer.close()


async def test_a_full_ring_queues_in_order_and_flushes_as_space_frees(ring: RingFds) -> None:
    sender = RingSender(ring)
    receiver = RingReceiver(ring)
    records = [[1, i, "y" * 400] for i in range(200)]
    for record in records:
        sender.send(record)
    assert sender.queued > 150  # the ring holds ~9 of them: the rest wait in order

    drain = asyncio.create_task(sender.drain())
    got: list = []
    while len(got) < len(records):
        got += await asyncio.wait_for(receiver.next_batch(), DEADLINE)
    assert got == records
    await asyncio.wait_for(drain, DEADLINE)
    assert sender.queued == 0
    sender.close()
    receiver.close()


async def test_a_record_too_big_for_the_ring_is_refused_and_the_ring_still_works(ring: RingFds) -> None:
    sender = RingSender(ring)
    receiver = RingReceiver(ring)
    with pytest.raises(ValueError, match="largest"):
        sender.send("z" * 2000)  # capacity 4096: 1024 bytes at most
    sender.send([2, 7])
    assert await asyncio.wait_for(receiver.next_batch(), DEADLINE) == [[2, 7]]
    sender.close()
    receiver.close()


async def test_a_malformed_record_is_dropped_and_the_next_one_arrives(ring: RingFds) -> None:
    producer = _ring.Producer(*ring)
    receiver = RingReceiver(ring)
    assert producer.try_write(b"\xc1")  # 0xc1 is never used by MessagePack
    assert producer.try_write(msgpack.packb([2, 9]))
    assert await asyncio.wait_for(receiver.next_batch(), DEADLINE) == [[2, 9]]
    producer.close()
    receiver.close()


async def test_receiver_raises_peer_gone_after_the_producer_is_killed(ring: RingFds) -> None:
    receiver = RingReceiver(ring)
    proc = await spawn_attached(ring, "producer")
    waiting = asyncio.create_task(receiver.next_batch())
    await asyncio.sleep(0)  # let it start waiting; it must notice the death on its own
    proc.kill()
    with pytest.raises(PeerGone):
        await asyncio.wait_for(waiting, DEADLINE)
    await proc.wait()
    receiver.close()


async def test_sender_drain_raises_peer_gone_after_the_consumer_is_killed(ring: RingFds) -> None:
    sender = RingSender(ring)
    proc = await spawn_attached(ring, "consumer")
    for i in range(50):
        sender.send([1, i, "w" * 300])
    assert sender.queued > 0  # nobody reads: the ring is full
    proc.kill()
    with pytest.raises(PeerGone):
        await asyncio.wait_for(sender.drain(), DEADLINE)
    with pytest.raises(PeerGone):
        sender.send([2, 1])
    await proc.wait()
    sender.close()


def replica_binary() -> str:
    bin_dir = os.environ.get("TOKENBUS_BIN_DIR", str(Path(__file__).resolve().parents[1] / "build" / "bin"))
    path = os.path.join(bin_dir, "tokenbus-replica")
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run `make build` or set TOKENBUS_BIN_DIR")
    return path


@pytest.fixture
def replica_rings() -> Iterator[tuple[RingFds, RingFds]]:
    request, response = create_ring_fds(1 << 16), create_ring_fds(1 << 16)
    yield request, response
    for fd in (*request, *response):
        os.close(fd)


async def start_replica(request: RingFds, response: RingFds) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        replica_binary(),
        *("--listen", "127.0.0.1:0", "--replica-id", "py-test"),
        *("--req-ring", fds_arg(request), "--resp-ring", fds_arg(response)),
        pass_fds=(*request, *response),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), DEADLINE)).decode()
    assert line.startswith("LISTENING 127.0.0.1:"), line
    return proc, line.split()[1]


async def test_the_replica_binary_serves_a_python_worker(replica_rings: tuple[RingFds, RingFds]) -> None:
    request_ring, response_ring = replica_rings
    proc, address = await start_replica(request_ring, response_ring)
    receiver, sender = RingReceiver(request_ring), RingSender(response_ring)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ReplicaStub(channel)
        assert not (await stub.Health(pb.HealthRequest())).serving
        sender.send([4, {"engine": "sim", "model": "tiny", "max_model_len": 128}])
        sender.send([3, 1, 2, 0.5])
        for _ in range(1000):  # poll with a deadline: READY is read by the replica's own thread
            if (await stub.Health(pb.HealthRequest())).serving:
                break
            await asyncio.sleep(0.01)
        assert (await stub.Health(pb.HealthRequest())).model == "tiny"
        stats = await stub.Stats(pb.StatsRequest())
        assert (stats.running, stats.waiting, stats.kv_usage) == (1, 2, 0.5)

        call = stub.Generate(pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(max_tokens=3, top_p=0.9)))
        [submit] = await asyncio.wait_for(receiver.next_batch(), DEADLINE)
        kind, request_id, prompt, messages, params = submit
        assert (kind, prompt, messages, params["max_tokens"], params["seed"]) == (1, "hi", None, 3, None)
        assert params["top_p"] == pytest.approx(0.9)
        sender.send([1, request_id, "a ", 1, 0, request_id, "b ", 1, 0])  # a batched TOKENS record: two groups
        sender.send([1, request_id, "c", 1, 0])
        sender.send([2, request_id, "length", 1, 3, 0, ""])
        chunks = [chunk async for chunk in call]
        assert "".join(c.text for c in chunks) == "a b c"
        assert sum(c.tokens for c in chunks) == 3
        last = chunks[-1]
        assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (pb.FINISH_REASON_LENGTH, 1, 3)

        held = stub.Generate(pb.GenerateRequest(prompt="held"))
        [submit] = await asyncio.wait_for(receiver.next_batch(), DEADLINE)
        sender.send([1, submit[1], "x", 1, 0])
        assert (await held.read()).text == "x"
        held.cancel()
        assert await asyncio.wait_for(receiver.next_batch(), DEADLINE) == [[2, submit[1]]]
        sender.send([2, submit[1], "abort", 1, 1, 0, ""])  # answered, as the contract says; the replica drops it

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), DEADLINE) == 0
    receiver.close()
    sender.close()


async def test_the_replica_binary_exits_non_zero_when_its_worker_dies(
    replica_rings: tuple[RingFds, RingFds],
) -> None:
    request_ring, response_ring = replica_rings
    worker = await spawn_attached(response_ring, "producer")
    proc, _ = await start_replica(request_ring, response_ring)
    worker.kill()
    await worker.wait()
    assert await asyncio.wait_for(proc.wait(), DEADLINE) == 1
