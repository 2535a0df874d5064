"""Measuring a link without ping: TCP round-trip time and bulk throughput.

A probe server runs inside one host (`python -m meshci.testbed.probe serve --port P`);
it prints `ready` once listening. Each connection's first byte picks its mode:

* ``E`` echo: every 64-byte message is sent straight back (round-trip time).
* ``S`` sink: an 8-byte big-endian length, then that many bytes; the server measures
  the rate itself, from the first payload byte to the last, and answers one JSON line
  ``{"bytes": n, "seconds": s}``. The receiver's clock is the honest one: the sender's
  last write only means the bytes reached its socket buffer.

The same port also answers UDP: every datagram is echoed back, so `loss` can count
what came back of N numbered datagrams (shape only the outward direction to read the
one-way loss straight off).

The clients (`rtt`, `throughput`, `loss`) run inside another host and print one JSON line.
`ProbeServer`, `measure_rtt` and `measure_throughput` drive all of this from a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import subprocess
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from meshci.testbed import commands
from meshci.testbed.errors import TestbedError
from meshci.testbed.netns import Host, Topology

log = logging.getLogger(__name__)

ECHO = b"E"
SINK = b"S"
ECHO_SIZE = 64
_LENGTH = struct.Struct("!Q")
_CHUNK = 1 << 20


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        part = sock.recv(size - len(data))
        if not part:
            raise ConnectionError(f"peer closed after {len(data)} of {size} bytes")
        data += part
    return bytes(data)


def _serve_echo(sock: socket.socket) -> None:
    while True:
        try:
            message = _recv_exact(sock, ECHO_SIZE)
        except ConnectionError:
            # the client is done: it closes after its last round trip
            return
        sock.sendall(message)


def _serve_sink(sock: socket.socket) -> None:
    (total,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    received = sock.recv_into(view)
    if received == 0:
        raise ConnectionError("peer closed before sending any payload")
    first_chunk = received
    t_first = t_last = time.perf_counter()
    while received < total:
        n = sock.recv_into(view[: min(_CHUNK, total - received)])
        if n == 0:
            raise ConnectionError(f"peer closed after {received} of {total} bytes")
        received += n
        t_last = time.perf_counter()
    # the first chunk arrived at t_first: only what came after it counts against the clock
    report = {"bytes": total, "timed_bytes": total - first_chunk, "seconds": t_last - t_first}
    sock.sendall((json.dumps(report) + "\n").encode())


def _handle(sock: socket.socket) -> None:
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            mode = _recv_exact(sock, 1)
            if mode == ECHO:
                _serve_echo(sock)
            elif mode == SINK:
                _serve_sink(sock)
            else:
                log.warning("probe: unknown mode byte %r, closing", mode)
        except (ConnectionError, OSError) as exc:
            # one client's broken connection must not stop the server
            log.warning("probe: connection ended early: %s", exc)


def _serve_udp_echo(sock: socket.socket) -> None:
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(data, peer)


def serve(port: int, bind: str = "0.0.0.0") -> None:
    """Serve probes until killed (TCP echo/sink, UDP echo); prints `ready` once listening."""
    listener = socket.create_server((bind, port), backlog=64)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((bind, port))
    threading.Thread(target=_serve_udp_echo, args=(udp,), daemon=True).start()
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_handle, args=(conn,), daemon=True).start()


def rtt_samples(address: tuple[str, int], count: int, timeout: float = 10.0) -> list[float]:
    """Round-trip times in seconds of `count` 64-byte echoes over one TCP connection."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(ECHO)
        message = bytes(range(ECHO_SIZE))
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(message)
            if _recv_exact(sock, ECHO_SIZE) != message:
                raise TestbedError("echo server returned different bytes")
            samples.append(time.perf_counter() - start)
    return samples


