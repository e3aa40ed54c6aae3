"""Writes the golden vectors: `python -m schemas.golden.make_golden`. Run only when a contract changes."""

from __future__ import annotations

from pathlib import Path

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


def main() -> None:
    for name, msg in GOLDEN.items():
        kind, payload = msg.encode()
        (HERE / f"{name}.msgpack").write_bytes(payload)
    lines = [f"{name}.msgpack\t{msg.KIND.name}" for name, msg in GOLDEN.items()]
    (HERE / "README").write_text("One payload (frame 2) per file; its kind:\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
