"""Device profiling: measured per-segment latency curves, cached on disk.

A node measures how long each segment of a model takes on this machine for a few output
row counts (full-width strips, as the planner tiles them) and fits ``t = a + b * rows``
per segment by least squares; ``a`` absorbs per-call overhead, ``b`` the per-row cost.
The fit is cached under the data dir as JSON, keyed by a hash of the model's structure
(segment ops and shapes: weights do not change the time) and the device fingerprint
(CPU model, cores, torch version, threads, and the CPU quota of the cgroup the process
runs in), so a node measures once per model and machine. Progress goes to stderr (or a
callback) while it runs.

``statistic="mean"`` times each point as the mean of its runs rather than the best: under
a CPU quota (a cgroup, a shared or throttled core) the mean includes the periods a quota
holds the process back, as real tiles meet them; a best-of catches the moments it has not
cut in yet and overstates a throttled device several times. Nodes measure with the mean.

`SpeedProfile` is a measured curve with the trunk's segment heights and FLOPs, enough to
price a tile from its segment range and FLOPs alone (a bidder's view of an auction item).
"""

from __future__ import annotations

import hashlib
import json
import math
import logging
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from meshci.cost.cluster import Device, SegmentCurve
from meshci.testbed.cpu import cpu_hierarchy
from meshci.trunk import Trunk
from meshci.trunk.region import Region

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


def default_data_dir() -> Path:
    """``$MESHCI_DATA_DIR``, else ``$XDG_CACHE_HOME/meshci``, else ``~/.cache/meshci``: what
    is kept there (profiles, heads, the node's id) is measured or made again when lost."""
    env = os.environ.get("MESHCI_DATA_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache) if cache else Path.home() / ".cache") / "meshci"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        # no /proc (macOS, containers without it): fall back to what platform knows
        pass
    return platform.processor() or platform.machine()


def cpu_quota() -> str:
    """The CPU quota of this process's cgroup (``"25000 100000"``: quota and period in
    microseconds, from v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``), or
    ``"max"`` where there is none or it cannot be read: devices emulated by quotas on one
    machine must not share their profiles.

    ``$MESHCI_CPU_QUOTA`` (same form), when set, is taken as the quota: a launcher that put
    the process in a cgroup it cannot see (``ip netns exec`` remounts /sys) states it."""
    stated = os.environ.get("MESHCI_CPU_QUOTA", "").strip()
    if stated:
        return stated
    hierarchy = cpu_hierarchy()
    if hierarchy is None:
        return "max"
    try:
        own = "/"
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            number, controllers, path = line.split(":", 2)
            if (hierarchy.version == 2 and number == "0" and controllers == "") or (
                    hierarchy.version == 1 and "cpu" in controllers.split(",")):
                own = path
                break
        folder = Path(os.path.normpath(f"{hierarchy.mount}/{own}"))
        if hierarchy.version == 2:
            return (folder / "cpu.max").read_text().strip() or "max"
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        # the group's files are not visible here (a container hiding them): no quota to tell
        return "max"
    return "max" if quota < 0 else f"{quota} {period}"


def device_fingerprint(threads: int) -> dict[str, object]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 1,
        "torch": torch.__version__,
        "threads": threads,
        "cpu_max": cpu_quota(),
    }


def model_hash(trunk: Trunk) -> str:
    """Hash of the trunk's structure (segment ops and shapes), not of its weights."""
    h = hashlib.sha256()
    h.update(repr(tuple(trunk.input_shape)).encode())
    for seg in trunk.segments:
        describe = seg.describe() if hasattr(seg, "describe") else seg.kind
        h.update(f"{seg.kind}|{describe}|{seg.in_shape}|{seg.out_shape}\n".encode())
    return h.hexdigest()[:16]


def cache_path(trunk: Trunk, threads: int, data_dir: Path | None = None) -> Path:
    key = hashlib.sha256(
        (model_hash(trunk) + json.dumps(device_fingerprint(threads), sort_keys=True)).encode()
    ).hexdigest()[:20]
    return (data_dir or default_data_dir()) / "profiles" / f"{trunk.name}-{key}.json"


