"""Closed-form local Lipschitz bound for networks with one hidden layer (Hein & Andriushchenko 2017).

f_r(x) = sum_l w_rl s(<u_l, x> + b_l) (any affine maps before and after the single
elementwise activation s). With v = w_c - w_j and s_l = s'(a_l(y)):

    ||grad(f_c - f_j)(y)||^2 = sum_lm C_lm s_l s_m,   C_lm = v_l v_m <u_l, u_m>.

On B_2(x, alpha) the pre-activation a_l lies exactly in a_l(x) +- alpha ||u_l||, which
gives an interval for s_l (monotone derivative: its ends; tanh/sigmoid: the peak when 0
is inside). Each term is bounded by its largest corner product, chosen by the sign of
C_lm (not of v_l v_m: <u_l, u_m> can be negative), and the Gram quadratic-form bound of
`affine.py` is taken too; the smaller one wins.
"""

from __future__ import annotations

import math

import torch

from robaudit.certify.affine import ROUND_RTOL, AffinePrefix, corner_bound, quadratic_bound
from robaudit.certify.budget import Budget
from robaudit.certify.global_lipschitz import LIP_RTOL
from robaudit.certify.graph import Graph
from robaudit.certify.interval import Batch, frontier
from robaudit.certify.ops import ActOp, AffineOp

def hidden_layer(graph: Graph, max_units: int = 4096) -> int | None:
    """The activation node of a one-hidden-layer network, or None if the graph is not one.

    Wider hidden layers are left to the interval method: the Gram matrix has units^2 entries.
    """
    non_exact = [i for i, e in enumerate(graph.exact) if not e]
    acts = [i for i in non_exact if isinstance(graph.nodes[i].op, ActOp)]
    if len(acts) != 1 or acts[0] != non_exact[0]:
        return None
    h = acts[0]
    if frontier(graph) != [graph.nodes[h].inputs[0]]:
        return None
    for i in non_exact[1:]:  # everything after the activation: an affine chain of it alone
        node = graph.nodes[i]
        if not isinstance(node.op, AffineOp) or graph.exact[node.inputs[0]]:
            return None
    if math.prod(graph.nodes[h].shape) > max_units:
        return None
    return h


class ClosedFormBound:
    name = "closed-form"

    def __init__(self, graph: Graph, budget: Budget, hidden: int) -> None:
        self.graph = graph
        self.hidden = hidden
        self.pre = graph.nodes[hidden].inputs[0]
        self.act: ActOp = graph.nodes[hidden].op
        self.prefix = AffinePrefix(graph, 0, self.pre)
        self.units = math.prod(graph.nodes[hidden].shape)
        self.corner = self.units <= budget.corner_cap
        self.suffix = [i for i in range(hidden + 1, len(graph.nodes))]

    def output_weights(self, rows: torch.Tensor) -> torch.Tensor:
        """v = W_suffix^T (e_c - e_j): (B, P, units), exact (the suffix is affine)."""
        b, p = rows.shape[:2]
        g = rows.reshape(b * p, -1)
        for i in reversed(self.suffix):
            node = self.graph.nodes[i]
            g = node.op.adjoint(g.reshape(b * p, *node.shape))
        return g.reshape(b, p, -1)

    def lipschitz(self, batch: Batch, idx: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        v = self.output_weights(batch.rows[idx])
        b, p, n = v.shape
        pre = batch.values[self.pre][idx].reshape(b, n)
        rad = alpha[:, None] * self.prefix.rownorm[self.pre].reshape(1, n)
        rad = rad + ROUND_RTOL * batch.magnitudes[self.pre][idx].reshape(b, n)
        d_lo, d_hi = self.act.derivative_bounds(pre - rad, pre + rad)
        p1, p2 = v * d_lo[:, None], v * d_hi[:, None]
        u_lo, u_hi = torch.minimum(p1, p2).reshape(b * p, n), torch.maximum(p1, p2).reshape(b * p, n)
        q = quadratic_bound((u_lo + u_hi) / 2, (u_hi - u_lo) / 2, self.prefix)
        if self.corner:
            q = torch.minimum(q, corner_bound(u_lo, u_hi, self.prefix.gram))
        return q.clamp_min(0).sqrt().reshape(b, p) * (1 + LIP_RTOL)
