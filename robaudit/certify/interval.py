"""Fast-Lip style local Lipschitz bounds by interval propagation (the generic method).

For a ball B_2(x, alpha) and every class pair (c, j), `IntervalBound.lipschitz` returns
an upper bound of max_{y in ball} ||grad f_c(y) - grad f_j(y)||_2:

1. forward pass: bounds of every node over the ball. Nodes that are affine in the input
   are exact (``z(x) +- alpha ||A_i||``); later nodes get the intersection of interval
   arithmetic (centre through W, radius through |W|) and, while the layers are small
   enough (`Budget.symbolic_cap`), symbolic linear bounds in the input perturbation
   (ReLU chord/CROWN relaxations, chord/tangent for softplus, tanh and sigmoid),
   which keep far more ReLUs stable on larger balls;
2. derivative intervals of every activation from its input bounds (stable ReLUs exact);
3. backward pass from the rows e_c - e_j for all K-1 pairs at once: interval products
   with the derivative intervals, W^T for centres and |W|^T for radii, max pooling by
   its adjoint with a [0, 1] indicator where the window's maximum is not decided;
4. at the input: sqrt(sum max(|lo|, |hi|)^2); where the first hidden layer is small, also
   the Gram quadratic-form bound of `affine.py` on the gradient there; the smaller wins;
5. where the budget has `zonotope_elems`, the zonotope backward pass of `zonotope.py`
   (which keeps the correlations step 3 drops) on the pairs that decide the radius;
   again the smaller wins.

All in float64; every bound is rounded outward and the result inflated by `LIP_RTOL`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from robaudit.certify.affine import AffinePrefix, quadratic_bound
from robaudit.certify.box import exact_box, node_box
from robaudit.certify.budget import Budget
from robaudit.certify.global_lipschitz import LIP_RTOL, GlobalLipschitz, gram_bound
from robaudit.certify.graph import Graph
from robaudit.certify.ops import ActOp, AddOp, AffineOp, MaxPoolOp
from robaudit.certify.rounding import float32_error, interval_magnitudes, pair_error
from robaudit.certify.zonotope import supported as zono_supported
from robaudit.certify.zonotope import zonotope_lipschitz

SYM_CHUNK_ELEMS = 1 << 23  # samples per symbolic pass: at most this many bound coefficients per node
ZONO_CHUNK_ELEMS = 1 << 23  # samples per zonotope pass: at most this many generator entries on any node
SYM_RTOL = 1e-10  # outward rounding of concretized symbolic bounds


@dataclass
class Batch:
    """One batch of correctly classified samples, as every bound needs it."""

    values: list[torch.Tensor]  # every node's value at x (B, *shape)
    labels: torch.Tensor  # (B,)
    others: torch.Tensor  # (B, P): the K-1 other classes
    rows: torch.Tensor  # (B, P, K): e_c - e_j
    margins: torch.Tensor  # (B, P): f_c - f_j, deflated for rounding
    magnitudes: dict[int, torch.Tensor]  # |A| |x| + |b| of the exact nodes
    error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # float32 margin error (rounding.py)


@dataclass
class Sym:
    """Linear bounds of a node in the input perturbation delta: mid(delta) -+ dev(delta).

    Coefficients are (b, d, *shape) with b = 1 while they do not depend on the sample;
    constants are (B, *shape). dev None means exact (lower = upper). Keeping the centre
    and half-width instead of lower and upper makes an affine map cost two passes
    (W on the centre, |W| on the width) instead of three.
    """

    a_mid: torch.Tensor
    c_mid: torch.Tensor
    a_dev: torch.Tensor | None = None
    c_dev: torch.Tensor | None = None


def apply_rows(fn, coef: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
    """Apply a linear map to symbolic coefficients (b, d, *shape)."""
    b, d = coef.shape[:2]
    return fn(coef.reshape(b * d, *coef.shape[2:])).reshape(b, d, *out_shape)


def _plus(u: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor | None:
    return v if u is None else (u if v is None else u + v)


def affine_sym(op: AffineOp, absop: AffineOp, sym: Sym) -> Sym:
    """Symbolic bounds through an affine op: W on the centre, |W| on the deviation."""
    shape = op.out_shape
    return Sym(
        apply_rows(op.linear, sym.a_mid, shape),
        op.apply(sym.c_mid),
        None if sym.a_dev is None else apply_rows(absop.linear, sym.a_dev, shape),
        None if sym.c_dev is None else absop.linear(sym.c_dev),
    )


def act_sym(sym: Sym, a_l, b_l, a_u, b_u) -> Sym:
    """Compose the relaxation a_l z + b_l <= s(z) <= a_u z + b_u (slopes >= 0) with z's bounds.

    With z between mid -+ dev and s_mid, s_dev the mean and half-difference of the
    slopes: mid' = s_mid mid + s_dev dev + (b_l + b_u) / 2 and
    dev' = s_dev mid + s_mid dev + (b_u - b_l) / 2; terms that are zero (equal slopes,
    a constant-only deviation) are skipped.
    """
    s_mid, s_dev = (a_l + a_u) / 2, (a_u - a_l) / 2
    equal = bool((s_dev == 0).all())  # e.g. no unstable ReLU: the deviation does not grow
    a_mid = s_mid[:, None] * sym.a_mid
    c_mid = s_mid * sym.c_mid + (b_l + b_u) / 2
    a_dev = None if sym.a_dev is None else s_mid[:, None] * sym.a_dev
    c_dev = (b_u - b_l) / 2 + (0 if sym.c_dev is None else s_mid * sym.c_dev)
    if not equal:
        if sym.a_dev is not None:
            a_mid = a_mid + s_dev[:, None] * sym.a_dev
        if sym.c_dev is not None:
            c_mid = c_mid + s_dev * sym.c_dev
        extra = s_dev[:, None] * sym.a_mid
        a_dev = extra if a_dev is None else a_dev + extra
        c_dev = c_dev + s_dev * sym.c_mid
    return Sym(a_mid, c_mid, a_dev, c_dev)


def add_sym(x: Sym, y: Sym, sign: float) -> Sym:
    return Sym(x.a_mid + sign * y.a_mid, x.c_mid + sign * y.c_mid, _plus(x.a_dev, y.a_dev), _plus(x.c_dev, y.c_dev))


def intersect(
    sym: Sym, a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, rtol: float = SYM_RTOL
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concretize symbolic bounds over the ball (c -+ alpha ||row||) and keep the tighter side."""
    if sym.a_dev is None:
        n_lo = n_hi = a * sym.a_mid.norm(dim=1)
    else:
        n_lo, n_hi = a * (sym.a_mid - sym.a_dev).norm(dim=1), a * (sym.a_mid + sym.a_dev).norm(dim=1)
    dev = 0 if sym.c_dev is None else sym.c_dev
    c_lo, c_hi = sym.c_mid - dev, sym.c_mid + dev
    s_lo = c_lo - n_lo - rtol * (1 + c_lo.abs() + n_lo)
    s_hi = c_hi + n_hi + rtol * (1 + c_hi.abs() + n_hi)
    new_lo, new_hi = torch.maximum(lo, s_lo), torch.minimum(hi, s_hi)
    crossed = new_lo > new_hi  # only rounding can cross them: fall back to the box
    return torch.where(crossed, lo, new_lo), torch.where(crossed, hi, new_hi)


