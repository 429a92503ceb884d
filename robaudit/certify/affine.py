"""The exact affine part of a network, and the Gram bounds that use it.

Every node that is an affine function of the input (normalization, the first conv or
linear layer, a batch norm after it, residual sums of such nodes) has the *exact* range
``z_i(x) +- alpha ||A_i||_2`` over the ball B_2(x, alpha): `AffinePrefix` computes the
row norms ``||A_i||`` once per model by pushing the identity basis through those nodes,
keeps the Jacobians themselves where they are small (for symbolic bounds) and the Gram
matrix ``A A^T`` of the first hidden layer.

The gradient of any margin is ``A^T u`` where u is the gradient with respect to that
layer, so ``||grad||^2 = u^T G u`` with ``G = A A^T``; over an interval of u this has the
closed-form bounds below (Hein & Andriushchenko's one-hidden-layer bound uses the corner
one, with the sign of ``C_lm = v_l v_m G_lm`` deciding each corner).
"""

from __future__ import annotations

import math

import torch

from robaudit.certify.global_lipschitz import gram_bound
from robaudit.certify.graph import Graph
from robaudit.certify.ops import AddOp, AffineOp

BASIS_CHUNK = 256
ROUND_RTOL = 1e-11  # outward rounding of bounds, relative to the sum of |terms| that formed them


class AffinePrefix:
    """Row norms (and small Jacobians) of the graph's exact affine nodes."""

    def __init__(self, graph: Graph, store_cap: int, gram_node: int | None = None) -> None:
        self.graph = graph
        self.nodes = [i for i, e in enumerate(graph.exact) if e]
        d = graph.input_dim
        sq = {i: torch.zeros(graph.nodes[i].shape, dtype=torch.float64) for i in self.nodes}
        store = {i for i in self.nodes if d * math.prod(graph.nodes[i].shape) <= store_cap}
        collect = store | ({gram_node} if gram_node is not None else set())
        parts: dict[int, list[torch.Tensor]] = {i: [] for i in collect}
        eye = torch.eye(d, dtype=torch.float64)
        for start in range(0, d, BASIS_CHUNK):
            basis = eye[start : start + BASIS_CHUNK].reshape(-1, *graph.sample_shape)
            for i, value in self._linear_pass(basis).items():
                sq[i] += (value**2).sum(dim=0)
                if i in parts:
                    parts[i].append(value)
        self.rownorm = {i: v.sqrt() for i, v in sq.items()}
        # Jacobians as (1, d, *shape): the layout of symbolic bounds (sample, input dim, unit)
        self.jacobian = {i: torch.cat(parts[i])[None] for i in store}
        self.gram: torch.Tensor | None = None
        if gram_node is not None:
            a = torch.cat(parts[gram_node]).reshape(d, -1)  # A^T: (d, n)
            self.gram = a.T @ a
            self.gram_abs = self.gram.abs()
            self.gram_norm = gram_bound(self.gram).item() * (1 + 1e-9)

    def _linear_pass(self, basis: torch.Tensor) -> dict[int, torch.Tensor]:
        """Linear parts of every exact node applied to a batch of input directions."""
        values = {0: basis}
        for i in self.nodes[1:]:
            node = self.graph.nodes[i]
            op = node.op
            if isinstance(op, AffineOp):
                values[i] = op.linear(values[node.inputs[0]])
            else:
                assert isinstance(op, AddOp)
                values[i] = values[node.inputs[0]] + op.sign * values[node.inputs[1]]
        return values


def exact_magnitudes(graph: Graph, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """|A| |x| + |b| for every exact node: the scale of the rounding error in its value."""
    values = {0: x.abs()}
    for i, node in enumerate(graph.nodes):
        if i == 0 or not graph.exact[i]:
            continue
        op = node.op
        if isinstance(op, AffineOp):
            out = op.abs().linear(values[node.inputs[0]])
            values[i] = out if op.bias is None else out + op.bias.abs()
        else:
            values[i] = values[node.inputs[0]] + values[node.inputs[1]]
    return values


def quadratic_bound(c: torch.Tensor, r: torch.Tensor, prefix: AffinePrefix) -> torch.Tensor:
    """Upper bound of u^T G u over the box u in [c - r, c + r] (rows of c, r: (R, n)).

    With u = c + t * r, |t| <= 1: c^T G c + 2 (G c)^T (t r) + (t r)^T G (t r), and the
    last term is at most min(r^T |G| r, ||G||_2 ||r||^2) since G is positive semidefinite.
    """
    gc = c @ prefix.gram
    quad = torch.minimum((r @ prefix.gram_abs * r).sum(1), prefix.gram_norm * (r * r).sum(1))
    return (gc * c).sum(1) + 2 * (gc.abs() * r).sum(1) + quad


def corner_bound(lo: torch.Tensor, hi: torch.Tensor, gram: torch.Tensor, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """sum_lm max over the four corners of G_lm u_l u_m, u_l in [lo_l, hi_l] (rows (R, n)).

    Each term is bounded separately, so the sign of G_lm (not of u_l u_m) picks the
    largest or the smallest corner product.
    """
    n = lo.shape[1]
    pos, neg = gram.clamp_min(0), gram.clamp_max(0)
    out = []
    step = max(1, chunk_elems // max(1, n * n))
    for s in range(0, lo.shape[0], step):
        a, b = lo[s : s + step], hi[s : s + step]
        aa, ab = a[:, :, None] * a[:, None, :], a[:, :, None] * b[:, None, :]
        ba, bb = ab.mT, b[:, :, None] * b[:, None, :]
        top = torch.maximum(torch.maximum(aa, ab), torch.maximum(ba, bb))
        bottom = torch.minimum(torch.minimum(aa, ab), torch.minimum(ba, bb))
        out.append((top * pos).sum((1, 2)) + (bottom * neg).sum((1, 2)))
    return torch.cat(out) if out else lo.new_zeros(0)
