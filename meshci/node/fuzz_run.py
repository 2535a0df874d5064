"""An authenticated fuzzing run against an in-process mesh of two nodes (`meshci.node.fuzz`
makes the frames): templates recorded from real requests of every strategy, the campaign,
then the checks the issue asks for — no log record at ERROR and no traceback, no connection
dropped without a reason, bounded state, no stuck tasks, and an exact request through every
strategy afterwards. Used by the CI test (a few hundred frames) and `tools/fuzz_node.py`
(the full campaign)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from meshci.node.client import infer
from meshci.node.fuzz import FuzzReport, campaign
from meshci.node.membership import Address
from meshci.node.memory import rss_mb, trimmed_rss_mb
from meshci.node.runtime import Runtime
from meshci.node.server import Node, NodeConfig
from meshci.planning import STRATEGIES
from meshci.wire import Connection, Message, MsgType

MODEL = "resnet18"
SIZE = (32, 32)
TEMPLATES_PER_KIND = 6


class LogWatch(logging.Handler):
    """Keeps every record at ERROR or above and every record carrying a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []
        self.lines = 0
        self.chars = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += 1
        message = record.getMessage()
        self.chars += len(message)
        if record.levelno >= logging.ERROR or record.exc_info:
            raised = ""
            if record.exc_info:
                trace = "".join(traceback.format_exception(*record.exc_info)[-6:])
                raised = f" [{trace[-1500:]}]"
            self.bad.append(f"{record.levelname} {record.name}: {message[:300]}{raised}")


@dataclass
class FuzzOutcome:
    report: FuzzReport
    tracebacks: list[str]
    log_lines: int
    log_chars: int
    exact: dict[str, bool]
    tasks_before: int
    tasks_after: int
    state_after: dict[str, Any]
    peers_after: int
    rss_mb: tuple[float, float]  # before, after
    rss_trimmed_mb: float | None = None  # after, once the C heap returned its free pages (Linux)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {**self.report.summary(), "tracebacks_or_errors": len(self.tracebacks),
                "log_lines": self.log_lines, "log_chars": self.log_chars, "exact": self.exact,
                "tasks_before": self.tasks_before, "tasks_after": self.tasks_after,
                "state_after": self.state_after, "peers_after": self.peers_after,
                "rss_mb_before_after": [round(v, 1) for v in self.rss_mb],
                "rss_mb_after_trim": None if self.rss_trimmed_mb is None else round(self.rss_trimmed_mb, 1)}


def _record(node: Node, into: dict[MsgType, list[Message]]) -> Callable[[], None]:
    """Keep (copies of) the first frames of every kind `node` receives; returns the undo."""
    original = node.connections._dispatch

    async def recording(conn: Connection, msg: Message) -> None:
        kept = into.setdefault(msg.kind, [])
        if len(kept) < TEMPLATES_PER_KIND:
            kept.append(Message(msg.kind, msg.request_id, _json_copy(msg.meta),
                                tuple(t.clone() for t in msg.tensors)))
        await original(conn, msg)

    node.connections._dispatch = recording

    def undo() -> None:
        node.connections._dispatch = original
    return undo


def _json_copy(value: Any) -> Any:
    import json
    return json.loads(json.dumps(value))


async def _exact(address: Address, secret: bytes, strategy: str) -> bool:
    try:
        meta, _ = await infer(address, model=MODEL, size=SIZE, secret=secret, check=True,
                              strategy=strategy, timeout=60.0)
    except Exception:  # noqa: BLE001
        # any failure of the request after the campaign is the finding, not a crash here
        logging.getLogger(__name__).warning("request through %s failed after fuzzing", strategy, exc_info=True)
        return False
    return bool(meta.get("check_ok"))


async def _until(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def fuzz_mesh(frames: int, *, seed: int = 0,
                    progress: Callable[[str], Awaitable[None] | None] | None = None) -> FuzzOutcome:
    """Start two nodes, record templates, fuzz the first one, check it afterwards."""
    secret = os.urandom(32)
    watch = LogWatch()
    root = logging.getLogger()
    root.addHandler(watch)
    old_level = root.level
    root.setLevel(logging.INFO)
    nodes: list[Node] = []
    try:
        for name in ("target", "peer"):
            join = (nodes[0].address,) if nodes else ()
            node = Node(NodeConfig(name, Address("127.0.0.1", 0), join=join, secret=secret, gflops=1.0),
                        Runtime(1, isolate_builds=False))
            await node.start()
            nodes.append(node)
        target = nodes[0]
        await _until(lambda: all(len(n.membership.alive()) == 1 for n in nodes), 30.0)
        templates: dict[MsgType, list[Message]] = {}
        undo = [_record(n, templates) for n in nodes]
        for strategy in STRATEGIES:
            await _exact(nodes[1].address, secret, strategy)  # requests from the peer: PLANs reach target
            await _exact(target.address, secret, strategy)
        for u in undo:
            u()
        watch.bad.clear()  # findings count from the campaign on
        tasks_before = len(target._tasks)
        rss_before = rss_mb()
        request_ids = sorted({m.request_id for ms in templates.values() for m in ms if m.request_id})
        report = await campaign(target.address, secret, templates, frames=frames, seed=seed,
                                names=["fuzzer", "peer", "client-1", "target-not"],
                                request_ids=request_ids[:20])
        if progress is not None:
            await _maybe(progress(f"campaign done: {report.summary()}"))
        # the forged LEAVEs and the like heal: the real peer's heartbeats win again
        await _until(lambda: all(len(n.membership.alive()) == 1 for n in nodes), 30.0)
        exact = {s: await _exact(target.address, secret, s) for s in STRATEGIES}
        settled = await _until(lambda: len(target._tasks) <= tasks_before + 2, 20.0)
        rss_after = rss_mb()
        outcome = FuzzOutcome(report, list(watch.bad), watch.lines, watch.chars, exact, tasks_before,
                              len(target._tasks), target.request_state(), len(target.membership.peers()),
                              (rss_before, rss_after), rss_trimmed_mb=trimmed_rss_mb())
        if not settled:
            outcome.notes.append(f"tasks still running: {[t.get_coro() for t in target._tasks]}"[:2000])
        return outcome
    finally:
        await asyncio.gather(*(n.close() for n in nodes), return_exceptions=True)
        root.removeHandler(watch)
        root.setLevel(old_level)


async def _maybe(value: Awaitable[None] | None) -> None:
    if value is not None:
        await value


__all__ = ["FuzzOutcome", "LogWatch", "fuzz_mesh"]
