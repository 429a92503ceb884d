"""ONNX ops that are affine or monotone piecewise linear, certified exactly, and their limits refused.

Hunt 24 found these refused although the bound handles each exactly: onnx2torch writes
an asymmetric Conv or MaxPool padding as an nn.Sequential (padding, then the layer), and
has modules of its own for Dropout (opset 12+), ReduceSum (opset 13+), Sum / Mean of
several inputs and PRelu. Each file is built here with onnx.helper, loaded the way a
user's file is (`load_model` + `wrap_model`), certified, and every radius attacked and
probed by the property test's `check_net`: no input inside a radius may change the class.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from random_nets import RandomNet
from robaudit.certify import CertificateUnavailable, certify_l2
from robaudit.errors import RobauditError
from robaudit.models import load_model, wrap_model
from test_certify_property import assert_radii_survive

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (2, 6, 6)  # per-sample input shape of every file here
CLASSES = 4


class _Graph:
    """Collects nodes and seeded random initializers of a small ONNX classifier."""

    def __init__(self, seed: int) -> None:
        self.gen = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def ints(self, name: str, value: list[int] | np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], scale: float = 0.5) -> str:
        return self.const(name, self.gen.normal(0.0, scale, shape))

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def conv(self, x: str, out: str, channels: int, **attrs) -> str:
        return self.node("Conv", [x, self.weight(f"{out}_w", (channels, 2, 3, 3)), self.weight(f"{out}_b", (channels,), 0.1)], out, **attrs)

    def head(self, x: str, features: int) -> str:
        """Flatten, then a Gemm to the class scores 'y'."""
        flat = self.node("Flatten", [x], "flat")
        return self.node("Gemm", [flat, self.weight("head_w", (CLASSES, features), 0.3), self.weight("head_b", (CLASSES,), 0.1)], "y", transB=1)

    def save(self, path: Path, opset: int = 17) -> Path:
        graph = helper.make_graph(
            self.nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *SHAPE])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CLASSES])], initializer=self.inits,
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
        return path


def conv_asymmetric_pads(path: Path) -> Path:
    g = _Graph(0)
    h = g.node("Relu", [g.conv("x", "c", 3, pads=[0, 1, 1, 0], strides=[2, 1])], "r")  # 3 x 3 x 5
    g.head(h, 3 * 3 * 5)
    return g.save(path)


def maxpool_asymmetric_pads(path: Path) -> Path:
    g = _Graph(1)
    c = g.conv("x", "c", 3, pads=[1, 1, 1, 1])
    p = g.node("MaxPool", [c], "p", kernel_shape=[2, 3], strides=[2, 2], pads=[1, 0, 0, 1])  # 3 x 3 x 3
    g.head(p, 3 * 3 * 3)
    return g.save(path)


def maxpool_ceil_asymmetric_pads(path: Path) -> Path:
    g = _Graph(2)
    c = g.node("Relu", [g.conv("x", "c", 2, pads=[1, 1, 1, 1])], "r")
    # 7 x 7 padded: ceil mode adds a window starting at the last row / column (torch ignores its overhang)
    p = g.node("MaxPool", [c], "p", kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 0, 0], ceil_mode=1)  # 2 x 4 x 4
    g.head(p, 2 * 4 * 4)
    return g.save(path)


def dropout_sum_mean(path: Path) -> Path:
    """Dropout (opset 13, the identity at inference), Sum of three tensors, Mean of two, ReduceSum (opset 13)."""
    g = _Graph(3)
    a = g.conv("x", "a", 3, pads=[1, 1, 1, 1])
    b = g.node("Relu", [g.conv("x", "b", 3, pads=[1, 1, 1, 1])], "rb")
    c = g.node("Sigmoid", [g.conv("x", "c", 3, pads=[1, 1, 1, 1])], "sc")
    d = g.node("Dropout", [g.node("Sum", [a, b, c], "s")], "d")
    m = g.node("Mean", [d, g.node("Relu", [a], "ra")], "m")
    r = g.node("ReduceSum", [m, g.ints("axes", [3])], "rs", keepdims=0)  # 3 x 6
    g.head(r, 3 * 6)
    return g.save(path)


def prelu_per_channel(path: Path, slopes: list[float]) -> Path:
    g = _Graph(4)
    c = g.conv("x", "c", 3, pads=[1, 1, 1, 1])
    p = g.node("PRelu", [c, g.const("slope", np.array(slopes).reshape(3, 1, 1))], "p")
    g.head(p, 3 * 6 * 6)
    return g.save(path)


def smooth_activations(path: Path) -> Path:
    """Elu (alpha 0.4), Celu (alpha 1.5, opset 12+) and HardSigmoid with its own alpha and beta, a negative
    alpha too (clamp(alpha x + beta, 0, 1) is a scale and a clamp whatever the sign)."""
    g = _Graph(9)
    e = g.node("Elu", [g.conv("x", "a", 3, pads=[1, 1, 1, 1])], "e", alpha=0.4)
    c = g.node("Celu", [g.conv("x", "b", 3, pads=[1, 1, 1, 1])], "ce", alpha=1.5)
    h = g.node("HardSigmoid", [g.node("Add", [e, c], "s")], "h", alpha=0.7, beta=0.4)
    n = g.node("HardSigmoid", [e], "hn", alpha=-0.3, beta=0.6)
    g.head(g.node("Concat", [h, n], "cat", axis=1), 6 * 6 * 6)
    return g.save(path)


def gather_elements(path: Path) -> Path:
    """GatherElements with constant indices, as both torch exporters write `torch.gather`: data movement."""
    g = _Graph(10)
    c = g.node("Relu", [g.conv("x", "c", 3, pads=[1, 1, 1, 1])], "r")  # 3 x 6 x 6
    index = g.gen.integers(0, 6, (1, 3, 4, 6))  # torch.gather takes no negative index, nor does onnx2torch
    batch = g.node("Slice", [g.node("Shape", [c], "shape"), g.ints("zero", [0]), g.ints("one", [1])], "batch")
    size = g.node("Concat", [batch, g.ints("rest", [3, 4, 6])], "size", axis=0)
    every = g.node("Expand", [g.ints("index", index), size], "every")  # the index repeated over the batch
    picked = g.node("GatherElements", [c, every], "g", axis=2)
    g.head(picked, 3 * 4 * 6)
    return g.save(path)


def constant_nodes(path: Path) -> Path:
    """Weights in Constant nodes, as verification benchmarks store them: a Conv, a BatchNormalization and the
    Gemm head read their parameters from Constant nodes (value tensors and value_floats), which onnx2torch
    takes only as initializers (the Conv file was refused at load, the batch norm had no certificate)."""
    g = _Graph(11)
    c = g.conv("x", "c", 3, pads=[1, 1, 1, 1])
    stats = {"scale": g.gen.uniform(0.5, 1.5, 3), "bias": g.gen.normal(0.0, 0.1, 3), "mean": g.gen.normal(0.0, 0.1, 3),
             "var": g.gen.uniform(0.5, 1.5, 3)}  # fmt: skip
    names = [g.node("Constant", [], f"bn_{k}", value_floats=[float(v) for v in stats[k]]) for k in stats]
    b = g.node("Relu", [g.node("BatchNormalization", [c, *names], "bn")], "r")
    g.head(b, 3 * 6 * 6)
    for init in list(g.inits):  # every initializer written as a Constant node instead
        g.nodes.insert(0, helper.make_node("Constant", [], [init.name], value=init))
    del g.inits[:]
    return g.save(path)


def clip_constant_bounds(path: Path) -> Path:
    """Clip with bounds from Constant nodes and an absent one (''), as torch's TorchScript-based exporter
    writes `torch.clamp(x, min=...)` and `torch.clamp(x, max=...)` (hunt 27: onnx2torch refused the file)."""
    g = _Graph(11)
    low = g.node("Constant", [], "low", value=numpy_helper.from_array(np.array(-0.2, dtype=np.float32)))
    high = g.node("Constant", [], "high", value=numpy_helper.from_array(np.array(0.3, dtype=np.float32)))
    a = g.node("Clip", [g.conv("x", "a", 3, pads=[1, 1, 1, 1]), low, ""], "ca")
    b = g.node("Clip", [g.conv("x", "b", 3, pads=[1, 1, 1, 1]), "", high], "cb")
    g.head(g.node("Add", [a, b], "s"), 3 * 6 * 6)
    return g.save(path)


FLT_MAX = float(np.finfo(np.float32).max)


def clip_float32_range(path: Path, absent: float | None = FLT_MAX) -> Path:
    """Clip whose absent bound is written as the float32 range (-FLT_MAX / FLT_MAX, as some converters
    do; attributes at opset 6 default to it), or left out when `absent` is None."""
    g = _Graph(11)
    side = (lambda name, sign: "" if absent is None else g.const(name, np.array(sign * absent)))
    a = g.node("Clip", [g.conv("x", "a", 3, pads=[1, 1, 1, 1]), g.const("zero", np.array(0.0)), side("top", 1)], "ca")
    b = g.node("Clip", [g.conv("x", "b", 3, pads=[1, 1, 1, 1]), side("bottom", -1), g.const("cap", np.array(0.3))], "cb")
    c = g.node("Clip", [g.conv("x", "c", 3, pads=[1, 1, 1, 1]), side("low", -1), side("high", 1)], "cc")
    g.head(g.node("Sum", [a, b, c], "s"), 3 * 6 * 6)
    return g.save(path)


def max_min(path: Path) -> Path:
    """ONNX Max of three inputs (two input-dependent, one constant) and Min of two input-dependent ones."""
    g = _Graph(12)
    a = g.conv("x", "a", 3, pads=[1, 1, 1, 1])
    b = g.conv("x", "b", 3, pads=[1, 1, 1, 1])
    m = g.node("Max", [a, b, g.const("floor", np.full((3, 1, 1), -0.1))], "m")
    g.head(g.node("Min", [m, g.node("Mul", [a, g.const("k", np.array(0.5))], "half")], "n"), 3 * 6 * 6)
    return g.save(path)


def reduce_max_min(path: Path, opset: int = 17) -> Path:
    """ReduceMax over the image (global max pooling, as torch's exporters write AdaptiveMaxPool2d(1) and amax)
    and ReduceMin over its rows (axes an attribute before opset 18, an input from it)."""
    g = _Graph(13)
    a = g.node("Relu", [g.conv("x", "a", 3, pads=[1, 1, 1, 1])], "ra")
    if opset >= 18:
        top = g.node("ReduceMax", [a, g.ints("axes_max", [2, 3])], "top", keepdims=1)  # 3 x 1 x 1
        low = g.node("ReduceMin", [g.conv("x", "b", 3, pads=[1, 1, 1, 1]), g.ints("axes_min", [-1])], "low", keepdims=0)
    else:
        top = g.node("ReduceMax", [a], "top", axes=[2, 3], keepdims=1)
        low = g.node("ReduceMin", [g.conv("x", "b", 3, pads=[1, 1, 1, 1])], "low", axes=[-1], keepdims=0)  # 3 x 6
    flat = g.node("Concat", [g.node("Flatten", [top], "ft"), g.node("Flatten", [low], "fl")], "cat", axis=1)
    weight, bias = g.weight("head_w", (CLASSES, 3 + 18), 0.3), g.weight("head_b", (CLASSES,), 0.1)
    g.node("Gemm", [flat, weight, bias], "y", transB=1)
    return g.save(path, opset)


def abs_values(path: Path) -> Path:
    """Abs of a conv (onnx2torch's OnnxFunction of torch.abs): |x| = relu(x) + relu(-x), exact."""
    g = _Graph(14)
    g.head(g.node("Abs", [g.conv("x", "c", 3, pads=[1, 1, 1, 1])], "a"), 3 * 6 * 6)
    return g.save(path)


FILES = {
    "abs": abs_values,
    "reduce-max-min": reduce_max_min,
    "reduce-max-min-opset18": lambda path: reduce_max_min(path, 18),
    "conv-asymmetric-pads": conv_asymmetric_pads,
    "maxpool-asymmetric-pads": maxpool_asymmetric_pads,
    "maxpool-ceil-asymmetric-pads": maxpool_ceil_asymmetric_pads,
    "dropout-sum-mean-reducesum": dropout_sum_mean,
    "prelu-per-channel": lambda path: prelu_per_channel(path, [0.1, 0.0, 1.5]),
    "elu-celu-hardsigmoid": smooth_activations,
    "clip-constant-bounds": clip_constant_bounds,
    "max-min": max_min,
    "clip-float32-range": clip_float32_range,
    "gather-elements": gather_elements,
    "constant-nodes": constant_nodes,
}


def _load(path: Path):
    gen = torch.Generator().manual_seed(0)
    raw = load_model(path)
    model, _ = wrap_model(raw, sample_shape=SHAPE, probe=torch.rand((4, *SHAPE), generator=gen))
    return raw, model


@pytest.mark.parametrize("case", list(FILES))
def test_onnx_ops_are_certified_and_no_attack_breaks_the_radii(case: str, tmp_path) -> None:
    raw, model = _load(FILES[case](tmp_path / f"{case}.onnx"))
    assert_radii_survive(RandomNet(-1, model, SHAPE, CLASSES, f"{case} (ONNX file)", copy.deepcopy(raw.net).double()))


def _refusal(path: Path) -> str:
    _, model = _load(path)
    x = torch.rand((4, *SHAPE), generator=torch.Generator().manual_seed(1))
    with pytest.raises(CertificateUnavailable) as info:
        certify_l2(model, x, model(x).argmax(1), budget="fast")
    return str(info.value)


def test_a_clip_bound_at_the_float32_range_certifies_as_an_absent_bound(tmp_path) -> None:
    """Clip(x, 0, FLT_MAX) clips no float32 value. It got radius 0 everywhere (the ReLU at FLT_MAX made
    every ball look like a float32 overflow), and Clip(x, -FLT_MAX, c) was refused (written as ReLUs,
    x - (-FLT_MAX) rounds x away in float64): both now bound exactly as the Clip without that bound."""
    x = torch.rand((12, *SHAPE), generator=torch.Generator().manual_seed(5))
    radii = []
    for absent in (FLT_MAX, None):
        _, model = _load(clip_float32_range(tmp_path / f"clip-{absent}.onnx", absent))
        cert = certify_l2(model, x, model(x).argmax(1), budget="fast")
        radii.append(cert.radius)
    assert (radii[0] > 0).sum() >= 8, radii[0]
    torch.testing.assert_close(radii[0], radii[1], rtol=0, atol=0)


def test_prelu_with_a_negative_slope_is_refused_as_non_monotone(tmp_path) -> None:
    message = _refusal(prelu_per_channel(tmp_path / "prelu.onnx", [0.1, -0.3, 1.5]))
    assert "PRelu" in message and "negative slope" in message, message


@pytest.mark.parametrize("op, attrs", [("Selu", {}), ("Elu", {"alpha": 2.0})])
def test_an_elu_whose_slope_drops_at_zero_is_refused_as_not_convex(op: str, attrs: dict, tmp_path) -> None:
    g = _Graph(10)
    g.head(g.node(op, [g.conv("x", "c", 3, pads=[1, 1, 1, 1])], "a", **attrs), 3 * 6 * 6)
    message = _refusal(g.save(tmp_path / f"{op}.onnx"))
    assert "SELU" in message or "ELU with alpha 2" in message, message


@pytest.mark.parametrize("op, function", [("Sign", "torch.sign"), ("Sin", "torch.sin"), ("Exp", "torch.exp")])
def test_an_elementwise_function_is_refused_naming_it_whatever_the_node_is_called(op: str, function: str, tmp_path) -> None:
    """onnx2torch runs Sign, Sin, Exp, ... through one class, OnnxFunction: a refusal naming that class
    alone told nothing where a file's node names do not name their op (node_7)."""
    g = _Graph(6)
    g.head(g.node(op, [g.conv("x", "c", 3, pads=[1, 1, 1, 1])], "a"), 3 * 6 * 6)
    g.nodes[1].name = "node_7"
    message = _refusal(g.save(tmp_path / f"{op}.onnx"))
    assert f"node_7: OnnxFunction ({function})" in message, message


def test_a_product_of_two_input_dependent_tensors_is_refused_saying_why(tmp_path) -> None:
    """Attention's query-key MatMul (two operands that both depend on the input) was refused as
    `MatMul: OnnxMatMul` alone (red team 68, VNN-COMP 2023 ViTs), which did not say what is wrong with it."""
    g = _Graph(11)
    c = g.conv("x", "c", 2, pads=[1, 1, 1, 1])  # (N, 2, 6, 6)
    t = g.node("Transpose", [c], "t", perm=[0, 1, 3, 2])
    scores = g.node("MatMul", [c, t], "qk")  # (N, 2, 6, 6): bilinear in the input
    g.head(scores, 2 * 6 * 6)
    message = _refusal(g.save(tmp_path / "qk.onnx"))
    assert "OnnxMatMul: a product of two input-dependent tensors" in message, message


def test_dilated_max_pool_after_minus_inf_padding_is_refused(tmp_path) -> None:
    """A dilated window can skip the edge cell, so edge copies could change its maximum: refused, not rewritten."""
    g = _Graph(5)
    c = g.conv("x", "c", 2, pads=[1, 1, 1, 1])
    p = g.node("MaxPool", [c], "p", kernel_shape=[2, 2], strides=[1, 1], pads=[1, 0, 0, 1], dilations=[2, 2])
    g.head(p, 2 * 5 * 5)
    message = _refusal(g.save(tmp_path / "dilated.onnx"))
    assert "MaxPool" in message and "dilated" in message, message


def _assert_computes_like_onnxruntime(path: Path, net: torch.nn.Module) -> None:
    """The loaded module's scores equal onnxruntime's run of the file on random inputs."""
    import onnxruntime

    x = torch.rand((16, *SHAPE), generator=torch.Generator().manual_seed(3))
    want = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(net(x), torch.from_numpy(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
def test_auto_pad_same_is_written_as_the_explicit_pads_onnxruntime_uses(mode: str, tmp_path) -> None:
    """onnx2torch refuses auto_pad SAME_* (torch's exporter writes SAME_UPPER for padding="same"): the loader
    writes the pads out (odd totals: stride 2 and even kernels), matching onnxruntime, and the file certifies."""
    g = _Graph(6)
    w = g.weight("c_w", (3, 2, 2, 4))
    c = g.node("Conv", ["x", w], "c", auto_pad=mode, strides=[2, 1])  # 3 x 3 x 6, pads odd in both dims
    p = g.node("MaxPool", [g.node("Relu", [c], "r")], "p", kernel_shape=[2, 2], strides=[2, 2], auto_pad=mode)
    # 3 x 2 x 3; then even totals (onnx2torch has no AveragePool with one side padded more)
    a = g.node("AveragePool", [p], "a", kernel_shape=[3, 3], auto_pad=mode)
    g.head(a, 3 * 2 * 3)
    path = g.save(tmp_path / f"{mode}.onnx")
    raw, model = _load(path)
    assert any("auto_pad" in note for note in raw.notes), raw.notes
    _assert_computes_like_onnxruntime(path, raw.net)
    x = torch.rand((16, *SHAPE), generator=torch.Generator().manual_seed(3))
    cert = certify_l2(model, x, model(x).argmax(1), budget="fast")
    assert (cert.radius > 0).all()


def test_a_strided_same_conv_on_a_free_image_size_is_refused_saying_what_to_fix(tmp_path) -> None:
    """Its pads depend on the image size the file leaves free: the error quoted onnx2torch's bare
    `"SAME_UPPER" auto_pad is not implemented` (red team 72); it now says why and what to change."""
    g = _Graph(6)
    g.head(g.node("Conv", ["x", g.weight("c_w", (3, 2, 3, 3))], "c", auto_pad="SAME_UPPER", strides=[2, 2]), 3 * 3 * 3)
    path = g.save(tmp_path / "same_free.onnx")
    model = onnx.load(str(path))
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], ("H", "W")):
        dim.dim_param = name
    onnx.save(model, str(path))
    with pytest.raises(RobauditError, match="auto_pad SAME_UPPER/SAME_LOWER on an input whose height or width the file leaves free"):
        load_model(path)


@pytest.mark.parametrize(
    "attrs",
    [
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},  # 12 x 12: total 1 (odd) per dim
        {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
        {"output_shape": [11, 12], "strides": [2, 2]},  # totals 2 and 1: pads (1, 1) and (1, 0)
        {"output_shape": [10, 11], "strides": [2, 2], "auto_pad": "SAME_UPPER", "dilations": [1, 2]},
    ],
    ids=["same-upper", "same-lower", "output-shape", "output-shape-upper-dilated"],
)
def test_conv_transpose_output_shape_and_auto_pad_are_written_as_explicit_pads(attrs: dict, tmp_path) -> None:
    """onnx2torch ignores ConvTranspose's output_shape (the layer computed another size: the translation check
    refused the file) and refuses auto_pad SAME_*: the loader writes both as symmetric pads plus a crop, matching
    onnxruntime, and the file certifies with radii no attack breaks."""
    g = _Graph(9)
    t = g.node("ConvTranspose", ["x", g.weight("t_w", (2, 2, 3, 3))], "t", **attrs)
    out = attrs.get("output_shape", [12, 12])
    g.head(g.node("Relu", [t], "r"), 2 * out[0] * out[1])
    path = g.save(tmp_path / "convt.onnx")
    raw, model = _load(path)
    assert any("ConvTranspose" in note for note in raw.notes), raw.notes
    _assert_computes_like_onnxruntime(path, raw.net)
    assert_radii_survive(RandomNet(-1, model, SHAPE, CLASSES, "ConvTranspose (ONNX file)", copy.deepcopy(raw.net).double()))


@pytest.mark.parametrize("axes", [None, [3, -2]], ids=["all-axes", "axes-input"])
def test_wrap_pad_is_written_as_slices_and_concats(axes: list[int] | None, tmp_path) -> None:
    """Circular padding from torch's dynamo exporter is Pad(mode='wrap') at opset 19, which onnx2torch lacks (the
    file was refused): the loader writes it as slices and concatenations, matching onnxruntime, and the file
    certifies with radii no attack breaks."""
    g = _Graph(11)
    if axes is None:
        pads = g.ints("pads", [0, 0, 1, 2, 0, 0, 2, 1])
        padded = g.node("Pad", ["x", pads], "padded", mode="wrap")
    else:  # width (axis 3) by 2 then 1, height (axis -2) by 1 then 2
        padded = g.node("Pad", ["x", g.ints("pads", [2, 1, 1, 2]), "", g.ints("axes", axes)], "padded", mode="wrap")
    c = g.node("Relu", [g.conv(padded, "c", 3)], "r")  # 3 x 7 x 7
    g.head(c, 3 * 7 * 7)
    path = g.save(tmp_path / "wrap.onnx", opset=19)
    raw, model = _load(path)
    assert any("wrap" in note for note in raw.notes), raw.notes
    _assert_computes_like_onnxruntime(path, raw.net)
    assert_radii_survive(RandomNet(-1, model, SHAPE, CLASSES, "wrap Pad (ONNX file)", copy.deepcopy(raw.net).double()))


class _SoftplusNet(torch.nn.Module):
    """Two softplus layers (beta 1 and 2): torch's dynamo exporter writes each as Where(Greater, x, Softplus / beta)."""

    def __init__(self, threshold: float = 20.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(12)
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.fc = torch.nn.Linear(3 * 6 * 6, CLASSES)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.act1, self.act2 = torch.nn.Softplus(), torch.nn.Softplus(beta=2.0, threshold=threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(self.act1(self.conv(x)).flatten(1))
        return z * 0.5 + self.act2(z)


def _dynamo_export(net: torch.nn.Module, path: Path) -> Path:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        torch.onnx.export(net.eval(), (torch.zeros(2, *SHAPE),), str(path), dynamo=True, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))  # fmt: skip
    return path


def test_softplus_from_the_dynamo_exporter_is_read_as_torch_softplus(tmp_path) -> None:
    """torch's default exporter writes softplus as Where(Greater(x beta, threshold), x, Softplus(x beta) / beta),
    whose input-dependent mask the certificate refused: the loader reads the pattern as one softplus, checked
    node by node against onnxruntime, and the file gets the radii of the torch module, which no attack breaks."""
    net = _SoftplusNet()
    path = _dynamo_export(net, tmp_path / "softplus.onnx")
    assert sum(n.op_type == "Where" for n in onnx.load(str(path)).graph.node) == 2, "the exporter's pattern changed"
    raw, model = _load(path)
    assert any("softplus" in note for note in raw.notes), raw.notes
    assert model.inexact is None, model.inexact
    x = torch.rand((8, *SHAPE), generator=torch.Generator().manual_seed(4))
    y = net(x).argmax(1)
    from_file = certify_l2(model, x, y, budget="fast")
    from_module = certify_l2(net, x, y, budget="fast")
    assert (from_module.radius > 0).all()
    torch.testing.assert_close(from_file.radius, from_module.radius, rtol=1e-6, atol=0.0)
    assert_radii_survive(RandomNet(-1, model, SHAPE, CLASSES, "softplus (dynamo ONNX file)", copy.deepcopy(raw.net).double()))


class _ShrinkNet(torch.nn.Module):
    """A conv, then `act`, then a linear head: the dynamo exporter writes Softshrink and Threshold as a Where."""

    def __init__(self, act: torch.nn.Module) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(15)
        self.conv, self.act, self.fc = torch.nn.Conv2d(2, 3, 3, padding=1), act, torch.nn.Linear(3 * 6 * 6, CLASSES)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).flatten(1))


@pytest.mark.parametrize("act", [torch.nn.Softshrink(0.2), torch.nn.Threshold(0.1, 0.1)], ids=["softshrink", "threshold"])
def test_softshrink_and_threshold_from_the_dynamo_exporter_get_the_modules_radii(act, tmp_path) -> None:
    """Softshrink (Where(Greater(Abs(x), l), x - Sign(x) l, x 0)) and Threshold (Where(LessOrEqual(x, t), v, x))
    were refused at the Where's mask: read as the torch op, their radii are the module's, and no attack breaks them."""
    net = _ShrinkNet(act).eval()
    raw, model = _load(_dynamo_export(net, tmp_path / "shrink.onnx"))
    assert model.inexact is None and any("a Where of a comparison" in note for note in raw.notes), raw.notes
    x = torch.rand((8, *SHAPE), generator=torch.Generator().manual_seed(4))
    y = net(x).argmax(1)
    torch.testing.assert_close(certify_l2(model, x, y, budget="fast").radius, certify_l2(net, x, y, budget="fast").radius,
                               rtol=1e-6, atol=0.0)  # fmt: skip
    assert_radii_survive(RandomNet(-1, model, SHAPE, CLASSES, "shrink (dynamo ONNX file)", copy.deepcopy(raw.net).double()))


def test_a_threshold_that_jumps_is_refused_from_the_file_by_name(tmp_path) -> None:
    message = _refusal(_dynamo_export(_ShrinkNet(torch.nn.Threshold(0.1, -1.0)), tmp_path / "jump.onnx"))
    assert "Threshold" in message, message


def test_softplus_with_a_low_threshold_is_refused_from_the_file_as_from_the_module(tmp_path) -> None:
    """A threshold of 5 switches to x far from the smooth curve: refused for the module, so for the file too."""
    message = _refusal(_dynamo_export(_SoftplusNet(threshold=5.0), tmp_path / "softplus5.onnx"))
    assert "threshold 5" in message, message


class _ChannelLast(torch.nn.Module):
    """A (C, H, W) net behind TensorFlow's layout: it takes (H, W, C) images, as tf2onnx files do."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2))


def test_a_channel_last_file_gets_its_samples_permuted_and_the_radii_of_its_channel_first_twin(tmp_path) -> None:
    """A file taking (H, W, C) images was refused ("a reshape would scramble"): the samples are now permuted into
    that layout, which moves values and changes no distance, so the file's radii are those of the same network
    taking (C, H, W) images, and no attack breaks them."""
    gen = torch.Generator().manual_seed(13)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, stride=2), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 2 * 2, CLASSES),
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.6)
    path = tmp_path / "nhwc.onnx"
    torch.onnx.export(_ChannelLast(net).eval(), (torch.zeros(1, 6, 6, 2),), str(path), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})  # fmt: skip
    raw, model = _load(path)
    assert raw.input_shape == (6, 6, 2) and model.channels_last
    x = torch.rand((8, *SHAPE), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)
    y = net(x).argmax(1)
    from_file, from_net = certify_l2(model, x, y, budget="fast"), certify_l2(net, x, y, budget="fast")
    assert (from_net.radius > 0).all()
    torch.testing.assert_close(from_file.radius, from_net.radius, rtol=1e-6, atol=0.0)
    assert_radii_survive(RandomNet(-1, model, SHAPE, CLASSES, "channel-last ONNX file", copy.deepcopy(net).double()))


def test_same_padding_of_a_graph_of_any_image_size_is_written_out_at_stride_one(tmp_path) -> None:
    """tf2onnx writes Keras' padding="same" as auto_pad SAME_UPPER, and a Keras input of free height and width
    leaves the sizes unknown, so the rewrite left the file for onnx2torch to refuse. At stride 1 the pads are
    (k - 1) dilation whatever the size: written out, matching onnxruntime; a stride of 2 on a free size stays
    refused."""
    def graph(path: Path, stride: int) -> Path:
        g = _Graph(14)
        c = g.node("Conv", ["x", g.weight("c_w", (3, 2, 4, 3))], "c", auto_pad="SAME_UPPER", strides=[stride, stride])
        p = g.node("MaxPool", [g.node("Relu", [c], "r")], "p", kernel_shape=[2, 2], auto_pad="SAME_LOWER")
        g.node("GlobalAveragePool", [p], "gap")
        g.head("gap", 3)
        graph = helper.make_graph(
            g.nodes, "free", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, "H", "W"])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CLASSES])], initializer=g.inits,
        )  # fmt: skip
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        return path

    path = graph(tmp_path / "free.onnx", 1)
    raw, model = _load(path)
    assert raw.input_shape is None and any("auto_pad" in note for note in raw.notes), raw.notes
    _assert_computes_like_onnxruntime(path, raw.net)
    assert_radii_survive(RandomNet(-1, model, SHAPE, CLASSES, "SAME padding, free size", copy.deepcopy(raw.net).double()))
    with pytest.raises(RobauditError, match="auto_pad"):
        load_model(graph(tmp_path / "free_stride2.onnx", 2))


def test_global_max_pool_is_read_as_a_max_pool_over_the_image(tmp_path) -> None:
    """onnx2torch has no GlobalMaxPool: the loader writes it as a MaxPool with the image as its one window,
    matching onnxruntime, and the file certifies with radii no attack breaks."""
    g = _Graph(7)
    c = g.node("Relu", [g.conv("x", "c", 3, pads=[1, 1, 1, 1])], "r")
    p = g.node("GlobalMaxPool", [c], "p")
    g.head(p, 3)
    path = g.save(tmp_path / "gmp.onnx")
    raw, model = _load(path)
    assert any("GlobalMaxPool" in note for note in raw.notes), raw.notes
    _assert_computes_like_onnxruntime(path, raw.net)
    assert_radii_survive(RandomNet(-1, model, SHAPE, CLASSES, "GlobalMaxPool (ONNX file)", copy.deepcopy(raw.net).double()))


def test_dropout_with_training_mode_set_gets_no_certificate(tmp_path) -> None:
    """Hunt 25: Dropout-13 with a constant training_mode=True drops units in the file's own run (onnxruntime
    without graph optimizations), while onnx2torch ignores the flag; the loader noted the graph as randomized
    but the certificate still treated the dropout as the identity."""
    g = _Graph(8)
    r = g.node("Relu", [g.conv("x", "c", 3, pads=[1, 1, 1, 1])], "r")
    g.const("ratio", np.array(0.5))
    g.inits.append(numpy_helper.from_array(np.array(True), "training_mode"))
    d = g.node("Dropout", [r, "ratio", "training_mode"], "d")
    g.head(d, 3 * 6 * 6)
    message = _refusal(g.save(tmp_path / "dropout_training.onnx"))
    assert "randomized" in message, message


def test_a_file_whose_runtime_returns_no_scores_is_a_clear_error(tmp_path) -> None:
    """Hunt 25: a dilated MaxPool with auto_pad SAME_LOWER on a 1x2 image, where onnxruntime returns an empty
    output and the translation two scores: a one-line error naming both shapes, not an IndexError."""
    from robaudit.errors import RobauditError

    nodes = [
        helper.make_node("MaxPool", ["x"], ["p"], auto_pad="SAME_LOWER", dilations=[2, 2], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["y"]),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "empty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None])],
    )  # fmt: skip
    path = tmp_path / "empty.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    raw = load_model(path)
    with pytest.raises(RobauditError, match=r"shape \(\d+, 2\), onnxruntime's \(\d+, 0\)"):
        wrap_model(raw, sample_shape=(2, 1, 2), probe=torch.rand((4, 2, 1, 2)))


def _reserved_domain_file(path: Path, domain: str, op: str, opset: int) -> Path:
    """A classifier whose hidden activation is the file's own `domain::op`: ReLU plus 20 on 0.3 < x < 0.3001.

    robaudit writes its own rewrites in that domain, and would read the node as its op
    (a plain ReLU), not by the body the file gives it, which onnxruntime runs.
    """
    g = _Graph(11)
    hidden = g.node("Gemm", [g.node("Flatten", ["x"], "flat0"), g.weight("w0", (8, 72)), g.weight("b0", (8,), 0.1)], "h", transB=1)
    g.nodes.append(helper.make_node(op, [hidden], ["a"], domain=domain))
    g.node("Gemm", ["a", g.weight("w1", (CLASSES, 8)), g.weight("b1", (CLASSES,), 0.1)], "y", transB=1)
    scalar = lambda name, v: helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [v]))  # noqa: E731
    body = [
        helper.make_node("Relu", ["x"], ["plain"]), scalar("lo", 0.3), scalar("hi", 0.3001), scalar("bump", 20.0),
        helper.make_node("Greater", ["x", "lo"], ["above"]), helper.make_node("Less", ["x", "hi"], ["below"]),
        helper.make_node("And", ["above", "below"], ["band"]), helper.make_node("Add", ["plain", "bump"], ["bumped"]),
        helper.make_node("Where", ["band", "bumped", "plain"], ["y"]),
    ]  # fmt: skip
    graph = helper.make_graph(
        g.nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *SHAPE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CLASSES])], initializer=g.inits,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(domain, 1)],
        functions=[helper.make_function(domain, op, ["x"], ["y"], body, [helper.make_opsetid("", opset)])],
    )  # fmt: skip
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("domain", "op", "opset"),
    [("robaudit_torch", "Threshold", 17), ("robaudit.unchanged", "Relu", 19)],  # 19: converted to 17 when loaded
)
def test_a_file_that_uses_a_domain_robaudit_writes_its_rewrites_in_is_refused(domain, op, opset, tmp_path) -> None:
    """Read as robaudit's own op, the file's node was certified as a plain ReLU while its band broke every radius."""
    path = _reserved_domain_file(tmp_path / "reserved.onnx", domain, op, opset)
    with pytest.raises(RobauditError, match=f"operator domain '{domain}', which robaudit reserves"):
        load_model(path)


def test_a_max_over_every_axis_is_checked_node_by_node_and_refused_saying_why(tmp_path) -> None:
    """ReduceMax over every axis gives a 0-d value; its node check drew a numpy scalar for it, which
    onnxruntime rejects, so the refusal quoted `Unable to handle object of type <class 'numpy.float32'>`
    (red team 72). The node is now checked like any other and the refusal names the batch axis."""
    from onnx2torch import convert

    from robaudit.models.onnx_nodes import check_nodes

    g = _Graph(12)
    top = g.node("ReduceMax", [g.conv("x", "c", 3, pads=[1, 1, 1, 1])], "m", keepdims=0)  # 0-d
    g.head(g.node("Relu", [g.node("Sub", [g.conv("x", "d", 3, pads=[1, 1, 1, 1]), top], "s")], "r"), 3 * 6 * 6)
    path = g.save(tmp_path / "max_all.onnx", opset=13)
    z = np.random.default_rng(0).random((1, *SHAPE), dtype=np.float32)
    assert check_nodes(onnx.load(str(path)), z, convert) is None
    message = _refusal(path)
    assert "ReduceMax over every axis, the batch axis included" in message, message


def test_weights_listed_as_graph_inputs_are_named_in_a_note(tmp_path) -> None:
    """A file may list initializers as graph inputs too (IR < 4 files list every weight so), which an
    onnxruntime caller can override: the scan audits the file's values, and now says so (red team 72)."""
    g = _Graph(13)
    g.head(g.node("Relu", [g.conv("x", "c", 3, pads=[1, 1, 1, 1])], "r"), 3 * 6 * 6)
    path = g.save(tmp_path / "weights_as_inputs.onnx")
    model = onnx.load(str(path))
    model.graph.input.append(helper.make_tensor_value_info("c_w", TensorProto.FLOAT, [3, 2, 3, 3]))
    onnx.save(model, str(path))
    raw = load_model(path)
    assert any(n.startswith("the ONNX file lists 1 initializer(s) as graph inputs too (c_w)") for n in raw.notes), raw.notes
    assert not any("graph inputs too" in n for n in load_model(g.save(tmp_path / "plain.onnx")).notes)


