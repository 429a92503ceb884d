"""The deliberately masked models of tests/masked_models.py: each file loads through robaudit and is masked as intended.

These are the negative controls of the trust checks and of benchmarks/masking_zoo.py,
so a builder that silently stopped masking (or started changing decisions) would make
those results meaningless. Measured on the demo CNN and the 360 bundled digits when
written: quantization, softmax (T=1000) and clamp give an exactly zero cross-entropy
input gradient on every sample; scaling by 1e4 on every correctly classified one; the
saturating layer (gain 10) on 98% of them; all five are argmax-identical to the source.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

import masked_models as mm
from conftest import bundled_digits, fixtures_dir
from robaudit.data import load_data
from robaudit.models import load_model, wrap_model

pytestmark = pytest.mark.usefixtures("one_thread")

ONNX_MASKS = ("quantized", "softmax", "scaled", "clamped", "saturated")
RANDOM_MASKS = ("noise", "dropout")


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x_u8, y = bundled_digits()
    return torch.from_numpy(x_u8).float() / 255, torch.from_numpy(y).long()


def wrapped(path, x: torch.Tensor, mean=None, std=None):
    raw = load_model(path)
    model, info = wrap_model(raw, sample_shape=tuple(x.shape[1:]), probe=x[:8], mean=mean, std=std)
    return raw, model, info


def ce_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of the cross-entropy gradient w.r.t. the pixels (what PGD follows)."""
    point = x.clone().requires_grad_(True)
    F.cross_entropy(model(point), y, reduction="sum").backward()
    return point.grad.flatten(1).norm(dim=1)


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Every digits-CNN mask of the registry, built once into a tmp dir."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("masked")
    torch.manual_seed(0)
    files = {name.removeprefix("cnn_"): m.write(root) for name, m in mm.REGISTRY.items() if m.source == "digits_cnn"}
    torch.set_num_threads(before)
    return files


@pytest.fixture(scope="module")
def source():
    x, y = digits()
    _, model, _ = wrapped(mm.DEMO_ONNX, x)
    with torch.no_grad():
        logits = model(x)
    top2 = logits.topk(2, dim=1).values
    return {"x": x, "y": y, "model": model, "pred": logits.argmax(1), "margin": top2[:, 0] - top2[:, 1]}


def test_registry_is_consistent() -> None:
    assert {m.name.split("_", 1)[1] for m in mm.REGISTRY.values()} == {*ONNX_MASKS, *RANDOM_MASKS}
    for m in mm.REGISTRY.values():
        assert m.source in mm.SOURCES
        assert m.randomized == (m.decisions_identical is None)
        assert m.file_name().endswith(".torchscript.pt" if m.randomized else ".onnx")
        assert all(":" in t for t in m.threats)


@pytest.mark.parametrize("mask", ONNX_MASKS)
def test_onnx_masks_keep_names_opset_and_decisions(cnn_files, source, mask: str) -> None:
    """Graph input/output names kept, an opset onnx2torch takes directly, argmax identical to the source."""
    original, edited = onnx.load(str(mm.DEMO_ONNX)), onnx.load(str(cnn_files[mask]))
    assert [i.name for i in edited.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in edited.graph.output] == [o.name for o in original.graph.output]
    assert mm.MIN_OPSET <= mm._opset(edited) <= mm.MAX_OPSET
    raw, model, info = wrapped(cnn_files[mask], source["x"])
    assert raw.format == "onnx" and not raw.notes, raw.notes  # converted without robaudit's opset fallback
    assert info.batching == "batched" and info.num_classes == 10
    with torch.no_grad():
        assert torch.equal(model(source["x"]).argmax(1), source["pred"])
    assert mm.REGISTRY[f"cnn_{mask}"].decisions_identical is True


def test_quantized_input_gradient_is_exactly_zero(cnn_files, source) -> None:
    _, model, _ = wrapped(cnn_files["quantized"], source["x"])
    assert torch.count_nonzero(ce_gradient(model, source["x"], source["y"])) == 0
    assert torch.count_nonzero(ce_gradient(source["model"], source["x"], source["y"])) == len(source["y"])


def test_softmax_rows_are_saturated_probabilities(cnn_files, source) -> None:
    raw, model, info = wrapped(cnn_files["softmax"], source["x"])
    with torch.no_grad():
        probs = raw.net(source["x"])
    assert torch.allclose(probs.sum(1), torch.ones(len(probs)), atol=1e-6)
    assert info.output_kind == "probabilities"  # robaudit attacks the log-probabilities
    one_hot = (probs.max(1).values == 1.0) & ((probs == 0) | (probs == 1)).all(1)
    assert one_hot.float().mean() > 0.95  # exact 0/1 in float32: nothing for a gradient to follow
    assert torch.count_nonzero(ce_gradient(model, source["x"], source["y"])) == 0


def test_scaled_logits_vanish_cross_entropy_gradients(cnn_files, source) -> None:
    raw, model, _ = wrapped(cnn_files["scaled"], source["x"])
    with torch.no_grad():
        assert torch.allclose(raw.net(source["x"]), 1e4 * source["model"](source["x"]), rtol=1e-4, atol=1e-2)
    grad = ce_gradient(model, source["x"], source["y"])
    correct = source["pred"] == source["y"]
    assert torch.count_nonzero(grad[correct]) == 0  # softmax of 1e4 z is exactly one-hot
    assert bool((grad[~correct] > 0).all())  # misclassified points: the loss is not saturated


