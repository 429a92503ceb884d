"""BPDA surrogates: the user's network with its forward pass kept and a usable backward.

Gradient masking makes white-box attacks fail on models that are not robust: input
quantization (round, sign) has a zero gradient, hard clipping and saturated sigmoids
kill it, inference-time noise makes it random, and a sharp final softmax underflows it.
Following Athalye et al. (2018), `build_surrogate` rewrites the torch.fx graph of the
net (TorchScript files are first converted to aten ops: `robaudit.models.fx_graph`) so that each such op computes exactly the same value but backpropagates through a
stand-in (identity, or a fixed slope); `detach` becomes the identity it is in value;
noise and training-mode dropout are replaced by
their mean, and a final squash or clamp (softmax, log-softmax, sigmoid, tanh, clamp,
max/min with a constant) is dropped so attacks see its input as logits. Attacks run on the surrogate only propose candidates; the
runner verifies them on the real model, so soundness never depends on the surrogate.

The user's model is never modified: the graph is copied and a new GraphModule is
built around it (sharing the frozen weights, which nothing here writes to).
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from robaudit.models.fx_graph import error_line, is_torchscript, to_fx
from robaudit.models.outputs import select_output
from robaudit.models.wrapper import AuditModel

# --------------------------------------------------------------------------- runtime stand-ins
# Module-level functions, called from the rewritten graphs.


def _zero_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Exactly zero in value, identity in gradient (inf/NaN entries give 0 and no gradient)."""
    return (x - x.detach()).nan_to_num(0.0, 0.0, 0.0)


def _straight_through(y: Any, x: Any) -> Any:
    """Value of ``y = f(x)``, gradient of the identity w.r.t. ``x``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or not isinstance(y, torch.Tensor):
        return y
    return y.detach() + _zero_with_grad(x)


def _integer_through(y: Any, x: Any) -> Any:
    """``y = x`` cast to an integer type, as float values of ``x``'s type with the identity's gradient.

    An integer cast truncates (a floor on positive values): a step function, like `trunc`,
    whose integer result carries no gradient at all. Every use of it reads the same values
    as floats (only casts and + - * / are allowed after it, see `_rewrite`).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or not isinstance(y, torch.Tensor):
        return y
    return y.to(x.dtype).detach() + _zero_with_grad(x)


def _fixed_slope(y: Any, x: Any, slope: float) -> Any:
    """Value of ``y = f(x)``, gradient ``slope`` w.r.t. ``x`` (f's slope at 0)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or not isinstance(y, torch.Tensor):
        return y
    return y.detach() + slope * _zero_with_grad(x)


def _size(size: tuple[Any, ...]) -> tuple[int, ...]:
    """randn(2, 3), randn((2, 3)) and randn(x.shape) all name the same size."""
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = tuple(size[0])
    return tuple(int(s) for s in size)


def _full(*size: Any, fill: float, dtype: torch.dtype | None = None, device: Any = None, **_: Any) -> torch.Tensor:
    """Stand-in for rand/randn(*size, dtype=, device=, generator=, ...): the distribution's mean."""
    return torch.full(_size(size), fill, dtype=dtype or torch.get_default_dtype(), device=device)


def _full_like(x: torch.Tensor, *_: Any, fill: float, dtype: torch.dtype | None = None, device: Any = None, **__: Any):
    """Stand-in for rand_like/randn_like(x, dtype=, device=, ...): the distribution's mean."""
    return torch.full_like(x, fill, dtype=dtype, device=device)


def _normal_mean(mean: Any, std: Any = 1.0, size: Any = None, **kwargs: Any) -> torch.Tensor:
    """Stand-in for torch.normal in all its forms: the mean, broadcast to the sample's shape."""
    if size is not None:
        return torch.full(_size((size,)), float(mean), dtype=kwargs.get("dtype"), device=kwargs.get("device"))
    ref = mean if isinstance(mean, torch.Tensor) else std
    m = torch.as_tensor(mean, dtype=ref.dtype, device=ref.device)
    shape = torch.broadcast_shapes(m.shape, std.shape if isinstance(std, torch.Tensor) else ())
    return m.expand(shape).clone()


