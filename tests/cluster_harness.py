"""End-to-end test helpers: the local cluster (tools.local_cluster) and a replica's Stats over real gRPC."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from schemas.rpc import pb, pb_grpc
from tools.local_cluster import STARTUP_DEADLINE_S, LocalCluster

__all__ = ["LocalCluster", "deployed_cluster", "replica_stats"]


@contextlib.contextmanager
def deployed_cluster(
    state_dir: Path, spec: dict[str, Any], timeout: float = STARTUP_DEADLINE_S, **cluster_args: Any
) -> Iterator[tuple[LocalCluster, list[str]]]:
    """A started local cluster with `spec` deployed and READY, and its replicas' gRPC addresses; stopped after."""
    c = LocalCluster(state_dir, **cluster_args)
    try:
        c.start()
        yield c, asyncio.run(c.deploy(spec, timeout))
    finally:
        c.stop()


async def replica_stats(address: str) -> Any:
    """The replica's Stats over real gRPC."""
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        return await pb_grpc.ReplicaStub(channel).Stats(pb.StatsRequest(), timeout=5.0)
