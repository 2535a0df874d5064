"""`tools/bench`: the strategies compared on the emulated edge cluster, timed at the client.

    tools/bench [--scenario NAME ...] [--model M ...] [--strategy S ...] [--repeat N]
                [--size H W] [--out DIR] [--quick]

For each scenario (a shipped cluster file run by `meshci.testbed.bed`: namespaces, htb-shaped
links, delay relays, CPU quotas) the bench

1. brings the testbed up and lets every device build the models and measure its speed
   curves, all devices at once (not timed);
2. times each device alone (strategy ``local`` via that device, inside its namespace);
3. sends one checked request per strategy via the scenario's requester (not timed: plans,
   and the exactness check against one device's forward pass, ``max_abs_diff``);
4. times ``--repeat`` rounds in which every strategy gets one request in turn (round robin,
   so a drift of the machine touches every strategy alike), timed by the client inside the
   requester's namespace.

``busy4`` is ``hetero4-100`` with a second requester: two clients, via two devices, send
edgeci requests at once; it reports the throughput and each requester's mean latency.

Outputs in ``--out`` (default ``bench-results/`` under the working directory, which git
ignores): ``results.csv`` (one row per timed request), ``results.md`` (per scenario and
model: median and spread per strategy, speed-up over the fastest device alone, edgeci's gain
over the best other, the ideal bound and the share of it reached, predicted vs measured),
``results.json``, ``trace-SCENARIO-MODEL.json`` (one edgeci request's timeline, Chrome
trace-event format) and, where matplotlib is installed, ``latency.png``, ``simulated.png``
and ``timeline.png``.

The ideal bound is the model's work over the cluster's total speed, each device's speed as
measured alone on this model at the client (speeds add), plus the input that must leave the
requester (the share of the work its speed cannot do, over its link).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

STRATEGIES = ("local", "modnn", "deepthings", "aofl", "edgeci")  # the default comparison
ABLATIONS = ("edgeci-dp", "edgeci-gather")  # on request (--strategy): what each part of edgeci adds
MODELS = ("vgg16", "resnet34")
SCENARIOS = {  # name: (cluster file, second requester for a busy mesh)
    "homo4-100": ("homo4-100", None),
    "hetero4-100": ("hetero4-100", None),
    "hetero4-wifi": ("hetero4-wifi", None),
    "busy4": ("hetero4-100", "rpi4-b"),
}
QUICK = {"scenario": ["hetero4-100"], "model": ["resnet34"], "repeat": 2, "size": (64, 64), "alone_repeat": 3}
COLUMNS = ("scenario", "model", "strategy", "requester", "run", "latency_s", "node_latency_s", "predicted_s",
           "max_abs_diff", "shares")


def _progress(step: str, done: int, total: int) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {step[:60]:60s}", end="", file=sys.stderr,
          flush=True)


class _Run:
    """One scenario's testbed and the requests sent into it."""

    def __init__(self, state: dict[str, Any], size: tuple[int, int]) -> None:
        self.state = state
        self.size = size

    def drive(self, device: str, vias: list[str], args: list[str], timeout: float = 1800) -> list[dict[str, Any]]:
        from meshci.errors import MeshciError
        from meshci.testbed import bed

        argv = [sys.executable, "-m", "meshci.testbed.drive", "--secret-file", self.state["secret_file"],
                *(f"--via={bed.device_entry(self.state, v)['node']}" for v in vias),
                "--size", str(self.size[0]), str(self.size[1]), *args]
        done = bed.run_in(self.state, device, argv, timeout=timeout)
        results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        failed = [r["error"] for r in results if "error" in r]
        if done.returncode != 0 or failed:
            raise MeshciError(f"requests from {device} failed: {failed[:3] or done.stderr.strip()[-800:]}")
        return results

    def devices(self) -> list[str]:
        return [d["name"] for d in self.state["devices"]]


