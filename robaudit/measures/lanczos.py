"""Batched Lanczos on Hessian-vector products: extreme eigenvalues and a spectral density.

Every sample of a batch gets its own Krylov space, but all of them advance together so
one double-backward pass serves the whole batch. The Hessian is never formed: memory is
``steps x batch x d`` float64 numbers for the Lanczos vectors.

Two things come out of one run per sample:

* the Ritz values (eigenvalues of the tridiagonal matrix T). The extreme ones converge
  to the extreme eigenvalues of H from the inside (never overshoot) and usually within
  a few steps; after ``d`` steps T is similar to H and every eigenvalue is exact.
* stochastic Lanczos quadrature (SLQ) weights: for the start vector v (uniform on the
  sphere), ``v^T f(H) v = sum_i w_i f(theta_i)`` with ``w_i`` the squared first
  components of T's eigenvectors; its expectation is ``trace f(H) / d``. With ``f`` the
  indicator of ``|lambda| <= tau`` this estimates the fraction of near-zero eigenvalues
  from the same run, at no extra cost (one probe vector per sample, so noisy per sample).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from robaudit.measures.streams import SampleStreams, normal

MatVec = Callable[[torch.Tensor], torch.Tensor]  # (B, d) float64 -> (B, d) float64

# A new vector is "no longer new" below this fraction of the largest T entry seen: the
# Krylov space is exhausted (exact invariant subspace) and Lanczos restarts with a fresh
# random vector orthogonal to all previous ones (beta = 0, so T splits into blocks).
BREAKDOWN_RTOL = 100.0


@dataclass
class LanczosResult:
    """Per sample: Ritz values (ascending) and their SLQ weights, both (B, steps)."""

    ritz: torch.Tensor
    weights: torch.Tensor
    steps: int  # Lanczos steps actually run (= matrix-vector products per sample)

    def extremes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(most positive, most negative, largest magnitude) Ritz value per sample."""
        top, bottom = self.ritz[:, -1], self.ritz[:, 0]
        return top, bottom, torch.maximum(top.abs(), bottom.abs())

    def fraction_within(self, tau: float) -> torch.Tensor:
        """SLQ estimate of the fraction of eigenvalues with ``|lambda| <= tau``."""
        return (self.weights * (self.ritz.abs() <= tau)).sum(dim=1)


def _orthogonalize(w: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    """Classical Gram-Schmidt against all previous vectors, twice ("twice is enough")."""
    if not basis:
        return w
    q = torch.stack(basis)  # (k, B, d)
    for _ in range(2):
        w = w - torch.einsum("kb,kbd->bd", torch.einsum("kbd,bd->kb", q, w), q)
    return w


def _unit(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def lanczos(
    matvec: MatVec,
    v0: torch.Tensor,
    steps: int,
    *,
    generator: torch.Generator | SampleStreams,
    first_product: torch.Tensor | None = None,
    noise_eps: float = torch.finfo(torch.float32).eps,
) -> LanczosResult:
    """Run ``steps`` Lanczos iterations (full reorthogonalization) from the rows of ``v0``.

    ``steps`` is capped at ``d``. ``first_product`` is ``matvec(v0)`` when the caller already
    has it. ``noise_eps`` is the relative precision of ``matvec`` (float32 HVPs by default):
    a residual below ``BREAKDOWN_RTOL * noise_eps`` times the largest T entry is treated as
    an exhausted Krylov space.
    """
    b, d = v0.shape
    steps = max(1, min(int(steps), d))
    v = _unit(v0.to(torch.float64))
    basis: list[torch.Tensor] = []
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    scale = torch.zeros(b, dtype=torch.float64, device=v.device)
    for k in range(steps):
        basis.append(v)
        w = first_product.to(torch.float64) if (k == 0 and first_product is not None) else matvec(v)
        alpha = (w * v).sum(dim=1)
        alphas.append(alpha)
        scale = torch.maximum(scale, alpha.abs())
        if k == steps - 1:
            break
        w = _orthogonalize(w, basis)  # removes alpha*v and beta*v_prev too
        beta = w.norm(dim=1)
        scale = torch.maximum(scale, beta)
        exhausted = beta <= BREAKDOWN_RTOL * noise_eps * scale
        if exhausted.any():  # per-sample streams draw for the exhausted samples only (`streams.py`)
            if isinstance(generator, SampleStreams):
                fresh = torch.zeros(b, d, dtype=torch.float64)
                fresh[exhausted.cpu()] = normal(generator.rows(exhausted.cpu()), (int(exhausted.sum()), d), torch.float64)
                fresh = fresh.to(v.device)
            else:
                fresh = torch.randn(b, d, generator=generator, dtype=torch.float64).to(v.device)
            fresh = _unit(_orthogonalize(_unit(fresh), basis))
            w = torch.where(exhausted[:, None], fresh, w)
            beta = torch.where(exhausted, torch.zeros_like(beta), beta)
        betas.append(beta)
        v = _unit(_orthogonalize(_unit(w), basis))
    t = torch.diag_embed(torch.stack(alphas, dim=1))
    if betas:
        off = torch.diag_embed(torch.stack(betas, dim=1), offset=1)
        t = t + off + off.transpose(1, 2)
    ritz, vectors = torch.linalg.eigh(t)
    return LanczosResult(ritz=ritz, weights=vectors[:, 0, :] ** 2, steps=len(alphas))
