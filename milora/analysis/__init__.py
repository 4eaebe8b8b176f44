"""Analysis: what an update changed in each weight's principal and minor singular subspaces.

`metrics` holds the per-weight metrics (float64, from the update's factors), `adapter` applies
them to a saved adapter (`analyze_adapter`, `format_analysis`), `plot` draws per-layer curves.
"""

from milora.analysis.adapter import analyze_adapter, format_analysis
from milora.analysis.metrics import METRICS, update_metrics
from milora.analysis.plot import plot_analysis

__all__ = ["METRICS", "analyze_adapter", "format_analysis", "plot_analysis", "update_metrics"]
