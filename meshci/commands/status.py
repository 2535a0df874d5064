"""`meshci status --via HOST:PORT`: a live view of the mesh: every member with its speed,
load, requests in flight and tiles computed, redrawn until Ctrl-C (rich when installed,
plain ANSI otherwise; `--once` prints one frame)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import time
from typing import Any

from meshci.commands.common import add_client_arguments, client_target

ASK_TIMEOUT_S = 2.0  # a member that does not answer this fast shows `?` in this frame


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("status", help="a live view of the mesh, via any node",
                              description="A live view of a mesh: its members (as the --via node sees "
                                          "them) with speed, load, requests in flight and tiles "
                                          "computed, each as the member itself reports it.")
    add_client_arguments(p)
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between frames (default 1)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.set_defaults(func=run)


async def frame(via: Any, secret: bytes | None, insecure: bool) -> list[dict[str, Any]]:
    """The members as `via` sees them, each with its own account of its activity."""
    from meshci.node.client import RequestError, members
    from meshci.node.membership import Address
    from meshci.node.view import with_activity

    rows = await members(via, secret=secret, insecure=insecure)

    async def own(row: dict[str, Any]) -> dict[str, Any] | None:
        if row["status"] == "self":
            return row
        try:
            answer = await asyncio.wait_for(members(Address.parse(row["address"]), secret=secret,
                                                    insecure=insecure), ASK_TIMEOUT_S)
        except (RequestError, ValueError, TimeoutError):
            # unreachable from here or slow: this frame shows `?` for it
            return None
        return answer[0] if answer else None

    answers = await asyncio.gather(*(own(row) for row in rows))
    return with_activity(rows, {row["name"]: a for row, a in zip(rows, answers)})


def run(args: argparse.Namespace) -> int:
    from meshci.errors import MeshciError
    from meshci.node.view import format_status

    via, secret = client_target(args)
    if not args.interval > 0:
        raise MeshciError("--interval must be a positive number of seconds")
    if args.once:
        print(format_status(asyncio.run(frame(via, secret, args.insecure))))
        return 0
    if importlib.util.find_spec("rich") is None:
        # rich is optional (pip install 'meshci[status]'): redraw with plain ANSI instead
        return _plain(via, secret, args)
    return _rich(via, secret, args)


def _title(via: Any, rows: list[dict[str, Any]]) -> str:
    busy = sum(r.get("requests_in_flight") or 0 for r in rows)
    return f"{time.strftime('%H:%M:%S')}  mesh via {via}: {len(rows)} members, {busy} requests in flight"


def _plain(via: Any, secret: bytes | None, args: argparse.Namespace) -> int:
    from meshci.node.view import format_status

    while True:
        rows = asyncio.run(frame(via, secret, args.insecure))
        sys.stdout.write("\x1b[2J\x1b[H" + _title(via, rows) + "\n" + format_status(rows) + "\n")
        sys.stdout.flush()
        time.sleep(args.interval)


def _rich(via: Any, secret: bytes | None, args: argparse.Namespace) -> int:
    from rich.live import Live
    from rich.table import Table

    from meshci.node.view import STATUS_COLUMNS, status_cells

    def table(rows: list[dict[str, Any]]) -> Table:
        view = Table(title=_title(via, rows))
        for column in STATUS_COLUMNS:
            view.add_column(column, justify="right" if column in ("GFLOP/S", "LOAD", "IN FLIGHT", "TILES") else "left")
        for cells in status_cells(rows):
            view.add_row(*cells)
        return view

    with Live(table(asyncio.run(frame(via, secret, args.insecure))), auto_refresh=False) as live:
        while True:
            time.sleep(args.interval)
            live.update(table(asyncio.run(frame(via, secret, args.insecure))), refresh=True)
