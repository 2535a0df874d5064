"""Authenticated fuzzing of a node: a client that holds the cluster secret sends mutated
frames of every message kind and counts how the node answers.

The mutations (`mutate`, pure and seeded) start from real frames (templates recorded from a
mesh serving requests) and put hostile values where the node expects its own: wrong types,
huge, negative and non-finite numbers (``1e99999`` on the wire, which JSON parses to
infinity), integers of hundreds of digits, control characters and long strings, deep
nesting, unknown request ids, missing keys, other kinds' metas, and tensors of the wrong
count, shape or dtype. `FuzzClient` does the handshake by hand (sans-IO `Handshake` and
`FrameDecoder`) so it can put such literals in a correctly MAC'd frame. `campaign` sends
the frames and reports each connection the node dropped, and whether an ERROR with a reason
came before the drop.
"""

from __future__ import annotations

import asyncio
import copy
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from meshci.node.membership import Address
from meshci.wire import FrameDecoder, FrameMac, Handshake, Message, MsgType, Role, encode
from meshci.wire.errors import WireError
from meshci.wire.frames import FLAG_MAC, PREFIX

# Same-length stand-ins: encoded as JSON strings, swapped for number literals JSON parses
# to +-infinity once the frame is built (the codec refuses to encode a non-finite float).
INF = "~INF~"
NEG_INF = "-INF~"
_LITERALS = ((f'"{INF}"'.encode(), b"1e99999"), (f'"{NEG_INF}"'.encode(), b"-1e9999"))

# kinds a fuzzer sends after the handshake (handshake kinds mid-stream are a framing
# matter, covered by the wire's own tests)
FUZZ_KINDS = tuple(k for k in MsgType if k not in (MsgType.HELLO, MsgType.CHALLENGE, MsgType.PROOF))


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


HOSTILE: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 0.5, -0.5, 7, 2 ** 31, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -(2 ** 63),
    10 ** 400, -(10 ** 300), 1e308, -1e308, 1e-308, INF, NEG_INF, "", "x", "node1\n",
    "a\nERROR forged log line", "\x1b[2J\x00", "é\u2028", "z" * 5000, [], {}, [1, 2, 3],
    [0, 0, 0, 0, 0, "tile"], {"a": -1e308}, {"a": INF}, _deep(60), [[0.1, 1e308]] * 3,
    {"vgg16@32x32": [[1e308, 1e308]]}, ["name", 1e308, -1.0],
)


def _paths(value: Any, prefix: tuple[Any, ...] = (), depth: int = 0) -> list[tuple[Any, ...]]:
    """Every place in a JSON value that a mutation may overwrite (up to depth 6)."""
    out = [prefix] if prefix else []
    if depth >= 6:
        return out
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, prefix + (key,), depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value[:8]):
            out += _paths(item, prefix + (index,), depth + 1)
    return out


