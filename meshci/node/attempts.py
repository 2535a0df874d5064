"""The requester side of recovery: a request's attempts until it completes, fails with one
clear reason, reaches its deadline or loses its client (IO glue over `recovery`).

An attempt is one run of the request under its own request id: a plan for the devices
that are up and not backed off, the PLAN frames, and the wait for the logits. A device
lost during the attempt (its connection lost, membership DEAD, a peer that cannot reach
it, a PLAN that cannot be sent) ends the attempt with `DeviceLost`: its state is cancelled
on every participant, the device is backed off, and `Recovery.on_lost` says whether the
request runs again on the survivors (a fresh request id, so nothing of the failed
attempt mixes in) or fails. The requester keeps the request's input for the whole
request, so a re-run starts from it; each re-run is planned on the survivors.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from meshci.node.recovery import DeviceLost, GiveUp, Recovery
from meshci.node.request import RequesterRun, device_signature
from meshci.node.standing import STANDING_PLANS, Standing, _link_signature, _ratio_signature
from meshci.planning import make_plan
from meshci.wire import Connection

if TYPE_CHECKING:
    from meshci.cost.cluster import Cluster
    from meshci.node.inputs import InferRequest
    from meshci.node.model_cache import LoadedModel
    from meshci.node.requester import Requester, RequesterContext
    from meshci.planning import Plan

log = logging.getLogger(__name__)

T = TypeVar("T")
CLIENT_POLL_S = 0.1  # how often a request in flight checks that its client is still connected


@dataclass
class Outcome:
    """The attempt that completed."""

    rid: int
    ctx: RequesterContext
    plan: Plan
    standing: Standing
    raw_cluster: Cluster
    logits: torch.Tensor
    head: dict[str, Any]
    planned_at: float  # perf_counter
    sent_at: float
    shipped_bytes: dict[str, int]  # the model's code and weights shipped, per device


async def before_deadline(recovery: Recovery, work: Awaitable[T], during: str, limit_s: float | None = None) -> T:
    """`work`, or RequestFailed when the request's deadline (or `limit_s`) passes first."""
    from meshci.node.server import RequestFailed

    remaining = recovery.remaining(time.monotonic())
    wait = remaining if limit_s is None else min(remaining, limit_s)
    try:
        return await asyncio.wait_for(work, wait)
    except TimeoutError as exc:
        if limit_s is not None and limit_s < remaining:
            raise RequestFailed(f"{during} took over {limit_s:.0f} s") from exc
        raise RequestFailed(recovery.timed_out(during)) from exc


async def standing_plan(req: Requester, asked: InferRequest, loaded: LoadedModel, size: tuple[int, int],
                        exclude: frozenset[str], recovery: Recovery) -> tuple[Standing, Cluster]:
    """The standing plan for the request on the devices up now, less `exclude` (lost
    or backed off), peers refusing a shipped model and peers it does not fit; the first
    request of its kind (or of a new set of devices) waits for it to be made, within the
    request's deadline."""
    from meshci.node.requester import PLANNER

    node = req.node
    model, seed, strategy = asked.model, asked.seed, asked.strategy
    while True:
        budgets = {p.name: p.advert.memory_mb for p in node.membership.alive()}  # `memory_budget`
        leave_out = (await node.shipping.refusers(model) | req.memory.leave_out(model, size, budgets)
                     | set(exclude))
        raw_cluster, cluster = req._clusters(model, size, strategy, leave_out)
        # by the devices present: a plan never names a device that is gone; what the devices
        # are (speed, curves) and the links cost re-plan in the background (`_refresh`)
        key = (model, seed, size, strategy, frozenset(d.name for d in raw_cluster.devices))
        links = (device_signature(raw_cluster) + _link_signature(cluster)
                 + _ratio_signature(req.calibration.compute_ratio))
        standing = req.standing.get(key)
        if standing is None:
            # the first request of this kind waits for its plan; later ones never do
            plan = await before_deadline(recovery, asyncio.get_running_loop().run_in_executor(
                PLANNER, make_plan, loaded.trunk, cluster, strategy), "while planning")
            standing = req.standing.get(key) or Standing(plan, links, time.monotonic())
            req.standing[key] = standing
            while len(req.standing) > STANDING_PLANS:
                req.standing.popitem(last=False)
        req.standing.move_to_end(key)
        req._refresh(standing, loaded, raw_cluster, cluster, strategy, links)
        if not req.memory.check(model, size, loaded.trunk, standing.current, budgets, req.name):
            return standing, raw_cluster
        # else: planned again without the peers it did not fit


