"""Decision-surface measurements: the robustness indicator and decision-surface slices.

The attack battery says whether a model breaks; these say what its decision function
g = z_y - max_{j != y} z_j looks like around each sample (gradient, curvature, slices),
which explains the battery's numbers and ranks models cheaply. See docs/indicator.md.
"""

from __future__ import annotations

from robaudit.measures.indicator import BUDGETS, Budget, ModelIndicator, SampleIndicator, measure_indicator
from robaudit.measures.plots import save_curve_png, save_png
from robaudit.measures.surface import SurfaceSlice, render_terminal, shared_range, surface_slice

__all__ = [
    "BUDGETS",
    "Budget",
    "ModelIndicator",
    "SampleIndicator",
    "SurfaceSlice",
    "measure_indicator",
    "render_terminal",
    "save_curve_png",
    "save_png",
    "shared_range",
    "surface_slice",
]
