"""A rigorous bound on the float32 rounding error of the deployed model's logits.

The bounds elsewhere certify the *exact* network (computed in float64, which is itself
deflated for its own rounding). The model that users run computes in float32, and near
the decision boundary its rounding can decide the label. A radius R is therefore
certified only if, for every class pair, the exact margin's lower bound over the ball
exceeds ``E_c + E_j``, where E bounds |float32 logit - exact logit| over a ball that
contains the certified one.

Model of error (forward error analysis; Higham, *Accuracy and Stability of Numerical
Algorithms*, ch. 3), with u = 2^-24 and gamma_k = k u / (1 - k u):

- the input is a float32 point (the data and every attack's candidate are float32); the
  weights are the model's own float32 values, copied exactly into float64;
- every node carries an elementwise error bound e and a magnitude bound m of its exact
  value over the ball (`ball_magnitudes`); the float32 value is at most m + e;
- affine op with fan-in n (a sum of n products plus a bias, in any order):
  ``e_out <= |W| e_in + 2 gamma_{n+1} (|W| (m_in + e_in) + |b|)``;
  average pooling and means are affine ops with nonnegative weights (fan-in: the window,
  plus one for the division);
- elementwise scale ops (batch norm, input normalization, constant arithmetic) are
  computed by the deployed model in several float32 steps (subtract the mean, divide,
  scale, shift): ``2 gamma_8 (|w| (m_in + e_in) + |b| + s)`` with s the size of the
  constants the shift is formed from (batch norm: |beta| + |mean * scale|);
- clamps and elementwise maxima return an operand or a constant: exact but for the bound
  itself, which float32 may hold rounded (a 0-dim float64 bound c clips at float32(c)). The
  bound writes them as ReLUs, sums and shifts (`_Builder.rounding_free`) that the deployed
  model never forms, so those steps add only ``|b - float32(b)|`` per shift b; the
  operands' errors pass through them;
- ReLU and max pooling are exact (but for underflow, below): the error passes through (max pooling takes the window
  maximum of the errors); LeakyReLU multiplies by its slope: ``slope * e_in + 4 u slope m``;
- a residual sum: ``e_a + e_b + 2 u (m_a + e_a + m_b + e_b)``;
- tanh, sigmoid, softplus: ``max slope * e_in + 16 u (|out| + 1)`` (a few ulps of the
  library function), softplus also the gap between torch's switch to x above its
  threshold and the smooth function the bounds use, ``log1p(exp(-threshold)) / beta``;
  ELU / CELU (aten's ``elu(alpha, scale, input_scale)``) also ``16 u scale (1 + alpha)``
  (ulps of the exp - 1 branch, whose values reach scale alpha) and its underflow times scale.
- underflow: every float32 result below 2^-126 in magnitude may be rounded to a
  subnormal or flushed to zero, and a subnormal operand may be read as zero (FTZ / DAZ
  modes), an absolute error the relative terms above do not cover (a temperature of
  1e-42 on the scores put them all there). Each op adds ``ETA`` per rounding and per
  product operand: an affine op with fan-in n
  ``2 ETA (n max|x| + sum |W| + 2 n + 2)``, an elementwise scale op
  ``2 ETA SCALE_STEPS (m_in + |w| + |b| + 1)``, every other arithmetic op (activations,
  max pooling, sums) ``2 ETA (m_in + 1)``; copies (reshapes, slices) flush nothing. On
  values of ordinary size these terms are negligible (about 1e-35 at fan-in 1000).
The factor 2 on every gamma term covers backends that sum in any order, blocked, with
fused multiply-adds or with float32 constants rounded from the float64 ones here; it does
not cover Winograd or FFT convolution algorithms, whose error constants can be larger,
nor TF32 or other reduced-precision math (robaudit disables those while it checks).
"""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import replace

import torch

from robaudit.certify.affine import AffinePrefix, exact_magnitudes
from robaudit.certify.box import exact_box, node_box
from robaudit.certify.graph import Graph
from robaudit.certify.ops import (
    ActOp,
    AddOp,
    AffineOp,
    AvgPoolOp,
    ConvOp,
    ConvTransposeOp,
    DenseOp,
    MaxPoolOp,
    MeanOp,
    PadOp,
    ReshapeOp,
    ScaleOp,
    SelectOp,
)

