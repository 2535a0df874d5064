"""The request state machines without sockets: RequesterRun and WorkerRuns joined by an
in-memory router that delivers pieces in a shuffled order; tile compute runs inline."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from meshci.node.request import (
    Compute, HeadRun, PieceStore, RequesterRun, RequestStateError, RunHead, SendPiece, WorkerRun,
    tensor_bytes,
)
from meshci.node.runtime import PlanGeometry
from meshci.planning.plan import BlockPlan, HeadPlan, Plan, TileSpec
from meshci.trunk.head import HeadSplit
from meshci.tiling import run_block, split_rows
from meshci.trunk import Region, extract_trunk


def tiny_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()


@pytest.fixture(scope="module")
def trunk():
    return extract_trunk(tiny_model(), input_shape=(3, 29, 23), name="tiny")


def strip_plan(trunk, cuts: list[int], devices_per_block: list[list[str]], routing: str,
               requester: str = "a", head: HeadPlan | None = None) -> Plan:
    bounds = [0, *cuts, len(trunk.segments)]
    blocks = []
    for (start, end), devices in zip(zip(bounds, bounds[1:]), devices_per_block):
        _, h, w = trunk.boundary_shape(end)
        rows = split_rows(h, len(devices))
        tiles = tuple(TileSpec(d, Region(r0, r1, 0, w)) for d, (r0, r1) in zip(devices, rows))
        blocks.append(BlockPlan(start, end, tiles, {}))
    return Plan("test", "tiny", trunk.input_shape, requester, tuple(blocks), routing, 0.0, 0.0, head=head)


class Router:
    """Runs one request across in-memory nodes; counts bytes each node sends per stage."""

    def __init__(self, trunk, plan: Plan, seed: int = 0) -> None:
        self.trunk = trunk
        self.plan = plan
        geometry = PlanGeometry(trunk, plan)
        self.requester = RequesterRun(plan, plan.requester, geometry)
        self.workers = {d: WorkerRun(plan, d, geometry) for d in {t.device for b in plan.blocks for t in b.tiles}}
        self.split = HeadSplit.of(trunk.head, trunk.boundary_shape(len(trunk.segments)))
        self.head = HeadRun(plan, geometry, self.split.out_features if plan.head_plan.split else None)
        self.rng = random.Random(seed)
        self.sent: dict[tuple[str, str], int] = {}
        self.relayed: dict[str, int] = {}
        self.queue: list[tuple[str, object]] = []
        self.output: torch.Tensor | None = None

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The logits, computed by the head device from what the workers sent it."""
        self._push(self.plan.requester, self.requester.start(x))
        while self.queue:
            sender, action = self.queue.pop(self.rng.randrange(len(self.queue)))
            if isinstance(action, SendPiece):
                if action.dest != sender:
                    key = (sender, action.stage)
                    self.sent[key] = self.sent.get(key, 0) + tensor_bytes(action.tensor)
                    self.relayed[sender] = self.relayed.get(sender, 0) + action.relayed_bytes
                if action.stage == "gather":
                    assert action.dest == self.plan.requester
                    self._push(action.dest, self.requester.on_gather(action.block, action.region, action.tensor))
                elif action.stage in ("output", "partial"):
                    assert action.dest == self.plan.head_plan.device
                    take = self.head.on_partial if action.stage == "partial" else self.head.on_output
                    self._push(action.dest, take(action.region, action.tensor))
                elif action.stage == "sum":
                    self._push(action.dest, self.workers[action.dest].on_sum(action.block, action.region, action.tensor))
                else:
                    self._push(action.dest, self.workers[action.dest].on_piece(action.block, action.region, action.tensor))
            elif isinstance(action, Compute):
                assert action.have == PlanGeometry(self.trunk, self.plan).need(action.block, action.out)
                y = run_block(self.trunk, action.start, action.end, action.x, action.have, action.out, action.mean)
                if action.partial:
                    y = self.split.partial(action.out, y)
                self._push(sender, self.workers[sender].on_computed(action.block, action.tile, y))
            elif isinstance(action, RunHead):
                assert self.output is None and sender == self.plan.head_plan.device
                self.output = self.split.finish(action.input) if action.split else self.trunk.head(action.input)
        assert self.output is not None, "the request never finished"
        assert all(w.done for w in self.workers.values()) and self.head.done
        return self.output

    def _push(self, who: str, actions: list) -> None:
        self.queue += [(who, a) for a in actions]


CASES = [
    ([], [["a", "b", "c"]]),
    ([2], [["b", "c"], ["a", "b", "c"]]),
    ([1, 3], [["c"], ["a", "b", "c"], ["b", "a"]]),
    ([2, 3], [["a", "b", "c", "a"], ["c", "c"], ["a"]]),  # two tiles of one block on one device
]


HEADS = [None, HeadPlan("c"), HeadPlan("b", split=True), HeadPlan("a", split=True)]


