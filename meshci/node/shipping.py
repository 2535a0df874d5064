"""Models shipped on demand: a requester runs a model the other nodes do not have.

A model the mesh does not know by name (a user's `package.module:callable` only the
requester can import, or a built-in model with trained weights only the requester holds)
is *shipped*: its trunk's code once (cloudpickle, by value), then only the tensors of the
segments each peer will run, into the peer's content-addressed cache
(`meshci.node.shipped_store`). All of it travels as `MODEL_CODE` messages, each answered
on the same connection:

* ``query`` (before planning, once per peer incarnation and model): the peer answers
  ``status``: ``native`` (it serves the model itself: --allow-model, or it holds the
  weights), ``ship`` (it takes shipped models: --accept-shipped-models) or ``refused``
  with the reason. Refusing peers are left out of the plan.
* ``prepare`` (every request, to each shipped device of the plan, with the segments it
  runs): the peer answers ``need`` (the code, or the indices of the tensors it does not
  hold intact: every file is hashed again when read), or ``ready``.
* ``code`` / ``weights``: the package, or a batch of tensors (raw buffers, never pickled);
  each answered again with ``need`` or ``ready``. The requester logs its progress.

A peer takes shipped code only when started with --accept-shipped-models, only over a
connection whose peer proved the cluster secret (never on an --insecure node), and checks
every field: digests, sizes, indices. A shipped model's head stays on the requester (its
weights are not shipped). The PLAN of a shipped device names the package (``shipped``);
the worker builds its trunk from the cache (`load`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from meshci.models.registry import model_allowed
from meshci.node.fields import reason, shown
from meshci.node.model_cache import LoadedModel
from meshci.node.shipped_store import (MAX_CODE_BYTES, Manifest, Package, ShippedStore, ShippingError, pack,
                                       valid_digest)
from meshci.planning import Plan
from meshci.trunk import Trunk
from meshci.wire import Message, MsgType
from meshci.wire.errors import WireError

if TYPE_CHECKING:
    from meshci.node.server import Node
    from meshci.wire import Connection

log = logging.getLogger(__name__)

QUERY_TIMEOUT_S = 10.0  # a peer that does not say whether it takes shipped models is left out
ROUND_TIMEOUT_S = 120.0  # one shipping round trip (a batch of tensors stored and hashed)
BATCH_BYTES = 32 << 20  # tensors per `weights` message, by bytes ...
BATCH_TENSORS = 256  # ... and by count
MAX_ROUNDS = 100_000  # a peer that keeps asking for what it was sent is not served forever
PACKAGES = 2  # packed models a requester keeps
LOADED = 2  # shipped trunks a worker keeps built
REPLIES = frozenset({"status", "need", "ready", "refused"})


def _size(n: float) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB"


def shipped_model(model: str) -> bool:
    """Whether a model may need shipping: everything but the built-in models by name."""
    return not model_allowed(model, ())


class Shipping:
    """Both sides of shipping for one node: the requester's and the peer's."""

    def __init__(self, node: Node, store: ShippedStore) -> None:
        self.node = node
        self.store = store
        self._status: dict[tuple[str, int, str], tuple[str, str]] = {}  # (peer, incarnation, model) -> (status, why)
        self._packages: OrderedDict[tuple[str, int, int, int], Package] = OrderedDict()
        self._pack_lock = asyncio.Lock()
        self._waiting: dict[tuple[str, int], asyncio.Future[dict[str, Any]]] = {}
        self._loaded: OrderedDict[tuple[str, frozenset[int]], LoadedModel] = OrderedDict()
        self.bytes_sent = 0  # tensors and code this node shipped
        self.bytes_received = 0  # tensors and code this node took

    # ---- the requester's side --------------------------------------------------------
    async def refusers(self, model: str) -> set[str]:
        """Live peers that cannot run `model` (neither know it nor take shipped models, or
        did not say): the plan leaves them out. Empty for built-in models."""
        if not shipped_model(model):
            return set()
        peers = [p for p in self.node.membership.alive()]
        unknown = [p for p in peers if (p.name, p.incarnation, model) not in self._status]
        if unknown:
            await asyncio.gather(*(self._query(p.name, p.incarnation, model) for p in unknown))
        out = set()
        for p in peers:
            status, why = self._status.get((p.name, p.incarnation, model), ("refused", "no answer"))
            if status == "refused":
                log.info("%s is left out of %s: %s", p.name, model, why)
                out.add(p.name)
        return out

    async def _query(self, peer: str, incarnation: int, model: str) -> None:
        try:
            reply = await self._ask(peer, {"op": "query", "model": model}, QUERY_TIMEOUT_S)
        except (WireError, TimeoutError) as exc:
            log.info("%s did not say whether it takes %s: %s", peer, model, exc)
            return  # not remembered: asked again next request
        status = reply.get("status") if reply.get("op") == "status" else "refused"
        if status not in ("native", "ship", "refused"):
            status = "refused"
        if len(self._status) > 4096:
            self._status.clear()
        self._status[(peer, incarnation, model)] = (status, reason(reply.get("reason", "")))

    def _shipped_to(self, device: str, model: str) -> bool:
        peer = self.node.membership.peer(device)
        if device == self.node.name or peer is None:
            return False
        return self._status.get((device, peer.incarnation, model), ("",))[0] == "ship"

    async def prepare(self, plan: Plan, loaded: LoadedModel, model: str
                      ) -> tuple[Plan, dict[str, str], dict[str, int]]:
        """Ship `model` to the plan's devices that need it (code once, the tensors of their
        segments once); the plan (its head kept here when a shipped device would need head
        weights), the package digest per shipped device and the bytes each was sent now.
        Raises ShippingError."""
        if not shipped_model(model):
            return plan, {}, {}
        computing = {t.device for b in plan.blocks for t in b.tiles}
        shipped = {d for d in computing if self._shipped_to(d, model)}
        if not shipped:
            return plan, {}, {}
        head = plan.head_plan
        last = set(plan.blocks[-1].devices)
        if plan.head is not None and (head.device in shipped or (head.split and last & shipped)
                                      or (head.device not in computing and self._shipped_to(head.device, model))):
            plan = dataclasses.replace(plan, head=None)  # the whole head here: its weights stay here
        async with self._pack_lock:
            package = self._packages.get(loaded.key)
            if package is None:
                began = time.perf_counter()
                package = await asyncio.get_running_loop().run_in_executor(None, pack, loaded.trunk, model)
                self._packages[loaded.key] = package
                while len(self._packages) > PACKAGES:
                    self._packages.popitem(last=False)
                log.info("packed %s: code %d bytes, %d tensors in %.2f s", model, len(package.code),
                         len(package.tensors), time.perf_counter() - began)
        segments: dict[str, set[int]] = {d: set() for d in shipped}
        for block in plan.blocks:
            for name in block.devices:
                if name in segments:
                    segments[name].update(range(block.start, block.end))
        sent = await asyncio.gather(*(self._ship(device, model, package, segs) for device, segs in segments.items()))
        return plan, {d: package.digest for d in shipped}, {d: n for d, n in zip(segments, sent) if n}

    async def _ship(self, device: str, model: str, package: Package, segments: set[int]) -> int:
        """Bring `device` to hold the package and the tensors of `segments`; the bytes sent."""
        base = {"package": package.digest, "model": model, "segments": sorted(segments)}
        wanted = package.manifest.wanted(segments)
        total = sum(package.manifest.entries[i].nbytes for i in wanted)
        reply = await self._ask(device, {"op": "prepare", **base}, ROUND_TIMEOUT_S)
        sent = code_sent = 0  # weights, code
        for _ in range(MAX_ROUNDS):
            op = reply.get("op")
            if op == "ready":
                if sent:
                    log.info("shipped %s to %s: %s of weights", model, device, _size(sent))
                return sent + code_sent
            if op == "refused":
                raise ShippingError(f"{device} refuses the shipped model {model}: {reason(reply.get('reason'))}")
            if op != "need":
                raise ShippingError(f"{device} answered shipping with {shown(op)}")
            if reply.get("code") is True:
                log.info("shipping %s to %s: code (%s) and %d tensors (%s)", model, device,
                         _size(len(package.code)), len(wanted), _size(total))
                self.bytes_sent += len(package.code)
                code_sent += len(package.code)
                reply = await self._ask(device, {"op": "code", **base, "manifest": package.manifest.to_json()},
                                        ROUND_TIMEOUT_S, blob=package.code)
                continue
            need = reply.get("indices")
            if not isinstance(need, list) or not need or \
                    not all(isinstance(i, int) and i in set(wanted) for i in need):
                raise ShippingError(f"{device} asked for tensors that its segments do not read")
            batch, nbytes = [], 0
            for i in need:
                size = package.manifest.entries[i].nbytes
                if batch and (nbytes + size > BATCH_BYTES or len(batch) >= BATCH_TENSORS):
                    break
                batch.append(i)
                nbytes += size
            sent += nbytes
            self.bytes_sent += nbytes
            log.info("shipping %s to %s: weights %s of %s (%d%%)", model, device, _size(sent), _size(total),
                     round(100 * sent / total) if total else 100)
            reply = await self._ask(device, {"op": "weights", **base, "indices": batch}, ROUND_TIMEOUT_S,
                                    tensors=tuple(package.tensors[i].detach().contiguous() for i in batch))
        raise ShippingError(f"{device} kept asking for {model} after {MAX_ROUNDS} rounds")

    async def _ask(self, peer: str, meta: dict[str, Any], timeout: float, *, blob: bytes | None = None,
                   tensors: tuple[Any, ...] = ()) -> dict[str, Any]:
        token = random.getrandbits(62) | 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[(peer, token)] = future
        try:
            await self.node.send_to(peer, Message(MsgType.MODEL_CODE, token, meta, tensors, blob))
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop((peer, token), None)

    # ---- messages (both sides) -------------------------------------------------------
    async def on_message(self, conn: Connection, msg: Message) -> None:
        op = msg.meta.get("op")
        if op in REPLIES:
            future = self._waiting.get((conn.peer_name, msg.request_id))
            if future is None or future.done():
                log.info("dropping an unasked %s about shipping from %s", shown(op), shown(conn.peer_name))
            else:
                future.set_result(dict(msg.meta))
            return
        try:
            answer = await self._serve(conn, msg)
        except (ShippingError, KeyError, TypeError, ValueError, OSError) as exc:
            # a package this node cannot take: the requester hears why, the node keeps serving
            why = reason(str(exc) if not isinstance(exc, KeyError) else f"missing {exc}")
            log.warning("shipped model from %s refused: %s", shown(conn.peer_name), why)
            answer = {"op": "refused", "reason": f"{self.node.name}: {why}"}
        await self.node.connections.send(conn, Message(MsgType.MODEL_CODE, msg.request_id, answer))

    def _refusal(self, conn: Connection) -> str | None:
        config = self.node.config
        if not config.accept_shipped_models:
            return f"{self.node.name} does not take shipped models (start it with --accept-shipped-models)"
        if config.insecure or not conn.authenticated:
            return f"{self.node.name} takes shipped code only from peers that proved the cluster secret"
        return None

    async def _serve(self, conn: Connection, msg: Message) -> dict[str, Any]:
        """A peer's side: answer one query, prepare, code or weights message."""
        op, meta = msg.meta.get("op"), msg.meta
        model = meta.get("model")
        if not isinstance(model, str) or not 0 < len(model) <= 256:
            raise ShippingError("shipping names its model (1-256 characters)")
        refused = self._refusal(conn)
        if op == "query":
            if model_allowed(model, self.node.config.allow_models):
                return {"op": "status", "status": "native"}
            return {"op": "status", "status": "refused" if refused else "ship", "reason": refused or ""}
        if refused:
            return {"op": "refused", "reason": refused}
        if op not in ("prepare", "code", "weights"):
            raise ShippingError(f"unknown shipping op {shown(op)}")
        digest = meta["package"]
        if not valid_digest(digest):
            raise ShippingError("a shipped package is named by a 40-digit hex digest")
        segments = meta["segments"]
        if not isinstance(segments, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in segments):
            raise ShippingError("shipping segments must be a list of segment indices")
        loop = asyncio.get_running_loop()
        if op == "code":
            manifest = Manifest.from_json(meta["manifest"])
            blob = msg.blob
            if blob is None or len(blob) > MAX_CODE_BYTES:
                raise ShippingError(f"shipped code must come as a blob of at most {MAX_CODE_BYTES} bytes")
            await loop.run_in_executor(None, self.store.put_package, digest, blob, manifest)
            self.bytes_received += len(blob)
        elif op == "weights":
            indices = meta["indices"]
            held = await loop.run_in_executor(None, self.store.manifest, digest)
            if held is None:
                return {"op": "need", "code": True}
            if not isinstance(indices, list) or len(indices) != len(msg.tensors) or \
                    not all(isinstance(i, int) and 0 <= i < len(held[1].entries) for i in indices):
                raise ShippingError("shipped weights need one manifest index per tensor")
            for i, tensor in zip(indices, msg.tensors):
                await loop.run_in_executor(None, self.store.put_tensor, held[1].entries[i], tensor)
                self.bytes_received += held[1].entries[i].nbytes
        if any(d == digest and frozenset(segments) <= segs for d, segs in self._loaded):
            return {"op": "ready"}  # built and in memory
        return await loop.run_in_executor(None, self._readiness, digest, frozenset(segments))

    def _readiness(self, digest: str, segments: frozenset[int]) -> dict[str, Any]:
        """Blocking: what this node still needs to run `segments` of the package."""
        held = self.store.manifest(digest)
        if held is None:
            return {"op": "need", "code": True}
        missing = self.store.missing(held[1], held[1].wanted(segments))
        return {"op": "need", "indices": missing} if missing else {"op": "ready"}

    # ---- the worker's side -----------------------------------------------------------
    async def load(self, meta: dict[str, Any], plan: Plan, model: str, seed: int,
                   size: tuple[int, int]) -> LoadedModel:
        """The trunk of a shipped model for a PLAN: from memory, or built from the cache
        with the tensors of the segments this node runs."""
        if not self.node.config.accept_shipped_models:
            raise ShippingError(f"{self.node.name} does not take shipped models (start it with "
                                "--accept-shipped-models)")
        digest = meta["shipped"]
        if not valid_digest(digest):
            raise ShippingError("a PLAN's shipped package is named by a 40-digit hex digest")
        me = self.node.name
        segments = frozenset(s for b in plan.blocks if me in b.devices for s in range(b.start, b.end))
        for (held, segs), loaded in self._loaded.items():
            if held == digest and segments <= segs and loaded.key == (model, seed, *size):
                self._loaded.move_to_end((held, segs))
                return loaded
        loop = asyncio.get_running_loop()
        trunk = await loop.run_in_executor(self.node.runtime._loader, self.store.unpack, digest, segments)
        if not isinstance(trunk, Trunk) or tuple(trunk.input_shape[1:]) != tuple(size):
            raise ShippingError(f"shipped package {digest} is not a trunk at {size[0]}x{size[1]}")
        loaded = LoadedModel((model, seed, size[0], size[1]), trunk, False, None)
        self._loaded[(digest, segments)] = loaded
        while len(self._loaded) > LOADED:
            self._loaded.popitem(last=False)
        return loaded


__all__ = ["Shipping", "shipped_model"]
