"""End-to-end test helpers: the local cluster (tools.local_cluster) and a replica's Stats over real gRPC."""

from __future__ import annotations

from typing import Any

from schemas.rpc import pb, pb_grpc
from tools.local_cluster import LocalCluster

__all__ = ["LocalCluster", "replica_stats"]


async def replica_stats(address: str) -> Any:
    """The replica's Stats over real gRPC."""
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        return await pb_grpc.ReplicaStub(channel).Stats(pb.StatsRequest(), timeout=5.0)
