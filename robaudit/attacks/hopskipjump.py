"""HopSkipJump (Chen, Jordan and Wainwright, IEEE S&P 2020), L2 and Linf, untargeted.

A decision-based attack: it reads only the model's predicted label (``argmax``), under
``torch.no_grad()``, never a score and never a gradient. Masked, rounded or one-hot
outputs therefore cannot hide the decision boundary from it, which is why the trust
checks run it. The algorithm follows the authors' reference (``hsja.py``):

- from an adversarial start, bisect toward ``x`` along the blend ``(1 - a) x + a x_adv``
  to a precision of 1e-3 in ``a`` (the reference's ``initialize``);
- bisect to the boundary with the threat's path: the blend for L2 (threshold
  ``theta = gamma / d^1.5`` in ``a``), and for Linf the clip of ``x_adv`` to the cube of
  radius ``r`` around ``x`` (threshold ``min(dist * theta, theta)`` in ``r``,
  ``theta = gamma / d^2``); ``d`` is the input dimension;
- iteration ``t``: estimate the boundary's normal at the current boundary point from
  ``B_t = min(init_num_evals * sqrt(t), max_num_evals)`` label queries at points
  ``+ delta u`` (``u`` unit-L2, Gaussian for L2, uniform in the cube for Linf, clipped to
  the box), with the mean label as a baseline; ``delta = 0.1 * (upper - lower)`` at
  ``t = 1``, then ``sqrt(d) theta dist`` (L2) or ``d theta dist`` (Linf), ``dist`` being
  the distance of the last pre-bisection point, as in the reference;
- geometric step search: a step of ``dist / sqrt(t)`` along the normal (its sign for
  Linf), halved until the stepped point is adversarial; then bisect back to the boundary.

Cost in forward passes per point: one (the batch is classified once; a point already
misclassified costs nothing more), about 10 per start candidate, up to ``init_tries``
for a noise start, then per iteration ``B_t``, the step search and about
``log2(1/theta)`` for the bisection; never more than ``max_queries`` in all. The
iterations go on until that budget is spent (or the point is broken), and the last
one's ``B_t`` shrinks to leave room for its step search and bisection.

Deliberate differences from the reference, none of which weakens the attack:

- starting points: the reference draws uniform noise until one is adversarial. Here,
  for each other class the model predicts in the batch, its member nearest to ``x`` (in
  the threat's norm) is adversarial for free (the batch was classified anyway); the
  ``start_candidates`` nearest such members are each bisected toward ``x`` and the
  closest result is kept, since HopSkipJump converges to a boundary point near its
  start. Only without any does noise in the box start it (``init_tries`` tries); a
  point without a start is returned unchanged;
- fixed-radius rules: a point stops being queried as soon as its boundary point is
  within eps; a bisection stops as soon as its adversarial end is within eps, and goes
  on past its threshold while its interval straddles eps (to 1e-4 relative);
- the Linf threshold and the first ``delta`` scale with the box width
  (``upper - lower``; the reference assumes [0, 1]);
- the step search halves at most 30 times (the reference loops without a bound);
- the point returned is the closest boundary point seen, not the last one;
- flat inputs (N, D) work as they are: the algorithm never uses the image layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from robaudit.attacks.base import Attack, AttackContext
from robaudit.threats import Threat, perturbation_norms

INIT_TOLERANCE = 1e-3  # the reference's blend precision when bisecting from the start
MAX_HALVINGS = 30  # bound on the geometric step search
EARLY_EXIT_MARGIN = 1e-4  # a bisection stops early only when its end lies this far (relative) inside eps


class LabelOracle:
    """The model seen through its predicted label only; counts one query per row per point."""

    def __init__(self, model: nn.Module, shape: torch.Size, y: torch.Tensor, budget: int, chunk: int) -> None:
        self.model, self.shape, self.y, self.budget, self.chunk = model, shape[1:], y, budget, chunk
        self.queries = torch.zeros(len(y), dtype=torch.long, device=y.device)

    def left(self, rows: torch.Tensor) -> torch.Tensor:
        """Queries each of ``rows`` may still spend."""
        return self.budget - self.queries[rows]

    def labels(self, rows: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Predicted labels of ``points`` (flat), each a query of the point ``rows`` names."""
        out = [self.model(part.reshape(len(part), *self.shape)).argmax(dim=1) for part in points.split(self.chunk)]
        self.queries.index_add_(0, rows, torch.ones_like(rows))
        return torch.cat(out)

    def adversarial(self, rows: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return self.labels(rows, points) != self.y[rows]


def bisecting(low: torch.Tensor, high: torch.Tensor, threshold: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows whose bisection (in distance units) goes on.

    A row stops once its adversarial end lies inside eps (with a relative margin, so
    float error cannot push it out). Otherwise it goes on while coarser than its
    threshold, and also while its interval straddles eps: a fixed-radius audit must
    know on which side of eps the boundary lies (to the margin), however coarse the
    algorithm's own threshold.
    """
    inner = eps * (1 - EARLY_EXIT_MARGIN)
    straddles = (low < inner) & (high - low > eps * EARLY_EXIT_MARGIN)
    return (high > inner) & ((high - low > threshold) | straddles)


@dataclass
class _Batch:
    """One batch under attack: clean points (flat), the label oracle and the threat's geometry."""

    x: torch.Tensor
    oracle: LabelOracle
    norm: str
    eps: float
    ctx: AttackContext

    @property
    def span(self) -> float:
        return self.ctx.upper - self.ctx.lower

    def dist(self, points: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Float64 distances of ``points`` from their clean points, in the threat's norm."""
        return perturbation_norms(points - self.x[rows], self.norm)

    def clip(self, points: torch.Tensor) -> torch.Tensor:
        return points.clamp(self.ctx.lower, self.ctx.upper)


class HopSkipJump(Attack):
    """HopSkipJump, untargeted, geometric step search, under a per-point query budget."""

    name: ClassVar[str] = "hsj"
    kind: ClassVar[str] = "fixed"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    randomized: ClassVar[bool] = True

    def __init__(
        self,
        max_queries: int = 5000,
        gamma: float = 1.0,
        init_num_evals: int = 100,
        max_num_evals: int = 10000,
        init_tries: int = 20,
        start_candidates: int = 10,
        query_batch: int = 1024,
    ) -> None:
        if max_queries < 1:
            raise ValueError("HopSkipJump needs at least one query")
        if not gamma > 0:
            raise ValueError("gamma must be positive")
        if init_num_evals < 1 or max_num_evals < init_num_evals:
            raise ValueError("need 1 <= init_num_evals <= max_num_evals")
        if init_tries < 0 or start_candidates < 0 or query_batch < 1:
            raise ValueError("init_tries and start_candidates must be >= 0, query_batch >= 1")
        self.max_queries = max_queries
        self.gamma = gamma
        self.init_num_evals = init_num_evals
        self.max_num_evals = max_num_evals
        self.init_tries = init_tries
        self.start_candidates = start_candidates
        self.query_batch = query_batch

    def params(self) -> dict[str, Any]:
        return {
            "max_queries": self.max_queries,
            "gamma": self.gamma,
            "init_num_evals": self.init_num_evals,
            "max_num_evals": self.max_num_evals,
            "init_tries": self.init_tries,
            "start_candidates": self.start_candidates,
            "query_batch": self.query_batch,
            "stepsize_search": "geometric",
            "start": "best of the nearest batch members of other classes, else uniform noise",
        }

    def theta(self, d: int, norm: str) -> float:
        """The reference's bisection threshold (relative blend for L2, [0, 1]-box radius for Linf)."""
        return self.gamma / (d**1.5 if norm == "l2" else d**2)

    # -- the attack ------------------------------------------------------------------------

    @torch.no_grad()
    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, ctx: AttackContext
    ) -> torch.Tensor:
        if threat.norm not in self.norms:
            raise NotImplementedError(f"HopSkipJump does not support {threat.norm}")
        flat = x.detach().flatten(1)
        oracle = LabelOracle(model, x.shape, y, self.max_queries, self.query_batch)
        best, best_dist = self._attack(_Batch(flat, oracle, threat.norm, threat.eps, ctx), y)
        self.crossed = best_dist <= threat.eps  # seen adversarial within eps: the runner's silent-success check
        return best.view_as(x)

    def _attack(self, b: _Batch, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(closest adversarial point found, or x; its float64 distance, inf where none)."""
        n, d = b.x.shape
        device = b.x.device
        everyone = torch.arange(n, device=device)
        theta = self.theta(d, b.norm)
        reserve = math.ceil(math.log2(1 / theta)) + 1  # room left for one bisection and a step query
        start, has, already = self._starting_points(b, y)
        best = b.x.clone()
        best_dist = torch.full((n,), math.inf, dtype=torch.float64, device=device)
        best_dist[already] = 0.0
        # cur: the current boundary point; dist_post: the distance of the point it was bisected from.
        cur = b.x.clone()
        dist_cur = torch.full((n,), math.inf, dtype=torch.float64, device=device)
        dist_post = torch.zeros(n, dtype=torch.float64, device=device)

        rows, moved = torch.nonzero(has).flatten(), start[has]
        t = 0
        while True:  # each pass: bisect the moved points to the boundary, then step them
            dist_post[rows] = b.dist(moved, rows)
            cur[rows] = self._bisect(b, rows, moved, "blend" if b.norm == "l2" else "clip", theta)
            dist_cur[rows] = b.dist(cur[rows], rows)
            self._keep_best(best, best_dist, rows, cur[rows], dist_cur[rows])
            t += 1
            rows = torch.nonzero(has & (best_dist > b.eps) & (b.oracle.left(everyone) >= 1)).flatten()
            if len(rows) == 0:
                break
            if t == 1:
                delta = torch.full((len(rows),), 0.1 * b.span, dtype=torch.float64, device=device)
            else:
                delta = (math.sqrt(d) if b.norm == "l2" else d) * theta * dist_post[rows]
            wanted = min(int(self.init_num_evals * math.sqrt(t)), self.max_num_evals)
            left = b.oracle.left(rows)
            evals = torch.minimum((left - reserve).clamp(min=1, max=wanted), left)
            normal = self._normal(b, rows, cur[rows], delta.to(b.x.dtype), evals)
            update = normal.sign() if b.norm == "linf" else normal
            stepped, ok = self._step(b, rows, cur[rows], update, dist_cur[rows] / math.sqrt(t))
            rows, moved = rows[ok], stepped[ok]
        return best, best_dist

    @staticmethod
    def _keep_best(best, best_dist, rows, points, dist) -> None:
        better = dist < best_dist[rows]
        best[rows[better]] = points[better]
        best_dist[rows[better]] = dist[better]

    # -- starting points ---------------------------------------------------------------------

    def _starting_points(
        self, b: _Batch, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(start, has a start, already misclassified), starts already bisected toward x.

        Each candidate is bisected and the closest result kept: HopSkipJump converges to
        a boundary point near its start, so the start decides much of the final distance.
        """
        n, d = b.x.shape
        everyone = torch.arange(n, device=b.x.device)
        pred = b.oracle.labels(everyone, b.x)
        already = pred != y
        start = b.x.clone()
        has = torch.zeros(n, dtype=torch.bool, device=b.x.device)
        members, valid = self._candidates(b, pred, y)
        valid &= ~already[:, None]
        owner, slot = torch.nonzero(valid, as_tuple=True)
        if len(owner):
            ends = self._bisect(b, owner, b.x[members[owner, slot]], "blend", INIT_TOLERANCE)
            sizes = torch.full(valid.shape, math.inf, dtype=torch.float64, device=b.x.device)
            sizes[owner, slot] = b.dist(ends, owner)
            index = torch.zeros(valid.shape, dtype=torch.long, device=b.x.device)
            index[owner, slot] = torch.arange(len(owner), device=b.x.device)
            has = valid.any(dim=1)
            pick = index.gather(1, sizes.argmin(dim=1, keepdim=True)).squeeze(1)[has]
            start[has] = ends[pick]
        for _ in range(self.init_tries):
            todo = torch.nonzero(~has & ~already & (b.oracle.left(everyone) >= 1)).flatten()
            if len(todo) == 0:
                break
            noise = torch.rand(len(todo), d, generator=b.ctx.generator, device="cpu")
            noise = (b.ctx.lower + b.span * noise).to(device=b.x.device, dtype=b.x.dtype)
            hit = b.oracle.adversarial(todo, noise)
            start[todo[hit]] = self._bisect(b, todo[hit], noise[hit], "blend", INIT_TOLERANCE)
            has[todo[hit]] = True
        return start, has, already

    def _candidates(self, b: _Batch, pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, k) batch members and validity: per point, the nearest member of each class
        other than its own, for the ``start_candidates`` nearest such classes.

        Member j is adversarial for point i when ``pred[j] != y[i]``: no query needed.
        """
        n = len(pred)
        p = 2.0 if b.norm == "l2" else math.inf
        pairwise = torch.cdist(b.x[None], b.x[None], p=p)[0]
        pairwise.masked_fill_(pred[None, :] == y[:, None], math.inf)
        order = pairwise.argsort(dim=1)  # nearest first
        classes = int(max(pred.max(), y.max())) + 1
        rank = torch.arange(n, device=b.x.device).expand(n, n)
        first = torch.full((n, classes), n, dtype=torch.long, device=b.x.device)
        first.scatter_reduce_(1, pred[order], rank, reduce="amin")  # rank of each class's nearest member
        first = first.sort(dim=1).values[:, : min(self.start_candidates, classes)]
        members = order.gather(1, first.clamp(max=n - 1))
        return members, (first < n) & torch.isfinite(pairwise.gather(1, members))

    # -- boundary search -----------------------------------------------------------------------

    def _bisect(self, b: _Batch, rows: torch.Tensor, adv: torch.Tensor, path: str, theta: float) -> torch.Tensor:
        """Bisect between clean ``x[rows]`` and adversarial ``adv``; return the adversarial end
        (the reference's ``binary_search_batch``).

        ``path`` ``"blend"``: the point ``(1 - a) x + a adv``, ``a`` in [0, 1], threshold
        ``theta``; ``"clip"``: ``adv`` clipped to the Linf cube of radius ``a`` around x,
        ``a`` in [0, dist], threshold ``min(dist theta, theta span)``. See
        :func:`bisecting` for the fixed-radius rules; also stops when the budget is spent.
        """
        x = b.x[rows]
        far = b.dist(adv, rows)
        low = torch.zeros_like(far)
        if path == "blend":  # a is a fraction of the distance far
            high, threshold, scale = torch.ones_like(far), torch.full_like(far, theta), far
        else:  # a is a distance
            high, threshold, scale = far.clone(), torch.minimum(far * theta, torch.full_like(far, theta * b.span)), 1.0
        moved = torch.zeros_like(far, dtype=torch.bool)
        while True:
            going = bisecting(low * scale, high * scale, threshold * scale, b.eps)
            todo = torch.nonzero(going & (b.oracle.left(rows) >= 1)).flatten()
            if len(todo) == 0:
                break
            mid = (high[todo] + low[todo]) / 2
            hit = b.oracle.adversarial(rows[todo], self._along(b, x[todo], adv[todo], mid, path))
            high[todo] = torch.where(hit, mid, high[todo])
            low[todo] = torch.where(hit, low[todo], mid)
            moved[todo] |= hit
        out = adv.clone()
        out[moved] = self._along(b, x[moved], adv[moved], high[moved], path)
        return out

    @staticmethod
    def _along(b: _Batch, x: torch.Tensor, adv: torch.Tensor, a: torch.Tensor, path: str) -> torch.Tensor:
        a = a.to(x.dtype)[:, None]
        if path == "blend":
            return b.clip((1 - a) * x + a * adv)
        return b.clip(torch.minimum(torch.maximum(adv, x - a), x + a))

    # -- gradient-direction estimate and step ----------------------------------------------------

    def _normal(
        self, b: _Batch, rows: torch.Tensor, at: torch.Tensor, delta: torch.Tensor, evals: torch.Tensor
    ) -> torch.Tensor:
        """Unit-L2 estimate of the boundary's normal (pointing to the adversarial side) at ``at``.

        ``evals[i]`` label queries for row i, processed ``query_batch`` at a time; the
        baseline-subtracted mean ``mean((f - mean f) u)`` is accumulated from sums.
        """
        m, d = at.shape
        owner = torch.repeat_interleave(torch.arange(m, device=at.device), evals)
        sum_fu = torch.zeros_like(at)
        sum_u = torch.zeros_like(at)
        sum_f = torch.zeros(m, dtype=at.dtype, device=at.device)
        for part in owner.split(self.query_batch):
            if b.norm == "l2":
                u = torch.randn(len(part), d, generator=b.ctx.generator, device="cpu")
            else:
                u = 2 * torch.rand(len(part), d, generator=b.ctx.generator, device="cpu") - 1
            u = u.to(device=at.device, dtype=at.dtype)
            u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
            step = delta[part][:, None]
            probes = b.clip(at[part] + step * u)
            u = (probes - at[part]) / step
            f = 2 * b.oracle.adversarial(rows[part], probes).to(at.dtype) - 1
            sum_fu.index_add_(0, part, f[:, None] * u)
            sum_u.index_add_(0, part, u)
            sum_f.index_add_(0, part, f)
        k = evals.to(at.dtype)
        mean_f, mean_u = sum_f / k, sum_u / k[:, None]
        grad = sum_fu / k[:, None] - mean_f[:, None] * mean_u
        unanimous = mean_f.abs() == 1  # the reference's special case: no baseline to subtract
        grad[unanimous] = mean_f[unanimous, None] * mean_u[unanimous]
        return grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @staticmethod
    def _step(
        b: _Batch, rows: torch.Tensor, at: torch.Tensor, update: torch.Tensor, size: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Geometric step search: halve ``size`` until ``at + size * update`` is adversarial."""
        size = size.to(at.dtype).clone()
        ok = torch.zeros(len(at), dtype=torch.bool, device=at.device)
        for _ in range(MAX_HALVINGS):
            todo = torch.nonzero(~ok & (b.oracle.left(rows) >= 1)).flatten()
            if len(todo) == 0:
                break
            hit = b.oracle.adversarial(rows[todo], b.clip(at[todo] + size[todo, None] * update[todo]))
            ok[todo[hit]] = True
            size[todo[~hit]] /= 2
        return b.clip(at + size[:, None] * update), ok
