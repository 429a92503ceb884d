"""The cheaper `standard` battery's parts: MALT-style target ranking and attacks kept to points near the boundary."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robaudit.attacks import AttackRun, run_threat
from robaudit.attacks.apgd import APGD, APGDTargeted, linear_ranking
from robaudit.attacks.base import AttackContext
from robaudit.attacks.counting import CountingModel
from robaudit.attacks.runner import MinimalOutcome, near_points
from robaudit.battery import build_battery, preset_specs
from robaudit.errors import RobauditError
from robaudit.threats import Threat
from test_attacks import linear_problem

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("norm", "dual"), [("linf", 1.0), ("l2", 2.0), ("l1", math.inf)])
def test_linear_ranking_orders_targets_by_exact_distance_on_a_linear_model(norm: str, dual: float) -> None:
    model, x, y, _ = linear_problem(seed=3, n=64, d=12, k=6)
    ranking, classes = linear_ranking(model, x, y, Threat(norm, 0.1), candidates=5)
    assert classes == 6 and torch.equal(ranking[:, 0], y)
    w, logits = model.weight, model(x)
    for i in range(len(y)):
        others = ranking[i, 1:]
        dist = [(logits[i, y[i]] - logits[i, t]) / (w[y[i]] - w[t]).norm(p=dual) for t in others.tolist()]
        assert all(a <= b + 1e-5 for a, b in zip(dist, dist[1:])), "nearest class first"
        assert sorted(others.tolist() + [int(y[i])]) == list(range(6)), "every class exactly once"


def test_linear_ranking_differs_from_logit_order_where_the_nearest_class_has_a_low_logit() -> None:
    # Class 1 has the second-largest logit but a tiny weight difference; class 2 a lower logit
    # and a huge one (far): logit order says 1 then 2; the distance order says the same. Make
    # the second class far instead, so distance puts class 2 first.
    model = nn.Linear(2, 3, bias=True)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 1.0]]))
        model.bias.copy_(torch.tensor([5.0, 0.0, 3.0]))
    x = torch.tensor([[0.45, 0.0]])  # logits 5, 4.5, 3: margin to 1 is 0.5 over |w| 10 (0.05), to 2 is 2 over 1
    y = torch.tensor([0])
    ranking, _ = linear_ranking(model, x, y, Threat("l2", 1.0), candidates=2)
    assert ranking[0].tolist() == [0, 1, 2]
    x = torch.tensor([[0.0, 0.0]])  # logits 5, 0, 3: to 1 margin 5 over 10 (0.5), to 2 margin 2 over 1 (2)
    ranking, _ = linear_ranking(model, x, y, Threat("l2", 1.0), candidates=2)
    assert ranking[0].tolist() == [0, 1, 2], "class 1 is nearer although class 2 has the larger logit"


def test_ranking_costs_one_forward_and_a_backward_per_candidate() -> None:
    model, x, y, _ = linear_problem(seed=1, n=10, d=8, k=10)
    counted = CountingModel(model)
    linear_ranking(counted, x, y, Threat("linf", 0.1), candidates=9)
    assert (counted.forwards, counted.backwards) == (10, 90)
    counted = CountingModel(model)
    linear_ranking(counted, x, y, Threat("linf", 0.1), candidates=3)
    assert (counted.forwards, counted.backwards) == (10, 30)


def test_linear_ranked_apgd_t_breaks_a_point_whose_nearest_class_has_a_low_logit() -> None:
    # The logit-ranked single target (class 1) is far; the nearest class (2) has the lowest logit.
    d = 100
    model = nn.Linear(d, 3)
    with torch.no_grad():
        weight = torch.zeros(3, d)
        weight[1, 0] = 0.1  # class 1: logit 0.5, needs a step of 5 along e0
        weight[2, 1] = 20.0  # class 2: logit -1, needs a step of 0.1 along e1
        model.weight.copy_(weight)
        model.bias.copy_(torch.tensor([1.0, 0.5, -1.0]))
    model.eval().requires_grad_(False)
    x, y = torch.zeros(1, d), torch.tensor([0])
    threat = Threat("l2", 0.15)  # a random L2 start puts about 0.015 on e1: nowhere near class 2

    def attack(ranking: str) -> bool:
        runs = [AttackRun(APGDTargeted(steps=20, n_targets=1, ranking=ranking))]
        out = run_threat(model, x, y, torch.ones(1, dtype=torch.bool), threat, runs, lower=-10.0, upper=10.0,
                         num_classes=3, batch_size=8, device=CPU, seed=0)  # fmt: skip
        return bool(out.broken[0])

    assert not attack("logits")
    assert attack("linear")


def _minimal(distance: list[float], norm: str = "l2") -> MinimalOutcome:
    d = torch.tensor(distance, dtype=torch.float64)
    return MinimalOutcome(norm=norm, distance=d, found_by=[None] * len(d), x_adv=torch.zeros(len(d), 4))


def test_near_points_follow_the_minimal_norm_distances() -> None:
    minimal = _minimal([0.5, 1.2, 1.6, math.inf])
    threat = Threat("l2", 1.0)
    assert near_points(minimal, threat, 1.5, 4).tolist() == [True, True, False, True], "not found counts as near"
    assert near_points(minimal, threat, None, 4).all()
    assert near_points(minimal, Threat("linf", 1.0), 1.5, 4).all(), "another norm's distances say nothing"
    assert near_points(None, threat, 1.5, 4).all()


def test_a_near_attack_runs_only_on_points_near_the_boundary() -> None:
    model, x, y, dist = linear_problem(seed=2, n=60, d=10, k=4)
    threat = Threat("l2", float(dist["l2"].median()) * 0.5)
    # A "minimal-norm stage" that knows the exact distances of the linear model.
    minimal = MinimalOutcome("l2", dist["l2"].double(), [None] * 60, x.clone())
    near = dist["l2"] <= 1.5 * threat.eps
    runs = [AttackRun(APGD(steps=10), near=1.5)]
    out = run_threat(model, x, y, torch.ones(60, dtype=torch.bool), threat, runs, lower=-100.0, upper=100.0,
                     num_classes=4, batch_size=16, device=CPU, seed=0, minimal=minimal)  # fmt: skip
    record = out.records[-1]
    assert record.attempted == int(near.sum())  # (this stage has no records, so it breaks nothing itself)
    assert record.params["near"] == 1.5
    assert not (out.broken & ~near).any()
    assert out.broken[dist["l2"] < threat.eps * 0.99].all()


def test_near_is_validated_and_standard_uses_it() -> None:
    for bad in ("far", 0.5, True):
        with pytest.raises(RobauditError, match="near"):
            build_battery([{"attack": "apgd-ce", "near": bad}])
    runs = build_battery(preset_specs("standard"))
    assert {r.near for r in runs} >= {None, 1.5}
    assert {r.close for r in runs} >= {None, 0.3, 0.1}
    assert runs[0].attack.kind == "minimal", "the near filter needs the minimal-norm stage first"
    thorough = {(r.attack.name, r.near) for r in build_battery(preset_specs("thorough"))}
    assert {(r.attack.name, r.near) for r in runs} <= thorough, "thorough runs everything standard runs"


def test_warm_start_begins_at_the_projected_minimal_norm_point_on_the_first_run_only() -> None:
    from robaudit.attacks.apgd import apgd_start, first_point
    from robaudit.attacks.base import AttackContext, project

    x = torch.rand(4, 1, 3, 3)
    start = x + 0.5  # far outside the ball: projected onto it
    start[2] = float("nan")  # no minimal-norm point for this one: a random start
    threat = Threat("l2", 0.1)

    def ctx(restart: int) -> AttackContext:
        return AttackContext(0.0, 1.0, 10, torch.Generator().manual_seed(0), start=start, restart=restart)

    first = first_point(x, threat, ctx(0), "warm")
    random = apgd_start(x, threat, AttackContext(0.0, 1.0, 10, torch.Generator().manual_seed(0)))
    keep = torch.tensor([True, True, False, True])
    assert torch.allclose(first[keep], project(start[keep], x[keep], threat, 0.0, 1.0))
    assert torch.equal(first[2], random[2]), "the random draw is the same with or without warm starts"
    assert torch.equal(first_point(x, threat, ctx(1), "warm"), random), "later restarts start at random"
    assert torch.equal(first_point(x, threat, ctx(0), "random"), random)
    assert torch.equal(first_point(x, threat, ctx(0), "clean"), x), "clean: the first run starts at x itself"
    assert torch.equal(first_point(x, threat, ctx(1), "clean"), random)


def test_warm_started_apgd_breaks_what_the_minimal_norm_stage_found_just_outside_the_ball() -> None:
    # FMN's point just beyond eps: APGD started there (projected into the ball) crosses the boundary.
    model, x, y, dist = linear_problem(seed=5, n=40, d=10, k=4)
    threat = Threat("l2", float(dist["l2"].median()))
    w, logits = model.weight, model(x)
    # exact nearest boundary point, pushed 2% further: what a good minimal-norm attack returns
    diff = w[y][:, None, :] - w[None, :, :]
    margin = logits.gather(1, y[:, None]) - logits
    size = diff.norm(dim=2).clamp_min(1e-12)
    nearest = (margin / size).masked_fill(torch.nn.functional.one_hot(y, 4).bool(), math.inf).argmin(1)
    rows = torch.arange(40)
    direction = -diff[rows, nearest] / size[rows, nearest][:, None]
    points = x + 1.02 * dist["l2"][:, None] * direction
    minimal = MinimalOutcome("l2", 1.02 * dist["l2"].double(), [None] * 40, points)

    def attack(start: str):
        runs = [AttackRun(APGD(steps=1, start=start))]
        return run_threat(model, x, y, torch.ones(40, dtype=torch.bool), threat, runs, lower=-100.0, upper=100.0,
                          num_classes=4, batch_size=16, device=CPU, seed=0, minimal=minimal).broken  # fmt: skip

    inside = dist["l2"] < 0.98 * threat.eps
    warm, cold = attack("warm"), attack("random")
    assert warm[inside].all(), "one step from the projected boundary point crosses it"
    assert int(cold[inside].sum()) < int(inside.sum()), "one step from a random start does not (the test's point)"
    assert not warm[dist["l2"] > threat.eps * 1.0001].any()


def test_class_margins_are_the_label_logit_minus_the_largest_other() -> None:
    from robaudit.attacks.runner import class_margins

    z = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 1.0], [2.0, 2.0, -1.0]])
    assert class_margins(z, torch.tensor([0, 0, 1])).tolist() == [0.5, -4.0, 0.0]


def test_close_points_select_by_margin_share_and_keep_unknown_points() -> None:
    from robaudit.attacks.runner import close_points

    closest = torch.tensor([0.05, 0.3, 0.5, float("nan"), 0.8, 1.2], dtype=torch.float64)
    assert close_points(closest, 0.3).tolist() == [True, True, False, True, True, True], (
        "no margin known, or a margin the attacks could not move, counts as close"
    )
    assert close_points(closest, None).all()
    assert close_points(closest, 0.3, stalled=False).tolist() == [True, True, False, True, False, False], (
        "without stalled, only the share (or an unknown one) selects"
    )


def test_a_close_attack_runs_only_where_earlier_candidates_came_near_the_boundary() -> None:
    from robaudit.attacks.runner import class_margins

    model, x, y, dist = linear_problem(seed=5, n=80, d=10, k=4)
    threat = Threat("l2", float(dist["l2"].median()) * 0.8)
    first, second = APGD(steps=20), APGD(steps=5)
    runs = [AttackRun(first), AttackRun(second, close=0.4, label="apgd-ce#2")]
    out = run_threat(model, x, y, torch.ones(80, dtype=torch.bool), threat, runs, lower=-100.0, upper=100.0,
                     num_classes=4, batch_size=16, device=CPU, seed=0)  # fmt: skip
    # On a linear model the best point in the L2 ball has margin m - eps * ||w_y - w_j||: the share
    # left after the first attack is known in closed form (APGD reaches it to within a few percent).
    w, clean = model.weight, model(x)
    margin0 = class_margins(clean, y)
    best = torch.stack([
        clean[:, y].diagonal() - clean[:, j] - threat.eps * (w[y] - w[j]).norm(dim=1) for j in range(4)
    ], dim=1).masked_fill(torch.nn.functional.one_hot(y, 4).bool(), float("inf")).amin(1)  # fmt: skip
    share = (best / margin0).double()
    record = out.records[-1]
    assert record.params["close"] == 0.4
    robust_after_first = ~out.broken | (torch.tensor([b == "apgd-ce#2" for b in out.broken_by]))
    # far: above close (0.4, with APGD's slack) and below the stalled share (0.75, with its slack)
    clearly_far = robust_after_first & (share > 0.5) & (share < 0.65)
    clearly_near = robust_after_first & (share > 0) & (share < 0.3)
    assert clearly_far.any() and clearly_near.any(), "the problem has points on both sides"
    assert record.attempted >= int(clearly_near.sum())
    assert record.attempted <= int((robust_after_first & ((share <= 0.5) | (share >= 0.65))).sum())


def test_close_is_validated() -> None:
    for bad in ("near", 0.0, 1.5, True):
        with pytest.raises(RobauditError, match="close"):
            build_battery([{"attack": "apgd-ce", "close": bad}])
    (run,) = build_battery([{"attack": "apgd-t", "close": 0.25}])
    assert run.close == 0.25 and run.stalled
    (run,) = build_battery([{"attack": "apgd-t", "close": 0.25, "stalled": False}])
    assert not run.stalled
    for bad in ("no", 0, None):
        with pytest.raises(RobauditError, match="stalled must be true or false"):
            build_battery([{"attack": "apgd-ce", "close": 0.1, "stalled": bad}])
    with pytest.raises(RobauditError, match="stalled only applies with close"):
        build_battery([{"attack": "apgd-ce", "stalled": False}])


def test_stalled_points_get_the_later_targets_but_not_the_restarts_in_standard() -> None:
    """Points the attacks barely moved get AutoAttack's other targets (where the VNN-COMP violations
    broke), not every later random start: on a certified-trained model that was most of the cost."""
    runs = {r.label: r for r in build_battery(preset_specs("standard"))}
    assert runs["apgd-t#2"].close == 0.3 and runs["apgd-t#2"].stalled
    later = [r for r in runs.values() if r.close is not None and r.close < 0.3]
    assert len(later) == 5 and not any(r.stalled for r in later)


def test_skip_targets_runs_the_rest_of_the_ranked_list() -> None:
    model, x, y, _ = linear_problem(seed=1, n=12, d=8, k=10)
    ranking, _ = linear_ranking(model, x, y, Threat("l2", 0.1), candidates=9)
    tail = APGDTargeted(steps=2, n_targets=9, skip_targets=3, ranking="linear")
    assert tail.targets_for(10) == 6 and tail.params()["skip_targets"] == 3
    seen = []

    import robaudit.attacks.apgd as apgd_module

    real = apgd_module.dlr_targeted

    def spy(logits, y_, t):
        seen.append(t.clone())
        return real(logits, y_, t)

    apgd_module.dlr_targeted, saved = spy, apgd_module.dlr_targeted
    try:
        ctx = AttackContext(lower=-100.0, upper=100.0, num_classes=10, generator=torch.Generator().manual_seed(0))
        tail.perturb(CountingModel(model), x, y, Threat("l2", 1e-4), ctx)
    finally:
        apgd_module.dlr_targeted = saved
    targets = {tuple(t.tolist()) for t in seen}
    assert targets == {tuple(ranking[:, r].tolist()) for r in range(4, 10)}, "ranks 4..9 of the same list, not the top 3"
    with pytest.raises(ValueError, match="skip_targets"):
        APGDTargeted(skip_targets=-1)
