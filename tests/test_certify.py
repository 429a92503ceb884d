"""Certified L2 radii (robaudit.certify): exactness, soundness against attacks and sampling, brute force.

Every model here is trained in the test on the bundled digits (a second or two each).
Soundness is checked three ways: no strong minimal-norm attack (FMN + DeepFool, no box)
finds an adversarial example closer than the certified radius; no point at 0.999 of the
radius (random, gradient and attack directions, and PGD inside the ball) changes the
decision; and on 2-D inputs the bound is above the brute-force maximum of the gradient
difference over a dense grid of the ball.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import bundled_digits, fixtures_dir
from robaudit.attacks.base import AttackContext
from robaudit.attacks.deepfool import DeepFool
from robaudit.attacks.fmn import FMN
from robaudit.certify import Certificate, CertificateUnavailable, certify_l2
from robaudit.certify.budget import BUDGETS
from robaudit.certify.certificate import _batch, certify_with
from robaudit.certify.closed_form import ClosedFormBound, hidden_layer
from robaudit.certify.graph import build_graph
from robaudit.certify.interval import IntervalBound
from robaudit.models import AuditModel, load_model, wrap_model
from robaudit.threats import Threat

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- helpers


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x_u8, y = bundled_digits()
    return torch.from_numpy(x_u8).float() / 255, torch.from_numpy(y).long()


def fit(model: nn.Module, steps: int, lr: float = 1e-2, seed: int = 0) -> nn.Module:
    """Full-batch Adam on the bundled digits: a real, imperfect model in about a second."""
    x, y = digits()
    torch.manual_seed(seed)
    for p in model.parameters():  # deterministic start whatever ran before
        if p.dim() > 1:
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
    for m in model.modules():  # biases too (torch's default init, seeded): drawn at construction, they followed
        weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)  # whatever tests ran before
        if isinstance(weight, torch.Tensor) and weight.dim() > 1 and isinstance(bias, torch.Tensor):
            bound = 1 / math.sqrt(weight[0].numel())
            nn.init.uniform_(bias, -bound, bound)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


def attack_distances(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Smallest adversarial L2 distance found by FMN and DeepFool without a box (inf if none)."""
    ctx = AttackContext(lower=-math.inf, upper=math.inf, num_classes=10, generator=torch.Generator().manual_seed(0))
    best = torch.full((len(x),), math.inf, dtype=torch.float64)
    for attack in (FMN(steps=300), DeepFool(steps=50, n_candidates=10)):
        adv = attack.perturb(model, x, y, Threat("l2", 1.0), ctx)
        with torch.no_grad():
            wrong = model(adv).argmax(1) != y
        dist = (adv - x).flatten(1).norm(dim=1).double()
        best = torch.where(wrong & (dist < best), dist, best)
    return best


def double(model: nn.Module) -> nn.Module:
    """A float64 copy: decisions near the certified radius must not depend on float32 noise."""
    copy_ = copy.deepcopy(model)
    if isinstance(copy_, AuditModel):
        copy_.dtype = torch.float64
    return copy_.double()


def assert_ball_keeps_decision(model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor) -> None:
    """Points at 0.999 x radius in random, gradient and PGD directions keep the label."""
    keep = radius > 0
    m64, x64, y, r = double(model), x[keep].double(), y[keep], radius[keep] * 0.999
    view = (-1,) + (1,) * (x.dim() - 1)

    def unit(d: torch.Tensor) -> torch.Tensor:
        return d / d.flatten(1).norm(dim=1).clamp_min(1e-30).view(view)

    def worst_margin(points: torch.Tensor) -> torch.Tensor:
        out = m64(points)
        return out.gather(1, y[:, None]).squeeze(1) - out.scatter(1, y[:, None], -math.inf).amax(1)

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(64):
            d = unit(torch.randn(x64.shape, generator=gen, dtype=torch.float64))
            assert (worst_margin(x64 + r.view(view) * d) > 0).all()
    # PGD inside the ball, starting along the gradient of the worst margin
    d = torch.zeros_like(x64, requires_grad=True)
    for step in range(60):
        (grad,) = torch.autograd.grad(worst_margin(x64 + d).sum(), d)
        with torch.no_grad():
            d = d - (r / 10).view(view) * unit(grad)
            d = d * (r / d.flatten(1).norm(dim=1).clamp_min(1e-30)).clamp(max=1).view(view)
        d.requires_grad_(True)
        if step == 0:
            with torch.no_grad():
                assert (worst_margin(x64 - r.view(view) * unit(grad)) > 0).all()
    with torch.no_grad():
        assert (worst_margin(x64 + d) > 0).all()


