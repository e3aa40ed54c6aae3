"""Where each millisecond goes, end to end through real processes (sim engine): one stream's seven first-token
stamps (`X-Tokenbus-Timing: 1`), their six hops, and the TTFT the proxy exported for that same stream."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from cluster_harness import deployed_cluster, metric_samples

from tools.local_cluster import LocalCluster

PREFILL_MS = 30.0  # the sim's wait before the first token: the engine hop holds it
STAMPS = ("proxy_received", "routed", "replica_received", "ring_written", "engine_produced", "ring_read", "proxy_sent")
HOPS = ("queue_and_route", "proxy_to_replica", "replica_to_ring", "engine", "ring_to_replica", "replica_to_client")
TIMING_PREFIX = ": tokenbus-timing "


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = {"name": "demo", "engine": "sim", "engine_args": {"token_delay_ms": 2, "prefill_ms": PREFILL_MS}}
    with deployed_cluster(tmp_path_factory.mktemp("hops"), spec | {"replicas": 1}) as (c, _):
        yield c


def proxy_samples(url: str) -> dict[str, float]:
    return metric_samples(httpx.get(url + "/metrics", timeout=10.0).text)


def test_the_hops_of_a_stream_add_up_to_its_ttft(cluster: LocalCluster) -> None:
    url = cluster.proxy_url
    ttft_sum = 'tokenbus_proxy_ttft_seconds_sum{"deployment": "demo"}'
    before = proxy_samples(url).get(ttft_sum, 0.0)
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    stamps: dict[str, int] = {}
    client_ttft_s = None
    sent = time.monotonic()
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers={"X-Tokenbus-Timing": "1"}, timeout=60.0
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if client_ttft_s is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"]:
                client_ttft_s = time.monotonic() - sent
            if line.startswith(TIMING_PREFIX):
                assert not stamps, "a second timing comment"
                stamps = json.loads(line[len(TIMING_PREFIX) :])
    assert client_ttft_s is not None and set(stamps) == {f"{s}_ns" for s in STAMPS}, stamps
    ns = [stamps[f"{s}_ns"] for s in STAMPS]
    # one node, one clock: every stamp taken, in path order
    assert all(ns) and ns == sorted(ns), dict(zip(STAMPS, ns, strict=True))
    hops_ms = {h: (b - a) / 1e6 for h, a, b in zip(HOPS, ns, ns[1:], strict=False)}
    assert hops_ms["engine"] >= PREFILL_MS * 0.9, hops_ms
    # The proxy's exported TTFT of this stream (the only one run) is the sum of its hops, within a millisecond.
    after = proxy_samples(url)[ttft_sum]
    proxy_ttft_ms = (after - before) * 1e3
    assert sum(hops_ms.values()) == pytest.approx(proxy_ttft_ms, abs=1.0), (hops_ms, proxy_ttft_ms)
    # and the client, whose clock started before the proxy's and stopped after, saw at least that much
    assert client_ttft_s * 1e3 >= sum(hops_ms.values()) - 1.0, (client_ttft_s, hops_ms)
    # every hop is in the proxy's histogram for the deployment
    counts = proxy_samples(url)
    count = 'tokenbus_proxy_first_token_hop_seconds_count{{"deployment": "demo", "hop": "{}"}}'
    assert {h for h in HOPS if counts.get(count.format(h))} == set(HOPS), counts
