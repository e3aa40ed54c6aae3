"""This node's GPUs as the agent registers them: given by hand (`--gpus`), or found through NVML.

The head places replicas on GPU indices from this list, and the agent hands each replica exactly its own through
CUDA_VISIBLE_DEVICES, so the indices must be NVML's (the CUDA order once CUDA_DEVICE_ORDER=PCI_BUS_ID is set).
"""

from __future__ import annotations

import logging
import re

from schemas.deployment import MAX_GPUS_PER_REPLICA
from schemas.messages import GpuInfo

log = logging.getLogger("node_agent")

MAX_GPUS = 4 * MAX_GPUS_PER_REPLICA  # on one node; more in a --gpus list is a typo
MAX_GPU_NAME = 64
_ENTRY_RE = re.compile(rf"(\d+)(?::([^:,]{{1,{MAX_GPU_NAME}}}))?(?::(\d+(?:\.\d+)?))?")


class GpuSpecError(ValueError):
    """A --gpus value that is neither a count nor a list of INDEX[:NAME[:MEMORY_GIB]]."""


def parse_gpus(spec: str) -> tuple[GpuInfo, ...]:
    """`N` (N GPUs 0..N-1 named "manual", memory unknown) or `INDEX[:NAME[:MEMORY_GIB]],...`."""
    spec = spec.strip()
    if spec.isdigit():
        count = int(spec)
        if count > MAX_GPUS:
            raise GpuSpecError(f"{count} GPUs is more than {MAX_GPUS}")
        return tuple(GpuInfo(index=i, name="manual", memory_bytes=0) for i in range(count))
    gpus: list[GpuInfo] = []
    for entry in spec.split(","):
        m = _ENTRY_RE.fullmatch(entry.strip())
        if m is None:
            raise GpuSpecError(f"{entry!r} is not INDEX[:NAME[:MEMORY_GIB]]")
        index, name, gib = int(m.group(1)), m.group(2) or "manual", float(m.group(3) or 0)
        gpus.append(GpuInfo(index=index, name=name, memory_bytes=int(gib * (1 << 30))))
    indices = [g.index for g in gpus]
    if len(set(indices)) != len(indices):
        raise GpuSpecError(f"GPU indices repeat in {spec!r}")
    if len(gpus) > MAX_GPUS or max(indices) >= MAX_GPUS:
        raise GpuSpecError(f"at most {MAX_GPUS} GPUs, indices below {MAX_GPUS}")
    return tuple(sorted(gpus, key=lambda g: g.index))


def discover_gpus() -> tuple[GpuInfo, ...]:
    """The GPUs NVML lists; none when NVML is missing (no driver, no GPU) or fails."""
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        log.info("no GPUs found through NVML: %s", e)
        return ()
    try:
        gpus = []
        for i in range(min(pynvml.nvmlDeviceGetCount(), MAX_GPUS)):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name  # bytes from older NVML bindings
            memory = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            gpus.append(GpuInfo(index=i, name=name[:MAX_GPU_NAME], memory_bytes=memory))
        return tuple(gpus)
    except pynvml.NVMLError as e:
        log.warning("listing GPUs through NVML failed, registering none: %s", e)
        return ()
    finally:
        pynvml.nvmlShutdown()
