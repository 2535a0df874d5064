"""Issue 11, sans-IO: what a peer states is typed, finite and bounded (adverts, digests,
names), a node's own facts come only from its own connection, and gossip cannot grow the
peer table without bound."""

from __future__ import annotations

import logging

import pytest

from meshci.node.fields import FieldError, integer, number, reason, shown, text
from meshci.node.membership import (MAX_CANDIDATES, MAX_GOSSIP_ENTRIES, Address, Advert, Dial,
                                    Membership, PeerStatus, PeerUp)
from meshci.wire import valid_name

B_HEARD = [PeerUp("b"), Dial("b", Address("h", 2))]  # what hearing b for the first time gives

GOOD = {"gflops": 2.0, "backlog_s": 0.5, "links": [["b", 100.0, 2.0]], "tile_ms": 1.5,
        "curves": {"vgg16@32x32": [[0.001, 0.0002], [0.002, 0.0001]]}}


def test_a_well_formed_advert_round_trips() -> None:
    advert = Advert.from_json(GOOD)
    assert advert.gflops == 2.0 and advert.links == (("b", 100.0, 2.0),)
    assert Advert.from_json(advert.to_json()) == advert


@pytest.mark.parametrize("bad", [
    {"gflops": 1e300},                         # finite, absurd: modnn planning raised on it
    {"gflops": float("inf")},                  # what "1e400" parses to
    {"gflops": 10 ** 400},                     # an integer float() cannot take
    {"gflops": True},
    {"gflops": "5"},
    {"backlog_s": 1e308},
    {"backlog_s": -1.0},
    {"links": [["b", 1e308, 1.0]]},
    {"links": [["b", 100.0, float("nan")]]},
    {"links": [["b\nforged", 100.0, 1.0]]},
    {"links": "b"},
    {"links": [["b", 1.0, 1.0]] * 257},
    {"tile_ms": 1e9},
    {"curves": {"m@1x1": [[1e308, 1.0]]}},     # predictions overflowed to infinity
    {"curves": {"m@1x1": [[0.1, 10 ** 500]]}},
    {"curves": {"m@1x1": [[0.1]]}},
    {"curves": {"m@1x1": "x"}},
    {"curves": {"m\n@1x1": [[0.1, 0.1]]}},
])
def test_an_advert_with_a_bad_field_is_refused_naming_it(bad: dict) -> None:
    with pytest.raises(ValueError, match="advert"):
        Advert.from_json({**GOOD, **bad})


@pytest.mark.parametrize("advert", [[1, 2], "fast", 7, None])
def test_an_advert_that_is_not_an_object_is_a_value_error(advert: object) -> None:
    # it was an AttributeError that escaped every handler and killed the receive loop
    with pytest.raises(ValueError, match="object"):
        Advert.from_json(advert)


def test_a_bad_advert_in_a_heartbeat_drops_that_heartbeat_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    a = Membership("a", Address("h", 1), 1)
    b = Membership("b", Address("h", 2), 1)
    beat = {**b.heartbeat(), "advert": {"gflops": 1e300}}
    with caplog.at_level(logging.WARNING):
        assert a.on_heartbeat(beat, 0.0, sender="b") == []
    assert a.peer("b") is None
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "gflops" in lines[0].getMessage() and lines[0].exc_info is None
    assert a.on_heartbeat(b.heartbeat(), 0.1, sender="b") and a.is_alive("b")


@pytest.mark.parametrize("name", ["node1\n", "node1\nFORGED line", "a" * 65, "", "\x1b[31mred", "é", "a b"])
def test_names_are_whole_bounded_and_printable(name: str) -> None:
    assert not valid_name(name)


def test_good_names_still_pass() -> None:
    assert all(valid_name(n) for n in ("node1", "pi4-a", "a" * 64, "x.y:z@w_1"))


@pytest.mark.parametrize("field", ["name", "host"])
def test_gossiped_names_and_hosts_are_validated(field: str) -> None:
    a = Membership("a", Address("h", 1), 1)
    b = Membership("b", Address("h", 2), 1)
    beat = b.heartbeat()
    entry = {"name": "c", "host": "h", "port": 3, "incarnation": 1}
    beat["gossip"] = [{**entry, field: "c\nWARNING forged"}, {**entry, field: "x" * 500_000}]
    assert a.on_heartbeat(beat, 0.0, sender="b") == B_HEARD
    assert [p.name for p in a.peers()] == ["b"]


@pytest.mark.parametrize("incarnation", [2 ** 63, -1, 1e18, True, 10 ** 400])
def test_incarnations_are_integers_in_range(incarnation: object) -> None:
    a = Membership("a", Address("h", 1), 1)
    beat = {**Membership("b", Address("h", 2), 1).heartbeat(), "incarnation": incarnation}
    assert a.on_heartbeat(beat, 0.0, sender="b") == [] and a.peer("b") is None


