"""The tile runtime of a node: a small cache of built trunks and one compute thread.

A worker only needs a trunk's segments; only the requester needs the head (and, for
`--check`, the monolithic reference). A worker's trunk is built in a short-lived helper
process that hands back only the segments, so a worker serving VGG-16 never holds its
~490 MB classifier, not even while building.
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
import gc
import logging
import pickle
import statistics
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import torch

from meshci.cost.profiling import Progress, SpeedProfile, load_or_measure, stderr_progress
from meshci.errors import MeshciError
from meshci.node.membership import MAX_ADVERT_CURVES, Advert, curve_key
from meshci.models.registry import build_model
from meshci.planning.plan import Plan
from meshci.tiling import block_flops, block_input_region, run_block
from meshci.trunk import Region, Trunk, extract_trunk

log = logging.getLogger(__name__)

ModelKey = tuple[str, int, int, int]  # model name, seed, input height, input width
BUILD_TIMEOUT_S = 600.0


@dataclass
class LoadedModel:
    key: ModelKey
    trunk: Trunk
    has_head: bool
    needs: dict[tuple[int, int, Region], Region] = field(default_factory=dict)  # PlanGeometry memo

    flops_memo: dict[tuple[int, int, Region], float] = field(default_factory=dict)

    def geometry(self, plan: Plan) -> PlanGeometry:
        return PlanGeometry(self.trunk, plan, self.needs)

    def flops(self, start: int, end: int, out: Region) -> float:
        """FLOPs of `out` of block [start, end) with its halo, memoised: the geometry walk
        costs ~0.1 ms, and every request asks it again for the same strips."""
        key = (start, end, out)
        value = self.flops_memo.get(key)
        if value is None:
            if len(self.flops_memo) >= NEED_CACHE_ENTRIES:
                self.flops_memo.clear()
            value = self.flops_memo[key] = float(block_flops(self.trunk, start, end, out))
        return value


NEED_CACHE_ENTRIES = 65536


class PlanGeometry:
    """`meshci.node.request.Geometry` for one plan on one trunk.

    Input regions are memoised in `needs` (pass the trunk's shared dict so that requests
    with the same cuts and strips reuse them)."""

    def __init__(self, trunk: Trunk, plan: Plan,
                 needs: dict[tuple[int, int, Region], Region] | None = None) -> None:
        self.trunk = trunk
        self.plan = plan
        self.needs = needs if needs is not None else {}

    def need(self, block: int, out: Region) -> Region:
        spec = self.plan.blocks[block]
        key = (spec.start, spec.end, out)
        region = self.needs.get(key)
        if region is None:
            if len(self.needs) >= NEED_CACHE_ENTRIES:
                self.needs.clear()
            region = self.needs[key] = block_input_region(self.trunk, spec.start, spec.end, out)
        return region

    def map_size(self, boundary: int) -> tuple[int, int]:
        blocks = self.plan.blocks
        seg = blocks[boundary].start if boundary < len(blocks) else blocks[-1].end
        _, h, w = self.trunk.boundary_shape(seg)
        return h, w


# build_model seeds torch's global RNG: two builds at once in one process (several nodes in
# one process, as in tests) would interleave it and give different weights.
_BUILD_LOCK = threading.Lock()


class ModelCache:
    """Built trunks by (model, seed, input size); least recently used beyond `capacity`."""

    def __init__(self, capacity: int = 2, isolate_builds: bool = True) -> None:
        self.capacity = capacity
        self.isolate_builds = isolate_builds
        self._entries: OrderedDict[ModelKey, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def peek(self, name: str, seed: int, size: tuple[int, int], head: bool) -> LoadedModel | None:
        """The cached entry without blocking (None while a build holds the cache, or absent)."""
        key = (name, int(seed), int(size[0]), int(size[1]))
        if not self._lock.acquire(blocking=False):
            return None
        try:
            entry = self._entries.get(key)
            if entry is not None and (entry.has_head or not head):
                self._entries.move_to_end(key)
                return entry
            return None
        finally:
            self._lock.release()

    def get(self, name: str, seed: int, size: tuple[int, int], head: bool) -> LoadedModel:
        """Blocking (call from a thread): the trunk, with head and reference when `head`."""
        key = (name, int(seed), int(size[0]), int(size[1]))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and (entry.has_head or not head):
                self._entries.move_to_end(key)
                return entry
            started = time.perf_counter()
            if head:
                with _BUILD_LOCK:
                    model = build_model(name, seed=seed)
                model.eval()
                trunk = extract_trunk(model, input_shape=(3, key[2], key[3]), name=name)
                del model
            elif self.isolate_builds:
                trunk = _build_in_child(name, seed, (key[2], key[3]))
            else:
                trunk = pickle.loads(_trunk_only_bytes(name, seed, (key[2], key[3])))
            entry = LoadedModel(key, trunk, head)
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            gc.collect()
            log.info("built %s seed=%d %dx%d (%s) in %.2f s", name, seed, key[2], key[3],
                     "with head" if head else "trunk only", time.perf_counter() - started)
            return entry


def _trunk_only_bytes(name: str, seed: int, size: tuple[int, int]) -> bytes:
    """Build the model, keep only the trunk's segments, serialise them (cloudpickle: the
    segments hold closures). Runs in a helper process when builds are isolated."""
    with _BUILD_LOCK:
        model = build_model(name, seed=seed)
    model.eval()
    trunk = extract_trunk(model, input_shape=(3, size[0], size[1]), name=name)
    del model
    # a worker never runs the head or the monolithic reference: drop them
    trunk.head = None  # type: ignore[assignment]
    trunk.reference = None  # type: ignore[assignment]
    return cloudpickle.dumps(trunk)


class BuildError(MeshciError):
    """The helper process that builds a worker's trunk failed; the message says why."""


