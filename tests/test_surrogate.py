"""BPDA surrogates and the transfer attack, on real masked models.

The masked models are the shipped demo CNN (trained, 1x8x8 digits in [0, 1]) behind a
masking op, exported to ONNX and loaded the way a user's file is (`load_model` +
`wrap_model`), or wrapped as torch modules where ONNX cannot express the mask
(onnx2torch has no converter for RandomNormalLike, so noisy ONNX files do not load).

Observed on the first 80 bundled digits, runner seed 0, APGD-DLR 100 steps:
- round(4x)/4 before the CNN, linf 0.2: APGD on the model breaks 3 of 78, the
  transfer attack from the surrogate 78 of 78.
- Softmax(100 z): APGD on the model breaks 0 of 77 at linf 0.1 (its log-probabilities
  are flat), the transfer attack 42, exactly what APGD breaks on the plain CNN (42).
- clamp(x, 0, 1) before the CNN (zero gradient at the many pixels exactly 0 or 1),
  linf 0.1: APGD 25 of 77, transfer 42 (the plain CNN's 42).
- sigmoid(500 (x - 0.5)) before the CNN, linf 0.2: APGD 15 of 75, transfer 46.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import bundled_digits, demo_classifier
from robaudit.attacks import AttackContext, AttackRun, run_threat
from robaudit.attacks.apgd import APGD, APGDTargeted
from robaudit.attacks.transfer import Transfer
from robaudit.models import AuditModel, load_model, wrap_model
from robaudit.models.detect import RawModel, freeze
from robaudit.models.surrogate import build_surrogate
from robaudit.threats import Threat

CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


class Quantized(nn.Module):
    """Input quantization to 5 levels: Round's gradient is 0, so the input gradient vanishes."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 4) / 4)


class QuantizedByArithmetic(nn.Module):
    """The same 5 levels without a rounding op: an integer cast (truncation), or x - fmod(x, 1). Both have no
    usable gradient; a red team's 4-bit versions read 0.797 robust where BPDA through them reached 0.734."""

    def __init__(self, net: nn.Module, how: str) -> None:
        super().__init__()
        self.net, self.how = net, how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x * 4 + 0.5
        q = (z.to(torch.int32).to(x.dtype) if self.how == "cast" else z - torch.fmod(z, 1.0)) / 4
        return self.net(q)


class SharpSoftmax(nn.Module):
    """Probabilities at temperature 1/100: exact 0/1 rows in float32, flat log-probabilities."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x) * 100, dim=1)


class InputClip(nn.Module):
    """Input 'sanitization' clamp(x, 0, 1): identity on the box, zero gradient at its faces."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.clamp(x, 0, 1))


class Binarized(nn.Module):
    """A saturated sigmoid binarizes the input: its float32 gradient is 0 almost everywhere."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.sigmoid(500 * (x - 0.5)))


class Forms(nn.Module):
    """Every torch spelling of the masking ops, beside activations that must stay untouched."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.hard, self.relu6 = net, nn.Hardtanh(0.0, 1.0), nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masked = self.hard(x) + x.clamp(0, 1) + F.hardtanh(x, 0.0, 1.0) + torch.floor(x * 4) / 4 + torch.tanh(3 * x)
        untouched = self.relu6(x) + x.clamp(min=0.2) + x * torch.sigmoid(x)  # ReLU6, one-sided clamp, SiLU
        return self.net(masked / 5 + 0.01 * untouched)


class Noisy(nn.Module):
    """Randomness at inference: input noise in its torch spellings, or dropout forced on."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gaussian":
            x = x + 0.1 * torch.randn_like(x)
        elif self.kind == "uniform":
            x = x + 0.1 * (2 * torch.rand_like(x) - 1)
        elif self.kind == "randn":
            x = x + 0.1 * torch.randn(x.shape)
        elif self.kind == "normal":
            x = torch.normal(x, 0.1)
        elif self.kind == "bernoulli":
            x = x * torch.bernoulli(torch.full_like(x, 0.5)) * 2
        else:
            x = F.dropout(x, 0.3, training=True)
        return self.net(x)


class Healthy(nn.Module):
    """An MLP whose activations (ReLU6, one-sided clamp, SiLU, eval dropout) are not masking."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.drop = nn.Linear(64, 32), nn.Linear(32, 10), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x.flatten(1))
        h = F.relu6(h) + h.clamp(min=0) + h * torch.sigmoid(h)
        return self.fc2(F.dropout(self.drop(h), 0.2, training=self.training))


