"""Trunk extraction: a model as spatially local segments followed by a non-spatial head."""

from meshci.trunk.block import BranchSegment
from meshci.trunk.extract import extract_trunk, trace
from meshci.trunk.region import Region
from meshci.trunk.segment import SEGMENT_KINDS, Chain, Segment, crop
from meshci.trunk.trunk import Trunk

__all__ = ["SEGMENT_KINDS", "BranchSegment", "Chain", "Region", "Segment", "Trunk", "crop", "extract_trunk", "trace"]
