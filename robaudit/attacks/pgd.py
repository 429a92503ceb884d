"""Projected gradient descent (Madry et al. 2018) for Linf and L2.

One forward and one backward per iteration and per still-unbroken point: a point
is dropped from the batch as soon as a forward pass shows it misclassified, and the
point returned for an unbroken sample is the iterate with the highest loss seen
(per-sample worst case), not simply the last one.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from robaudit.attacks.base import Attack, AttackContext, input_gradient, normalized_step, project, random_start
from robaudit.attacks.losses import get_loss
from robaudit.threats import Threat


class PGD(Attack):
    """PGD with random start, a fixed number of steps and a fixed step size.

    ``step_size`` is a multiple of eps; the default 2.5/steps is Madry et al.'s choice,
    which lets the iterate cross the ball 2.5 times.
    """

    name: ClassVar[str] = "pgd"
    kind: ClassVar[str] = "fixed"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2", "l1")

    def __init__(
        self, steps: int = 50, step_size: float | None = None, loss: str = "ce", random_init: bool = True
    ) -> None:
        if steps < 1:
            raise ValueError("PGD needs at least one step")
        self.steps = steps
        self.step_size = step_size if step_size is not None else 2.5 / steps
        self.loss_name = loss
        self.loss = get_loss(loss)
        self.random_init = random_init

    def params(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "step_size": self.step_size,
            "loss": self.loss_name,
            "random_start": self.random_init,
        }

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, ctx: AttackContext
    ) -> torch.Tensor:
        alpha = self.step_size * threat.eps
        current = random_start(x, threat, ctx) if self.random_init else x.clone()
        best = current.clone()
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        crossed = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        active = torch.arange(x.shape[0], device=x.device)
        full = True  # every point still active, in order: the loop then needs no gathers or scatters
        view = (-1, *([1] * (x.dim() - 1)))
        if threat.norm == "linf":  # the ball and the box in one pair of bounds: projection is one clamp
            floor = (x - threat.eps).clamp_(min=ctx.lower)
            ceil = (x + threat.eps).clamp_(max=ctx.upper)

        for step in range(self.steps + 1):
            last = step == self.steps
            point = (current if full else current[active]).detach().requires_grad_(not last)
            labels = y if full else y[active]
            with torch.set_grad_enabled(not last):
                logits = model(point)
                losses = self.loss(logits, labels)
            broken = logits.argmax(dim=1) != labels
            if full:
                crossed |= broken
            else:
                crossed[active[broken]] = True
            seen = best_loss if full else best_loss[active]
            improved = broken | (losses.detach() > seen)
            if full:
                best = torch.where(improved.view(view), point.detach(), best)
                best_loss = torch.maximum(best_loss, losses.detach())
            else:
                best[active[improved]] = point.detach()[improved]
                best_loss[active] = torch.maximum(seen, losses.detach())
            if last:
                break
            grad = input_gradient(losses.sum(), point)
            keep = ~broken
            if not keep.any():
                break
            base = point.detach()
            if full and not bool(keep.all()):
                full = False
            if not full:
                grad, base = grad[keep], base[keep]
                active = active[keep]
            if threat.norm == "linf":
                stepped = base.add(grad.sign_(), alpha=alpha)
                stepped = stepped.clamp_(min=floor if full else floor[active], max=ceil if full else ceil[active])
            else:
                stepped = project(base + alpha * normalized_step(grad, threat.norm), x[active], threat, ctx.lower, ctx.upper)
            if full:
                current = stepped
            else:
                current[active] = stepped
        self.crossed = crossed  # the runner counts points seen broken whose candidate does not verify
        return best
