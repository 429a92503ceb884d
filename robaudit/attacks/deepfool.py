"""DeepFool (Moosavi-Dezfooli, Fawzi and Frossard, CVPR 2016), multi-class, Linf and L2.

A minimal-norm attack: it returns, per sample, the smallest adversarial input it found
(in the box, measured in the threat's norm), whatever the threat's radius; the radius
is not used.

Each iteration linearizes the classifier at the current point: for the candidate
classes ``k`` (the ``n_candidates - 1`` classes ranked highest after the label on the
clean logits, as in the original), ``f_k = z_k - z_y`` and ``w_k = grad f_k``; the
linearized distance to the boundary with ``k`` is ``|f_k| / ||w_k||_dual`` (dual of L2 is
L2, dual of Linf is L1). The step goes to the closest linearized boundary
(``r = d w / ||w||_2`` for L2, ``r = d sign(w)`` for Linf, with ``d`` the distance plus
the original's 1e-4), the steps add up in ``r_tot`` and the iterate is
``x + (1 + overshoot) r_tot``, clipped to the box. A sample stops at its first
adversarial iterate (misclassified by a logit margin above float noise, see
``robaudit.attacks.fmn.decisively_misclassified``, so that the point re-verifies).

Two additions to the original, which has no box and no refinement:

- box: gradient coordinates that would push a coordinate already at a box bound
  further out are zeroed before the linearization (those coordinates cannot move), and
  ``r_tot`` restarts from the clipped iterate, so the linear model describes the point
  actually reached;
- refinement: the overshoot leaves the found point about 2% beyond the boundary; a
  bisection of ``search_steps`` forward passes on the segment from ``x`` to that point
  keeps the closest adversarial point on it (``search_steps=0`` turns it off).

Cost per iteration, per sample not yet adversarial: one forward and
``n_candidates - 1`` backward passes (one per candidate class, through the same forward
graph; classes beyond the model's count are dropped). Samples that turn adversarial
leave the batch; when they are many enough that backward passes through them would cost
more than a forward of the rest, the rest is forwarded again without them (at most one
extra forward per sample and iteration, taken only when it saves backward passes). On a
linear model DeepFool needs a single iteration. Then ``search_steps`` forwards per
sample found adversarial.
Deterministic (``randomized = False``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from robaudit.attacks.base import DUAL, Attack, AttackContext, input_gradient
from robaudit.attacks.fmn import decisively_misclassified
from robaudit.threats import Threat


def l1_step(w: torch.Tensor, need: torch.Tensor, current: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
    """The smallest L1 step r within the box with w . r = need (per row): the linearized boundary.

    Without a box it moves the one coordinate with the largest |w|; the box caps how far
    each coordinate can go its way, so the coordinates are filled in order of |w| until
    the margin is covered (a fractional knapsack), each by at most its room.
    """
    flat, point = w.flatten(1), current.flatten(1)
    size, order = flat.abs().sort(dim=1, descending=True)
    room = torch.where(flat > 0, ctx.upper - point, point - ctx.lower).clamp_min(0).gather(1, order)
    gain = torch.where(size > 0, size * room, torch.zeros_like(size))
    # the margin the larger coordinates cover on their own (an exclusive sum: inf - inf would be NaN without a box)
    before = torch.cat([torch.zeros_like(gain[:, :1]), gain.cumsum(dim=1)[:, :-1]], dim=1)
    amount = ((need[:, None] - before) / size.clamp_min(1e-30)).clamp_min(0)
    amount = torch.minimum(amount, room).masked_fill(size == 0, 0.0)
    step = torch.zeros_like(flat).scatter(1, order, amount)
    return (step * flat.sign()).view_as(w)


class DeepFool(Attack):
    """Multi-class DeepFool, a minimal-norm attack (untargeted)."""

    name: ClassVar[str] = "deepfool"
    kind: ClassVar[str] = "minimal"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2", "l1")
    randomized: ClassVar[bool] = False

    def __init__(
        self, steps: int = 50, overshoot: float = 0.02, n_candidates: int = 10, search_steps: int = 10
    ) -> None:
        if steps < 1:
            raise ValueError("DeepFool needs at least one step")
        if overshoot < 0:
            raise ValueError("DeepFool's overshoot must be >= 0")
        if n_candidates < 2:
            raise ValueError("DeepFool needs at least 2 candidate classes (the label and one other)")
        if search_steps < 0:
            raise ValueError("DeepFool's search_steps must be >= 0")
        self.steps = steps
        self.overshoot = overshoot
        self.n_candidates = n_candidates
        self.search_steps = search_steps

    def params(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "overshoot": self.overshoot,
            "n_candidates": self.n_candidates,
            "search_steps": self.search_steps,
        }

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, ctx: AttackContext
    ) -> torch.Tensor:
        norm = threat.norm
        if norm not in self.norms:
            raise NotImplementedError(f"DeepFool does not support {norm}")
        if x.shape[0] == 0:
            return x.detach().clone()
        x = x.detach()
        n = x.shape[0]
        view = (-1,) + (1,) * (x.dim() - 1)
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        found_point = x.clone()

        # The working set: samples not yet adversarial, compacted when one succeeds.
        index = torch.arange(n, device=x.device)
        xs, ys = x, y
        current = x.clone()
        candidates: torch.Tensor | None = None

        for step in range(self.steps + 1):
            last = step == self.steps
            current.requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                logits = model(current)
            if candidates is None:  # the clean logits rank the candidate classes, once
                others = min(self.n_candidates, logits.shape[1]) - 1
                ranked = logits.detach().scatter(1, ys[:, None], float("-inf"))
                candidates = ranked.topk(others, dim=1).indices
            is_adv = decisively_misclassified(logits, ys)
            if is_adv.any():
                found_point[index[is_adv]] = current.detach()[is_adv]
                found[index[is_adv]] = True
            keep = ~is_adv
            if last or not keep.any():
                break

            rows: torch.Tensor | None = None  # rows of this forward still attacked (None: all)
            if not keep.all():
                rows = keep
                index, xs, ys, candidates = index[keep], xs[keep], ys[keep], candidates[keep]
                # The backward passes would run through the rows that just became adversarial too:
                # when that wastes more than one forward of the rest, run that forward instead.
                if candidates.shape[1] * int((~keep).sum()) > int(keep.sum()):
                    current = current.detach()[keep].requires_grad_(True)
                    logits = model(current)
                    rows = None
            picked = logits if rows is None else logits[rows]
            f = picked.gather(1, candidates) - picked.gather(1, ys[:, None])  # (m, K-1), < 0 while robust
            grads = [
                input_gradient(f[:, k].sum(), current, retain_graph=k + 1 < f.shape[1])
                for k in range(f.shape[1])
            ]
            w, current, f = torch.stack(grads, dim=1), current.detach(), f.detach()
            if rows is not None:
                w, current = w[rows], current[rows]

            # Coordinates at a box bound cannot move further out: drop them from the linearization.
            blocked = ((current <= ctx.lower)[:, None] & (w < 0)) | ((current >= ctx.upper)[:, None] & (w > 0))
            w = w.masked_fill(blocked, 0.0)
            flat = w.flatten(2)
            dual_norms = flat.norm(p=DUAL[norm], dim=2).clamp_min(1e-12)
            distance = f.abs() / dual_norms
            closest = distance.argmin(dim=1)
            arange = torch.arange(len(closest), device=x.device)
            w_l, d_l = w[arange, closest], distance[arange, closest] + 1e-4
            if norm == "l2":
                r = (d_l / dual_norms[arange, closest]).view(view) * w_l
            elif norm == "l1":
                r = l1_step(w_l, f[arange, closest].abs() + 1e-4 * dual_norms[arange, closest], current, ctx)
            else:
                r = d_l.view(view) * w_l.sign()
            r_total = (current - xs) / (1 + self.overshoot) + r
            current = (xs + (1 + self.overshoot) * r_total).clamp(ctx.lower, ctx.upper)

        return self._refine(model, x, y, found_point, found, ctx)

    @torch.no_grad()
    def _refine(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        found_point: torch.Tensor,
        found: torch.Tensor,
        ctx: AttackContext,
    ) -> torch.Tensor:
        """Bisect the segment from ``x`` to each found point for the closest adversarial point on it."""
        result = x.clone()
        rows = torch.nonzero(found).flatten()
        if len(rows) == 0:
            return result
        xa, pa, ya = x[rows], found_point[rows], y[rows]
        best = pa.clone()
        view = (-1,) + (1,) * (x.dim() - 1)
        low = torch.zeros(len(rows), device=x.device, dtype=x.dtype)
        high = torch.ones(len(rows), device=x.device, dtype=x.dtype)
        for _ in range(self.search_steps):
            mid = (low + high) / 2
            point = (xa + mid.view(view) * (pa - xa)).clamp(ctx.lower, ctx.upper)
            adv = decisively_misclassified(model(point), ya)
            best[adv] = point[adv]
            high = torch.where(adv, mid, high)
            low = torch.where(adv, low, mid)
        result[rows] = best
        return result