def test_clamped_logits_flatten_every_loss(cnn_files, source) -> None:
    """Every output-based loss is constant while the margin exceeds 0.1; gradients exactly 0, not just small."""
    raw, model, _ = wrapped(cnn_files["clamped"], source["x"])
    with torch.no_grad():
        out = raw.net(source["x"])
    wide = source["margin"] > 0.1
    assert bool((out.max(1).values == 0).all())
    assert bool((out[wide].sort(1).values[:, :-1] == -0.1).all())  # everything but the top class clamped
    assert torch.count_nonzero(ce_gradient(model, source["x"][wide], source["y"][wide])) == 0
    point = source["x"][wide].clone().requires_grad_(True)  # the margin (DLR/CW numerator) is flat too
    scores = model(point)
    top2 = scores.topk(2, dim=1).values
    (top2[:, 0] - top2[:, 1]).sum().backward()
    assert torch.count_nonzero(point.grad) == 0


def test_saturating_layer_shrinks_gradients_to_nothing(cnn_files, source) -> None:
    _, model, _ = wrapped(cnn_files["saturated"], source["x"])
    grad = ce_gradient(model, source["x"], source["y"])
    wide = source["margin"] > 9.02 / 10  # every runner-up saturated at tanh = -1 exactly
    assert torch.count_nonzero(grad[wide]) == 0
    assert (grad == 0).float().mean() > 0.9  # gradients survive only within 0.9 of the decision boundary


@pytest.mark.parametrize("mask", RANDOM_MASKS)
def test_randomized_models_differ_between_calls(cnn_files, source, mask: str) -> None:
    """TorchScript files that draw fresh randomness per call, through robaudit's loader and wrapper."""
    raw, model, _ = wrapped(cnn_files[mask], source["x"])
    assert raw.format == "torchscript"
    x = source["x"][:50]
    with torch.no_grad():
        first, second = raw.net(x), raw.net(x)
        assert first.shape == (50, 10)
        assert not torch.equal(first, second)
        assert not torch.equal(model(x), model(x))
        # still a classifier of the same digits: most decisions agree with the plain net's
        agree = (model(source["x"]).argmax(1) == source["pred"]).float().mean()
    assert agree > 0.8
    grad = ce_gradient(model, x, source["y"][:50])
    assert bool((grad > 0).all())  # gradients exist; they are just noisy (EOT averages them)


def test_onnx_randomness_does_not_survive_onnx2torch(tmp_path, source) -> None:
    """Why the randomized models are TorchScript: robaudit cannot run randomized ONNX graphs.

    RandomNormalLike has no onnx2torch converter; Dropout converts to a module following
    torch's train/eval flag, which robaudit freezes to eval (training_mode=1 is ignored).
    """
    from onnx import helper, numpy_helper

    from robaudit.errors import RobauditError

    model = mm._editable(mm.DEMO_ONNX)
    x = mm._input_name(model)
    mm._rename_uses(model, x, "noisy", outputs=False)
    nodes = [helper.make_node("RandomNormalLike", [x], ["eps"], scale=0.1), helper.make_node("Add", [x, "eps"], ["noisy"])]
    rest = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([*nodes, *rest])
    onnx.save(model, str(tmp_path / "noise.onnx"))
    with pytest.raises(RobauditError, match="RandomNormalLike"):
        load_model(tmp_path / "noise.onnx")

    model = mm._editable(mm.DEMO_ONNX)
    last = max(i for i, n in enumerate(model.graph.node) if n.op_type == "Gemm")
    features = model.graph.node[last].input[0]
    model.graph.node[last].input[0] = "dropped"
    ratio, train = numpy_helper.from_array(np.array(0.5, np.float32), "ratio"), numpy_helper.from_array(np.array(True), "train")
    model.graph.initializer.extend([ratio, train])
    nodes = list(model.graph.node)
    nodes.insert(last, helper.make_node("Dropout", [features, "ratio", "train"], ["dropped"]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(tmp_path / "dropout.onnx"))
    raw = load_model(tmp_path / "dropout.onnx")
    with torch.no_grad():
        assert torch.equal(raw.net(source["x"][:20]), raw.net(source["x"][:20]))


# --------------------------------------------------------------------------- fixture sources


@pytest.mark.parametrize("mask", [*ONNX_MASKS, *RANDOM_MASKS])
def test_fixture_masks_load_and_mask(tmp_path, mask: str) -> None:
    """The natural MNIST MLP (opset 9, flat [1, 784, 1] input) behind each mask."""
    fixtures_dir()
    masked = mm.REGISTRY[f"mnistfc_{mask}"]
    src = masked.src
    data = load_data(src.data, n=None, seed=0)
    x, y = data.x[:50], data.y[:50]
    torch.manual_seed(0)
    path = masked.write(tmp_path)
    _, plain, _ = wrapped(src.path, x)
    raw, model, info = wrapped(path, x)
    grad = ce_gradient(model, x, y)
    if masked.randomized:
        with torch.no_grad():
            assert not torch.equal(raw.net(x), raw.net(x))
        return
    assert raw.notes == [] and mm._opset(onnx.load(str(path))) == mm.MIN_OPSET  # moved up from opset 9
    with torch.no_grad():
        assert torch.equal(model(x).argmax(1), plain(x).argmax(1))
    assert (grad == 0).float().mean() >= 0.9
