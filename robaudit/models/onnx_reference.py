"""An ONNX file run by ONNX's own semantics, to check onnx2torch's translation of it.

robaudit attacks and certifies the PyTorch module that onnx2torch builds from the file.
Where onnx2torch maps an op to a torch function that computes something else (Resize
with ONNX's default `half_pixel` / `round_prefer_floor` modes at a non-integer scale,
CumSum, ...), every number robaudit prints would be about another model than the user's
file. `OnnxReference` evaluates the untouched file with onnxruntime or, where that
cannot run the graph (opsets before 7, ops it lacks), with `onnx.reference` (ONNX's
executable specification, part of the onnx package); `wrap_model` compares it with the
translation on the first data samples and random inputs near them, and refuses the file
when they disagree (`wrapper._check_translation`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch

from robaudit.models.detect import one_line

FLOAT_RTOL = 1e-4
HALF_RTOL = 1e-2
_HALF = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_NUMPY_INPUT = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
}  # fmt: skip


class OnnxReference(torch.nn.Module):
    """The file's graph as a module (no gradients): numpy in, the graph's outputs out, in order.

    `hints` holds what onnx2torch warned about while translating (its own admissions of
    inexact conversions), for the error message when the two disagree. `translated` is the
    graph onnx2torch converted (the file after robaudit's exact in-memory rewrites) and
    `convert` that converter, for checking the translation node by node (`onnx_nodes`).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        hints: list[str],
        translated: onnx.ModelProto | None = None,
        convert: Callable[[onnx.ModelProto], torch.nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.hints = hints
        self.translated = translated
        self.convert = convert
        inits = {i.name for i in model.graph.initializer}
        first = next(i for i in model.graph.input if i.name not in inits)
        self.input_name = first.name
        self.dtype = _NUMPY_INPUT.get(first.type.tensor_type.elem_type, np.float32)
        dims = first.type.tensor_type.shape.dim
        # a batch size the file fixes (verification benchmarks fix 1): onnxruntime takes no other, so
        # `wrapper._check_translation` feeds it chunks of that size
        self.batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None
        # how far the translation's scores may stray, relative to the largest: float32 rounding, or
        # half-precision rounding where the graph holds or casts to float16 / bfloat16 anywhere
        self.rtol = HALF_RTOL if _has_half(model) else FLOAT_RTOL
        self._run = None
        self._engines = list(ENGINES)
        self.engine = ""  # the one that ran the graph

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, ...] | torch.Tensor:
        feed = {self.input_name: np.ascontiguousarray(z.detach().cpu().numpy().astype(self.dtype))}
        errors = []
        while self._engines:
            name, make = self._engines[0]
            try:
                if self._run is None:
                    self._run, self.engine = make(self.model), name
                outs = self._run(feed)
                break
            except Exception as exc:  # noqa: BLE001 - an op it does not implement, an odd graph, not installed
                errors.append(f"{name}: {one_line(exc, 120)}")
                self._run = None
                self._engines.pop(0)
        else:
            raise RuntimeError("; ".join(errors) or "no ONNX engine left")
        tensors = [torch.from_numpy(np.asarray(o, dtype=np.float64)) for o in outs if _numeric(o)]
        return tensors[0] if len(tensors) == 1 else tuple(tensors)


def ort_session(model: onnx.ModelProto, threads: int | None = None):
    """An onnxruntime CPU session that runs `model` as written (no graph optimizations, errors only logged)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: its warnings about old opsets are not the user's concern here
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _onnxruntime(model: onnx.ModelProto):
    session = ort_session(model, torch.get_num_threads())
    return lambda feed: session.run(None, feed)


def _onnx_reference(model: onnx.ModelProto):
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(model)
    return lambda feed: evaluator.run(None, feed)


# onnxruntime first (the standard ONNX runtime); onnx.reference (ONNX's executable specification, slower
# and with quirks of its own, e.g. BatchNormalization-9 run in training mode) where onnxruntime cannot run the graph
ENGINES = (("onnxruntime", _onnxruntime), ("onnx.reference", _onnx_reference))


def _has_half(model: onnx.ModelProto) -> bool:
    """Whether any tensor of the graph is float16 / bfloat16 (initializers, casts, declared values)."""
    g = model.graph
    if any(t.data_type in _HALF for t in g.initializer):
        return True
    if any(v.type.tensor_type.elem_type in _HALF for v in [*g.input, *g.output, *g.value_info]):
        return True
    for node in g.node:
        for attr in node.attribute:
            if (attr.name == "to" and attr.i in _HALF) or (attr.name == "value" and attr.t.data_type in _HALF):
                return True
    return False


def _numeric(value: object) -> bool:
    return isinstance(value, (np.ndarray, np.generic)) and np.asarray(value).dtype.kind in "fiub"
