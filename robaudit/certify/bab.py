"""Branch and bound on unstable ReLUs (beta-CROWN style), to push CROWN's radius up.

CROWN bounds the margin f_c - f_j over the whole ball B_2(x, eps) with one linear
relaxation per unstable ReLU. Branch and bound splits the ball instead: for an unstable
unit u of a ReLU's input node (the value z_u that the float32 model actually feeds the
ReLU, exact value plus its bounded rounding, as in `crown.py`), the ball is the union of

    {z_u >= 0}: relu(z_u) = z_u, the relaxation is the identity;
    {z_u <= 0}: relu(z_u) = slope * z_u (0 for a ReLU), the other exact piece.

A domain is a set of such split decisions; its bound is a valid lower bound of the margin
over the part of the ball that satisfies them, and the margin is proved positive on the
ball once every leaf of a split tree, whose leaves cover the ball, has a positive bound.
A leaf whose bound is not positive (or could not be computed: NaN compares False) fails
the whole proof.

Within a domain the split constraints enter the backward pass as Lagrange terms
(beta-CROWN, Wang et al., NeurIPS 2021): for beta >= 0,

    min_{ball, z_u >= 0} m  >=  min_{ball} m - beta z_u,   min_{ball, z_u <= 0} m  >=  min_{ball} m + beta z_u,

so any beta >= 0 gives a sound bound (beta only adds a linear functional of z_u, charged
with z_u's float32 rounding like every other coefficient). The betas and the lower slopes
of the remaining unstable units (alpha) are optimized per domain by projected Adam;
every iterate is a sound bound and the best one per domain is kept. Children inherit
their parent's alpha and beta. The unit to split is the one whose upper relaxation
costs the bound most (BaBSR-like: |negative coefficient| x chord intercept).

Intermediate bounds (the intervals that define the relaxations) stay those of the whole
ball: valid, though looser than a domain's own.
"""

from __future__ import annotations

import math

import torch

from robaudit.certify.budget import Budget
from robaudit.certify.interval import Batch


