"""Requests into an emulated cluster from inside one of its devices (the root namespace
cannot reach the bridge), for the testbed's mesh tests."""

from __future__ import annotations

import json
import sys
from typing import Any

from meshci.testbed import bed


def drive(state: dict[str, Any], device: str, vias: list[str], args: list[str]) -> list[dict[str, Any]]:
    """`meshci.testbed.drive` run inside `device` against the nodes of `vias`: one result per
    request, each a RESULT's meta (or an `error`); fails the test when the driver failed."""
    argv = [sys.executable, "-m", "meshci.testbed.drive", "--secret-file", state["secret_file"],
            *(f"--via={bed.device_entry(state, v)['node']}" for v in vias), *args]
    done = bed.run_in(state, device, argv, timeout=900)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, (done.stderr[-3000:], [r.get("error") for r in results])
    return results
