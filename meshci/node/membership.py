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
about it (even with a newer incarnation) only makes it a candidate to dial; only fresh
proof of life from the node itself revives it: its own JOIN or heartbeat, on a connection
authenticated under its name, with a newer incarnation (a restarted process) or, from the
same process, a newer `beat` (every JOIN and heartbeat a node sends counts one up, so an
older one, replayed or overtaken by the last one heard, cannot revive it).

Silence is judged per peer (`liveness.ArrivalWindow`): the fixed `suspect_after` and
`dead_after` are floors, and a peer whose arrivals have been slow or irregular (a busy
device, a link with long round trips) gets a threshold scaled to what it has shown. Any
bytes heard from a peer's connections count (`touch`), not only whole frames.
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass, field, replace
from typing import Any

from meshci.node.fields import FieldError, integer, number, shown, text
from meshci.node.liveness import ArrivalWindow
from meshci.wire.handshake import valid_name

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.5
SUSPECT_AFTER_S = 1.5
DEAD_AFTER_S = 3.0
TOMBSTONE_S = 60.0
# the tombstone of a peer that failed (did not leave) is kept, and redialled, this long: a
# partition of up to ten minutes heals by itself once it ends
FAILED_TOMBSTONE_S = 600.0
LEFT_THE_MESH = "left the mesh"  # the PeerDown reason of a clean LEAVE (not a failure)


def _beat(payload: dict[str, Any]) -> int | None:
    """The JOIN/heartbeat count a payload states (None: not stated)."""
    return None if "beat" not in payload else integer(payload["beat"], "beat", lo=0, hi=MAX_BEAT)


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
    memory_mb: int = 0  # its memory budget for tiles (`meshci.node.memory_budget`; 0: not stated)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"gflops": self.gflops, "backlog_s": self.backlog_s,
                                "links": [list(x) for x in self.links]}
        if self.curves:
            data["curves"] = _curves_json(self.curves)
        if self.tile_ms:
            data["tile_ms"] = self.tile_ms
        if self.version:
            data["version"] = self.version
        if self.memory_mb:
            data["memory_mb"] = self.memory_mb
        return data

    @classmethod
    def from_json(cls, data: Any) -> "Advert":
        """An advert a peer sent; every field typed, finite and bounded (ValueError naming
        the field otherwise: one absurd figure would break every plan that uses it)."""
        if not isinstance(data, dict):
            raise FieldError(f"an advert must be an object, got {type(data).__name__}")
        gflops = number(data.get("gflops", 1.0), "advert gflops", lo=MIN_GFLOPS, hi=MAX_GFLOPS)
        backlog = number(data.get("backlog_s", 0.0), "advert backlog_s")
        raw_links = data.get("links", [])
        if not isinstance(raw_links, list) or len(raw_links) > MAX_ADVERT_LINKS:
            raise FieldError(f"advert links must be a list of at most {MAX_ADVERT_LINKS}")
        links = []
        for entry in raw_links:
            if not isinstance(entry, list) or len(entry) != 3 or not valid_name(entry[0]):
                raise FieldError("an advert link is [peer name, mbps, ms]")
            links.append((entry[0], number(entry[1], "advert link mbps", hi=MAX_MBPS),
                          number(entry[2], "advert link ms", hi=MAX_LINK_MS)))
        tile_ms = number(data.get("tile_ms", 0.0), "advert tile_ms", hi=MAX_TILE_MS)
        raw = data.get("curves", {})
        if not isinstance(raw, dict) or len(raw) > MAX_ADVERT_CURVES:
            raise FieldError(f"bad advert curves: want at most {MAX_ADVERT_CURVES} models")
        curves = []
        for key, curve in sorted(raw.items()):
            text(key, "advert curve key")
            if not isinstance(curve, list) or not 0 < len(curve) <= MAX_CURVE_SEGMENTS:
                raise FieldError(f"bad advert curve for {shown(key)}: want 1..{MAX_CURVE_SEGMENTS} (a, b) pairs")
            pairs = []
            for pair in curve:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise FieldError(f"bad advert curve for {shown(key)}: want (a, b) pairs")
                pairs.append((number(pair[0], "advert curve a", hi=MAX_CURVE_S),
                              number(pair[1], "advert curve b", hi=MAX_CURVE_S)))
            curves.append((key, tuple(pairs)))
        version = data.get("version", "")
        if not isinstance(version, str) or len(version) > MAX_VERSION_CHARS or not version.isprintable():
            raise FieldError(f"bad advert version: want at most {MAX_VERSION_CHARS} printable characters")
        memory_mb = int(number(data.get("memory_mb", 0), "advert memory_mb", hi=MAX_MEMORY_MB))
        return cls(gflops, backlog, tuple(links), tuple(curves), tile_ms, version, memory_mb)


