"""Membership without sockets: nodes wired through an in-memory router, fake clock."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from meshci.node.membership import (
    Address, Advert, Dial, HEARTBEAT_INTERVAL_S, Membership, PeerDown, PeerStatus, PeerUp,
)


@dataclass
class Mesh:
    """Delivers joins and heartbeats between Membership objects; `down` nodes are silent."""

    nodes: dict[Address, Membership] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    now: float = 0.0
    events: list[tuple[str, object]] = field(default_factory=list)
    refusals: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, port: int, gflops: float = 1.0) -> Membership:
        m = Membership(name, Address("10.0.0.1", port), incarnation=1, advert=Advert(gflops=gflops))
        self.nodes[m.address] = m
        return m

    def join(self, newcomer: Membership, via: Address) -> bool:
        target = self.nodes[via]
        events, refusal = target.on_join(newcomer.join_payload(), self.now, sender=newcomer.name)
        self._record(target, events)
        if refusal is not None:
            self.refusals.append((newcomer.name, refusal.reason))
            return False
        self._record(newcomer, newcomer.on_heartbeat(target.heartbeat(), self.now, sender=target.name))
        self._record(newcomer, newcomer.on_welcome(target.welcome(), self.now))
        return True

    def _record(self, who: Membership, events: list) -> None:
        for ev in events:
            self.events.append((who.name, ev))
            if isinstance(ev, Dial) and ev.address in self.nodes and who.name not in self.down:
                target = self.nodes[ev.address]
                if target.name in self.down:
                    continue
                evs, refusal = target.on_join(who.join_payload(), self.now, sender=who.name)
                if refusal is None:
                    self._record(target, evs)

    def step(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now += HEARTBEAT_INTERVAL_S
            live = [m for m in self.nodes.values() if m.name not in self.down]
            for sender in live:
                for peer in sender.peers():
                    if peer.status is PeerStatus.DEAD:
                        continue
                    receiver = self.nodes.get(peer.address)
                    if receiver is None or receiver.name in self.down:
                        continue
                    self._record(receiver, receiver.on_heartbeat(sender.heartbeat(), self.now, sender=sender.name))
            for m in live:
                self._record(m, m.tick(self.now))


def alive_names(m: Membership) -> set[str]:
    return {p.name for p in m.alive()}


def test_join_through_any_peer_and_gossip_spreads() -> None:
    mesh = Mesh()
    a, b, c, d = (mesh.add(n, 7000 + i) for i, n in enumerate("abcd"))
    assert mesh.join(b, a.address)
    assert mesh.join(c, b.address)      # a hears of c only through gossip / c's dial
    assert mesh.join(d, c.address)
    mesh.step(2.0)
    for m in (a, b, c, d):
        assert alive_names(m) == {"a", "b", "c", "d"} - {m.name}


def test_gossip_alone_introduces_a_third_node() -> None:
    a = Membership("a", Address("h", 1), 1)
    b = Membership("b", Address("h", 2), 1)
    c = Membership("c", Address("h", 3), 1)
    b.on_heartbeat(c.heartbeat(), 0.0, sender=c.name)          # b knows c directly
    events = a.on_heartbeat(b.heartbeat(), 0.0, sender=b.name)  # a hears b, whose gossip names c
    assert Dial("c", Address("h", 3)) in events
    assert a.peer("c") is not None and not a.is_alive("c")  # known, not yet heard directly
    a.on_heartbeat(c.heartbeat(), 0.1, sender=c.name)
    assert a.is_alive("c")


def test_killed_node_is_declared_dead_within_a_few_seconds() -> None:
    mesh = Mesh()
    a, b, c = (mesh.add(n, 7100 + i) for i, n in enumerate("abc"))
    mesh.join(b, a.address)
    mesh.join(c, a.address)
    mesh.step(1.0)
    assert alive_names(a) == {"b", "c"}
    mesh.down.add("c")
    killed_at = mesh.now
    while "c" in alive_names(a) or "c" in alive_names(b):
        mesh.step(HEARTBEAT_INTERVAL_S)
        assert mesh.now - killed_at <= a.dead_after + 2 * HEARTBEAT_INTERVAL_S
    downs = [who for who, ev in mesh.events if isinstance(ev, PeerDown) and ev.name == "c"]
    assert sorted(downs) == ["a", "b"]
    # gossip from a node that still lists c cannot bring it back
    stale = Membership("x", Address("10.0.0.9", 1), 1)
    stale.on_heartbeat(c.heartbeat(), mesh.now, sender=c.name)
    a.on_heartbeat(stale.heartbeat(), mesh.now, sender=stale.name)
    assert a.peer("c").status is PeerStatus.DEAD


def test_restarted_node_with_new_incarnation_comes_back() -> None:
    a = Membership("a", Address("h", 1), 1)
    b1 = Membership("b", Address("h", 2), 1)
    a.on_join(b1.join_payload(), 0.0, sender=b1.name)
    a.tick(10.0)
    assert a.peer("b").status is PeerStatus.DEAD
    b2 = Membership("b", Address("h", 2), 2)
    events, refusal = a.on_join(b2.join_payload(), 10.5, sender=b2.name)
    assert refusal is None and PeerUp("b") in events and a.is_alive("b")


def test_duplicate_name_is_refused_with_a_reason() -> None:
    mesh = Mesh()
    a = mesh.add("a", 7200)
    b = mesh.add("b", 7201)
    assert mesh.join(b, a.address)
    impostor = mesh.add("b", 7202)
    assert not mesh.join(impostor, a.address)
    name, reason = mesh.refusals[-1]
    assert name == "b" and "duplicate node name 'b'" in reason and "7201" in reason
    assert a.peer("b").address.port == 7201
    # the same name as the node joined through is refused too
    clone = mesh.add("a", 7203)
    assert not mesh.join(clone, a.address)
    assert "duplicate node name 'a'" in mesh.refusals[-1][1]


def test_dead_name_may_be_taken_by_a_new_node() -> None:
    a = Membership("a", Address("h", 1), 1)
    a.on_join(Membership("b", Address("h", 2), 1).join_payload(), 0.0, sender="b")
    a.tick(5.0)
    _, refusal = a.on_join(Membership("b", Address("h", 3), 7).join_payload(), 5.0, sender="b")
    assert refusal is None and a.peer("b").address == Address("h", 3)


def test_leave_marks_dead_at_once() -> None:
    a = Membership("a", Address("h", 1), 1)
    a.on_join(Membership("b", Address("h", 2), 1).join_payload(), 0.0, sender="b")
    assert a.on_leave("b", 0.1) == [PeerDown("b", "left the mesh")]
    assert not a.is_alive("b")


@pytest.mark.parametrize("payload", [
    {},
    {"name": "", "host": "h", "port": 1, "incarnation": 1},
    {"name": "z", "host": "h", "port": 0, "incarnation": 1},
    {"name": "z", "host": "h", "port": 1, "incarnation": "x"},
    {"name": "z", "host": "h", "port": 1, "incarnation": 1, "advert": {"gflops": -1}},
    {"name": "z", "host": "h", "port": 1, "incarnation": 1, "advert": {"gflops": float("nan")}},
    {"name": 5, "host": "h", "port": 1, "incarnation": 1},
])
def test_malformed_payloads_are_refused_or_dropped(payload: dict) -> None:
    a = Membership("a", Address("h", 1), 1)
    events, refusal = a.on_join(payload, 0.0, sender="z")
    assert events == [] and refusal is not None and "malformed" in refusal.reason
    assert a.on_heartbeat(payload, 0.0, sender="z") == []
    assert a.peers() == []


def test_bad_gossip_entry_is_skipped_others_count() -> None:
    a = Membership("a", Address("h", 1), 1)
    b = Membership("b", Address("h", 2), 1)
    beat = b.heartbeat()
    beat["gossip"] = [{"name": "c"}, {"name": "d", "host": "h", "port": 4, "incarnation": 1}]
    events = a.on_heartbeat(beat, 0.0, sender="b")
    assert Dial("d", Address("h", 4)) in events and a.peer("c") is None


def test_advert_reaches_peers_and_observed_host_replaces_wildcard() -> None:
    a = Membership("a", Address("h", 1), 1)
    b = Membership("b", Address("0.0.0.0", 2), 1, advert=Advert(gflops=3.5, backlog_s=0.25))
    a.on_heartbeat(b.heartbeat(), 0.0, observed_host="192.168.1.7", sender="b")
    peer = a.peer("b")
    assert peer.address == Address("192.168.1.7", 2)
    assert peer.advert.gflops == 3.5 and peer.advert.backlog_s == 0.25


def test_address_parse() -> None:
    assert Address.parse("127.0.0.1:80") == Address("127.0.0.1", 80)
    assert Address.parse("[::1]:9") == Address("::1", 9)
    for bad in ("nohost", ":80", "h:x"):
        with pytest.raises(ValueError):
            Address.parse(bad)
