"""Each ONNX node's translation checked on its own, on random inputs of its real shapes.

`wrapper._check_translation` compares the whole translated network with the file on 24
inputs near the data. A node that onnx2torch mistranslates without a warning (CumSum
over the width was one) can hide behind a ReLU branch those inputs leave switched off,
and the certificate, computed on the translation, would then be about another network
wherever that branch switches on. Here every node that depends on the image is cut out
of the graph that onnx2torch converted, converted again on its own by the same
converter, and run by onnxruntime and by its translation on random inputs of the shapes
it sees in a real run: a mistranslated op disagrees on generic inputs whatever the
rest of the network does with them.

The cut-out keeps the node's surroundings as the converter sees them: inputs that are
initializers in the file stay initializers, outputs of Constant nodes stay Constant
nodes, and every other input becomes a graph input fed with its real value (integer
and shape-derived tensors) or a random one (floating-point tensors computed from the
image). Nodes computed from constants alone are the same on every input, so the
whole-network check covers them.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper

from robaudit.models.detect import one_line
from robaudit.models.onnx_reference import ort_session

DRAWS = 3  # random inputs per node
RTOL, ATOL = 1e-4, 1e-30  # of the largest output magnitude, as in the whole-network check (no absolute floor: tiny values)
_SHAPE_ONLY = {"Shape", "Size"}  # their outputs depend on the shape of the image, not on its values
# onnx2torch's warnings that its nearest-neighbour Resize may pick other pixels than the file's modes
# (nearest_mode, coordinate_transformation_mode): `check_nodes` settles them exactly
_NEAREST_WARNINGS = ("Pytorch's nearest neighbor interpolate uses", "Pytorch's nearest neighbor interpolation uses")


def nearest_warnings_only(hints: list[str]) -> bool:
    """Whether every onnx2torch warning is about the pixels a nearest-neighbour Resize picks.

    Such a Resize copies input pixels by an index map fixed by the shapes alone. On an input
    whose values are all distinct, equal outputs mean equal maps, so a node check that compares
    it exactly on such an input (`check_nodes`) proves the translation exact on every input.
    """
    return bool(hints) and all(h.startswith(_NEAREST_WARNINGS) for h in hints)


def nearest_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The graph's nearest-neighbour Resize and Upsample nodes (subgraphs hold none: `check_nodes` refuses them)."""
    return [n for n in model.graph.node if _nearest(n)]


def _nearest(node: onnx.NodeProto) -> bool:
    """A Resize or Upsample in nearest-neighbour mode (ONNX's default mode)."""
    if node.op_type not in ("Resize", "Upsample"):
        return False
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
    return mode == b"nearest"


def check_nodes(
    model: onnx.ModelProto, z: np.ndarray, convert, rtol: float = RTOL, original: onnx.ModelProto | None = None,
    compared: set[str] | None = None,
) -> str | None:
    """Why some node of `model` (the graph onnx2torch converted) is not translated exactly, or None.

    `z` is a real input of the graph (after robaudit's preprocessing, at a batch size the
    graph takes); `convert(model) -> torch.nn.Module` is the converter that translated it.
    A node that cannot be cut out, converted or run on its own counts as unchecked. Outputs
    may differ by `rtol` of their largest magnitude (float32 rounding; more for float16).
    `original` is the file as written where robaudit converted it to an older opset for
    onnx2torch: nodes the converter carried over unchanged are only valid at the file's own
    opset, so onnxruntime runs the values and such nodes at that opset where it rejects the
    converted one. `compared` collects the first output of every node checked and found exact
    (nodes computed from constants alone are not checked here).
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    constants = {out: n for n in graph.node if n.op_type == "Constant" for out in n.output}
    image = next(i.name for i in graph.input if i.name not in inits)
    opsets = [list(model.opset_import)]
    if original is not None and list(original.opset_import) != opsets[0]:
        opsets.append(list(original.opset_import))
    values = None
    for source in [model] + ([original] if len(opsets) > 1 else []):
        try:
            values = _intermediates(source, image, z)
            break
        except Exception as exc:  # noqa: BLE001 - onnxruntime cannot run the graph with its intermediates exposed
            error = exc
    if values is None:
        return f"its nodes could not be run one by one to check their translation ({one_line(error, 160)})"
    twins = {}  # output name -> (node of the file as written, its initializers, its Constant outputs)
    if original is not None and len(opsets) > 1:
        o_inits = {t.name: t for t in original.graph.initializer}
        o_constants = {out: n for n in original.graph.node if n.op_type == "Constant" for out in n.output}
        twins = {n.output[0]: (n, o_inits, o_constants) for n in original.graph.node if n.output}
    data = {image}
    rng = np.random.default_rng(0)
    for index, node in enumerate(graph.node):
        if not any(name in data for name in node.input) or node.op_type in _SHAPE_ONLY:
            continue
        data.update(o for o in node.output if o)
        what = f"node {node.name or index} ({node.op_type})"
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return f"{what} holds a subgraph, whose translation cannot be checked on its own"
        try:
            mini, feeds = _cut_out(node, inits, constants, values, data, opsets[0], model.ir_version, model.functions)
            net = convert(mini).eval()  # inference: batch norm with its running statistics, no dropout
            session, ref_feeds = _reference(mini, feeds, opsets, twins.get(node.output[0]), values, data)
            exact = _nearest(node)  # copies pixels: compared bit for bit, first on distinct values
            for draw in range(DRAWS):
                pick = _distinct if exact and draw == 0 else _draw
                feed = {name: pick(value, rng) if random else value for name, (value, random) in feeds.items()}
                want = session.run(None, {name: feed.get(name, value) for name, (value, _) in ref_feeds.items()})
                with torch.no_grad():
                    got = net(*[torch.from_numpy(np.array(feed[name])) for name in feeds])
                got = list(got) if isinstance(got, (tuple, list)) else [got]
                size = _difference(got, want, 0.0 if exact else rtol)
                if size is not None:
                    return f"onnx2torch translates {what} into something else (outputs differ by up to {size:.3g} on random inputs)"
            if compared is not None and node.output:
                compared.add(node.output[0])
        except Exception as exc:  # noqa: BLE001 - an op that cannot stand alone: unchecked, so not certified
            return f"the translation of {what} could not be checked on its own ({one_line(exc, 160)})"
    return None


def _reference(mini: onnx.ModelProto, feeds: dict, opsets: list, twin, values: dict, data: set):
    """onnxruntime's session for the node and its feeds: the cut-out itself at the first opset onnxruntime
    accepts or, where it accepts none (the opset converter left an attribute of the later op behind),
    the same node as the file writes it (same op and output), cut out of the file at its own opset."""
    try:
        return _session(mini, opsets), feeds
    except Exception:
        node = mini.graph.node[-1]
        if twin is None or twin[0].op_type != node.op_type:
            raise
        written, o_inits, o_constants = twin
        ref_mini, ref_feeds = _cut_out(written, o_inits, o_constants, values, data, opsets[-1], mini.ir_version)
        if any(random and name not in feeds for name, (_, random) in ref_feeds.items()):
            raise
        return _session(ref_mini, opsets[-1:]), ref_feeds


def _session(mini: onnx.ModelProto, opsets: list):
    """An onnxruntime session for the one-node model, at the first of `opsets` it accepts."""
    for k, opset in enumerate(opsets):
        del mini.opset_import[:]
        mini.opset_import.extend(opset)
        try:
            return ort_session(mini)
        except Exception:  # noqa: BLE001 - a node carried over from a later opset: try the file's own
            if k == len(opsets) - 1:
                raise
    raise AssertionError("no opset to try")  # pragma: no cover


def _intermediates(model: onnx.ModelProto, image: str, z: np.ndarray) -> dict[str, np.ndarray]:
    """Every value of the graph on input `z`, from onnxruntime with all node outputs exposed."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {o.name for o in exposed.graph.output}
    for node in exposed.graph.node:
        for out in node.output:
            if out and out not in known:
                exposed.graph.output.append(onnx.ValueInfoProto(name=out))
                known.add(out)
    session = ort_session(exposed)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, {image: z})))
    values[image] = z
    return values