def _set(root: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        root = root[key]
    root[path[-1]] = value


def _delete(root: Any, path: tuple[Any, ...]) -> None:
    for key in path[:-1]:
        root = root[key]
    del root[path[-1]]


def _hostile(rng: random.Random, names: list[str]) -> Any:
    if rng.random() < 0.15 and names:
        return rng.choice(names)
    if rng.random() < 0.05:
        return [{"name": f"g{rng.getrandbits(32):x}", "host": "127.0.0.1", "port": rng.randrange(1, 65536),
                 "incarnation": rng.choice([1, 2 ** 63 - 1])} for _ in range(rng.choice([3, 200, 600]))]
    return copy.deepcopy(rng.choice(HOSTILE))


def _tensor(rng: random.Random) -> torch.Tensor:
    dtype = rng.choice([torch.float32, torch.float16, torch.int64, torch.uint8, torch.float64])
    shape = rng.choice([(), (0,), (1,), (3, 2), (1, 3, 4, 4), (1, 64, 2, 2), (2, 2, 2, 2, 2)])
    return torch.ones(shape, dtype=dtype) if rng.random() < 0.5 else torch.full(shape, -1).to(dtype)


def mutate(templates: dict[MsgType, list[Message]], rng: random.Random, *, names: list[str],
           request_ids: list[int]) -> Message:
    """One hostile frame: a template of a random kind, mutated 1-3 times."""
    kind = rng.choice(FUZZ_KINDS)
    pool = templates.get(kind) or [Message(kind, 0, {})]
    base = rng.choice(pool)
    meta: Any = copy.deepcopy(base.meta)
    tensors = list(base.tensors)
    rid = base.request_id
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        paths = _paths(meta)
        if op < 0.45 and paths:
            _set(meta, rng.choice(paths), _hostile(rng, names))
        elif op < 0.55 and paths:
            _delete(meta, rng.choice(paths))
        elif op < 0.62:
            meta[rng.choice(["op", "name", "advert", "gossip", "echo", "plan", "pieces", "x"])] = _hostile(rng, names)
        elif op < 0.70:
            other = rng.choice([m for ms in templates.values() for m in ms] or [base])
            meta = copy.deepcopy(other.meta)  # another kind's meta under this kind
        elif op < 0.80:
            rid = rng.choice(request_ids + [0, 1, 2 ** 62 + 1, 2 ** 64 - 1, rng.getrandbits(64)])
        elif op < 0.92:
            choice = rng.random()
            if choice < 0.3 or not tensors:
                tensors.append(_tensor(rng))
            elif choice < 0.6:
                tensors.pop(rng.randrange(len(tensors)))
            else:
                tensors[rng.randrange(len(tensors))] = _tensor(rng)
        elif paths:
            path = rng.choice(paths)  # a string where a number was, and the like
            _set(meta, path, str(_hostile(rng, names))[:100])
    if not isinstance(meta, dict):
        meta = {"meta": meta}
    return Message(kind, rid, meta, tuple(tensors))


def frame(msg: Message, mac: FrameMac) -> bytes:
    """`msg` as one authenticated frame, with the infinity stand-ins made literal."""
    data = b"".join(bytes(b) for b in encode(msg, None))
    for stand_in, literal in _LITERALS:
        data = data.replace(stand_in, literal)
    fields = list(PREFIX.unpack_from(data))
    fields[2] |= FLAG_MAC
    data = PREFIX.pack(*fields) + data[PREFIX.size:]
    digest = mac.begin()
    digest.update(data)
    return data + digest.digest()


class FuzzClient:
    """One authenticated connection that sends hand-made frames and reads the answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 mac: FrameMac, decoder: FrameDecoder) -> None:
        self.reader, self.writer, self.mac, self.decoder = reader, writer, mac, decoder
        self.received: list[Message] = []
        self.closed = False
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, address: Address, secret: bytes, name: str) -> FuzzClient:
        reader, writer = await asyncio.open_connection(address.host, address.port)
        handshake = Handshake(Role.CLIENT, name, secret)
        decoder = FrameDecoder()
        for msg in handshake.initiate():
            writer.write(b"".join(bytes(b) for b in encode(msg, None)))
        async with asyncio.timeout(10.0):
            while not handshake.complete:
                data = await reader.read(65536)
                if not data:
                    raise WireError(f"{address} closed during the handshake")
                decoder.feed(data)
                while not handshake.complete and (msg := decoder.next_message()) is not None:
                    for reply in handshake.receive(msg):
                        writer.write(b"".join(bytes(b) for b in encode(reply, None)))
        result = handshake.result
        assert result is not None and result.send_mac is not None
        decoder.set_mac(result.recv_mac)
        return cls(reader, writer, result.send_mac, decoder)

    async def _read(self) -> None:
        try:
            while True:
                while (msg := self.decoder.next_message()) is not None:
                    self.received.append(msg)
                data = await self.reader.read(1 << 20)
                if not data:
                    break
                self.decoder.feed(data)
        except (OSError, WireError):
            pass  # reset by the node, or a frame we could not read: either way the end
        finally:
            self.closed = True

    async def wait_closed(self) -> None:
        await asyncio.gather(self._task, return_exceptions=True)

    async def send(self, msg: Message) -> None:
        if self.writer.is_closing():
            raise ConnectionResetError("closed by the node")
        self.writer.write(frame(msg, self.mac))
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@dataclass
class FuzzReport:
    frames: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    error_replies: int = 0
    drops: int = 0
    unexplained_drops: list[str] = field(default_factory=list)  # the frame before each
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"frames": self.frames, "error_replies": self.error_replies, "drops": self.drops,
                "unexplained_drops": len(self.unexplained_drops), "seconds": round(self.seconds, 2),
                "kinds": dict(sorted(self.kinds.items()))}


async def campaign(address: Address, secret: bytes, templates: dict[MsgType, list[Message]], *,
                   frames: int, seed: int = 0, names: list[str], request_ids: list[int] = (),  # type: ignore[assignment]
                   settle_every: int = 20) -> FuzzReport:
    """Send `frames` mutated frames to the node at `address`, on connections authenticated
    under `names` in turn (real peers' names among them), reconnecting after each drop."""
    rng = random.Random(seed)
    report = FuzzReport()
    began = time.perf_counter()
    client: FuzzClient | None = None
    last = ""
    try:
        while report.frames < frames:
            if client is None or client.closed:
                if client is not None:
                    await _count_drop(client, report, last)
                client = await FuzzClient.open(address, secret, rng.choice(names))
            msg = mutate(templates, rng, names=names, request_ids=list(request_ids))
            try:
                await client.send(msg)
            except OSError:
                # the node closed the connection after the last frame: let the reader see it
                await asyncio.wait_for(client.wait_closed(), 10.0)
                continue
            last = f"{msg.kind.name} {str(msg.meta)[:300]}"
            report.frames += 1
            report.kinds[msg.kind.name] += 1
            if report.frames % settle_every == 0:
                await asyncio.sleep(0.05)  # let the node answer before the next burst
            else:
                await asyncio.sleep(0)
        await asyncio.sleep(0.5)
    finally:
        if client is not None:
            if client.closed:
                await _count_drop(client, report, last)
            else:
                report.error_replies += sum(m.kind is MsgType.ERROR for m in client.received)
            await client.close()
    report.seconds = time.perf_counter() - began
    return report


async def _count_drop(client: FuzzClient, report: FuzzReport, last: str) -> None:
    report.drops += 1
    errors = [m for m in client.received if m.kind is MsgType.ERROR]
    report.error_replies += len(errors)
    if not client.received or client.received[-1].kind is not MsgType.ERROR:
        report.unexplained_drops.append(last)
    await client.close()


__all__ = ["FUZZ_KINDS", "FuzzClient", "FuzzReport", "HOSTILE", "campaign", "frame", "mutate"]
