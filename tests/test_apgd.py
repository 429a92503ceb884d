"""APGD-CE/DLR, APGD-T and FGSM: schedule, losses, closed-form problems, cost and strength."""

from __future__ import annotations

import math
from importlib import resources

import numpy as np
import pytest
import torch
from torch import nn

from conftest import demo_classifier
from robaudit.attacks import PGD, AttackContext, AttackRun, run_threat
from robaudit.attacks.apgd import APGD, APGDTargeted, apgd_run, checkpoint_schedule
from robaudit.attacks.counting import CountingModel
from robaudit.attacks.fgsm import FGSM
from robaudit.attacks.losses import LOSSES, cross_entropy, dlr, dlr_targeted, get_loss, margin
from robaudit.threats import Threat, perturbation_norms, within_ball
from test_attacks import linear_problem

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def ctx_for(num_classes: int, lower: float = -100.0, upper: float = 100.0, seed: int = 0) -> AttackContext:
    generator = torch.Generator().manual_seed(seed)
    return AttackContext(lower=lower, upper=upper, num_classes=num_classes, generator=generator)


def run(model, x, y, threat, attacks, num_classes, lower=-100.0, upper=100.0, clean_correct=None, batch_size=64):
    clean_correct = torch.ones(len(x), dtype=torch.bool) if clean_correct is None else clean_correct
    return run_threat(
        model, x, y, clean_correct, threat, [AttackRun(a) for a in attacks],
        lower=lower, upper=upper, num_classes=num_classes, batch_size=batch_size, device=CPU, seed=0,
    )  # fmt: skip


# --- schedule ------------------------------------------------------------------------------


def test_checkpoint_schedule_for_100_steps() -> None:
    # Iteration counts after which the step size is checked; the start (0) is not a check.
    assert checkpoint_schedule(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    # The paper's formula gives the same list for 100 steps.
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1:
            break
        p.append(nxt)
    assert [math.ceil(round(v * 100, 9)) for v in p[1:]] == [22, 41, 57, 70, 80, 87, 93, 99]


def test_checkpoint_schedule_small_step_counts() -> None:
    assert checkpoint_schedule(1) == [1]
    assert checkpoint_schedule(10) == list(range(2, 11))
    for steps in (5, 20, 50, 250, 1000):
        points = checkpoint_schedule(steps)
        assert points == sorted(set(points)) and points[-1] <= steps


# --- losses --------------------------------------------------------------------------------


def test_dlr_on_hand_made_logits() -> None:
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0], [3.0, 1.0, 0.0, -1.0], [0.5, 2.0, 2.0, -4.0]])
    y = torch.tensor([0, 2, 0])
    # sorted: 3, 1, 0, -1 -> denominator z_pi1 - z_pi3 = 3
    expected = torch.tensor([-(3 - 1) / 3, -(0 - 3) / 3, -(0.5 - 2) / (2 - 0.5)])
    assert torch.allclose(dlr(z, y), expected)
    assert "dlr" in LOSSES and get_loss("dlr") is dlr
    # Positive exactly when misclassified; invariant to shifting and positive scaling.
    assert torch.equal(dlr(z, y) > 0, z.argmax(1) != y)
    assert torch.allclose(dlr(5 * z + 7, y), dlr(z, y), atol=1e-6)


def test_targeted_dlr_on_hand_made_logits() -> None:
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0, -5.0], [3.0, 1.0, 0.0, -1.0, -5.0]])
    y = torch.tensor([0, 1])
    t = torch.tensor([1, 0])
    # denominator z_pi1 - (z_pi3 + z_pi4) / 2 = 3 - (0 - 1) / 2 = 3.5
    expected = torch.tensor([-(3 - 1) / 3.5, -(1 - 3) / 3.5])
    assert torch.allclose(dlr_targeted(z, y, t), expected)
    assert torch.allclose(dlr_targeted(2 * z - 3, y, t), expected, atol=1e-6)


def test_dlr_falls_back_below_three_and_four_classes() -> None:
    z2 = torch.tensor([[2.0, -1.0], [0.0, 1.0]])
    y2 = torch.tensor([0, 0])
    assert torch.allclose(dlr(z2, y2), margin(z2, y2))
    z3 = torch.tensor([[2.0, -1.0, 0.5]])
    y3, t3 = torch.tensor([0]), torch.tensor([2])
    assert torch.allclose(dlr(z3, y3), torch.tensor([-(2 - 0.5) / (2 + 1)]))  # 3 classes: real DLR
    assert torch.allclose(dlr_targeted(z3, y3, t3), torch.tensor([0.5 - 2.0]))  # targeted margin
    # The existing losses keep working.
    assert torch.allclose(get_loss("ce")(z2, y2), cross_entropy(z2, y2))


