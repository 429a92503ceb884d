"""The primitive operations a network is reduced to before it is bounded.

Every op works on a batch of *samples*: a tensor of shape ``(M, *in_shape)`` where
``in_shape`` is the op's input shape traced at batch size 1 (so it usually starts with
a 1). Keeping the traced batch-1 layout lets one op serve the centre values, interval
radii, the rows of symbolic bounds (``M = samples x input dims``) and the backward
gradient rows (``M = samples x class pairs``) alike. All weights are float64 copies.

Three kinds:
- ``AffineOp``: ``linear(x) + bias``; knows its adjoint (backward pass), its entrywise
  absolute value (interval radii) and its positive part (symbolic bounds);
- ``ActOp``: an elementwise monotone activation with derivative intervals and linear
  relaxations;
- ``MaxPoolOp`` and ``AddOp`` (residual sum or difference of two tensors).

Among the affine ops, ``ReshapeOp``, ``PadOp`` and ``SelectOp`` only move values (and
fill constants): they add no rounding and have 0/1 weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Shape = tuple[int, ...]


def _rows(x: torch.Tensor, shape: Shape, trailing: int) -> torch.Tensor:
    """(M, *shape) -> (M * prod(shape[:-trailing]), *shape[-trailing:]): the layout torch's 2-D ops want."""
    return x.reshape(-1, *shape[len(shape) - trailing :])


# --------------------------------------------------------------------------- affine ops


