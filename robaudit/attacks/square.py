"""Square Attack (Andriushchenko, Croce, Flammarion and Hein, ECCV 2020), Linf and L2.

A score-based black-box attack: it only queries the model's logits (forward passes
under ``torch.no_grad()``, never a backward), so it cannot be fooled by masked or
obfuscated gradients. This is why it closes AutoAttack's "standard" battery.

Faithful to the reference implementations (``max-andr/square-attack`` and
``fra31/auto-attack``'s ``square.py``):

- margin loss ``z_y - max_{j != y} z_j`` (lower is better; ``"ce"`` is the original's
  alternative, ``-CE``), minimised by random search;
- square side ``s = round(sqrt(p * H * W))`` where the fraction ``p`` starts at ``p_init``
  (0.8) and is halved after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000,
  rescaled to the budget (``it = int(it / n_queries * 10000)``), see :func:`p_selection`;
- Linf: start from vertical stripes (each column of each channel at ``+-eps``); each
  proposal sets one ``s x s`` window to ``+-eps`` per channel; a proposal that would not
  change the current point is resampled (the reference's ``while`` loop, so no query is
  wasted on a no-op);
- L2: start from a grid of ``H//5``-sided "meta pseudo-Gaussian" bumps with random signs,
  scaled to the eps-sphere; each proposal moves the mass of a second window into a
  first one, adds a centred meta pseudo-Gaussian bump with a random sign per channel to
  the first window, rescales it so the image keeps (at most) norm eps and renormalises
  to the sphere (the reference's update, line by line);
- a proposal is accepted only when it lowers the loss (or misclassifies); a point is
  no longer queried once it is misclassified.

Cost: one query per still-robust point for the start plus at most one per iteration,
so at most ``n_queries + 1`` forward passes per point.

Deliberate differences from the reference, none of which weakens the attack:

- windows, signs and bump orientations are drawn per sample (the reference draws one
  window position per batch in its vectorised code and one per sample in its loop);
- window positions are uniform over ``0..H-s`` inclusive; the reference draws
  ``randint(0, H - s)``, which never places a window touching the last row or column,
  so with small squares those pixels keep their initial value forever;
- inputs that are not images with both sides >= 2 (e.g. flat feature vectors, shape
  (N, D)) are treated as a line (N, C, 1, L): windows become segments covering the
  same fraction ``p`` of the coordinates and the L2 bump is the one-dimensional
  version of the meta pseudo-Gaussian (two opposite-signed halves);
- "misclassified" means ``argmax != y`` (what the runner re-verifies), not ``margin <= 0``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robaudit.attacks.base import Attack, AttackContext
from robaudit.threats import Threat

# Iterations (on the reference's 10000-iteration scale) after which p is halved.
P_SCHEDULE_ITERATIONS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init: float, it: int, n_queries: int, rescale: bool = True) -> float:
    """The reference's piece-wise constant schedule for the square fraction ``p``."""
    if rescale:
        it = int(it / n_queries * 10000)
    halvings = sum(1 for boundary in P_SCHEDULE_ITERATIONS if it > boundary)
    return p_init / 2**halvings


