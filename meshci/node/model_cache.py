"""Built models on a node: trunks by (model, seed, input size), their heads, references.

A node needs a model's trunk segments to compute tiles. Only the plan's head device needs
the head, and every device holding a tile of the trunk output needs the columns of the
split head's first layer its tile touches (`meshci.trunk.head`). A trunk is built in a
short-lived helper process that hands back only the segments, so a node serving VGG-16
never holds its ~490 MB classifier just to compute tiles. The helper also writes the
head's tensors once to a file under the node's data folder (`heads/`), which nodes map
into memory (`torch.load(mmap=True)`): pages are read only where a tile touches them, and
the nodes of one machine share them. The monolithic reference for ``--check`` is the
whole model, built in-process only when a check asks for it.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import cloudpickle
import torch
from torch import nn

from meshci.errors import MeshciError
from meshci.models.registry import build_model
from meshci.planning.plan import Plan
from meshci.tiling import block_flops, block_input_region
from meshci.trunk import Region, Trunk, extract_trunk
from meshci.trunk.head import HeadCost, HeadSplit
from meshci.weights import child_env

log = logging.getLogger(__name__)

ModelKey = tuple[str, int, int, int]  # model name, seed, input height, input width
BUILD_TIMEOUT_S = 240.0  # the helper process is killed after this
# A node waits this long for a load: longer than a build may take, so a load it gave up on
# never leaves a build running on the single loader thread in front of later loads
LOAD_TIMEOUT_S = BUILD_TIMEOUT_S + 30.0
NEED_CACHE_ENTRIES = 65536
HEAD_FILE_VERSION = 2  # 2: the split head's weight by bin row first


@dataclass
class HeadSource:
    """A trunk's head as a worker gets it: the split (`HeadSplit`) when the head has a
    linear prefix, else the whole head module. With `path`, their tensors are on the
    ``meta`` device and live in that file (`materialise` maps them in)."""

    split: HeadSplit | None
    whole: nn.Module | None
    path: str | None = None

    def materialise(self) -> HeadSource:
        if self.path is None:
            return self
        state = torch.load(self.path, mmap=True, weights_only=True, map_location="cpu")
        if self.split is not None:
            rest = self.split.rest
            rest.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("rest.")},
                                 strict=True, assign=True)
            split = HeadSplit(self.split.channels, self.split.height, self.split.width, self.split.oh,
                              self.split.ow, state["weight"], state["bias"], rest)
            _check_shape(split.weight, (split.oh, split.out_features, split.ow, split.channels), self.path)
            return HeadSource(split, None)
        assert self.whole is not None
        self.whole.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("whole.")},
                                   strict=True, assign=True)
        return HeadSource(None, self.whole)

    def run(self, trunk_out: torch.Tensor) -> torch.Tensor:
        """The whole head on the whole trunk output."""
        if self.split is not None:
            return self.split(trunk_out)
        assert self.whole is not None
        return self.whole(trunk_out)


def _check_shape(t: torch.Tensor, shape: tuple[int, ...], path: str) -> None:
    if tuple(t.shape) != shape:
        raise BuildError(f"{path}: head tensor of shape {tuple(t.shape)}, expected {shape}")


@dataclass
class LoadedModel:
    key: ModelKey
    trunk: Trunk
    has_head: bool  # the trunk's own head and reference are there (built in this process)
    head_source: HeadSource | None = None
    needs: dict[tuple[int, int, Region], Region] = field(default_factory=dict)  # PlanGeometry memo
    flops_memo: dict[tuple[int, int, Region], float] = field(default_factory=dict)
    _head: HeadSource | None = None
    _head_lock: threading.Lock = field(default_factory=threading.Lock)

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

    def head(self) -> HeadSource:
        """The head, its tensors mapped in on first use (blocking: call off the loop)."""
        with self._head_lock:
            if self._head is None:
                if self.head_source is not None:
                    self._head = self.head_source.materialise()
                else:  # built in this process with its head
                    shape = self.trunk.boundary_shape(len(self.trunk.segments))
                    split = HeadSplit.of(self.trunk.head, shape)
                    self._head = HeadSource(split, None if split is not None else self.trunk.head)
            return self._head

    def split_features(self) -> int | None:
        """Length of a part of the split head's prefix (None: the head is not split)."""
        source = self.head_source if self.head_source is not None else self.head()
        return source.split.out_features if source.split is not None else None


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
    """Built trunks by (model, seed, input size); least recently used beyond `capacity`.
    `head_dir`: where the build helper writes head tensor files (None: heads stay in
    memory); `isolate_builds`: build in a helper process (else in this one)."""

    def __init__(self, capacity: int = 2, isolate_builds: bool = True, head_dir: Path | None = None) -> None:
        self.capacity = capacity
        self.isolate_builds = isolate_builds
        self.head_dir = head_dir
        self._entries: OrderedDict[ModelKey, LoadedModel] = OrderedDict()
        self._references: OrderedDict[ModelKey, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def peek(self, name: str, seed: int, size: tuple[int, int]) -> LoadedModel | None:
        """The cached entry without blocking (None while a build holds the cache, or absent)."""
        key = (name, int(seed), int(size[0]), int(size[1]))
        if not self._lock.acquire(blocking=False):
            return None
        try:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry
        finally:
            self._lock.release()

    def get(self, name: str, seed: int, size: tuple[int, int]) -> LoadedModel:
        """Blocking (call from a thread): the trunk, with the head's source."""
        key = (name, int(seed), int(size[0]), int(size[1]))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            started = time.perf_counter()
            log.info("building %s seed=%d %dx%d ...", name, seed, key[2], key[3])
            head_dir = str(self.head_dir) if self.head_dir is not None else None
            if self.isolate_builds:
                trunk, source = _build_in_child(name, seed, (key[2], key[3]), head_dir)
            else:
                trunk, source = pickle.loads(_trunk_only_bytes(name, seed, (key[2], key[3]), head_dir))
            entry = LoadedModel(key, trunk, False, source)
            self._entries[key] = entry
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            gc.collect()
            log.info("built %s seed=%d %dx%d (trunk; head %s) in %.2f s", name, seed, key[2], key[3],
                     "split" if source.split is not None else "whole", time.perf_counter() - started)
            return entry

    def reference(self, name: str, seed: int, size: tuple[int, int]) -> LoadedModel:
        """Blocking: the whole model built in this process (trunk, head and the monolithic
        reference), for ``--check``; one kept."""
        key = (name, int(seed), int(size[0]), int(size[1]))
        with self._lock:
            entry = self._references.get(key)
            if entry is None:
                with _BUILD_LOCK:  # torch.fx tracing is not thread-safe either
                    model = build_model(name, seed=seed)
                    model.eval()
                    trunk = extract_trunk(model, input_shape=(3, key[2], key[3]), name=name)
                del model
                entry = LoadedModel(key, trunk, True)
                self._references.clear()
                self._references[key] = entry
            return entry


def head_file(head_dir: str, name: str, seed: int, size: tuple[int, int]) -> Path:
    """The file of a model's head tensors: named by model, seed, size and a digest of the
    model name (a user model `pkg.mod:fn` has characters a file name should not)."""
    digest = hashlib.blake2b(f"{HEAD_FILE_VERSION}|{name}|{seed}|{size}".encode(), digest_size=8).hexdigest()
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]
    return Path(head_dir) / f"{safe}-s{seed}-{size[0]}x{size[1]}-{digest}.pt"