MAX_ADVERT_CURVES = 8
MAX_HOST = 255  # a DNS name or an address literal
# DNS labels of at most 63 characters, or an IPv6 literal (hex, colons, a zone or a dotted tail)
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?"
                   r"|[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*(?:%[A-Za-z0-9_.-]{1,32})?")
MAX_GOSSIP_ENTRIES = 128  # per frame: a mesh larger than this learns the rest over several beats
MAX_CANDIDATES = 64  # peers heard of (gossip, beacons) but not yet heard from directly
MAX_PEERS = 1024  # every entry of the table, tombstones included
MAX_BEAT = 1 << 62
MAX_TILE_MS = 60_000.0
MAX_VERSION_CHARS = 32
MAX_MEMORY_MB = 1 << 24  # 16 TB
MAX_CURVE_SEGMENTS = 256
MIN_GFLOPS = 1e-6
MAX_GFLOPS = 1e6  # a petaflop device: far beyond any board, and far below overflow in plans
MAX_ADVERT_LINKS = 256
MAX_MBPS = 1e6
MAX_LINK_MS = 1e6
MAX_CURVE_S = 1e4  # seconds per segment (a) or per row (b)

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
    beat: int = -1  # the newest JOIN/heartbeat count heard from this process (-1: none)
    left: bool = False  # DEAD by its own LEAVE (not redialled)

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
                 tombstone_s: float = TOMBSTONE_S, failed_tombstone_s: float = FAILED_TOMBSTONE_S) -> None:
        self.name = name
        self.address = address
        self.incarnation = incarnation
        self.advert = advert or Advert()
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self.tombstone_s = tombstone_s
        self.failed_tombstone_s = failed_tombstone_s
        self._peers: dict[str, Peer] = {}
        self._arrivals: dict[str, ArrivalWindow] = {}  # peers heard directly, tombstones too
        self._beat = 0

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

    def _next_beat(self) -> int:
        self._beat += 1
        return self._beat

    def join_payload(self) -> dict[str, Any]:
        """Payload of the JOIN a node sends on every new outbound connection."""
        return {**self.self_digest(), "beat": self._next_beat(), "advert": self.advert.to_json()}

    def heartbeat(self, *, advert: bool = True, gossip: bool = True) -> dict[str, Any]:
        """Payload of a heartbeat: who we are and our backlog; our whole advert when
        `advert` (a receiver keeps the last one it heard, so it rides only when it changed:
        curves and links are most of a heartbeat's bytes and CPU); the gossip of every live
        peer known when `gossip` (when the view changed, and now and then)."""
        payload: dict[str, Any] = {**self.self_digest(), "beat": self._next_beat(),
                                   "backlog_s": self.advert.backlog_s}
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
    def on_join(self, payload: dict[str, Any], now: float, observed_host: str | None = None, *,
                sender: str) -> tuple[list[Event], Refusal | None]:
        """A node greets us directly (JOIN) on a connection authenticated as `sender`.
        Refuse a JOIN naming another node than `sender`, or a name already held by another
        live node."""
        try:
            name, address, incarnation = self._parse_digest(payload, observed_host)
            advert = Advert.from_json(payload.get("advert", {}))
            beat = _beat(payload)
        except (KeyError, TypeError, ValueError) as exc:
            # malformed JOIN from a peer: refuse it, keep serving
            return [], Refusal(f"malformed join: {exc}")
        if name != sender:
            reason = f"the join names {name!r} but the connection authenticated as {shown(sender)}"
            log.warning("refusing join from %s: %s", address, reason)
            return [], Refusal(reason)
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
        return self._heard(name, address, incarnation, advert, now, beat), None

    def on_welcome(self, payload: dict[str, Any], now: float) -> list[Event]:
        """The node we joined through accepted us and lists its peers (candidates to dial)."""
        return self._learn_all(payload.get("peers", []), now)

    def on_heartbeat(self, payload: dict[str, Any], now: float,
                     observed_host: str | None = None, *, sender: str) -> list[Event]:
        """A heartbeat on a connection authenticated as `sender`. Only a node's own
        heartbeat (its name is `sender`) proves it alive and sets its advert; one naming
        another node is hearsay, a candidate to dial at most. Without an advert it keeps
        the advert last heard from that peer (process), with the backlog the heartbeat
        states."""
        if not isinstance(payload, dict) or payload.get("name") != sender:
            # about a third node (or a client's forgery): never liveness nor an advert
            return self._learn_all([payload], now) + self._learn_all(
                payload.get("gossip", []) if isinstance(payload, dict) else [], now)
        try:
            name, address, incarnation = self._parse_digest(payload, observed_host)
            if "advert" in payload:
                advert = Advert.from_json(payload["advert"])
            else:
                known = self._peers.get(name)
                advert = known.advert if known is not None and known.incarnation == incarnation else Advert()
            if "backlog_s" in payload:
                advert = replace(advert, backlog_s=number(payload["backlog_s"], "backlog_s"))
            beat = _beat(payload)
        except (KeyError, TypeError, ValueError) as exc:
            # a malformed heartbeat is dropped; the sender will be judged by its silence
            log.warning("dropping malformed heartbeat from %s: %s", shown(sender), exc)
            return []
        if name == self.name:
            return []
        existing = self._peers.get(name)
        if existing is not None and existing.address != address and \
                existing.status is not PeerStatus.DEAD and existing.heard_directly:
            log.warning("ignoring heartbeat for %r from %s: the name belongs to %s",
                        name, address, existing.address)
            return []
        events = self._heard(name, address, incarnation, advert, now, beat)
        return events + self._learn_all(payload.get("gossip", []), now)

    def on_leave(self, name: str, now: float) -> list[Event]:
        """A peer announced a clean shutdown: dead at once, no need to wait for silence."""
        peer = self._peers.get(name)
        if peer is None or peer.status is PeerStatus.DEAD:
            return []
        self._peers[name] = replace(peer, status=PeerStatus.DEAD, last_heard=now, left=True)
        return [PeerDown(name, LEFT_THE_MESH)] if peer.heard_directly else []

    def touch(self, name: str, now: float) -> None:
        """Bytes arrived at `now` on one of a peer's own authenticated connections: it is
        alive (any bytes, not only whole frames or heartbeats: a frame may take many seconds
        on a slow link). A peer not yet heard directly, or declared dead, needs a real JOIN
        or heartbeat; an arrival no newer than the last one heard changes nothing."""
        peer = self._peers.get(name)
        if peer is None or not peer.heard_directly or peer.status is PeerStatus.DEAD \
                or now <= peer.last_heard:
            return
        self._window(name, peer.last_heard).heard(now)
        self._peers[name] = replace(peer, status=PeerStatus.ALIVE, last_heard=now)

    def observe_rtt(self, name: str, rtt: float) -> None:
        """A measured round trip to a live peer (its silence is judged with it)."""
        if self.is_alive(name):
            self._window(name, self._peers[name].last_heard).observe_rtt(rtt)

    def dead_after_for(self, name: str) -> float:
        """The silence after which `name` is declared dead (the base, or longer for a peer
        whose arrivals have been slow or irregular)."""
        window = self._arrivals.get(name)
        return self.dead_after if window is None else window.threshold(self.dead_after)

    def redial_candidates(self) -> list[Peer]:
        """Peers to keep a connection to: heard directly, alive or a tombstone of a failure
        (kept `failed_tombstone_s`: a partition heals only if someone dials), not one that
        left."""
        return [p for p in self.peers() if p.heard_directly and not p.left]

    def _window(self, name: str, since: float) -> ArrivalWindow:
        window = self._arrivals.get(name)
        if window is None:
            window = self._arrivals[name] = ArrivalWindow(since, HEARTBEAT_INTERVAL_S)
        return window

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
                keep = self.failed_tombstone_s if peer.heard_directly and not peer.left else self.tombstone_s
                if silent > max(keep, self.tombstone_s):
                    del self._peers[name]
                    self._arrivals.pop(name, None)
                continue
            dead_after = self.dead_after_for(name)
            suspect_after = dead_after * self.suspect_after / self.dead_after if self.dead_after > 0 \
                else self.suspect_after
            if silent > dead_after:
                self._peers[name] = replace(peer, status=PeerStatus.DEAD)
                if peer.heard_directly:
                    events.append(PeerDown(name, f"silent for {silent:.1f} s"))
                    log.info("peer %s is dead (silent for %.1f s)", name, silent)
            elif silent > suspect_after and peer.status is PeerStatus.ALIVE:
                self._peers[name] = replace(peer, status=PeerStatus.SUSPECT)
        return events

    # ---- internals ---------------------------------------------------------------
    @staticmethod
    def _parse_digest(entry: Any, observed_host: str | None = None) -> tuple[str, Address, int]:
        """(name, address, incarnation) of a peer's digest; ValueError naming the field."""
        if not isinstance(entry, dict):
            raise FieldError(f"a node digest must be an object, got {type(entry).__name__}")
        name = entry.get("name")
        if not valid_name(name):
            raise FieldError(f"bad node name {shown(name)}")
        host = text(entry.get("host"), "host", max_len=MAX_HOST)
        if host and _HOST.fullmatch(host) is None:
            raise FieldError(f"bad host {shown(host)}: want a DNS name or an IP address")
        if host in ("", "0.0.0.0", "::") and observed_host:
            host = observed_host
        port = integer(entry.get("port"), "port", lo=1, hi=65535)
        return name, Address(host, port), integer(entry.get("incarnation"), "incarnation")

    def _heard(self, name: str, address: Address, incarnation: int, advert: Advert,
               now: float, beat: int | None = None) -> list[Event]:
        existing = self._peers.get(name)
        if (existing is not None and existing.heard_directly and existing.status is not PeerStatus.DEAD
                and incarnation < existing.incarnation):
            return []  # an older process of that name while the newer one lives: stale
        if existing is not None and existing.heard_directly and existing.status is PeerStatus.DEAD \
                and not (incarnation > existing.incarnation or (
                    incarnation == existing.incarnation and beat is not None and beat > existing.beat)):
            # no fresh proof of life: older than the last JOIN/heartbeat heard from it
            log.info("not reviving dead peer %s: no newer incarnation or beat", name)
            return []
        if existing is None and len(self._peers) >= MAX_PEERS:
            log.warning("not adding peer %r: the table holds %d peers already", name, MAX_PEERS)
            return []
        events: list[Event] = []
        if existing is None or existing.status is PeerStatus.DEAD or not existing.heard_directly:
            events.append(PeerUp(name))
            log.info("peer %s is up at %s", name, address)
            if existing is None or existing.address != address or existing.status is PeerStatus.DEAD:
                events.append(Dial(name, address))
        if existing is None or existing.status is PeerStatus.DEAD or existing.incarnation != incarnation:
            self._arrivals[name] = ArrivalWindow(now, HEARTBEAT_INTERVAL_S)  # a gap across a death is no gap
        else:
            self._window(name, existing.last_heard).heard(now)
        last_beat = existing.beat if existing is not None and existing.incarnation == incarnation else -1
        self._peers[name] = Peer(name, address, incarnation, PeerStatus.ALIVE, max(now, existing.last_heard)
                                 if existing is not None and existing.status is not PeerStatus.DEAD else now,
                                 advert, True, max(last_beat, -1 if beat is None else beat))
        return events

    def learn(self, entry: dict[str, Any], now: float, observed_host: str | None = None) -> list[Event]:
        """A node announced itself without a connection (a LAN discovery beacon): learn
        that it exists and dial it, exactly as for gossip."""
        return self._learn(entry, now, observed_host)

    def _learn_all(self, entries: Any, now: float) -> list[Event]:
        """A gossip list: at most `MAX_GOSSIP_ENTRIES` candidates; a longer or malformed
        list is dropped whole, with one logged line."""
        if not isinstance(entries, list) or len(entries) > MAX_GOSSIP_ENTRIES:
            log.warning("dropping a gossip list: want a list of at most %d entries, got %s",
                        MAX_GOSSIP_ENTRIES, shown(entries))
            return []
        events: list[Event] = []
        for entry in entries:
            events += self._learn(entry, now)
        return events

    def _learn(self, entry: dict[str, Any], now: float, observed_host: str | None = None) -> list[Event]:
        """Gossip about a third node (hearsay): learn that it may exist and dial it; only
        its own heartbeat, on a connection authenticated under its name, makes it a peer."""
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
                if existing.heard_directly:
                    # a restarted node, by hearsay: dial it where it is said to be; the
                    # tombstone stays until the node's own JOIN or heartbeat revives it
                    self._peers[name] = replace(existing, address=address)
                    return [Dial(name, address)]
                # a candidate never heard from: learn it afresh below
            else:
                return []
        elif sum(not p.heard_directly for p in self._peers.values()) >= MAX_CANDIDATES:
            log.info("not dialling %r: already %d peers heard of but not heard from", name, MAX_CANDIDATES)
            return []
        self._peers[name] = Peer(name, address, incarnation, PeerStatus.ALIVE, now, Advert(), False)
        return [Dial(name, address)]
