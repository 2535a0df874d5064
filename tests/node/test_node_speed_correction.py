"""A node learns how fast it computes now against its measured curves, from every tile it
computes: also a tile that carries the split head's partial sums (timed apart from them)."""

from __future__ import annotations

from inprocess import start_mesh

from meshci.node.client import infer
from meshci.node.runtime import Runtime
from meshci.node.server import Node


async def test_every_computed_tile_is_a_speed_sample(tmp_path, monkeypatch) -> None:
    secret = b"s" * 32
    monkeypatch.setattr(Runtime, "__init__", _with_curves(Runtime.__init__, tmp_path))
    nodes: list[Node] = await start_mesh({"a": 1.0}, secret, measure_curves=True)
    try:
        node = nodes[0]
        node.runtime.speed.min_predicted_s = 0.0  # the tiles of a small model are short
        for strategy in ("local", "edgeci"):
            meta, _ = await infer(node.address, model="resnet18", strategy=strategy, size=(48, 48), secret=secret,
                                  details=True)
        key = next(iter(node.runtime.profiles))
        tiles = sum(len(b["tiles"]) for b in meta["plan"]["blocks"])
        assert node.runtime.speed.samples.get(key, 0) >= 1 + tiles, (node.runtime.speed.samples, meta["head_split"])
        # what it learned is what it advertises: its curves times the factor
        curve = dict(node.runtime.curves())[key]
        factor = node.runtime.speed.factor(key)
        assert curve[0][0] == node.runtime.profiles[key].curve[0][0] * factor
    finally:
        for n in nodes:
            await n.close()


def _with_curves(init, data_dir):  # type: ignore[no-untyped-def]
    def patched(self, threads=1, cache_capacity=2, isolate_builds=True, **kw):  # type: ignore[no-untyped-def]
        kw.update(curves=True, data_dir=data_dir, progress=None)
        init(self, threads, cache_capacity, isolate_builds, **kw)
    return patched
