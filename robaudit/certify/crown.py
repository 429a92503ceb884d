"""CROWN: backward linear bound propagation of the margin itself over an L2 ball.

The cross-Lipschitz methods bound the *gradient* over the ball and integrate it; CROWN
(Zhang et al., NeurIPS 2018) bounds the *margin* f_c - f_j directly, which stays tight on
deep ReLU, residual and batch-norm networks where gradient intervals blow up.

For a ball B_2(x, eps) and a set of linear objectives Lambda . z_t on a node t:

1. every activation s gets linear bounds a_l z + b_l <= s(z) <= a_u z + b_u on the
   interval of its input (`ActOp.relaxation`: the ReLU chord and CROWN's adaptive lower
   slope; chord / tangent / mean-value lines for smooth activations); max pooling is
   bounded below by the window entry with the largest lower bound and above by the
   window's largest upper bound (exact where one entry surely is the maximum);
2. Lambda is pushed from t to the pixels: through W^T (adjoints of every affine op),
   split into its positive and negative parts at each relaxation (positive part takes the
   lower line, negative part the upper one for a lower bound), summed over residual
   branches; the intercepts collect into a constant;
3. at the pixels the bound is linear, A delta + b, and its minimum over ||delta|| <= eps
   is exactly A x + b - eps ||A||_2.

The intervals the relaxations need (inputs of activations and pools) come from the same
backward pass run on those nodes, for the units that matter only: a ReLU unit that an
interval pass already proves stable keeps its exact linear piece whatever its bounds, so
only unstable ReLUs (and every unit of a smooth activation or undecided pool window) are
refined. Nodes that are affine in the pixels have exact ranges z(x) +- eps ||A_i||.

`CrownBound.radius` bisects on eps per sample: a radius is accepted only when the lower
bound of every margin over its ball exceeds the float32 evaluation error over that ball
(`rounding.py`), so the deployed float32 model keeps its decision too. Every bound is
computed in float64 and deflated by a relative tolerance for float64 rounding. On small
ReLU nets (`Budget.bab_units`) a second bisection then proves larger radii by branch and
bound on unstable ReLUs (`bab.py`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from robaudit.certify.affine import AffinePrefix
from robaudit.certify.bab import BranchAndBound
from robaudit.certify.ball import Ball
from robaudit.certify.box import exact_box, node_box
from robaudit.certify.budget import Budget
from robaudit.certify.global_lipschitz import LIP_RTOL, GlobalLipschitz, schur_bound
from robaudit.certify.graph import Graph
from robaudit.certify.interval import SYM_CHUNK_ELEMS, Batch, Sym, act_sym, add_sym, affine_sym, intersect
from robaudit.certify.ops import ActOp, AddOp, AffineOp, MaxPoolOp, PadOp, ReshapeOp, SelectOp
from robaudit.certify.patches import PATCH_ELEMS, PatchPlan, backward_windows
from robaudit.certify.rounding import local_rounding

CROWN_RTOL = 1e-9  # outward rounding of every bound, relative to the sum of |terms| that formed it
RELAX_ATOL = 1e-12  # slack on every relaxation line's intercept, relative to the line's size
POLISH_FIRST = 2.6  # the refined evaluations first try this multiple of the bisection's radius
# (on the digits residual net the fully refined radius is 2.3-3.8x the bisection's, median 3.0;
# a trial above it proves little, so the first one stays near the low end)
POLISH_GROW = 1.2  # ... and then at least this multiple of the best radius while every trial certifies,
POLISH_LEAP = 3.0  # at most this one, as far as POLISH_REACH of the trial's reach (`_margins`) points: the digits
# residual net reaches 2-9x a trial and proves at most 1.3x; CIFAR-10 resnet_2b reaches 100-400x and proves over 3x
POLISH_REACH = 0.125  # the fraction of the reach a leap trusts (the reach is no bound beyond the trial)
POLISH_EXTRA = 4  # refined evaluations beyond the budget's, only for samples whose last trial certified and leapt,
# that the bisection proved nothing for (its forward bounds are void there: the refined ones are all there is), or
POLISH_JUMP = 2.0  # whose radius grew by this factor from one refined evaluation to the next in one of their last two
# (still far from converged: on CIFAR-10 resnet_2b the refined radius is 10-30x the bisection's, and four
# evaluations ended at 0.82 of CROWN's radius where six reach 0.98; on the digits residual net none jumps)
BISECT_COLD = 6  # where refined evaluations follow, the bisection gives up on samples with nothing proved after this many
POLISH_COLD = 0.125  # where the bisection proved nothing, the first trial is this fraction of the first-order radius
# (float32 rounding can swamp the bisection's forward bounds at every radius: 9x200 ERAN MLP)


def first_order_radius(graph: Graph, batch: Batch) -> torch.Tensor:
    """min_j margin_j / ||grad (f_c - f_j)(x)||: where the linearized margin reaches zero (a search start, no bound)."""
    x = batch.values[0].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = graph.logits(x)
        grads = [torch.autograd.grad(logits[:, k].sum(), x, retain_graph=True)[0] for k in range(graph.num_classes)]
    jac = torch.stack(grads, 1).flatten(2)  # (B, K, d)
    rows = torch.arange(len(x))
    diff = (jac[rows, batch.labels][:, None] - jac[rows[:, None], batch.others]).norm(dim=2)
    ratio = torch.where(diff > 0, batch.margins / diff.clamp_min(1e-300), torch.full_like(diff, math.inf))
    return ratio.amin(dim=1).detach()


@dataclass
class _Context:
    """What the backward passes need for one ball: relaxations and the float32 rounding per node."""

    relaxed: dict[int, _Relaxed]
    noise: dict[int, torch.Tensor]  # (n, *shape) bound on the rounding the float32 model adds at the node
    # ReLU node -> its input's unstable units and an L2 ball around the input's value at the
    # sample that holds the float32 values fed to the layer on the whole eps-ball (`ball.py`)
    ball: dict[int, Ball] = dataclasses.field(default_factory=dict)

    def select(self, rows: torch.Tensor) -> _Context:
        """The same for a subset of the samples."""
        relaxed = {i: _Relaxed(r.kind, r.floor, **{k: v[rows] for k, v in r.parts.items()}) for i, r in self.relaxed.items()}
        ball = {i: b.select(rows) for i, b in self.ball.items()}
        return _Context(relaxed, {i: v[rows] for i, v in self.noise.items()}, ball)


class _Relaxed:
    """Linear bounds of one nonlinear node for the current ball, ready for the backward pass."""

    def __init__(self, kind: str, floor: float = 0.0, **parts: torch.Tensor) -> None:
        self.kind = kind
        self.floor = floor  # smallest sound lower slope of a free unit (alpha-CROWN)
        self.parts = parts


class CrownBound:
    """Lower bounds of every class margin over B_2(x, eps), and the radius search on them."""

    name = "crown"

    def __init__(self, graph: Graph, budget: Budget, lipschitz: GlobalLipschitz | None = None) -> None:
        self.graph = graph
        self.budget = budget
        self.lipschitz = None  # spectral norms for the L2 ball of each ReLU layer's input (`ball.py`)
        if budget.crown_ball:
            self.lipschitz = lipschitz if lipschitz is not None else GlobalLipschitz(graph)
        self._op_norms: dict[int, float] = {}
        self.prefix = AffinePrefix(graph, budget.symbolic_cap)
        d = graph.input_dim
        self.sym_ok = [d * math.prod(node.shape) <= budget.symbolic_cap for node in graph.nodes]
        widest = max([d * math.prod(nd.shape) for i, nd in enumerate(graph.nodes) if self.sym_ok[i]], default=1)
        self.chunk = max(1, SYM_CHUNK_ELEMS // widest)
        self.abs_ops = {i: n.op.abs() for i, n in enumerate(graph.nodes) if isinstance(n.op, AffineOp)}
        self.bias_norm = {  # ||bias broadcast over the node||, for the rounding allowance
            i: float((torch.zeros((1, *n.shape), dtype=torch.float64) + n.op.bias).norm())
            for i, n in enumerate(graph.nodes)
            if isinstance(n.op, AffineOp) and n.op.bias is not None
        }
        # nodes whose interval a relaxation needs: inputs of activations and max pools
        self.needs = sorted(
            {n.inputs[0] for n in graph.nodes if isinstance(n.op, (ActOp, MaxPoolOp))} - {0}
        )
        self.elems = budget.crown_elems
        self.pass_cost = 0  # multiply-adds of one pass through the network (a backward pass costs about as much)
        prefix = []  # ... of the part up to each node
        for n in graph.nodes:
            w = getattr(n.op, "weight", None)
            out = math.prod(n.shape)
            self.pass_cost += w.numel() * out // w.shape[0] if torch.is_tensor(w) and w.dim() >= 2 else out
            prefix.append(self.pass_cost)
        self.relu_units = sum(  # units branch and bound may split (`bab.py`)
            math.prod(n.shape) for n in graph.nodes
            if isinstance(n.op, ActOp) and n.op.kind in ("relu", "leaky_relu") and n.op.convexity == "convex"
        )
        self.depth: list[int] = []  # most relaxed (nonlinear) nodes on a path from the pixels, node included
        for node in graph.nodes:
            before = max((self.depth[j] for j in node.inputs), default=0)
            self.depth.append(before + isinstance(node.op, (ActOp, MaxPoolOp)))
        # a relaxation's input behind two or more layers of relaxations: backward refinement can help
        deep = [i for i in self.needs if not graph.exact[i] and self.depth[i] >= 2]
        self.deep = bool(deep)
        # multiply-adds per sample of one evaluation that refines every unit of those nodes backwards
        self.prefix_cost = prefix
        dense = {i: 2 * math.prod(graph.nodes[i].shape) * prefix[i] for i in deep}
        self.refine_cost = sum(dense.values())
        # where that is beyond `crown_polish_work`, convolutional nodes can be refined over their units'
        # receptive fields instead (`patches.py`): the polish then uses that pass where it is cheaper
        self.patch_plan = PatchPlan(graph)
        self.windowed: set[int] = set()
        if self.refine_cost > budget.crown_polish_work:
            windowed = {i for i in deep if self.patch_plan.covers(i) and self.patch_plan.cost(i) < dense[i]}
            cost = sum(self.patch_plan.cost(i) if i in windowed else dense[i] for i in deep)
            if windowed and cost <= budget.crown_window_work:
                self.windowed, self.refine_cost = windowed, cost

    # ------------------------------------------------------------------ bounds of the margins

    def margin_bounds(self, batch: Batch, idx: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """(n, P) lower bounds of the float32 model's margins f_c - f_j over B_2(x, eps)."""
        return self._margins(batch, idx, eps)[0]

    def certified_within(
        self, batch: Batch, idx: torch.Tensor, eps: torch.Tensor, refine: int | None = None
    ) -> torch.Tensor:
        """(n,) the largest radius <= eps that one bound evaluation on the eps-ball proves.

        Every bound of the pass holds on the smaller balls too, and its final linear form
        concretizes at any radius (`_backward(linear=True)`), so a trial that fails at eps
        still certifies min over pairs of offset / slope. `refine` overrides the budget's
        `crown_refine` (units refined backwards per node) for this evaluation.
        """
        return self._margins(batch, idx, eps, refine)[1].amin(dim=1)

    def _margins(
        self, batch: Batch, idx: torch.Tensor, eps: torch.Tensor, refine: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lower bounds at eps, certified radius <= eps) per sample and pair, and (n,) the reach.

        The reach is where the pass's linear form would cross zero if it held on larger
        balls (min over pairs of offset / slope, uncapped): no bound, only a hint of how far
        beyond eps the next trial may look (`_polish`).

        With `Budget.alpha_steps`, the lower slopes of unstable ReLUs are then optimized
        per sample and pair (alpha-CROWN, projected Adam) for the samples not yet
        certified; every iterate is a sound bound, and the best one per pair is kept.
        Samples go in chunks so the forward symbolic bounds stay within `SYM_CHUNK_ELEMS`.
        """
        parts = [
            self._margin_chunk(batch, idx[s : s + self.chunk], eps[s : s + self.chunk], refine)
            for s in range(0, len(idx), self.chunk)
        ]
        if not parts:
            empty = batch.margins.new_zeros(0, batch.margins.shape[1])
            return empty, empty, empty[:, 0]
        return tuple(torch.cat([p[k] for p in parts]) for k in range(3))

    @staticmethod
    def _reach(offset: torch.Tensor, slope: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Per pair, the largest e <= eps with offset - e * slope > 0 (0 where none)."""
        flat = torch.where(slope == 0, torch.inf, 0.0)  # a NaN slope proves nothing
        ratio = torch.where(slope > 0, offset / slope.clamp_min(1e-300) * (1 - 1e-12), flat)
        return torch.where(offset > 0, torch.minimum(ratio, eps[:, None]), torch.zeros_like(offset))

    def _margin_chunk(
        self, batch: Batch, idx: torch.Tensor, eps: torch.Tensor, refine: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx = self._intermediate(batch, idx, eps, refine)
        rows = batch.rows[idx]
        offset, slope = self._backward(batch, idx, eps, len(self.graph.nodes) - 1, rows, ctx, linear=True)
        lower = offset - eps[:, None] * slope
        uncapped = self._reach(offset, slope, torch.full_like(eps, math.inf))
        reach = torch.minimum(uncapped, eps[:, None])  # = _reach(offset, slope, eps)
        hint = uncapped.amin(dim=1)
        free = [i for i, r in ctx.relaxed.items() if "free" in r.parts and bool(r.parts["free"].any())]
        todo = torch.nonzero(lower.amin(dim=1) <= 0).flatten()
        if self.budget.alpha_steps and free and len(todo):
            lower[todo], reach[todo] = self._optimize(batch, idx, eps, todo, rows, ctx, free, lower[todo], reach[todo])
        return lower, reach, hint

    def _optimize(self, batch, idx, eps, todo, rows, ctx: _Context, free, start, reach) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha-CROWN on the final margins of samples `todo` (positions in idx)."""
        sub = ctx.select(todo)
        p = rows.shape[1]
        alpha = {}
        for i in free:
            a_l = sub.relaxed[i].parts["a_l"]
            alpha[i] = a_l[:, None].expand(-1, p, *a_l.shape[1:]).clone().requires_grad_(True)
        best, reach = start.clone(), reach.clone()
        opt = torch.optim.Adam(list(alpha.values()), lr=self.budget.alpha_lr)
        sidx, seps, srows = idx[todo], eps[todo], rows[todo]
        with torch.enable_grad():
            for _ in range(self.budget.alpha_steps):
                offset, slope = self._backward(batch, sidx, seps, len(self.graph.nodes) - 1, srows, sub, alpha, linear=True)
                bound = offset - seps[:, None] * slope
                best = torch.maximum(best, bound.detach())
                reach = torch.maximum(reach, self._reach(offset.detach(), slope.detach(), seps))
                if bool((best.amin(dim=1) > 0).all()):
                    break
                opt.zero_grad()
                (-(bound * (best <= 0)).sum()).backward()  # push up the pairs not yet positive
                opt.step()
                with torch.no_grad():  # project back onto the sound slopes (clamp's gradient dies at the ends)
                    for i, a in alpha.items():
                        a.clamp_(sub.relaxed[i].floor, 1.0)
        return best, reach

    def _intermediate(self, batch: Batch, idx: torch.Tensor, eps: torch.Tensor, refine: int | None = None):
        """Interval of every node over the ball (CROWN-refined where a relaxation needs it).

        `refine`: units refined backwards per node, instead of the budget's `crown_refine`.
        """
        g = self.graph
        n_nodes = len(g.nodes)
        lo: list[torch.Tensor | None] = [None] * n_nodes
        hi: list[torch.Tensor | None] = [None] * n_nodes
        ctx = _Context({}, {})
        relaxed = ctx.relaxed
        needs = set(self.needs)
        sym: list[Sym | None] = [None] * n_nodes
        pending = [len(c) for c in g.consumers]
        drift: list[torch.Tensor | float] = [0.0] * n_nodes  # accumulated float32 rounding of exact nodes
        spread: list[torch.Tensor | None] = [None] * n_nodes  # (n,) bound of ||float32 z_i - z_i(x)|| on the ball
        size: list[torch.Tensor | None] = [None] * n_nodes  # (n,) ||z_i(x)||, for the centres' own rounding
        for i, node in enumerate(g.nodes):
            op = node.op
            a = eps.view(-1, *([1] * len(node.shape)))
            if g.exact[i]:
                lo[i], hi[i] = exact_box(batch.values[i][idx], self.prefix.rownorm[i], eps, batch.magnitudes[i][idx])
                if i:  # the float32 prefix adds its rounding: |A| (drift of the inputs) + its own
                    rho = self._noise(i, lo, hi)
                    if isinstance(op, AffineOp):
                        before = drift[node.inputs[0]]
                        carried = self.abs_ops[i].linear(before) if torch.is_tensor(before) else 0.0
                    else:
                        carried = drift[node.inputs[0]] + drift[node.inputs[1]]
                    drift[i] = carried + rho
                    lo[i], hi[i] = lo[i] - drift[i], hi[i] + drift[i]
                    if torch.is_tensor(rho):
                        ctx.noise[i] = rho
            else:
                ins = node.inputs
                lo[i], hi[i] = node_box(op, [lo[j] for j in ins], [hi[j] for j in ins], self.abs_ops.get(i))
            if not g.exact[i]:  # the float32 model adds its rounding here: a bounded extra input
                rho = self._noise(i, lo, hi)
                if torch.is_tensor(rho):
                    ctx.noise[i] = rho
                    lo[i], hi[i] = lo[i] - rho, hi[i] + rho
            sym[i] = self._forward_sym(i, sym, ctx, idx, batch, drift)
            if sym[i] is not None and not g.exact[i]:
                lo[i], hi[i] = intersect(sym[i], a, lo[i], hi[i], CROWN_RTOL)
            if i in needs and not g.exact[i] and not (sym[i] is not None and self.depth[i] <= 1):
                # (behind one layer of relaxations the forward bounds equal the backward ones; a node
                # without forward bounds has only its interval, so more of its units may be refined)
                cap = self.budget.crown_refine if refine is None else refine
                if sym[i] is None:
                    cap = max(cap, self.budget.crown_refine_unbounded)
                lo[i], hi[i] = self._refine(batch, idx, eps, i, lo[i], hi[i], ctx, cap, self._windowed(i, cap))
            tighter = False  # whether node i's ball is smaller than its box for some sample
            if self.lipschitz is not None:
                centre = batch.values[i][idx]
                size[i] = centre.flatten(1).norm(dim=1)
                box = torch.maximum(hi[i] - centre, centre - lo[i]).flatten(1).norm(dim=1)  # farthest corner
                spread[i] = self._spread(i, box, size, eps, spread, ctx)
                tighter = spread[i] is not None and bool((spread[i] < box).any())
            for c in g.consumers[i]:
                cop = g.nodes[c].op
                if isinstance(cop, (ActOp, MaxPoolOp)):
                    relaxed[c] = self._relax(cop, lo[i], hi[i])
                if tighter and c in relaxed and relaxed[c].kind == "relu":  # else the ball adds nothing to the box
                    ctx.ball[c] = Ball.gather(relaxed[c].parts["free"], lo[i], hi[i], centre, spread[i])
            for j in node.inputs:
                pending[j] -= 1
                if pending[j] == 0:
                    sym[j] = None
        return ctx

    def _spread(self, i: int, box: torch.Tensor, size: list, eps, spread: list, ctx: _Context) -> torch.Tensor | None:
        """(n,) a bound of ||z_i - z_i(x)|| for the float32 values z_i of node i on the eps-ball.

        The smaller of `box` (the distance to the farthest corner of the node's box) and a Lipschitz
        step from its inputs' spreads: a sound spectral-norm bound of the affine chain that
        ends here (`GlobalLipschitz.chains`), activation slopes, pool overlaps, residual sums;
        plus the float32 rounding each node adds (`ctx.noise`, carried through the rest of
        its chain by Schur's bound), plus the float64 rounding of the centres themselves.
        """
        node = self.graph.nodes[i]
        op = node.op
        if op is None:
            return eps.clone()
        if isinstance(op, AffineOp):
            chain = self.lipschitz.chains.get(i)
            if chain is None or spread[chain[1]] is None:
                return None  # inside a chain: only its end is bounded
            norm, base = chain
            carried, slack, after = 0.0, 0.0, 1.0
            for k in self.lipschitz.chain_nodes(i)[0]:  # from i backwards: rounding and bias through the ops after them
                if k in ctx.noise:
                    carried = carried + after * ctx.noise[k].flatten(1).norm(dim=1)
                slack = slack + after * self.bias_norm.get(k, 0.0)
                after *= self._op_norm(k)
            prop = norm * (1 + LIP_RTOL) * spread[base] + carried + CROWN_RTOL * (size[i] + slack + after * size[base])
        elif any(spread[j] is None for j in node.inputs):
            return None
        elif isinstance(op, ActOp):
            prop = op.max_slope * spread[node.inputs[0]]
        elif isinstance(op, MaxPoolOp):
            prop = math.sqrt(op.overlap) * spread[node.inputs[0]]
        else:
            prop = spread[node.inputs[0]] + spread[node.inputs[1]]
        if not isinstance(op, AffineOp):
            own = ctx.noise[i].flatten(1).norm(dim=1) if i in ctx.noise else 0.0
            prop = prop + own + CROWN_RTOL * (size[i] + sum(size[j] for j in node.inputs))
        return torch.minimum(prop * (1 + 1e-9), box)

    def _op_norm(self, k: int) -> float:
        """Schur's bound of node k's spectral norm: cheap, and only rounding goes through it."""
        if k not in self._op_norms:
            self._op_norms[k] = schur_bound(self.graph.nodes[k].op) * (1 + LIP_RTOL)
        return self._op_norms[k]

    def _noise(self, i: int, lo: list, hi: list) -> torch.Tensor | float:
        """The rounding the float32 model adds at node i, from the magnitudes of its float32 inputs."""
        op = self.graph.nodes[i].op
        if isinstance(op, ReshapeOp) or (isinstance(op, (PadOp, SelectOp)) and op.bias is None):
            return 0.0  # copies: exact (ReLU and max pooling are exact too, but for a subnormal read as zero)
        mags: list[torch.Tensor | None] = [None] * len(self.graph.nodes)
        for j in [*self.graph.nodes[i].inputs, i]:
            if lo[j] is not None:
                mags[j] = torch.maximum(lo[j].abs(), hi[j].abs())
        return local_rounding(self.graph, i, mags)

    def _forward_sym(self, i: int, sym: list, ctx: _Context, idx: torch.Tensor, batch: Batch, drift) -> Sym | None:
        """Linear lower/upper bounds of node i in the pixel perturbation, as centre -+ deviation.

        Carrying d (pixel count) rows forward costs about d network passes once per ball,
        against two per refined unit backwards; on small inputs it gives every node's
        bounds with the relaxations of all layers before it (as tight as the backward
        pass through one layer of relaxations, looser behind several).
        """
        g = self.graph
        node = g.nodes[i]
        if not self.sym_ok[i]:
            return None
        if g.exact[i]:
            jac = self.prefix.jacobian.get(i)
            if jac is None:
                return None
            return Sym(jac, batch.values[i][idx], None, drift[i] if torch.is_tensor(drift[i]) else None)
        src = [sym[j] for j in node.inputs]
        if any(t is None for t in src):
            return None
        out = self._compose(i, src, ctx)
        if out is not None and i in ctx.noise:
            out.c_dev = ctx.noise[i] if out.c_dev is None else out.c_dev + ctx.noise[i]
        return out

    def _compose(self, i: int, src: list[Sym], ctx: _Context) -> Sym | None:
        """Node i's symbolic bounds from its inputs' (before its own rounding)."""
        op = self.graph.nodes[i].op
        if isinstance(op, AffineOp):
            return affine_sym(op, self.abs_ops[i], src[0])
        if isinstance(op, AddOp):
            return add_sym(src[0], src[1], op.sign)
        if isinstance(op, ActOp):
            r = ctx.relaxed[i].parts
            return act_sym(src[0], r["a_l"], r["b_l"], r["a_u"], r["b_u"])
        return None  # max pooling: its interval (and backward refinement) carry on

    def _refine(
        self, batch, idx, eps, i, lo, hi, ctx: _Context, cap: int, windowed: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tighten node i's interval with a backward pass on the units whose bounds matter.

        Dense passes refine up to `cap` units per sample (the widest); with `windowed`, every
        such unit is refined by the patches pass (`patches.py`), which costs a pass over each
        unit's receptive field only.
        """
        g = self.graph
        users = [g.nodes[c].op for c in g.consumers[i]]
        if all(isinstance(u, ActOp) and u.kind in ("relu", "leaky_relu") for u in users):
            pick = (lo < 0) & (hi > 0)  # a stable unit's relaxation is exact already
        else:
            pick = torch.ones_like(lo, dtype=torch.bool)
        n = len(idx)
        flat = pick.reshape(n, -1)
        counts = flat.sum(1) if windowed else flat.sum(1).clamp_max(cap)
        s = int(counts.max()) if n else 0
        if s == 0:
            return lo, hi
        numel = flat.shape[1]
        # per sample its picked units, widest first (the cap keeps the loosest), padded with unpicked ones
        width = torch.where(flat, (hi - lo).reshape(n, -1), -torch.inf)
        order = torch.argsort(width, dim=1, descending=True, stable=True)[:, :s]
        valid = torch.arange(s)[None, :] < counts[:, None]
        lo_flat, hi_flat = lo.reshape(n, -1).clone(), hi.reshape(n, -1).clone()
        if windowed:
            step = min(s, max(1, PATCH_ELEMS // (2 * n * self.patch_plan.widest(i))))
        else:
            widest = max(math.prod(nd.shape) for nd in g.nodes[: i + 1])
            step = min(s, max(1, self.elems // (2 * n * widest)))
        for start in range(0, s, step):
            cols = order[:, start : start + step]  # (n, c)
            c = cols.shape[1]
            if windowed:
                args = (batch.values[0][idx], eps, i, cols, ctx.relaxed, ctx.noise, CROWN_RTOL)
                low, neg_up = backward_windows(self.patch_plan, *args).unbind(1)
            else:
                spec = torch.zeros(n, c, numel, dtype=torch.float64)
                spec.scatter_(2, cols[:, :, None], 1.0)
                spec = torch.cat([spec, -spec], dim=1).reshape(n, 2 * c, *g.nodes[i].shape)
                bound = self._backward(batch, idx, eps, i, spec, ctx)
                low, neg_up = bound[:, :c], bound[:, c:]
            ok = valid[:, start : start + step]
            cur_lo, cur_hi = lo_flat.gather(1, cols), hi_flat.gather(1, cols)
            new_lo = torch.where(ok, torch.maximum(cur_lo, low), cur_lo)
            new_hi = torch.where(ok, torch.minimum(cur_hi, -neg_up), cur_hi)
            # only rounding can cross them, and a bound that overflowed proves nothing: keep the interval pass
            crossed = (new_lo > new_hi) | new_lo.isnan() | new_hi.isnan()
            lo_flat.scatter_(1, cols, torch.where(crossed, cur_lo, new_lo))
            hi_flat.scatter_(1, cols, torch.where(crossed, cur_hi, new_hi))
        return lo_flat.reshape(lo.shape), hi_flat.reshape(hi.shape)

    def _windowed(self, i: int, cap: int) -> bool:
        """Refine node i's every unit by the patches pass rather than up to `cap` units by dense passes?

        Only on nets whose dense refinement is over its work cap (`windowed`), and where the
        patches pass costs no more than the dense passes would: in `default`'s bisection (64
        units per node) the dense ones stay; in its refined evaluations and in `tight` (4096
        units per node) the patches pass refines every unit for less.
        """
        if i not in self.windowed:
            return False
        dense = 2 * min(math.prod(self.graph.nodes[i].shape), cap) * self.prefix_cost[i]
        return self.patch_plan.cost(i) <= dense

    @staticmethod
    def _relax(op: ActOp | MaxPoolOp, lo: torch.Tensor, hi: torch.Tensor) -> _Relaxed:
        if isinstance(op, ActOp) and op.kind in ("relu", "leaky_relu") and op.convexity == "convex":
            # stable units: their exact linear piece; unstable ones: the chord above and CROWN's
            # adaptive slope below (any lower slope in [slope, 1] through 0 is sound: alpha-CROWN)
            neg = op.slope if op.kind == "leaky_relu" else 0.0
            free = (lo < 0) & (hi > 0)
            piece = torch.where(hi <= 0, neg, 1.0).to(lo.dtype)
            width = torch.where(free, hi - lo, torch.ones_like(lo))
            chord = (op.value(hi) - op.value(lo)) / width
            a_u = torch.where(free, chord, piece)
            b_u = torch.where(free, op.value(lo) - chord * lo, torch.zeros_like(lo))
            b_u = torch.where(free, b_u + RELAX_ATOL * (1 + b_u.abs() + a_u * hi.abs().maximum(lo.abs())), b_u)
            a_l = torch.where(free, torch.where(hi >= -lo, 1.0, neg).to(lo.dtype), piece)
            return _Relaxed("relu", neg, a_l=a_l, b_l=torch.zeros_like(lo), a_u=a_u, b_u=b_u, free=free)
        if isinstance(op, ActOp):
            d_lo, d_hi = op.derivative_bounds(lo, hi)
            a_l, b_l, a_u, b_u = op.relaxation(lo, hi, d_lo, d_hi)
            size = lo.abs().maximum(hi.abs())
            b_l = b_l - RELAX_ATOL * (1 + b_l.abs() + a_l * size)
            b_u = b_u + RELAX_ATOL * (1 + b_u.abs() + a_u * size)
            return _Relaxed("act", 0.0, a_l=a_l, b_l=b_l, a_u=a_u, b_u=b_u)
        w_lo = op.windows(lo, -math.inf)  # (n, C, k, L)
        w_hi = op.windows(hi, -math.inf)
        best = w_lo.argmax(dim=2, keepdim=True)  # the entry with the largest lower bound
        onehot = torch.zeros_like(w_lo).scatter_(2, best, 1.0)
        others_hi = torch.where(onehot.bool(), -math.inf, w_hi).amax(dim=2)
        sure = w_lo.gather(2, best)[:, :, 0] >= others_hi  # that entry is the maximum on the whole ball
        top = w_hi.amax(dim=2)  # (n, C, L): the maximum is at most this
        return _Relaxed("maxpool", onehot=onehot, sure=sure, top=top)

    # ------------------------------------------------------------------ backward pass

    def _backward(
        self, batch: Batch, idx: torch.Tensor, eps: torch.Tensor, start: int, spec: torch.Tensor, ctx: _Context,
        alpha: dict[int, torch.Tensor] | None = None, extra: dict[int, torch.Tensor] | None = None,
        trace: dict[int, torch.Tensor] | None = None, linear: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(n, S) lower bounds of spec . z_start over the ball, spec (n, S, *shape of start).

        With `linear`, the bound as a function of the radius instead: (offset, slope) with
        spec . z_start >= offset - e * slope on every ball of radius e <= eps. The
        relaxations and rounding allowances were derived on the eps-ball, so they hold on
        every smaller ball, and only the final concretization depends on e: one pass at
        eps certifies min(eps, offset / slope) even where its bound at eps is negative.

        `alpha` optionally gives, per ReLU node, lower slopes (n, S, *shape) for its
        unstable units (clamped to their sound range; stable units keep their exact slope).
        `extra` optionally adds coefficients (n, S, *shape) on nodes below `start` (the split
        constraints of branch and bound, `bab.py`); `trace`, when given, receives the
        coefficients reaching each activation node (before its relaxation).
        """
        g = self.graph
        n, s = spec.shape[:2]
        state: dict[int, torch.Tensor] = {start: spec}
        const = torch.zeros(n, s, dtype=torch.float64)
        scale = torch.zeros(n, s, dtype=torch.float64)  # sum of |terms|, for outward rounding

        def push(j: int, lam: torch.Tensor) -> None:
            state[j] = lam if j not in state else state[j] + lam

        def total(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, s, -1).sum(2)

        if start == len(g.nodes) - 1 and g.tie_margin:  # a closing softmax must not round the margin to a tie
            const = const - 0.5 * g.tie_margin * total(spec.abs())

        for i in range(start, -1, -1):
            if extra is not None and i in extra:
                push(i, extra[i])
            if i not in state:
                continue
            lam = state.pop(i)
            node = g.nodes[i]
            op = node.op
            if i in ctx.noise:  # the float32 rounding rho at this node: lambda . rho >= -|lambda| . rho
                term = total(lam.abs() * ctx.noise[i][:, None])
                const = const - term
                scale = scale + term
            if op is None:
                x = batch.values[0][idx].reshape(n, 1, -1)
                lam = lam.reshape(n, s, -1)
                dot = (lam * x).sum(2)
                norm = lam.norm(dim=2)
                # sum |lam x| <= ||lam|| ||x|| (Cauchy-Schwarz): enough for the rounding allowance
                offset = const + dot - CROWN_RTOL * (scale + norm * x.norm(dim=2))
                slope = norm * (1 + CROWN_RTOL)
                return (offset, slope) if linear else offset - eps[:, None] * slope
            if isinstance(op, AffineOp):
                if op.bias is not None:
                    flat = lam.reshape(n * s, *node.shape)
                    const = const + total(flat * op.bias)
                    scale = scale + lam.reshape(n, s, -1).norm(dim=2) * self.bias_norm[i]
                j = node.inputs[0]
                push(j, op.adjoint(lam.reshape(n * s, *node.shape)).reshape(n, s, *g.nodes[j].shape))
            elif isinstance(op, ActOp):
                if trace is not None:
                    trace[i] = lam
                rel = ctx.relaxed[i]
                r = rel.parts
                neg = lam.clamp_max(0)
                a_l = r["a_l"][:, None]
                if alpha is not None and i in alpha:
                    a_l = torch.where(r["free"][:, None], alpha[i], a_l)  # kept in [floor, 1] by the optimizer
                # pos * a_l + neg * a_u with pos = lam - neg; the lower lines of ReLUs pass through 0
                g_in = lam * a_l + neg * (r["a_u"][:, None] - a_l)
                push(node.inputs[0], g_in)
                term = total(neg * r["b_u"][:, None])  # b_u >= 0 for ReLUs, so term <= 0
                if rel.kind == "relu" and i in ctx.ball:
                    coupled, size = ctx.ball[i].offset(lam.reshape(n, s, -1), g_in.reshape(n, s, -1), rel.floor)
                    better = coupled > term
                    const = const + torch.where(better, coupled, term)
                    scale = scale + torch.where(better, size, -term)
                elif rel.kind == "relu":
                    const, scale = const + term, scale - term
                else:
                    low = total((lam - neg) * r["b_l"][:, None])
                    const = const + term + low
                    scale = scale + total((neg * r["b_u"][:, None]).abs()) + total(((lam - neg) * r["b_l"][:, None]).abs())
            elif isinstance(op, MaxPoolOp):
                r = ctx.relaxed[i].parts
                channels, length = r["top"].shape[1:]
                lam = lam.reshape(n, s, channels, length)
                sure = r["sure"][:, None]
                coef = torch.where(sure, lam, lam.clamp_min(0))
                term = torch.where(sure, 0.0, lam.clamp_max(0)) * r["top"][:, None]
                const = const + total(term)
                scale = scale + total(term.abs())
                cols = coef[:, :, :, None, :] * r["onehot"][:, None]  # (n, S, C, k, L)
                k = cols.shape[3]
                j = node.inputs[0]
                back = op.fold(cols.reshape(n * s, channels, k, length), n * s)
                push(j, back.reshape(n, s, *g.nodes[j].shape))
            else:
                assert isinstance(op, AddOp)
                push(node.inputs[0], lam)
                push(node.inputs[1], op.sign * lam)
        raise AssertionError("the backward pass never reached the input")  # pragma: no cover

    # ------------------------------------------------------------------ radius search

    def radius(self, batch: Batch, idx: torch.Tensor, known: torch.Tensor, first_order: torch.Tensor) -> torch.Tensor:
        """Largest eps per sample whose every margin bound stays positive, by bisection.

        `known` is a radius already certified (by another method, or 0): the search only
        looks above it. The upper end starts at 1.25 times the first-order radius and doubles
        while it certifies; while the bracket spans more than a factor 4 the trial is its
        geometric mean (a quarter of the top while nothing is certified), so deep nets whose
        radius is a small fraction of the first-order one are reached in a few steps. A
        trial that fails still certifies a smaller radius (`certified_within`), which
        raises the bracket's lower end. Only radii that an evaluated bound proves are
        returned, so the result is sound wherever the search stops.
        """
        n = len(idx)
        best = torch.zeros(n, dtype=torch.float64)
        low = known.clone().to(torch.float64)
        high = torch.maximum(1.25 * first_order, 2 * low).clamp_min(1e-12)
        high = torch.where(torch.isfinite(high), high, torch.full_like(high, 1e3))
        done = torch.zeros(n, dtype=torch.bool)
        bracketed = torch.zeros(n, dtype=torch.bool)
        polishes = self.polishes
        for k in range(self.budget.crown_evals):
            if polishes and k == BISECT_COLD:  # nothing proved down to 1/800 of the first-order radius: the
                done = done | (best <= 0)  # refined evaluations start cold from 1/8 of it, and prove what there is
            live = torch.nonzero(~done).flatten()
            if len(live) == 0:
                break
            lo_, hi_ = low[live], high[live]
            wide = hi_ > 4 * lo_
            split = torch.where(wide, torch.where(lo_ > 0, (lo_ * hi_).sqrt(), hi_ / 4), (lo_ + hi_) / 2)
            trial = torch.where(bracketed[live], split, hi_)
            got = self.certified_within(batch, idx[live], trial)
            ok = got >= trial
            best[live] = torch.maximum(best[live], got)
            low[live] = torch.maximum(lo_, got)
            grow = ok & ~bracketed[live]
            high[live] = torch.where(grow, 2 * trial, torch.where(ok, hi_, trial))
            bracketed[live] = bracketed[live] | ~ok
            done[live] = bracketed[live] & (high[live] - low[live] <= self.budget.tol * high[live])
        if self.polishes:
            best = self._polish(batch, idx, torch.maximum(best, known.to(torch.float64)), first_order, best)
        if self.budget.bab_evals and self.budget.bab_domains and self.relu_units <= self.budget.bab_units:
            best = self._branch(batch, idx, torch.maximum(best, known.to(torch.float64)), first_order, best)
        return best

    @property
    def polishes(self) -> bool:
        """Whether the refined evaluations run after the bisection (deep nets, within the work caps)."""
        work = self.budget.crown_window_work if self.windowed else self.budget.crown_polish_work
        return bool(self.budget.crown_polish_evals and self.deep and self.refine_cost <= work)

    def _polish(self, batch: Batch, idx: torch.Tensor, start: torch.Tensor, first_order: torch.Tensor, best):
        """Raise each radius with a few CROWN evaluations whose intermediate bounds are all refined.

        The bisection's intermediate bounds come from forward symbolic propagation, which
        loosens behind every layer of relaxations; backward refinement of every unstable
        unit (true CROWN) is tighter but costs two backward passes per unit, so it runs
        only here: the first trial is `POLISH_FIRST` times the start, later ones grow by
        `POLISH_GROW` while they certify and bisect (geometrically) once one has failed,
        never above 1.25 times the first-order radius. Where nothing is proved yet (float32
        rounding allowances, carried forward interval-style, can swamp the bisection's
        bounds at every radius on deep, wide nets) the first trial is `POLISH_COLD` times
        the first-order radius (a quarter of it again while trials prove nothing). A trial
        that certifies grows by `POLISH_GROW` to `POLISH_LEAP`, as its linear form's reach
        suggests; while trials leap, for samples that started cold, and for two evaluations
        after one that raised the radius `POLISH_JUMP`-fold, up to `POLISH_EXTRA` evaluations
        follow the budget's.
        Each trial certifies what `certified_within` proves, also where it fails.
        """
        budget = self.budget
        refine = max(budget.crown_refine, budget.crown_polish_refine)
        best = best.clone()
        low = start.clone()
        fo = torch.where(torch.isfinite(first_order), first_order.to(torch.float64), math.inf)
        ceiling = 1.25 * fo  # no trial above this
        high = torch.full_like(low, math.inf)  # smallest trial that failed
        cold = low <= 0  # nothing proved yet: start from the first-order radius
        trial = torch.where(cold, POLISH_COLD * fo, torch.minimum(POLISH_FIRST * low, ceiling))
        leaping = torch.zeros_like(cold)
        jumped = torch.zeros((2, len(cold)), dtype=torch.bool)  # in the last evaluation, and in the one before
        for k in range(budget.crown_polish_evals + POLISH_EXTRA):
            wanted = (leaping | cold | jumped.any(0)) if k >= budget.crown_polish_evals else torch.ones_like(cold)
            live = torch.nonzero(wanted & torch.isfinite(trial) & (trial > low * (1 + budget.tol))).flatten()
            if len(live) == 0:
                break
            t = trial[live]
            proved, hint = self._margins(batch, idx[live], t, refine)[1:]
            got = proved.amin(dim=1)
            best[live] = torch.maximum(best[live], got)
            jumped[1, live] = jumped[0, live]
            # (the first evaluation's growth is from the bisection's radius, a looser bound: no jump)
            jumped[0, live] = (got >= t) & (got >= POLISH_JUMP * low[live]) & (k > 0)
            low[live] = torch.maximum(low[live], got)
            high[live] = torch.where(got >= t, high[live], t)
            leap = (POLISH_REACH * hint / t).nan_to_num(POLISH_GROW).clamp(POLISH_GROW, POLISH_LEAP)
            grown = torch.minimum(leap * low[live], ceiling[live])
            leaping[live] = (got >= t) & (leap > POLISH_GROW)
            split = torch.where(low[live] > 0, (low[live] * high[live]).sqrt(), high[live] / 4)
            trial[live] = torch.where(torch.isfinite(high[live]), split, grown)
        return best

    def _branch(self, batch: Batch, idx: torch.Tensor, start: torch.Tensor, first_order: torch.Tensor, best):
        """Push each radius up by a bisection whose trials branch and bound proves (`bab.py`).

        The bracket is [start, min(max(first-order radius, 1.05 start), 2 start)]: a trial
        above the true radius spends the whole branch-and-bound budget, so the search stays
        close to what the bounds already proved. Only proved trials are kept. Domains per
        trial: `bab_domains`, fewer on wide nets (`bab_work` / multiply-adds of one pass).
        """
        domains = min(self.budget.bab_domains, self.budget.bab_work // max(1, self.pass_cost))
        if domains < 1:
            return best
        bab = BranchAndBound(self, dataclasses.replace(self.budget, bab_domains=domains))
        best = best.clone()
        for t in range(len(idx)):
            lo = float(start[t])
            if not lo > 0:
                continue
            fo = float(first_order[t]) if math.isfinite(float(first_order[t])) else 2 * lo
            hi = min(max(fo, 1.05 * lo), 2 * lo)
            for _ in range(self.budget.bab_evals):
                trial = (lo + hi) / 2
                if bab.verify(batch, int(idx[t]), trial):
                    lo = trial
                    best[t] = max(float(best[t]), trial)
                else:
                    hi = trial
        return best
