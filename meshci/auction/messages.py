"""Items and the messages of an auction round (frozen dataclasses, JSON-safe).

They travel as JSON in a frame's meta (never pickled): ``message.to_json()`` gives a dict of
JSON types, ``message_from_json(d)`` rebuilds it and raises `MessageFormatError` on anything
malformed (a peer's mistake: the caller logs it and drops the frame).

The exchange (see `meshci.auction.auctioneer`):

    auctioneer -> bidder   CallForBids  (round r: every open item of the request)
    bidder -> auctioneer   BidBundle    (one answer: its backlog and a bid per item it wants)
    auctioneer -> bidder   Award        (round r+1: the items it won)
    bidder -> auctioneer   AwardReply   (accepted / declined item ids)
    auctioneer -> bidder   Close        (final: the items it holds; everything else is freed)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Union

from meshci.auction.errors import MessageFormatError

__all__ = [
    "AuctionMessage",
    "Award",
    "AwardReply",
    "Bid",
    "BidBundle",
    "CallForBids",
    "Close",
    "Item",
    "Outgoing",
    "message_from_json",
]


def _field(d: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """d[name], checked to be exactly of `kind` (so a bool never passes for a number)."""
    try:
        value = d[name]
    except (KeyError, TypeError, IndexError) as exc:
        # a missing field, or `d` is not an object at all: the peer's mistake
        raise MessageFormatError(f"missing field {name!r} (or not an object)") from exc
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if type(value) not in kinds:
        raise MessageFormatError(f"field {name!r} must be {kind}, got {type(value).__name__}")
    return value


MAX_FIGURE = 1e12  # seconds, FLOPs per item: beyond any real figure, far below overflow
MAX_TEXT = 256  # auction ids, item ids, names
MAX_INDEX = 1 << 40  # rows, segments, byte counts of one item


def _finite(value: Any, name: str) -> float:
    """A peer's number as a float, finite and within +-MAX_FIGURE (a 400-digit integer
    never reaches float())."""
    if type(value) not in (int, float) or not -MAX_FIGURE <= value <= MAX_FIGURE:
        raise MessageFormatError(f"field {name!r} must be a finite number within +-{MAX_FIGURE:g}")
    return float(value)


def _number(d: Mapping[str, Any], name: str) -> float:
    return _finite(_field(d, name, (int, float)), name)


def _text(d: Mapping[str, Any], name: str) -> str:
    value = _field(d, name, str)
    if len(value) > MAX_TEXT or not value.isprintable():
        raise MessageFormatError(f"field {name!r} must be printable, at most {MAX_TEXT} characters")
    return value


def _strings(d: Mapping[str, Any], name: str) -> tuple[str, ...]:
    values = _field(d, name, list)
    for v in values:
        if type(v) is not str:
            raise MessageFormatError(f"field {name!r} must be a list of strings")
    return tuple(values)


def _int_pair(d: Mapping[str, Any], name: str) -> tuple[int, int]:
    pair = _field(d, name, list)
    if len(pair) != 2 or type(pair[0]) is not int or type(pair[1]) is not int:
        raise MessageFormatError(f"field {name!r} must be two integers")
    return (pair[0], pair[1])


def _envelope(msg: Any) -> dict[str, Any]:
    """The fields every round message carries: its type, auction, round and sender."""
    return {"type": msg.TYPE, "auction_id": msg.auction_id, "round": int(msg.round), "sender": msg.sender}


def _envelope_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    """The checked envelope fields of a round message, as constructor keywords."""
    round_ = _field(d, "round", int)
    if not 0 <= round_ < 1 << 31:
        raise MessageFormatError("field 'round' must be in 0..2**31")
    return {"auction_id": _text(d, "auction_id"), "round": round_, "sender": _text(d, "sender")}


@dataclass(frozen=True)
class Item:
    """One tile of a fused block, as auctioned.

    rows: the output rows ``[a, b)`` of the block; flops: its compute including halo rows;
    recv_bytes / send_bytes: its input and output traffic, from ``recv_from`` / to
    ``send_to`` ("" means the auctioneer); segments: the block's segment range
    ``[start, end)`` (for per-segment speed curves); model: the model the block belongs to
    ("" when not told; a bidder with a speed curve for it prices the item by the curve).
    """

    item_id: str
    block: int
    rows: tuple[int, int]
    flops: float
    recv_bytes: int = 0
    send_bytes: int = 0
    segments: tuple[int, int] = (0, 0)
    recv_from: str = ""
    send_to: str = ""
    model: str = ""

    def to_json(self) -> dict[str, Any]:
        data = {
            "item_id": self.item_id,
            "block": int(self.block),
            "rows": [int(r) for r in self.rows],
            "flops": float(self.flops),
            "recv_bytes": int(self.recv_bytes),
            "send_bytes": int(self.send_bytes),
            "segments": [int(k) for k in self.segments],
            "recv_from": self.recv_from,
            "send_to": self.send_to,
        }
        if self.model:
            data["model"] = self.model
        return data

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Item:
        try:
            # Fast path (a call for bids carries every item of a request): one combined check.
            rows, segments, flops = d["rows"], d["segments"], d["flops"]
            well_formed = (
                type(d["item_id"]) is str
                and type(d["block"]) is int
                and type(rows) is list and len(rows) == 2 and type(rows[0]) is int and type(rows[1]) is int
                and type(flops) in (int, float)
                and type(d["recv_bytes"]) is int
                and type(d["send_bytes"]) is int
                and type(segments) is list and len(segments) == 2
                and type(segments[0]) is int and type(segments[1]) is int
                and type(d["recv_from"]) is str
                and type(d["send_to"]) is str
            )
        except (KeyError, TypeError, IndexError):
            # missing fields or not an object: the slow path below names the problem
            well_formed = False
        if not well_formed:
            _field(d, "item_id", str)
            _field(d, "block", int)
            _int_pair(d, "rows")
            _number(d, "flops")
            _field(d, "recv_bytes", int)
            _field(d, "send_bytes", int)
            _int_pair(d, "segments")
            _field(d, "recv_from", str)
            _field(d, "send_to", str)
        model = d.get("model", "")
        if type(model) is not str:
            raise MessageFormatError(f"field 'model' must be a str, got {type(model).__name__}")
        item = cls(
            d["item_id"], d["block"], (rows[0], rows[1]), _finite(flops, "flops"), d["recv_bytes"],
            d["send_bytes"], (segments[0], segments[1]), d["recv_from"], d["send_to"], model,
        )
        if not all(0 <= v < MAX_INDEX for v in (item.block, *item.rows, item.recv_bytes, item.send_bytes,
                                                 *item.segments)):
            raise MessageFormatError(f"item {item.item_id[:40]!r}: block, rows, segments and bytes must be in "
                                     f"0..{MAX_INDEX}")
        if not math.isfinite(item.flops) or item.flops < 0:
            raise MessageFormatError(f"item {item.item_id!r}: flops must be finite and >= 0")
        if item.recv_bytes < 0 or item.send_bytes < 0:
            raise MessageFormatError(f"item {item.item_id!r}: byte counts must be >= 0")
        return item


@dataclass(frozen=True)
class Bid:
    """A bidder's predicted finish time (seconds from now) if it wins the item."""

    item_id: str
    finish_s: float


