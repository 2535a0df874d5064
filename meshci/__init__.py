"""meshci: distributed CNN inference on a peer-to-peer mesh of small devices.

Implements EdgeCI (Chen et al., ACM TOIT 2024): DPFL fused-layer planning and AWAS
auction-based workload assignment. See docs/architecture.md for the map of the parts.
"""

__version__ = "0.1.0"
