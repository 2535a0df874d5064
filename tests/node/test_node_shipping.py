"""Models shipped on demand (`meshci.node.shipping`): a requester runs a model the other
nodes do not have; peers take it only with --accept-shipped-models, keep it in a
content-addressed cache, notice a tampered entry and fetch it again."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

from inprocess import start_mesh

from meshci.models.registry import build_model
from meshci.node.client import infer
from meshci.node.membership import Address
from meshci.node.runtime import Runtime
from meshci.node.server import Node, NodeConfig
from meshci.node.shipped_store import ShippedStore, ShippingError, pack
from meshci.trunk import Region, extract_trunk

pytestmark = pytest.mark.timeout(180)

SECRET = os.urandom(32)
MODEL = "tests.node.shipmodels:tiny"
SIZE = (32, 32)


def _trunk():
    model = build_model(MODEL, seed=3)
    trunk = extract_trunk(model, input_shape=(3, *SIZE), name=MODEL)
    trunk.head = None
    return model, trunk


def test_a_package_holds_no_tensor_and_rebuilds_the_segments_it_was_given(tmp_path: Path) -> None:
    _, trunk = _trunk()
    package = pack(trunk, MODEL)
    assert package.tensors and all(e.digest not in package.code.hex() for e in package.manifest.entries)
    store = ShippedStore(tmp_path)
    store.put_package(package.digest, package.code, package.manifest)
    wanted = package.manifest.wanted({0, 1})
    assert store.missing(package.manifest, wanted) == wanted
    for i in wanted:
        store.put_tensor(package.manifest.entries[i], package.tensors[i])
    assert store.missing(package.manifest, wanted) == []
    rebuilt = store.unpack(package.digest, {0, 1})
    x = torch.randn(1, 3, *SIZE)
    whole = Region(0, SIZE[0], 0, SIZE[1])
    for k in (0, 1):
        y = trunk.segments[k].run(x, whole, whole)
        assert torch.equal(rebuilt.segments[k].run(x, whole, whole), y)
        x = y
    # the segments not asked for hold shapes only
    assert all(t.device.type == "meta" for t in _tensors(rebuilt.segments[-1]))
    # a tensor that is not what the manifest says is refused
    with pytest.raises(ShippingError, match="digest"):
        store.put_tensor(package.manifest.entries[wanted[0]], package.tensors[wanted[0]] + 1)
    # a tampered file is found, deleted and reported missing
    path = tmp_path / f"{package.manifest.entries[wanted[0]].digest}.bin"
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    assert store.missing(package.manifest, wanted) == [wanted[0]]
    assert not path.exists() and store.tampered == 1


def _tensors(obj) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def walk(o, depth=0):
        if depth > 8:
            return
        if isinstance(o, torch.Tensor):
            found.append(o)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v, depth + 1)
        elif hasattr(o, "__dict__"):
            for v in vars(o).values():
                walk(v, depth + 1)
    walk(obj)
    return found


async def _mesh(tmp_path: Path, accept: dict[str, bool]) -> list[Node]:
    """The first node (the requester) may run the test's user models; the others take
    shipped code as `accept` says."""
    first = next(iter(accept))
    per_node = {name: {"accept_shipped_models": accepts,
                       "allow_models": ("tests.node.shipmodels.*",) if name == first else ()}
                for name, accepts in accept.items()}
    return await start_mesh(dict.fromkeys(accept, 1.0), SECRET, data_root=tmp_path, per_node=per_node)


async def test_a_shipped_model_runs_exact_is_cached_and_a_tampered_entry_is_fetched_again(tmp_path: Path) -> None:
    nodes = await _mesh(tmp_path, {"req": False, "taker": True, "refuser": False})
    requester, taker, refuser = nodes
    try:
        x = torch.randn(1, 3, *SIZE)
        expected = build_model(MODEL, seed=0)(x)
        meta, logits = await infer(requester.address, model=MODEL, size=SIZE, image=x, secret=SECRET,
                                   strategy="modnn", check=True)
        assert torch.allclose(logits.flatten(), expected.flatten(), atol=1e-5)
        assert meta["check_ok"]
        assert sorted(meta["devices"]) == ["req", "taker"]  # the refuser was left out
        first = taker.shipping.bytes_received
        assert first > 0 and refuser.shipping.bytes_received == 0
        assert meta["shipped_bytes"] == {"taker": first}  # the client is told what was shipped
        # shipped straight to the peer that does not take shipped code: refused, with the reason
        package = next(iter(requester.shipping._packages.values()))
        with pytest.raises(ShippingError, match="refuser does not take shipped models "
                                                r"\(start it with --accept-shipped-models\)"):
            await requester.shipping._ship("refuser", MODEL, package, {0})
        assert refuser.shipping.bytes_received == 0 and not (tmp_path / "refuser" / "shipped").exists()
        # a second request reuses the cache: nothing shipped again
        meta, logits = await infer(requester.address, model=MODEL, size=SIZE, image=x, secret=SECRET,
                                   strategy="modnn")
        assert torch.allclose(logits.flatten(), expected.flatten(), atol=1e-5)
        assert taker.shipping.bytes_received == first and "shipped_bytes" not in meta
        # tamper with one cached tensor; the taker forgets what it built (as after a restart)
        cached = sorted((tmp_path / "taker" / "shipped").glob("*.bin"))
        assert cached
        data = bytearray(cached[0].read_bytes())
        data[len(data) // 2] ^= 0xFF
        cached[0].write_bytes(bytes(data))
        taker.shipping._loaded.clear()
        meta, logits = await infer(requester.address, model=MODEL, size=SIZE, image=x, secret=SECRET,
                                   strategy="modnn")
        assert torch.allclose(logits.flatten(), expected.flatten(), atol=1e-5)
        assert taker.shipping.store.tampered == 1
        assert 0 < taker.shipping.bytes_received - first < first  # that one tensor again, not all
        assert sorted(meta["devices"]) == ["req", "taker"]
        # the auctioned strategy plans and bids on the same two devices
        meta, logits = await infer(requester.address, model=MODEL, size=SIZE, image=x, secret=SECRET,
                                   strategy="edgeci", check=True)
        assert meta["check_ok"] and torch.allclose(logits.flatten(), expected.flatten(), atol=1e-5)
        assert "refuser" not in meta["devices"]
    finally:
        await asyncio.gather(*(n.close() for n in nodes))


async def test_a_model_only_the_requester_process_can_import_runs_across_the_mesh(tmp_path: Path) -> None:
    """The requester is a `meshci node` process whose PYTHONPATH alone holds the model's
    module; the peers (this process) never import it: they get its code shipped."""
    import sys

    module_dir = tmp_path / "usercode"
    module_dir.mkdir()
    source = (Path(__file__).parent / "shipmodels.py").read_text()
    (module_dir / "tinycnn_only_here.py").write_text(source)
    secret_file = tmp_path / "mesh.key"
    secret_file.write_text(SECRET.hex())
    secret_file.chmod(0o600)
    peers = await _mesh(tmp_path, {"taker": True, "refuser": False})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(module_dir), os.environ.get("PYTHONPATH", "")])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshci", "node", "--name", "req", "--listen", "127.0.0.1:0", "--gflops", "1",
        "--join", str(peers[0].address), "--secret-file", str(secret_file), "--data-dir", str(tmp_path / "req"),
        "--allow-model", "tinycnn_only_here.*", "-v", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
        assert "listening on" in line, line
        host, port = line.rsplit(" ", 1)[1].strip().rsplit(":", 1)
        address = Address(host, int(port))
        async with asyncio.timeout(60):
            while len(peers[0].membership.alive()) < 2:
                await asyncio.sleep(0.1)
        # the user's command: exit 0 (--check passed), and it says where the model was shipped
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshci", "infer", "--via", str(address), "--model", "tinycnn_only_here:tiny",
            "--size", str(SIZE[0]), str(SIZE[1]), "--strategy", "modnn", "--check", "--secret-file", str(secret_file),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(client.communicate(), 180)
        assert client.returncode == 0, err.decode()
        assert "shipped the model to: taker (" in out.decode(), out.decode()
        meta, logits = await infer(address, model="tinycnn_only_here:tiny", size=SIZE, secret=SECRET,
                                   strategy="modnn", check=True, timeout=120)
        assert meta["check_ok"], meta
        assert sorted(meta["devices"]) == ["req", "taker"] and "shipped_bytes" not in meta  # cached
        assert peers[0].shipping.bytes_received > 0 and peers[1].shipping.bytes_received == 0
        assert "tinycnn_only_here" not in sys.modules  # the taker ran it from shipped code
        with pytest.raises(ModuleNotFoundError):
            __import__("tinycnn_only_here")
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        await asyncio.gather(*(n.close() for n in peers))
        if proc.stderr is not None and proc.returncode not in (0, -15):
            print((await proc.stderr.read()).decode()[-3000:])


async def _ask(node: Node, meta: dict, *, blob: bytes | None = None, tensors: tuple = (),
               insecure: bool = False) -> dict:
    from meshci.node.client import ask
    from meshci.wire import Message, MsgType
    reply = await ask(node.address, Message(MsgType.MODEL_CODE, 7, meta, tensors, blob),
                      secret=None if insecure else SECRET, insecure=insecure, timeout=30)
    assert reply.kind is MsgType.MODEL_CODE
    return dict(reply.meta)


async def test_hostile_shipping_fields_are_refused_with_a_reason_and_the_node_keeps_serving(tmp_path: Path) -> None:
    from meshci.node.client import members
    _, trunk = _trunk()
    package = pack(trunk, MODEL)
    node = Node(NodeConfig("taker", Address("127.0.0.1", 0), secret=SECRET, accept_shipped_models=True,
                           data_dir=tmp_path), Runtime(1, isolate_builds=False, data_dir=tmp_path))
    await node.start()
    base = {"model": MODEL, "package": package.digest, "segments": [0]}
    try:
        assert (await _ask(node, {**base, "op": "query"}))["status"] == "ship"
        assert (await _ask(node, {**base, "op": "prepare"})) == {"op": "need", "code": True}
        for meta, why in [
            ({**base, "op": "prepare", "package": "zz"}, "40-digit"),
            ({**base, "op": "prepare", "model": 5}, "names its model"),
            ({**base, "op": "prepare", "segments": "all"}, "segment indices"),
            ({**base, "op": "code", "manifest": package.manifest.to_json()}, "blob"),
            ({**base, "op": "code", "manifest": {"entries": [["0" * 40, "complex64", [1], False]], "segments": []}},
             "manifest entry"),
            ({**base, "op": "explode"}, "unknown shipping op"),
        ]:
            answer = await _ask(node, meta)
            assert answer["op"] == "refused" and why in answer["reason"], (meta, answer)
        # code that does not match its digest (another package's manifest) is refused
        answer = await _ask(node, {**base, "op": "code", "manifest": {"entries": [], "segments": []}},
                            blob=package.code)
        assert answer["op"] == "refused" and "do not match their digest" in answer["reason"]
        answer = await _ask(node, {**base, "op": "code", "manifest": package.manifest.to_json()}, blob=package.code)
        wanted = package.manifest.wanted({0})
        assert answer == {"op": "need", "indices": wanted}
        # a tensor that is not the one the manifest names; an index count that does not match
        bad = tuple(package.tensors[i] * 2 for i in wanted)
        answer = await _ask(node, {**base, "op": "weights", "indices": wanted}, tensors=bad)
        assert answer["op"] == "refused" and "does not hash to its digest" in answer["reason"]
        answer = await _ask(node, {**base, "op": "weights", "indices": wanted[:1]}, tensors=bad)
        assert answer["op"] == "refused" and "one manifest index per tensor" in answer["reason"]
        answer = await _ask(node, {**base, "op": "weights", "indices": wanted},
                            tensors=tuple(package.tensors[i] for i in wanted))
        assert answer == {"op": "ready"}
        assert len(await members(node.address, secret=SECRET)) == 1  # still serving
    finally:
        await node.close()
    # an --insecure node never takes shipped code: nobody proved a secret (and the wire
    # carries no blob on an unauthenticated connection at all)
    loose = Node(NodeConfig("loose", Address("127.0.0.1", 0), insecure=True, accept_shipped_models=True,
                            data_dir=tmp_path / "loose"), Runtime(1, isolate_builds=False, data_dir=tmp_path))
    await loose.start()
    try:
        answer = await _ask(loose, {**base, "op": "prepare"}, insecure=True)
        assert answer["op"] == "refused" and "proved the cluster secret" in answer["reason"]
        assert not (tmp_path / "loose" / "shipped").exists()
    finally:
        await loose.close()


async def test_a_built_in_model_with_weights_only_the_requester_holds_is_shipped(tmp_path: Path) -> None:
    from meshci.weights import hold, with_weights

    model = build_model("squeezenet1_1", seed=5)  # trained weights, as far as the mesh knows
    path = tmp_path / "trained.pt"
    torch.save(model.state_dict(), path)
    digest = hold(path)
    nodes: list[Node] = []
    for name, allow in (("req", (f"@{digest}",)), ("taker", ())):
        join = (nodes[0].address,) if nodes else ()
        node = Node(NodeConfig(name, Address("127.0.0.1", 0), join=join, secret=SECRET, allow_models=allow,
                               accept_shipped_models=name == "taker", data_dir=tmp_path / name),
                    Runtime(1, isolate_builds=False, data_dir=tmp_path / name))
        await node.start()
        nodes.append(node)
    try:
        async with asyncio.timeout(30):
            while not all(n.membership.alive() for n in nodes):
                await asyncio.sleep(0.05)
        x = torch.randn(1, 3, 64, 64)
        meta, logits = await infer(nodes[0].address, model=with_weights("squeezenet1_1", digest), size=(64, 64),
                                   image=x, secret=SECRET, strategy="modnn")
        assert torch.allclose(logits.flatten(), model(x).flatten(), atol=1e-4)
        assert sorted(meta["devices"]) == ["req", "taker"]
        assert nodes[1].shipping.bytes_received > 0
    finally:
        await asyncio.gather(*(n.close() for n in nodes))
