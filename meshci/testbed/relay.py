"""A TCP delay relay: the honest way to add latency where the kernel has no netem.

It listens on one address and, for every connection it accepts, opens one to the
target and copies bytes both ways, holding each chunk for the configured one-way delay
before passing it on. `meshci.testbed.shaping` starts it inside the *destination*
host, so the source's traffic still crosses the rate-shaped veth (with its real
queue) and only the delay is added in userspace.

What it does not emulate, stated plainly: the sender's TCP sees the round-trip time to
the relay, not the delayed one, so slow start and the congestion window do not feel
the added latency the way they would on a long link; and no packets are lost (a TCP
relay can only add delay to bytes, never drop segments).

`DelayLine` is the pure core (bytes in with a timestamp, due bytes out); the asyncio
part only moves bytes and sleeps until the next chunk is due.

The emulated cluster (`meshci.testbed.bed`) runs one relay per device in front of its
node: ``--delay-from IP=MS`` gives each source its own one-way delay (per-pair delays),
``--jitter-ms J`` draws each chunk's delay uniformly within +-J ms (never reordering
bytes), and ``--forward LISTEN=TARGET`` serves more ports from the same process.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_READ_SIZE = 256 * 1024


@dataclass
class DelayLine:
    """Chunks in arrival order, each released `delay_s` after it arrived (sans-IO: time passed in)."""

    delay_s: float
    _chunks: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    buffered: int = 0
    _last_due: float = float("-inf")

    def push(self, data: bytes, now: float, jitter_s: float = 0.0) -> None:
        """Hold `data` for the delay plus `jitter_s` (may be negative), never releasing it
        before bytes that came earlier (a byte stream is not reordered)."""
        if data:
            due = max(self._last_due, now + max(0.0, self.delay_s + jitter_s))
            self._last_due = due
            self._chunks.append((due, data))
            self.buffered += len(data)

    def next_due(self) -> float | None:
        """When the oldest held chunk may go out (None: nothing held)."""
        return self._chunks[0][0] if self._chunks else None

    def pop_due(self, now: float) -> list[bytes]:
        """Every chunk whose time has come, in order."""
        out = []
        while self._chunks and self._chunks[0][0] <= now:
            _, data = self._chunks.popleft()
            self.buffered -= len(data)
            out.append(data)
        return out


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float, max_buffer: int,
    jitter_s: float = 0.0,
) -> None:
    """Copy reader -> writer with a delay; stop reading while `max_buffer` bytes are held (back-pressure)."""
    loop = asyncio.get_running_loop()
    rng = random.Random()
    line = DelayLine(delay_s)
    changed = asyncio.Event()
    eof = False

    async def pump_in() -> None:
        nonlocal eof
        while True:
            while line.buffered >= max_buffer:
                changed.clear()
                await changed.wait()
            data = await reader.read(_READ_SIZE)
            if not data:
                eof = True
                changed.set()
                return
            line.push(data, loop.time(), rng.uniform(-jitter_s, jitter_s) if jitter_s else 0.0)
            changed.set()

    async def pump_out() -> None:
        while True:
            due = line.next_due()
            if due is None:
                if eof:
                    return
                changed.clear()
                await changed.wait()
                continue
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            chunks = line.pop_due(loop.time())
            changed.set()  # room in the buffer again: wake the reader
            writer.writelines(chunks)
            await writer.drain()

    reading = asyncio.ensure_future(pump_in())
    try:
        await pump_out()
        await reading
        if writer.can_write_eof():
            writer.write_eof()
    finally:
        reading.cancel()


@dataclass(frozen=True)
class RelayConfig:
    listen_host: str
    listen_port: int
    target_host: str
    target_port: int
    delay_ms: float
    max_buffer: int = 8 << 20
    delay_from: tuple[tuple[str, float], ...] = ()  # (source ip, one-way ms): overrides delay_ms
    jitter_ms: float = 0.0


async def run_relay(config: RelayConfig, ready: asyncio.Future[int] | None = None) -> None:
    """Serve until cancelled; `ready` gets the bound port (useful with listen_port 0)."""
    server = await start_relay(config)
    port = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready.set_result(port)
    async with server:
        await server.serve_forever()


async def start_relay(config: RelayConfig) -> asyncio.base_events.Server:
    """A listening relay server for `config` (not yet serving forever)."""
    by_source = dict(config.delay_from)
    jitter_s = config.jitter_ms / 1e3

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        peer = client_writer.get_extra_info("peername")
        source = peer[0] if isinstance(peer, tuple) else ""
        delay_s = by_source.get(source, config.delay_ms) / 1e3
        try:
            target_reader, target_writer = await asyncio.open_connection(config.target_host, config.target_port)
        except OSError as exc:
            # the target is not listening (yet): refuse this one connection, keep serving
            log.warning("relay: cannot reach target %s:%d: %s", config.target_host, config.target_port, exc)
            client_writer.close()
            return
        try:
            await asyncio.gather(
                _pipe(client_reader, target_writer, delay_s, config.max_buffer, jitter_s),
                _pipe(target_reader, client_writer, delay_s, config.max_buffer, jitter_s),
            )
        except (ConnectionError, OSError) as exc:
            # one side reset: the other side gets closed below, like a dropped link
            log.info("relay: connection ended: %s", exc)
        finally:
            client_writer.close()
            target_writer.close()

    return await asyncio.start_server(handle, config.listen_host, config.listen_port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshci.testbed.relay", description="TCP delay relay")
    parser.add_argument("--listen", required=True, help="HOST:PORT (port 0: any free port)")
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay added in each direction")
    parser.add_argument("--max-buffer", type=int, default=8 << 20, help="bytes held per direction before reading pauses")
    parser.add_argument("--delay-from", action="append", default=[], metavar="IP=MS",
                        help="one-way delay for connections from this source address (repeatable)")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="each chunk's delay varies within +-this")
    parser.add_argument("--forward", action="append", default=[], metavar="LISTEN=TARGET",
                        help="also relay LISTEN (HOST:PORT) to TARGET, with the same delays (repeatable)")
    args = parser.parse_args(argv)
    delay_from = []
    for item in args.delay_from:
        source, _, ms = item.partition("=")
        delay_from.append((source, float(ms)))
    pairs = [(args.listen, args.target)] + [tuple(item.split("=", 1)) for item in args.forward]
    configs = []
    for listen, target in pairs:
        listen_host, _, listen_port = listen.rpartition(":")
        target_host, _, target_port = target.rpartition(":")
        configs.append(RelayConfig(listen_host, int(listen_port), target_host, int(target_port), args.delay_ms,
                                   args.max_buffer, tuple(delay_from), args.jitter_ms))

    async def serve() -> None:
        servers = [await start_relay(config) for config in configs]
        print("ready " + " ".join(str(s.sockets[0].getsockname()[1]) for s in servers), flush=True)
        await asyncio.gather(*(s.serve_forever() for s in servers))

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        # stopped by the testbed: a normal end
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
