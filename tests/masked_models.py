"""Deliberately broken classifiers: real model files whose gradients lie about their robustness.

Every builder takes an unmasked source model file and writes a masked copy to a path the
caller chooses (a test's tmp dir, the benchmark's cache), returning that path. Nothing is
written into the repository. Two kinds of file come out:

* ONNX, by editing the source graph with ``onnx.helper`` (a few nodes before the first
  layer or after the logits; the graph input and output keep their names). The graph is
  first moved to an opset onnx2torch converts directly (13 to 17: ``_editable``) so that
  robaudit loads it without its own opset fallback.
* TorchScript, for randomized models: onnx2torch converts ONNX ``Dropout`` to a module
  that follows torch's train/eval flag (robaudit freezes models in eval mode, so an ONNX
  ``Dropout(training_mode=True)`` runs deterministically under robaudit) and has no
  converter for ``RandomNormal``/``RandomNormalLike`` (the file does not load at all).
  So the randomized models are the source converted with onnx2torch, wrapped in torch
  and saved with ``torch.jit.trace``: the traced graph holds ``aten::randn_like`` /
  ``aten::dropout(train=True)``, which draw fresh noise on every call.

The masks (what the file computes from the source's input ``x`` and logits ``z``):

==================  =====================================================  ================
builder             computes                                               decisions
==================  =====================================================  ================
quantize_input      ``net(Round(x * L) / L)``                              same as source
                    (input gradient exactly 0: Round's derivative)         on L-level data
softmax_output      ``Softmax(T * z)`` (rows sum to 1; robaudit takes      identical
                    logs; with large T the rows are exact 0/1 in float32,
                    so every loss on them is flat)
scale_output        ``factor * z`` (softmax of it is exactly one-hot: CE    identical
                    gradient exactly 0; margin losses (DLR, CW) unaffected)
clamp_output        ``Max(z - ReduceMax(z), -margin)``: the top class      identical
                    scores 0, every class more than ``margin`` below it
                    scores ``-margin`` (every output-based loss is flat,
                    CE and DLR included, until the margin falls below
                    ``margin``; gradient exactly 0, not merely small)
saturating_layer    ``Tanh(gain * (z - ReduceMax(z)))``: smooth version    identical
                    of the clamp; a runner-up more than 9.01/gain below
                    the top saturates to exactly -1 (gradient exactly 0),
                    closer ones pass a gradient shrunk by 1 - tanh^2
gaussian_noise      ``net(x + sigma * N(0, 1))``, fresh noise per call     random
(TorchScript)       (needs EOT; the expected decision is the source's
                    only approximately)
dropout_inference   dropout with rate p kept on at inference on the        random
(TorchScript)       input of the last linear layer (penultimate features)
==================  =====================================================  ================

"identical" means argmax-identical to the source on every input (the map from logits
to outputs is monotone and keeps the top class strictly on top in float32; checked on
the data by ``decisions_identical`` and in tests/test_masked_models.py). Quantization
with L = 255 leaves 8-bit data unchanged, so on the bundled digits and MNIST its clean
decisions equal the source's (not between data points: there it snaps to the 8-bit grid).

``REGISTRY`` lists the masked models the tests and ``benchmarks/masking_zoo.py`` use:
name -> ``Masked`` (builder and parameters, unmasked source, data, threats, normalization,
whether decisions are identical). Healthy controls need no builder: the demo CNN and the
fixture models themselves.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper, version_converter

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
DEMO_ONNX = REPO / "robaudit" / "demo" / "digits_cnn.onnx"

# onnx2torch converts every op used below at these opsets (ReduceMax takes `axes` as an
# attribute up to 17, and onnx2torch has no converter for ReduceMax-18).
MIN_OPSET, MAX_OPSET = 13, 17
PREFIX = "robaudit_mask_"


# --------------------------------------------------------------------------- graph editing


def _opset(model: onnx.ModelProto) -> int:
    return next(int(e.version) for e in model.opset_import if e.domain in ("", "ai.onnx"))


def _editable(src: str | Path) -> onnx.ModelProto:
    """The source graph at an opset in [13, 17] (converted with ONNX's version converter when outside)."""
    model = onnx.load(str(src))
    opset = _opset(model)
    if opset < MIN_OPSET or opset > MAX_OPSET:
        model = version_converter.convert_version(model, min(max(opset, MIN_OPSET), MAX_OPSET))
    return model


def _input_name(model: onnx.ModelProto) -> str:
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"expected one graph input, found {inputs}")
    return inputs[0]


