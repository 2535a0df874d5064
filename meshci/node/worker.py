"""The worker side of a node: the tiles it computes for requests (its own included), and
its bidder in the requesters' auctions.

A request reaches a worker as a PLAN (the plan, model, seed and input size) and pieces of
feature maps (TILE frames). `WorkerRun` (`meshci.node.request`, pure) says when a tile's
input is complete and where its output goes; this module loads the model, runs tiles on
the runtime's compute thread and keeps the bidder's commitments in step with the work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshci.auction.bidder import Bidder
from meshci.auction.messages import Close, Outgoing
from meshci.errors import MeshciError
from meshci.models.registry import check_model_allowed
from meshci.node.request import Compute, RequestStateError, WorkerRun
from meshci.node.runtime import LoadedModel
from meshci.planning import Plan
from meshci.trunk import Region
from meshci.wire import Message

if TYPE_CHECKING:
    from meshci.node.server import Node

log = logging.getLogger(__name__)

# Worker state no cancel reached is swept WORK_TTL_S after it was created (longer than any
# request can live). Pieces with no PLAN at all are dropped after ORPHAN_PIECE_TTL_S; a
# context whose PLAN is still loading is never swept (that load is bounded by its own timeout).
ORPHAN_PIECE_TTL_S = 30.0
# a tile predicted to compute within this runs on the event loop, not the compute thread:
# short enough for heartbeats and other requests, and it saves the thread's two wake-ups
INLINE_COMPUTE_S = 0.05


@dataclass
class WorkerContext:
    requester: str
    run: WorkerRun | None = None
    loaded: LoadedModel | None = None
    early: list[tuple[Message, float]] = field(default_factory=list)  # pieces before the plan
    path_in: dict[int, float] = field(default_factory=dict)  # block -> latest input path
    created: float = field(default_factory=time.monotonic)
    plan_pending: bool = False  # a PLAN arrived and its model is loading: not an orphan


class Worker:
    """Tiles and bids of one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.name = node.name
        self.runtime = node.runtime
        self.contexts: dict[int, WorkerContext] = {}
        self.bidder = Bidder(node.name, self._compute_s, node.link_s)
        # auction id -> (when this node's bidder first heard of it, its auctioneer): the
        # commitment is released, and the entry deleted, together and exactly once
        self.bid_auctions: dict[str, tuple[float, str]] = {}
        self.cancelled: dict[int, float] = {}  # request id -> when it was cancelled here

    def _compute_s(self, item: Any) -> float:
        return self.runtime.bid_compute_s(item, self.node.config.gflops)

    def requester_of(self, rid: int) -> str:
        ctx = self.contexts.get(rid)
        if ctx is not None:
            return ctx.requester
        bid = self.bid_auctions.get(str(rid))
        return bid[1] if bid is not None else ""

    # ---- PLAN ----------------------------------------------------------------------
    async def on_plan(self, sender: str, msg: Message) -> None:
        from meshci.node.server import REQUEST_TIMEOUT_S, RequestFailed

        rid = msg.request_id
        if rid in self.cancelled:
            log.info("dropping the PLAN of cancelled request %d", rid)
            return
        ctx = self.contexts.setdefault(rid, WorkerContext(sender))
        ctx.requester = sender
        ctx.plan_pending = True
        try:
            plan = Plan.from_json(msg.meta["plan"])
            if plan.requester != sender:
                raise ValueError(f"the plan names {plan.requester!r} as requester, it came from {sender!r}")
            size = tuple(int(v) for v in msg.meta["size"])
            check_model_allowed(str(msg.meta["model"]), self.node.config.allow_models)
            ctx.loaded = await asyncio.wait_for(
                self.runtime.load(str(msg.meta["model"]), int(msg.meta.get("seed", 0)),
                                  (size[0], size[1]), head=False), REQUEST_TIMEOUT_S)
            if self.contexts.get(rid) is not ctx:
                return  # cancelled while the model loaded
            ctx.run = WorkerRun(plan, self.name, ctx.loaded.geometry(plan))
        except (MeshciError, KeyError, TypeError, ValueError, RuntimeError, OSError, TimeoutError) as exc:
            # a plan this node cannot serve (bad plan, unknown model, the build helper
            # process failed or outlasted the request): tell the requester why, keep serving
            if isinstance(exc, TimeoutError):
                exc = RequestFailed(f"model build took over {REQUEST_TIMEOUT_S:.0f} s")
            await self.node.fail_request(rid, sender, f"{self.name} cannot serve the plan: {exc}")
            return
        finally:
            ctx.plan_pending = False
        early, ctx.early = ctx.early, []
        for piece, received_at in early:
            await self.on_piece(piece, received_at)

    # ---- pieces and tiles ------------------------------------------------------------
    async def on_piece(self, msg: Message, received_at: float) -> None:
        rid = msg.request_id
        if rid in self.cancelled:
            log.debug("dropping a piece of cancelled request %d", rid)
            return
        ctx = self.contexts.setdefault(rid, WorkerContext(""))
        if ctx.run is None:
            ctx.early.append((msg, received_at))
            return
        block = int(msg.meta["block"])
        region = Region.from_list(msg.meta["region"])
        (tensor,) = msg.tensors
        path = _path(msg, received_at)
        ctx.path_in[block] = max(ctx.path_in.get(block, 0.0), path)
        try:
            actions = ctx.run.on_piece(block, region, tensor)
        except RequestStateError as exc:
            # a piece that fits no tile of ours: the request is broken, tell its requester
            await self.node.fail_request(rid, ctx.requester, f"{self.name}: {exc}")
            return
        await self.node.execute(rid, actions, ctx.path_in[block])

    async def compute(self, rid: int, action: Compute, path_s: float, issued: float) -> None:
        ctx = self.contexts.get(rid)
        if ctx is None or ctx.run is None or ctx.loaded is None:
            return
        gflops = self.node.config.gflops
        # queued work outside any auction this node's bidder still holds (those it counts itself)
        predicted = self.runtime.tile_s(ctx.loaded, action.start, action.end, action.out, gflops)
        estimate = predicted if str(rid) not in self.bidder.auctions() else 0.0
        inline = predicted <= INLINE_COMPUTE_S
        self.runtime.queued_s += estimate
        try:
            y, seconds, handoff = await self.runtime.run_block(
                ctx.loaded.trunk, action.start, action.end, action.x, action.have, action.out,
                inline=inline)
        except (RuntimeError, ValueError, MeshciError) as exc:
            # a tile that cannot be computed (shape mismatch, out of memory): fail the request
            await self.node.fail_request(rid, ctx.requester, f"{self.name} failed a tile: {exc}")
            return
        finally:
            self.runtime.queued_s -= estimate
        # per-tile handling: inline, the wait for the loop to start the task; on the thread,
        # the hand-off there and back
        self.node.boundary.observe_handling(time.perf_counter() - issued - seconds if inline else handoff)
        if self.contexts.get(rid) is not ctx:
            return  # the request was cancelled while this tile computed: nobody wants it
        actions = ctx.run.on_computed(action.block, action.tile, y)
        if ctx.run.done:
            self.contexts.pop(rid, None)
            self.release_bid(str(rid))
        await self.node.execute(rid, actions, path_s + seconds)

    # ---- bids ----------------------------------------------------------------------
    def bidder_receive(self, rid: int, message: Any) -> list[Outgoing]:
        """A message for this node's bidder (CallForBids, Award, Close); its answers."""
        self.bidder.base_backlog_s = max(0.0, self.runtime.queued_s)
        if message.auction_id not in self.bid_auctions:
            if rid in self.cancelled:
                log.info("auction %d was cancelled: dropping a late %s", rid, type(message).__name__)
                return []
            self.bid_auctions[message.auction_id] = (time.monotonic(), message.sender)
        out = self.bidder.receive(message, time.monotonic())
        if isinstance(message, Close) and message.auction_id not in self.bidder.auctions():
            self.release_bid(message.auction_id)  # the auction is over and we won nothing
        return out

    def release_bid(self, auction_id: str) -> None:
        """Release this node's bidder commitment for an auction and forget the auction."""
        self.bidder.release(auction_id)
        self.bid_auctions.pop(auction_id, None)

    # ---- cancelling ----------------------------------------------------------------
    def cancel(self, rid: int, reason: str) -> None:
        """Forget every piece of worker-side state of a request that will not complete."""
        ctx = self.contexts.pop(rid, None)
        if ctx is not None or str(rid) in self.bid_auctions:
            log.info("request %d cancelled on %s: %s", rid, self.name, reason)
        self.release_bid(str(rid))
        self.cancelled[rid] = time.monotonic()

    def on_cancel(self, sender: str, rid: int, reason: str) -> None:
        """The requester of `rid` says it failed: drop its work here (only its requester may)."""
        ctx = self.contexts.get(rid)
        bid = self.bid_auctions.get(str(rid))
        if (ctx is not None and ctx.requester == sender) or (bid is not None and bid[1] == sender):
            self.cancel(rid, f"cancelled by {sender}: {reason}")
        elif ctx is None and bid is None:
            log.debug("cancel of request %d from %s: nothing of it here", rid, sender)
        else:
            log.warning("ignoring a cancel of request %d from %s, not its requester", rid, sender)

    def requester_down(self, name: str, reason: str) -> None:
        """Work for a requester that died will never be gathered: forget it and its commitments."""
        for rid, work in list(self.contexts.items()):
            if work.requester == name:
                self.cancel(rid, f"requester {name} is down: {reason}")
        for auction_id, (_since, auctioneer) in list(self.bid_auctions.items()):
            if auctioneer == name:
                self.release_bid(auction_id)

    def sweep(self, now: float) -> None:
        from meshci.node.server import WORK_TTL_S

        for auction_id, (since, _auctioneer) in list(self.bid_auctions.items()):
            if now - since > WORK_TTL_S:
                self.release_bid(auction_id)  # its request ended long ago, however it ended
        for rid, ctx in list(self.contexts.items()):
            age = now - ctx.created
            if ctx.run is None and not ctx.plan_pending and age > ORPHAN_PIECE_TTL_S:
                log.warning("dropping %d pieces of request %d: no plan arrived", len(ctx.early), rid)
                self.cancel(rid, "no plan arrived")
            elif age > WORK_TTL_S and not ctx.plan_pending:
                # no cancel reached us (lost with its requester's connection): the request is over
                self.cancel(rid, f"unfinished after {WORK_TTL_S:.0f} s")
        for rid, when in list(self.cancelled.items()):
            if now - when > WORK_TTL_S:
                del self.cancelled[rid]


def _path(msg: Message, received_at: float) -> float:
    """The critical path (compute + transfer) behind a piece: the sender's, plus its trip."""
    return float(msg.meta.get("path_s", 0.0)) + max(0.0, received_at - float(msg.meta.get("sent_at", received_at)))
