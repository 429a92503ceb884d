"""Decision-surface slices: g on a plane through a sample, for the terminal and for image files.

The plane is x + a u + b v with u, v orthonormal (unit L2, pixel units). u is the
attack direction when one is given ("adversarial projection") and a random direction
otherwise ("random projection"); v is always random. The distance from the centre to
the g = 0 contour along each axis is the story: a robust model keeps g > 0 far out
along the attack direction. Slices meant for comparison must share the grid and the
colour scale: build them with the same ``grid``/``span`` and pass ``shared_range``.
"""

from __future__ import annotations

import math

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.text import Text
from torch import nn

from robaudit.errors import RobauditError
from robaudit.measures.decision import evaluate, unit_rows
from robaudit.measures.plots import save_curve_png, save_png

__all__ = ["SurfaceSlice", "render_terminal", "save_curve_png", "save_png", "shared_range", "surface_slice"]

POSITIVE_GLYPH, NEGATIVE_GLYPH, BOUNDARY_GLYPH, CENTRE_GLYPH = "█", "░", "▒", "◆"


@dataclass
class SurfaceSlice:
    """g(x + a_i u + b_j v) on a grid; ``values[j][i]`` (rows follow b/v, columns follow a/u)."""

    values: list[list[float]]
    a: list[float]
    b: list[float]
    u_kind: str  # "adversarial" or "random"
    v_kind: str  # "random"
    span: float  # half-width of the square, pixel L2 units (u and v have L2 norm 1)
    label: int
    g_center: float
    title: str = ""
    u: torch.Tensor | None = field(default=None, repr=False, compare=False)
    v: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def boundary_distances(self) -> dict[str, float | None]:
        """Grid distance from the centre to the first point with g <= 0 along +u, -u, +v, -v (None: not within span)."""
        n = len(self.a)
        c = n // 2
        rays = {
            "+u": [(c, i) for i in range(c, n)], "-u": [(c, i) for i in range(c, -1, -1)],
            "+v": [(j, c) for j in range(c, n)], "-v": [(j, c) for j in range(c, -1, -1)],
        }  # fmt: skip
        out: dict[str, float | None] = {}
        for name, cells in rays.items():
            hit = next((cells[k] for k in range(len(cells)) if self.values[cells[k][0]][cells[k][1]] <= 0), None)
            out[name] = None if hit is None else abs(self.a[hit[1]]) + abs(self.b[hit[0]])
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (directions left out)."""
        return {
            "values": self.values, "a": self.a, "b": self.b, "u_kind": self.u_kind, "v_kind": self.v_kind,
            "span": self.span, "label": self.label, "g_center": self.g_center, "title": self.title,
            "boundary_distances": self.boundary_distances(),
        }  # fmt: skip


def _plane(
    shape: tuple[int, ...], direction: torch.Tensor | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal (u, v): u along ``direction`` (or random), v random and orthogonal to u."""
    rand = lambda: torch.randn((1, *shape), generator=generator, dtype=torch.float64)  # noqa: E731
    if direction is not None:
        u = direction.detach().to("cpu", torch.float64).reshape(1, *shape)
        if not torch.isfinite(u).all() or u.norm() == 0:
            raise RobauditError("the surface slice's direction must be finite and not all zero")
    else:
        u = rand()
    u = unit_rows(u)
    v = rand()
    v = unit_rows(v - (v * u).sum() * u)
    return u[0], v[0]