def _build_in_child(name: str, seed: int, size: tuple[int, int]) -> Trunk:
    """A worker's trunk, built in a short-lived helper process so that this node's memory
    never holds the whole model (VGG-16's classifier alone is ~490 MB). The bytes come
    from our own child process, never from a peer, so unpickling them is safe."""
    cmd = [sys.executable, "-m", "meshci.node.runtime", name, str(seed), str(size[0]), str(size[1])]
    done = subprocess.run(cmd, capture_output=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise BuildError(lines[-1] if lines else f"building {name} failed (exit {done.returncode})")
    trunk: Trunk = pickle.loads(done.stdout)
    return trunk


def _child_main(argv: list[str]) -> int:
    """`python -m meshci.node.runtime NAME SEED H W`: the trunk's segments on stdout."""
    name, seed, h, w = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    try:
        data = _trunk_only_bytes(name, seed, (h, w))
    except MeshciError as exc:
        # unknown model and the like: the parent reports this line as the reason
        print(f"{exc}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


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
        self.cache = ModelCache(cache_capacity, isolate_builds)
        self.measure_curves = curves
        self.data_dir = data_dir
        self.progress = progress
        self.profiles: OrderedDict[str, SpeedProfile] = OrderedDict()  # curve_key -> profile
        self._curves: tuple[tuple[str, tuple[tuple[float, float], ...]], ...] = ()
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshci-compute",
                                           initializer=torch.set_num_threads,
                                           initargs=(self.threads,))
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshci-load")
        self.compute_s = 0.0
        self.tiles_computed = 0
        self.queued_s = 0.0  # predicted seconds of tile compute queued or running
        self._thread_free_at = 0.0  # perf_counter when the compute thread last finished a task
        self._sized_threads: set[int] = set()
        self.loop_free_wall = 0.0  # wall clock when an inline tile last gave the loop back
        self.inline_cpu_s = 0.0  # CPU the event-loop thread spent computing tiles inline  # threads whose torch pool is set to `threads`

    async def load(self, name: str, seed: int, size: tuple[int, int], head: bool) -> LoadedModel:
        cached = self.cache.peek(name, seed, size, head)
        if cached is not None and (not self.measure_curves or curve_key(name, size) in self.profiles):
            return cached
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._loader, self._get_and_profile, name, seed, size, head)

    def _get_and_profile(self, name: str, seed: int, size: tuple[int, int], head: bool) -> LoadedModel:
        """Blocking (the loader thread): the model, and its curves the first time."""
        entry = self.cache.get(name, seed, size, head)
        if self.measure_curves:
            self.profile(entry.trunk, size)
        return entry

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
        curves = tuple((key, profile.curve) for key, profile in self.profiles.items())
        if curves != self._curves:
            self._curves = curves
        return self._curves

    def advert(self, gflops: float, backlog_s: float,
               links: tuple[tuple[str, float, float], ...] = ()) -> Advert:
        """This node's `Advert`: its GFLOP/s, backlog and links, with its measured curves."""
        return Advert(gflops, backlog_s, links, self.curves())

    def bid_compute_s(self, item: Any, gflops: float) -> float:
        """A bidder's compute time for an auction item: by this device's curves for the
        item's model (`Item.model` is a `curve_key`) where it has them, else by `gflops`."""
        profile = self.profiles.get(item.model) if item.model else None
        start, end = item.segments
        if profile is not None and 0 <= start < end <= len(profile.curve):
            return profile.strip_s(start, end, float(item.flops))
        return float(item.flops) / (gflops * 1e9)

    def tile_s(self, loaded: LoadedModel, start: int, end: int, out: Region, gflops: float) -> float:
        """Predicted compute time of a tile (queue estimates, inline decisions): by the
        curves of its model where this device has them, else by `gflops`."""
        flops = loaded.flops(start, end, out)
        profile = self.profiles.get(curve_key(loaded.key[0], (loaded.key[2], loaded.key[3])))
        if profile is not None and 0 <= start < end <= len(profile.curve):
            return profile.strip_s(start, end, flops)
        return flops / (gflops * 1e9)

    async def run_block(self, trunk: Trunk, start: int, end: int, x: torch.Tensor,
                        have: Region, out: Region, *, inline: bool = False
                        ) -> tuple[torch.Tensor, float, float]:
        """Run segments [start, end); returns (output, compute seconds, hand-off seconds).

        `inline`: on the calling (event-loop) thread, for tiles short enough that holding
        the loop costs less than the two thread wake-ups a hand-off needs. Otherwise on
        the compute thread; the hand-off is then the wall time of the call that was
        neither this tile's compute nor waiting behind another task on that thread."""
        if inline:
            if threading.get_ident() not in self._sized_threads:
                # OpenMP's thread count is per calling thread: size this one's pool too
                torch.set_num_threads(self.threads)
                self._sized_threads.add(threading.get_ident())
            began, cpu_began = time.perf_counter(), time.thread_time()
            with torch.inference_mode():
                y = run_block(trunk, start, end, x, have, out).contiguous()
            seconds = time.perf_counter() - began
            self.inline_cpu_s += time.thread_time() - cpu_began
            self.loop_free_wall = time.time()
            self.compute_s += seconds
            self.tiles_computed += 1
            return y, seconds, 0.0
        loop = asyncio.get_running_loop()
        submitted = time.perf_counter()

        def work() -> tuple[torch.Tensor, float, float, float]:
            began = time.perf_counter()
            to_thread = max(0.0, began - max(submitted, self._thread_free_at))
            with torch.inference_mode():
                y = run_block(trunk, start, end, x, have, out)
            y = y.contiguous()
            self._thread_free_at = ended = time.perf_counter()
            return y, ended - began, to_thread, ended

        y, seconds, to_thread, ended = await loop.run_in_executor(self._compute, work)
        handoff = to_thread + max(0.0, time.perf_counter() - ended)
        self.compute_s += seconds
        self.tiles_computed += 1
        return y, seconds, handoff

    async def call(self, fn, *args):  # type: ignore[no-untyped-def]
        """Run any other torch work (head, monolithic check) on the compute thread."""
        loop = asyncio.get_running_loop()

        def work():  # type: ignore[no-untyped-def]
            try:
                with torch.inference_mode():
                    return fn(*args)
            finally:
                self._thread_free_at = time.perf_counter()

        return await loop.run_in_executor(self._compute, work)

    def close(self) -> None:
        self._compute.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)


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


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
