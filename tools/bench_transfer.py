#!/usr/bin/env python3
"""Throughput of one large float32 tensor through meshci `Connection`s.

Default (`--role both`): starts a receiver process on loopback and sends from this one,
once over authenticated connections (HMAC-SHA256 on every frame) and once in insecure mode
(no MAC), and prints both rates and the cost of the MAC. Each round is one TENSOR frame
answered by a small acknowledgement, timed from the first byte sent to the acknowledgement.

Split roles, for two machines or two network namespaces (e.g. across a shaped link):

    bench_transfer.py --role receive --host 0.0.0.0 --port 9100 --secret-file S
    bench_transfer.py --role send    --host 10.0.0.1 --port 9100 --secret-file S [--link-mbps 100]

`--link-mbps` also prints the achieved rate as a share of the shaped link rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from meshci.errors import MeshciError
from meshci.wire import (
    Connection,
    ConnectionClosed,
    Direction,
    FrameDecoder,
    FrameMac,
    Message,
    MsgType,
    WireError,
    encode,
    generate_secret,
    load_secret,
    write_secret,
)

SENDER = "bench-sender"
RECEIVER = "bench-receiver"


@dataclass(frozen=True)
class Rates:
    mode: str
    megabytes: float
    rounds: int
    median_s: float
    best_s: float

    @property
    def median_mb_s(self) -> float:
        return self.megabytes / self.median_s

    @property
    def best_mb_s(self) -> float:
        return self.megabytes / self.best_s


# -- receiver ----------------------------------------------------------------------------------
async def receive(host: str, port: int, secret: bytes | None, connections: int) -> None:
    """Accept `connections` senders (0: forever); acknowledge every frame with its size."""
    done = asyncio.Event()
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        conn = await Connection.accept(
            reader, writer, secret=secret, insecure=secret is None, name=RECEIVER, timeout=10.0
        )
        try:
            while True:
                msg = await conn.recv()
                size = sum(t.numel() * t.element_size() for t in msg.tensors)
                await conn.send(Message(MsgType.BLOCK_DONE, msg.request_id, {"bytes": size}))
        except ConnectionClosed:  # the sender finished its rounds
            pass
        finally:
            await conn.close()
            served += 1
            if connections and served >= connections:
                done.set()

    server = await asyncio.start_server(handle, host, port)
    print(f"LISTENING {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await done.wait()


# -- sender ------------------------------------------------------------------------------------
async def send(host: str, port: int, secret: bytes | None, megabytes: float, rounds: int) -> Rates:
    tensor = torch.randn(int(megabytes * (1 << 20)) // 4)
    conn = await Connection.open(host, port, secret=secret, insecure=secret is None, name=SENDER, timeout=30.0)
    times = []
    try:
        for i in range(rounds + 1):  # round 0 warms up buffers and is not counted
            start = time.perf_counter()
            await conn.send(Message(MsgType.TILE, i, {"round": i}, (tensor,)))
            ack = await conn.recv()
            elapsed = time.perf_counter() - start
            if ack.meta.get("bytes") != tensor.numel() * 4:
                raise SystemExit(f"receiver acknowledged {ack.meta} instead of {tensor.numel() * 4} bytes")
            if i:
                times.append(elapsed)
    finally:
        await conn.close()
    mode = "authenticated" if secret is not None else "insecure"
    return Rates(mode, tensor.numel() * 4 / 1e6, rounds, statistics.median(times), min(times))


def mac_cpu_cost(megabytes: float, repeats: int = 5) -> dict[str, float]:
    """CPU seconds to MAC one frame on each side (encode + decode), measured in-process."""
    tensor = torch.randn(int(megabytes * (1 << 20)) // 4)
    msg = Message(MsgType.TILE, 0, {}, (tensor,))
    key = generate_secret()
    costs = {}
    for label, with_mac in (("mac", True), ("no_mac", False)):
        best = float("inf")
        for _ in range(repeats):
            send_mac = FrameMac(key, Direction.CLIENT_TO_SERVER) if with_mac else None
            recv_mac = FrameMac(key, Direction.CLIENT_TO_SERVER) if with_mac else None
            start = time.perf_counter()
            buffers = encode(msg, send_mac)
            decoder = FrameDecoder(recv_mac)
            for buf in buffers:
                decoder.feed(buf)
            assert decoder.next_message() is not None
            best = min(best, time.perf_counter() - start)
        costs[label] = best
    return costs


def run_sender(args: argparse.Namespace, secret: bytes | None, port: int) -> Rates:
    return asyncio.run(send(args.host, port, secret, args.mb, args.rounds))


def spawn_receiver(args: argparse.Namespace, secret_file: Path | None) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, __file__, "--role", "receive", "--host", "127.0.0.1", "--port", "0", "--connections", "1"]
    cmd += ["--secret-file", str(secret_file)] if secret_file else ["--insecure"]
    if args.uvloop:
        cmd.append("--uvloop")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("LISTENING "):
        proc.kill()
        raise SystemExit(f"receiver failed to start: {line!r}")
    return proc, int(line.split()[1])


def report(rates: Rates, link_mbps: float | None) -> str:
    text = (
        f"{rates.mode:>13}: {rates.megabytes:.1f} MB x {rates.rounds}: median {rates.median_mb_s:8.1f} MB/s "
        f"({rates.median_mb_s * 8:8.1f} Mbit/s), best {rates.best_mb_s:8.1f} MB/s"
    )
    if link_mbps:
        text += f", {100 * rates.median_mb_s * 8 / link_mbps:.1f}% of the {link_mbps:g} Mbit/s link"
    return text


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except (WireError, MeshciError) as exc:  # unreachable receiver, bad secret file: one line
        print(f"bench_transfer.py: error: {exc}", file=sys.stderr)
        return 2


def run(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=["both", "send", "receive"], default="both")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--secret-file", type=Path, help="cluster secret (split roles); generated for --role both")
    p.add_argument("--insecure", action="store_true", help="split roles: no handshake proof, no MAC")
    p.add_argument("--mb", type=float, default=16.0, help="tensor size in MiB (default 16)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--connections", type=int, default=0, help="receiver: exit after this many (0: never)")
    p.add_argument("--link-mbps", type=float, help="shaped link rate, to print the achieved share")
    p.add_argument("--uvloop", action="store_true", help="run on uvloop")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    if args.role in ("send", "receive"):
        if args.secret_file is None and not args.insecure:
            p.error("--secret-file is required unless --insecure is given")
        secret = None if args.insecure else load_secret(args.secret_file)
        if args.role == "receive":
            asyncio.run(receive(args.host, args.port, secret, args.connections))
            return 0
        rates = run_sender(args, secret, args.port)
        print(json.dumps({**asdict(rates), "median_mb_s": rates.median_mb_s}) if args.json else report(rates, args.link_mbps))
        return 0

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        secret_file = write_secret(Path(tmp) / "bench.secret", generate_secret())
        for mode_file in (secret_file, None):
            proc, port = spawn_receiver(args, mode_file)
            try:
                secret = load_secret(mode_file) if mode_file else None
                results.append(run_sender(args, secret, port))
            finally:
                proc.wait(timeout=30)
    authenticated, insecure = results
    cpu = mac_cpu_cost(args.mb)
    mac_ms = (cpu["mac"] - cpu["no_mac"]) * 1e3
    summary = {
        "authenticated": {**asdict(authenticated), "median_mb_s": authenticated.median_mb_s},
        "insecure": {**asdict(insecure), "median_mb_s": insecure.median_mb_s},
        "rate_ratio_authenticated_over_insecure": authenticated.median_mb_s / insecure.median_mb_s,
        "mac_cpu_ms_per_frame_both_sides": mac_ms,
        "codec_cpu_ms_per_frame_without_mac": cpu["no_mac"] * 1e3,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"loop: {'uvloop' if args.uvloop else 'asyncio'}; two processes over loopback")
    print(report(authenticated, args.link_mbps))
    print(report(insecure, args.link_mbps))
    print(f"authenticated / insecure rate: {summary['rate_ratio_authenticated_over_insecure']:.2f}")
    print(
        f"MAC CPU cost: {mac_ms:.1f} ms per {args.mb:g} MiB frame (sign + verify, in-process); "
        f"codec without MAC: {cpu['no_mac'] * 1e3:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
