"""Fast gradient sign method (Goodfellow et al. 2015), and its L2 analogue.

One gradient of the cross-entropy at the clean point, one step of size eps along the
steepest-ascent direction for the norm (the sign for Linf, the unit-L2 gradient for
L2), clipped to the box. Cost: one forward and one backward per point. Deterministic.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from robaudit.attacks.base import Attack, AttackContext, input_gradient, normalized_step, project
from robaudit.attacks.losses import cross_entropy
from robaudit.threats import Threat


class FGSM(Attack):
    """A single signed (Linf) or normalized (L2) gradient step of size eps from the clean input."""

    name: ClassVar[str] = "fgsm"
    kind: ClassVar[str] = "fixed"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    randomized: ClassVar[bool] = False

    def params(self) -> dict[str, Any]:
        return {"loss": "ce", "step_size": 1.0, "random_start": False}

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, ctx: AttackContext
    ) -> torch.Tensor:
        point = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = cross_entropy(model(point), y)
        grad = input_gradient(loss.sum(), point)
        stepped = x.detach() + threat.eps * normalized_step(grad, threat.norm)
        return project(stepped, x, threat, ctx.lower, ctx.upper)
