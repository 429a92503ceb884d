"""Global Lipschitz bound: the fallback certificate, valid for every op the graph supports.

``L_cj <= ||W_tail[c] - W_tail[j]||_2 * Lip(input of the tail)``, where the tail is the
affine chain that ends in the logits and Lip of each node multiplies sound *upper*
bounds of the spectral norms along the graph (residual sums add, activations multiply by
their largest slope, max pooling by the square root of its window overlap).

Spectral norms must be upper bounds: power iteration only gives a lower estimate, so
this module uses
- Gram iteration (Delattre et al. 2023): ``||W||_2 <= ||G_t||_F^(1/2^t)`` with
  ``G_{t+1} = G_t^H G_t``, rescaled each step so nothing overflows;
- for convolutions too large to write as a matrix, Gram iteration on every frequency of
  the kernel's 2-D DFT over the zero-padded canvas (Sedghi et al. 2019: the circular
  convolution on that canvas contains the zero-padded one as a submatrix, and a strided
  convolution is a row subset of the stride-1 one);
- Schur's bound ``sqrt(max row sum * max column sum)`` of |A| for any linear op.
Each is taken as the minimum over what applies; all in float64.
"""

from __future__ import annotations

import math

import torch

from robaudit.certify.graph import Graph
from robaudit.certify.ops import ActOp, AddOp, AffineOp, ConvOp, DenseOp, MaxPoolOp, PadOp, ReshapeOp, ScaleOp, SelectOp
from robaudit.certify.radius import ErrorFn, ratio_radius

LIP_RTOL = 1e-6  # relative inflation of every Lipschitz bound, for rounding
DENSE_LIMIT = 1 << 22  # write a linear map as a matrix while in x out <= this (32 MB in float64)
GRAM_STEPS = 8


def gram_bound(m: torch.Tensor, steps: int = GRAM_STEPS) -> torch.Tensor:
    """Upper bound of the spectral norm of each matrix in a batch (..., a, b), real or complex."""
    w = m.to(torch.complex128 if m.is_complex() else torch.float64)
    if w.shape[-2] < w.shape[-1]:
        w = w.mT.conj() if w.is_complex() else w.mT
    log_bound = torch.zeros(w.shape[:-2], dtype=torch.float64)
    scale = 1.0
    for _ in range(steps):
        f = torch.linalg.matrix_norm(w).clamp_min(1e-300)
        log_bound = log_bound + f.log() * scale
        w = w / f[..., None, None]
        w = (w.mT.conj() if w.is_complex() else w.mT) @ w
        scale /= 2
    log_bound = log_bound + torch.linalg.matrix_norm(w).clamp_min(1e-300).log() * scale
    zero = torch.linalg.matrix_norm(m.to(w.dtype)) == 0
    return torch.where(zero, torch.zeros_like(log_bound), log_bound.exp())