def _const(model: onnx.ModelProto, name: str, value: float) -> str:
    """A float32 scalar initializer (broadcasts against any float32 tensor)."""
    full = PREFIX + name
    model.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.float32), full))
    return full


def _rename_uses(model: onnx.ModelProto, old: str, new: str, *, outputs: bool) -> None:
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        if outputs:
            for i, name in enumerate(node.output):
                if name == old:
                    node.output[i] = new


def _save(model: onnx.ModelProto, dst: str | Path, doc: str) -> Path:
    model.doc_string = (model.doc_string + "\n" if model.doc_string else "") + doc
    onnx.checker.check_model(model, full_check=True)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def _before_input(src: str | Path, dst: str | Path, nodes: Callable[[onnx.ModelProto, str, str], list], doc: str) -> Path:
    """Insert `nodes(model, x, x_new)` between the graph input `x` and its consumers."""
    model = _editable(src)
    x = _input_name(model)
    new = PREFIX + "input"
    _rename_uses(model, x, new, outputs=False)
    added = nodes(model, x, new)
    rest = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([*added, *rest])
    return _save(model, dst, doc)


def _after_output(src: str | Path, dst: str | Path, nodes: Callable[[onnx.ModelProto, str, str], list], doc: str) -> Path:
    """Append `nodes(model, z, out)` after the first graph output; the output keeps its name."""
    model = _editable(src)
    out = model.graph.output[0].name
    raw = PREFIX + "logits"
    _rename_uses(model, out, raw, outputs=True)
    model.graph.node.extend(nodes(model, raw, out))
    return _save(model, dst, doc)


def _shift_by_max(model: onnx.ModelProto, z: str) -> tuple[list, str]:
    """Nodes computing z - max_k z_k over the class axis (1); returns (nodes, name of the result)."""
    top, shifted = PREFIX + "top", PREFIX + "shifted"
    return [
        helper.make_node("ReduceMax", [z], [top], axes=[1], keepdims=1),
        helper.make_node("Sub", [z, top], [shifted]),
    ], shifted


# --------------------------------------------------------------------------- ONNX masks


def quantize_input(src: str | Path, dst: str | Path, levels: int = 255) -> Path:
    """``x -> Round(x * levels) / levels`` before the net: the input gradient is exactly 0.

    Decisions equal the source's wherever x is already on the grid (8-bit data with levels=255).
    """

    def nodes(model, x, new):
        scale = _const(model, "levels", float(levels))
        return [
            helper.make_node("Mul", [x, scale], [PREFIX + "scaled"]),
            helper.make_node("Round", [PREFIX + "scaled"], [PREFIX + "rounded"]),
            helper.make_node("Div", [PREFIX + "rounded", scale], [new]),
        ]

    return _before_input(src, dst, nodes, f"robaudit test mask: input quantized to {levels} levels (Round(x*L)/L)")


def softmax_output(src: str | Path, dst: str | Path, temperature: float = 1000.0) -> Path:
    """``Softmax(temperature * z)``: probabilities, exact one-hot rows in float32 for large temperatures."""

    def nodes(model, z, out):
        t = _const(model, "temperature", float(temperature))
        return [
            helper.make_node("Mul", [z, t], [PREFIX + "tempered"]),
            helper.make_node("Softmax", [PREFIX + "tempered"], [out], axis=1),
        ]

    return _after_output(src, dst, nodes, f"robaudit test mask: Softmax({temperature:g} * logits)")


def scale_output(src: str | Path, dst: str | Path, factor: float = 1e4) -> Path:
    """``factor * z``: same decisions, softmax saturated to exact one-hot, so cross-entropy gradients are 0."""
    if not factor > 0:
        raise ValueError("factor must be positive (a negative one would reverse the decisions)")

    def nodes(model, z, out):
        return [helper.make_node("Mul", [z, _const(model, "factor", float(factor))], [out])]

    return _after_output(src, dst, nodes, f"robaudit test mask: logits scaled by {factor:g}")