def udp_loss(address: tuple[str, int], count: int, interval_s: float = 0.0002, settle_s: float = 0.5) -> dict[str, float]:
    """Send `count` numbered datagrams, paced; the share that did not come back is the round-trip loss."""
    seen: set[int] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.settimeout(settle_s)

        def collect() -> None:
            while True:
                try:
                    data = sock.recv(2048)
                except TimeoutError:
                    # nothing more for settle_s after the last send: the rest is lost
                    return
                except ConnectionRefusedError:
                    # an ICMP error from an earlier datagram: keep counting
                    continue
                seen.add(int.from_bytes(data[:4], "big"))

        receiver = threading.Thread(target=collect, daemon=True)
        receiver.start()
        padding = bytes(196)
        next_send = time.perf_counter()
        for seq in range(count):
            sock.send(seq.to_bytes(4, "big") + padding)
            next_send += interval_s
            pause = next_send - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        receiver.join(timeout=count * interval_s + 30)
    received = len(seen)
    return {"sent": count, "received": received, "loss": 1.0 - received / count}


def send_bulk(address: tuple[str, int], nbytes: int, timeout: float = 120.0) -> dict[str, float]:
    """Send `nbytes` to a sink; returns the receiver's report with `mbps` added."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(SINK + _LENGTH.pack(nbytes))
        block = memoryview(bytes(_CHUNK))
        left = nbytes
        while left:
            n = sock.send(block[: min(left, _CHUNK)])
            left -= n
        line = sock.makefile("rb").readline()
    if not line:
        raise TestbedError("sink closed without a report")
    report: dict[str, float] = json.loads(line)
    report["mbps"] = report["timed_bytes"] * 8 / report["seconds"] / 1e6 if report["seconds"] > 0 else float("inf")
    return report


# ---- driving the probes inside a topology ---------------------------------------------


@dataclass
class ProbeServer:
    """A probe server running inside one host of a topology (killed with the topology)."""

    host: Host
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return (self.host.ip, self.port)

    @classmethod
    def start(cls, net: Topology, host: Host, port: int = 5201, ready_timeout: float = 10.0) -> ProbeServer:
        proc = net.popen(
            host, [sys.executable, "-m", "meshci.testbed.probe", "serve", "--port", str(port)], stdout=subprocess.PIPE
        )
        line = commands.read_line(proc.stdout, ready_timeout)
        if line.strip() != b"ready":
            raise TestbedError(f"probe server in {host.name} did not become ready (said {line!r})")
        return cls(host=host, port=port)


def measure_rtt(net: Topology, client: Host, address: tuple[str, int], count: int = 20) -> dict[str, float]:
    """Round trip from `client` to a probe server at `address`: median/min/max in ms."""
    done = net.run(client, [sys.executable, "-m", "meshci.testbed.probe", "rtt", "--to", _fmt(address),
                            "--count", str(count)])  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_throughput(net: Topology, client: Host, address: tuple[str, int], nbytes: int) -> dict[str, float]:
    """Bulk send of `nbytes` from `client` to a probe sink at `address`; the receiver's rate in Mbit/s."""
    done = net.run(client, [sys.executable, "-m", "meshci.testbed.probe", "throughput", "--to", _fmt(address),
                            "--bytes", str(nbytes)], timeout=300)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_loss(net: Topology, client: Host, address: tuple[str, int], count: int = 2000) -> dict[str, float]:
    """Share of `count` UDP datagrams from `client` that did not come back from the probe server."""
    done = net.run(client, [sys.executable, "-m", "meshci.testbed.probe", "loss", "--to", _fmt(address),
                            "--count", str(count)], timeout=120)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fmt(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def _parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshci.testbed.probe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("serve", help="echo + sink server")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bind", default="0.0.0.0")
    p = sub.add_parser("rtt", help="TCP echo round-trip times")
    p.add_argument("--to", type=_parse_address, required=True)
    p.add_argument("--count", type=int, default=20)
    p = sub.add_parser("throughput", help="bulk send to a sink")
    p.add_argument("--to", type=_parse_address, required=True)
    p.add_argument("--bytes", type=int, required=True)
    p = sub.add_parser("loss", help="UDP echo loss")
    p.add_argument("--to", type=_parse_address, required=True)
    p.add_argument("--count", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.mode == "serve":
        serve(args.port, args.bind)
    elif args.mode == "rtt":
        samples = [s * 1e3 for s in rtt_samples(args.to, args.count)]
        result = {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples),
                  "count": len(samples)}  # fmt: skip
        print(json.dumps(result))
    elif args.mode == "loss":
        print(json.dumps(udp_loss(args.to, args.count)))
    else:
        print(json.dumps(send_bulk(args.to, args.bytes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
