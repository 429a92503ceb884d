"""Soundness of the certificate beyond the exact float64 network: activations the bound cannot
handle and casts that round are refused, and the deployed model's float32 rounding is bounded
rigorously (the bound is checked against real float32 evaluations, in the ball too)."""

from __future__ import annotations

import functools

import html
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import CiScan, load_json, run_cli
from robaudit.certify import CertificateUnavailable, certify_l2
from robaudit.certify.certificate import certify_with
from robaudit.certify.global_lipschitz import GlobalLipschitz
from robaudit.certify.graph import build_graph
from robaudit.certify.interval import IntervalBound
from robaudit.certify.ops import AffineOp
from robaudit.certify.rounding import BallError, ball_bounds, float32_error, interval_magnitudes
from robaudit.models import load_model, wrap_model
from robaudit.precision import NOTE as PRECISION_NOTE
from robaudit.precision import full_precision
from test_certify import Residual, check_sound, cnn, digits, double, fit, mlp

pytestmark = pytest.mark.usefixtures("one_thread")


class Lambda(nn.Module):
    """A net whose forward applies `fn` between two linear layers."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fn(self.fc1(x.flatten(1))))


def _refused(net: nn.Module) -> str:
    x, y = digits()
    with pytest.raises(CertificateUnavailable) as info:
        certify_l2(net.eval(), x[:4], y[:4])
    return str(info.value)


# --------------------------------------------------------------------------- activations


@pytest.mark.parametrize(
    "net, fragment",
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.LeakyReLU(-2.0), nn.Linear(16, 10)), "negative slope -2.0"),
        (Lambda(lambda h: F.leaky_relu(h, -0.5)), "negative slope -0.5"),
        (Lambda(lambda h: F.leaky_relu(h, negative_slope=-0.1)), "negative slope -0.1"),
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Softplus(beta=-1.0), nn.Linear(16, 10)), "beta -1.0"),
        (Lambda(lambda h: F.softplus(h, beta=-2.0)), "beta -2.0"),
        (Lambda(lambda h: F.softplus(h, 1.0, 1.0)), "threshold 1.0"),
        # exp(beta x) overflows float32 to inf past 88.72, before torch's switch to x at the threshold
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Softplus(threshold=1000.0), nn.Linear(16, 10)), "threshold 1000.0"),
        (Lambda(lambda h: F.softplus(h, 2.0, 100.0)), "overflows float32 to inf"),
    ],
)
def test_activations_the_bound_cannot_handle_are_refused(net: nn.Module, fragment: str) -> None:
    message = _refused(net)
    assert fragment in message
    if "slope" in fragment:
        assert "non-monotone" in message


def test_softplus_threshold_limits_match_torchs_float32_arithmetic() -> None:
    """The premise of the two limits: torch's float32 softplus is inf below a threshold of 1000, and its
    switch to x at a threshold of 88 stays within float32 rounding of the smooth curve."""
    from robaudit.certify.graph import SOFTPLUS_MAX_THRESHOLD

    assert torch.isinf(F.softplus(torch.tensor([89.0]), 1.0, 1000.0)).all()
    z = torch.linspace(0.0, SOFTPLUS_MAX_THRESHOLD, 10001)
    assert torch.isfinite(F.softplus(z, 1.0, SOFTPLUS_MAX_THRESHOLD)).all()
    exact = F.softplus(z.double(), 1.0, 1e9)
    assert ((F.softplus(z, 1.0, SOFTPLUS_MAX_THRESHOLD).double() - exact).abs() <= 2e-7 * exact.clamp_min(1.0)).all()


class _Cap:
    """A forward hook that caps a layer's outputs (picklable, like hooks saved with a whole module)."""

    def __init__(self, top: float) -> None:
        self.top = top

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.clamp_max(self.top)


def test_forward_hooks_are_refused_not_traced_away() -> None:
    """fx records a hooked layer as a plain call, so the graph would be the network without its hooks
    (found by the soundness hunt of 2026-12-05: a cap inactive on the first samples, which the graph
    check compares, made PGD break certified radii). Module hooks, pre-hooks and global hooks are refused."""
    x, y = digits()

    def hooked() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()

    net = hooked()
    net[1].register_forward_hook(_Cap(0.5))
    assert "forward hooks or replaced methods on 1 change what the network computes" in _refused(net)
    net = hooked()
    net[3].register_forward_pre_hook(lambda module, inputs: (inputs[0] * 2,))
    assert "forward hooks or replaced methods on 3" in _refused(net)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, output: output)
    try:
        assert "a global forward hook" in _refused(hooked())
    finally:
        handle.remove()
    certify_l2(hooked(), x[:4], y[:4])  # without hooks: certified as before


def _capped_forward(layer: nn.Linear, top: float, h: torch.Tensor) -> torch.Tensor:
    return F.linear(h, layer.weight, layer.bias).clamp_max(top)


def test_methods_replaced_on_one_module_are_refused() -> None:
    """A leaf module whose `forward` (or `_conv_forward`) is replaced on the instance, as accelerate's
    hooks and monkeypatches do, is traced as the plain layer and read by its weights: the replacement
    would not be in the graph (found by the soundness hunt of 2026-12-05, PGD broke radii at 0.72 R)."""
    x, y = digits()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    net[1].forward = functools.partial(_capped_forward, net[1], 0.5)
    assert "forward hooks or replaced methods on 1 (forward replaced)" in _refused(net)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)).eval()
    conv[0]._conv_forward = functools.partial(lambda layer, h, w, b: F.conv2d(h, w, b).clamp_max(0.5), conv[0])
    assert "on 0 (_conv_forward replaced)" in _refused(conv)