def run_scenario(name: str, models: list[str], strategies: list[str], repeat: int, size: tuple[int, int],
                 alone_repeat: int, tick: Any, trace_dir: Path | None = None) -> dict[str, Any]:
    from meshci.testbed import bed
    from meshci.testbed.spec import load_spec

    cluster, second = SCENARIOS[name]
    spec = load_spec(cluster, os.cpu_count() or 1)
    bed_name = "bench"
    bed.down(bed_name)
    tick(f"{name}: testbed up (nodes profile their speed)")
    state = bed.up(spec, name=bed_name)
    try:
        run = _Run(state, size)
        requester = spec.requester or run.devices()[0]
        model_args = [f"--model={m}" for m in models]
        tick(f"{name}: every device builds {', '.join(models)}")
        with ThreadPoolExecutor(len(run.devices())) as pool:
            list(pool.map(lambda d: run.drive(d, [d], [*model_args, "--strategy=local"]), run.devices()))
        stats = {r["via"].split(".")[0]: r["stats"]
                 for r in run.drive(requester, run.devices(), ["--stats"])}
        alone: dict[tuple[str, str], list[float]] = {}
        for device in run.devices():
            tick(f"{name}: {device} alone")
            for r in run.drive(device, [device], [*model_args, "--strategy=local", "--repeat", str(alone_repeat)]):
                alone.setdefault((r["model"], device), []).append(r["client_s"])
        alone_s = {m: {d: statistics.median(alone[m, d]) for d in run.devices()} for m in models}
        tick(f"{name}: one checked request per strategy")
        strategy_args = [f"--strategy={s}" for s in strategies]
        checked = {(r["model"], r["strategy"]): r
                   for r in run.drive(requester, [requester], [*model_args, *strategy_args, "--check"])}
        rows: list[dict[str, Any]] = []
        busy: dict[str, Any] | None = None
        if second is None:
            for i in range(repeat):
                tick(f"{name}: round {i + 1}/{repeat}")
                for r in run.drive(requester, [requester], [*model_args, *strategy_args]):
                    rows.append(_row(name, r, i, checked))
        else:
            busy = _busy(run, requester, second, model_args, repeat, tick, name)
            for i, r in enumerate(busy.pop("results")):
                rows.append(_row(name, r, i, checked))
        traces = {}
        if "edgeci" in strategies and trace_dir is not None:
            tick(f"{name}: one edgeci request's timeline")
            for model in models:
                path = trace_dir / f"trace-{name}-{model}.json"
                run.drive(requester, [requester], [f"--model={model}", "--strategy=edgeci", "--trace", str(path)])
                traces[model] = str(path)
        return {"scenario": name, "cluster": cluster, "requester": requester, "alone_s": alone_s,
                "gflops": {d: s["gflops"] for d, s in stats.items()}, "rows": rows, "busy": busy,
                "checked": {f"{m}/{s}": {"max_abs_diff": r.get("max_abs_diff"), "check_ok": r.get("check_ok")}
                            for (m, s), r in checked.items()},
                "size": list(size), "shaping": bed.status(bed_name)["delay_note"], "traces": traces}
    finally:
        bed.down(bed_name)


def _busy(run: _Run, first: str, second: str, model_args: list[str], repeat: int, tick: Any,
          name: str) -> dict[str, Any]:
    """Two requesters at once, each sending `repeat` edgeci requests back to back."""
    tick(f"{name}: two requesters at once")
    began = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run.drive, via, [via], [*model_args, "--strategy=edgeci", "--repeat", str(repeat)])
                   for via in (first, second)]
        results = [f.result() for f in futures]
    wall = time.perf_counter() - began
    mean = {via: statistics.mean(r["client_s"] for r in res) for via, res in zip((first, second), results)}
    return {"results": [r for res in results for r in res], "wall_s": wall,
            "throughput_rps": sum(len(res) for res in results) / wall, "mean_latency_s": mean}


def _row(scenario: str, r: dict[str, Any], run: int, checked: dict[tuple[str, str], Any]) -> dict[str, Any]:
    check = checked.get((r["model"], r["strategy"]), {})
    return {"scenario": scenario, "model": r["model"], "strategy": r["strategy"], "requester": r.get("requester"),
            "run": run, "latency_s": r["client_s"], "node_latency_s": r.get("latency_s"),
            "predicted_s": r.get("predicted_latency_s"), "max_abs_diff": check.get("max_abs_diff"),
            "shares": json.dumps(r.get("shares", {}), sort_keys=True)}


def ideal_s(alone_s: dict[str, float], size: tuple[int, int], requester: str, requester_mbps: float) -> float:
    """The cluster's whole speed on this model, as each device alone was measured at the
    client (speeds add: 1 / sum of 1/alone), plus the input that must leave the requester
    (the share of the work its speed cannot do, over its link)."""
    total = sum(1.0 / s for s in alone_s.values())
    away = 1.0 - (1.0 / alone_s[requester]) / total
    input_bits = 3 * size[0] * size[1] * 4 * 8
    return 1.0 / total + away * input_bits / (requester_mbps * 1e6)


