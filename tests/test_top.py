"""`tokenbus top`: its numbers from proxy metrics (window math), its screen at 80x24, and the real thing in tmux
against a local sim cluster: the deployment, its replicas and moving numbers while requests run, the keys, and a
head that hangs or dies and comes back."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.cluster_harness import LocalCluster
from tests.tmux_pane import Pane
from tools.local_cluster import free_port
from tools.top_data import ProxyView, View
from tools.top_render import Ui, render
from tools.top_window import History, Rates, histogram_quantile, parse, rates

# --- numbers -----------------------------------------------------------------------------------------------------


def exposition(requests_200: int, requests_503: int, requests_429: int, tokens: int, ttft: dict[str, int]) -> str:
    """A proxy's /metrics as contract C3 shapes it, for the deployment `demo`."""
    lines = [
        "# TYPE tokenbus_proxy_requests_total counter",
        *(
            f'tokenbus_proxy_requests_total{{endpoint="chat_completions",status="{status}",deployment="demo"}} {n}'
            for status, n in (("200", requests_200), ("503", requests_503), ("429", requests_429))
        ),
        'tokenbus_proxy_requests_total{endpoint="healthz",status="200",deployment=""} 1000',
        "# TYPE tokenbus_proxy_tokens_total counter",
        f'tokenbus_proxy_tokens_total{{deployment="demo"}} {tokens}',
        "# TYPE tokenbus_proxy_ttft_seconds histogram",
        *(f'tokenbus_proxy_ttft_seconds_bucket{{deployment="demo",le="{le}"}} {n}' for le, n in ttft.items()),
        f'tokenbus_proxy_ttft_seconds_count{{deployment="demo"}} {ttft["+Inf"]}',
        'tokenbus_proxy_ttft_seconds_sum{deployment="demo"} 1.0',
        "# TYPE tokenbus_proxy_replica_tokens_total counter",
        f'tokenbus_proxy_replica_tokens_total{{address="127.0.0.1:7"}} {tokens}',
    ]
    return "\n".join(lines) + "\n"


def test_histogram_quantile_interpolates_inside_the_bucket() -> None:
    buckets = {0.1: 50.0, 0.2: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.19)
    assert histogram_quantile(0.99, {0.1: 10.0, float("inf"): 20.0}) == pytest.approx(0.1)  # past the last bound
    assert histogram_quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None


def test_rates_are_window_growth_summed_across_proxies() -> None:
    a, b = History(), History()
    zero = {"0.1": 0, "0.5": 0, "+Inf": 0}
    a.add(100.0, parse(exposition(0, 0, 0, 0, zero)))
    a.add(102.0, parse(exposition(20, 2, 4, 400, {"0.1": 10, "0.5": 20, "+Inf": 20})))
    b.add(100.0, parse(exposition(0, 0, 0, 0, zero)))
    b.add(104.0, parse(exposition(40, 0, 0, 400, {"0.1": 0, "0.5": 20, "+Inf": 20})))
    deltas = [d for d in (a.delta(), b.delta()) if d is not None]
    got = rates(deltas)
    demo = got.deployments["demo"]
    assert demo.requests_s == pytest.approx(26 / 2 + 40 / 4)
    assert demo.errors_s == pytest.approx(1.0)  # 503s; 429s are not errors
    assert demo.rejected_s == pytest.approx(2.0)
    assert demo.tokens_s == pytest.approx(200 + 100)
    # 40 first tokens: 10 under 0.1 s, 30 between 0.1 and 0.5 s; the median is the 20th: 10/30 into the bucket
    assert demo.ttft_p50_s == pytest.approx(0.1 + 0.4 * 10 / 30)
    assert demo.itl_p95_s is None  # no proxy exports it: shown as "-"
    assert got.replica_tokens_s == {"127.0.0.1:7": pytest.approx(300)}
    assert "" not in got.deployments  # requests for no known deployment


def test_a_restarted_proxy_starts_its_window_again() -> None:
    history = History()
    history.add(100.0, parse(exposition(500, 0, 0, 9000, {"+Inf": 500})))
    history.add(101.0, parse(exposition(3, 0, 0, 30, {"+Inf": 3})))  # its counters went down: a new process
    assert history.delta() is None  # one sample since the restart: no rate yet, not a negative one
    history.add(103.0, parse(exposition(13, 0, 0, 130, {"+Inf": 13})))
    seconds, growth = history.delta() or (0.0, {})
    assert seconds == pytest.approx(2.0)
    assert rates([(seconds, growth)]).deployments["demo"].requests_s == pytest.approx(5.0)


def test_the_window_is_the_last_ten_seconds() -> None:
    history = History()
    for t in range(0, 31):  # one request a second, then ten a second from t=20
        history.add(float(t), parse(exposition(t if t <= 20 else 20 + 10 * (t - 20), 0, 0, 0, {"+Inf": 0})))
    seconds, growth = history.delta() or (0.0, {})
    assert seconds == pytest.approx(10.0)
    assert rates([(seconds, growth)]).deployments["demo"].requests_s == pytest.approx(10.0)


