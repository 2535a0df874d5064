"""The auction as distributed rounds: messages, bidder, auctioneer, drops, concurrency, and
every kind of bad message a peer can send (ignored with a logged reason, never a crash)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshci.auction import (
    Auctioneer,
    AuctionError,
    Award,
    AwardReply,
    Bid,
    BidBundle,
    Bidder,
    CallForBids,
    Close,
    Item,
    LocalRouter,
    MessageFormatError,
    Outgoing,
    Phase,
    assign,
    message_from_json,
    run_local_auction,
)

GFLOP = 1e9


def tiles(n: int, block: int = 0, flops: float = GFLOP, nbytes: int = 0) -> list[Item]:
    return [
        Item(f"b{block}t{i}", block, (i * 4, i * 4 + 4), flops * (1 + 0.05 * i), nbytes, nbytes)
        for i in range(n)
    ]


def rated(speeds: dict[str, float], **kwargs: float) -> list[Bidder]:
    return [Bidder.from_rates(name, gflops, **kwargs) for name, gflops in speeds.items()]


def deliver(machine: Auctioneer, bidders: dict[str, Bidder], out: list[Outgoing], now: float,
            skip: frozenset[str] = frozenset()) -> list[Outgoing]:
    """One hop: hand the auctioneer's messages to bidders, return what goes back to it."""
    back: list[Outgoing] = []
    for o in out:
        replies = bidders[o.to].receive(o.message, now)
        if o.to not in skip:
            for r in replies:
                back.extend(machine.receive(r.message, now))
    return back


# -- messages ----------------------------------------------------------------------------

item_strategy = st.builds(
    Item,
    item_id=st.text(min_size=1, max_size=8),
    block=st.integers(0, 20),
    rows=st.tuples(st.integers(0, 300), st.integers(0, 300)),
    flops=st.floats(0, 1e12),
    recv_bytes=st.integers(0, 10**9),
    send_bytes=st.integers(0, 10**9),
    segments=st.tuples(st.integers(0, 40), st.integers(0, 40)),
    recv_from=st.text(max_size=5),
    send_to=st.text(max_size=5),
)


@settings(max_examples=50, deadline=None)
@given(items=st.lists(item_strategy, max_size=4), backlog=st.floats(-1e12, 1e12), rnd=st.integers(0, 9))
def test_messages_round_trip_through_json(items: list[Item], backlog: float, rnd: int) -> None:
    import json

    messages = [
        CallForBids("a1", rnd, "me", tuple(items), 0.5),
        BidBundle("a1", rnd, "d0", backlog, tuple(Bid(i.item_id, backlog) for i in items)),
        Award("a1", rnd, "me", tuple(i.item_id for i in items), 1.5),
        AwardReply("a1", rnd, "d0", ("x",), ("y", "z")),
        Close("a1", rnd, "me", tuple(i.item_id for i in items)),
    ]
    for m in messages:
        wire = json.loads(json.dumps(m.to_json(), allow_nan=True))
        assert message_from_json(wire) == m


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"type": "nope"},
        {"type": "award", "auction_id": "a", "round": 1, "sender": "s", "item_ids": ["x"]},
        {"type": "award", "auction_id": "a", "round": "1", "sender": "s", "item_ids": [], "work_s": 1.0},
        {"type": "award", "auction_id": "a", "round": True, "sender": "s", "item_ids": [], "work_s": 1.0},
        {"type": "award", "auction_id": "a", "round": 1, "sender": "s", "item_ids": [3], "work_s": 1.0},
        {"type": "bid_bundle", "auction_id": "a", "round": 1, "sender": "s", "backlog_s": 0, "bids": [["x"]]},
        {"type": "bid_bundle", "auction_id": "a", "round": 1, "sender": "s", "backlog_s": 0, "bids": [[1, 2]]},
        # finite but absurd, or an integer float() cannot take: refused before any arithmetic
        {"type": "bid_bundle", "auction_id": "a", "round": 1, "sender": "s", "backlog_s": 1e300, "bids": []},
        {"type": "bid_bundle", "auction_id": "a", "round": 1, "sender": "s", "backlog_s": 0,
         "bids": [["x", 10 ** 400]]},
        {"type": "bid_bundle", "auction_id": "a", "round": 2 ** 70, "sender": "s", "backlog_s": 0, "bids": []},
        {"type": "bid_bundle", "auction_id": "a", "round": 1, "sender": "s\nforged", "backlog_s": 0, "bids": []},
        {"type": "call_for_bids", "auction_id": "a", "round": 1, "sender": "s", "reply_within_s": 1,
         "items": [{"item_id": "x"}]},
        {"type": "call_for_bids", "auction_id": "a", "round": 1, "sender": "s", "reply_within_s": 1,
         "items": [{**tiles(1)[0].to_json(), "flops": -1.0}]},
        {"type": "call_for_bids", "auction_id": "a", "round": 1, "sender": "s", "reply_within_s": 1,
         "items": [{**tiles(1)[0].to_json(), "rows": [1, 2, 3]}]},
    ],
)
def test_malformed_messages_raise_message_format_error(bad: object) -> None:
    with pytest.raises(MessageFormatError):
        message_from_json(bad)  # type: ignore[arg-type]


