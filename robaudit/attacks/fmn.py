"""Fast Minimum-Norm attack (FMN; Pintor, Roli, Brendel and Biggio, NeurIPS 2021), Linf, L2 and L1.

A minimal-norm attack: it returns, per sample, the smallest adversarial input it found
(in the box, measured in the threat's norm), whatever the threat's radius; the radius
is not used. The algorithm follows the authors' reference implementation
(github.com/pralab/Fast-Minimum-Norm-FMN-Attack, also adv-lib's ``fmn``):

- each sample keeps its own radius ``eps_k``. Until a first adversarial point is found it
  is the linear estimate of the distance to the boundary,
  ``||delta|| + |loss| / ||grad||_dual``; after that it shrinks to
  ``min(eps (1 - gamma), best norm)`` when the current point is adversarial and grows to
  ``eps (1 + gamma)`` when it is not;
- loss = logit difference ``z_y - max_{j != y} z_j``; the step goes down its gradient,
  normalized to unit *L2* norm for every threat norm (as in the reference), with size
  ``alpha``; then the perturbation is projected onto the ``eps_k`` ball and the box;
- ``alpha`` and ``gamma`` are cosine-annealed: ``alpha`` from ``alpha_init`` to
  ``alpha_init / 100``, ``gamma`` from 0.05 to 0.001;
- ``alpha_init`` defaults to the paper's and reference configurations' values: 1 for L2
  and L1, 10 for Linf. Because the step is L2-normalized, its Linf size per coordinate
  is only about ``alpha / sqrt(d)``, hence the larger value for Linf (the Linf
  projection then clips the step to the radius anyway).

Departures from the reference, none of which changes the algorithm on ordinary runs:

- the reference assumes inputs in [0, 1]; here ``alpha`` is in units of the box width
  ``upper - lower`` (the same algorithm in rescaled coordinates), so a [0, 1] box gives
  the reference's steps exactly;
- before the first adversarial point, after the first step, the radius grows to at least
  ``eps (1 + gamma)``: the reference's pure linear estimate can stall for ever on an
  iterate that sits exactly on the boundary (seen on linear models: 6% of samples never
  broken);
- a point is kept as best only when misclassified by a logit margin above float noise
  (``MARGIN_RTOL``), so that it re-verifies in another batch layout;
- the last iterate is evaluated too (one forward).

Known limit (of FMN itself): the loss follows the runner-up class ``argmax_{j != y}``
along the path; when that class's boundary is not the closest one in the norm, FMN
converges to the farther boundary (on a random 5-class linear model: 4-12% of the
samples, up to 1.2x the minimal distance). DeepFool, which linearizes every candidate
class, complements it.

Cost: ``steps`` iterations of one forward and one backward per sample still attacked,
plus one final forward (the reference never evaluates its last iterate). A sample whose
clean input is already misclassified (distance 0) is dropped after the first forward.
Deterministic: no random start (``randomized = False``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from robaudit.attacks.base import DUAL, Attack, AttackContext, input_gradient, project_l1_box
from robaudit.threats import Threat

# Default initial step sizes per norm (Pintor et al. 2021; the authors' and adv-lib's
# benchmark configurations use 10 for Linf and 1 for L2 and L1).
DEFAULT_ALPHA_INIT = {"linf": 10.0, "l2": 1.0, "l1": 1.0}
_P = {"linf": math.inf, "l2": 2.0, "l1": 1.0}
# A point counts as adversarial for the best-so-far only with a logit margin above this
# fraction of its largest logit (float32 noise between batch layouts is ~1e-6 of it).
MARGIN_RTOL = 1e-5


def lp_norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample Lp norm of a batch (norm names as in threats: linf, l2, l1)."""
    return delta.flatten(1).norm(p=_P[norm], dim=1)


