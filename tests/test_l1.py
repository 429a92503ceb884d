"""L1 threats: the projection and the sparse step the fixed-radius attacks use, and a real scan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import numpy as np

from robaudit.attacks.apgd_l1 import sparse_step, stage_plan
from robaudit.attacks.base import AttackContext, normalized_step, project, random_start
from robaudit.threats import Threat, perturbation_norms
from tests.conftest import REPO, assert_one_line_error, fixtures_dir, run_cli

DEMO = REPO / "robaudit" / "demo" / "digits_cnn.onnx"


@pytest.mark.parametrize("seed", range(5))
def test_l1_projection_and_start_stay_in_the_ball_and_the_box(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 3, 8, 8, generator=gen)
    threat = Threat(norm="l1", eps=3.0)
    far = x + 4 * torch.randn(x.shape, generator=gen)
    inside = project(far, x, threat, 0.0, 1.0)
    assert bool((perturbation_norms(inside - x, "l1") <= 3.0 + 1e-5).all())
    assert float(inside.min()) >= 0.0 and float(inside.max()) <= 1.0
    near = x + 1e-3 * torch.randn(x.shape, generator=gen)  # already inside: unchanged (up to the box)
    assert torch.allclose(project(near, x, threat, -1.0, 2.0), near)
    ctx = AttackContext(lower=0.0, upper=1.0, num_classes=10, generator=gen)
    start = random_start(x, threat, ctx)
    assert bool((perturbation_norms(start - x, "l1") <= 3.0 + 1e-5).all())


def test_the_l1_step_is_sparse_with_unit_l1_norm() -> None:
    grad = torch.randn(4, 1, 20, 20)
    step = normalized_step(grad, "l1")
    assert torch.allclose(step.flatten(1).abs().sum(dim=1), torch.ones(4))
    assert int((step[0] != 0).sum()) == 20  # 5% of 400 coordinates
    assert bool((step.sign() * grad.sign() >= 0).all())


def test_an_l1_scan_runs_end_to_end_and_gradient_attacks_break_points(tmp_path: Path) -> None:
    config = tmp_path / "l1.toml"
    config.write_text('threats = ["l1:2"]\n[[attacks]]\nattack = "apgd-ce"\nsteps = 100\n[[attacks]]\nattack = "apgd-t"\nsteps = 100\n')
    out = tmp_path / "r.json"
    result = run_cli("scan", DEMO, "--n", "24", "--config", config, "-q", "--json", out)
    assert result.code == 0, result.stderr
    report = json.loads(out.read_text())
    threat = report["summary"]["threats"][0]
    assert threat["threat"] == "l1:2" and threat["robust_accuracy"] < 0.5 * report["summary"]["clean_accuracy"]
    broken = [s["threats"]["l1:2"] for s in report["samples"] if s["threats"]["l1:2"]["broken_by"]]
    assert broken and all(0 < b["distance"] <= 2.0 + 1e-6 for b in broken)
    checks = {c["name"]: c["verdict"] for c in report["summary"]["diagnostics"]["checks"]}
    assert checks["unbounded"] == "pass"


def _reference_projection(v: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The exact projection of x + v onto the L1 ball around x within [0, 1], by a 200-step float64 bisection."""
    v, x = v.double().flatten(), x.double().flatten()
    room = torch.where(v >= 0, 1 - x, x)
    size = v.abs()
    if float(torch.minimum(size, room).sum()) <= eps:
        return x + v.sign() * torch.minimum(size, room)
    low, high = 0.0, float(size.max())
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if float(torch.minimum((size - mid).clamp_min(0), room).sum()) > eps else (low, mid)
    return x + v.sign() * torch.minimum((size - high).clamp_min(0), room)


