"""PGD and the runner on models whose answers are known in closed form."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from robaudit.attacks import PGD, Attack, AttackContext, AttackRun, run_threat
from robaudit.attacks.counting import CountingModel
from robaudit.threats import Threat, parse_threat


def linear_problem(seed: int = 0, n: int = 200, d: int = 20, k: int = 5):
    """A random linear classifier, inputs labelled by its own decisions, and exact distances."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, k)
    with torch.no_grad():
        model.weight.copy_(torch.randn(k, d, generator=g))
        model.bias.copy_(torch.randn(k, generator=g))
    model.eval().requires_grad_(False)
    x = torch.rand(n, d, generator=g)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    w = model.weight
    diff = w[y][:, None, :] - w[None, :, :]  # (n, k, d): w_y - w_j
    margin = logits.gather(1, y[:, None]) - logits  # (n, k)
    mask = torch.nn.functional.one_hot(y, k).bool()
    dist = {}
    for norm, dual in (("linf", 1), ("l2", 2)):
        d_j = margin / diff.norm(p=dual, dim=2).clamp_min(1e-12)
        dist[norm] = d_j.masked_fill(mask, float("inf")).amin(1)
    return model, x, y, dist


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_breaks_points_closer_than_eps_and_never_farther(norm: str) -> None:
    model, x, y, dist = linear_problem()
    eps = float(dist[norm].median())
    threat = Threat(norm=norm, eps=eps)
    # A box far away from the data, so the closed-form (unboxed) distances are exact.
    outcome = run_threat(
        model, x, y, torch.ones(len(x), dtype=torch.bool), threat, [AttackRun(PGD(steps=100))],
        lower=-100.0, upper=100.0, num_classes=5, batch_size=64, device=torch.device("cpu"), seed=0,
    )  # fmt: skip
    true_dist = dist[norm]
    assert not bool((outcome.broken & (true_dist > eps)).any()), "broke a point that is provably robust"
    clearly_inside = true_dist < 0.9 * eps
    assert bool(outcome.broken[clearly_inside].all())
    found = outcome.distance[outcome.broken]
    assert bool((found >= true_dist[outcome.broken].double() * (1 - 1e-4)).all())


class LyingAttack(Attack):
    """Returns points outside the ball, or non-adversarial points: the runner must reject all."""

    name = "liar"

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def params(self) -> dict[str, Any]:
        return {"mode": self.mode}

    def perturb(self, model, x, y, threat, ctx):
        if self.mode == "far":
            return x + 10 * threat.eps  # the runner projects, so this becomes a legal point
        return x.clone()  # the clean point: not adversarial


def test_runner_counts_only_verified_examples() -> None:
    model, x, y, dist = linear_problem(seed=1)
    threat = Threat(norm="linf", eps=1e-4)
    outcome = run_threat(
        model, x, y, torch.ones(len(x), dtype=torch.bool), threat, [AttackRun(LyingAttack("far")), AttackRun(LyingAttack("same"))],
        lower=-100.0, upper=100.0, num_classes=5, batch_size=64, device=torch.device("cpu"), seed=0,
    )  # fmt: skip
    # Only points within 1e-4 of the boundary (after projection) can be broken, and each one verified.
    assert not bool((outcome.broken & (dist["linf"] > threat.eps)).any())
    assert outcome.records[1].broke == 0


def test_pgd_costs_one_forward_and_backward_per_iteration() -> None:
    model, x, y, _ = linear_problem(seed=2, n=50)
    counted = CountingModel(model)
    ctx = AttackContext(lower=-100.0, upper=100.0, num_classes=5, generator=torch.Generator().manual_seed(0))
    tiny = Threat(norm="linf", eps=1e-6)  # nothing breaks: every point runs every step
    PGD(steps=20).perturb(counted, x, y, tiny, ctx)
    assert counted.backwards == 20 * len(x)
    assert counted.forwards == 21 * len(x)  # one extra forward checks the last iterate


def test_restarts_only_attack_points_still_robust() -> None:
    model, x, y, dist = linear_problem(seed=3)
    eps = float(dist["l2"].median())
    outcome = run_threat(
        model, x, y, torch.ones(len(x), dtype=torch.bool), Threat(norm="l2", eps=eps), [AttackRun(PGD(steps=5), restarts=3)],
        lower=-100.0, upper=100.0, num_classes=5, batch_size=64, device=torch.device("cpu"), seed=0,
    )  # fmt: skip
    record = outcome.records[0]
    per_run = 6 * 1  # forwards per point per run at most (5 steps + final check)
    assert record.forwards < 3 * per_run * len(x)  # later restarts skipped broken points
    assert record.broke == int(outcome.broken.sum())


def test_misclassified_points_are_never_attacked() -> None:
    model, x, y, _ = linear_problem(seed=4, n=40)
    clean_correct = torch.zeros(len(x), dtype=torch.bool)
    outcome = run_threat(
        model, x, y, clean_correct, parse_threat("linf:0.5"), [AttackRun(PGD(steps=3))],
        lower=-100.0, upper=100.0, num_classes=5, batch_size=16, device=torch.device("cpu"), seed=0,
    )  # fmt: skip
    assert not bool(outcome.broken.any()) and outcome.records[0].forwards == 0


def test_threat_parsing_canonical_names() -> None:
    assert parse_threat("linf:8/255").canonical == "linf:0.0313725"
    assert parse_threat("L2:0.5").canonical == "l2:0.5"
    assert parse_threat("linf:8/255").same_as(parse_threat("linf:0.03137254901960784"))


