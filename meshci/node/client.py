"""Talking to a node as a client: one authenticated connection, one request, one answer."""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from meshci.errors import MeshciError
from meshci.node.membership import Address
from meshci.wire import Connection, Message, MsgType
from meshci.wire.errors import WireError

if TYPE_CHECKING:
    import torch


class RequestError(MeshciError):
    """The node answered with an ERROR, or could not be reached."""


async def ask(address: Address, msg: Message, *, secret: bytes | None, insecure: bool = False,
              ssl_context: ssl.SSLContext | None = None, timeout: float = 600.0,
              timings: dict[str, float] | None = None) -> Message:
    """Send `msg` to the node at `address` and return its RESULT/STATE answer; `timings`
    gets the seconds to connect (`connect_s`) and from then to the answer (`answer_s`)."""
    began = time.perf_counter()
    try:
        conn = await Connection.open(address.host, address.port, secret=secret,
                                     name=f"client-{os.getpid()}", ssl=ssl_context, insecure=insecure)
    except WireError as exc:
        # unreachable node or failed authentication: one clear line for the user
        raise RequestError(f"cannot connect to {address}: {exc}") from exc
    connected = time.perf_counter()
    try:
        await conn.send(msg)
        async with asyncio.timeout(timeout):
            while True:
                reply = await conn.recv()
                if reply.request_id != msg.request_id:
                    continue  # not ours (cannot happen on a client connection; be safe)
                if reply.kind is MsgType.ERROR:
                    raise RequestError(f"{conn.peer_name}: {reply.meta.get('reason', 'error')}")
                if timings is not None:
                    timings["connect_s"] = connected - began
                    timings["answer_s"] = time.perf_counter() - connected
                return reply
    except WireError as exc:
        # the node hung up mid-request
        raise RequestError(f"connection to {address} failed: {exc}") from exc
    except TimeoutError as exc:
        # the node accepted the request but never answered: the user's wait ends here
        raise RequestError(f"no answer from {address} within {timeout:.0f} s") from exc
    finally:
        await conn.close()


async def infer(address: Address, *, model: str, strategy: str = "edgeci", seed: int = 0,
                size: tuple[int, int] = (224, 224), image: torch.Tensor | np.ndarray | None = None,
                input_seed: int = 0, check: bool = False, details: bool = False, secret: bytes | None,
                insecure: bool = False, ssl_context: ssl.SSLContext | None = None,
                timeout: float = 600.0) -> tuple[dict[str, Any], Any]:
    """One request; returns the answer's meta and the logits (a torch tensor when this
    process has imported torch, else a numpy array). The meta gains `client_latency_s`: the wall time at the client
    from opening the connection to holding the logits (what a user waits for), and
    `connect_s`, the part of it spent connecting and authenticating."""
    meta = {"model": model, "strategy": strategy, "seed": seed, "size": list(size),
            "input_seed": input_seed, "check": check, "details": details}
    if isinstance(image, np.ndarray):
        tensors: tuple[Any, ...] = (np.ascontiguousarray(image),)
    else:
        tensors = (image.contiguous(),) if image is not None else ()
    msg = Message(MsgType.INFER, random.getrandbits(62) | 1, meta, tensors)
    timings: dict[str, float] = {}
    reply = await ask(address, msg, secret=secret, insecure=insecure, ssl_context=ssl_context,
                      timeout=timeout, timings=timings)
    if reply.kind is not MsgType.RESULT or len(reply.tensors) != 1:
        raise RequestError(f"unexpected answer {reply.kind.name} from {address}")
    answer = dict(reply.meta)
    answer["client_latency_s"] = timings["connect_s"] + timings["answer_s"]
    answer["connect_s"] = timings["connect_s"]
    return answer, reply.tensors[0]


async def stats(address: Address, *, secret: bytes | None, insecure: bool = False,
                ssl_context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """The node's counters (bytes by message kind, relayed boundary bytes, peers, RSS)."""
    msg = Message(MsgType.STATE, random.getrandbits(62) | 1, {"op": "stats"})
    reply = await ask(address, msg, secret=secret, insecure=insecure, ssl_context=ssl_context,
                      timeout=30.0)
    return reply.meta