# -- bidder ---------------------------------------------------------------------------------


def test_bid_is_backlog_plus_compute_plus_transfers() -> None:
    calls: list[tuple[int, str]] = []

    def link(nbytes: int, peer: str) -> float:
        calls.append((nbytes, peer))
        return nbytes / 1000

    bidder = Bidder("d0", lambda item: item.flops / GFLOP, link, backlog_s=0.5)
    item = Item("t", 0, (0, 4), 2 * GFLOP, recv_bytes=100, send_bytes=300, send_to="d9")
    out = bidder.receive(CallForBids("a", 1, "boss", (item,), 1.0))
    bundle = out[0].message
    assert out[0].to == "boss" and isinstance(bundle, BidBundle)
    assert bundle.backlog_s == 0.5
    assert bundle.bids == (Bid("t", pytest.approx(0.5 + 2.0 + 0.1 + 0.3)),)
    assert calls == [(100, "boss"), (300, "d9")]  # input from the auctioneer, output to d9


def test_bidder_skips_items_beyond_its_capacity() -> None:
    bidder = Bidder.from_rates("d0", 1.0, capacity_s=1.5)
    items = (Item("small", 0, (0, 1), GFLOP), Item("big", 0, (1, 2), 2 * GFLOP))
    bundle = bidder.receive(CallForBids("a", 1, "boss", items, 1.0))[0].message
    assert [b.item_id for b in bundle.bids] == ["small"]


def test_bidder_award_close_release_cycle() -> None:
    bidder = Bidder.from_rates("d0", 1.0)
    items = tuple(tiles(3))
    bidder.receive(CallForBids("a", 1, "boss", items, 1.0))
    reply = bidder.receive(Award("a", 2, "boss", ("b0t0", "b0t1", "nope"), 2.05))[0].message
    assert reply.accepted == ("b0t0", "b0t1") and reply.declined == ("nope",)
    again = bidder.receive(Award("a", 2, "boss", ("b0t0", "b0t1", "nope"), 2.05))[0].message
    assert again == reply  # a repeated award gets the same answer, nothing is held twice
    assert bidder.backlog_s == pytest.approx(1.0 + 1.05)
    assert not any(c.firm for c in bidder.commitments("a").values())
    assert bidder.backlog_outside("a") == 0.0
    bidder.receive(Close("a", 3, "boss", ("b0t0",)))
    assert list(bidder.commitments("a")) == ["b0t0"] and bidder.commitments("a")["b0t0"].firm
    assert bidder.backlog_s == pytest.approx(1.0)
    bidder.release("a")
    assert bidder.backlog_s == 0.0 and bidder.auctions() == ()