@pytest.mark.parametrize("seed", range(3))
def test_the_l1_projection_is_the_exact_projection_onto_the_ball_within_the_box(seed: int) -> None:
    """Hunt 20: projecting onto the ball and clipping after is not the projection onto both, and under-spends eps."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(40):
        d = int(torch.randint(4, 300, (1,), generator=gen))
        x = torch.rand(1, d, generator=gen)
        x[0, : d // 3], x[0, d // 3 : d // 2] = 0.0, 1.0  # pixels at the box's ends, as in MNIST digits
        eps = float(torch.rand(1, generator=gen)) * 8
        target = x + 2 * torch.rand(1, generator=gen) * torch.randn(1, d, generator=gen)
        got = project(target, x, Threat("l1", eps), 0.0, 1.0)
        exact = _reference_projection(target - x, x, eps)
        assert float((got.double().flatten() - exact).abs().max()) < 1e-5
        assert float((got - x).abs().sum()) <= eps * (1 + 1e-6) and float(got.min()) >= 0 and float(got.max()) <= 1


def test_the_l1_budget_is_not_spent_on_pixels_the_box_cuts() -> None:
    x = torch.zeros(1, 1, 10, 10)
    x[..., 5:, :] = 0.5
    push = torch.ones_like(x)
    push[..., :5, :] = -3.0  # half the step pushes pixels at 0 below the box
    moved = project(x + push, x, Threat("l1", 10.0), 0.0, 1.0)
    assert float((moved - x).abs().sum()) == pytest.approx(10.0, rel=1e-6)  # clipping after the ball left nothing
    assert bool((moved[..., :5, :] == 0).all())


def test_the_l1_apgd_schedule_and_sparse_steps() -> None:
    assert stage_plan(100) == [(3.0, 30), (2.0, 30), (1.0, 40)] and stage_plan(5) == [(1.0, 5)]
    assert sum(n for _, n in stage_plan(57)) == 57
    grad = torch.randn(2, 1, 20, 20)
    step = sparse_step(grad, torch.tensor([0.05, 0.5]))
    assert torch.allclose(step.flatten(1).abs().sum(dim=1), torch.ones(2))
    assert [int((row != 0).sum()) for row in step] == [20, 200]
    assert bool((step.sign() * grad.sign() >= 0).all())
    top = grad[0].abs().flatten().topk(20).indices
    assert bool((step[0].flatten()[top] != 0).all())


def test_l1_apgd_breaks_mnist_digits_autoattack_broke_and_the_old_steps_missed(tmp_path: Path) -> None:
    """Hunt 20: on mnistfc_256x2 at l1:2, AutoAttack (L1-APGD) broke test digits 0 and 24; the whole `standard`
    battery, with dense APGD steps and a projection that clipped after the ball, left them robust. One 50-step
    APGD-CE run of the L1 algorithm breaks both, inside the ball and the box."""
    fixtures = fixtures_dir()
    mnist = np.load(fixtures / "data" / "mnist_test_first100.npz")
    data = tmp_path / "two.npz"
    np.savez(data, x=mnist["x"][[0, 24]], y=mnist["y"][[0, 24]])
    config = tmp_path / "l1.toml"
    config.write_text('threats = ["l1:2"]\n[[attacks]]\nattack = "apgd-ce"\nsteps = 50\n')
    out = tmp_path / "r.json"
    result = run_cli("scan", fixtures / "models" / "mnistfc_256x2.onnx", "--data", data, "--config", config, "--no-checks",
                     "-q", "--json", out)  # fmt: skip
    assert result.code == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["summary"]["clean_accuracy"] == 1.0 and report["summary"]["threats"][0]["robust_accuracy"] == 0.0
    assert all(0 < s["threats"]["l1:2"]["distance"] <= 2.0 for s in report["samples"])


@pytest.mark.parametrize("entry", ['attack = "apgd-ce"\nnorms = ["linf"]', 'attack = "square"'])
def test_a_threat_no_battery_entry_runs_under_is_refused(tmp_path: Path, entry: str) -> None:
    """Hunt 22: an audit file whose only entry was kept to linf reported 100% robust under l1:1 (trust checks PASS)."""
    config = tmp_path / "audit.toml"
    config.write_text(f'threats = ["l1:1"]\n[[attacks]]\n{entry}\n')
    assert_one_line_error(run_cli("scan", DEMO, "--n", "8", "--config", config, "-q"), "no attack of the battery runs under l1:1")


def test_fab_t_breaks_exactly_the_points_within_eps_on_a_linear_model() -> None:
    """FAB-T's box-aware linearized projection reaches the exact L1 distance of a linear model in the box,
    never claims a point farther away, and costs one forward and one backward pass per iteration."""
    from robaudit.attacks import AttackRun, run_threat
    from robaudit.attacks.counting import CountingModel
    from robaudit.attacks.fab import FABTargeted
    from tests.test_attacks import linear_problem
    from tests.test_minimal_norm import boxed_l1_distance

    model, x, y, _ = linear_problem(seed=8, k=2, n=60)
    w = model.weight[1 - y] - model.weight[y]
    margin = (model(x).gather(1, y[:, None]) - model(x).gather(1, (1 - y)[:, None])).squeeze(1)
    exact = torch.tensor([boxed_l1_distance(w[i], float(margin[i]), x[i]) for i in range(len(x))], dtype=torch.float64)
    eps = float(exact.median())
    outcome = run_threat(
        model, x, y, torch.ones(len(x), dtype=torch.bool), Threat("l1", eps), [AttackRun(FABTargeted(steps=20))],
        lower=0.0, upper=1.0, num_classes=2, batch_size=64, device=torch.device("cpu"), seed=0,
    )  # fmt: skip
    assert not bool((outcome.broken & (exact > eps)).any()), "broke a point that is provably robust"
    assert bool(outcome.broken[exact < 0.99 * eps].all())
    counted = CountingModel(model)
    far = exact > 2 * eps  # never broken: every iteration runs
    ctx = AttackContext(lower=0.0, upper=1.0, num_classes=2, generator=torch.Generator().manual_seed(0))
    FABTargeted(steps=20).perturb(counted, x[far], y[far], Threat("l1", eps), ctx)
    assert counted.backwards == 20 * int(far.sum()) and counted.forwards == 22 * int(far.sum())


def test_the_l1_projection_without_a_box() -> None:
    """Infinite room once made the projection's linear solve multiply inf by 0: NaN candidates."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 6, 6, generator=gen)
    target = x + 3 * torch.randn(x.shape, generator=gen)
    got = project(target, x, Threat("l1", 2.0), -float("inf"), float("inf"))
    assert bool(torch.isfinite(got).all())
    assert torch.allclose((got - x).flatten(1).abs().sum(dim=1), torch.full((8,), 2.0), rtol=1e-5)
    for i in range(8):  # the soft threshold of the plain L1 ball
        exact = _reference_projection(target[i] - x[i], torch.full_like(x[i], 0.5), 2.0) - 0.5  # room 0.5 > any move
        moved = (got[i] - x[i]).double().flatten()
        if float(exact.abs().max()) < 0.5:
            assert float((moved - exact).abs().max()) < 1e-5
