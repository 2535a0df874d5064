#!/usr/bin/env python3
"""Transfer efficiency over a shaped link (the node issue's benchmark).

Two hosts (network namespaces) on a link shaped with htb to --rate-mbit; a tensor of
--mbytes MiB goes from h0 to h1, first over raw TCP (the baseline: what the link gives
any sender), then as one authenticated meshci message (`meshci.wire.Connection`, HMAC
on every frame), and, where it exists, through the wire part's own
`tools/bench_transfer.py` in its split roles (its median round: the tensor plus a small
acknowledgement, timed by the sender). Each transfer is timed from the sender's clock reading just before
its first byte to the receiver's reading when the last byte (or the whole verified
message) has arrived: both processes read the same CLOCK_MONOTONIC, so the time is
end to end, handshake excluded. Reported: achieved rate / shaped rate.

htb counts Ethernet, IP and TCP headers against the rate, so payload can reach at most
1448/1514 = 95.6% of the shaped rate with a 1500-byte MTU (a run can read a little
above that: the full token bucket, 134 KB, leaves at line rate at the start).

    sudo .venv/bin/python tools/bench_link.py [--rate-mbit 100] [--mbytes 16] [--repeats 3] [--delay-ms 0]

Root only (namespaces, tc). --delay-ms adds one-way delay (netem if the kernel has it,
else the testbed's TCP delay relay), --loss-pct packet loss (netem, else a classic-BPF
random classifier); the output says which mechanism gave each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("bench_link")

HEADER = struct.Struct("!dQ")  # sender's t0 (CLOCK_MONOTONIC), payload bytes
PAYLOAD_CEILING = 1448 / 1514
CHUNK = 1 << 20


# ---- roles, run inside the namespaces ---------------------------------------------------


def _recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"sender closed after {got} of {len(view)} bytes")
        got += n


def raw_receiver(port: int, repeats: int) -> None:
    listener = socket.create_server(("0.0.0.0", port))
    print("ready", flush=True)
    for _ in range(repeats):
        conn, _ = listener.accept()
        with conn:
            header = bytearray(HEADER.size)
            _recv_exact_into(conn, memoryview(header))
            t0, nbytes = HEADER.unpack(header)
            buffer = bytearray(nbytes)
            _recv_exact_into(conn, memoryview(buffer))
            t1 = time.monotonic()
        print(json.dumps({"bytes": nbytes, "seconds": t1 - t0}), flush=True)


def raw_sender(host: str, port: int, nbytes: int, repeats: int) -> None:
    payload = memoryview(bytes(nbytes))
    for _ in range(repeats):
        with socket.create_connection((host, port), timeout=60) as sock:
            sock.sendall(HEADER.pack(time.monotonic(), nbytes))
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # wait for the receiver to close: the transfer is complete


def _tensor(nbytes: int):  # type: ignore[no-untyped-def]
    import torch

    return torch.arange(nbytes // 4, dtype=torch.float32)


async def meshci_receiver(port: int, repeats: int, secret_file: str) -> None:
    import torch

    from meshci.wire import Connection, load_secret

    secret = load_secret(secret_file)
    done: asyncio.Queue[dict[str, float]] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = await Connection.accept(reader, writer, secret=secret, name="bench-recv")
        async with conn:
            msg = await conn.recv()
            t1 = time.monotonic()
            (tensor,) = msg.tensors
            expected = _tensor(tensor.numel() * 4)
            result = {"bytes": tensor.numel() * 4, "seconds": t1 - msg.meta["t0"],
                      "exact": bool(torch.equal(tensor, expected)), "authenticated": conn.authenticated}
        # reported once the connection is closed, so the server never shuts down mid-close
        await done.put(result)

    server = await asyncio.start_server(handle, "0.0.0.0", port)
    print("ready", flush=True)
    async with server:
        for _ in range(repeats):
            print(json.dumps(await done.get()), flush=True)


async def meshci_sender(host: str, port: int, nbytes: int, repeats: int, secret_file: str) -> None:
    from meshci.wire import Connection, ConnectionClosed, Message, MsgType, load_secret

    secret = load_secret(secret_file)
    tensor = _tensor(nbytes)
    for index in range(repeats):
        conn = await Connection.open(host, port, secret=secret, name="bench-send")
        async with conn:
            t0 = time.monotonic()
            await conn.send(Message(MsgType.TILE, request_id=index + 1, meta={"t0": t0}, tensors=(tensor,)))
            try:
                await conn.recv()  # the receiver closes once it has the message
            except ConnectionClosed as exc:  # the receiver hangs up once it has the message: the expected end
                log.debug("receiver closed: %s", exc)


# ---- the orchestrator (root namespace) ----------------------------------------------------


def run_pair(net, shaper, kind: str, nbytes: int, repeats: int, port: int, secret_file: str) -> list[dict]:  # type: ignore[no-untyped-def]
    from meshci.testbed.commands import read_line

    sender, receiver = net.hosts
    me = [sys.executable, str(Path(__file__).resolve())]
    recv = net.popen(receiver, [*me, "--role", f"{kind}-recv", "--port", str(port), "--repeats", str(repeats),
                                "--secret-file", secret_file], stdout=subprocess.PIPE)  # fmt: skip
    line = read_line(recv.stdout, 30.0)
    if line.strip() != b"ready":
        raise RuntimeError(f"{kind} receiver did not start (said {line!r})")
    host, dial_port = shaper.endpoint(sender, receiver, port)
    net.run(sender, [*me, "--role", f"{kind}-send", "--to", f"{host}:{dial_port}", "--bytes", str(nbytes),
                     "--repeats", str(repeats), "--secret-file", secret_file], timeout=600)  # fmt: skip
    out, _ = recv.communicate(timeout=60)
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


def run_wire_bench(net, shaper, nbytes: int, repeats: int, port: int, secret_file: str) -> list[dict]:  # type: ignore[no-untyped-def]
    """The wire part's own benchmark (tools/bench_transfer.py, split roles) across the same link."""
    from meshci.testbed.commands import read_line

    sender, receiver = net.hosts
    script = str(Path(__file__).resolve().parent / "bench_transfer.py")
    recv = net.popen(receiver, [sys.executable, script, "--role", "receive", "--host", "0.0.0.0", "--port", str(port),
                                "--connections", "1", "--secret-file", secret_file], stdout=subprocess.PIPE)  # fmt: skip
    line = read_line(recv.stdout, 60.0)
    if not line.startswith(b"LISTENING"):
        raise RuntimeError(f"bench_transfer receiver did not start (said {line!r})")
    host, dial_port = shaper.endpoint(sender, receiver, port)
    done = net.run(sender, [sys.executable, script, "--role", "send", "--host", host, "--port", str(dial_port),
                            "--secret-file", secret_file, "--mb", str(nbytes / (1 << 20)), "--rounds", str(repeats),
                            "--json"], timeout=600)  # fmt: skip
    recv.wait(timeout=60)
    rates = json.loads(done.stdout.strip().splitlines()[-1])
    # its median round (send + small acknowledgement), as one run of the same shape as the others
    return [{"bytes": nbytes, "seconds": nbytes / (rates["median_mb_s"] * 1e6)}]


