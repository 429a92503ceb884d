"""CROWN's refined evaluations (`_polish`) and the radius one failed trial still proves.

`CrownBound.certified_within` turns one bound evaluation on an eps-ball into a radius
<= eps (the pass's linear form concretized at a smaller radius); `_polish` then spends a
few evaluations with every unstable unit refined backwards on deep nets. Both only
raise radii, so each is checked against attacks and probes inside the ball on a small
residual ReLU net with batch norm trained on the bundled digits.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from robaudit.certify.budget import get_budget
from robaudit.certify.certificate import _batch, certify_with
from robaudit.certify import crown as crown_module
from robaudit.certify.crown import CrownBound, first_order_radius
from robaudit.certify.graph import build_graph
import numpy as np

from conftest import fixtures_dir
from test_certify import _fixture_model, check_sound, digits, fit, mlp

pytestmark = pytest.mark.usefixtures("one_thread")


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + x)


def _resnet() -> nn.Module:
    """Stem, two residual blocks, a strided conv: five ReLU layers, as deep as the zoo's ResNet."""
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        _Block(6), _Block(6),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )  # fmt: skip
    return fit(net, steps=60)


def _crown_only(graph, budget):
    return [CrownBound(graph, budget)]


@pytest.fixture(scope="module")
def resnet_and_data():
    """The same net whatever ran before in this process (under xdist the order varies): `fit`
    redraws the weights but the biases come from the global generator at construction, and
    module fixtures start before `one_thread`, so both are pinned here."""
    x, y = digits()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        net = _resnet()
    finally:
        torch.set_num_threads(before)
    return net, x[:24].reshape(-1, 1, 8, 8), y[:24]


def test_a_failed_trial_still_certifies_and_its_radius_is_sound(resnet_and_data) -> None:
    net, x, y = resnet_and_data
    graph = build_graph(net, x[:1])
    batch = _batch(graph, x.double(), y)
    crown = CrownBound(graph, dataclasses.replace(get_budget("default"), crown_polish_evals=0))  # the bisection alone
    idx = torch.arange(len(x))
    keep = batch.margins.amin(1) > 0
    found = crown.radius(batch, idx, torch.zeros(len(x), dtype=torch.float64), first_order_radius(graph, batch))
    eps = torch.where(keep, 1.01 * found, 0.0)  # just above what the bisection proved: most trials fail
    lower = crown.margin_bounds(batch, idx, eps)
    got = crown.certified_within(batch, idx, eps)
    assert bool((got <= eps).all())
    assert bool((got[lower.amin(1) > 0] == eps[lower.amin(1) > 0]).all())  # a passed trial certifies itself
    failed = (lower.amin(1) <= 0) & keep & (got > 0)
    assert int(failed.sum()) >= 3, "the test needs trials that fail at eps but prove a smaller radius"
    assert bool((got[failed] < eps[failed]).all())
    # the linear form is the same bound: at eps it gives margin_bounds' numbers exactly
    ctx = crown._intermediate(batch, idx, eps)
    offset, slope = crown._backward(batch, idx, eps, len(graph.nodes) - 1, batch.rows[idx], ctx, linear=True)
    assert torch.equal(offset - eps[:, None] * slope, lower)
    radius = torch.zeros(len(x), dtype=torch.float64)
    radius[failed] = got[failed]
    check_sound(net, x, y, SimpleNamespace(radius=radius.float()))  # check_sound reads only the radii


