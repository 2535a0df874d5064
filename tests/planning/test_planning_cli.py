"""`meshci plan` and `meshci simulate` (in-process through meshci.cli.main)."""

from __future__ import annotations

import json

from meshci.cli import main
from meshci.planning import STRATEGIES


def test_plan_json_keys(capsys):
    assert main(["plan", "--model", "vgg16", "--cluster", "mixed-4", "--size", "32", "32", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["strategy"] == "edgeci"
    assert {"strategy", "predicted_latency_s", "planning_ms", "auction_rounds", "blocks"} <= set(plan)
    block = plan["blocks"][0]
    assert len(block["segments"]) == 2 and block["finish_s"]
    assert {"device", "rows"} <= set(block["tiles"][0])
    assert {t["device"] for t in block["tiles"]} == set(block["finish_s"])


def test_plan_all_is_a_list(capsys):
    args = ["plan", "--model", "resnet34", "--cluster", "mixed-4-wifi", "--size", "32", "32"]
    assert main([*args, "--strategy", "all", "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert [p["strategy"] for p in plans] == list(STRATEGIES)
    assert main([*args, "--strategy", "aofl"]) == 0
    text = capsys.readouterr().out
    assert "aofl" in text and "predicted latency" in text and "finish (ms)" in text


def test_simulate_json(capsys):
    args = ["simulate", "--model", "vgg16", "--cluster", "pi-8-shared-50", "--size", "32", "32", "--strategy", "all"]
    assert main([*args, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in results] == list(STRATEGIES)
    local = results[0]
    assert local["speedup_over_local"] == 1.0
    assert all({"latency_s", "predicted_latency_s", "speedup_over_local", "planning_ms"} <= set(r) for r in results)
    assert main(args) == 0
    assert "speedup" in capsys.readouterr().out


def test_bad_cluster_is_one_line_exit_2(capsys, tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"devices": [], "links": {}, "medium": "shared", "requester": "x"}))
    assert main(["plan", "--model", "vgg16", "--cluster", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "devices" in err[0]