class DataDependent(nn.Module):
    """Python control flow on tensor values: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = demo_classifier()(x)
        return z if float(z.sum()) > 0 else -z


class DataDependentLoop(nn.Module):
    """Rounding, then a loop whose trip count depends on the values: no aten graph exists."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.round(x * 4).flatten(1)[:, :10]
        for _ in range(int(z.sum().item()) % 3):
            z = z * 2
        return z


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x_u8, y = bundled_digits()
    return torch.from_numpy(x_u8[:80]).float() / 255, torch.from_numpy(y[:80]).long()


def onnx_model(module: nn.Module, path: Path, x: torch.Tensor, opset: int | None = None) -> AuditModel:
    torch.onnx.export(
        module.eval(), (torch.zeros(1, 1, 8, 8),), str(path), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
        **({"opset_version": opset} if opset else {}),
    )  # fmt: skip
    return wrap_model(load_model(path), sample_shape=(1, 8, 8), probe=x[:8])[0]


def torch_model(module: nn.Module, x: torch.Tensor) -> AuditModel:
    raw = RawModel(net=freeze(module), format="pickle", input_shape=None, num_classes=None, name="module")
    return wrap_model(raw, sample_shape=(1, 8, 8), probe=x[:8])[0]


def input_grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gradient of the margin between the top two scores (what margin and DLR losses follow)."""
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        top = model(xg).topk(2, dim=1).values
        (top[:, 0] - top[:, 1]).sum().backward()
    return xg.grad


def attack(model: nn.Module, attack, x, y, eps: float):
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    return run_threat(
        model, x, y, correct, Threat(norm="linf", eps=eps), [AttackRun(attack)],
        lower=0.0, upper=1.0, num_classes=10, batch_size=256, device=CPU, seed=0,
    )  # fmt: skip


def broken(model: nn.Module, surrogate: nn.Module | None, x, y, eps: float) -> tuple[int, int]:
    """(points broken by APGD-DLR on the model, by the transfer attack from `surrogate`)."""
    apgd = attack(model, APGD(loss="dlr"), x, y, eps)
    transfer = attack(model, Transfer(surrogate=surrogate), x, y, eps)
    return int(apgd.broken.sum()), int(transfer.broken.sum())


@pytest.fixture(scope="module")
def plain_onnx(digits, tmp_path_factory: pytest.TempPathFactory) -> AuditModel:
    return onnx_model(demo_classifier(), tmp_path_factory.mktemp("plain") / "cnn.onnx", digits[0])


# --- 1. input quantization ------------------------------------------------------------------


def test_quantized_input_surrogate_keeps_the_forward_and_unmasks_the_gradient(digits, tmp_path) -> None:
    x, y = digits
    model = onnx_model(Quantized(demo_classifier()), tmp_path / "quantized.onnx", x)
    assert float(input_grad(model, x).abs().max()) == 0.0  # masked: Round's gradient is 0

    surrogate = build_surrogate(model)
    assert surrogate is not None
    assert surrogate.changes == ["Round at Round: straight-through gradient"]
    with torch.no_grad():
        assert torch.equal(surrogate.module(x), model(x))  # the forward is exactly the model's
    assert (input_grad(surrogate.module, x).flatten(1).abs().amax(dim=1) > 0).all()

    n = int((model(x).argmax(1) == y).sum())
    on_model, transferred = broken(model, surrogate.module, x, y, 0.2)
    assert on_model <= 0.1 * n  # observed 3 of 78
    assert transferred >= 0.9 * n  # observed 78 of 78


@pytest.mark.parametrize(
    ("how", "save", "change"),
    [("cast", "module", "Integer cast at to: straight-through gradient (its values read as floats)"),
     ("cast", "onnx", "Integer cast at Cast: straight-through gradient (its values read as floats)"),
     ("cast", "pt2", "Integer cast at to: straight-through gradient (its values read as floats)"),
     ("fmod", "module", "x - fmod(x, c) at sub: straight-through gradient (a step)"),
     ("fmod", "pt2", "x - fmod(x, c) at sub: straight-through gradient (a step)"),
     ("cast", "script", "Integer cast at to: straight-through gradient (its values read as floats)"),
     ("fmod", "script", "x - fmod(x, c) at sub: straight-through gradient (a step)")],
)  # fmt: skip
def test_quantization_by_integer_cast_or_fmod_gets_a_straight_through_surrogate(digits, tmp_path, how, save, change):
    x, y = digits
    module = QuantizedByArithmetic(demo_classifier(), how).eval()
    if save == "onnx":
        model = onnx_model(module, tmp_path / "quantized.onnx", x)
    elif save == "script":
        torch.jit.save(torch.jit.script(module), str(tmp_path / "quantized.pt"))
        model = wrap_model(load_model(tmp_path / "quantized.pt"), sample_shape=(1, 8, 8), probe=x[:8])[0]
    elif save == "pt2":
        path = tmp_path / "quantized.pt2"
        torch.export.save(torch.export.export(module, (torch.zeros(4, 1, 8, 8),)), str(path))
        model = wrap_model(load_model(path), sample_shape=(1, 8, 8), probe=x[:8])[0]
    else:
        model = torch_model(module, x)
    assert float(input_grad(model, x).abs().max()) == 0.0  # masked

    surrogate = build_surrogate(model)
    assert surrogate is not None and surrogate.changes == [change]
    with torch.no_grad():
        assert torch.equal(surrogate.module(x), model(x))  # the forward is exactly the model's
    assert (input_grad(surrogate.module, x).flatten(1).abs().amax(dim=1) > 0).all()
    if save == "module":
        n = int((model(x).argmax(1) == y).sum())
        on_model, transferred = broken(model, surrogate.module, x, y, 0.2)
        assert on_model <= 0.1 * n and transferred >= 0.9 * n  # as for Round (3 and 78 of 78)


# --- 2. a sharp final softmax ------------------------------------------------------------------


def test_sharp_softmax_is_removed_and_transfer_matches_apgd_on_the_plain_cnn(digits, tmp_path, plain_onnx) -> None:
    x, y = digits
    model = onnx_model(SharpSoftmax(demo_classifier()), tmp_path / "softmax.onnx", x)
    assert model.output_kind == "probabilities"

    surrogate = build_surrogate(model)
    assert surrogate is not None
    assert surrogate.changes == ["final Softmax removed (attacks see its input as logits)"]
    assert surrogate.module.output_kind == "logits"
    with torch.no_grad():
        scores = surrogate.module(x)
        assert torch.allclose(scores, 100 * plain_onnx(x), rtol=1e-5, atol=1e-3)  # the pre-softmax scores
        assert torch.equal(scores.argmax(1), model(x).argmax(1))

    on_model, transferred = broken(model, surrogate.module, x, y, 0.1)
    on_plain = int(attack(plain_onnx, APGD(loss="dlr"), x, y, 0.1).broken.sum())
    assert on_model <= 5  # observed 0 of 77: the log-probabilities are flat
    assert on_plain >= 30 and abs(transferred - on_plain) <= 2  # observed 42 and 42

    # The targeted form runs AutoAttack's APGD-T on the surrogate: what it reaches on the plain CNN.
    targeted = int(attack(model, Transfer(steps=50, targets=9, surrogate=surrogate.module), x, y, 0.1).broken.sum())
    on_plain_t = int(attack(plain_onnx, APGDTargeted(steps=50, n_targets=9, ranking="linear"), x, y, 0.1).broken.sum())
    assert on_plain_t >= on_plain and abs(targeted - on_plain_t) <= 2, (targeted, on_plain_t, on_plain)  # observed 45, 45 (42 untargeted)


class Squashed(nn.Module):
    """Monotone maps of the logits at the output: squashes, clamps, a max with a constant."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        if self.kind == "log_softmax":
            return F.log_softmax(z, dim=1)
        if self.kind == "safe_log":  # every unlikely class floors at log(1e-12): no gradient
            return torch.log(torch.softmax(z * 10, dim=1) + 1e-12) - 1.0
        if self.kind == "sigmoid":
            return 2 * torch.sigmoid(z).clamp(0.01, 0.99)
        shifted = z - z.amax(dim=1, keepdim=True)
        if self.kind == "tanh":
            return torch.tanh(10 * shifted)
        return torch.maximum(shifted, torch.tensor(-0.1))  # elementwise Max with a constant (ONNX Max)


