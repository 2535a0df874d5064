"""The tile runtime of a node: its built models (`meshci.node.model_cache`) and one
compute thread.

Long compute runs on one worker thread, off the event loop, so heartbeats keep flowing;
a short tile runs on the loop itself (a thread hand-off costs two wake-ups, milliseconds
on a busy machine, more than such a tile holds the loop).

Speed curves: the first time a node loads a model at an input size, it measures its own
per-segment latency curves for it (`meshci.cost.profiling`, time versus output rows, the
mean of timed runs so that a CPU quota shows as real tiles meet it), in this process (its
cgroup's quota applies) on the loader thread, off the event loop; they are cached on disk
by model hash and device fingerprint, so later starts read them. The node advertises them
(`advert`), plans with them (`meshci.node.request.cluster_from_view`) and bids with them
(`bid_compute_s`); a model without curves yet is priced by the node's GFLOP/s.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from meshci.cost.profiling import (Progress, SpeedCorrection, SpeedProfile, default_data_dir, load_or_measure,
                                   stderr_progress)
from meshci.models.registry import build_model
from meshci.node.fairness import FairQueue
from meshci.node.membership import MAX_ADVERT_CURVES, Advert, curve_key
from meshci.node.model_cache import _BUILD_LOCK, LoadedModel, ModelCache, PlanGeometry
from meshci.tiling import block_flops, block_input_region, run_block
from meshci.trunk import Region, Trunk, extract_trunk

__all__ = ["LoadedModel", "PlanGeometry", "Runtime", "measure_gflops"]

log = logging.getLogger(__name__)

Owner = tuple[str, int, float]  # (requester, request id, when the request reached this node)
NO_OWNER: Owner = ("", 0, 0.0)  # work of no request (it takes its own turn)
CURVE_FRACTIONS = (0.125, 0.25, 0.5, 1.0)  # output rows measured per segment: small to whole maps
CURVE_REPEATS = 3


class Runtime:
    """Model cache plus the single compute thread (torch threads = `threads`).

    `curves`: measure (or read from the cache under `data_dir`) this device's speed curves
    for a model at its first load (see the module docstring); `progress` reports it. Off
    by default: a node whose speed was declared (``--gflops``) is described by it."""

    def __init__(self, threads: int = 1, cache_capacity: int = 2, isolate_builds: bool = True, *,
                 curves: bool = False, data_dir: Path | None = None,
                 progress: Progress | None = stderr_progress) -> None:
        self.threads = max(1, threads)
        self.cache = ModelCache(cache_capacity, isolate_builds, (data_dir or default_data_dir()) / "heads")
        self.measure_curves = curves
        self.data_dir = data_dir
        self.progress = progress
        self.profiles: OrderedDict[str, SpeedProfile] = OrderedDict()  # curve_key -> profile
        self._curves: tuple[tuple[str, tuple[tuple[float, float], ...]], ...] = ()
        self.speed = SpeedCorrection()  # how this device computes now against its curves
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshci-compute",
                                           initializer=torch.set_num_threads,
                                           initargs=(self.threads,))
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshci-load")
        # work for the compute thread waits here; the thread takes the next by
        # `meshci.node.fairness` (round-robin between requesters, oldest request first)
        self._queue: FairQueue[tuple[Callable[[], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]] = FairQueue()
        self._queue_lock = threading.Lock()
        self.compute_s = 0.0
        self.tiles_computed = 0
        self.queued_s = 0.0  # predicted seconds of tile compute queued or running
        self._thread_free_at = 0.0  # perf_counter when the compute thread last finished a task
        self._sized_threads: set[int] = set()
        self.loop_free_wall = 0.0  # wall clock when an inline tile last gave the loop back
        self.inline_cpu_s = 0.0  # CPU the event-loop thread spent computing tiles inline  # threads whose torch pool is set to `threads`

    async def load(self, name: str, seed: int, size: tuple[int, int]) -> LoadedModel:
        """The model's trunk (and its head's source), built or read from the cache; its
        curves measured the first time."""
        cached = self.cache.peek(name, seed, size)
        if cached is not None and (not self.measure_curves or curve_key(name, size) in self.profiles):
            return cached
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._loader, self._get_and_profile, name, seed, size)

    def _get_and_profile(self, name: str, seed: int, size: tuple[int, int]) -> LoadedModel:
        """Blocking (the loader thread): the model, and its curves the first time."""
        entry = self.cache.get(name, seed, size)
        if self.measure_curves:
            self.profile(entry.trunk, size)
        return entry

    async def reference(self, name: str, seed: int, size: tuple[int, int]) -> LoadedModel:
        """The whole model built in this process, for ``--check`` (loader thread)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._loader, self.cache.reference, name, seed, size)

    async def head(self, loaded: LoadedModel) -> Any:
        """The model's head source, its tensors mapped in (loader thread the first time)."""
        if loaded._head is not None:
            return loaded._head
        return await asyncio.get_running_loop().run_in_executor(self._loader, loaded.head)

    def profile(self, trunk: Trunk, size: tuple[int, int]) -> SpeedProfile:
        """Blocking: this device's curves for `trunk` (at input `size`), read from the disk
        cache or measured now on this thread, and remembered for adverts and bids."""
        key = curve_key(trunk.name, size)
        known = self.profiles.get(key)
        if known is not None:
            return known
        began = time.perf_counter()
        curve = load_or_measure(trunk, threads=self.threads, data_dir=self.data_dir, progress=self.progress,
                                fractions=CURVE_FRACTIONS, repeats=CURVE_REPEATS, statistic="mean")
        profile = SpeedProfile.of(trunk, curve)
        self.profiles[key] = profile
        while len(self.profiles) > MAX_ADVERT_CURVES:
            self.profiles.popitem(last=False)
        log.info("speed curves of %s: %.2f s (measured or read from the cache)", key, time.perf_counter() - began)
        return profile

    def curves(self) -> tuple[tuple[str, tuple[tuple[float, float], ...]], ...]:
        """The curves to advertise, by `curve_key` (the same object until they change)."""
        curves = tuple((key, self.speed.curve(key, profile.curve)) for key, profile in self.profiles.items())
        if curves != self._curves:
            self._curves = curves
        return self._curves

    def advert(self, gflops: float, backlog_s: float,
               links: tuple[tuple[str, float, float], ...] = (), tile_ms: float = 0.0) -> Advert:
        """This node's `Advert`: its GFLOP/s, backlog, links and per-tile overhead, with its
        measured curves."""
        return Advert(gflops, backlog_s, links, self.curves(), tile_ms)

    def bid_compute_s(self, item: Any, gflops: float) -> float:
        """A bidder's compute time for an auction item: by this device's curves for the
        item's model (`Item.model` is a `curve_key`) where it has them, else by `gflops`."""
        profile = self.profiles.get(item.model) if item.model else None
        start, end = item.segments
        if profile is not None and 0 <= start < end <= len(profile.curve):
            return profile.strip_s(start, end, float(item.flops)) * self.speed.factor(item.model)
        return float(item.flops) / (gflops * 1e9)

    def tile_s(self, loaded: LoadedModel, start: int, end: int, out: Region, gflops: float) -> float:
        """Predicted compute time of a tile (queue estimates, inline decisions): by the
        curves of its model where this device has them, else by `gflops`."""
        key = curve_key(loaded.key[0], (loaded.key[2], loaded.key[3]))
        return self._curve_tile_s(loaded, start, end, out, gflops) * self.speed.factor(key)

    def _curve_tile_s(self, loaded: LoadedModel, start: int, end: int, out: Region, gflops: float) -> float:
        flops = loaded.flops(start, end, out)
        profile = self.profiles.get(curve_key(loaded.key[0], (loaded.key[2], loaded.key[3])))
        if profile is not None and 0 <= start < end <= len(profile.curve):
            return profile.strip_s(start, end, flops)
        return flops / (gflops * 1e9)

    def observe_tile(self, loaded: LoadedModel, start: int, end: int, out: Region, seconds: float) -> None:
        """A tile of `loaded` took `seconds` to compute here: a sample of how this device
        computes against its measured curves (only where it has curves for the model)."""
        key = curve_key(loaded.key[0], (loaded.key[2], loaded.key[3]))
        profile = self.profiles.get(key)
        if profile is None or not 0 <= start < end <= len(profile.curve):
            return
        if self.speed.observe(key, profile.strip_s(start, end, loaded.flops(start, end, out)), seconds):
            log.info("%s computes at %.2fx its measured curves now: advertising that", key, self.speed.factor(key))

    async def run_block(self, trunk: Trunk, start: int, end: int, x: torch.Tensor,
                        have: Region, out: Region, *, inline: bool = False,
                        then: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        owner: Owner = NO_OWNER) -> tuple[torch.Tensor, float, float]:
        """Run segments [start, end) (and `then` on the output, in the same place); returns
        (output, compute seconds, hand-off seconds).

        `inline`: on the calling (event-loop) thread, for tiles short enough that holding
        the loop costs less than the two thread wake-ups a hand-off needs. Otherwise on
        the compute thread; the hand-off is then the wall time of the call that was
        neither this tile's compute nor waiting behind another task on that thread.
        `owner`: (requester, request id, when the request reached this node), by which the
        compute thread chooses between waiting tiles (`meshci.node.fairness`)."""
        # torch.fx tracing (a model built or traced in this process) patches every module's
        # call: no tile runs meanwhile; on the loop, a tile then goes to the compute thread
        if inline and _BUILD_LOCK.acquire(blocking=False):
            if threading.get_ident() not in self._sized_threads:
                # OpenMP's thread count is per calling thread: size this one's pool too
                torch.set_num_threads(self.threads)
                self._sized_threads.add(threading.get_ident())
            began, cpu_began = time.perf_counter(), time.thread_time()
            try:
                with torch.inference_mode():
                    y = run_block(trunk, start, end, x, have, out).contiguous()
                    if then is not None:
                        y = then(y)
            finally:
                _BUILD_LOCK.release()
            seconds = time.perf_counter() - began
            self.inline_cpu_s += time.thread_time() - cpu_began
            self.loop_free_wall = time.time()
            self.compute_s += seconds
            self.tiles_computed += 1
            return y, seconds, 0.0
        submitted = time.perf_counter()

        def work() -> tuple[torch.Tensor, float, float, float]:
            with _BUILD_LOCK:
                began = time.perf_counter()
                to_thread = max(0.0, began - max(submitted, self._thread_free_at))
                with torch.inference_mode():
                    y = run_block(trunk, start, end, x, have, out).contiguous()
                    if then is not None:
                        y = then(y)
            self._thread_free_at = ended = time.perf_counter()
            return y, ended - began, to_thread, ended

        y, seconds, to_thread, ended = await self.on_compute_thread(work, owner)
        handoff = to_thread + max(0.0, time.perf_counter() - ended)
        self.compute_s += seconds
        self.tiles_computed += 1
        return y, seconds, handoff

    async def call(self, fn, *args, owner: Owner = NO_OWNER):  # type: ignore[no-untyped-def]
        """Run any other torch work (head, monolithic check) on the compute thread."""
        def work():  # type: ignore[no-untyped-def]
            try:
                with _BUILD_LOCK, torch.inference_mode():  # not while a model is traced here
                    return fn(*args)
            finally:
                self._thread_free_at = time.perf_counter()

        return await self.on_compute_thread(work, owner)

    def on_compute_thread(self, work: Callable[[], Any], owner: Owner = NO_OWNER) -> asyncio.Future[Any]:
        """Queue `work` for the compute thread (fairly among requests: `owner`); its result."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Any] = loop.create_future()
        requester, request, since = owner
        with self._queue_lock:
            self._queue.push(requester, request, since, (work, result, loop))
        self._compute.submit(self._run_next)  # one run per item: the thread picks which
        return result

    def _run_next(self) -> None:
        """On the compute thread: run the queued work that `FairQueue` says goes next."""
        while True:
            with self._queue_lock:
                entry = self._queue.pop()
            if entry is None:
                return
            work, result, loop = entry
            if result.cancelled():
                continue  # its request was cancelled while it waited: the next one instead
            try:
                value = work()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                loop.call_soon_threadsafe(_settle, result, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, result, value, None)
            return

    def close(self) -> None:
        with self._queue_lock:  # work that will never run: its waiters are cancelled
            while (entry := self._queue.pop()) is not None:
                _, result, loop = entry
                if not loop.is_closed():
                    loop.call_soon_threadsafe(result.cancel)
        self._compute.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)


def _settle(result: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if result.done():
        return  # cancelled meanwhile: nobody waits for it
    if exc is not None:
        result.set_exception(exc)
    else:
        result.set_result(value)


PROFILE_MODEL = "resnet34"
PROFILE_SIZE = (3, 224, 224)
PROFILE_RUNS = 5
PROFILE_STRIPS = 4  # the profile's tiles: a quarter of each map's rows, like a 4-device plan


def measure_gflops(threads: int, runs: int = PROFILE_RUNS, strips: int = PROFILE_STRIPS) -> float:
    """This device's effective GFLOP/s right now, on work shaped like a mesh's tiles:
    every segment of ResNet-34's trunk (224x224 input) on a row strip of 1/`strips` of its
    output (halo rows included), one after the other; the whole sweep is timed end to end,
    median of `runs` after a warm-up.

    Whole sweeps, not best-of timings of each millisecond-long piece: a sweep spans many
    scheduler periods, so a CPU quota, a throttled or shared core shows in the figure as
    it will in real tiles (a best-of catches the moments a quota has not cut in yet and
    overstates a throttled device several times). Measured at every start, not cached:
    the conditions it reflects can change between starts."""
    with _BUILD_LOCK:
        model = build_model(PROFILE_MODEL, seed=0)
        model.eval()
        trunk = extract_trunk(model, input_shape=PROFILE_SIZE, name=PROFILE_MODEL)
    del model
    pieces = []
    flops = 0.0
    for k, seg in enumerate(trunk.segments):
        _, h, w = seg.out_shape
        out = Region(0, max(1, -(-h // strips)), 0, w)
        have = block_input_region(trunk, k, k + 1, out)
        pieces.append((k, torch.randn(1, seg.in_shape[0], have.height, have.width), have, out))
        flops += block_flops(trunk, k, k + 1, out)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        with torch.inference_mode():
            for _ in range(max(1, runs) + 1):  # the first sweep warms up
                began = time.perf_counter()
                for k, x, have, out in pieces:
                    run_block(trunk, k, k + 1, x, have, out)
                times.append(time.perf_counter() - began)
    finally:
        torch.set_num_threads(previous)
    return max(flops / statistics.median(times[1:]) / 1e9, 1e-3)