def _one_sample(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    shape = getattr(model, "sample_shape", None)
    if shape is not None and tuple(x.shape) == tuple(shape):
        return x
    if x.dim() < 2 or x.shape[0] != 1:
        raise RobauditError(f"surface_slice takes one sample of shape (1, *sample_shape), not {tuple(x.shape)}")
    return x[0]


def surface_slice(
    model: nn.Module,
    x: torch.Tensor,
    y: int | torch.Tensor,
    *,
    direction: torch.Tensor | None = None,
    seed: int = 0,
    grid: int = 41,
    span: float = 1.0,
    box: tuple[float, float] | None = None,
    batch_size: int = 256,
    title: str = "",
) -> SurfaceSlice:
    """g on the plane x + a u + b v, a, b in [-span, span] on a ``grid`` x ``grid`` lattice.

    ``x`` is one sample of shape (1, *sample_shape) (or sample_shape for an `AuditModel`,
    which knows its sample shape), ``y`` its true label. ``direction`` (e.g. x_adv - x)
    fixes u; it is normalized, so ``span`` is in pixel L2 units either way. ``grid``
    must be odd so that x itself is the centre grid point. ``box`` clips the plane's points to
    the input range (off by default: the function, not the data domain, is drawn).
    """
    if grid < 3 or grid % 2 == 0:  # odd: x is the centre point the boundary distances start from
        raise RobauditError("a surface slice needs an odd grid >= 3")
    if not 0 < span < math.inf:
        raise RobauditError(
            f"the span of a surface plane must be a positive finite number, got {span:g} (it is twice the threat's L2 "
            "radius unless --span sets it)"
        )
    model_param = next(iter(model.parameters()), None)
    device = model_param.device if model_param is not None else x.device
    sample = _one_sample(model, x.detach())
    label = int(y.reshape(-1)[0]) if isinstance(y, torch.Tensor) else int(y)
    u, v = _plane(tuple(sample.shape), direction, torch.Generator().manual_seed(seed))
    steps = torch.linspace(-span, span, grid, dtype=torch.float64)
    bb, aa = torch.meshgrid(steps, steps, indexing="ij")  # rows follow b (v), columns follow a (u)
    offsets = aa.reshape(-1, *[1] * sample.dim()) * u + bb.reshape(-1, *[1] * sample.dim()) * v
    points = (sample.to("cpu", torch.float64) + offsets).to(sample.dtype)
    if box is not None:
        points = points.clamp(*box)
    labels = torch.full((len(points),), label, dtype=torch.long)
    g = evaluate(model, points.to(device), labels.to(device), batch_size=batch_size).cpu().double().view(grid, grid)
    centre = evaluate(model, sample[None].to(device), labels[:1].to(device)).item()  # exact even for an even grid
    return SurfaceSlice(
        values=g.tolist(), a=steps.tolist(), b=steps.tolist(), u_kind="adversarial" if direction is not None else "random",
        v_kind="random", span=float(span), label=label, g_center=float(centre), title=title, u=u, v=v,
    )  # fmt: skip


def shared_range(slices: Sequence[SurfaceSlice]) -> tuple[float, float]:
    """(vmin, vmax) over several slices, for one colour scale across models."""
    values = [val for s in slices for row in s.values for val in row]
    return min(values), max(values)


def _shade(value: float, vmin: float, vmax: float) -> str:
    """Blue for g > 0 (kept), red for g <= 0 (flipped), paler towards g = 0."""
    if value > 0:
        t = min(1.0, value / vmax) if vmax > 0 else 1.0
        r, g, b = int(200 - 170 * t), int(215 - 125 * t), int(255 - 75 * t)
    else:
        t = min(1.0, value / vmin) if vmin < 0 else 1.0
        r, g, b = int(255 - 55 * t), int(200 - 170 * t), int(190 - 160 * t)
    return f"rgb({r},{g},{b})"


def _boundary(values: list[list[float]], j: int, i: int) -> bool:
    """A cell on the g = 0 contour: its sign differs from a 4-neighbour's."""
    here = values[j][i] > 0
    rows, cols = len(values), len(values[0])
    return any(
        0 <= jj < rows and 0 <= ii < cols and (values[jj][ii] > 0) != here
        for jj, ii in ((j - 1, i), (j + 1, i), (j, i - 1), (j, i + 1))
    )


def render_terminal(
    surface: SurfaceSlice, console: Console, vmin: float | None = None, vmax: float | None = None
) -> None:
    """Print the slice as a coloured block heatmap with the g = 0 boundary marked, and a legend.

    Glyphs carry the meaning without colour too: █ g > 0, ░ g <= 0, ▒ boundary, ◆ the sample.
    Pass the same ``vmin``/``vmax`` (``shared_range``) to compare models.
    """
    lo, hi = shared_range([surface]) if vmin is None or vmax is None else (vmin, vmax)
    lo, hi = (vmin if vmin is not None else lo), (vmax if vmax is not None else hi)
    n = len(surface.a)
    width = 2 if console.width >= 2 * n + 10 else 1
    centre = n // 2
    heading = surface.title or f"decision surface, label {surface.label}"
    console.print(Text(f"{heading}: g = z_y - max_(j!=y) z_j = {surface.g_center:.3g} at the sample", style="bold"))
    for j in range(n - 1, -1, -1):  # top row = +span along v
        line = Text("+v " if j == n - 1 else "-v " if j == 0 else "   ")
        for i in range(n):
            value = surface.values[j][i]
            colour = _shade(value, lo, hi)
            if i == centre and j == centre:
                line.append(CENTRE_GLYPH * width, style=f"bold white on {colour}")
            elif _boundary(surface.values, j, i):
                line.append(BOUNDARY_GLYPH * width, style="bold yellow")
            else:
                line.append((POSITIVE_GLYPH if value > 0 else NEGATIVE_GLYPH) * width, style=colour)
        console.print(line, no_wrap=True, crop=False)
    axis = f"   -u {'-' * max(0, n * width - 12)} +u"
    console.print(Text(axis, style="dim"), no_wrap=True)
    console.print(_legend(surface, lo, hi))


def _legend(surface: SurfaceSlice, lo: float, hi: float) -> Text:
    u_text = "the attack direction" if surface.u_kind == "adversarial" else "a random direction"
    legend = Text()
    legend.append(POSITIVE_GLYPH * 2, style=_shade(hi, lo, hi))
    legend.append(f" g > 0 (label {surface.label} kept, up to {hi:.3g})  ")
    legend.append(NEGATIVE_GLYPH * 2, style=_shade(lo, lo, hi))
    legend.append(f" g <= 0 (another class, down to {lo:.3g})  ")
    legend.append("\n")
    legend.append(BOUNDARY_GLYPH * 2, style="bold yellow")
    legend.append(" boundary g = 0  ")
    legend.append(CENTRE_GLYPH, style="bold")
    legend.append(" the sample\n")
    legend.append(f"horizontal u: {u_text}; vertical v: a random direction; each axis spans +-{surface.span:g} (pixel L2)")
    dist = surface.boundary_distances()
    shown = [f"{k} >{surface.span:g}" if d is None else f"{k} {d:.3g}" for k, d in dist.items()]
    legend.append("\ndistance to the boundary: " + ", ".join(shown))
    return legend