class TwoHeads(nn.Module):
    """Returns ((first head,), second head): the wrapper classifies with the second (the first tensor item)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU())
        self.first, self.second = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        return (self.first(h),), self.second(h)


def test_the_certified_output_is_the_one_the_wrapper_classifies_with() -> None:
    """A nested tuple is skipped by the wrapper; the bound used to enter it and certify the other head."""
    from robaudit.models import RawModel, wrap_model

    net = TwoHeads().eval()
    x = torch.rand((6, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    model, _ = wrap_model(RawModel(net, format="torch", input_shape=None, num_classes=None), sample_shape=(1, 4, 4), probe=x)
    second = nn.Sequential(net.body, net.second).eval()
    y = second(x).argmax(1)
    assert torch.equal(model(x).argmax(1), y)
    want = certify_l2(second, x, y).radius
    assert (want > 0).all() and torch.allclose(certify_l2(model, x, y).radius, want)


class DictHeads(TwoHeads):
    """Returns {"aux": first head, "logits": second head}: the wrapper classifies with "logits"."""

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        return {"aux": self.first(h), "logits": self.second(h)}


@pytest.mark.parametrize("kind", ["pt2", "script", "trace"])
def test_files_returning_a_dict_are_certified_on_the_output_they_classify_with(tmp_path, kind: str) -> None:
    """torch.export programs and converted TorchScript return a flat list from their graph and rebuild the
    dict around it; the bound used to take the first leaf ("aux") while the verdicts were about "logits"."""
    import warnings

    from robaudit.models import load_model, wrap_model

    net = DictHeads().eval()
    x = torch.rand((6, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    path = tmp_path / f"heads.{'pt2' if kind == 'pt2' else 'pt'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "pt2":
            batch = torch.export.Dim("batch", min=1)
            torch.export.save(torch.export.export(net, (x[:2],), dynamic_shapes=({0: batch},)), str(path))
        elif kind == "script":
            torch.jit.script(net).save(str(path))
        else:
            torch.jit.trace(net, x[:2], strict=False).save(str(path))
    model, _ = wrap_model(load_model(path), sample_shape=(1, 4, 4), probe=x)
    second = nn.Sequential(net.body, net.second).eval()
    y = second(x).argmax(1)
    assert torch.equal(model(x).argmax(1), y) and not torch.equal(net(x)["aux"].argmax(1), y)
    want = certify_l2(second, x, y).radius
    assert (want > 0).all() and torch.allclose(certify_l2(model, x, y).radius, want)


def test_nan_scores_are_named_as_such() -> None:
    """A model that returns NaN or inf on some samples gets a certificate refusal that says so (found by
    the soundness hunt: it used to be blamed on batch- or data-dependent behaviour)."""
    x, _ = digits()
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        net[1].weight.fill_(1e38)  # float32 overflows to inf on every digit
        assert torch.isinf(net(x[:4])).any()
    assert "returns NaN or infinite scores" in _refused(net)


def test_pruning_hooks_recompute_weights_and_are_certified() -> None:
    """torch.nn.utils.prune keeps its masked weight through a forward pre-hook that recomputes it from
    weight_orig and the mask, the same for every input: such a net is certified, with the radii of the
    same net after the pruning is made permanent."""
    import torch.nn.utils.prune as prune

    x, y = digits()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    prune.l1_unstructured(net[1], "weight", 0.5)
    with torch.no_grad():
        y = net(x[:8]).argmax(1)
    pruned = certify_l2(net, x[:8], y).radius
    prune.remove(net[1], "weight")
    assert not net[1]._forward_pre_hooks
    assert torch.equal(certify_l2(net, x[:8], y).radius, pruned) and bool((pruned > 0).any())


@pytest.mark.parametrize("slope", [0.2, 3.0])
def test_leaky_relu_radii_stay_below_attack_distances(slope: float) -> None:
    x, y = digits()
    net = fit(mlp(nn.LeakyReLU(slope), 32, 2), 150, lr=5e-3 if slope > 1 else 1e-2)
    x, y = x[:24], y[:24]
    cert = certify_l2(net, x, y)
    correct = net(x).argmax(1) == y
    assert correct.sum() >= 16 and (cert.radius[correct] > 0).all()
    check_sound(net, x, y, cert)


# --------------------------------------------------------------------------- casts


@pytest.mark.parametrize(
    "fn, dtype",
    [
        (lambda h: h.half().float(), "float16"),
        (lambda h: h.bfloat16().float(), "bfloat16"),
        (lambda h: h.to(torch.bfloat16).float(), "bfloat16"),
        (lambda h: h.to(dtype=torch.float16).float(), "float16"),
        (lambda h: h.type(torch.float16).float(), "float16"),
        (lambda h: h.type("torch.HalfTensor").float(), "float16"),
    ],
)
def test_casts_that_round_are_refused(fn, dtype: str) -> None:
    message = _refused(Lambda(fn))
    assert f"cast to {dtype}" in message and "Tensor." in message  # names the op


def test_casts_to_float32_and_float64_are_kept() -> None:
    x, y = digits()
    net = fit(Lambda(lambda h: torch.relu(h.double().float().to(torch.float32).contiguous())), 60)
    assert certify_l2(net, x[:4], y[:4], budget="fast").radius.shape == (4,)


class HalfRoundTrip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1)).half().float()))


def test_onnx_cast_to_float16_is_refused(tmp_path) -> None:
    import onnx

    x, y = digits()
    path = tmp_path / "half.onnx"
    torch.onnx.export(
        HalfRoundTrip().eval(), (torch.rand(2, 1, 8, 8),), str(path), input_names=["x"], dynamo=False,
        opset_version=17, dynamic_axes={"x": {0: "batch"}},
    )  # fmt: skip
    casts = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Cast"]
    assert any(a.i == onnx.TensorProto.FLOAT16 for n in casts for a in n.attribute if a.name == "to")
    model, _ = wrap_model(load_model(path), sample_shape=(1, 8, 8), probe=x[:4])
    with pytest.raises(CertificateUnavailable, match=r"OnnxCast: cast to float16"):
        certify_l2(model, x[:4], y[:4])


# --------------------------------------------------------------------------- float32 rounding


@pytest.mark.parametrize("name", ["mlp", "cnn", "residual-bn"])
def test_the_graph_checks_yardstick_covers_float32_margins_and_is_tighter_than_the_forward_bound(name: str) -> None:
    """`point_rounding` (what the graph checks allow) must hold for a faithful graph: every float32 margin within
    it of the exact one; and it must be much tighter than the forward bound, or deep nets' checks would see nothing."""
    from robaudit.certify.rounding import float32_values, pair_error, point_rounding, score_rounding

    x, _ = digits()
    net = _nets()[name]
    graph = build_graph(net, x[:1])
    gen = torch.Generator().manual_seed(1)
    points = torch.cat([x[:16], torch.rand((16, 1, 8, 8), generator=gen)])
    with torch.no_grad():
        f32, f64 = net(points).double(), double(net)(points.double())
    top = f64.argmax(1, keepdim=True)
    seen = ((f32.gather(1, top) - f32) - (f64.gather(1, top) - f64)).abs()
    charge = point_rounding(graph, points, top)
    assert (seen <= charge).all(), (seen / charge).max()
    assert all(v is not None for v in float32_values(graph, points))  # the graph runs in float32 (kink estimates)
    own = score_rounding(graph, graph.forward(points.double()))  # the checks' quick pass: one term of the charge
    pairs = torch.ones_like(charge, dtype=torch.bool).scatter(1, top, False)
    assert ((own.gather(1, top) + own) <= charge * (1 + 1e-12))[pairs].all()
    assert seen.max() > 0  # not vacuous: float32 rounds these margins
    lo, hi = ball_bounds(graph, points.double(), torch.zeros(len(points), dtype=torch.float64))
    forward = float32_error(graph, interval_magnitudes(lo, hi), (lo, hi))
    others = torch.arange(10).repeat(len(points), 1)
    assert (charge <= pair_error(forward, top.flatten(), others) + 1e-30).all()


