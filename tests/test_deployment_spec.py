"""schemas/deployment.py: what a deployment spec accepts, refuses, and how many GPUs a replica takes by default."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from schemas.deployment import MAX_ENGINE_ARGS_BYTES, DeploymentSpec, Engine


def test_gpus_needed_defaults_from_the_parallel_sizes() -> None:
    tp_pp = {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}
    assert DeploymentSpec(name="m", engine=Engine.VLLM, engine_args=tp_pp).gpus_needed() == 4
    assert DeploymentSpec(name="m", engine=Engine.VLLM).gpus_needed() == 1
    assert DeploymentSpec(name="m", engine=Engine.SIM).gpus_needed() == 0
    assert DeploymentSpec(name="m", engine=Engine.VLLM, engine_args=tp_pp, gpus_per_replica=0).gpus_needed() == 0


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"engine_args": {"tensor_parallel_size": "2"}}, "tensor_parallel_size"),
        ({"engine_args": {"pipeline_parallel_size": 0}}, "pipeline_parallel_size"),
        ({"engine_args": {"n": 1 << 70}}, "engine_args"),  # no 64-bit integer: it could not travel on the bus
        ({"engine_args": {"blob": "x" * MAX_ENGINE_ARGS_BYTES}}, "bytes of JSON"),
        ({"placement": "scatter"}, "placement"),
        ({"gpus_per_replica": -1}, "gpus_per_replica"),
        ({"name": "no spaces"}, "name"),
    ],
)
def test_refused_with_the_field_named(fields: dict[str, Any], error: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=error):
        msgspec.convert({"name": "m", "engine": "vllm", **fields}, DeploymentSpec)