# --- the screen ----------------------------------------------------------------------------------------------


def busy_view(replicas: int, nodes: int = 1) -> View:
    replica = {"node": "node-with-a-long-name", "state": "READY", "healthy": True, "addr": "10.0.0.1:1"}
    deployment = {
        "name": "a-deployment-with-a-long-name",
        "ready": replicas,
        "replicas": replicas,
        "restarts": 1,
        "replicas_list": [
            replica | {"id": f"replica-{i:03}", "load": {"running": i, "waiting": 0, "kv_usage": 0.5}}
            for i in range(replicas)
        ],
    }
    node = {"host": "10.0.0.1", "cpu_slots": 64, "used_slots": 1, "alive": True, "last_seen_s": 0.3}
    status = {
        "version": (3 << 32) | 17,
        "synced": True,
        "deployments": [deployment],
        "nodes": [node | {"node_id": f"n{i}"} for i in range(nodes)],
    }
    listed = {"id": "proxy-a", "addr": "10.0.0.9:8000", "snapshot_version": 1, "open_streams": 5, "last_seen_s": 0.5}
    proxies = [ProxyView("10.0.0.9:8000", listed, None, ""), ProxyView("10.0.0.10:8000", None, None, "refused")]
    return View("tcp://10.0.0.1:5555", status, 0.0, "", proxies, Rates({}, {}), time.time())


@pytest.mark.parametrize("width", [80, 60, 200])
def test_the_screen_fits_the_terminal_and_nothing_wraps(width: int) -> None:
    lines = render(busy_view(40), Ui(), width, 24)
    assert len(lines) <= 24
    assert all(len(line.plain) <= width for line in lines), [line.plain for line in lines]
    text = "\n".join(line.plain for line in lines)
    assert "replica-000" in text  # the first column of each table stays, however narrow
    assert "proxy 10.0.0.10:8000 cannot be reached: refused" in text[: width * 3]  # cut to the width, not wrapped
    assert "replicas (40, " in text  # says how many it could not show


def test_the_focused_table_gets_the_rows_the_others_do_not_need() -> None:
    view = busy_view(40, nodes=20)
    unfocused = "\n".join(line.plain for line in render(view, Ui(focus=2), 80, 24))  # the nodes
    focused = "\n".join(line.plain for line in render(view, Ui(focus=1), 80, 24))
    shown = [int(re.search(r"replicas \(40, (\d+) shown\)", t).group(1)) for t in (unfocused, focused)]  # type: ignore[union-attr]
    assert shown[1] > shown[0]


def test_narrow_screens_drop_the_least_important_columns_first() -> None:
    text = "\n".join(line.plain for line in render(busy_view(2), Ui(), 60, 24))
    header = next(line for line in text.splitlines() if line.startswith("name"))
    assert "tok/s" in header and "req/s" in header
    assert "restarts" not in header and "TTFT50" not in header


# --- the real thing ----------------------------------------------------------------------------------------------

TITLE_RE = re.compile(r"^[> ] (deployments|replicas|nodes|proxies) \(")
ALERT = "cannot be reached"


def table(screen: str, name: str) -> list[dict[str, str]]:
    """The rows of one table on the screen, each as header -> cell."""
    lines = screen.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(rf"^[> ] {name} \(", line)), None)
    if start is None or start + 1 >= len(lines):
        return []
    header = lines[start + 1].split()
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip() or TITLE_RE.match(line):
            break
        rows.append(dict(zip(header, line.split(), strict=False)))
    return rows