def summarise(result: dict[str, Any], requester_mbps: float) -> list[str]:
    """Markdown lines: one table per model of this scenario."""
    lines = [f"### {result['scenario']} ({result['cluster']}, {result['size'][0]}x{result['size'][1]}, "
             f"requester {result['requester']})", "", f"Shaping: {result['shaping']}", ""]
    if result["busy"]:
        b = result["busy"]
        lines += [f"Two requesters at once: {b['throughput_rps']:.2f} requests/s; mean latency "
                  + ", ".join(f"{v} {s * 1000:.0f} ms" for v, s in b["mean_latency_s"].items()), ""]
    for model in sorted({r["model"] for r in result["rows"]}):
        alone = result["alone_s"][model]
        fastest = min(alone, key=alone.__getitem__)
        ideal = ideal_s(alone, tuple(result["size"]), result["requester"], requester_mbps)
        lines += [f"**{model}**: fastest device alone {fastest} {alone[fastest] * 1000:.0f} ms; ideal bound "
                  f"{ideal * 1000:.0f} ms (x{alone[fastest] / ideal:.2f})", "",
                  "| strategy | median ms | min-max ms | x fastest alone | share of ideal | predicted ms | "
                  "predicted/measured | max abs diff |", "|---|---|---|---|---|---|---|---|"]
        medians = {}
        for strategy in dict.fromkeys(r["strategy"] for r in result["rows"] if r["model"] == model):
            rows = [r for r in result["rows"] if r["model"] == model and r["strategy"] == strategy]
            lat = [r["latency_s"] for r in rows]
            med = medians[strategy] = statistics.median(lat)
            preds = [r["predicted_s"] for r in rows if r["predicted_s"]]
            pred = statistics.median(preds) if preds else float("nan")
            diff = rows[0]["max_abs_diff"]
            lines.append(f"| {strategy} | {med * 1000:.0f} | {min(lat) * 1000:.0f}-{max(lat) * 1000:.0f} | "
                         f"{alone[fastest] / med:.2f} | {ideal / med:.0%} | {pred * 1000:.0f} | {pred / med:.2f} | "
                         f"{'-' if diff is None else f'{diff:.1e}'} |")
        others = {s: m for s, m in medians.items() if s in ("modnn", "deepthings", "aofl")}
        if "edgeci" in medians and others:
            best = min(others, key=others.__getitem__)
            lines += ["", f"edgeci vs the best other ({best}): x{others[best] / medians['edgeci']:.2f}"]
        lines.append("")
    return lines