def clamp_output(src: str | Path, dst: str | Path, margin: float = 0.1) -> Path:
    """``Max(z - ReduceMax(z), -margin)``: the top class at 0, every class further than `margin` below at -margin.

    Argmax-identical to the source. Any loss of these outputs (CE, DLR, margin) is constant
    while the source's margin exceeds `margin`, and its gradient is exactly 0 there: the
    top output is ``z_y - max z`` (its two paths cancel exactly) and every clamped output
    takes Max's constant branch.
    """
    if not margin > 0:
        raise ValueError("margin must be positive")

    def nodes(model, z, out):
        shift, shifted = _shift_by_max(model, z)
        return [*shift, helper.make_node("Max", [shifted, _const(model, "floor", -float(margin))], [out])]

    return _after_output(src, dst, nodes, f"robaudit test mask: Max(logits - max(logits), -{margin:g})")


def saturating_layer(src: str | Path, dst: str | Path, gain: float = 10.0) -> Path:
    """``Tanh(gain * (z - ReduceMax(z)))``: a saturating output layer, argmax-identical to the source.

    The top class scores exactly 0 with exactly zero gradient; a class more than
    ``9.01 / gain`` below the top scores exactly -1.0 in float32 (zero gradient), a closer
    one passes its gradient shrunk by ``1 - tanh^2``. With gain 10 every sample whose
    margin exceeds 0.9 has an exactly zero input gradient; with gain 1 gradients are
    shrunk (1e-2 to 1e-7) but mostly not zero, which sign-based attacks do not mind.
    """
    if not gain > 0:
        raise ValueError("gain must be positive")

    def nodes(model, z, out):
        shift, shifted = _shift_by_max(model, z)
        return [
            *shift,
            helper.make_node("Mul", [shifted, _const(model, "gain", float(gain))], [PREFIX + "gained"]),
            helper.make_node("Tanh", [PREFIX + "gained"], [out]),
        ]

    return _after_output(src, dst, nodes, f"robaudit test mask: Tanh({gain:g} * (logits - max(logits)))")


# --------------------------------------------------------------------------- randomized (TorchScript)


def _torch_net(src: str | Path) -> torch.nn.Module:
    """The source ONNX as a torch module, converted the way robaudit loads it."""
    from robaudit.models import load_model

    return load_model(Path(src)).net


class _GaussianNoise(torch.nn.Module):
    def __init__(self, net: torch.nn.Module, sigma: float) -> None:
        super().__init__()
        self.net, self.sigma = net, float(sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + self.sigma * torch.randn_like(x))


def _example(src: str | Path, batch: int = 2) -> torch.Tensor:
    """A zero input of the source graph's declared shape (batch replaced)."""
    model = onnx.load(str(src))
    x = _input_name(model)
    dims = next(i for i in model.graph.input if i.name == x).type.tensor_type.shape.dim
    return torch.zeros(batch, *[d.dim_value for d in list(dims)[1:]])


def _trace(module: torch.nn.Module, example: torch.Tensor, dst: str | Path) -> Path:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # check_trace=False: the trace check re-runs the module and compares, which a random module fails.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated; onnx2torch modules raise TracerWarnings
        traced = torch.jit.trace(module, example, check_trace=False)
    traced.save(str(dst))
    return dst


class _DecoyScores(torch.nn.Module):
    """The source's decisions (a one-hot of its argmax, worth 5) plus bounded scores of a decoy: the same net
    on a blurred input. Every gradient and every score-based attack follows the decoy."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        top = torch.nn.functional.one_hot(z.argmax(1), z.shape[1]).to(z.dtype)
        return 5 * top + torch.tanh(self.net(torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)))


class _DetachedSmooth(torch.nn.Module):
    """Forward: the source exactly. Backward: the gradient of the source on a 2x lower-resolution copy of x."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 2), scale_factor=2.0, mode="nearest")
        h = self.net(low)
        return h + (self.net(x) - h).detach()


class _HighFrequency(torch.nn.Module):
    """The source's scores plus 0.01 sin(1e5 x) mixed into every class: tiny in value, dominant in gradient."""

    def __init__(self, net: torch.nn.Module, features: int, classes: int) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mix", torch.randn(features, classes, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + 0.01 * torch.sin(1e5 * x.flatten(1)) @ self.mix


