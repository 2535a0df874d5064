"""Mesh membership: the peer table, join, gossip and failure detection (sans-IO).

Nothing here touches a socket or reads the clock: the node passes `now` in and carries
out the returned events (dial a peer, log a death). Each node only states facts about
itself (its address, incarnation and advertised speed/backlog); what it learns about
others by gossip is only their existence and address, and a peer's liveness is judged
from heartbeats heard *directly* from it.

Lifecycle of a peer entry::

    gossip / join ───> ALIVE ──(silent > suspect_after)──> SUSPECT ──(silent > dead_after)──> DEAD
                        ^                                     │
                        └────────────── heartbeat ────────────┘

A DEAD entry is kept as a tombstone so that stale gossip cannot resurrect it: gossip
only revives it with a newer incarnation (a restarted process); hearing the node
directly always does.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.5
SUSPECT_AFTER_S = 1.5
DEAD_AFTER_S = 3.0
TOMBSTONE_S = 60.0
LEFT_THE_MESH = "left the mesh"  # the PeerDown reason of a clean LEAVE (not a failure)


class PeerStatus(str, enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> "Address":
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"address {text!r} is not HOST:PORT")
        return cls(host.strip("[]"), int(port))


@dataclass(frozen=True)
class Advert:
    """What a node states about itself: speed, queued work, link estimates (name -> (mbps,
    ms)) and its measured per-segment speed curves, ``(key, ((a, b), ...))`` with key
    ``"model@HxW"`` (see `curve_key`; a segment takes ``a + b * rows`` seconds)."""

    gflops: float = 1.0
    backlog_s: float = 0.0
    links: tuple[tuple[str, float, float], ...] = ()
    curves: tuple[tuple[str, tuple[tuple[float, float], ...]], ...] = ()
    tile_ms: float = 0.0  # measured per-tile overhead beyond compute (a boundary's CPU here)
    version: str = ""  # the meshci version the node runs ("": not stated)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"gflops": self.gflops, "backlog_s": self.backlog_s,
                                "links": [list(x) for x in self.links]}
        if self.curves:
            data["curves"] = _curves_json(self.curves)
        if self.tile_ms:
            data["tile_ms"] = self.tile_ms
        if self.version:
            data["version"] = self.version
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Advert":
        gflops = float(data.get("gflops", 1.0))
        backlog = float(data.get("backlog_s", 0.0))
        if not gflops > 0 or backlog < 0 or gflops != gflops or backlog != backlog:
            raise ValueError(f"bad advert gflops={gflops} backlog_s={backlog}")
        links = tuple((str(n), float(m), float(l)) for n, m, l in data.get("links", ()))
        tile_ms = data.get("tile_ms", 0.0)
        if isinstance(tile_ms, bool) or not isinstance(tile_ms, (int, float)) or not 0 <= tile_ms <= MAX_TILE_MS:
            raise ValueError(f"bad advert tile_ms={tile_ms!r}: want a number in [0, {MAX_TILE_MS}]")
        raw = data.get("curves", {})
        if not isinstance(raw, dict) or len(raw) > MAX_ADVERT_CURVES:
            raise ValueError(f"bad advert curves: want at most {MAX_ADVERT_CURVES} models")
        curves = []
        for key, curve in sorted(raw.items()):
            pairs = tuple((float(a), float(b)) for a, b in curve)
            if not 0 < len(pairs) <= MAX_CURVE_SEGMENTS or not all(
                    0 <= a < math.inf and 0 <= b < math.inf for a, b in pairs):
                raise ValueError(f"bad advert curve for {key!r}: want 1..{MAX_CURVE_SEGMENTS} finite "
                                 "(a, b) >= 0")
            curves.append((str(key), pairs))
        version = data.get("version", "")
        if not isinstance(version, str) or len(version) > MAX_VERSION_CHARS or not version.isprintable():
            raise ValueError(f"bad advert version: want at most {MAX_VERSION_CHARS} printable characters")
        return cls(gflops, backlog, links, tuple(curves), float(tile_ms), version)


MAX_ADVERT_CURVES = 8
MAX_TILE_MS = 60_000.0
MAX_VERSION_CHARS = 32
MAX_CURVE_SEGMENTS = 256

_CURVES_JSON: list[tuple[Any, dict[str, Any]]] = []  # (curves, their JSON form): the last one


def _curves_json(curves: tuple[tuple[str, tuple[tuple[float, float], ...]], ...]) -> dict[str, Any]:
    """Curves as JSON, 4 significant digits. A node advertises the same curves object on
    every heartbeat until it measures a new model, so the last form is kept."""
    if _CURVES_JSON and _CURVES_JSON[0][0] is curves:
        return _CURVES_JSON[0][1]
    data = {key: [[float(f"{a:.4g}"), float(f"{b:.4g}")] for a, b in curve] for key, curve in curves}
    _CURVES_JSON[:] = [(curves, data)]
    return data


def curve_key(model: str, size: tuple[int, int]) -> str:
    """The key of a model's curves at an input size in an `Advert`: ``"resnet34@224x224"``."""
    return f"{model}@{int(size[0])}x{int(size[1])}"