def _cut_out(
    node: onnx.NodeProto, inits: dict, constants: dict, values: dict, data: set, opset: list, ir_version: int, functions=()
):
    """The one-node model and its feeds {input name: (real value, randomize?)}, in graph-input order.

    `functions`: the model's own ONNX functions, which define ops of custom domains (`onnx_torch_ops`).
    """
    nodes, initializers, inputs, feeds = [], [], [], {}
    for name in dict.fromkeys(n for n in node.input if n):
        if name in inits:
            initializers.append(inits[name])
        elif name in constants:
            nodes.append(constants[name])
        else:
            value = np.asarray(values[name])
            elem = helper.np_dtype_to_tensor_dtype(value.dtype)
            inputs.append(helper.make_tensor_value_info(name, elem, list(value.shape)))
            feeds[name] = (value, name in data and value.dtype.kind == "f")
    nodes.append(node)
    outputs = [onnx.ValueInfoProto(name=o) for o in node.output if o]
    graph = helper.make_graph(nodes, "node", inputs, outputs, initializer=initializers)
    mini = helper.make_model(graph, opset_imports=list(opset), ir_version=ir_version, functions=list(functions))
    return mini, feeds


def _draw(value: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random tensor of the same shape and dtype, spread like `value` (at least unit scale around it)."""
    scale = float(np.abs(value).max()) if value.size else 1.0
    scale = scale if np.isfinite(scale) and scale > 0 else 1.0
    return np.asarray(value + scale * rng.standard_normal(value.shape), dtype=value.dtype)  # 0-d stays an array


def _distinct(value: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A tensor of the same shape and dtype whose values are all distinct (a shuffled range; random
    draws beyond the integers the dtype holds exactly), spread like `_draw`'s."""
    exact_up_to = 2 ** (np.finfo(value.dtype).nmant + 1) if value.dtype.kind == "f" else 0
    if not 0 < value.size <= exact_up_to:
        return _draw(value, rng)
    return np.asarray(rng.permutation(value.size).reshape(value.shape) - value.size / 2, dtype=value.dtype)


def _difference(got: list, want: list, rtol: float) -> float | None:
    """The largest disagreement beyond rounding between torch's and onnxruntime's outputs, or None."""
    if len(got) < len(want):
        return float("inf")
    for g, w in zip(got, want):
        g = g.detach().cpu().numpy() if isinstance(g, torch.Tensor) else np.asarray(g)
        w = np.asarray(w)
        if g.shape != w.shape:
            return float("inf")
        if w.dtype.kind != "f":
            if not np.array_equal(g, w):
                return float("inf")
            continue
        g, w = g.astype(np.float64), w.astype(np.float64)
        finite = np.isfinite(w)
        scale = rtol * (np.abs(w[finite]).max() if finite.any() else 0.0) + ATOL
        with np.errstate(invalid="ignore"):  # inf - inf: equal infinities are caught by g == w
            gap = np.abs(g - w)
        bad = ~(gap <= scale) & ~((g == w) | (np.isnan(g) & np.isnan(w)))
        if bad.any():
            return float(np.nan_to_num(gap[bad], nan=np.inf).max())
    return None