def _bernoulli_mean(probs: torch.Tensor, p: float | None = None, **_: Any) -> torch.Tensor:
    """Stand-in for torch.bernoulli(probs) / probs.bernoulli(p): the success probability."""
    return probs.clone() if p is None else torch.full_like(probs, float(p))


# --------------------------------------------------------------------------- recognising ops

_FUNCTIONS: dict[Any, str] = {
    torch.round: "round", torch.floor: "floor", torch.ceil: "ceil", torch.trunc: "trunc", torch.fix: "trunc",
    torch.sign: "sign", torch.special.round: "round",
    torch.clamp: "clamp", torch.clip: "clamp", F.hardtanh: "hardtanh", torch.clamp_min: "clamp_min",
    torch.clamp_max: "clamp_max", torch.maximum: "max", torch.minimum: "min",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.special.expit: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh",
    torch.softmax: "softmax", F.softmax: "softmax", torch.special.softmax: "softmax",
    torch.log_softmax: "log_softmax", F.log_softmax: "log_softmax", torch.special.log_softmax: "log_softmax",
    torch.randn_like: "randn_like", torch.rand_like: "rand_like", torch.randn: "randn", torch.rand: "rand",
    torch.normal: "normal", torch.bernoulli: "bernoulli",
    F.dropout: "dropout", F.dropout1d: "dropout", F.dropout2d: "dropout", F.dropout3d: "dropout",
    F.alpha_dropout: "dropout", F.feature_alpha_dropout: "dropout", torch.dropout: "dropout",
    torch.alpha_dropout: "dropout", torch.feature_dropout: "dropout", torch.feature_alpha_dropout: "dropout",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div", torch.log: "log",
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    torch.detach: "detach", torch.fmod: "fmod", torch.remainder: "fmod", operator.mod: "fmod",
}  # fmt: skip
# aten names (torch.export graphs) and Tensor method names that mean the same ops.
_ATEN = {
    "round": "round", "floor": "floor", "ceil": "ceil", "trunc": "trunc", "fix": "trunc", "sign": "sign",
    "clamp": "clamp", "clip": "clamp", "hardtanh": "hardtanh", "clamp_min": "clamp_min", "clamp_max": "clamp_max",
    "maximum": "max", "minimum": "min", "sigmoid": "sigmoid", "tanh": "tanh",
    "softmax": "softmax", "_softmax": "softmax", "log_softmax": "log_softmax", "_log_softmax": "log_softmax",
    "randn_like": "randn_like", "rand_like": "rand_like", "randn": "randn", "rand": "rand", "normal": "normal",
    "bernoulli": "bernoulli", "dropout": "dropout", "alpha_dropout": "dropout", "feature_dropout": "dropout",
    "feature_alpha_dropout": "dropout", "mul": "mul", "div": "div", "log": "log", "detach": "detach",
    "add": "add", "sub": "sub", "fmod": "fmod", "remainder": "fmod", "_to_copy": "cast", "to": "cast",
}  # fmt: skip
_METHODS = {
    name: _ATEN[name]
    for name in ("round", "floor", "ceil", "trunc", "fix", "sign", "clamp", "clip", "clamp_min", "clamp_max",
                 "maximum", "minimum", "sigmoid", "tanh", "softmax", "log_softmax", "bernoulli", "mul", "div", "log",
                 "detach", "add", "sub", "fmod", "remainder", "to")
} | {"__mod__": "fmod", "type": "cast", "float": "cast", "double": "cast", "half": "cast", "long": "cast", "int": "cast",
     "short": "cast", "char": "cast", "byte": "cast"}  # fmt: skip