def test_bidder_declines_what_it_can_no_longer_honour() -> None:
    bidder = Bidder.from_rates("d0", 1.0, tolerance=0.1)
    bidder.receive(CallForBids("a", 1, "boss", tuple(tiles(2, block=0)), 1.0))
    bidder.receive(CallForBids("b", 1, "other", tuple(tiles(2, block=5)), 1.0))
    # It wins in auction b first: 2.05 s of work it did not have when it bid in a.
    assert bidder.receive(Award("b", 2, "other", ("b5t0", "b5t1"), 2.05))[0].message.declined == ()
    reply = bidder.receive(Award("a", 2, "boss", ("b0t0", "b0t1"), 2.05))[0].message
    assert reply.accepted == () and set(reply.declined) == {"b0t0", "b0t1"}


def test_bidder_ignores_messages_for_auctioneers(caplog: pytest.LogCaptureFixture) -> None:
    bidder = Bidder.from_rates("d0", 1.0)
    with caplog.at_level(logging.WARNING):
        assert bidder.receive(BidBundle("a", 1, "d1", 0.0, ())) == []
    assert "not a message for a bidder" in caplog.text


@pytest.mark.parametrize("kwargs", [{"backlog_s": -1.0}, {"backlog_s": math.nan}, {"capacity_s": 0.0}, {"tolerance": -0.1}])
def test_bidder_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(AuctionError):
        Bidder("d0", lambda item: 1.0, **kwargs)


# -- a whole auction ----------------------------------------------------------------------


def test_local_auction_matches_the_core_and_takes_two_round_trips() -> None:
    speeds = {"d0": 1.0, "d1": 2.5, "d2": 4.0, "d3": 8.0}
    items = tiles(10, nbytes=200_000)
    bidders = rated(speeds, mbps=100.0, latency_ms=2.0)
    bidders[2].base_backlog_s = 0.3
    result = run_local_auction(items, bidders)
    assert result.complete and result.rounds == 2 and result.dropped == ()
    cost = np.array([[b.cost_s(i, "auctioneer") for i in items] for b in bidders])
    backlog = np.array([b.base_backlog_s for b in bidders])
    core = assign(cost, backlog)
    assert result.makespan_s[0] == pytest.approx(core.makespan_s)
    for b in bidders:
        won = result.items_of(b.name)
        assert set(b.commitments("local")) == set(won)
        if won:
            assert result.finish_s[0][b.name] == pytest.approx(
                b.base_backlog_s + sum(b.cost_s(i, "auctioneer") for i in items if i.item_id in won)
            )


def test_blocks_run_one_after_another() -> None:
    bidders = rated({"d0": 1.0, "d1": 1.0})
    bidders[0].base_backlog_s = 5.0  # busy during block 0 (4.3 s on d1 alone), free for most of block 1
    items = tiles(4, block=0) + tiles(4, block=1)
    result = run_local_auction(items, bidders)
    assert result.complete
    assert set(result.finish_s[0]) == {"d1"}  # d0 would only start after 5 s
    span0 = result.makespan_s[0]
    assert span0 == pytest.approx(sum(1 + 0.05 * i for i in range(4)))
    assert min(result.finish_s[1].values()) > span0  # block 1 starts when block 0 ends
    assert result.latency_s == pytest.approx(span0 + result.makespan_s[1])
    assert result.makespan_s[1] < span0  # both devices share block 1


def test_silent_bidder_is_dropped_and_the_rest_proceeds(caplog: pytest.LogCaptureFixture) -> None:
    bidders = rated({"d0": 1.0, "d1": 2.0, "dead": 50.0})
    router = LocalRouter(bidders, silent={"dead"})
    machine = Auctioneer("a", "boss", tiles(6), [b.name for b in bidders], round_timeout_s=0.5)
    router.add(machine)
    with caplog.at_level(logging.WARNING):
        router.post("boss", machine.start(0.0))
        router.run()
    result = machine.result()
    assert result.complete and result.dropped == ("dead",)
    assert "dead" not in result.owner.values()
    assert result.rounds == 2 and router.now == pytest.approx(0.5)
    assert "dropped dead" in caplog.text