def test_only_a_node_itself_states_that_it_is_alive_and_what_it_offers() -> None:
    a = Membership("a", Address("h", 1), 1)
    b = Membership("b", Address("h", 2), 5, advert=Advert(gflops=1.0))
    a.on_heartbeat(b.heartbeat(), 0.0, sender="b")
    a.tick(10.0)
    assert a.peer("b").status is PeerStatus.DEAD
    # a client (or another node) sends b's digest with a tempting advert: hearsay
    forged = {**b.heartbeat(), "incarnation": 2 ** 63 - 1, "advert": {"gflops": 1000.0}}
    for t in (10.1, 10.6, 11.1):
        a.on_heartbeat(forged, t, sender="mallory")
    assert not a.is_alive("b") and a.peer("mallory") is None
    _, refusal = a.on_join({**forged, "advert": {"gflops": 1000.0}}, 11.2, sender="mallory")
    assert refusal is not None and "authenticated as 'mallory'" in refusal.reason
    assert not a.is_alive("b")
    # b itself, restarted (a newer incarnation than b's last, far below the forged one), is heard
    b2 = Membership("b", Address("h", 2), 6)
    a.on_heartbeat(b2.heartbeat(), 12.0, sender="b")
    assert a.is_alive("b") and a.peer("b").advert.gflops == 1.0


def test_hearsay_incarnation_does_not_outrank_the_node_itself() -> None:
    a = Membership("a", Address("h", 1), 1)
    c = Membership("c", Address("h", 3), 100)
    beat = Membership("m", Address("h", 9), 1).heartbeat()
    beat["gossip"] = [{**c.self_digest(), "incarnation": 2 ** 63 - 1}]
    a.on_heartbeat(beat, 0.0, sender="m")
    assert a.peer("c") is not None and not a.is_alive("c")
    a.on_heartbeat(c.heartbeat(), 0.1, sender="c")
    assert a.is_alive("c") and a.peer("c").incarnation == 100


def test_gossip_is_capped_per_frame_and_in_candidates() -> None:
    a = Membership("a", Address("h", 1), 1)
    b = Membership("b", Address("h", 2), 1)

    def entries(prefix: str, n: int) -> list[dict]:
        return [{"name": f"{prefix}{i}", "host": "h", "port": 1000 + i, "incarnation": 1} for i in range(n)]

    beat = {**b.heartbeat(), "gossip": entries("x", 500)}
    assert a.on_heartbeat(beat, 0.0, sender="b") == B_HEARD  # list dropped whole
    assert len(a.peers()) == 1
    for k in range(10):  # many frames of allowed size: candidates stay capped
        beat = {**b.heartbeat(), "gossip": entries(f"y{k}-", MAX_GOSSIP_ENTRIES)}
        a.on_heartbeat(beat, 0.01 * k, sender="b")
    assert sum(not p.heard_directly for p in a.peers()) == MAX_CANDIDATES


def test_field_helpers() -> None:
    assert number(3, "x") == 3.0 and integer(7, "x") == 7 and text("ok", "x") == "ok"
    for bad in (10 ** 400, float("nan"), -1, True, "1"):
        with pytest.raises(FieldError):
            number(bad, "x")
    with pytest.raises(FieldError):
        integer(1.0, "x")
    with pytest.raises(FieldError):
        text("a\nb", "x")
    assert "\n" not in shown("a\nb" * 1000) and len(shown("a" * 10_000)) < 200
    assert "digits" in shown(10 ** 500)
    assert reason("line\nWARNING forged") == "line\\nWARNING forged" and reason(5) == "unknown error"
    assert len(reason("r" * 100_000)) == 256


def test_a_head_report_is_checked_before_use() -> None:
    from meshci.node.inputs import head_report

    assert head_report({"head_s": 0.5, "max_abs_diff": 0, "check_ok": True}) == {
        "head_s": 0.5, "max_abs_diff": 0.0, "check_ok": True}
    for bad in ({"head_s": 10 ** 400}, {"head_s": float("inf")}, {"max_abs_diff": "0"}, {"check_ok": 1}, [1]):
        assert head_report(bad) is None  # 10 ** 400 raised OverflowError in math.isfinite


def test_a_gossiped_host_no_resolver_takes_is_refused() -> None:
    """A label over 63 characters made the dial raise UnicodeError (idna) out of a task."""
    a = Membership("a", Address("h", 1), 1)
    beat = Membership("b", Address("h", 2), 1).heartbeat()
    entry = {"name": "c", "port": 3, "incarnation": 1}
    beat["gossip"] = [{**entry, "host": "a." + "b" * 70}, {**entry, "name": "d", "host": "a..b"},
                      {**entry, "name": "e", "host": "fe80::1%eth0"}, {**entry, "name": "f", "host": "pi-4.local"}]
    a.on_heartbeat(beat, 0.0, sender="b")
    assert sorted(p.name for p in a.peers()) == ["b", "e", "f"]
