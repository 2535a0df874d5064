"""A local mesh of node processes on loopback: used by `meshci demo`, the tests and the
benchmarks. Each node is a separate `python -m meshci node` process; its log goes to a
file in the mesh's directory."""

from __future__ import annotations

import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from meshci.errors import RuntimeFailure
from meshci.node.membership import Address
from meshci.wire import generate_secret, write_secret

log = logging.getLogger(__name__)

READY = re.compile(r"^meshci node (\S+) listening on (\S+):(\d+)$")


class NodeStartError(RuntimeFailure):
    """A node process exited or stayed silent instead of reporting that it listens."""


@dataclass
class NodeProcess:
    name: str
    address: Address
    process: subprocess.Popen[str]
    log_path: Path
    args: list[str] = field(default_factory=list)  # its `meshci node` arguments (to restart it alike)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            # the log is only for diagnostics: a missing one is not an error
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                # it did not shut down in time: make sure it is gone
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


def spawn_node(args: list[str], *, log_path: Path, env: dict[str, str] | None = None,
               cgroup_procs: Path | None = None) -> subprocess.Popen[str]:
    """Start `meshci node ARGS` (stdout piped for the ready line, stderr to `log_path`).

    `cgroup_procs`: a cgroup's `cgroup.procs` file; the process writes itself into it
    before it execs Python, so it runs under that group's limits from its first
    instruction (its profiling included)."""
    cmd = [sys.executable, "-m", "meshci", "-v", "node", *args]
    if cgroup_procs is not None:
        cmd = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup_procs), *cmd]
    log_file: IO[str] = open(log_path, "w")
    try:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True,
                                env={**os.environ, **(env or {})})
    finally:
        log_file.close()


def start_node(args: list[str], *, log_path: Path, timeout: float = 120.0,
               env: dict[str, str] | None = None) -> NodeProcess:
    """Start `meshci node ARGS` and wait for its `listening on` line."""
    return wait_ready(spawn_node(args, log_path=log_path, env=env), args, log_path, timeout)


def wait_ready(proc: subprocess.Popen[str], args: list[str], log_path: Path,
               timeout: float = 120.0) -> NodeProcess:
    """Wait for a spawned node's `meshci node NAME listening on HOST:PORT` line."""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            match = READY.match(line.strip())
            if match:
                return NodeProcess(match.group(1), Address(match.group(2), int(match.group(3))), proc, log_path,
                                   list(args))
            if line == "" and proc.poll() is not None:
                break
        elif proc.poll() is not None:
            break
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:] if log_path.exists() else []
    raise NodeStartError(f"node {' '.join(args)} did not start: " + (" | ".join(tail) or f"exit {proc.returncode}"))


JOIN_TOGETHER_TIMEOUT_S = 120.0  # nodes started together wait this long for the first one


@dataclass(frozen=True)
class NodeSpec:
    """One node of `LocalMesh.start_together`. `gflops=None`: it profiles its own speed."""

    name: str
    gflops: float | None = None
    threads: int = 1
    cgroup_procs: Path | None = None  # start it inside this cgroup (see `spawn_node`)
    own_data_dir: bool = False  # its own data dir (always when it profiles its speed)


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (held open together while choosing)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


