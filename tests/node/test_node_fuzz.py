"""Issue 11's authenticated fuzzing, short version for CI (the full campaign is
`tools/fuzz_node.py`): a client holding the secret sends 300 mutated frames of every kind
to an in-process node (as itself, as a client and as the node's real peer); afterwards no
log record at ERROR and no traceback, no connection dropped without a reason, no task left
running, the peer table bounded, and exact answers through every strategy."""

from __future__ import annotations

import pytest

from meshci.node.fuzz_run import fuzz_mesh
from meshci.node.membership import MAX_CANDIDATES
from meshci.planning import STRATEGIES

pytestmark = pytest.mark.timeout(120)


async def test_three_hundred_hostile_frames_leave_the_node_serving_exactly() -> None:
    outcome = await fuzz_mesh(300, seed=11)
    report = outcome.report
    assert report.frames == 300 and len(report.kinds) >= 15  # every kind, or nearly
    assert outcome.tracebacks == []
    assert report.unexplained_drops == []
    assert report.error_replies > 50  # malformed frames are answered with a reason
    assert outcome.exact == {s: True for s in STRATEGIES}
    assert outcome.tasks_after <= outcome.tasks_before + 2 and outcome.notes == []
    assert outcome.peers_after <= 1 + MAX_CANDIDATES + 8
