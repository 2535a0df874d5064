"""`meshci inspect`: table, JSON, --check, and one-line errors with exit status 2."""

import json
import subprocess
import sys
import types

import pytest

from meshci.cli import main
from meshci.commands import inspect as inspect_command
from meshci.tiling import TiledCheck

SMALL = ["--model", "resnet18", "--size", "64", "64"]


def run_json(capsys, *argv):
    status = main(["inspect", *SMALL, "--json", *argv])
    out = capsys.readouterr().out
    return status, json.loads(out)


def test_json_report_with_check(capsys):
    status, report = run_json(capsys, "--tiles", "2", "--check")
    assert status == 0
    assert len(report["segments"]) == 10
    assert report["segments"][0] == {
        **report["segments"][0],
        "index": 0, "name": "conv1", "kind": "conv", "in_shape": [3, 64, 64], "out_shape": [64, 32, 32],
        "receptive_field": [7, 7],
    }  # fmt: skip
    assert report["cuts"] == [2, 4, 6, 8]  # default: one block per resolution stage
    flops = report["flops"]
    assert flops["total"] > flops["ideal"] > 0 and flops["percent"] > 0
    assert flops["ideal"] == pytest.approx(sum(s["flops"] for s in report["segments"]))
    assert report["ok"] is True and report["max_abs_diff"] < 1e-9 and report["dtype"] == "float64"
    assert all(len(b["tiles"]) == 2 for b in report["blocks"])


def test_grid_and_explicit_cuts(capsys):
    status, report = run_json(capsys, "--grid", "2x2", "--cuts", "3,6", "--check", "--dtype", "float32")
    assert status == 0 and report["ok"] is True
    assert [(b["start"], b["end"]) for b in report["blocks"]] == [(0, 3), (3, 6), (6, 10)]
    assert report["blocks"][0]["tiles"] == [[0, 8, 0, 8], [0, 8, 8, 16], [8, 16, 0, 8], [8, 16, 8, 16]]


def test_without_check_and_one_block(capsys):
    status, report = run_json(capsys, "--cuts", "none", "--tiles", "1")
    assert status == 0 and report["ok"] is None and report["max_abs_diff"] is None
    assert report["flops"]["redundant"] == 0


def test_table(capsys):
    assert main(["inspect", *SMALL, "--tiles", "2", "--check"]) == 0
    out = capsys.readouterr().out
    assert "layer2.0" in out and "residual" in out and "redundant" in out and ": OK" in out


def test_failed_check_exits_nonzero(capsys, monkeypatch):
    monkeypatch.setattr(inspect_command, "check_tiled", lambda *a, **k: TiledCheck(0.5, False, 2))
    assert main(["inspect", *SMALL, "--tiles", "2", "--check"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_auto_cuts_come_from_the_planner(capsys, monkeypatch):
    calls = []

    def auto_cuts(trunk, n_devices):
        calls.append((len(trunk.segments), n_devices))
        return [5]

    monkeypatch.setitem(sys.modules, "meshci.planning", types.SimpleNamespace(auto_cuts=auto_cuts))
    status, report = run_json(capsys, "--cuts", "auto", "--grid", "2x1")
    assert status == 0 and calls == [(10, 2)] and report["cuts"] == [5]


def test_auto_cuts_without_planner_is_an_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "meshci.planning", None)  # import fails
    assert main(["inspect", *SMALL, "--cuts", "auto"]) == 2
    assert "DPFL planner" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tiles", "3"], "cannot cut 2 rows into 3 tiles"),
        (["--grid", "2y2"], "--grid wants RxC"),
        (["--grid", "0x2"], "positive"),
        (["--cuts", "99"], "cut 99 is outside"),
        (["--cuts", "a,b"], "--cuts wants"),
        (["--size", "0", "64"], "--size wants positive"),
    ],
)
def test_user_errors_are_one_line_exit_2(capsys, argv, message):
    assert main(["inspect", *SMALL, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshci: error: ") and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_subprocess_unknown_model_exit_status():
    proc = subprocess.run(
        [sys.executable, "-m", "meshci", "inspect", "--model", "alexnet9"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("meshci: error: unknown model 'alexnet9'")
    assert len(proc.stderr.strip().splitlines()) == 1


SE_ZOO = (
    "import torch\n"
    "class Net(torch.nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)\n"
    "        self.late = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3), torch.nn.Conv2d(32, 32, 3))\n"
    "    def forward(self, x):\n"
    "        y = self.stem(x)\n"
    "        y = y + torch.sigmoid(y.mean((2, 3), keepdim=True))\n"  # added: not an SE gate (those are tiled)
    "        return self.late(y).flatten(1)\n"
)


def test_trunk_share_and_what_ended_the_trunk(capsys, monkeypatch, tmp_path):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    (tmp_path / "se_zoo.py").write_text(SE_ZOO)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["inspect", "--model", "se_zoo:Net", "--size", "20", "20", "--tiles", "2"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    import se_zoo

    model = se_zoo.Net()
    x = torch.zeros(1, 3, 20, 20)
    with FlopCounterMode(display=False) as stem, torch.no_grad():
        model.stem(x)
    with FlopCounterMode(display=False) as whole, torch.no_grad():
        model(x)
    share = report["trunk_share"]
    assert share["share"] == pytest.approx(stem.get_total_flops() / whole.get_total_flops()) and share["share"] < 0.9
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    ended = [line for line in lines if line.startswith("the trunk ends at")]
    assert len(ended) == 1 and "'mean'" in ended[0] and "reduces over the whole map" in ended[0]
    sys.modules.pop("se_zoo", None)


def test_no_stop_line_when_the_trunk_holds_most_flops(capsys):
    status, report = run_json(capsys, "--tiles", "2")
    assert status == 0 and report["trunk_share"]["share"] > 0.9
    assert main(["inspect", *SMALL, "--tiles", "2"]) == 0
    out = capsys.readouterr().out
    assert "the trunk holds" in out and "the trunk ends at" not in out
