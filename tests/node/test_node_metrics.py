"""`meshci node --metrics-port`: valid Prometheus text; the request counter moves with requests."""

from __future__ import annotations

import asyncio
import os

import pytest
from inprocess import start_mesh
from prometheus_client.parser import text_string_to_metric_families

from meshci.cli import build_parser
from meshci.commands.node import effective_settings
from meshci.node.client import RequestError, infer
from meshci.node.metrics import NodeMetrics, response, serve_metrics

pytestmark = pytest.mark.timeout(120)

SECRET = os.urandom(32)


async def _get(port: int, path: str = "/metrics") -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return head.split("\r\n")[0], body


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_are_prometheus_text_and_count_requests() -> None:
    nodes = await start_mesh({"m1": 5.0, "m2": 0.05}, SECRET)
    server = await serve_metrics(nodes[0], "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        status, body = await _get(port)
        assert status == "HTTP/1.1 200 OK"
        before = _samples(body)
        assert before[("meshci_requests_total", (("outcome", "ok"),))] == 0
        assert before[("meshci_peers_alive", ())] == 1
        await infer(nodes[0].address, model="resnet18", size=(32, 32), secret=SECRET, strategy="local")
        with pytest.raises(RequestError):
            await infer(nodes[0].address, model="alexnet9", size=(32, 32), secret=SECRET)
        after = _samples((await _get(port))[1])
        assert after[("meshci_requests_total", (("outcome", "ok"),))] == 1
        assert after[("meshci_requests_total", (("outcome", "failed"),))] == 1
        assert after[("meshci_request_latency_seconds_count", ())] == 2
        assert after[("meshci_request_latency_seconds_sum", ())] > 0
        assert after[("meshci_sent_bytes_total", (("peer", "m2"),))] > 0
        assert after[("meshci_sent_bytes_total", (("peer", "clients"),))] > 0  # not a label per client
        assert ("meshci_auctions_total", (("outcome", "won"),)) in after
        assert (await _get(port, "/other"))[0] == "HTTP/1.1 404 Not Found"
    finally:
        server.close()
        await asyncio.gather(*(n.close() for n in nodes))


def test_latency_buckets_are_cumulative_and_bad_requests_refused() -> None:
    m = NodeMetrics()
    for seconds in (0.02, 0.02, 3.0, 100.0):
        m.request_done(seconds, ok=True)
    buckets = dict(m.cumulative_buckets())
    assert (buckets["0.01"], buckets["0.025"], buckets["5.0"], buckets["60.0"], buckets["+Inf"]) == (0, 2, 3, 3, 4)
    assert response(b"garbage", lambda: b"").startswith(b"HTTP/1.1 400")
    assert response(b"POST /metrics HTTP/1.1\r\n", lambda: b"").startswith(b"HTTP/1.1 405")


def test_metrics_bind_to_this_machine_unless_told() -> None:
    given = build_parser("node").parse_args(["node", "--metrics-port", "9100"])
    settings = effective_settings(given, {})
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.1", 9100)
