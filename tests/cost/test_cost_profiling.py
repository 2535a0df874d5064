"""Profiling: line fits, measurement with an injected clock, the on-disk cache."""

from __future__ import annotations

import itertools
import json

import pytest

from meshci.cost.profiling import (
    cache_path,
    device_fingerprint,
    fit_line,
    load_or_measure,
    measure_curves,
    model_hash,
    profiled_device,
    prune_profiles,
)


def test_fit_line_exact():
    a, b = fit_line([1, 2, 4], [0.3, 0.5, 0.9])
    assert a == pytest.approx(0.1) and b == pytest.approx(0.2)


def test_fit_line_never_negative():
    a, b = fit_line([1, 2], [0.5, 0.4])
    assert a >= 0 and b >= 0


def fake_clock():
    ticks = itertools.count()
    return lambda: next(ticks) * 0.001  # every call advances 1 ms: each run "takes" 1 ms


def test_measure_curves_with_fake_clock(tiny_trunk):
    seen = []
    curve = measure_curves(tiny_trunk, repeats=2, progress=lambda d, t, label: seen.append((d, t)), clock=fake_clock())
    assert len(curve) == len(tiny_trunk.segments)
    assert seen[-1] == (len(tiny_trunk.segments), len(tiny_trunk.segments))
    for a, b in curve:
        assert a >= 0 and b >= 0
        assert a + b > 0


def test_cache_hit_does_not_measure_again(tiny_trunk, tmp_path):
    calls = []
    progress = lambda d, t, label: calls.append(d)  # noqa: E731
    first = load_or_measure(tiny_trunk, data_dir=tmp_path, progress=progress, clock=fake_clock(), repeats=1)
    n_calls = len(calls)
    assert n_calls == len(tiny_trunk.segments)
    second = load_or_measure(tiny_trunk, data_dir=tmp_path, progress=progress, repeats=1)
    assert second == first and len(calls) == n_calls
    path = cache_path(tiny_trunk, 1, tmp_path)
    data = json.loads(path.read_text())
    assert data["model_hash"] == model_hash(tiny_trunk)
    assert data["fingerprint"] == device_fingerprint(1)
    # another thread count is another device fingerprint: another file
    assert cache_path(tiny_trunk, 2, tmp_path) != path


def test_corrupt_cache_is_measured_again(tiny_trunk, tmp_path):
    path = cache_path(tiny_trunk, 1, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{broken")
    curve = load_or_measure(tiny_trunk, data_dir=tmp_path, progress=None, clock=fake_clock(), repeats=1)
    assert len(curve) == len(tiny_trunk.segments)
    assert json.loads(path.read_text())["curves"]


def test_profiled_device(tiny_trunk):
    curve = tuple((0.0, 1e-4) for _ in tiny_trunk.segments)
    dev = profiled_device("me", tiny_trunk, curve)
    assert dev.curve_for("tiny", len(tiny_trunk.segments)) == curve
    assert dev.gflops > 0


def test_profiles_on_disk_are_bounded(tmp_path):
    """Every input size is its own profile: only the most recently written are kept."""
    import os

    for i in range(6):
        path = tmp_path / f"m-{i}.json"
        path.write_text("{}")
        os.utime(path, ns=(i * 10**9, i * 10**9))
    prune_profiles(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["m-3.json", "m-4.json", "m-5.json"]
