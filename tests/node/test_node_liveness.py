"""Links that heal and liveness that load cannot fool, without sockets: the redial back-off,
the adaptive failure detector and the tombstone's rules, on a fake clock."""

from __future__ import annotations

import random

import pytest

from meshci.node.liveness import MAX_DEAD_AFTER_S, ArrivalWindow, Redialer
from meshci.node.membership import (
    HEARTBEAT_INTERVAL_S, Address, Dial, Membership, PeerDown, PeerUp,
)


# ---- redial back-off ---------------------------------------------------------------------

def test_a_lost_peer_is_dialled_at_once_then_with_capped_jittered_exponential_back_off() -> None:
    dialer = Redialer(base_s=0.25, cap_s=2.0, rng=random.Random(7))
    now = 100.0
    assert dialer.due("b", now)
    assert not dialer.due("b", now)  # one dial in flight per peer
    waits = []
    for _ in range(8):
        wait = dialer.failed("b", now)
        waits.append(wait)
        assert not dialer.due("b", now + wait - 1e-6)
        now += wait
        assert dialer.due("b", now)
    ceilings = [min(2.0, 0.25 * 2 ** i) for i in range(8)]
    for wait, ceiling in zip(waits, ceilings):
        assert ceiling / 2 <= wait <= ceiling  # jittered down to half, never above the cap
    assert max(waits) <= 2.0 and waits[-1] > waits[0]
    assert dialer.failures("b") == 8
    dialer.succeeded("b")  # the link is back: the next loss is redialled at once
    assert dialer.failures("b") == 0 and dialer.due("b", now)


def test_back_off_is_per_peer_and_jitter_differs_between_peers() -> None:
    dialer = Redialer(rng=random.Random(1))
    assert dialer.due("b", 0.0) and dialer.due("c", 0.0)
    waits = {dialer.failed(name, 0.0) for name in ("b", "c")}
    assert len(waits) == 2  # not in lock step
    dialer.forget("b")
    assert dialer.tracked() == ["c"] and dialer.due("b", 0.0)


# ---- adaptive failure detection ------------------------------------------------------------

def test_threshold_is_the_base_for_a_regular_peer_and_grows_for_a_slow_irregular_one() -> None:
    regular = ArrivalWindow(0.0, HEARTBEAT_INTERVAL_S)
    for i in range(1, 40):
        regular.heard(i * HEARTBEAT_INTERVAL_S)
    assert regular.threshold(3.0) == 3.0
    slow = ArrivalWindow(0.0, HEARTBEAT_INTERVAL_S)
    t = 0.0
    for gap in [1.5, 2.5, 1.0, 2.8, 2.0] * 8:  # a busy device: heartbeats every 1-3 s
        t += gap
        slow.heard(t)
    assert slow.threshold(3.0) > 2.8 + 3.0  # well beyond its longest gap seen
    assert slow.threshold(3.0) <= MAX_DEAD_AFTER_S
    assert slow.phi(t + 1.0) < regular.phi(39 * HEARTBEAT_INTERVAL_S + 1.0)


def test_round_trips_scale_the_threshold_and_bursts_teach_nothing() -> None:
    window = ArrivalWindow(0.0, HEARTBEAT_INTERVAL_S)
    for i in range(100):
        window.heard(1.0 + i * 0.001)  # a frame's bytes, read in a burst
    assert window.samples == 1
    assert window.threshold(3.0) == 3.0
    window.observe_rtt(2.0)  # a link with 2 s round trips: silence is judged against them
    assert window.threshold(3.0) >= window.mean + 4 * 2.0
    window.observe_rtt(float("nan"))  # a forged figure is ignored
    assert window.threshold(3.0) < MAX_DEAD_AFTER_S + 1


def _pair() -> tuple[Membership, Membership]:
    a = Membership("a", Address("h", 1), 1)
    b = Membership("b", Address("h", 2), 1)
    a.on_join(b.join_payload(), 0.0, sender="b")
    return a, b


def test_a_peer_whose_heartbeats_are_slow_is_not_declared_dead_at_the_fixed_timeout() -> None:
    a, b = _pair()
    t = 0.0
    for _ in range(30):  # b is busy: a heartbeat every 2.5 s (above 1.5 s suspect, below 3 s dead)
        t += 2.5
        assert a.tick(t) == []
        a.on_heartbeat(b.heartbeat(), t, sender="b")
    assert a.dead_after_for("b") > a.dead_after
    assert a.tick(t + 3.5) == [] and a.is_alive("b")  # past the old 3 s: still alive
    events = a.tick(t + a.dead_after_for("b") + 0.1)  # silence far beyond its pattern is death
    assert events and isinstance(events[0], PeerDown)