@dataclass(eq=False)
class AffineOp:
    """An affine map ``x -> linear(x) + bias`` between per-sample shapes."""

    name: str
    in_shape: Shape
    out_shape: Shape
    bias: torch.Tensor | None = None  # broadcastable to (1, *out_shape) after a leading batch dim
    nonneg: bool = False  # all weights >= 0: |A| = A and the positive part is A itself

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        """A^T g for g of shape (M, *out_shape); the generic version differentiates `linear`."""
        primal = torch.zeros((g.shape[0], *self.in_shape), dtype=g.dtype)
        _, vjp = torch.func.vjp(self.linear, primal)
        return vjp(g)[0]

    def abs(self) -> AffineOp:
        """The op with entrywise absolute weights (interval radii go through |A|).

        Only an op declared nonnegative is its own |A|; a signed op must override this,
        so a new op cannot silently propagate radii through signed weights.
        """
        return self._nonneg_self("abs")

    def pos(self) -> AffineOp:
        """The op with the positive part of the weights (symbolic bounds split A = A+ + A-)."""
        return self._nonneg_self("pos")

    def _nonneg_self(self, what: str) -> AffineOp:
        if not self.nonneg:
            raise NotImplementedError(f"{type(self).__name__}.{what}(): signed op without an override")
        return self

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if self.bias is None else out + self.bias

    @property
    def in_numel(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_numel(self) -> int:
        return math.prod(self.out_shape)


class _SignedWeights:
    """abs / pos of an op whose linear map applies its `weight` tensor: the same op with |W| or W+
    (no bias, declared nonnegative), every other field (shapes, stride, padding, ...) kept."""

    def abs(self):  # type: ignore[no-untyped-def]
        return dataclasses.replace(self, weight=self.weight.abs(), bias=None, nonneg=True)

    def pos(self):  # type: ignore[no-untyped-def]
        return dataclasses.replace(self, weight=self.weight.clamp_min(0), bias=None, nonneg=True)


@dataclass(eq=False)
class DenseOp(_SignedWeights, AffineOp):
    """``x @ W^T`` over the last dimension (nn.Linear, Gemm, MatMul with a constant matrix)."""

    weight: torch.Tensor = field(default=None)  # (out, in)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        return g @ self.weight


@dataclass(eq=False)
class ConvOp(_SignedWeights, AffineOp):
    """2-D convolution with zero padding (any stride, dilation and groups)."""

    weight: torch.Tensor = field(default=None)  # (C_out, C_in / groups, kh, kw)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x, self.in_shape, 3)
        if self._transposed is not None:  # the same convolution, by torch's faster float64 kernel (see there)
            weight, padding = self._transposed
            size = (rows.shape[0], *self.out_shape[-3:])
            out = torch.nn.grad.conv2d_input(size, weight, rows, 1, padding)
        else:
            out = F.conv2d(rows, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
        return out.reshape(x.shape[0], *self.out_shape)

    @functools.cached_property
    def _transposed(self) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """(weight, padding) that compute this convolution as the input gradient of its transpose, or None.

        On the CPU, torch's float64 conv2d runs 1.3-5x slower than its input-gradient kernel
        (measured for 4-64 channels, 3x3 and 5x5 kernels, 4x4-16x16 images), which the
        bounds call with thousands of rows per sample. A stride-1 convolution is the
        transposed convolution with the flipped, transposed kernel and padding k - 1 - p,
        i.e. the input gradient of a convolution with that kernel. Used for stride 1, no
        dilation or groups, a kernel larger than 1x1 (a 1x1 conv2d is a plain matmul) and
        at least 4 input channels (with fewer the direct kernel is as fast or faster).
        """
        kh, kw = self.weight.shape[-2:]
        pad = (kh - 1 - self.padding[0], kw - 1 - self.padding[1])
        plain = self.stride == (1, 1) and self.dilation == (1, 1) and self.groups == 1
        if not plain or kh * kw == 1 or self.weight.shape[1] < 4 or min(pad) < 0:
            return None
        return self.weight.flip(2, 3).transpose(0, 1).contiguous(), pad

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        rows = _rows(g, self.out_shape, 3)
        size = (rows.shape[0], *self.in_shape[-3:])
        out = torch.nn.grad.conv2d_input(size, self.weight, rows, self.stride, self.padding, self.dilation, self.groups)
        return out.reshape(g.shape[0], *self.in_shape)


@dataclass(eq=False)
class ConvTransposeOp(_SignedWeights, AffineOp):
    """2-D transposed convolution (zero padding, any stride, dilation, groups, output padding): linear.

    Its adjoint is the generic one (differentiating `linear`): the strided convolution with
    the same weight, sized by the traced shapes with no output-padding arithmetic to get wrong.
    """

    weight: torch.Tensor = field(default=None)  # (C_in, C_out / groups, kh, kw)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    output_padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x, self.in_shape, 3)
        geometry = (self.stride, self.padding, self.output_padding, self.groups, self.dilation)
        out = F.conv_transpose2d(rows, self.weight, None, *geometry)
        return out.reshape(x.shape[0], *self.out_shape)


@dataclass(eq=False)
class ScaleOp(AffineOp):
    """Elementwise ``x * w + b`` (batch norm in eval mode, normalization, constant add/sub/mul/div)."""

    weight: torch.Tensor = field(default=None)  # broadcastable to in_shape (same number of dims)
    spread: torch.Tensor | None = None  # size of the constants the deployed model forms the bias from (rounding.py)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        return g * self.weight

    def abs(self) -> ScaleOp:  # not `_SignedWeights`: the copy drops `spread` too (only the op itself is rounded)
        return ScaleOp(self.name, self.in_shape, self.out_shape, None, True, self.weight.abs())

    def pos(self) -> ScaleOp:
        return ScaleOp(self.name, self.in_shape, self.out_shape, None, True, self.weight.clamp_min(0))


@dataclass(eq=False)
class ReshapeOp(AffineOp):
    """A per-sample reshape (flatten, view, squeeze, ONNX Reshape that keeps the batch): order is kept."""

    nonneg: bool = True

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.out_shape)

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(g.shape[0], *self.in_shape)


@dataclass(eq=False)
class PadOp(AffineOp):
    """Constant padding of the trailing dims (torch pad order); a non-zero value becomes the bias."""

    pads: tuple[int, ...] = ()
    nonneg: bool = True

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, list(self.pads))