@pytest.mark.parametrize("classes", [2, 3])
def test_few_classes_run_without_error_and_say_so(classes: int) -> None:
    model, x, y, dist = linear_problem(seed=5, n=40, d=10, k=classes)
    threat = Threat(norm="linf", eps=float(dist["linf"].median()))
    attacks = [APGD("dlr", steps=20), APGDTargeted(steps=20), FGSM()]
    outcome = run(model, x, y, threat, attacks, num_classes=classes)
    assert not bool((outcome.broken & (dist["linf"] > threat.eps)).any())
    assert bool(outcome.broken.any())
    untargeted, targeted, _ = attacks
    assert untargeted.params()["loss"] == ("margin (dlr needs 3+ classes)" if classes < 3 else "dlr")
    assert targeted.params()["loss"] == "targeted margin (dlr-targeted needs 4+ classes)"
    assert targeted.params()["n_targets"] == classes - 1
    # Before any run and without a class count, the report still names the fallback.
    assert "margin" in APGD("dlr").params()["loss"] and "margin" in APGDTargeted().params()["loss"]
    assert APGD("dlr", num_classes=10).params()["loss"] == "dlr"


def test_names_and_params() -> None:
    assert APGD().name == "apgd-ce" and APGD("dlr").name == "apgd-dlr" and APGDTargeted().name == "apgd-t"
    assert FGSM().name == "fgsm" and not FGSM.randomized and APGD.randomized and APGDTargeted.randomized
    p = APGDTargeted(num_classes=10).params()
    assert (p["steps"], p["rho"], p["n_targets"], p["loss"]) == (100, 0.75, 9, "dlr-targeted")
    assert APGD().params()["checkpoints"] == [22, 41, 57, 70, 80, 87, 93, 99]
    with pytest.raises(ValueError):
        APGD("bogus")


# --- closed-form linear problems -----------------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_ce_then_apgd_t_break_everything_inside_eps(norm: str) -> None:
    model, x, y, dist = linear_problem(seed=0, n=120)
    eps = float(dist[norm].median())
    threat = Threat(norm=norm, eps=eps)
    true = dist[norm]
    outcome = run(model, x, y, threat, [APGD("ce"), APGDTargeted()], num_classes=5)
    assert not bool((outcome.broken & (true > eps)).any()), "broke a provably robust point"
    assert bool(outcome.broken[true < 0.98 * eps].all())
    found = outcome.distance[outcome.broken]
    assert bool((found >= true[outcome.broken].double() * (1 - 1e-4)).all())

    alone = run(model, x, y, threat, [APGDTargeted()], num_classes=5)
    assert not bool((alone.broken & (true > eps)).any())
    assert bool(alone.broken[true < 0.98 * eps].all())