def check_sound(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cert: Certificate) -> torch.Tensor:
    """Certified radius <= every adversarial distance found; returns the attack distances."""
    dist = attack_distances(model, x, y)
    over = cert.radius > dist
    assert not over.any(), f"certified {cert.radius[over]} above adversarial distance {dist[over]}"
    assert_ball_keeps_decision(model, x, y, cert.radius)
    return dist


# --------------------------------------------------------------------------- models


class Residual(nn.Module):
    """Stem, one residual block and a small head, with every smooth activation the bound supports."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.fc1 = nn.Linear(6 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.bn(self.stem(x)), 0.1)
        h = F.softplus(h + self.conv2(torch.tanh(self.conv1(h))))
        h = F.avg_pool2d(h, 2).flatten(1)
        return self.fc2(torch.sigmoid(self.fc1(h)) - 0.5)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, stride=1, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def mlp(act: nn.Module, hidden: int = 32, layers: int = 1) -> nn.Module:
    dims = [64] + [hidden] * layers
    body: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(dims[:-1], dims[1:]):
        body += [nn.Linear(a, b), copy.deepcopy(act)]
    return nn.Sequential(*body, nn.Linear(dims[-1], 10))


# --------------------------------------------------------------------------- exactness


def test_linear_model_radius_is_the_exact_boundary_distance() -> None:
    x, y = digits()
    net = fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), steps=150)
    mean, std = torch.tensor(0.3), torch.tensor(0.4)
    model = AuditModel(net, sample_shape=(1, 8, 8), model_shape=(64,), mean=mean, std=std)
    model.eval()
    x, y = x[:60], y[:60]
    cert = certify_l2(model, x, y)

    m64, s64 = float(mean.double()), float(std.double())  # the float32 values the model holds
    w = net[1].weight.double() / s64  # pixel-space weights after (x - mean) / std
    logits = x.double().flatten(1) @ w.T + (net[1].bias.double() - m64 * w.sum(1))
    pred = logits.argmax(1)
    margin = logits.gather(1, y[:, None]) - logits
    norms = (w[y][:, None, :] - w[None, :, :]).norm(dim=2)
    exact = (margin / norms).masked_fill(F.one_hot(y, 10).bool(), math.inf).amin(1)
    right = pred == y
    assert right.sum() > 40
    # exact up to the float32 rounding allowance (rounding.py): never above, at most ~1e-4 below
    assert (cert.radius[right] <= exact[right] * (1 + 1e-9)).all()
    torch.testing.assert_close(cert.radius[right], exact[right], rtol=1e-6, atol=3e-4)
    assert all(m == "linear" for m, r in zip(cert.method, right.tolist()) if r)
    assert (cert.radius[~right] == 0).all() and all(m == "none" for m, r in zip(cert.method, right.tolist()) if not r)


def test_certificate_fields_progress_and_misclassified_samples() -> None:
    x, y = digits()
    net = fit(mlp(nn.ReLU(), 16, 2), steps=100)
    y_wrong = (y[:10] + 1) % 10
    done: list[int] = []
    cert = certify_l2(net, x[:10], y_wrong, batch_size=4, budget="fast", progress=done.append)
    assert done == [4, 4, 2]
    assert cert.radius.dtype == torch.float64 and cert.radius.shape == (10,)
    predicted = net(x[:10]).argmax(1)
    for i in range(10):
        if predicted[i] != y_wrong[i]:
            assert cert.radius[i] == 0 and cert.method[i] == "none"
    assert cert.seconds > 0 and cert.notes


# --------------------------------------------------------------------------- soundness on trained nets


@pytest.mark.parametrize("name", ["cnn", "residual", "relu-mlp"])
def test_radius_below_attacks_and_ball_keeps_the_decision(name: str) -> None:
    x, y = digits()
    build = {"cnn": lambda: fit(cnn(), 120), "residual": lambda: fit(Residual(), 150)}
    net = build.get(name, lambda: fit(mlp(nn.ReLU(), 48, 2), 150))()
    x, y = x[:32], y[:32]
    cert = certify_l2(net, x, y)
    correct = net(x).argmax(1) == y
    assert correct.sum() >= 24
    assert (cert.radius[correct] > 0).all()
    assert {m for m, c in zip(cert.method, correct.tolist()) if c} <= {"interval", "global-lipschitz", "closed-form", "crown"}
    dist = check_sound(net, x, y, cert)
    ok = correct & torch.isfinite(dist)
    assert (cert.radius[ok] / dist[ok]).median() > 0.05  # not only sound but useful


def test_one_hidden_layer_closed_form_beats_plain_propagation() -> None:
    x, y = digits()
    net = fit(mlp(nn.Tanh(), 32), steps=200)
    x, y = x[:40], y[:40]
    graph = build_graph(net, x[:1])
    hidden = hidden_layer(graph)
    assert hidden is not None
    closed = certify_with(net, x, y, lambda g, b: [ClosedFormBound(g, b, hidden)])
    plain = certify_with(net, x, y, lambda g, b: [IntervalBound(g, b, gram=False, zonotope=False)])
    both = certify_l2(net, x, y)
    correct = closed.radius > 0
    assert (closed.radius[correct] >= plain.radius[correct] * (1 - 1e-9)).float().mean() >= 0.8
    assert (both.radius >= closed.radius).all() and (both.radius >= plain.radius).all()
    for cert in (closed, plain):
        check_sound(net, x, y, cert)


# --------------------------------------------------------------------------- brute force in 2-D


def _grid_max(net: nn.Module, centre: torch.Tensor, alpha: float, c: int, steps: int = 301) -> torch.Tensor:
    """max over a dense grid of the disk of ||grad f_c - grad f_j||, for every j != c."""
    t = torch.linspace(-alpha, alpha, steps, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), dim=-1).reshape(-1, 2)
    pts = (centre + grid[grid.norm(dim=1) <= alpha]).requires_grad_(True)
    out = net(pts)
    norms = []
    for j in range(out.shape[1]):
        if j != c:
            (g,) = torch.autograd.grad((out[:, c] - out[:, j]).sum(), pts, retain_graph=True)
            norms.append(g.norm(dim=1).max())
    return torch.stack(norms)


@pytest.mark.parametrize("kind", ["deep-relu-tanh", "one-hidden-softplus", "one-hidden-sigmoid"])
def test_bound_covers_brute_force_gradient_maximum_on_2d_inputs(kind: str) -> None:
    torch.manual_seed(3)
    if kind == "deep-relu-tanh":
        layers = [nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.LeakyReLU(0.2)]
        net = nn.Sequential(*layers, nn.Linear(16, 3))
    else:
        act = nn.Softplus(beta=3.0) if kind == "one-hidden-softplus" else nn.Sigmoid()
        net = nn.Sequential(nn.Linear(2, 24), act, nn.Linear(24, 3))
    net = net.double().eval()
    centres = torch.randn(4, 2, dtype=torch.float64)
    graph = build_graph(net, centres[:1])
    labels = net(centres).argmax(1)
    batch = _batch(graph, centres, labels)
    methods = [IntervalBound(graph, BUDGETS["default"]), IntervalBound(graph, BUDGETS["fast"], gram=False)]
    hidden = hidden_layer(graph)
    if hidden is not None:
        methods.append(ClosedFormBound(graph, BUDGETS["default"], hidden))
    for alpha in (0.05, 0.3, 1.0):
        radii = torch.full((4,), alpha, dtype=torch.float64)
        brute = torch.stack([_grid_max(net, centres[i], alpha, int(labels[i])) for i in range(4)])
        for method in methods:
            bound = method.lipschitz(batch, torch.arange(4), radii)
            assert (bound >= brute).all(), (kind, method.name, alpha, bound, brute)
            if method.name == "closed-form" and alpha == 0.05:
                assert (bound <= 1.2 * brute).all()  # and tight on a small ball


# --------------------------------------------------------------------------- unsupported models


class Sine(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)


@pytest.mark.parametrize(
    "net, fragment",
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.GELU(), nn.Linear(16, 10)), "2: GELU"),
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 16), Sine(), nn.Linear(16, 10)), "2 (Sine): torch.sin"),
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softmax(dim=1), nn.Linear(10, 10)), "2: Softmax"),
    ],
)
def test_unsupported_layer_makes_the_certificate_unavailable(net: nn.Module, fragment: str) -> None:
    x, y = digits()
    with pytest.raises(CertificateUnavailable) as info:
        certify_l2(net.eval(), x[:4], y[:4])
    assert str(info.value).startswith("certificate unavailable: ")
    assert fragment in str(info.value)


def test_probability_outputs_are_unavailable() -> None:
    x, y = digits()
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    model = AuditModel(net, sample_shape=(1, 8, 8), model_shape=None, mean=None, std=None)
    model.output_kind = "probabilities"
    with pytest.raises(CertificateUnavailable, match="probabilities"):
        certify_l2(model, x[:4], y[:4])


def test_onnx_demo_model_certifies_like_its_torch_twin() -> None:
    from conftest import demo_classifier
    from robaudit.demo import demo_path

    x, y = digits()
    x, y = x[:12], y[:12]
    model, _ = wrap_model(load_model(demo_path()), sample_shape=(1, 8, 8), probe=x)
    onnx_cert = certify_l2(model, x, y, budget="fast")
    torch_cert = certify_l2(demo_classifier(), x, y, budget="fast")
    torch.testing.assert_close(onnx_cert.radius, torch_cert.radius, rtol=1e-9, atol=0)
    assert onnx_cert.method == torch_cert.method


def test_torch_export_program_certifies_like_its_module(tmp_path) -> None:
    x, y = digits()
    net = fit(cnn(), 40)
    batch = torch.export.Dim("batch")
    program = torch.export.export(net, (torch.zeros(4, 1, 8, 8),), dynamic_shapes={"input": {0: batch}})
    torch.export.save(program, str(tmp_path / "cnn.pt2"))
    model, _ = wrap_model(load_model(tmp_path / "cnn.pt2"), sample_shape=(1, 8, 8), probe=x[:8])
    exported = certify_l2(model, x[:8], y[:8], budget="fast")
    torch.testing.assert_close(exported.radius, certify_l2(net, x[:8], y[:8], budget="fast").radius, rtol=1e-9, atol=0)


# --------------------------------------------------------------------------- third-party fixtures


def _fixture_model(name: str, x: torch.Tensor) -> nn.Module:
    root = fixtures_dir()
    entry = json.loads((root / "manifest.json").read_text())["models"][name]
    mean = None if entry["mean"] == [0.0] else entry["mean"]
    std = None if entry["std"] == [1.0] else entry["std"]
    raw = load_model(root / entry["file"])
    model, _ = wrap_model(raw, sample_shape=tuple(x.shape[1:]), probe=x, mean=mean, std=std)
    return model


def test_mnistfc_radius_is_below_every_verified_counterexample() -> None:
    root = fixtures_dir()
    instances = np.load(root / "vnncomp" / "mnistfc_256x2.npz")
    found = np.load(root / "vnncomp" / "mnistfc_256x2_counterexamples.npz")
    x = torch.from_numpy(instances["x"]).float()
    y = torch.from_numpy(instances["y"]).long()
    pick = np.unique(found["index"])
    model = _fixture_model("mnistfc_256x2", x[:4])
    cert = certify_l2(model, x[pick], y[pick])
    radius = dict(zip(pick.tolist(), cert.radius.tolist()))
    dist = np.linalg.norm((found["x"] - instances["x"][found["index"]]).reshape(len(found["x"]), -1), axis=1)
    for i, d in zip(found["index"].tolist(), dist.tolist()):
        assert radius[i] < d, f"instance {i}: certified {radius[i]} but a counterexample lies at {d}"
    assert sum(r > 0 for r in radius.values()) >= len(pick) - 1


def test_every_fixture_model_certifies_or_names_its_layer() -> None:
    root = fixtures_dir()
    models = json.loads((root / "manifest.json").read_text())["models"]
    for name in models:
        data = root / "vnncomp" / f"{name}.npz"
        archive = np.load(data if data.exists() else root / "data" / "mnist_test_first100.npz")
        x, y = torch.from_numpy(archive["x"][:2]).float(), torch.from_numpy(archive["y"][:2]).long()
        model = _fixture_model(name, x)
        try:
            cert = certify_l2(model, x, y, budget="fast")
        except CertificateUnavailable as exc:
            assert str(exc).startswith("certificate unavailable: ") and len(str(exc)) > 30, (name, exc)
            continue
        assert torch.isfinite(cert.radius).all() and (cert.radius >= 0).all(), name
        correct = model(x).argmax(1) == y
        zero = correct & (cert.radius == 0)
        if zero.any():  # allowed only where the worst-case float32 allowance exceeds the margin at x itself
            graph = build_graph(model, x[:1])
            batch = _batch(graph, x[zero].double(), y[zero])
            at_x = batch.margins - batch.error(torch.arange(int(zero.sum())), torch.zeros(int(zero.sum())).double())
            assert (at_x.amin(dim=1) <= 0).all(), name


# ---------------------------------------------------------------- skipping an outclassed method


def _deep_narrow_mlp() -> nn.Module:
    """Eight ReLU layers of 24 units: CROWN's radius beats the interval method's everywhere."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten()]
    width = 16
    for _ in range(8):
        layers += [nn.Linear(width, 24), nn.ReLU()]
        width = 24
    return nn.Sequential(*layers, nn.Linear(24, 4)).eval()