@dataclass(eq=False)
class SelectOp(AffineOp):
    """Pure data movement: output value i is input value ``index[i]`` (per sample, flattened),
    or a constant (the bias; 0 without one) where ``index[i]`` is ``in_numel``.

    Slices, transposes, flips, rolls, constant / reflect / replicate padding, nearest
    upsampling and repeats are all this op. ``graph.py`` reads the index off the model's
    own op, so no indexing convention is re-derived here.
    """

    index: torch.Tensor = field(default=None)  # (out_numel,) int64 positions in the flattened input; in_numel: a fill
    nonneg: bool = True

    def __post_init__(self) -> None:
        self._fills = bool((self.index == self.in_numel).any())

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], self.in_numel)
        if self._fills:
            flat = F.pad(flat, (0, 1))
        return flat[:, self.index].reshape(x.shape[0], *self.out_shape)

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        out = g.new_zeros((g.shape[0], self.in_numel + 1))
        out.index_add_(1, self.index, g.reshape(g.shape[0], self.out_numel))
        return out[:, :-1].reshape(g.shape[0], *self.in_shape)

    @property
    def multiplicity(self) -> int:
        """Most outputs one input value feeds (1: a crop or permutation); the L2 norm is its square root."""
        counts = torch.bincount(self.index, minlength=self.in_numel + 1)[:-1]
        return int(counts.max()) if counts.numel() else 0


@dataclass(eq=False)
class AvgPoolOp(AffineOp):
    """2-D average pooling (nonnegative weights); adaptive pools that divide evenly map here too."""

    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None
    nonneg: bool = True

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        out = F.avg_pool2d(
            _rows(x, self.in_shape, 3), self.kernel, self.stride, self.padding, self.ceil_mode,
            self.count_include_pad, self.divisor_override,
        )  # fmt: skip
        return out.reshape(x.shape[0], *self.out_shape)


@dataclass(eq=False)
class MeanOp(AffineOp):
    """Mean over some per-sample dims (global average pooling, ``x.mean((2, 3))``)."""

    dims: tuple[int, ...] = ()  # dims of the per-sample shape
    nonneg: bool = True

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=[d + 1 for d in self.dims]).reshape(x.shape[0], *self.out_shape)

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        """Spread each output's coefficient evenly over the values it averaged (no autograd: hot path)."""
        kept = [1 if d in self.dims else s for d, s in enumerate(self.in_shape)]
        count = math.prod(self.in_shape[d] for d in self.dims)
        return (g.reshape(g.shape[0], *kept) / count).expand(g.shape[0], *self.in_shape)


# --------------------------------------------------------------------------- activations


def elu_is_convex(alpha: float, scale: float, input_scale: float) -> bool:
    """Whether aten's elu with these parameters is monotone nondecreasing and convex (the bounds assume both).

    Its slope is scale above 0 and scale alpha input_scale exp(input_scale x) below: it rises
    to scale alpha input_scale at 0 from the left, so convexity needs alpha input_scale <= 1
    (ELU with alpha <= 1, every CELU; not SELU, whose slope drops at 0).
    """
    finite = all(math.isfinite(v) for v in (alpha, scale, input_scale))
    return finite and scale > 0 and input_scale > 0 and 0 <= alpha * input_scale <= 1


def _sigmoid_prime(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s)


