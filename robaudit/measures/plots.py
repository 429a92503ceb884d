"""PNG files of decision-surface slices and accuracy-versus-eps curves (matplotlib, optional).

matplotlib is imported only here and only when a PNG is asked for, so the rest of
robaudit never needs it. The figures are drawn on an Agg canvas without pyplot: no
global backend is switched and no window can open.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from robaudit.errors import RobauditError

if TYPE_CHECKING:
    from robaudit.measures.surface import SurfaceSlice

MISSING = "PNG plots need matplotlib: pip install 'matplotlib>=3.7' (or pip install '.[plot]' in a robaudit checkout)"


class CurveLike(Protocol):
    """What a robust-accuracy curve offers (`robaudit.report.schema.Curve` fits)."""

    norm: str
    eps: list[float]
    robust_accuracy: list[float]


def _matplotlib() -> tuple[Any, Any, Any]:
    """(Figure, FigureCanvasAgg, TwoSlopeNorm), or the one-line install hint."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import TwoSlopeNorm
        from matplotlib.figure import Figure
    except ImportError:
        raise RobauditError(MISSING) from None
    return Figure, FigureCanvasAgg, TwoSlopeNorm


def _write(fig: Any, canvas_cls: Any, path: str | Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas_cls(fig).print_png(str(path))
    except OSError as exc:
        raise RobauditError(f"cannot write {path}: {exc}") from None
    return path


TITLE_WIDTH = 34  # characters of a 9 pt panel title that fit above a 3.6-inch panel


def _wrap(text: str, width: int = TITLE_WIDTH) -> list[str]:
    return textwrap.wrap(text, width) or [text]


def _titles(slices: Sequence[SurfaceSlice]) -> tuple[str, list[str]]:
    """(figure title, panel titles), short enough not to run into each other.

    A prefix every panel shares ("model (label 3, predicted 3): ") goes above the figure
    once; otherwise each title breaks after its "model: " part. Every line is wrapped to
    the panel's width.
    """
    titles = [s.title or f"label {s.label}" for s in slices]
    shared = ""
    common = os.path.commonprefix(titles) if len(titles) > 1 else ""
    if common.rfind(": ") > 0:
        cut = common.rfind(": ")
        shared, titles = common[:cut], [t[cut + 2 :] for t in titles]
    panels = []
    for title in titles:
        head, sep, tail = title.rpartition(": ")
        parts = [head, tail] if sep else [title]
        panels.append("\n".join(line for part in parts for line in _wrap(part)))
    return shared, panels


def save_png(slices: Sequence[SurfaceSlice], path: str | Path, shared_scale: bool = True) -> Path:
    """One panel per slice, side by side; g = 0 drawn as a black contour, the sample as a cross.

    With ``shared_scale`` every panel uses the same colour scale (and one colour bar), so
    models can be compared panel to panel; the grids come from the slices themselves.
    """
    if not slices:
        raise RobauditError("save_png needs at least one surface slice")
    figure_cls, canvas_cls, two_slope = _matplotlib()
    suptitle, titles = _titles(slices)
    lines = max(t.count("\n") + 1 for t in titles) + (len(_wrap(suptitle, 2 * TITLE_WIDTH * len(slices))) if suptitle else 0)
    # square panels: the height holds one panel, its axis labels and every title line (else the layout collapses)
    fig = figure_cls(figsize=(3.6 * len(slices) + 0.8, 3.5 + 0.17 * lines), layout="constrained")
    axes = fig.subplots(1, len(slices), squeeze=False)[0]

    def norm_for(group: Sequence[SurfaceSlice]) -> Any:
        values = [v for s in group for row in s.values for v in row]
        lo, hi = min(values), max(values)
        spread = max(abs(lo), abs(hi), 1e-12)
        return two_slope(vcenter=0.0, vmin=min(lo, -1e-6 * spread), vmax=max(hi, 1e-6 * spread))

    shared = norm_for(slices) if shared_scale else None
    image = None
    for ax, s, title in zip(axes, slices, titles):
        extent = (s.a[0], s.a[-1], s.b[0], s.b[-1])
        image = ax.imshow(s.values, origin="lower", extent=extent, cmap="RdBu", norm=shared or norm_for([s]), aspect="equal")
        flat = [v for row in s.values for v in row]
        if min(flat) <= 0 < max(flat):
            ax.contour(s.a, s.b, s.values, levels=[0.0], colors="black", linewidths=1.2)
        ax.plot([0], [0], marker="+", color="black", markersize=10)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("u: attack direction" if s.u_kind == "adversarial" else "u: random direction", fontsize=8)
        ax.set_ylabel("v: random direction", fontsize=8)
        if not shared_scale:
            fig.colorbar(image, ax=ax, shrink=0.8)
    if shared_scale and image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="g = z_y - max z_j")
    if suptitle:
        fig.suptitle("\n".join(_wrap(suptitle, 2 * TITLE_WIDTH * len(slices))), fontsize=10)
    return _write(fig, canvas_cls, path)


def never_broken(curve: CurveLike) -> float:
    """Fraction of samples the curve keeps robust at its largest radius.

    The scan's grid ends at or beyond every finite distance found (robaudit.scan._curve), so
    what is still robust there is what no attack broke at any radius: not proven robust,
    just unbroken, and the curve is an upper bound that never falls below it.
    """
    return float(curve.robust_accuracy[-1]) if curve.robust_accuracy else 0.0


def save_curve_png(
    curves: Mapping[str, Sequence[CurveLike]] | Sequence[CurveLike],
    path: str | Path,
    title: str = "",
    unproven: Mapping[str, float] | None = None,
) -> Path:
    """Robust accuracy against eps, one panel per norm, one line per model (mapping label -> curves).

    Samples that no attack broke at any radius (``unproven``: norm -> fraction of samples;
    by default each curve's last point, see ``never_broken``) are shaded as the curve's
    floor and named in the legend: the curve is only an upper bound down there.
    """
    groups = dict(curves) if isinstance(curves, Mapping) else {"": list(curves)}
    norms = sorted({c.norm for cs in groups.values() for c in cs})
    if not norms:
        raise RobauditError("save_curve_png needs at least one curve")
    figure_cls, canvas_cls, _ = _matplotlib()
    fig = figure_cls(figsize=(4.6 * len(norms), 3.6), layout="constrained")
    axes = fig.subplots(1, len(norms), squeeze=False)[0]
    for ax, norm in zip(axes, norms):
        bounded = False
        for label, cs in groups.items():
            for c in (c for c in cs if c.norm == norm):
                (line,) = ax.plot(c.eps, c.robust_accuracy, marker=".", label=label or None)
                floor = unproven.get(norm, 0.0) if unproven is not None and len(groups) == 1 else never_broken(c)
                if floor > 0 and c.eps:
                    bounded = True
                    ax.fill_between(
                        [c.eps[0], c.eps[-1]], 0, floor, color=line.get_color(), alpha=0.15, hatch="//", linewidth=0,
                        label=textwrap.fill(
                            f"{f'{label}: ' if label else ''}{100 * floor:.1f}% of samples: minimal-norm attack "
                            "found nothing (not proven robust)", 34,
                        ),
                    )  # fmt: skip
        ax.set_xlabel(f"eps ({norm})")
        ax.set_ylabel("robust accuracy (upper bound)" if bounded else "robust accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if any(groups) or bounded:
            ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    return _write(fig, canvas_cls, path)