@dataclass
class LocalMesh:
    """N nodes on 127.0.0.1 sharing a generated secret; a context manager that tears down."""

    directory: Path
    secret_file: Path
    nodes: list[NodeProcess] = field(default_factory=list)
    _stack: ExitStack = field(default_factory=ExitStack)

    @classmethod
    def create(cls, directory: Path | None = None) -> LocalMesh:
        stack = ExitStack()
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshci-mesh-")))
        secret_file = directory / "secret"
        if not secret_file.exists():
            write_secret(secret_file, generate_secret())
        return cls(directory, secret_file, _stack=stack)

    def secret(self) -> bytes:
        from meshci.wire import load_secret
        return load_secret(self.secret_file)

    def node_args(self, name: str, *, gflops: float | None = 1.0, threads: int = 1,
                  join: Address | None = None, port: int = 0, own_data_dir: bool = False) -> list[str]:
        """Arguments of one node. `gflops=None`: the node profiles its own speed (give it
        `own_data_dir`, or nodes share one cached profile)."""
        data = self.directory / (f"data-{name}" if own_data_dir else "data")
        args = ["--listen", f"127.0.0.1:{port}", "--name", name, "--secret-file", str(self.secret_file),
                "--data-dir", str(data), "--threads", str(threads)]
        if gflops is not None:
            args += ["--gflops", str(gflops)]
        if join is not None:
            args += ["--join", str(join)]
        return args

    def add(self, name: str, *, gflops: float | None = 1.0, threads: int = 1, join: bool = True,
            extra: list[str] | None = None, env: dict[str, str] | None = None) -> NodeProcess:
        """Start one node (joining through the last one started) and wait until it listens."""
        via = self.nodes[-1].address if join and self.nodes else None
        args = self.node_args(name, gflops=gflops, threads=threads, join=via) + (extra or [])
        node = start_node(args, log_path=self.directory / f"{name}.log", env=env)
        self.nodes.append(node)
        return node

    def add_many(self, specs: list[tuple[str, float | None]], *, threads: int = 1) -> list[NodeProcess]:
        """Start the first node, then all others at once joining through it."""
        started: list[NodeProcess] = []
        if not self.nodes and specs:
            (name, gflops), specs = specs[0], specs[1:]
            started.append(self.add(name, gflops=gflops, threads=threads))
        via = self.nodes[0].address
        spawned = []
        for name, gflops in specs:
            args = self.node_args(name, gflops=gflops, threads=threads, join=via)
            log_path = self.directory / f"{name}.log"
            spawned.append((spawn_node(args, log_path=log_path), args, log_path))
        started.extend(self._wait_all(spawned))
        return started

    def start_together(self, specs: list[NodeSpec]) -> list[NodeProcess]:
        """Start every node at once (ports chosen first, all joining through the first
        node), so that slow starters (profiling under a small CPU quota) overlap."""
        ports = _free_ports(len(specs))
        first = Address("127.0.0.1", ports[0])
        spawned = []
        for i, (spec, port) in enumerate(zip(specs, ports)):
            args = self.node_args(spec.name, gflops=spec.gflops, threads=spec.threads, port=port,
                                  join=first if i else None, own_data_dir=spec.own_data_dir or spec.gflops is None)
            args += ["--join-timeout", f"{JOIN_TOGETHER_TIMEOUT_S:.0f}"] if i else []
            log_path = self.directory / f"{spec.name}.log"
            spawned.append((spawn_node(args, log_path=log_path, cgroup_procs=spec.cgroup_procs),
                            args, log_path))
        return self._wait_all(spawned)

    def _wait_all(self, spawned: list[tuple[subprocess.Popen[str], list[str], Path]]) -> list[NodeProcess]:
        """Wait until every spawned node serves; if one fails, kill the rest and re-raise."""
        started: list[NodeProcess] = []
        try:
            for proc, args, log_path in spawned:
                node = wait_ready(proc, args, log_path)
                self.nodes.append(node)
                started.append(node)
        except NodeStartError:
            # one node failed: do not leave the others running behind the error
            for proc, _, _ in spawned:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)
            raise
        return started

    def node(self, name: str) -> NodeProcess:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def restart(self, name: str, sig: int = signal.SIGKILL) -> NodeProcess:
        """Stop node `name` with `sig` and start it again with the same arguments (so the
        same port, when it was started on a fixed one, and the same data dir); its new log
        goes to `NAME.restartN.log`."""
        old = self.node(name)
        old.stop(sig)
        index = self.nodes.index(old)
        n = sum(1 for _ in self.directory.glob(f"{name}.restart*.log")) + 1
        fresh = start_node(old.args, log_path=self.directory / f"{name}.restart{n}.log")
        self.nodes[index] = fresh
        return fresh

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()
        self._stack.close()

    def __enter__(self) -> LocalMesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def wait_formed(addresses: list[Address], secret: bytes | None, *, timeout: float = 30.0) -> None:
    """Wait until every node sees every other one alive (polls each node's STATE)."""
    import asyncio

    from meshci.node.client import RequestError, stats

    deadline = time.monotonic() + timeout
    want = len(addresses) - 1
    while True:
        try:
            views = [await stats(a, secret=secret, insecure=secret is None) for a in addresses]
            if all(sum(1 for s in v["peers"].values() if s == "alive") >= want for v in views):
                return
        except RequestError as exc:
            # a node not answering yet: keep polling until the deadline
            log.debug("mesh not formed yet: %s", exc)
        if time.monotonic() > deadline:
            raise NodeStartError(f"the mesh of {len(addresses)} nodes did not form within {timeout:.0f} s")
        await asyncio.sleep(0.2)