def test_interval_skipped_after_first_batch_where_crown_outclasses_it():
    import dataclasses

    from robaudit.certify.budget import get_budget
    from robaudit.certify.certificate import default_methods

    net = _deep_narrow_mlp()
    x = torch.rand(40, 16, generator=torch.Generator().manual_seed(1))
    y = net(x).argmax(1)
    plan = dataclasses.replace(get_budget("fast"), crown_evals=10)
    split = certify_with(net, x, y, default_methods, batch_size=20, budget=plan)
    whole = certify_with(net, x, y, default_methods, batch_size=40, budget=plan)
    assert any(note.startswith("interval skipped after the first batch") for note in split.notes)
    assert not any("skipped" in note for note in whole.notes)  # one batch: nothing to skip on
    assert "methods tried: interval, global-lipschitz, crown" in split.notes  # the skipped one still listed
    assert set(split.method) == {"crown"}
    assert torch.equal(split.radius[:20], whole.radius[:20])  # the first batch ran every method
    # later batches: crown alone, its bisection started lower; within its tolerance of the full run
    assert bool((split.radius[20:] >= 0.95 * whole.radius[20:]).all())
    assert bool((split.radius > 0).all())


def test_first_batch_that_decides_the_skip_is_small():
    """With batches of 64, the first batch (every method runs there) is 32 samples, then 64 at a time."""
    import dataclasses

    from robaudit.certify.budget import get_budget
    from robaudit.certify.certificate import FIRST_BATCH, _batches, default_methods

    assert FIRST_BATCH == 32
    assert _batches(200, 32, 64) == [(0, 32), (32, 96), (96, 160), (160, 200)]
    net = _deep_narrow_mlp()
    x = torch.rand(80, 16, generator=torch.Generator().manual_seed(2))
    y = net(x).argmax(1)
    plan = dataclasses.replace(get_budget("fast"), crown_evals=10)
    done: list[int] = []
    split = certify_with(net, x, y, default_methods, batch_size=64, budget=plan, progress=done.append)
    assert done == [32, 48]
    first = certify_with(net, x[:32], y[:32], default_methods, batch_size=64, budget=plan)
    assert any(note.startswith("interval skipped after the first batch") for note in split.notes)
    assert torch.equal(split.radius[:32], first.radius)  # the first 32 samples were one batch with every method