def stderr_progress(done: int, total: int, label: str) -> None:
    """Profiling progress: a line redrawn in place on a terminal; elsewhere (a service's
    journal, a pipe) one log line when it starts and one when it is done."""
    if sys.stderr.isatty() and log.isEnabledFor(logging.INFO):
        sys.stderr.write(f"\rprofiling {label}: segment {done}/{total}" + ("\n" if done == total else ""))
        sys.stderr.flush()
    elif done == 1 or done == total:
        log.info("profiling %s: segment %d/%d%s", label, done, total, " done" if done == total else "")


def fit_line(rows: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares ``t = a + b * rows`` with a, b >= 0."""
    n = len(rows)
    mean_r = sum(rows) / n
    mean_t = sum(seconds) / n
    var = sum((r - mean_r) ** 2 for r in rows)
    b = 0.0 if var == 0 else sum((r - mean_r) * (t - mean_t) for r, t in zip(rows, seconds)) / var
    b = max(b, 0.0)
    a = max(mean_t - b * mean_r, 0.0)
    if b == 0.0 and mean_r > 0:
        b, a = mean_t / mean_r, 0.0
    return a, b


def measure_curves(
    trunk: Trunk,
    *,
    threads: int = 1,
    repeats: int = 3,
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0),
    progress: Progress | None = stderr_progress,
    clock: Callable[[], float] = time.perf_counter,
    statistic: str = "min",
) -> SegmentCurve:
    """Measure per-segment (a, b) on this machine (no cache); each point is the best
    (``statistic="min"``) or the mean (``"mean"``, see the module docstring) of `repeats`
    timed runs after a warm-up."""
    if statistic not in ("min", "mean"):
        raise ValueError(f"statistic must be 'min' or 'mean', got {statistic!r}")
    pick = min if statistic == "min" else statistics.fmean
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    curves = []
    try:
        with torch.inference_mode():
            total = len(trunk.segments)
            for k, seg in enumerate(trunk.segments):
                _, h, w = seg.out_shape
                counts = sorted({max(1, round(h * f)) for f in fractions})
                samples: list[float] = []
                for rows in counts:
                    out = Region(0, rows, 0, w)
                    have = seg.input_region(out)
                    x = torch.randn(1, seg.in_shape[0], have.height, have.width)
                    seg.run(x, have, out)  # warm-up
                    runs = []
                    for _ in range(max(1, repeats)):
                        t0 = clock()
                        seg.run(x, have, out)
                        runs.append(clock() - t0)
                    samples.append(pick(runs))
                curves.append(fit_line(counts, samples))
                if progress is not None:
                    progress(k + 1, total, trunk.name)
    finally:
        torch.set_num_threads(previous)
    return tuple(curves)


def load_or_measure(
    trunk: Trunk,
    *,
    threads: int = 1,
    data_dir: Path | None = None,
    progress: Progress | None = stderr_progress,
    **measure_kwargs: object,
) -> SegmentCurve:
    """The cached curves of this model on this machine, measuring them on first use."""
    path = cache_path(trunk, threads, data_dir)
    if path.exists():
        try:
            data = json.loads(path.read_text())
            curve = tuple((float(a), float(b)) for a, b in data["curves"])
            if len(curve) == len(trunk.segments):
                return curve
            log.warning(
                "profile %s has %d segments, model has %d: measuring again", path, len(curve), len(trunk.segments)
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # a corrupt or foreign cache file: measure again rather than fail the node
            log.warning("ignoring unreadable profile %s: %s", path, exc)
    curve = measure_curves(trunk, threads=threads, progress=progress, **measure_kwargs)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own: nodes on one machine may measure the same model at once
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(
        json.dumps(
            {
                "model": trunk.name,
                "model_hash": model_hash(trunk),
                "fingerprint": device_fingerprint(threads),
                "curves": [list(ab) for ab in curve],
            },
            indent=1,
        )
    )
    tmp.replace(path)
    prune_profiles(path.parent, keep=MAX_PROFILE_FILES)
    return curve


# Each (model, input size) has its own profile; requests name both, so without a bound a
# client could fill the disk one size at a time. The least recently written go first.
MAX_PROFILE_FILES = 64


def prune_profiles(folder: Path, keep: int) -> None:
    """Keep only the `keep` most recently written profiles in `folder`."""
    try:
        files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    except OSError as exc:
        # another node pruned the same folder meanwhile: next write prunes again
        log.info("cannot list profiles in %s: %s", folder, exc)
        return
    for old in files[:-keep]:
        old.unlink(missing_ok=True)


def effective_gflops(trunk: Trunk, curve: SegmentCurve) -> float:
    """Effective GFLOP/s of a device over the whole trunk, from its curves."""
    seconds = sum(a + b * seg.out_shape[1] for (a, b), seg in zip(curve, trunk.segments))
    return trunk.flops / seconds / 1e9 if seconds > 0 else 0.0


def profiled_device(name: str, trunk: Trunk, curve: SegmentCurve, **fields: object) -> Device:
    """A `Device` carrying ``curve`` for ``trunk`` and the matching effective GFLOP/s."""
    gflops = effective_gflops(trunk, curve)
    return Device(name=name, gflops=gflops, curves=((trunk.name, curve),), **fields)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SpeedProfile:
    """A device's measured curve for one trunk, with the trunk's per-segment output heights
    and FLOPs (full maps): enough to price a strip of a block from its segment range and
    its FLOPs (halo included) without the trunk's geometry."""

    model: str
    curve: SegmentCurve
    heights: tuple[int, ...]
    flops: tuple[float, ...]

    @classmethod
    def of(cls, trunk: Trunk, curve: SegmentCurve) -> SpeedProfile:
        if len(curve) != len(trunk.segments):
            raise ValueError(f"curve has {len(curve)} segments, {trunk.name} has {len(trunk.segments)}")
        return cls(trunk.name, tuple((float(a), float(b)) for a, b in curve),
                   tuple(int(seg.out_shape[1]) for seg in trunk.segments),
                   tuple(float(seg.flops) for seg in trunk.segments))

    def strip_s(self, start: int, end: int, flops: float) -> float:
        """Seconds for a strip of segments [start, end) that costs `flops` FLOPs: each
        segment's fixed cost, plus its per-row cost over the share of its rows that the
        strip's FLOPs are of the block's (halo rows count as the FLOPs count them)."""
        if not 0 <= start < end <= len(self.curve):
            raise ValueError(f"segments [{start}, {end}) outside 0..{len(self.curve)}")
        total = sum(self.flops[start:end])
        share = flops / total if total > 0 else 1.0
        fixed = sum(a for a, _ in self.curve[start:end])
        rows = sum(b * h for (_, b), h in zip(self.curve[start:end], self.heights[start:end]))
        return fixed + share * rows


@dataclass
class SpeedCorrection:
    """How much slower (> 1) or faster (< 1) than its measured curves a device really
    computes, per curve key: an EWMA of measured over predicted tile compute time.

    Curves are measured once (and cached on disk); a device that was busy while measuring,
    or that is throttled now, computes at another speed. Every tile it computes is a
    sample; the device advertises and bids with its curves times `factor`, which moves in
    steps of `step` only (each step re-plans the mesh's standing plans)."""

    alpha: float = 0.2
    step: float = 1.15
    min_predicted_s: float = 0.002  # tiles shorter than this are noise, not speed
    ratios: dict[str, float] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    advertised: dict[str, float] = field(default_factory=dict)

    def observe(self, key: str, predicted_s: float, measured_s: float) -> bool:
        """A tile predicted at `predicted_s` (uncorrected curves) took `measured_s`; True
        when this moved the advertised factor by a step."""
        if not (math.isfinite(predicted_s) and math.isfinite(measured_s)) or predicted_s < self.min_predicted_s \
                or measured_s <= 0:
            return False
        sample = min(10.0, max(0.1, measured_s / predicted_s))
        old = self.ratios.get(key)
        ratio = self.ratios[key] = sample if old is None else (1.0 - self.alpha) * old + self.alpha * sample
        self.samples[key] = self.samples.get(key, 0) + 1
        current = self.factor(key)
        if abs(math.log(ratio / current)) < math.log(self.step) * 0.75:
            return False  # within the step around what is advertised (no flapping at a step's edge)
        moved = self.step ** round(math.log(ratio) / math.log(self.step))
        self.advertised[key] = moved
        return moved != current

    def factor(self, key: str) -> float:
        """What this device advertises for `key`: its curves' times times this (1 before
        any sample)."""
        return self.advertised.get(key, 1.0)

    def curve(self, key: str, curve: SegmentCurve) -> SegmentCurve:
        """`curve` as this device computes now."""
        f = self.factor(key)
        return curve if f == 1.0 else tuple((a * f, b * f) for a, b in curve)