def number(cell: str | None) -> float:
    """A rate as shown ("12.5", "3k"); 0 for "-"."""
    if not cell or cell == "-":
        return 0.0
    return float(cell[:-1]) * 1000 if cell.endswith("k") else float(cell.rstrip("ms"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("top"))
    try:
        c.start()
        asyncio.run(c.deploy({"name": "demo", "engine": "sim", "replicas": 2}))
        yield c
    finally:
        c.stop()


@pytest.fixture
def top(cluster: LocalCluster) -> Iterator[Pane]:
    pane = Pane([sys.executable, "-m", "tools", "top", "--head", cluster.router], width=80, height=24)
    try:
        yield pane
    finally:
        pane.close()


class Load:
    """Streams through the proxy, 4 at a time, until stopped: what top should see moving."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)
        self.completed = 0

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(self._client(session) for _ in range(4)))

    async def _client(self, session: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            async with session.post(f"{self._url}/v1/chat/demo?max_tokens=16", data=b"hello") as resp:
                await resp.read()
                self.completed += resp.status == 200

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_shows_the_deployment_its_replicas_and_moving_numbers(cluster: LocalCluster, top: Pane) -> None:
    replica_ids = {r["id"] for r in asyncio.run(cluster.ready_replicas("demo"))}
    proxy = cluster.proxy_url.removeprefix("http://")

    def lively(screen: str) -> bool:
        demo = next((row for row in table(screen, "deployments") if row.get("name") == "demo"), {})
        replicas = {row.get("replica"): row for row in table(screen, "replicas")}
        return (
            demo.get("ready") == "2/2"
            and number(demo.get("req/s")) > 0
            and number(demo.get("tok/s")) > 0
            and demo.get("TTFT95", "-") != "-"
            and demo.get("ITL95", "-") != "-"
            and set(replicas) == replica_ids
            and all(row.get("state") == "READY" for row in replicas.values())
            and sum(number(row.get("tok/s")) for row in replicas.values()) > 0
            and any(row.get("node") == "e2e" and row.get("state") == "alive" for row in table(screen, "nodes"))
            and any(row.get("address") == proxy and row.get("state") == "up" for row in table(screen, "proxies"))
        )

    with Load(cluster.proxy_url):
        first = top.wait_for(lively, "the deployment, both replicas and their numbers while requests run", 60)
        numbers = [row for row in table(first, "deployments") if row.get("name") == "demo"]
        # the numbers move: a later screen shows other ones (rates over a sliding window under changing load)
        top.wait_for(
            lambda s: lively(s) and [r for r in table(s, "deployments") if r.get("name") == "demo"] != numbers,
            "other numbers on a later screen",
        )
        # tmux joins the lines it wrapped: 24 lines stay 24 when nothing did
        assert len(top.screen(joined=True).splitlines()) == 24, top.screen(joined=True)
    # without requests the window empties and the rates fall to 0
    top.wait_for(
        lambda s: any(row.get("name") == "demo" and row.get("req/s") == "0.0" for row in table(s, "deployments")),
        "requests/s back to 0 once the requests stop",
    )


def test_tab_moves_the_focus_s_changes_the_sort_q_quits(top: Pane) -> None:
    top.wait_for(lambda s: "> deployments (1)  sort: name" in s, "the deployments focused, sorted by name")
    top.keys("Tab")
    top.wait_for(lambda s: "> replicas (2)  sort: replica" in s and "  deployments (1)" in s, "replicas focused")
    top.keys("s")
    top.wait_for(lambda s: "> replicas (2)  sort: tok/s" in s, "replicas sorted by tokens/s")
    top.keys("q")
    assert top.wait_exit() == 0


def test_a_proxy_that_cannot_be_reached_is_said(cluster: LocalCluster) -> None:
    gone = f"127.0.0.1:{free_port()}"  # nobody listens there
    pane = Pane([sys.executable, "-m", "tools", "top", "--head", cluster.router, "--proxy", gone])
    proxy = cluster.proxy_url.removeprefix("http://")
    try:
        pane.wait_for(
            lambda s: (
                f"proxy {gone} {ALERT}" in s
                and {(r.get("address"), r.get("state")) for r in table(s, "proxies")}
                >= {(gone, "unreachable"), (proxy, "up")}
            ),
            "the unreachable proxy said, next to the one the head lists",
        )
    finally:
        pane.close()


def test_sigterm_gives_the_terminal_back(cluster: LocalCluster, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    top = shlex.join([sys.executable, "-m", "tools", "top", "--head", cluster.router])
    run_top = f"echo $$ > {shlex.quote(str(pid_file))}; exec {top}"
    pane = Pane(["sh", "-c", f"sh -c {shlex.quote(run_top)}; echo top exited $?; stty -a"])
    try:
        pane.wait_for(lambda s: "> deployments" in s, "top")
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
        pane.wait_exit()
        screen = pane.screen()
        assert "top exited 143" in screen, screen
        modes = set(screen.split())
        assert {"icanon", "echo"} <= modes, screen  # cooked and echoing again, as before top
        assert "> deployments" not in screen  # the normal screen is back, not top's
    finally:
        pane.close()


def test_a_hung_head_freezes_nothing(cluster: LocalCluster, top: Pane) -> None:
    top.wait_for(lambda s: "demo" in s and ALERT not in s, "the cluster")
    cluster.signal("head", signal.SIGSTOP)
    try:
        stalled = top.wait_for(lambda s: f"head {cluster.router} {ALERT}" in s, "the head's alert", 3.0)
        clock = stalled.splitlines()[0]
        # the screen still redraws: its clock moves while every status request waits its full timeout
        top.wait_for(lambda s: s.splitlines()[0] != clock and ALERT in s, "a redrawn screen", 5.0)
    finally:
        cluster.signal("head", signal.SIGCONT)
    top.wait_for(lambda s: ALERT not in s and "demo" in s, "the head back")


def test_a_killed_head_is_said_within_3_s_and_top_recovers(cluster: LocalCluster, top: Pane) -> None:
    top.wait_for(lambda s: "demo" in s and ALERT not in s, "the cluster")
    cluster.kill("head")
    killed = time.monotonic()
    try:
        screen = top.wait_for(lambda s: f"head {cluster.router} {ALERT}" in s, "the head's alert", 3.0)
        assert time.monotonic() - killed < 3.0
        assert "demo" in screen  # its last answer stays on the screen
    finally:
        cluster.restart("head")
    top.wait_for(
        lambda s: ALERT not in s and any(r.get("ready") == "2/2" for r in table(s, "deployments")),
        "the restarted head's view of the deployment",
        60,
    )
    top.keys("q")
    assert top.wait_exit() == 0