@dataclass(frozen=True)
class Peer:
    name: str
    address: Address
    incarnation: int
    status: PeerStatus
    last_heard: float
    advert: Advert = field(default_factory=Advert)
    heard_directly: bool = False

    def digest(self) -> dict[str, Any]:
        return {"name": self.name, "host": self.address.host, "port": self.address.port,
                "incarnation": self.incarnation}


# ---- events the IO layer carries out -------------------------------------------------

@dataclass(frozen=True)
class Dial:
    """Open (or reuse) the outbound connection to this peer and greet it."""

    name: str
    address: Address


@dataclass(frozen=True)
class PeerUp:
    name: str


@dataclass(frozen=True)
class PeerDown:
    name: str
    reason: str


Event = Dial | PeerUp | PeerDown


@dataclass(frozen=True)
class Refusal:
    """A JOIN that must be refused; `reason` goes back to the newcomer and into the log."""

    reason: str


class Membership:
    """The peer table of one node."""

    def __init__(self, name: str, address: Address, incarnation: int, *,
                 advert: Advert | None = None,
                 suspect_after: float = SUSPECT_AFTER_S, dead_after: float = DEAD_AFTER_S,
                 tombstone_s: float = TOMBSTONE_S) -> None:
        self.name = name
        self.address = address
        self.incarnation = incarnation
        self.advert = advert or Advert()
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self.tombstone_s = tombstone_s
        self._peers: dict[str, Peer] = {}

    # ---- queries -----------------------------------------------------------------
    def peers(self) -> list[Peer]:
        return sorted(self._peers.values(), key=lambda p: p.name)

    def peer(self, name: str) -> Peer | None:
        return self._peers.get(name)

    def alive(self) -> list[Peer]:
        """Peers believed up (ALIVE or SUSPECT) and heard directly at least once."""
        return [p for p in self.peers() if p.status is not PeerStatus.DEAD and p.heard_directly]

    def is_alive(self, name: str) -> bool:
        peer = self._peers.get(name)
        return peer is not None and peer.status is not PeerStatus.DEAD and peer.heard_directly

    # ---- outgoing payloads -------------------------------------------------------
    def self_digest(self) -> dict[str, Any]:
        return {"name": self.name, "host": self.address.host, "port": self.address.port,
                "incarnation": self.incarnation}

    def join_payload(self) -> dict[str, Any]:
        """Payload of the JOIN a node sends on every new outbound connection."""
        return {**self.self_digest(), "advert": self.advert.to_json()}

    def heartbeat(self, *, advert: bool = True, gossip: bool = True) -> dict[str, Any]:
        """Payload of a heartbeat: who we are and our backlog; our whole advert when
        `advert` (a receiver keeps the last one it heard, so it rides only when it changed:
        curves and links are most of a heartbeat's bytes and CPU); the gossip of every live
        peer known when `gossip` (when the view changed, and now and then)."""
        payload: dict[str, Any] = {**self.self_digest(), "backlog_s": self.advert.backlog_s}
        if advert:
            payload["advert"] = self.advert.to_json()
        if gossip:
            payload["gossip"] = [p.digest() for p in self.peers() if p.status is not PeerStatus.DEAD]
        return payload

    def welcome(self) -> dict[str, Any]:
        """Reply to an accepted JOIN: the peer list the newcomer should dial."""
        return {**self.self_digest(), "peers": [p.digest() for p in self.peers()
                                                if p.status is not PeerStatus.DEAD]}

    def set_advert(self, advert: Advert) -> None:
        self.advert = advert

    # ---- incoming ----------------------------------------------------------------
    def on_join(self, payload: dict[str, Any], now: float, observed_host: str | None = None
                 ) -> tuple[list[Event], Refusal | None]:
        """A node greets us directly (JOIN). Refuse a name already held by another live node."""
        try:
            name, address, incarnation = self._parse_digest(payload, observed_host)
            advert = Advert.from_json(payload.get("advert", {}))
        except (KeyError, TypeError, ValueError) as exc:
            # malformed JOIN from a peer: refuse it, keep serving
            return [], Refusal(f"malformed join: {exc}")
        if name == self.name:
            reason = f"duplicate node name {name!r}: this name is held by the node at {self.address}"
            log.warning("refusing join from %s: %s", address, reason)
            return [], Refusal(reason)
        existing = self._peers.get(name)
        if (existing is not None and existing.status is not PeerStatus.DEAD
                and existing.address != address and existing.heard_directly):
            reason = (f"duplicate node name {name!r}: already held by the live node at "
                      f"{existing.address}")
            log.warning("refusing join from %s: %s", address, reason)
            return [], Refusal(reason)
        return self._heard(name, address, incarnation, advert, now), None

    def on_welcome(self, payload: dict[str, Any], now: float) -> list[Event]:
        """The node we joined through accepted us and lists its peers."""
        events: list[Event] = []
        for entry in payload.get("peers", ()):
            events += self._learn(entry, now)
        return events

    def on_heartbeat(self, payload: dict[str, Any], now: float,
                     observed_host: str | None = None) -> list[Event]:
        """A heartbeat heard directly from a peer. Without an advert it keeps the advert
        last heard from that peer (process), with the backlog the heartbeat states."""
        try:
            name, address, incarnation = self._parse_digest(payload, observed_host)
            if "advert" in payload:
                advert = Advert.from_json(payload["advert"])
            else:
                known = self._peers.get(name)
                advert = known.advert if known is not None and known.incarnation == incarnation else Advert()
            if "backlog_s" in payload:
                backlog = float(payload["backlog_s"])
                if not 0.0 <= backlog < math.inf:
                    raise ValueError(f"bad backlog_s {backlog}")
                advert = replace(advert, backlog_s=backlog)
        except (KeyError, TypeError, ValueError) as exc:
            # a malformed heartbeat is dropped; the sender will be judged by its silence
            log.warning("dropping malformed heartbeat: %s", exc)
            return []
        if name == self.name:
            return []
        existing = self._peers.get(name)
        if existing is not None and existing.address != address and \
                existing.status is not PeerStatus.DEAD and existing.heard_directly:
            log.warning("ignoring heartbeat for %r from %s: the name belongs to %s",
                        name, address, existing.address)
            return []
        events = self._heard(name, address, incarnation, advert, now)
        for entry in payload.get("gossip", ()):
            events += self._learn(entry, now)
        return events

    def on_leave(self, name: str, now: float) -> list[Event]:
        """A peer announced a clean shutdown: dead at once, no need to wait for silence."""
        peer = self._peers.get(name)
        if peer is None or peer.status is PeerStatus.DEAD:
            return []
        self._peers[name] = replace(peer, status=PeerStatus.DEAD, last_heard=now)
        return [PeerDown(name, LEFT_THE_MESH)] if peer.heard_directly else []

    def touch(self, name: str, now: float) -> None:
        """A frame from a peer's own authenticated connection: it is alive (any frame, not
        only heartbeats: a heartbeat may wait behind a multi-MB tile on a slow link). A
        peer not yet heard directly, or declared dead, needs a real heartbeat."""
        peer = self._peers.get(name)
        if peer is None or not peer.heard_directly or peer.status is PeerStatus.DEAD:
            return
        if peer.status is not PeerStatus.ALIVE:
            self._peers[name] = replace(peer, status=PeerStatus.ALIVE, last_heard=now)
        elif now > peer.last_heard:
            self._peers[name] = replace(peer, last_heard=now)

    def on_disconnect(self, name: str, now: float) -> list[Event]:
        """The connection to a peer broke: a hint only; silence decides death."""
        peer = self._peers.get(name)
        if peer is None or peer.status is not PeerStatus.ALIVE:
            return []
        self._peers[name] = replace(peer, status=PeerStatus.SUSPECT)
        return []

    def tick(self, now: float) -> list[Event]:
        """Advance the failure detector; returns PeerDown for peers that went silent."""
        events: list[Event] = []
        for name, peer in list(self._peers.items()):
            silent = now - peer.last_heard
            if peer.status is PeerStatus.DEAD:
                if silent > self.tombstone_s:
                    del self._peers[name]
                continue
            if silent > self.dead_after:
                self._peers[name] = replace(peer, status=PeerStatus.DEAD)
                if peer.heard_directly:
                    events.append(PeerDown(name, f"silent for {silent:.1f} s"))
                    log.info("peer %s is dead (silent for %.1f s)", name, silent)
            elif silent > self.suspect_after and peer.status is PeerStatus.ALIVE:
                self._peers[name] = replace(peer, status=PeerStatus.SUSPECT)
        return events

    # ---- internals ---------------------------------------------------------------
    @staticmethod
    def _parse_digest(entry: dict[str, Any], observed_host: str | None = None
                      ) -> tuple[str, Address, int]:
        name = entry["name"]
        if not isinstance(name, str) or not name or len(name) > 128:
            raise ValueError(f"bad node name {name!r}")
        host = str(entry["host"])
        if host in ("", "0.0.0.0", "::") and observed_host:
            host = observed_host
        port = int(entry["port"])
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        return name, Address(host, port), int(entry["incarnation"])

    def _heard(self, name: str, address: Address, incarnation: int, advert: Advert,
               now: float) -> list[Event]:
        existing = self._peers.get(name)
        if existing is not None and incarnation < existing.incarnation:
            return []  # an older process of that name: stale
        events: list[Event] = []
        if existing is None or existing.status is PeerStatus.DEAD or not existing.heard_directly:
            events.append(PeerUp(name))
            log.info("peer %s is up at %s", name, address)
            if existing is None or existing.address != address or existing.status is PeerStatus.DEAD:
                events.append(Dial(name, address))
        self._peers[name] = Peer(name, address, incarnation, PeerStatus.ALIVE, now, advert, True)
        return events

    def learn(self, entry: dict[str, Any], now: float, observed_host: str | None = None) -> list[Event]:
        """A node announced itself without a connection (a LAN discovery beacon): learn
        that it exists and dial it, exactly as for gossip."""
        return self._learn(entry, now, observed_host)

    def _learn(self, entry: dict[str, Any], now: float, observed_host: str | None = None) -> list[Event]:
        """Gossip about a third node: learn that it exists and dial it."""
        try:
            name, address, incarnation = self._parse_digest(entry, observed_host)
        except (KeyError, TypeError, ValueError) as exc:
            # one bad gossip entry is skipped, the others still count
            log.warning("skipping malformed gossip entry: %s", exc)
            return []
        if name == self.name:
            return []
        existing = self._peers.get(name)
        if existing is not None:
            if existing.status is PeerStatus.DEAD and incarnation > existing.incarnation:
                pass  # a restarted node: learn it afresh below
            else:
                return []
        self._peers[name] = Peer(name, address, incarnation, PeerStatus.ALIVE, now, Advert(), False)
        return [Dial(name, address)]