@pytest.mark.parametrize(
    ("kind", "onnx", "expect", "scale"),
    [
        ("softmax-opset11", True, "final Softmax removed", 100.0),  # onnx2torch's OnnxSoftmaxV1V11
        ("log_softmax", False, "final LogSoftmax removed", 1.0),
        ("safe_log", False, "final Softmax, Add, Log, Sub removed", 10.0),
        ("safe_log", True, "final Softmax, Add, Log, Sub removed", 10.0),
        ("sigmoid", False, "final Sigmoid, Clamp [0.01, 0.99], Mul removed", 1.0),
        ("tanh", True, "final Tanh removed", None),
        ("max", True, "final Max removed", None),
    ],
)
def test_final_squash_forms_return_the_scores_before_them(
    digits, tmp_path, plain_onnx, kind, onnx, expect, scale
) -> None:
    x, _ = digits
    if kind == "softmax-opset11":
        model = onnx_model(SharpSoftmax(demo_classifier()), tmp_path / "m.onnx", x, opset=11)
    elif onnx:
        model = onnx_model(Squashed(demo_classifier(), kind), tmp_path / "m.onnx", x)
    else:
        model = torch_model(Squashed(demo_classifier(), kind), x)
    surrogate = build_surrogate(model)
    assert surrogate is not None and surrogate.changes[-1].startswith(expect), surrogate and surrogate.changes
    assert surrogate.module.output_kind == "logits"
    with torch.no_grad():
        scores, logits, out = surrogate.module(x), plain_onnx(x), model(x)
        # The surrogate's top class is a top class of the model (clamps and saturation create ties).
        assert torch.equal(out.gather(1, scores.argmax(1, keepdim=True)).squeeze(1), out.amax(dim=1))
        if scale is not None:
            assert torch.allclose(scores, scale * logits, rtol=1e-5, atol=1e-3)
        else:  # tanh and max follow a shift by the top logit: the scores are 10 (z - max z) or z - max z
            shifted = logits - logits.amax(dim=1, keepdim=True)
            assert torch.allclose(scores / scores.min() * shifted.min(), shifted, atol=1e-3)
    assert (input_grad(surrogate.module, x).flatten(1).abs().amax(dim=1) > 0).all()


