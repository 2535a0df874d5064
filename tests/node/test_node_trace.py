"""`meshci infer --trace FILE`: a 3-node request's timeline as Chrome trace-event JSON."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from inprocess import start_mesh

from meshci.node.trace import Span, TraceLog, chrome_trace

pytestmark = pytest.mark.timeout(120)

SECRET = os.urandom(32)
SKEW_S = 0.002  # the heartbeat clock offsets are estimates (half a round trip): a little slack


async def test_a_three_node_trace_parses_with_every_device_and_tiles_inside_the_request(tmp_path: Path) -> None:
    key = tmp_path / "mesh.key"
    key.write_text(SECRET.hex())
    key.chmod(0o600)
    out = tmp_path / "request.json"
    # a slow requester and two fast workers; modnn spreads every layer over all three
    nodes = await start_mesh({"t1": 5.0, "t2": 0.05, "t3": 5.0}, SECRET)
    try:
        await asyncio.sleep(1.2)  # a few heartbeat echoes: clock offsets measured
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshci", "infer", "--via", str(nodes[1].address), "--secret-file", str(key),
            "--model", "resnet18", "--strategy", "modnn", "--size", "32", "32", "--trace", str(out), "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 0, stderr.decode()
    finally:
        await asyncio.gather(*(n.close() for n in nodes))
    answer = json.loads(stdout)
    trace = json.loads(out.read_text())
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    by_device = {names[e["pid"]].split()[0] for e in spans}
    assert by_device == {"t1", "t2", "t3"}, (by_device, answer["devices"])
    assert names[1] == "t2 (requester)"
    (request,) = [e for e in spans if e["name"] == "request"]
    assert names[request["pid"]].startswith("t2")
    computes = [e for e in spans if e["cat"] == "compute"]
    assert computes and {names[e["pid"]].split()[0] for e in computes} >= {"t1", "t3"}
    for e in computes:
        assert request["ts"] - SKEW_S * 1e6 <= e["ts"], e
        assert e["ts"] + e["dur"] <= request["ts"] + request["dur"] + SKEW_S * 1e6, e
    assert any(e["cat"] == "send" for e in spans) and any(e["cat"] == "receive" for e in spans)
    # the requester scattered the input: a send to each worker, which each received
    scatter = {e["args"]["to"] for e in spans if e["name"].startswith("plan and input to")}
    assert scatter >= {"t1", "t3"}
    receivers = {names[e["pid"]].split()[0] for e in spans if e["cat"] == "receive" and e["args"]["from"] == "t2"}
    assert receivers >= {"t1", "t3"}
    assert any(e["cat"] == "head" for e in spans)
    assert trace["otherData"]["missing"] == {}


def test_clock_offsets_move_each_device_onto_the_requester_clock() -> None:
    devices = {"req": [Span("request", "request", 100.0, 1.0)],
               "w": [Span("block 0 tile 0", "compute", 105.25, 0.5)]}  # w's clock runs 5 s ahead
    trace = chrome_trace(devices, {"w": 5.0}, "req")
    x = {e["name"]: e for e in trace["traceEvents"] if e["ph"] == "X"}
    assert x["request"]["ts"] == 0 and x["request"]["dur"] == 1e6
    assert x["block 0 tile 0"]["ts"] == 250000 and x["block 0 tile 0"]["dur"] == 500000
    assert x["request"]["pid"] != x["block 0 tile 0"]["pid"]


def test_the_log_is_bounded_and_hostile_spans_are_refused() -> None:
    log = TraceLog(max_requests=2, max_events=3)
    for rid in (1, 2, 3):
        for i in range(5):
            log.record(rid, Span(f"s{i}", "compute", float(i), 0.1))
    assert log.spans(1) == [] and len(log.spans(3)) == 3
    for bad in ({"name": "x", "cat": "mine", "start": 0, "dur": 1},
                {"name": "x", "cat": "send", "start": float("nan"), "dur": 1},
                {"name": "x", "cat": "send", "start": 0, "dur": -1}, "span"):
        with pytest.raises(ValueError):
            Span.from_json(bad)
