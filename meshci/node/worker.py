"""The worker side of a node: the tiles it computes for requests (its own included), the
head when the plan names it the head device, and its bidder in the requesters' auctions.

A request reaches a worker as one PLAN frame: the plan's digest (the plan itself the first
time this requester uses it with this node; plans are kept per requester and referred to
by digest after that), the model, seed and input size, and the pieces of the first block's
input this worker needs. Later pieces arrive in TILE frames, several per frame
(`meshci.node.pieces`). `WorkerRun` and `HeadRun` (`meshci.node.request`, pure) say when a
tile's input is complete, where its output goes and when the head can run; this module
loads the model, runs tiles on the runtime's compute thread and keeps the bidder's
commitments in step with the work.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from meshci.auction.bidder import Bidder
from meshci.auction.messages import Close, Outgoing
from meshci.errors import MeshciError
from meshci.models.registry import check_model_allowed
from meshci.node.fields import shown
from meshci.node.inputs import input_size, model_name, seed
from meshci.node.memory_budget import MemoryBudgetError, item_bytes, mb, plan_bytes, tile_peak_bytes
from meshci.node.model_cache import LOAD_TIMEOUT_S, LoadedModel
from meshci.node.oom import is_out_of_memory, tile_out_of_memory
from meshci.node.pieces import OrphanBudget, Piece, PieceFormatError, decode, nbytes
from meshci.node.recovery import deadline_s
from meshci.node.request import Compute, HeadRun, RequestStateError, RunHead, WorkerRun
from meshci.node.trace import Span
from meshci.planning import Plan
from meshci.wire import Message, MsgType, valid_name
from meshci.wire.errors import WireError

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
PLANS_PER_REQUESTER = 32  # plans kept per requester (it mirrors this: see `Requester`)
MAX_REQUESTERS = 64  # requesters whose plans are kept
MAX_EARLY_CANCELS = 4096  # cancels remembered for requests not seen yet
MAX_CONTEXTS = 1024  # requests (and orphan piece sets) held at once
MAX_BID_AUCTIONS = 256  # auctions this node's bidder takes part in at once
DEADLINE_GRACE_S = 2.0  # a request's state is dropped this long after its deadline
MAX_CANCELLED = 65536  # cancelled request ids remembered (their late PLANs and pieces refused)


@dataclass
class WorkerContext:
    requester: str
    run: WorkerRun | None = None
    head: HeadRun | None = None  # this node is the plan's head device
    loaded: LoadedModel | None = None
    check_input: torch.Tensor | None = None  # the request's input, for the head's --check
    early: list[tuple[str, list[Piece], float]] = field(default_factory=list)  # before the plan
    early_bytes: list[int] = field(default_factory=list)  # each early frame's bytes (`OrphanBudget`)
    path_in: dict[int, float] = field(default_factory=dict)  # block -> latest input path
    created: float = field(default_factory=time.monotonic)
    plan_pending: bool = False  # a PLAN arrived and its model is loading: not an orphan
    waiting_for_plan: Message | None = None  # a PLAN by digest we did not know: asked for it
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)  # its tile and head work here
    expires: float = math.inf  # its requester's deadline (PLAN `deadline_s`) plus a grace: dropped then
    reserved: int = 0  # bytes of this device's memory budget its tiles hold (`memory_budget`)

    def stop_work(self) -> None:
        """Cancel this request's queued or running tile and head work (a tile already on
        the compute thread finishes there; nobody waits for it)."""
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()

    @property
    def done(self) -> bool:
        return (self.run is not None and self.run.done) and (self.head is None or self.head.sent)


class Worker:
    """Tiles, head and bids of one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.name = node.name
        self.runtime = node.runtime
        self.contexts: dict[int, WorkerContext] = {}
        self.plans: OrderedDict[str, OrderedDict[str, Plan]] = OrderedDict()  # requester -> digest -> plan
        self.bidder = Bidder(node.name, self._compute_s, node.link_s, item_bytes=item_bytes,
                             memory_bytes=lambda: node.memory_budget_mb * 2**20)
        # auction id -> (when this node's bidder first heard of it, its auctioneer): the
        # commitment is released, and the entry deleted, together and exactly once
        self.bid_auctions: dict[str, tuple[float, str]] = {}
        self.cancelled: dict[int, float] = {}  # request id -> when it was cancelled here
        # cancels that came before anything of their request (a PLAN runs in a task, a cancel
        # inline): request id -> (who cancelled it, when); that sender's PLAN is then refused
        self.cancelled_early: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self.orphans = OrphanBudget()

    def _compute_s(self, item: Any) -> float:
        """A bid's compute time: the item's compute plus this node's measured per-tile overhead."""
        return self.runtime.bid_compute_s(item, self.node.config.gflops) + (self.node.boundary.handling_s or 0.0)

    def requester_of(self, rid: int) -> str:
        ctx = self.contexts.get(rid)
        if ctx is not None:
            return ctx.requester
        bid = self.bid_auctions.get(str(rid))
        return bid[1] if bid is not None else ""

    # ---- PLAN ----------------------------------------------------------------------
    async def on_plan(self, sender: str, msg: Message) -> None:
        from meshci.node.server import RequestFailed

        rid = msg.request_id
        early_cancel = self.cancelled_early.get(rid)
        if early_cancel is not None and early_cancel[0] == sender:
            self.cancel(rid, f"cancelled by {sender} before its PLAN arrived")
        if rid in self.cancelled:
            log.info("dropping the PLAN of cancelled request %d", rid)
            return
        if msg.meta.get("op") == "define":
            # the plan we asked for: keep it, then take the PLAN that named it
            self._plan_of(sender, msg.meta)
            ctx = self.contexts.get(rid)
            if ctx is None or ctx.waiting_for_plan is None or ctx.requester != sender:
                return
            msg, ctx.waiting_for_plan = ctx.waiting_for_plan, None
        if rid not in self.contexts and len(self.contexts) >= MAX_CONTEXTS:
            await self.node.fail_request(rid, sender, f"{self.name} already holds {MAX_CONTEXTS} requests")
            return
        ctx = self.contexts.setdefault(rid, WorkerContext(sender))
        if ctx.requester and ctx.requester != sender:
            # another node's request id: not this sender's to start (nor to fail)
            log.warning("ignoring a PLAN for request %d from %s: it belongs to %s", rid, shown(sender), ctx.requester)
            return
        ctx.requester = sender
        ctx.plan_pending = True
        try:
            plan = self._plan_of(sender, msg.meta)
            if plan is None:
                # a plan by digest that we no longer hold: ask the requester for it
                ctx.waiting_for_plan = msg
                try:
                    await self.node.send_to(sender, Message(MsgType.PLAN, rid, {
                        "op": "need_plan", "digest": str(msg.meta["digest"])[:64]}))
                except WireError as exc:
                    # a sender we cannot dial back (a client posing as a requester): drop it
                    log.info("request %d: cannot ask %s for its plan: %s", rid, shown(sender), exc)
                    self.cancel(rid, "its requester cannot be reached")
                return
            if plan.requester != sender:
                raise ValueError(f"the plan names {plan.requester!r} as requester, it came from {sender!r}")
            # everything checked before the model is built at the size the PLAN names
            size, model = input_size(msg.meta.get("size")), model_name(msg.meta.get("model"))
            if tuple(plan.input_shape[1:]) != size or plan.model != model:
                raise ValueError(f"the plan is for {plan.model} at {plan.input_shape[1:]}, "
                                 f"the PLAN asks {shown(model)} at {size}")
            if "deadline_s" in msg.meta:
                ctx.expires = time.monotonic() + deadline_s(msg.meta["deadline_s"]) + DEADLINE_GRACE_S
            pieces = decode(msg.meta, msg.tensors)
            if "shipped" in msg.meta:  # a model its requester shipped here (`meshci.node.shipping`)
                load = self.node.shipping.load(msg.meta, plan, model, seed(msg.meta.get("seed", 0)), size)
            else:
                check_model_allowed(model, self.node.config.allow_models)
                load = self.runtime.load(model, seed(msg.meta.get("seed", 0)), size)
            loaded = await asyncio.wait_for(load, LOAD_TIMEOUT_S)
            if self.contexts.get(rid) is not ctx:
                return  # cancelled while the model loaded
            ctx.loaded = loaded
            ctx.reserved = self._reserve(rid, plan, loaded)
            geometry = loaded.geometry(plan)
            ctx.run = WorkerRun(plan, self.name, geometry)
            head = plan.head_plan
            mine_last = any(t.device == self.name for t in plan.blocks[-1].tiles)
            if head.device == self.name:
                ctx.head = HeadRun(plan, geometry, loaded.split_features() if head.split else None)
            if head.device == self.name or (head.split and mine_last):
                self.node.spawn(self.runtime.head(loaded))  # map the head in before it is needed
        except (MeshciError, KeyError, TypeError, ValueError, RuntimeError, OSError, TimeoutError,
                PieceFormatError) as exc:
            # a plan this node cannot serve (bad plan, unknown model, the build helper
            # process failed or outlasted the request): tell the requester why, keep serving
            if isinstance(exc, TimeoutError):
                exc = RequestFailed(f"model build took over {LOAD_TIMEOUT_S:.0f} s")
            await self.node.fail_request(rid, sender, f"{self.name} cannot serve the plan: {exc}")
            return
        finally:
            ctx.plan_pending = False
        early = self._release_early(ctx)
        await self._take(rid, ctx, sender, pieces, 0.0)
        for peer, later, path in early:
            await self._take(rid, ctx, peer, later, path)
        self._finish_if_done(rid, ctx)

    def _reserve(self, rid: int, plan: Plan, loaded: LoadedModel) -> int:
        """The bytes of this device's memory budget the plan's tiles need here; refused
        (MemoryBudgetError) when they do not fit what the other requests leave."""
        need = plan_bytes(loaded.trunk, plan, self.name)
        held = sum(c.reserved for r, c in self.contexts.items() if r != rid)
        budget = self.node.memory_budget_mb * 2**20
        if need + held > budget:
            raise MemoryBudgetError(f"its tiles need {mb(need)}, over its memory budget of {mb(budget)} "
                                    f"({mb(held)} held by other requests; --memory-mb)")
        return need

    def _plan_of(self, sender: str, meta: dict[str, Any]) -> Plan | None:
        """The plan a PLAN frame refers to (kept per requester by digest), or None when it
        comes by a digest this node does not hold."""
        digest = meta["digest"]
        if not isinstance(digest, str) or not 0 < len(digest) <= 64:
            raise ValueError("a PLAN needs the plan's digest")
        kept = self.plans.get(sender)
        if "plan" in meta:
            plan = Plan.from_json(meta["plan"])
            if not all(valid_name(device) for device in plan.devices):
                raise ValueError("a plan from a peer names devices that are not node names")
            if plan.digest() != digest:
                raise ValueError(f"the plan's digest is {plan.digest()}, the frame says {digest}")
            if kept is None:
                kept = self.plans[sender] = OrderedDict()
                while len(self.plans) > MAX_REQUESTERS:
                    self.plans.popitem(last=False)
            kept[digest] = plan
            while len(kept) > PLANS_PER_REQUESTER:
                kept.popitem(last=False)
        if kept is None or digest not in kept:
            return None
        kept.move_to_end(digest)
        self.plans.move_to_end(sender)
        return kept[digest]

    # ---- pieces and tiles ------------------------------------------------------------
    async def on_pieces(self, rid: int, sender: str, pieces: list[Piece], path: float) -> None:
        """Pieces of a request's maps for this node's tiles or head."""
        if rid in self.cancelled:
            log.debug("dropping a piece of cancelled request %d", rid)
            return
        ctx = self.contexts.get(rid)
        if ctx is None or ctx.run is None:
            size = nbytes(pieces)
            refused = self.orphans.admit(sender, size) if ctx is not None or len(self.contexts) < MAX_CONTEXTS \
                else f"{self.name} already holds {MAX_CONTEXTS} requests"
            if refused is not None:
                log.warning("dropping pieces of request %d that has no plan here: %s", rid, refused)
                return
            ctx = ctx or self.contexts.setdefault(rid, WorkerContext(""))
            ctx.early.append((sender, pieces, path))
            ctx.early_bytes.append(size)
            return
        await self._take(rid, ctx, sender, pieces, path)
        self._finish_if_done(rid, ctx)

    async def _take(self, rid: int, ctx: WorkerContext, sender: str, pieces: list[Piece], path: float) -> None:
        assert ctx.run is not None
        actions: list[Any] = []
        try:
            for piece in pieces:
                if not self._from_producer(ctx, sender, piece):
                    # whoever knows a request id could otherwise inject (or fail) its maps
                    log.warning("request %d: ignoring a %s piece of block %d from %s, which the plan "
                                "does not say produces it", rid, piece.stage, piece.block, shown(sender))
                    continue
                if piece.stage == "tile":
                    ctx.path_in[piece.block] = max(ctx.path_in.get(piece.block, 0.0), path)
                    actions += ctx.run.on_piece(piece.block, piece.region, piece.tensor)
                elif piece.stage == "sum":
                    actions += ctx.run.on_sum(piece.block, piece.region, piece.tensor)
                elif piece.stage == "input":
                    ctx.check_input = piece.tensor
                elif ctx.head is None:
                    raise RequestStateError(f"{self.name} is not the head device of this request")
                elif piece.stage == "partial":
                    actions += ctx.head.on_partial(piece.region, piece.tensor)
                elif piece.stage == "output":
                    actions += ctx.head.on_output(piece.region, piece.tensor)
                else:
                    raise RequestStateError(f"a {piece.stage} piece is not for a worker")
        except RequestStateError as exc:
            # a piece that fits no tile of ours: the request is broken, tell its requester
            await self.node.fail_request(rid, ctx.requester, f"{self.name}: {exc}")
            return
        await self.node.execute(rid, actions, path)

    def _from_producer(self, ctx: WorkerContext, sender: str, piece: Piece) -> bool:
        """A piece is accepted only from who the plan says produces it."""
        assert ctx.run is not None
        plan = ctx.run.plan
        if piece.stage in ("tile", "input") and (piece.block == 0 or plan.routing == "requester"
                                                 or piece.stage == "input"):
            allowed: set[str] = {plan.requester}
        elif piece.stage in ("tile", "sum"):
            if not 0 < piece.block < len(plan.blocks):
                return False  # no device produces a block the plan does not have
            allowed = set(plan.blocks[piece.block - 1].devices)
        else:
            allowed = set(plan.blocks[-1].devices)
        return sender in allowed

    async def compute(self, rid: int, action: Compute, path_s: float, issued: float) -> None:
        ctx = self.contexts.get(rid)
        if ctx is None or ctx.run is None or ctx.loaded is None:
            return
        await _tracked(ctx, self._compute(rid, ctx, action, path_s, issued))

    async def _compute(self, rid: int, ctx: WorkerContext, action: Compute, path_s: float, issued: float) -> None:
        assert ctx.run is not None and ctx.loaded is not None
        gflops = self.node.config.gflops
        # queued work outside any auction this node's bidder still holds (those it counts itself)
        predicted = self.runtime.tile_s(ctx.loaded, action.start, action.end, action.out, gflops)
        estimate = predicted if str(rid) not in self.bidder.auctions() else 0.0
        inline = predicted <= INLINE_COMPUTE_S
        then: Callable[[torch.Tensor], torch.Tensor] | None = None
        head_s = [0.0]  # of the seconds below, the split head's partial sums (not the tile's speed)
        if action.partial:
            split = (await self.runtime.head(ctx.loaded)).split
            if split is None:
                raise RequestStateError(f"the plan splits the head of {ctx.loaded.trunk.name}, which cannot be split")

            def partial(y: torch.Tensor) -> torch.Tensor:  # runs with the tile, timed apart from it
                began = time.perf_counter()
                out = split.partial(action.out, y)
                head_s[0] = time.perf_counter() - began
                return out
            then = partial
        self.runtime.queued_s += estimate
        try:
            y, seconds, handoff = await self.runtime.run_block(
                ctx.loaded.trunk, action.start, action.end, action.x, action.have, action.out,
                inline=inline, then=then, owner=(ctx.requester, rid, ctx.created), mean=action.mean)
        except (RuntimeError, ValueError, MeshciError, MemoryError) as exc:
            # a tile that cannot be computed (shape mismatch, out of memory): fail the request
            reason = tile_out_of_memory(self.name, action.block, action.out, tile_peak_bytes(
                ctx.loaded.trunk, action.start, action.end, action.out)) if is_out_of_memory(exc) \
                else f"{self.name} failed a tile: {exc}"
            await self.node.fail_request(rid, ctx.requester, reason)
            return
        finally:
            self.runtime.queued_s -= estimate
        # the time of the tile alone: a sample of this device's speed
        self.runtime.observe_tile(ctx.loaded, action.start, action.end, action.out, seconds - head_s[0])
        # per-tile handling: inline, the wait for the loop to start the task; on the thread,
        # the hand-off there and back
        self.node.boundary.observe_handling(time.perf_counter() - issued - seconds if inline else handoff)
        self.node.trace.record(rid, Span(f"block {action.block} tile {action.tile}", "compute",
                                         time.time() - seconds, seconds,
                                         {"block": action.block, "tile": action.tile, "rows": [action.out.r0, action.out.r1]}))
        if self.contexts.get(rid) is not ctx:
            return  # the request was cancelled while this tile computed: nobody wants it
        actions = ctx.run.on_computed(action.block, action.tile, y)
        await self.node.execute(rid, actions, path_s + seconds)
        self._finish_if_done(rid, ctx)

    async def run_head(self, rid: int, action: RunHead, path_s: float) -> None:
        """The head device: the logits (and, for --check, the difference from the whole
        model on the input) to the requester."""
        ctx = self.contexts.get(rid)
        if ctx is None or ctx.loaded is None or ctx.head is None:
            return
        await _tracked(ctx, self._run_head(rid, ctx, action, path_s))

    async def _run_head(self, rid: int, ctx: WorkerContext, action: RunHead, path_s: float) -> None:
        assert ctx.loaded is not None and ctx.head is not None
        began = time.perf_counter()
        head = await self.runtime.head(ctx.loaded)
        if action.split:
            assert head.split is not None
            logits = await self.runtime.call(head.split.finish, action.input, owner=(ctx.requester, rid, ctx.created))
        else:
            logits = await self.runtime.call(head.run, action.input, owner=(ctx.requester, rid, ctx.created))
        head_s = time.perf_counter() - began
        self.node.trace.record(rid, Span("head", "head", time.time() - head_s, head_s, {"split": action.split}))
        check: dict[str, Any] = {}
        if ctx.check_input is not None:
            name, seed, h, w = ctx.loaded.key
            reference = await self.runtime.reference(name, seed, (h, w))
            expected = await self.runtime.call(reference.trunk.forward, ctx.check_input,
                                               owner=(ctx.requester, rid, ctx.created))
            check = {"max_abs_diff": float((expected - logits).abs().max()),
                     "check_ok": bool(torch.allclose(logits, expected, rtol=1e-4, atol=1e-5))}
        if self.contexts.get(rid) is not ctx:
            return  # cancelled meanwhile
        ctx.head.sent = True
        await self.node.deliver_logits(rid, ctx.requester, logits.reshape(1, -1),
                                       {"head_s": head_s, "head_device": self.name, **check},
                                       path_s + head_s)
        self._finish_if_done(rid, ctx)

    def _finish_if_done(self, rid: int, ctx: WorkerContext) -> None:
        if ctx.done and self.contexts.get(rid) is ctx:
            self.contexts.pop(rid, None)
            self.release_bid(str(rid))

    # ---- bids ----------------------------------------------------------------------
    def bidder_receive(self, rid: int, message: Any) -> list[Outgoing]:
        """A message for this node's bidder (CallForBids, Award, Close); its answers."""
        self.bidder.base_backlog_s = max(0.0, self.runtime.queued_s)
        if message.auction_id not in self.bid_auctions:
            if rid in self.cancelled:
                log.info("auction %d was cancelled: dropping a late %s", rid, type(message).__name__)
                return []
            if message.sender != self.name and not self.node.membership.is_alive(message.sender):
                # auctioneers are mesh nodes: a client's call for bids would hold commitments
                log.warning("dropping a %s from %s, not a live peer", type(message).__name__, shown(message.sender))
                return []
            if len(self.bid_auctions) >= MAX_BID_AUCTIONS:
                log.warning("dropping a %s from %s: already in %d auctions", type(message).__name__,
                            shown(message.sender), MAX_BID_AUCTIONS)
                return []
            self.bid_auctions[message.auction_id] = (time.monotonic(), message.sender)
        out = self.bidder.receive(message, time.monotonic())
        if isinstance(message, Close):
            self.node.metrics.auction_ended(won=bool(message.item_ids))
        if isinstance(message, Close) and message.auction_id not in self.bidder.auctions():
            self.release_bid(message.auction_id)  # the auction is over and we won nothing
        return out

    def release_bid(self, auction_id: str) -> None:
        """Release this node's bidder commitment for an auction and forget the auction."""
        self.bidder.release(auction_id)
        self.bid_auctions.pop(auction_id, None)

    # ---- cancelling ----------------------------------------------------------------
    def _release_early(self, ctx: WorkerContext) -> list[tuple[str, list[Piece], float]]:
        """The pieces that waited for the plan, handed over and no longer counted as orphans."""
        early, ctx.early = ctx.early, []
        for (sender, _, _), size in zip(early, ctx.early_bytes):
            self.orphans.release(sender, size)
        ctx.early_bytes = []
        return early

    def cancel(self, rid: int, reason: str, *, quiet: bool = False) -> None:
        """Forget every piece of worker-side state of a request that will not complete
        (`quiet`: an expected end, such as a standing auction's close)."""
        ctx = self.contexts.pop(rid, None)
        if ctx is not None:
            ctx.stop_work()
            self._release_early(ctx)
        if ctx is not None or str(rid) in self.bid_auctions:
            log.log(logging.DEBUG if quiet else logging.INFO, "request %d cancelled on %s: %s",
                    rid, self.name, reason)
        self.release_bid(str(rid))
        self.cancelled[rid] = time.monotonic()
        while len(self.cancelled) > MAX_CANCELLED:
            del self.cancelled[next(iter(self.cancelled))]  # the oldest: its request is long over

    def on_cancel(self, sender: str, rid: int, reason: str, *, quiet: bool = False) -> None:
        """The requester of `rid` says it failed: drop its work here (only its requester may)."""
        ctx = self.contexts.get(rid)
        bid = self.bid_auctions.get(str(rid))
        if (ctx is not None and ctx.requester == sender) or (bid is not None and bid[1] == sender):
            self.cancel(rid, f"cancelled by {sender}: {reason}", quiet=quiet)
        elif (ctx is None or ctx.requester == "") and bid is None:
            # nothing of it here yet (its PLAN may still be on the way): remember who
            # cancelled it, so that requester's PLAN for it is refused when it comes
            log.debug("cancel of request %d from %s before its PLAN", rid, sender)
            self.cancelled_early[rid] = (sender, time.monotonic())
            while len(self.cancelled_early) > MAX_EARLY_CANCELS:
                self.cancelled_early.popitem(last=False)
        else:
            log.warning("ignoring a cancel of request %d from %s, not its requester", rid, sender)

    def with_device(self, name: str) -> list[tuple[int, str]]:
        """(request id, requester) of the requests held here whose plan has `name` as one
        of its devices (not as their requester): its connection lost, frames between us may
        be lost with it, so each of those requesters must hear it (`Node._connection_lost`)."""
        return [(rid, ctx.requester) for rid, ctx in self.contexts.items()
                if ctx.run is not None and ctx.requester not in ("", name) and name in ctx.run.plan.devices]

    def requester_down(self, name: str, reason: str) -> None:
        """Work for a requester that died will never be gathered: forget it and its commitments."""
        for rid, work in list(self.contexts.items()):
            if work.requester == name:
                self.cancel(rid, f"requester {name} is down: {reason}")
        for auction_id, (_since, auctioneer) in list(self.bid_auctions.items()):
            if auctioneer == name:
                self.release_bid(auction_id)
        self.plans.pop(name, None)

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
            elif now > ctx.expires and not ctx.plan_pending:
                # its requester answered its client by the deadline: nobody waits for it now
                self.cancel(rid, "its deadline passed")
            elif age > WORK_TTL_S and not ctx.plan_pending:
                # no cancel reached us (lost with its requester's connection): the request is over
                self.cancel(rid, f"unfinished after {WORK_TTL_S:.0f} s")
        for rid, when in list(self.cancelled.items()):
            if now - when > WORK_TTL_S:
                del self.cancelled[rid]
        while self.cancelled_early and now - next(iter(self.cancelled_early.values()))[1] > WORK_TTL_S:
            self.cancelled_early.popitem(last=False)


async def _tracked(ctx: WorkerContext, work: Any) -> None:
    """Run `work` as part of request `ctx`'s work here (cancelled with the request)."""
    task = asyncio.current_task()
    assert task is not None
    ctx.tasks.add(task)
    try:
        await work
    finally:
        ctx.tasks.discard(task)


__all__ = ["Worker", "WorkerContext"]
