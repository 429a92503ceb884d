"""The decision function g = z_y - max_{j != y} z_j, its input gradient and Hessian-vector products.

g is used instead of the loss because cross-entropy saturates where the model is
confident (flat, uninformative regions), while g keeps measuring the distance in logit
units to the decision boundary g = 0.
"""

from __future__ import annotations

import torch
from torch import nn

from robaudit.errors import RobauditError
from robaudit.measures.streams import SampleStreams, normal


def decision(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample margin z_y - max_{j != y} z_j (positive where correctly classified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, y[:, None], True)
    other = logits.masked_fill(mask, float("-inf")).amax(dim=1)
    return true - other


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """g at many points, no gradients (surface grids, random probes)."""
    parts = [decision(model(x[i : i + batch_size]), y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else x.new_zeros(0)


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_x g for a batch (samples are independent, so the gradient of the sum is per sample)."""
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        g = decision(model(xg), y)
        if not g.requires_grad:
            raise RobauditError("the model does not pass gradients to its input, so its decision surface cannot be measured")
        (grad,) = torch.autograd.grad(g.sum(), xg)
    return grad.detach()


class NoSecondDerivative(RobauditError):
    """The model uses an op whose backward torch cannot differentiate (hardsigmoid, as of torch 2.14)."""


class LocalModel:
    """g and its gradient at a batch of points, keeping the graph for Hessian-vector products.

    ``hvp(v)`` differentiates <grad g, v> once more (double backprop): the sum over the
    batch gives every sample its own H_i v_i because no sample depends on another
    (eval-mode models only: batch norm in training mode would couple them).
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            g = decision(model(self.x), y)
            if not g.requires_grad:
                raise RobauditError(
                    "the model does not pass gradients to its input, so its decision surface cannot be measured"
                )
            (grad,) = torch.autograd.grad(g.sum(), self.x, create_graph=True)
        self.g = g.detach()
        self._grad = grad
        self.grad = grad.detach()

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v per sample, ``v`` shaped like x; exactly zero when grad g does not depend on x."""
        if not self._grad.requires_grad:
            return torch.zeros_like(self.x)
        try:
            with torch.enable_grad():
                (out,) = torch.autograd.grad(
                    self._grad, self.x, grad_outputs=v.to(self.x.dtype), retain_graph=True, allow_unused=True
                )
        except (RuntimeError, NotImplementedError) as exc:  # "derivative for aten::hardsigmoid_backward is not implemented"
            if "not implemented" not in str(exc):
                raise
            raise NoSecondDerivative(str(exc).strip().splitlines()[0][:300]) from None
        return torch.zeros_like(self.x) if out is None else out.detach()


def unit_rows(v: torch.Tensor) -> torch.Tensor:
    """Each sample's direction scaled to L2 norm 1 (zero rows stay zero)."""
    norms = v.flatten(1).norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    return v / norms.view(-1, *([1] * (v.dim() - 1)))


def attack_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Direction of steepest descent of g under ``norm`` (the first step of an attack), L2 norm at most 1.

    l2: -J/||J||_2; linf: -sign(J)/sqrt(d), so h = eps*sqrt(d) lands on the FGSM point (its
    L2 norm is below 1 where J has zero entries: the FGSM point does not move those pixels);
    l1: minus the largest-|J| coordinate.
    """
    if norm == "l2":
        return -unit_rows(grad)
    if norm == "linf":
        return -grad.sign() / grad[0].numel() ** 0.5
    if norm == "l1":
        flat = grad.flatten(1)
        top = torch.zeros_like(flat).scatter_(1, flat.abs().argmax(1, keepdim=True), 1.0)
        return -(top * flat.sign()).view_as(grad)
    raise ValueError(f"unknown norm {norm}")


def fd_curvature(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    grad: torch.Tensor,
    h: float,
    norm: str,
    n_random: int,
    generator: torch.Generator | SampleStreams,
    box: tuple[float, float] | None = None,
) -> torch.Tensor:
    """max over directions u of ||grad g(x') - grad g(x)||_2 / ||x' - x||_2 with x' = x + h u (CURE-style).

    Directions: the steepest descent of g under ``norm`` (where an attack moves first) and
    ``n_random`` random unit ones. It measures how much the gradient changes over a move of
    size h: for piecewise-linear nets (autograd Hessian zero almost everywhere) across the
    linear pieces crossed, for smooth nets the Hessian averaged along the way. ``box``
    clips x' to the input range, where the model is defined and attacks stay (outside it
    a log or a square root can be NaN); the quotient divides by the move actually made.
    A gradient that is not finite at x' makes the sample's curvature NaN (unknown).
    Cost: one forward and one backward per direction.
    """

    def random_direction() -> torch.Tensor:
        return unit_rows(normal(generator, tuple(x.shape), x.dtype).to(x.device))

    zero = (grad.flatten(1).norm(dim=1) == 0).view(-1, *([1] * (x.dim() - 1)))
    along = torch.where(zero, random_direction(), attack_direction(grad, norm))  # no gradient: random
    directions = [along] + [random_direction() for _ in range(n_random)]
    best = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    for u in directions:
        point = x + h * u if box is None else (x + h * u).clamp(*box)
        step = (point - x).flatten(1).double().norm(dim=1)
        moved = gradient(model, point, y)
        change = (moved - grad).flatten(1).double().norm(dim=1)
        best = torch.maximum(best, torch.where(step > 0, change / step.clamp_min(torch.finfo(torch.float64).tiny), 0.0))
    return best