@pytest.mark.parametrize("routing", ["p2p", "requester"])
@pytest.mark.parametrize("cuts,devices", CASES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("head", HEADS, ids=["requester", "c-whole", "b-split", "a-split"])
def test_distributed_output_is_exact(trunk, cuts, devices, routing, seed, head) -> None:
    plan = strip_plan(trunk, cuts, devices, routing, head=head)
    x = torch.randn(1, *trunk.input_shape)
    with torch.no_grad():
        expected = trunk.forward(x)
        out = Router(trunk, plan, seed).run(x)
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_head_run_rejects_parts_that_do_not_fit(trunk) -> None:
    plan = strip_plan(trunk, [2], [["b", "c"], ["b", "c"]], "p2p", head=HeadPlan("a", split=True))
    head = HeadRun(plan, PlanGeometry(trunk, plan), 10)
    tiles = [t.region for t in plan.blocks[-1].tiles]
    with pytest.raises(RequestStateError):
        head.on_partial(Region(0, 1, 0, 1), torch.zeros(10))  # no such last-block tile
    with pytest.raises(RequestStateError):
        head.on_partial(tiles[0], torch.zeros(11))  # not the prefix's length
    with pytest.raises(RequestStateError):
        head.on_output(tiles[0], torch.zeros(1, 16, 1, 1))  # split: no trunk output wanted
    assert head.on_partial(tiles[0], torch.zeros(10)) == []
    with pytest.raises(RequestStateError):
        head.on_partial(tiles[0], torch.zeros(10))  # twice
    (done,) = head.on_partial(tiles[1], torch.ones(10))
    assert isinstance(done, RunHead) and done.split and torch.equal(done.input, torch.ones(10))


def test_p2p_requester_relays_nothing_and_boundaries_go_direct(trunk) -> None:
    plan = strip_plan(trunk, [2], [["b", "c"], ["b", "c"]], "p2p")
    router = Router(trunk, plan)
    router.run(torch.randn(1, *trunk.input_shape))
    assert sum(router.relayed.values()) == 0
    assert router.sent.get(("b", "tile"), 0) > 0 and router.sent.get(("c", "tile"), 0) > 0
    # the requester sent only the first block's inputs
    first_inputs = sum(tensor_bytes(a.tensor) for a in
                       RequesterRun(plan, "a", PlanGeometry(trunk, plan)).start(torch.randn(1, *trunk.input_shape)))
    assert router.sent[("a", "tile")] == first_inputs


def test_requester_routing_relays_boundaries(trunk) -> None:
    plan = strip_plan(trunk, [2], [["b", "c"], ["b", "c"]], "requester")
    router = Router(trunk, plan)
    router.run(torch.randn(1, *trunk.input_shape))
    assert router.relayed.get("a", 0) > 0
    assert router.sent.get(("b", "tile"), 0) == 0  # workers never send to each other


def test_requester_does_not_count_rows_it_computed_as_relayed(trunk) -> None:
    both = strip_plan(trunk, [2], [["a", "b"], ["b", "a"]], "requester")
    router = Router(trunk, both)
    router.run(torch.randn(1, *trunk.input_shape))
    rescattered = router.sent[("a", "tile")]
    first_inputs = sum(tensor_bytes(a.tensor) for a in
                       RequesterRun(both, "a", PlanGeometry(trunk, both)).start(torch.randn(1, *trunk.input_shape))
                       if a.dest != "a")
    assert 0 < router.relayed["a"] < rescattered - first_inputs


def test_worker_rejects_pieces_that_do_not_fit(trunk) -> None:
    plan = strip_plan(trunk, [2], [["b", "c"], ["b", "c"]], "p2p")
    worker = WorkerRun(plan, "b", PlanGeometry(trunk, plan))
    with pytest.raises(RequestStateError):
        worker.on_piece(5, Region(0, 1, 0, 1), torch.zeros(1, 3, 1, 1))
    with pytest.raises(RequestStateError):
        worker.on_piece(0, Region(0, 100, 0, 1), torch.zeros(1, 3, 100, 1))
    with pytest.raises(RequestStateError):
        worker.on_piece(0, Region(0, 2, 0, 2), torch.zeros(1, 3, 3, 3))
    outsider = WorkerRun(plan, "z", PlanGeometry(trunk, plan))
    assert outsider.done
    with pytest.raises(RequestStateError):
        outsider.on_piece(0, Region(0, 1, 0, 1), torch.zeros(1, 3, 1, 1))


def test_requester_rejects_foreign_pieces(trunk) -> None:
    plan = strip_plan(trunk, [2], [["b"], ["c"]], "p2p")
    req = RequesterRun(plan, "a", PlanGeometry(trunk, plan))
    with pytest.raises(RequestStateError):
        req.on_gather(1, Region(0, 1, 0, 1), torch.zeros(1, 8, 1, 1))  # p2p: block 1 is not gathered
    with pytest.raises(RequestStateError):
        req.on_gather(2, Region(0, 1, 0, 1), torch.zeros(1, 8, 1, 1))  # the trunk output goes to the head
    with pytest.raises(RequestStateError):
        req.start(torch.zeros(1, 3, 5, 5))
    with pytest.raises(RequestStateError):
        RequesterRun(plan, "b", PlanGeometry(trunk, plan))


def test_piece_store_coverage() -> None:
    store = PieceStore(6, 4)
    store.add(Region(0, 3, 0, 4), torch.ones(1, 1, 3, 4))
    assert store.covers(Region(1, 3, 0, 4)) and not store.covers(Region(2, 4, 0, 4))
    store.add(Region(3, 6, 0, 4), torch.full((1, 1, 3, 4), 2.0))
    assert store.covers(Region(0, 6, 0, 4))
    out = store.take(Region(2, 4, 1, 3))
    assert out[0, 0, :, 0].tolist() == [1.0, 2.0]
