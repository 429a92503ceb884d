"""Reduce a classifier to a DAG of primitive float64 ops (see `ops.py`) that the bounds walk.

The network is traced with torch.fx (onnx2torch already returns an fx GraphModule; a
TorchScript file goes through torch's TorchScript-to-aten converter, any other module
through `torch.fx.symbolic_trace`: see `robaudit.models.fx_graph`) and run once at batch
size 1 on a real sample. That run gives every node's per-sample shape and folds everything that does
not depend on the input into constants: ONNX's Shape/Gather/Unsqueeze/Concat chains that
compute a flatten target, constant tensors, `x.size(0)`. Tracing at batch size 1 is the
per-sample function the certificate is about (the wrapper checked that batching does
not change results), and it makes a Reshape to ``(1, -1)`` an ordinary flatten.

Any op outside the supported set raises `CertificateUnavailable` naming its module path
and type, never a silent approximation. As a last guard, `fidelity.py` checks that the
float64 graph reproduces the model's own outputs, at the samples and inside every ball.
"""

from __future__ import annotations

import math
import operator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import _get_qualified_name

from robaudit.certify.errors import CertificateUnavailable
from robaudit.models.fx_graph import NotTraceable, error_line, to_fx
from robaudit.models.outputs import select_output
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
    Op,
    PadOp,
    ReshapeOp,
    ScaleOp,
    SelectOp,
    Shape,
    elu_is_convex,
)

F64 = torch.float64


@dataclass(eq=False)
class Node:
    name: str
    op: Op | None  # None: the network input (pixel space)
    inputs: list[int]
    shape: Shape
    # False for the steps the bound writes an exactly rounded op as (a clamp or an elementwise
    # max as ReLUs and sums): the deployed model computes no such step, so none adds rounding
    # but a clamp bound's own (`rounding._bound_rounding`).
    rounds: bool = True


@dataclass(eq=False)
class Graph:
    """Nodes in topological order; node 0 is the pixel input, the last node the (K,) logits."""

    nodes: list[Node]
    sample_shape: Shape
    num_classes: int
    # The softmax / log-softmax that closed the network, left out of `nodes` (they pick the
    # class the scores before them pick), and what the model returns: its own scores
    # ('logits'), or those scores through 'softmax' or 'log_softmax'.
    final: str | None = None
    returns: str = "logits"
    consumers: list[list[int]] = field(init=False)
    exact: list[bool] = field(init=False)  # node is an affine function of the input

    def __post_init__(self) -> None:
        self.consumers = [[] for _ in self.nodes]
        for i, node in enumerate(self.nodes):
            for j in node.inputs:
                self.consumers[j].append(i)
        self.exact = []
        for node in self.nodes:
            affine = node.op is None or isinstance(node.op, (AffineOp, AddOp))
            self.exact.append(affine and all(self.exact[j] for j in node.inputs))

    @property
    def is_linear(self) -> bool:
        """No nonlinearity between input and logits: the exact linear certificate applies."""
        return self.exact[-1]

    @property
    def input_dim(self) -> int:
        return math.prod(self.sample_shape)

    def forward(self, x: torch.Tensor, shift: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """Every node's value for a float64 batch (B, *sample_shape).

        `shift[i]`, where given, is added to node i's value before later nodes read it: the
        rounding a float32 model adds there, whose effect on the scores `point_rounding`
        differentiates.
        """
        values: list[torch.Tensor] = []
        for i, node in enumerate(self.nodes):
            op = node.op
            if op is None:
                value = x
            elif isinstance(op, AffineOp):
                value = op.apply(values[node.inputs[0]])
            elif isinstance(op, (ActOp, MaxPoolOp)):
                value = op.value(values[node.inputs[0]])
            else:
                value = values[node.inputs[0]] + op.sign * values[node.inputs[1]]
            if shift is not None and shift[i] is not None:
                value = value + shift[i]
            values.append(value)
        return values

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[-1]

    @property
    def tie_margin(self) -> float:
        """The margin a closing softmax needs so float32 rounding in it cannot tie two classes.

        exp, the shift and the division each round to within a few units in the last place
        of values near 1 (softmax) or near log K (log-softmax); a gap of TIE_ULPS units at
        that scale between the two scores keeps their order strict. 0 without one.
        """
        if self.final is None:
            return 0.0
        return TIE_ULPS * 2.0**-23 * (1.0 + math.log(self.num_classes))

    def returned(self, scores: torch.Tensor) -> torch.Tensor:
        """What the model returns for the graph's (B, K) scores."""
        if self.returns == "softmax":
            return torch.softmax(scores, dim=1)
        if self.returns == "log_softmax":
            return torch.log_softmax(scores, dim=1)
        return scores


# --------------------------------------------------------------------------- tracing helpers


class _Var:
    """Marks an fx argument that depends on the network input (holds our node index)."""

    def __init__(self, index: int, shape: Shape) -> None:
        self.index, self.shape = index, shape


class _Recorder(fx.Interpreter):
    """Runs the graph once and keeps every node's output."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n] = out
        return out


_SHAPE_METHODS = {"size", "dim", "numel"}
_IDENTITY_METHODS = {"contiguous", "clone", "detach"}
_CAST_METHODS = {"to", "type", "type_as", "float", "double", "half", "bfloat16"}  # checked by `_cast`
_EXACT_DTYPES = (torch.float32, torch.float64)  # casts the bound may treat as identity (the values are float32)
_RESHAPE_METHODS = {"flatten", "unflatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.unflatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_ACT_FUNCTIONS = {
    torch.relu: "relu", F.relu: "relu", torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", F.leaky_relu: "leaky_relu", F.softplus: "softplus", F.elu: "elu", F.celu: "celu",
    torch.celu: "celu", F.selu: "selu", torch.selu: "selu",
}  # fmt: skip
_ACT_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
_BINARY = {
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub", operator.mul: "mul",
    torch.mul: "mul", operator.truediv: "div", torch.div: "div", operator.iadd: "add", operator.isub: "sub",
    operator.imul: "mul", operator.itruediv: "div",
}  # fmt: skip
_ALPHA_FUNCTIONS = {torch.add: "add", torch.sub: "sub", torch.subtract: "sub", torch.rsub: "rsub"}  # with alpha
_BINARY_METHODS = {k: k.rstrip("_") for k in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_")}
_ONNX_BINARY = {"add": "add", "sub": "sub", "mul": "mul", "_onnx_div": "div", "div": "div"}
_ONNX_RESHAPES = {
    "OnnxReshape", "OnnxFlatten", "OnnxSqueezeStaticAxes", "OnnxSqueezeDynamicAxes", "OnnxUnsqueezeStaticAxes",
    "OnnxUnsqueezeDynamicAxes",
}  # fmt: skip
_ONNX_IDENTITY = {"OnnxCopyIdentity"}  # OnnxCast goes through `_cast`


def _bind(names: list[str], defaults: dict[str, Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    """Bind positional and keyword arguments of a builtin whose signature Python cannot read."""
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


LINEAR_MAP_ELEMS = 1 << 22  # entries of a matrix `_Builder.linear_map` reads off an op (32 MiB in float64)
TIE_ULPS = 256  # float32 units (at the scale of the closing softmax's values) a certified margin keeps above a tie
SOFTPLUS_MIN_THRESHOLD = 10.0  # torch's softplus returns x above it: off the smooth curve by < 5e-5 / beta
# below it torch computes log1p(exp(beta x)) / beta, and exp overflows float32 to inf past beta x = 88.72
SOFTPLUS_MAX_THRESHOLD = 88.0


def _activation(b, name: str, var, kind: str, args, kwargs):
    """An activation node, with its parameters as the module, functional or aten call passed them.

    The bounds assume a monotone nondecreasing activation (interval ends map to interval
    ends, relaxation slopes are nonnegative), so any other parameter choice is refused.
    """
    if kind == "leaky_relu":
        p = _bind(["input", "negative_slope"], {"negative_slope": 0.01}, args, kwargs)
        slope = float(p["negative_slope"])
        if not (math.isfinite(slope) and slope >= 0):
            raise CertificateUnavailable(f"{name}: LeakyReLU with negative slope {slope} (non-monotone)")
        return b.act(name, var, kind, slope=slope)
    if kind == "softplus":
        p = _bind(["input", "beta", "threshold"], {"beta": 1.0, "threshold": 20.0}, args, kwargs)
        beta, threshold = float(p["beta"]), float(p["threshold"])
        if not (math.isfinite(beta) and beta > 0):
            raise CertificateUnavailable(f"{name}: Softplus with beta {beta} (only beta > 0 is convex and monotone)")
        if not threshold >= SOFTPLUS_MIN_THRESHOLD:
            raise CertificateUnavailable(
                f"{name}: Softplus with threshold {threshold} (switches to x far from the smooth curve)"
            )
        if not threshold <= SOFTPLUS_MAX_THRESHOLD:
            raise CertificateUnavailable(
                f"{name}: Softplus with threshold {threshold} (exp overflows float32 to inf before it switches to x)"
            )
        return b.act(name, var, kind, beta=beta, threshold=threshold)
    if kind in _ELU_FORMS:
        return _elu(b, name, var, kind, args, kwargs)
    return b.act(name, var, kind)


SELU_ALPHA, SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
# the ELU family as each call passes it, read into aten's elu(alpha, scale, input_scale)
_ELU_FORMS = {
    "elu": ["input", "alpha", "inplace"],  # F.elu, nn.ELU (positional inplace, not aten's scale)
    "aten_elu": ["input", "alpha", "scale", "input_scale"],
    "celu": ["input", "alpha", "inplace"],  # F.celu, torch.celu, nn.CELU, aten celu: elu(alpha, 1, 1 / alpha)
    "selu": ["input", "inplace"],  # elu(SELU_ALPHA, SELU_SCALE, 1)
}


def _elu(b, name: str, var, kind: str, args, kwargs):
    """ELU, CELU or SELU as aten's elu; the bounds take the convex ones (slope alpha input_scale <= 1 below 0)."""
    p = _bind(_ELU_FORMS[kind], {"alpha": 1.0, "scale": 1.0, "input_scale": 1.0}, args, kwargs)
    alpha, scale, input_scale = float(p["alpha"]), float(p["scale"]), float(p["input_scale"])
    label = {"elu": "ELU", "aten_elu": "ELU", "celu": "CELU", "selu": "SELU"}[kind]
    if kind == "celu":
        if not (math.isfinite(alpha) and alpha > 0):
            raise CertificateUnavailable(f"{name}: CELU with alpha {alpha} (only alpha > 0 is convex and monotone)")
        input_scale = 1.0 / alpha
    if kind == "selu":
        alpha, scale = SELU_ALPHA, SELU_SCALE
    if not elu_is_convex(alpha, scale, input_scale):
        raise CertificateUnavailable(
            f"{name}: {label} with alpha {alpha:g}, scale {scale:g}, input scale {input_scale:g} "
            "(its slope drops at 0 or turns negative: only a convex, nondecreasing ELU is bounded)"
        )
    return b.act(name, var, "elu", alpha=alpha, scale=scale, input_scale=input_scale)


def _cast_dtype(method: str, args: list, kwargs: dict) -> torch.dtype | None:
    """The dtype a Tensor cast method converts to (None: no dtype change, e.g. `.to(device)`)."""
    fixed = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}
    if method in fixed:
        return fixed[method]
    for a in [*args, kwargs.get("dtype"), kwargs.get("other")]:
        if isinstance(a, torch.dtype):
            return a
        if torch.is_tensor(a):
            return a.dtype
        if isinstance(a, str) and method == "type":  # legacy names: "torch.FloatTensor", "torch.cuda.HalfTensor"
            kind = a.rsplit(".", 1)[-1]
            legacy = {"FloatTensor": torch.float32, "DoubleTensor": torch.float64, "HalfTensor": torch.float16}
            return legacy.get(kind, torch.bfloat16 if kind == "BFloat16Tensor" else torch.int64)
    return None


def _cast(name: str, var, dtype: torch.dtype | None) -> int:
    """A cast is the identity only to float32 or float64; any other rounds or truncates the values."""
    if dtype is None or dtype in _EXACT_DTYPES:
        return var.index
    what = str(dtype).removeprefix("torch.")
    raise CertificateUnavailable(f"{name}: cast to {what} rounds the values (the bound covers float32/float64 only)")


HUGE_CLAMP_BOUND = 2.0**40  # a clamp bound this large cancels the input in `clamp`'s ReLUs (float64)


def _clamp_limit(name: str, v: Any, side: float) -> torch.Tensor | None:
    """One bound of a clamp as a float64 tensor, or None where it does not clip on a certified ball.

    None, +-inf on its side, and bounds at or beyond `rounding.OVERFLOW` on their side (an
    exporter's +-FLT_MAX for an absent bound) do not clip: a ball where any value could reach
    OVERFLOW certifies nothing (`overflow_possible`), and written as ReLUs around such a bound
    the clamp would cancel the input in float64 (x - 3.4e38 rounds x away).
    """
    from robaudit.certify.rounding import OVERFLOW  # here: rounding imports this module

    if v is None:
        return None
    t = torch.as_tensor(v).detach().to(F64)
    if t.numel() == 1 and float(t) == side * math.inf:
        return None
    if t.numel() and bool((side * t >= OVERFLOW).all()):
        return None
    if not bool(torch.isfinite(t).all()):
        raise CertificateUnavailable(f"{name}: clamp bound {_bound_text(t, 'non-finite entries')}")
    if bool((t.abs() >= HUGE_CLAMP_BOUND).any()):
        largest = f"entries up to {float(t.abs().max()):g}"
        raise CertificateUnavailable(
            f"{name}: clamp bound {_bound_text(t, largest)} (as ReLUs around it, x - bound would round x away in float64; "
            f"bounds beyond {OVERFLOW:.3g} on their side count as absent)"
        )
    return t


def _bound_text(t: torch.Tensor, entries: str) -> str:
    """A clamp bound for a refusal: its value, or for a tensor its shape and what is wrong with its `entries`."""
    return f"{float(t):g}" if t.numel() == 1 else f"of shape {tuple(t.shape)} with {entries}"


def _float64_runs(
    name: str, run: Callable[[torch.Tensor], Any], inputs: list[torch.Tensor], out_shape: Shape
) -> list[torch.Tensor]:
    """The op re-run on float64 inputs (`_Builder.select`, `_Builder.linear_map`): float64 tensors of the
    traced shape, or CertificateUnavailable naming why not."""
    try:
        with torch.no_grad():
            got = [run(t) for t in inputs]
    except Exception as exc:  # e.g. an op whose arguments hold only for the model's own dtype
        raise CertificateUnavailable(f"{name}: could not be re-run in float64 ({type(exc).__name__})") from None
    if not all(torch.is_tensor(t) and t.dtype == F64 and tuple(t.shape) == tuple(out_shape) for t in got):
        raise CertificateUnavailable(f"{name}: a float64 re-run does not give the traced shape {tuple(out_shape)}")
    return got


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1])) if len(v) in (1, 2) else (int(v[0]), int(v[1]))
    return (int(v), int(v))


