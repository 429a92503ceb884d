"""ONNX models, converted to PyTorch with onnx2torch so attacks get autograd gradients.

onnx2torch lags behind the ONNX exporters: today's `torch.onnx.export` writes opset 18-20
(e.g. AveragePool-19) for which onnx2torch has no converter, so on a missing converter
the graph is rewritten to an older opset with ONNX's own version converter and retried.
"""

from __future__ import annotations

import heapq
import math
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from robaudit.errors import RobauditError
from robaudit.models.detect import RawModel, freeze, one_line
from robaudit.models.onnx_reference import OnnxReference
from robaudit.models.onnx_torch_ops import SOFTPLUS, SOFTSHRINK, THRESHOLD, TORCH_DOMAIN, function_at, register_converters

# onnx2torch's Slice indexes with a list, which torch deprecates on every forward pass: a
# warning about onnx2torch's code that the user can do nothing about, printed mid-scan.
warnings.filterwarnings(
    "ignore", message="Using a non-tuple sequence for multidimensional indexing", module=r"onnx2torch\."
)

# Opsets that onnx2torch covers well, best first; tried in this order when conversion fails.
FALLBACK_OPSETS = (17, 16, 15, 13, 11)
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_SHIELD_DOMAIN = "robaudit.unchanged"  # where `_convert_version` hides the nodes it carries over
_OP_RE = re.compile(r"domain='([^']*)', operation_type='([^']+)', version=(\d+)")


def _dims(value_info: onnx.ValueInfoProto) -> list[int | None]:
    """Tensor dims, None for symbolic or unknown ones."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in shape.dim]


def _default_opset(model: onnx.ModelProto) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def _used_names(node: onnx.NodeProto) -> set[str]:
    """The values `node` reads: its inputs and those its subgraphs read from outside them."""
    names = set(node.input)
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            names.update(name for inner in _nodes(sub) for name in inner.input)
    return names


def _sort_nodes(graph: onnx.GraphProto) -> bool:
    """Put `graph`'s nodes in an order where each comes after the nodes it reads from.

    The ONNX standard asks for that order and onnx's checker refuses a file without it,
    but onnxruntime runs such a file (it sorts the graph itself): reordering computes the
    same function. Ties keep the file's order. False (nothing changed) where no order
    exists (a cycle, or a value that no node makes): the checker then says why.
    """
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output if name}
    waits = [{producer[name] for name in _used_names(node) if name in producer} - {i} for i, node in enumerate(graph.node)]
    readers: dict[int, list[int]] = {}
    for i, needs in enumerate(waits):
        for j in needs:
            readers.setdefault(j, []).append(i)
    left = [len(needs) for needs in waits]
    ready = [i for i, n in enumerate(left) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for k in readers.get(i, []):
            left[k] -= 1
            if left[k] == 0:
                heapq.heappush(ready, k)
    if len(order) < len(graph.node) or order == sorted(order):
        return False
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)
    return True


def _check(model: onnx.ModelProto, path: Path) -> None:
    try:
        onnx.checker.check_model(model)
    except ValueError:  # protos over 2 GB can only be checked from the file
        try:
            onnx.checker.check_model(str(path))
        except Exception as exc:  # noqa: BLE001
            raise RobauditError(f"cannot read ONNX file {path}: {one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - onnx.checker.ValidationError and friends
        raise RobauditError(f"cannot read ONNX file {path}: {one_line(exc)}") from None


def _read(path: Path, notes: list[str]) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError, missing external data, ...
        raise RobauditError(f"cannot read ONNX file {path}: {one_line(exc)}") from None
    if not model.graph.node or not model.graph.output or _default_opset(model) is None:
        raise RobauditError(f"cannot read ONNX file {path}: it holds no ONNX graph (truncated or not an ONNX file?)")
    if _sort_nodes(model.graph):
        notes.append(
            "the file's graph lists nodes before the values they read (the ONNX standard asks for the order "
            "they run in, onnxruntime sorts them itself): read in that order"
        )
    if _fill_output_shapes(model):
        notes.append("the file's graph output states no shape (onnxruntime runs it anyway): read with the shape "
                     "onnx's shape inference gives")
    _check(model, path)
    return model


def _fill_output_shapes(model: onnx.ModelProto) -> bool:
    """Give graph outputs that state a tensor type but no shape the shape inference finds (in memory).

    onnx's checker requires the field and refuses such a file, which onnxruntime runs. Only
    where inference finds a shape for every such output; True where it filled them.
    """
    bare = [o for o in model.graph.output if o.type.HasField("tensor_type") and not o.type.tensor_type.HasField("shape")]
    if not bare:
        return False
    try:
        inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(model).graph.output}
    except Exception:  # noqa: BLE001 - inference fails: the checker's message stands
        return False
    found = [inferred.get(o.name) for o in bare]
    if any(f is None or not f.type.tensor_type.HasField("shape") for f in found):
        return False
    for out, known in zip(bare, found):
        out.type.tensor_type.shape.CopyFrom(known.type.tensor_type.shape)
    return True


def _nodes(graph: onnx.GraphProto):
    """Every node of `graph` and of the subgraphs its nodes hold (If / Loop / Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _nodes(sub)


def _refuse_reserved_domains(model: onnx.ModelProto, path: Path) -> None:
    """Stop at a file that uses one of the ONNX domains robaudit writes its own rewrites in.

    Those nodes are read by what robaudit means by them (its converters, or put back into
    the default domain), not by the file's own definition, so a file of its own with the
    same domain name would be translated into another network, and its radii would be
    about that network.
    """
    reserved = (TORCH_DOMAIN, _SHIELD_DOMAIN)
    used = [entry.domain for entry in model.opset_import]
    used += [f.domain for f in model.functions]
    used += [n.domain for n in _nodes(model.graph)]
    used += [n.domain for f in model.functions for n in f.node]
    clash = next((domain for domain in used if domain in reserved), None)
    if clash is not None:
        raise RobauditError(
            f"ONNX file {path} uses the operator domain '{clash}', which robaudit reserves for its own rewrites "
            "of the graph; rename that domain in the file"
        )


def external_data_files(path: Path) -> list[Path]:
    """The files an ONNX model keeps its weights in (external data), sorted; [] for other files.

    They are part of the model: hashed with it, and never written over by an output.
    Reads only the graph (not the weights); a file that is not ONNX gives [].
    """
    if path.suffix.lower() != ".onnx" or not path.is_file():
        return []
    try:
        from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

        model = onnx.load(str(path), load_external_data=False)
        found = {
            (path.parent / ExternalDataInfo(t).location)
            for t in _get_all_tensors(model)
            if uses_external_data(t) and ExternalDataInfo(t).location
        }
    except Exception:  # noqa: BLE001 - not an ONNX file after all: loading it reports that properly
        return []
    return sorted(found)


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    found = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    found[node.output[0]] = attr.t
    return found


def _drop_harmless_allowzero(model: onnx.ModelProto) -> None:
    """Clear Reshape's allowzero=1 where the target shape is a constant without zeros.

    torch's dynamo exporter sets allowzero=1 on every Reshape, which onnx2torch refuses;
    with no 0 in the shape the flag cannot change the result, so dropping it is exact.
    """
    constants = _constants(model)
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        for i, attr in enumerate(node.attribute):
            if attr.name == "allowzero" and attr.i == 1:
                if 0 not in numpy_helper.to_array(constants[node.input[1]]).tolist():
                    del node.attribute[i]
                break


_CONSTANT_LISTS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}