async def run_attempts(req: Requester, recovery: Recovery, asked: InferRequest, loaded: LoadedModel,
                       size: tuple[int, int]) -> Outcome:
    """Run the request until one attempt completes; RequestFailed with the reason when it
    cannot (every other error is raised as it is, after the attempt was cancelled)."""
    from meshci.node.requester import RequesterContext
    from meshci.node.server import RequestFailed

    node = req.node
    loop = asyncio.get_running_loop()
    while True:
        exclude = req.backoff.avoided(time.monotonic()) | frozenset(recovery.lost)
        standing, raw_cluster = await standing_plan(req, asked, loaded, size, exclude, recovery)
        planned_at = time.perf_counter()
        # a model the mesh does not know by name goes to the devices first (`shipping`)
        plan, shipped, shipped_bytes = await node.shipping.prepare(standing.current, loaded, asked.model)
        rid = random.getrandbits(62) | 1
        devices = frozenset(plan.devices)
        ctx = RequesterContext(RequesterRun(plan, req.name, loaded.geometry(plan)), loaded, loop.create_future(), devices,
                               plan.head_plan.device, shipped=shipped)
        req.contexts[rid] = ctx
        sent_at = time.perf_counter()
        try:
            try:
                await req.start(rid, ctx, plan, asked, size, recovery.remaining(time.monotonic()))
                logits, head = await before_deadline(recovery, asyncio.shield(ctx.done), "while the devices computed")
            finally:
                req.contexts.pop(rid, None)
                if not ctx.done.done():
                    ctx.done.cancel()  # nothing sets it now; nobody waits for it
        except DeviceLost as lost:
            node.cancel_everywhere(rid, set(devices), str(lost))
            now = time.monotonic()
            avoided_s = req.backoff.failed(lost.device, now)
            survivors = frozenset(p.name for p in node.membership.alive()) | {req.name}
            decision = recovery.on_lost(lost.device, lost.why, now, survivors - req.backoff.avoided(now))
            if isinstance(decision, GiveUp):
                raise RequestFailed(decision.reason) from lost
            log.warning("request %d: lost %s (%s): running it again without %s (attempt %d; %s avoided "
                        "for %.0f s)", rid, lost.device, lost.why, ", ".join(sorted(decision.exclude)),
                        decision.attempt, lost.device, avoided_s)
            node.metrics.requests_retried += 1
            continue
        except BaseException as exc:
            # failed, past its deadline, or its client went away (cancelled): tell every
            # participant to drop the attempt's state and commitments
            node.cancel_everywhere(rid, set(devices), str(exc) or type(exc).__name__)
            raise
        for device in devices:
            req.backoff.succeeded(device)
        return Outcome(rid, ctx, plan, standing, raw_cluster, logits, head, planned_at, sent_at, shipped_bytes)


async def while_connected(conn: Connection, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Run `work` while the client that asked for it stays connected: (True, its result),
    or (False, None) once the client went away (the work is cancelled, and with it the
    request everywhere)."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            if conn.closed:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return False, None
            await asyncio.wait({task}, timeout=CLIENT_POLL_S)
    except asyncio.CancelledError:
        task.cancel()  # the node is stopping: so does the request
        raise
    return True, task.result()


__all__ = ["Outcome", "before_deadline", "run_attempts", "standing_plan", "while_connected"]