def test_bytes_arriving_keep_a_peer_alive_and_older_arrivals_change_nothing() -> None:
    a, _ = _pair()
    for i in range(1, 21):
        a.touch("b", i * 0.5)  # a 10 s frame streaming in: bytes, no whole frame
        assert a.tick(i * 0.5 + 0.1) == []
    assert a.is_alive("b") and a.peer("b").last_heard == 10.0
    a.touch("b", 4.0)  # a late report of an older arrival
    assert a.peer("b").last_heard == 10.0
    assert a.tick(10.0 + a.dead_after_for("b") + 0.1)  # then silence: dead
    a.touch("b", 30.0)  # bytes after death revive nothing: a JOIN or heartbeat must
    assert not a.is_alive("b")


# ---- the tombstone ---------------------------------------------------------------------------

def test_tombstone_yields_to_the_peers_own_fresh_heartbeat_never_to_gossip() -> None:
    a, b = _pair()
    old_beat = b.heartbeat()  # written before the partition
    newest = b.heartbeat()
    a.on_heartbeat(newest, 0.5, sender="b")
    assert [type(e) for e in a.tick(10.0)] == [PeerDown]
    # gossip naming b, even with a newer incarnation, does not revive it
    c = Membership("c", Address("h", 3), 1)
    c.on_heartbeat(b.heartbeat(), 10.0, sender="b")
    c.on_heartbeat({**b.heartbeat(), "incarnation": 99}, 10.0, sender="b")
    a.on_join(c.join_payload(), 10.1, sender="c")
    a.on_heartbeat(c.heartbeat(), 10.2, sender="c")
    assert not a.is_alive("b")
    # a forged heartbeat naming b on c's connection is hearsay
    a.on_heartbeat(b.heartbeat(), 10.3, sender="c")
    assert not a.is_alive("b")
    # b's own heartbeats no newer than the last one heard (a replay, a late one) do not
    assert a.on_heartbeat(old_beat, 10.4, sender="b") == [] and not a.is_alive("b")
    assert a.on_heartbeat(newest, 10.5, sender="b") == [] and not a.is_alive("b")
    # its fresh heartbeat does: up, and dialled again
    events = a.on_heartbeat(b.heartbeat(), 11.0, sender="b")
    assert PeerUp("b") in events and Dial("b", Address("h", 2)) in events and a.is_alive("b")


def test_tombstone_yields_to_a_fresh_join_and_a_restart_but_not_after_a_leave() -> None:
    a, b = _pair()
    a.tick(10.0)
    _, refusal = a.on_join(b.join_payload(), 10.5, sender="b")
    assert refusal is None and a.is_alive("b")
    assert [p.name for p in a.redial_candidates()] == ["b"]
    a.on_leave("b", 11.0)
    assert a.redial_candidates() == []  # it left: nobody redials it
    b2 = Membership("b", Address("h", 2), 2)
    a.on_heartbeat(b2.heartbeat(), 12.0, sender="b")
    assert a.is_alive("b") and a.redial_candidates()[0].incarnation == 2


def test_a_failed_peer_is_redialled_for_ten_minutes_one_that_left_is_forgotten_after_one() -> None:
    a = Membership("a", Address("h", 1), 1)
    for name, port in (("b", 2), ("c", 3)):
        a.on_join(Membership(name, Address("h", port), 1).join_payload(), 0.0, sender=name)
    a.on_leave("c", 0.0)
    a.tick(10.0)  # b failed (silence), c left
    assert [p.name for p in a.redial_candidates()] == ["b"]
    a.tick(10.0 + a.tombstone_s + 1.0)
    assert a.peer("c") is None and [p.name for p in a.redial_candidates()] == ["b"]
    a.tick(10.0 + a.failed_tombstone_s + 1.0)
    assert a.peer("b") is None and a.redial_candidates() == []


@pytest.mark.parametrize("beat", [-1, 1.5, "7", True, 1 << 63])
def test_a_bad_beat_is_refused_and_the_peer_judged_by_silence(beat: object) -> None:
    a = Membership("a", Address("h", 1), 1)
    payload = {**Membership("b", Address("h", 2), 1).join_payload(), "beat": beat}
    _, refusal = a.on_join(payload, 0.0, sender="b")
    assert refusal is not None and "beat" in refusal.reason
    assert a.on_heartbeat(payload, 0.0, sender="b") == [] and a.peer("b") is None