def plot(results: list[dict[str, Any]], out: Path, models: list[str]) -> list[str]:
    """latency.png (median per scenario and strategy) and simulated.png (speed-up vs device
    count, from the simulator); returns the files written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed: no plots", file=sys.stderr)
        return []
    written = []
    keys = [(res["scenario"], m) for res in results for m in models if any(r["model"] == m for r in res["rows"])]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4.5 * max(len(keys), 1), 4), squeeze=False)
    for ax, (scenario, model) in zip(axes[0], keys):
        rows = [r for res in results if res["scenario"] == scenario for r in res["rows"] if r["model"] == model]
        names = list(dict.fromkeys(r["strategy"] for r in rows))
        ax.bar(names, [statistics.median(r["latency_s"] for r in rows if r["strategy"] == s) * 1000 for s in names])
        ax.set_title(f"{scenario} {model}")
        ax.set_ylabel("median latency at the client (ms)")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out / "latency.png")
    written.append(str(out / "latency.png"))
    written.append(_plot_simulated(plt, out, models))
    traced = [(res["scenario"], m, p) for res in results for m, p in res.get("traces", {}).items()]
    if traced:
        written.append(_plot_timeline(plt, out, traced[0]))
    return written


def _plot_timeline(plt: Any, out: Path, traced: tuple[str, str, str]) -> str:
    """timeline.png: one edgeci request, a row per device, a bar per span (its Chrome trace)."""
    scenario, model, path = traced
    events = json.loads(Path(path).read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"}
    colours = {"compute": "tab:blue", "receive": "tab:orange", "send": "tab:green", "head": "tab:red"}
    fig, ax = plt.subplots(figsize=(10, 1 + 0.6 * len(names)))
    for e in events:
        if e.get("ph") == "X" and e["pid"] in names and e.get("cat") != "request":  # phases span everything
            ax.barh(e["pid"], e["dur"] / 1000, left=e["ts"] / 1000, height=0.6,
                    color=colours.get(e.get("cat"), "tab:gray"), edgecolor="black", linewidth=0.3)
    ax.set_yticks(list(names), [names[p] for p in names])
    ax.invert_yaxis()
    ax.set_xlabel("ms from the request's start (clocks aligned by heartbeat offsets)")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=k) for k, c in colours.items()], loc="upper right", fontsize="small")
    ax.set_title(f"one edgeci request: {scenario} {model}")
    fig.tight_layout()
    fig.savefig(out / "timeline.png")
    return str(out / "timeline.png")


def _plot_simulated(plt: Any, out: Path, models: list[str]) -> str:
    from meshci.cost import CostModel, pi_cluster
    from meshci.models import build_model
    from meshci.planning import make_plan
    from meshci.simulate import simulate_plan
    from meshci.trunk import extract_trunk

    counts = [2, 4, 8, 16, 32, 64]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        trunk = extract_trunk(build_model(name), (3, 224, 224), name)
        for strategy in ("modnn", "deepthings", "aofl", "edgeci"):
            ups = []
            for n in counts:
                cluster = pi_cluster(n)
                model = CostModel(trunk, cluster)
                local = simulate_plan(trunk, cluster, make_plan(trunk, cluster, "local", model)).latency_s
                ups.append(local / simulate_plan(trunk, cluster, make_plan(trunk, cluster, strategy, model)).latency_s)
            ax.plot(counts, ups, marker="o", label=strategy)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices (Pi-class mix, 100 Mbit/s switch)")
        ax.set_ylabel("simulated speed-up over one device")
        ax.set_title(f"{name} 224x224")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "simulated.png")
    return str(out / "simulated.png")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/bench", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="extend", nargs="+", choices=sorted(SCENARIOS))
    parser.add_argument("--model", action="extend", nargs="+", choices=MODELS)
    parser.add_argument("--strategy", action="extend", nargs="+", choices=(*STRATEGIES, *ABLATIONS),
                        help="strategies to compare (default the five classic ones, not the ablations)")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds after warm-up (default 5)")
    parser.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--quick", action="store_true", help="a 2-3 minute subset that checks the bench works")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if min(args.size) < 32 or max(args.size) > 1024:
        parser.error("--size must be between 32 and 1024")
    from meshci.errors import MeshciError
    from meshci.testbed import bed

    reason = bed.check_root()
    if reason:
        print(f"bench: {reason}", file=sys.stderr)
        return 2
    scenarios = args.scenario or (QUICK["scenario"] if args.quick else ["homo4-100", "hetero4-100", "hetero4-wifi",
                                                                         "busy4"])
    models = args.model or (QUICK["model"] if args.quick else list(MODELS))
    strategies = args.strategy or list(STRATEGIES)
    repeat = QUICK["repeat"] if args.quick else args.repeat
    size = QUICK["size"] if args.quick else tuple(args.size)
    alone_repeat = QUICK["alone_repeat"] if args.quick else 3
    args.out.mkdir(parents=True, exist_ok=True)
    steps = [0, len(scenarios) * (6 + 4 + repeat)]

    def tick(step: str) -> None:
        steps[0] += 1
        _progress(step, min(steps[0], steps[1]), steps[1])

    results = []
    try:
        for name in scenarios:
            results.append(run_scenario(name, models, strategies, repeat, size, alone_repeat, tick, args.out))
    except KeyboardInterrupt:
        print("\nbench: interrupted (the testbed was removed)", file=sys.stderr)
        return 130
    except MeshciError as exc:
        print(f"\nbench: {exc}", file=sys.stderr)
        return 1
    print(file=sys.stderr)
    from meshci.testbed.spec import effective_mbps, load_spec

    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for res in results:
            writer.writerows(res["rows"])
    lines = [f"# meshci bench, {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"`tools/bench {' '.join(argv if argv is not None else sys.argv[1:])}` on {os.cpu_count()} cores; "
             "latency measured by a client inside the requester's namespace", ""]
    for res in results:
        spec = load_spec(res["cluster"], os.cpu_count() or 1)
        others = [d.name for d in spec.devices if d.name != res["requester"]]
        mbps = min(effective_mbps(spec, res["requester"], o) for o in others) if others else 1e9
        lines += summarise(res, mbps)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    written = [] if args.no_plots else plot(results, args.out, models)
    print("\n".join(lines))
    print(f"wrote {args.out / 'results.csv'}, {args.out / 'results.md'}"
          + "".join(f", {p}" for p in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