def frontier(graph: Graph) -> list[int]:
    """Exact (affine-in-input) nodes that feed a nonlinear part of the graph."""
    return [i for i, e in enumerate(graph.exact) if e and any(not graph.exact[c] for c in graph.consumers[i])]


def chains(graph: Graph) -> dict[int, list[int]]:
    """Maximal runs of single-input affine nodes, keyed by their last node (first node first)."""
    nodes, consumers = graph.nodes, graph.consumers
    out: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        if not isinstance(node.op, AffineOp):
            continue
        nxt = consumers[i]
        if len(nxt) == 1 and isinstance(nodes[nxt[0]].op, AffineOp):
            continue  # interior: the chain goes on
        run = [i]
        j = node.inputs[0]
        while isinstance(nodes[j].op, AffineOp) and len(consumers[j]) == 1:
            run.append(j)
            j = nodes[j].inputs[0]
        out[i] = run[::-1]
    return out


Jac = tuple[torch.Tensor, torch.Tensor | None]  # (mid, radius) of a Jacobian interval, (b, d, *shape)


def _interval_product(c: torch.Tensor, r: torch.Tensor | None, d_lo: torch.Tensor, d_hi: torch.Tensor):
    """[c - r, c + r] * [d_lo, d_hi] elementwise, as (low, high)."""
    if r is None:
        p1, p2 = c * d_lo, c * d_hi
        return torch.minimum(p1, p2), torch.maximum(p1, p2)
    lo_c, hi_c = c - r, c + r
    prods = (lo_c * d_lo, lo_c * d_hi, hi_c * d_lo, hi_c * d_hi)
    low = torch.minimum(torch.minimum(prods[0], prods[1]), torch.minimum(prods[2], prods[3]))
    high = torch.maximum(torch.maximum(prods[0], prods[1]), torch.maximum(prods[2], prods[3]))
    return low, high