_INTEGER_METHODS = {"long": torch.int64, "int": torch.int32, "short": torch.int16, "char": torch.int8, "byte": torch.uint8}
_ARITHMETIC = {"add", "sub", "mul", "div"}  # what may read an integer cast that the surrogate turns into floats
# F.dropout-style functions whose `training` argument has a default (the rest require it).
_DROPOUT_DEFAULT = {
    F.dropout: True, F.dropout1d: True, F.dropout2d: True, F.dropout3d: True, F.alpha_dropout: False,
    F.feature_alpha_dropout: False,
}  # fmt: skip
# Ops whose output carries no gradient path from the input (shape queries).
_SHAPE_METHODS = {"size", "dim", "numel", "__len__"}
_SHAPE_ATEN = {"sym_size", "sym_numel", "sym_stride", "sym_storage_offset"}

DETACH_REMOVED = "removed (identity: gradients flow through it)"
_STEPS = {"round", "floor", "ceil", "trunc", "sign"}  # zero or undefined gradient everywhere
_SATURATORS = {"clamp", "hardtanh"}
_SLOPES = {"sigmoid": 0.25, "tanh": 1.0}
_SQUASHES = {"softmax", "log_softmax", "sigmoid", "tanh"}
_FINAL_CLAMPS = {"clamp", "hardtanh", "clamp_min", "clamp_max", "max", "min"}  # saturate the logits when last
_LABELS = {"log_softmax": "LogSoftmax", "softmax": "Softmax", "clamp_min": "ClampMin", "clamp_max": "ClampMax"}
# Ops that only move values around (kept when the squash before them is dropped).
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "view_as", "reshape_as"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_ATEN = {"view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze", "clone", "contiguous", "alias"}
_RESHAPE_MODULES = {
    "Flatten", "Identity", "OnnxReshape", "OnnxFlatten", "OnnxSqueezeStaticAxes", "OnnxSqueezeDynamicAxes",
    "OnnxUnsqueezeStaticAxes", "OnnxUnsqueezeDynamicAxes", "OnnxCopyIdentity",
}  # fmt: skip
# random op -> (stand-in computing its mean, extra keyword arguments, the mean in words)
_MEANS: dict[str, tuple[Callable[..., torch.Tensor], dict[str, float], str]] = {
    "randn_like": (_full_like, {"fill": 0.0}, "0"), "rand_like": (_full_like, {"fill": 0.5}, "0.5"),
    "randn": (_full, {"fill": 0.0}, "0"), "rand": (_full, {"fill": 0.5}, "0.5"),
    "normal": (_normal_mean, {}, "its mean argument"), "bernoulli": (_bernoulli_mean, {}, "the probabilities"),
}  # fmt: skip


def _module(root: nn.Module, node: fx.Node) -> nn.Module | None:
    try:
        return root.get_submodule(str(node.target))
    except AttributeError:
        return None


def _module_key(module: nn.Module) -> str | None:
    """What an nn / onnx2torch module computes, in the keys above (None: nothing of interest)."""
    kind = type(module).__name__
    if kind == "OnnxRound":  # Round, Floor and Ceil
        return _ATEN.get(getattr(module.round_function, "__name__", ""))
    if kind == "OnnxFunction":  # Sign, Tanh, Log (and others we leave alone)
        name = getattr(module.function, "__name__", "")
        return name if name in ("sign", "tanh", "log") else None
    if kind == "OnnxClip":
        return "clamp"
    if kind == "OnnxCast":
        return "cast"
    if kind == "OnnxSoftmaxV1V11":
        return "log_softmax" if module.is_log else "softmax"
    if kind == "OnnxBinaryMathOperation":
        name = getattr(module.math_op_function, "__name__", "")  # torch.add / sub / mul, or onnx2torch's _onnx_div
        return {"mul": "mul", "_onnx_div": "div", "add": "add", "sub": "sub"}.get(name)
    if kind == "OnnxMinMax":  # elementwise Max/Min of its inputs
        return module._op_type.lower()
    if kind == "OnnxDropoutDynamic" or isinstance(module, nn.modules.dropout._DropoutNd):
        return "dropout"
    if isinstance(module, nn.ReLU6):  # a Hardtanh(0, 6) that is an activation, not a saturator
        return None
    mapping = {nn.Hardtanh: "hardtanh", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Softmax: "softmax",
               nn.LogSoftmax: "log_softmax"}  # fmt: skip
    return next((key for cls, key in mapping.items() if isinstance(module, cls)), None)


