"""Inter-neuron coupling under an L2 ball: a tighter intercept for a layer of ReLUs.

CROWN relaxes every unstable ReLU on its own, so its intercepts add up as if all units of a
layer could sit at the worst point of their intervals at once. Under an L2 ball they cannot:
the layer's input z also satisfies ``||z - c|| <= R`` for a centre c (its value at the
sample) and a radius R that bounds how far the ball can move the whole layer (`CrownBound`
derives R from the ball's radius and sound spectral norms of the ops before the layer; a
bound as large as the layer's box says nothing new, and is not used).

For the coefficients ``lam`` reaching the ReLUs' outputs and ``g`` leaving towards their
inputs, ``lam . s(z) - g . z`` is bounded below on {z in [lo, hi], ||z - c|| <= R} by the
Lagrangian dual (SDP-CROWN, Chiu et al., ICML 2025; here with the box kept)

    max over mu >= 0 of  sum_i min_{z_i in [lo_i, hi_i]} (lam_i s(z_i) - g_i z_i + mu/2 (z_i - c_i)^2) - mu R^2 / 2,

which separates per unit. Every mu gives a sound bound (weak duality: on the set, the added
term is <= 0); mu = 0 is the exact per-unit minimum over the box, never below CROWN's
intercepts. Units whose relaxation is exact (stable ReLUs, where g = lam s') add exactly 0
for every mu, so only the unstable ones are gathered. The maximizing mu is found by a few
bisection steps on log mu and one interpolation step on the monotone derivative
``(||z*(mu) - c||^2 - R^2) / 2``; it need not be exact, since every mu gives a sound bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MU_STEPS = 4  # bisection steps on log mu, over a bracket of e^+-MU_BRACKET around the first guess
MU_BRACKET = 6.0  # (then one interpolation step)


@dataclass
class Ball:
    """The unstable units of one ReLU layer's input, gathered per sample, and the ball around them."""

    index: torch.Tensor  # (n, F) positions of the unstable units in the flattened layer (padded)
    valid: torch.Tensor  # (n, 1, F) False on padding
    lo: torch.Tensor  # (n, 1, F) box of the float32 values fed to the ReLUs
    hi: torch.Tensor
    centre: torch.Tensor  # (n, 1, F)
    radius: torch.Tensor  # (n, 1): ||z - centre|| <= radius over the whole layer, on the eps-ball

    @staticmethod
    def gather(free: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor) -> Ball:
        """From the layer's (n, *shape) unstable mask, box and centre, and the (n,) radius.

        Padding gets lo = hi = centre = 0: it adds 0 to the bound and to ||z - c|| for every mu.
        """
        n = free.shape[0]
        free = free.reshape(n, -1)
        width = int(free.sum(1).max()) if n else 0
        index = torch.argsort(free.to(torch.int8), dim=1, descending=True, stable=True)[:, :width]
        valid = free.gather(1, index)[:, None]

        def pick(t: torch.Tensor) -> torch.Tensor:
            return torch.where(valid, t.reshape(n, -1).gather(1, index)[:, None], 0.0)

        return Ball(index, valid, pick(lo), pick(hi), pick(centre), radius[:, None])

    def select(self, rows: torch.Tensor) -> Ball:
        return Ball(*(getattr(self, f)[rows] for f in ("index", "valid", "lo", "hi", "centre", "radius")))

    def offset(self, lam: torch.Tensor, g: torch.Tensor, neg_slope: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, S) lower bounds of lam . s(z) - g . z on the box and the ball, and the sum of |terms|.

        lam, g: (n, S, m) over the whole flattened layer. s is ReLU (LeakyReLU with slope
        `neg_slope` below 0). The search for mu runs without gradients; the bound at the mu
        found is differentiable in lam and g (Danskin), so alpha-CROWN optimizes through it.
        Where the box's own minimizers already lie in the ball, mu = 0 (CROWN's intercepts)
        would be as good: the caller keeps the larger of the two.
        """
        n, s = lam.shape[:2]
        index = self.index[:, None].expand(n, s, -1)
        lam, g = lam.gather(2, index), g.gather(2, index)
        r2 = self.radius**2
        with torch.no_grad():  # every mu gives a sound bound: the search runs in float32, on the slopes once
            lam_, g_ = lam.detach(), g.detach()
            s_n, s_p = lam_ * neg_slope - g_, lam_ - g_
            size = (torch.maximum(s_n.abs(), s_p.abs()) * self.valid).norm(dim=2)
            guess = (size / self.radius.clamp_min(1e-300)).clamp_min(1e-300).log()  # the optimum for c = 0, no box
            low, high = guess - MU_BRACKET, guess + MU_BRACKET
            h_low = h_high = torch.full_like(guess, torch.nan)  # ||z* - c||^2 - R^2 at the bracket's ends
            pieces = [t.float() for t in (s_n, s_p, self.centre, self.lo, self.hi)]
            for _ in range(MU_STEPS):
                mid = (low + high) / 2
                z = _minimizer(*pieces, mid.exp())
                h = ((z - pieces[2]) ** 2).sum(2) - r2
                outside = h > 0
                low, high = torch.where(outside, mid, low), torch.where(outside, high, mid)
                h_low, h_high = torch.where(outside, h, h_low), torch.where(outside, h_high, h)
            # the root of h by linear interpolation in log mu where both ends were tried, else the middle
            t = (h_low / (h_low - h_high)).nan_to_num(0.5).clamp(0.0, 1.0)
            mu = (low + t * (high - low)).exp()
            # where no trial's minimizers left the ball, mu = 0: the box's own per-unit minimum
            mu = torch.where(h_low.isnan(), 0.0, mu)
        z, val = self._inner(lam, g, neg_slope, mu)
        bound = val.sum(2) - 0.5 * mu * r2
        terms = (lam.abs() + g.abs()) * z.abs() + 0.5 * mu[..., None] * (z - self.centre) ** 2
        return bound, terms.sum(2) + 0.5 * mu * r2

    def _inner(self, lam, g, neg_slope: float, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per unit the minimizer and minimum of lam s(z) - g z + mu/2 (z - c)^2 on [lo, hi]; mu (n, S) >= 0.

        The two pieces [lo, 0] and [0, hi] (lo <= 0 <= hi for every gathered unit) are
        quadratics minimized in closed form; the smaller minimum wins.
        """
        mu = mu[..., None]
        inv = 1 / mu.clamp_min(1e-300)  # mu = 0: the ends of each piece (a zero slope keeps z = c)
        s_n, s_p = lam * neg_slope - g, lam - g
        z_n, z_p, v_n, v_p = _pieces(s_n, s_p, self.centre, self.lo, self.hi, mu, inv)
        return torch.where(v_n <= v_p, z_n, z_p), torch.minimum(v_n, v_p)


