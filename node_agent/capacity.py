"""This node's capacity as the agent registers it: CPU slots, GPUs, memory."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

log = logging.getLogger("node_agent")


def default_cpu_slots() -> int:
    """Like nproc: the CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def gpu_count() -> int:
    """GPUs listed by `nvidia-smi -L` (one "GPU n: ..." line each), 0 without nvidia-smi or on its failure."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("nvidia-smi -L failed, registering 0 GPUs: %s", e)
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def memory_bytes(meminfo: str = "/proc/meminfo") -> int:
    """MemTotal from /proc/meminfo, 0 when it cannot be read."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError) as e:
        log.warning("cannot read memory size from %s: %s", meminfo, e)
    return 0
