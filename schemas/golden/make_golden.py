"""Writes the golden vectors: `python -m schemas.golden.make_golden`. Run only when a contract changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack

from schemas.messages import (
    GpuInfo,
    Heartbeat,
    Message,
    ProxyReport,
    Register,
    ReplicaLoad,
    ReplicaState,
    ReplicaStatus,
    Reregister,
    Snapshot,
    SnapshotDeployment,
    SnapshotReplica,
    StartReplica,
    StopReplica,
)
from schemas.ring import (
    Finish,
    Ready,
    Stats,
    Submit,
    SubmitParams,
    TokensGroup,
    cancel_record,
    finish_record,
    ready_record,
    stats_record,
    submit_record,
    tokens_record,
)

HERE = Path(__file__).parent

GOLDEN: dict[str, Message] = {
    # every field away from its default, so a decoder that skips or defaults one is caught
    "snapshot": Snapshot(
        head_id="5f3a9c0e1b2d4e6f",
        epoch=3,
        version=(3 << 32) | 17,
        deployments={
            "demo": SnapshotDeployment(
                max_model_len=2048,
                first_token_timeout_s=7.5,
                idle_timeout_s=2.25,
                replicas=(
                    SnapshotReplica(
                        "demo-r1", "node-a", "127.0.0.1:40001", ReplicaState.READY, 256, ReplicaLoad(5, 2, 0.25), True
                    ),
                    SnapshotReplica(
                        "demo-r2", "node-b", "127.0.0.1:40002", ReplicaState.DRAINING, 64, ReplicaLoad(0, 0, 0.0), False
                    ),
                ),
            ),
            "empty": SnapshotDeployment(max_model_len=0, first_token_timeout_s=0.0, idle_timeout_s=0.0),
        },
    ),
    "snapshot_empty": Snapshot(head_id="00", epoch=1, version=1 << 32, deployments={}),
    "register": Register(
        "node-a",
        "127.0.0.1",
        4,
        (GpuInfo(0, "NVIDIA A100-SXM4-80GB", 80 << 30), GpuInfo(1, "NVIDIA A100-SXM4-80GB", 80 << 30)),
        8 << 30,
        metrics="127.0.0.1:9101",
    ),
    "reregister": Reregister("node-a"),
    "heartbeat": Heartbeat(
        "node-a",
        (
            ReplicaStatus(
                "demo-r1",
                "demo",
                ReplicaState.READY,
                "127.0.0.1:40001",
                ReplicaLoad(3, 0, 0.5),
                healthy=False,
                max_model_len=4096,
                started_at=1764480000.5,
                gpus=(1,),
                replica_metrics="127.0.0.1:9201",
                worker_metrics="127.0.0.1:9202",
            ),
        ),
    ),
    "start_replica": StartReplica("demo-r1", "demo", "sim", {"token_delay_ms": 20, "seed": 7}, 256, gpus=(0, 1)),
    "stop_replica": StopReplica("demo-r1", drain=True),
    # the C++ proxy encodes these same values and compares its bytes to this file
    "proxy_report": ProxyReport(proxy_id="proxy-a", addr="127.0.0.1:8000", snapshot_version=42, open_streams=7),
}


# Ring records (schemas/ring.py), by file name: (ring, kind, record). Every float is exact in float32 (the proto's
# SamplingParams are float), so the C++ codec re-encodes them to the same float64 bytes.
RING_GOLDEN: dict[str, tuple[str, str, list[Any]]] = {
    "ring_submit": (
        "request",
        "SUBMIT",
        submit_record(
            Submit(42, "What is machine learning?", None, SubmitParams(64, 0.5, 0.875, None, ("\n\n",), 0.25, -0.5))
        ),
    ),
    "ring_submit_chat_seed": (
        "request",
        "SUBMIT",
        submit_record(
            Submit(
                (1 << 40) + 1,
                "",
                (("system", "be brief"), ("user", "héllo ✓")),
                SubmitParams(4096, 0.0, 1.0, (1 << 63) + 5, (), 0.0, 0.0, True),
            )
        ),
    ),
    "ring_cancel": ("request", "CANCEL", cancel_record(42)),
    "ring_tokens": ("response", "TOKENS", tokens_record([TokensGroup(42, "Hello", 1, 1764500000123456789)])),
    "ring_tokens_multi": (
        "response",
        "TOKENS",
        tokens_record(
            [
                TokensGroup(42, " wörld", 2, 0),
                TokensGroup(7, "Hi", 1, 1764500000200000000),
                TokensGroup(1 << 40, "✓ done", 3, 0),
                TokensGroup(42, "!", 1, 0),
            ]
        ),
    ),
    "ring_finish": ("response", "FINISH", finish_record(Finish(42, "length", 5, 64))),
    "ring_finish_error": (
        "response",
        "FINISH",
        finish_record(Finish(7, "error", 4097, 0, 400, "the prompt is longer than the context (4097 > 4096 tokens)")),
    ),
    "ring_stats": ("response", "STATS", stats_record(Stats(3, 1, 0.375))),
    "ring_ready": ("response", "READY", ready_record(Ready("sim", "sim", 4096))),
}


def main() -> None:
    for name, msg in GOLDEN.items():
        kind, payload = msg.encode()
        (HERE / f"{name}.msgpack").write_bytes(payload)
    for name, (_, _, record) in RING_GOLDEN.items():
        (HERE / f"{name}.msgpack").write_bytes(msgpack.packb(record))
    lines = [f"{name}.msgpack\t{msg.KIND.name}" for name, msg in GOLDEN.items()]
    lines += [f"{name}.msgpack\tring {ring} {kind}" for name, (ring, kind, _) in RING_GOLDEN.items()]
    (HERE / "README").write_text(
        "One payload per file; its kind: a bus message's (frame 2), or `ring <request|response> <KIND>` for a "
        "shared-memory ring record (schemas/ring.py):\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