def orchestrate(args: argparse.Namespace) -> int:
    from meshci.testbed import LinkShape, Shaper, netns_support, topology
    from meshci.wire import generate_secret, write_secret

    reason = netns_support()
    if reason:
        print(f"bench_link: cannot run: {reason}", file=sys.stderr)
        return 2
    nbytes = int(args.mbytes * (1 << 20))
    with tempfile.TemporaryDirectory() as tmp, topology(2) as net, Shaper(net) as shaper:
        secret_file = str(write_secret(Path(tmp) / "secret", generate_secret()))
        shape = LinkShape(rate_mbit=args.rate_mbit, delay_ms=args.delay_ms, loss_pct=args.loss_pct)
        report = shaper.shape(net.hosts[0], net.hosts[1], shape)
        results = {
            "raw": run_pair(net, shaper, "raw", nbytes, args.repeats, 5501, secret_file),
            "meshci": run_pair(net, shaper, "meshci", nbytes, args.repeats, 5502, secret_file),
        }
        if (Path(__file__).resolve().parent / "bench_transfer.py").exists():
            results["bench_transfer"] = run_wire_bench(net, shaper, nbytes, args.repeats, 5503, secret_file)
    summary: dict[str, object] = {
        "rate_mbit": args.rate_mbit, "delay_ms": args.delay_ms, "loss_pct": args.loss_pct, "bytes": nbytes, "repeats": args.repeats,
        "shaping": {"rate": report.rate, "delay": report.delay, "loss": report.loss, "notes": list(report.notes)},
        "payload_ceiling": PAYLOAD_CEILING,
    }  # fmt: skip
    for kind, runs in results.items():
        mbps = [run["bytes"] * 8 / run["seconds"] / 1e6 for run in runs]
        summary[kind] = {"mbps": mbps, "median_mbps": statistics.median(mbps),
                         "efficiency": statistics.median(mbps) / args.rate_mbit}  # fmt: skip
        if kind == "meshci":
            summary[kind]["exact"] = all(run["exact"] for run in runs)  # type: ignore[index]
            summary[kind]["authenticated"] = all(run["authenticated"] for run in runs)  # type: ignore[index]
    raw_eff, meshci_eff = summary["raw"]["efficiency"], summary["meshci"]["efficiency"]  # type: ignore[index]
    summary["meshci_over_raw"] = meshci_eff / raw_eff
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    delay = f", delay {args.delay_ms} ms one-way by {report.delay}" if args.delay_ms else ""
    delay += f", loss {args.loss_pct}% by {report.loss}" if args.loss_pct else ""
    print(f"link h0->h1: {args.rate_mbit} Mbit/s by {report.rate}{delay}; payload {args.mbytes} MiB, "
          f"{args.repeats} runs each; header ceiling {PAYLOAD_CEILING:.1%} of the shaped rate")  # fmt: skip
    labels = {"raw": "raw TCP", "meshci": "meshci Connection (HMAC frames)",
              "bench_transfer": "tools/bench_transfer.py (median)"}  # fmt: skip
    for kind in results:
        row, label = summary[kind], labels[kind]
        runs = ", ".join(f"{m:.1f}" for m in row["mbps"])  # type: ignore[index]
        print(f"  {label:34s} median {row['median_mbps']:6.1f} Mbit/s = {row['efficiency']:.1%} of shaped"  # type: ignore[index]
              f"  (runs: {runs})")  # fmt: skip
    print(f"  meshci / raw TCP: {summary['meshci_over_raw']:.1%}; tensor exact: {summary['meshci']['exact']}; "  # type: ignore[index]
          f"target >= 90% of shaped: {'met' if meshci_eff >= 0.9 else 'NOT met'}")
    for note in report.notes:
        print(f"  note: {note}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--mbytes", type=float, default=16.0, help="tensor size in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay (netem, else the relay)")
    parser.add_argument("--loss-pct", type=float, default=0.0, help="packet loss each way (netem, else cls_bpf)")
    parser.add_argument("--json", action="store_true")
    # internal: the roles the orchestrator starts inside the namespaces
    parser.add_argument("--role", choices=["raw-recv", "raw-send", "meshci-recv", "meshci-send"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--to", help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--secret-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    if args.role is None:
        return orchestrate(args)
    if args.role == "raw-recv":
        raw_receiver(args.port, args.repeats)
    elif args.role == "meshci-recv":
        asyncio.run(meshci_receiver(args.port, args.repeats, args.secret_file))
    else:
        host, _, port = args.to.rpartition(":")
        if args.role == "raw-send":
            raw_sender(host, int(port), args.bytes, args.repeats)
        else:
            asyncio.run(meshci_sender(host, int(port), args.bytes, args.repeats, args.secret_file))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