@dataclass(eq=False)
class ActOp:
    """An elementwise monotone nondecreasing activation."""

    name: str
    in_shape: Shape
    kind: str  # relu | leaky_relu | softplus | elu | tanh | sigmoid
    slope: float = 0.0  # leaky_relu negative slope
    beta: float = 1.0  # softplus
    threshold: float = 20.0  # softplus: linear above beta * x > threshold (torch's definition)
    # elu (aten's form, which also covers CELU): scale x above 0, scale alpha (exp(input_scale x) - 1) below
    alpha: float = 1.0
    scale: float = 1.0
    input_scale: float = 1.0

    def __post_init__(self) -> None:
        """Every bound here assumes a monotone nondecreasing activation: refuse any other."""
        if self.kind == "leaky_relu" and not (math.isfinite(self.slope) and self.slope >= 0):
            raise ValueError(f"leaky_relu with negative slope {self.slope} is not monotone")
        if self.kind == "softplus" and not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"softplus with beta {self.beta}: its derivative is not increasing")
        if self.kind == "elu" and not elu_is_convex(self.alpha, self.scale, self.input_scale):
            raise ValueError(f"elu with alpha {self.alpha}, scale {self.scale}, input_scale {self.input_scale} is not convex")

    @property
    def out_shape(self) -> Shape:
        return self.in_shape

    def value(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "relu":
            return z.clamp_min(0)
        if self.kind == "leaky_relu":
            return torch.where(z >= 0, z, z * self.slope)
        if self.kind == "softplus":  # the smooth function; torch's switch to x at the threshold moves it < 3e-9 / beta
            return torch.logaddexp(torch.zeros_like(z), self.beta * z) / self.beta
        if self.kind == "elu":
            neg = (self.scale * self.alpha) * torch.expm1(self.input_scale * z.clamp_max(0))
            return torch.where(z > 0, self.scale * z, neg)
        if self.kind == "tanh":
            return torch.tanh(z)
        return torch.sigmoid(z)

    def derivative(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "relu":
            return (z > 0).to(z.dtype)
        if self.kind == "leaky_relu":
            return torch.where(z >= 0, 1.0, self.slope).to(z.dtype)
        if self.kind == "softplus":
            return torch.sigmoid(self.beta * z)
        if self.kind == "elu":  # at 0 the left slope, the smaller one: derivative_bounds stay sound at either end
            neg = (self.scale * self.alpha * self.input_scale) * torch.exp(self.input_scale * z.clamp_max(0))
            return torch.where(z > 0, self.scale, neg).to(z.dtype)
        if self.kind == "tanh":
            return 1 - torch.tanh(z) ** 2
        return _sigmoid_prime(z)

    @property
    def max_slope(self) -> float:
        """Global Lipschitz constant of the activation."""
        slopes = {"relu": 1.0, "leaky_relu": max(1.0, abs(self.slope)), "softplus": 1.0, "tanh": 1.0, "sigmoid": 0.25}
        return self.scale if self.kind == "elu" else slopes[self.kind]

    @property
    def convexity(self) -> str:
        """'convex', 'concave' or 'sigmoidal' (convex below 0, concave above)."""
        if self.kind in ("relu", "softplus", "elu") or (self.kind == "leaky_relu" and self.slope <= 1):
            return "convex"
        if self.kind == "leaky_relu":
            return "concave"
        return "sigmoidal"

    def derivative_bounds(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[min, max] of the derivative over [lo, hi], elementwise.

        Piecewise-linear, softplus and elu derivatives are monotone (evaluate the ends); tanh
        and sigmoid derivatives are unimodal with the peak at 0 (include it when 0 is inside).
        """
        if self.kind in ("relu", "leaky_relu"):
            neg = 0.0 if self.kind == "relu" else self.slope
            unstable = (lo < 0) & (hi > 0)
            stable = torch.where(lo >= 0, 1.0, neg).to(lo.dtype)
            return torch.where(unstable, min(neg, 1.0), stable), torch.where(unstable, max(neg, 1.0), stable)
        a, b = self.derivative(lo), self.derivative(hi)
        if self.kind in ("softplus", "elu"):
            return a, b
        peak = 1.0 if self.kind == "tanh" else 0.25
        inside = (lo <= 0) & (hi >= 0)
        return torch.minimum(a, b), torch.where(inside, torch.full_like(a, peak), torch.maximum(a, b))

    def relaxation(
        self, lo: torch.Tensor, hi: torch.Tensor, d_lo: torch.Tensor, d_hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Linear bounds ``a_l z + b_l <= s(z) <= a_u z + b_u`` on [lo, hi] with slopes >= 0.

        ReLU-like: the chord above and the CROWN choice of slope below. Convex or concave
        pieces: chord on one side, tangent at the midpoint on the other. Otherwise the
        mean-value bounds from the derivative interval. Slopes are nonnegative so the
        bounds compose with lower/upper linear bounds of z (all activations are monotone).
        """
        width = hi - lo
        flat = width <= 1e-9 * (1 + lo.abs() + hi.abs())
        s_lo, s_hi = self.value(lo), self.value(hi)
        if self.kind in ("relu", "leaky_relu") and self.convexity == "convex":
            neg = 0.0 if self.kind == "relu" else self.slope
            chord = (s_hi - s_lo) / torch.where(flat, torch.ones_like(width), width)
            a_u = torch.where(lo >= 0, 1.0, torch.where(hi <= 0, neg, chord)).to(lo.dtype)
            b_u = s_lo - a_u * lo
            a_l = torch.where(lo >= 0, 1.0, torch.where(hi <= 0, neg, torch.where(hi >= -lo, 1.0, neg))).to(lo.dtype)
            b_l = torch.zeros_like(lo)
        else:
            mid = (lo + hi) / 2
            s_mid, d_mid = self.value(mid), self.derivative(mid)
            safe = torch.where(flat, torch.ones_like(width), width)
            chord = (s_hi - s_lo) / safe
            # mean-value bounds, valid for every monotone activation
            up1, up2 = (d_hi, s_lo - d_hi * lo), (d_lo, s_hi - d_lo * hi)
            lw1, lw2 = (d_lo, s_lo - d_lo * lo), (d_hi, s_hi - d_hi * hi)
            pick_u = up1[0] * mid + up1[1] <= up2[0] * mid + up2[1]
            a_u, b_u = torch.where(pick_u, up1[0], up2[0]), torch.where(pick_u, up1[1], up2[1])
            pick_l = lw1[0] * mid + lw1[1] >= lw2[0] * mid + lw2[1]
            a_l, b_l = torch.where(pick_l, lw1[0], lw2[0]), torch.where(pick_l, lw1[1], lw2[1])
            conv = self.convexity
            convex = torch.full_like(lo, conv == "convex", dtype=torch.bool) | ((conv == "sigmoidal") & (hi <= 0))
            concave = torch.full_like(lo, conv == "concave", dtype=torch.bool) | ((conv == "sigmoidal") & (lo >= 0))
            tangent = (d_mid, s_mid - d_mid * mid)
            secant = (chord, s_lo - chord * lo)
            a_u = torch.where(convex, secant[0], torch.where(concave, tangent[0], a_u))
            b_u = torch.where(convex, secant[1], torch.where(concave, tangent[1], b_u))
            a_l = torch.where(convex, tangent[0], torch.where(concave, secant[0], a_l))
            b_l = torch.where(convex, tangent[1], torch.where(concave, secant[1], b_l))
        # a (near-)point interval: constant bounds s(lo) <= s(z) <= s(hi) are exact enough
        zero = torch.zeros_like(lo)
        a_l, b_l = torch.where(flat, zero, a_l), torch.where(flat, s_lo, b_l)
        a_u, b_u = torch.where(flat, zero, a_u), torch.where(flat, s_hi, b_u)
        return a_l.clamp_min(0), b_l, a_u.clamp_min(0), b_u


# --------------------------------------------------------------------------- max pooling and sums


@dataclass(eq=False)
class MaxPoolOp:
    """2-D max pooling (monotone; its Jacobian picks one position per window)."""

    name: str
    in_shape: Shape
    out_shape: Shape
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def value(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(_rows(x, self.in_shape, 3), self.kernel, self.stride, self.padding, self.dilation)
        return out.reshape(x.shape[0], *self.out_shape)

    def windows(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        """(M', C, kh*kw, L): the values of every pooling window (padding filled with `fill`)."""
        rows = _rows(x, self.in_shape, 3)
        ph, pw = self.padding
        rows = F.pad(rows, [pw, pw, ph, ph], value=fill)
        m, c = rows.shape[:2]
        cols = F.unfold(rows.reshape(m * c, 1, *rows.shape[2:]), self.kernel, self.dilation, 0, self.stride)
        return cols.reshape(m, c, cols.shape[1], cols.shape[2])

    def fold(self, cols: torch.Tensor, batch: int) -> torch.Tensor:
        """Adjoint of `windows` (sums window entries back onto the input grid, padding dropped)."""
        m, c, k, n = cols.shape
        h, w = self.in_shape[-2:]
        ph, pw = self.padding
        out = F.fold(cols.reshape(m * c, k, n), (h + 2 * ph, w + 2 * pw), self.kernel, self.dilation, 0, self.stride)
        out = out.reshape(m, c, h + 2 * ph, w + 2 * pw)[:, :, ph : ph + h, pw : pw + w]
        return out.reshape(batch, *self.in_shape)

    @property
    def overlap(self) -> int:
        """Most windows one input position can fall in (the op's L2 Lipschitz constant squared)."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        if (dh, dw) != (1, 1):
            return kh * kw  # each (window offset, position) pair occurs at most once
        return math.ceil(kh / sh) * math.ceil(kw / sw)


@dataclass(eq=False)
class AddOp:
    """``a + sign * b`` of two tensors of the same per-sample shape (residual connections)."""

    name: str
    in_shape: Shape
    sign: float = 1.0

    @property
    def out_shape(self) -> Shape:
        return self.in_shape


Op = AffineOp | ActOp | MaxPoolOp | AddOp