@functools.lru_cache(maxsize=256)
def _eta_rectangle(a: int, b: int) -> torch.Tensor:
    """The reference's ``pseudo_gaussian_pert_rectangles``: concentric rings weighted 1/(k+1)^2."""
    delta = torch.zeros(a, b, dtype=torch.float64)  # cached: callers must not modify it in place
    if a == 0 or b == 0:
        return delta
    row, col = a // 2, b // 2  # = x_c - 1, y_c - 1
    for k in range(max(a // 2 + 1, b // 2 + 1)):
        delta[max(row, 0) : min(row + 2 * k + 1, a), max(col, 0) : min(col + 2 * k + 1, b)] += 1.0 / (k + 1) ** 2
        row -= 1
        col -= 1
    return delta / delta.pow(2).sum().sqrt()


@functools.lru_cache(maxsize=256)
def meta_pseudo_gaussian(s: int) -> torch.Tensor:
    """The reference's ``meta_pseudo_gaussian_pert`` (two sub-squares of opposite sign), untransposed."""
    delta = torch.zeros(s, s, dtype=torch.float64)
    delta[: s // 2] = _eta_rectangle(s // 2, s)
    delta[s // 2 :] = -_eta_rectangle(s - s // 2, s)
    return delta / delta.pow(2).sum().sqrt()


@functools.lru_cache(maxsize=256)
def meta_pseudo_gaussian_line(s: int) -> torch.Tensor:
    """The one-dimensional analogue, shape (1, s): two opposite-signed pseudo-Gaussian halves."""
    delta = torch.cat([_eta_rectangle(1, s // 2), -_eta_rectangle(1, s - s // 2)], dim=1)
    return delta / delta.pow(2).sum().sqrt()


def as_grid(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """View ``x`` as (N, C, H, W); returns the view and whether it is a line (H == 1)."""
    n = x.shape[0]
    if x.dim() == 4 and x.shape[2] > 1 and x.shape[3] > 1:
        return x, False
    if x.dim() == 4:
        return x.reshape(n, x.shape[1], 1, -1), True
    if x.dim() == 3:
        return x.reshape(n, x.shape[1], 1, x.shape[2]), True
    return x.reshape(n, 1, 1, -1), True


class Square(Attack):
    """Square Attack, untargeted, one run of ``n_queries`` iterations.

    ``loss`` is ``"margin"`` (AutoAttack's choice) or ``"ce"``; ``rescale_schedule``
    rescales the p schedule to ``n_queries`` as the reference does. With
    ``probe_queries`` the run stops after that many iterations unless it has fooled a
    point of the batch by then; the probe is the start of the full run (same p
    schedule), so an escalated run is exactly the plain one.
    """

    name: ClassVar[str] = "square"
    kind: ClassVar[str] = "fixed"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    randomized: ClassVar[bool] = True

    def __init__(
        self,
        n_queries: int = 5000,
        p_init: float = 0.8,
        loss: str = "margin",
        rescale_schedule: bool = True,
        probe_queries: int | None = None,
    ) -> None:
        if n_queries < 1:
            raise ValueError("Square needs at least one query")
        if probe_queries is not None and probe_queries < 1:
            raise ValueError("probe_queries must be at least 1 (a probe of n_queries or more is the plain run)")
        if not 0 < p_init <= 1:
            raise ValueError("p_init must lie in (0, 1]")
        if loss not in ("margin", "ce"):
            raise ValueError(f"unknown Square loss '{loss}' (known: margin, ce)")
        self.n_queries = n_queries
        self.p_init = p_init
        self.loss_name = loss
        self.rescale_schedule = rescale_schedule
        self.probe_queries = probe_queries

    def params(self) -> dict[str, Any]:
        return {
            "n_queries": self.n_queries,
            "p_init": self.p_init,
            "loss": self.loss_name,
            "rescale_schedule": self.rescale_schedule,
            "probe_queries": self.probe_queries,
        }

    def _stop_after_probe(self, it: int, fooled: torch.Tensor) -> bool:
        """After the probe, go on only if the probe fooled a point of this batch.

        Every point handed to Square survived the white-box attacks before it, so one
        Square success is evidence that their gradients misled them (masking): then the
        full budget runs. Without that evidence the rest of the budget almost never
        breaks anything (0 points on the 20-row benchmark in docs/benchmarks.md).
        """
        return self.probe_queries is not None and it == self.probe_queries and not bool(fooled.any())

    def p_at(self, it: int) -> float:
        """The square fraction used at iteration ``it``."""
        return p_selection(self.p_init, it, self.n_queries, self.rescale_schedule)

    # -- queries -------------------------------------------------------------------------

    def _evaluate(
        self, model: nn.Module, grid: torch.Tensor, shape: torch.Size, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One query per row: (loss to minimise, misclassified)."""
        logits = model(grid.reshape(len(grid), *shape[1:]))
        true = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.clone()
        others.scatter_(1, y[:, None], float("-inf"))
        margin = true - others.amax(dim=1)
        fooled = logits.argmax(dim=1) != y
        if self.loss_name == "ce":
            loss = -F.cross_entropy(logits, y, reduction="none")
        else:
            loss = margin
        return loss.float(), fooled

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _uniform_int(high: torch.Tensor | int, n: int, ctx: AttackContext, device: torch.device) -> torch.Tensor:
        """n integers uniform in [0, high] (inclusive), drawn from the context's generator."""
        u = torch.rand(n, generator=ctx.generator, device="cpu")
        return (u * (high + 1)).long().clamp(max=high).to(device)

    @staticmethod
    def _signs(shape: list[int], ctx: AttackContext, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        bits = torch.randint(0, 2, shape, generator=ctx.generator, device="cpu")
        return (2 * bits - 1).to(device=device, dtype=dtype)

    @staticmethod
    def _unchanged(cand: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """Rows where a proposal equals the current point (up to 1e-7, as the reference)."""
        return ((cand - current).abs() >= 1e-7).flatten(1).sum(1) == 0

    @staticmethod
    def _window_mask(h: int, w: int, vh: torch.Tensor, vw: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
        """(n, 1, h, w) boolean masks of the windows [vh, vh+sh) x [vw, vw+sw)."""
        rows = torch.arange(h, device=vh.device)
        cols = torch.arange(w, device=vw.device)
        in_rows = (rows[None, :] >= vh[:, None]) & (rows[None, :] < vh[:, None] + sh)
        in_cols = (cols[None, :] >= vw[:, None]) & (cols[None, :] < vw[:, None] + sw)
        return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]

    def _bumps(
        self, s: int, line: bool, n: int, ctx: AttackContext, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """n meta pseudo-Gaussian bumps (n, 1, sh, sw), each randomly transposed (squares only)."""
        if line:
            return meta_pseudo_gaussian_line(s).to(device=device, dtype=dtype).expand(n, 1, 1, s)
        eta = meta_pseudo_gaussian(s).to(device=device, dtype=dtype)
        flip = torch.rand(n, generator=ctx.generator, device="cpu").to(device) > 0.5
        return torch.where(flip[:, None, None, None], eta.t()[None, None], eta[None, None])

    # -- the attack ------------------------------------------------------------------------

    @torch.no_grad()
    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, ctx: AttackContext
    ) -> torch.Tensor:
        if threat.norm not in self.norms:
            raise NotImplementedError(f"Square does not support {threat.norm}")
        x = x.detach()
        shape = x.shape
        grid, line = as_grid(x)
        if threat.norm == "linf":
            best = self._linf(model, grid, shape, y, line, threat.eps, ctx)
        else:
            best = self._l2(model, grid, shape, y, line, threat.eps, ctx)
        return best.reshape(shape)

    def _side(self, p: float, c: int, h: int, w: int, line: bool) -> int:
        """Window side for the fraction p (Linf rule: at least 1, at most side - 1)."""
        if line:
            return min(max(int(round(p * w)), 1), max(w - 1, 1))
        s = int(round(math.sqrt(p * h * w)))
        return min(max(s, 1), min(h, w) - 1)

    def _side_l2(self, p: float, c: int, h: int, w: int, line: bool) -> int:
        """Window side for the fraction p (L2 rule: at least 3, odd, at most the side)."""
        s = int(round(p * w)) if line else int(round(math.sqrt(p * h * w)))
        s = max(s, 3)
        if s % 2 == 0:
            s += 1
        return min(s, w if line else min(h, w))

    def _linf(self, model, x, shape, y, line, eps, ctx):
        n, c, h, w = x.shape
        lo, hi = ctx.lower, ctx.upper
        # Vertical stripes: one sign per (sample, channel, column).
        best = (x + eps * self._signs([n, c, 1, w], ctx, x.device, x.dtype)).clamp(lo, hi)
        best_loss, fooled = self._evaluate(model, best, shape, y)

        for it in range(self.n_queries):
            idx = torch.nonzero(~fooled).flatten()
            m = len(idx)
            if m == 0 or self._stop_after_probe(it, fooled):
                break
            s = self._side(self.p_at(it), c, h, w, line)
            sh = 1 if line else s
            vh = self._uniform_int(h - sh, m, ctx, x.device)
            vw = self._uniform_int(w - s, m, ctx, x.device)
            mask = self._window_mask(h, w, vh, vw, sh, s)
            x_cur, b_cur = x[idx], best[idx]
            signs = self._signs([m, c, 1, 1], ctx, x.device, x.dtype)
            cand = torch.where(mask, (x_cur + eps * signs).clamp(lo, hi), b_cur)
            # Resample the signs of proposals that would not change the point (the reference's
            # while loop, bounded here: in a degenerate box no sign may change anything).
            redo = torch.nonzero(self._unchanged(cand, b_cur)).flatten()
            for attempt in range(32):
                if len(redo) == 0:
                    break
                if c == 1:  # one channel: resampling until a change = taking the other sign
                    if attempt > 0:
                        break
                    new_signs = -signs[redo]
                else:
                    new_signs = self._signs([len(redo), c, 1, 1], ctx, x.device, x.dtype)
                cand[redo] = torch.where(mask[redo], (x_cur[redo] + eps * new_signs).clamp(lo, hi), b_cur[redo])
                redo = redo[self._unchanged(cand[redo], b_cur[redo])]
            loss, now_fooled = self._evaluate(model, cand, shape, y[idx])
            improved = (loss < best_loss[idx]) | now_fooled
            best[idx[improved]] = cand[improved]
            best_loss[idx] = torch.where(improved, loss, best_loss[idx])
            fooled[idx] = now_fooled
        return best

    def _l2_init(self, x, line, eps, ctx):
        n, c, h, w = x.shape
        delta = torch.zeros_like(x)
        s = max((w if line else h) // 5, 1)
        if line:
            vw = max((w - 5 * s) // 2, 0)
            for _ in range(w // s):
                bump = meta_pseudo_gaussian_line(s).to(device=x.device, dtype=x.dtype)
                width = delta[:, :, :, vw : vw + s].shape[-1]
                signs = self._signs([n, c, 1, 1], ctx, x.device, x.dtype)
                delta[:, :, :, vw : vw + s] += bump[None, None, :, :width] * signs
                vw += s
        else:
            start = max((h - 5 * s) // 2, 0)
            vh = start
            for _ in range(h // s):
                vw = start
                for _ in range(w // s):
                    bumps = self._bumps(s, False, n, ctx, x.device, x.dtype)
                    rows, cols = delta[:, :, vh : vh + s, vw : vw + s].shape[-2:]
                    delta[:, :, vh : vh + s, vw : vw + s] += bumps[:, :, :rows, :cols] * self._signs(
                        [n, c, 1, 1], ctx, x.device, x.dtype
                    )
                    vw += s
                vh += s
        norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return (x + delta / (norms + 1e-12) * eps).clamp(ctx.lower, ctx.upper)

    def _l2(self, model, x, shape, y, line, eps, ctx):
        n, c, h, w = x.shape
        best = self._l2_init(x, line, eps, ctx)
        best_loss, fooled = self._evaluate(model, best, shape, y)

        for it in range(self.n_queries):
            idx = torch.nonzero(~fooled).flatten()
            m = len(idx)
            if m == 0 or self._stop_after_probe(it, fooled):
                break
            x_cur, b_cur = x[idx], best[idx]
            delta = b_cur - x_cur
            s = self._side_l2(self.p_at(it), c, h, w, line)
            sh = 1 if line else s
            vh = self._uniform_int(h - sh, m, ctx, x.device)
            vw = self._uniform_int(w - s, m, ctx, x.device)
            vh2 = self._uniform_int(h - sh, m, ctx, x.device)
            vw2 = self._uniform_int(w - s, m, ctx, x.device)
            mask1 = self._window_mask(h, w, vh, vw, sh, s)
            mask2 = self._window_mask(h, w, vh2, vw2, sh, s)

            norms_window_1 = (delta * mask1).pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
            norms_image = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            norms_windows = (delta * (mask1 | mask2)).pow(2).sum(dim=(2, 3), keepdim=True).sqrt()

            # Window 1's content, gathered per sample as (m, c, sh, s).
            rows = vh[:, None] + torch.arange(sh, device=x.device)[None]
            cols = vw[:, None] + torch.arange(s, device=x.device)[None]
            batch = torch.arange(m, device=x.device)[:, None, None]
            channels_last = delta.permute(0, 2, 3, 1)
            old = channels_last[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

            new = self._bumps(s, line, m, ctx, x.device, x.dtype) * self._signs([m, c, 1, 1], ctx, x.device, x.dtype)
            new = new + old / (1e-12 + norms_window_1)
            budget = ((eps**2 - norms_image**2).clamp_min(0.0) / c + norms_windows**2).sqrt()
            new = new / (1e-12 + new.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()) * budget

            delta = delta * ~mask2
            channels_last = delta.permute(0, 2, 3, 1)
            channels_last[batch, rows[:, :, None], cols[:, None, :]] = new.permute(0, 2, 3, 1)
            norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            cand = (x_cur + delta / (norms + 1e-12) * eps).clamp(ctx.lower, ctx.upper)

            loss, now_fooled = self._evaluate(model, cand, shape, y[idx])
            improved = (loss < best_loss[idx]) | now_fooled
            best[idx[improved]] = cand[improved]
            best_loss[idx] = torch.where(improved, loss, best_loss[idx])
            fooled[idx] = now_fooled
        return best
