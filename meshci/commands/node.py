"""`meshci node`: run one mesh node on this device until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from meshci.errors import MeshciError, RuntimeFailure
from meshci.node.discovery import DEFAULT_DISCOVERY
from meshci.node.membership import Address
from meshci.settings import config_dir, layered, load_toml, suppress_defaults

if TYPE_CHECKING:
    from meshci.node.server import Node

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "node", help="run a mesh node on this device",
        description="Run one mesh node: join the mesh, serve requests. Every flag can also come "
                    "from a TOML file (--config, default $XDG_CONFIG_HOME/meshci/node.toml when it "
                    "exists; keys are the flag names: secret-file = \"mesh.key\") or from an "
                    "environment variable (MESHCI_SECRET_FILE=mesh.key); a flag on the command line "
                    "wins over the variable, the variable over the file.")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML file of settings (also MESHCI_CONFIG)")
    add_arguments(p)
    suppress_defaults(p)  # the defaults apply in `run`, under the file and the environment
    # a node's events (joined, peer down, model built) are what its operator watches
    p.set_defaults(func=run, log_level=logging.INFO)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every setting of a node, with its built-in default."""
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                   help="address to listen on (port 0: any free port; default 127.0.0.1:0)")
    p.add_argument("--join", action="append", default=[], metavar="HOST:PORT",
                   help="a known peer to join the mesh through (repeatable)")
    p.add_argument("--join-timeout", type=float, default=10.0, metavar="S",
                   help="keep trying the --join peers this many seconds (default 10)")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument("--secret-file", metavar="F",
                        help="cluster secret (make one with `meshci secret new F`, copy it to every device)")
    secret.add_argument("--insecure", action="store_true",
                        help="run without a cluster secret (no authentication; trusted networks only)")
    p.add_argument("--name", help="node name (default: a persistent random id kept in --data-dir)")
    p.add_argument("--data-dir", type=Path,
                   help="state and profile cache (default $XDG_CACHE_HOME/meshci, i.e. ~/.cache/meshci)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for tile compute (default 1)")
    p.add_argument("--gflops", type=float,
                   help="state this device's speed in GFLOP/s instead of measuring it at start")
    p.add_argument("--discover", nargs="?", const=str(DEFAULT_DISCOVERY), metavar="BCAST:PORT",
                   help=f"find peers on the LAN by UDP broadcast beacons (default {DEFAULT_DISCOVERY})")
    p.add_argument("--allow-model", action="append", default=[], metavar="PATTERN",
                   help="also serve this user model: an exact package.module:callable or a package "
                        "prefix pkg.* (repeatable; built-in models are always served, other user "
                        "models are refused because a request would make the node import them)")
    p.add_argument("--memory-mb", type=int, metavar="N",
                   help="memory this node gives the tiles it holds at once (weights of the layers it "
                        "runs and their maps); it takes no more tiles than fit (default: the memory "
                        "the machine has available at start)")
    p.add_argument("--accept-shipped-models", action="store_true",
                   help="run models a requester ships (its code and the weights of the layers this "
                        "node runs, cached by digest under --data-dir); off by default: shipped code "
                        "runs in this node, taken only from peers that proved the cluster secret")
    p.add_argument("--weights", action="append", default=[], type=Path, metavar="FILE",
                   help="trained weights (a torchvision-format state_dict) this node serves, "
                        "repeatable; give every node the same file and ask with `meshci infer "
                        "--weights FILE` (built-in models otherwise use random weights by seed)")
    p.add_argument("--metrics-port", type=int, metavar="P",
                   help="serve Prometheus metrics at http://HOST:P/metrics (requests, latency, bytes "
                        "per peer, tiles, auctions, peer failures)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address of the metrics endpoint (default 127.0.0.1: this machine only)")
    p.add_argument("--tls-cert", help="this node's certificate (mutual TLS)")
    p.add_argument("--tls-key", help="this node's private key (mutual TLS)")
    p.add_argument("--tls-ca", help="CA that signs every node's certificate (mutual TLS)")


def effective_settings(given: argparse.Namespace, env: Mapping[str, str]) -> argparse.Namespace:
    """The node's settings: flags given, else `MESHCI_*` variables, else the TOML file
    (--config, MESHCI_CONFIG, or node.toml in the XDG config directory when present), else
    the defaults."""
    spec = argparse.ArgumentParser(add_help=False)
    add_arguments(spec)
    path = getattr(given, "config", None) or (Path(env["MESHCI_CONFIG"]) if env.get("MESHCI_CONFIG") else None)
    if path is None and (config_dir() / "node.toml").is_file():
        path = config_dir() / "node.toml"
    table = load_toml(path) if path is not None else {}
    return layered(spec, given, table, env, source=str(path))