# --- 3. saturations and randomness ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("mask", "eps", "change"),
    [(InputClip, 0.1, "Clamp [0, 1] at Clip: straight-through gradient"),
     (Binarized, 0.2, "Sigmoid at Sigmoid: gradient of its slope at 0 (0.25)")],
)  # fmt: skip
def test_saturating_layers_get_a_usable_backward(digits, tmp_path, plain_onnx, mask, eps, change) -> None:
    x, y = digits
    model = onnx_model(mask(demo_classifier()), tmp_path / "masked.onnx", x)
    surrogate = build_surrogate(model)
    assert surrogate is not None and surrogate.changes == [change]
    with torch.no_grad():
        assert torch.equal(surrogate.module(x), model(x))
    on_model, transferred = broken(model, surrogate.module, x, y, eps)
    # Observed: clamp 25 -> 42 at linf 0.1 (the plain CNN's 42); sigmoid 15 -> 46 at linf 0.2.
    assert transferred >= on_model + 15
    if mask is InputClip:
        assert transferred >= int(attack(plain_onnx, APGD(loss="dlr"), x, y, eps).broken.sum()) - 2


def test_torch_spellings_are_rewritten_and_activations_left_alone(digits) -> None:
    x, _ = digits
    model = torch_model(Forms(demo_classifier()), x)
    surrogate = build_surrogate(model)
    assert surrogate is not None
    assert sorted(surrogate.changes) == [
        "Clamp [0, 1] at clamp: straight-through gradient",
        "Floor at floor: straight-through gradient",
        "Hardtanh [0, 1] at hard, hardtanh: straight-through gradient",
        "Tanh at tanh: gradient of its slope at 0 (1)",
    ]
    with torch.no_grad():
        assert torch.equal(surrogate.module(x), model(x))
    # x in the box: the masked branch's gradient is the identity's (1/5 each, tanh's slope 3),
    # against zero for the floor and the clamps at pixels on the box faces.
    on_faces = (x == 0) | (x == 1)
    assert (input_grad(surrogate.module, x)[on_faces].abs() > 0).all()


@pytest.mark.parametrize(
    ("kind", "change"),
    [("gaussian", "random noise (randn_like) at randn_like: removed (replaced by its mean: 0)"),
     ("uniform", "random noise (rand_like) at rand_like: removed (replaced by its mean: 0.5)"),
     ("randn", "random noise (randn) at randn: removed (replaced by its mean: 0)"),
     ("normal", "random noise (normal) at normal: removed (replaced by its mean: its mean argument)"),
     ("bernoulli", "random noise (bernoulli) at bernoulli: removed (replaced by its mean: the probabilities)"),
     ("dropout", "dropout forced on at inference at dropout: removed (identity, its mean)")],
)  # fmt: skip
def test_randomness_is_replaced_by_its_mean(digits, kind, change) -> None:
    x, _ = digits
    model = torch_model(Noisy(demo_classifier(), kind), x)
    with torch.no_grad():
        assert not torch.equal(model(x[:8]), model(x[:8]))  # random: two calls differ
    surrogate = build_surrogate(model)
    assert surrogate is not None and surrogate.changes == [change]
    with torch.no_grad():
        first, second = surrogate.module(x), surrogate.module(x)
        assert torch.equal(first, second)
        assert torch.allclose(first, demo_classifier()(x), atol=1e-5)  # the noise-free CNN


