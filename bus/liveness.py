"""A peer's liveness counter (zguide Paranoid Pirate): reset by any message, ticked once per heartbeat interval.

Counting intervals rather than comparing clocks keeps the rule ("silent for `liveness` intervals → lost")
independent of how late a busy loop runs its timer, and makes it testable without time.
"""

from __future__ import annotations

from bus.endpoints import DEFAULT_LIVENESS


class Liveness:
    def __init__(self, liveness: int = DEFAULT_LIVENESS) -> None:
        if liveness < 1:
            raise ValueError(f"liveness must be >= 1, got {liveness}")
        self._max = liveness
        self._remaining = liveness

    @property
    def remaining(self) -> int:
        """Intervals the peer may still stay silent."""
        return self._remaining

    @property
    def lost(self) -> bool:
        return self._remaining <= 0

    def heard(self) -> None:
        """Any message from the peer: it is alive."""
        self._remaining = self._max

    def tick(self) -> bool:
        """One heartbeat interval has passed; returns True when this tick makes the peer lost."""
        if self._remaining <= 0:
            return False
        self._remaining -= 1
        return self._remaining == 0
