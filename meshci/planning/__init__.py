"""Plans (where the trunk is cut, who computes which tile), the strategies that make them
(``local``, ``modnn``, ``deepthings``, ``aofl``, ``edgeci`` and its ablations
``edgeci-dp`` and ``edgeci-gather``), their evaluation under the
cost model, and their exact in-process execution."""

from meshci.planning.dpfl import DPResult, StripLayout, dpfl
from meshci.planning.evaluate import evaluate_plan, plan_from_assignment
from meshci.planning.execute import execute_plan
from meshci.planning.plan import CLASSIC, ROUTINGS, STRATEGIES, BlockPlan, HeadPlan, Plan, TileSpec
from meshci.planning.strategies import auto_cuts, default_cluster, make_plan

__all__ = [
    "CLASSIC",
    "ROUTINGS",
    "STRATEGIES",
    "BlockPlan",
    "DPResult",
    "HeadPlan",
    "Plan",
    "StripLayout",
    "TileSpec",
    "auto_cuts",
    "default_cluster",
    "dpfl",
    "evaluate_plan",
    "execute_plan",
    "make_plan",
    "plan_from_assignment",
]
