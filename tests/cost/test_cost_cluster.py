"""Cluster files: loading by path, by shipped name and by generated name; clear errors."""

from __future__ import annotations

import copy
import json
import random

import pytest

from meshci.cost import (
    Cluster,
    ClusterFileError,
    LinkSpec,
    available_clusters,
    cluster_from_dict,
    load_cluster,
    pi_cluster,
    random_cluster,
)

GOOD = {
    "devices": [
        {"name": "pi4-a", "gflops": 6.0, "memory_mb": 2048},
        {"name": "pi3-b", "gflops": 2.5},
    ],
    "links": {"default": {"mbps": 100, "latency_ms": 2}, "pi4-a~pi3-b": {"mbps": 40, "latency_ms": 6}},
    "medium": "shared",
    "requester": "pi4-a",
}


def test_good_file_round_trips(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(GOOD))
    cluster = load_cluster(path)
    assert cluster.names == ("pi4-a", "pi3-b")
    assert cluster.link("pi3-b", "pi4-a") == LinkSpec(40.0, 6.0)
    assert cluster.link("pi4-a", "pi4-a") == LinkSpec(100.0, 2.0)
    assert cluster.device("pi3-b").memory_mb == 1024
    assert cluster.medium == "shared" and cluster.requester == "pi4-a"
    assert load_cluster(cluster.to_json()) == cluster


def test_shipped_and_generated_names():
    assert "mixed-4" in available_clusters()
    mixed = load_cluster("mixed-4")
    assert len(mixed.devices) == 4
    assert len({d.gflops for d in mixed.devices}) >= 3  # heterogeneous
    gen = load_cluster("pi-16-shared-50")
    assert len(gen.devices) == 16 and gen.medium == "shared" and gen.default_link.mbps == 50
    assert load_cluster("pi-64-switched").default_link.mbps == 100
    with pytest.raises(ClusterFileError, match="cluster"):
        load_cluster("no-such-cluster")


def _broken(mutate) -> dict:
    data = copy.deepcopy(GOOD)
    mutate(data)
    return data


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("devices"), "devices"),
        (lambda d: d.pop("links"), "links"),
        (lambda d: d.pop("medium"), "medium"),
        (lambda d: d.pop("requester"), "requester"),
        (lambda d: d.__setitem__("devices", []), "devices"),
        (lambda d: d["devices"][1].pop("gflops"), r"devices\[1\]\.gflops"),
        (lambda d: d["devices"][0].pop("name"), r"devices\[0\]\.name"),
        (lambda d: d["devices"][0].__setitem__("gflops", -1), r"devices\[0\]\.gflops"),
        (lambda d: d["devices"][1].__setitem__("name", "pi4-a"), "duplicate"),
        (lambda d: d["links"]["default"].__setitem__("mbps", -5), r"links\.default\.mbps"),
        (lambda d: d["links"]["default"].__setitem__("mbps", 0), r"links\.default\.mbps"),
        (lambda d: d["links"]["pi4-a~pi3-b"].__setitem__("mbps", -1), r"links\.pi4-a~pi3-b\.mbps"),
        (lambda d: d["links"]["default"].pop("latency_ms"), r"links\.default\.latency_ms"),
        (lambda d: d["links"].pop("default"), r"links\.default"),
        (lambda d: d["links"].__setitem__("pi4-a~ghost", {"mbps": 1, "latency_ms": 1}), "ghost"),
        (lambda d: d.__setitem__("requester", "ghost"), "requester"),
        (lambda d: d.__setitem__("medium", "radio"), "medium"),
    ],
)
def test_bad_files_name_the_field(mutate, field):
    with pytest.raises(ClusterFileError, match=field):
        cluster_from_dict(_broken(mutate))


def test_bad_json_and_bad_path(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ClusterFileError, match="not valid JSON"):
        load_cluster(path)
    with pytest.raises(ClusterFileError):
        load_cluster(tmp_path)  # a directory


def test_generators():
    c = pi_cluster(64, mbps=50, medium="shared")
    assert len(c.devices) == 64 and c.requester == c.devices[0].name
    r = random_cluster(8, random.Random(3))
    assert isinstance(r, Cluster) and len(r.devices) == 8
    speeds = [d.gflops for d in r.devices]
    assert max(speeds) / min(speeds) <= 8.0
