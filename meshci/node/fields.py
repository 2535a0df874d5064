"""Checks for the fields a peer sends (pure).

Every number a peer sends is finite and bounded before it is used, integers by range (not
only by type: a 400-digit integer must never reach `float()`), every string is bounded in
length, and what is logged of a peer's text is escaped and cut (`shown`), so one frame can
neither overflow a figure to infinity nor forge log lines. A bad field raises
`FieldError` (a `ValueError`) naming the field.
"""

from __future__ import annotations

import math
from typing import Any

MAX_SECONDS = 1e6  # any duration a peer states (backlog, curve coefficients, delays): ~11 days
MAX_INCARNATION = (1 << 63) - 1
MAX_TEXT = 256  # a reason, a digest, a model name: longer is cut (reasons) or refused
SHOWN = 120  # at most this many characters of a peer's text in one log line


class FieldError(ValueError):
    """A field from a peer that is missing, of the wrong type or out of range."""


def number(value: Any, field: str, *, lo: float = 0.0, hi: float = MAX_SECONDS) -> float:
    """`value` as a float in [lo, hi]; ints are range-checked before conversion."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(f"{field} must be a number, got {type(value).__name__}")
    if isinstance(value, int) and not lo <= value <= hi:
        raise FieldError(f"{field} must be in [{lo:g}, {hi:g}]")
    result = float(value)
    if not (math.isfinite(result) and lo <= result <= hi):
        raise FieldError(f"{field} must be a finite number in [{lo:g}, {hi:g}], got {shown(value)}")
    return result


def integer(value: Any, field: str, *, lo: int = 0, hi: int = MAX_INCARNATION) -> int:
    """`value` as an int in [lo, hi] (a bool or a float is not an integer here)."""
    if type(value) is not int:
        raise FieldError(f"{field} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise FieldError(f"{field} must be an integer in [{lo}, {hi}]")
    return value


def text(value: Any, field: str, *, max_len: int = MAX_TEXT) -> str:
    """`value` as a printable string of at most `max_len` characters."""
    if not isinstance(value, str):
        raise FieldError(f"{field} must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise FieldError(f"{field} is longer than {max_len} characters")
    if not value.isprintable():
        raise FieldError(f"{field} holds control characters: {shown(value)}")
    return value


def reason(value: Any, default: str = "unknown error") -> str:
    """A peer's free-text reason, cut and made printable: it is repeated to clients and logged."""
    if not isinstance(value, str):
        return default
    cut = value[:MAX_TEXT]
    return cut if cut.isprintable() else shown(cut)[1:-1]


def shown(value: Any, limit: int = SHOWN) -> str:
    """A peer's value as it may appear in a log line: escaped (no line breaks, no control
    characters) and at most about `limit` characters."""
    if isinstance(value, str):
        head = value[:limit]
        return repr(head) + ("..." if len(value) > limit else "")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 30:
        return f"<integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    if isinstance(value, (dict, list, tuple)):
        return f"<{type(value).__name__} of {len(value)}>"
    text_ = repr(value)
    return text_[:limit] + ("..." if len(text_) > limit else "")


__all__ = ["FieldError", "MAX_INCARNATION", "MAX_SECONDS", "integer", "number", "reason", "shown", "text"]