@dataclass(frozen=True)
class CallForBids:
    """Round r: the open items; answer with one BidBundle within ``reply_within_s``."""

    TYPE: ClassVar[str] = "call_for_bids"
    auction_id: str
    round: int
    sender: str
    items: tuple[Item, ...]
    reply_within_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            **_envelope(self),
            "items": [item.to_json() for item in self.items],
            "reply_within_s": float(self.reply_within_s),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CallForBids:
        return cls(
            **_envelope_fields(d),
            items=tuple(Item.from_json(x) for x in _field(d, "items", list)),
            reply_within_s=_number(d, "reply_within_s"),
        )


@dataclass(frozen=True)
class BidBundle:
    """A bidder's one answer to a CallForBids: its backlog and its bids.

    backlog_s is the work it holds outside this auction; each bid's finish_s is backlog_s
    plus the seconds the item costs it. Here only their JSON types and magnitudes are checked
    (finite, within +-MAX_FIGURE); the auctioneer ignores bad values with a logged reason.
    """

    TYPE: ClassVar[str] = "bid_bundle"
    auction_id: str
    round: int
    sender: str
    backlog_s: float
    bids: tuple[Bid, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            **_envelope(self),
            "backlog_s": float(self.backlog_s),
            "bids": [[bid.item_id, float(bid.finish_s)] for bid in self.bids],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BidBundle:
        bids = []
        for pair in _field(d, "bids", list):
            if (
                type(pair) is not list
                or len(pair) != 2
                or type(pair[0]) is not str
                or type(pair[1]) not in (int, float)
            ):
                raise MessageFormatError("each bid must be [item_id, finish_s]")
            bids.append(Bid(pair[0], _finite(pair[1], "bids")))
        return cls(
            **_envelope_fields(d),
            backlog_s=_number(d, "backlog_s"),
            bids=tuple(bids),
        )


@dataclass(frozen=True)
class Award:
    """The items a bidder won; ``work_s`` is what they cost it per its own bids."""

    TYPE: ClassVar[str] = "award"
    auction_id: str
    round: int
    sender: str
    item_ids: tuple[str, ...]
    work_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            **_envelope(self),
            "item_ids": list(self.item_ids),
            "work_s": float(self.work_s),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Award:
        return cls(
            **_envelope_fields(d),
            item_ids=_strings(d, "item_ids"),
            work_s=_number(d, "work_s"),
        )


@dataclass(frozen=True)
class AwardReply:
    """A bidder's answer to an Award: the items it accepts and those it declines."""

    TYPE: ClassVar[str] = "award_reply"
    auction_id: str
    round: int
    sender: str
    accepted: tuple[str, ...]
    declined: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            **_envelope(self),
            "accepted": list(self.accepted),
            "declined": list(self.declined),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> AwardReply:
        return cls(
            **_envelope_fields(d),
            accepted=_strings(d, "accepted"),
            declined=_strings(d, "declined"),
        )


@dataclass(frozen=True)
class Close:
    """The end of an auction for one bidder: it holds ``item_ids`` firmly, nothing else."""

    TYPE: ClassVar[str] = "close"
    auction_id: str
    round: int
    sender: str
    item_ids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            **_envelope(self),
            "item_ids": list(self.item_ids),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Close:
        return cls(
            **_envelope_fields(d),
            item_ids=_strings(d, "item_ids"),
        )


AuctionMessage = Union[CallForBids, BidBundle, Award, AwardReply, Close]

_TYPES: dict[str, Any] = {
    cls.TYPE: cls for cls in (CallForBids, BidBundle, Award, AwardReply, Close)
}


def message_from_json(d: Mapping[str, Any]) -> AuctionMessage:
    """Rebuild a message from its ``to_json()`` dict; `MessageFormatError` if malformed."""
    kind = _field(d, "type", str)
    cls = _TYPES.get(kind)
    if cls is None:
        raise MessageFormatError(f"unknown auction message type {kind!r}")
    return cls.from_json(d)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Outgoing:
    """A message a state machine wants sent to the peer named ``to``."""

    to: str
    message: AuctionMessage