def test_winner_silent_at_award_is_dropped_and_its_items_re_auctioned() -> None:
    bidders = {b.name: b for b in rated({"d0": 1.0, "d1": 2.0, "d2": 4.0})}
    machine = Auctioneer("a", "boss", tiles(6), list(bidders), round_timeout_s=1.0)
    awards = deliver(machine, bidders, machine.start(0.0), 0.0)
    assert machine.phase is Phase.AWARDING and {o.to for o in awards} >= {"d2"}
    back = deliver(machine, bidders, awards, 0.1, skip=frozenset({"d2"}))
    assert back == [] and machine.next_deadline == pytest.approx(1.0)
    assert machine.tick(0.5) == []  # not yet
    calls = machine.tick(1.0)
    assert {o.to for o in calls} == {"d0", "d1"} and all(isinstance(o.message, CallForBids) for o in calls)
    out = deliver(machine, bidders, calls, 1.0)
    closes = deliver(machine, bidders, out, 1.0)
    assert machine.done and all(isinstance(o.message, Close) for o in closes)
    result = machine.result()
    assert result.complete and result.dropped == ("d2",) and result.rounds == 4
    assert "d2" not in result.owner.values()
    # The dropped winner is told to free everything it may have taken.
    assert {o.to: o.message.item_ids for o in closes}["d2"] == ()
    deliver(machine, bidders, closes, 1.0)
    assert bidders["d2"].backlog_s == 0.0


def test_items_nobody_can_take_are_reported_unassigned() -> None:
    bidders = rated({"d0": 1.0}, capacity_s=1.2)
    result = run_local_auction(tiles(3), bidders)
    assert not result.complete and len(result.unassigned) == 2
    assert len(result.owner) == 1


def test_two_concurrent_auctions_never_over_commit() -> None:
    speeds = {"d0": 1.0, "d1": 2.0, "d2": 3.0, "d3": 4.0}
    bidders = rated(speeds, capacity_s=2.5, tolerance=0.1)
    router = LocalRouter(bidders)
    first = Auctioneer("A", "req-a", tiles(8, block=0), list(speeds))
    second = Auctioneer("B", "req-b", tiles(8, block=0), list(speeds))
    for m in (first, second):
        router.add(m)
        router.post(m.name, m.start(0.0))
    router.run()
    a, b = first.result(), second.result()
    assert a.complete and b.complete
    assert a.rounds + b.rounds > 4  # the later auction met declines and re-auctioned
    for bidder in bidders:
        assert bidder.backlog_s <= bidder.capacity_s + 1e-9
        for aid, result in (("A", a), ("B", b)):
            held = bidder.commitments(aid)
            assert set(held) == set(result.items_of(bidder.name))
            assert all(c.firm for c in held.values())


# -- a peer's mistakes ----------------------------------------------------------------------


@pytest.fixture
def bidding() -> Auctioneer:
    machine = Auctioneer("a", "boss", tiles(3), ["d0", "d1"], round_timeout_s=1.0)
    machine.start(0.0)
    return machine


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (BidBundle("other", 1, "d0", 0.0, ()), "for auction 'other'"),
        (BidBundle("a", 1, "stranger", 0.0, (Bid("b0t0", 0.1),)), "not a bidder of this auction"),
        (BidBundle("a", 7, "d0", 0.0, ()), "stale"),
        (BidBundle("a", 0, "d0", 0.0, ()), "stale"),
        (AwardReply("a", 1, "d0", ("b0t0",), ()), "stale"),
        (CallForBids("a", 1, "d0", (), 1.0), "not a message for an auctioneer"),
        (Close("a", 1, "d0", ()), "not a message for an auctioneer"),
        ({"type": "bid_bundle"}, "not an auction message"),
    ],
)
def test_unfit_messages_are_ignored_and_logged(
    bidding: Auctioneer, message, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="meshci.auction.auctioneer"):
        assert bidding.receive(message, 0.1) == []
    assert reason in caplog.text
    assert bidding.phase is Phase.BIDDING  # still waiting for both real bidders


