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

With an `error` function (the float32 rounding bound of `rounding.py`), each step also
subtracts the most rounding can shrink each margin over the step's whole ball, so R is
certified only if ``margin_j - sum_k L_j(r_k) (r_k - r_{k-1}) - ... > E_c + E_j`` there;
a sample whose margin does not exceed its error at the point itself gets radius 0.
`ratio_radius` does the same for the one-shot bounds (exact linear, global Lipschitz).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from robaudit.certify.budget import Budget

LipschitzFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sample indices, radii) -> (n, P)
ErrorFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sample indices, radii) -> (n, P) margin error
# The largest radius printed, and the ball the error is bounded on when a margin cannot change at
# all (zero Lipschitz bound): a million pixel units says the decision holds wherever data lives,
# and far beyond it the float64 graph loses the digits the bounds reason about.
RADIUS_CAP = 1e6


def _reach(slack: torch.Tensor, lips: torch.Tensor) -> torch.Tensor:
    """min_j slack_j / L_j per row (+inf for L_j = 0 with slack >= 0, -inf with slack < 0)."""
    safe = torch.where(lips > 0, lips, torch.ones_like(lips))
    flat = torch.where(slack >= 0, torch.inf, -torch.inf).to(slack.dtype)
    return torch.where(lips > 0, slack / safe, flat).amin(dim=1)


def ratio_radius(margins: torch.Tensor, lips: torch.Tensor, error: ErrorFn | None = None) -> torch.Tensor:
    """min_j (margin_j - E_j) / L_j for constant bounds L (B, P), with E over a ball containing the result.

    E is bounded on the ball of the error-free radius R0 = min_j margin_j / L_j, and the
    result is at most R0, so every radius returned lies inside the ball its E holds on.
    """
    first = _reach(margins, lips)
    if error is None:
        return first
    ball = torch.where(torch.isfinite(first), first, torch.full_like(first, RADIUS_CAP)).clamp_min(0)
    slack = margins - error(torch.arange(len(margins)), ball)
    return torch.minimum(_reach(slack, lips), ball).clamp_min(0)


def search_radius(
    lipschitz: LipschitzFn, margins: torch.Tensor, budget: Budget, error: ErrorFn | None = None
) -> torch.Tensor:
    """Largest certified radius per sample (margins (B, P) > 0, already deflated).

    `error(idx, radii)`, when given, bounds how much float32 rounding can shrink each
    margin over the ball; it is subtracted from the slack at every step.
    """
    n = margins.shape[0]
    if n == 0:
        return margins.new_zeros(0)
    everyone = torch.arange(n)
    zero = margins.new_zeros(n)
    lips0 = lipschitz(everyone, zero)
    done = torch.zeros(n, dtype=torch.bool)
    at_x = margins
    if error is not None:
        at_x = margins - error(everyone, zero)
        done = at_x.amin(dim=1) <= 0  # rounding alone may flip the decision: radius 0
        at_x = torch.where(done[:, None], margins, at_x)
    first = _reach(at_x, lips0)  # first-order radius
    unbounded = torch.isinf(first)
    width = torch.where(unbounded, torch.ones_like(first), first / budget.shells)
    tol = torch.where(unbounded, torch.zeros_like(first), first * budget.tol)
    inner = margins.new_zeros(n)  # accepted shells end here
    spent = torch.zeros_like(margins)  # margin used up by the accepted shells
    best = margins.new_zeros(n)
    for _ in range(budget.max_evals - 1):
        live = everyone[~done]
        if len(live) == 0:
            break
        h = width[live]
        ball = inner[live] + h
        lips = lipschitz(live, ball)
        slack = margins[live] - spent[live]
        if error is not None:
            slack = slack - error(live, ball)
        reach = _reach(slack, lips)
        best[live] = torch.maximum(best[live], inner[live] + torch.minimum(reach, h))
        fits = reach >= h
        spent[live] = torch.where(fits[:, None], spent[live] + lips * h[:, None], spent[live])
        inner[live] = torch.where(fits, inner[live] + h, inner[live])
        grow = fits & unbounded[live]
        short = reach.clamp_min(0)  # rounding can make the slack negative on a large ball
        width[live] = torch.where(fits, torch.where(grow, 2 * h, h), (short + h) / 2)
        done[live] = ~fits & (h - short <= tol[live])
    return best
