"""From local Lipschitz bounds to a certified radius: binary search over balls, with shells.

With L_j(r) an upper bound of the gradient-difference norm of pair j over B_2(x, r), the
margin along any segment from x of length R drops by at most the integral of L over the
distance, so with shell radii 0 = r_0 < r_1 < ... < r_m <= R:

    R is certified  if  margin_j - sum_k L_j(r_k) (r_k - r_{k-1}) - L_j(R') (R - r_m) >= 0
    for every j != c, where R' >= R is the ball the last term's bound holds on.

A single shell is the classic certificate ``margin_j >= alpha L_j(alpha)``. `search_radius`
walks outwards shell by shell (width = first-order radius / `Budget.shells`); when a
shell does not fit, the certified part of it is kept and the shell is bisected between
that part and its full width. Each step costs one bound evaluation for the samples still
searching; every candidate radius is certified by the step that produced it, so the
result is sound whenever the search stops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from robaudit.certify.budget import Budget

LipschitzFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sample indices, radii) -> (n, P)


def _reach(slack: torch.Tensor, lips: torch.Tensor) -> torch.Tensor:
    """min_j slack_j / L_j per row (inf where every L_j is 0)."""
    safe = torch.where(lips > 0, lips, torch.ones_like(lips))
    return torch.where(lips > 0, slack / safe, torch.full_like(slack, torch.inf)).amin(dim=1)


def search_radius(lipschitz: LipschitzFn, margins: torch.Tensor, budget: Budget) -> torch.Tensor:
    """Largest certified radius per sample (margins (B, P) > 0, already deflated)."""
    n = margins.shape[0]
    if n == 0:
        return margins.new_zeros(0)
    everyone = torch.arange(n)
    first = _reach(margins, lipschitz(everyone, margins.new_zeros(n)))  # first-order radius
    unbounded = torch.isinf(first)
    width = torch.where(unbounded, torch.ones_like(first), first / budget.shells)
    tol = torch.where(unbounded, torch.zeros_like(first), first * budget.tol)
    inner = margins.new_zeros(n)  # accepted shells end here
    spent = torch.zeros_like(margins)  # margin used up by the accepted shells
    best = margins.new_zeros(n)
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(budget.max_evals - 1):
        live = everyone[~done]
        if len(live) == 0:
            break
        h = width[live]
        lips = lipschitz(live, inner[live] + h)
        reach = _reach(margins[live] - spent[live], lips)
        best[live] = torch.maximum(best[live], inner[live] + torch.minimum(reach, h))
        fits = reach >= h
        spent[live] = torch.where(fits[:, None], spent[live] + lips * h[:, None], spent[live])
        inner[live] = torch.where(fits, inner[live] + h, inner[live])
        grow = fits & unbounded[live]
        width[live] = torch.where(fits, torch.where(grow, 2 * h, h), (reach + h) / 2)
        done[live] = ~fits & (h - reach <= tol[live])
    return best
