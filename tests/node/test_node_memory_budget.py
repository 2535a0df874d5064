"""Memory discipline (`meshci.node.memory_budget`): a device never takes more tiles than
fit its memory budget (`--memory-mb`); plans and bids account for it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

from inprocess import start_mesh

from meshci.auction.bidder import Bidder
from meshci.auction.messages import Award, CallForBids, Item
from meshci.models.registry import build_model
from meshci.node.client import RequestError, infer
from meshci.node.membership import Address
from meshci.node.memory_budget import MemoryFit, plan_bytes, segment_weights, tile_bytes
from meshci.node.server import Node
from meshci.planning import Plan
from meshci.trunk import Region, extract_trunk

pytestmark = pytest.mark.timeout(240)

SECRET = os.urandom(32)
MODEL = "squeezenet1_1"
SIZE = (64, 64)
SMALL_MB = 1


def _trunk():
    return extract_trunk(build_model(MODEL, seed=0), input_shape=(3, *SIZE), name=MODEL)


def test_a_tile_costs_its_maps_and_a_plan_its_weights_once() -> None:
    trunk = _trunk()
    weights = segment_weights(trunk)
    params = sum(p.numel() * 4 for p in build_model(MODEL, seed=0).parameters())
    # squeezenet's trunk holds every conv, its final one too: each tensor counted once
    assert sum(weights) == params
    _, h, w = trunk.boundary_shape(2)  # tiles are regions of the block's output
    whole, half = Region(0, h, 0, w), Region(0, h // 2, 0, w)
    assert tile_bytes(trunk, 0, 2, half) < tile_bytes(trunk, 0, 2, whole)
    # the whole output: every map of the block (the input less the rows a stride skips)
    maps = 4 * sum(c * hh * ww for c, hh, ww in map(trunk.boundary_shape, (0, 1, 2)))
    assert 0.98 * maps <= tile_bytes(trunk, 0, 2, whole) <= maps


def test_bidder_bids_only_on_items_that_fit_and_declines_awards_beyond_its_budget() -> None:
    items = tuple(Item(f"i{k}", 0, (0, 1), 1e6, 400, 600) for k in range(3))
    bidder = Bidder("b", lambda item: 0.001, item_bytes=lambda item: item.recv_bytes + item.send_bytes,
                    memory_bytes=lambda: 2500.0)
    bundle = bidder.receive(CallForBids("a1", 0, "r", items, 1.0))[0].message
    assert {b.item_id for b in bundle.bids} == {"i0", "i1", "i2"}  # each fits alone
    reply = bidder.receive(Award("a1", 0, "r", ("i0", "i1", "i2"), 0.003))[0].message
    assert reply.accepted == ("i0", "i1") and reply.declined == ("i2",)  # together: 2000 of 2500 bytes
    tiny = Bidder("t", lambda item: 0.001, item_bytes=lambda item: item.recv_bytes + item.send_bytes,
                  memory_bytes=lambda: 999.0)
    assert tiny.receive(CallForBids("a2", 0, "r", items, 1.0))[0].message.bids == ()


async def _mesh(tmp_path: Path, budgets: dict[str, int | None]) -> list[Node]:
    return await start_mesh(dict.fromkeys(budgets, 1.0), SECRET, data_root=tmp_path,
                            per_node={name: {"memory_mb": budget} for name, budget in budgets.items()})


async def test_a_device_with_a_small_budget_gets_no_tile_that_does_not_fit(tmp_path: Path) -> None:
    trunk = _trunk()
    nodes = await _mesh(tmp_path, {"req": None, "small": SMALL_MB, "big": None})
    try:
        x = torch.randn(1, 3, *SIZE)
        expected = build_model(MODEL, seed=0)(x)
        for strategy in ("modnn", "edgeci"):
            meta, logits = await infer(nodes[0].address, model=MODEL, size=SIZE, image=x, secret=SECRET,
                                       strategy=strategy, details=True, check=True)
            assert meta["check_ok"] and torch.allclose(logits.flatten(), expected.flatten(), atol=1e-4)
            plan = Plan.from_json(meta["plan"])
            assert plan_bytes(trunk, plan, "small") <= SMALL_MB * 2**20
            assert "big" in meta["devices"]
        # without the budget, modnn's equal strips give the small device more than fits it
        fit = nodes[0].requester.memory
        assert "small" in fit.leave_out(MODEL, SIZE, {"small": SMALL_MB, "big": 0})
        # a requester whose own budget is too small: its worker refuses, with the reason
        with pytest.raises(RequestError, match=r"small cannot serve the plan: its tiles need [0-9.]+ MB, "
                                               r"over its memory budget of 1.0 MB"):
            await infer(nodes[1].address, model=MODEL, size=SIZE, image=x, secret=SECRET, strategy="local")
        assert nodes[1].worker.contexts == {} or all(c.reserved == 0 for c in nodes[1].worker.contexts.values())
    finally:
        await asyncio.gather(*(n.close() for n in nodes))


def test_memory_fit_remembers_who_was_left_out_until_their_budget_grows() -> None:
    trunk = _trunk()
    _, h, w = trunk.boundary_shape(len(trunk.segments))
    whole = Region(0, h, 0, w)
    from meshci.planning.plan import BlockPlan, TileSpec
    plan = Plan("local", MODEL, (3, *SIZE), "r", (BlockPlan(0, len(trunk.segments), (TileSpec("p", whole),), {}),),
                "p2p", 0.0, 0.0, 0, None)
    fit = MemoryFit()
    need = plan_bytes(trunk, plan, "p")
    assert fit.check(MODEL, SIZE, trunk, plan, {"p": need // 2**20 + 1}, "r") == []
    assert fit.check(MODEL, SIZE, trunk, plan, {"p": 1}, "r") == ["p"]
    assert fit.leave_out(MODEL, SIZE, {"p": 1}) == {"p"}
    assert fit.leave_out(MODEL, SIZE, {"p": 4096}) == set()


def test_the_advert_carries_the_budget_typed_and_bounded() -> None:
    from meshci.node.fields import FieldError
    from meshci.node.membership import Advert

    assert Advert.from_json(Advert(gflops=2.0, memory_mb=512).to_json()).memory_mb == 512
    assert Advert.from_json({"gflops": 2.0}).memory_mb == 0  # not stated: no constraint
    for bad in (-1, 1e30, "lots", True):
        with pytest.raises(FieldError, match="memory_mb"):
            Advert.from_json({"gflops": 2.0, "memory_mb": bad})


async def test_meshci_node_takes_its_budget_from_the_flag_and_from_the_environment(tmp_path: Path) -> None:
    import sys

    from meshci.node.client import stats

    for args, env in ((["--memory-mb", "7"], {}), ([], {"MESHCI_MEMORY_MB": "9"})):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshci", "node", "--insecure", "--gflops", "1", "--name", "m",
            "--data-dir", str(tmp_path), *args, env={**os.environ, **env},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
            host, port = line.rsplit(" ", 1)[1].strip().rsplit(":", 1)
            answer = await stats(Address(host, int(port)), secret=None, insecure=True)
            want = int(args[1]) if args else int(env["MESHCI_MEMORY_MB"])
            assert answer["memory_budget_mb"] == want and answer["advert"]["memory_mb"] == want
        finally:
            proc.terminate()
            await proc.wait()
