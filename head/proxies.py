"""The proxies the head hears from: each sends a PROXY_REPORT at its start and every second (schemas/messages.py).

The head does not route through them or command them; it lists them in `status` (so `tokenbus top` and Prometheus
find every proxy's /metrics) and forgets one silent for PROXY_FORGET_S. Times are the caller's monotonic clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.messages import ProxyReport

PROXY_FORGET_S = 10.0  # ten missed reports: the proxy stopped, or cannot reach the head


@dataclass
class _Proxy:
    report: ProxyReport
    last_seen: float


class ProxyTable:
    def __init__(self) -> None:
        self._proxies: dict[str, _Proxy] = {}

    def report(self, msg: ProxyReport, now: float) -> bool:
        """Records a report; whether the proxy is new to the table."""
        new = msg.proxy_id not in self._proxies
        self._proxies[msg.proxy_id] = _Proxy(msg, now)
        return new

    def expire(self, now: float) -> list[str]:
        """Forgets the proxies silent for longer than PROXY_FORGET_S; their ids."""
        gone = [pid for pid, p in self._proxies.items() if now - p.last_seen > PROXY_FORGET_S]
        for pid in gone:
            del self._proxies[pid]
        return gone

    def __len__(self) -> int:
        return len(self._proxies)

    def status(self, now: float) -> list[dict[str, Any]]:
        """The `proxies` list of the admin status, by id; a proxy's /metrics is on its HTTP address."""
        return [
            {
                "id": pid,
                "addr": p.report.addr,
                "metrics": p.report.addr,
                "snapshot_version": p.report.snapshot_version,
                "open_streams": p.report.open_streams,
                "last_seen_s": round(now - p.last_seen, 3),
            }
            for pid, p in sorted(self._proxies.items())
        ]