class _TiePool(nn.Module):
    """Max pooling over a = x0 and b = x0 + x1 - x2, equal when x1 == x2: b rounds with x1's size, a barely."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(3, 2, bias=False), nn.Linear(1, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0, 0], [1.0, 1.0, -1.0]]))
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0], [0.5]]))
            self.head.bias.copy_(torch.tensor([0.0, 0.0, 0.1]))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.max_pool2d(self.fc(x.flatten(1)).view(-1, 1, 1, 2), (1, 2)).flatten(1))


def _on_a_kink(net: nn.Sequential, x: torch.Tensor, unit: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """`count` float32 points within a few ulps of where hidden unit `unit`'s pre-activation is 0 (float64)."""
    layer = double(net)[1]
    w = layer.weight[unit]
    x64 = x.double().flatten(1)
    x64 = x64 - (x64 @ w + layer.bias[unit])[:, None] * w / (w @ w)
    x32 = x64.float().view_as(x)
    ulp = torch.nextafter(x32, torch.full_like(x32, math.inf)) - x32
    return x32 + torch.randint(-3, 4, (count, *x.shape[1:]), generator=gen).float() * ulp


def test_the_graph_check_allows_float32_rounding_across_a_kink_or_a_max_pool_tie() -> None:
    """A faithful graph, refused (a red team's sweep): float32 rounding put a ReLU's input on the other side of 0
    than float64 (31x the first-order allowance, a tiny net on inputs in [0, 255]), or made the other entry of a
    max-pool tie win (695x). Such units are now charged the jump in slope times their input's error bound.
    And all-zero scores gave 0 / 0."""
    from robaudit.certify.fidelity import check_graph

    gen = torch.Generator().manual_seed(0)
    for hidden in (1, 2, 4):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).eval()
        x = torch.rand(1, 1, 8, 8, generator=gen) * 255
        points = _on_a_kink(net, x, 0, 256, gen)
        with torch.no_grad():  # the premise: float32 puts some of them on the other side of the kink
            z32, z64 = net[1](points.flatten(1))[:, 0], double(net)[1](points.flatten(1).double())[:, 0]
        assert bool(((z32 > 0) != (z64 > 0)).any())
        check_graph(build_graph(net, x), net, points)
    tie = _TiePool()
    x = torch.stack([torch.rand(64, generator=gen), *[torch.full((64,), 1000.0)] * 2], 1).view(64, 1, 1, 3)
    check_graph(build_graph(tie, x[:1]), tie, x)
    # every score exactly 0 (no biases, a black image): nothing rounds and nothing differs (was 0 / 0, refused)
    blank = nn.Sequential(nn.Flatten(), nn.Linear(64, 16, bias=False), nn.ReLU(), nn.Linear(16, 10, bias=False)).eval()
    x = torch.cat([torch.zeros(1, 1, 8, 8), torch.rand(3, 1, 8, 8, generator=gen)])
    check_graph(build_graph(blank, x[:1]), blank, x)


class _TinyVarianceNorm(nn.Module):
    """Scores through a batch norm whose `var + eps` is not a normal float32 (a red team's nets): the float32 model
    then loses 5e-4 of a margin of 1 (eps 1e-42) or a whole region flips (a negative variance that cancels eps)."""

    def __init__(self, eps: float, variance: float, weight: float) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(64, 2), nn.BatchNorm1d(2, eps=eps)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            self.fc.weight[0, 0] = weight
            self.bn.running_var.copy_(torch.tensor([variance, 1.0]))
            self.bn.bias.copy_(torch.tensor([0.0, 1.0]))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x.flatten(1)))


def test_batch_norm_whose_variance_plus_eps_is_not_a_normal_float32_is_refused() -> None:
    """The graph added eps in float64 where torch adds float32(eps): radii of 0.99997 broken at 0.99997 and below."""
    eps32 = float(torch.tensor(1e-5, dtype=torch.float32))
    ulp = eps32 * 2.0**-23
    cases = {
        "below float32's normal range": _TinyVarianceNorm(1e-42, 0.0, 1e-21),
        "negative running variance": _TinyVarianceNorm(1e-5, -eps32 + 128 * ulp, (128 * ulp) ** 0.5),
    }
    for why, net in cases.items():
        x = torch.zeros(1, 1, 8, 8)
        x[0, 0, 0, 0] = 2.0 if "normal range" in why else 0.0
        y = net(x).argmax(1)
        with pytest.raises(CertificateUnavailable, match=f"batch norm .*{why}"):
            certify_l2(net, x, y)
    fine = _TinyVarianceNorm(1e-5, 0.0, 1e-3)  # var 0 and an ordinary eps: certified as before
    x = torch.rand(4, 1, 8, 8)
    assert bool((certify_l2(fine, x, fine(x).argmax(1)).radius > 0).all())


def _nets() -> dict[str, nn.Module]:
    return {"mlp": fit(mlp(nn.ReLU(), 48, 2), 100), "cnn": fit(cnn(), 80), "residual-bn": fit(Residual(), 100)}


