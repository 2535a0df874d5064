"""Per-request timelines: what each device did for a request, and when (sans-IO).

Every node keeps, for its most recent requests, the spans of its own work on them: frames
received, tiles computed (per block), pieces sent to each neighbour, the head, and on the
requester the request's phases (load, plan, execution). Times are this node's wall clock
(`time.time()`; callers pass them in). `meshci infer --trace FILE` fetches each device's
spans after the answer and `chrome_trace` lays them out as Chrome trace-event JSON (Perfetto,
chrome://tracing): one track per device, every device's times moved onto the requester's
clock with the offsets its heartbeats measured.

Bounded: `max_requests` requests, `max_events` spans each, so a busy or hostile mesh cannot
grow it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_REQUESTS = 32
MAX_EVENTS = 4096
CATEGORIES = ("request", "auction", "receive", "compute", "send", "head")


@dataclass(frozen=True)
class Span:
    """One thing a device did for a request: `start` (wall seconds) for `dur` seconds."""

    name: str
    cat: str
    start: float
    dur: float
    args: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "cat": self.cat, "start": self.start, "dur": self.dur, "args": dict(self.args)}

    @classmethod
    def from_json(cls, data: Any) -> Span:
        """A span from a peer's answer, checked (a hostile peer's span is refused)."""
        if not isinstance(data, dict):
            raise ValueError("a span must be an object")
        name, cat, start, dur = data.get("name"), data.get("cat"), data.get("start"), data.get("dur")
        args = data.get("args", {})
        if not isinstance(name, str) or len(name) > 200 or cat not in CATEGORIES:
            raise ValueError(f"bad span name/cat {name!r}/{cat!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (start, dur)):
            raise ValueError("span start and dur must be finite numbers")
        if dur < 0 or not isinstance(args, dict):
            raise ValueError("bad span dur or args")
        return cls(name, cat, float(start), float(dur), args)


class TraceLog:
    """The spans of this node's most recent requests, by request id."""

    def __init__(self, max_requests: int = MAX_REQUESTS, max_events: int = MAX_EVENTS) -> None:
        self.max_requests = max_requests
        self.max_events = max_events
        self._spans: OrderedDict[int, list[Span]] = OrderedDict()

    def record(self, rid: int, span: Span) -> None:
        spans = self._spans.get(rid)
        if spans is None:
            spans = self._spans[rid] = []
            while len(self._spans) > self.max_requests:
                self._spans.popitem(last=False)
        if len(spans) < self.max_events:
            spans.append(span)

    def spans(self, rid: int) -> list[Span]:
        return list(self._spans.get(rid, ()))


def request_phases(began: float, loaded: float, planned: float, sent: float, done: float,
                   auction: str, rounds: int) -> list[Span]:
    """The requester's spans of one request from its phase boundaries (wall seconds)."""
    return [
        Span("request", "request", began, done - began),
        Span("load model", "request", began, loaded - began),
        Span("plan", "request", loaded, planned - loaded),
        Span(f"auction: {auction}", "auction", planned, 0.0, {"rounds": rounds}),
        Span("execution", "request", sent, done - sent),
    ]


def chrome_trace(devices: Mapping[str, list[Span]], offsets: Mapping[str, float], requester: str
                 ) -> dict[str, Any]:
    """Chrome trace-event JSON: one process (track) per device, the requester first; each
    device's wall times minus its clock offset (its clock minus the requester's; 0 when
    unknown), in microseconds from the request's start."""
    shifted = {d: [(s, s.start - offsets.get(d, 0.0)) for s in spans] for d, spans in devices.items()}
    starts = [t for spans in shifted.values() for _, t in spans]
    origin = min(starts) if starts else 0.0
    order = sorted(devices, key=lambda d: (d != requester, d))
    events: list[dict[str, Any]] = []
    for pid, device in enumerate(order, start=1):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                       "args": {"name": device + (" (requester)" if device == requester else "")}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        for span, start in shifted[device]:
            events.append({"ph": "X", "name": span.name, "cat": span.cat, "pid": pid,
                           "tid": CATEGORIES.index(span.cat), "ts": round((start - origin) * 1e6, 3),
                           "dur": round(span.dur * 1e6, 3), "args": dict(span.args)})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"requester": requester, "clock_offsets_s": dict(offsets)}}


def wall_of(perf: float) -> float:
    """A `time.perf_counter()` reading as wall-clock seconds (`time.time()`): the one place
    here that reads the clock, for callers that timed with the monotonic counter."""
    return time.time() - (time.perf_counter() - perf)
