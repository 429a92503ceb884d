"""The second-order bound on how far g can move inside a threat ball, and random probes that test it.

Taylor: g(x + d) ~ g(x) + J^T d + 1/2 d^T H d, so with |lambda| <= L for every Hessian
eigenvalue, |g(x + d) - g(x)| <~ max_{d in ball} |J^T d| + 1/2 L max_{d in ball} ||d||_2^2:

    linf: eps ||J||_1   + 1/2 L d eps^2    (||d||_2^2 <= d eps^2 in the Linf ball)
    l2:   eps ||J||_2   + 1/2 L eps^2
    l1:   eps ||J||_inf + 1/2 L eps^2      (||d||_2 <= ||d||_1)

It is a prediction, not a certificate: third and higher order terms are ignored, and L
comes from Lanczos (a lower estimate of max|lambda|) or, for piecewise-linear nets, from
a finite-difference curvature at a stated scale.
"""

from __future__ import annotations

import torch

from robaudit.measures.streams import SampleStreams, exponential, normal, signs
from robaudit.threats import Threat


def dual_norm(grad_flat: torch.Tensor, norm: str) -> torch.Tensor:
    """max of J^T d over the unit ball of ``norm``: the dual norm of J."""
    if norm == "linf":
        return grad_flat.abs().sum(dim=1)
    if norm == "l2":
        return grad_flat.norm(dim=1)
    if norm == "l1":
        return grad_flat.abs().amax(dim=1)
    raise ValueError(f"unknown norm {norm}")


def l2_radius(threat: Threat, dim: int) -> float:
    """The largest L2 norm of a perturbation in the threat ball (in d dimensions)."""
    return threat.eps * dim**0.5 if threat.norm == "linf" else threat.eps


def predicted_drop(grad_flat: torch.Tensor, curvature: torch.Tensor, threat: Threat) -> torch.Tensor:
    """First-order worst case plus the second-order term, per sample (float64)."""
    dim = grad_flat.shape[1]
    first = threat.eps * dual_norm(grad_flat.double(), threat.norm)
    return first + 0.5 * curvature.double() * l2_radius(threat, dim) ** 2


def ball_probes(x: torch.Tensor, threat: Threat, count: int, generator: torch.Generator | SampleStreams) -> torch.Tensor:
    """``count`` random perturbations on the surface of the ball per sample, shape (count, B, ...).

    Linf: random corners (every pixel moved by +-eps); L2: a uniform direction of norm
    eps; L1: a Laplace direction of L1 norm eps. Forward passes only.
    """
    shape = (count, *x.shape)
    if threat.norm == "linf":
        delta = signs(generator, shape, axis=1).to(x.dtype) * threat.eps
    else:
        raw = normal(generator, shape, x.dtype, axis=1)
        if threat.norm == "l1":
            raw = raw.sign() * exponential(generator, shape, x.dtype, axis=1)
        p = 2 if threat.norm == "l2" else 1
        sizes = raw.flatten(2).norm(p=p, dim=2).clamp_min(1e-12)
        delta = raw / sizes.view(count, -1, *([1] * (x.dim() - 1))) * threat.eps
    return delta.to(x.device)