def _aten_name(target: Any) -> str | None:
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return target._opname
    if isinstance(target, torch._ops.OpOverloadPacket) and target._qualified_op_name.startswith("aten::"):
        return target._qualified_op_name.split("::", 1)[1]
    return None


def _key(node: fx.Node, root: nn.Module) -> str | None:
    """The op a graph node computes, as one of the keys above."""
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target) or _ATEN.get(_aten_name(node.target) or "")
    if node.op == "call_method":
        return _METHODS.get(str(node.target))
    if node.op == "call_module":
        module = _module(root, node)
        return _module_key(module) if module is not None else None
    return None


def _arg(node: fx.Node, index: int, names: tuple[str, ...], default: Any = None) -> Any:
    """A call's argument given by position or by any of its keyword names."""
    if len(node.args) > index:
        return node.args[index]
    return next((node.kwargs[n] for n in names if n in node.kwargs), default)


def _bounds(node: fx.Node, root: nn.Module, key: str) -> tuple[Any, Any]:
    """(lower, upper) of a clamp-like node; None where a side is open."""
    if node.op == "call_module":
        module = _module(root, node)
        return (module.min_val, module.max_val) if module is not None else (None, None)
    if key == "hardtanh":
        return _arg(node, 1, ("min_val",), -1.0), _arg(node, 2, ("max_val",), 1.0)
    return _arg(node, 1, ("min",)), _arg(node, 2, ("max",))


def _training(node: fx.Node, root: nn.Module) -> bool:
    """Whether a dropout node drops at inference (a training flag forced on)."""
    if node.op == "call_module":
        module = _module(root, node)
        return bool(module is not None and module.training)
    default = _DROPOUT_DEFAULT.get(node.target, False) if node.op == "call_function" else False
    return bool(_arg(node, 2, ("training", "train"), default))