def _trunk_only_bytes(name: str, seed: int, size: tuple[int, int], head_dir: str | None) -> bytes:
    """Build the model, keep the trunk's segments and the head's source, serialise them
    (cloudpickle: the segments hold closures). With `head_dir`, the head's tensors go to a
    file there (written once) and travel as ``meta`` tensors. Runs in a helper process
    when builds are isolated."""
    # the whole build under the lock: torch.fx tracing patches every module's call process-wide
    # (nodes sharing a process), and the head's analysis below runs modules of its own
    with _BUILD_LOCK:
        return _trunk_only_bytes_locked(name, seed, size, head_dir)


def _trunk_only_bytes_locked(name: str, seed: int, size: tuple[int, int], head_dir: str | None) -> bytes:
    model = build_model(name, seed=seed)
    model.eval()
    trunk = extract_trunk(model, input_shape=(3, size[0], size[1]), name=name)
    del model
    out_shape = trunk.boundary_shape(len(trunk.segments))
    split = HeadSplit.of(trunk.head, out_shape)
    source = HeadSource(split, None if split is not None else trunk.head)
    if head_dir is not None:
        path = head_file(head_dir, name, seed, size)
        if split is not None:
            state = {"weight": split.weight, "bias": split.bias,
                     **{f"rest.{k}": v for k, v in split.rest.state_dict().items()}}
        else:
            state = {f"whole.{k}": v for k, v in trunk.head.state_dict().items()}
        if not path.exists():
            _write_atomically(path, state)
        if split is not None:
            skeleton = HeadSplit(split.channels, split.height, split.width, split.oh, split.ow,
                                 split.weight.to("meta"), split.bias.to("meta"), split.rest.to("meta"))
            source = HeadSource(skeleton, None, str(path))
        else:
            source = HeadSource(None, trunk.head.to("meta"), str(path))
    # a worker never runs the monolithic reference, and the head travels as its source
    trunk.head_cost = HeadCost.of(trunk.head, out_shape)  # type: ignore[attr-defined]
    trunk.head = None  # type: ignore[assignment]
    trunk.reference = None  # type: ignore[assignment]
    return cloudpickle.dumps((trunk, source))


def _write_atomically(path: Path, state: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
        os.replace(tmp, path)  # nodes building the same model at once: the last one wins
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class BuildError(MeshciError):
    """The helper process that builds a worker's trunk failed; the message says why."""


def _build_in_child(name: str, seed: int, size: tuple[int, int], head_dir: str | None
                    ) -> tuple[Trunk, HeadSource]:
    """A trunk and its head's source, built in a short-lived helper process so that this
    node's memory never holds the whole model (VGG-16's classifier alone is ~490 MB). The
    bytes come from our own child process, never from a peer, so unpickling them is safe."""
    cmd = [sys.executable, "-m", "meshci.node.model_cache", name, str(seed), str(size[0]), str(size[1])]
    if head_dir is not None:
        cmd.append(head_dir)
    done = subprocess.run(cmd, capture_output=True, timeout=BUILD_TIMEOUT_S, env=child_env())
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise BuildError(lines[-1] if lines else f"building {name} failed (exit {done.returncode})")
    built: tuple[Trunk, HeadSource] = pickle.loads(done.stdout)
    return built


def _child_main(argv: list[str]) -> int:
    """`python -m meshci.node.model_cache NAME SEED H W [HEAD_DIR]`: the pickled trunk
    segments and head source on stdout."""
    name, seed, h, w = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    head_dir = argv[4] if len(argv) > 4 else None
    try:
        data = _trunk_only_bytes(name, seed, (h, w), head_dir)
    except MeshciError as exc:
        # unknown model and the like: the parent reports this line as the reason
        sys.stderr.write(f"{exc}\n")
        return 2
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