def test_polish_raises_deep_net_radii_and_they_stay_sound(resnet_and_data) -> None:
    net, x, y = resnet_and_data
    default = get_budget("default")
    assert default.crown_polish_evals >= 1
    plain = certify_with(net, x, y, _crown_only, budget=dataclasses.replace(default, crown_polish_evals=0))
    polished = certify_with(net, x, y, _crown_only, budget=default)
    ok = plain.radius > 0
    assert int(ok.sum()) >= 20
    assert bool((polished.radius[ok] >= plain.radius[ok]).all())
    gain = polished.radius[ok] / plain.radius[ok]
    assert float(gain.median()) > 1.3, f"refined CROWN should prove clearly larger radii here, got {gain}"
    check_sound(net, x, y, polished)
    # over the work caps (dense and patches pass) the refined evaluations do not run: the plain radii exactly
    over = dataclasses.replace(default, crown_polish_work=0, crown_window_work=0)
    capped = certify_with(net, x, y, _crown_only, budget=over)
    assert torch.equal(capped.radius, plain.radius)


def test_refined_evaluations_start_cold_where_the_bisection_proves_nothing(monkeypatch) -> None:
    """The 9x200 ERAN MLP (third-party, natural training): the worst-case float32 rounding
    allowance, carried forward through nine layers, swamps the bisection's bounds at every
    radius, so it proves 0 everywhere; the refined evaluations then start from a fraction of
    the first-order radius instead of from nothing, and prove radii that attacks confirm."""
    archive = np.load(fixtures_dir() / "data" / "mnist_test_first100.npz")
    x, y = torch.from_numpy(archive["x"][:4]).float(), torch.from_numpy(archive["y"][:4]).long()
    model = _fixture_model("eran_mnist_relu_9_200", x)
    assert bool((model(x).argmax(1) == y).all())
    default = get_budget("default")
    plain = certify_with(model, x, y, _crown_only, budget=dataclasses.replace(default, crown_polish_evals=0))
    assert plain.radius.tolist() == [0.0] * 4
    trials = []
    inner = CrownBound.certified_within
    monkeypatch.setattr(CrownBound, "certified_within", lambda self, *a, **k: trials.append(1) or inner(self, *a, **k))
    polished = certify_with(model, x, y, _crown_only, budget=default)
    assert bool((polished.radius > 0.01).all()), polished.radius
    check_sound(model, x, y, polished)
    # the bisection gives up after BISECT_COLD trials that prove nothing; all of them change no radius
    assert len(trials) == crown_module.BISECT_COLD < default.crown_evals
    monkeypatch.setattr(crown_module, "BISECT_COLD", default.crown_evals)
    assert torch.equal(certify_with(model, x, y, _crown_only, budget=default).radius, polished.radius)


def test_a_trial_whose_reach_points_far_leaps_further(monkeypatch) -> None:
    """CIFAR-10 resnet_2b (third-party): a refined trial's linear form reaches 100x beyond it
    and the refined bound proves 3x more, so growing by `POLISH_GROW` alone leaves most
    of that unproved; the leap takes it, while trials leap up to `POLISH_EXTRA` more evaluations
    take more, and the radii stay below what attacks find. (Without the L2-ball coupling of
    `ball.py`, which on one of these two images proves the leap's radius in the bisection already.)"""
    instances = np.load(fixtures_dir() / "vnncomp" / "cifar10_resnet_2b.npz")
    x, y = torch.from_numpy(instances["x"][2:4]).float(), torch.from_numpy(instances["y"][2:4]).long()
    model = _fixture_model("cifar10_resnet_2b", x)
    budget = dataclasses.replace(get_budget("default"), crown_ball=False)
    # from the bisection's radius (on image 2 it proves one only after 6 trials: a cold start would skip it)
    monkeypatch.setattr(crown_module, "BISECT_COLD", budget.crown_evals)
    leaped = certify_with(model, x, y, _crown_only, budget=budget)
    monkeypatch.setattr(crown_module, "POLISH_EXTRA", 0)  # no evaluations beyond the budget's two
    two = certify_with(model, x, y, _crown_only, budget=budget)
    monkeypatch.setattr(crown_module, "POLISH_LEAP", crown_module.POLISH_GROW)
    steady = certify_with(model, x, y, _crown_only, budget=budget)
    assert bool((steady.radius > 0).all())
    assert bool((two.radius > 1.3 * steady.radius).all()), (two.radius, steady.radius)
    assert bool((leaped.radius > 1.5 * two.radius).all()), (leaped.radius, two.radius)  # leaping trials go on
    check_sound(model, x, y, leaped)