@pytest.mark.parametrize("name", ["mlp", "cnn", "residual-bn"])
def test_float32_error_bound_covers_real_float32_evaluations(name: str) -> None:
    x, _ = digits()
    net = _nets()[name]
    ref = double(net)
    graph = build_graph(net, x[:1])
    gen = torch.Generator().manual_seed(0)
    centres = torch.cat([x[:8], torch.rand((8, 1, 8, 8), generator=gen)])  # data and random inputs
    for radius in (0.0, 0.3, 1.0):
        r = torch.full((len(centres),), radius, dtype=torch.float64)
        lo, hi = ball_bounds(graph, centres.double(), r)
        mags = interval_magnitudes(lo, hi)
        for bound in (float32_error(graph, mags), float32_error(graph, mags, (lo, hi))):
            worst = torch.zeros_like(bound)
            for _ in range(16 if radius else 1):  # float32 points inside the ball
                d = torch.randn(centres.shape, generator=gen, dtype=torch.float64)
                scale = radius * 0.999 * torch.rand(len(centres), generator=gen, dtype=torch.float64)
                d = d * (scale / d.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
                points = (centres.double() + d).float()
                with torch.no_grad():
                    seen = (net(points).double() - ref(points.double())).abs()
                worst = torch.maximum(worst, seen)
                assert (seen <= bound).all(), (name, radius, (seen / bound).max())
            assert worst.max() > 0  # the check is not vacuous: float32 does round here
        if radius == 0.0:  # small next to the logits: the radii barely move
            scale = mags[-1].reshape(len(centres), -1).abs().amax(dim=1, keepdim=True)
            limit = 1e-2 if name == "residual-bn" else 1e-3  # worst case grows with depth and with BN's constants
            assert (bound / scale).max() < limit, (name, (bound / scale).max())


def test_radii_barely_change_for_the_float32_allowance(monkeypatch) -> None:
    x, y = digits()
    net = fit(mlp(nn.ReLU(), 48, 2), 100)

    def methods(graph, budget):  # the methods whose float32 allowance this test switches off
        return [IntervalBound(graph, budget), GlobalLipschitz(graph)]

    with_error = certify_with(net, x[:16], y[:16], methods, budget="fast").radius

    def nothing(self, batch, idx, alpha):
        return torch.zeros(len(idx), batch.others.shape[1], dtype=torch.float64)

    def no_ball_error(self, idx, radius):
        return torch.zeros(len(idx), self.others.shape[1], dtype=torch.float64)

    monkeypatch.setattr(BallError, "__call__", no_ball_error)
    monkeypatch.setattr(IntervalBound, "ball_error", nothing)
    without = certify_with(net, x[:16], y[:16], methods, budget="fast").radius
    ok = without > 0
    assert (with_error <= without).all()
    assert (with_error[ok] >= without[ok] * (1 - 1e-2)).all()


def _tie(net: nn.Module, last: nn.Linear) -> nn.Module:
    """Logits 1e4 + h_0 and 1e4 - 2^-9 + h_0: margin 2^-9 at every input, below float32's resolution there."""
    with torch.no_grad():
        last.weight.zero_()
        last.weight[:, 0] = 1.0
        last.bias.copy_(torch.tensor([1e4, 1e4 - 2.0**-9]))
    return net.eval()


@pytest.mark.parametrize("hidden", [False, True])
def test_margin_below_the_float32_error_certifies_nothing(hidden: bool) -> None:
    last = nn.Linear(2, 2)
    net = nn.Sequential(last)
    if hidden:  # a ReLU layer in front: the interval, closed-form and global methods instead of the linear one
        first = nn.Linear(2, 2)
        with torch.no_grad():
            first.weight.copy_(torch.eye(2))
            first.bias.zero_()
        net = nn.Sequential(first, nn.ReLU(), last)
    _tie(net, last)
    x = torch.tensor([[0.5, 0.25], [1.0, 2.0]])
    y = torch.zeros(2, dtype=torch.long)
    assert (net(x).argmax(1) == y).all() and (double(net)(x.double()).diff(dim=1) < 0).all()
    cert = certify_l2(net, x, y)
    assert (cert.radius == 0).all(), cert.radius


# --------------------------------------------------------------------------- small guards


def test_affine_op_without_abs_refuses_unless_declared_nonnegative() -> None:
    class Signed(AffineOp):
        def linear(self, x: torch.Tensor) -> torch.Tensor:
            return -x

    op = Signed("signed", (1, 3), (1, 3))
    for method in (op.abs, op.pos):
        with pytest.raises(NotImplementedError, match="Signed"):
            method()
    nonneg = Signed("copy", (1, 3), (1, 3), nonneg=True)
    assert nonneg.abs() is nonneg and nonneg.pos() is nonneg


def test_full_precision_disables_tf32_and_restores_the_flags() -> None:
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32, torch.get_float32_matmul_precision(),
              matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction)  # fmt: skip
    try:
        torch.set_float32_matmul_precision("high")
        cudnn.allow_tf32 = True
        matmul.allow_fp16_reduced_precision_reduction = True
        matmul.allow_bf16_reduced_precision_reduction = True
        set_ = (matmul.allow_tf32, cudnn.allow_tf32, "high", True, True)
        with pytest.raises(ValueError), full_precision():
            assert not matmul.allow_tf32 and not cudnn.allow_tf32
            assert torch.get_float32_matmul_precision() == "highest"
            assert not matmul.allow_fp16_reduced_precision_reduction and not matmul.allow_bf16_reduced_precision_reduction
            raise ValueError("restored even on error")
        now = (matmul.allow_tf32, cudnn.allow_tf32, torch.get_float32_matmul_precision(),
               matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction)  # fmt: skip
        assert now == set_
    finally:
        torch.set_float32_matmul_precision(before[2])
        matmul.allow_tf32, cudnn.allow_tf32 = before[0], before[1]
        matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction = before[3:]


# --------------------------------------------------------------------------- the report shows the notes


def test_every_renderer_shows_the_certificate_notes(ci_base: CiScan) -> None:
    report = load_json(ci_base.json)
    notes = report["summary"]["certificate"]["notes"]
    assert PRECISION_NOTE in notes and PRECISION_NOTE in report["model"]["notes"]
    assert any("float32 rounding error" in n for n in notes)
    markdown, page = ci_base.markdown.read_text(), ci_base.html.read_text()
    terminal = run_cli("report", ci_base.json)
    assert terminal.code == 0, terminal.stderr
    flat = " ".join(terminal.stdout.split())
    junit = html.unescape(ci_base.junit.read_text())  # JUnit's system-out, which CI systems show (a CLI review)
    for note in notes:
        assert f"- note: {html.escape(note, quote=False)}" in markdown
        assert f"note: {html.escape(note, quote=True)}" in page
        assert " ".join(f"note: {note}".split()) in flat, note
        assert f"note: {note}" in junit, note
    methods = ", ".join(f"{k} {v}" for k, v in report["summary"]["certificate"]["methods"].items())
    for shown in (markdown, page, flat, junit):  # which bound gave the radii, in every renderer
        assert "method that gave the radius" in shown and methods in shown, shown[-2000:]
    assert math.isfinite(report["summary"]["certificate"]["radius_quantiles"]["max"])


