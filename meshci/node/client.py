"""Talking to a node as a client: one authenticated connection, one request, one answer."""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from meshci.errors import RuntimeFailure
from meshci.node.membership import Address
from meshci.wire import Connection, Message, MsgType
from meshci.wire.errors import AuthenticationError, HandshakeTimeout, RemoteProtocolError, WireError

if TYPE_CHECKING:
    import torch


# past its deadline a request's answer (an ERROR saying so) is this late at most
DEADLINE_GRACE_S = 10.0


class RequestError(RuntimeFailure):
    """The node answered with an ERROR, or could not be reached. Exit status 1, or 2 when
    the node said the request itself was wrong (`usage`: unknown model, impossible size)."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage
        self.exit_status = 2 if usage else 1


# how torch and Python say a device ran out of memory (CPU allocator, CUDA, MemoryError)
OUT_OF_MEMORY_WORDS = ("out of memory", "can't allocate memory", "not enough memory")
OUT_OF_MEMORY_HINT = ("a device ran out of memory: use a smaller --size, the edgeci strategy "
                      "(it spreads the model over the devices), or add devices")


def connect_hint(address: Address, exc: WireError) -> str:
    """One line for a failed connect: what went wrong and what to do about it."""
    if isinstance(exc, (AuthenticationError, RemoteProtocolError)):
        return (f"cannot connect to {address}: it did not accept our cluster secret ({exc}); "
                "use the --secret-file the mesh's nodes were started with (or --insecure if they were)")
    if isinstance(exc, HandshakeTimeout):
        return (f"cannot connect to {address}: {exc}; check the address, and that the node's port "
                "is open in its firewall")
    return (f"cannot connect to {address}: {exc}; is a meshci node running there? "
            "Check HOST:PORT (start one with `meshci node --listen HOST:PORT`)")


def failure_hint(reason: str) -> str:
    """A node's failure reason with what to do appended where we can tell."""
    lowered = reason.lower()
    if ("MemoryError" in reason or any(words in lowered for words in OUT_OF_MEMORY_WORDS)) \
            and "--size" not in reason:  # a node's own line already says what to do (`meshci.node.oom`)
        return f"{reason}; {OUT_OF_MEMORY_HINT}"
    return reason


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
        raise RequestError(connect_hint(address, exc)) from exc
    connected = time.perf_counter()
    try:
        await conn.send(msg)
        async with asyncio.timeout(timeout):
            while True:
                reply = await conn.recv()
                if reply.request_id != msg.request_id:
                    continue  # not ours (cannot happen on a client connection; be safe)
                if reply.kind is MsgType.ERROR:
                    reason = failure_hint(str(reply.meta.get("reason", "error")))
                    raise RequestError(f"{conn.peer_name}: {reason}", usage=reply.meta.get("usage") is True)
                if timings is not None:
                    timings["connect_s"] = connected - began
                    timings["answer_s"] = time.perf_counter() - connected
                return reply
    except WireError as exc:
        # the node hung up mid-request
        raise RequestError(f"connection to {address} failed: {exc}; the node may have stopped, "
                           "retry or use another --via node") from exc
    except TimeoutError as exc:
        # the node accepted the request but never answered: the user's wait ends here
        raise RequestError(f"no answer from {address} within {timeout:.0f} s; the mesh may be busy "
                           "or a device hung: raise --timeout, or see `meshci peers`") from exc
    finally:
        await conn.close()


async def infer(address: Address, *, model: str, strategy: str = "edgeci", seed: int = 0,
                size: tuple[int, int] = (224, 224), image: torch.Tensor | np.ndarray | None = None,
                input_seed: int = 0, check: bool = False, details: bool = False, secret: bytes | None,
                insecure: bool = False, ssl_context: ssl.SSLContext | None = None,
                timeout: float = 600.0, deadline: float | None = None) -> tuple[dict[str, Any], Any]:
    """One request; returns the answer's meta and the logits (a torch tensor when this
    process has imported torch, else a numpy array). The meta gains `client_latency_s`: the wall time at the client
    from opening the connection to holding the logits (what a user waits for), and
    `connect_s`, the part of it spent connecting and authenticating. `deadline`: seconds
    the request may take (the node's default when None); the node answers by then, so the
    wait ends a little after it at the latest."""
    msg = infer_message(model=model, strategy=strategy, seed=seed, size=size, image=image,
                        input_seed=input_seed, check=check, details=details, deadline=deadline)
    if deadline is not None:
        timeout = min(timeout, deadline + DEADLINE_GRACE_S)
    timings: dict[str, float] = {}
    reply = await ask(address, msg, secret=secret, insecure=insecure, ssl_context=ssl_context,
                      timeout=timeout, timings=timings)
    answer = result_meta(reply, address)
    answer["client_latency_s"] = timings["connect_s"] + timings["answer_s"]
    answer["connect_s"] = timings["connect_s"]
    return answer, reply.tensors[0]


