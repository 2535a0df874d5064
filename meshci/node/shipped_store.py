"""Models shipped to a peer: how a requester packs one, and the content-addressed cache a
peer keeps of what it received. No sockets here (`meshci.node.shipping` moves the bytes).

A package is the model's trunk as cloudpickle *code* with every tensor left out (each
tensor is a persistent id, an index into the manifest), and a manifest that names every
tensor by the BLAKE2b digest of its raw bytes, with its dtype and shape, and says which
tensors each segment reads. So a peer is sent the code once, and only the tensors of the
segments it will run; tensors never travel pickled.

The store keeps each received thing in a file named by its digest under
``<data dir>/shipped/``: the package as ``<digest>.pkg`` (the code and the manifest; the
digest covers both), each tensor as ``<digest>.bin`` (raw bytes). Every file is hashed
again when it is read; one that no longer matches its name (a tampered or torn file) is
deleted and reported missing, so the requester sends it again. Code is unpickled only from
a verified package, received over an authenticated connection from a peer that proved the
cluster secret (`meshci.node.shipping` refuses anything else).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import torch
from torch import nn

from meshci.errors import RuntimeFailure

DIGEST_BYTES = 20  # BLAKE2b-160: 40 hex characters name a file
MAX_CODE_BYTES = 32 << 20  # a package's pickled code (the trunk without its tensors)
MAX_TENSORS = 65536  # tensors in one manifest
MAX_DIMS = 8
MAX_TENSOR_BYTES = 1 << 30  # one tensor
MAX_SEGMENTS = 4096
DTYPES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}
# packages are pickled by value (a user's module that the peer does not have); that
# setting is process-wide in cloudpickle, so packing is serialised
_PACK_LOCK = threading.Lock()


class ShippingError(RuntimeFailure):
    """A shipped model that cannot be taken or used; the message says why."""


def digest_of(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).hexdigest()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor, as hashed and stored (contiguous, on the CPU)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def valid_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 2 * DIGEST_BYTES and \
        all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class Entry:
    """One tensor of a package: its digest, dtype, shape, whether it was a Parameter."""

    digest: str
    dtype: str
    shape: tuple[int, ...]
    parameter: bool

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        for side in self.shape:
            n *= side
        return n

    def to_json(self) -> list[Any]:
        return [self.digest, self.dtype, list(self.shape), self.parameter]

    @classmethod
    def from_json(cls, data: Any) -> Entry:
        """A manifest entry a peer sent, typed and bounded (ShippingError otherwise)."""
        if not isinstance(data, list) or len(data) != 4:
            raise ShippingError("a manifest entry is [digest, dtype, shape, parameter]")
        digest, dtype, shape, parameter = data
        if not valid_digest(digest) or dtype not in DTYPES or not isinstance(parameter, bool):
            raise ShippingError("a manifest entry has a bad digest, dtype or parameter flag")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or \
                not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_TENSOR_BYTES for s in shape):
            raise ShippingError(f"a manifest entry's shape must be at most {MAX_DIMS} sizes")
        entry = cls(digest, dtype, tuple(shape), parameter)
        if entry.nbytes > MAX_TENSOR_BYTES:
            raise ShippingError(f"a shipped tensor of {entry.nbytes} bytes (at most {MAX_TENSOR_BYTES})")
        return entry


@dataclass(frozen=True)
class Manifest:
    """Every tensor of a package, and the tensors (indices) each segment reads."""

    entries: tuple[Entry, ...]
    segments: tuple[tuple[int, ...], ...]

    def to_json(self) -> dict[str, Any]:
        return {"entries": [e.to_json() for e in self.entries], "segments": [list(s) for s in self.segments]}

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list) or \
                not isinstance(data.get("segments"), list):
            raise ShippingError("a manifest is {entries: [...], segments: [...]}")
        if len(data["entries"]) > MAX_TENSORS or len(data["segments"]) > MAX_SEGMENTS:
            raise ShippingError(f"a manifest of at most {MAX_TENSORS} tensors and {MAX_SEGMENTS} segments")
        entries = tuple(Entry.from_json(e) for e in data["entries"])
        segments = []
        for seg in data["segments"]:
            if not isinstance(seg, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                    and 0 <= i < len(entries) for i in seg):
                raise ShippingError("a manifest segment lists indices of its entries")
            segments.append(tuple(seg))
        return cls(entries, tuple(segments))

    def wanted(self, segments: set[int] | frozenset[int]) -> list[int]:
        """The tensors (indices) the given segments read, each once, in order."""
        if any(not 0 <= k < len(self.segments) for k in segments):
            raise ShippingError(f"segments {sorted(segments)} are not all in a {len(self.segments)}-segment package")
        return sorted({i for k in segments for i in self.segments[k]})


@dataclass(frozen=True)
class Package:
    """A model as a requester ships it: `code` (its digest names the package) and the
    tensors the manifest lists, in order."""

    digest: str
    code: bytes
    manifest: Manifest
    tensors: tuple[torch.Tensor, ...]


def _canonical(code: bytes, manifest: Manifest) -> bytes:
    """The bytes a package's digest covers: its manifest's JSON, then its code."""
    text = json.dumps(manifest.to_json(), sort_keys=True, separators=(",", ":")).encode()
    return len(text).to_bytes(8, "big") + text + code


def package_digest(code: bytes, manifest: Manifest) -> str:
    return digest_of(_canonical(code, manifest))


class _Packer(cloudpickle.Pickler):
    """cloudpickle with every tensor left out: a persistent id (its index) instead."""

    def __init__(self, fh: io.BytesIO, index: dict[int, int], tensors: list[torch.Tensor],
                 touched: set[int] | None = None) -> None:
        super().__init__(fh, protocol=pickle.HIGHEST_PROTOCOL)
        self.index, self.tensors, self.touched = index, tensors, touched

    def persistent_id(self, obj: Any) -> Any:  # noqa: D401 - pickle's hook
        if not isinstance(obj, torch.Tensor):
            return None
        i = self.index.get(id(obj))
        if i is None:
            i = self.index[id(obj)] = len(self.tensors)
            self.tensors.append(obj)
        if self.touched is not None:
            self.touched.add(i)
        return ("tensor", i)


def _pickle_by_value_modules(model: str) -> list[Any]:
    """The user's package behind `pkg.mod:callable` (none for built-in models): pickled by
    value, since the peer may not have it."""
    module = model.partition("@")[0].partition(":")[0] if ":" in model else ""
    top = module.split(".")[0]
    if not top or top in ("meshci", "torch", "torchvision", "numpy") or top not in sys.modules:
        return []
    return [sys.modules[top]]


def pack(trunk: Any, model: str) -> Package:
    """A package of `trunk` (a node's built trunk, without its head): code, manifest and
    tensors. Blocking (pickles every segment)."""
    index: dict[int, int] = {}
    tensors: list[torch.Tensor] = []
    modules = _pickle_by_value_modules(model)
    with _PACK_LOCK:
        for module in modules:
            cloudpickle.register_pickle_by_value(module)
        try:
            segments = []
            for segment in trunk.segments:  # which tensors each segment reads
                touched: set[int] = set()
                _Packer(io.BytesIO(), index, tensors, touched).dump(segment)
                segments.append(tuple(sorted(touched)))
            fh = io.BytesIO()
            _Packer(fh, index, tensors).dump(trunk)
        finally:
            for module in modules:
                cloudpickle.unregister_pickle_by_value(module)
    code = fh.getvalue()
    if len(code) > MAX_CODE_BYTES:
        raise ShippingError(f"the code of {model} pickles to {len(code)} bytes (at most {MAX_CODE_BYTES})")
    entries = tuple(Entry(digest_of(tensor_bytes(t)), str(t.dtype).removeprefix("torch."), tuple(t.shape),
                          isinstance(t, nn.Parameter)) for t in tensors)
    for entry in entries:
        if entry.dtype not in DTYPES:
            raise ShippingError(f"{model} has a tensor of dtype {entry.dtype}, which cannot be shipped")
    manifest = Manifest(entries, tuple(segments))
    return Package(package_digest(code, manifest), code, manifest, tuple(tensors))


class _Unpacker(pickle.Unpickler):
    def __init__(self, fh: io.BytesIO, load: Any) -> None:
        super().__init__(fh)
        self.load_tensor = load

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 2 and pid[0] == "tensor" and isinstance(pid[1], int)):
            raise ShippingError("a shipped package refers to something that is not one of its tensors")
        return self.load_tensor(pid[1])


class ShippedStore:
    """The content-addressed cache of shipped packages and tensors in one folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self.tampered = 0  # files found not to match their name (deleted, fetched again)

    def _path(self, digest: str, suffix: str) -> Path:
        if not valid_digest(digest):
            raise ShippingError("a shipped digest must be 40 hex digits")
        return self.root / f"{digest}{suffix}"

    def _write(self, path: Path, data: bytes | memoryview) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _read_verified(self, path: Path, digest: str, cover: Any = None) -> bytes | None:
        """The file's bytes when they still hash to `digest`; a file that does not is
        deleted (None: fetch it again)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if digest_of(cover(data) if cover is not None else data) != digest:
            with self._lock:
                self.tampered += 1
            path.unlink(missing_ok=True)
            return None
        return data

    # ---- packages ----------------------------------------------------------------------
    def put_package(self, digest: str, code: bytes, manifest: Manifest) -> None:
        if len(code) > MAX_CODE_BYTES:
            raise ShippingError(f"shipped code of {len(code)} bytes (at most {MAX_CODE_BYTES})")
        if package_digest(code, manifest) != digest:
            raise ShippingError("the shipped code and manifest do not match their digest")
        self._write(self._path(digest, ".pkg"), _canonical(code, manifest))

    def manifest(self, digest: str) -> tuple[bytes, Manifest] | None:
        """The package's code and manifest, verified (None: not held, or tampered)."""
        data = self._read_verified(self._path(digest, ".pkg"), digest)
        if data is None:
            return None
        n = int.from_bytes(data[:8], "big")
        return data[8 + n:], Manifest.from_json(json.loads(data[8:8 + n]))

    # ---- tensors -----------------------------------------------------------------------
    def put_tensor(self, entry: Entry, tensor: torch.Tensor) -> None:
        """Keep a received tensor: it must be the manifest's dtype and shape and hash to its digest."""
        if str(tensor.dtype).removeprefix("torch.") != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise ShippingError(f"a shipped tensor of {tensor.dtype} {tuple(tensor.shape)}, the manifest says "
                                f"{entry.dtype} {entry.shape}")
        data = tensor_bytes(tensor)
        if digest_of(data) != entry.digest:
            raise ShippingError(f"a shipped tensor does not hash to its digest {entry.digest}")
        self._write(self._path(entry.digest, ".bin"), data)

    def missing(self, manifest: Manifest, indices: list[int]) -> list[int]:
        """Which of these tensors are not held intact (each file hashed again)."""
        out = []
        for i in indices:
            entry = manifest.entries[i]
            data = self._read_verified(self._path(entry.digest, ".bin"), entry.digest)
            if data is None or len(data) != entry.nbytes:
                out.append(i)
        return out

    def read_tensor(self, entry: Entry) -> torch.Tensor:
        data = self._read_verified(self._path(entry.digest, ".bin"), entry.digest)
        if data is None or len(data) != entry.nbytes:
            raise ShippingError(f"shipped tensor {entry.digest} is missing or damaged here")
        dtype = DTYPES[entry.dtype]
        t = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return t.reshape(entry.shape)

    # ---- building ----------------------------------------------------------------------
    def unpack(self, digest: str, segments: set[int] | frozenset[int]) -> Any:
        """The trunk of a held package with the tensors of `segments` read (verified) from
        this store; every other tensor is a shape on the ``meta`` device (never run here).
        Blocking."""
        held = self.manifest(digest)
        if held is None:
            raise ShippingError(f"shipped model {digest} is not held here")
        code, manifest = held
        wanted = set(manifest.wanted(segments))

        def load(i: int) -> torch.Tensor:
            if not 0 <= i < len(manifest.entries):
                raise ShippingError("a shipped package refers to a tensor its manifest does not list")
            entry = manifest.entries[i]
            if i in wanted:
                t = self.read_tensor(entry)
            else:
                t = torch.empty(entry.shape, dtype=DTYPES[entry.dtype], device="meta")
            return nn.Parameter(t, requires_grad=False) if entry.parameter else t

        return _Unpacker(io.BytesIO(code), load).load()


__all__ = ["Entry", "Manifest", "Package", "ShippedStore", "ShippingError", "pack", "package_digest"]