@pytest.mark.parametrize(
    ("bid", "reason"),
    [
        (Bid("nope", 1.0), "unknown item"),
        (Bid("b0t0", -1.0), "not a finite time"),
        (Bid("b0t0", 0.1), "not a finite time"),  # below its backlog of 0.5: negative cost
        (Bid("b0t0", math.nan), "not a finite time"),
        (Bid("b0t0", math.inf), "not a finite time"),
    ],
)
def test_bad_bids_are_ignored_and_logged(
    bidding: Auctioneer, bid: Bid, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        bidding.receive(BidBundle("a", 1, "d0", 0.5, (bid,)), 0.1)
        out = bidding.receive(BidBundle("a", 1, "d1", 0.0, (Bid("b0t0", 1.0), Bid("b0t1", 1.0), Bid("b0t2", 1.0))), 0.1)
    assert reason in caplog.text
    # Only d1's bids count: it wins everything.
    assert [(o.to, o.message.item_ids) for o in out] == [("d1", ("b0t0", "b0t1", "b0t2"))]


@pytest.mark.parametrize("backlog", [-1.0, math.nan, math.inf])
def test_bundle_with_bad_backlog_has_its_bids_ignored(
    bidding: Auctioneer, backlog: float, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        bidding.receive(BidBundle("a", 1, "d0", backlog, (Bid("b0t0", 0.0),)), 0.1)
        out = bidding.receive(BidBundle("a", 1, "d1", 0.0, (Bid("b0t0", 2.0),)), 0.1)
    assert "its bids are ignored" in caplog.text
    assert [(o.to, o.message.item_ids) for o in out] == [("d1", ("b0t0",))]


def test_duplicate_bundle_and_second_bids_are_ignored(bidding: Auctioneer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        bidding.receive(BidBundle("a", 1, "d0", 0.0, (Bid("b0t0", 1.0), Bid("b0t0", 0.5))), 0.1)
        bidding.receive(BidBundle("a", 1, "d0", 0.0, (Bid("b0t1", 0.01),)), 0.1)
    assert "second bid for the item" in caplog.text
    assert "duplicate answer" in caplog.text
    out = bidding.receive(BidBundle("a", 1, "d1", 0.0, (Bid("b0t1", 1.0), Bid("b0t2", 1.0))), 0.1)
    owners = {i: o.to for o in out for i in o.message.item_ids}
    assert owners == {"b0t0": "d0", "b0t1": "d1", "b0t2": "d1"}  # d0's duplicate bid for b0t1 did not count


def test_bad_award_replies(caplog: pytest.LogCaptureFixture) -> None:
    machine = Auctioneer("a", "boss", tiles(2), ["d0", "d1"], round_timeout_s=1.0)
    machine.start(0.0)
    machine.receive(BidBundle("a", 1, "d0", 0.0, (Bid("b0t0", 1.0), Bid("b0t1", 9.0))), 0.0)
    awards = machine.receive(BidBundle("a", 1, "d1", 0.0, (Bid("b0t0", 9.0), Bid("b0t1", 1.0))), 0.0)
    assert {o.to: o.message.item_ids for o in awards} == {"d0": ("b0t0",), "d1": ("b0t1",)}
    with caplog.at_level(logging.WARNING):
        # d0 claims d1's item and both accepts and declines its own: nothing is taken.
        machine.receive(AwardReply("a", 2, "d0", ("b0t1", "b0t0"), ("b0t0",)), 0.1)
        machine.receive(AwardReply("a", 2, "d0", ("b0t0",), ()), 0.1)  # duplicate
        out = machine.receive(AwardReply("a", 2, "d1", ("b0t1",), ()), 0.1)
    assert "which it was not awarded" in caplog.text
    assert "not asked in round 2" not in caplog.text
    assert "taken as declined" in caplog.text
    assert "duplicate answer" in caplog.text
    # b0t0 is open again: a new call for bids, to both bidders.
    assert {o.to for o in out} == {"d0", "d1"}
    assert all(o.message.items == (tiles(2)[0],) for o in out)


def test_reply_from_a_bidder_that_won_nothing_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    machine = Auctioneer("a", "boss", tiles(1), ["d0", "d1"], round_timeout_s=1.0)
    machine.start(0.0)
    machine.receive(BidBundle("a", 1, "d0", 0.0, (Bid("b0t0", 1.0),)), 0.0)
    awards = machine.receive(BidBundle("a", 1, "d1", 0.0, ()), 0.0)
    assert [o.to for o in awards] == ["d0"]
    with caplog.at_level(logging.WARNING):
        assert machine.receive(AwardReply("a", 2, "d1", ("b0t0",), ()), 0.1) == []
    assert "not asked in round 2" in caplog.text
    closes = machine.receive(AwardReply("a", 2, "d0", ("b0t0",), ()), 0.1)
    assert machine.result().owner == {"b0t0": "d0"}
    assert {o.to: o.message.item_ids for o in closes} == {"d0": ("b0t0",), "d1": ()}


def test_award_naming_an_item_twice_is_held_once() -> None:
    bidder = Bidder.from_rates("d0", 1.0)
    bidder.receive(CallForBids("a", 1, "boss", tuple(tiles(1)), 1.0))
    reply = bidder.receive(Award("a", 2, "boss", ("b0t0", "b0t0"), 1.0))[0].message
    assert reply.accepted == ("b0t0",) and reply.declined == ()
    assert bidder.backlog_s == pytest.approx(1.0)


def test_local_mistakes_raise(bidding: Auctioneer) -> None:
    with pytest.raises(AuctionError):
        bidding.start(0.0)
    with pytest.raises(AuctionError):
        bidding.result()
    with pytest.raises(AuctionError):
        Auctioneer("a", "boss", tiles(1) + tiles(1), ["d0"])
    with pytest.raises(AuctionError):
        Auctioneer("a", "boss", tiles(1), [])
    with pytest.raises(AuctionError):
        Auctioneer("a", "boss", tiles(1), ["d0", "d0"])


junk_bid = st.builds(
    Bid,
    st.sampled_from(["b0t0", "b0t1", "b1t0", "b1t1", "ghost"]),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 10)),
)
junk = st.one_of(
    st.builds(
        BidBundle,
        st.sampled_from(["a", "zz"]),
        st.integers(0, 6),
        st.sampled_from(["d0", "d1", "d2", "stranger"]),
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1)),
        st.lists(junk_bid, max_size=5).map(tuple),
    ),
    st.builds(
        AwardReply,
        st.sampled_from(["a", "zz"]),
        st.integers(0, 6),
        st.sampled_from(["d0", "d1", "d2", "stranger"]),
        st.lists(st.sampled_from(["b0t0", "b0t1", "b1t0", "b1t1", "ghost"]), max_size=4).map(tuple),
        st.lists(st.sampled_from(["b0t0", "b0t1", "b1t0", "b1t1", "ghost"]), max_size=4).map(tuple),
    ),
)


