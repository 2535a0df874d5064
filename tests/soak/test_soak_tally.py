"""The soak's counting and restart schedule (`meshci.soak.tally`), without a mesh."""

from __future__ import annotations

from meshci.soak.tally import Tally, format_summary, memory_growth, restarts_due


def test_one_restart_per_k_requests() -> None:
    assert [restarts_due(done, 100, made) for done, made in ((99, 0), (100, 0), (100, 1), (250, 1), (5, 0))] \
        == [0, 1, 0, 1, 0]
    assert restarts_due(1000, 0, 0) == 0  # never


def test_every_request_counts_once_and_retries_apart() -> None:
    tally = Tally()
    tally.answered("a", 1.0, 0.0, exact=True)
    tally.answered("b", 3.0, 0.0, exact=True)
    tally.answered("a", 2.0, 0.5, exact=False)
    tally.failed("s2: lost a device during the request: Connection refused\nmore")
    tally.failed("s2: lost a device during the request: Connection refused")
    tally.retried(True)
    tally.memory_samples += [(50, {"n1": 101.0}), (100, {"n1": 102.0, "n2": 160.0})]
    summary = tally.summary({"n1": 100.0, "n2": 200.0}, {"n1": 104.0, "n2": 150.0, "n3": 90.0}, {"n2"})
    assert (summary["requests"], summary["ok"], summary["wrong"], summary["lost"]) == (5, 2, 1, 2)
    assert (summary["retried_ok"], summary["retried_lost"]) == (1, 0)  # the lost stay lost
    assert summary["errors"] == {"s2: lost a device during the request: Connection refused": 2}
    assert summary["max_wrong_diff"] == 0.5
    assert summary["latency_median_s"] == 2.0
    assert summary["latency_mean_by_requester_s"] == {"a": 1.5, "b": 3.0}
    assert summary["memory"]["n1"]["growth_pct"] == 4.0 and not summary["memory"]["n1"]["restarted"]
    assert summary["memory"]["n2"]["restarted"] and summary["memory"]["n2"]["growth_pct"] == -25.0
    assert summary["memory"]["n3"]["growth_pct"] is None
    assert summary["memory_samples"] == [{"after": 50, "mb": {"n1": 101.0}}, {"after": 100, "mb": {"n1": 102.0, "n2": 160.0}}]
    text = format_summary(summary)
    assert "after 50, 100 requests:" in text and "  n1: 101 102" in text and "  n2: - 160" in text
    assert "ok 2, wrong 1, lost 2" in text and "lost x2: s2: lost a device" in text and "n1: 100 -> 104  +4.0%" in text


def test_memory_growth_of_a_node_without_figures() -> None:
    assert memory_growth({}, {"x": 5.0}, set()) == {"x": {"start_mb": None, "end_mb": 5.0, "growth_pct": None,
                                                          "restarted": False}}
