"""`tools/bench --quick` (issue 9): the comparison runs end to end on the emulated cluster and
writes what it promises. It checks the bench works, not a speed: no figure is asserted."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshci.testbed.bench import COLUMNS, STRATEGIES
from meshci.testbed.cpu import cgroup_support
from meshci.testbed.netns import netns_support

pytestmark = pytest.mark.testbed
ROOT = Path(__file__).resolve().parents[2]


def test_quick_bench_writes_its_table_rows_and_plots(tmp_path):
    for reason in (netns_support(), cgroup_support()):
        if reason:
            pytest.skip(reason)
    done = subprocess.run([str(ROOT / "tools" / "bench"), "--quick", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=900, env={"MESHCI_PYTHON": sys.executable, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and set(COLUMNS) <= set(rows[0])
    # every strategy, every round, timed at the client, and each strategy checked exact once
    assert sorted((r["strategy"], r["run"]) for r in rows) == sorted((s, str(i)) for s in STRATEGIES for i in range(2))
    for r in rows:
        assert float(r["latency_s"]) > 0 and float(r["predicted_s"]) > 0
        assert float(r["max_abs_diff"]) < 1e-3, r
    table = (tmp_path / "results.md").read_text()
    assert "| edgeci |" in table and "ideal bound" in table and "edgeci vs the best other" in table
    trace = json.loads((tmp_path / "trace-hetero4-100-resnet34.json").read_text())
    tracks = {e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "process_name"}
    assert any("(requester)" in t for t in tracks)
    for plot in ("latency.png", "simulated.png", "timeline.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    print("\n" + table)