def _constant_nodes_as_initializers(model: onnx.ModelProto) -> int:
    """Replace each numeric Constant node of the main graph by an initializer holding its value; the count.

    Verification benchmarks often store weights as Constant nodes; onnx2torch takes a
    Conv's or a BatchNormalization's parameters only from initializers. A Constant node is
    its value, so the rewrite is exact (string and sparse constants are left alone).
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    keep, folded = [], 0
    for node in graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if attr is None or not node.output or node.output[0] in outputs or node.domain not in ("", "ai.onnx"):
            keep.append(node)
            continue
        if attr.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            tensor.name = node.output[0]
        elif attr.name in _CONSTANT_LISTS:
            value = onnx.helper.get_attribute_value(attr)
            tensor = numpy_helper.from_array(np.asarray(value, dtype=_CONSTANT_LISTS[attr.name]), node.output[0])
        else:
            keep.append(node)
            continue
        graph.initializer.append(tensor)
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
    return folded


def _fold_initializer_identities(model: onnx.ModelProto) -> None:
    """Replace `Identity(initializer)` nodes by a copy of the initializer.

    The TorchScript-based exporter shares equal weights through Identity nodes, but
    onnx2torch's Conv/Gemm converters need their weights to be initializers.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input and node.input[0] in initializers and node.output[0] not in outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            initializers[copy.name] = copy
        else:
            keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


_CASTS_OF_CONSTANTS = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32,
}  # fmt: skip


def _fold_constant_casts(model: onnx.ModelProto) -> None:
    """Replace `Cast(constant)` by the cast constant.

    The TorchScript-based exporter writes a clamp's bounds as Cast(Constant), and
    onnx2torch's Clip converter takes only constant bounds. numpy's astype between these
    numeric types rounds as ONNX Cast does, so the fold is exact.
    """
    graph = model.graph
    constants = _constants(model)
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        source = constants.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if source is None or to not in _CASTS_OF_CONSTANTS or node.output[0] in outputs:
            keep.append(node)
            continue
        value = numpy_helper.to_array(source)
        if value.dtype.kind not in "fiu":
            keep.append(node)
            continue
        folded = numpy_helper.from_array(value.astype(_CASTS_OF_CONSTANTS[to]), node.output[0])
        graph.initializer.append(folded)
        constants[folded.name] = folded
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _absent_clip_bounds(model: onnx.ModelProto) -> None:
    """Write a Clip's absent bounds (the empty input name '') the way onnx2torch reads them.

    `torch.clamp(x, min=0.0)` is exported as Clip(x, min, ''): a trailing '' is dropped. In
    `torch.clamp(x, max=1.0)`, Clip(x, '', max), the absent min becomes an initializer holding
    -inf, which clips nothing. Both are exact (onnxruntime checks the translation anyway).
    """
    constants = _constants(model)
    for k, node in enumerate(model.graph.node):
        if node.op_type != "Clip":
            continue
        while len(node.input) > 1 and not node.input[-1]:
            del node.input[-1]
        if len(node.input) == 3 and not node.input[1] and node.input[2] in constants:
            dtype = numpy_helper.to_array(constants[node.input[2]]).dtype
            name = f"{node.output[0]}__no_min_{k}"
            model.graph.initializer.append(numpy_helper.from_array(np.array(-np.inf, dtype=dtype), name))
            node.input[1] = name


def _clip_bounds_as_initializers(model: onnx.ModelProto) -> None:
    """Turn the Constant nodes that give a Clip its min / max into initializers of the same name.

    torch's TorchScript-based exporter writes `torch.clamp(x, min=0.0)` at opset 11+ as
    Clip(x, Constant) (a Cast between them is folded first), and onnx2torch's Clip converter
    takes only initializers ("Dynamic value of min/max is not implemented"). A Constant's
    value is its output for every reader, so the move is exact.
    """
    graph = model.graph
    bounds = {name for node in graph.node if node.op_type == "Clip" for name in node.input[1:3] if name}
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is None or len(node.output) != 1 or node.output[0] not in bounds or node.output[0] in outputs:
            keep.append(node)
            continue
        moved = onnx.TensorProto()
        moved.CopyFrom(value)
        moved.name = node.output[0]
        graph.initializer.append(moved)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _pad_values_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """Move a graph with a filled Pad-2 to opset 11, or None when there is none.

    ONNX Pad-2 keeps its fill in the attribute `value`, but onnx2torch reads an attribute
    named `constant_value`, so it would pad with 0 and audit another model than the file
    (outputs off by 2.2 on a digits CNN). From opset 11 the fill is an input, which
    onnx2torch reads; ONNX's converter moves it there exactly.
    """
    opset = _default_opset(model) or 11
    filled = any(
        node.op_type == "Pad" and any(a.name == "value" and a.f != 0 for a in node.attribute)
        for node in model.graph.node
    )
    if opset >= 11 or not filled:
        return None
    return version_converter.convert_version(model, 11)


