#!/usr/bin/env python
"""The full authenticated fuzzing campaign against a live node (issue 11).

Two in-process nodes over loopback; frames of every kind recorded from real requests of
every strategy are mutated (`meshci.node.fuzz`) and sent by a client that holds the
cluster secret, on connections authenticated as itself, as a client and as the real peer.
Afterwards: log records at ERROR or with a traceback (must be none), connections the node
dropped without an ERROR reason (none), tasks left running, request state, the peer table,
resident memory before and after, and an exact request through every strategy.

Usage: tools/fuzz_node.py [--frames 10000] [--seed 1] [--json]
Exit status 1 when the campaign finds anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    # the campaign counts the log itself (meshci.node.fuzz_run.LogWatch); nothing on stderr
    logging.getLogger().addHandler(logging.NullHandler())
    from meshci.node.fuzz_run import fuzz_mesh

    outcome = asyncio.run(fuzz_mesh(args.frames, seed=args.seed))
    summary = outcome.summary()
    findings = (len(outcome.tracebacks) + len(outcome.report.unexplained_drops)
                + sum(not ok for ok in outcome.exact.values()) + len(outcome.notes))
    if args.json:
        print(json.dumps({**summary, "findings": findings, "tracebacks": outcome.tracebacks,
                          "unexplained": outcome.report.unexplained_drops, "notes": outcome.notes}))
    else:
        for key, value in summary.items():
            print(f"{key:>22}: {value}")
        for line in outcome.tracebacks[:50]:
            print(f"ERROR/traceback: {line}")
        for line in outcome.report.unexplained_drops[:50]:
            print(f"dropped without a reason after: {line}")
        for note in outcome.notes:
            print(f"note: {note}")
        print(f"{'findings':>22}: {findings}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