def test_an_output_that_states_no_shape_is_read_with_the_inferred_one(tmp_path) -> None:
    """onnx's checker refuses a graph output with a tensor type but no shape, which onnxruntime runs (red
    team 72: `Field 'shape' of 'type' is required but missing`). The shape inference gives is filled in, in
    memory only, and the file scores and certifies as the same file with its shape stated."""
    g = _Graph(14)
    g.head(g.node("Relu", [g.conv("x", "c", 3, pads=[1, 1, 1, 1])], "r"), 3 * 6 * 6)
    stated = g.save(tmp_path / "stated.onnx")
    model = onnx.load(str(stated))
    model.graph.output[0].type.tensor_type.ClearField("shape")
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    before = bare.read_bytes()
    raw, wrapped = _load(bare)
    assert any("states no shape" in note for note in raw.notes), raw.notes
    assert bare.read_bytes() == before
    _, reference = _load(stated)
    x = torch.rand((8, *SHAPE), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), reference(x), rtol=0, atol=0)
    y = reference(x).argmax(1)
    torch.testing.assert_close(certify_l2(wrapped, x, y, budget="fast").radius, certify_l2(reference, x, y, budget="fast").radius,
                               rtol=0, atol=0)  # fmt: skip


def test_a_gemm_with_a_transposed_input_is_refused_saying_so(tmp_path) -> None:
    """Gemm with transA=1 was refused as `Gemm: OnnxGemm` alone (red team 72)."""
    g = _Graph(15)
    t = g.node("Transpose", [g.node("Flatten", [g.node("Relu", [g.conv("x", "c", 2, pads=[1, 1, 1, 1])], "r")], "f")], "t", perm=[1, 0])
    g.node("Gemm", [t, g.weight("w", (2 * 6 * 6, CLASSES), 0.3)], "y", transA=1)
    message = _refusal(g.save(tmp_path / "gemm_trans_a.onnx"))
    assert "Gemm with transA=1 (its input operand transposed)" in message, message
