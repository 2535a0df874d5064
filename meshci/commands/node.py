"""`meshci node`: run one mesh node on this device until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from meshci.errors import MeshciError
from meshci.node.discovery import DEFAULT_DISCOVERY
from meshci.node.membership import Address

if TYPE_CHECKING:
    from meshci.node.server import Node

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("node", help="run a mesh node on this device",
                              description="Run one mesh node: join the mesh, serve requests.")
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                   help="address to listen on (port 0: any free port; default 127.0.0.1:0)")
    p.add_argument("--join", action="append", default=[], metavar="HOST:PORT",
                   help="a known peer to join the mesh through (repeatable)")
    p.add_argument("--join-timeout", type=float, default=10.0, metavar="S",
                   help="keep trying the --join peers this many seconds (default 10)")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument("--secret-file", metavar="F", help="cluster secret (see `meshci node --help`)")
    secret.add_argument("--insecure", action="store_true",
                        help="run without a cluster secret (no authentication; trusted networks only)")
    p.add_argument("--name", help="node name (default: a persistent random id kept in --data-dir)")
    p.add_argument("--data-dir", type=Path, help="state and profile cache (default ~/.cache/meshci)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for tile compute (default 1)")
    p.add_argument("--gflops", type=float,
                   help="state this device's speed in GFLOP/s instead of measuring it at start")
    p.add_argument("--discover", nargs="?", const=str(DEFAULT_DISCOVERY), metavar="BCAST:PORT",
                   help=f"find peers on the LAN by UDP broadcast beacons (default {DEFAULT_DISCOVERY})")
    p.add_argument("--allow-model", action="append", default=[], metavar="PATTERN",
                   help="also serve this user model: an exact package.module:callable or a package "
                        "prefix pkg.* (repeatable; built-in models are always served, other user "
                        "models are refused because a request would make the node import them)")
    p.add_argument("--tls-cert", help="this node's certificate (mutual TLS)")
    p.add_argument("--tls-key", help="this node's private key (mutual TLS)")
    p.add_argument("--tls-ca", help="CA that signs every node's certificate (mutual TLS)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from meshci.cost.profiling import default_data_dir
    from meshci.node.identity import node_name
    from meshci.node.runtime import measure_gflops
    from meshci.node.server import Node, NodeConfig
    from meshci.wire import client_tls_context, load_secret, server_tls_context, valid_name

    try:
        listen = Address.parse(args.listen)
        join = tuple(Address.parse(a) for a in args.join)
        discover = Address.parse(args.discover) if args.discover else None
    except ValueError as exc:
        # not HOST:PORT: the user's typo, one line
        raise MeshciError(str(exc)) from exc
    if args.secret_file is None and not args.insecure:
        raise MeshciError("no cluster secret: give --secret-file F (or --insecure on a trusted network)")
    secret = load_secret(args.secret_file) if args.secret_file else None
    tls = (args.tls_cert, args.tls_key, args.tls_ca)
    if any(tls) and not all(tls):
        raise MeshciError("mutual TLS needs all of --tls-cert, --tls-key and --tls-ca")
    server_ssl = server_tls_context(*tls) if all(tls) else None
    client_ssl = client_tls_context(*tls) if all(tls) else None
    if not args.join_timeout > 0:
        raise MeshciError("--join-timeout must be positive")
    if args.threads < 1:
        raise MeshciError("--threads must be at least 1")
    if args.gflops is not None and not args.gflops > 0:
        raise MeshciError("--gflops must be positive")
    from meshci.models.registry import valid_allow_pattern
    bad = [pattern for pattern in args.allow_model if not valid_allow_pattern(pattern)]
    if bad:
        raise MeshciError(f"bad --allow-model {bad[0]!r}: give package.module:callable or pkg.*")
    data_dir = args.data_dir or default_data_dir()
    name = args.name or node_name(data_dir)
    if not valid_name(name):
        raise MeshciError(f"bad node name {name!r}: 1-64 letters, digits or ._:@- , starting alphanumeric")
    gflops = args.gflops if args.gflops is not None else measure_gflops(args.threads)
    config = NodeConfig(name=name, listen=listen, join=join, secret=secret, insecure=args.insecure,
                        threads=args.threads, gflops=gflops, server_ssl=server_ssl,
                        client_ssl=client_ssl, discover=discover, join_timeout_s=args.join_timeout,
                        allow_models=tuple(args.allow_model), measure_curves=args.gflops is None)
    _install_uvloop()
    return asyncio.run(_serve(Node(config)))


async def _serve(node: Node) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, node.stop)
    profile_dir = os.environ.get("MESHCI_PROFILE_DIR")
    if profile_dir:
        _profile_on_signals(loop, Path(profile_dir) / f"{node.name}.prof")
    try:
        address = await node.start()
    except BaseException:
        # join refused, port taken, interrupted: release sockets and threads, then re-raise
        await node.close()
        raise
    print(f"meshci node {node.name} listening on {address}", flush=True)
    await node.wait_closed()
    log.info("node %s stopped", node.name)
    return 0


def _profile_on_signals(loop: asyncio.AbstractEventLoop, path: Path) -> None:
    """SIGUSR1 starts cProfile on the event-loop thread's CPU time (what the node does besides
    tile compute on its compute thread), SIGUSR2 stops it and writes the statistics to `path`
    (`tools/profile_node.py` drives this; set MESHCI_PROFILE_DIR)."""
    import cProfile
    import time

    profiler = cProfile.Profile(time.thread_time)  # CPU time: a throttled wait is no cost

    def dump() -> None:
        profiler.disable()
        path.parent.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(str(path))

    loop.add_signal_handler(signal.SIGUSR1, profiler.enable)
    loop.add_signal_handler(signal.SIGUSR2, dump)


def _install_uvloop() -> None:
    if sys.platform == "win32":
        return
    try:
        import uvloop
    except ImportError:
        # uvloop is optional: the standard event loop works, a little slower
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
