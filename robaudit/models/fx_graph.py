"""One torch.fx graph for any loaded net: what the certificate and the BPDA surrogate both walk.

onnx2torch already returns an fx GraphModule and a plain nn.Module goes through
`torch.fx.symbolic_trace`, but fx cannot read TorchScript (scripted or traced): its code
lives in the TorchScript IR. torch's own converter (`TS2EPConverter`) translates that IR
into a torch.export program of aten ops, so TorchScript files get the same graph tools
as every other format instead of being turned away.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from collections.abc import Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from robaudit.models.outputs import select_output

# Loggers the converter and the export retrace write to (shape specialization notes, at WARNING).
_NOISY_LOGGERS = ("torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes", "torch._dynamo")


class NotTraceable(Exception):
    """The net has no fx graph; the message says why (callers prefix the net's type name)."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the converter's deprecation warnings and log lines: they are not the user's business."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def is_torchscript(net: nn.Module) -> bool:
    return isinstance(net, torch.jit.ScriptModule)  # scripted and traced (RecursiveScriptModule)


def untraced_modules(net: nn.Module) -> list[str]:
    """Names of the modules of `net` whose calls run more than their class's code: forward
    (pre-)hooks, "every module" for global ones, a method replaced on the instance, or a
    class's own `__call__` (fx traces `forward` and nothing around it).

    fx traces `forward` and records calls of leaf modules as plain calls, which robaudit
    reads by the module's type and weights: a hook that edits a layer's input or output
    (registered on a module, or for all modules with
    `torch.nn.modules.module.register_module_forward_hook`), or a `forward` /
    `_conv_forward` replaced on one instance (as accelerate's hooks and monkeypatches do),
    is not part of the graph.
    """
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return ["every module (a global forward hook)"]
    if is_torchscript(net):
        # A submodule's compiled hooks are inlined into its caller's code, which the converter reads, but
        # the root's run around `forward` and the converter leaves them out (red team: a root forward hook
        # broke printed radii). Any compiled hook is refused, the root's and (to be safe) a submodule's.
        return [
            (name or type(m).__name__) + " (a compiled forward hook)"
            for name, m in net.named_modules()
            if hasattr(m, "_c") and (m._c._get_forward_hooks() or m._c._get_forward_pre_hooks())
        ]
    found = []
    for name, m in net.named_modules():
        hooks = [*getattr(m, "_forward_hooks", {}).values(), *getattr(m, "_forward_pre_hooks", {}).values()]
        patched = [a for a, v in vars(m).items() if callable(v) and callable(getattr(type(m), a, None)) and _changes_values(v)]
        if _own_call(type(m)):  # fx traces `forward`; a class's own `__call__` runs around it, untraced
            patched.append("__call__")
        if any(_changes_values(h) for h in hooks) or patched:
            found.append((name or type(m).__name__) + (f" ({', '.join(patched)} replaced)" if patched else ""))
    return found


# torch's own machinery: torch.export's `.module()` checks input shapes and guards in hooks and replaced
# methods; pruning and the old weight_norm / spectral_norm recompute a weight from other parameters before
# each call, the same for every input (the graph reads that weight, and `check_graph` compares outputs)
_TORCH_OWN = ("torch.export.", "torch._export.", "torch._dynamo.", "torch.nn.utils.prune",
              "torch.nn.utils.weight_norm", "torch.nn.utils.spectral_norm")  # fmt: skip


def _own_call(cls: type) -> bool:
    """Whether `cls` (or a class it inherits from, outside torch) defines a `__call__` of its own."""
    call = getattr(cls, "__call__", None)
    return call is not nn.Module.__call__ and not str(getattr(call, "__module__", None) or "").startswith("torch.")


def _changes_values(hook) -> bool:
    """Any hook or replacement method but the ones torch's own machinery installs (`_TORCH_OWN`).

    The module a hook names can be forged (an object's own `__module__` attribute): its code
    must also come from torch's own files.
    """
    named = str(getattr(hook, "__module__", None) or "").startswith(_TORCH_OWN)
    return not (named and _code_in_torch(hook))


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _code_in_torch(fn) -> bool:
    """Whether the code `fn` runs (a function, bound method, partial or callable object) is torch's."""
    fn = getattr(fn, "func", fn)  # functools.partial
    fn = getattr(fn, "__func__", fn)  # a bound method
    code = getattr(fn, "__code__", None) or getattr(getattr(type(fn), "__call__", None), "__code__", None)
    return code is not None and os.path.abspath(code.co_filename).startswith(_TORCH_DIR)


def to_fx(net: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """An fx graph computing `net` (an fx GraphModule, a plain module or TorchScript).

    `example` is one input batch exactly as `net` receives it: the TorchScript converter
    runs the net on it and fixes every size of 1 in it (a batch of 1 gives a graph for
    batch 1 only, with a guard; a batch of 2 keeps the batch size free). Raises
    NotTraceable when no graph can be had, or when hooks or replaced methods would be left out of it.
    """
    untraced = untraced_modules(net)
    if untraced:
        raise NotTraceable(
            f"forward hooks or replaced methods on {', '.join(untraced[:3])} change what the network computes, and "
            "a traced graph runs without them"
        )
    if isinstance(net, fx.GraphModule):
        gm = net
    elif is_torchscript(net):
        gm = _convert_torchscript(net, example)
    else:
        try:
            gm = fx.symbolic_trace(net)
        except Exception as exc:  # noqa: BLE001 - data-dependent control flow and friends
            raise NotTraceable(f"the network cannot be traced by torch.fx ({error_line(exc)})") from None
    _refuse_hidden_mutation(gm, example)
    return _scores_only(gm, net, example)


_INPLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior", "ixor",
                      "ilshift", "irshift", "setitem"}  # fmt: skip


def _inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether `node` writes into its first argument: `x.clamp_()`, `torch.relu_`, `inplace=True`, `x += y`, aten `add_`."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("_")
    if node.op == "call_module":
        return getattr(gm.get_submodule(str(node.target)), "inplace", False) is True
    if node.op != "call_function":
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return bool(schema.is_mutable)
    name = getattr(node.target, "__name__", "")
    if getattr(node.target, "__module__", None) in ("operator", "_operator"):
        return name in _INPLACE_OPERATORS
    return name.endswith("_") and not name.startswith("_")


def _refuse_hidden_mutation(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Raise NotTraceable where an in-place op changes a value that a later node reads.

    A graph node names a value, but an in-place op (`with torch.no_grad(): x.clamp_(0, 0.5)`)
    changes the tensor behind the name: nodes after it that read the old name get the new
    values in the network, the old ones in any bound or surrogate walking the graph. An
    in-place op on a value nothing else reads afterwards (`nn.ReLU(inplace=True)` after a
    convolution) changes nothing the graph does not show, and is accepted.

    The tensor behind a name may be shared: an in-place op on a view (`h[:, :1].relu_()`)
    changes `h` too. Which values share memory is read off one run of the graph on
    `example` (every value kept alive, so equal storages mean real aliases): any value
    computed before the op that shares the changed tensor's storage must not be read after it.
    """
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    inplace = [n for n in gm.graph.nodes if _inplace(n, gm) and n.args and isinstance(n.args[0], fx.Node)]
    if not inplace:
        return
    storages = _storages(gm, example)
    for node in inplace:
        target = node.args[0]
        shared = storages.get(target, set())
        earlier = [target, *(n for n, s in storages.items() if n is not target and order[n] < order[node] and s & shared)]
        later = [(a, u) for a in earlier for u in a.users if u is not node and order[u] > order[node]]
        if later:
            alias, reader = later[0]
            via = "" if alias is target else f" (which shares its memory with {alias.name})"
            raise NotTraceable(
                f"{node.name} changes {target.name} in place{via} and {reader.name} reads "
                f"{alias.name} afterwards: a traced graph does not follow in-place changes"
            )


def _storages(gm: fx.GraphModule, example: torch.Tensor) -> dict[fx.Node, set[int]]:
    """The storages (data pointers) each node's tensors live in, from one run of `gm` that keeps every value."""
    seen: dict[fx.Node, set[int]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            leaves = tree_flatten(out)[0]
            seen[n] = {t.untyped_storage().data_ptr() for t in leaves if torch.is_tensor(t) and t.numel()}
            return out

    try:
        with torch.no_grad():
            Recorder(gm, garbage_collect_values=False).run(example.detach().clone())
    except Exception as exc:  # noqa: BLE001 - whatever the graph raises: its in-place changes cannot be checked
        raise NotTraceable(f"the traced graph does not run as the network does ({error_line(exc)})") from None
    return seen


def _scores_only(gm: fx.GraphModule, net: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """`gm` returning only the class scores, the output the wrapper classifies with (`models.outputs`).

    A net may return a dict, a (named or nested) tuple; torch.export programs and
    converted TorchScript even return a flat list from the graph and rebuild the
    structure around it. Which leaf holds the scores is read from what `net` itself
    returns on `example` (the very tensor the wrapper's rule picks, found by identity
    among the flattened leaves), so every consumer of the graph (certificate, BPDA)
    works on the output the verdicts are about. The user's net and graph are not changed.
    """
    try:
        with torch.no_grad():
            runtime = net(example)
    except Exception as exc:  # noqa: BLE001 - whatever the net raises: no graph to match its output with
        raise NotTraceable(f"the network fails on the tracing input ({error_line(exc)})") from None
    if torch.is_tensor(runtime):
        return gm
    chosen = select_output(runtime)
    leaves = tree_flatten(runtime)[0]
    index = next((i for i, leaf in enumerate(leaves) if leaf is chosen), None)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    structure = out_node.args[0] if out_node.args else None
    spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "out_spec", None)
    flat = list(structure) if spec is not None and isinstance(structure, (tuple, list)) else tree_flatten(structure)[0]
    if chosen is None or index is None or len(flat) != len(leaves) or not isinstance(flat[index], fx.Node):
        raise NotTraceable(
            f"the graph's outputs cannot be matched with the {type(runtime).__name__} the network returns"
        )
    graph = fx.Graph()
    mapped: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(gm.graph, mapped)
    graph.output(mapped[flat[index]])
    scores = fx.GraphModule(gm, graph)
    scores.meta.update(getattr(gm, "meta", {}))
    return scores


def _schema(node: torch._C.Node) -> torch._C.FunctionSchema | None:
    """The operator schema of a TorchScript IR node (aten ops); None for prim nodes (If, GetAttr, Constant, ...)."""
    text = node.schema()
    return None if text == "(no schema)" else torch._C.parse_schema(text)


# Ops that update running statistics without a `Tensor(a!)` in their schema: the position of their
# `training` / `use_input_stats` flag (None: always) and of the buffers they write.
_STATISTICS: dict[str, tuple[int | None, tuple[int, ...]]] = {
    "aten::batch_norm": (5, (3, 4)), "aten::instance_norm": (5, (3, 4)), "aten::native_batch_norm": (5, (3, 4)),
    "aten::_batch_norm_impl_index": (5, (3, 4)), "aten::batch_norm_update_stats": (None, (1, 2)),
}  # fmt: skip
_DROPOUTS_IN_PLACE = {"aten::dropout_", "aten::feature_dropout_", "aten::alpha_dropout_", "aten::feature_alpha_dropout_"}


def _written(node: torch._C.Node, schema: torch._C.FunctionSchema) -> list[tuple[int, torch._C.Value]]:
    """The inputs `node` writes into (`Tensor(a!)`, `Tensor(a!)[]` in its schema), with their positions.

    An in-place dropout with a constant `train=False` (eval mode) writes nothing; batch or
    instance norm using batch statistics writes its running mean and variance.
    """
    inputs = list(node.inputs())
    if node.kind() in _DROPOUTS_IN_PLACE and inputs[-1].toIValue() is False:
        return []
    flag, buffers = _STATISTICS.get(node.kind(), (None, ()))
    if buffers and (flag is None or inputs[flag].toIValue() is not False):
        # batch statistics update the running buffers, which the schema does not mark as written
        return [(i, inputs[i]) for i in buffers if not isinstance(inputs[i].type(), torch._C.NoneType)]
    tensor = torch._C.TensorType.get()
    return [
        (i, inputs[i]) for i, arg in enumerate(schema.arguments)
        if i < len(inputs) and arg.alias_info is not None and arg.alias_info.is_write
        and (inputs[i].type().isSubtypeOf(tensor) or node.kind().startswith("aten::_foreach_"))  # not list append & co.
    ]  # fmt: skip


# Ops whose result is always newly allocated memory: convolutions, products, normalizations,
# arithmetic, activations, pooling, joins, reductions and factories. A schema without an
# alias annotation is not enough: `dropout(x, p, False)`, `type_as`, `_cast_Float`, a
# one-operand `einsum("ij->ij", x)` and others return their very input (or a view of it)
# while their schemas say `-> Tensor`.
_ALLOCATING = frozenset(
    "aten::" + name for name in (
        "_convolution conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution linear "
        "matmul mm bmm addmm batch_norm layer_norm group_norm instance_norm add sub mul div rsub neg "
        "relu relu6 hardtanh leaky_relu prelu elu celu selu gelu silu mish sigmoid tanh hardsigmoid hardswish "
        "softplus clamp clamp_min clamp_max abs exp log sqrt pow max_pool1d max_pool2d max_pool3d avg_pool1d "
        "avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool2d "
        "upsample_nearest2d upsample_bilinear2d cat stack mean sum amax amin softmax log_softmax clone "
        "zeros ones full empty zeros_like ones_like full_like empty_like arange rand randn rand_like randn_like"
    ).split()
)


def _fresh(value: torch._C.Value) -> bool:
    """Whether `value` is a tensor of its own: an allocating op's result, or an in-place op's result on one.

    Schemas say which results may share memory with an input (`-> Tensor(a)`: views, and
    casts such as `to` that may return their input), but not all of them: only the ops of
    `_ALLOCATING` count as making new memory. Values out of prim nodes (a branch's or
    loop's result, an unpacked list, a constant, a weight) are taken as shared.
    """
    node = value.node()
    schema = _schema(node)
    if schema is None or value.offset() >= len(schema.returns):
        return False
    alias = schema.returns[value.offset()].alias_info
    if alias is None:
        return node.kind() in _ALLOCATING
    if not alias.is_write:
        return False
    inputs = list(node.inputs())
    target = next((inputs[i] for i, arg in enumerate(schema.arguments)
                   if i < len(inputs) and arg.alias_info is not None and arg.alias_info.before_set == alias.before_set), None)  # fmt: skip
    return target is not None and _owned(target, node)


def _owned(value: torch._C.Value, writer: torch._C.Node) -> bool:
    """Whether `writer` may change `value` in place with nothing else seeing it: a fresh tensor,
    read by `writer` alone, made in the same block (not before a branch that writes it)."""
    return (
        _fresh(value)
        and [use.user for use in value.uses()] == [writer]
        and value.node().owningBlock() == writer.owningBlock()
    )


def _refuse_torchscript_aliasing(net: torch.jit.ScriptModule) -> None:
    """Raise NotTraceable where the TorchScript writes in place into a tensor something else may share.

    torch's converter does not keep TorchScript's aliasing: it copies the result of a cast
    that returns its input (`h.float()`, `.to(float32)`) and a value a branch passes
    through, so in-place ops after them change a copy in its graph and the shared tensor
    in the file (a radius certified for the graph was broken by the file). The graph's own
    check (`_refuse_hidden_mutation`) cannot see what the converter already hid, so the
    TorchScript IR is checked first: every in-place op must write into a tensor that only
    it reads and that no other value shares (`relu_` after a convolution, `out += identity`
    on a batch norm's result). Anything else is refused.
    """
    graph = _constant_folded_graph(net)  # kept alive while its nodes are read
    for node in _all_nodes(graph):
        schema = _schema(node)
        for _, value in _written(node, schema) if schema is not None else []:
            if not _owned(value, node):
                raise NotTraceable(
                    f"{node.kind()} writes in place into a tensor that other values may share (a view, a cast "
                    "that may return its input, a branch's result, an input or a weight), and torch's TorchScript "
                    "converter does not keep such sharing"
                )


# Tensor-to-Python-number conversions torch's converter translates wrongly for constant tensors
# (red team round 4): `bool(t)` becomes `t` itself, `float(t)` goes through float32, `int(t)` through int32.
_SCALAR_CONVERSIONS = {"aten::Bool", "aten::Float", "aten::Int", "aten::ScalarImplicit", "aten::FloatImplicit",
                       "aten::IntImplicit", "aten::item"}  # fmt: skip


def _refuse_scalar_conversions(net: torch.jit.ScriptModule) -> None:
    """Raise NotTraceable where the TorchScript turns a tensor into a Python number, other than a size.

    A traced net's shape arithmetic (`prim::NumToTensor` of `aten::size`, small integer
    constants, then `aten::Int`) is exact in int32 and stays allowed; any other conversion
    is refused rather than trusted to the converter.
    """
    graph = net.inlined_graph  # the code the converter reads: nothing folded away
    for node in _all_nodes(graph):
        if node.kind() in _SCALAR_CONVERSIONS:
            source = next(iter(node.inputs()), None)
            sizes = node.kind() in ("aten::Int", "aten::IntImplicit") and source is not None and _from_sizes(source)
            if source is not None and source.type().isSubtypeOf(torch._C.TensorType.get()) and not sizes:
                raise NotTraceable(
                    f"{node.kind()} turns a tensor into a Python number, which torch's TorchScript converter "
                    "does not translate exactly"
                )


def _from_sizes(value: torch._C.Value, depth: int = 0) -> bool:
    """Whether a tensor is computed from sizes alone (a trace's `x.size(1) // 2` as `prim::NumToTensor` & co.)."""
    node = value.node()
    if node.kind() == "prim::NumToTensor":
        return True
    if node.kind() == "prim::Constant":  # a number, or a trace's 0-dim integer that int32 holds exactly
        if not value.type().isSubtypeOf(torch._C.TensorType.get()):
            return True
        t = node.t("value") if node.hasAttribute("value") else None
        return t is not None and t.dim() == 0 and not t.is_floating_point() and abs(int(t)) < 2**31
    tensors = [v for v in node.inputs() if v.type().isSubtypeOf(torch._C.TensorType.get())]
    if depth > 16 or not node.kind().startswith("aten::") or not tensors:
        return False
    return all(_from_sizes(v, depth + 1) for v in tensors)


def _all_nodes(graph: torch._C.Graph) -> list[torch._C.Node]:
    """Every node of `graph`, inside branches and loops too."""
    found: list[torch._C.Node] = []

    def walk(block) -> None:
        for node in block.nodes():
            found.append(node)
            for inner in node.blocks():
                walk(inner)

    walk(graph)
    return found


def training_reads(graph: torch._C.Graph) -> list[torch._C.Node]:
    """The nodes of a TorchScript graph that read a module's `training` flag (scripted dropout, batch norm)."""
    return [node for node in graph.findAllNodes("prim::GetAttr", True) if node.s("name") == "training"]


def _constant_folded_graph(net: torch.jit.ScriptModule) -> torch._C.Graph:
    """The forward graph with every call inlined and the module's attributes as constants, folded.

    Scripted code branches on attributes: `F.relu(x, self.inplace)`, batch norm on
    `self.training`, torchvision's `if self.use_res_connect: result += input`. Freezing a
    private copy turns them into constants (the net is in eval mode here), and constant
    propagation drops the branches not taken. Where freezing fails, the plain inlined graph
    is used, with `training` alone read as False: more branches stay, and more is refused.
    """
    try:
        with _quiet():
            graph = torch._C._freeze_module(_private_copy(net)._c)._get_method("forward").graph
    except Exception:  # noqa: BLE001 - interfaces and other code freezing does not handle
        graph = net.inlined_graph  # a copy, which the passes below may change
        first = next(iter(graph.nodes()), None)
        if first is not None and not any(module.training for module in net.modules()):
            for node in training_reads(graph):
                with graph.insert_point_guard(first):
                    node.output().replaceAllUsesWith(graph.insertConstant(False))
    torch._C._jit_pass_constant_propagation(graph)
    torch._C._jit_pass_dce(graph)
    return graph


def _convert_torchscript(net: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    from torch._export.converter import TS2EPConverter  # private but torch's own; imported late (slow)

    _refuse_torchscript_aliasing(net)
    _refuse_scalar_conversions(net)
    watch = _PromotionWatch()
    try:
        with _quiet(), watch:  # freezing folds constant subexpressions through the dispatcher
            module = TS2EPConverter(_private_copy(net), (example,)).convert().module()
    except Exception as exc:  # noqa: BLE001 - unsupported TorchScript IR, data-dependent control flow, ...
        why = f"torch's TorchScript converter cannot translate the network to aten ops ({error_line(exc)})"
        raise NotTraceable(why) from None
    if watch.found:
        raise NotTraceable(
            f"torch's TorchScript converter computes {watch.found[0]} because of a 0-dim int64 / float64 constant, "
            "which in a traced file is usually a Python number that TorchScript computes in the other operand's dtype"
        )
    if not isinstance(module, fx.GraphModule):
        raise NotTraceable(f"torch's TorchScript converter returned a {type(module).__name__}, not an fx graph")
    calls = (_watched_calls(net, example), _watched_calls(module, example))  # one watched run of each
    _refuse_moved_resampling(net, calls)
    _refuse_rewritten_divisions(net, calls)
    _refuse_random_mismatch(net, module, example)
    for node in module.graph.nodes:  # a module stack naming only export's internal wrapper would name every op
        stack = node.meta.get("nn_module_stack") or {}
        if all(path == "" for path, _ in stack.values()):
            node.meta.pop("nn_module_stack", None)
    return module


class _PromotionWatch(TorchDispatchMode):
    """Ops (during conversion, constant folding included) whose dtype a 0-dim int64 / float64 operand decides.

    `torch.jit.trace` records a Python number (`torch.arange(28) * 0.1`, `t - 255`) as a 0-dim
    int64 / float64 constant flagged as a wrapped number: TorchScript computes with it in the
    other operand's dtype, as eager torch does with the number. torch's converter lifts it
    into a plain tensor, so an integer or 0-dim operand is promoted to float64 or int64
    instead, and the converter folds that into constants (a mask `< 0.30000001` flips a
    column; a uint8 `2 - 255` is -253 instead of 3: red teams, radii of 2.1-2.4 broken at
    0.5). Python cannot read the flag, so every op whose dtype would change were its 0-dim
    int64 / float64 operands Python numbers is refused, and so is a float64 result that
    such an operand alone brings about: a real constant of that kind meeting an integer or
    0-dim tensor is rare in a classifier.
    """

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out, rerun = _run_op(func, args, kwargs)
        if rerun and _op_name(func) in _PROMOTING:  # as plain tensors the numbers promote otherwise
            self.found.append(f"{func} on numbers that TorchScript passes as tensors")
            return out
        promoted = _wrapped_promotion(func, args) or _float64_from_0dim(args, kwargs, out)
        if promoted:
            self.found.append(f"{func} in {promoted}")
        return out


_CANDIDATES = (torch.int64, torch.float64)  # the dtypes of a traced Python number
_PROMOTING = {  # aten ops that compute in their operands' promoted dtype (`equal`, which freezing runs, only compares)
    "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "pow", "atan2", "lt", "le",
    "gt", "ge", "eq", "ne", "where", "maximum", "minimum", "fmax", "fmin", "bitwise_and", "bitwise_or", "bitwise_xor",
    "logical_and", "logical_or", "logical_xor", "copysign", "hypot", "xlogy", "lerp",
}  # fmt: skip


def _wrapped_promotion(func, args: tuple) -> str | None:
    """'<dtype> (TorchScript: <dtype>)' where the two operands' result dtype changes with their 0-dim int64 /
    float64 tensors read as Python numbers."""
    name = _op_name(func)
    if name not in _PROMOTING:
        return None
    operands = [a for a in (args[1:3] if name == "where" else args[:2]) if isinstance(a, torch.Tensor) or _number(a)]
    if len(operands) != 2 or not all(isinstance(a, torch.Tensor) or _number(a) for a in operands):
        return None
    candidate = [isinstance(a, torch.Tensor) and a.dim() == 0 and a.dtype in _CANDIDATES for a in operands]
    if not any(candidate) or not any(isinstance(a, torch.Tensor) for a in operands):
        return None
    numbers = [(1.0 if a.is_floating_point() else 1) if c else a for a, c in zip(operands, candidate)]  # no .item():
    # the tensors may be export's fake ones, and only the number's kind decides the dtype
    try:
        actual = torch.result_type(*operands)
        if all(_number(a) for a in numbers):  # two Python numbers: an integer stays int64, a float is float32
            wrapped = torch.get_default_dtype() if any(isinstance(a, float) for a in numbers) else actual
        else:
            wrapped = torch.result_type(*numbers)
    except (RuntimeError, TypeError):
        return None
    return None if actual == wrapped else f"{str(actual).removeprefix('torch.')} (TorchScript: {str(wrapped).removeprefix('torch.')})"


def _op_name(func) -> str:
    """'add' for aten.add.Tensor and aten.add_.Tensor; '' for what is not an aten op."""
    text = str(func)
    return text.split(".")[1].rstrip("_") if text.startswith("aten.") and text.count(".") >= 1 else ""


def _float64_from_0dim(args: tuple, kwargs: dict, out: object) -> str | None:
    """'float64' where the only float64 inputs of an op with a float64 result are 0-dim (and others are not float64)."""
    double = torch.float64
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    if (
        any(t.dtype == double for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        and any(t.dim() == 0 and t.dtype == double for t in tensors)
        and not any(t.dim() > 0 and t.dtype == double for t in tensors)
        and any(t.dtype != double for t in tensors)
    ):
        return "float64"
    return None


RANDOM_PROBES = 16  # random inputs on which the converted graph must compute what the TorchScript does
RANDOM_RTOL = 1e-4  # of the largest score: the same float32 ops, up to the order of a sum


def _refuse_random_mismatch(net: torch.jit.ScriptModule, module: fx.GraphModule, example: torch.Tensor) -> None:
    """Raise NotTraceable where the converted graph and the TorchScript differ on random inputs of several scales.

    The graph checks of the certificate compare at the data and at random points of each
    ball, which move any one pixel of a large image little: a converter rewrite whose
    effect a gate confines to values the data never reach (a pixel past 1) escapes them
    (red teams on the converter's upsampling and its traced Python numbers). Like ONNX
    files' translation check, this compares the two on inputs well off the data too:
    uniform in [0, 1] and [-3, 3], normal x 3, and the example plus noise.
    """
    generator = torch.Generator().manual_seed(0)
    shape, quarter = tuple(example.shape), RANDOM_PROBES // 4
    draws = [torch.rand(shape, generator=generator) for _ in range(quarter)]
    draws += [torch.rand(shape, generator=generator) * 6 - 3 for _ in range(quarter)]
    draws += [torch.randn(shape, generator=generator) * 3 for _ in range(quarter)]
    draws += [example.detach().cpu().float() + torch.randn(shape, generator=generator) for _ in range(quarter)]
    for z in draws:
        z = z.to(example.device, example.dtype)
        try:
            with _quiet(), torch.no_grad():
                want, again, got = (select_output(f(z)) for f in (net, net, module))
        except Exception:  # noqa: BLE001 - a model that fails on this input: the other inputs still count
            continue
        tensors = all(isinstance(t, torch.Tensor) for t in (want, again, got))
        if tensors and not torch.equal(want.nan_to_num(), again.nan_to_num()):
            continue  # random on this input: the certificate's randomness checks judge that, the others still count
        if not tensors or want.shape != got.shape:
            raise NotTraceable("torch's TorchScript converter's graph returns another shape than the model on a random input")
        want, got = want.detach().double(), got.detach().double()
        finite = torch.isfinite(want)
        if not torch.equal(finite, torch.isfinite(got)) or not torch.equal(want[~finite].nan_to_num(), got[~finite].nan_to_num()):
            raise NotTraceable("torch's TorchScript converter's graph returns other non-finite scores than the model")
        scale = want[finite].abs().max().item() if bool(finite.any()) else 0.0
        worst = (want[finite] - got[finite]).abs().max().item() if bool(finite.any()) else 0.0
        if worst > RANDOM_RTOL * scale:
            raise NotTraceable(
                f"torch's TorchScript converter's graph computes otherwise than the model on random inputs (scores "
                f"differ by up to {worst:.3g}, {worst / max(scale, 1e-300):.3g} of the largest)"
            )


def _run_op(func, args: tuple, kwargs: dict) -> tuple[object, bool]:
    """Run a dispatched op; (output, whether it had to be rerun with Python numbers given back as tensors).

    Python dispatch hands TorchScript's wrapped numbers over as Python numbers, which an op
    such as `equal` (freezing compares its constants) takes as tensors only.
    """
    try:
        return func(*args, **kwargs), False
    except (RuntimeError, TypeError):
        return func(*(torch.tensor(a) if _number(a) else a for a in args), **kwargs), True


def _number(value: object) -> bool:
    return isinstance(value, (bool, int, float)) and not isinstance(value, torch.Tensor)


WATCHED = ("upsample", "div")  # the ops whose calls the converted graph must match: `_watched`


def _watched_calls(module: nn.Module, example: torch.Tensor) -> dict[str, list[tuple]] | None:
    """Per kind of `WATCHED`, the ops `module` runs on `example`, in order: (op, input shape, other arguments,
    keyword arguments, output); None if the dispatcher watch cannot run it.

    Read off the dispatcher, which the TorchScript interpreter calls as eager code does, so
    the arguments are the ones each op really gets (a scripted `F.interpolate`'s scales
    are computed in TorchScript code that no static pass of its graph folds).
    """
    calls: dict[str, list[tuple]] = {kind: [] for kind in WATCHED}

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out, _ = _run_op(func, args, kwargs)
            kind = _watched(func)
            if kind and args and isinstance(args[0], torch.Tensor):
                calls[kind].append((func, tuple(args[0].shape), args[1:], dict(kwargs), out))
            return out

    try:
        with _quiet(), torch.no_grad(), Watch():
            module(example)
    except Exception:  # noqa: BLE001 - a net the mode cannot run
        return None
    return calls


def _watched(func) -> str | None:
    """The `WATCHED` kind of an op: a division with a rounding mode (the converter rewrites a tensor divisor as a
    number), an upsampling; None for any other op."""
    if str(func) in ("aten.div.Tensor_mode", "aten.div.Scalar_mode", "aten.div_.Tensor_mode", "aten.div_.Scalar_mode"):
        return "div"
    return "upsample" if "upsample" in str(func) else None


def _same_resampling(a: tuple, b: tuple) -> bool:
    """Whether two recorded upsampling calls pick the same input for every output (run on positions, float64)."""
    if a[1] != b[1]:
        return False
    positions = torch.arange(1, math.prod(a[1]) + 1, dtype=torch.float64).reshape(a[1])
    try:
        with torch.no_grad():
            first, second = (func(positions, *rest, **kwargs) for func, _, rest, kwargs, _ in (a, b))
    except Exception:  # noqa: BLE001 - arguments an op rejects on float64: not shown equal
        return False
    return first.shape == second.shape and torch.equal(first, second)


def _paired_calls(net, calls: tuple, kind: str, present, what: str) -> list[tuple[tuple, tuple]]:
    """The `kind` calls of the TorchScript and of the converted graph (`calls`: their `_watched_calls`), paired.

    A TorchScript the dispatcher watch cannot run counts as making none when no node of its
    graph is `present`; otherwise calls that cannot be paired one to one are refused.
    """
    want, got = (None if c is None else c[kind] for c in calls)
    if want is None and not any(present(n) for n in _all_nodes(net.inlined_graph)):
        want = []  # a graph the watch cannot run (a trace's size arithmetic) but without such an op
    if want is None or got is None or len(want) != len(got):
        raise NotTraceable(
            f"the network {what}, and torch's TorchScript converter's {kind} calls could not be matched with the "
            "model's own"
        )
    return list(zip(want, got))


def _refuse_moved_resampling(net: torch.jit.ScriptModule, calls: tuple) -> None:
    """Raise NotTraceable where the converter's upsampling picks other pixels than the TorchScript's own.

    torch's converter rewrites a scripted nearest upsampling by a scale factor to one by the
    output size, dropping the scale: where size x scale is not whole, output pixels come
    from other input pixels (48 -> 33 at scale 0.7 reads row 13 where the model reads 12).
    A bound on that graph is about another network, and a branch that the moved pixels
    switch on away from the data escapes the graph checks' random probes (red team: radii
    of 0.77-0.93 broken at 0.16). Each upsampling call of the converted graph must pick
    the same input for every output as the model's own call, on this input's shape.
    """
    present = lambda n: "upsample" in n.kind() or "interpolate" in n.kind()  # noqa: E731
    for a, b in _paired_calls(net, calls, "upsample", present, "upsamples"):
        if not _same_resampling(a, b):
            op = getattr(a[0], "__name__", str(a[0])).split(".")[0]
            raise NotTraceable(
                f"torch's TorchScript converter rewrites {op} with arguments {_args_text(a)} as {_args_text(b)}, "
                "which picks other input pixels"
            )


def _refuse_rewritten_divisions(net: torch.jit.ScriptModule, calls: tuple) -> None:
    """Raise NotTraceable where a division with a rounding mode gives other values in the converted graph.

    torch's converter rewrites `div(x, c, rounding_mode=...)` by a one-element tensor constant
    c as a division by the Python number `c.item()`: a float64 c of shape [1] no longer
    promotes a float32 x, so `floor(3 / 0.3)` is 9 instead of 10, and a mask built from it
    picks another column (red team: radii of 2.1-2.4 broken at 0.5 through a gate that no
    random probe reached). Each such division of the converted graph must return what the
    model's own returns on the sample.
    """
    present = lambda n: n.kind() == "aten::div" and n.inputsSize() == 3  # noqa: E731
    for a, b in _paired_calls(net, calls, "div", present, "divides with a rounding mode"):
        first, second = a[4], b[4]
        same = first.shape == second.shape and torch.equal(
            first.detach().double().nan_to_num(), second.detach().double().nan_to_num()
        )
        if not same:
            raise NotTraceable(
                f"torch's TorchScript converter rewrites {a[0]} with arguments {_args_text(a)} as {b[0]} with "
                f"{_args_text(b)}, which gives other values"
            )


def _args_text(call: tuple) -> str:
    return ", ".join([*map(repr, call[2]), *(f"{k}={v!r}" for k, v in call[3].items())])


def _private_copy(net: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """A copy with its own compiled code: the converter inlines the module's graphs in place,
    and a deepcopy would share them (the user's model must stay as loaded)."""
    buffer = io.BytesIO()
    torch.jit.save(net, buffer)
    buffer.seek(0)
    device = next((t.device for t in [*net.parameters(), *net.buffers()]), torch.device("cpu"))
    return torch.jit.load(buffer, map_location=device)


def error_line(exc: BaseException) -> str:
    """'TypeError: <the message's first line>' (the type alone for an empty message): one line for a refusal."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
