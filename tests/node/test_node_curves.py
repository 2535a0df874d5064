"""A node's measured speed curves: measured once per model and size (disk cache), carried in
its advert, planned with (cluster_from_view) and bid with (Runtime.bid_compute_s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from meshci.auction.messages import Item
from meshci.cost import LinkSpec
from meshci.cost.profiling import SpeedProfile
from meshci.node.auction import auction_items
from meshci.node.membership import Address, Advert, Peer, PeerStatus, curve_key
from meshci.node.request import cluster_from_view, device_signature
from meshci.node.runtime import LoadedModel, Runtime
from meshci.planning import make_plan
from meshci.trunk import Region, extract_trunk

LINK = LinkSpec(1000.0, 0.1)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 16 * 16, 10),
    )


@pytest.fixture()
def trunk():
    torch.manual_seed(0)
    return extract_trunk(small_cnn().eval(), (3, 32, 32), "small")


def peer(name: str, advert: Advert) -> Peer:
    return Peer(name, Address("127.0.0.1", 1), 1, PeerStatus.ALIVE, 0.0, advert)


def test_advert_carries_curves_through_json() -> None:
    curve = ((0.001234567, 0.0002), (0.0, 1e-5))
    advert = Advert(2.0, 0.1, (("b", 100.0, 1.0),), (("m@32x32", curve),))
    back = Advert.from_json(json.loads(json.dumps(advert.to_json())))
    assert back.curves[0][0] == "m@32x32"
    flat = [x for pair in back.curves[0][1] for x in pair]
    assert flat == pytest.approx([x for pair in curve for x in pair], rel=1e-3)
    assert Advert.from_json({"gflops": 2.0}).curves == ()


@pytest.mark.parametrize("curves", [
    {"m": [[-1.0, 0.1]]}, {"m": [[float("inf"), 0.1]]}, {"m": []}, {"m": [[1.0]]}, ["m"],
])
def test_advert_rejects_bad_curves(curves: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        Advert.from_json({"gflops": 1.0, "curves": curves})


def test_cluster_from_view_gives_devices_their_curves_for_the_request(trunk) -> None:
    n = len(trunk.segments)
    mine = tuple((0.001, 1e-4) for _ in range(n))
    theirs = tuple((0.002, 2e-4) for _ in range(n))
    key = curve_key("small", (32, 32))
    me = Advert(1.0, curves=((key, mine),))
    peers = [peer("b", Advert(1.0, curves=((key, theirs), (curve_key("small", (64, 64)), mine)))),
             peer("c", Advert(3.0))]
    cluster = cluster_from_view("a", me, peers, LINK, model="small", size=(32, 32))
    by_name = {d.name: d for d in cluster.devices}
    assert by_name["a"].curve_for("small", n) == mine
    assert by_name["b"].curve_for("small", n) == theirs  # the one for this size
    assert by_name["c"].curves == ()
    plain = cluster_from_view("a", me, peers, LINK)
    assert all(d.curves == () for d in plain.devices)
    assert device_signature(plain) != device_signature(cluster)


def test_planner_follows_the_advertised_curves(trunk) -> None:
    # same advertised GFLOP/s; by their curves "slow" is 10x slower than "fast"
    n = len(trunk.segments)
    key = curve_key("small", (32, 32))
    fast = tuple((0.0, 1e-6) for _ in range(n))
    slow = tuple((0.0, 1e-5) for _ in range(n))
    cluster = cluster_from_view("fast", Advert(1.0, curves=((key, fast),)),
                                [peer("slow", Advert(1.0, curves=((key, slow),)))], LINK,
                                model="small", size=(32, 32))
    plan = make_plan(trunk, cluster, "edgeci")
    rows = {"fast": 0, "slow": 0}
    for block in plan.blocks:
        for tile in block.tiles:
            rows[tile.device] += tile.region.height
    assert rows["fast"] > rows["slow"]


def test_runtime_measures_once_and_caches_on_disk(trunk, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    runtime = Runtime(curves=True, data_dir=tmp_path, progress=lambda d, t, label: seen.append((d, t)))
    try:
        profile = runtime.profile(trunk, (32, 32))
        assert seen and seen[-1] == (len(trunk.segments), len(trunk.segments))
        assert len(profile.curve) == len(trunk.segments)
        assert all(a >= 0 and b >= 0 for a, b in profile.curve)
        assert runtime.curves() == ((curve_key("small", (32, 32)), profile.curve),)
        assert runtime.advert(2.0, 0.5).curves == runtime.curves()
        assert list(tmp_path.glob("profiles/small-*.json"))
    finally:
        runtime.close()
    seen.clear()
    again = Runtime(curves=True, data_dir=tmp_path, progress=lambda d, t, label: seen.append((d, t)))
    try:
        assert again.profile(trunk, (32, 32)).curve == profile.curve
        assert seen == []  # read from the cache, not measured
    finally:
        again.close()


async def test_load_measures_on_first_use(tmp_path: Path) -> None:
    runtime = Runtime(isolate_builds=False, curves=True, data_dir=tmp_path, progress=None)
    try:
        loaded = await runtime.load("resnet34", 0, (32, 32))
        assert [key for key, _ in runtime.curves()] == ["resnet34@32x32"]
        assert len(runtime.curves()[0][1]) == len(loaded.trunk.segments)
    finally:
        runtime.close()


def test_bids_and_tile_estimates_follow_the_curves(trunk) -> None:
    n = len(trunk.segments)
    curve = tuple((0.01, 1e-3) for _ in range(n))
    runtime = Runtime(curves=False)
    try:
        runtime.profiles[curve_key("small", (32, 32))] = SpeedProfile.of(trunk, curve)
        whole = Region(0, 16, 0, 16)
        loaded = LoadedModel(("small", 0, 32, 32), trunk, False)
        # the whole trunk: every segment's fixed cost plus its per-row cost over all its rows
        expected = sum(a + b * seg.out_shape[1] for (a, b), seg in zip(curve, trunk.segments))
        assert runtime.tile_s(loaded, 0, n, whole, gflops=1.0) == pytest.approx(expected)
        item = Item("0:0", 0, (0, 16), loaded.flops(0, n, whole), segments=(0, n),
                    model=curve_key("small", (32, 32)))
        assert runtime.bid_compute_s(item, gflops=1.0) == pytest.approx(expected)
        # half the FLOPs: the fixed costs stay, the per-row part halves
        half = Item("0:1", 0, (0, 8), item.flops / 2, segments=(0, n), model=item.model)
        fixed = sum(a for a, _ in curve)
        assert runtime.bid_compute_s(half, gflops=1.0) == pytest.approx(fixed + (expected - fixed) / 2)
        # a model it has no curves for: by its GFLOP/s
        other = Item("0:2", 0, (0, 8), 4e9, segments=(0, n), model="other@32x32")
        assert runtime.bid_compute_s(other, gflops=2.0) == pytest.approx(2.0)
    finally:
        runtime.close()


def test_auction_items_name_the_model_and_size(trunk) -> None:
    cluster = cluster_from_view("a", Advert(1.0), [peer("b", Advert(1.0))], LINK)
    plan = make_plan(trunk, cluster, "edgeci")
    items = auction_items(trunk, plan)
    assert {item.model for item in items} == {"small@32x32"}
    assert Item.from_json(json.loads(json.dumps(items[0].to_json()))) == items[0]


def test_each_end_measures_what_it_receives_and_the_slower_direction_counts() -> None:
    # a measured 40 Mbit/s into b, 25 into a; c measured nothing large from a (0) and
    # neither end measured the b-c pair
    me = Advert(1.0, links=(("b", 25.0, 2.0), ("c", 0.0, 3.0)))
    peers = [peer("b", Advert(1.0, links=(("a", 40.0, 1.0), ("c", 0.0, 1.0)))),
             peer("c", Advert(1.0, links=(("a", 60.0, 4.0),)))]
    cluster = cluster_from_view("a", me, peers, LINK)
    ab, ac = cluster.link("a", "b"), cluster.link("a", "c")
    assert (ab.mbps, ab.latency_ms) == (25.0, 2.0)  # the slower direction; the requester's latency
    assert (ac.mbps, ac.latency_ms) == (60.0, 3.0)  # only c measured the rate
    assert cluster.link("b", "c").mbps == LINK.mbps  # unmeasured: the default


def test_a_devices_advertised_tile_overhead_reaches_the_planner() -> None:
    me = Advert(1.0, tile_ms=2.5)
    cluster = cluster_from_view("a", me, [peer("b", Advert(1.0))], LINK)
    overheads = {d.name: d.tile_overhead_s for d in cluster.devices}
    assert overheads == {"a": pytest.approx(0.0025), "b": 0.0}
    again = Advert.from_json(json.loads(json.dumps(me.to_json())))
    assert again.tile_ms == 2.5
    for bad in (-1.0, float("1e300"), True, "3"):
        with pytest.raises(ValueError, match="tile_ms"):
            Advert.from_json({**me.to_json(), "tile_ms": bad})
