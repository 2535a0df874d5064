"""Cluster files, device speed and link estimates, and the cost model of a plan."""

from meshci.cost.cluster import (
    Cluster,
    Device,
    LinkSpec,
    available_clusters,
    cluster_from_dict,
    generated_cluster,
    load_cluster,
    pi_cluster,
    random_cluster,
)
from meshci.cost.geometry import StripTables, strip_tables
from meshci.cost.links import LinkEstimator
from meshci.cost.model import BlockTiming, CostModel
from meshci.errors import ClusterFileError

__all__ = [
    "BlockTiming",
    "Cluster",
    "ClusterFileError",
    "CostModel",
    "Device",
    "LinkEstimator",
    "LinkSpec",
    "StripTables",
    "available_clusters",
    "cluster_from_dict",
    "generated_cluster",
    "load_cluster",
    "pi_cluster",
    "random_cluster",
    "strip_tables",
]