class IntervalBound:
    name = "interval"

    def __init__(
        self,
        graph: Graph,
        budget: Budget,
        *,
        gram: bool = True,
        symbolic: bool = True,
        jacobian: bool = True,
        lipschitz: GlobalLipschitz | None = None,
        zonotope: bool = True,
    ) -> None:
        self.graph = graph
        d = graph.input_dim
        front = frontier(graph)
        self.gram_node = None
        if gram and len(front) == 1 and front[0] != 0 and math.prod(graph.nodes[front[0]].shape) <= budget.gram_cap:
            self.gram_node = front[0]
        cap = budget.symbolic_cap if symbolic else 0
        self.prefix = AffinePrefix(graph, cap, self.gram_node)
        self.sym_ok = [d * math.prod(node.shape) <= cap for node in graph.nodes]
        self.jacobian = jacobian and cap > 0
        self.abs_ops = {i: n.op.abs() for i, n in enumerate(graph.nodes) if isinstance(n.op, AffineOp)}
        self.chains = chains(graph)
        self.bases = {end: graph.nodes[run[0]].inputs[0] for end, run in self.chains.items()}
        self.terminals = set(self.chains) | set(self.bases.values())
        glob = lipschitz or GlobalLipschitz(graph)
        self.global_lip = {i: glob.lip(i) * (1 + 1e-9) for i in self.terminals}
        widest = max([d * math.prod(n.shape) for i, n in enumerate(graph.nodes) if self.sym_ok[i]], default=1)
        self.chunk = max(1, SYM_CHUNK_ELEMS // widest) if cap else 1 << 30
        self.zonotope = budget.zonotope_elems if zonotope and zono_supported(graph) else 0
        self.sdp_steps = budget.zonotope_sdp_steps
        self.pairs = budget.zonotope_pairs

    # ------------------------------------------------------------------ public

    def lipschitz(self, batch: Batch, idx: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """(len(idx), P) upper bounds of the gradient-difference norm over B_2(x, alpha)."""
        parts, errors = [], []
        for s in range(0, len(idx), self.chunk):
            sub, a = idx[s : s + self.chunk], alpha[s : s + self.chunk]
            lo, hi, deriv, sigma = self._forward(batch, sub, a)
            bound = self._backward(batch, sub, lo, hi, deriv, {})
            if sigma:  # terminations are chosen greedily: keep the plain pass when it was better
                bound = torch.minimum(bound, self._backward(batch, sub, lo, hi, deriv, sigma))
            if self.zonotope:
                bound = torch.minimum(bound, self._zonotope(batch, sub, deriv, bound))
            parts.append(bound)
            # the forward pass already bounds every node over this ball: the float32 error comes cheap
            err = float32_error(self.graph, interval_magnitudes(lo, hi), (lo, hi))
            errors.append(pair_error(err, batch.labels[sub], batch.others[sub]))
        self._last_error = (idx, alpha, torch.cat(errors))
        return torch.cat(parts) * (1 + LIP_RTOL)

    def _zonotope(self, batch: Batch, idx: torch.Tensor, deriv, bound: torch.Tensor) -> torch.Tensor:
        """The zonotope bound (`zonotope.py`) on each sample's `Budget.zonotope_pairs` closest pairs.

        The pairs are those with the smallest margin / interval bound (`bound`, (b, P)): the
        ones that decide the radius. Every other pair keeps +inf (its interval bound
        stands), as does every chunk whose zonotope outgrows `Budget.zonotope_elems`.
        """
        pairs = min(self.pairs, bound.shape[1])
        close = (batch.margins[idx] / bound).topk(pairs, dim=1, largest=False).indices  # (b, q)
        rows = batch.rows[idx].gather(1, close[..., None].expand(-1, -1, batch.rows.shape[2]))
        picked = torch.full(rows.shape[:2], torch.inf, dtype=rows.dtype)
        step = max(1, ZONO_CHUNK_ELEMS // (pairs * self.zonotope))
        for s in range(0, len(idx), step):
            part = {i: (lo[s : s + step], hi[s : s + step]) for i, (lo, hi) in deriv.items()}
            z = zonotope_lipschitz(
                self.graph, rows[s : s + step], part, self.zonotope, self.sdp_steps, self.prefix.jacobian
            )
            if z is not None:
                picked[s : s + step] = z
        out = torch.full_like(bound, torch.inf)
        return out.scatter(1, close, picked)

    def ball_error(self, batch: Batch, idx: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """(len(idx), P) float32 margin error over B_2(x, alpha): reused from the last `lipschitz` call on that ball."""
        last = getattr(self, "_last_error", None)
        if last is not None and last[0] is idx and last[1] is alpha:
            return last[2]
        lo, hi = self._forward(batch, idx, alpha)[:2]
        err = float32_error(self.graph, interval_magnitudes(lo, hi), (lo, hi))
        return pair_error(err, batch.labels[idx], batch.others[idx])

    # ------------------------------------------------------------------ forward

    @staticmethod
    def _spectral(jac: Jac) -> torch.Tensor:
        """Per sample: sigma(J_mid) + sigma(J_rad) >= ||J^T|| for every J in the Jacobian interval."""
        out = 0.0
        for part in jac:
            if part is None:
                continue
            m = part.reshape(part.shape[0], part.shape[1], -1)
            gram = m @ m.mT if m.shape[1] <= m.shape[2] else m.mT @ m
            out = out + gram_bound(gram).clamp_min(0).sqrt()
        return out

    def _forward(self, batch: Batch, idx: torch.Tensor, alpha: torch.Tensor):
        g = self.graph
        n = len(g.nodes)
        lo: list[torch.Tensor | None] = [None] * n
        hi: list[torch.Tensor | None] = [None] * n
        sym: list[Sym | None] = [None] * n
        jac: list[Jac | None] = [None] * n  # Jacobian of the node w.r.t. the input over the ball: (mid, radius)
        sigma: dict[int, torch.Tensor] = {}
        deriv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        pending = [len(c) for c in g.consumers]
        for i, node in enumerate(g.nodes):
            a = alpha.view(-1, *([1] * len(node.shape)))
            op = node.op
            if g.exact[i]:
                v = batch.values[i][idx]
                lo[i], hi[i] = exact_box(v, self.prefix.rownorm[i], alpha, batch.magnitudes[i][idx])
                if i in self.prefix.jacobian:
                    sym[i] = Sym(self.prefix.jacobian[i], v)
                    jac[i] = (self.prefix.jacobian[i], None)
            elif isinstance(op, AffineOp):
                j = node.inputs[0]
                lo[i], hi[i] = node_box(op, [lo[j]], [hi[j]], self.abs_ops[i])
                if sym[j] is not None and self.sym_ok[i]:
                    sym[i] = affine_sym(op, self.abs_ops[i], sym[j])
                if jac[j] is not None and self.sym_ok[i]:
                    jm, jr = jac[j]
                    jac[i] = (
                        apply_rows(op.linear, jm, node.shape),
                        None if jr is None else apply_rows(self.abs_ops[i].linear, jr, node.shape),
                    )
            elif isinstance(op, ActOp):
                j = node.inputs[0]
                lj, hj = lo[j], hi[j]
                d_lo, d_hi = op.derivative_bounds(lj, hj)
                deriv[i] = (d_lo, d_hi)
                lo[i], hi[i] = node_box(op, [lj], [hj])
                if sym[j] is not None and self.sym_ok[i]:
                    sym[i] = act_sym(sym[j], *op.relaxation(lj, hj, d_lo, d_hi))
                if jac[j] is not None and self.sym_ok[i]:
                    jm, jr = jac[j]
                    low, high = _interval_product(jm, jr, d_lo[:, None], d_hi[:, None])
                    jac[i] = ((low + high) / 2, (high - low) / 2)
            elif isinstance(op, MaxPoolOp):
                j = node.inputs[0]
                lo[i], hi[i] = node_box(op, [lo[j]], [hi[j]])
            else:
                assert isinstance(op, AddOp)
                j, k = node.inputs
                lo[i], hi[i] = node_box(op, [lo[j], lo[k]], [hi[j], hi[k]])
                if sym[j] is not None and sym[k] is not None and self.sym_ok[i]:
                    sym[i] = add_sym(sym[j], sym[k], op.sign)
                if jac[j] is not None and jac[k] is not None and self.sym_ok[i]:
                    (mj, rj), (mk, rk) = jac[j], jac[k]
                    rads = [t for t in (rj, rk) if t is not None]
                    jac[i] = (mj + op.sign * mk, sum(rads) if rads else None)
            if sym[i] is not None and not g.exact[i]:
                lo[i], hi[i] = intersect(sym[i], a, lo[i], hi[i])
            if i in self.terminals:
                bound = torch.full((len(idx),), self.global_lip[i], dtype=torch.float64)
                if self.jacobian and jac[i] is not None and not g.exact[i]:
                    bound = torch.minimum(bound, self._spectral(jac[i]) * (1 + 1e-9))
                sigma[i] = bound
            for j in node.inputs:
                pending[j] -= 1
                if pending[j] == 0:
                    sym[j] = None
                    jac[j] = None
        return lo, hi, deriv, sigma

    # ------------------------------------------------------------------ backward

    def _backward(self, batch: Batch, idx: torch.Tensor, lo, hi, deriv, sigma) -> torch.Tensor:
        """Gradient enclosure c +- r pushed from the logits to the input, plus terminated parts.

        Interval radii go through |W|^T, which on wide layers grows like sqrt(fan-in). At
        the ends of each affine chain a row's radius r_k can instead be *terminated*:
        its whole contribution to the input gradient is J_k(y)^T e with |e| <= r_k, at most
        sigma_k ||r_k|| where sigma_k bounds ||J_k(y)|| over the ball (the spectral norm
        of the node's Jacobian interval, or its global Lipschitz bound). A row terminates
        where that is smaller than carrying the radius one chain further.
        """
        g = self.graph
        rows = batch.rows[idx]
        b, p = rows.shape[:2]
        last = len(g.nodes) - 1
        state: dict[int, list] = {last: [rows, None]}
        spent = torch.zeros(b, p, dtype=rows.dtype)  # terminated contributions

        def push(j: int, c: torch.Tensor, r: torch.Tensor | None) -> None:
            if j not in state:
                state[j] = [c, r]
                return
            old = state[j]
            old[0] = old[0] + c
            old[1] = r if old[1] is None else (old[1] if r is None else old[1] + r)

        def size(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, p, -1).norm(dim=2)

        gram_l = None
        for i in range(last, -1, -1):
            if i not in state:
                continue
            c, r = state.pop(i)
            if i == self.gram_node:
                rr = torch.zeros_like(c) if r is None else r
                q = quadratic_bound(c.reshape(b * p, -1), rr.reshape(b * p, -1), self.prefix).clamp_min(0)
                gram_l = q.sqrt().reshape(b, p) + spent
            node = g.nodes[i]
            op = node.op
            if op is None:
                total = c.abs() if r is None else c.abs() + r
                interval_l = size(total) + spent
                return interval_l if gram_l is None else torch.minimum(interval_l, gram_l)
            if isinstance(op, AffineOp):
                run = self.chains[i]
                r_top = r
                for k in reversed(run):
                    shape, shape_in = g.nodes[k].shape, g.nodes[g.nodes[k].inputs[0]].shape
                    c = g.nodes[k].op.adjoint(c.reshape(b * p, *shape)).reshape(b, p, *shape_in)
                    if r is not None:
                        r = self.abs_ops[k].adjoint(r.reshape(b * p, *shape)).reshape(b, p, *shape_in)
                base = self.bases[i]
                if r is not None and i in sigma:
                    here = sigma[i][:, None] * size(r_top)
                    later = sigma[base][:, None] * size(r) if base in sigma else torch.full_like(here, torch.inf)
                    stop = here <= later
                    spent = torch.where(stop, spent + here, spent)
                    r = torch.where(stop.view(b, p, *[1] * (r.dim() - 2)), 0.0, r)
                push(base, c, r)
            elif isinstance(op, ActOp):
                d_lo, d_hi = (t[:, None] for t in deriv[i])
                low, high = _interval_product(c, r, d_lo, d_hi)
                push(node.inputs[0], (low + high) / 2, (high - low) / 2)
            elif isinstance(op, MaxPoolOp):
                j = node.inputs[0]
                push(j, *self._maxpool_back(op, c, r, lo[j], hi[j], g.nodes[j].shape))
            else:
                assert isinstance(op, AddOp)
                push(node.inputs[0], c, r)
                push(node.inputs[1], op.sign * c, r)
        raise AssertionError("the backward pass never reached the input")  # pragma: no cover

    @staticmethod
    def _maxpool_back(op: MaxPoolOp, c, r, lo_in, hi_in, in_shape):
        """Adjoint of max pooling over the ball: a position gets [0, 1] unless surely (not) the max."""
        b, p = c.shape[:2]
        w_lo = op.windows(lo_in, -math.inf)  # (b, C, k, L)
        w_hi = op.windows(hi_in, -math.inf)
        can = w_hi >= w_lo.amax(dim=2, keepdim=True)
        if w_hi.shape[2] > 1:
            top = w_hi.topk(2, dim=2)
            first, second = top.values[:, :, :1], top.values[:, :, 1:2]
            where = torch.arange(w_hi.shape[2]).view(1, 1, -1, 1) == top.indices[:, :, :1]
            sure = w_lo > torch.where(where, second, first)
        else:
            sure = torch.ones_like(can)
        channels, length = w_lo.shape[1], w_lo.shape[3]
        g = c.reshape(b, p, channels, 1, length)
        gr = torch.zeros_like(g) if r is None else r.reshape(b, p, channels, 1, length)
        g_lo, g_hi = g - gr, g + gr
        can, sure = can[:, None], sure[:, None]
        low = torch.where(can, torch.where(sure, g_lo, g_lo.clamp_max(0)), 0.0)
        high = torch.where(can, torch.where(sure, g_hi, g_hi.clamp_min(0)), 0.0)
        k = w_lo.shape[2]
        low, high = low.expand(b, p, channels, k, length), high.expand(b, p, channels, k, length)
        cj = op.fold(((low + high) / 2).reshape(b * p, channels, k, length), b * p)
        rj = op.fold(((high - low) / 2).reshape(b * p, channels, k, length), b * p)
        return cj.reshape(b, p, *in_shape), rj.reshape(b, p, *in_shape)