def test_after_a_jump_the_refined_evaluations_go_on(monkeypatch) -> None:
    """CIFAR-10 resnet_2b (third-party), test images 1 and 5: the refined radius is 10-30x the
    bisection's, and trials that keep growing it 2-3x are far from converged. Two more
    evaluations after each such jump (within `POLISH_EXTRA`) raise both radii by over 15%
    (image 5 after a trial above its radius failed), and attacks confirm them."""
    archive = np.load(fixtures_dir() / "data" / "cifar10_test_first100.npz")
    x, y = torch.from_numpy(archive["x"][[1, 5]]).float(), torch.from_numpy(archive["y"][[1, 5]]).long()
    model = _fixture_model("cifar10_resnet_2b", x)
    jumping = certify_with(model, x, y, _crown_only, budget="default")
    monkeypatch.setattr(crown_module, "POLISH_JUMP", float("inf"))
    plain = certify_with(model, x, y, _crown_only, budget="default")
    assert bool((plain.radius > 0).all())
    assert bool((jumping.radius > 1.15 * plain.radius).all()), (jumping.radius, plain.radius)
    check_sound(model, x, y, jumping)


def test_over_the_dense_cap_the_receptive_field_pass_refines_as_tightly(monkeypatch) -> None:
    """CIFAR-10 resnet_2b (third-party): with dense refinement over its work cap, the refined
    evaluations refine the conv units over their receptive fields (`patches.py`) and prove
    the dense radii to within 0.1% (only the L2-ball coupling of `ball.py` is left out), and
    attacks confirm them. Not vacuous: the patches pass runs."""
    calls = []
    inner = crown_module.backward_windows
    monkeypatch.setattr(crown_module, "backward_windows", lambda *a, **k: calls.append(1) or inner(*a, **k))
    instances = np.load(fixtures_dir() / "vnncomp" / "cifar10_resnet_2b.npz")
    x, y = torch.from_numpy(instances["x"][:2]).float(), torch.from_numpy(instances["y"][:2]).long()
    model = _fixture_model("cifar10_resnet_2b", x)
    default = get_budget("default")
    dense = certify_with(model, x, y, _crown_only, budget=default)
    assert not calls  # under the dense cap: the dense passes, as before
    windowed = certify_with(model, x, y, _crown_only, budget=dataclasses.replace(default, crown_polish_work=0))
    assert calls
    assert bool((dense.radius > 0).all())
    assert bool((windowed.radius >= 0.999 * dense.radius).all()), (windowed.radius, dense.radius)
    check_sound(model, x, y, windowed)


def test_polish_is_only_for_deep_nets() -> None:
    x, _ = digits()
    shallow = build_graph(mlp(nn.ReLU(), hidden=16, layers=2).eval(), x[:1])
    assert not CrownBound(shallow, get_budget("default")).deep  # behind one layer of relaxations: no refinement
    deep = build_graph(mlp(nn.ReLU(), hidden=16, layers=3).eval(), x[:1])
    bound = CrownBound(deep, get_budget("default"))
    assert bound.deep and bound.refine_cost > 0


def test_reach_of_one_linear_bound() -> None:
    nan = float("nan")
    offset = torch.tensor([[1.0, 1.0, 1.0, -1.0, nan, 0.0]], dtype=torch.float64)
    slope = torch.tensor([[nan, 0.0, 2.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    reach = CrownBound._reach(offset, slope, torch.tensor([10.0], dtype=torch.float64))
    # NaN slope or offset, negative or zero offset: nothing; no slope: the whole ball; else just below offset / slope
    assert reach[0, [0, 3, 4, 5]].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert float(reach[0, 1]) == 10.0
    assert 0.5 * (1 - 1e-11) < float(reach[0, 2]) < 0.5
