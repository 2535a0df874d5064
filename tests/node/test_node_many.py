"""Many requesters: two nodes of a 4-node loopback mesh (real processes) are each the
requester (and auctioneer) of 10 requests sent at once; every answer is exact and the
mesh's time is shared fairly between the two requesters."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from meshci.node.client import infer
from meshci.node.local import LocalMesh, wait_formed
from logged import logged_mesh
from meshci.node.session import Session

pytestmark = pytest.mark.slow

REQUESTS_EACH = 10
SIZE = (64, 64)


async def _burst(mesh: LocalMesh, requesters: list[int]) -> dict[int, list[dict]]:
    """REQUESTS_EACH requests from each requester, all sent at once (one client connection
    per requester: a node admits only a few handshakes at a time from one address)."""
    secret = mesh.secret()
    sessions = {via: await Session.open(mesh.nodes[via].address, secret=secret) for via in requesters}
    try:
        async def one(via: int, k: int) -> dict:
            meta, _ = await sessions[via].infer(model="vgg16", strategy="edgeci", size=SIZE,
                                                input_seed=100 * via + k, check=True, timeout=300.0)
            return meta

        jobs = [(via, one(via, k)) for k in range(REQUESTS_EACH) for via in requesters]
        answers = await asyncio.gather(*(job for _, job in jobs))
    finally:
        for session in sessions.values():
            await session.close()
    out: dict[int, list[dict]] = {via: [] for via in requesters}
    for (via, _), meta in zip(jobs, answers):
        out[via].append(meta)
    return out


def test_two_requesters_at_once_are_exact_and_served_fairly() -> None:
    with logged_mesh() as mesh:
        mesh.add_many([("m1", 1.0), ("m2", 1.0), ("m3", 1.0), ("m4", 1.0)])
        asyncio.run(wait_formed([n.address for n in mesh.nodes], mesh.secret()))
        requesters = [0, 2]
        # one request from each first: models built and standing plans made on both sides
        asyncio.run(_burst_warm(mesh, requesters))
        answers = asyncio.run(_burst(mesh, requesters))
        means = {}
        for via, metas in answers.items():
            assert len(metas) == REQUESTS_EACH
            for meta in metas:
                assert meta["requester"] == mesh.nodes[via].name
                assert meta["check_ok"], meta["max_abs_diff"]
            means[via] = statistics.fmean(m["client_latency_s"] for m in metas)
        print("mean client latency by requester:", means)
        a, b = means.values()
        # neither requester waits more than twice as long as the other on average
        assert max(a, b) <= 2.0 * min(a, b), means
        used = {d for metas in answers.values() for m in metas for d in m["devices"]}
        assert len(used) >= 3  # the requests really shared the mesh


async def _burst_warm(mesh: LocalMesh, requesters: list[int]) -> None:
    secret = mesh.secret()
    for via in requesters:
        meta, _ = await infer(mesh.nodes[via].address, secret=secret, model="vgg16", strategy="edgeci",
                              size=SIZE, check=True, timeout=300.0)
        assert meta["check_ok"]