def project_ball(delta: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """Project each perturbation onto the Linf or L2 ball of its own radius ``eps`` (shape (N,)); L1 projects
    onto the ball within the box instead (`project_l1_box`)."""
    view = (-1,) + (1,) * (delta.dim() - 1)
    if norm == "linf":
        bound = eps.view(view)
        return torch.maximum(torch.minimum(delta, bound), -bound)
    if norm == "l2":
        norms = lp_norms(delta, "l2").clamp_min(1e-12)
        return delta * (eps / norms).clamp(max=1.0).view(view)
    raise NotImplementedError(f"FMN does not support {norm}")


def logit_difference(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{j != y} z_j`` per sample: negative exactly when the point is misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.amax(dim=1)


def decisively_misclassified(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Misclassified with a margin above float noise (``MARGIN_RTOL`` of the largest logit).

    A minimal-norm point sits on the decision boundary; one whose margin is at rounding
    level may flip when the runner re-checks it in another batch, so it is not kept.
    """
    scale = logits.detach().abs().amax(dim=1).clamp_min(1.0)
    return -logit_difference(logits.detach(), y) > MARGIN_RTOL * scale


def cosine_anneal(start: float, end: float, step: int, steps: int) -> float:
    """Cosine schedule from ``start`` (step 0) towards ``end`` (step ``steps``)."""
    return end + (start - end) * (1 + math.cos(math.pi * step / steps)) / 2


class FMN(Attack):
    """Fast Minimum-Norm attack (untargeted), a minimal-norm attack.

    ``alpha_init`` overrides the per-norm default step (10 Linf, 1 L2/L1, in box widths);
    ``alpha_final`` defaults to ``alpha_init / 100``. ``gamma_init``/``gamma_final`` bound
    the cosine-annealed factor by which each sample's radius shrinks or grows.
    """

    name: ClassVar[str] = "fmn"
    kind: ClassVar[str] = "minimal"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2", "l1")
    randomized: ClassVar[bool] = False

    def __init__(
        self,
        steps: int = 100,
        alpha_init: float | None = None,
        alpha_final: float | None = None,
        gamma_init: float = 0.05,
        gamma_final: float = 0.001,
    ) -> None:
        if steps < 1:
            raise ValueError("FMN needs at least one step")
        if alpha_init is not None and alpha_init <= 0:
            raise ValueError("FMN's alpha_init must be positive")
        if alpha_final is not None and alpha_final <= 0:
            raise ValueError("FMN's alpha_final must be positive")
        if not 0 <= gamma_final <= gamma_init < 1:
            raise ValueError("FMN needs 0 <= gamma_final <= gamma_init < 1")
        self.steps = steps
        self.alpha_init_override = alpha_init
        self.alpha_final_override = alpha_final
        self.gamma_init = gamma_init
        self.gamma_final = gamma_final

    def step_sizes(self, norm: str) -> tuple[float, float]:
        """(alpha_init, alpha_final) for a norm, in units of the box width."""
        start = self.alpha_init_override if self.alpha_init_override is not None else DEFAULT_ALPHA_INIT[norm]
        end = self.alpha_final_override if self.alpha_final_override is not None else start / 100
        return start, end

    def params(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "alpha_init": {norm: self.step_sizes(norm)[0] for norm in self.norms},
            "alpha_final": {norm: self.step_sizes(norm)[1] for norm in self.norms},
            "alpha_units": "box width (upper - lower)",
            "gamma_init": self.gamma_init,
            "gamma_final": self.gamma_final,
            "loss": "logit difference",
            "step": "L2-normalized gradient",
        }

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, ctx: AttackContext
    ) -> torch.Tensor:
        norm = threat.norm
        if norm not in self.norms:
            raise NotImplementedError(f"FMN does not support {norm}")
        if x.shape[0] == 0:
            return x.detach().clone()
        width = ctx.upper - ctx.lower
        scale = width if math.isfinite(width) and width > 0 else 1.0
        alpha_init, alpha_final = (value * scale for value in self.step_sizes(norm))
        n = x.shape[0]
        view = (-1,) + (1,) * (x.dim() - 1)
        x = x.detach()
        best = x.clone()

        # The working set: samples still attacked, compacted only when one drops out.
        index = torch.arange(n, device=x.device)
        xs, ys = x, y
        delta = torch.zeros_like(x)
        eps = torch.full((n,), math.inf, device=x.device, dtype=x.dtype)
        worst_norm = lp_norms(torch.maximum(x - ctx.lower, ctx.upper - x), norm)
        adv_found = torch.zeros(n, dtype=torch.bool, device=x.device)
        own_best = torch.full((n,), math.inf, device=x.device, dtype=x.dtype)

        for i in range(self.steps + 1):
            last = i == self.steps
            delta.requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                point = xs + delta
                logits = model(point)
                loss = logit_difference(logits, ys)
            is_adv = logits.argmax(dim=1) != ys
            d_norm = lp_norms(delta.detach(), norm)
            improved = decisively_misclassified(logits, ys) & (d_norm < own_best)
            if improved.any():
                own_best = torch.where(improved, d_norm, own_best)
                best[index[improved]] = point.detach()[improved]
            adv_found |= is_adv
            if last:
                break
            grad = input_gradient(loss.sum(), delta)
            delta, loss = delta.detach(), loss.detach()

            # A sample misclassified at its clean input cannot improve on distance 0: drop it.
            keep = own_best > 0
            if not keep.all():
                if not keep.any():
                    break
                index, xs, ys, delta, eps = index[keep], xs[keep], ys[keep], delta[keep], eps[keep]
                worst_norm, adv_found, own_best = worst_norm[keep], adv_found[keep], own_best[keep]
                grad, loss, d_norm, is_adv = grad[keep], loss[keep], d_norm[keep], is_adv[keep]

            gamma = cosine_anneal(self.gamma_init, self.gamma_final, i, self.steps)
            alpha = cosine_anneal(alpha_init, alpha_final, i, self.steps)

            # Radius: shrink when adversarial, grow when not. Before a first success the
            # reference jumps to the linear estimate of the boundary distance; taking at
            # least eps (1 + gamma) after the first step keeps an iterate that sits exactly
            # on the boundary (estimate ~ its own norm) from stalling there for ever.
            estimate = d_norm + loss.abs() / grad.flatten(1).norm(p=DUAL[norm], dim=1).clamp_min(1e-12)
            if i > 0:
                estimate = torch.maximum(estimate, eps * (1 + gamma))
            eps = torch.where(
                is_adv,
                torch.minimum(eps * (1 - gamma), own_best),
                torch.where(adv_found, eps * (1 + gamma), estimate),
            )
            eps = torch.minimum(eps, worst_norm)

            # Normalized descent step on the logit difference, then the radius ball and the box.
            # Under L1 the exact projection onto the ball within the box: clipping after the ball
            # would spend the radius on pixels the box cuts (`project_l1_box`).
            direction = grad / grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12).view(view)
            if norm == "l1":
                stepped = project_l1_box(delta - alpha * direction, eps, xs, ctx.lower, ctx.upper)
            else:
                stepped = project_ball(delta - alpha * direction, eps, norm)
            delta = (xs + stepped).clamp(ctx.lower, ctx.upper) - xs
        return best
