"""Spatial attacks: small rotations and translations, searched on a grid.

A different threat model from the Lp balls (Engstrom et al. 2019, "Exploring the
landscape of spatial robustness"): the adversary may rotate the image by up to
``threat.eps`` degrees and shift it by up to ``threat.shift`` pixels along each axis.
Pixels moved in from outside the image take the lower end of the input range
(black), and bilinear interpolation keeps every pixel inside the box.

The attack returns transformation parameters, not pixels: the runner rebuilds the
image from them with `transform_images` and verifies it, so a reported example is
always exactly "this image, rotated by r and shifted by (dx, dy)".
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robaudit.attacks.base import Attack, AttackContext
from robaudit.threats import Threat

PARAM_TOL = 1e-9


def transform_images(x: torch.Tensor, params: torch.Tensor, lower: float) -> torch.Tensor:
    """Rotate each image (N, C, H, W) about its centre by params[:, 0] degrees counter-clockwise
    (as displayed, row 0 at the top, like torchvision's ``rotate``), then shift it by
    params[:, 1] pixels to the right and params[:, 2] pixels down."""
    n, _, h, w = x.shape
    params = params.to(device=x.device, dtype=torch.float64)
    angle = torch.deg2rad(-params[:, 0])  # y points down, so screen-CCW is a negative angle here
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid maps each output location to the input location it samples, in
    # normalized coordinates; build input = R^-1 (out - t) in pixels, then rescale.
    sx, sy = w / 2.0, h / 2.0
    theta = torch.zeros((n, 2, 3), dtype=torch.float64, device=x.device)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = sin * sy / sx
    theta[:, 1, 0] = -sin * sx / sy
    theta[:, 1, 1] = cos
    tx, ty = params[:, 1], params[:, 2]
    theta[:, 0, 2] = -(cos * tx + sin * ty) / sx
    theta[:, 1, 2] = -(-sin * tx + cos * ty) / sy
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    moved = F.grid_sample(x - lower, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved + lower


def spatial_grid(threat: Threat, rotations: int, shifts: int) -> torch.Tensor:
    """All (rotation, dx, dy) grid points of the threat, mildest first (identity excluded).

    Mildest first means the first transformation that breaks a sample is also the
    smallest one on the grid, which is what the report shows.
    """
    rot = torch.linspace(-threat.eps, threat.eps, rotations, dtype=torch.float64) if threat.eps > 0 else torch.zeros(1)
    sh = torch.linspace(-threat.shift, threat.shift, shifts, dtype=torch.float64) if threat.shift > 0 else torch.zeros(1)
    grid = torch.cartesian_prod(rot.double(), sh.double(), sh.double())
    scale = torch.tensor([max(threat.eps, 1e-12), max(threat.shift, 1e-12), max(threat.shift, 1e-12)], dtype=torch.float64)
    relative = grid.abs() / scale
    order = sorted(range(len(grid)), key=lambda i: (float(relative[i].max()), float(relative[i].sum())))
    grid = grid[order]
    return grid[relative[order].sum(dim=1) > 0]


def within_limits(params: torch.Tensor, threat: Threat) -> torch.Tensor:
    """True where a (rotation, dx, dy) triple lies inside the threat's limits."""
    params = params.to(torch.float64)
    return (
        torch.isfinite(params).all(dim=1)
        & (params[:, 0].abs() <= threat.eps * (1 + PARAM_TOL) + PARAM_TOL)
        & (params[:, 1:].abs() <= threat.shift * (1 + PARAM_TOL) + PARAM_TOL).all(dim=1)
    )


class SpatialGrid(Attack):
    """Exhaustive grid search over rotations and translations (Engstrom et al. 2019).

    Parameters: ``rotations`` grid points over [-eps, eps] degrees (default 31) and
    ``shifts`` grid points per axis over [-shift, shift] pixels (default 5), i.e. 775
    transformations and at most that many forward passes per sample, fewer for samples
    broken early. No gradients: rotations and translations are not reachable by small
    pixel steps, and a grid cannot be fooled by gradient masking.
    """

    name = "spatial-grid"
    norms = ("spatial",)
    randomized = False

    def __init__(self, rotations: int = 31, shifts: int = 5) -> None:
        if rotations < 1 or shifts < 1:
            raise ValueError("rotations and shifts must be at least 1")
        self.rotations = rotations
        self.shifts = shifts

    def params(self) -> dict[str, Any]:
        return {"rotations": self.rotations, "shifts": self.shifts}

    @torch.no_grad()
    def search(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, lower: float, batch_size: int
    ) -> torch.Tensor:
        """(N, 3) rotation/dx/dy of the mildest grid transformation that fools the model; NaN rows where none does."""
        if x.dim() != 4 or min(x.shape[2:]) < 2:
            raise ValueError(f"spatial attacks need images of shape (N, C, H, W), got {tuple(x.shape)}")
        grid = spatial_grid(threat, self.rotations, self.shifts)
        found = torch.full((len(x), 3), float("nan"), dtype=torch.float64)
        position = 0
        while position < len(grid):
            active = torch.nonzero(torch.isnan(found[:, 0])).flatten()
            if len(active) == 0:
                break
            group = grid[position : position + max(1, batch_size // len(active))]
            position += len(group)
            xs = x[active].repeat(len(group), 1, 1, 1)
            ps = group.repeat_interleave(len(active), dim=0)
            wrong = model(transform_images(xs, ps, lower)).argmax(dim=1).cpu() != y[active].cpu().repeat(len(group))
            for g in range(len(group)):  # mildest grid point first
                hit = wrong[g * len(active) : (g + 1) * len(active)] & torch.isnan(found[active, 0])
                found[active[hit]] = group[g]
        return found

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, ctx: AttackContext) -> torch.Tensor:
        found = self.search(model, x, y, threat, ctx.lower, batch_size=max(len(x), 256))
        hit = ~torch.isnan(found[:, 0])
        out = x.clone()
        if hit.any():
            out[hit] = transform_images(x[hit], found[hit], ctx.lower)
        return out


def describe(params: torch.Tensor) -> dict[str, float]:
    """One transformation as JSON-friendly numbers."""
    rotation, dx, dy = (float(v) for v in params.tolist())
    return {"rotation": round(rotation, 6), "dx": round(dx, 6), "dy": round(dy, 6)}
