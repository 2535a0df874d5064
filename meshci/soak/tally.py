"""What a soak run counts, and when it restarts a peer. Pure: outcomes and figures are
handed in, nothing is timed or started here.

Every request ends in exactly one outcome: ``ok`` (answered, logits equal the local
forward pass), ``wrong`` (answered, logits differ) or ``lost`` (an error, or no answer).
With ``--retry`` a lost request is sent once more; the retry's outcome is counted apart
(``retried_ok``/``retried_lost``): the first attempt stays lost, never hidden.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


def restarts_due(completed: int, every: int, done: int) -> int:
    """How many more peer restarts are due once `completed` requests ended, one per
    `every` requests (`every` <= 0: never), `done` of them made already."""
    if every <= 0:
        return 0
    return max(0, completed // every - done)


@dataclass
class Tally:
    """The outcomes of a soak's requests and the nodes' memory."""

    ok: int = 0
    wrong: int = 0
    lost: int = 0
    retried_ok: int = 0
    retried_lost: int = 0
    latencies: list[float] = field(default_factory=list)  # of answered requests (first attempts)
    errors: Counter[str] = field(default_factory=Counter)  # reason (first line, cut) -> count
    wrong_diffs: list[float] = field(default_factory=list)  # max |logits - reference| of wrong answers
    by_requester: dict[str, list[float]] = field(default_factory=dict)
    restarts: list[dict[str, Any]] = field(default_factory=list)  # {"node", "after", "seconds"}
    memory_samples: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (requests ended, MiB)

    @property
    def total(self) -> int:
        return self.ok + self.wrong + self.lost

    def answered(self, requester: str, latency_s: float, diff: float, exact: bool) -> None:
        self.latencies.append(latency_s)
        self.by_requester.setdefault(requester, []).append(latency_s)
        if exact:
            self.ok += 1
        else:
            self.wrong += 1
            self.wrong_diffs.append(diff)

    def failed(self, reason: str) -> None:
        self.lost += 1
        self.errors[_short(reason)] += 1

    def retried(self, ok: bool) -> None:
        if ok:
            self.retried_ok += 1
        else:
            self.retried_lost += 1

    def summary(self, memory_start: dict[str, float], memory_end: dict[str, float],
                restarted: set[str]) -> dict[str, Any]:
        """The figures a soak reports (JSON-ready)."""
        lat = sorted(self.latencies)
        return {
            "requests": self.total, "ok": self.ok, "wrong": self.wrong, "lost": self.lost,
            "retried_ok": self.retried_ok, "retried_lost": self.retried_lost,
            "errors": dict(self.errors.most_common()),
            "max_wrong_diff": max(self.wrong_diffs, default=0.0),
            "latency_median_s": statistics.median(lat) if lat else None,
            "latency_p90_s": lat[min(len(lat) - 1, int(0.9 * len(lat)))] if lat else None,
            "latency_mean_by_requester_s": {r: statistics.fmean(v) for r, v in sorted(self.by_requester.items())},
            "restarts": self.restarts,
            "memory": memory_growth(memory_start, memory_end, restarted),
            "memory_samples": [{"after": after, "mb": mb} for after, mb in self.memory_samples],
        }


def memory_growth(start: dict[str, float], end: dict[str, float], restarted: set[str]) -> dict[str, dict[str, Any]]:
    """Each node's resident memory (MiB) at the start and the end, and its growth in percent.
    A node restarted during the run is a different process at the end: its growth is
    given from its last restart's first figure (`start` holds that one) and marked."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(start) | set(end)):
        a, b = start.get(name), end.get(name)
        growth = 100.0 * (b - a) / a if a and b is not None else None
        out[name] = {"start_mb": a, "end_mb": b, "growth_pct": growth, "restarted": name in restarted}
    return out


def _short(reason: str, limit: int = 160) -> str:
    line = reason.strip().splitlines()[0] if reason.strip() else "error"
    return line if len(line) <= limit else line[:limit - 3] + "..."


def format_summary(summary: dict[str, Any]) -> str:
    """The soak's report as lines of text."""
    lines = [f"requests {summary['requests']}: ok {summary['ok']}, wrong {summary['wrong']}, "
             f"lost {summary['lost']}"]
    if summary["retried_ok"] or summary["retried_lost"]:
        lines.append(f"  --retry: {summary['retried_ok']} lost requests answered on a second attempt, "
                     f"{summary['retried_lost']} lost again (the first attempts stay counted as lost)")
    for reason, count in summary["errors"].items():
        lines.append(f"  lost x{count}: {reason}")
    if summary["wrong"]:
        lines.append(f"  largest difference of a wrong answer: {summary['max_wrong_diff']:.3g}")
    if summary["latency_median_s"] is not None:
        lines.append(f"latency: median {summary['latency_median_s']:.3f} s, p90 {summary['latency_p90_s']:.3f} s")
        lines.append("  mean by requester: " + ", ".join(
            f"{r} {v:.3f} s" for r, v in summary["latency_mean_by_requester_s"].items()))
    lines.append(f"restarts: {len(summary['restarts'])} (" + ", ".join(
        f"{r['node']} after {r['after']} requests, up again in {r['seconds']:.1f} s" for r in summary["restarts"]) + ")")
    lines.append("resident memory (MiB) after the warm-up -> at the end, and tiles computed:")
    for name, row in summary["memory"].items():
        growth = "n/a" if row["growth_pct"] is None else f"{row['growth_pct']:+.1f}%"
        note = " (restarted: memory and tiles since its last start)" if row["restarted"] else ""
        start = "?" if row["start_mb"] is None else f"{row['start_mb']:.0f}"
        end = "?" if row["end_mb"] is None else f"{row['end_mb']:.0f}"
        tiles = f", {row['tiles']} tiles in the run" if row.get("tiles") is not None else ""
        lines.append(f"  {name}: {start} -> {end}  {growth}{tiles}{note}")
    if summary.get("memory_samples"):
        names = sorted({name for sample in summary["memory_samples"] for name in sample["mb"]})
        lines.append("resident memory (MiB) along the run, after " + ", ".join(
            str(sample["after"]) for sample in summary["memory_samples"]) + " requests:")
        for name in names:
            lines.append(f"  {name}: " + " ".join(
                f"{sample['mb'][name]:.0f}" if name in sample["mb"] else "-" for sample in summary["memory_samples"]))
    return "\n".join(lines)


__all__ = ["Tally", "format_summary", "memory_growth", "restarts_due"]