# --------------------------------------------------------------------------- in-place changes


class _InPlace(nn.Module):
    """A net that changes a value in place which a later layer reads (or, for "relu", nothing reads again)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 10)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if self.kind == "clamp_":  # the graph names x before and after: a bound would read the unclamped pixels
            with torch.no_grad():
                x.clamp_(0.0, 0.25)
        h = self.fc1(x)
        if self.kind == "mul_":
            g = h * 1.0
            g.mul_(3.0)
            return self.fc2(self.act(h)) + g.sum(1, keepdim=True)
        if self.kind == "iadd":
            g = h + 0.0
            g += 2.0
            return self.fc2(self.act(g + h))
        if self.kind == "view relu_":  # changes h through a view: fc2 reads h, half rectified, which fx names unchanged
            h[:, :8].relu_()
            return self.fc2(h)
        if self.kind == "view module":
            self.act(h[:, 8:])
            return self.fc2(h)
        if self.kind == "view after":  # a view of the changed value, taken after the change: nothing hidden
            a = self.act(h)
            return self.fc2(a.view(-1, 16))
        return self.fc2(self.act(h))


@pytest.mark.parametrize("kind", ["clamp_", "mul_", "view relu_", "view module"])
def test_in_place_changes_that_later_nodes_read_are_refused(kind: str) -> None:
    """Through a view the change reaches h, which fc2 reads: the bound read fc2(fc1(x)) with no ReLU, and broke."""
    assert "in place" in _refused(_InPlace(kind))


@pytest.mark.parametrize("kind", ["relu", "iadd", "view after"])
def test_in_place_ops_whose_old_value_nothing_reads_are_certified(kind: str) -> None:
    """nn.ReLU(inplace=True) after a layer (torchvision's nets) and `g += 2` (fx traces a plain add) change nothing hidden."""
    x, y = digits()
    net = _InPlace(kind).eval()
    pred = net(x[:4].clone()).argmax(1)
    assert certify_l2(net, x[:4], pred).radius.gt(0).any()


# --------------------------------------------------------------------------- float32 overflow


class _NearOverflow(nn.Module):
    """Scores K t and K (t + g), K = 0.99 of float32's largest value. The exact margin K g is huge, but 0.22 up
    on pixel 0 sends both scores to +inf in float32, and argmax of a tie picks class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.flatten(1)
        t, g = 0.3 + u[:, :1], 0.5 * (u[:, 1:2] - 0.15)
        return torch.cat([t, t + g], 1) * float(torch.finfo(torch.float32).max * 0.99)


def test_balls_where_float32_can_overflow_certify_nothing() -> None:
    x = 0.2 + 0.6 * torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x[:, 0, 0, :2] = 0.5
    net, y = _NearOverflow().eval(), torch.ones(6, dtype=torch.long)
    assert bool((net(x).argmax(1) == 1).all())
    moved = x.clone()
    moved[:, 0, 0, 0] += 0.22
    assert bool((net(moved).argmax(1) == 0).all()) and bool(net(moved).isinf().all())  # the break, at L2 0.22
    assert certify_l2(net, x, y).radius.max() < 0.22


# --------------------------------------------------------------------------- float32 underflow


def _linear_onnx(path, scale: float | None, folded: bool = True):
    """A linear digits classifier as an ONNX file: Gemm, optionally times `scale` (a tiny temperature); with
    `folded=False` its weight is MatMul(A, B) + C inside the graph, computed by the runtime."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 10, generator=gen) / 4).numpy()
    inits = [numpy_helper.from_array(torch.randn(10, generator=gen).numpy() / 10, "b")]
    nodes = [helper.make_node("Flatten", ["x"], ["f"])]
    if folded:
        inits.append(numpy_helper.from_array(w, "w"))
    else:
        a = torch.randn(64, 256, generator=gen).numpy()
        bm = torch.randn(256, 10, generator=gen).numpy()
        inits += [numpy_helper.from_array(a, "A"), numpy_helper.from_array(bm, "B"),
                  numpy_helper.from_array(w - (torch.from_numpy(a).double() @ torch.from_numpy(bm).double()).float().numpy(), "C")]  # fmt: skip
        nodes += [helper.make_node("MatMul", ["A", "B"], ["ab"]), helper.make_node("Add", ["ab", "C"], ["w"])]
    nodes.append(helper.make_node("MatMul", ["f", "w"], ["z"]))
    nodes.append(helper.make_node("Add", ["z", "b"], ["s" if scale else "y"]))
    if scale:
        inits.append(numpy_helper.from_array(torch.tensor(scale, dtype=torch.float32).numpy(), "t"))
        nodes.append(helper.make_node("Mul", ["s", "t"], ["y"]))
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], initializer=inits,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_scores_in_float32_underflow_certify_nothing(tmp_path) -> None:
    """Hunt 16: a linear classifier times 1e-42 (scores in float32's subnormal range) kept its radii, and
    onnxruntime tied two classes at 6.7e-43 inside 86 of 200 of them (argmax then picks the lower index): the
    error model's terms were all relative. Results below 2^-126 now carry an absolute error."""
    x, _ = digits()
    x = x[:8]
    plain, _ = wrap_model(load_model(_linear_onnx(tmp_path / "plain.onnx", None)), sample_shape=(1, 8, 8), probe=x)
    tiny, _ = wrap_model(load_model(_linear_onnx(tmp_path / "tiny.onnx", 1e-42)), sample_shape=(1, 8, 8), probe=x)
    y = plain(x).argmax(1)
    assert torch.equal(tiny(x).argmax(1), y)
    assert certify_l2(plain, x, y).radius.min() > 0.01  # the same classifier at ordinary scale: radii
    assert certify_l2(tiny, x, y).radius.max() == 0


