"""The requester side of a node: a request from a client, from plan to answer.

The node that receives an INFER is that request's requester and auctioneer. It turns its
live view of the mesh into a `Cluster`, plans (DPFL, `meshci.planning`), runs the auction
(AWAS, `meshci.node.auction` over the sans-IO `Auctioneer`), sends the plan and the first
block's inputs, gathers the trunk output (`RequesterRun`, pure), runs the head and answers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from meshci.auction.errors import AuctionError
from meshci.auction.messages import Outgoing
from meshci.errors import MeshciError, PlanningError
from meshci.models.registry import check_model_allowed
from meshci.node.auction import NetworkAuction, auction_items, awarded_plan
from meshci.node.latency import PlanCalibration, plan_hops
from meshci.node.request import RequesterRun, RequestStateError, cluster_from_view, device_signature
from meshci.node.runtime import LoadedModel
from meshci.planning import STRATEGIES, Plan, make_plan
from meshci.planning.evaluate import evaluate_plan
from meshci.trunk import Region
from meshci.wire import Connection, Message, MsgType
from meshci.wire.errors import WireError

if TYPE_CHECKING:
    from meshci.node.server import Node

log = logging.getLogger(__name__)

MAX_INPUT_SIDE = 4096
PLAN_TTL_S = 30.0
LINK_STEP = 2.0  # a cached plan is reused until a link's measured cost moves by this factor
RATIO_STEP = 1.05  # ... or a device's learned compute ratio moves by this factor
REPLAN_MIN_S = 10.0  # ... and is at least this old


@dataclass
class RequesterContext:
    run: RequesterRun
    loaded: LoadedModel
    done: asyncio.Future[torch.Tensor]
    devices: frozenset[str]
    path_s: float = 0.0  # critical path (compute + transfer) of the trunk output so far


class Requester:
    """The requests this node serves as requester (and their auctions)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.name = node.name
        self.runtime = node.runtime
        self.contexts: dict[int, RequesterContext] = {}
        self.auctions: dict[int, tuple[NetworkAuction, asyncio.Event]] = {}
        # DPFL plans by (model, seed, size, strategy, devices and speeds): the cuts depend on
        # stable facts; for edgeci the network auction still reassigns tiles per request
        self.plans: dict[tuple[Any, ...], tuple[Plan, float, tuple[Any, ...]]] = {}  # plan, made, links
        self._replanning: set[tuple[Any, ...]] = set()
        self._items: dict[int, tuple[Plan, list[Any]]] = {}  # auction items of a cached plan
        self.calibration = PlanCalibration()  # learned from this node's own completed requests
        self._warm: set[tuple[str, str, int, tuple[int, int]]] = set()  # (device, model, seed, size) built
        self.requests_served = 0

    # ---- serving a client ------------------------------------------------------------
    async def on_infer(self, conn: Connection, msg: Message) -> None:
        from meshci.node.server import RequestFailed

        node = self.node
        try:
            meta, logits = await self.infer(msg)
        except (RequestFailed, MeshciError, RequestStateError, ValueError, TypeError, KeyError) as exc:
            # the request cannot be served (unknown model, bad size, a device failed):
            # the client gets the reason, the node keeps serving
            log.warning("request %d failed: %s", msg.request_id, exc)
            await node.reply_error(conn, msg.request_id, str(exc))
            return
        except Exception as exc:  # noqa: BLE001
            # a bug in some part (planner, auction, model code) must not leave the client
            # waiting or stop the node: log the traceback, answer with the reason
            log.exception("request %d failed with an internal error", msg.request_id)
            await node.reply_error(conn, msg.request_id, f"internal error: {type(exc).__name__}: {exc}")
            return
        self.requests_served += 1
        await node.send_quietly(conn, Message(MsgType.RESULT, msg.request_id, meta, (logits,)))

    async def infer(self, msg: Message) -> tuple[dict[str, Any], torch.Tensor]:
        from meshci.node.server import REQUEST_TIMEOUT_S, RequestFailed

        node = self.node
        began = time.perf_counter()
        meta = msg.meta
        model = str(meta["model"])
        seed = int(meta.get("seed", 0))
        strategy = str(meta.get("strategy", "edgeci"))
        if strategy not in STRATEGIES:
            raise RequestFailed(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
        check_model_allowed(model, node.config.allow_models)
        x = request_input(meta, msg.tensors)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        loaded = await self.runtime.load(model, seed, size, head=True)
        trunk = loaded.trunk
        loaded_at = time.perf_counter()

        peers = node.membership.alive()
        heard_now = time.monotonic()
        heard = node.gossip.advert_heard
        ages = {p.name: heard_now - heard[p.name] for p in peers if p.name in heard}
        raw_cluster = cluster_from_view(self.name, node.advert(), peers, node.config.default_link,
                                        model=model, size=size, advert_age_s=ages)
        # every strategy plans on the same cluster: the measured curves and links with the
        # corrections learned from this node's completed requests
        cluster = self.calibration.apply(raw_cluster)
        loop = asyncio.get_running_loop()
        plan_key = (model, seed, size, strategy, device_signature(raw_cluster))
        # what moves the cached plan to a background re-plan: the links, the compute ratios
        links = _link_signature(cluster) + _ratio_signature(self.calibration.compute_ratio)
        cached = self.plans.get(plan_key)
        if cached is not None and time.monotonic() - cached[1] < PLAN_TTL_S:
            plan = cached[0]
            stale = time.monotonic() - cached[1] > REPLAN_MIN_S
            if cached[2] != links and stale and plan_key not in self._replanning:
                # the measured link costs moved: re-plan off this request's critical path
                # (planning takes a slow device hundreds of ms); later requests use it. At
                # most every REPLAN_MIN_S: planning competes with tiles for the device's CPU
                self._replanning.add(plan_key)
                node.spawn(self._replan(plan_key, trunk, cluster, strategy, links))
        else:
            plan = await loop.run_in_executor(None, make_plan, trunk, cluster, strategy)
            self.plans[plan_key] = (plan, time.monotonic(), links)
        planned_at = time.perf_counter()
        rid = random.getrandbits(62) | 1
        participants = {d.name for d in cluster.devices}
        try:
            auction_rounds = plan.auction_rounds
            rounds_s = 0.0
            if strategy == "edgeci" and len(cluster.devices) > 1:
                plan, auction_rounds, rounds_s = await self._auction(rid, loaded, cluster, plan)
            auctioned_at = time.perf_counter()

            run = RequesterRun(plan, self.name, loaded.geometry(plan))
            devices = run.devices()
            done: asyncio.Future[torch.Tensor] = loop.create_future()
            self.contexts[rid] = RequesterContext(run, loaded, done, frozenset(devices))
            try:
                plan_msg = Message(MsgType.PLAN, rid, {"plan": plan.to_json(), "model": model, "seed": seed,
                                                       "size": list(size)})
                for device in devices:
                    if device == self.name:
                        await node.worker.on_plan(self.name, plan_msg)
                    else:
                        await node.send_to(device, plan_msg)
                await node.execute(rid, run.start(x), path_s=0.0)
                output = await asyncio.wait_for(done, REQUEST_TIMEOUT_S)
                trunk_at = time.perf_counter()
                head_began = time.perf_counter()
                logits = await self.runtime.call(trunk.head, output)
                head_s = time.perf_counter() - head_began
                path_s = self.contexts[rid].path_s + head_s
            except WireError as exc:
                # a device could not be reached (PLAN or input tiles): the request fails, with why
                raise RequestFailed(f"lost a device during the request: {exc}") from exc
            except TimeoutError as exc:
                # pieces never all arrived (a silent device): fail instead of waiting forever
                raise RequestFailed(f"request timed out after {REQUEST_TIMEOUT_S:.0f} s") from exc
            finally:
                self.contexts.pop(rid, None)
        except Exception as exc:
            # the request failed here: tell every participant (bidders, devices) to drop its
            # state and commitments, then let the caller answer the client with the reason
            node.cancel_everywhere(rid, participants, str(exc) or type(exc).__name__)
            raise
        latency = time.perf_counter() - began
        calibration = self._calibrate(model, seed, size, trunk, raw_cluster, plan, devices,
                                      trunk_at - auctioned_at)
        probs = torch.softmax(logits.flatten(), 0)
        top = torch.topk(probs, min(5, probs.numel()))
        result: dict[str, Any] = {
            "model": model,
            "strategy": strategy,
            "requester": self.name,
            "latency_s": latency,
            "load_s": loaded_at - began,
            "planning_s": planned_at - loaded_at,
            "auction_s": auctioned_at - planned_at,
            "auction_rounds_s": rounds_s,
            "execution_s": trunk_at - auctioned_at,
            "head_s": head_s,
            "critical_path_s": path_s,
            "top5": [[int(i), float(p)] for p, i in zip(top.values, top.indices)],
            "devices": devices,
            "shares": _shares(loaded.flops, plan),
            "auction_rounds": auction_rounds,
            "routing": plan.routing,
            "predicted_latency_s": plan.predicted_latency_s,
            **calibration,
            "plan": plan.to_json(),
        }
        if meta.get("check"):
            reference = await self.runtime.call(trunk.forward, x)
            result["max_abs_diff"] = float((reference - logits).abs().max())
            result["check_ok"] = bool(torch.allclose(logits, reference, rtol=1e-4, atol=1e-5))
        return result, logits

    # ---- the trunk's output ----------------------------------------------------------
    async def on_gather(self, rid: int, block: int, region: Region, tensor: torch.Tensor, path: float) -> None:
        req = self.contexts.get(rid)
        if req is None:
            log.info("dropping a gathered piece of finished or unknown request %d", rid)
            return
        if block == len(req.run.plan.blocks):
            req.path_s = max(req.path_s, path)
        try:
            actions = req.run.on_gather(block, region, tensor)
        except RequestStateError as exc:
            # a gathered piece that fits nothing: the request cannot complete
            await self.node.fail_request(rid, self.name, f"bad piece from a worker: {exc}")
            return
        await self.node.execute(rid, actions, path)

    def trunk_done(self, rid: int, output: torch.Tensor) -> None:
        req = self.contexts.get(rid)
        if req is not None and not req.done.done():
            req.done.set_result(output)

    def fail(self, rid: int, reason: str) -> bool:
        """Fail request `rid` if this node is its requester; whether it was."""
        from meshci.node.server import RequestFailed

        req = self.contexts.get(rid)
        if req is None:
            return False
        if not req.done.done():
            req.done.set_exception(RequestFailed(reason))
        return True

    def on_error(self, sender: str, rid: int, reason: str) -> None:
        """An ERROR about a request from a peer: only one of its devices may fail it."""
        ctx = self.contexts.get(rid)
        if ctx is not None and sender not in ctx.devices:
            # only a device of the request may fail it: another client's ERROR is not a reason
            log.warning("ignoring an error about request %d from %r, not one of its devices", rid, sender)
        elif ctx is not None:
            self.fail(rid, f"{sender}: {reason}")
        else:
            log.warning("error from %s about request %d: %s", sender, rid, reason)

    def device_down(self, name: str, reason: str) -> None:
        for rid, ctx in list(self.contexts.items()):
            if name in ctx.devices:
                self.fail(rid, f"device {name} failed during the request: {reason}")

    def sweep(self, now: float) -> None:
        for key, (plan, made, _links) in list(self.plans.items()):
            if now - made > PLAN_TTL_S:
                del self.plans[key]
                self._items.pop(id(plan), None)

    # ---- calibration -----------------------------------------------------------------
    def _calibrate(self, model: str, seed: int, size: tuple[int, int], trunk: Any, raw_cluster: Any,
                   plan: Plan, devices: list[str], measured_s: float) -> dict[str, Any]:
        """Teach `self.calibration` from a completed request: its measured trunk time
        against the uncorrected live model's prediction for the plan that ran. Cold
        requests (a device built the model during it) are not learned from, nor requests
        computed by a device described by a declared GFLOP/s instead of measured curves
        (a declaration is what the user says the device is, not an estimate to correct)."""
        keys = {(d, model, seed, size) for d in devices}
        cold = not keys <= self._warm
        self._warm |= keys
        hops = plan_hops(plan)
        try:
            predicted, finishes = evaluate_plan(trunk, raw_cluster, plan)
            scaled, _ = evaluate_plan(trunk, self.calibration.scaled(raw_cluster), plan)
        except PlanningError as exc:
            # the plan names a device the view no longer has (it left mid-request): no sample
            log.debug("no calibration sample: %s", exc)
            return {"hops": hops, "cold": cold}
        computing = frozenset(t.device for b in plan.blocks for t in b.tiles)
        measured_model = all(d.curves for d in raw_cluster.devices if d.name in computing)
        learned = (None if cold or not measured_model
                   else self.calibration.observe(computing, hops, predicted, scaled, measured_s))
        ratios = {d: round(float(r), 3) for d, r in sorted(self.calibration.compute_ratio.items())}
        log.info("%s %s on %s: %d hops, plan says %.1f ms, predicted %.1f ms (uncorrected; %.1f ms with compute ratios), "
                 "measured %.1f ms, block finishes %s ms; learned %s; compute ratios %s, %.2f ms per hop",
                 plan.strategy, model, ",".join(sorted(computing)), hops, plan.predicted_latency_s * 1e3,
                 predicted * 1e3, scaled * 1e3,
                 measured_s * 1e3, [round(max(f.values(), default=0.0) * 1e3, 1) for f in finishes],
                 "nothing (cold)" if cold else learned if measured_model else "nothing (declared speeds)", ratios, self.calibration.extra_latency_ms())
        return {"hops": hops, "cold": cold, "predicted_uncorrected_s": float(predicted),
                "compute_ratios": ratios, "hop_correction_ms": self.calibration.extra_latency_ms()}

    async def _replan(self, key: tuple[Any, ...], trunk: Any, cluster: Any, strategy: str,
                      links: tuple[Any, ...]) -> None:
        try:
            plan = await asyncio.get_running_loop().run_in_executor(None, make_plan, trunk, cluster, strategy)
            self.plans[key] = (plan, time.monotonic(), links)
        finally:
            self._replanning.discard(key)

    # ---- the auction -----------------------------------------------------------------
    async def _auction(self, rid: int, loaded: LoadedModel, cluster: Any, plan: Plan) -> tuple[Plan, int, float]:
        """AWAS over the network for the row strips of the blocks DPFL chose; returns the
        plan, the auction's round trips and the seconds its rounds took."""
        from meshci.node.server import RequestFailed

        trunk = loaded.trunk
        bidders = [d.name for d in cluster.devices]
        items = self._items.get(id(plan))
        if items is None or items[0] is not plan:
            items = self._items[id(plan)] = (plan, auction_items(trunk, plan))
        auction = NetworkAuction(rid, self.name, items[1], bidders)
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
            new_plan = awarded_plan(trunk, plan, auction, flops=loaded.flops)
        except AuctionError as exc:
            # the auction cannot produce an assignment (e.g. nobody to bid): say so to the client
            raise RequestFailed(f"auction failed: {exc}") from exc
        finally:
            self.auctions.pop(rid, None)
        return new_plan, auction.result().rounds, rounds_s

    def auctioneer_receive(self, rid: int, message: Any) -> list[Outgoing]:
        """A bidder's message for the auction of request `rid`; the auctioneer's answers."""
        entry = self.auctions.get(rid)
        if entry is None:
            log.info("auction %d is over: dropping a late %s from %s", rid,
                     type(message).__name__, message.sender)
            return []
        auction, wake = entry
        wake.set()
        return auction.receive(message, time.monotonic())


def _link_signature(cluster: Any) -> tuple[tuple[str, str, int, int], ...]:
    """The cluster's links on a coarse logarithmic scale (factors of 2): a plan made for
    one set of measured link costs serves requests until they move by a step."""
    def step(value: float) -> int:
        return round(math.log(max(value, 1e-3)) / math.log(LINK_STEP))

    return tuple(sorted((*sorted(pair), step(spec.latency_ms), step(spec.mbps))
                        for pair, spec in cluster.links.items()))


def _ratio_signature(ratios: dict[str, float]) -> tuple[tuple[str, int], ...]:
    return tuple((name, round(math.log(max(r, 1e-3)) / math.log(RATIO_STEP))) for name, r in sorted(ratios.items()))


def request_input(meta: dict[str, Any], tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The request's input image (1, 3, H, W): sent by the client, or made from a seed."""
    from meshci.node.server import RequestFailed

    if tensors:
        x = tensors[0].float()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] != 3:
            raise RequestFailed(f"input must be (3, H, W) or (1, 3, H, W), got {tuple(tensors[0].shape)}")
    else:
        h, w = (int(v) for v in meta.get("size", (224, 224)))
        if not (1 <= h <= MAX_INPUT_SIDE and 1 <= w <= MAX_INPUT_SIDE):
            raise RequestFailed(f"input size {h}x{w} outside 1..{MAX_INPUT_SIDE}")
        generator = torch.Generator().manual_seed(int(meta.get("input_seed", 0)))
        x = torch.randn(1, 3, h, w, generator=generator)
    if not (1 <= x.shape[-2] <= MAX_INPUT_SIDE and 1 <= x.shape[-1] <= MAX_INPUT_SIDE):
        raise RequestFailed(f"input size {tuple(x.shape[-2:])} outside 1..{MAX_INPUT_SIDE}")
    return x.contiguous()


def _shares(flops: Callable[[int, int, Region], float], plan: Plan) -> dict[str, float]:
    """Each device's share of the plan's trunk FLOPs (halo work included)."""
    work: dict[str, float] = defaultdict(float)
    for block in plan.blocks:
        for tile in block.tiles:
            work[tile.device] += flops(block.start, block.end, tile.region)
    total = sum(work.values()) or 1.0
    return {name: value / total for name, value in sorted(work.items())}