def test_outclassed_rule():
    from robaudit.certify.certificate import OUTCLASSED, OUTCLASSED_MIN, outclassed

    crown = torch.full((OUTCLASSED_MIN,), 1.0, dtype=torch.float64)
    weak = crown / (OUTCLASSED * 1.01)
    assert outclassed({"interval": weak, "global-lipschitz": weak, "crown": crown}) == ["interval"]
    assert outclassed({"interval": weak}) == []  # no crown
    assert outclassed({"interval": weak[:-1], "crown": crown[:-1]}) == []  # too few samples
    close = weak.clone()
    close[3] = crown[3] / (OUTCLASSED * 0.99)  # one sample where the interval bound is not far behind
    assert outclassed({"interval": close, "crown": crown}) == []
    lost = crown.clone()
    lost[0] = 0.0  # crown certified nothing there
    assert outclassed({"interval": torch.zeros_like(crown), "crown": lost}) == []


def test_step_names_each_method_as_it_starts_on_a_batch():
    x, y = digits()
    net = fit(mlp(nn.ReLU(), 16, 2), steps=100)
    steps: list[str] = []
    cert = certify_l2(net, x[:10], y[:10], batch_size=4, budget="fast", step=steps.append)
    tried = next(note for note in cert.notes if note.startswith("methods tried: ")).removeprefix("methods tried: ")
    batches = 3  # 4 + 4 + 2 samples, every method on each (nothing skipped with so few samples)
    assert steps == tried.split(", ") * batches, steps


def test_the_report_reader_knows_every_certificate_method() -> None:
    """The report reader refuses a sample whose method is unknown: its list must be the certificate's own."""
    from robaudit.certify import METHODS
    from robaudit.report.schema import CERTIFIED_METHODS

    assert CERTIFIED_METHODS == (*METHODS, "none")