def infer_message(*, model: str, strategy: str = "edgeci", seed: int = 0, size: tuple[int, int] = (224, 224),
                  image: torch.Tensor | np.ndarray | None = None, input_seed: int = 0, check: bool = False,
                  details: bool = False, deadline: float | None = None) -> Message:
    """The INFER message of one request (a fresh random request id); `deadline`: seconds
    it may take (the node's default when None)."""
    meta: dict[str, Any] = {"model": model, "strategy": strategy, "seed": seed, "size": list(size),
                            "input_seed": input_seed, "check": check, "details": details}
    if deadline is not None:
        meta["deadline_s"] = deadline
    if isinstance(image, np.ndarray):
        tensors: tuple[Any, ...] = (np.ascontiguousarray(image),)
    else:
        tensors = (image.contiguous(),) if image is not None else ()
    return Message(MsgType.INFER, random.getrandbits(62) | 1, meta, tensors)


def result_meta(reply: Message, address: Address) -> dict[str, Any]:
    """The meta of a RESULT answer (a copy), after checking it is one."""
    if reply.kind is not MsgType.RESULT or len(reply.tensors) != 1:
        raise RequestError(f"unexpected answer {reply.kind.name} from {address}")
    return dict(reply.meta)


async def stats(address: Address, *, secret: bytes | None, insecure: bool = False,
                ssl_context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """The node's counters (bytes by message kind, relayed boundary bytes, peers, RSS)."""
    msg = Message(MsgType.STATE, random.getrandbits(62) | 1, {"op": "stats"})
    reply = await ask(address, msg, secret=secret, insecure=insecure, ssl_context=ssl_context,
                      timeout=30.0)
    return reply.meta


async def members(address: Address, *, secret: bytes | None, insecure: bool = False,
                  ssl_context: ssl.SSLContext | None = None, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The mesh's members as the node at `address` sees them (`meshci.node.view`)."""
    msg = Message(MsgType.STATE, random.getrandbits(62) | 1, {"op": "peers"})
    reply = await ask(address, msg, secret=secret, insecure=insecure, ssl_context=ssl_context,
                      timeout=timeout)
    rows = reply.meta.get("members")
    if not isinstance(rows, list):
        raise RequestError(f"unexpected answer from {address}: no member list (an older meshci?)")
    return rows


async def _spans(address: Address, trace_id: int, *, secret: bytes | None, insecure: bool,
                 ssl_context: ssl.SSLContext | None) -> dict[str, Any]:
    msg = Message(MsgType.STATE, random.getrandbits(62) | 1, {"op": "trace", "request": trace_id})
    reply = await ask(address, msg, secret=secret, insecure=insecure, ssl_context=ssl_context, timeout=30.0)
    return reply.meta


async def collect_trace(via: Address, answer: dict[str, Any], *, secret: bytes | None, insecure: bool = False,
                        ssl_context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """The timeline of the request `answer` came from, as Chrome trace-event JSON: the
    requester's spans and clock offsets from `via`, each other device's spans from that
    device (its address as the requester knows it). A device that cannot be asked is named
    in `otherData.missing`, not an error: the inference itself succeeded."""
    from meshci.node.trace import Span, chrome_trace

    trace_id = answer.get("trace_id")
    if not isinstance(trace_id, int):
        raise RequestError(f"{via} did not name the request's trace (an older meshci?)")
    own = await _spans(via, trace_id, secret=secret, insecure=insecure, ssl_context=ssl_context)
    requester = str(own.get("name", answer.get("requester")))
    raw: dict[str, Any] = {requester: own.get("spans", [])}
    others = [d for d in answer.get("devices", []) if d != requester]
    missing: dict[str, str] = {}
    if others:
        addresses = {row["name"]: row["address"] for row in await members(via, secret=secret, insecure=insecure,
                                                                            ssl_context=ssl_context)}
        for device in others:
            try:
                reply = await _spans(Address.parse(addresses[device]), trace_id, secret=secret,
                                     insecure=insecure, ssl_context=ssl_context)
            except (KeyError, ValueError, RequestError) as exc:
                # gone since, or unreachable from here: the timeline lacks its track, says so
                missing[device] = str(exc) or type(exc).__name__
                continue
            raw[device] = reply.get("spans", [])
    devices: dict[str, list[Span]] = {}
    for device, spans in raw.items():
        try:
            devices[device] = [Span.from_json(span) for span in spans]
        except ValueError as exc:
            # a malformed answer: leave that device out, say why
            missing[device] = f"malformed spans: {exc}"
    offsets = {d: float(o) for d, o in dict(own.get("clock_offsets") or {}).items()
               if d in devices and isinstance(o, (int, float)) and not isinstance(o, bool)}
    trace = chrome_trace(devices, offsets, requester)
    trace["otherData"]["missing"] = missing
    return trace
