"""This node's capacity as the agent registers it: CPU slots and memory (its GPUs: gpus.py)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("node_agent")


def default_cpu_slots() -> int:
    """Like nproc: the CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


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