class BranchAndBound:
    """Proves margin lower bounds positive on a ball by splitting unstable ReLUs (see module doc)."""

    def __init__(self, crown, budget: Budget) -> None:
        self.crown = crown
        self.budget = budget

    def verify(self, batch: Batch, i: int, eps: float) -> bool:
        """True only if every margin of sample `i` (position in the batch) is proved positive on B_2(x, eps)."""
        crown = self.crown
        idx = torch.tensor([i])
        e = torch.tensor([float(eps)], dtype=torch.float64)
        ctx = crown._intermediate(batch, idx, e)
        rows = batch.rows[idx]
        last = len(crown.graph.nodes) - 1
        lower = crown._backward(batch, idx, e, last, rows, ctx)[0]
        relus = [
            (r, rel) for r, rel in sorted(ctx.relaxed.items())
            if rel.kind == "relu" and "free" in rel.parts and bool(rel.parts["free"].any())
        ]
        if not relus:
            return bool((lower > 0).all())
        failing = torch.nonzero(~(lower > 0)).flatten().tolist()
        # hardest pair first: a pair that fails ends the proof before the others spend their budget
        failing.sort(key=lambda p: float(lower[p]) if math.isfinite(float(lower[p])) else -math.inf)
        for p in failing:
            if not self._prove(batch, i, e, rows[:, p : p + 1], ctx, relus):
                return False
        return True

    # ------------------------------------------------------------------ one margin

    def _prove(self, batch, i, eps, spec, ctx, relus) -> bool:
        """Branch and bound on spec . logits > 0 over the ball; False when the budget runs out first."""
        crown, budget = self.crown, self.budget
        g = crown.graph
        layout = []  # (relu node, its input node, offset, size, shape)
        offset = 0
        for r, _ in relus:
            shape = g.nodes[r].shape
            size = math.prod(shape)
            layout.append((r, g.nodes[r].inputs[0], offset, size, shape))
            offset += size
        units = offset
        free0 = torch.cat([rel.parts["free"].reshape(1, -1) for _, rel in relus], dim=1)  # (1, U)
        a_l0 = torch.cat([rel.parts["a_l"].reshape(1, -1) for _, rel in relus], dim=1)
        # domains: split (D, U) in {-1, 0, +1}, alpha (D, U), beta (D, U), their bound and branching score
        split = torch.zeros(1, units, dtype=torch.int8)
        alpha = a_l0.clone()
        beta = torch.zeros(1, units, dtype=torch.float64)
        bound, alpha, beta, score = self._bound(batch, i, eps, spec, ctx, relus, layout, split, alpha, beta, free0)
        if bool(bound[0] > 0):
            return True
        queue = (split, alpha, beta, score)
        evaluated = 0
        while len(queue[0]):
            if evaluated >= budget.bab_domains:
                return False
            take = min(len(queue[0]), budget.bab_batch)
            s, a, b, sc = (t[:take] for t in queue)
            rest = tuple(t[take:] for t in queue)
            unit = sc.argmax(dim=1)
            has = sc.gather(1, unit[:, None])[:, 0] > -math.inf
            if not bool(has.all()):
                return False  # a domain with every unit split and still no positive bound
            rows = torch.arange(take)
            kids_s = torch.cat([s, s])
            kids_s[rows, unit] = 1
            kids_s[take + rows, unit] = -1
            kids_a, kids_b = torch.cat([a, a]), torch.cat([b, b])
            kb, ka, kbeta, ksc = self._bound(batch, i, eps, spec, ctx, relus, layout, kids_s, kids_a, kids_b, free0)
            evaluated += 2 * take
            open_ = ~(kb > 0)  # NaN counts as failing
            queue = tuple(torch.cat([r_, k[open_]]) for r_, k in zip(rest, (kids_s, ka, kbeta, ksc)))
        return True

    def _bound(self, batch, i, eps, spec, ctx, relus, layout, split, alpha, beta, free0):
        """Best bound per domain over `bab_steps` projected Adam steps on alpha and beta (each a sound bound)."""
        crown, budget = self.crown, self.budget
        d = len(split)
        last = len(crown.graph.nodes) - 1
        idx = torch.full((d,), i, dtype=torch.long)
        eps_d = eps.expand(d)
        spec_d = spec.expand(d, *spec.shape[1:])
        sub = ctx.select(torch.zeros(d, dtype=torch.long))
        sub.ball = {}  # no L2-ball coupling in domains: on the small nets branch and bound runs on, it
        # proved nothing more (digits ReLU MLP, 200 digits) and took 1.8x the time
        free = free0 & (split == 0)
        sign = split.to(torch.float64)
        floors = torch.cat([torch.full((size,), relus[k][1].floor, dtype=torch.float64) for k, (_, _, _, size, _) in enumerate(layout)])
        for (r, _j, o, size, shape), (_, rel) in zip(layout, relus):
            s = sign[:, o : o + size].reshape(d, *shape)
            neg = rel.floor  # the slope of the negative piece (0 for ReLU)
            piece = torch.where(s > 0, 1.0, neg).to(torch.float64)
            sp = s != 0
            parts = dict(sub.relaxed[r].parts)
            parts["a_l"] = torch.where(sp, piece, parts["a_l"])
            parts["a_u"] = torch.where(sp, piece, parts["a_u"])
            parts["b_u"] = torch.where(sp, torch.zeros_like(parts["b_u"]), parts["b_u"])
            parts["free"] = free[:, o : o + size].reshape(d, *shape)
            sub.relaxed[r] = type(rel)(rel.kind, rel.floor, **parts)
        alpha = alpha.clone().requires_grad_(True)
        beta = beta.clone().requires_grad_(True)
        adam = _Adam([alpha, beta], [budget.alpha_lr, budget.bab_beta_lr])
        best = torch.full((d,), -math.inf, dtype=torch.float64)
        best_a, best_b = alpha.detach().clone(), beta.detach().clone()
        trace: dict[int, torch.Tensor] = {}
        steps = max(1, budget.bab_steps)
        with torch.enable_grad():
            for step in range(steps):
                al = {r: alpha[:, o : o + size].reshape(d, 1, *shape) for r, _j, o, size, shape in layout}
                extra: dict[int, torch.Tensor] = {}
                for r, j, o, size, shape in layout:  # -beta z_u on an active split, +beta z_u on an inactive one
                    term = (-sign[:, o : o + size] * beta[:, o : o + size]).reshape(d, 1, *shape)
                    extra[j] = term if j not in extra else extra[j] + term
                tr: dict[int, torch.Tensor] = {}
                val = crown._backward(batch, idx, eps_d, last, spec_d, sub, al, extra=extra, trace=tr)[:, 0]
                v = val.detach()
                better = v > best  # NaN is never better: such an iterate is dropped
                best = torch.where(better, v, best)
                best_a = torch.where(better[:, None], alpha.detach(), best_a)
                best_b = torch.where(better[:, None], beta.detach(), best_b)
                if step == 0:
                    trace = {r: t.detach() for r, t in tr.items()}
                if step == steps - 1 or bool((best > 0).all()):
                    break
                grads = torch.autograd.grad((val * ~(best > 0)).sum(), [alpha, beta])
                with torch.no_grad():
                    adam.ascend(grads)
                    # project back onto the sound ranges: alpha in [floor, 1], beta >= 0
                    alpha.copy_(torch.maximum(torch.minimum(alpha, torch.ones_like(alpha)), floors))
                    beta.clamp_(min=0.0)
        # BaBSR-like score: a free unit's upper line costs |negative coefficient| x intercept
        score = torch.full((d, sum(size for _, _, _, size, _ in layout)), -math.inf, dtype=torch.float64)
        for r, _j, o, size, shape in layout:
            lam = trace[r][:, 0].reshape(d, size)
            b_u = sub.relaxed[r].parts["b_u"].reshape(d, size)
            f = free[:, o : o + size]
            gain = lam.clamp_max(0).neg() * b_u + 1e-6 * lam.abs() * b_u
            score[:, o : o + size] = torch.where(f, gain, -math.inf)
        return best, best_a, best_b, score


class _Adam:
    """Adam ascent on a few tensors in place (no torch.optim: its first step costs seconds of imports)."""

    def __init__(self, params: list[torch.Tensor], lrs: list[float], b1: float = 0.9, b2: float = 0.999) -> None:
        self.params, self.lrs, self.b1, self.b2 = params, lrs, b1, b2
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def ascend(self, grads) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for p, g, m, v, lr in zip(self.params, grads, self.m, self.v, self.lrs):
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            p.add_(lr * (m / c1) / ((v / c2).sqrt() + 1e-8))