def test_weights_the_graph_computes_by_a_reduction_are_refused(tmp_path) -> None:
    """Hunt 16: W = MatMul(A, B) + C inside the ONNX graph; onnxruntime sums A B in another order than torch did
    while tracing (1e-5 to 1e-4 apart), and 43 of 200 radii were broken in the file."""
    x, _ = digits()
    path = _linear_onnx(tmp_path / "computed.onnx", None, folded=False)
    model, _ = wrap_model(load_model(path), sample_shape=(1, 8, 8), probe=x[:4])
    with pytest.raises(CertificateUnavailable, match=r"MatMul.*a weight the graph computes from constants"):
        certify_l2(model, x[:4], model(x[:4]).argmax(1))


class _ExactWeights(nn.Module):
    """Weights the forward computes from parameters with exact ops only: abs, relu, a square, eye, a float64 cast."""

    def __init__(self, wide: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wide = wide  # the float64 head (an ONNX file then holds float64 weights: another matter)
        self.a = nn.Parameter(torch.randn(32, 64) / 8)
        self.b = nn.Parameter(torch.randn(10, 32) / 4)
        self.s = nn.Parameter(torch.rand(32) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1 = self.a.abs() - F.relu(self.a) + 0.1 * torch.eye(32, 64)
        h = F.relu(F.linear(x.flatten(1), w1, self.s.square()))
        return F.linear(h.double(), self.b.double()).float() if self.wide else F.linear(h, self.b)


def test_weights_computed_by_exact_ops_are_certified(tmp_path) -> None:
    """Hunt 17: abs, relu, square, eye and a float64 cast of parameters were refused as if they rounded like a sum."""
    x, _ = digits()
    net = _ExactWeights().eval()
    y = net(x[:8]).argmax(1)
    cert = certify_l2(net, x[:8], y)
    assert (cert.radius > 0).any()
    path = tmp_path / "exact.onnx"
    torch.onnx.export(_ExactWeights(wide=False).eval(), (x[:2],), str(path), input_names=["x"], dynamo=False, opset_version=17,
                      do_constant_folding=False, dynamic_axes={"x": {0: "batch"}})  # fmt: skip
    model, _ = wrap_model(load_model(path), sample_shape=(1, 8, 8), probe=x[:4])
    assert (certify_l2(model, x[:8], y).radius > 0).any()


# --------------------------------------------------------------------------- values fixed while tracing


class _ScaledByPixel(nn.Module):
    """Linear scores times a factor read from the first pixel through full_like (a soundness hunt of 2026-12-06)."""

    def __init__(self, method: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x.flatten(1))
        fill = x[0, 0, 0, 0] - 0.5
        return z * (z.new_full(z.shape, fill) if self.method else torch.full_like(z, fill))


@pytest.mark.parametrize("method", [False, True])
def test_a_fill_value_computed_from_the_input_is_refused(method: bool) -> None:
    """full_like / new_full were read as 'depends on the shape only', so the fill was frozen at the traced
    sample's value and the bound certified a linear model: moving the first pixel past 0.5 flips every
    score's sign inside the certified ball. A constant fill stays certified (test_certify_property)."""
    torch.manual_seed(0)
    assert "a tensor filled with a value computed from the input" in _refused(_ScaledByPixel(method))


class _Noisy(nn.Module):
    def __init__(self, draw) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.draw = draw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x.flatten(1))
        return z + 1e-4 * self.draw(z)


@pytest.mark.parametrize(
    "draw",
    [lambda z: torch.randn(1, 10), lambda z: torch.rand(10) - 0.5, lambda z: torch.empty(1, 10).normal_()],
    ids=["randn", "rand", "normal_"],
)
def test_noise_drawn_inside_forward_is_refused(draw) -> None:
    """torch.fx runs a call with no input-dependent argument while tracing and keeps its result as a constant:
    noise at 1e-4 of the scores (under the graph check's tolerance) was certified as one fixed draw, and points
    inside the certified ball were misclassified on most later runs. The caller's RNG is left as it was."""
    torch.manual_seed(0)
    net = _Noisy(draw)
    state = torch.random.get_rng_state()
    assert "changes from run to run on the same input (random draws" in _refused(net)
    assert torch.equal(torch.random.get_rng_state(), state)


class _WritesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.sub_(0.5)
        return self.fc(torch.relu(x).flatten(1))


@pytest.mark.parametrize("script", [False, True], ids=["module", "scripted"])
def test_a_net_that_writes_into_its_input_is_refused_saying_so(script: bool) -> None:
    """Refused, and the reason names the write: it was blamed on random draws or state kept between calls
    (red team 73), because every check ran on the one tensor the net had changed."""
    torch.manual_seed(0)
    net = torch.jit.script(_WritesInput()) if script else _WritesInput()
    reason = _refused(net)
    assert "writes into its input tensor in place" in reason, reason


def test_a_model_passed_in_training_mode_is_certified_in_eval_mode_and_says_so() -> None:
    """Dropout and batch statistics make a training-mode output random or batch-dependent: the radii are the
    eval-mode model's, the notes say so, and each submodule's mode is given back exactly as it was."""
    x, y = digits()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 10))
    evaluated = certify_l2(net.eval(), x[:8], y[:8], budget="fast")
    assert not any("training mode" in note for note in evaluated.notes)
    net.train()
    net[1].eval()  # a mixed state the caller set up
    cert = certify_l2(net, x[:8], y[:8], budget="fast")
    assert torch.equal(cert.radius, evaluated.radius)
    assert any("passed in training mode (the whole model)" in note and "eval mode" in note for note in cert.notes)
    assert net.training and not net[1].training and net[3].training
    net.eval()
    net[3].train()
    notes = certify_l2(net, x[:8], y[:8], budget="fast").notes
    assert any("passed in training mode (3)" in note for note in notes), notes
    assert not net.training and net[3].training


class _EmaAtInference(nn.Module):
    """Averaged weights without gradients (inference), the raw ones with them (training and attacks)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.ema = nn.Linear(64, 10), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fc if torch.is_grad_enabled() else self.ema)(x.flatten(1))


class _ScaleCache(nn.Module):
    """Scores scaled by the previous call's largest pixel: state kept between calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.last = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.flatten(1)) * self.last
        self.last = float(x.detach().abs().max()) + self.last
        return out


