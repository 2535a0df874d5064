"""The requester side of a node: a request from a client, from plan to answer.

The node that receives an INFER is that request's requester and auctioneer. Nothing but
sending the first tiles stands between a warm request and its compute:

* **Standing plans.** A plan is made once per model, input size, strategy and set of
  devices (DPFL, `meshci.planning`; the first request waits for it) and kept. It is made
  again in the background when the measured links or the learned compute ratios move by a
  step (`LINK_STEP`, `RATIO_STEP`), never dropped after a fixed time.
* **Standing awards.** For `edgeci` the network auction (AWAS, `meshci.node.auction`)
  runs in the background: its award is the layout later requests use, and it is run
  again when a bidder's state (backlog, links, curves) moves by a step. Bids stand until
  the bidder's situation changes; no request waits for an auction round.
* **Plans by digest.** A peer gets a plan's JSON once (`Worker` keeps it per requester);
  afterwards the PLAN frame names its digest and carries the peer's first-block pieces.
* **The head elsewhere.** The plan's head device (`HeadPlan`) runs the head, split or
  whole; the requester gets the logits (and the check, for ``--check``).
* **Learning after the answer.** The calibration of the live cost model from the
  request's measured time runs after the client has its answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from meshci.auction.errors import AuctionError
from meshci.auction.messages import Outgoing
from meshci.cost.cluster import Cluster
from meshci.errors import MeshciError, PlanningError
from meshci.models.registry import check_model_allowed
from meshci.node.auction import NetworkAuction, auction_items, awarded_plan
from meshci.node.attempts import before_deadline, run_attempts
from meshci.node.fields import shown
from meshci.node.inputs import MAX_INPUT_SIDE, InferRequest, head_report, parse_infer, request_input
from meshci.node.latency import PlanCalibration, plan_hops
from meshci.node.memory_budget import MemoryFit
from meshci.node.model_cache import LOAD_TIMEOUT_S, LoadedModel
from meshci.node.pieces import encode as encode_pieces
from meshci.node.recovery import MIN_DEADLINE_S, BackOff, DeviceLost, Recovery
from meshci.node.request import RequesterRun, RequestStateError, SendPiece, cluster_from_view, device_signature
from meshci.node.standing import (
    AUCTION_MIN_S,
    REPLAN_MIN_S,
    STANDING_PLANS,
    Standing,
    _bidder_signature,
    _distributed,
    _ratio_signature,
    _shares,
    judged_award,
)
from meshci.node.trace import Span, request_phases, wall_of
from meshci.planning import Plan, make_plan
from meshci.planning.evaluate import evaluate_plan
from meshci.trunk import Region
from meshci.wire import Connection, Message, MsgType
from meshci.wire.errors import LocalProtocolError, WireError

if TYPE_CHECKING:
    from meshci.node.server import Node

log = logging.getLogger(__name__)

CALIBRATE_MIN_S = 2.0  # a plan's prediction is computed again for a moved view at most this often
PLANS_PER_PEER = 32  # plans a peer keeps from us (mirrors `worker.PLANS_PER_REQUESTER`)


@dataclass
class RequesterContext:
    run: RequesterRun
    loaded: LoadedModel
    done: asyncio.Future[tuple[torch.Tensor, dict[str, Any]]]  # logits, the head's report
    devices: frozenset[str]
    head_device: str
    messages: dict[str, Message] = field(default_factory=dict)  # PLAN frame per peer
    path_s: float = 0.0  # critical path (compute + transfer) of the logits
    shipped: dict[str, str] = field(default_factory=dict)  # device -> package it runs (`shipping`)


class Requester:
    """The requests this node serves as requester (and their auctions)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.name = node.name
        self.runtime = node.runtime
        self.contexts: dict[int, RequesterContext] = {}
        self.auctions: dict[int, tuple[NetworkAuction, asyncio.Event]] = {}
        self.standing: OrderedDict[tuple[Any, ...], Standing] = OrderedDict()
        self._items: dict[str, list[Any]] = {}  # plan digest -> its auction items
        # per peer (and its incarnation): digests of the plans it holds from us, in the
        # order it keeps them (the same bound and order, so we know what it has)
        self._sent_plans: dict[tuple[str, int], OrderedDict[str, None]] = {}
        self.calibration = PlanCalibration()  # learned from this node's own completed requests
        self.memory = MemoryFit()  # peers a model's plans do not fit (`meshci.node.memory_budget`)
        self._warm: set[tuple[str, str, int, tuple[int, int]]] = set()  # (device, model, seed, size) built
        self._predicted: dict[tuple[str, Any], tuple[float, float]] = {}  # calibration predictions
        self._curves_seen: dict[str, int] = {}  # device -> hash of the curves last planned with
        self._evaluated_at: dict[str, float] = {}  # plan digest -> when its prediction was last computed
        self.requests_served = 0
        self.backoff = BackOff()  # devices that failed requests recently, avoided for a while

    # ---- serving a client ------------------------------------------------------------
    async def on_infer(self, conn: Connection, msg: Message) -> bool:
        """Serve one INFER; whether it was answered with a RESULT."""
        from meshci.node.server import RequestFailed

        node = self.node
        try:
            meta, logits, learn = await self.infer(msg)
        except (RequestFailed, MeshciError, RequestStateError, ValueError, TypeError, KeyError) as exc:
            # the request cannot be served (unknown model, bad size, a device failed):
            # the client gets the reason, the node keeps serving
            log.warning("request %d failed: %s", msg.request_id, exc)
            await node.reply_error(conn, msg.request_id, str(exc), usage=_is_usage_error(exc))
            return False
        except Exception as exc:  # noqa: BLE001
            # a bug in some part (planner, auction, model code) must not leave the client
            # waiting or stop the node: log the traceback, answer with the reason
            log.exception("request %d failed with an internal error", msg.request_id)
            await node.reply_error(conn, msg.request_id, f"internal error: {type(exc).__name__}: {exc}")
            return False
        self.requests_served += 1
        try:
            await node.connections.send(conn, Message(MsgType.RESULT, msg.request_id, meta, (logits,)))
        except LocalProtocolError as exc:
            # a result that cannot be framed (a non-finite figure): the client still hears why
            log.error("request %d: unencodable result: %s", msg.request_id, exc)
            await node.reply_error(conn, msg.request_id, f"internal error: unencodable result: {exc}")
            return False
        except WireError as exc:
            # the client hung up before its answer: nobody to tell
            log.info("request %d: cannot answer the client: %s", msg.request_id, exc)
        # after the answer (the client does not wait for it), and after this returns (the
        # node's request latency metric ends with the answer)
        asyncio.get_running_loop().call_soon(learn)
        return True

    async def infer(self, msg: Message) -> tuple[dict[str, Any], torch.Tensor, Callable[[], None]]:
        node = self.node
        began = time.perf_counter()
        asked = parse_infer(msg.meta, msg.tensors)
        recovery = Recovery(time.monotonic() + asked.deadline_s, asked.deadline_s)
        model, seed, strategy, x = asked.model, asked.seed, asked.strategy, asked.x
        check_model_allowed(model, node.config.allow_models)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        # the build helper stuck, or the model too large for this node
        loaded = await before_deadline(recovery, self.runtime.load(model, seed, size),
                                       f"building {model} at {size[0]}x{size[1]}", LOAD_TIMEOUT_S)
        loaded_at = time.perf_counter()
        done = await run_attempts(self, recovery, asked, loaded, size)
        plan, standing, raw_cluster, ctx, rid = done.plan, done.standing, done.raw_cluster, done.ctx, done.rid
        logits, head, planned_at, sent_at = done.logits, done.head, done.planned_at, done.sent_at
        shipped_bytes = done.shipped_bytes
        devices = plan.devices
        done_at = time.perf_counter()
        digest = plan.digest()
        shares = standing.shares.get(digest)
        if shares is None:
            shares = standing.shares[digest] = _shares(loaded.flops, plan)
        probs = torch.softmax(logits.flatten(), 0)
        top = torch.topk(probs, min(5, probs.numel()))
        result: dict[str, Any] = {
            "model": model,
            "strategy": strategy,
            "requester": self.name,
            "latency_s": done_at - began,
            "load_s": loaded_at - began,
            "planning_s": planned_at - loaded_at,
            "execution_s": done_at - sent_at,
            "head_s": float(head.get("head_s", 0.0)),
            "head_device": ctx.head_device,
            "head_split": plan.head_plan.split,
            "critical_path_s": ctx.path_s,
            "top5": [[int(i), float(p)] for p, i in zip(top.values, top.indices)],
            "devices": list(devices),
            "shares": shares,
            "auction_rounds": plan.auction_rounds,
            "auction": standing.award_note if plan is standing.awarded else "none",
            "routing": plan.routing,
            "blocks": len(plan.blocks),
            "predicted_latency_s": plan.predicted_latency_s,
            "attempts": recovery.attempt,  # more than 1: devices were lost and it ran again
            "lost": list(recovery.lost),
        }
        for name in ("max_abs_diff", "check_ok"):
            if name in head:
                result[name] = head[name]
        if shipped_bytes:  # the model's code and weights this request shipped, per device
            result["shipped_bytes"] = shipped_bytes
        if asked.details:
            result["plan"] = plan.to_json()
        result["trace_id"] = rid  # `meshci infer --trace`: each device's spans of it
        for span in request_phases(*(wall_of(t) for t in (began, loaded_at, planned_at, sent_at, done_at)),
                                   result["auction"], plan.auction_rounds):
            node.trace.record(rid, span)

        def learn() -> None:
            self._calibrate(model, seed, size, loaded.trunk, raw_cluster, plan, list(devices), done_at - sent_at)

        return result, logits, learn

    def _clusters(self, model: str, size: tuple[int, int], strategy: str,
                  leave_out: set[str]) -> tuple[Cluster, Cluster]:
        """The live mesh as the planner sees it (less `leave_out`): raw (the peers' adverts) and
        corrected with what this node learned from its own requests (every strategy plans on the latter)."""
        node = self.node
        peers = [p for p in node.membership.alive() if p.name not in leave_out]
        now = time.monotonic()
        heard = node.gossip.advert_heard
        ages = {p.name: now - heard[p.name] for p in peers if p.name in heard}
        raw = cluster_from_view(self.name, node.advert(), peers, node.config.default_link,
                                model=model, size=size, advert_age_s=ages)
        for device in raw.devices:
            # a device that corrected its own curves (it computes at another speed than it
            # measured): what this node learned of its compute ratio was against the old ones
            seen = hash(device.curves)
            if self._curves_seen.get(device.name, seen) != seen:
                self.calibration.compute_ratio.pop(device.name, None)
            self._curves_seen[device.name] = seen
        return raw, self.calibration.apply(raw, strategy)

    async def start(self, rid: int, ctx: RequesterContext, plan: Plan, asked: InferRequest,
                    size: tuple[int, int], deadline_s: float) -> None:
        """Send every device of the plan its PLAN frame with its first-block pieces (the
        plan itself only to peers that do not hold it yet) and the seconds left before the
        request's deadline; ourselves last. DeviceLost when a device cannot be reached."""
        x, model, seed, check = asked.x, asked.model, asked.seed, asked.check
        first: dict[str, list[SendPiece]] = defaultdict(list)
        for action in ctx.run.start(x):
            if isinstance(action, SendPiece):
                first[action.dest].append(action)
        digest = plan.digest()
        head_device = plan.head_plan.device
        order = sorted(ctx.devices, key=lambda d: d == self.name)
        for device in order:
            pieces = [(a.block, a.region, a.stage, a.tensor) for a in first.get(device, [])]
            if check and device == head_device:
                pieces.append((0, Region(0, size[0], 0, size[1]), "input", x))
            listed, tensors = encode_pieces(pieces)
            meta: dict[str, Any] = {"digest": digest, "model": model, "seed": seed, "size": list(size),
                                    "pieces": listed, "deadline_s": max(MIN_DEADLINE_S, deadline_s)}
            if not self._holds(device, digest):
                meta["plan"] = plan.to_json()
            if device in ctx.shipped:
                meta["shipped"] = ctx.shipped[device]
            if device == self.name:
                await self.node.worker.on_plan(self.name, Message(MsgType.PLAN, rid, meta, tensors))
                continue
            ctx.messages[device] = Message(MsgType.PLAN, rid, meta, tensors)
            began = time.time()
            try:
                await self.node.send_to(device, ctx.messages[device])
            except WireError as exc:
                raise DeviceLost(device, f"cannot send it its PLAN: {exc}") from exc
            self.node.trace.record(rid, Span(f"plan and input to {device}", "send", began, time.time() - began,
                                             {"to": device, "pieces": len(pieces)}))
            self._sent(device, digest)

    def _mirror(self, device: str) -> OrderedDict[str, None]:
        peer = self.node.membership.peer(device)
        incarnation = peer.incarnation if peer is not None else 0
        key = (device, incarnation)
        mirror = self._sent_plans.get(key)
        if mirror is None:
            for old in [k for k in self._sent_plans if k[0] == device]:
                del self._sent_plans[old]  # a restarted peer holds none of our plans
            mirror = self._sent_plans[key] = OrderedDict()
        return mirror

    def _holds(self, device: str, digest: str) -> bool:
        """Whether `device` keeps the plan `digest` from us (we mirror its bounded store)."""
        if device == self.name:
            kept = self.node.worker.plans.get(self.name)
            return kept is not None and digest in kept
        return digest in self._mirror(device)

    def _sent(self, device: str, digest: str) -> None:
        mirror = self._mirror(device)
        mirror[digest] = None
        mirror.move_to_end(digest)
        while len(mirror) > PLANS_PER_PEER:
            mirror.popitem(last=False)

    async def on_need_plan(self, sender: str, msg: Message) -> None:
        """A peer got a PLAN by a digest it no longer holds: send it the plan."""
        ctx = self.contexts.get(msg.request_id)
        if ctx is None or sender not in ctx.devices:
            log.info("need_plan for request %d from %s: not ours (any more)", msg.request_id, sender)
            return
        plan = ctx.run.plan
        if msg.meta.get("digest") != plan.digest():
            log.warning("need_plan from %s names a digest request %d does not use", sender, msg.request_id)
            return
        log.info("%s no longer holds plan %s: sending it again", sender, plan.digest())
        self._sent_plans.pop((sender, self._incarnation(sender)), None)
        try:
            await self.node.send_to(sender, Message(MsgType.PLAN, msg.request_id, {
                "op": "define", "digest": plan.digest(), "plan": plan.to_json()}))
        except WireError as exc:
            # the peer is gone: the request fails by its own path (peer down, deadline)
            log.info("cannot send plan of request %d to %s: %s", msg.request_id, sender, exc)
            return
        self._sent(sender, plan.digest())

    def _incarnation(self, device: str) -> int:
        peer = self.node.membership.peer(device)
        return peer.incarnation if peer is not None else 0

    # ---- pieces and answers ----------------------------------------------------------
    async def on_gather(self, rid: int, sender: str, block: int, region: Region, tensor: torch.Tensor,
                        path: float) -> None:
        """A boundary piece to re-scatter (requester routing)."""
        req = self.contexts.get(rid)
        if req is None:
            log.info("dropping a gathered piece of finished or unknown request %d", rid)
            return
        plan = req.run.plan
        if not 0 < block < len(plan.blocks) or sender not in plan.blocks[block - 1].devices:
            # whoever knows a request id could otherwise inject (or fail) its boundary maps
            log.warning("request %d: ignoring a gathered piece of block %d from %s, which the plan "
                        "does not say produces it", rid, block, shown(sender))
            return
        try:
            actions = req.run.on_gather(block, region, tensor)
        except RequestStateError as exc:
            # a gathered piece that fits nothing: the request cannot complete
            await self.node.fail_request(rid, self.name, f"bad piece from a worker: {exc}")
            return
        await self.node.execute(rid, actions, path)

    def on_logits(self, rid: int, sender: str, logits: torch.Tensor, head: Any, path: float) -> None:
        """The head device's answer."""
        req = self.contexts.get(rid)
        if req is None:
            log.info("dropping the logits of finished or unknown request %d", rid)
            return
        if sender != req.head_device:
            log.warning("ignoring logits of request %d from %r, not its head device", rid, sender)
            return
        report = head_report(head)
        if report is None:
            self.fail(rid, f"{sender} sent a malformed head report")
            return
        req.path_s = path
        if not req.done.done():
            req.done.set_result((logits, report))

    def fail(self, rid: int, reason: str, *, lost: str | None = None) -> bool:
        """Fail request `rid`'s attempt if this node is its requester; whether it was.
        `lost`: a device of the attempt that cannot be reached (the attempt is run again
        without it, `attempts.run_attempts`); otherwise the request fails with `reason`."""
        from meshci.node.server import RequestFailed

        req = self.contexts.get(rid)
        if req is None:
            return False
        if not req.done.done():
            if lost is not None and lost in req.devices and lost != self.name:
                # `lost` may be the sender itself (it lost its link to us and dropped its work)
                req.done.set_exception(DeviceLost(lost, reason))
            else:
                req.done.set_exception(RequestFailed(reason))
        return True

    def on_error(self, sender: str, rid: int, reason: str, lost: str | None = None) -> None:
        """An ERROR about a request from a peer: only one of its devices may fail it (and
        say which other device of it it cannot reach, `lost`)."""
        ctx = self.contexts.get(rid)
        if ctx is not None and sender not in ctx.devices:
            # only a device of the request may fail it: another client's ERROR is not a reason
            log.warning("ignoring an error about request %d from %r, not one of its devices", rid, sender)
        elif ctx is not None:
            self.fail(rid, f"{sender}: {reason}", lost=lost)
        else:
            log.warning("error from %s about request %d: %s", sender, rid, reason)

    def device_down(self, name: str, reason: str) -> None:
        """A device died, left or was cut off: every attempt it takes part in ends (and
        runs again without it)."""
        for rid, ctx in list(self.contexts.items()):
            if name in ctx.devices:
                self.fail(rid, f"device {name} failed during the request: {reason}", lost=name)

    def sweep(self, now: float) -> None:
        """Standing plans are kept (least recently used beyond `STANDING_PLANS`); nothing
        here expires by time."""

    # ---- keeping standing plans fresh ------------------------------------------------
    def _refresh(self, standing: Standing, loaded: LoadedModel, raw: Cluster, cluster: Cluster,
                 strategy: str, links: tuple[Any, ...]) -> None:
        """Start a background re-plan when the measured costs moved, or a background
        auction when the bidders' states moved (edgeci); at most one at a time."""
        if standing.busy:
            return
        now = time.monotonic()
        if standing.links != links and now - standing.made > REPLAN_MIN_S:
            standing.busy = True
            self.node.spawn(self._replan(standing, loaded, cluster, strategy, links))
            return
        if strategy != "edgeci" or len(cluster.devices) < 2 or not _distributed(standing.plan):
            return
        bids = _bidder_signature(raw, standing.plan)
        if standing.awarded is not None and standing.bids_for == bids:
            return
        if now - standing.auctioned < AUCTION_MIN_S:
            return
        standing.busy = True
        self.node.spawn(self._standing_auction(standing, loaded, cluster, bids))

    async def _replan(self, standing: Standing, loaded: LoadedModel, cluster: Cluster, strategy: str,
                      links: tuple[Any, ...]) -> None:
        try:
            plan = await asyncio.get_running_loop().run_in_executor(PLANNER, make_plan, loaded.trunk, cluster, strategy)
            if plan.digest() != standing.plan.digest():
                standing.plan, standing.awarded, standing.bids_for = plan, None, None
            standing.links, standing.made = links, time.monotonic()
        finally:
            standing.busy = False

    async def _standing_auction(self, standing: Standing, loaded: LoadedModel, cluster: Cluster,
                                bids: tuple[Any, ...]) -> None:
        """AWAS over the network for the standing plan's blocks; its award becomes the
        layout later requests use. The bidders drop their commitments once it closed: it
        assigns future requests, whose tiles count as queued work when they arrive."""
        plan = standing.plan
        rid = random.getrandbits(62) | 1
        bidders = [d.name for d in cluster.devices]
        try:
            awarded, rounds_s = await self.auction(rid, loaded, plan, bidders)
            judged, note = await asyncio.get_running_loop().run_in_executor(
                PLANNER, judged_award, loaded.trunk, cluster, plan, awarded)
        except AuctionError as exc:
            # no assignment this time (nobody answered): keep the layout we have, try later
            log.info("standing auction for %s failed: %s", plan.digest(), exc)
        else:
            if standing.plan is plan:
                standing.awarded, standing.award_note, standing.bids_for = judged, note, bids
            log.info("standing auction of %s %s: %d rounds in %.1f ms, predicted %.1f ms (DPFL %.1f ms); using %s",
                     plan.strategy, plan.model, awarded.auction_rounds, rounds_s * 1e3,
                     awarded.predicted_latency_s * 1e3, plan.predicted_latency_s * 1e3, note)
        finally:
            standing.auctioned = time.monotonic()
            standing.busy = False
            self.node.cancel_everywhere(rid, set(bidders), "standing auction closed", quiet=True)

    async def auction(self, rid: int, loaded: LoadedModel, plan: Plan, bidders: list[str]) -> tuple[Plan, float]:
        """AWAS over the network for the row strips of the blocks DPFL chose; returns the
        awarded plan and the seconds its rounds took."""
        trunk = loaded.trunk
        digest = plan.digest()
        items = self._items.get(digest)
        if items is None:
            items = self._items[digest] = auction_items(trunk, plan)
            while len(self._items) > STANDING_PLANS:
                self._items.pop(next(iter(self._items)))
        auction = NetworkAuction(rid, self.name, items, bidders)
        wake = asyncio.Event()
        self.auctions[rid] = (auction, wake)
        try:
            began = time.perf_counter()
            await self.node.route_auction(rid, auction.start(time.monotonic()))
            while not auction.done:
                deadline = auction.machine.next_deadline
                wait = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    await asyncio.wait_for(wake.wait(), wait)
                except TimeoutError:
                    pass  # a round's deadline passed: tick() drops the silent bidders
                wake.clear()
                await self.node.route_auction(rid, auction.tick(time.monotonic()))
            rounds_s = time.perf_counter() - began
            awarded = awarded_plan(trunk, plan, auction, flops=loaded.flops)
        finally:
            self.auctions.pop(rid, None)
        return awarded, rounds_s

    def auctioneer_receive(self, rid: int, message: Any) -> list[Outgoing]:
        """A bidder's message for the auction `rid`; the auctioneer's answers."""
        entry = self.auctions.get(rid)
        if entry is None:
            log.info("auction %d is over: dropping a late %s from %s", rid,
                     type(message).__name__, message.sender)
            return []
        auction, wake = entry
        wake.set()
        return auction.receive(message, time.monotonic())

    # ---- calibration -----------------------------------------------------------------
    def _calibrate(self, model: str, seed: int, size: tuple[int, int], trunk: Any, raw_cluster: Cluster,
                   plan: Plan, devices: list[str], measured_s: float) -> None:
        """Teach `self.calibration` from a completed request: its measured time against the
        uncorrected live model's prediction for the plan that ran. Cold requests (a device
        built the model during it) are not learned from, nor requests computed by a device
        described by a declared GFLOP/s instead of measured curves (a declaration is what
        the user says the device is, not an estimate to correct). The predictions of one
        plan on one view of the mesh are kept: evaluating a plan costs a slow requester."""
        keys = {(d, model, seed, size) for d in devices}
        cold = not keys <= self._warm
        self._warm |= keys
        computing = frozenset(t.device for b in plan.blocks for t in b.tiles)
        if cold or not all(d.curves for d in raw_cluster.devices if d.name in computing):
            return
        # by the coarse view (the steps that re-plan): exact figures move on every request,
        # and evaluating a plan costs a slow requester tens of ms of CPU
        view = (plan.digest(), device_signature(raw_cluster), _bidder_signature(raw_cluster, plan),
                _ratio_signature(self.calibration.compute_ratio))
        predicted = self._predicted.get(view)
        if predicted is None:
            now = time.monotonic()
            if now - self._evaluated_at.get(view[0], -math.inf) < CALIBRATE_MIN_S:
                # the view moved since the last evaluation (a backlog, a learned ratio): learn
                # from this plan again later, rather than spend the CPU of two plan evaluations
                # on every request of a busy mesh
                return
            if len(self._evaluated_at) > 64:
                self._evaluated_at.clear()
            self._evaluated_at[view[0]] = now
            try:
                raw, _ = evaluate_plan(trunk, raw_cluster, plan)
                scaled, _ = evaluate_plan(trunk, self.calibration.scaled(raw_cluster), plan)
            except PlanningError as exc:
                # the plan names a device the view no longer has (it left mid-request): no sample
                log.debug("no calibration sample: %s", exc)
                return
            if len(self._predicted) > 64:
                self._predicted.clear()
            predicted = self._predicted[view] = (raw, scaled)
        learned = self.calibration.observe(computing, plan_hops(plan), predicted[0], predicted[1], measured_s,
                                           plan.strategy)
        log.debug("%s %s on %s: predicted %.1f ms (uncorrected; %.1f ms with compute ratios), measured %.1f ms; "
                  "learned %s", plan.strategy, model, ",".join(sorted(computing)), predicted[0] * 1e3,
                  predicted[1] * 1e3, measured_s * 1e3, learned)


def _lower_priority() -> None:
    """The planner thread yields to the tile compute and the event loop (Linux: a thread's
    nice value is its own): a background re-plan must not slow the requests it serves."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PLANNER_NICE)
    except (AttributeError, OSError):  # another OS, or not allowed: plan at normal priority
        pass


# one planning thread per process, below the compute thread's priority (`_lower_priority`)
PLANNER_NICE = 10
PLANNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshci-plan", initializer=_lower_priority)

__all__ = ["MAX_INPUT_SIDE", "Requester", "RequesterContext", "request_input"]


def _is_usage_error(exc: Exception) -> bool:
    """The request itself was wrong (unknown model, impossible size, malformed fields)."""
    if isinstance(exc, MeshciError):
        return exc.exit_status == 2
    return isinstance(exc, (ValueError, TypeError, KeyError))
