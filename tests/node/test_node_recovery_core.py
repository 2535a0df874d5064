"""The recovery decisions without sockets: a request's attempts against its deadline,
the back-off of devices that keep failing, and the deadline field as hostile input."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, strategies as st

from meshci.node.recovery import (BACKOFF_BASE_S, BACKOFF_MAX_S, MAX_ATTEMPTS, MAX_DEADLINE_S, BackOff,
                                  DeadlineError, GiveUp, Recovery, Retry, deadline_s)

DEVICES = frozenset({"q", "a", "b", "c"})


def test_a_lost_device_is_retried_without_it_and_its_losses_accumulate() -> None:
    recovery = Recovery(deadline=100.0, deadline_s=100.0)
    first = recovery.on_lost("a", "connection lost", 1.0, DEVICES - {"a"})
    assert first == Retry(frozenset({"a"}), 2)
    second = recovery.on_lost("b", "dead", 2.0, DEVICES - {"a", "b"})
    assert second == Retry(frozenset({"a", "b"}), 3)
    assert recovery.lost == ["a", "b"]


def test_the_same_device_reported_twice_counts_once() -> None:
    recovery = Recovery(deadline=100.0, deadline_s=100.0)
    recovery.on_lost("a", "connection lost", 1.0, DEVICES)
    decision = recovery.on_lost("a", "dead", 1.5, DEVICES)
    assert isinstance(decision, Retry) and decision.exclude == {"a"}
    assert recovery.lost == ["a"]


def test_a_loss_after_the_deadline_gives_up_naming_the_deadline_and_the_losses() -> None:
    recovery = Recovery(deadline=10.0, deadline_s=10.0)
    decision = recovery.on_lost("a", "dead", 10.0, DEVICES)
    assert isinstance(decision, GiveUp)
    assert "deadline of 10 s passed" in decision.reason and "a" in decision.reason


def test_no_survivor_gives_up() -> None:
    recovery = Recovery(deadline=100.0, deadline_s=100.0)
    decision = recovery.on_lost("a", "dead", 1.0, frozenset({"a"}))
    assert isinstance(decision, GiveUp) and "no device is left" in decision.reason


def test_attempts_are_bounded() -> None:
    recovery = Recovery(deadline=1e9, deadline_s=100.0)
    names = [f"d{i}" for i in range(MAX_ATTEMPTS + 1)]
    decisions = [recovery.on_lost(n, "dead", float(i), frozenset(names) | {"q"}) for i, n in enumerate(names)]
    assert all(isinstance(d, Retry) for d in decisions[:MAX_ATTEMPTS - 1])
    assert isinstance(decisions[MAX_ATTEMPTS - 1], GiveUp)
    assert f"after {MAX_ATTEMPTS} attempts" in decisions[MAX_ATTEMPTS - 1].reason


def test_remaining_time_never_goes_negative() -> None:
    recovery = Recovery(deadline=5.0, deadline_s=5.0)
    assert recovery.remaining(2.0) == 3.0 and recovery.remaining(9.0) == 0.0
    assert not recovery.expired(4.9) and recovery.expired(5.0)


def test_backoff_doubles_with_each_failure_up_to_its_cap() -> None:
    backoff = BackOff()
    waits = [backoff.failed("a", float(t)) for t in range(12)]
    assert waits[0] == 0.0  # once is not "keeps failing"
    assert waits[1] == BACKOFF_BASE_S and waits[2] == 2 * BACKOFF_BASE_S and waits[3] == 4 * BACKOFF_BASE_S
    assert max(waits) == BACKOFF_MAX_S and waits == sorted(waits)
    assert backoff.failures("a") == 12


def test_a_backed_off_device_is_avoided_until_its_wait_ends() -> None:
    backoff = BackOff(base_s=2.0)
    backoff.failed("a", 9.0)
    assert backoff.avoided(9.0) == frozenset()  # failed once: not avoided
    backoff.failed("a", 10.0)
    assert backoff.avoided(11.9) == {"a"}
    assert backoff.avoided(12.0) == frozenset()
    backoff.failed("a", 13.0)  # failed again soon: avoided twice as long
    assert backoff.avoided(16.9) == {"a"} and backoff.avoided(17.0) == frozenset()


def test_success_and_a_quiet_spell_forget_failures() -> None:
    backoff = BackOff(base_s=2.0, forget_s=50.0)
    for t in range(3):
        backoff.failed("a", float(t))
    backoff.succeeded("a")
    assert backoff.failures("a") == 0
    for t in range(3):
        backoff.failed("b", float(t))
    assert backoff.failed("b", 100.0) == 0.0  # long after the last failure: starts over


def test_backoff_table_is_bounded() -> None:
    backoff = BackOff(max_devices=8)
    for i in range(100):
        backoff.failed(f"d{i}", float(i))
        backoff.failed(f"d{i}", float(i))
    assert len(backoff.avoided(100.0)) <= 8
    assert "d99" in backoff.avoided(99.5)


@pytest.mark.parametrize("value", [1, 0.5, 30.0, MAX_DEADLINE_S])
def test_deadline_in_range_is_taken(value: float) -> None:
    assert deadline_s(value) == float(value)


@pytest.mark.parametrize("value", [0, -1, 0.0, MAX_DEADLINE_S + 1, math.inf, math.nan, True, "5", None,
                                   [5], 10 ** 400])
def test_a_hostile_deadline_is_refused_with_the_field_named(value: object) -> None:
    with pytest.raises(DeadlineError, match="deadline_s"):
        deadline_s(value)


@given(st.lists(st.tuples(st.sampled_from(sorted(DEVICES - {"q"})), st.floats(0, 200)), max_size=10))
def test_retries_never_name_a_survivor_they_exclude_nor_outlive_the_deadline(losses: list[tuple[str, float]]) -> None:
    recovery = Recovery(deadline=100.0, deadline_s=100.0)
    for device, now in sorted(losses, key=lambda x: x[1]):
        decision = recovery.on_lost(device, "dead", now, DEVICES)
        if isinstance(decision, GiveUp):
            break
        assert now < 100.0 and device in decision.exclude and "q" not in decision.exclude
        assert decision.attempt <= MAX_ATTEMPTS
