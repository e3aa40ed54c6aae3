"""`python -m tools.chaos`: a bounded chaos run, and the client that tells what each request's client saw.

A local cluster (head, agent, two proxies, three sim replicas) serves closed-loop streams (half plain text, half
SSE, spread over the two proxies) while every 10-20 s one random process (a worker, a replica, the agent, the head
or a proxy) is SIGKILLed, or SIGSTOPped and SIGCONTed a few seconds later. What the cluster does not restart
itself (head, agent, proxy) is restarted as `tokenbus up` would. At the end, a table of what the clients saw.

Every request is classified (`stream_request`), by what its client could tell:
- completed: every token, a clean end (`[DONE]` in SSE, the terminating chunk in plain text), finish `length`;
- retried: completed, after the proxy retried it before its first token (`X-Tokenbus-Attempts` > 1);
- error: an error the client can tell from success: an HTTP error status, an SSE error event, a body cut without
  its terminating chunk, a connection refused or lost before any response;
- silent: anything else: a clean end with tokens missing or an abort reported as success, a stream that stalls
  past the client's deadline. The rule tokenbus keeps (issue 6): none of these.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import os
import random
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from rich.console import Console
from rich.table import Table

from tools.arg_types import positive_float, positive_int
from tools.local_cluster import LocalCluster
from tools.procs import alive

CLIENT_DEADLINE_S = 60.0  # a stream silent this long (no byte) is "stalled": the proxy's idle timeout is far shorter
# the deployment's stream deadlines, short: a stream on a stopped or hung replica ends within seconds, explicitly
FIRST_TOKEN_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 5.0
DEPLOYMENT = "chaos"
TARGETS = ("worker", "replica", "agent", "head", "proxy")
SHOWN_FAILURES = 10  # silent failures printed whole at the end


class Outcome(enum.Enum):
    COMPLETED = "completed"
    RETRIED = "retried before the first token"
    ERROR = "failed with an explicit error"
    SILENT = "failed any other way"


class Via(enum.Enum):
    """How an explicit error reached the client."""

    STATUS = "HTTP error status"
    SSE_EVENT = "SSE error event"
    CUT = "body cut without its terminating chunk"
    NO_RESPONSE = "connection lost before any response"
    CONNECT = "connection refused"


@dataclass
class Result:
    outcome: Outcome
    detail: str
    kind: str  # "plain" or "sse"
    proxy: str
    status: int = 0  # the HTTP status; 0 when no response came
    attempts: int = 1  # replicas the proxy tried (X-Tokenbus-Attempts)
    retry_after: str | None = None  # the Retry-After header of an error status
    tokens: int = 0
    via: Via | None = None  # for ERROR
    started: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    ended: float = 0.0

    def __str__(self) -> str:
        return f"{self.kind} via {self.proxy}: {self.outcome.value} ({self.detail})"


async def stream_request(
    session: aiohttp.ClientSession,
    proxy: str,
    kind: str,
    max_tokens: int,
    prompt: str,
    deployment: str,
    deadline_s: float = CLIENT_DEADLINE_S,
) -> Result:
    """Sends one streamed request (`kind` "plain" or "sse") and classifies what its client saw.

    The sim engine emits exactly `max_tokens` tokens (one word each) ending in `length`: fewer is a cut."""
    res = Result(Outcome.SILENT, "", kind, proxy)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=deadline_s, sock_read=deadline_s)
    try:
        if kind == "plain":
            request = session.post(
                f"{proxy}/v1/chat/{deployment}",
                params={"max_tokens": str(max_tokens)},
                data=prompt,
                headers={"Content-Type": "text/plain"},
                timeout=timeout,
            )
        else:
            body = {
                "model": deployment,
                "messages": [{"role": "user", "content": prompt}],
                "stream": True,
                "max_tokens": max_tokens,
                "stream_options": {"include_usage": True},
            }
            request = session.post(f"{proxy}/v1/chat/completions", json=body, timeout=timeout)
        async with request as resp:
            res.status = resp.status
            res.attempts = int(resp.headers.get("X-Tokenbus-Attempts", "1"))
            if resp.status != 200:
                res.retry_after = resp.headers.get("Retry-After")
                text = (await resp.text())[:200].strip()
                _error(res, Via.STATUS, f"HTTP {resp.status}: {text}")
            elif kind == "plain":
                await _read_plain(resp, res, max_tokens)
            else:
                await _read_sse(resp, res, max_tokens)
    except aiohttp.ClientConnectorError as e:
        _error(res, Via.CONNECT, str(e))
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
        # before a status line the client knows nothing was answered (the proxy died, or a kept-alive connection
        # to it was dead); after one, the body lacks its terminating chunk
        _error(res, Via.CUT if res.status else Via.NO_RESPONSE, f"after {res.tokens} tokens: {type(e).__name__}: {e}")
    except TimeoutError:
        res.outcome, res.detail = Outcome.SILENT, f"stalled: no byte for {deadline_s} s after {res.tokens} tokens"
    res.ended = time.monotonic()
    return res


def _error(res: Result, via: Via, detail: str) -> None:
    res.outcome, res.via, res.detail = Outcome.ERROR, via, detail


def _complete(res: Result, max_tokens: int, finish: str | None) -> None:
    if res.tokens == max_tokens and finish == "length":
        res.outcome = Outcome.RETRIED if res.attempts > 1 else Outcome.COMPLETED
        res.detail = f"{res.tokens} tokens, {res.attempts} attempt(s)"
    else:  # a clean end with tokens missing, or an abort reported as a finish: the client cannot tell
        res.outcome, res.detail = Outcome.SILENT, f"clean end after {res.tokens}/{max_tokens} tokens, finish {finish}"


async def _read_plain(resp: aiohttp.ClientResponse, res: Result, max_tokens: int) -> None:
    text = ""
    async for data, _ in resp.content.iter_chunks():
        if data and res.first_token_s is None:
            res.first_token_s = time.monotonic() - res.started
        text += data.decode(errors="replace")
        res.tokens = len(text.split())
    # reaching here means the terminating chunk came: the proxy said "complete"
    _complete(res, max_tokens, "length" if res.tokens == max_tokens else None)


async def _read_sse(resp: aiohttp.ClientResponse, res: Result, max_tokens: int) -> None:
    finish: str | None = None
    done = False
    async for raw in resp.content:
        line = raw.decode(errors="replace").strip()
        if not line.startswith("data: "):
            continue
        payload = line.removeprefix("data: ")
        if payload == "[DONE]":
            done = True
            continue
        event = json.loads(payload)
        if "error" in event:
            _error(res, Via.SSE_EVENT, f"after {res.tokens} tokens: {event['error'].get('message', '')}")
            return
        for choice in event.get("choices", []):
            content = choice.get("delta", {}).get("content") or ""
            if content and res.first_token_s is None:
                res.first_token_s = time.monotonic() - res.started
            res.tokens += len(content.split())  # one word a sim token; the usage below has the engine's count
            finish = choice.get("finish_reason") or finish
        if event.get("usage"):
            res.tokens = event["usage"]["completion_tokens"]
    if not done:
        res.outcome, res.detail = Outcome.SILENT, f"clean end without [DONE] after finish {finish}"
        return
    _complete(res, max_tokens, finish)


# --- the chaos run ---------------------------------------------------------------------------------------------


@dataclass
class Fault:
    at_s: float
    target: str  # "head", "agent", "proxy-2", "worker of chaos-1a2b", ...
    pid: int
    action: str  # "SIGKILL" or "SIGSTOP 4.2 s"


class Chaos:
    def __init__(self, cluster: LocalCluster, opts: argparse.Namespace, console: Console) -> None:
        self.cluster = cluster
        self.opts = opts
        self.console = console
        self.rng = random.Random(opts.seed)
        self.results: list[Result] = []
        self.faults: list[Fault] = []
        self.failovers = 0  # requests a client sent to the other proxy after a connection refused
        self.killed_proxies: dict[str, list[float]] = {}  # proxy url -> when it was SIGKILLed
        self.t0 = time.monotonic()
        self.stop = asyncio.Event()

    async def client(self, index: int, session: aiohttp.ClientSession) -> None:
        urls = list(self.cluster.proxy_urls.values())
        mine, other = urls[index % len(urls)], urls[(index + 1) % len(urls)]
        kind = "plain" if index % 2 == 0 else "sse"
        n = 0
        while not self.stop.is_set():
            n += 1
            prompt = f"client {index} request {n}"
            res = await stream_request(session, mine, kind, self.opts.max_tokens, prompt, DEPLOYMENT)
            if res.via is Via.CONNECT and other != mine:  # as a client's load balancer would: nothing was sent
                self.failovers += 1
                res = await stream_request(session, other, kind, self.opts.max_tokens, prompt, DEPLOYMENT)
            if res.via is Via.CONNECT:
                await asyncio.sleep(0.2)  # both proxies down: do not spin (a pause, not synchronisation)
            self.results.append(res)

    def _targets(self) -> list[tuple[str, int]]:
        targets = [(c, self.cluster.pid(c)) for c in ("head", *self.cluster.agent_names, *self.cluster.proxy_urls)]
        for rid, procs in self.cluster.replica_processes().items():
            targets += [(f"{proc} of {rid}", pid) for proc, pid in procs.items()]
        kinds = self.opts.targets  # a target's kind is its first word: worker, replica, head, agent, proxy
        return [(n, pid) for n, pid in targets if n.split()[0].split("-")[0] in kinds and alive(pid)]

    async def faults_loop(self) -> None:
        while not self.stop.is_set():
            pause = self.rng.uniform(*self.opts.interval)
            try:
                await asyncio.wait_for(self.stop.wait(), pause)
                return
            except TimeoutError:
                pass
            targets = self._targets()
            if not targets:  # all of them down at this moment: strike at the next interval
                continue
            name, pid = self.rng.choice(targets)
            at = time.monotonic() - self.t0
            if self.rng.random() < 0.5:
                fault = Fault(at, name, pid, "SIGKILL")
                if name in self.cluster.proxy_urls:
                    self.killed_proxies.setdefault(self.cluster.proxy_urls[name], []).append(time.monotonic())
                _signal(pid, signal.SIGKILL)
            else:
                stopped_s = self.rng.uniform(2.0, 6.0)
                fault = Fault(at, name, pid, f"SIGSTOP {stopped_s:.1f} s")
                _signal(pid, signal.SIGSTOP)
                try:
                    await asyncio.sleep(stopped_s)  # the fault's length, not synchronisation
                finally:
                    _signal(pid, signal.SIGCONT)
            self.faults.append(fault)
            self.console.print(f"{at:7.1f} s  {fault.action:13} {name} (pid {pid})", highlight=False)

    async def supervise(self) -> None:
        supervisor = self.cluster.supervisor(lambda line: self.console.print(f"  {line}", highlight=False))
        while not self.stop.is_set():
            supervisor.check()
            await asyncio.sleep(0.5)

    def classify_cuts(self) -> None:
        """An SSE stream cut without an error event is explicit only when its proxy was killed during it (a dead
        proxy cannot send the event); any other is a silent failure."""
        for res in self.results:
            if res.outcome is Outcome.ERROR and res.via is Via.CUT and res.kind == "sse":
                kills = self.killed_proxies.get(res.proxy, [])
                if not any(res.started <= t <= res.ended for t in kills):
                    res.outcome = Outcome.SILENT
                    res.detail = f"SSE cut without an error event, its proxy alive: {res.detail}"


async def run(opts: argparse.Namespace, console: Console) -> int:
    state = Path(tempfile.mkdtemp(prefix="tokenbus-chaos-"))
    cluster = LocalCluster(state, cpu_slots=opts.replicas + 1, heartbeat_s=0.5, proxies=2)
    console.print(f"chaos: state and logs in {state}")
    try:
        cluster.start()
        spec = {
            "name": DEPLOYMENT,
            "engine": "sim",
            "engine_args": {"token_delay_ms": opts.token_delay_ms},
            "replicas": opts.replicas,
            "max_concurrency": opts.concurrency,
            "first_token_timeout_s": FIRST_TOKEN_TIMEOUT_S,
            "idle_timeout_s": IDLE_TIMEOUT_S,
        }
        await cluster.deploy(spec)
        console.print(f"{opts.concurrency} streams through {len(cluster.proxy_urls)} proxies for {opts.duration} s")
        chaos = Chaos(cluster, opts, console)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            tasks = [asyncio.create_task(chaos.client(i, session)) for i in range(opts.concurrency)]
            tasks += [asyncio.create_task(chaos.faults_loop()), asyncio.create_task(chaos.supervise())]
            await asyncio.sleep(opts.duration)  # the run's length
            chaos.stop.set()
            done, pending = await asyncio.wait(tasks, timeout=CLIENT_DEADLINE_S + 10)
            for t in pending:
                t.cancel()
            for t in done:
                if t.exception() is not None:
                    console.print(f"[red]task failed:[/red] {t.exception()!r}")
            urls = list(cluster.proxy_urls.values())
            retries = {
                "retried": await _proxy_counters(session, urls, "tokenbus_proxy_retries_total"),
                "not retried": await _proxy_counters(session, urls, "tokenbus_proxy_retries_refused_total"),
            }
        chaos.classify_cuts()
        report(chaos, retries, console)
        silent = sum(r.outcome is Outcome.SILENT for r in chaos.results)
        return 1 if silent else 0
    finally:
        cluster.stop()


async def _proxy_counters(session: aiohttp.ClientSession, urls: list[str], name: str) -> Counter[str]:
    """A proxy counter by its one label's value (why), summed over the live proxies (a restarted one counts from 0)."""
    total: Counter[str] = Counter()
    for url in urls:
        try:
            async with session.get(f"{url}/metrics") as resp:
                text = await resp.text()
        except aiohttp.ClientError:
            continue
        for line in text.splitlines():
            if line.startswith(name + "{"):
                labels, value = line.rsplit(" ", 1)
                total[labels.split('="', 1)[-1].split('"', 1)[0]] += int(float(value))
    return total


