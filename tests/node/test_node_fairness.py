"""How a device's compute thread shares its time between requests (`meshci.node.fairness`),
without sockets; and the runtime taking its queued work in that order."""

from __future__ import annotations

import asyncio
import threading

from hypothesis import given
from hypothesis import strategies as st

from meshci.node.fairness import FairQueue
from meshci.node.runtime import Runtime


def _drain(queue: FairQueue) -> list:
    out = []
    while (item := queue.pop()) is not None:
        out.append(item)
    return out


def test_requesters_take_turns_whatever_their_backlog() -> None:
    queue: FairQueue[str] = FairQueue()
    for k in range(6):  # requester a queued six tiles of one request first
        queue.push("a", 1, 0.0, f"a{k}")
    queue.push("b", 7, 1.0, "b0")
    queue.push("b", 7, 1.0, "b1")
    assert _drain(queue) == ["a0", "b0", "a1", "b1", "a2", "a3", "a4", "a5"]


def test_a_requesters_oldest_request_goes_first() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("a", 2, 5.0, "new0")
    queue.push("a", 1, 3.0, "old0")  # reached this device earlier, its tile came later
    queue.push("a", 2, 5.0, "new1")
    queue.push("a", 1, 3.0, "old1")
    assert _drain(queue) == ["old0", "old1", "new0", "new1"]
    assert len(queue) == 0 and queue.pop() is None


def test_a_request_keeps_its_age_between_bursts_of_tiles() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("a", 1, 1.0, "first block")
    assert queue.pop() == "first block"
    queue.push("a", 2, 2.0, "later request")
    queue.push("a", 1, 1.0, "second block")  # request 1 again: still the oldest
    assert _drain(queue) == ["second block", "later request"]


@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 4)), min_size=1, max_size=60))
def test_nothing_starves_and_nothing_is_lost(pushes: list[tuple[str, int]]) -> None:
    """Every item comes out once; while requesters have work, each is served within one
    round of the others (between two turns of a requester, every other requester with work
    goes at most once); a request's items keep their order."""
    queue: FairQueue[tuple[str, int, int]] = FairQueue()
    for n, (requester, rid) in enumerate(pushes):
        queue.push(requester, rid, float(rid), (requester, rid, n))
    out = _drain(queue)
    assert sorted(out, key=lambda t: t[2]) == [(r, q, n) for n, (r, q) in enumerate(pushes)]
    for requester in "abc":
        for rid in range(5):
            mine = [n for r, q, n in out if (r, q) == (requester, rid)]
            assert mine == sorted(mine)
    remaining = {r: sum(1 for rr, _ in pushes if rr == r) for r in "abc"}
    last_turn: dict[str, tuple[int, int]] = {}  # requester -> (step, requesters with work then)
    for step, (requester, _, _) in enumerate(out):
        if requester in last_turn:
            then, waiting = last_turn[requester]
            assert step - then <= waiting
        last_turn[requester] = (step, sum(1 for r in remaining if remaining[r] > 0))
        remaining[requester] -= 1


def test_the_compute_thread_takes_queued_work_in_fair_order() -> None:
    """Real runtime, real compute thread: while it is busy, requester a queues three items
    and then b one; b's runs second, not after all of a's."""
    runtime = Runtime(threads=1)
    order: list[str] = []
    gate = threading.Event()

    async def main() -> None:
        blocker = runtime.on_compute_thread(lambda: gate.wait(30), ("z", 9, 0.0))
        await asyncio.sleep(0.05)  # the thread is now inside the blocker
        jobs = [runtime.on_compute_thread(lambda k=k: order.append(f"a{k}"), ("a", 1, 1.0)) for k in range(3)]
        jobs.append(runtime.on_compute_thread(lambda: order.append("b0"), ("b", 2, 2.0)))
        cancelled = runtime.on_compute_thread(lambda: order.append("cancelled"), ("c", 3, 3.0))
        cancelled.cancel()  # its request went away while it waited: it never runs
        gate.set()
        await blocker
        await asyncio.gather(*jobs)
        failing = runtime.on_compute_thread(lambda: 1 / 0, ("a", 1, 1.0))
        try:
            await failing
        except ZeroDivisionError:
            order.append("raised")

    try:
        asyncio.run(main())
    finally:
        runtime.close()
    assert order == ["a0", "b0", "a1", "a2", "raised"]


def test_closing_the_runtime_cancels_work_still_queued() -> None:
    runtime = Runtime(threads=1)
    gate = threading.Event()

    async def main() -> bool:
        blocker = runtime.on_compute_thread(lambda: gate.wait(30), ("z", 9, 0.0))
        await asyncio.sleep(0.05)
        queued = runtime.on_compute_thread(lambda: "never", ("a", 1, 1.0))
        runtime.close()
        gate.set()
        await blocker
        try:
            await asyncio.wait_for(queued, 10)
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(main())
