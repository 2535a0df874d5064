"""The network AWAS glue without sockets: message mapping, items, and the plan the
auction's result becomes (bidders are in-process `Bidder`s)."""

from __future__ import annotations

from collections import deque

import pytest
import torch
from torch import nn

from meshci.auction.bidder import Bidder
from meshci.auction.errors import MessageFormatError
from meshci.auction.messages import Award, AwardReply, Bid, BidBundle, CallForBids, Close, Item
from meshci.cost.cluster import Cluster, Device, LinkSpec
from meshci.node.auction import NetworkAuction, auction_items, awarded_plan, from_message, to_message
from meshci.planning import execute_plan, make_plan
from meshci.trunk import extract_trunk
from meshci.wire import MsgType

ITEM = Item("0:0", 0, (0, 4), 1e6, 10, 20, (0, 2))
MESSAGES = [
    (CallForBids("7", 1, "a", (ITEM,), 0.5), MsgType.CALL_FOR_BIDS),
    (BidBundle("7", 1, "b", 0.1, (Bid("0:0", 0.3),)), MsgType.BIDS),
    (Award("7", 2, "a", ("0:0",), 0.2), MsgType.AWARD),
    (AwardReply("7", 2, "b", ("0:0",), ()), MsgType.ACCEPT),
    (Close("7", 3, "a", ("0:0",)), MsgType.AWARD),
]


@pytest.mark.parametrize("message,kind", MESSAGES)
def test_messages_travel_as_json_meta(message, kind) -> None:
    msg = to_message(7, message)
    assert msg.kind is kind and msg.request_id == 7
    assert from_message(msg, message.sender) == message


def test_a_peer_cannot_speak_for_another() -> None:
    msg = to_message(7, MESSAGES[1][0])
    with pytest.raises(MessageFormatError, match="claims"):
        from_message(msg, "c")
    wrong_kind = to_message(7, MESSAGES[0][0])
    with pytest.raises(MessageFormatError):
        from_message(type(wrong_kind)(MsgType.BIDS, 7, wrong_kind.meta), "a")


@pytest.fixture(scope="module")
def trunk():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    return extract_trunk(model, input_shape=(3, 48, 40), name="tiny")


def run_auction(trunk, speeds: dict[str, float], backlog: dict[str, float] | None = None,
                link: LinkSpec = LinkSpec(1000.0, 0.2)):
    devices = tuple(Device(n, g) for n, g in speeds.items())
    cluster = Cluster(devices, link, {}, "switched", devices[0].name)
    dpfl_plan = make_plan(trunk, cluster, "edgeci")
    items = auction_items(trunk, dpfl_plan)
    bidders = {n: Bidder.from_rates(n, g * 1e-3, 1000.0, 0.2, backlog_s=(backlog or {}).get(n, 0.0))
               for n, g in speeds.items()}
    auction = NetworkAuction(1, devices[0].name, items, list(speeds))
    queue = deque(auction.start(0.0))
    while queue:  # an in-memory router: bidders answer at once
        out = queue.popleft()
        if isinstance(out.message, (BidBundle, AwardReply)):
            queue += auction.receive(out.message, 0.0)
        else:
            queue += bidders[out.to].receive(out.message, 0.0)
    assert auction.done
    return dpfl_plan, items, awarded_plan(trunk, dpfl_plan, auction)


def test_items_cover_every_block_once(trunk) -> None:
    dpfl_plan, items, _ = run_auction(trunk, {"a": 1.0, "b": 2.0})
    for b, block in enumerate(dpfl_plan.blocks):
        rows = sorted(item.rows for item in items if item.block == b)
        _, h, _ = trunk.boundary_shape(block.end)
        assert rows[0][0] == 0 and rows[-1][1] == h
        assert all(x[1] == y[0] for x, y in zip(rows, rows[1:]))
        assert all(item.flops > 0 and item.segments == (block.start, block.end)
                   for item in items if item.block == b)