def report(chaos: Chaos, retries: dict[str, Counter[str]], console: Console) -> None:
    faults = Table(title="faults injected")
    for col in ("at", "action", "process", "pid"):
        faults.add_column(col)
    for f in chaos.faults:
        faults.add_row(f"{f.at_s:.1f} s", f.action, f.target, str(f.pid))
    console.print(faults)
    table = Table(title=f"{len(chaos.results)} requests")
    for col in ("outcome", "plain", "sse", "all"):
        table.add_column(col, justify="right" if col != "outcome" else "left")
    for outcome in Outcome:
        counts = Counter(r.kind for r in chaos.results if r.outcome is outcome)
        table.add_row(outcome.value, str(counts["plain"]), str(counts["sse"]), str(sum(counts.values())))
    console.print(table)
    # grouped by how and when: an error before the first token is one a retry could have saved
    groups: Counter[tuple[str, str, str, str]] = Counter()
    for r in chaos.results:
        if r.outcome in (Outcome.ERROR, Outcome.SILENT):
            when = "before the first token" if r.first_token_s is None else "mid-stream"
            message = r.detail.split(": ", 1)[1] if r.detail.startswith("after ") else r.detail
            groups[(r.outcome.name.lower(), r.via.value if r.via else "", when, message[:70])] += 1
    details = Table(title="explicit errors and silent failures, by kind")
    for col in ("outcome", "how", "when", "detail", "count"):
        details.add_column(col)
    for (outcome_name, via, when, message), n in groups.most_common(20):
        details.add_row(outcome_name, via, when, message, str(n))
    console.print(details)
    for r in [r for r in chaos.results if r.outcome is Outcome.SILENT][:SHOWN_FAILURES]:
        console.print(
            f"silent: {r.kind} via {r.proxy}, {r.started - chaos.t0:.2f}-{r.ended - chaos.t0:.2f} s: {r.detail}",
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"sent to the other proxy after a connection refused: {chaos.failovers}")
    for what, counts in retries.items():
        console.print(f"proxy attempts {what}, by why (live proxies' /metrics): {dict(counts) or 'none'}")


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=positive_float, default=600.0, help="seconds of load and faults")
    p.add_argument("--concurrency", type=positive_int, default=128, help="concurrent streams")
    p.add_argument("--replicas", type=positive_int, default=3)
    p.add_argument("--token-delay-ms", type=positive_float, default=10.0)
    p.add_argument("--max-tokens", type=positive_int, default=32)
    p.add_argument(
        "--interval", type=positive_float, nargs=2, default=(10.0, 20.0), help="seconds between faults: min max"
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--targets",
        type=lambda v: set(v.split(",")),
        default=set(TARGETS),
        help=f"the kinds of process faults strike, comma-separated (default {','.join(TARGETS)})",
    )
    opts = p.parse_args(argv)
    if opts.interval[0] > opts.interval[1]:
        p.error("--interval wants min <= max")
    if unknown := opts.targets - set(TARGETS):
        p.error(f"--targets: no such kind {', '.join(sorted(unknown))} (kinds: {', '.join(TARGETS)})")
    return asyncio.run(run(opts, Console()))


if __name__ == "__main__":
    raise SystemExit(main())