U = 2.0**-24  # unit roundoff of float32
ETA = 2.0**-126  # smallest normal float32: the absolute error of a result (or operand) flushed to zero
SAFETY = 2.0  # on every gamma term: summation order, blocking, FMA
SCALE_STEPS = 8  # float32 operations an elementwise scale op may take in the deployed model
ACT_ULPS = 16.0  # ulps of |out| + 1 allowed for tanh, sigmoid and softplus
OUT_RTOL = 1e-9  # inflation of the final bound for the float64 arithmetic that computes it
OBSERVED = 8.0  # times the graph's own float32 rounding at a node: `point_rounding`'s estimate of the model's

_PREFIXES: weakref.WeakKeyDictionary[Graph, AffinePrefix] = weakref.WeakKeyDictionary()
_FLOAT32: weakref.WeakKeyDictionary[Graph, Graph] = weakref.WeakKeyDictionary()  # `_float32_copy`


def gamma(k: int) -> float:
    """gamma_k = k u / (1 - k u): the relative error bound of k float32 roundings."""
    if k * U >= 0.5:
        return math.inf
    return k * U / (1 - k * U)


def prefix_for(graph: Graph) -> AffinePrefix:
    """Row norms of the exact nodes, computed once per graph."""
    if graph not in _PREFIXES:
        _PREFIXES[graph] = AffinePrefix(graph, 0, None)
    return _PREFIXES[graph]


# --------------------------------------------------------------------------- magnitudes over a ball


def ball_magnitudes(graph: Graph, x: torch.Tensor, radius: torch.Tensor, **known) -> list[torch.Tensor]:
    """Elementwise upper bounds of |value| of every node over B_2(x, radius), x (B, *sample_shape)."""
    return interval_magnitudes(*ball_bounds(graph, x, radius, **known))


