"""Liveness that load cannot fool (issue 10, item 3), on a rate-shaped slow link: two
devices joined by 10 Mbit/s (htb) links, a VGG-16 request at 224 x 224 spread over both
(modnn: every layer's strips cross the link, frames of megabytes that take longer on the
wire than the fixed failure-detection time) completes exact, and no node is declared dead.

Root only (marker `testbed`); skipped with the reason found by trying elsewhere. Run it
serialised with other testbed runs (`flock /work/notes/testbed.lock pytest ...`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from meshdrive import drive

from meshci.node.membership import DEAD_AFTER_S
from meshci.testbed import bed
from meshci.testbed.cpu import cgroup_support
from meshci.testbed.netns import netns_support
from meshci.testbed.spec import spec_from_dict

pytestmark = pytest.mark.testbed

RATE_MBIT = 10
CLUSTER = {
    "devices": [{"name": "rpi4-a", "profile": "rpi4"}, {"name": "rpi4-b", "profile": "rpi4"}],
    "links": {"default": {"mbps": RATE_MBIT, "latency_ms": 2.0}},
    "medium": "switched",
    "requester": "rpi4-a",
}
SIZE = ["224", "224"]


@pytest.fixture(scope="module")
def testbed() -> Iterator[dict[str, Any]]:
    for reason in (netns_support(), cgroup_support()):
        if reason:
            pytest.skip(reason)
    name = f"s{os.getpid() % 100000}"
    bed.down(name)
    try:
        yield bed.up(spec_from_dict(CLUSTER, os.cpu_count() or 1, "test"), name=name, index=os.getpid())
    finally:
        bed.down(name)


def test_frames_slower_than_failure_detection_complete_and_nobody_is_declared_dead(
        testbed: dict[str, Any], tmp_path: Path) -> None:
    everyone = ["rpi4-a", "rpi4-b"]
    for device in everyone:  # build VGG-16 and measure its curves on each device first
        drive(testbed, device, [device], ["--model=vgg16", "--strategy=local", "--size", *SIZE])
    trace_file = tmp_path / "trace.json"
    [result] = drive(testbed, "rpi4-a", ["rpi4-a"], ["--model=vgg16", "--strategy=modnn", "--size", *SIZE,
                                                       "--check", "--timeout", "900", "--trace", str(trace_file)])
    assert "error" not in result and result["check_ok"], result
    assert set(result["shares"]) == set(everyone) and all(s > 0 for s in result["shares"].values()), result
    receives = [e for e in json.loads(trace_file.read_text())["traceEvents"]
                if str(e.get("name", "")).startswith("receive from") and "dur" in e]
    slowest = max(receives, key=lambda e: e["dur"])
    print(f"\nVGG-16 modnn at 224 over {RATE_MBIT} Mbit/s: {result['latency_s']:.1f} s; slowest frame "
          f"{slowest['dur'] / 1e6:.1f} s for {slowest.get('args', {}).get('bytes', 0) / 1e6:.1f} MB "
          f"({sum(e['dur'] / 1e6 > DEAD_AFTER_S for e in receives)} of {len(receives)} frames over "
          f"{DEAD_AFTER_S:g} s)")
    assert slowest["dur"] / 1e6 > DEAD_AFTER_S  # frames outlasted the fixed failure timeout ...
    views = {r["via"]: r["stats"] for r in drive(testbed, "rpi4-a", everyone, ["--stats"])}
    for view in views.values():  # ... and neither node was ever declared dead
        assert view["peer_failures"] == 0, view["peers"]
        assert set(view["peers"].values()) == {"alive"}, view["peers"]