class _GradientInForward(nn.Module):
    """A step against its own input gradient (torch.enable_grad, which fx leaves out of the graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.net(xi).logsumexp(1).sum(), xi)
        return self.net(x - 0.1 * g)


@pytest.mark.parametrize(
    "make, fragment",
    [
        (_EmaAtInference, "its output with gradients on differs from its output without them"),
        (_ScaleCache, "state kept between calls"),
        (_GradientInForward, "the traced graph does not run as the network does (RuntimeError"),
    ],
    ids=["grad-mode-branch", "state", "autograd-in-forward"],
)
def test_forwards_that_depend_on_more_than_their_input_are_refused(make, fragment: str) -> None:
    """Found by the soundness hunt of 2026-12-06. The bound is built without gradients and the attacks run with
    them: a branch on torch.is_grad_enabled() was certified for the branch no attack sees (7 of 12 radii of a
    scan broken). A gradient step inside forward raised a bare RuntimeError (the scan's exit 3)."""
    torch.manual_seed(0)
    assert fragment in _refused(make())


def test_torch_layer_subclasses_with_their_own_forward_are_refused() -> None:
    """torch.ao.nn.qat.Linear / Conv2d are kept by fx as single calls and are instances of nn.Linear /
    nn.Conv2d, so they were read by their float weights, while their forward uses the weights rounded to the
    int8 grid (the soundness hunt of 2026-12-06 broke 12 of 23 radii of a scan). A torch layer subclass that
    keeps torch's forward (LazyLinear once materialized) is read as before."""
    import torch.ao.nn.qat as nnqat
    from torch.ao.quantization import get_default_qat_qconfig

    x, y = digits()
    torch.manual_seed(0)
    qconfig = get_default_qat_qconfig("x86")
    for layer, fragment in (
        (nnqat.Linear(64, 10, qconfig=qconfig), "torch.ao.nn.qat.modules.linear.Linear replaces Linear.forward"),
    ):
        net = nn.Sequential(nn.Flatten(), layer).train()
        net(x[:32])  # the observers see data, as in quantization-aware training
        assert fragment in _refused(net)
    conv = nnqat.Conv2d(1, 4, 3, qconfig=qconfig)
    net = nn.Sequential(conv, nn.Flatten(), nn.Linear(144, 10)).train()
    net(x[:32])
    assert "torch.ao.nn.qat.modules.conv.Conv2d replaces Conv2d.forward" in _refused(net)
    lazy = nn.Sequential(nn.Flatten(), nn.LazyLinear(10))
    lazy(x[:1])
    certify_l2(lazy.eval(), x[:4], y[:4], budget="fast")


@pytest.mark.parametrize(
    "c_in, c_out, kernel, stride, padding, dilation, groups, fast",
    [
        (16, 16, 3, 1, 1, 1, 1, True), (8, 32, (3, 5), 1, (1, 2), 1, 1, True), (4, 8, 3, 1, 0, 1, 1, True),
        (16, 8, 5, 1, 2, 1, 1, True), (3, 16, 3, 1, 1, 1, 1, False), (16, 16, 1, 1, 0, 1, 1, False),
        (16, 16, 3, 2, 1, 1, 1, False), (16, 16, 3, 1, 2, 2, 1, False), (16, 16, 3, 1, 1, 1, 4, False),
        (8, 8, 3, 1, 3, 1, 1, False),  # padding above k - 1: no transposed form
    ],
)
def test_the_faster_float64_convolution_computes_the_convolution(c_in, c_out, kernel, stride, padding, dilation, groups, fast) -> None:
    """ConvOp computes stride-1 convolutions as the input gradient of the transposed kernel (torch's float64 conv2d
    is several times slower): the same values up to float64 rounding, on exactly the geometries it claims."""
    from robaudit.certify.ops import ConvOp

    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups).double()
    x = torch.randn(5, c_in, 7, 9, dtype=torch.float64, generator=gen)
    out = conv._conv_forward(x, conv.weight, None)
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    op = ConvOp("conv", (1, c_in, 7, 9), (1, *out.shape[1:]), None, False, conv.weight.detach(), pair(stride),
                pair(padding), pair(dilation), groups)  # fmt: skip
    assert (op._transposed is not None) == fast
    got = op.linear(x[:, None]).reshape(out.shape)
    assert torch.allclose(got, out, rtol=1e-12, atol=1e-12 * float(out.abs().max()))
    back = torch.randn(out.shape, dtype=torch.float64, generator=gen)  # the adjoint: <A x, v> = <x, A^T v>
    lhs = (got * back).sum()
    rhs = (x * op.adjoint(back[:, None]).reshape(x.shape)).sum()
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-10)


class _OwnCall(nn.Module):
    """A class whose `__call__` negates the scores of inputs with a bright pixel: fx traces `forward` alone."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = super().__call__(x)
        return torch.where((x.flatten(1).amax(1) > 0.995)[:, None], -z, z)


def test_a_class_with_its_own_call_is_refused() -> None:
    """Certified as `forward`, a red team broke 17 of 24 such radii (pickled module, CLI exit 0 on 4 of 24)."""
    assert "__call__ replaced" in _refused(_OwnCall())
    inner = nn.Sequential(nn.Flatten(), _OwnCall().fc1, nn.ReLU(), nn.Linear(16, 10))
    holder = nn.Sequential(inner)
    holder[0].__class__ = type("Called", (nn.Sequential,), {"__call__": lambda self, x: -nn.Sequential.__call__(self, x)})
    assert "__call__ replaced" in _refused(holder)


class _ForgedHook:
    """A forward hook that says it is torch's pruning code (its own `__module__`), and moves scores in a region."""

    def __init__(self) -> None:
        self.__module__ = "torch.nn.utils.prune"

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out - 100.0 * (args[0].flatten(1)[:, :1] > 0.99).to(out.dtype)


class _RegionWeight(torch.Tensor):
    """A weight whose linear layer computes something else in one region (tensor subclasses can: torchao)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if func is F.linear and isinstance(out, torch.Tensor):
            return out.as_subclass(torch.Tensor) - 100.0 * (args[0][:, :1] > 0.99).to(out.dtype)
        return out


def test_forged_torch_hooks_and_tensor_subclass_weights_are_refused() -> None:
    """A red team's nets, radii broken where their change switches on (2 of 24, away from every probe): a hook
    whose `__module__` claimed torch's pruning code was trusted as torch's own, and a tensor-subclass weight read
    as plain numbers. Torch's real pruning hook still certifies."""
    hooked = mlp(nn.ReLU())
    hooked.register_forward_hook(_ForgedHook())
    assert "forward hooks" in _refused(hooked)
    region = mlp(nn.ReLU())
    region[1].weight = nn.Parameter(region[1].weight.detach().as_subclass(_RegionWeight), requires_grad=False)
    assert "tensor subclass" in _refused(region)
    pruned = mlp(nn.ReLU())
    import torch.nn.utils.prune as prune

    prune.l1_unstructured(pruned[1], "weight", amount=0.3)
    x, y = digits()
    keep = pruned(x[:8]).argmax(1) == y[:8]
    assert bool((certify_l2(pruned.eval(), x[:8][keep], y[:8][keep]).radius >= 0).all())