def _pieces(s_n, s_p, c, lo, hi, mu: torch.Tensor, inv: torch.Tensor):
    """Per unit the minimizers and minima of s z + mu/2 (z - c)^2 on [lo, 0] (slope s_n) and [0, hi] (s_p),
    given mu and its inverse (the caller picks how mu = 0 and the float range are handled)."""
    zero = torch.zeros_like(c)
    z_n = torch.minimum(torch.maximum(c - s_n * inv, lo), zero)
    z_p = torch.minimum(torch.maximum(c - s_p * inv, zero), hi)
    return z_n, z_p, s_n * z_n + 0.5 * mu * (z_n - c) ** 2, s_p * z_p + 0.5 * mu * (z_p - c) ** 2


_F32_BIG = 1e38  # mu and 1 / mu kept below this in float32 (finite; an overflow further on is an inf, never a NaN)


def _minimizer(s_n, s_p, c, lo, hi, mu: torch.Tensor) -> torch.Tensor:
    """Per unit the minimizer of `Ball._inner`'s piecewise quadratic, in float32 (it only steers the search for mu)."""
    mu64 = mu[..., None]
    m = mu64.clamp(max=_F32_BIG).float()
    inv = (1 / mu64.clamp_min(1 / _F32_BIG)).float()
    z_n, z_p, v_n, v_p = _pieces(s_n, s_p, c, lo, hi, m, inv)
    return torch.where(v_n <= v_p, z_n, z_p)