def ball_bounds(
    graph: Graph,
    x: torch.Tensor,
    radius: torch.Tensor,
    *,
    values: list[torch.Tensor] | None = None,
    exact_mags: dict[int, torch.Tensor] | None = None,
    prefix: AffinePrefix | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Elementwise lower and upper bounds of every node over B_2(x, radius), x (B, *sample_shape) float64.

    `values`, `exact_mags` (`exact_magnitudes`) and `prefix` are recomputed when not
    given. Exact (affine-in-input) nodes: |z(x)| + r ||A_i||; later nodes by plain interval
    arithmetic (monotone activations and max pooling map interval ends to ends). Each
    bound is rounded outward for the float64 arithmetic, like `interval.py`.
    """
    x = x.to(torch.float64)
    prefix = prefix or prefix_for(graph)
    values = values if values is not None else graph.forward(x)
    exact_mags = exact_mags if exact_mags is not None else exact_magnitudes(graph, x)
    n = len(graph.nodes)
    lo: list[torch.Tensor | None] = [None] * n
    hi: list[torch.Tensor | None] = [None] * n
    for i, node in enumerate(graph.nodes):
        if graph.exact[i]:
            lo[i], hi[i] = exact_box(values[i], prefix.rownorm[i], radius.to(torch.float64), exact_mags[i])
        else:
            lo[i], hi[i] = node_box(node.op, [lo[j] for j in node.inputs], [hi[j] for j in node.inputs])
    return lo, hi


def interval_magnitudes(lo: list[torch.Tensor], hi: list[torch.Tensor]) -> list[torch.Tensor]:
    """max(|lo|, |hi|) per node: what `float32_error` needs from any sound forward bound pass."""
    return [torch.maximum(a.abs(), b.abs()) for a, b in zip(lo, hi)]


# --------------------------------------------------------------------------- the error bound


def _fan_in(op: AffineOp) -> int:
    """Most products summed into one output of the op (an upper bound is enough)."""
    if isinstance(op, DenseOp):
        return int(op.weight.shape[1])
    if isinstance(op, ConvOp):
        return math.prod(op.weight.shape[1:])
    if isinstance(op, ConvTransposeOp):  # the kernel taps of every input channel of its group
        return op.weight.shape[0] // op.groups * math.prod(op.weight.shape[2:])
    if isinstance(op, AvgPoolOp):
        return math.prod(op.kernel) + 1  # and the division
    if isinstance(op, MeanOp):
        return math.prod(op.in_shape[d] for d in op.dims) + 1
    return op.in_numel


def _underflow(m_in: torch.Tensor) -> torch.Tensor:
    """``2 ETA (m_in + 1)``: one result or operand flushed to zero (ops that compute once per value)."""
    return SAFETY * ETA * (m_in + 1)


def _bound_rounding(op: AffineOp) -> torch.Tensor | float:
    """|b - float32(b)| for the shift b a step of a clamp adds: where the float32 model clips.

    torch clamps a float32 tensor at float32(c) for a bound c held as a 0-dim float64 tensor
    (a buffer: 0-dim tensors do not promote), while the graph holds c itself; a red team
    broke radii of 6e-8 there by one ulp. 0 where the bound is a float32 value (Python
    numbers, which the graph rounds as torch does, ONNX Clip, 65504).
    """
    if op.bias is None:
        return 0.0
    return (op.bias - op.bias.to(torch.float32).to(torch.float64)).abs()


def _affine_error(op: AffineOp, e_in: torch.Tensor, m_in: torch.Tensor) -> torch.Tensor:
    if isinstance(op, (ReshapeOp, PadOp, SelectOp)):  # moves values; a constant pad value is rounded once
        out = op.linear(e_in)  # copies do not flush: the op that reads the value charges its underflow
        return out if op.bias is None else out + U * op.bias.abs()
    if isinstance(op, ScaleOp):
        g = SAFETY * gamma(SCALE_STEPS)
        w = op.weight.abs()
        out = w * e_in + g * w * m_in
        shift = sum(t.abs() for t in (op.bias, getattr(op, "spread", None)) if t is not None)  # 0 without one
        return out + SAFETY * ETA * SCALE_STEPS * (m_in + w + 1 + shift) + g * shift
    n = _fan_in(op)
    g = SAFETY * gamma(n + 1)
    out = op.abs().linear(e_in + g * m_in)
    # underflow: each product's operands (DAZ), each product and each partial sum (FTZ)
    largest = m_in.flatten(1).amax(dim=1).reshape(-1, *([1] * (out.dim() - 1)))  # per sample, against the output
    out = out + SAFETY * ETA * (op.abs().linear(torch.ones_like(m_in)) + n * largest + 2 * n + 2)
    return out if op.bias is None else out + g * op.bias.abs()


def _act_error(op: ActOp, e_in: torch.Tensor, m_in: torch.Tensor, m_out: torch.Tensor, bounds=None) -> torch.Tensor:
    """Mean value theorem on [lo - e, hi + e] (the exact and the float32 input both lie there), plus rounding."""
    slope: torch.Tensor | float = op.max_slope
    if bounds is not None:
        slope = op.derivative_bounds(bounds[0] - e_in, bounds[1] + e_in)[1].clamp_min(0)
    if op.kind == "relu":
        return slope * e_in + _underflow(m_in)
    if op.kind == "leaky_relu":
        return slope * e_in + 4 * U * op.slope * m_in + _underflow(m_in)
    if op.kind == "elu":  # scale x, or scale alpha (exp(input_scale x) - 1): ulps of scale (1 + alpha) besides |out|
        spread = op.scale * (1 + op.alpha)
        return slope * e_in + ACT_ULPS * U * (m_out + slope * e_in + 1 + spread) + max(1.0, op.scale) * _underflow(m_in)
    out = slope * e_in + ACT_ULPS * U * (m_out + slope * e_in + 1) + _underflow(m_in)
    if op.kind == "softplus":
        out = out + math.log1p(math.exp(-op.threshold)) / op.beta
    return out


def local_rounding(graph: Graph, i: int, magnitudes: list[torch.Tensor | None]) -> torch.Tensor | float:
    """Bound on the rounding the float32 model adds at node i alone, given |value| bounds of its inputs.

    The deployed node computes op(inputs) + rho with |rho| at most this (elementwise);
    `float32_error` propagates these through |W|, CROWN (`crown.py`) treats each rho as a
    bounded extra input and charges it exactly through the margin's backward pass.
    `magnitudes` must bound the float32 values of the inputs (and, for activations, of the output).
    """
    node = graph.nodes[i]
    op = node.op
    if op is None:
        return 0.0
    m_in = magnitudes[node.inputs[0]]
    if not node.rounds and isinstance(op, AddOp):
        return _underflow(m_in + magnitudes[node.inputs[1]])
    if not node.rounds and isinstance(op, AffineOp):
        return op.abs().linear(_underflow(m_in)) + _bound_rounding(op)
    if isinstance(op, AffineOp):
        return _affine_error(op, torch.zeros_like(m_in), m_in)
    if isinstance(op, ActOp):
        return _act_error(op, torch.zeros_like(m_in), m_in, magnitudes[i])
    if isinstance(op, MaxPoolOp):
        return op.value(_underflow(m_in))
    assert isinstance(op, AddOp)
    both = m_in + magnitudes[node.inputs[1]]
    return SAFETY * U * both + _underflow(both)


def float32_error(
    graph: Graph,
    magnitudes: list[torch.Tensor],
    bounds: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """(B, K) upper bounds of |float32 logit - exact logit| given per-node magnitude bounds (B, *shape).

    `magnitudes[i]` must bound |value of node i| over the region the bound is for (a
    ball: `ball_magnitudes`, or the lo/hi of any sound forward bound pass); the result
    then holds at every float32 input in that region. The optional `bounds` (those lo/hi
    themselves) let activations use their local slope instead of the global one: an
    inactive ReLU passes no error on. See the module docstring.
    """
    errs: list[torch.Tensor] = []
    for i, node in enumerate(graph.nodes):
        op = node.op
        if op is None:
            errs.append(torch.zeros_like(magnitudes[0]))
            continue
        j = node.inputs[0]
        e_in = errs[j]
        m_in = magnitudes[j] + e_in  # the float32 value's size
        if not node.rounds and isinstance(op, AddOp):  # a step of a clamp or max: the operands' errors only
            k = node.inputs[1]
            errs.append(e_in + errs[k] + _underflow(m_in + magnitudes[k] + errs[k]))
        elif not node.rounds and isinstance(op, AffineOp):  # shifts and moves (a ReLU rounds nothing anyway)
            errs.append(op.abs().linear(e_in + _underflow(m_in)) + _bound_rounding(op))
        elif isinstance(op, AffineOp):
            errs.append(_affine_error(op, e_in, m_in))
        elif isinstance(op, ActOp):
            local = None if bounds is None else (bounds[0][j], bounds[1][j])
            errs.append(_act_error(op, e_in, m_in, magnitudes[i], local))
        elif isinstance(op, MaxPoolOp):
            errs.append(op.value(e_in + _underflow(m_in)))
        elif isinstance(op, AddOp):
            k = node.inputs[1]
            e_k = errs[k]
            both = m_in + magnitudes[k] + e_k  # the float32 values' sizes
            errs.append(e_in + e_k + SAFETY * U * both + _underflow(both))
        else:  # pragma: no cover - graph.py emits only the ops above
            raise TypeError(f"no float32 error model for {type(op).__name__}")
    out = errs[-1]
    # a closing softmax left out of the graph (`Graph.final`): half its tie margin per score, the whole per margin
    return out.reshape(out.shape[0], -1) * (1 + OUT_RTOL) + 0.5 * graph.tie_margin


def point_rounding(
    graph: Graph, x: torch.Tensor, top: torch.Tensor, values: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """(B, K): how far float32 rounding can move each margin f_top - f_j at the points x, to first order.

    Each node's own rounding (`local_rounding`, from the magnitudes of its values at x)
    times the margin's exact sensitivity to that node's value, summed: the same charge
    CROWN reserves inside a ball, at radius 0, where its backward coefficients are the
    Jacobian. Tighter than `float32_error` by orders of magnitude on deep nets (a forward
    |W| pass compounds per layer), it is what a faithful graph's float32 model can differ
    by; first order only, it is a yardstick for checks, not a certificate term. Where the
    float32 input of an activation may lie across a kink from the exact one, or a
    max-pooling window's float32 maximum may be another entry, the Jacobian sees one side
    only: such units are charged the jump in slope (or twice the window's error) times
    their input's error besides (`_crossings`). That error is estimated, not bounded (a
    rigorous forward bound compounds |W| per layer: 1e3 on a 9-layer MLP whose float32
    errors are 1e-5): the node's own worst-case rounding plus `OBSERVED` times what the
    graph itself, run in float32, rounds there (`float32_values`). `values`: the graph's
    forward values at x where the caller has them.
    """
    x = x.detach().to(torch.float64)
    with torch.no_grad():
        values = values if values is not None else graph.forward(x)
        observed = float32_values(graph, x)
    magnitudes = [v.abs() for v in values]
    rho = [local_rounding(graph, i, magnitudes) for i in range(len(graph.nodes))]
    errs = [r + OBSERVED * (v32 - v).abs() if v32 is not None else r for r, v, v32 in zip(rho, values, observed)]
    rho = [r + _crossings(graph, i, values, errs) for i, r in enumerate(rho)]
    shift = [torch.zeros_like(v, requires_grad=True) if torch.is_tensor(r) else None for v, r in zip(values, rho)]
    held = [(i, s) for i, s in enumerate(shift) if s is not None]
    out = torch.zeros(len(x), graph.num_classes, dtype=torch.float64)
    if not held:
        return out
    with torch.enable_grad():
        logits = graph.forward(x, shift)[-1].reshape(len(x), -1)
        first = logits.gather(1, top.reshape(-1, 1))
        for j in range(graph.num_classes):  # one backward pass per margin (rows are independent: summed)
            grads = torch.autograd.grad((first[:, 0] - logits[:, j]).sum(), [s for _, s in held], retain_graph=True, allow_unused=True)
            for (i, _), grad in zip(held, grads):
                if grad is not None:  # None: the node does not reach this margin
                    out[:, j] += (grad.abs() * rho[i]).flatten(1).sum(1)
    return out


def score_rounding(graph: Graph, values: list[torch.Tensor]) -> torch.Tensor | None:
    """(B, K): the rounding the node that forms the scores adds to each of them, alone (None: no such node).

    Its two scores' shares are one term of every margin's `point_rounding`, for the price
    of one |W| product: a check that its differences stay below them needs nothing more.
    """
    i = len(graph.nodes) - 1
    while i > 0 and isinstance(graph.nodes[i].op, ReshapeOp):  # the scores' own values, reshaped
        i = graph.nodes[i].inputs[0]
    node = graph.nodes[i]
    if node.op is None or math.prod(node.shape) != graph.num_classes:
        return None
    magnitudes = [v.abs() if j in node.inputs or j == i else None for j, v in enumerate(values)]
    own = local_rounding(graph, i, magnitudes)
    return own.reshape(len(values[0]), -1) if torch.is_tensor(own) else None


def float32_values(graph: Graph, x: torch.Tensor) -> list[torch.Tensor | None]:
    """Every node's value with the graph's own ops run in float32 (weights rounded to float32), as float64.

    One float32 evaluation among many (the model's kernels sum in other orders): a sample
    of the rounding's size, not a bound. None per node where that run fails.
    """
    try:
        values = _float32_copy(graph).forward(x.to(torch.float32))
    except Exception:  # noqa: BLE001 - an op that cannot run in float32: no observation, the worst case stands
        return [None] * len(graph.nodes)
    return [v.to(torch.float64) if v.dtype == torch.float32 else None for v in values]


def _float32_copy(graph: Graph) -> Graph:
    if graph not in _FLOAT32:
        nodes = []
        for node in graph.nodes:
            op = copy.copy(node.op)
            if op is not None:  # float64 tensors (and tuples of them) to float32; cached properties recomputed
                op.__dict__.update({k: _single(v) for k, v in vars(node.op).items()})
                op.__dict__.pop("_transposed", None)
            nodes.append(replace(node, op=op))
        _FLOAT32[graph] = Graph(nodes, graph.sample_shape, graph.num_classes, final=graph.final, returns=graph.returns)
    return _FLOAT32[graph]


def _single(value: object) -> object:
    if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
        return value.to(torch.float32)
    if isinstance(value, tuple):
        return tuple(_single(v) for v in value)
    return value


def _crossings(graph: Graph, i: int, values: list[torch.Tensor], errs: list) -> torch.Tensor | float:
    """What node i's float32 value may differ by beyond its Jacobian's side of a kink or tie (see `point_rounding`)."""
    node = graph.nodes[i]
    if not node.inputs or not torch.is_tensor(errs[node.inputs[0]]):
        return 0.0
    z, e = values[node.inputs[0]], errs[node.inputs[0]]
    if isinstance(node.op, ActOp):  # the spread of slopes over [z - e, z + e]: a kink's jump, else second order
        low, high = node.op.derivative_bounds(z - e, z + e)
        return torch.where(high > low, (high - low) * e, 0.0)
    if isinstance(node.op, MaxPoolOp):  # the runner-up within twice the window's error: either may win
        window = node.op.windows(z, -math.inf)
        if window.shape[2] < 2:
            return 0.0
        top = window.topk(2, dim=2).values
        spread = node.op.windows(e, 0.0).amax(dim=2)
        near = (top[:, :, 0] - top[:, :, 1]) <= 2 * spread
        return torch.where(near, 2 * spread, 0.0).reshape(len(z), *node.op.out_shape)
    return 0.0


OVERFLOW = 2.0**124  # 1/16 of float32's largest value: below it no sum the error model bounds can overflow


def overflow_possible(graph: Graph, lo: list[torch.Tensor], hi: list[torch.Tensor]) -> torch.Tensor:
    """(B,) where float32 could overflow somewhere inside the bounds (a sound forward pass's lo / hi).

    The error model above assumes finite float32 values: a score that overflows to inf
    can tie with another inf and hand the argmax to another class, however large the
    exact margin. A node's value, or any partial sum of an affine op (bounded by
    |W| |input| + |b|), reaching `OVERFLOW` voids the ball.
    """
    mags = interval_magnitudes(lo, hi)
    risk = torch.zeros(mags[0].shape[0], dtype=torch.bool)
    for i, node in enumerate(graph.nodes):
        risk |= ~(mags[i].flatten(1).amax(dim=1) < OVERFLOW)  # NaN counts as a risk
        if isinstance(node.op, AffineOp) and not isinstance(node.op, (ReshapeOp, PadOp, SelectOp)):
            partial = node.op.abs().linear(mags[node.inputs[0]])
            if node.op.bias is not None:
                partial = partial + node.op.bias.abs()
            risk |= ~(partial.flatten(1).amax(dim=1) < OVERFLOW)
    return risk


def pair_error(err: torch.Tensor, labels: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """E_c + E_j (B, P): the most float32 rounding can shrink each margin f_c - f_j."""
    return err.gather(1, labels[:, None]) + err.gather(1, others)


class BallError:
    """For one batch: ``(sample indices, radii) -> (n, P)`` float32 margin error over B_2(x_i, r_i)."""

    def __init__(self, graph: Graph, x: torch.Tensor, values, exact_mags, labels, others) -> None:
        self.graph, self.x, self.values, self.exact_mags = graph, x, values, exact_mags
        self.labels, self.others = labels, others

    def bounds(self, idx: torch.Tensor, radius: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """`ball_bounds` of samples `idx` over B_2(x_i, r_i), from the batch's own forward values."""
        values = [v[idx] for v in self.values]
        exact = {i: m[idx] for i, m in self.exact_mags.items()}
        return ball_bounds(self.graph, self.x[idx], radius, values=values, exact_mags=exact)

    def __call__(self, idx: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        lo, hi = self.bounds(idx, radius)
        err = float32_error(self.graph, interval_magnitudes(lo, hi), (lo, hi))
        return pair_error(err, self.labels[idx], self.others[idx])
