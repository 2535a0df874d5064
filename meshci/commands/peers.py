"""`meshci peers --via HOST:PORT [--json] [--watch S]`: the mesh's members as a node sees
them: name, address, measured speed, current load, link estimates, version."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from meshci.commands.common import add_client_arguments, client_target


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("peers", help="list the mesh's members, via any node",
                              description="List the members of a mesh as one of its nodes sees them: "
                                          "name, address, status, measured GFLOP/s, load (seconds of "
                                          "queued work), link estimates to each peer, version.")
    add_client_arguments(p)
    p.add_argument("--json", action="store_true", help="print the members as JSON")
    p.add_argument("--watch", type=float, metavar="S",
                   help="redraw every S seconds until Ctrl-C (a live view; plain ANSI)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from meshci.errors import MeshciError
    from meshci.node.client import members
    from meshci.node.view import format_table

    via, secret = client_target(args)
    if args.watch is not None and not args.watch > 0:
        raise MeshciError("--watch must be a positive number of seconds")
    while True:
        rows = asyncio.run(members(via, secret=secret, insecure=args.insecure))
        if args.json:
            text = json.dumps(rows, indent=1)
        else:
            text = format_table(rows) + f"\n{len(rows)} members, as {rows[0]['name']} sees them"
        if args.watch is None:
            print(text)
            return 0
        # clear the screen and home the cursor, then draw: a refreshing view without curses
        sys.stdout.write("\x1b[2J\x1b[H" + time.strftime("%H:%M:%S ") + f"meshci peers --via {via}\n" + text + "\n")
        sys.stdout.flush()
        time.sleep(args.watch)