def run(given: argparse.Namespace) -> int:
    from meshci.wire import client_tls_context, load_secret, server_tls_context, valid_name

    args = effective_settings(given, os.environ)
    try:
        listen = Address.parse(args.listen)
        join = tuple(Address.parse(a) for a in args.join)
        discover = Address.parse(args.discover) if args.discover else None
    except ValueError as exc:
        # not HOST:PORT: the user's typo, one line
        raise MeshciError(f"{exc}: give HOST:PORT, e.g. --listen 0.0.0.0:7000") from exc
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
    if args.memory_mb is not None and args.memory_mb < 1:
        raise MeshciError("--memory-mb must be at least 1")
    if args.threads < 1:
        raise MeshciError("--threads must be at least 1")
    if args.gflops is not None and not args.gflops > 0:
        raise MeshciError("--gflops must be positive")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise MeshciError("--metrics-port must be a port number (0-65535)")
    # the checks above need no torch: a mistyped flag is refused at once
    from meshci.cost.profiling import default_data_dir
    from meshci.node.identity import node_name
    from meshci.node.runtime import measure_gflops
    from meshci.node.server import Node, NodeConfig
    from meshci.models.registry import valid_allow_pattern
    bad = [pattern for pattern in args.allow_model if not valid_allow_pattern(pattern)]
    if bad:
        raise MeshciError(f"bad --allow-model {bad[0]!r}: give package.module:callable or pkg.*")
    from meshci.weights import hold
    allow_models = tuple(args.allow_model) + tuple(f"@{hold(path)}" for path in args.weights)
    data_dir = args.data_dir or default_data_dir()
    name = args.name or node_name(data_dir)
    if not valid_name(name):
        raise MeshciError(f"bad node name {name!r}: 1-64 letters, digits or ._:@- , starting alphanumeric")
    gflops = args.gflops if args.gflops is not None else measure_gflops(args.threads)
    config = NodeConfig(name=name, listen=listen, join=join, secret=secret, insecure=args.insecure,
                        threads=args.threads, gflops=gflops, server_ssl=server_ssl,
                        client_ssl=client_ssl, discover=discover, join_timeout_s=args.join_timeout,
                        allow_models=allow_models, measure_curves=args.gflops is None,
                        accept_shipped_models=args.accept_shipped_models, memory_mb=args.memory_mb,
                        data_dir=data_dir)
    _install_uvloop()
    metrics = (args.metrics_host, args.metrics_port) if args.metrics_port is not None else None
    return asyncio.run(_serve(Node(config), metrics))


async def _serve(node: Node, metrics: tuple[str, int] | None = None) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, node.stop)
    profile_dir = os.environ.get("MESHCI_PROFILE_DIR")
    if profile_dir:
        _profile_on_signals(loop, Path(profile_dir) / f"{node.name}.prof")
    try:
        address = await node.start()
    except OSError as exc:
        # the port is taken or the address is not this machine's: one line, what to do
        await node.close()
        raise RuntimeFailure(f"cannot listen on {node.config.listen}: {exc.strerror or exc}; "
                             "pick another --listen HOST:PORT (port 0: any free port)") from exc
    except BaseException:
        # join refused, interrupted: release sockets and threads, then re-raise
        await node.close()
        raise
    print(f"meshci node {node.name} listening on {address}", flush=True)
    scrapes = await _serve_metrics(node, *metrics) if metrics is not None else None
    try:
        await node.wait_closed()
    finally:
        if scrapes is not None:
            scrapes.close()
    log.info("node %s stopped", node.name)
    return 0


async def _serve_metrics(node: Node, host: str, port: int) -> asyncio.base_events.Server:
    from meshci.node.metrics import serve_metrics

    try:
        server = await serve_metrics(node, host, port)
    except OSError as exc:
        # the metrics port is taken: the node is up, but say so in one line and stop it
        await node.close()
        raise RuntimeFailure(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; "
                             "pick another --metrics-port") from exc
    bound = server.sockets[0].getsockname()
    print(f"meshci node {node.name} metrics on http://{bound[0]}:{bound[1]}/metrics", flush=True)
    return server


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
