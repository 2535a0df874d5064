"""`meshci peers --via HOST:PORT [--json]`: the mesh's members as a node sees them: name,
address, measured speed, current load, link estimates, version (`meshci status` is the
live view)."""

from __future__ import annotations

import argparse
import asyncio
import json

from meshci.commands.common import add_client_arguments, client_target


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("peers", help="list the mesh's members, via any node",
                              description="List the members of a mesh as one of its nodes sees them: "
                                          "name, address, status, measured GFLOP/s, load (seconds of "
                                          "queued work), link estimates to each peer, version.")
    add_client_arguments(p)
    p.add_argument("--json", action="store_true", help="print the members as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from meshci.node.client import members
    from meshci.node.view import format_table

    via, secret = client_target(args)
    rows = asyncio.run(members(via, secret=secret, insecure=args.insecure))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows) + f"\n{len(rows)} members, as {rows[0]['name']} sees them")
    return 0
