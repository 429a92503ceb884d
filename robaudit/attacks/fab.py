"""FAB-T under L1 (Croce & Hein, ICML 2020: the fast adaptive boundary attack, targeted), fixed radius.

AutoAttack's third attack. Under L1 it finds sparse examples (one or two pixels moved
to their bound) that FMN's dense steps and APGD's sparse ones miss (hunts 20 and 22).
For each target class t, from the clean point x0:

- linearize ``g = z_t - z_y`` at the iterate x_k (one forward, one backward);
- ``d_k``: the smallest L1 step from x_k, within the box, onto the linearized boundary
  ``g = 0`` (`deepfool.l1_step`: pixels in order of |gradient|, each up to its bound);
  ``d_0``: the same from x0 onto the same hyperplane;
- ``x_{k+1} = clip((1 - a) (x_k + eta d_k) + a (x0 + eta d_0))`` with
  ``a = min(|d_k| / (|d_k| + |d_0|), alpha_max)``: the pull towards x0 keeps the
  perturbation small;
- an iterate that is misclassified is kept if it is the smallest so far, then moved
  towards x0, ``x0 + beta (x_k - x0)``, to look for a smaller one. The linearization
  at the moved point reuses the gradient just computed, with g moved along it, so each
  iteration costs one forward and one backward pass (the original evaluates the moved
  point again).

A point stops as soon as an example within eps is found; targets are the classes
ranked 2, 3, ... by the clean logits, each run only on points no earlier target broke.
Deterministic: every run starts at x0 (AutoAttack's FAB-T, one restart per target).
Cost with nothing found: ``n * (1 + T * steps)`` forwards, ``n * T * steps`` backwards.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from robaudit.attacks.base import Attack, AttackContext, input_gradient
from robaudit.attacks.deepfool import l1_step
from robaudit.threats import Threat, distances


class FABTargeted(Attack):
    """FAB-T, L1: the boundary of each target class approached by box-aware linearized projections."""

    name: ClassVar[str] = "fab-t"
    kind: ClassVar[str] = "fixed"
    norms: ClassVar[tuple[str, ...]] = ("l1",)
    randomized: ClassVar[bool] = False

    def __init__(
        self, steps: int = 100, n_targets: int = 9, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9
    ) -> None:
        if steps < 1:
            raise ValueError("FAB-T needs at least one step")
        if n_targets < 1:
            raise ValueError("n_targets must be at least 1")
        if not 0 <= alpha_max < 1:
            raise ValueError("alpha_max must be in [0, 1)")
        if eta < 1:
            raise ValueError("eta must be at least 1")
        if not 0 < beta < 1:
            raise ValueError("beta must be in (0, 1)")
        self.steps, self.n_targets = steps, n_targets
        self.alpha_max, self.eta, self.beta = alpha_max, eta, beta

    def params(self) -> dict[str, Any]:
        return {"steps": self.steps, "n_targets": self.n_targets, "alpha_max": self.alpha_max, "eta": self.eta, "beta": self.beta}

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, ctx: AttackContext
    ) -> torch.Tensor:
        if threat.norm not in self.norms:
            raise NotImplementedError(f"FAB-T does not support {threat.norm}")
        x = x.detach()
        out = x.clone()
        if len(x) == 0:
            return out
        with torch.no_grad():
            logits = model(x)
        others = min(self.n_targets, logits.shape[1] - 1)
        targets = logits.scatter(1, y[:, None], float("-inf")).topk(others, dim=1).indices
        done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for k in range(others):
            rows = torch.nonzero(~done).flatten()
            if len(rows) == 0:
                break
            found, point = self._run(model, x[rows], y[rows], targets[rows, k], threat, ctx)
            out[rows[found]] = point[found]
            done[rows[found]] = True
        return out

    def _run(
        self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor, target: torch.Tensor, threat: Threat, ctx: AttackContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One target: (found within eps, the smallest such example) per point."""
        view = (-1,) + (1,) * (x0.dim() - 1)
        found = torch.zeros(len(x0), dtype=torch.bool, device=x0.device)
        best = x0.clone()
        current = x0.clone()
        active = torch.arange(len(x0), device=x0.device)
        for _ in range(self.steps):
            if len(active) == 0:
                break
            point = current[active].requires_grad_(True)
            with torch.enable_grad():
                logits = model(point)
                gap = logits.gather(1, target[active, None])[:, 0] - logits.gather(1, y[active, None])[:, 0]
                grad = input_gradient(gap.sum(), point)
            point, gap, grad = point.detach(), gap.detach(), grad.detach()
            start = x0[active]
            adversarial = logits.detach().argmax(dim=1) != y[active]
            inside = adversarial & (distances(point, start, "l1") <= threat.eps)
            best[active[inside]] = point[inside]
            found[active[inside]] = True
            # a misclassified iterate moves towards x0; g follows along its gradient
            moved = torch.where(adversarial.view(view), start + self.beta * (point - start), point)
            gap = gap + (grad * (moved - point)).flatten(1).sum(dim=1)
            point = moved
            toward = l1_step(grad, (-gap).clamp_min(0), point, ctx)
            reach = (gap + (grad * (start - point)).flatten(1).sum(dim=1)).neg().clamp_min(0)
            from_start = l1_step(grad, reach, start, ctx)
            size_k = toward.flatten(1).abs().sum(dim=1)
            size_0 = from_start.flatten(1).abs().sum(dim=1)
            alpha = (size_k / (size_k + size_0).clamp_min(1e-12)).clamp(max=self.alpha_max).view(view)
            step = (1 - alpha) * (point + self.eta * toward) + alpha * (start + self.eta * from_start)
            current[active] = step.clamp(ctx.lower, ctx.upper)
            active = active[~inside]
        if len(active) > 0:  # the last iterate is evaluated too
            with torch.no_grad():
                point = current[active]
                inside = (model(point).argmax(dim=1) != y[active]) & (distances(point, x0[active], "l1") <= threat.eps)
            best[active[inside]] = point[inside]
            found[active[inside]] = True
        return found, best
