"""`tokenbus top`'s data: the head's status and every proxy's /metrics, polled off the screen's thread.

A collector thread runs its own event loop. Every interval it asks the head for `status` and each proxy it knows
(those the head lists, and those given by hand) for /metrics, all at once, each bounded by a timeout, and then
publishes one immutable View. The screen only ever reads the last View, so a head or proxy that hangs delays
nothing but its own numbers.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bus.admin import AdminClient, AdminError
from bus.curve import ClientKeys
from tools.top_window import History, Rates, Series, parse, rates

FETCH_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class ProxyView:
    address: str  # host:port of its HTTP listener (its /metrics is there)
    listed: dict[str, Any] | None  # the head's entry for it (C2 `proxies`); None when given by hand only
    metrics: Series | None  # its last scrape, None before the first
    error: str  # why the last scrape failed; "" when it worked


@dataclass(frozen=True)
class View:
    """Everything the screen shows, as of one poll."""

    head: str
    status: dict[str, Any] | None  # the head's last answer (kept while it does not answer)
    status_age_s: float  # since that answer
    head_error: str  # why the last status request failed; "" when it was answered
    proxies: list[ProxyView] = field(default_factory=list)
    rates: Rates = field(default_factory=lambda: Rates({}, {}))
    polled_at: float = 0.0  # wall clock of the poll


class Collector:
    """Polls in a daemon thread; `view` is the last poll's result. `wake_fd` becomes readable after each poll."""

    def __init__(
        self,
        head: str,
        keys: ClientKeys | None,
        interval_s: float,
        extra_proxies: list[str],
        api_key: str | None,
    ) -> None:
        self._head = head
        self._keys = keys
        self._interval_s = interval_s
        self._extra = list(extra_proxies)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._histories: dict[str, History] = {}
        self._status: dict[str, Any] | None = None
        self._status_at = 0.0
        self.view = View(head=head, status=None, status_age_s=0.0, head_error="")
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="top-collector", daemon=True)

    @property
    def wake_fd(self) -> int:
        return self._wake_read

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ends the polling at its next turn; the thread is a daemon, so nobody waits for a fetch in flight."""
        self._stop.set()

    def drain_wake(self) -> None:
        os.read(self._wake_read, 4096)

    def _run(self) -> None:
        asyncio.run(self._poll_forever())

    async def _poll_forever(self) -> None:
        admin: AdminClient | None = None
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout, headers=self._headers) as session:
            while not self._stop.is_set():
                started = time.monotonic()
                admin = admin or AdminClient(self._head, keys=self._keys)
                addresses = self._proxy_addresses()
                head_result, *scrapes = await asyncio.gather(
                    self._ask_head(admin), *(self._scrape(session, address) for address in addresses)
                )
                if head_result:  # no answer: a new socket next time, not a queue of requests for a returning head
                    admin.close()
                    admin = None
                self._publish(head_result, dict(zip(addresses, scrapes, strict=True)))
                await asyncio.sleep(max(0.0, started + self._interval_s - time.monotonic()))
        if admin is not None:
            admin.close()

    async def _ask_head(self, admin: AdminClient) -> str:
        """Asks for status; "" when answered (kept in self._status), else why not."""
        try:
            self._status = await admin.request("status", {}, FETCH_TIMEOUT_S)
        except (AdminError, TimeoutError) as e:
            return str(e) or f"no answer in {FETCH_TIMEOUT_S:g} s"
        self._status_at = time.monotonic()
        return ""

    def _proxy_addresses(self) -> list[str]:
        listed = [p.get("metrics") or p.get("addr", "") for p in (self._status or {}).get("proxies", [])]
        return list(dict.fromkeys(a for a in [*listed, *self._extra] if a))

    async def _scrape(self, session: aiohttp.ClientSession, address: str) -> str:
        """Scrapes one proxy into its history; "" when it worked, else why not."""
        try:
            async with session.get(f"http://{address}/metrics") as resp:
                if resp.status != 200:
                    return f"/metrics answered {resp.status}" + (" (give --api-key)" if resp.status == 401 else "")
                text = await resp.text()
        except TimeoutError:
            return f"no answer in {FETCH_TIMEOUT_S:g} s"
        except aiohttp.ClientError as e:
            return str(e) or type(e).__name__
        try:
            series = parse(text)
        except ValueError as e:
            return f"unreadable /metrics: {e}"
        self._histories.setdefault(address, History()).add(time.monotonic(), series)
        return ""

    def _publish(self, head_error: str, scrape_errors: dict[str, str]) -> None:
        listed = {(p.get("metrics") or p.get("addr", "")): p for p in (self._status or {}).get("proxies", [])}
        for gone in self._histories.keys() - scrape_errors.keys():  # a proxy the head forgot
            del self._histories[gone]
        proxies = []
        deltas = []
        for address, error in scrape_errors.items():
            history = self._histories.get(address)
            proxies.append(ProxyView(address, listed.get(address), history.latest if history else None, error))
            delta = history.delta() if history and not error else None
            if delta is not None:
                deltas.append(delta)
        self.view = View(
            head=self._head,
            status=self._status,
            status_age_s=time.monotonic() - self._status_at if self._status is not None else 0.0,
            head_error=head_error,
            proxies=proxies,
            rates=rates(deltas),
            polled_at=time.time(),
        )
        try:
            os.write(self._wake_write, b"x")
        except BlockingIOError:  # the screen has not read the last wake-ups yet: one pending is enough
            pass