class _Builder:
    """Walks an fx graph and emits primitive ops."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[Node] = []
        self.final: str | None = None  # 'softmax' / 'log_softmax' that closed the network and was left out
        self.exact_steps = False  # inside `rounding_free`

    def add(self, name: str, op: Op | None, inputs: list[int], shape: Shape) -> int:
        self.nodes.append(Node(name, op, inputs, tuple(int(d) for d in shape), rounds=not self.exact_steps))
        return len(self.nodes) - 1

    @contextmanager
    def rounding_free(self):
        """Nodes made inside are steps of an op that float32 computes exactly (clamp, max).

        clamp(x) and max(u, v) return one of their operands or a constant, so the deployed
        model rounds nothing there; the ReLUs and sums the bound writes them as would be
        charged float32 rounding for sums the model never forms (x - lo with lo = -65504
        rounds x to 2^-8 and certified nothing). Errors of the operands still pass through.
        """
        outer, self.exact_steps = self.exact_steps, True
        try:
            yield
        finally:
            self.exact_steps = outer

    # ---- naming for messages
    def where(self, n: fx.Node, gm: fx.GraphModule) -> str:
        if n.op == "call_module":
            module = gm.get_submodule(n.target)
            what = type(module).__name__
            function = getattr(module, "function", None)  # onnx2torch's one class for Sign, Sin, Exp, Log, ...
            if what == "OnnxFunction" and callable(function):
                what += f" (torch.{getattr(function, '__name__', function)})"
            return f"{self.prefix}{n.target}: {what}"
        stack = n.meta.get("nn_module_stack")
        if stack:
            path, cls = list(stack.values())[-1]
            place = f"{self.prefix}{path} ({getattr(cls, '__name__', cls)})"
        else:
            place = f"{self.prefix}{n.name}"
        what = f"Tensor.{n.target}" if n.op == "call_method" else _get_qualified_name(n.target)
        return f"{place}: {what}"

    # ---- emitting ops
    def reshape(self, name: str, var: _Var, out_shape: Shape) -> int:
        if math.prod(out_shape) != math.prod(var.shape):
            raise CertificateUnavailable(f"{name}: reshape that changes the number of values per sample")
        if tuple(out_shape) == tuple(var.shape):
            return var.index
        return self.add(name, ReshapeOp(name, var.shape, tuple(out_shape)), [var.index], out_shape)

    def scale(self, name: str, var: _Var, weight: Any, bias: Any, out_shape: Shape) -> int:
        """x * weight + bias with constants broadcast to the sample's traced shape."""
        shape = var.shape
        if tuple(out_shape) != tuple(shape):
            raise CertificateUnavailable(f"{name}: a constant that broadcasts the sample to a larger shape")
        w = torch.ones(shape, dtype=F64) * torch.as_tensor(weight).detach().to(F64)
        b = torch.zeros(shape, dtype=F64) + torch.as_tensor(bias).detach().to(F64)
        if w.shape != shape or b.shape != shape:
            raise CertificateUnavailable(f"{name}: a constant that broadcasts the sample to a larger shape")
        bias_t = None if bool((b == 0).all()) else b
        return self.add(name, ScaleOp(name, shape, shape, bias_t, bool((w >= 0).all()), w), [var.index], shape)

    def binary(self, name: str, kind: str, a: Any, b: Any, out_shape: Shape) -> int:
        if isinstance(a, _Var) and isinstance(b, _Var):
            if kind in ("add", "sub"):
                a, b = self._broadcast(name, a, out_shape), self._broadcast(name, b, out_shape)
            if kind in ("add", "sub") and a.shape == b.shape == tuple(out_shape):
                op = AddOp(name, a.shape, 1.0 if kind == "add" else -1.0)
                return self.add(name, op, [a.index, b.index], out_shape)
            raise CertificateUnavailable(f"{name}: {kind} of two input-dependent tensors")
        if isinstance(a, _Var):
            c = torch.as_tensor(b).detach().to(F64)
            if kind == "add":
                return self.scale(name, a, 1.0, c, out_shape)
            if kind == "sub":
                return self.scale(name, a, 1.0, -c, out_shape)
            if kind == "mul":
                return self.scale(name, a, c, 0.0, out_shape)
            return self.scale(name, a, 1.0 / c, 0.0, out_shape)
        c = torch.as_tensor(a).detach().to(F64)
        if kind == "add":
            return self.scale(name, b, 1.0, c, out_shape)
        if kind == "sub":
            return self.scale(name, b, -1.0, c, out_shape)
        if kind == "mul":
            return self.scale(name, b, c, 0.0, out_shape)
        raise CertificateUnavailable(f"{name}: division by an input-dependent tensor")

    def _broadcast(self, name: str, var: _Var, out_shape: Shape) -> _Var:
        """`var` repeated along its size-1 dimensions to `out_shape` (one operand of `x + x.sum(1, keepdim=True)`),
        as data movement; operands of another rank are left as they are (and refused by the caller)."""
        shape = tuple(out_shape)
        if var.shape == shape or len(var.shape) != len(shape):
            return var
        if any(d not in (1, o) for d, o in zip(var.shape, shape)):
            return var
        return _Var(self.select(f"{name} (broadcast)", var, lambda t: t.expand(shape), shape), shape)

    def select(self, name: str, var: _Var, run: Callable[[torch.Tensor], Any], out_shape: Shape) -> int:
        """A data-movement op (slice, transpose, flip, constant or reflect padding, nearest upsampling,
        repeat) as the index map the model's own op gives, so no indexing convention is re-derived.

        Run on zeros it gives the fill (the padding constant; 0 where values move); run on the
        positions 1..n (exact in float64) it gives where each other output comes from. A run
        on random values must then equal that selection exactly, so an op that computes
        anything is refused, never approximated. Callers pass only ops that are data
        movement by definition; the runs check the arguments the model used.

        The traced batch axis may move too (the dynamo ONNX exporter writes uneven adaptive
        pools as a Transpose of it inward, a GatherND and a Transpose back): every node holds
        one sample's values, traced at batch size 1, so that is a move within the sample, and
        the radius is a claim about the model scoring that sample alone. A model whose batched
        run mixes samples is scored one sample at a time by the scan (`wrap_model`), and a
        plain module that does so fails `check_graph`, which compares a batch of samples with
        the graph run on each alone.
        """
        n = math.prod(var.shape)
        probe = torch.randn(var.shape, dtype=F64, generator=torch.Generator().manual_seed(0))
        positions = torch.arange(1, n + 1, dtype=F64).reshape(var.shape)
        fill, where, moved = _float64_runs(name, run, [torch.zeros(var.shape, dtype=F64), positions, probe], out_shape)
        fill, position = fill.reshape(-1), (where - fill).reshape(-1)
        index = position - 1
        filled = position == 0
        exact = torch.isfinite(fill).all() and (fill[~filled] == 0).all()
        if not bool(exact and ((index >= -1) & (index < n) & (index == index.round())).all()):
            raise CertificateUnavailable(f"{name}: does not only move values")
        index = torch.where(filled, n, index.long())
        if not torch.equal(moved.reshape(-1), torch.where(filled, fill, F.pad(probe.reshape(-1), (0, 1))[index])):
            raise CertificateUnavailable(f"{name}: does not only move values")
        if index.numel() == n and torch.equal(index, torch.arange(n)):
            return self.reshape(name, var, out_shape)  # moves only dimensions of size 1
        bias = fill.reshape(out_shape) if bool((fill != 0).any()) else None
        op = SelectOp(name, var.shape, tuple(out_shape), bias, True, index)
        return self.add(name, op, [var.index], out_shape)

    def linear_map(self, name: str, var: _Var, run: Callable[[torch.Tensor], Any], out_shape: Shape) -> int:
        """An op linear in its one input-dependent operand by definition (einsum, a matrix product by a
        constant on either side, `where` with a constant mask), as the map the model's own op gives in
        float64: run on zeros it gives the offset; an elementwise map (`where`, an einsum that scales) is
        read on ones, any other on each unit vector, a column each (exact: every product is by 0 or 1,
        and where an offset meets a coefficient the other is 0). Runs on two random inputs must then
        agree up to float64 rounding, so a misread op is refused, never approximated.
        """
        n, m = math.prod(var.shape), math.prod(out_shape)
        gen = torch.Generator().manual_seed(0)
        probes = [torch.randn(var.shape, dtype=F64, generator=gen) for _ in range(2)]

        def runs(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.reshape(-1) for t in _float64_runs(name, run, inputs, out_shape)]

        def agrees(apply: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], moved: list[torch.Tensor]) -> bool:
            for probe, want in zip(probes, moved):
                value, size = apply(probe.reshape(-1))
                if not bool(((want - value).abs() <= 1e-12 * size).all()):
                    return False
            return True

        offset, *moved = runs([torch.zeros(var.shape, dtype=F64), *probes])
        if not bool(torch.isfinite(offset).all()):
            raise CertificateUnavailable(f"{name}: a linear map with a non-finite offset")
        if tuple(var.shape) == tuple(out_shape):
            (ones,) = runs([torch.ones(var.shape, dtype=F64)])
            diagonal = ones - offset
            if bool(torch.isfinite(diagonal).all()) and agrees(
                lambda p: (diagonal * p + offset, (diagonal * p).abs() + offset.abs()), moved
            ):
                return self.scale(name, var, diagonal.reshape(out_shape), offset.reshape(out_shape), out_shape)
        if n * m > LINEAR_MAP_ELEMS:
            raise CertificateUnavailable(f"{name}: a {m} x {n} linear map, too large to read as a matrix")
        basis = torch.eye(n, dtype=F64)
        weight = torch.stack(runs([basis[i].reshape(var.shape) for i in range(n)]), 1) - offset[:, None]  # (m, n)
        if not bool(torch.isfinite(weight).all()):
            raise CertificateUnavailable(f"{name}: a linear map with non-finite coefficients")
        if not agrees(lambda p: (weight @ p + offset, weight.abs() @ p.abs() + offset.abs()), moved):
            raise CertificateUnavailable(f"{name}: does not act as the linear map read off it")
        row = _Var(self.reshape(f"{name} (flatten)", var, (1, n)), (1, n))
        bias = offset if bool((offset != 0).any()) else None
        dense = _Var(self.dense(name, row, weight, bias, (1, m)), (1, m))
        return self.reshape(f"{name} (reshape)", dense, out_shape)

    def masked_choice(self, name: str, mask: Any, a: _Var, b: _Var, out_shape: Shape) -> int:
        """where(mask, a, b) of two input-dependent tensors and a constant mask: mask a + (1 - mask) b, exactly."""
        if isinstance(mask, _Var) or not torch.is_tensor(mask) or mask.dtype != torch.bool:
            raise CertificateUnavailable(f"{name}: where with a mask that depends on the input")
        shape = tuple(out_shape)
        a, b = self._broadcast(f"{name} (a)", a, shape), self._broadcast(f"{name} (b)", b, shape)
        if a.shape != shape or b.shape != shape:
            raise CertificateUnavailable(f"{name}: where whose branches have another rank than its result")
        if tuple(torch.broadcast_shapes(mask.shape, shape)) != shape:
            raise CertificateUnavailable(f"{name}: where whose mask broadcasts the sample to a larger shape")
        keep = torch.broadcast_to(mask.detach().cpu(), shape).to(F64)
        left = _Var(self.scale(f"{name} (mask a)", a, keep, 0.0, shape), shape)
        right = _Var(self.scale(f"{name} ((1 - mask) b)", b, 1.0 - keep, 0.0, shape), shape)
        return self.binary(name, "add", left, right, shape)

    def extremum(self, name: str, kind: str, items: list, out_shape: Shape) -> int:
        """Elementwise maximum or minimum of several tensors, folded left to right, exactly.

        Of two input-dependent tensors, max(u, v) = v + relu(u - v) and min(u, v) = u - relu(u - v)
        (a ReLU and two sums, which every method bounds already); of one and a constant, a
        one-sided clamp. float32 computes the max exactly, so those steps add no rounding
        (`rounding_free`).
        """
        acc = items[0]
        for k, item in enumerate(items[1:], 2):
            label = f"{name} (term {k})"
            shapes = [t.shape for t in (acc, item) if isinstance(t, _Var) or torch.is_tensor(t)]
            shape = tuple(torch.broadcast_shapes(*shapes))
            if isinstance(acc, _Var) and isinstance(item, _Var):
                with self.rounding_free():
                    gap = _Var(self.binary(f"{label}: u - v", "sub", acc, item, shape), shape)
                    gap = _Var(self.act(f"{label}: relu(u - v)", gap, "relu"), shape)
                    if kind == "maximum":
                        acc = _Var(self.binary(label, "add", item, gap, shape), shape)
                    else:
                        acc = _Var(self.binary(label, "sub", acc, gap, shape), shape)
            elif isinstance(acc, _Var) or isinstance(item, _Var):
                var, const = (acc, item) if isinstance(acc, _Var) else (item, acc)
                bounds = (const, None) if kind == "maximum" else (None, const)
                acc = _Var(self.clamp(label, var, *bounds, shape), shape)
            else:
                fold = torch.maximum if kind == "maximum" else torch.minimum
                acc = fold(torch.as_tensor(acc).detach().to(F64), torch.as_tensor(item).detach().to(F64))
        if not isinstance(acc, _Var) or acc.shape != tuple(out_shape):
            raise CertificateUnavailable(f"{name}: {kind} whose result does not depend on the input as traced")
        return acc.index

    def hard_sigmoid(self, name: str, var: _Var, alpha: float, beta: float, out_shape: Shape) -> int:
        """clamp(alpha x + beta, 0, 1) (torch's Hardsigmoid: alpha 1/6, beta 1/2): a scale, then a clamp."""
        scaled = _Var(self.scale(f"{name} (alpha x + beta)", var, float(alpha), float(beta), out_shape), var.shape)
        return self.clamp(name, scaled, 0.0, 1.0, out_shape)

    def soft_shrink(self, name: str, var: _Var, lambd: Any, out_shape: Shape) -> int:
        """softshrink(x) = relu(x - lambd) - relu(-x - lambd), exactly, for a constant lambd >= 0.

        (x - lambd above lambd, x + lambd below -lambd, 0 between.) Two ReLUs and a
        difference, as a clamp is: no new relaxation.
        """
        lam = float(lambd)
        if not (math.isfinite(lam) and lam >= 0):
            raise CertificateUnavailable(f"{name}: Softshrink with lambda {lambd!r} (only a finite lambda >= 0)")
        shape = var.shape
        if tuple(out_shape) != tuple(shape):
            raise CertificateUnavailable(f"{name}: Softshrink that changes the shape")
        parts = []
        for sign, what in ((1.0, "x - lambda"), (-1.0, "-x - lambda")):
            shifted = _Var(self.scale(f"{name} ({what})", var, sign, -lam, shape), shape)
            parts.append(self.act(f"{name} (relu of {what})", shifted, "relu"))
        return self.add(name, AddOp(name, shape, -1.0), parts, shape)

    def tanh_shrink(self, name: str, var: _Var, out_shape: Shape) -> int:
        """tanhshrink(x) = x - tanh(x): a tanh and a difference, as torch computes it."""
        squashed = _Var(self.act(f"{name} (tanh)", var, "tanh"), var.shape)
        return self.binary(name, "sub", var, squashed, out_shape)

    def threshold(self, name: str, var: _Var, threshold: Any, value: Any, out_shape: Shape) -> int:
        """threshold(x, t, v) = x above t, else v: max(x, t) when v == t; any other v jumps at t (refused)."""
        if not float(threshold) == float(value):
            raise CertificateUnavailable(
                f"{name}: Threshold with threshold {threshold!r} and value {value!r} (jumps at the threshold: "
                "only value == threshold, a clamp, is bounded)"
            )
        return self.clamp(name, var, threshold, None, out_shape)

    def clamp(self, name: str, var: _Var, lo: Any, hi: Any, out_shape: Shape) -> int:
        """clamp(x, lo, hi) = lo + relu(x - lo) - relu(x - hi), exactly, for constant bounds lo <= hi.

        ReLU6, Hardtanh and ONNX Clip are clamps too. Written with ReLUs, a clamp gets every
        bound the certificate has for ReLUs (intervals, CROWN and alpha-CROWN slopes, branch
        and bound on its two units) and adds no new relaxation to get wrong.
        """
        shape = var.shape
        if tuple(out_shape) != tuple(shape):
            raise CertificateUnavailable(f"{name}: a clamp bound that broadcasts the sample to a larger shape")
        lo, hi = _clamp_limit(name, lo, -1.0), _clamp_limit(name, hi, 1.0)
        if lo is not None and hi is not None and bool((lo > hi).any()):
            raise CertificateUnavailable(f"{name}: clamp with min > max")
        if lo is None and hi is None:
            return var.index
        with self.rounding_free():
            return self._clamp_steps(name, var, lo, hi)

    def _clamp_steps(self, name: str, var: _Var, lo: torch.Tensor | None, hi: torch.Tensor | None) -> int:
        shape = var.shape

        def relu_of(v: _Var, sign: float, shift: torch.Tensor, what: str) -> _Var:  # relu(sign * v + shift)
            if sign != 1.0 or bool((shift != 0).any()):
                v = _Var(self.scale(f"{name} ({what})", v, sign, shift, shape), shape)
            return _Var(self.act(f"{name} (relu of {what})", v, "relu"), shape)

        if hi is None:  # max(x, lo) = lo + relu(x - lo)
            out = relu_of(var, 1.0, -lo, "x - min")
            return self.scale(name, out, 1.0, lo, shape) if bool((lo != 0).any()) else out.index
        if lo is None:  # min(x, hi) = hi - relu(hi - x)
            return self.scale(name, relu_of(var, -1.0, hi, "max - x"), -1.0, hi, shape)
        low, high = relu_of(var, 1.0, -lo, "x - min"), relu_of(var, 1.0, -hi, "x - max")
        diff = self.add(f"{name} (difference)", AddOp(name, shape, -1.0), [low.index, high.index], shape)
        return self.scale(name, _Var(diff, shape), 1.0, lo, shape) if bool((lo != 0).any()) else diff

    def concat(self, name: str, items: list, dim: int, out_shape: Shape) -> int:
        """torch.cat / ONNX Concat: each input zero-padded into its place, then summed (all exact)."""
        rank = len(out_shape)
        dim = int(dim) % rank
        if dim == 0:
            raise CertificateUnavailable(f"{name}: concatenation along the batch dimension")
        parts: list[tuple[PadOp, int]] = []
        bias, offset = torch.zeros(out_shape, dtype=F64), 0
        for item in items:
            shape = item.shape if isinstance(item, _Var) else tuple(torch.as_tensor(item).shape)
            if len(shape) != rank or any(a != b for d, (a, b) in enumerate(zip(shape, out_shape)) if d != dim):
                raise CertificateUnavailable(f"{name}: concatenation of shapes the trace does not match")
            size = shape[dim]
            if isinstance(item, _Var):
                pads = [0, 0] * (rank - 1 - dim) + [offset, out_shape[dim] - offset - size]
                pad = PadOp(f"{name} (input {len(parts)})", item.shape, tuple(out_shape), None, True, tuple(pads))
                parts.append((pad, item.index))
            else:
                bias.narrow(dim, offset, size).copy_(torch.as_tensor(item).detach().to(F64))
            offset += size
        if offset != out_shape[dim] or not parts:
            raise CertificateUnavailable(f"{name}: concatenation the trace does not match")
        if bool((bias != 0).any()):
            parts[0][0].bias = bias
        index = -1
        for pad, source in parts:
            placed = self.add(pad.name, pad, [source], out_shape)
            index = placed if index < 0 else self.add(name, AddOp(name, tuple(out_shape)), [index, placed], out_shape)
        return index

    def dense(self, name: str, var: _Var, weight: torch.Tensor, bias: Any, out_shape: Shape) -> int:
        w = torch.as_tensor(weight).detach().to(F64)
        if w.dim() != 2 or var.shape[-1] != w.shape[1]:
            raise CertificateUnavailable(f"{name}: matrix product with a weight of shape {tuple(w.shape)}")
        b = None if bias is None else torch.as_tensor(bias).detach().to(F64)
        op = DenseOp(name, var.shape, tuple(out_shape), b, False, w)
        return self.add(name, op, [var.index], out_shape)

    def conv(self, name: str, var: _Var, m: nn.Conv2d | dict, out_shape: Shape) -> int:
        p = m if isinstance(m, dict) else {
            "weight": m.weight, "bias": m.bias, "stride": m.stride, "padding": m.padding,
            "dilation": m.dilation, "groups": m.groups,
        }  # fmt: skip
        if len(var.shape) < 3:
            raise CertificateUnavailable(f"{name}: Conv2d on a tensor of shape {var.shape}")
        if not isinstance(m, dict) and m.padding_mode != "zeros":  # torch pads first, then convolves unpadded
            pads, mode = list(m._reversed_padding_repeated_twice), m.padding_mode
            padded = tuple(F.pad(torch.zeros(var.shape), pads, mode=mode).shape)
            var = _Var(self.select(f"{name} ({mode} padding)", var, lambda t: F.pad(t, pads, mode=mode), padded), padded)
            p = {**p, "padding": 0}
        w = p["weight"].detach().to(F64)
        stride, dilation = _pair(p["stride"]), _pair(p["dilation"])
        padding = p["padding"]
        index, shape = var.index, var.shape
        if padding == "valid":
            padding = (0, 0)
        elif isinstance(padding, str):  # 'same': torch pads total = d (k - 1), the extra one on the right/bottom
            totals = [dilation[i] * (w.shape[2 + i] - 1) for i in range(2)]
            if totals[0] % 2 == 0 and totals[1] % 2 == 0:  # symmetric: the conv's own padding, as torch runs it
                padding = (totals[0] // 2, totals[1] // 2)  # (and a node the patches pass of crown.py covers)
            else:
                pads = (totals[1] // 2, totals[1] - totals[1] // 2, totals[0] // 2, totals[0] - totals[0] // 2)
                padded = (*shape[:-2], shape[-2] + totals[0], shape[-1] + totals[1])
                pad = PadOp(name, shape, padded, None, True, pads)
                index = self.add(name + " (same padding)", pad, [index], padded)
                shape, padding = padded, (0, 0)
        b = None if p["bias"] is None else p["bias"].detach().to(F64).reshape(-1, 1, 1)
        op = ConvOp(name, shape, tuple(out_shape), b, False, w, stride, _pair(padding), dilation, int(p["groups"]))
        return self.add(name, op, [index], out_shape)

    def conv_transpose(self, name: str, var: _Var, p: dict, out_shape: Shape) -> int:
        """A 2-D transposed convolution with zero padding; its output padding is read off the traced shape.

        torch derives it from `output_size` where one is passed, so the traced output shape is the
        one source that every spelling (module, function, aten, ONNX) agrees on; the op built here
        must reproduce that shape, else it is refused.
        """
        w = p["weight"]
        if not torch.is_tensor(w) or w.dim() != 4 or len(var.shape) < 3 or isinstance(p["padding"], str):
            raise CertificateUnavailable(f"{name}: a transposed convolution that is not 2-D with numeric padding")
        w = w.detach().to(F64)
        stride, padding, dilation = _pair(p["stride"]), _pair(p["padding"]), _pair(p["dilation"])
        extra = []
        for i in range(2):
            base = (var.shape[-2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (w.shape[2 + i] - 1) + 1
            extra.append(out_shape[-2 + i] - base)
        if not all(0 <= e < max(stride[i], dilation[i]) for i, e in enumerate(extra)):
            raise CertificateUnavailable(f"{name}: transposed convolution with output shape {tuple(out_shape)}")
        b = None if p["bias"] is None else p["bias"].detach().to(F64).reshape(-1, 1, 1)
        geometry = (stride, padding, (extra[0], extra[1]), dilation, int(p["groups"]))
        op = ConvTransposeOp(name, var.shape, tuple(out_shape), b, False, w, *geometry)
        if tuple(op.linear(torch.zeros((1, *var.shape), dtype=F64)).shape[1:]) != tuple(out_shape):
            raise CertificateUnavailable(f"{name}: transposed convolution with output shape {tuple(out_shape)}")
        return self.add(name, op, [var.index], out_shape)

    def batchnorm(self, name: str, var: _Var, m: nn.modules.batchnorm._BatchNorm, out_shape: Shape) -> int:
        if m.running_mean is None or m.running_var is None:
            raise CertificateUnavailable(f"{name}: batch norm without running statistics (batch-dependent)")
        return self.batchnorm_tensors(name, var, m.weight, m.bias, m.running_mean, m.running_var, m.eps, out_shape)

    def batchnorm_tensors(
        self, name: str, var: _Var, weight, bias, mean, variance, eps: float, out_shape: Shape
    ) -> int:
        """Batch norm in eval mode: a per-channel (dim 1) scale and shift.

        The float32 model adds eps as a float32 (torch and onnxruntime alike), so the graph
        does too. ``var + eps`` must be a normal float32: below, its rounding is absolute and
        can be any fraction of it (eps = 1e-42 made a margin of 1 lose 5e-4); a negative
        running variance (no batch gives one) could cancel eps to anything.
        """
        if len(var.shape) < 2:
            raise CertificateUnavailable(f"{name}: batch norm on a tensor of shape {var.shape}")
        variance = variance.detach()
        eps32 = float(torch.tensor(eps, dtype=torch.float32))
        if bool((variance < 0).any()):
            raise CertificateUnavailable(f"{name}: batch norm with a negative running variance")
        if not bool((variance.float() + eps32 >= torch.finfo(torch.float32).tiny).all()):
            raise CertificateUnavailable(
                f"{name}: batch norm whose running variance plus eps ({eps:g}) is below float32's normal range"
            )
        inv = 1.0 / torch.sqrt(variance.to(F64) + eps32)
        gamma = weight.detach().to(F64) if weight is not None else torch.ones_like(inv)
        beta = bias.detach().to(F64) if bias is not None else torch.zeros_like(inv)
        scale = gamma * inv
        shift = beta - mean.detach().to(F64) * scale
        view = (1, -1) + (1,) * (len(var.shape) - 2)
        index = self.scale(name, var, scale.reshape(view), shift.reshape(view), out_shape)
        # float32 batch norm forms the shift from beta and mean * scale: its rounding scales with both
        self.nodes[index].op.spread = (beta.abs() + (mean.detach().to(F64) * scale).abs()).reshape(view)
        return index

    def act(self, name: str, var: _Var, kind: str, **params: float) -> int:
        return self.add(name, ActOp(name, var.shape, kind, **params), [var.index], var.shape)

    def absolute(self, name: str, var: _Var) -> int:
        """|x| = relu(x) + relu(-x): exact, and float32 computes |x| exactly (no rounding charged).

        Not monotone, so not an activation: the two ReLUs are. Over an interval crossing 0
        their sum's bounds are [0, max(-lo, hi)]-wide; their relaxations add up to the
        chord of |x| above and any line through 0 of slope in [-1, 1] below.
        """
        shape = var.shape
        with self.rounding_free():
            up = self.act(f"{name} (relu of x)", var, "relu")
            flipped = _Var(self.scale(f"{name} (-x)", var, -1.0, 0.0, shape), shape)
            down = self.act(f"{name} (relu of -x)", flipped, "relu")
            return self.add(name, AddOp(name, shape, 1.0), [up, down], shape)

    def prelu(self, name: str, var: _Var, run: Callable[[torch.Tensor], torch.Tensor]) -> int:
        """PReLU, max(x, 0) + a min(x, 0), with the slopes `run` (the model's own op, re-run in float64) uses.

        Its slopes are read off a run on -1s and must reproduce a run on random values
        exactly. One slope for every unit is a LeakyReLU; slopes per channel are
        (1 - a) relu(x) + a x, a ReLU and two elementwise scales whose sum is the PReLU
        exactly. A negative slope (non-monotone) is refused, as for LeakyReLU.
        """
        try:
            with torch.no_grad():
                slope = -run(-torch.ones(var.shape, dtype=F64))
                probe = torch.randn(var.shape, dtype=F64, generator=torch.Generator().manual_seed(0))
                same = torch.equal(run(probe), torch.where(probe > 0, probe, slope * probe))
        except Exception as exc:  # e.g. slopes whose shape does not broadcast the way the op's checks want
            raise CertificateUnavailable(f"{name}: PReLU could not be re-run in float64 ({type(exc).__name__})") from None
        if not same or tuple(slope.shape) != tuple(var.shape):
            raise CertificateUnavailable(f"{name}: does not compute a PReLU the bound reproduces")
        if not bool(torch.isfinite(slope).all() and (slope >= 0).all()):
            raise CertificateUnavailable(f"{name}: PReLU with a negative slope {float(slope.min())} (non-monotone)")
        if bool((slope == slope.reshape(-1)[0]).all()):
            return self.act(name, var, "leaky_relu", slope=float(slope.reshape(-1)[0]))
        shape = var.shape
        relu = _Var(self.act(f"{name} (its ReLU part)", var, "relu"), shape)
        bent = self.scale(f"{name} ((1 - slope) relu(x))", relu, 1 - slope, 0.0, shape)
        straight = self.scale(f"{name} (slope x)", var, slope, 0.0, shape)
        return self.add(name, AddOp(name, shape, 1.0), [bent, straight], shape)

    def total(self, name: str, var: _Var, dims: Any, out_shape: Shape) -> int:
        """A sum over `dims`: their mean, scaled by the number of values it averages."""
        dims = [dims] if isinstance(dims, int) else list(dims)
        count = math.prod(var.shape[d] for d in dims)
        mean = self.mean(f"{name} (as a mean)", var, dims, out_shape)
        return self.scale(name, _Var(mean, tuple(out_shape)), float(count), 0.0, out_shape)

    def avgpool(self, name: str, var: _Var, p: dict, out_shape: Shape) -> int:
        divisor = p.get("divisor_override")
        if divisor is not None and divisor <= 0:  # a signed pool: AvgPoolOp is declared nonnegative (|A| = A)
            raise CertificateUnavailable(f"{name}: AvgPool2d with divisor_override {divisor}")
        kernel = _pair(p["kernel_size"])
        stride = _pair(p["stride"]) if p.get("stride") not in (None, [], ()) else kernel
        op = AvgPoolOp(
            name, var.shape, tuple(out_shape), None, True, kernel, stride, _pair(p.get("padding", 0)),
            bool(p.get("ceil_mode", False)), bool(p.get("count_include_pad", True)), p.get("divisor_override"),
        )  # fmt: skip
        return self.add(name, op, [var.index], out_shape)

    def maxpool(self, name: str, var: _Var, p: dict, out_shape: Shape) -> int:
        if p.get("return_indices"):
            raise CertificateUnavailable(f"{name}: MaxPool2d with return_indices")
        kernel = _pair(p["kernel_size"])
        stride = _pair(p["stride"]) if p.get("stride") not in (None, [], ()) else kernel
        padding, dilation = _pair(p.get("padding", 0)), _pair(p.get("dilation", 1))
        if p.get("ceil_mode") and len(var.shape) >= 3:
            var = self._ceil_extension(name, var, kernel, stride, padding, dilation, tuple(out_shape))
        op = MaxPoolOp(name, var.shape, tuple(out_shape), kernel, stride, padding, dilation)
        return self.add(name, op, [var.index], out_shape)

    def _ceil_extension(self, name: str, var: _Var, kernel, stride, padding, dilation, out_shape: Shape) -> _Var:
        """ceil_mode's extra windows at the right and bottom edges, as edge copies that change no maximum.

        torch starts every window inside the input (or its left padding), so a window that
        runs past the last row or column also covers that row or column (without
        dilation): copies of it past the edge leave every maximum as it was, and a plain
        max pool over the extended input has ceil_mode's windows.
        """
        if dilation != (1, 1):
            raise CertificateUnavailable(f"{name}: MaxPool2d with ceil_mode and dilation")
        extra = [
            max(0, (o - 1) * s + k - (n + 2 * p))
            for o, s, k, n, p in zip(out_shape[-2:], stride, kernel, var.shape[-2:], padding)
        ]
        if not any(extra):
            return var
        extended = (*var.shape[:-2], var.shape[-2] + extra[0], var.shape[-1] + extra[1])
        pads = (0, extra[1], 0, extra[0])
        index = self.select(f"{name} (ceil_mode edge)", var, lambda t: F.pad(t, pads, mode="replicate"), extended)
        return _Var(index, extended)

    def spatial_max(self, name: str, var: _Var, dims: Any, out_shape: Shape, sign: float = 1.0) -> int:
        """A max (a min where `sign` is -1) over an image's height and / or width: a max pool whose window spans them.

        The min is -max(-x), negation being exact. Reductions over the channels or the
        batch, and over tensors that are not images, are refused.
        """
        rank = len(var.shape)
        dims = sorted({int(d) % rank for d in ([dims] if isinstance(dims, int) else dims)}) if rank else []
        if rank != 4 or not dims or any(d not in (2, 3) for d in dims):
            raise CertificateUnavailable(f"{name}: a {'max' if sign > 0 else 'min'} over dimensions other than the image's height and width")
        _, c, h, w = var.shape
        kernel = (h if 2 in dims else 1, w if 3 in dims else 1)
        pooled = (1, c, h // kernel[0], w // kernel[1])
        if sign < 0:
            var = _Var(self.scale(f"{name} (negated)", var, -1.0, 0.0, var.shape), var.shape)
        index = self.add(name, MaxPoolOp(name, var.shape, pooled, kernel, kernel, (0, 0), (1, 1)), [var.index], pooled)
        if sign < 0:
            index = self.scale(f"{name} (negated back)", _Var(index, pooled), -1.0, 0.0, pooled)
        return self.reshape(name, _Var(index, pooled), out_shape)

    def adaptive_max(self, name: str, var: _Var, out_shape: Shape) -> int:
        """Adaptive max pooling to a size that divides the input: windows of one size, a max pool (else refused)."""
        (h, w), (oh, ow) = var.shape[-2:], tuple(out_shape)[-2:]
        if len(var.shape) != 4 or h % oh or w % ow:
            raise CertificateUnavailable(f"{name}: adaptive max pooling from {h}x{w} to {oh}x{ow} (windows of several sizes)")
        k = (h // oh, w // ow)
        return self.maxpool(name, var, {"kernel_size": k, "stride": k}, out_shape)

    def adaptive_avg(self, name: str, var: _Var, out_shape: Shape) -> int:
        (h, w), (oh, ow) = var.shape[-2:], tuple(out_shape)[-2:]
        if not (h % oh or w % ow):
            k = (h // oh, w // ow)
            return self.avgpool(name, var, {"kernel_size": k, "stride": k}, out_shape)
        return self._uneven_adaptive_avg(name, var, tuple(out_shape))

    def _uneven_adaptive_avg(self, name: str, var: _Var, out_shape: Shape) -> int:
        """Adaptive average pooling whose windows differ in size (vgg's 7x7 pool on a 2x2 map).

        Each window (torch's: rows floor(i h / oh) to ceil((i + 1) h / oh)) is gathered into a
        block of the largest window's size, zero-filled; a pool sums each block and a scale
        divides by the window's own size. All three are ops the bounds already handle, and
        the float32 allowances of a sum and a scale cover torch's sum-then-divide. The
        decomposition must reproduce the op itself on random values, else it is refused.
        """
        (h, w), (oh, ow) = var.shape[-2:], out_shape[-2:]
        rows, kh, row_len = _adaptive_windows(h, oh)
        cols, kw, col_len = _adaptive_windows(w, ow)
        blocks = (*var.shape[:-2], oh * kh, ow * kw)
        gather = self.select(f"{name} (windows)", var, lambda t: F.pad(t, (0, 1, 0, 1))[..., rows, :][..., cols], blocks)
        gathered = _Var(gather, blocks)
        pool = {"kernel_size": (kh, kw), "stride": (kh, kw), "divisor_override": 1}
        summed = _Var(self.avgpool(f"{name} (window sums)", gathered, pool, out_shape), out_shape)
        count = (row_len[:, None] * col_len[None, :]).to(F64)
        index = self.scale(name, summed, 1.0 / count, 0.0, out_shape)
        probe = torch.randn(var.shape, dtype=F64, generator=torch.Generator().manual_seed(0))
        out = probe[None]
        for i in (gathered.index, summed.index, index):  # the three ops as built, against torch's own pool
            out = self.nodes[i].op.apply(out)
        if not torch.allclose(out.reshape(out_shape), F.adaptive_avg_pool2d(probe, (oh, ow)), rtol=1e-12, atol=1e-12):
            raise CertificateUnavailable(f"{name}: adaptive average pooling whose windows robaudit cannot reproduce")
        return index

    def mean(self, name: str, var: _Var, dims: Any, out_shape: Shape) -> int:
        dims = [dims] if isinstance(dims, int) else list(dims)
        rank = len(var.shape)
        dims = sorted({d % rank for d in dims})
        if 0 in dims and var.shape[0] == 1 and len(dims) == 1:
            return self.reshape(name, var, out_shape)
        if 0 in dims:
            raise CertificateUnavailable(f"{name}: mean over the batch dimension")
        op = MeanOp(name, var.shape, tuple(out_shape), None, True, tuple(dims))
        return self.add(name, op, [var.index], out_shape)


def _adaptive_windows(n: int, out: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Adaptive pooling's windows along one axis, each padded to the widest: (gather index, width, lengths).

    Window i covers floor(i n / out) to ceil((i + 1) n / out); index n (past the end) is a zero fill.
    """
    starts = [i * n // out for i in range(out)]
    ends = [-(-(i + 1) * n // out) for i in range(out)]
    width = max(e - s for s, e in zip(starts, ends))
    index = [s + a if s + a < e else n for s, e in zip(starts, ends) for a in range(width)]
    lengths = torch.tensor([e - s for s, e in zip(starts, ends)])
    return torch.tensor(index), width, lengths


# --------------------------------------------------------------------------- the walk


_MAXPOOL_KEYS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")  # nn.MaxPool2d's


_CALL_METHODS = ("forward", "_conv_forward", "__call__", "_call_impl")  # what runs when a layer is called


def _replaced_layer_code(m: nn.Module) -> str | None:
    """Why a torch layer's subclass cannot be read as the layer (its weights by its type), or None.

    torch.fx keeps modules of torch's own namespaces (``torch.nn``, ``torch.ao.nn``) as
    single calls, and the bound reads such a call by the torch layer class it is an
    instance of. A subclass that brings its own ``forward`` computes something else:
    ``torch.ao.nn.qat.Linear`` multiplies by its weight rounded to the int8 grid, and was
    certified as the float ``nn.Linear`` (a soundness hunt of 2026-12-06 broke its radii).
    """
    cls = type(m)
    stock = next((c for c in cls.__mro__ if c.__module__.startswith("torch.nn.modules.") and c is not nn.Module), None)
    if stock is None or stock is cls:
        return None
    for c in cls.__mro__:
        if c is stock:
            return None
        replaced = [a for a in _CALL_METHODS if a in vars(c)]
        if replaced:
            return f"{cls.__module__}.{cls.__qualname__} replaces {stock.__name__}.{replaced[0]} (it computes something else)"
    return None


def _module_op(b: _Builder, name: str, m: nn.Module, args: list, kwargs: dict, out_shape: Shape) -> int:
    """Emit the op of one call_module node whose first argument depends on the input."""
    replaced = _replaced_layer_code(m)
    if replaced is not None:
        raise CertificateUnavailable(f"{name}: {replaced}")
    var = args[0]
    if type(m).__name__ in ("OnnxSum", "OnnxMean") and not kwargs:
        return _onnx_sum(b, name, type(m).__name__ == "OnnxMean", args, out_shape)
    if type(m).__name__ == "OnnxGemm" and len(args) == 3 and isinstance(var, _Var) and isinstance(args[2], _Var):
        if not m.trans_a and torch.is_tensor(args[1]) and len(var.shape) == 2 and not kwargs:
            # alpha A B + beta C with C input-dependent (the exporter fuses `h @ W + g` into one Gemm)
            weight = _gemm_weight(m, args[1])
            product = _Var(b.dense(f"{name} (alpha A B)", var, weight, None, out_shape), tuple(out_shape))
            c = args[2]
            if m.beta != 1:
                c = _Var(b.scale(f"{name} (beta C)", c, float(m.beta), 0.0, c.shape), c.shape)
            return b.binary(name, "add", product, c, out_shape)
    if not isinstance(var, _Var) or any(isinstance(a, _Var) for a in args[1:]):
        if type(m).__name__ == "OnnxBinaryMathOperation" and getattr(m, "axis", None) is None:
            fn = getattr(m.math_op_function, "__name__", "")
            if fn in _ONNX_BINARY:
                return b.binary(name, _ONNX_BINARY[fn], args[0], args[1], out_shape)
        raise CertificateUnavailable(name)
    kind = type(m).__name__
    if isinstance(m, nn.Linear):
        return b.dense(name, var, m.weight, m.bias, out_shape)
    if isinstance(m, nn.Conv2d):
        return b.conv(name, var, m, out_shape)
    if isinstance(m, nn.ConvTranspose2d) and m.padding_mode == "zeros":
        keys = ("weight", "bias", "stride", "padding", "dilation", "groups")
        return b.conv_transpose(name, var, {k: getattr(m, k) for k in keys}, out_shape)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return b.batchnorm(name, var, m, out_shape)
    if isinstance(m, nn.ReLU):
        return b.act(name, var, "relu")
    if isinstance(m, nn.LeakyReLU):
        return _activation(b, name, var, "leaky_relu", [var, m.negative_slope], {})
    if isinstance(m, nn.PReLU):
        weight = m.weight.detach().to(F64)
        return b.prelu(name, var, lambda t: F.prelu(t, weight))
    if kind == "OnnxPReLU" and len(args) == 2 and torch.is_tensor(args[1]) and not kwargs:
        slope = args[1].detach().to(F64)
        return b.prelu(name, var, lambda t: m(t, slope))
    if kind == "OnnxDropoutDynamic" and not m.training:  # F.dropout(training=self.training): the identity in eval mode,
        mode = args[2] if len(args) > 2 else None  # but the file's own run drops units where training_mode is set
        if mode is not None and (not torch.is_tensor(mode) or bool(mode.any())):
            raise CertificateUnavailable(f"{name}: Dropout with training_mode set (random in the file's own run)")
        return var.index
    if isinstance(m, nn.Softplus):
        return _activation(b, name, var, "softplus", [var, m.beta, m.threshold], {})
    if isinstance(m, (nn.ELU, nn.CELU)):
        return _activation(b, name, var, "elu" if isinstance(m, nn.ELU) else "celu", [var, m.alpha], {})
    if isinstance(m, nn.SELU):
        return _activation(b, name, var, "selu", [var], {})
    if isinstance(m, nn.Hardsigmoid) or kind == "OnnxHardSigmoid":
        alpha, beta = (1 / 6, 0.5) if isinstance(m, nn.Hardsigmoid) else (m.alpha, m.beta)
        return b.hard_sigmoid(name, var, alpha, beta, out_shape)
    if isinstance(m, nn.Softshrink):
        return b.soft_shrink(name, var, m.lambd, out_shape)
    if isinstance(m, nn.Tanhshrink):
        return b.tanh_shrink(name, var, out_shape)
    if isinstance(m, nn.Threshold):
        return b.threshold(name, var, m.threshold, m.value, out_shape)
    if isinstance(m, nn.Tanh):
        return b.act(name, var, "tanh")
    if isinstance(m, nn.Sigmoid):
        return b.act(name, var, "sigmoid")
    if isinstance(m, nn.AvgPool2d):
        keys = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
        p = {k: getattr(m, k) for k in keys}
        return b.avgpool(name, var, p, out_shape)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return b.adaptive_avg(name, var, out_shape)
    if isinstance(m, nn.AdaptiveMaxPool2d) and not m.return_indices:
        return b.adaptive_max(name, var, out_shape)
    if isinstance(m, nn.MaxPool2d):
        return b.maxpool(name, var, {k: getattr(m, k) for k in _MAXPOOL_KEYS}, out_shape)
    if isinstance(m, (nn.Flatten, nn.Unflatten)) or kind in _ONNX_RESHAPES:
        return b.reshape(name, var, out_shape)
    if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)) or kind in _ONNX_IDENTITY:
        return var.index
    if kind == "OnnxFunction" and getattr(m, "function", None) is torch.abs:  # ONNX Abs
        return b.absolute(name, var)
    if kind == "OnnxFunction" and getattr(m, "function", None) in _ACT_FUNCTIONS:
        # onnx2torch's wrapper of ONNX's elementwise math (Abs, Exp, Tanh, ...): `function(input)`,
        # read like a call of that function; of its table only torch.tanh is an activation here
        return _activation(b, name, var, _ACT_FUNCTIONS[m.function], [var], {})
    if kind == "OnnxCast":
        return _cast(name, var, getattr(m, "torch_dtype", None) or torch.float16)
    if kind == "OnnxBinaryMathOperation" and getattr(m, "axis", None) is None:
        fn = getattr(m.math_op_function, "__name__", "")
        if fn in _ONNX_BINARY:
            return b.binary(name, _ONNX_BINARY[fn], args[0], args[1], out_shape)
    if kind == "OnnxNeg":
        return b.scale(name, var, -1.0, 0.0, out_shape)
    if kind == "OnnxReduceStaticAxes" and m.operation_type in ("ReduceMean", "ReduceSum") and m.axes:
        return (b.mean if m.operation_type == "ReduceMean" else b.total)(name, var, m.axes, out_shape)
    if kind == "OnnxReduceStaticAxes" and m.operation_type in ("ReduceMax", "ReduceMin") and m.axes:
        return b.spatial_max(name, var, m.axes, out_shape, 1.0 if m.operation_type == "ReduceMax" else -1.0)
    if kind == "OnnxReduceSumStaticAxes":  # opset 13: axes given, or none (noop_with_empty_axes: the identity)
        if m._axes:
            return b.total(name, var, m._axes, out_shape)
        if m._noop_with_empty_axes:
            return var.index
    if kind in ("OnnxGlobalAveragePool", "OnnxGlobalAveragePoolWithKnownInputShape"):
        return b.mean(name, var, list(range(2, len(var.shape))), out_shape)
    if kind == "OnnxMatMul" and len(args) == 2 and torch.is_tensor(args[1]) and args[1].dim() == 2:
        return b.dense(name, var, args[1].T, None, out_shape)
    if kind == "OnnxGemm" and not m.trans_a and torch.is_tensor(args[1]) and len(var.shape) == 2:
        weight = _gemm_weight(m, args[1])
        bias = None if len(args) < 3 or args[2] is None else torch.as_tensor(args[2]).detach().to(F64) * m.beta
        return b.dense(name, var, weight, bias, out_shape)
    if kind == "OnnxGemm" and m.trans_a:
        raise CertificateUnavailable(f"{name}: Gemm with transA=1 (its input operand transposed), which the bound does not read")
    if kind in ("OnnxReduceStaticAxes", "OnnxReduceSumStaticAxes") and not getattr(m, "axes", getattr(m, "_axes", None)):
        raise CertificateUnavailable(f"{name}: {getattr(m, 'operation_type', 'ReduceSum')} over every axis, the batch axis included")
    raise CertificateUnavailable(name)


def _gemm_weight(m: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """ONNX Gemm's alpha B (B transposed when transB) as the (out, in) weight of a dense layer."""
    return (matrix.T if m.trans_b else matrix).T.to(F64) * m.alpha


def _onnx_sum(b: _Builder, name: str, mean: bool, args: list, out_shape: Shape) -> int:
    """ONNX Sum / Mean of several tensors: additions in turn (then a scale by 1 / count for Mean)."""
    if not args or not all(isinstance(a, _Var) and a.shape == tuple(out_shape) for a in args):
        raise CertificateUnavailable(f"{name}: {'mean' if mean else 'sum'} of tensors that broadcast or are constant")
    acc = args[0]
    for k, item in enumerate(args[1:], 1):
        acc = _Var(b.binary(f"{name} (term {k + 1})", "add", acc, item, out_shape), tuple(out_shape))
    if not mean:
        return acc.index
    return b.scale(name, acc, 1.0 / len(args), 0.0, out_shape)


def _function_op(b: _Builder, name: str, n: fx.Node, args: list, kwargs: dict, out_shape: Shape) -> int:
    """Emit the op of a call_function / call_method node that depends on the input."""
    target = n.target
    var = args[0] if args and isinstance(args[0], _Var) else None
    if n.op == "call_method":
        if target in _BINARY_METHODS and not kwargs:
            return b.binary(name, _BINARY_METHODS[target], args[0], args[1], out_shape)
        if target in ("add", "add_", "sub", "sub_") and set(kwargs) == {"alpha"}:  # x.add(y, alpha=2)
            return _aten_binary(b, name, target, args, kwargs, out_shape)
        if var is None or any(isinstance(a, _Var) for a in args[1:]):
            raise CertificateUnavailable(name)
        if target in _CAST_METHODS:
            return _cast(name, var, _cast_dtype(target, list(args[1:]), kwargs))
        if target in _IDENTITY_METHODS:
            return var.index
        if target in _RESHAPE_METHODS:
            return b.reshape(name, var, out_shape)
        if target in _ACT_METHODS:
            return b.act(name, var, _ACT_METHODS[target])
        if target == "neg":
            return b.scale(name, var, -1.0, 0.0, out_shape)
        if target in ("abs", "absolute") and len(args) == 1 and not kwargs:
            return b.absolute(name, var)
        if target in ("mean", "sum") and not kwargs.get("dtype"):
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            if dims is None:
                raise CertificateUnavailable(f"{name} over every dimension (batch included)")
            return (b.mean if target == "mean" else b.total)(name, var, dims, out_shape)
        if target in ("amax", "amin"):
            dims = _bind(["input", "dim", "keepdim"], {"dim": ()}, args, kwargs)["dim"]
            return b.spatial_max(name, var, dims, out_shape, 1.0 if target == "amax" else -1.0)
        raise CertificateUnavailable(name)
    if target in _BINARY and not (kwargs.get("alpha") not in (None, 1) or kwargs.get("rounding_mode")):
        return b.binary(name, _BINARY[target], args[0], args[1], out_shape)
    if target in _ALPHA_FUNCTIONS and set(kwargs) <= {"alpha"}:  # torch.add(x, y, alpha=2), torch.rsub(x, y)
        return _aten_binary(b, name, _ALPHA_FUNCTIONS[target], args, kwargs, out_shape)
    if var is None or any(isinstance(a, _Var) for a in list(args[1:]) + list(kwargs.values())):
        raise CertificateUnavailable(name)
    if target in (operator.neg, torch.neg):
        return b.scale(name, var, -1.0, 0.0, out_shape)
    if target in (operator.abs, torch.abs, torch.absolute) and len(args) == 1 and not kwargs:
        return b.absolute(name, var)
    if target in _RESHAPE_FUNCTIONS:
        return b.reshape(name, var, out_shape)
    if target is F.hardsigmoid:
        return b.hard_sigmoid(name, var, 1 / 6, 0.5, out_shape)
    if target is F.softshrink:
        return b.soft_shrink(name, var, _bind(["input", "lambd"], {"lambd": 0.5}, args, kwargs)["lambd"], out_shape)
    if target is F.tanhshrink:
        return b.tanh_shrink(name, var, out_shape)
    if target in (F.threshold, F._threshold, torch.threshold):
        p = _bind(["input", "threshold", "value"], {}, args, kwargs)
        return b.threshold(name, var, p["threshold"], p["value"], out_shape)
    if target in _ACT_FUNCTIONS:
        return _activation(b, name, var, _ACT_FUNCTIONS[target], args, kwargs)
    if target is F.dropout:
        p = _bind(["input", "p", "training"], {"training": True}, args, kwargs)
        if not p["training"]:
            return var.index
    if target in (torch.mean, torch.sum) and not kwargs.get("dtype"):
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        if dims is not None:
            return (b.mean if target is torch.mean else b.total)(name, var, dims, out_shape)
    if target is F.batch_norm:
        names = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
        p = _bind(names, {"weight": None, "bias": None, "training": False, "eps": 1e-5}, args, kwargs)
        stats = (p["running_mean"], p["running_var"])
        if p["training"] is not False or not all(torch.is_tensor(t) for t in stats):
            raise CertificateUnavailable(f"{name} (batch norm in training mode, or without running statistics)")
        return b.batchnorm_tensors(name, var, p["weight"], p["bias"], *stats, float(p["eps"]), out_shape)
    if target in (F.prelu, torch.prelu) and len(args) == 2 and torch.is_tensor(args[1]) and not kwargs:
        weight = args[1].detach().to(F64)
        return b.prelu(name, var, lambda t: F.prelu(t, weight))
    if target is F.linear:
        p = _bind(["input", "weight", "bias"], {"bias": None}, args, kwargs)
        return b.dense(name, var, p["weight"], p["bias"], out_shape)
    if target in (operator.matmul, torch.matmul) and torch.is_tensor(args[1]) and args[1].dim() == 2:
        return b.dense(name, var, args[1].T, None, out_shape)
    if target in (F.conv2d, torch.conv2d):
        names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
        p = _bind(names, {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}, args, kwargs)
        return b.conv(name, var, p, out_shape)
    if target in (F.conv_transpose2d, torch.conv_transpose2d):
        return b.conv_transpose(name, var, _bind(_CONV_TRANSPOSE_ARGS, _CONV_DEFAULTS, args, kwargs), out_shape)
    if target is F.avg_pool2d:
        names = ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]
        return b.avgpool(name, var, _bind(names, {}, args, kwargs), out_shape)
    if target in (F.max_pool2d, torch.max_pool2d, F.max_pool2d_with_indices):
        names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
        return b.maxpool(name, var, _bind(names, {}, args, kwargs), out_shape)
    if target is F.adaptive_avg_pool2d:
        return b.adaptive_avg(name, var, out_shape)
    if target in (F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices) and not kwargs.get("return_indices"):
        if len(args) > 2 and args[2]:
            raise CertificateUnavailable(f"{name}: adaptive max pooling with return_indices")
        return b.adaptive_max(name, var, out_shape)
    if target in (torch.amax, torch.amin):
        dims = _bind(["input", "dim", "keepdim"], {"dim": ()}, args, kwargs)["dim"]
        return b.spatial_max(name, var, dims, out_shape, 1.0 if target is torch.amax else -1.0)
    raise CertificateUnavailable(name)


_ATEN_TUPLE = {"_native_batch_norm_legit_no_training", "native_batch_norm", "_native_batch_norm_legit", "adaptive_max_pool2d"}
_ATEN_RESHAPES = {"view", "reshape", "_unsafe_view", "_reshape_alias", "flatten", "unflatten", "squeeze", "unsqueeze"}
_ATEN_IDENTITY = {"clone", "contiguous", "alias", "detach", "lift_fresh_copy"}
_ATEN_CASTS = {"_to_copy", "to", "type_as", "_cast_Float", "_cast_Double"}  # identity only when exact: `_aten_cast`
_ATEN_ACTS = {
    "relu": "relu", "relu_": "relu", "tanh": "tanh", "tanh_": "tanh", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
    "leaky_relu": "leaky_relu", "leaky_relu_": "leaky_relu", "softplus": "softplus", "elu": "aten_elu",
    "elu_": "aten_elu", "celu": "celu", "celu_": "celu", "selu": "selu", "selu_": "selu",
}  # fmt: skip
_ATEN_BINARY = {k: k.rstrip("_") for k in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "rsub")}
_ATEN_DROPOUTS = {
    "dropout", "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout", "alpha_dropout_",
    "feature_alpha_dropout", "feature_alpha_dropout_",
}  # fmt: skip
_CONV_TRANSPOSE_ARGS = ["input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"]
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}
_ATEN_CONVS = {"conv2d", "convolution", "_convolution", "_convolution_mode"}  # the last: padding "same" / "valid"
_ATEN_SHAPE = {"sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "size", "dim", "numel", "stride"}
# constant tensors shaped like their argument (full_like(h, c), h.new_zeros(...)): they read its shape, never its values
_FILLED_LIKE = {"full_like", "zeros_like", "ones_like", "new_full", "new_zeros", "new_ones"}  # aten ops and methods
_FILLED_FUNCTIONS = {torch.full_like, torch.zeros_like, torch.ones_like}
# Checks torch.export and the TorchScript converter insert: they return nothing and compute nothing.
_ATEN_CHECKS = {
    "_assert_tensor_metadata", "_assert_scalar", "_assert_async", "_functional_assert_async",
    "_functional_assert_scalar", "sym_constrain_range", "sym_constrain_range_for_size",
}  # fmt: skip
_FLOATS = (torch.float32, torch.float64)  # the arithmetic the bound reproduces (float64 covers float32)


def _aten_name(target: Any) -> str | None:
    """'conv2d' for torch.ops.aten.conv2d.default (torch.export graphs), else None."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return target._opname
    return None


def _aten_cast(name: str, var: _Var, dtypes: tuple[torch.dtype | None, torch.dtype] | None) -> int:
    """A cast is the identity for the bound only to float32 or float64 (the bound works in float64
    and treats float32 rounding as every float32 layer's); float16, bfloat16 and integer casts
    round or truncate the values, so they are refused.

    Decided on the dtypes the traced run saw (input, output), which covers every spelling
    (`.to(dtype)`, `.to(device, dtype)`, `.type_as(t)`, `_to_copy(dtype=)`, `.half()`).
    """
    source, target = dtypes or (None, None)
    if target in _FLOATS:
        return var.index
    what = "an unknown dtype" if target is None else str(target).removeprefix("torch.")
    if source is not None and source != target:
        what += f" from {str(source).removeprefix('torch.')}"
    raise CertificateUnavailable(f"{name}: cast to {what} rounds the values (the bound is exact for float32/float64)")


def _aten_binary(b: _Builder, name: str, op: str, args: list, kwargs: dict, out_shape: Shape) -> int:
    """add/sub with their `alpha` (``a + alpha * b``), rsub (``b - alpha * a``), mul and div (no rounding)."""
    kind = _ATEN_BINARY[op]
    p = _bind(["input", "other", "alpha"], {"alpha": 1}, args, kwargs)
    a, c, alpha = p["input"], p["other"], p["alpha"]
    if kind in ("mul", "div"):
        if p.get("rounding_mode") is not None:
            raise CertificateUnavailable(f"{name}: division with rounding_mode={p['rounding_mode']!r}")
        return b.binary(name, kind, a, c, out_shape)
    if isinstance(alpha, _Var) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CertificateUnavailable(f"{name}: {kind} with alpha {alpha!r}")
    if alpha not in (1, -1):
        alpha = float(torch.tensor(alpha, dtype=torch.float32))  # torch multiplies float32 tensors by alpha as a float32
    if kind == "rsub":  # other - alpha * input
        a, c, kind = c, a, "sub"
    sign = -1.0 if kind == "sub" else 1.0
    if isinstance(a, _Var) and isinstance(c, _Var):
        if alpha not in (1, -1):  # scale the second term first: a + (sign * alpha) * c
            c = _Var(b.scale(f"{name} (alpha)", c, sign * float(alpha), 0.0, c.shape), c.shape)
            alpha, sign = 1, 1.0
        return b.binary(name, "add" if sign * alpha > 0 else "sub", a, c, out_shape)
    if isinstance(a, _Var):
        other = torch.as_tensor(c).detach().to(F64) * (sign * alpha)
        if alpha not in (1, -1) and not torch.equal(other.float().to(F64), other):
            # torch rounds alpha * constant (or fuses it into the sum): a rounding the added constant cannot show
            raise CertificateUnavailable(f"{name}: {kind} of a constant times alpha {alpha!r}, which float32 rounds")
        return b.binary(name, "add", a, other, out_shape)
    if isinstance(c, _Var):  # constant + sign * alpha * var
        return b.scale(name, c, sign * float(alpha), torch.as_tensor(a).detach().to(F64), out_shape)
    raise CertificateUnavailable(name)


def _aten_op(
    b: _Builder,
    name: str,
    op: str,
    args: list,
    kwargs: dict,
    out_shape: Shape,
    dtypes: tuple[torch.dtype | None, torch.dtype] | None = None,
) -> int:
    """Emit the op of an aten call (graphs saved with torch.export, or converted from TorchScript).

    `dtypes` is (input, output) dtype of the traced run. Every op not listed here, and
    every argument choice the bound does not reproduce exactly, raises CertificateUnavailable
    naming the op: nothing is approximated.
    """
    if op in _ATEN_CASTS and args and isinstance(args[0], _Var):
        return _aten_cast(name, args[0], dtypes)
    if dtypes is not None and dtypes[1] not in _FLOATS:
        raise CertificateUnavailable(f"{name}: computes in {str(dtypes[1]).removeprefix('torch.')}")
    if op in _ATEN_BINARY:
        return _aten_binary(b, name, op, args, kwargs, out_shape)
    if op == "addmm" and len(args) >= 3 and isinstance(args[1], _Var):  # beta * input + alpha * mat1 @ mat2
        p = _bind(["input", "mat1", "mat2"], {"beta": 1, "alpha": 1}, args, kwargs)
        if isinstance(p["input"], _Var) or isinstance(p["mat2"], _Var) or not torch.is_tensor(p["mat2"]):
            raise CertificateUnavailable(f"{name}: matrix product of two input-dependent tensors")
        weight = p["mat2"].detach().to(F64).T * float(p["alpha"])
        bias = None if p["beta"] == 0 else torch.as_tensor(p["input"]).detach().to(F64) * float(p["beta"])
        if bias is not None and torch.broadcast_shapes(bias.shape, out_shape) != tuple(out_shape):
            raise CertificateUnavailable(f"{name}: a bias that broadcasts the sample to a larger shape")
        return b.dense(name, args[1], weight, bias, out_shape)
    var = args[0] if args and isinstance(args[0], _Var) else None
    if var is None or any(isinstance(a, _Var) for a in list(args[1:]) + list(kwargs.values())):
        raise CertificateUnavailable(name)
    if op in _ATEN_RESHAPES:
        return b.reshape(name, var, out_shape)
    if op in ("hardsigmoid", "hardsigmoid_"):
        return b.hard_sigmoid(name, var, 1 / 6, 0.5, out_shape)
    if op == "softshrink":
        return b.soft_shrink(name, var, _bind(["input", "lambd"], {"lambd": 0.5}, args, kwargs)["lambd"], out_shape)
    if op in ("threshold", "threshold_"):
        p = _bind(["input", "threshold", "value"], {}, args, kwargs)
        return b.threshold(name, var, p["threshold"], p["value"], out_shape)
    if op in _ATEN_IDENTITY:
        return var.index
    if op in _ATEN_DROPOUTS:
        if _bind(["input", "p", "train"], {"train": True}, args, kwargs)["train"]:
            raise CertificateUnavailable(f"{name}: dropout in training mode (random)")
        return var.index
    if op == "neg":
        return b.scale(name, var, -1.0, 0.0, out_shape)
    if op in ("abs", "abs_") and len(args) == 1 and not kwargs:
        return b.absolute(name, var)
    if op in _ATEN_ACTS:
        return _activation(b, name, var, _ATEN_ACTS[op], args, kwargs)
    if op == "linear":
        p = _bind(["input", "weight", "bias"], {"bias": None}, args, kwargs)
        return b.dense(name, var, p["weight"], p["bias"], out_shape)
    if op in ("mm", "matmul") and len(args) == 2 and torch.is_tensor(args[1]) and args[1].dim() == 2:
        return b.dense(name, var, args[1].T, None, out_shape)
    if op in _ATEN_CONVS:
        names = ["input", "weight", "bias", "stride", "padding", "dilation"]
        names += ["groups"] if op in ("conv2d", "_convolution_mode") else ["transposed", "output_padding", "groups"]
        defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "transposed": False}
        p = _bind(names, {**defaults, "output_padding": 0}, args, kwargs)
        if not torch.is_tensor(p["weight"]) or p["weight"].dim() != 4:
            raise CertificateUnavailable(f"{name}: a convolution that is not 2-D")
        extra = p["output_padding"]
        if p["transposed"]:
            return b.conv_transpose(name, var, p, out_shape)
        if any(int(v) for v in (extra if isinstance(extra, (list, tuple)) else [extra])):
            raise CertificateUnavailable(f"{name}: convolution with output_padding")
        return b.conv(name, var, p, out_shape)
    if op == "conv_transpose2d":
        return b.conv_transpose(name, var, _bind(_CONV_TRANSPOSE_ARGS, _CONV_DEFAULTS, args, kwargs), out_shape)
    if op == "max_pool2d":
        names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"]
        return b.maxpool(name, var, _bind(names, {}, args, kwargs), out_shape)
    if op == "avg_pool2d":
        names = ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]
        return b.avgpool(name, var, _bind(names, {}, args, kwargs), out_shape)
    if op in ("adaptive_avg_pool2d", "_adaptive_avg_pool2d"):
        return b.adaptive_avg(name, var, out_shape)
    if op == "adaptive_max_pool2d":  # (values, indices): the indices are not tracked
        return b.adaptive_max(name, var, out_shape)
    if op in ("amax", "amin"):
        dims = _bind(["input", "dim", "keepdim"], {"dim": ()}, args, kwargs)["dim"]
        return b.spatial_max(name, var, dims, out_shape, 1.0 if op == "amax" else -1.0)
    if op in ("mean", "sum"):
        dims = _bind(["input", "dim", "keepdim"], {"dim": None}, args, kwargs)["dim"]
        if dims is None or (isinstance(dims, (list, tuple)) and not dims):
            raise CertificateUnavailable(f"{name}: {op} over every dimension (batch included)")
        return (b.mean if op == "mean" else b.total)(name, var, dims, out_shape)
    if op in ("prelu", "_prelu_kernel") and len(args) == 2 and torch.is_tensor(args[1]):
        weight = args[1].detach().to(F64)
        aten_op = getattr(torch.ops.aten, op)
        return b.prelu(name, var, lambda t: aten_op(t, weight))
    if op in ("batch_norm", *_ATEN_TUPLE):
        names = ["input", "weight", "bias", "running_mean", "running_var"]
        names += ["momentum", "eps"] if op == "_native_batch_norm_legit_no_training" else ["training", "momentum", "eps"]
        p = _bind(names, {"training": False}, args, kwargs)
        stats = (p["running_mean"], p["running_var"])
        if p["training"] is not False or not all(torch.is_tensor(s) for s in stats):
            raise CertificateUnavailable(f"{name} (batch norm in training mode, or without running statistics)")
        return b.batchnorm_tensors(name, var, p["weight"], p["bias"], *stats, float(p["eps"]), out_shape)
    raise CertificateUnavailable(name)


# Ops that only move values or fill constants, whatever their arguments: `_Builder.select`
# reads their index map off the op itself (and refuses the op if the map is not pure movement).
_MOVE_MODULES = (
    nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd,
    nn.modules.padding._CircularPadNd, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
)  # fmt: skip
_ONNX_MOVES = {
    "OnnxSlice", "OnnxSliceV9", "OnnxTranspose", "OnnxExpand", "OnnxTile", "OnnxDepthToSpace", "OnnxGather",
    "OnnxPadStatic", "OnnxPadDynamic", "OnnxGatherND", "OnnxGatherElements",
}  # fmt: skip
_MOVE_FUNCTIONS = {
    operator.getitem, torch.transpose, torch.permute, torch.flip, torch.roll, torch.narrow, torch.select,
    torch.index_select, torch.movedim, torch.t, torch.swapaxes, torch.swapdims, torch.gather, torch.tile, F.pad,
    F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle,
}  # fmt: skip
_MOVE_METHODS = {
    "transpose", "permute", "t", "flip", "roll", "narrow", "select", "index_select", "movedim", "swapaxes", "swapdims",
    "repeat", "expand", "expand_as", "tile", "gather", "unfold", "__getitem__",
}  # fmt: skip
_ATEN_MOVES = {
    "slice", "select", "permute", "transpose", "t", "flip", "roll", "narrow", "index_select", "movedim", "swapaxes",
    "swapdims", "expand", "repeat", "tile", "gather", "unfold", "index", "_unsafe_index", "pixel_shuffle",
    "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle", "constant_pad_nd", "pad", "reflection_pad1d",
    "reflection_pad2d", "reflection_pad3d", "replication_pad1d", "replication_pad2d", "replication_pad3d",
    "_pad_circular", "upsample_nearest1d", "upsample_nearest2d", "_upsample_nearest_exact1d",
    "_upsample_nearest_exact2d", "slice_copy", "select_copy", "permute_copy", "transpose_copy", "t_copy",
    "expand_copy",
}  # fmt: skip
_NEAREST = ("nearest", "nearest-exact")
_CATS = {torch.cat, torch.concat, torch.concatenate}
_SPLIT_FUNCTIONS = {torch.split, torch.chunk, torch.tensor_split, torch.unbind}
_CLAMP_FUNCTIONS = {
    torch.clamp: "clamp", torch.clip: "clip", torch.clamp_min: "clamp_min", torch.clamp_max: "clamp_max",
    F.hardtanh: "hardtanh", F.relu6: "relu6", torch.minimum: "minimum", torch.maximum: "maximum",
    torch.fmin: "minimum", torch.fmax: "maximum",
}  # fmt: skip
# fmax / fmin differ from maximum / minimum only where an operand is NaN, which no bounded value is
_EXTREMA = {"minimum": "minimum", "maximum": "maximum", "fmin": "minimum", "fmax": "maximum"}


def _sole_input(args: list, kwargs: dict) -> _Var | None:
    """The first argument, if it is the call's only input-dependent value (nested ones included)."""
    found: list[_Var] = []
    fx.node.map_aggregate((args, kwargs), lambda v: found.append(v) if isinstance(v, _Var) else None)
    return args[0] if len(found) == 1 and args and found[0] is args[0] else None


def _rerun(
    n: fx.Node, gm: fx.GraphModule, args: list, kwargs: dict, dtype: torch.dtype | None = None
) -> Callable[[torch.Tensor], Any]:
    """The node's own call with its one input-dependent argument replaced by a given tensor (and its
    floating-point constants converted to `dtype`, when given: float32 to float64 is exact)."""

    def constant(v: Any) -> Any:
        return v.to(dtype) if dtype is not None and torch.is_tensor(v) and v.is_floating_point() else v

    def run(t: torch.Tensor) -> Any:
        a, k = fx.node.map_aggregate((args, kwargs), lambda v: t if isinstance(v, _Var) else constant(v))
        if n.op == "call_module":
            return gm.get_submodule(n.target)(*a, **k)
        if n.op == "call_method":
            return getattr(a[0], n.target)(*a[1:], **k)
        return n.target(*a, **k)

    return run


def _clamp_bounds(n: fx.Node, module: nn.Module | None, aten: str | None, args: list, kwargs: dict) -> tuple | None:
    """(min, max) of a clamp in any spelling (None: no bound on that side), or None for another op."""
    if module is not None:
        if isinstance(module, nn.Hardtanh) or type(module).__name__ == "OnnxClip":  # ReLU6 is a Hardtanh
            return module.min_val, module.max_val
        return None
    if aten is not None:
        key = aten
    elif n.op == "call_method":
        key = str(n.target)
    else:
        key = _CLAMP_FUNCTIONS.get(n.target, "")
    key = key.rstrip("_")
    key = _EXTREMA.get(key, key)
    if key in ("clamp", "clip"):
        p = _bind(["input", "min", "max"], {"min": None, "max": None}, args, kwargs)
        return p["min"], p["max"]
    if key == "clamp_min":
        return _bind(["input", "min"], {}, args, kwargs)["min"], None
    if key == "clamp_max":
        return None, _bind(["input", "max"], {}, args, kwargs)["max"]
    if key == "hardtanh":
        p = _bind(["input", "min_val", "max_val"], {"min_val": -1.0, "max_val": 1.0}, args, kwargs)
        return p["min_val"], p["max_val"]
    if key == "relu6":
        return 0.0, 6.0
    if key in ("minimum", "maximum") and len(args) == 2 and not kwargs and not isinstance(args[1], _Var):
        return (None, args[1]) if key == "minimum" else (args[1], None)  # with a constant: a one-sided clamp
    return None


def _extremum_kind(n: fx.Node, module: nn.Module | None, function: str | None, args: list, kwargs: dict) -> str | None:
    """'maximum' / 'minimum' for an elementwise max / min that `_Builder.extremum` takes, else None.

    Those are: of two input-dependent tensors (torch.maximum, x.minimum(y), aten), the
    binary torch.max(a, b) / a.min(b) with a tensor second argument (not a reduction over a
    dimension), and ONNX Max / Min of any number of inputs. A max / min of the input and a
    constant is a clamp, which `_clamp_bounds` reads.
    """
    if kwargs:
        return None
    if type(module).__name__ == "OnnxMinMax" and args:
        return "maximum" if module._op_type == "Max" else "minimum"
    if n.op == "call_method" and n.target in _EXTREMA:
        function = _EXTREMA[n.target]
    if function in ("minimum", "maximum") and len(args) == 2 and all(isinstance(a, _Var) for a in args):
        return function
    binary = (n.op == "call_function" and n.target in (torch.max, torch.min)) or (
        n.op == "call_method" and n.target in ("max", "min")
    )
    if binary and len(args) == 2 and isinstance(args[0], _Var) and (isinstance(args[1], _Var) or torch.is_tensor(args[1])):
        return "maximum" if getattr(n.target, "__name__", n.target) == "max" else "minimum"
    return None


def _moves_values(n: fx.Node, module: nn.Module | None, aten: str | None, args: list, kwargs: dict) -> bool:
    """Whether the op is data movement by definition (its arguments are checked by `_Builder.select`)."""
    if module is not None:
        kind = type(module).__name__
        if isinstance(module, nn.Upsample):
            return module.mode in _NEAREST
        if kind == "OnnxResize":
            return module.onnx_mode == "nearest"
        return isinstance(module, _MOVE_MODULES) or kind in _ONNX_MOVES
    if aten is not None:
        return aten in _ATEN_MOVES
    if n.op == "call_method":
        return n.target in _MOVE_METHODS
    if n.target is F.interpolate:
        return _bind(["input", "size", "scale_factor", "mode"], {"mode": "nearest"}, args, kwargs)["mode"] in _NEAREST
    return n.target in _MOVE_FUNCTIONS


def _structural_op(
    b: _Builder, name: str, n: fx.Node, gm: fx.GraphModule, args: list, kwargs: dict, out_shape: Shape
) -> int | None:
    """Concatenation (stacking too), clamps and data movement in any spelling (module, function,
    method, aten, onnx2torch), or None for any other op."""
    module = gm.get_submodule(n.target) if n.op == "call_module" else None
    aten = _aten_name(n.target) if n.op == "call_function" else None
    if type(module).__name__ == "OnnxConcat":
        return b.concat(name, args, module.axis, out_shape)
    if (n.op == "call_function" and n.target in _CATS) or aten in ("cat", "concat", "concatenate"):
        dim = kwargs.pop("axis", 0)
        p = _bind(["tensors", "dim"], {"dim": dim}, args, kwargs)
        return b.concat(name, list(p["tensors"]), p["dim"], out_shape)
    if (n.op == "call_function" and n.target is torch.stack) or aten == "stack":
        p = _bind(["tensors", "dim"], {"dim": 0}, args, kwargs)
        dim = int(p["dim"]) % len(out_shape)
        items = []
        for item in p["tensors"]:  # stack = unsqueeze each, then cat
            if isinstance(item, _Var):
                shape = (*item.shape[:dim], 1, *item.shape[dim:])
                item = _Var(b.reshape(f"{name} (unsqueeze)", item, shape), shape)
            else:
                item = torch.as_tensor(item).unsqueeze(dim)
            items.append(item)
        return b.concat(name, items, dim, out_shape)
    function = aten or (_CLAMP_FUNCTIONS.get(n.target) if n.op == "call_function" else None)
    function = _EXTREMA.get(function or "", function)
    extremum = _extremum_kind(n, module, function, args, kwargs)
    if extremum is not None:
        return b.extremum(name, extremum, args, out_shape)
    if function in ("minimum", "maximum") and len(args) == 2 and isinstance(args[1], _Var) and not isinstance(args[0], _Var):
        args = [args[1], args[0]]  # minimum(c, x) = minimum(x, c)
    var = _sole_input(args, kwargs)
    if var is None:
        return None
    bounds = _clamp_bounds(n, module, aten, args, kwargs)
    if bounds is not None:
        return b.clamp(name, var, *bounds, out_shape)
    if _moves_values(n, module, aten, args, kwargs):
        return b.select(name, var, _rerun(n, gm, args, kwargs), out_shape)
    return None


_SPLITS = {"split", "chunk", "tensor_split", "unbind", "split_with_sizes", "unsafe_split", "unsafe_chunk"}
_ONNX_SPLITS = {"OnnxSplit", "OnnxSplit13"}


def _in_family(n: fx.Node, gm: fx.GraphModule, onnx: set, methods: set, aten: set, functions: set) -> bool:
    """Whether the node calls one of a family of ops, named per kind of call: onnx2torch module class names,
    tensor method names, aten op names, Python functions."""
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__ in onnx
    if n.op == "call_method":
        return n.target in methods
    name = _aten_name(n.target)
    return name in aten if name is not None else n.target in functions


def _split_parts(
    b: _Builder, name: str, n: fx.Node, gm: fx.GraphModule, args: list, kwargs: dict, value: Any
) -> tuple | None:
    """split / chunk / unbind / ONNX Split: one data-movement op per part (None for any other op)."""
    if not (isinstance(value, (tuple, list)) and value and all(torch.is_tensor(v) for v in value)):
        return None
    known = _in_family(n, gm, _ONNX_SPLITS, _SPLITS, _SPLITS, _SPLIT_FUNCTIONS)
    var = _sole_input(args, kwargs)
    if not known or var is None:
        return None
    if not all(v.is_floating_point() for v in value):
        raise CertificateUnavailable(f"{name} (returns tensors that are not float)")
    run = _rerun(n, gm, args, kwargs)
    parts = []
    for i, v in enumerate(value):
        shape = tuple(v.shape)
        parts.append(_Var(b.select(f"{name} [{i}]", var, lambda t, i=i: run(t)[i], shape), shape))
    return tuple(parts)


_SOFTMAX_FUNCTIONS = {torch.softmax: "softmax", F.softmax: "softmax", torch.log_softmax: "log_softmax",
                      F.log_softmax: "log_softmax", torch.special.softmax: "softmax",
                      torch.special.log_softmax: "log_softmax"}  # fmt: skip
_ATEN_SOFTMAX = {"_softmax": "softmax", "softmax": "softmax", "_log_softmax": "log_softmax", "log_softmax": "log_softmax"}


def _softmax_kind(n: fx.Node, gm: fx.GraphModule) -> tuple[str, int, bool] | None:
    """(kind, dim, over every dim from `dim` on) for a softmax or log-softmax node in float arithmetic, else None."""
    args, kwargs = tuple(n.args[1:]), dict(n.kwargs)
    if n.op == "call_module":
        module = gm.get_submodule(n.target)
        if args or kwargs:
            return None
        if type(module) in (nn.Softmax, nn.LogSoftmax) and module.dim is not None:
            return ("softmax" if type(module) is nn.Softmax else "log_softmax"), module.dim, False
        if type(module).__name__ == "OnnxSoftmaxV1V11":  # ONNX opset < 13: over the input flattened from `axis`
            return ("log_softmax" if module.is_log else "softmax"), module.axis, True
        return None
    kind = None
    if n.op == "call_function":
        kind = _SOFTMAX_FUNCTIONS.get(n.target) or _ATEN_SOFTMAX.get(_aten_name(n.target) or "")
    elif n.op == "call_method" and n.target in ("softmax", "log_softmax"):
        kind = n.target
    if kind is None:
        return None
    if n.op == "call_function" and _aten_name(n.target) is not None:  # aten: (x, dim, half_to_float | dtype)
        bound = _bind(["dim", "extra"], {"extra": None}, args, kwargs)
        if bound["extra"] not in (None, False, *_FLOATS):
            return None
    else:  # F.softmax(input, dim, _stacklevel, dtype); torch.softmax(input, dim, dtype); x.softmax(dim, dtype)
        names = ["dim", "_stacklevel", "dtype"] if n.target in (F.softmax, F.log_softmax) else ["dim", "dtype"]
        if len(args) > len(names):
            return None
        bound = _bind(names, {"dim": None, "dtype": None}, args, kwargs)
        if bound["dtype"] is not None:
            return None
    return (kind, bound["dim"], False) if isinstance(bound["dim"], int) else None


def _is_identity(n: fx.Node, gm: fx.GraphModule) -> bool:
    """A node that returns its one tensor input unchanged (an ONNX Identity, clone, contiguous, ...)."""
    if not n.args or not isinstance(n.args[0], fx.Node):
        return False
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        return type(m) is nn.Identity or type(m).__name__ in _ONNX_IDENTITY
    if n.op == "call_method":
        return n.target in _IDENTITY_METHODS and len(n.args) == 1 and not n.kwargs
    return n.op == "call_function" and _aten_name(n.target) in _ATEN_IDENTITY and len(n.args) == 1


def _final_softmax(gm: fx.GraphModule, values: dict[fx.Node, Any]) -> tuple[fx.Node, str] | None:
    """The softmax (or log-softmax) over the class scores that ends the network, if one does.

    Both are strictly increasing in each class score and shift or scale every class
    alike, so the class they pick is the class the scores before them pick: the bound
    certifies those scores, with `TIE_MARGIN` against float32 ties in the last op. Only
    a node whose sole use is the output, over every class and never over the batch, qualifies.
    """
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    target = out.args[0] if out is not None and out.args else None
    target = select_output(target, lambda v: isinstance(v, fx.Node) and torch.is_tensor(values.get(v)))
    while isinstance(target, fx.Node) and len(target.users) == 1 and _is_identity(target, gm):
        target = target.args[0]  # Softmax -> Identity -> output (skl2onnx): the identity changes no value
    if not isinstance(target, fx.Node) or len(target.users) != 1 or not target.args:
        return None
    found = _softmax_kind(target, gm)
    source = values.get(target.args[0]) if isinstance(target.args[0], fx.Node) else None
    result = values.get(target)
    if found is None or not torch.is_tensor(source) or source.dtype not in _FLOATS or source.dim() < 2:
        return None
    if not torch.is_tensor(result) or result.dtype != source.dtype:
        return None  # computed in another dtype (a positional `dtype`): its rounding is not the tie margin's
    kind, dim, onward = found
    rank = source.dim()
    if not -rank <= dim < rank:
        return None
    dim %= rank
    reduced = set(range(dim, rank)) if onward else {dim}
    if 0 in reduced or any(source.shape[d] > 1 for d in range(1, rank) if d not in reduced):
        return None  # over the batch, or over part of the scores only
    return target, kind


# Ops that compute a floating constant the same way in every runtime: data movement, selections, exact ops
# (abs, max, floor, casts to wider types) and the IEEE operations every float32 implementation rounds
# correctly (+, -, *, /, sqrt; a square is one multiply). Half casts round, but deterministically.
_EXACT_CONSTANT_MODULES = {
    "OnnxConstant", "OnnxConstantOfShape", "OnnxCast", "OnnxConcat", "OnnxCopyIdentity", "OnnxExpand", "OnnxFlatten",
    "OnnxGather", "OnnxGatherElements", "OnnxGatherND", "OnnxNeg", "OnnxReshape", "OnnxSlice", "OnnxSliceV9",
    "OnnxSplit", "OnnxSplit13", "OnnxSqueezeStaticAxes", "OnnxSqueezeDynamicAxes", "OnnxTile", "OnnxTranspose",
    "OnnxUnsqueezeStaticAxes", "OnnxUnsqueezeDynamicAxes", "OnnxBinaryMathOperation", "OnnxSqrt", "OnnxShape",
    "OnnxRange", "OnnxWhere", "OnnxMinMax", "OnnxClip", "OnnxReciprocal", "Identity", "Flatten", "ReLU", "OnnxEyeLike",
}  # fmt: skip
# onnx2torch modules that compute several ops: exact for these (abs, floor, a max over axes), not for the others
_EXACT_FUNCTIONS = {"abs", "neg", "floor", "ceil", "round", "trunc", "sign", "relu", "sqrt", "reciprocal"}
_EXACT_REDUCTIONS = {"ReduceMax", "ReduceMin"}
_EXACT_CONSTANT_CALLS = {
    "add", "sub", "mul", "div", "truediv", "neg", "sqrt", "reciprocal", "reshape", "view", "flatten", "permute",
    "transpose", "t", "T", "contiguous", "clone", "detach", "alias", "float", "to", "_to_copy", "type_as", "expand",
    "expand_as", "unsqueeze", "squeeze", "getitem", "cat", "concat", "stack", "slice", "select", "index_select",
    "repeat", "flip", "roll", "lift_fresh_copy", "_unsafe_view", "unbind", "split", "chunk", "clamp", "maximum",
    "minimum", "where", "full", "zeros", "ones", "zeros_like", "ones_like", "full_like", "tensor", "scalar_tensor",
    "getattr", "abs", "relu", "square", "double", "half", "bfloat16", "eye", "arange", "amax", "amin", "max", "min",
    "floor", "ceil", "round", "trunc", "sign", "masked_fill", "fill_", "zero_",
}  # fmt: skip


def _refuse_rounded_constant(n: fx.Node, gm: fx.GraphModule, value: Any, b: _Builder) -> None:
    """Refuse a floating constant the graph computes with an op whose float32 result depends on the runtime.

    The bound takes a constant as the value torch computed while tracing; a weight the
    graph itself computes by a reduction (MatMul of two initializers, a norm for weight
    normalization) or a library function is summed in another order, or approximated
    otherwise, by onnxruntime (up to 1e-4 apart at inner size 1024): radii built on
    torch's value were broken in the file (hunt 16).
    """
    if n.op in ("get_attr", "placeholder") or not (isinstance(value, torch.Tensor) and value.is_floating_point()):
        return
    if n.op == "call_module":
        module = gm.get_submodule(str(n.target))
        kind = type(module).__name__
        if kind in _EXACT_CONSTANT_MODULES:
            return
        if kind == "OnnxFunction" and getattr(module.function, "__name__", "") in _EXACT_FUNCTIONS:
            return
        if kind == "OnnxReduceStaticAxes" and getattr(module, "operation_type", "") in _EXACT_REDUCTIONS:
            return
    else:
        kind = _aten_name(n.target) or (str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", ""))
        if kind in _EXACT_CONSTANT_CALLS:
            return
    raise CertificateUnavailable(
        f"{b.where(n, gm)} (a weight the graph computes from constants by a sum or a library function, whose "
        "float32 rounding depends on the runtime and its settings; save the model with that weight precomputed)"
    )


def _op_index(
    b: _Builder, name: str, n: fx.Node, gm: fx.GraphModule, args: list, kwargs: dict, values: dict, out_shape: Shape,
    dtypes: tuple[torch.dtype | None, torch.dtype] | None,
) -> int:
    """Emit the op of one node that depends on the input, by the kind of call it is."""
    module = gm.get_submodule(n.target) if n.op == "call_module" else None
    structural = _structural_op(b, name, n, gm, args, kwargs, out_shape)
    if structural is not None:
        return structural
    if type(module) is nn.Sequential:
        return _sequential(b, name, module, args, kwargs, values[n.args[0]], out_shape)
    if module is not None:
        return _module_op(b, name, module, args, kwargs, out_shape)
    if n.op == "call_function" and _aten_name(n.target):
        return _aten_op(b, name, _aten_name(n.target), args, kwargs, out_shape, dtypes)
    if n.op in ("call_function", "call_method"):
        return _function_op(b, name, n, args, kwargs, out_shape)
    raise CertificateUnavailable(name)


# Ops linear in each operand by definition: with one input-dependent operand (and a constant mask for
# `where`) they are affine maps of it, which `_Builder.linear_map` reads off the op itself.
_LINEAR_FUNCTIONS = {torch.einsum, torch.matmul, operator.matmul, torch.mm, torch.tensordot, torch.where}
_LINEAR_METHODS = {"matmul", "mm"}
_ATEN_LINEAR = {"einsum", "matmul", "mm", "tensordot", "where"}
_ONNX_LINEAR = {"OnnxEinsum", "OnnxMatMul", "OnnxWhere"}


def _is_where(n: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether the node is torch.where / aten where / ONNX Where (a mask, then the two branches)."""
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__ == "OnnxWhere"
    return n.op == "call_function" and (n.target is torch.where or _aten_name(n.target) == "where")


def _linear_operand(n: fx.Node, gm: fx.GraphModule, args: Any, kwargs: Any) -> _Var | None:
    """The one input-dependent operand of an op linear in each operand (not a `where`'s mask), else None."""
    linear = _in_family(n, gm, _ONNX_LINEAR, _LINEAR_METHODS, _ATEN_LINEAR, _LINEAR_FUNCTIONS)
    if not linear or (_is_where(n, gm) and (len(args) != 3 or kwargs or isinstance(args[0], _Var))):
        return None  # torch.where(cond) alone is nonzero; a mask that depends on the input selects nonlinearly
    found = _input_operands(args, kwargs)
    return found[0] if len(found) == 1 else None


def _bilinear(n: fx.Node, gm: fx.GraphModule, args: Any, kwargs: Any) -> bool:
    """Whether the node is a product (matmul, einsum, ...) of two or more input-dependent operands."""
    if not _in_family(n, gm, _ONNX_LINEAR, _LINEAR_METHODS, _ATEN_LINEAR, _LINEAR_FUNCTIONS) or _is_where(n, gm):
        return False
    return len(_input_operands(args, kwargs)) >= 2


def _input_operands(args: Any, kwargs: Any) -> list[_Var]:
    """The input-dependent operands of a call, in order, however deeply its arguments nest them."""
    found: list[_Var] = []
    fx.node.map_aggregate((args, kwargs), lambda v: found.append(v) if isinstance(v, _Var) else None)
    return found


RUN_SEEDS = (20261206, 1)  # the RNG seeds of `_walk`'s two runs of a graph: what differs between them is random


def _same(a: Any, b: Any) -> bool:
    """Whether two runs gave one node the same value (tensors bit for bit, NaN equal to NaN)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        return bool(((a == b) | (a != a) & (b != b)).all()) if a.numel() else True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)
    if isinstance(a, (int, bool)) and isinstance(b, (int, bool)):
        return a == b
    return True  # modules, dtypes, None: not values the bound reads as numbers


def _walk(b: _Builder, gm: fx.GraphModule, example: torch.Tensor, input_index: int, nested: bool = False) -> int:
    """Add the ops of `gm` (traced at batch 1 on `example`) after node `input_index`; return the output node.

    `nested`: `gm` is one module inside the network (`_sequential`), so a softmax at its end does not close the network.
    """
    recorder, again = _Recorder(gm), _Recorder(gm)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # two runs on two seeds; the caller's RNG untouched
            for seed, run in enumerate((recorder, again)):
                torch.manual_seed(RUN_SEEDS[seed])
                run.run(example)
    except Exception as exc:  # noqa: BLE001 - fx leaves out what it cannot record (a torch.enable_grad block)
        raise CertificateUnavailable(
            f"{b.prefix}graph: the traced graph does not run as the network does ({error_line(exc)})"
        ) from None
    values = recorder.values
    env: dict[fx.Node, Any] = {}
    final = None if nested else _final_softmax(gm, values)
    if final is not None:
        b.final = final[1]

    def resolve(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: env[n])

    def is_var(v: Any) -> bool:
        return isinstance(v, _Var) or (isinstance(v, (tuple, list)) and any(is_var(u) for u in v))

    def has_var(a: Any) -> bool:
        found = []
        fx.node.map_arg(a, lambda n: found.append(is_var(env[n])))
        return any(found)

    output = None
    for n in gm.graph.nodes:
        if n.op == "placeholder":  # the first is the image; later ones keep their default values
            first = not any(isinstance(v, _Var) for v in env.values())
            env[n] = _Var(input_index, tuple(example.shape)) if first else values[n]
            continue
        if n.op == "output":
            out = select_output(resolve(n.args[0]), lambda v: isinstance(v, (_Var, torch.Tensor)))
            if not isinstance(out, _Var):
                raise CertificateUnavailable(f"{b.prefix}output: does not depend on the input")
            output = out.index
            continue
        if n.op == "get_attr" or not has_var((n.args, n.kwargs)):
            if not _same(values[n], again.values.get(n)):  # torch.randn(...) in forward: not a constant
                raise CertificateUnavailable(f"{b.where(n, gm)}: a value that changes from run to run (random)")
            env[n] = values[n]  # a constant: parameters, ONNX constants, folded shape arithmetic
            _refuse_rounded_constant(n, gm, values[n], b)
            continue
        if final is not None and n is final[0]:  # the closing softmax: the bound certifies the scores before it
            env[n] = resolve(n.args[0])
            continue
        if _softmax_kind(n, gm) is not None:
            raise CertificateUnavailable(
                f"{b.where(n, gm)} (a softmax is bounded only where it closes the network, over every class, "
                "in the model's own float arithmetic)"
            )
        args, kwargs = resolve(n.args), resolve(n.kwargs)
        filled = (n.op == "call_function" and _aten_name(n.target) in _FILLED_LIKE) or (
            n.op == "call_method" and n.target in _FILLED_LIKE
        ) or (n.op == "call_function" and n.target in _FILLED_FUNCTIONS)
        if filled and has_var((n.args[1:], n.kwargs)):  # full_like(h, x[0, 0]): the fill is not a constant
            raise CertificateUnavailable(f"{b.where(n, gm)}: a tensor filled with a value computed from the input")
        shape_only = filled or (n.op == "call_method" and n.target in _SHAPE_METHODS) or (
            n.op == "call_function" and n.target is getattr and args[1] in ("shape", "ndim", "dtype", "device")
        ) or (n.op == "call_function" and _aten_name(n.target) in _ATEN_SHAPE)
        if shape_only or (n.op == "call_module" and type(gm.get_submodule(n.target)).__name__ == "OnnxShape"):
            env[n] = values[n]  # depends on the input's shape only, fixed at batch 1
            continue
        name = b.where(n, gm)
        value = values[n]
        if value is None and not n.users and (n.op == "call_module" or _aten_name(n.target) in _ATEN_CHECKS):
            env[n] = None  # torch.export's input guards and metadata asserts: checks only, no value
            continue
        if n.op == "call_function" and n.target is operator.getitem and isinstance(args[0], (tuple, list)):
            item = args[0][args[1]]  # one output of a multi-output op (aten batch norm, adaptive max pooling)
            if item is None and not n.users:  # an output nothing reads (max pooling's indices)
                env[n] = None
                continue
            if not isinstance(item, _Var):
                raise CertificateUnavailable(f"{name}: an output the bound does not track")
            env[n] = item
            continue
        source = values.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        first = value[0] if isinstance(value, tuple) and value else value
        dtypes = (getattr(source, "dtype", None), first.dtype) if torch.is_tensor(first) else None
        if isinstance(value, tuple) and n.op == "call_function" and _aten_name(n.target) in _ATEN_TUPLE:
            op = _aten_name(n.target)
            index = _aten_op(b, name, op, list(args), dict(kwargs), tuple(value[0].shape), dtypes)
            env[n] = (_Var(index, tuple(value[0].shape)),) + (None,) * (len(value) - 1)
            continue
        parts = _split_parts(b, name, n, gm, list(args), dict(kwargs), value)
        if parts is not None:
            env[n] = parts
            continue
        if not torch.is_tensor(value) or not value.is_floating_point():
            raise CertificateUnavailable(f"{name} (returns {type(value).__name__}, not a float tensor)")
        out_shape = tuple(value.shape)
        try:
            index = _op_index(b, name, n, gm, list(args), dict(kwargs), values, out_shape, dtypes)
        except CertificateUnavailable as exc:
            if value.dtype not in _FLOATS:
                raise  # the bound reproduces float32 / float64 arithmetic only
            operand = _linear_operand(n, gm, args, kwargs)
            if operand is not None:
                index = b.linear_map(name, operand, _rerun(n, gm, list(args), dict(kwargs), F64), out_shape)
            elif _is_where(n, gm) and len(args) == 3 and not kwargs and all(isinstance(a, _Var) for a in args[1:]):
                index = b.masked_choice(name, args[0], args[1], args[2], out_shape)
            elif _bilinear(n, gm, args, kwargs):
                raise CertificateUnavailable(
                    f"{exc.what}: a product of two input-dependent tensors (bilinear, as attention's query-key "
                    "product); the bounds handle products with one constant operand only"
                ) from None
            else:
                raise
        if b.nodes[index].shape != out_shape:
            got = b.nodes[index].shape
            raise CertificateUnavailable(f"{name}: traced shape {out_shape} differs from the bound's {got}")
        env[n] = _Var(index, out_shape)
    if output is None:
        raise CertificateUnavailable(f"{b.prefix}output: not found")
    return output


def _sequential(
    b: _Builder, name: str, seq: nn.Sequential, args: list, kwargs: dict, example: Any, out_shape: Shape
) -> int:
    """An nn.Sequential that the graph calls as one module (onnx2torch wraps an asymmetric padding
    and the conv or max pool after it in one): its layers in turn, each read as a module call."""
    if len(args) != 1 or kwargs or not isinstance(args[0], _Var) or not torch.is_tensor(example):
        raise CertificateUnavailable(name)
    if any(getattr(m, "inplace", False) is True for m in seq.modules()):  # could change its input for other readers
        raise CertificateUnavailable(f"{name}: an in-place layer inside a module the graph calls as one")
    layers = list(seq)
    pads = _minus_inf_pads(layers[0]) if len(layers) == 2 and isinstance(layers[1], nn.MaxPool2d) else None
    if pads is not None:
        return _padded_max_pool(b, name, args[0], pads, layers[1], example, out_shape)
    graph = fx.Graph()
    value = graph.placeholder("input")
    for key, _ in seq.named_children():
        value = graph.call_module(key, (value,))
    graph.output(value)
    outer = b.prefix
    b.prefix = name.split(": ")[0] + "."
    try:
        return _walk(b, fx.GraphModule(seq, graph), example, args[0].index, nested=True)
    finally:
        b.prefix = outer


def _minus_inf_pads(m: nn.Module) -> tuple[int, ...] | None:
    """The (left, right, top, bottom) of a constant padding with -inf (onnx2torch's before a max pool), else None."""
    if type(m).__name__ == "OnnxPadStatic" and m.mode == "constant" and m.constant_value == -math.inf:
        pads = tuple(m.pads)
    elif isinstance(m, nn.ConstantPad2d) and m.value == -math.inf:
        pads = tuple(m.padding)
    else:
        return None
    return pads if len(pads) == 4 and all(isinstance(p, int) and p >= 0 for p in pads) else None


def _padded_max_pool(
    b: _Builder, name: str, var: _Var, pads: tuple[int, ...], pool: nn.MaxPool2d, example: torch.Tensor, out_shape: Shape
) -> int:
    """Padding with -inf, then a max pool (how onnx2torch writes ONNX's asymmetric max pool pads).

    A window of contiguous cells (no dilation) that covers a real cell and a padded one also
    covers the real cell at that edge, so replacing the -inf cells by copies of the edge
    (replicate padding, which `select` reads) changes no maximum. A window of padding
    alone would: it is -inf, and the rewrite is refused when a run on random values
    differs from the two layers in any output. `pads`: (left, right, top, bottom), `_minus_inf_pads`.
    """
    def replicate(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, pads, mode="replicate")

    probe = torch.randn(example.shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = torch.equal(pool(F.pad(probe, pads, value=-math.inf)), pool(replicate(probe)))
    if _pair(pool.dilation) != (1, 1) or pool.return_indices or not same:
        raise CertificateUnavailable(f"{name}: padding with -inf that some max pool window covers alone (or dilated)")
    padded = (*var.shape[:-2], var.shape[-2] + pads[2] + pads[3], var.shape[-1] + pads[0] + pads[1])
    index = b.select(f"{name} (-inf padding as edge copies)", var, replicate, padded)
    return b.maxpool(name, _Var(index, padded), {k: getattr(pool, k) for k in _MAXPOOL_KEYS}, out_shape)


def _trace(net: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """The fx graph of `net` run on `example` (the net's own input), or why there is none."""
    _refuse_random(net, example)
    try:
        return to_fx(net, example)
    except NotTraceable as exc:
        raise CertificateUnavailable(f"{type(net).__name__}: {exc}") from None


def _refuse_random(net: nn.Module, example: torch.Tensor) -> None:
    """Refuse a network whose output on one input changes with the RNG's seed.

    torch.fx runs a call without input-dependent arguments (``torch.randn(1, 3)`` in
    ``forward``) while tracing and keeps its result as a constant of the graph, so the
    bound would certify one draw of the noise. Two runs of the network itself on two seeds
    (the caller's RNG left as it was) must agree bit for bit, and so must a third with
    gradients on: the bound is built without them and the attacks run with them, so a
    forward that branches on ``torch.is_grad_enabled()`` (EMA weights under no_grad) would
    be certified for the branch the attacks never see.
    """
    outs = []
    written = False  # whether a run wrote into its input tensor
    try:
        with torch.random.fork_rng(devices=[]):
            for seed, grad in ((RUN_SEEDS[0], False), (RUN_SEEDS[1], False), (RUN_SEEDS[0], True)):
                torch.manual_seed(seed)
                fed = example.clone()
                with torch.set_grad_enabled(grad):
                    outs.append(_detached(net(fed)))
                written = written or not _same(fed, example)
    except Exception as exc:  # noqa: BLE001 - the user's code, run on one sample at batch 1
        raise CertificateUnavailable(f"{type(net).__name__}: fails on one sample ({error_line(exc)})") from None
    if written:  # the scan hands the net a fresh copy each call; the bound's graph has no such write
        raise CertificateUnavailable(
            f"{type(net).__name__}: it writes into its input tensor in place (e.g. x.sub_(...) on the input), "
            "which the bound's graph does not model"
        )
    if not _same(outs[0], outs[1]):
        raise CertificateUnavailable(
            f"{type(net).__name__}: its output changes from run to run on the same input (random draws, or "
            "state kept between calls), so no radius holds for every run"
        )
    if not _same(outs[0], outs[2]):  # forward branches on torch.is_grad_enabled(): attacks run the other branch
        raise CertificateUnavailable(
            f"{type(net).__name__}: its output with gradients on differs from its output without them "
            "(a forward that branches on the autograd mode)"
        )


def _detached(value: Any) -> Any:
    """`value` with every tensor detached (outputs of a run with gradients on)."""
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value) if isinstance(value, list) else tuple(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _refuse_tensor_subclasses(model: nn.Module) -> None:
    """Weights the bound reads as numbers must be plain tensors: a tensor subclass (as torchao stores
    quantized weights) can make every op on it compute something else (a red team's changed F.linear
    in one region of the input space), which no sample need see."""
    named = [*model.named_parameters(), *model.named_buffers()]
    odd = [(name, type(t).__name__) for name, t in named if type(t) not in (torch.Tensor, nn.Parameter)]
    if odd:
        name, kind = odd[0]
        raise CertificateUnavailable(f"{name}: a {kind} (a tensor subclass), whose ops the bound cannot read as numbers")


def build_graph(model: nn.Module, sample: torch.Tensor) -> Graph:
    """The primitive-op graph of `model` (an AuditModel or a plain (B, *sample_shape) -> (B, K) module).

    `sample` is one real input (1, *sample_shape) used to trace shapes and fold constants.
    """
    sample_shape = tuple(sample.shape[1:])
    _refuse_tensor_subclasses(model)
    b = _Builder("")
    index = b.add("input", None, [], sample_shape)
    net = model
    audited = hasattr(model, "net") and hasattr(model, "sample_shape") and hasattr(model, "output_kind")
    if audited:
        if getattr(model, "inexact", None):
            raise CertificateUnavailable(model.inexact)
        if getattr(model, "batching", "batched") == "fixed-batch":
            raise CertificateUnavailable(f"{type(model.net).__name__}: graph hard-wired to a batch size above 1")
        var = _Var(index, sample_shape)
        if model.mean is not None:
            mean = model.mean.detach().to(F64)
            std = model.std.detach().to(F64)
            w = (torch.ones((1, *sample_shape), dtype=F64) / std)[0]
            bias = (-torch.ones((1, *sample_shape), dtype=F64) * mean / std)[0]
            index = b.scale("normalization (x - mean) / std", var, w, bias, sample_shape)
            var = _Var(index, sample_shape)
        net_shape = (1, *(model.model_shape or sample_shape))
        if getattr(model, "channels_last", False):  # (C, H, W) -> (H, W, C): data movement
            order = torch.arange(math.prod(sample_shape)).reshape(sample_shape).permute(1, 2, 0).reshape(-1)
            moved = net_shape[1:]
            name = "permute to the model's channel-last input"
            index = b.add(name, SelectOp(name, sample_shape, moved, None, True, order), [index], moved)
            var = _Var(index, moved)
        index = b.reshape("reshape to the model's input shape", var, net_shape)
        b.prefix, net = "net.", model.net
    else:
        index = b.reshape("batch dimension", _Var(index, sample_shape), (1, *sample_shape))
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
    example = sample.detach().to("cpu", dtype)
    if b.prefix:  # AuditModel preprocessing, in the model's own arithmetic
        if model.mean is not None:
            example = (example - model.mean.to(dtype)) / model.std.to(dtype)
        if getattr(model, "channels_last", False):
            example = example.permute(0, 2, 3, 1).contiguous()
        example = example.reshape(1, *(model.model_shape or sample_shape))
    gm = _trace(net, example)  # TorchScript is converted on this very input (batch 1)
    out = _walk(b, gm, example, index)
    half = getattr(model, "half_precision_ops", None) if audited else None
    if half:  # the graph read has no cast (it would have been refused, naming it): torch.autocast, which fx drops
        raise CertificateUnavailable(
            f"the model computes in half precision inside its forward ({', '.join(half[:3])}; e.g. torch.autocast): "
            "radii would bound a float32 graph, not the model's own arithmetic"
        )
    returns = "logits" if b.final is None else b.final
    if audited and model.output_kind == "probabilities":  # the wrapper returns the log of the probabilities
        if b.final != "softmax":
            raise CertificateUnavailable(
                "model output: probabilities that do not come from a softmax over the class scores closing the "
                "network (export the model without its final layer)"
            )
        returns = "log_softmax"
    elif b.final == "softmax" and audited:
        raise CertificateUnavailable("model output: a softmax the wrapper did not see as probabilities")
    out_shape = b.nodes[out].shape
    k = math.prod(out_shape)
    if sum(d > 1 for d in out_shape) > 1:
        raise CertificateUnavailable(f"output: shape {out_shape} is not (batch, classes)")
    if out_shape != (k,):
        out = b.add("logits", ReshapeOp("logits", out_shape, (k,)), [out], (k,))
    return Graph(_prune(b.nodes, out), sample_shape, k, final=b.final, returns=returns)


def _prune(nodes: list[Node], out: int) -> list[Node]:
    """Keep the ancestors of the output (dead branches would only cost time), output last."""
    keep = {out}
    for i in range(out, -1, -1):
        if i in keep:
            keep.update(nodes[i].inputs)
    keep.add(0)
    order = sorted(keep)
    new_index = {old: new for new, old in enumerate(order)}
    return [replace(nodes[i], inputs=[new_index[j] for j in nodes[i].inputs]) for i in order]