def _constant(arg: Any, root: nn.Module) -> torch.Tensor | None:
    """The value of an argument that does not depend on the input, if it is a known constant."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return torch.tensor(float(arg))
    if not isinstance(arg, fx.Node):
        return None
    if arg.op == "get_attr":
        value: Any = root
        for part in str(arg.target).split("."):
            value = getattr(value, part, None)
    elif arg.op == "call_module" and not arg.args and type(_module(root, arg)).__name__ == "OnnxConstant":
        value = _module(root, arg).value
    else:
        return None
    return value.detach() if isinstance(value, torch.Tensor) else None


def _scalar(arg: Any, root: nn.Module) -> bool:
    value = _constant(arg, root)
    return value is not None and value.numel() == 1


def _positive_scalar(arg: Any, root: nn.Module) -> bool:
    return _scalar(arg, root) and bool(_constant(arg, root).float().item() > 0)


def _depends_on_input(graph: fx.Graph, root: nn.Module) -> set[fx.Node]:
    """Nodes whose value can carry a gradient from the input (shape arithmetic cannot)."""
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            found.add(node)
            continue
        if node.op == "call_method" and node.target in _SHAPE_METHODS:
            continue
        if node.op == "call_function" and (
            node.target in (getattr, len) or (_aten_name(node.target) or "") in _SHAPE_ATEN
        ):
            continue
        if node.op == "call_module" and type(_module(root, node)).__name__ == "OnnxShape":
            continue
        if any(n in found for n in node.all_input_nodes):
            found.add(node)
    return found


def _cast_dtype(node: fx.Node, root: nn.Module) -> torch.dtype | None:
    """The dtype a cast node (key "cast") converts to, where it says."""
    if node.op == "call_module":
        return getattr(_module(root, node), "torch_dtype", None)
    if node.op == "call_method" and str(node.target) in _INTEGER_METHODS:
        return _INTEGER_METHODS[str(node.target)]
    if node.op == "call_method" and str(node.target) in ("float", "double", "half"):
        return getattr(torch, str(node.target))
    found = node.kwargs.get("dtype")
    if found is None:
        found = next((a for a in node.args[1:] if isinstance(a, torch.dtype)), None)
    return found if isinstance(found, torch.dtype) else None


def _integer_cast(node: fx.Node, root: nn.Module) -> bool:
    """A cast to an integer type whose every use reads its values as numbers (casts, + - * /)."""
    dtype = _cast_dtype(node, root)
    if dtype is None or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        return False
    users = [user for user in node.users if not _asserts_metadata(user)]
    return bool(users) and all(_key(user, root) in _ARITHMETIC | {"cast"} for user in users)


def _tensor_input(node: fx.Node) -> fx.Node | None:
    return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None


def _label(key: str, node: fx.Node, root: nn.Module) -> str:
    text = _LABELS.get(key, key.capitalize())
    if key in _SATURATORS:
        lo, hi = _bounds(node, root, key)
        if all(isinstance(b, (int, float)) for b in (lo, hi)):
            text += f" [{lo:g}, {hi:g}]"
    return text


def _where(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


# --------------------------------------------------------------------------- rewriting


@dataclass
class Surrogate:
    """A gradient-friendly stand-in for an AuditModel, and what was changed to get it."""

    module: AuditModel
    changes: list[str] = field(default_factory=list)


class _Changes:
    """Human-readable change lines, one per (op, treatment), listing where it applied."""

    def __init__(self) -> None:
        self._places: dict[tuple[str, str], list[str]] = {}

    def add(self, what: str, where: str, how: str) -> None:
        self._places.setdefault((what, how), []).append(where)

    def lines(self) -> list[str]:
        out = []
        for (what, how), places in self._places.items():
            shown = ", ".join(places[:3]) + (f" and {len(places) - 3} more" if len(places) > 3 else "")
            out.append(f"{what} at {shown}: {how}")
        return out


def _scores_node(graph: fx.Graph) -> fx.Node | None:
    """The output node the wrapper takes the class scores from (`models.outputs.select_output`)."""
    out = next((n for n in graph.nodes if n.op == "output"), None)
    value = out.args[0] if out is not None and out.args else None
    value = select_output(value, lambda v: isinstance(v, fx.Node))
    return value if isinstance(value, fx.Node) else None


def _is_reshape(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS
    if node.op == "call_function":
        return node.target in _RESHAPE_FUNCTIONS or (_aten_name(node.target) or "") in _RESHAPE_ATEN
    if node.op == "call_module":
        return type(_module(root, node)).__name__ in _RESHAPE_MODULES
    return False


def _final_source(node: fx.Node, root: nn.Module, key: str | None) -> fx.Node | None:
    """The tensor input of a monotone op that may end a classifier (a squash, a clamp, a max/min
    with a constant, a positive scaling, a shift by a constant, a log); None for any other op.

    The shift is there for the "safe log" of probabilities, log(softmax(z) + 1e-12), which
    floors every unlikely class at log(1e-12) and leaves attacks no gradient.
    """
    if key in ("mul", "max", "min", "add") and len(node.args) == 2 and not node.kwargs:
        const = _positive_scalar if key == "mul" else _scalar
        a, b = node.args
        source = b if const(a, root) else a if const(b, root) else None
    elif key in ("div", "sub") and len(node.args) == 2 and not node.kwargs:
        source = node.args[0] if (_positive_scalar if key == "div" else _scalar)(node.args[1], root) else None
    elif key in _SQUASHES or key in _FINAL_CLAMPS or key == "log":
        source = _tensor_input(node)
    else:
        return None
    return source if isinstance(source, fx.Node) else None


def _remove_final_squash(graph: fx.Graph, root: nn.Module) -> str | None:
    """Drop the monotone ops between the logits and the output when they squash or clamp them.

    A softmax / log-softmax / sigmoid / tanh feeding the output, or a clamp or max/min
    with a constant there, together with any positive scaling, clamp or log around it, is
    removed; reshapes stay. Monotone maps keep the argmax (up to ties they create).
    Returns the change line, or None when the output is not squashed or clamped.
    """
    node = _scores_node(graph)
    chain: list[tuple[fx.Node, fx.Node, str]] = []  # (node, its tensor input, key), output side first
    while node is not None:
        if _is_reshape(node, root):
            node = _tensor_input(node)
            continue
        key = _key(node, root)
        source = _final_source(node, root, key)
        if source is None:
            break
        chain.append((node, source, key))
        if key in _SQUASHES:
            break
        node = source
    if not any(key in _SQUASHES or key in _FINAL_CLAMPS for _, _, key in chain):
        return None
    labels = [_label(key, link, root) for link, _, key in reversed(chain)]
    for link, source, _ in chain:
        link.replace_all_uses_with(source)
        graph.erase_node(link)
    return f"final {', '.join(labels)} removed (attacks see its input as logits)"


def _gates_its_input(node: fx.Node, root: nn.Module) -> bool:
    """x * sigmoid(x) (SiLU / swish, as ONNX spells it): a smooth activation, not a saturator."""
    source = _tensor_input(node)
    return any(_key(user, root) == "mul" and source in user.args for user in node.users)


def _reroute(
    graph: fx.Graph, node: fx.Node, fn: Callable[..., Any], args: tuple[Any, ...], keep: Callable[[fx.Node], bool] = lambda _: True
) -> None:
    """Make every user of `node` read `fn(*args)` instead (args may include `node` itself), but those `keep` refuses."""
    with graph.inserting_after(node):
        new = graph.call_function(fn, args)
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new and keep(user))


def _asserts_metadata(node: fx.Node) -> bool:
    """torch.export's check of a tensor's dtype and device: it must keep reading the original tensor."""
    return _aten_name(node.target) == "_assert_tensor_metadata"


def _rewrite(graph: fx.Graph, root: nn.Module, changes: _Changes) -> None:
    """Replace randomness by its mean and give masking ops a usable backward."""
    live = _depends_on_input(graph, root)
    for node in list(graph.nodes):
        key = _key(node, root)
        if key is None:
            continue
        where, source = _where(node), _tensor_input(node)
        if key in _MEANS:
            fn, extra, text = _MEANS[key]
            with graph.inserting_before(node):
                mean = graph.call_function(fn, node.args, {**node.kwargs, **extra})
            node.replace_all_uses_with(mean)
            graph.erase_node(node)
            changes.add(f"random noise ({key})", where, f"removed (replaced by its mean: {text})")
        elif key == "dropout" and source is not None and _training(node, root):
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            changes.add("dropout forced on at inference", where, "removed (identity, its mean)")
        elif node not in live or source is None:
            continue
        elif key == "detach":  # the same value; BPDA's identity backward lets gradients through it
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            changes.add("detach", where, DETACH_REMOVED)
        elif key in _STEPS:
            _reroute(graph, node, _straight_through, (node, source))
            changes.add(_label(key, node, root), where, "straight-through gradient")
        elif key == "cast" and _integer_cast(node, root):
            _reroute(graph, node, _integer_through, (node, source), keep=lambda user: not _asserts_metadata(user))
            changes.add("Integer cast", where, "straight-through gradient (its values read as floats)")
        elif key == "fmod":  # x - fmod(x, c) is c trunc(x / c) (remainder: floor), a step: straight-through
            for user in list(node.users):
                if _key(user, root) == "sub" and user.args[:2] == (source, node):
                    _reroute(graph, user, _straight_through, (user, source))
                    changes.add("x - fmod(x, c)", _where(user), "straight-through gradient (a step)")
        elif key in _SATURATORS:
            lo, hi = _bounds(node, root, key)
            if lo is None or hi is None or (lo, hi) == (0, 6):  # one-sided clamps and ReLU6 are activations
                continue
            _reroute(graph, node, _straight_through, (node, source))
            changes.add(_label(key, node, root), where, "straight-through gradient")
        elif key in _SLOPES and not _gates_its_input(node, root):
            slope = _SLOPES[key]
            _reroute(graph, node, _fixed_slope, (node, source, slope))
            changes.add(_label(key, node, root), where, f"gradient of its slope at 0 ({slope:g})")


def _graph_module(model: AuditModel) -> fx.GraphModule | None:
    """The net as an fx graph (TorchScript converted to aten ops), or None where there is none
    (dynamic code, TorchScript the converter cannot read)."""
    shape = model.model_shape or model.sample_shape
    # Two samples leave the converted graph's batch size free; a net fixed to its chunk gets that.
    batch = 2 if model.chunk is None else model.chunk
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    example = torch.zeros((batch, *shape), dtype=model.dtype, device=device)
    try:
        traced = to_fx(model.net, example)
        if is_torchscript(model.net):  # the converted graph must run at the batch sizes attacks use
            with torch.no_grad():
                for size in {1, batch, 3} if model.chunk is None else {batch}:
                    traced(torch.zeros((size, *shape), dtype=model.dtype, device=device))
    except Exception:  # noqa: BLE001 - any tracing failure means: no surrogate for this net
        return None
    return traced


def _script_detaches(net: nn.Module) -> int:
    """aten::detach nodes of a TorchScript net (0 for anything else)."""
    if not is_torchscript(net):
        return 0
    try:
        return sum(node.kind() == "aten::detach" for node in net.inlined_graph.nodes())
    except (AttributeError, RuntimeError):
        return 0


def build_surrogate(model: AuditModel) -> Surrogate | None:
    """A BPDA surrogate of `model` (same forward, usable backward), or None when there is
    nothing to change or the net cannot be traced."""
    traced = _graph_module(model)
    if traced is None:
        return None
    graph = copy.deepcopy(traced.graph)
    changes = _Changes()
    squash = _remove_final_squash(graph, traced)
    _rewrite(graph, traced, changes)
    detaches = _script_detaches(model.net)  # the TorchScript-to-aten converter leaves them out of the graph
    if detaches:
        changes.add("detach", f"{detaches} place(s) of the TorchScript graph", DETACH_REMOVED)
    lines = changes.lines() + ([squash] if squash else [])
    if not lines:
        return None
    graph.lint()
    net = fx.GraphModule(traced, graph)
    surrogate = AuditModel(
        net, sample_shape=model.sample_shape, model_shape=model.model_shape, mean=model.mean, std=model.std,
        dtype=model.dtype, channels_last=model.channels_last,
    )  # fmt: skip
    surrogate.batching, surrogate.chunk, surrogate.num_classes = model.batching, model.chunk, model.num_classes
    # Without the final squash the net returns scores, which must not go through the log of probabilities.
    surrogate.output_kind = "logits" if squash else model.output_kind
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    surrogate.to(device).eval().requires_grad_(False)
    _probe(surrogate, device)
    return Surrogate(module=surrogate, changes=lines)


def _probe(surrogate: AuditModel, device: torch.device) -> None:
    """Run the surrogate forward and backward once: a rewrite can break the net's own code (a removed
    detach leaves a tensor that requires grad where the net passes it as a number, e.g. a fill value)."""
    x = torch.zeros((2, *surrogate.sample_shape), device=device, requires_grad=True)
    try:
        with torch.enable_grad(), contextlib.redirect_stderr(io.StringIO()):  # fx prints the failing code there
            torch.autograd.grad(surrogate(x).sum(), x, allow_unused=True)
    except Exception as exc:  # noqa: BLE001 - whatever the net raises, there is no usable surrogate
        raise RuntimeError(f"the rewritten graph does not run with gradients ({error_line(exc)})") from None
