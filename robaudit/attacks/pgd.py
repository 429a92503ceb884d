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

from robaudit.attacks.base import Attack, AttackContext, normalized_step, project, random_start
from robaudit.attacks.losses import get_loss
from robaudit.threats import Threat


class PGD(Attack):
    """PGD with random start, a fixed number of steps and a fixed step size.

    ``step_size`` is a multiple of eps; the default 2.5/steps is Madry et al.'s choice,
    which lets the iterate cross the ball 2.5 times.
    """

    name: ClassVar[str] = "pgd"
    kind: ClassVar[str] = "fixed"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")

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
        active = torch.arange(x.shape[0], device=x.device)

        for step in range(self.steps + 1):
            point = current[active].detach().requires_grad_(step < self.steps)
            with torch.set_grad_enabled(step < self.steps):
                logits = model(point)
                losses = self.loss(logits, y[active])
            broken = logits.argmax(dim=1) != y[active]
            improved = broken | (losses.detach() > best_loss[active])
            best[active[improved]] = point.detach()[improved]
            best_loss[active] = torch.maximum(best_loss[active], losses.detach())
            if step == self.steps:
                break
            grad = torch.autograd.grad(losses.sum(), point)[0]
            keep = ~broken
            if not keep.any():
                break
            stepped = point.detach()[keep] + alpha * normalized_step(grad[keep], threat.norm)
            active = active[keep]
            current[active] = project(stepped, x[active], threat, ctx.lower, ctx.upper)
        return best