class Recorder(nn.Module):
    """Records, per sample, whether any input the attack evaluated was misclassified."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        self.model, self.x, self.y = model, x, y
        self.seen_wrong = torch.zeros(len(x), dtype=torch.bool)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(inputs)
        owner = torch.cdist(inputs.detach().flatten(1), self.x.flatten(1)).argmin(dim=1)
        self.seen_wrong[owner[out.detach().argmax(1) != self.y[owner]]] = True
        return out


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_candidate_is_adversarial_wherever_any_iterate_was(norm: str) -> None:
    model, x, y, dist = linear_problem(seed=6, n=60)
    threat = Threat(norm=norm, eps=float(dist[norm].median()))
    for attack in (APGD("ce", steps=30), APGD("dlr", steps=30), APGDTargeted(steps=15)):
        recorder = Recorder(model, x, y)
        out = attack.perturb(recorder, x, y, threat, ctx_for(5, lower=0.0, upper=1.0))
        assert bool(recorder.seen_wrong.any())
        with torch.no_grad():
            wrong = model(out).argmax(1) != y
        assert torch.equal(wrong, recorder.seen_wrong), attack.name
        # Iterates are in the ball and the box without help from the runner.
        assert bool(within_ball(out, x, threat).all()) and bool(((out >= 0) & (out <= 1)).all())


def test_random_start_lies_on_the_sphere_and_runs_are_reproducible() -> None:
    model, x, y, dist = linear_problem(seed=7, n=30)
    for norm in ("linf", "l2"):
        threat = Threat(norm=norm, eps=0.3)
        first = APGD("dlr", steps=10).perturb(model, x, y, threat, ctx_for(5, seed=3))
        again = APGD("dlr", steps=10).perturb(model, x, y, threat, ctx_for(5, seed=3))
        assert torch.equal(first, again)
        # The first point evaluated is the random start: on the eps-sphere (the box is far away).
        start = []

        class Spy(nn.Module):
            def forward(self, inputs):
                start.append(inputs.detach().clone())
                return model(inputs)

        APGD("ce", steps=1).perturb(Spy(), x, y, threat, ctx_for(5, seed=3))
        norms = perturbation_norms(start[0] - x, norm)
        assert torch.allclose(norms, torch.full_like(norms, 0.3), rtol=1e-5)


# --- cost ----------------------------------------------------------------------------------


def test_each_iteration_costs_one_forward_and_one_backward() -> None:
    model, x, y, _ = linear_problem(seed=2, n=50)
    n = len(x)
    tiny = Threat(norm="linf", eps=1e-6)  # nothing breaks: every point runs every step
    for steps in (1, 20):
        for attack in (APGD("ce", steps=steps), APGD("dlr", steps=steps)):
            counted = CountingModel(model)
            attack.perturb(counted, x, y, tiny, ctx_for(5))
            # steps backwards; one more forward evaluates the last iterate (its gradient is never used)
            assert counted.backwards == steps * n
            assert counted.forwards == (steps + 1) * n
    counted = CountingModel(model)
    APGDTargeted(steps=10).perturb(counted, x, y, Threat(norm="l2", eps=1e-6), ctx_for(5))
    targets = 4  # 5 classes: targets ranked 2..5
    assert counted.backwards == targets * 10 * n
    assert counted.forwards == n + targets * 11 * n  # one clean forward ranks the targets
    counted = CountingModel(model)
    FGSM().perturb(counted, x, y, tiny, ctx_for(5))
    assert (counted.forwards, counted.backwards) == (n, n)


def test_broken_points_leave_the_batch() -> None:
    model, x, y, dist = linear_problem(seed=8, n=60)
    threat = Threat(norm="l2", eps=float(dist["l2"].max()) * 1.5)  # every point breaks quickly
    counted = CountingModel(model)
    out, found, _ = apgd_run(counted, x, y, threat, ctx_for(5), lambda z, idx: cross_entropy(z, y[idx]), 100, 0.75)
    assert bool(found.all())
    assert counted.forwards < 20 * len(x)


def test_fgsm_takes_one_full_step() -> None:
    model, x, y, _ = linear_problem(seed=9, n=20)
    for norm in ("linf", "l2"):
        out = FGSM().perturb(model, x, y, Threat(norm=norm, eps=0.05), ctx_for(5))
        norms = perturbation_norms(out - x, norm)
        assert torch.allclose(norms, torch.full_like(norms, 0.05), rtol=1e-5)


# --- a trained CNN -------------------------------------------------------------------------


def digits_problem(n: int):
    model = demo_classifier()
    with resources.files("robaudit.data").joinpath("digits_test.npz").open("rb") as handle:
        archive = np.load(handle)
        x = torch.from_numpy(archive["x"][:n]).float() / 255
        y = torch.from_numpy(archive["y"][:n]).long()
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    return model, x, y, correct


@pytest.mark.parametrize("spec", [("linf", 0.1), ("l2", 0.5)])
def test_apgd_is_at_least_as_strong_as_pgd_on_a_trained_cnn(spec: tuple[str, float]) -> None:
    model, x, y, correct = digits_problem(64)
    threat = Threat(norm=spec[0], eps=spec[1])
    kwargs = dict(num_classes=10, lower=0.0, upper=1.0, clean_correct=correct, batch_size=128)
    pgd = run(model, x, y, threat, [PGD(steps=100)], **kwargs)
    targeted = APGDTargeted()
    apgd = run(model, x, y, threat, [APGD("ce"), targeted], **kwargs)
    robust_pgd = int((correct & ~pgd.broken).sum())
    robust_apgd = int((correct & ~apgd.broken).sum())
    assert 0 < robust_apgd <= robust_pgd, (robust_apgd, robust_pgd)
    # The runner records params() before the run; the attack knows the class count afterwards.
    assert targeted.params()["loss"] == "dlr-targeted" and targeted.params()["n_targets"] == 9
    assert apgd.records[1].forwards > 0  # APGD-T had points left to attack