@settings(max_examples=150, deadline=None)
@given(noise=st.lists(st.tuples(junk, st.floats(0, 3)), max_size=25))
def test_any_message_sequence_never_crashes(noise: list[tuple[object, float]]) -> None:
    items = tiles(2, block=0) + tiles(2, block=1)
    machine = Auctioneer("a", "boss", items, ["d0", "d1", "d2"], round_timeout_s=0.5, max_bid_rounds=2)
    machine.start(0.0)
    now = 0.0
    for message, dt in noise:
        now += dt
        machine.tick(now)
        machine.receive(message, now)  # type: ignore[arg-type]
    while not machine.done:
        assert machine.next_deadline is not None
        now = max(now, machine.next_deadline)
        machine.tick(now)
    result = machine.result()
    assert set(result.owner.values()) <= {"d0", "d1", "d2"}
    assert set(result.owner) | set(result.unassigned) == {i.item_id for i in items}
    assert result.rounds <= 2 * 2


def test_numpy_numbers_leave_as_plain_json_numbers() -> None:
    bundle = BidBundle("a", np.int64(1), "d0", np.float64(0.5), (Bid("t", np.float64(1.5)),))  # type: ignore[arg-type]
    wire = bundle.to_json()
    assert type(wire["backlog_s"]) is float and type(wire["bids"][0][1]) is float and type(wire["round"]) is int
    assert message_from_json(wire) == BidBundle("a", 1, "d0", 0.5, (Bid("t", 1.5),))
    item = Item("t", np.int64(0), (np.int64(0), np.int64(4)), np.float64(1.0), np.int64(3), np.int64(4))  # type: ignore[arg-type]
    assert Item.from_json(item.to_json()) == Item("t", 0, (0, 4), 1.0, 3, 4)
