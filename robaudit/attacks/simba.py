"""SimBA, the Simple Black-box Attack (Guo, Gardner, You, Wilson and Weinberger, ICML 2019).

A score-based black-box attack: it only queries the model's outputs (forward passes
under ``torch.no_grad()``, never a backward). Each step picks the next direction ``q``
of an orthonormal basis, in a random order, and tries ``x - step q``; if that does not
lower the true class's score it tries ``x + step q``; a trial is kept only when it lowers
the score. So a step costs one or two queries.

Bases (``basis``):

- ``"pixel"``: the coordinate basis, visited in a uniformly random order per sample;
- ``"dct"``: the orthonormal 2-D DCT-II basis of each channel (SimBA-DCT), visited from
  low to high frequency: first the ``freq_init`` fraction of the lowest frequencies, then
  rings ``freq_stride`` wide, in a random order inside each ring (the reference's
  "strided" block order; its ImageNet settings are 28/224 and 7/224, the defaults here).

Threats:

- Linf, pixel basis: a trial sets the coordinate to ``x_i - eps`` or ``x_i + eps`` (clipped
  to the box), so every coordinate sits on a vertex of the cube, where Linf adversarial
  examples live; a trial that would not change the point (the coordinate already there)
  is skipped without a query.
- Linf, DCT basis: the basis image is scaled so its largest pixel moves by eps, added, and
  the accumulated perturbation clipped back into the cube and the box.
- L2 (adaptation, the reference has no L2 ball): each trial adds ``+-l2_step * eps`` along
  the basis direction (unit L2 norm) and projects the accumulated perturbation back into
  the L2 ball and the box with :func:`robaudit.attacks.base.project`. Up to about
  ``1 / l2_step**2`` accepted steps fit inside the ball; after that a step rotates the
  perturbation along the sphere instead of growing it.

Beyond the reference: when a sample has visited every basis direction it starts again
with a fresh random order, until its query budget is spent (the reference stops after one
pass); samples are dropped as soon as they are misclassified.

Score (``loss``): ``"margin"`` (``z_y - max_{j != y} z_j``, the default: the softmax
probability saturates at 1.0 in float32 on confident models, so no trial looks better) or
``"prob"`` (``p(y | x)``, the reference's choice). Cost: one query for the start plus at
most ``max_queries`` trials per point.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from robaudit.attacks.base import Attack, AttackContext, project
from robaudit.attacks.square import as_grid
from robaudit.threats import Threat


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix M (rows are basis vectors): coefficients = M @ signal."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.to(dtype)


class SimBA(Attack):
    """SimBA (pixel or DCT basis), untargeted, Linf and L2."""

    name: ClassVar[str] = "simba"
    kind: ClassVar[str] = "fixed"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    randomized: ClassVar[bool] = True

    def __init__(
        self,
        max_queries: int = 2000,
        basis: str = "pixel",
        l2_step: float = 0.2,
        loss: str = "margin",
        freq_init: float = 1 / 8,
        freq_stride: float = 1 / 32,
    ) -> None:
        if max_queries < 1:
            raise ValueError("SimBA needs at least one query")
        if basis not in ("pixel", "dct"):
            raise ValueError(f"unknown SimBA basis '{basis}' (known: pixel, dct)")
        if loss not in ("margin", "prob"):
            raise ValueError(f"unknown SimBA loss '{loss}' (known: margin, prob)")
        if not l2_step > 0:
            raise ValueError("l2_step must be positive")
        self.max_queries = max_queries
        self.basis = basis
        self.l2_step = l2_step
        self.loss_name = loss
        self.freq_init = freq_init
        self.freq_stride = freq_stride

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_queries": self.max_queries,
            "basis": self.basis,
            "loss": self.loss_name,
            "linf_step": "eps (coordinates set to x +- eps)" if self.basis == "pixel" else "eps (largest pixel)",
            "l2_step": self.l2_step,
        }
        if self.basis == "dct":
            out.update(freq_init=self.freq_init, freq_stride=self.freq_stride, order="strided")
        else:
            out.update(order="random")
        return out

    # -- queries -------------------------------------------------------------------------

    def _evaluate(
        self, model: nn.Module, grid: torch.Tensor, shape: torch.Size, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One query per row: (score to lower, misclassified)."""
        logits = model(grid.reshape(len(grid), *shape[1:]))
        if self.loss_name == "prob":
            score = logits.float().softmax(dim=1).gather(1, y[:, None]).squeeze(1)
        else:
            true = logits.gather(1, y[:, None]).squeeze(1)
            others = logits.clone()
            others.scatter_(1, y[:, None], float("-inf"))
            score = (true - others.amax(dim=1)).float()
        return score, logits.argmax(dim=1) != y

    # -- basis orders ----------------------------------------------------------------------

    def _orders(self, m: int, c: int, h: int, w: int, ctx: AttackContext, device: torch.device) -> torch.Tensor:
        """(m, c*h*w) per-sample visiting orders of the basis indices."""
        d = c * h * w
        keys = torch.rand(m, d, generator=ctx.generator, device="cpu", dtype=torch.float64)
        if self.basis == "dct":
            side = max(h, w)
            first = max(1, int(round(self.freq_init * side)))
            stride = max(1, int(round(self.freq_stride * side)))
            k = torch.arange(d)
            u, v = (k % (h * w)) // w, k % w
            ring = torch.maximum(u, v)
            block = torch.where(ring < first, 0, 1 + (ring - first) // stride)
            keys = keys + block.to(torch.float64)[None]
        return keys.argsort(dim=1).to(device)

    # -- the attack ------------------------------------------------------------------------

    @torch.no_grad()
    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, ctx: AttackContext
    ) -> torch.Tensor:
        if threat.norm not in self.norms:
            raise NotImplementedError(f"SimBA does not support {threat.norm}")
        shape = x.shape
        grid, _ = as_grid(x.detach())
        n, c, h, w = grid.shape
        d = c * h * w
        device, dtype = grid.device, grid.dtype
        eps, lo, hi = threat.eps, ctx.lower, ctx.upper

        best = grid.clone()
        score, fooled = self._evaluate(model, best, shape, y)
        queries = torch.ones(n, dtype=torch.long, device=device)
        steps = torch.zeros(n, dtype=torch.long, device=device)
        max_steps = self.max_queries + d  # a step that changes nothing costs no query: bound them too
        order = self._orders(n, c, h, w, ctx, device)
        position = torch.zeros(n, dtype=torch.long, device=device)

        if self.basis == "dct":
            mh, mw = dct_matrix(h).to(device, dtype), dct_matrix(w).to(device, dtype)
            peak = mh.abs().amax(dim=1)[:, None] * mw.abs().amax(dim=1)[None, :]  # (h, w) largest pixel

        while True:
            idx = torch.nonzero(~fooled & (queries <= self.max_queries) & (steps < max_steps)).flatten()
            m = len(idx)
            if m == 0:
                break
            done = idx[position[idx] >= d]
            if len(done):
                order[done] = self._orders(len(done), c, h, w, ctx, device)
                position[done] = 0
            k = order[idx, position[idx]]
            position[idx] += 1
            steps[idx] += 1

            x_cur = grid[idx]
            if self.basis == "dct":
                ch, u, v = k // (h * w), (k % (h * w)) // w, k % w
                direction = torch.zeros(m, c, h, w, device=device, dtype=dtype)
                direction[torch.arange(m, device=device), ch] = mh[u][:, :, None] * mw[v][:, None, :]
                linf_scale = (eps / peak[u, v]).view(-1, 1, 1, 1)
            else:
                direction = torch.zeros(m, d, device=device, dtype=dtype)
                direction[torch.arange(m, device=device), k] = 1.0
                direction = direction.view(m, c, h, w)
                linf_scale = None

            pending = torch.ones(m, dtype=torch.bool, device=device)
            for sign in (-1.0, 1.0):
                current = best[idx]
                cand = self._trial(current, x_cur, direction, sign, threat, lo, hi, linf_scale, k)
                changed = ((cand - current).abs() > 0).flatten(1).any(dim=1)
                ask = pending & changed & (queries[idx] <= self.max_queries)
                if not ask.any():
                    continue
                rows = idx[ask]
                new_score, new_fooled = self._evaluate(model, cand[ask], shape, y[rows])
                queries[rows] += 1
                improved = (new_score < score[rows]) | new_fooled
                winners = rows[improved]
                best[winners] = cand[ask][improved]
                score[winners] = new_score[improved]
                fooled[winners] = new_fooled[improved]
                pending[torch.nonzero(ask).flatten()[improved]] = False
        return best.reshape(shape)

    def _trial(self, current, x, direction, sign, threat, lo, hi, linf_scale, k):
        """The point one signed step along ``direction`` from ``current``, inside ball and box."""
        eps = threat.eps
        if threat.norm == "linf":
            if self.basis == "pixel":
                flat = current.flatten(1).clone()
                rows = torch.arange(len(flat), device=flat.device)
                flat[rows, k] = (x.flatten(1)[rows, k] + sign * eps).clamp(lo, hi)
                return flat.view_as(current)
            delta = (current - x + sign * linf_scale * direction).clamp(-eps, eps)
            return (x + delta).clamp(lo, hi)
        return project(current + sign * self.l2_step * eps * direction, x, threat, lo, hi)
