"""Random noise inside the threat ball: the baseline every model should survive.

A model that random noise already breaks has no adversarial robustness to speak of;
noise also costs forward passes only, so it is a cheap first screen.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from robaudit.attacks.base import Attack, AttackContext, random_start
from robaudit.threats import Threat


class Noise(Attack):
    """``samples`` random draws per point: uniform in the ball, or on its surface (``sphere``)."""

    name: ClassVar[str] = "noise"
    kind: ClassVar[str] = "fixed"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    randomized: ClassVar[bool] = True

    def __init__(self, samples: int = 20, distribution: str = "uniform") -> None:
        if samples < 1:
            raise ValueError("noise needs at least one sample")
        if distribution not in ("uniform", "sphere"):
            raise ValueError(f"unknown distribution '{distribution}' (use uniform or sphere)")
        self.samples = samples
        self.distribution = distribution

    def params(self) -> dict[str, Any]:
        return {"samples": self.samples, "distribution": self.distribution}

    def _draw(self, x: torch.Tensor, threat: Threat, ctx: AttackContext) -> torch.Tensor:
        if self.distribution == "uniform":
            return random_start(x, threat, ctx)
        shape = x.shape
        if threat.norm == "linf":
            delta = threat.eps * torch.randint(0, 2, shape, generator=ctx.generator).float().mul(2).sub(1)
        else:
            delta = torch.randn(shape, generator=ctx.generator)
            delta = delta / delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            delta = delta * threat.eps
        return (x + delta.to(x.device, x.dtype)).clamp(ctx.lower, ctx.upper)

    @torch.no_grad()
    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, ctx: AttackContext
    ) -> torch.Tensor:
        best = x.clone()
        active = torch.arange(len(x), device=x.device)
        for _ in range(self.samples):
            if len(active) == 0:
                break
            draw = self._draw(x[active], threat, ctx)
            wrong = model(draw).argmax(dim=1) != y[active]
            best[active[wrong]] = draw[wrong]
            active = active[~wrong]
        return best