def test_torch_export_graphs_use_aten_ops(digits, tmp_path) -> None:
    x, _ = digits
    for name, module, change in [
        ("quantized", Quantized(demo_classifier()), "Round at round"),
        ("noisy", Noisy(demo_classifier(), "gaussian"), "random noise (randn_like) at randn_like"),
    ]:
        path = tmp_path / f"{name}.pt2"
        torch.export.save(torch.export.export(module.eval(), (torch.zeros(4, 1, 8, 8),)), str(path))
        model = wrap_model(load_model(path), sample_shape=(1, 8, 8), probe=x[:8])[0]
        surrogate = build_surrogate(model)
        assert surrogate is not None and surrogate.changes[0].startswith(change), surrogate and surrogate.changes
        with torch.no_grad():
            expected = model(x) if name == "quantized" else demo_classifier()(x)
            assert torch.allclose(surrogate.module(x), expected, atol=1e-5)
        assert float(input_grad(surrogate.module, x).abs().max()) > 0


# --- 4. nothing to change, cannot trace, never modify the user's model ---------------------------


def test_no_surrogate_for_healthy_or_untraceable_models(digits, tmp_path, plain_onnx) -> None:
    x, _ = digits
    assert build_surrogate(plain_onnx) is None
    assert build_surrogate(torch_model(demo_classifier(), x)) is None
    assert build_surrogate(torch_model(Healthy(), x)) is None
    assert build_surrogate(torch_model(DataDependent(), x)) is None
    # TorchScript is converted to aten ops (tests/test_torchscript_certify.py); where torch's
    # converter cannot translate it (a data-dependent loop), None, no exception.
    path = tmp_path / "loop.torchscript.pt"
    torch.jit.script(DataDependentLoop().eval()).save(str(path))
    scripted = wrap_model(load_model(path), sample_shape=(1, 8, 8), probe=x[:8])[0]
    assert build_surrogate(scripted) is None


