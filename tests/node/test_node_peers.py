"""`meshci peers`: the members of a 3-node mesh, with speed, load, links and version; a
killed member drops out within the failure-detection time."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import pytest
from inprocess import crash, start_mesh

from meshci import __version__
from meshci.node.client import members
from meshci.node.membership import DEAD_AFTER_S, HEARTBEAT_INTERVAL_S, Advert
from meshci.node.view import format_status, format_table, with_activity

pytestmark = pytest.mark.timeout(120)

SECRET = os.urandom(32)


async def _cli_peers(address: str, secret_file: str, *extra: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshci", "peers", "--via", address, "--secret-file", secret_file, *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def test_peers_lists_the_members_and_drops_a_killed_one(tmp_path) -> None:
    secret_file = tmp_path / "mesh.key"
    secret_file.write_text(SECRET.hex())
    secret_file.chmod(0o600)
    nodes = await start_mesh({"p1": 2.0, "p2": 3.0, "p3": 4.0}, SECRET)
    try:
        # a link is estimated from the first heartbeat round trip to each peer
        async with asyncio.timeout(10):
            while {n for n, _, _ in nodes[0].link_view()} != {"p2", "p3"}:
                await asyncio.sleep(0.05)
        status, out, err = await _cli_peers(str(nodes[0].address), str(secret_file), "--json")
        assert status == 0, err
        rows = json.loads(out)
        assert [r["name"] for r in rows] == ["p1", "p2", "p3"]
        assert rows[0]["status"] == "self" and {r["status"] for r in rows[1:]} <= {"alive", "suspect"}
        assert [r["gflops"] for r in rows] == [2.0, 3.0, 4.0]
        assert all(r["version"] == __version__ and r["load_s"] >= 0 for r in rows)
        assert rows[1]["address"] == str(nodes[1].address)
        assert set(rows[0]["links"]) == {"p2", "p3"}  # p1's link estimates to each peer

        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshci", "status", "--via", str(nodes[1].address), "--secret-file",
            str(secret_file), "--once", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out_b, err_b = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err_b.decode()
        lines = out_b.decode().splitlines()
        assert lines[0].split()[:5] == ["NAME", "STATUS", "GFLOP/S", "LOAD", "IN"]
        # every member answered for itself: requests in flight and tiles, no `?`
        assert sorted(line.split()[0] for line in lines[1:]) == ["p1", "p2", "p3"] and "?" not in out_b.decode()

        await crash(nodes[2])
        killed = time.monotonic()
        while len(await members(nodes[0].address, secret=SECRET)) != 2:
            assert time.monotonic() - killed < DEAD_AFTER_S + 4 * HEARTBEAT_INTERVAL_S, "p3 still listed"
            await asyncio.sleep(0.1)
        status, out, err = await _cli_peers(str(nodes[0].address), str(secret_file))
        assert status == 0, err
        assert "p3" not in out and "p2" in out and "2 members, as p1 sees them" in out
    finally:
        await asyncio.gather(*(n.close() for n in nodes[:2]))


def test_a_hostile_advert_version_is_refused() -> None:
    assert Advert.from_json({"gflops": 1, "version": "0.1.0"}).version == "0.1.0"
    for bad in (7, "x" * 33, "bad\x1b[2J"):
        with pytest.raises(ValueError, match="bad advert version"):
            Advert.from_json({"gflops": 1, "version": bad})


def test_the_table_shows_each_member() -> None:
    rows = [{"name": "a", "address": "h:1", "status": "self", "gflops": 2.5, "load_s": 0.25, "version": "0.1.0",
             "links": {"b": {"mbps": 94.1, "latency_ms": 1.5}}},
            {"name": "b", "address": "h:2", "status": "suspect", "gflops": 1.0, "load_s": 0.0, "version": None,
             "links": {}}]
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:3] == ["NAME", "ADDRESS", "STATUS"]
    assert lines[1].split() == ["a", "h:1", "self", "2.5", "0.25", "s", "0.1.0", "b", "94.1/1.5"]
    assert lines[2].split() == ["b", "h:2", "suspect", "1", "0.00", "s", "?", "-"]


def test_status_shows_what_each_member_says_of_itself() -> None:
    rows = [{"name": "a", "address": "h:1", "status": "self", "gflops": 2.0, "load_s": 0.5, "links": {}},
            {"name": "b", "address": "h:2", "status": "alive", "gflops": 1.0, "load_s": 0.0, "links": {}}]
    merged = with_activity(rows, {"a": {"requests_in_flight": 2, "tiles_computed": 40}, "b": None})
    lines = format_status(merged).splitlines()
    assert lines[1].split() == ["a", "self", "2", "0.50", "s", "2", "40", "h:1"]
    assert lines[2].split() == ["b", "alive", "1", "0.00", "s", "?", "?", "h:2"]  # b did not answer
