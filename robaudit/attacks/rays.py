"""RayS, the Ray Searching attack (Chen and Gu, KDD 2020), Linf, untargeted.

A decision-based attack: it reads only the predicted label (``argmax``), under
``torch.no_grad()``, never a score and never a gradient, so masked or one-hot outputs
cannot hide the boundary from it. It searches over ray directions ``s`` in {-1, +1}^d:
the point at radius ``r`` along ``s`` is ``clip(x + r s)`` (Linf distance at most ``r``),
and ``r(s)``, the radius where the ray first crosses the decision boundary, is
minimised by flipping the signs of blocks of coordinates. Faithful to the authors'
batched reference (``uclaml/RayS``, ``RayS.py``):

- start from ``s = (1, ..., 1)`` with no known radius (``r = inf``);
- hierarchical blocks: at level ``l`` the flattened input is cut into ``2^l`` blocks of
  ``ceil(d / 2^l)`` coordinates, visited in order; after the last block of a level the
  next level starts (at one coordinate per block the last level repeats);
- for each block, flip its signs in the current best direction and ask one query at the
  current best radius (at the far box vertex while none is known); only if that point is
  adversarial, bisect the radius between 0 and ``min(r, upper - lower)`` to a tolerance
  of ``tol / sqrt(d)`` (``tol`` along the unit-L2 ray, as the reference) and keep the
  direction if its radius is smaller.

Cost in forward passes per point: one per block tried, plus about
``log2((upper - lower) sqrt(d) / tol)`` for each accepted bisection, never more than
``max_queries`` in all.

Deliberate differences from the reference, none of which weakens the attack:

- fixed-radius early stop: a point stops being queried as soon as its adversarial
  point lies within eps, and a bisection ends as soon as its radius is within eps
  (the reference keeps attacking every point until the budget is spent);
- the radius and tolerance scale with the box width (the reference assumes [0, 1]);
- a bisection whose interval is already below the tolerance asks nothing (the
  reference asks one query first);
- no randomness: the reference draws none either (hence ``randomized = False``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from robaudit.attacks.base import Attack, AttackContext
from robaudit.attacks.hopskipjump import LabelOracle, bisecting
from robaudit.threats import Threat, perturbation_norms


class RayS(Attack):
    """RayS under a per-point query budget."""

    name: ClassVar[str] = "rays"
    kind: ClassVar[str] = "fixed"
    norms: ClassVar[tuple[str, ...]] = ("linf",)
    randomized: ClassVar[bool] = False

    def __init__(self, max_queries: int = 5000, tol: float = 1e-3) -> None:
        if max_queries < 1:
            raise ValueError("RayS needs at least one query")
        if not tol > 0:
            raise ValueError("tol must be positive")
        self.max_queries = max_queries
        self.tol = tol

    def params(self) -> dict[str, Any]:
        return {"max_queries": self.max_queries, "tol": self.tol, "start": "all-ones direction"}

    @torch.no_grad()
    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, ctx: AttackContext
    ) -> torch.Tensor:
        if threat.norm not in self.norms:
            raise NotImplementedError(f"RayS does not support {threat.norm}")
        flat = x.detach().flatten(1)
        n, d = flat.shape
        oracle = LabelOracle(model, x.shape, y, self.max_queries, max(n, 1))
        span = ctx.upper - ctx.lower
        tol = self.tol * span / math.sqrt(d)
        sgn = torch.ones_like(flat)
        radius = torch.full((n,), math.inf, dtype=torch.float64, device=flat.device)
        best = flat.clone()
        dist = torch.full((n,), math.inf, dtype=torch.float64, device=flat.device)
        everyone = torch.arange(n, device=flat.device)
        top_level = math.ceil(math.log2(d)) if d > 1 else 0
        level, block = 0, 0
        while True:
            rows = torch.nonzero((dist > threat.eps) & (oracle.left(everyone) >= 1)).flatten()
            if len(rows) == 0:
                break
            size = math.ceil(d / 2**level)
            start, end = block * size, min(d, (block + 1) * size)
            attempt = sgn[rows].clone()
            attempt[:, start:end] *= -1
            found, r = self._search(oracle, rows, flat[rows], attempt, radius[rows], span, tol, threat.eps, ctx)
            rows, attempt, r = rows[found], attempt[found], r[found]
            radius[rows], sgn[rows] = r, attempt
            best[rows] = self._point(flat[rows], attempt, r, ctx)
            dist[rows] = perturbation_norms(best[rows] - flat[rows], "linf")
            block += 1
            if block == 2**level or end == d:
                level, block = min(level + 1, top_level), 0
        self.crossed = dist <= threat.eps  # seen adversarial within eps: the runner's silent-success check
        return best.view_as(x)

    @staticmethod
    def _point(x: torch.Tensor, sgn: torch.Tensor, r: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        """The point at Linf radius ``r`` along the sign direction, in the box."""
        return (x + r.to(x.dtype)[:, None] * sgn).clamp(ctx.lower, ctx.upper)

    def _search(
        self,
        oracle: LabelOracle,
        rows: torch.Tensor,
        x: torch.Tensor,
        sgn: torch.Tensor,
        radius: torch.Tensor,
        span: float,
        tol: float,
        eps: float,
        ctx: AttackContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(improved, new radius): one check at the current radius, then bisection where it hits."""
        probe = radius.clamp(max=span)  # the far box vertex while no radius is known
        hit = oracle.adversarial(rows, self._point(x, sgn, probe, ctx))
        low, high = torch.zeros_like(probe), probe.clone()
        tolerance = torch.full_like(probe, tol)
        while True:
            todo = torch.nonzero(hit & bisecting(low, high, tolerance, eps) & (oracle.left(rows) >= 1)).flatten()
            if len(todo) == 0:
                break
            mid = (low[todo] + high[todo]) / 2
            ok = oracle.adversarial(rows[todo], self._point(x[todo], sgn[todo], mid, ctx))
            high[todo] = torch.where(ok, mid, high[todo])
            low[todo] = torch.where(ok, low[todo], mid)
        return hit & (high < radius), high
