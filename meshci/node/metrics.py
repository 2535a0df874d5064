"""A node's Prometheus metrics (`meshci node --metrics-port P`).

`NodeMetrics` holds the counts only the node's event handlers see (requests and their
latency, auctions won and lost, peer failures); everything else is read from the node's
own counters when Prometheus scrapes (`families`), so nothing is counted twice. The text
format comes from prometheus-client, imported only when metrics are served. The endpoint
is a tiny asyncio HTTP responder bound to 127.0.0.1 unless `--metrics-host` says otherwise:
the figures name the mesh's members and its traffic.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshci.node.server import Node

log = logging.getLogger(__name__)

# request latency buckets (seconds): a small model on a desk to VGG-16 on Pi 3s
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_REQUEST_BYTES = 8192  # of an HTTP request head: a scraper's GET is a few hundred
REQUEST_TIMEOUT_S = 5.0
CLIENTS = "clients"  # the peer label of every connection that is not a mesh member


@dataclass
class NodeMetrics:
    """Counts kept as events happen (the rest is read at scrape time)."""

    requests_ok: int = 0
    requests_failed: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum_s: float = 0.0
    auctions_won: int = 0
    auctions_lost: int = 0
    peer_failures: int = 0
    requests_retried: int = 0  # attempts run again after a device was lost (`node/attempts.py`)

    def request_done(self, seconds: float, ok: bool) -> None:
        if ok:
            self.requests_ok += 1
        else:
            self.requests_failed += 1
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum_s += seconds

    def auction_ended(self, won: bool) -> None:
        if won:
            self.auctions_won += 1
        else:
            self.auctions_lost += 1

    def cumulative_buckets(self) -> list[tuple[str, int]]:
        """Histogram buckets as Prometheus wants them: cumulative, ending with +Inf."""
        total, buckets = 0, []
        for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.latency_counts):
            total += count
            buckets.append((bound, total))
        return buckets


def families(node: Node) -> list[Any]:
    """The node's metric families (prometheus-client objects) as of now."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    m = node.metrics
    requests = CounterMetricFamily("meshci_requests", "Inference requests this node answered as requester",
                                   labels=["outcome"])
    requests.add_metric(["ok"], m.requests_ok)
    requests.add_metric(["failed"], m.requests_failed)
    latency = HistogramMetricFamily("meshci_request_latency_seconds",
                                    "From a request's arrival to its answer, on its requester")
    latency.add_metric([], m.cumulative_buckets(), m.latency_sum_s)
    sent = CounterMetricFamily("meshci_sent_bytes", "Bytes sent, by peer", labels=["peer"])
    received = CounterMetricFamily("meshci_received_bytes", "Bytes received, by peer", labels=["peer"])
    for family, table in ((sent, node.connections.peer_sent), (received, node.connections.peer_received)):
        for peer, n in sorted(by_member(table, node).items()):
            family.add_metric([peer], n)
    tiles = CounterMetricFamily("meshci_tiles_computed", "Tiles this node computed")
    tiles.add_metric([], node.runtime.tiles_computed)
    auctions = CounterMetricFamily("meshci_auctions", "Auctions this node bid in, by outcome", labels=["outcome"])
    auctions.add_metric(["won"], m.auctions_won)
    auctions.add_metric(["lost"], m.auctions_lost)
    failures = CounterMetricFamily("meshci_peer_failures", "Peers this node saw fail (declared dead, unreachable)")
    failures.add_metric([], m.peer_failures)
    retried = CounterMetricFamily("meshci_request_retries",
                                  "Requests run again on the survivors after a device was lost")
    retried.add_metric([], m.requests_retried)
    peers = GaugeMetricFamily("meshci_peers_alive", "Members this node believes up, itself excluded")
    peers.add_metric([], len(node.membership.alive()))
    in_flight = GaugeMetricFamily("meshci_requests_in_flight", "Requests this node is requester of now")
    in_flight.add_metric([], len(node.requester.contexts))
    backlog = GaugeMetricFamily("meshci_backlog_seconds", "Seconds of tile work queued on this node")
    backlog.add_metric([], max(0.0, node.runtime.queued_s))
    return [requests, latency, sent, received, tiles, auctions, failures, retried, peers, in_flight, backlog]


def by_member(table: dict[str, int], node: Node) -> dict[str, int]:
    """Bytes by mesh member; every other name (clients, each with its own) summed as
    "clients", so a label per client run does not pile up in Prometheus."""
    out: dict[str, int] = {}
    for name, n in table.items():
        label = name if node.membership.peer(name) is not None else CLIENTS
        out[label] = out.get(label, 0) + n
    return out


def exposition(node: Node) -> bytes:
    """The Prometheus text format of the node's metrics."""
    from prometheus_client import CollectorRegistry, generate_latest

    class _Collector:
        def collect(self) -> Any:
            return families(node)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())  # type: ignore[arg-type]
    return generate_latest(registry)


def response(head: bytes, render: Callable[[], bytes]) -> bytes:
    """The HTTP answer to a request head: the metrics (`render()`) for GET /metrics (or /),
    else 400/404/405."""
    line = head.split(b"\r\n", 1)[0].split()
    if len(line) != 3 or not line[2].startswith(b"HTTP/"):
        return _http(400, b"text/plain", b"bad request\n")
    method, target = line[0], line[1].split(b"?", 1)[0]
    if method != b"GET":
        return _http(405, b"text/plain", b"only GET\n")
    if target not in (b"/metrics", b"/"):
        return _http(404, b"text/plain", b"see /metrics\n")
    return _http(200, b"text/plain; version=0.0.4; charset=utf-8", render())


def _http(status: int, content_type: bytes, body: bytes) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}[status]
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (status, reason, content_type, len(body))) + body


async def serve_metrics(node: Node, host: str, port: int) -> asyncio.base_events.Server:
    """Answer scrapes of `node`'s metrics on host:port until the returned server is closed."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.write(response(head, lambda: exposition(node)))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError) as exc:
            # a scraper that hung up, sent too much or too little: nothing to answer
            log.debug("metrics request dropped: %r", exc)
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, limit=MAX_REQUEST_BYTES)