class Shifted(nn.Module):
    """`net` plus `offset` on every score: the same decisions and margins."""

    def __init__(self, net: nn.Module, offset: float, scale: float = 1.0) -> None:
        super().__init__()
        self.net, self.offset, self.scale = net, offset, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.net(x) + self.offset


class Ramp(nn.Module):
    """`net` plus `offset` on every score and a ramp of height `height` on pixel 0 past 0.2: the same scores on
    the digits (pixel 0 is 0), others off them."""

    def __init__(self, net: nn.Module, height: float, offset: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        self.net, self.height, self.offset, self.scale = net, height, offset, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = self.height * ((x.flatten(1)[:, :1] - 0.2) / 0.01).clamp(0, 1)
        return self.scale * self.net(x) + self.offset + ramp * torch.arange(10.0) / 9


@pytest.mark.parametrize(("height", "offset", "scale"), [(270.0, 0.0, 1.0), (0.9, 1000.0, 1.0), (2e-5, 0.0, 1e-4)])
def test_a_graph_that_leaves_the_model_off_its_centre_is_refused_inside_the_ball(height, offset, scale) -> None:
    """What torch's TorchScript converter once did: a graph equal to the model on the data, not in the balls.
    A constant added to every score must not widen the tolerance (it once was relative to the largest score), nor
    must small scores (a fixed floor of 1e-3 let a ramp of 2e-5 on scores of 1e-3 through)."""
    from robaudit.certify.fidelity import check_graph_in_balls

    x, y = digits()
    net = fit(mlp(nn.ReLU()), 30).eval()
    plain = Shifted(net, offset, scale)
    graph = build_graph(plain, x[:1])
    keep = net(x[:16]).argmax(1) == y[:16]
    radius = certify_l2(plain, x[:16][keep], y[:16][keep]).radius
    assert bool((radius > 0.3).any())  # balls wide enough to reach pixel 0 past 0.2 along some direction
    check_graph_in_balls(graph, plain, x[:16][keep], radius)  # the model the graph was built from: no complaint
    with pytest.raises(CertificateUnavailable, match="inside the certified balls .* does not reproduce the model's outputs"):
        check_graph_in_balls(graph, Ramp(net, height, offset, scale), x[:16][keep], radius)


class LogSoftmaxOf(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.net(x), dim=1)


def test_a_closing_log_softmax_of_large_scores_is_compared_in_full() -> None:
    """The graph checks skipped every log-probability below log(1e-20), which only returned probabilities
    need (the wrapper clamps them). On a closing log-softmax of scores x1000 every class but the top one
    is far below that, so a graph off by a ramp of 270 that keeps the top class passed (a helper's sweep).
    A log-softmax keeps its digits: it is compared in full now."""
    from robaudit.certify.fidelity import check_graph_in_balls

    x, y = digits()
    net = fit(mlp(nn.ReLU()), 30).eval()
    plain = LogSoftmaxOf(Shifted(net, 0.0, 1000.0))
    graph = build_graph(plain, x[:1])
    keep = net(x[:16]).argmax(1) == y[:16]
    radius = certify_l2(plain, x[:16][keep], y[:16][keep]).radius
    assert bool((radius > 0.3).any())
    check_graph_in_balls(graph, plain, x[:16][keep], radius)
    slipped = LogSoftmaxOf(Ramp(net, 270.0, 0.0, 1000.0))
    with torch.no_grad():  # the premise: the slip keeps the top class and every other log-probability below -46
        points = x[:16][keep]
        assert torch.equal(plain(points).argmax(1), slipped(points).argmax(1))
    with pytest.raises(CertificateUnavailable, match="inside the certified balls .* does not reproduce the model's outputs"):
        check_graph_in_balls(graph, slipped, x[:16][keep], radius)


class AlphaOps(nn.Module):
    """The same network written with `alpha` arguments, `rsub` and `unflatten` (`alpha=True`) or plain ops."""

    def __init__(self, alpha: bool) -> None:
        super().__init__()
        self.alpha = alpha
        self.a, self.b, self.head = nn.Linear(64, 16), nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        u, v = self.a(x), self.b(x)
        if self.alpha:
            h = torch.rsub(torch.add(u, v, alpha=0.5).sub(u, alpha=2), 1.0)
            return self.head(F.relu(h).unflatten(1, (2, 8)).flatten(1))
        h = 1.0 - ((u + 0.5 * v) - 2 * u)
        return self.head(F.relu(h).view(-1, 2, 8).flatten(1))


class AlphaConstant(nn.Module):
    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha, self.fc = alpha, nn.Linear(64, 10)
        self.register_buffer("shift", torch.linspace(0.1, 0.7, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(self.fc(x.flatten(1)), self.shift, alpha=self.alpha)


def test_alpha_arguments_rsub_and_unflatten_certify_like_the_plain_ops() -> None:
    """torch.add / sub with alpha, torch.rsub and unflatten were refused in plain modules (only their aten
    forms were read). They certify now, with the radii of the network written with plain ops; a constant
    times an alpha that float32 rounds is refused, since the sum the graph adds cannot show that rounding."""
    x, y = digits()
    x, y = x[:24], y[:24]
    plain = fit(AlphaOps(alpha=False), 60)
    written = AlphaOps(alpha=True)
    written.load_state_dict(plain.state_dict())
    reference = certify_l2(plain, x, y, budget="fast").radius
    assert int((reference > 0).sum()) >= 12
    cert = certify_l2(written, x, y, budget="fast")
    torch.testing.assert_close(cert.radius, reference, rtol=1e-9, atol=0)
    check_sound(written.eval(), x, y, cert)
    assert (certify_l2(AlphaConstant(2.0), x, y, budget="fast").radius >= 0).all()  # 2 x a float32 is a float32
    with pytest.raises(CertificateUnavailable, match="times alpha 0.1.*which float32 rounds"):
        certify_l2(AlphaConstant(0.1), x, y, budget="fast")
