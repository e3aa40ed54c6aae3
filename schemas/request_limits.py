"""The request limits and sampling defaults of `request_limits.json`, read once at import.

The proxy checks them at the edge (through a header CMake generates from the same file); the model worker checks
every SUBMIT record against them again (model_worker/records.py), so the two ends cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple


class Range(NamedTuple):
    """A sampling parameter's bounds and default; `low_exclusive` when the lower bound itself is refused."""

    low: float
    high: float
    default: float
    low_exclusive: bool

    def contains(self, value: float) -> bool:
        return (self.low < value if self.low_exclusive else self.low <= value) and value <= self.high

    def describe(self) -> str:
        return f"{'>' if self.low_exclusive else '>='} {self.low:g} and <= {self.high:g}"


def _range(spec: dict[str, float]) -> Range:
    exclusive = "min_exclusive" in spec
    low = spec["min_exclusive"] if exclusive else spec["min"]
    return Range(float(low), float(spec["max"]), float(spec["default"]), exclusive)


_LIMITS = json.loads((Path(__file__).with_name("request_limits.json")).read_text())

MAX_MESSAGES: int = _LIMITS["max_messages"]
MAX_STOP_STRINGS: int = _LIMITS["max_stop_strings"]
MAX_STOP_CHARS: int = _LIMITS["max_stop_chars"]
# the sampling parameters with a range, by their name in the SUBMIT record's params map
RANGES: dict[str, Range] = {
    name: _range(_LIMITS[name]) for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty")
}