class _DecoyGradient(torch.nn.Module):
    """Forward: the source exactly. Backward: the gradient of a fixed random linear map (unrelated to the decisions)."""

    def __init__(self, net: torch.nn.Module, features: int, classes: int) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("w", 1e-3 * torch.randn(features, classes, generator=torch.Generator().manual_seed(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decoy = x.flatten(1) @ self.w
        return self.net(x).detach() + decoy - decoy.detach()


def decoy_gradient(src: str | Path, dst: str | Path) -> Path:
    """TorchScript: the source's scores, the gradient of a random linear map (`_DecoyGradient`)."""
    example = _example(src)
    net = _torch_net(src)
    return _trace(_DecoyGradient(net, example[0].numel(), net(example).shape[1]).eval(), example, dst)


def decoy_scores(src: str | Path, dst: str | Path) -> Path:
    """TorchScript: decisions of the source, scores and gradients of a decoy (`_DecoyScores`)."""
    return _trace(_DecoyScores(_torch_net(src)).eval(), _example(src), dst)


def detached_smooth(src: str | Path, dst: str | Path) -> Path:
    """TorchScript: `h + (net(x) - h).detach()` with h the net on a low-resolution copy (`_DetachedSmooth`)."""
    return _trace(_DetachedSmooth(_torch_net(src)).eval(), _example(src), dst)


def high_frequency(src: str | Path, dst: str | Path) -> Path:
    """TorchScript: the source's scores plus a tiny high-frequency term (`_HighFrequency`)."""
    example = _example(src)
    net = _torch_net(src)
    classes = net(example).shape[1]
    return _trace(_HighFrequency(net, example[0].numel(), classes).eval(), example, dst)


def gaussian_noise(src: str | Path, dst: str | Path, sigma: float = 0.1) -> Path:
    """TorchScript: ``net(x + sigma * N(0, 1))`` with fresh noise on every call (a randomized 'defense')."""
    net = _torch_net(src)
    return _trace(_GaussianNoise(net, sigma).eval(), _example(src), dst)


def dropout_inference(src: str | Path, dst: str | Path, p: float = 0.3) -> Path:
    """TorchScript: dropout with rate `p` kept on at inference, on the input of the last Gemm/MatMul.

    The Dropout node is inserted into the ONNX graph, converted by onnx2torch (whose
    dropout module follows torch's training flag), switched to training mode and traced:
    the trace records ``dropout(train=True)``, which stays random after ``.eval()``.
    """
    if not 0 < p < 1:
        raise ValueError("p must lie in (0, 1)")
    model = _editable(src)
    last = max(i for i, n in enumerate(model.graph.node) if n.op_type in ("Gemm", "MatMul"))
    features = model.graph.node[last].input[0]
    dropped = PREFIX + "dropped"
    model.graph.node[last].input[0] = dropped
    ratio = _const(model, "ratio", float(p))
    node = helper.make_node("Dropout", [features, ratio], [dropped])
    nodes = list(model.graph.node)
    nodes.insert(last, node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)

    import onnx2torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = onnx2torch.convert(model)
    net.eval()
    n_dropout = 0
    for module in net.modules():
        if "Dropout" in type(module).__name__:
            module.train()
            n_dropout += 1
    if n_dropout != 1:
        raise RuntimeError(f"expected one dropout module after conversion, found {n_dropout}")
    for param in net.parameters():
        param.requires_grad_(False)
    return _trace(net, _example(src), dst)


# --------------------------------------------------------------------------- checks used by tests and the benchmark


def decisions(
    path: str | Path, x: torch.Tensor, mean: list[float] | None = None, std: list[float] | None = None
) -> torch.Tensor:
    """Predicted classes of a model file on pixel data `x`, loaded and wrapped by robaudit."""
    from robaudit.models import load_model, wrap_model

    raw = load_model(Path(path))
    model, _ = wrap_model(raw, sample_shape=tuple(x.shape[1:]), probe=x[:8], mean=mean, std=std)
    with torch.no_grad():
        return model(x).argmax(1)


def decisions_identical(
    source: str | Path, masked: str | Path, x: torch.Tensor, mean: list[float] | None = None, std: list[float] | None = None
) -> bool:
    return bool(torch.equal(decisions(source, x, mean, std), decisions(masked, x, mean, std)))


# --------------------------------------------------------------------------- registry


def fixture_model(name: str) -> Path:
    """A third-party fixture model (../shared/fixtures/models/NAME.onnx); the caller skips when absent."""
    return FIXTURES / "models" / f"{name}.onnx"


MNIST_DATA = str(FIXTURES / "data" / "mnist_test_first100.npz")


@dataclass(frozen=True)
class Source:
    """An unmasked model: file, data, threats it is audited at, normalization."""

    name: str
    path: Path
    data: str  # robaudit --data value
    threats: tuple[str, ...]
    mean: list[float] | None = None
    std: list[float] | None = None
    fixture: bool = False  # lives in ../shared/fixtures (tests must skip when absent)


CIFAR_DATA = str(FIXTURES / "data" / "cifar10_test_first100.npz")

SOURCES: dict[str, Source] = {
    # the shipped demo CNN (clean 0.97 on the n=100 digits sample): robust accuracy with the
    # standard preset 0.46 at linf 0.1 and 0.51 at l2 0.5 (plain PGD-100: 0.47, 0.55)
    "digits_cnn": Source("digits_cnn", DEMO_ONNX, "digits", ("linf:0.1", "l2:0.5")),
    # natural MLP on MNIST (first 100 test images, clean 1.00): standard 0.64 at linf 0.03 (PGD-100: 0.77)
    "mnistfc_256x2": Source("mnistfc_256x2", fixture_model("mnistfc_256x2"), MNIST_DATA, ("linf:0.03",), fixture=True),
    # healthy controls without masked variants
    "colt_mnist_0.1": Source(
        "colt_mnist_0.1", fixture_model("colt_mnist_0.1"), MNIST_DATA, ("linf:0.1",), [0.1307], [0.3081], fixture=True
    ),
    "oval21_cifar_base_kw": Source(
        "oval21_cifar_base_kw", fixture_model("oval21_cifar_base_kw"), CIFAR_DATA, ("linf:2/255",),
        [0.485, 0.456, 0.406], [0.225, 0.225, 0.225], fixture=True,
    ),  # fmt: skip
    "cifar10_resnet_2b": Source(
        "cifar10_resnet_2b", fixture_model("cifar10_resnet_2b"), CIFAR_DATA, ("linf:2/255",),
        [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616], fixture=True,
    ),  # fmt: skip
}


@dataclass(frozen=True)
class Masked:
    """One masked model: how to build it from which source, what to audit it on, and what it keeps."""

    name: str
    mask: str  # short description for tables
    source: str  # key of SOURCES
    build: Callable[..., Path]
    params: dict[str, Any] = field(default_factory=dict)
    decisions_identical: bool | None = True  # argmax-identical to the source (None: randomized, not comparable)
    randomized: bool = False
    suffix: str = ".onnx"

    @property
    def src(self) -> Source:
        return SOURCES[self.source]

    @property
    def data(self) -> str:
        return self.src.data

    @property
    def threats(self) -> tuple[str, ...]:
        return self.src.threats

    def file_name(self) -> str:
        return self.name + self.suffix

    def write(self, folder: str | Path) -> Path:
        """Build the masked file into `folder` (overwriting) and return its path."""
        return self.build(self.src.path, Path(folder) / self.file_name(), **self.params)


def _masks(source: str, tag: str, *, sigma: float, p: float) -> list[Masked]:
    ts = ".torchscript.pt"
    return [
        Masked(f"{tag}_quantized", "input Round(255x)/255", source, quantize_input, {"levels": 255}),
        Masked(f"{tag}_softmax", "Softmax(1000 z)", source, softmax_output, {"temperature": 1000.0}),
        Masked(f"{tag}_scaled", "1e4 z", source, scale_output, {"factor": 1e4}),
        Masked(f"{tag}_clamped", "max(z - max z, -0.1)", source, clamp_output, {"margin": 0.1}),
        Masked(f"{tag}_saturated", "tanh(10 (z - max z))", source, saturating_layer, {"gain": 10.0}),
        Masked(f"{tag}_noise", f"x + {sigma:g} N(0,1) per call", source, gaussian_noise, {"sigma": sigma}, None, True, ts),
        Masked(f"{tag}_dropout", f"dropout {p:g} before last layer", source, dropout_inference, {"p": p}, None, True, ts),
    ]


REGISTRY: dict[str, Masked] = {
    m.name: m
    for m in [
        *_masks("digits_cnn", "cnn", sigma=0.1, p=0.3),
        *_masks("mnistfc_256x2", "mnistfc", sigma=0.1, p=0.1),
    ]
}