def test_awarded_plan_is_exact_and_follows_speed(trunk) -> None:
    dpfl_plan, _, plan = run_auction(trunk, {"a": 1.0, "b": 4.0, "c": 1.0})
    assert [(b.start, b.end) for b in plan.blocks] == [(b.start, b.end) for b in dpfl_plan.blocks]
    assert plan.auction_rounds >= 1 and plan.routing == "p2p"
    x = torch.randn(1, *trunk.input_shape)
    assert torch.allclose(execute_plan(trunk, plan, x), trunk.forward(x), rtol=1e-4, atol=1e-5)
    rows = {}
    for tile in plan.blocks[0].tiles:
        rows[tile.device] = rows.get(tile.device, 0) + tile.region.height
    assert rows.get("b", 0) == max(rows.values())  # the fastest device holds the most rows


def test_a_busy_device_gets_less(trunk) -> None:
    _, _, idle = run_auction(trunk, {"a": 1.0, "b": 1.0})
    _, _, busy = run_auction(trunk, {"a": 1.0, "b": 1.0}, backlog={"b": 10.0})
    def rows_of(plan, device):
        return sum(t.region.height for blk in plan.blocks for t in blk.tiles if t.device == device)
    assert rows_of(busy, "b") < rows_of(idle, "b")


def test_the_award_keeps_dpfl_degree_of_parallelism(trunk) -> None:
    """Items are priced one by one, each with its halo: without the cap, a block DPFL kept on
    one device could be split between two winners that each compute nearly all of it."""
    # a slow link: DPFL keeps blocks on fewer devices than bid (here: on one)
    dpfl_plan, items, plan = run_auction(trunk, {"a": 1.0, "b": 1.0}, link=LinkSpec(1.0, 50.0))
    assert any(len(block.tiles) < 2 for block in dpfl_plan.blocks)
    for dpfl_block, block in zip(dpfl_plan.blocks, plan.blocks):
        assert len({t.device for t in block.tiles}) <= len(dpfl_block.tiles)
    x = torch.randn(1, *trunk.input_shape)
    assert torch.allclose(execute_plan(trunk, plan, x), trunk.forward(x), rtol=1e-4, atol=1e-5)


def test_within_degree_keeps_the_devices_that_won_most() -> None:
    from meshci.node.auction import _within_degree

    assert _within_degree(["a", "b", "c"], 3, {}) == ["a", "b", "c"]
    assert _within_degree(["a", "b", "c"], 1, {"a": 1.0, "b": 5.0, "c": 2.0}) == ["b"]
    assert _within_degree(["a", "b", "c"], 2, {"a": 1.0, "b": 5.0, "c": 2.0}) == ["b", "c"]  # row order kept


def test_the_award_is_predicted_by_the_cost_model_and_stands(trunk) -> None:
    """The award's latency is predicted by the one cost model every strategy is measured by;
    an award the requester's view finds slower than DPFL's layout (here: every block split
    across a device 20x slower) still stands, since its bidders priced it from what they
    measured of themselves, and the note says so."""
    from dataclasses import replace as dc_replace

    from meshci.node.standing import judged_award
    from meshci.planning.evaluate import evaluate_plan
    from meshci.planning.plan import TileSpec
    from meshci.trunk import Region

    devices = (Device("a", 10.0), Device("b", 0.5))
    cluster = Cluster(devices, LinkSpec(100.0, 1.0), {}, "switched", "a")
    dpfl_plan = make_plan(trunk, cluster, "edgeci")
    blocks = []
    for block in dpfl_plan.blocks:
        _, h, w = trunk.boundary_shape(block.end)
        half = h // 2
        tiles = (TileSpec("a", Region(0, half, 0, w)), TileSpec("b", Region(half, h, 0, w)))
        blocks.append(dc_replace(block, tiles=tiles, finish_s={"a": 0.0, "b": 0.0}))
    slow = dc_replace(dpfl_plan, blocks=tuple(blocks), predicted_latency_s=1e-6, auction_rounds=2)
    chosen, note = judged_award(trunk, cluster, dpfl_plan, slow)
    assert chosen.blocks == slow.blocks and chosen.auction_rounds == 2
    assert chosen.predicted_latency_s == pytest.approx(evaluate_plan(trunk, cluster, slow)[0])
    assert chosen.predicted_latency_s > dpfl_plan.predicted_latency_s and "DPFL's layout" in note
    kept, note = judged_award(trunk, cluster, dpfl_plan, dpfl_plan)
    assert kept.blocks == dpfl_plan.blocks and note == "standing award"