@pytest.mark.parametrize("source", ["onnx", "torch"])
def test_the_users_model_is_never_modified(digits, tmp_path, source) -> None:
    x, _ = digits
    if source == "onnx":
        model = onnx_model(Quantized(demo_classifier()), tmp_path / "quantized.onnx", x)
        code = model.net.code
    else:
        model = torch_model(Forms(demo_classifier()), x)
        code = torch.fx.symbolic_trace(model.net).code
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {name: type(m) for name, m in model.named_modules()}
    with torch.no_grad():
        before = model(x)

    surrogate = build_surrogate(model)
    assert surrogate is not None
    input_grad(surrogate.module, x)
    attack(model, Transfer(steps=10, surrogate=surrogate.module), x, digits[1], 0.1)

    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert {name: type(m) for name, m in model.named_modules()} == modules
    assert (model.net.code if source == "onnx" else torch.fx.symbolic_trace(model.net).code) == code
    assert all(not p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    if source == "onnx":
        assert float(input_grad(model, x).abs().max()) == 0.0  # still masked: the user's graph is untouched


# --- the transfer attack --------------------------------------------------------------------------


class Unqueried(nn.Module):
    """Stands in for the model the runner passes: the transfer attack must never call it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the transfer attack queried the model")


def test_transfer_attacks_the_surrogate_only_and_counts_its_passes(digits, tmp_path) -> None:
    x, y = digits
    model = onnx_model(Quantized(demo_classifier()), tmp_path / "quantized.onnx", x)
    surrogate = build_surrogate(model)
    assert surrogate is not None
    ctx = AttackContext(lower=0.0, upper=1.0, num_classes=10, generator=torch.Generator().manual_seed(0))

    idle = Transfer()
    assert torch.equal(idle.perturb(Unqueried(), x, y, Threat(norm="linf", eps=0.1), ctx), x)
    assert idle.params() == {"steps": 100, "loss": "dlr (margin below 3 classes)", "surrogate": False}
    assert idle.passes() == (0, 0)

    steps, n = 5, 16
    with torch.no_grad():
        keep = torch.nonzero(model(x).argmax(1) == y).flatten()[:n]
    transfer = Transfer(steps=steps, loss="ce", surrogate=surrogate.module)
    transfer.perturb(Unqueried(), x[keep], y[keep], Threat(norm="linf", eps=1e-4), ctx)  # too small to break any
    assert transfer.passes() == ((steps + 1) * n, steps * n)  # APGD's cost with nothing broken
    assert transfer.crossed is None  # breaking the surrogate is no claim about the model
    transfer.surrogate = surrogate.module  # replacing the surrogate keeps the running totals
    assert transfer.passes() == ((steps + 1) * n, steps * n)
    assert transfer.params() == {"steps": steps, "loss": "ce", "surrogate": True}

    before = transfer.passes()
    record = attack(model, transfer, x, y, 0.2).records[0]
    after = transfer.passes()
    assert record.name == "transfer" and record.broke > 0
    # The runner adds the attack's own (surrogate) passes; it makes none on the model.
    assert (record.forwards, record.backwards) == (after[0] - before[0], after[1] - before[1]) != (0, 0)
    with pytest.raises(ValueError, match="dlr and ce"):
        Transfer(loss="margin")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="targets must be a whole number"):
            Transfer(targets=bad)
    with pytest.raises(ValueError, match="needs targets = 0"):
        Transfer(loss="ce", targets=3)  # a loss the targeted run would silently ignore
    assert Transfer(steps=7, targets=3).params() == {
        "steps": 7, "loss": "dlr-targeted (targeted margin below 4 classes)", "surrogate": False, "targets": 3, "ranking": "linear",
    }  # fmt: skip


class _DetachedTrue(nn.Module):
    """Forward: the net exactly. Backward: only the low-resolution copy's (`h + (net(x) - h).detach()`)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(F.interpolate(F.avg_pool2d(x, 2), scale_factor=2.0, mode="nearest"))
        return h + (self.net(x) - h).detach()


@pytest.mark.parametrize("save", ["module", "torchscript"])
def test_detach_is_the_identity_in_the_surrogate(digits, tmp_path, save) -> None:
    """A detached true path hides the model's own gradient; BPDA takes detach as what it is in value, the identity.
    Before, the surrogate kept the detach (transfer `skipped`: nothing to smooth) and only the label-only probe
    saw through the model."""
    x, y = digits
    module = _DetachedTrue(demo_classifier()).eval()
    if save == "torchscript":
        path = tmp_path / "detached.pt"
        torch.jit.save(torch.jit.trace(module, torch.zeros(1, 1, 8, 8)), str(path))
        model = wrap_model(load_model(path), sample_shape=(1, 8, 8), probe=x[:8])[0]
    else:
        model = torch_model(module, x)
    surrogate = build_surrogate(model)
    assert surrogate is not None and any(c.startswith("detach at") for c in surrogate.changes), surrogate
    with torch.no_grad():
        assert torch.equal(surrogate.module(x), model(x))
    plain = torch_model(demo_classifier().eval(), x)
    assert torch.allclose(input_grad(surrogate.module, x), input_grad(plain, x), atol=1e-5)
    n = int((model(x).argmax(1) == y).sum())
    on_model, transferred = broken(model, surrogate.module, x, y, 0.2)
    assert transferred >= 0.9 * n and transferred > on_model, (on_model, transferred, n)


class _DetachedFill(nn.Module):
    """The CNN's scores times a factor passed to full_like as a number (`.detach()`): removing the detach
    (BPDA) leaves a tensor that requires grad where torch wants a number."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        return z * torch.full_like(z, (x[0, 0, 0, 0] + 1.0).detach())


def test_a_surrogate_that_cannot_run_backward_is_no_surrogate(digits, capsys) -> None:
    """Found by the soundness hunt of 2026-12-06: the surrogate built, then the transfer attack crashed the
    scan (exit 3, an internal TypeError, with fx's listing of the failing code on stderr). The surrogate is
    now run forward and backward once when built; the trust stage notes why there is none, quietly."""
    from robaudit.stages.trust import _surrogate

    x, _ = digits
    model = torch_model(_DetachedFill(demo_classifier()).eval(), x)
    with pytest.raises(RuntimeError, match="does not run with gradients .*full_like"):
        build_surrogate(model)
    surrogate, why = _surrogate(model)
    assert surrogate is None and why.startswith("no surrogate: RuntimeError: the rewritten graph does not run")
    assert "full_like" in why and "\n" not in why
    assert capsys.readouterr().err == ""