def materialize(ops: list[AffineOp], in_shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix (out, in) of a chain of linear parts, by pushing the identity basis through."""
    n = math.prod(in_shape)
    x = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    for op in ops:
        x = op.linear(x)
    return x.reshape(n, -1).T


def schur_bound(op: AffineOp) -> float:
    """sqrt(||A||_1 ||A||_inf) from |A| applied to ones (row sums) and |A|^T to ones (column sums)."""
    absop = op.abs()
    rows = absop.linear(torch.ones((1, *op.in_shape), dtype=torch.float64)).max().item()
    cols = absop.adjoint(torch.ones((1, *op.out_shape), dtype=torch.float64)).max().item()
    return math.sqrt(max(rows, 0.0) * max(cols, 0.0))


def conv_fft_bound(op: ConvOp) -> float:
    """Largest per-frequency spectral norm of the kernel's DFT on the zero-padded canvas."""
    w = op.weight
    if op.groups > 1:  # block-diagonal over groups: write the dense (C_out, C_in) kernel
        c_out, c_in_g = w.shape[:2]
        dense = torch.zeros(c_out, c_in_g * op.groups, *w.shape[2:], dtype=w.dtype)
        per = c_out // op.groups
        for g in range(op.groups):
            dense[g * per : (g + 1) * per, g * c_in_g : (g + 1) * c_in_g] = w[g * per : (g + 1) * per]
        w = dense
    dh, dw = op.dilation
    if (dh, dw) != (1, 1):
        kh, kw = w.shape[2:]
        dil = torch.zeros(*w.shape[:2], (kh - 1) * dh + 1, (kw - 1) * dw + 1, dtype=w.dtype)
        dil[:, :, ::dh, ::dw] = w
        w = dil
    h, wd = op.in_shape[-2:]
    canvas = (max(h + 2 * op.padding[0], w.shape[2]), max(wd + 2 * op.padding[1], w.shape[3]))
    spectrum = torch.fft.rfft2(w, s=canvas)  # (C_out, C_in, Nh, Nw//2+1)
    per_freq = spectrum.permute(2, 3, 0, 1).reshape(-1, *spectrum.shape[:2])
    return gram_bound(per_freq).max().item()


def op_norm(op: AffineOp) -> float:
    """A sound upper bound of the spectral norm of one affine op's linear part."""
    if isinstance(op, (ReshapeOp, PadOp)):
        return 1.0
    if isinstance(op, SelectOp):
        return math.sqrt(op.multiplicity)
    if isinstance(op, ScaleOp):
        return op.weight.abs().max().item()
    if isinstance(op, DenseOp):
        return gram_bound(op.weight).item()
    bounds = [schur_bound(op)]
    if op.in_numel * op.out_numel <= DENSE_LIMIT:
        bounds.append(gram_bound(materialize([op], op.in_shape)).item())
    if isinstance(op, ConvOp):
        bounds.append(conv_fft_bound(op))
    return min(bounds)


def chain_norm(ops: list[AffineOp]) -> float:
    """Norm bound of a composition: the composite matrix when small, else the product of norms."""
    if len(ops) > 1 and ops[0].in_numel * max(op.out_numel for op in ops) <= DENSE_LIMIT:
        return gram_bound(materialize(ops, ops[0].in_shape)).item()
    return math.prod(op_norm(op) for op in ops)


class GlobalLipschitz:
    """Per class pair constants L_cj for the whole input space, computed once per model."""

    name = "global-lipschitz"

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._lip: dict[int, float] = {}
        self.chains: dict[int, tuple[float, int]] = {}  # affine node -> (norm bound of its chain, node before it), uninflated
        nodes, consumers = graph.nodes, graph.consumers
        for i, node in enumerate(nodes):  # topological order keeps the memoized recursion shallow
            interior = isinstance(node.op, AffineOp) and len(consumers[i]) == 1
            if not (interior and isinstance(nodes[consumers[i][0]].op, AffineOp)):
                self.lip(i)
        tail_ops, base = self._chain(len(graph.nodes) - 1)
        if tail_ops:
            k = graph.num_classes
            rows = torch.eye(k, dtype=torch.float64)
            for op in reversed(tail_ops):
                rows = op.adjoint(rows.reshape(k, *op.out_shape))
            rows = rows.reshape(k, -1)
            diff = (rows[:, None, :] - rows[None, :, :]).norm(dim=2)
            self.pair = diff * self.lip(base)
        else:
            self.pair = torch.full((graph.num_classes,) * 2, math.sqrt(2) * self.lip(base), dtype=torch.float64)
        self.pair = self.pair * (1 + LIP_RTOL)

    def chain_nodes(self, i: int) -> tuple[list[int], int]:
        """The single-input affine nodes ending at node i (interior nodes used only there), i first, and the node before."""
        nodes, consumers = self.graph.nodes, self.graph.consumers
        out: list[int] = []
        j = i
        while isinstance(nodes[j].op, AffineOp) and (j == i or len(consumers[j]) == 1):
            out.append(j)
            j = nodes[j].inputs[0]
        return out, j

    def _chain(self, i: int) -> tuple[list[AffineOp], int]:
        """The ops of `chain_nodes`, first op first, and the node before."""
        chain, base = self.chain_nodes(i)
        return [self.graph.nodes[k].op for k in reversed(chain)], base

    def lip(self, i: int) -> float:
        """Upper bound of the L2 Lipschitz constant of node i as a function of the pixels."""
        if i in self._lip:
            return self._lip[i]
        node = self.graph.nodes[i]
        op = node.op
        if op is None:
            value = 1.0
        elif isinstance(op, AffineOp):
            ops, base = self._chain(i)
            self.chains[i] = (chain_norm(ops), base)
            value = self.chains[i][0] * self.lip(base)
        elif isinstance(op, ActOp):
            value = op.max_slope * self.lip(node.inputs[0])
        elif isinstance(op, MaxPoolOp):
            value = math.sqrt(op.overlap) * self.lip(node.inputs[0])
        elif isinstance(op, AddOp):
            value = self.lip(node.inputs[0]) + self.lip(node.inputs[1])
        else:  # pragma: no cover - graph.py emits only the ops above
            raise TypeError(type(op))
        self._lip[i] = value
        return value

    def radius(
        self, margins: torch.Tensor, labels: torch.Tensor, others: torch.Tensor, error: ErrorFn | None = None
    ) -> torch.Tensor:
        """min_j (margin_j - E_j) / L_cj for margins (B, P) against classes `others` (B, P).

        `error` bounds the float32 rounding of each margin over a ball (`radius.ratio_radius`).
        """
        return ratio_radius(margins, self.pair[labels[:, None], others], error)
