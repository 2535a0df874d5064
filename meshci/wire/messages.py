"""The messages that travel between meshci nodes.

A `Message` is small JSON-able control data (`meta`), zero or more tensors sent as raw
buffers (never pickled), and, only for the kinds in `BLOB_KINDS` (model code) and only on
authenticated connections, a cloudpickle `blob`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class MsgType(IntEnum):
    """Kinds of message. Values are part of the wire format: never renumber, only add."""

    # handshake (1-15)
    HELLO = 1
    CHALLENGE = 2
    PROOF = 3
    # membership (16-31)
    PING = 16
    PONG = 17
    GOSSIP = 18
    JOIN = 19
    STATE = 20
    LEAVE = 21
    # requests (32-47)
    INFER = 32
    RESULT = 33
    # auction (48-63)
    CALL_FOR_BIDS = 48
    BIDS = 49
    AWARD = 50
    ACCEPT = 51
    DECLINE = 52
    # execution (64-79)
    PLAN = 64
    TILE = 65
    BLOCK_DONE = 66
    # code shipping (80-95)
    MODEL_CODE = 80
    # errors (96-)
    ERROR = 96


HANDSHAKE_KINDS = frozenset({MsgType.HELLO, MsgType.CHALLENGE, MsgType.PROOF})

# The only kind that may carry a cloudpickle blob: a user's model code. Plans and requests
# travel as JSON. Every other kind with a blob is a protocol error.
BLOB_KINDS = frozenset({MsgType.MODEL_CODE})


@dataclass(frozen=True, eq=False)
class Message:
    """One framed message. `eq=False`: tensors do not compare to a bool; see `same_message`."""

    kind: MsgType
    request_id: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: tuple[torch.Tensor, ...] = ()
    blob: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", MsgType(self.kind))
        if not isinstance(self.tensors, tuple):
            object.__setattr__(self, "tensors", tuple(self.tensors))

    def __repr__(self) -> str:
        shapes = [tuple(t.shape) for t in self.tensors]
        blob = "None" if self.blob is None else f"<{len(self.blob)} bytes>"
        return (
            f"Message({self.kind.name}, request_id={self.request_id}, meta={self.meta!r}, "
            f"tensors={shapes}, blob={blob})"
        )


def same_message(a: Message, b: Message) -> bool:
    """True when both messages carry the same kind, id, meta, tensors (dtype, shape and
    bytes) and blob."""
    if (a.kind, a.request_id, a.meta, a.blob) != (b.kind, b.request_id, b.meta, b.blob):
        return False
    if len(a.tensors) != len(b.tensors):
        return False
    import torch

    return all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(_raw_bytes(x), _raw_bytes(y))
        for x, y in zip(a.tensors, b.tensors)
    )


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    # Compare bit patterns, so NaN payloads compare equal to themselves.
    import torch

    return t.detach().reshape(-1).contiguous().view(torch.uint8)
