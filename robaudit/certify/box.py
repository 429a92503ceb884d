"""Plain interval arithmetic over an L2 ball, one graph node at a time.

Every bound in this package starts from the same boxes: a node that is affine in the
pixels has the exact range ``z(x) +- eps ||A_i||`` over B_2(x, eps); any other node gets
its box from its inputs' boxes (centre through W and radius through |W| for affine ops,
interval ends through monotone activations and max pooling, sums for residual adds).
Each box is rounded outward for the float64 arithmetic that formed it.
"""

from __future__ import annotations

import torch

from robaudit.certify.affine import ROUND_RTOL
from robaudit.certify.ops import ActOp, AddOp, AffineOp, MaxPoolOp, Op


def exact_box(
    value: torch.Tensor, rownorm: torch.Tensor, eps: torch.Tensor, magnitude: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Range of an affine-in-the-pixels node: value +- eps ||row|| (eps (B,) per sample)."""
    rad = eps.view(-1, *([1] * (value.dim() - 1))) * rownorm + ROUND_RTOL * magnitude
    return value - rad, value + rad


def node_box(
    op: Op, lo: list[torch.Tensor], hi: list[torch.Tensor], abs_op: AffineOp | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box of a node from the boxes of its inputs (`abs_op`: the op's |W|, if already built)."""
    if isinstance(op, AffineOp):
        m, r = (lo[0] + hi[0]) / 2, (hi[0] - lo[0]) / 2
        rad = (abs_op or op.abs()).linear(r + ROUND_RTOL * m.abs())
        if op.bias is not None:
            rad = rad + ROUND_RTOL * op.bias.abs()
        c = op.apply(m)
        return c - rad, c + rad
    if isinstance(op, ActOp):
        s_lo, s_hi = op.value(lo[0]), op.value(hi[0])
        tol = ROUND_RTOL * (s_lo.abs() + s_hi.abs())
        return s_lo - tol, s_hi + tol
    if isinstance(op, MaxPoolOp):
        return op.value(lo[0]), op.value(hi[0])
    assert isinstance(op, AddOp)
    if op.sign > 0:
        low, high = lo[0] + lo[1], hi[0] + hi[1]
    else:
        low, high = lo[0] - hi[1], hi[0] - lo[1]
    tol = ROUND_RTOL * (low.abs() + high.abs())
    return low - tol, high + tol