def test_attacks_are_never_called_with_an_empty_batch() -> None:
    model, x, y, _ = linear_problem(seed=5, n=20)

    class Strict(LyingAttack):
        def perturb(self, model, x, y, threat, ctx):
            assert len(x) > 0, "an attack was handed an empty batch"
            return x

    nobody = torch.zeros(len(x), dtype=torch.bool)  # every point misclassified: nothing left to attack
    outcome = run_threat(
        model, x, y, nobody, parse_threat("linf:0.1"), [AttackRun(Strict("same"), restarts=2)],
        lower=-100.0, upper=100.0, num_classes=5, batch_size=8, device=torch.device("cpu"), seed=0,
    )  # fmt: skip
    assert outcome.records[0].attempted == 0 and outcome.records[0].forwards == 0


class _Threshold(nn.Module):
    """Class 1 iff pixel (0, 0, 0) rises more than `gap` above 0.5: the true distance is `gap` in every norm."""

    def __init__(self, gap: float) -> None:
        super().__init__()
        self.register_buffer("gap", torch.tensor(gap, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = (x[:, 0, 0, 0] - 0.5) - self.gap
        return torch.stack([torch.zeros_like(v), v * 1000], 1)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize(("gap", "eps", "robust"), [(1.0005e-5, 1e-5, True), (0.99e-5, 1e-5, False), (2e-7, 1e-7, True)])
def test_tiny_radii_accept_only_examples_inside_the_ball(norm: str, gap: float, eps: float, robust: bool) -> None:
    """At eps 1e-5, float32 rounding of x + eps overshoots by up to 1.3e-8 (x near 0.5), and an absolute 1e-6
    slack accepted points 10% outside the ball: a model robust at eps was reported broken. Candidates are now
    pulled inside the ball, and only those count."""
    import robaudit

    gen = torch.Generator().manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(12, 1, 8, 8, generator=gen)
    x[:, 0, 0, 0] = 0.5
    report = robaudit.audit(_Threshold(gap).eval(), (x, torch.zeros(12, dtype=torch.long)), threats=[f"{norm}:{eps}"],
                            preset="quick", certify=False, indicator=False)
    assert report.summary.threats[0].robust_accuracy == (1.0 if robust else 0.0)
    for s in report.samples:
        entry = next(iter(s.threats.values()))
        assert entry.distance is None or not entry.robust or entry.distance > eps
        if not entry.robust:
            assert entry.distance <= eps * (1 + 1e-5)


def test_a_distance_is_the_float64_norm_of_the_difference_never_above_eps() -> None:
    """Hunt 20: the float32 difference 0.0509999 - 0.001 rounds to float32(0.05) = 0.0500000007, so a report
    once gave a linf:0.05 example the distance 0.05000000074505806, above eps (the example itself was inside)."""
    x = torch.tensor([[0.001]])
    candidate = torch.tensor([[0.052]])
    while float(candidate.double() - x.double()) > 0.05:  # the farthest float32 inside the ball
        candidate = torch.nextafter(candidate, torch.tensor([[0.0]]))
    assert float(candidate - x) > 0.05 >= float(candidate.double() - x.double())  # float32 arithmetic says outside

    class Fixed(LyingAttack):
        def perturb(self, model, x, y, threat, ctx):
            return candidate.expand_as(x).clone()

    model = nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        model.bias.copy_(torch.tensor([0.0505, -0.0505]))
    model.eval().requires_grad_(False)
    outcome = run_threat(
        model, x, torch.tensor([0]), torch.ones(1, dtype=torch.bool), Threat(norm="linf", eps=0.05),
        [AttackRun(Fixed("fixed"))], lower=0.0, upper=1.0, num_classes=2, batch_size=8, device=torch.device("cpu"), seed=0,
    )  # fmt: skip
    assert bool(outcome.broken[0]) and float(outcome.distance[0]) <= 0.05
    assert float(outcome.distance[0]) == float(outcome.x_adv.double()[0, 0] - x.double()[0, 0])


class _BroadcastGradient(nn.Module):
    """Scores computed without gradients, plus 0 * x.sum(): autograd's input gradient is one zero broadcast to
    the input's shape (stride 0), which the attacks' in-place `sign_` and indexed writes refused (exit 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scores = self.lin(x)
        return scores + 0 * x.sum(1, keepdim=True)


@pytest.mark.parametrize("name", ["fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fmn", "deepfool", "fab-t"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_gradient_attacks_take_a_broadcast_zero_gradient(name: str, norm: str) -> None:
    from robaudit.battery import build_battery

    torch.manual_seed(0)
    model = _BroadcastGradient().eval()
    x = torch.rand(6, 20)
    with torch.no_grad():
        y = model(x).argmax(1)
    with warnings.catch_warnings():  # torch deprecates writing into expanded tensors (apgd did)
        warnings.filterwarnings("error", message=".*expanded tensors.*")
        outcome = run_threat(
            model, x, y, torch.ones(len(x), dtype=torch.bool), parse_threat(f"{norm}:0.1"),
            build_battery([{"attack": name, "steps": 3} if name != "fgsm" else {"attack": name}]),
            lower=0.0, upper=1.0, num_classes=5, batch_size=8, device=torch.device("cpu"), seed=0,
        )  # fmt: skip
    assert outcome.broken.shape == (6,)
