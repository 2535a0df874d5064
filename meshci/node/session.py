"""A client session: one authenticated connection to a node that carries many requests at
once (a camera sending frame after frame, the soak tool, a requester under load).

`meshci.node.client.infer` opens a connection per request; a node admits only a few
handshakes at a time from one address (`meshci.wire.limiter`), so a client with many
requests in flight keeps one connection and matches each answer to its request by id.
The node serves every INFER on a connection concurrently."""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from typing import Any

from meshci.node.client import RequestError, connect_hint, failure_hint, infer_message, result_meta
from meshci.node.membership import Address
from meshci.wire import Connection, Message, MsgType
from meshci.wire.errors import WireError


class Session:
    """Requests over one connection; `infer` may be awaited by many tasks at once."""

    def __init__(self, address: Address, conn: Connection) -> None:
        self.address = address
        self.conn = conn
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self._lost: RequestError | None = None

    @classmethod
    async def open(cls, address: Address, *, secret: bytes | None, insecure: bool = False,
                   ssl_context: ssl.SSLContext | None = None) -> Session:
        try:
            conn = await Connection.open(address.host, address.port, secret=secret,
                                         name=f"client-{os.getpid()}", ssl=ssl_context, insecure=insecure)
        except WireError as exc:
            raise RequestError(connect_hint(address, exc)) from exc
        return cls(address, conn)

    async def _read(self) -> None:
        try:
            while True:
                reply = await self.conn.recv()
                waiter = self._waiting.pop(reply.request_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(reply)
        except WireError as exc:
            # the node hung up: every request still waiting fails with the reason
            self._lost = RequestError(f"connection to {self.address} failed: {exc}; the node may have "
                                      "stopped, retry or use another --via node")
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(self._lost)
            self._waiting.clear()

    async def ask(self, msg: Message, *, timeout: float = 600.0) -> Message:
        """Send `msg` and wait for the answer with its request id (RESULT, STATE or ERROR)."""
        if self._lost is not None:
            raise self._lost
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[msg.request_id] = waiter
        try:
            await self.conn.send(msg)
            async with asyncio.timeout(timeout):
                reply = await waiter
        except WireError as exc:
            raise RequestError(f"connection to {self.address} failed: {exc}") from exc
        except TimeoutError as exc:
            raise RequestError(f"no answer from {self.address} within {timeout:.0f} s; the mesh may be busy "
                               "or a device hung") from exc
        finally:
            self._waiting.pop(msg.request_id, None)
        if reply.kind is MsgType.ERROR:
            reason = failure_hint(str(reply.meta.get("reason", "error")))
            raise RequestError(f"{self.conn.peer_name}: {reason}", usage=reply.meta.get("usage") is True)
        return reply

    async def infer(self, *, timeout: float = 600.0, **request: Any) -> tuple[dict[str, Any], Any]:
        """One request (the arguments of `meshci.node.client.infer_message`); the answer's
        meta, with `client_latency_s` from sending to the answer, and the logits."""
        msg = infer_message(**request)
        began = time.perf_counter()
        reply = await self.ask(msg, timeout=timeout)
        answer = result_meta(reply, self.address)
        answer["client_latency_s"] = time.perf_counter() - began
        return answer, reply.tensors[0]

    async def close(self) -> None:
        self._reader.cancel()
        await self.conn.close()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["Session"]