def _decompose_gelu(model: onnx.ModelProto, elem: int) -> int:
    """Rewrite Gelu (new in opset 20, no onnx2torch converter) as the Erf/Tanh formula it is defined by.

    Without this a graph with Gelu can neither be converted nor moved to an older opset.
    """
    graph = model.graph
    if not any(node.op_type == "Gelu" and node.domain in ("", "ai.onnx") for node in graph.node):
        return 0
    dtype = {onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16}.get(elem, np.float32)
    consts = {"half": 0.5, "one": 1.0, "sqrt2": math.sqrt(2.0), "k": 0.044715, "s": math.sqrt(2.0 / math.pi)}
    names = {}
    for key, value in consts.items():
        names[key] = f"_robaudit_gelu_{key}"
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=dtype), names[key]))
    nodes, count = [], 0
    for node in graph.node:
        if node.op_type != "Gelu" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        count += 1
        x, y, t = node.input[0], node.output[0], f"_robaudit_gelu{count}_"
        approximate = next((a.s.decode() for a in node.attribute if a.name == "approximate"), "none")
        make = onnx.helper.make_node
        if approximate == "tanh":
            nodes += [
                make("Mul", [x, x], [t + "x2"]),
                make("Mul", [t + "x2", x], [t + "x3"]),
                make("Mul", [t + "x3", names["k"]], [t + "kx3"]),
                make("Add", [x, t + "kx3"], [t + "u"]),
                make("Mul", [t + "u", names["s"]], [t + "v"]),
                make("Tanh", [t + "v"], [t + "w"]),
            ]
        else:
            nodes += [make("Div", [x, names["sqrt2"]], [t + "v"]), make("Erf", [t + "v"], [t + "w"])]
        nodes += [
            make("Add", [t + "w", names["one"]], [t + "p"]),
            make("Mul", [x, t + "p"], [t + "q"]),
            make("Mul", [t + "q", names["half"]], [y]),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _fuse_torch_patterns(model: onnx.ModelProto) -> list[str]:
    """Read torch ops that the dynamo exporter writes as a Where of a comparison as one node each; returns their names.

    onnx2torch reads such a pattern op by op, and the certificate refuses the Where's
    input-dependent mask, though the op is one function it bounds exactly (or refuses by
    name). Each pattern becomes one `robaudit_torch` node (`onnx_torch_ops`), defined by an
    ONNX function of the same ops, which onnx2torch converts into the torch module:
    - softplus: Where(Greater(s, threshold), x, Softplus(s) / beta), s = x beta (s = x,
      without the Mul and Div, when beta is 1): `nn.Softplus(beta, threshold)`;
    - softshrink: Where(Greater(Abs(x), lambd), x - Sign(x) lambd, x 0): `nn.Softshrink(lambd)`;
    - threshold: Where(LessOrEqual(x, threshold), value, x): `nn.Threshold(threshold, value)`.
    Pattern nodes whose values are read elsewhere stay.
    """
    graph = model.graph
    consts = _constants(model)
    producer = {o: n for n in graph.node for o in n.output}

    def scalar(name: str) -> np.ndarray | None:
        value = numpy_helper.to_array(consts[name]) if name in consts else None
        return value.reshape(()) if value is not None and value.size == 1 and value.dtype.kind == "f" else None

    def made(name: str, op: str) -> onnx.NodeProto | None:
        node = producer.get(name)
        return node if node is not None and node.op_type == op and node.domain in ("", "ai.onnx") else None

    def other(node: onnx.NodeProto, name: str) -> str | None:
        """The input of a binary node beside `name`."""
        return node.input[1] if node.input[0] == name else node.input[0] if node.input[1] == name else None

    def softplus(test: str, x: str, soft: str):
        greater = made(test, "Greater")
        threshold = scalar(greater.input[1]) if greater is not None else None
        if threshold is None:
            return None
        scaled, parts, beta = greater.input[0], [greater], np.ones((), threshold.dtype)
        if (div := made(soft, "Div")) is not None:  # Softplus(x beta) / beta
            spl, mul = made(div.input[0], "Softplus"), made(scaled, "Mul")
            if spl is None or mul is None or spl.input[0] != scaled or x not in mul.input:
                return None
            beta = scalar(other(mul, x) or "")
            if beta is None or beta.dtype != threshold.dtype or scalar(div.input[1]) != beta:
                return None
            parts += [div, spl, mul]
        else:  # beta 1: Softplus(x)
            spl = made(soft, "Softplus")
            if spl is None or spl.input[0] != x or scaled != x:
                return None
            parts.append(spl)
        return SOFTPLUS, x, [beta, threshold], parts

    def softshrink(test: str, shrunk: str, zeroed: str):
        greater, sub, times = made(test, "Greater"), made(shrunk, "Sub"), made(zeroed, "Mul")
        magnitude = made(greater.input[0], "Abs") if greater is not None else None
        if magnitude is None or sub is None or times is None:
            return None
        x, lambd = magnitude.input[0], scalar(greater.input[1])
        step = made(sub.input[1], "Mul") if sub.input[0] == x else None
        sign = made(other(step, greater.input[1]) or "", "Sign") if step is not None else None
        zero = scalar(other(times, x) or "")
        if lambd is None or sign is None or sign.input[0] != x or zero is None or zero != 0 or zero.dtype != lambd.dtype:
            return None
        return SOFTSHRINK, x, [lambd, zero], [greater, magnitude, sub, step, sign, times]

    def threshold_op(test: str, fill: str, x: str):
        below = made(test, "LessOrEqual")
        threshold, value = (scalar(below.input[1]), scalar(fill)) if below is not None else (None, None)
        if threshold is None or value is None or below.input[0] != x or value.dtype != threshold.dtype:
            return None
        return THRESHOLD, x, [threshold, value], [below]

    fused: dict[int, onnx.NodeProto] = {}  # id of a Where -> the node replacing it
    pattern: set[int] = set()  # ids of the nodes feeding fused Wheres: dropped once nothing else reads them
    names: list[str] = []
    for where in [n for n in graph.node if n.op_type == "Where" and n.domain in ("", "ai.onnx")]:
        found = softplus(*where.input) or softshrink(*where.input) or threshold_op(*where.input)
        if found is None:
            continue
        op, x, params, parts = found
        stem = f"_robaudit_{op.lower()}{len(fused)}_"
        inputs = [x]
        for k, value in enumerate(params):
            graph.initializer.append(numpy_helper.from_array(value, f"{stem}{k}"))
            inputs.append(f"{stem}{k}")
        fused[id(where)] = onnx.helper.make_node(op, inputs, list(where.output), domain=TORCH_DOMAIN)
        pattern |= {id(n) for n in parts}
        names.append(op)
    if not fused:
        return []
    nodes = [fused.get(id(n), n) for n in graph.node]
    while True:
        read = {name for n in nodes for name in n.input} | {o.name for o in graph.output}
        keep = [n for n in nodes if id(n) not in pattern or any(o in read for o in n.output)]
        if len(keep) == len(nodes):
            break
        nodes = keep
    del graph.node[:]
    graph.node.extend(nodes)
    model.functions.extend(function_at(op, _default_opset(model) or 13) for op in dict.fromkeys(names))
    model.opset_import.append(onnx.helper.make_opsetid(TORCH_DOMAIN, 1))
    return names


def _wrap_pads_as_concats(model: onnx.ModelProto) -> int:
    """Write Pad with mode 'wrap' (opset 19; torch's dynamo exporter writes circular padding so) as Slices and Concats.

    onnx2torch has no 'wrap' mode and the version converter cannot move it below opset 19.
    Along each padded axis, in order (as numpy's pad, which ONNX defines 'wrap' by), the
    result is the last `begin` entries, the tensor, then its first `end` entries: data
    movement, exact. Pads and axes must be constants, every pad nonnegative and at most
    the axis' length (shape inference gives it); other Pads are left for the converter
    to refuse.
    """
    graph = model.graph
    wrapped = [
        n for n in graph.node
        if n.op_type == "Pad" and n.domain in ("", "ai.onnx") and any(a.name == "mode" and a.s == b"wrap" for a in n.attribute)
    ]  # fmt: skip
    shapes = _inferred_dims(model) if wrapped else None
    if shapes is None:
        return 0
    consts = _constants(model)
    nodes, count = [], 0
    for node in graph.node:
        plan = _wrap_plan(node, consts, shapes) if node in wrapped else None
        if plan is None:
            nodes.append(node)
            continue
        count += 1
        current, stem = node.input[0], f"_robaudit_wrap{count}_"
        for step, (axis, begin, end) in enumerate(plan):
            parts = []
            for kind, (start, stop, size) in (("head", (-begin, _INT64_MAX, begin)), ("tail", (0, end, end))):
                if not size:
                    continue
                parts.append((kind, _slice_node(model, current, f"{stem}{step}_{kind}", [start], [stop], [axis])))
            last = step == len(plan) - 1
            out = node.output[0] if last else f"{stem}{step}"
            order = [n.output[0] for k, n in parts if k == "head"] + [current] + [n.output[0] for k, n in parts if k == "tail"]
            nodes += [n for _, n in parts] + [onnx.helper.make_node("Concat", order, [out], axis=axis)]
            current = out
        if not plan:
            nodes.append(onnx.helper.make_node("Identity", [node.input[0]], [node.output[0]]))
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


_INT64_MAX = int(np.iinfo(np.int64).max)


def _slice_node(model: onnx.ModelProto, source: str, output: str, starts: list[int], ends: list[int], axes: list[int]) -> onnx.NodeProto:
    """A Slice of `source` (opset 10+: bounds and axes as int64 initializers named after `output`)."""
    names = [f"_robaudit_{output}_{field}" for field in ("starts", "ends", "axes")]
    for name, values in zip(names, (starts, ends, axes)):
        model.graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
    return onnx.helper.make_node("Slice", [source, *names], [output])


def _wrap_plan(node: onnx.NodeProto, consts: dict, shapes: dict) -> list[tuple[int, int, int]] | None:
    """(axis, begin, end) per padded axis of a 'wrap' Pad, or None where the rewrite does not apply."""
    dims = shapes.get(node.input[0])
    pads_in = node.input[1] if len(node.input) > 1 else ""
    if not dims or pads_in not in consts:  # the fill value (input 2) plays no part in 'wrap'
        return None
    pads = [int(v) for v in numpy_helper.to_array(consts[pads_in]).reshape(-1)]
    rank = len(dims)
    if len(node.input) > 3 and node.input[3]:
        if node.input[3] not in consts:
            return None
        axes = [int(a) % rank for a in numpy_helper.to_array(consts[node.input[3]]).reshape(-1)]
    else:
        axes = list(range(rank))
    if len(pads) != 2 * len(axes) or len(set(axes)) != len(axes):
        return None
    plan = []
    for axis, begin, end in zip(axes, pads[: len(axes)], pads[len(axes) :]):
        if not (begin or end):
            continue
        size = dims[axis]
        if begin < 0 or end < 0 or size is None or max(begin, end) > size:
            return None
        plan.append((axis, begin, end))
    return plan


_CONSTANT_OF_SHAPE_9_TYPES = {t for t in range(1, 14) if t != onnx.TensorProto.STRING}  # float, ints, bool, half, double


def _convert_version(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """ONNX's version converter, carrying some nodes over unchanged where that is exact.

    The converter has no adapters down from the versions torch's exporters write today
    for three ops, so it fails on any graph with one of them:
    - Pad-19 (reflect or replicate padding): Pad-18 only added an optional `axes` input
      and Pad-19 the 'wrap' mode, so a Pad without either is Pad-11's op;
    - ConstantOfShape-20/21: they only added element types (float8, int4);
    - Split-18: it only added the `num_outputs` attribute, so a Split with its sizes as
      an input (`_explicit_split_sizes` writes them where the shape is known) is Split-13's.
    Those nodes are hidden from the converter in a private domain and put back afterwards.
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    _explicit_split_sizes(work)
    hidden = 0
    for node in work.graph.node:
        if node.domain in ("", "ai.onnx") and target >= _SAME_SINCE.get(node.op_type, math.inf) and _unchanged(node):
            node.domain = _SHIELD_DOMAIN
            hidden += 1
    if hidden:
        work.opset_import.append(onnx.helper.make_opsetid(_SHIELD_DOMAIN, 1))
    out = version_converter.convert_version(work, target)
    for node in out.graph.node:
        if node.domain == _SHIELD_DOMAIN:
            node.domain = ""
    kept = [entry for entry in out.opset_import if entry.domain != _SHIELD_DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(kept)
    # the converter drops functions: robaudit's own are redefined at the target opset
    out.functions.extend(function_at(f.name, target) for f in model.functions if f.domain == TORCH_DOMAIN)
    return out


_SAME_SINCE = {"Pad": 11, "ConstantOfShape": 9, "Split": 13}  # the oldest opset with the same op (see `_unchanged`)


def _unchanged(node: onnx.NodeProto) -> bool:
    """Whether this Pad / ConstantOfShape / Split uses nothing newer than `_SAME_SINCE` of its op."""
    attributes = {a.name: a for a in node.attribute}
    if node.op_type == "Pad":
        mode = attributes["mode"].s.decode() if "mode" in attributes else "constant"
        return mode != "wrap" and not (len(node.input) > 3 and node.input[3])
    if node.op_type == "ConstantOfShape":
        value = attributes["value"].t.data_type if "value" in attributes else onnx.TensorProto.FLOAT
        return value in _CONSTANT_OF_SHAPE_9_TYPES
    return node.op_type == "Split" and "num_outputs" not in attributes


def _inferred_dims(model: onnx.ModelProto) -> dict[str, list[int | None]] | None:
    """Every value's dims that ONNX shape inference gives (None where inference fails: callers leave the graph)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - leave the graph as it is; the converter will say what it lacks
        return None
    return {v.name: _dims(v) for v in list(inferred.graph.value_info) + list(inferred.graph.input)}


def _explicit_split_sizes(model: onnx.ModelProto) -> None:
    """Give Split-18's `num_outputs` as explicit sizes (Split-13's form) where the split dim is known.

    ONNX defines the parts as ceil(D / num_outputs) long, the last one shorter.
    """
    splits = [n for n in model.graph.node if n.op_type == "Split" and n.domain in ("", "ai.onnx")]
    if not any(a.name == "num_outputs" for n in splits for a in n.attribute):
        return
    shapes = _inferred_dims(model)
    if shapes is None:
        return
    for node in splits:
        attributes = {a.name: a for a in node.attribute}
        dims = shapes.get(node.input[0])
        if "num_outputs" not in attributes or (len(node.input) > 1 and node.input[1]) or not dims:
            continue
        axis = attributes["axis"].i if "axis" in attributes else 0
        count, size = attributes["num_outputs"].i, dims[axis % len(dims)]
        if size is None or count < 1:
            continue
        part = -(-size // count)
        sizes = [min(part, size - i * part) for i in range(count)]
        if any(s <= 0 for s in sizes):
            continue
        name = f"_robaudit_split_sizes_{node.output[0]}"
        model.graph.initializer.append(numpy_helper.from_array(np.array(sizes, dtype=np.int64), name))
        node.input[:] = [node.input[0], name]
        node.attribute.remove(attributes["num_outputs"])


_AUTO_PAD_OPS = ("Conv", "MaxPool", "AveragePool")


def _sized_windows(
    model: onnx.ModelProto, wanted, unknown_sizes: bool = False
) -> list[tuple[onnx.NodeProto, dict, tuple[list[int], ...]]]:
    """The default-domain nodes `wanted` picks, each with its attributes and (input sizes, kernel, strides, dilations).

    Sizes come from ONNX shape inference; nodes with a size it cannot give are left out
    (the converter then says what it lacks), unless `unknown_sizes`, where such sizes are
    None (the rank must still be known). The kernel is `kernel_shape`, else the weight's
    trailing dims (Conv, ConvTranspose).
    """
    nodes = [n for n in model.graph.node if n.domain in ("", "ai.onnx") and wanted(n)]
    shapes = _inferred_dims(model) if nodes else None
    if shapes is None:
        return []
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    found = []
    for node in nodes:
        attributes = {a.name: a for a in node.attribute}
        spatial = (shapes.get(node.input[0]) or [])[2:]
        if "kernel_shape" in attributes:
            kernel = list(attributes["kernel_shape"].ints)
        else:
            kernel = (weights.get(node.input[1]) or shapes.get(node.input[1]) or [])[2:] if len(node.input) > 1 else []
        if not spatial or (None in spatial and not unknown_sizes) or len(kernel) != len(spatial) or None in kernel:
            continue
        rank = len(spatial)
        strides = list(attributes["strides"].ints) if "strides" in attributes else [1] * rank
        dilations = list(attributes["dilations"].ints) if "dilations" in attributes else [1] * rank
        found.append((node, attributes, (spatial, kernel, strides, dilations)))
    return found


def _is_same_padded(node: onnx.NodeProto) -> bool:
    return any(a.name == "auto_pad" and a.s in (b"SAME_UPPER", b"SAME_LOWER") for a in node.attribute)


def _explicit_auto_pads(model: onnx.ModelProto) -> int:
    """Write `auto_pad` SAME_UPPER / SAME_LOWER as the explicit `pads` it stands for; returns how many.

    onnx2torch refuses those modes (torch's exporter writes SAME_UPPER for padding="same").
    ONNX defines them by the input size: output ceil(in / stride), total padding
    max(0, (out - 1) stride + (k - 1) dilation + 1 - in), the odd one at the end (UPPER) or
    the beginning (LOWER). At stride 1 the total is (k - 1) dilation whatever the size, so
    a graph of any image size (tf2onnx writes SAME for Keras' padding="same" when the
    input's height and width are free) is rewritten too. Nodes with a stride above 1 on an
    axis whose size shape inference cannot give are left for the converter to refuse.
    """
    done = 0
    for node, attributes, (spatial, kernel, strides, dilations) in _sized_windows(
        model, lambda n: n.op_type in _AUTO_PAD_OPS and _is_same_padded(n), unknown_sizes=True
    ):
        if any(size is None and stride != 1 for size, stride in zip(spatial, strides)):
            continue
        upper = attributes["auto_pad"].s == b"SAME_UPPER"  # the odd cell at the end (else at the beginning)
        begin, end = [], []
        for size, k, stride, dilation in zip(spatial, kernel, strides, dilations):
            if size is None:  # stride 1: out = in
                total = (k - 1) * dilation
            else:
                out = -(-size // stride)
                total = max(0, (out - 1) * stride + (k - 1) * dilation + 1 - size)
            small, large = total // 2, total - total // 2
            begin.append(small if upper else large)
            end.append(large if upper else small)
        node.attribute.remove(attributes["auto_pad"])
        if "pads" in attributes:
            node.attribute.remove(attributes["pads"])
        node.attribute.append(onnx.helper.make_attribute("pads", begin + end))
        done += 1
    return done


def _explicit_conv_transpose_pads(model: onnx.ModelProto) -> int:
    """Write ConvTranspose's `output_shape` and `auto_pad` SAME_* as explicit pads; returns how many nodes.

    onnx2torch ignores `output_shape` (the layer then computes another size) and refuses
    SAME_*. ONNX derives the pads from the sizes: total = stride (in - 1) + output_padding
    + (k - 1) dilation + 1 - out, with out the given `output_shape` or, for SAME_*,
    in x stride; SAME_UPPER puts the odd cell at the end, otherwise it goes at the
    beginning. torch pads a transposed convolution by p on both sides, so the node keeps
    the smaller pad p and a Slice after it crops the difference from one side (exact: it
    drops output cells). Nodes whose sizes shape inference cannot give, and a negative
    total (an output larger than the full transposed convolution), are left for the
    converter and the translation check (`wrap_model`) to refuse.
    """
    opset = _default_opset(model) or 0
    done = 0
    for node, attributes, (spatial, kernel, strides, dilations) in _sized_windows(
        model,
        lambda n: n.op_type == "ConvTranspose" and (_is_same_padded(n) or any(a.name == "output_shape" for a in n.attribute)),
    ):
        rank = len(spatial)
        extra = list(attributes["output_padding"].ints) if "output_padding" in attributes else [0] * rank
        auto = attributes["auto_pad"].s if "auto_pad" in attributes else b"NOTSET"
        if "output_shape" in attributes:
            out = list(attributes["output_shape"].ints)[-rank:]
        elif auto in (b"SAME_UPPER", b"SAME_LOWER"):
            out = [size * stride for size, stride in zip(spatial, strides)]
        else:
            continue
        totals = [
            stride * (size - 1) + e + (k - 1) * dilation + 1 - o
            for size, k, stride, dilation, e, o in zip(spatial, kernel, strides, dilations, extra, out)
        ]
        if len(out) != rank or any(t < 0 for t in totals):
            continue
        upper = auto == b"SAME_UPPER"
        begin = [t // 2 if upper else t - t // 2 for t in totals]
        end = [t - b for t, b in zip(totals, begin)]
        both = [min(b, e) for b, e in zip(begin, end)]
        for name in ("auto_pad", "output_shape", "pads"):
            if name in attributes:
                node.attribute.remove(attributes[name])
        node.attribute.append(onnx.helper.make_attribute("pads", both + both))
        if begin != end:
            _crop_after(model, node, [b - p for b, p in zip(begin, both)], [e - p for e, p in zip(end, both)], opset)
        done += 1
    return done


def _crop_after(model: onnx.ModelProto, node: onnx.NodeProto, start: list[int], stop: list[int], opset: int) -> None:
    """Insert a Slice after `node` that drops `start` / `stop` cells at each spatial axis's ends."""
    produced = node.output[0]
    inner = f"_robaudit_uncropped_{produced}"
    node.output[0] = inner
    axes = list(range(2, 2 + len(start)))
    ends = [-s if s else _INT64_MAX for s in stop]
    if opset >= 10:
        crop = _slice_node(model, inner, produced, start, ends, axes)
    else:
        crop = onnx.helper.make_node("Slice", [inner], [produced], starts=start, ends=ends, axes=axes)
    position = list(model.graph.node).index(node)
    model.graph.node.insert(position + 1, crop)


def _global_max_pools(model: onnx.ModelProto) -> int:
    """Write GlobalMaxPool (which onnx2torch lacks) as a MaxPool whose one window is the whole image; returns how many.

    Nodes whose input sizes shape inference cannot give are left for the converter to refuse.
    """
    nodes = [n for n in model.graph.node if n.op_type == "GlobalMaxPool" and n.domain in ("", "ai.onnx")]
    if not nodes:
        return 0
    shapes = _inferred_dims(model)
    if shapes is None:
        return 0
    done = 0
    for node in nodes:
        spatial = (shapes.get(node.input[0]) or [])[2:]
        if not spatial or None in spatial:
            continue
        node.op_type = "MaxPool"
        node.attribute.append(onnx.helper.make_attribute("kernel_shape", spatial))
        done += 1
    return done


def _convert(model: onnx.ModelProto, hints: list[str]):
    """onnx2torch's module; its warnings (inexact translations it admits to) go to `hints`, not the terminal."""
    import onnx2torch

    register_converters()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = onnx2torch.convert(model)
    hints.extend(dict.fromkeys(str(w.message) for w in caught if "onnx2torch" in (w.filename or "")))
    return net


def _to_torch(model: onnx.ModelProto, path: Path, hints: list[str]) -> tuple:
    """Convert with onnx2torch, falling back to older opsets; returns (module, note or None, the graph converted)."""
    opset = _default_opset(model)
    try:
        return _convert(model, hints), None, model
    except Exception as exc:  # noqa: BLE001 - NotImplementedError for missing converters, bare errors on odd graphs
        first = exc

    for target in FALLBACK_OPSETS:
        if target == opset:
            continue
        try:
            found: list[str] = []
            converted = _convert_version(model, target)
            net = _convert(converted, found)
        except Exception:  # noqa: BLE001 - this opset does not work either; try the next
            continue
        hints.extend(found)
        return net, f"ONNX graph converted from opset {opset} to {target} for onnx2torch", converted

    match = _OP_RE.search(str(first))
    if match:
        domain, op, version = match.groups()
        if domain == "ai.onnx.ml":  # no opset of the default domain has these: converting versions cannot help
            raise RobauditError(
                f"ONNX operator {op} in {path} is one of the ai.onnx.ml operators (classical machine learning, as "
                "skl2onnx writes for scikit-learn models), which robaudit cannot translate to PyTorch for its "
                "gradient attacks and certificate; export a network of standard ONNX operators, or give its scores "
                "as a graph output of their own (robaudit reads a float scores output and leaves out the nodes "
                "only the other outputs need)"
            )
        where = f" from domain {domain}" if domain not in ("", "ai.onnx") else ""
        raise RobauditError(
            f"ONNX operator {op}{where} (opset {version}) in {path} is not supported by onnx2torch, "
            f"even after converting the graph to opsets {', '.join(map(str, FALLBACK_OPSETS))}; "
            "re-export the model with a lower opset or save it as TorchScript or torch.export (.pt2)"
        )
    if "auto_pad is not implemented" in str(first) and any(_is_same_padded(n) for n in model.graph.node):
        raise RobauditError(
            f"cannot convert ONNX file {path} to PyTorch: a strided node with auto_pad SAME_UPPER/SAME_LOWER on an "
            "input whose height or width the file leaves free pads by the image size, which robaudit can write out "
            "only when the size is fixed; fix the input's size in the file "
            "(onnx.tools.update_model_dims.update_inputs_outputs_dims) or re-export it with explicit padding"
        )
    raise RobauditError(f"cannot convert ONNX file {path} to PyTorch with onnx2torch: {one_line(first)}")


def _is_float_tensor(value: onnx.ValueInfoProto) -> bool:
    return value.type.HasField("tensor_type") and value.type.tensor_type.elem_type in _FLOAT_TYPES


def _zipmap_source(model: onnx.ModelProto, output: onnx.ValueInfoProto) -> onnx.ValueInfoProto | None:
    """The probability tensor behind an output that a ZipMap turns into a list of {class: probability} maps.

    scikit-learn classifiers exported by skl2onnx end so. Only for integer class labels
    0..K-1 in column order, where column k of the tensor is class k's probability; the
    tensor's type and shape come from shape inference.
    """
    node = next((n for n in model.graph.node if output.name in n.output), None)
    if node is None or node.op_type != "ZipMap" or node.domain != "ai.onnx.ml" or not node.input:
        return None
    labels = next((list(a.ints) for a in node.attribute if a.name == "classlabels_int64s"), None)
    if not labels or labels != list(range(len(labels))):
        return None
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - no inferred shape: the ZipMap output stays as it is
        return None
    found = next((v for v in inferred.graph.value_info if v.name == node.input[0]), None)
    dims = _dims(found) if found is not None else []
    if found is None or not _is_float_tensor(found) or len(dims) != 2 or dims[1] != len(labels):
        return None
    return found


def _keep_scores_output(model: onnx.ModelProto, image: str) -> str | None:
    """Keep only the graph output that holds the class scores (in memory); a note when there were several.

    The rule is `models.outputs.select_output`'s for dicts: an output named "logits" wins,
    else the first floating-point tensor computed from the image (a classifier's
    predicted-label output is an integer tensor, never its scores), else the probabilities behind a ZipMap of integer
    class labels 0..K-1. Keeping one output means the translation, onnxruntime, the
    certificate and every check read the same scores; `_drop_dead_nodes` then leaves out
    what only the other outputs need. `image` names the graph's image input.
    """
    outputs = list(model.graph.output)
    if len(outputs) < 2:
        return None
    named = [k for k, o in enumerate(outputs) if o.name == "logits"]
    floats = [k for k, o in enumerate(outputs) if _is_float_tensor(o) and _reads_input(model, image, o.name)]
    zipped = [] if named or floats else [  # a ZipMap's source needs shape inference: only where nothing else decides
        (k, v) for k, v in ((k, _zipmap_source(model, o)) for k, o in enumerate(outputs)) if v is not None
    ]
    listed = ", ".join(o.name for o in outputs)
    head = f"the ONNX file has {len(outputs)} outputs ({listed}): classes are read from "
    if not zipped:
        keep = named[0] if named else floats[0] if floats else 0
        first_float = "the first floating-point one computed from the image"
        why = "the output named logits" if named else first_float if floats and floats[0] else "the first"
        chosen, note = outputs[keep], f"{head}'{outputs[keep].name}', {why}"
    else:
        keep, chosen = zipped[0]
        note = (f"{head}'{chosen.name}', the probability tensor that its ZipMap '{outputs[keep].name}' lists as "
                "{class: probability} maps (class labels 0..K-1 in column order)")  # fmt: skip
    del model.graph.output[:]
    model.graph.output.append(chosen)
    return note


def _reads_input(model: onnx.ModelProto, name: str, output: str | None = None) -> bool:
    """Whether `output` (default: the first graph output) is computed from the input `name` (nodes in running order)."""
    live = {name}
    for node in model.graph.node:
        if _used_names(node) & live:
            live.update(node.output)
    return (output or model.graph.output[0].name) in live


def _drop_dead_nodes(model: onnx.ModelProto) -> list[str]:
    """Leave out the nodes that no graph output depends on (in memory); the op types left out.

    ONNX nodes are pure functions of their inputs, so this is exact. It lets a file whose
    other outputs need ops robaudit cannot translate (scikit-learn's label output:
    ArgMax, ArrayFeatureExtractor, ZipMap) be read through its scores alone.
    """
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):  # sorted (`_sort_nodes`): readers come after the nodes they read
        if any(name in needed for name in node.output if name):
            keep.append(node)
            needed |= _used_names(node)
    if len(keep) == len(graph.node):
        return []
    kept = {id(n) for n in keep}
    dropped = [n.op_type for n in graph.node if id(n) not in kept]
    del graph.node[:]
    graph.node.extend(reversed(keep))
    return dropped


def load_onnx(path: Path) -> RawModel:
    """Read, check and convert an ONNX classifier with a single float image input."""
    notes: list[str] = []
    model = _read(path, notes)
    _refuse_reserved_domains(model, path)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise RobauditError(
            f"ONNX file {path} takes {len(inputs)} inputs; robaudit audits classifiers with exactly one image input"
        )
    chosen = _keep_scores_output(model, inputs[0].name)
    dead = _drop_dead_nodes(model)
    if dead:
        kinds = ", ".join(dict.fromkeys(dead))
        chosen = "; ".join(filter(None, [chosen, f"{len(dead)} node(s) that the class scores do not depend on ({kinds}) are left out"]))
    if not _reads_input(model, inputs[0].name):
        raise RobauditError(
            f"ONNX file {path}: its output '{model.graph.output[0].name}' does not depend on the input image, so "
            "there is no classifier to audit"
        )
    overridable = [i.name for i in model.graph.input if i.name in initializers]
    if overridable:  # IR < 4 files list every weight as an input: a caller could feed other values
        shown = ", ".join(overridable[:3]) + (", ..." if len(overridable) > 3 else "")
        notes.append(
            f"the ONNX file lists {len(overridable)} initializer(s) as graph inputs too ({shown}), which a caller "
            "may feed other values; robaudit audits the model with the values the file holds"
        )
    elem = inputs[0].type.tensor_type.elem_type
    if elem not in _FLOAT_TYPES:
        name = onnx.TensorProto.DataType.Name(elem) if elem else "unknown"
        raise RobauditError(
            f"ONNX file {path} takes {name} input, but gradient attacks need a floating-point input tensor"
        )

    dims = _dims(inputs[0])
    input_shape = tuple(dims[1:]) if len(dims) >= 2 and all(d is not None for d in dims[1:]) else None
    fixed_batch = dims[0] if dims and dims[0] is not None and dims[0] > 1 else None
    out_dims = _dims(model.graph.output[0])[1:]
    num_classes = None
    if out_dims and all(d is not None for d in out_dims):
        big = [d for d in out_dims if d > 1]
        num_classes = big[0] if len(big) == 1 else None

    original = onnx.ModelProto()
    original.CopyFrom(model)  # the file's own semantics, to check the translation against (`wrap_model`)
    # Exact rewrites of what today's exporters write and onnx2torch cannot take (in memory only).
    _drop_harmless_allowzero(model)
    _constant_nodes_as_initializers(model)
    _fold_initializer_identities(model)
    _fold_constant_casts(model)
    _absent_clip_bounds(model)
    _clip_bounds_as_initializers(model)
    notes += [chosen] if chosen else []
    try:
        upgraded = _pad_values_as_inputs(model)
    except Exception as exc:  # noqa: BLE001 - the converter's own errors
        raise RobauditError(
            f"ONNX file {path}: a Pad with a fill value at opset {_default_opset(model)} cannot be converted to "
            f"opset 11, and onnx2torch would pad with 0 instead ({one_line(exc)}); re-export with opset 11 or later"
        ) from None
    if upgraded is not None:
        model = upgraded
        notes.append("ONNX graph converted to opset 11 so that onnx2torch reads Pad's fill value")
    fused = _fuse_torch_patterns(model)
    if fused:
        kinds = ", ".join(f"{fused.count(op)} {op.lower()}" for op in dict.fromkeys(fused))
        notes.append(f"torch ops that the exporter wrote as a Where of a comparison read as one op each ({kinds})")
    wraps = _wrap_pads_as_concats(model)
    if wraps:
        notes.append(f"{wraps} ONNX Pad(s) in 'wrap' mode (circular padding) written as slices and concatenations for onnx2torch")
    gelus = _decompose_gelu(model, elem)
    if gelus:
        notes.append(f"{gelus} ONNX Gelu op(s) rewritten as their Erf/Tanh formula for onnx2torch")
    same = _explicit_auto_pads(model)
    transposed = _explicit_conv_transpose_pads(model)
    if transposed:
        notes.append(
            f"{transposed} ONNX ConvTranspose output_shape / auto_pad setting(s) written as explicit pads for onnx2torch"
        )
    if same:
        notes.append(f"{same} ONNX auto_pad SAME_UPPER / SAME_LOWER padding(s) written as explicit pads for onnx2torch")
    pools = _global_max_pools(model)
    if pools:
        notes.append(f"{pools} ONNX GlobalMaxPool op(s) written as a MaxPool over the whole image for onnx2torch")
    hints: list[str] = []
    net, note, converted = _to_torch(model, path, hints)
    if note:
        notes.append(note)
    return RawModel(
        reference=OnnxReference(original, hints, translated=converted, convert=lambda m: _convert(m, [])),
        net=freeze(net),
        format="onnx",
        input_shape=input_shape,  # type: ignore[arg-type]
        input_dims=tuple(dims[1:]) if len(dims) >= 2 and input_shape is None else None,
        num_classes=num_classes,
        notes=notes,
        fixed_batch=fixed_batch,
        name=str(path),
    )
