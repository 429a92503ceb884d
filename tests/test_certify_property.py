"""Property-based soundness of certified L2 radii on hundreds of random small networks.

A certified radius that an attack can break is the worst bug robaudit can have, and a
handful of hand-made models cannot reach the corners where a bound goes wrong (a batch
norm with a negative scale before a max pool, a LeakyReLU steeper than 1, a residual
difference, padding in an average pool...). So every seed builds a random network from
every supported op (`random_nets.py`), certifies a few inputs with `certify_l2` and with
each method of `default_methods` alone, and tries to break every radius R:

- minimal-norm attacks without a box (FMN, DeepFool) in float64: no adversarial example
  may be closer than R;
- L2 PGD on the margin inside the ball of radius 0.999 R from several random starts;
- thousands of random points in the ball and on its sphere at 0.999 R (and along the
  axes, towards the closest adversarial example and the PGD points), evaluated in
  float64 and in the deployed float32 (the certificate covers float32 rounding: one
  input per net sits close to a boundary, with a margin down to rounding level);
- on 2-D inputs, a dense grid of the disk and of its circle.

Any point of the ball with another argmax is a violation, reported with the seed, the
architecture and the numbers (the seed alone rebuilds the network and the inputs).
Every unsupported op must instead make the certificate unavailable, naming the op.

The default run covers 200 seeds (about a minute on one core), and 100 more with clamps,
data movement and concatenation inserted (`random_net(seed, extras=True)`);
`ROBAUDIT_PROPERTY_SEEDS=2000 pytest -m slow tests/test_certify_property.py` runs the
heavier variant on that many other seeds (it is skipped without the variable). The
zonotope test runs every method alone on 12 seeds (the heavier variant does so on all
of its seeds); `ROBAUDIT_ZONOTOPE_SEEDS=100` gives it more. The L2-ball coupling of
`crown` (`ball.py`) gets the same treatment on 24 seeds (`ROBAUDIT_BALL_SEEDS`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from random_nets import RandomNet, random_net
from robaudit.attacks.base import AttackContext
from robaudit.attacks.deepfool import DeepFool
from robaudit.attacks.fmn import FMN
from robaudit.certify import CertificateUnavailable, certify_l2
from robaudit.certify import crown as crown_module
from robaudit.certify.budget import get_budget
from robaudit.certify.certificate import certify_with, default_methods
from robaudit.certify.graph import build_graph
from robaudit.models import wrap_model
from robaudit.models.detect import RawModel
from robaudit.threats import Threat

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
SHRINK = 0.999  # probes and PGD stay inside the ball of radius SHRINK * R
MIN_REL_MARGIN = 0.02  # inputs closer to a tie are left out: at 0.999 R their margin would be float32 noise
DEFAULT_SEEDS, CHUNKS = 200, 10


@dataclass
class Effort:
    """How hard each seed is certified, attacked and probed."""

    inputs: int = 2
    every_method_alone: bool = False  # False: one method alone per seed, in turn, on the fast budget
    fmn_steps: int = 25
    deepfool_steps: int = 12
    pgd_starts: int = 3
    pgd_steps: int = 15
    ball: int = 300
    sphere: int = 700
    grid: int = 81  # per axis, 2-D inputs only
    circle: int = 720


@dataclass
class Outcome:
    """What one seed found: violations (messages) and statistics that show the test is not vacuous."""

    violations: list[str] = field(default_factory=list)
    samples: int = 0
    positive: int = 0
    ratios: list[float] = field(default_factory=list)  # certified / attack distance
    methods: set[str] = field(default_factory=set)


# --------------------------------------------------------------------------- inputs and evaluation


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f_y - max_{j != y} f_j per row (negative: another class wins)."""
    other = logits.scatter(1, y[:, None], -math.inf).amax(1)
    return logits.gather(1, y[:, None]).squeeze(1) - other


def pick_inputs(rn: RandomNet, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs that float64 and float32 classify alike, with a margin well above float noise."""
    scale = float(torch.tensor([0.5, 1.0, 2.0])[torch.randint(0, 3, (1,), generator=gen)])
    x = (0.3 + scale * torch.randn((24, *rn.sample_shape), generator=gen)).float()
    with torch.no_grad():
        l64, l32 = rn.logits64(x), rn.logits32(x)
    y = l64.argmax(1)
    rel = margins(l64, y) / l64.abs().amax(1).clamp_min(1.0)
    keep = (l32.argmax(1) == y) & (rel >= MIN_REL_MARGIN) & torch.isfinite(l64).all(1)
    idx = torch.nonzero(keep).flatten()[:count]
    return x[idx], y[idx]


def near_tie(rn: RandomNet, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One input close to a decision boundary (bisection stopped at a random depth), or None.

    Its margin ranges from ~1e-3 down to float32 rounding level: the radius must then be
    0 or hold for the float32 model too, which the probes check.
    """
    x = (0.3 + torch.randn((24, *rn.sample_shape), generator=gen)).float()
    with torch.no_grad():
        label = rn.logits64(x).argmax(1)
    other = torch.nonzero(label != label[0]).flatten()
    if len(other) == 0:
        return None
    a, b = x[0].to(F64), x[int(other[0])].to(F64)
    lo, hi = 0.0, 1.0
    for _ in range(int(torch.randint(8, 30, (1,), generator=gen))):
        mid = (lo + hi) / 2
        point = (a + mid * (b - a)).float()[None]
        if int(rn.logits64(point).argmax()) == int(label[0]):
            lo = mid
        else:
            hi = mid
    point = (a + lo * (b - a)).float()[None]
    with torch.no_grad():
        y64, y32 = rn.logits64(point).argmax(1), rn.logits32(point).argmax(1)
    return (point, y64) if bool(y64 == y32) else None


class Float64(nn.Module):
    """The random net in float64 as a module, for the attacks."""

    def __init__(self, rn: RandomNet) -> None:
        super().__init__()
        self.rn = rn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rn.logits64(x)


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(len(x), -1)


# --------------------------------------------------------------------------- certificates


def method_names(model: nn.Module, x: torch.Tensor, budget: str, notes: list[str]) -> list[str]:
    """Names of the methods `default_methods` returns for this model (whatever set it holds today)."""
    for note in notes:
        if note.startswith("methods tried: "):
            return [n.strip() for n in note.removeprefix("methods tried: ").split(",") if n.strip()]
    return [m.name for m in default_methods(build_graph(model, x[:1]), get_budget(budget))]


def certificates(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    budget: str,
    alone: Callable[[list[str]], list[str]],
    alone_budget: str,
) -> dict[str, torch.Tensor]:
    """Radii of `certify_l2` and of the default methods that `alone` picks, each on its own.

    `certify_l2` takes the largest radius of all methods, so probing its ball tests every
    method; the runs alone pin a violation on a method and catch one that behaves
    differently alone.
    """
    cert = certify_l2(model, x, y, budget=budget)
    radii = {"certify_l2": cert.radius}
    names = method_names(model, x, budget, cert.notes)
    for name in alone(names) if len(names) > 1 else []:
        only = lambda g, b, name=name: [m for m in default_methods(g, b) if m.name == name]  # noqa: E731
        radii[f"{name} ({alone_budget})"] = certify_with(model, x, y, only, budget=alone_budget).radius
    return radii


# --------------------------------------------------------------------------- attacks


def attack_points(rn: RandomNet, x: torch.Tensor, y: torch.Tensor, effort: Effort) -> tuple[torch.Tensor, torch.Tensor]:
    """Closest adversarial example per sample over FMN and DeepFool without a box, verified in float64.

    Returns (distance, point); distance inf (point = x) where no attack succeeded.
    """
    model = Float64(rn)
    x64 = x.to(F64)
    gen = torch.Generator().manual_seed(0)
    ctx = AttackContext(lower=-math.inf, upper=math.inf, num_classes=rn.num_classes, generator=gen)
    best = torch.full((len(x),), math.inf, dtype=F64)
    point = x64.clone()
    attacks = (FMN(steps=effort.fmn_steps), DeepFool(steps=effort.deepfool_steps, n_candidates=rn.num_classes))
    for attack in attacks:
        adv = attack.perturb(model, x64, y, Threat("l2", 1.0), ctx).detach().to(F64)
        with torch.no_grad():
            wrong = rn.logits64(adv).argmax(1) != y
        dist = flat(adv - x64).norm(dim=1)
        better = wrong & (dist < best)
        best = torch.where(better, dist, best)
        point[better] = adv[better]
    return best, point


def pgd_inside(
    rn: RandomNet, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, effort: Effort, gen: torch.Generator
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """L2 PGD on the float64 margin inside B(x, eps) from several starts; every iterate is checked.

    Returns the points (n, starts, ...) of the lowest margin reached, and per sample the
    first float64 iterate with another argmax (None where none).
    """
    n, s = len(x), effort.pgd_starts
    d = flat(x).shape[1]
    x64 = flat(x).to(F64).repeat_interleave(s, 0)
    r = eps.repeat_interleave(s)
    yy = y.repeat_interleave(s)
    delta = torch.randn((n * s, d), generator=gen, dtype=F64)
    delta = delta / delta.norm(dim=1, keepdim=True) * (r * torch.rand(n * s, generator=gen, dtype=F64))[:, None]
    delta[::s] = 0  # one start at the centre
    best_m = torch.full((n * s,), math.inf, dtype=F64)
    best_p = x64.clone()
    flipped: list[torch.Tensor | None] = [None] * n

    def project(v: torch.Tensor) -> torch.Tensor:
        return v * (r / v.norm(dim=1).clamp_min(1e-300)).clamp(max=1)[:, None]

    for step in range(effort.pgd_steps + 1):
        delta.requires_grad_(True)
        logits = rn.logits64((x64 + delta).reshape(n * s, *rn.sample_shape))
        m = margins(logits, yy)
        with torch.no_grad():
            wrong = logits.argmax(1) != yy
            for k in torch.nonzero(wrong).flatten().tolist():
                if flipped[k // s] is None:
                    flipped[k // s] = (x64[k] + delta[k]).detach().clone()
            lower = m < best_m
            best_m = torch.where(lower, m, best_m)
            best_p[lower] = (x64 + delta)[lower]
        if step == effort.pgd_steps:
            break
        (grad,) = torch.autograd.grad(m.sum(), delta)
        with torch.no_grad():
            size = r * (0.4 * (1 - step / effort.pgd_steps) + 0.02)
            unit = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-300)
            delta = project(delta.detach() - size[:, None] * unit)
    return best_p.reshape(n, s, *rn.sample_shape), flipped


def ball_points(
    centre: torch.Tensor, radius: float, effort: Effort, gen: torch.Generator, towards: list[torch.Tensor]
) -> torch.Tensor:
    """Probes of B(centre, radius): uniform in the ball, uniform on its sphere, along the axes and `towards`."""
    c = centre.reshape(-1).to(F64)
    d = c.numel()
    g = torch.randn((effort.ball + effort.sphere, d), generator=gen, dtype=F64)
    g = g / g.norm(dim=1, keepdim=True)
    scale = torch.ones(len(g), dtype=F64)
    scale[: effort.ball] = torch.rand(effort.ball, generator=gen, dtype=F64) ** (1.0 / d)
    axes = torch.cat([torch.eye(d, dtype=F64), -torch.eye(d, dtype=F64)])
    extra = [(t.reshape(-1).to(F64) - c) for t in towards]
    extra = [e / e.norm() for e in extra if e.norm() > 0]
    dirs = torch.cat([g * scale[:, None], axes, *[e[None] for e in extra]])
    if d == 2:
        side = torch.linspace(-1, 1, effort.grid, dtype=F64)
        grid = torch.stack(torch.meshgrid(side, side, indexing="ij"), -1).reshape(-1, 2)
        angle = torch.linspace(0, 2 * math.pi, effort.circle + 1, dtype=F64)[:-1]
        dirs = torch.cat([dirs, grid[grid.norm(dim=1) <= 1], torch.stack([angle.cos(), angle.sin()], 1)])
    return c + radius * dirs


# --------------------------------------------------------------------------- one seed


def check_net(rn: RandomNet, effort: Effort, gen: torch.Generator, budget: str) -> Outcome:
    """Certify a few inputs of `rn` with every method and try to break every radius."""
    turn = rn.seed if rn.seed >= 0 else 0
    alone = (lambda names: names) if effort.every_method_alone else (lambda names: [names[turn % len(names)]])
    out = Outcome()
    x, y = pick_inputs(rn, effort.inputs, gen)
    regular = len(x)
    tie = near_tie(rn, gen)
    if tie is not None:
        x, y = torch.cat([x, tie[0]]), torch.cat([y, tie[1]])
    if len(x) == 0:
        return out
    where = f"seed {rn.seed}, budget {budget}, {rn.arch}"
    try:
        radii = certificates(rn.model, x, y, budget, alone, budget if effort.every_method_alone else "fast")
    except CertificateUnavailable as exc:
        out.violations.append(f"{where}: a net of supported ops was refused: {exc}")
        return out
    out.methods.update(name.split(" (")[0] for name in radii)
    out.samples += regular
    bad = {name: r for name, r in radii.items() if not (torch.isfinite(r) | (r == math.inf)).all() or (r < 0).any()}
    for name, r in bad.items():
        out.violations.append(f"{where}: {name} returned invalid radii {r.tolist()}")
    radius = torch.stack(list(radii.values())).nan_to_num(0.0).clamp_min(0).amax(0)  # (n,)
    out.positive += int((radius[:regular] > 0).sum())

    def report(i: int, what: str, point: torch.Tensor) -> None:
        p = point.reshape(1, *rn.sample_shape)
        with torch.no_grad():
            l64, l32 = rn.logits64(p)[0], rn.logits32(p.float())[0]
        dist = float((p.to(F64) - x[i].to(F64)).norm())
        over = {name: float(r[i]) for name, r in radii.items() if float(r[i]) >= dist}
        clean = rn.logits64(x[i : i + 1])[0]
        out.violations.append(
            f"{where}\n  sample {i} (label {int(y[i])}, clean logits64 {clean.tolist()}): {what} "
            f"at distance {dist:.9g} "
            f"has argmax64 {int(l64.argmax())} (logits64 {l64.tolist()}), argmax32 {int(l32.argmax())}; "
            f"radii that cover it: {over}; all radii: { {k: float(v[i]) for k, v in radii.items()} }"
        )

    # (a) minimal-norm attacks without a box
    dist, adv = attack_points(rn, x, y, effort)
    for i in range(len(x)):
        if math.isfinite(dist[i]) and radius[i] > 0:
            out.ratios.append(float(radius[i] / dist[i]))
        if radius[i] >= dist[i]:
            report(i, "adversarial example of FMN/DeepFool", adv[i])

    # (a') PGD on the margin inside the ball
    live = torch.nonzero(radius > 0).flatten()
    if len(live) == 0:
        return out
    eps = (SHRINK * radius[live]).clamp(max=1e6)
    lowest, flipped = pgd_inside(rn, x[live], y[live], eps, effort, gen)
    for k, i in enumerate(live.tolist()):
        if flipped[k] is not None:
            report(i, "a PGD iterate inside the ball (float64)", flipped[k])

    # (b) dense probes: ball, sphere, axes, towards the attack and PGD points; float64 and float32
    for k, i in enumerate(live.tolist()):
        towards = [adv[i], *lowest[k]] if math.isfinite(dist[i]) else list(lowest[k])
        pts = ball_points(x[i], float(eps[k]), effort, gen, towards)
        label = torch.full((len(pts),), int(y[i]))
        with torch.no_grad():
            wrong64 = rn.logits64(pts.reshape(-1, *rn.sample_shape)).argmax(1) != label
            p32 = pts.float()
            inside = flat(p32.to(F64) - x[i].reshape(1, -1).to(F64)).norm(dim=1) <= radius[i]  # after rounding
            wrong32 = (rn.logits32(p32.reshape(-1, *rn.sample_shape)).argmax(1) != label) & inside
        for mask, kind in ((wrong64, "float64"), (wrong32, "float32")):
            hits = torch.nonzero(mask).flatten()
            if len(hits):
                report(i, f"a probe inside the ball ({kind}; {len(hits)} of {len(pts)} probes flip)", pts[hits[0]])
    return out


def check_seed(seed: int, effort: Effort, extras: bool = False) -> Outcome:
    rn = random_net(seed, extras)
    r = random.Random(seed)
    budget = r.choices(["fast", "default", "tight"], weights=[15, 4, 1])[0]
    return check_net(rn, effort, torch.Generator().manual_seed(10_000 + seed), budget)


def run_seeds(seeds: range, effort: Effort, extras: bool = False) -> None:
    total = Outcome()
    for seed in seeds:
        got = check_seed(seed, effort, extras)
        total.violations += got.violations
        total.samples += got.samples
        total.positive += got.positive
        total.ratios += got.ratios
        total.methods |= got.methods
    assert not total.violations, f"{len(total.violations)} soundness violation(s):\n" + "\n".join(total.violations)
    # not vacuous: most seeds contribute inputs and nearly every radius is positive
    assert total.samples >= len(seeds), (total.samples, len(seeds))
    assert total.positive >= 0.9 * total.samples, (total.positive, total.samples)
    assert {"certify_l2", "interval", "global-lipschitz"} <= total.methods, total.methods


def attack_seeds(seeds: range, budget, effort: Effort, gen_base: int, before_seed=None, extras: bool = False) -> None:
    """check_net on random_net(seed, extras) for each seed at one budget; no violation, and every seed gives inputs."""
    total = Outcome()
    for seed in seeds:
        if before_seed is not None:
            before_seed(seed)
        got = check_net(random_net(seed, extras), effort, torch.Generator().manual_seed(gen_base + seed), budget)
        total.violations += got.violations
        total.samples += got.samples
    assert not total.violations, f"{len(total.violations)} soundness violation(s):\n" + "\n".join(total.violations)
    assert total.samples >= len(seeds)


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_random_nets_radii_survive_attacks_and_probes(chunk: int) -> None:
    per = DEFAULT_SEEDS // CHUNKS
    run_seeds(range(chunk * per, (chunk + 1) * per), Effort())


EXTRA_SEEDS, EXTRA_CHUNKS = 100, 4


@pytest.mark.parametrize("chunk", range(EXTRA_CHUNKS))
def test_random_nets_with_clamps_moves_and_concatenation_survive_attacks_and_probes(chunk: int) -> None:
    """The same nets with clamps, data movement and torch.cat inserted (`random_nets._extras`)."""
    per = EXTRA_SEEDS // EXTRA_CHUNKS
    run_seeds(range(20_000 + chunk * per, 20_000 + (chunk + 1) * per), Effort(), extras=True)


@pytest.mark.slow
@pytest.mark.skipif("ROBAUDIT_PROPERTY_SEEDS" not in os.environ, reason="set ROBAUDIT_PROPERTY_SEEDS (e.g. 2000)")
def test_random_nets_radii_survive_attacks_and_probes_many_seeds() -> None:
    """Every method alone at the seed's budget, harder attacks and denser probes (about 1 s per seed);
    as many seeds again with clamps, data movement and concatenation inserted."""
    count = int(os.environ["ROBAUDIT_PROPERTY_SEEDS"])
    effort = Effort(
        inputs=3, every_method_alone=True, fmn_steps=150, deepfool_steps=50, pgd_starts=8, pgd_steps=40, ball=2000,
        sphere=4000, grid=201, circle=4096,
    )  # fmt: skip
    run_seeds(range(100_000, 100_000 + count), effort)
    run_seeds(range(300_000, 300_000 + count), effort, extras=True)


BAB_SEEDS = range(500, 524)


def test_branch_and_bound_radii_survive_attacks_and_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Branch and bound (`bab.py`) pushed hard on random nets: its radii must survive the same attacks.

    The budget gives the bisection above CROWN many trials and domains, so on these small
    nets it often splits every unstable unit and comes close to the true radius, where a
    wrong split, beta sign or rounding charge would show. Not vacuous: some trials must be
    proved, and some refused.
    """
    from robaudit.certify import bab

    results: list[bool] = []
    verify = bab.BranchAndBound.verify

    def counted(self, batch, i, eps):  # type: ignore[no-untyped-def]
        ok = verify(self, batch, i, eps)
        results.append(ok)
        return ok

    monkeypatch.setattr(bab.BranchAndBound, "verify", counted)
    budget = dataclasses.replace(get_budget("default"), bab_evals=5, bab_domains=128, bab_batch=16, bab_steps=4)
    attack_seeds(BAB_SEEDS, budget, Effort(), 20_000)
    print(f"branch and bound: {sum(results)} of {len(results)} trials proved")
    assert sum(results) >= 10 and results.count(False) >= 10, (sum(results), len(results))


ZONOTOPE_SEEDS = range(600, 600 + int(os.environ.get("ROBAUDIT_ZONOTOPE_SEEDS", "12")))


def test_zonotope_radii_survive_attacks_and_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The zonotope gradient bound (`zonotope.py`) with its SDP descent, on random nets of every op it takes.

    Every method alone runs at this budget too, so a wrong zonotope bound cannot hide behind
    another method's larger radius. Not vacuous: the zonotope bound must run on most seeds.
    """
    from robaudit.certify import interval

    ran: list[bool] = []
    inner = interval.zonotope_lipschitz

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = inner(*args, **kwargs)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(interval, "zonotope_lipschitz", counted)
    budget = dataclasses.replace(get_budget("default"), zonotope_elems=1 << 22, zonotope_sdp_steps=20)
    attack_seeds(ZONOTOPE_SEEDS, budget, Effort(every_method_alone=True), 30_000)
    print(f"zonotope: ran {sum(ran)} of {len(ran)} times")
    assert sum(ran) >= 8 * len(ZONOTOPE_SEEDS), (sum(ran), len(ran))


BALL_SEEDS = range(700, 700 + int(os.environ.get("ROBAUDIT_BALL_SEEDS", "24")))


def test_ball_coupled_crown_radii_survive_attacks_and_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """CROWN with every ReLU layer's units coupled through an L2 ball (`ball.py`), on random nets of every op.

    Every method alone runs too, so a radius that only the coupled bound proves is attacked
    on its own. Not vacuous: the coupled offset must be evaluated on most seeds.
    """
    from robaudit.certify import ball

    seeds_used: set[int] = set()
    current = [0]
    inner = ball.Ball.offset

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seeds_used.add(current[0])
        return inner(self, *args, **kwargs)

    monkeypatch.setattr(ball.Ball, "offset", counted)
    budget = dataclasses.replace(get_budget("default"), crown_ball=True)
    assert get_budget("default").crown_ball and get_budget("tight").crown_ball and not get_budget("fast").crown_ball
    attack_seeds(BALL_SEEDS, budget, Effort(every_method_alone=True), 40_000, before_seed=lambda seed: current.__setitem__(0, seed))
    print(f"ball coupling: used on {len(seeds_used)} of {len(BALL_SEEDS)} seeds")
    # it couples ReLU layers only, and a net's activations are drawn from ten kinds: a third of the seeds
    assert len(seeds_used) >= len(BALL_SEEDS) // 3, sorted(seeds_used)


WINDOW_SEEDS = range(800, 800 + int(os.environ.get("ROBAUDIT_WINDOW_SEEDS", "150")))
# nets with clamps, data movement and concatenations: those whose covered nodes the pass reaches through a move
WINDOW_MOVE_SEEDS = range(2000, 2000 + int(os.environ.get("ROBAUDIT_WINDOW_MOVE_SEEDS", "60")))


def _windowed_seeds(seeds: range, extras: bool = False) -> list[int]:
    """The seeds whose net has a node behind two layers of relaxations that the patches pass covers
    (with `extras`: and whose pass to such a node goes through a pad or a move of channels)."""
    from robaudit.certify.crown import CrownBound

    picked = []
    for seed in seeds:
        rn = random_net(seed, extras)
        try:
            graph = build_graph(rn.model, torch.zeros(1, *rn.sample_shape))
        except CertificateUnavailable:
            continue
        crown = CrownBound(graph, get_budget("default"))
        deep = [i for i in crown.needs if crown.patch_plan.covers(i) and crown.depth[i] >= 2 and not graph.exact[i]]
        moves = {type(graph.nodes[j].op).__name__ for i in deep for j in crown.patch_plan.plan(i)} & {"SelectOp", "PadOp"}
        if deep and (moves or not extras):
            picked.append(seed)
    return picked


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "through-moves"])
def test_crown_refined_over_receptive_fields_survives_attacks_and_probes(
    monkeypatch: pytest.MonkeyPatch, extras: bool
) -> None:
    """CROWN's refined evaluations with conv units refined by the patches pass (`patches.py`), on random nets.

    The default budget takes that pass only on nets too wide for dense refinement; here
    every net the pass covers takes it (dense refinement made "too costly", the patches
    pass free). Only the seeds whose net it covers are attacked (about one in five; with
    the extras' pads, concatenations, chunks and shuffles, those it reaches through one of
    them, about one in twelve); not vacuous: the pass must run on most of them.
    """
    from robaudit.certify import patches

    pool = WINDOW_MOVE_SEEDS if extras else WINDOW_SEEDS
    seeds = _windowed_seeds(pool, extras)
    assert len(seeds) >= len(pool) // 30, seeds
    seeds_used: set[int] = set()
    current = [0]
    inner = patches.backward_windows

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        seeds_used.add(current[0])
        return inner(*args, **kwargs)

    monkeypatch.setattr(crown_module, "backward_windows", counted)
    monkeypatch.setattr(patches.PatchPlan, "cost", lambda self, i: 0)
    budget = dataclasses.replace(get_budget("default"), crown_polish_work=-1)
    effort = Effort(every_method_alone=True)
    attack_seeds(seeds, budget, effort, 50_000, before_seed=lambda seed: current.__setitem__(0, seed), extras=extras)
    print(f"patches pass: used on {len(seeds_used)} of {len(seeds)} seeds")
    assert len(seeds_used) >= len(seeds) // 2, sorted(seeds_used)


def test_random_nets_cover_every_supported_op() -> None:
    """The generator really draws every op the certificate supports (else the property test proves less)."""
    text = " ".join(random_net(seed).arch for seed in range(DEFAULT_SEEDS))
    wanted = [
        "Linear", "Conv2d", "groups=", "dilation=(2, 2)", "stride=(2, 2)", "padding=same", "relu", "leaky_relu",
        "slope=3.0", "slope=1.5", "tanh", "sigmoid", "softplus", "beta=20.0", "threshold=10.0", "elu, ", "celu, ",
        "alpha=3.0", "alpha=0.01", "BatchNorm1d",
        "BatchNorm2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "GlobalMean", "Residual( add", "Residual( sub",
        "Flatten", "Reshape(view", "Reshape(reshape", "Affine(mul-add)", "Affine(sub-div)", "Affine(neg)", "mean=",
        "model_shape=", "module", "functional", "method",
    ]  # fmt: skip
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    text = " ".join(random_net(seed, True).arch for seed in range(20_000, 20_000 + EXTRA_SEEDS))
    wanted = ["Concat(", "ReLU6", "Hardtanh", "clamp,", "clamp_min", "clamp_max", "relu6", "hardtanh"]
    wanted += ["softshrink,", "threshold,", "fmax,", "fmin,"]
    wanted += [f"Move({s})" for s in ("flip", "roll", "transpose", "gather", "repeat-slice", "shuffle", "chunk-swap")]
    wanted += [f"Move(crop-pad-{m})" for m in ("constant", "replicate", "reflect")] + ["CeilPool("]
    missing = [w for w in wanted if w not in text]
    assert not missing, missing


# --------------------------------------------------------------------------- unsupported ops are refused


class Fn(nn.Module):
    """One op as a module, so that torch.fx records exactly that op."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], label: str) -> None:
        super().__init__()
        self.fn, self.label = fn, label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.label


def _sandwich(op: nn.Module, image: bool) -> nn.Sequential:
    """conv (or linear) -> op -> flatten -> linear, with real weights, on 1x4x4 inputs."""
    torch.manual_seed(0)
    head: list[nn.Module] = [nn.Conv2d(1, 2, 3, padding=1)] if image else [nn.Flatten(), nn.Linear(16, 8)]
    with torch.no_grad():
        shape = op(nn.Sequential(*head)(torch.zeros(1, 1, 4, 4)).float()).shape
    return nn.Sequential(*head, op, nn.Flatten(), nn.Linear(math.prod(shape[1:]), 3)).eval()


def _prelu(*slopes: float) -> nn.PReLU:
    """An nn.PReLU with these slopes (one, or one per channel of the conv output)."""
    m = nn.PReLU(len(slopes))
    with torch.no_grad():
        m.weight.copy_(torch.tensor(slopes))
    return m


class PReLUFn(nn.Module):
    """F.prelu with slopes held in a buffer (a float64 copy of the net converts them too)."""

    def __init__(self, *slopes: float) -> None:
        super().__init__()
        self.register_buffer("slopes", torch.tensor(slopes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.prelu(x, self.slopes)


class BatchNormFn(nn.Module):
    """F.batch_norm with running statistics, as functional code writes it (hunt 24: refused before)."""

    def __init__(self, training: bool = False) -> None:
        super().__init__()
        self.training_flag = training
        for name, value in (("mean", [0.2, -0.1]), ("var", [0.5, 2.0]), ("gamma", [1.5, -0.7]), ("beta", [0.1, 0.3])):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.mean, self.var, self.gamma, self.beta, self.training_flag, 0.1, 1e-3)


class ConvTransposeFn(nn.Module):
    """F.conv_transpose2d with its weight in a buffer (a float64 copy of the net converts it too)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.linspace(-1, 1, 36).view(2, 2, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.weight, None, 2)


REFUSED: list[tuple[str, nn.Module, bool, tuple[str, ...]]] = [
    # (id, op, on the conv output?, fragments of which the message must name one)
    ("GELU", nn.GELU(), False, ("GELU",)),
    # hunt 15: minus the average (a signed pool) was bounded as a nonnegative one; radius 159.7, a flip at 0.73
    ("avg-pool-negative-divisor", nn.AvgPool2d(2, divisor_override=-4), True, ("divisor_override",)),
    ("gelu-fn", Fn(F.gelu, "F.gelu"), False, ("gelu",)),
    ("ELU-alpha-1.5", nn.ELU(1.5), False, ("ELU",)),  # its slope drops from 1.5 to 1 at 0: not convex
    ("SELU", nn.SELU(), True, ("SELU",)),
    ("selu-fn", Fn(F.selu, "F.selu"), False, ("selu", "SELU")),
    ("celu-negative-alpha", Fn(lambda x: F.celu(x, -0.5), "F.celu(x, -0.5)"), False, ("CELU",)),
    ("SiLU", nn.SiLU(), False, ("SiLU",)),
    ("silu-fn", Fn(F.silu, "F.silu"), False, ("silu",)),
    ("Hardswish", nn.Hardswish(), False, ("Hardswish",)),
    ("Hardshrink", nn.Hardshrink(0.25), True, ("Hardshrink",)),  # jumps at +-lambda
    ("where-input-mask", Fn(lambda x: torch.where(x > 0.1, x, 0.0), "where(x > 0.1, x, 0)"), True, ("gt",)),
    ("matmul-two-inputs", Fn(lambda x: x @ x, "x @ x"), True, ("matmul",)),
    ("einsum-two-inputs", Fn(lambda x: torch.einsum("bi,bi->bi", x, x), "einsum(x, x)"), False, ("einsum",)),
    ("Threshold-jump", nn.Threshold(0.1, -1.0), False, ("Threshold",)),
    # a finite bound this large would cancel x in the clamp's ReLUs (x - 1e30 rounds x away in float64)
    ("clamp-huge-bound", Fn(lambda x: x.clamp(min=-1e30), "x.clamp(min=-1e30)"), True, ("round x away",)),
    ("threshold-fn-jump", Fn(lambda x: F.threshold(x, 0.0, 0.5), "F.threshold(x, 0, 0.5)"), True, ("threshold",)),
    ("Mish", nn.Mish(), False, ("Mish",)),
    ("sin", Fn(torch.sin, "torch.sin"), False, ("sin",)),
    ("exp", Fn(torch.exp, "torch.exp"), False, ("exp",)),
    ("x*x", Fn(lambda x: x * x, "x * x"), False, ("mul",)),
    ("x*sigmoid(x)", Fn(lambda x: x * torch.sigmoid(x), "x * sigmoid(x)"), True, ("mul",)),
    ("max-dim", Fn(lambda x: x.max(dim=1).values, "x.max(dim=1).values"), True, ("max",)),
    ("amax", Fn(lambda x: torch.amax(x, dim=1), "torch.amax(x, 1)"), True, ("amax",)),
    ("min-dim", Fn(lambda x: torch.min(x, 1)[0], "torch.min(x, 1)[0]"), True, ("min",)),
    ("amin-method", Fn(lambda x: x.amin(1), "x.amin(1)"), True, ("amin",)),
    ("amax-every-dim", Fn(lambda x: x.amax((1, 2, 3), keepdim=True), "x.amax((1, 2, 3))"), True, ("amax",)),
    ("adaptive-max-uneven", nn.AdaptiveMaxPool2d(3), True, ("several sizes",)),
    ("adaptive-max-indices", Fn(lambda x: F.adaptive_max_pool2d(x, 2, True)[1].float(), "adaptive max indices"), True,
     ("adaptive_max_pool2d", "indices")),
    ("leaky-relu-slope-minus-2", nn.LeakyReLU(-2.0), False, ("LeakyReLU", "leaky_relu")),
    ("leaky-relu-slope-minus-half", nn.LeakyReLU(-0.5), True, ("LeakyReLU", "leaky_relu")),
    ("leaky-relu-fn-minus-half", Fn(lambda x: F.leaky_relu(x, -0.5), "F.leaky_relu(x, -0.5)"), False, ("leaky_relu",)),
    ("prelu-negative-channel", _prelu(0.2, -0.5), True, ("PReLU",)),
    ("prelu-fn-negative", PReLUFn(-0.25), False, ("prelu",)),
    ("batch-norm-fn-training", BatchNormFn(training=True), True, ("batch norm in training mode",)),
    ("half", Fn(lambda x: x.half().float(), "x.half().float()"), False, ("half", "float16")),
    ("to-float16", Fn(lambda x: x.to(torch.float16).float(), "x.to(torch.float16)"), False, ("float16",)),
    ("to-dtype-float16", Fn(lambda x: x.to(dtype=torch.float16).float(), "x.to(dtype=float16)"), True, ("float16",)),
    ("to-bfloat16", Fn(lambda x: x.to(torch.bfloat16).float(), "x.to(torch.bfloat16)"), False, ("bfloat16",)),
    ("to-int32", Fn(lambda x: x.to(torch.int32).float(), "x.to(torch.int32)"), False, ("int32", "Tensor.to")),
    ("round", Fn(torch.round, "torch.round"), False, ("round",)),
    ("round-method", Fn(lambda x: x.round(), "x.round()"), True, ("round",)),
    ("maxpool-ceil-dilated", nn.MaxPool2d(2, 2, dilation=2, ceil_mode=True), True, ("ceil_mode and dilation",)),
    ("bilinear-upsample", Fn(lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"), "bilinear"), True,
     ("interpolate",)),
    ("clamp-min-above-max", Fn(lambda x: torch.clamp(x, 0.5, -0.5), "torch.clamp(x, 0.5, -0.5)"), False, ("min > max",)),
    # the graph is one sample's (batch 1): a model that mixes the samples of a batch fails the graph check
    ("batch-mixing-transpose", Fn(lambda x: x - x.transpose(0, 1).mean(1, keepdim=True).transpose(0, 1), "x - batch mean"),
     True, ("batch- or data-dependent",)),
    ("stack-batch", Fn(lambda x: torch.stack([x, x], 0)[0], "stack on the batch"), True, ("batch",)),
    ("cat-batch", Fn(lambda x: torch.cat([x, x], 0)[: x.shape[0]], "cat on the batch"), True, ("batch",)),
    # a softmax anywhere but at the end, over the batch, or in other arithmetic
    ("softmax-inside", nn.Softmax(dim=1), False, ("softmax", "Softmax")),
    ("log-softmax-inside", Fn(lambda x: F.log_softmax(x, 1), "F.log_softmax(x, 1)"), True, ("log_softmax",)),
    ("softmax-output-over-batch", Fn(lambda x: x, "identity"), False, ("softmax",)),  # softmax appended below
    ("softmax-output-float64", Fn(lambda x: x, "identity"), False, ("softmax",)),
    ("softmax-output-scaled", Fn(lambda x: x, "identity"), False, ("softmax",)),
    ("softmax-output-float16-positional", Fn(lambda x: x, "identity"), False, ("softmax",)),  # float16 rounding
    ("log-softmax-method-float16-positional", Fn(lambda x: x, "identity"), False, ("log_softmax",)),
]

class WithConstant(nn.Module):
    """One op of the input and a constant tensor, kept as a buffer so the float64 reference copy has it in float64."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], const: torch.Tensor, label: str) -> None:
        super().__init__()
        self.fn, self.label = fn, label
        self.register_buffer("const", const.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.const)

    def extra_repr(self) -> str:
        return self.label


class Branches(nn.Module):
    """Two branches of the input joined by torch.cat (a constant block too, when `const`)."""

    def __init__(self, dim: int, const: bool = False) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.dim = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 3, 3, padding=1), dim
        self.const = nn.Parameter(torch.randn(1, 2, 4, 4)) if const else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.relu(self.a(x)), torch.tanh(self.b(x)) if self.dim == 1 else self.b(x)[:, :2]]
        if self.const is not None:
            parts.insert(1, self.const.expand(x.shape[0], -1, -1, -1))
        return torch.cat(parts, self.dim)


LINEAR_W = torch.linspace(-1.0, 1.0, 16).reshape(4, 4).flip(1) ** 3  # a 4 x 4 constant matrix
LINEAR_V = torch.linspace(-1.0, 1.0, 40).reshape(8, 5) ** 2  # an 8 x 5 one, for the linear layer's output
LINEAR_MASK = torch.arange(16).reshape(4, 4) % 3 == 0  # a constant mask over the 4 x 4 image

CERTIFIED: list[tuple[str, nn.Module, bool]] = [
    # piecewise-linear clamps (as ReLUs), concatenation and data movement: exact, so certified,
    # and as sound as everything else. (id, op, on the conv output?)
    ("abs", Fn(torch.abs, "torch.abs"), False),  # relu(x) + relu(-x): not monotone, yet exact
    ("abs-method", Fn(lambda x: x.abs(), "x.abs()"), True),
    ("clamp", Fn(lambda x: torch.clamp(x, -0.5, 0.5), "torch.clamp(x, -0.5, 0.5)"), False),
    ("clamp-min-method", Fn(lambda x: x.clamp(min=-0.2), "x.clamp(min=-0.2)"), True),
    ("clamp-max-fn", Fn(lambda x: torch.clamp_max(x, 0.3), "torch.clamp_max(x, 0.3)"), True),
    (  # a bound at the float32 range clips nothing: left out, not written as a ReLU around 3.4e38
        "clamp-float32-range",
        Fn(lambda x: torch.clamp(x, torch.finfo(torch.float32).min, 0.4), "torch.clamp(x, -FLT_MAX, 0.4)"),
        True,
    ),
    (  # float16's range, as fp16-safe models clamp: clips nothing here, rounds nothing in float32
        "clamp-float16-range",
        Fn(lambda x: torch.clamp(x, -65504.0, 65504.0), "torch.clamp(x, -65504, 65504)"),
        False,
    ),
    ("clamp-tensor", Fn(lambda x: x.clamp(torch.linspace(-1, 0, 4), torch.linspace(0.1, 0.4, 4)), "tensor bounds"), True),
    ("minimum-full-like", Fn(lambda x: torch.minimum(x, torch.full_like(x, 0.3)), "torch.minimum(x, full_like(x, 0.3))"), True),
    ("maximum-const-first", Fn(lambda x: torch.maximum(torch.zeros_like(x) - 0.2, x), "torch.maximum(zeros_like(x) - 0.2, x)"), True),
    ("minimum-method", Fn(lambda x: x.minimum(x.new_full(x.shape, 0.1)), "x.minimum(x.new_full(shape, 0.1))"), True),
    ("Hardtanh", nn.Hardtanh(), False),
    ("Hardtanh-0.2", nn.Hardtanh(-0.1, 0.2), True),
    ("hardtanh-fn", Fn(F.hardtanh, "F.hardtanh"), True),
    ("ReLU6", nn.ReLU6(), False),
    ("relu6-fn", Fn(lambda x: F.relu6(3 * x), "F.relu6(3 x)"), True),
    ("cat", Fn(lambda x: torch.cat([x, x], 1), "torch.cat([x, x], 1)"), True),
    ("cat-branches", Branches(1), True),
    ("cat-width", Branches(3, const=True), True),
    ("stack", Fn(lambda x: torch.stack([x, x.flip(3)], 2), "torch.stack([x, x.flip(3)], 2)"), True),
    ("slice", Fn(lambda x: x[:, :, 1:3], "x[:, :, 1:3]"), True),
    ("slice-step", Fn(lambda x: x[..., ::2, 1:], "x[..., ::2, 1:]"), True),
    ("narrow-select", Fn(lambda x: x.narrow(3, 1, 2).select(1, 0), "narrow, select"), True),
    ("chunk", Fn(lambda x: torch.cat([x.chunk(2, 1)[1], x.chunk(2, 1)[0]], 1), "swap x.chunk(2, 1)"), True),
    ("split-sizes", Fn(lambda x: torch.split(x, [1, 3], dim=3)[1], "torch.split(x, [1, 3], 3)[1]"), True),
    ("unbind", Fn(lambda x: torch.cat([x.unbind(1)[1], x.unbind(1)[0]], 2), "unbind, cat"), True),
    ("transpose", Fn(lambda x: x.transpose(2, 3), "x.transpose(2, 3)"), True),
    ("permute", Fn(lambda x: x.permute(0, 1, 3, 2), "x.permute(0, 1, 3, 2)"), True),
    ("flip-roll", Fn(lambda x: torch.roll(x.flip(2), 1, 3), "roll(flip(x))"), True),
    ("repeat", Fn(lambda x: x.repeat(1, 2, 1, 1), "x.repeat(1, 2, 1, 1)"), True),
    ("expand", Fn(lambda x: x[:, :1].expand(-1, 3, -1, -1), "expand"), True),
    ("nearest-upsample", nn.Upsample(scale_factor=2), True),
    ("interpolate-nearest", Fn(lambda x: F.interpolate(x, size=(5, 7)), "interpolate to 5x7"), True),
    ("pixel-shuffle", Fn(lambda x: F.pixel_unshuffle(x, 2), "pixel_unshuffle"), True),
    ("channel-shuffle", Fn(lambda x: x.view(-1, 2, 1, 4, 4).transpose(1, 2).reshape(-1, 2, 4, 4), "channel shuffle"), True),
    ("ZeroPad2d", nn.ZeroPad2d((1, 0, 2, 1)), True),
    ("pad-value", Fn(lambda x: F.pad(x, (1, 1, 0, 2), value=0.3), "F.pad(value=0.3)"), True),
    ("pad-crop", Fn(lambda x: F.pad(x, (-1, 0, 0, -1)), "F.pad(-1)"), True),
    ("ReflectionPad2d", nn.ReflectionPad2d(1), True),
    ("replicate-pad", Fn(lambda x: F.pad(x, (2, 0, 1, 1), mode="replicate"), "replicate"), True),
    ("maxpool-ceil", nn.MaxPool2d(3, 2, ceil_mode=True), True),
    # global (or per-row / per-column) max and min pooling: a max pool whose window spans the reduced dims
    ("AdaptiveMaxPool2d-1", nn.AdaptiveMaxPool2d(1), True),
    ("AdaptiveMaxPool2d-2", nn.AdaptiveMaxPool2d((2, 1)), True),
    ("adaptive-max-fn", Fn(lambda x: F.adaptive_max_pool2d(x, 2), "F.adaptive_max_pool2d(x, 2)"), True),
    ("amax-spatial", Fn(lambda x: torch.amax(x, (2, 3), keepdim=True), "torch.amax(x, (2, 3))"), True),
    ("amax-method-width", Fn(lambda x: x.amax(-1), "x.amax(-1)"), True),
    ("amin-height", Fn(lambda x: torch.amin(x, 2), "torch.amin(x, 2)"), True),
    ("maxpool-ceil-padded", Fn(lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True), "max_pool2d(3, 2, 1, ceil)"), True),
    ("conv-reflect", nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), True),
    ("conv-circular", nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="circular"), True),
    # PReLU: one slope is a LeakyReLU; slopes per channel, (1 - a) relu(x) + a x (hunt 24)
    ("prelu-one-slope", _prelu(0.25), False),
    ("prelu-per-channel", _prelu(0.1, 1.5), True),
    ("prelu-fn-per-channel", PReLUFn(0.0, 0.3), True),
    ("batch-norm-fn", BatchNormFn(), True),
    # the convex ELUs: alpha <= 1 (slope alpha e^x below 0, 1 above), and CELU for every alpha > 0
    ("ELU", nn.ELU(), False),
    ("elu-fn-0.3", Fn(lambda x: F.elu(3 * x, 0.3), "F.elu(3 x, 0.3)"), True),
    ("CELU-2", nn.CELU(2.0), True),
    ("celu-fn-0.2", Fn(lambda x: torch.celu(2 * x, 0.2), "torch.celu(2 x, 0.2)"), False),
    # maximum / minimum of two input-dependent tensors: v + relu(u - v), u - relu(u - v) (hunt 27)
    ("minimum-by-input", Fn(lambda x: torch.minimum(x, x.flip(1)), "min(x, flip(x))"), False),
    ("maximum-leaky", Fn(lambda x: torch.maximum(x, 0.1 * x), "max(x, 0.1 x)"), True),
    ("maximum-method-broadcast", Fn(lambda x: x.maximum(x.mean(1, keepdim=True)), "x.maximum(x.mean(1))"), True),
    ("max-pairwise", Fn(lambda x: torch.max(x, x.roll(1, 3)), "torch.max(x, roll(x))"), True),
    ("min-pairwise-method", Fn(lambda x: x.min(-x), "x.min(-x)"), False),
    ("max-pairwise-constant", Fn(lambda x: torch.max(x, torch.linspace(-0.3, 0.3, 4)), "torch.max(x, linspace)"), True),
    ("fmax-leaky", Fn(lambda x: torch.fmax(x, 0.2 * x), "fmax(x, 0.2 x)"), True),
    ("fmin-method-constant", Fn(lambda x: x.fmin(torch.tensor(0.25)), "x.fmin(0.25)"), False),
    # shrinks and a threshold at its own value: ReLUs and sums, exactly
    ("Softshrink", nn.Softshrink(0.25), True),
    ("softshrink-fn", Fn(lambda x: F.softshrink(4 * x, 1.5), "F.softshrink(4 x, 1.5)"), False),
    ("Tanhshrink", nn.Tanhshrink(), False),
    ("tanhshrink-fn", Fn(lambda x: F.tanhshrink(3 * x), "F.tanhshrink(3 x)"), True),
    ("Threshold-at-value", nn.Threshold(0.125, 0.125), True),
    ("threshold-fn", Fn(lambda x: F.threshold(x, -0.25, -0.25), "F.threshold(x, -0.25, -0.25)"), False),
    # ops linear in their one input-dependent operand by definition: a matrix read off the op
    ("einsum", WithConstant(lambda x, w: torch.einsum("bchw,wv->bchv", x, w), LINEAR_W, "einsum(bchw,wv->bchv)"), True),
    ("einsum-list", WithConstant(lambda x, v: torch.einsum("bi,ij->bj", [x, v]), LINEAR_V, "einsum(bi,ij->bj)"), False),
    ("matmul-constant-left", WithConstant(lambda x, w: w @ x, LINEAR_W, "W @ x"), True),
    ("mm", WithConstant(lambda x, v: torch.mm(x, v), LINEAR_V, "torch.mm(x, V)"), False),
    ("matmul-3d-constant", WithConstant(lambda x, w: x.flatten(2) @ w, LINEAR_W.reshape(1, 16, 1), "x @ W (3-D)"), True),
    ("tensordot", WithConstant(lambda x, w: torch.tensordot(x, w, dims=([2], [1])), LINEAR_W, "tensordot"), True),
    ("where-constant-mask", Fn(lambda x: torch.where(LINEAR_MASK, x, 0.5), "where(mask, x, 0.5)"), True),
    ("where-two-branches", Fn(lambda x: torch.where(LINEAR_MASK, x, -0.5 * x.flip(3)), "where(mask, x, -flip(x) / 2)"), True),
    ("where-two-branches-broadcast", Fn(lambda x: torch.where(LINEAR_MASK, x, x.mean(1, keepdim=True)), "where(mask, x, mean)"),
     True),
    ("where-constant-mask-right", Fn(lambda x: torch.where(LINEAR_MASK, -1.0, x), "where(mask, -1, x)"), True),
    # transposed convolutions: linear, with the output padding read off the traced shape
    ("ConvTranspose2d", nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), True),
    ("ConvTranspose2d-groups-dilation", nn.ConvTranspose2d(2, 4, 2, stride=3, groups=2, dilation=2), True),
    ("conv-transpose-fn", ConvTransposeFn(), True),
    # Hardsigmoid, clamp(x / 6 + 1 / 2, 0, 1): a scale and a clamp
    ("Hardsigmoid", nn.Hardsigmoid(), True),
    ("hardsigmoid-fn", Fn(lambda x: F.hardsigmoid(8 * x), "F.hardsigmoid(8 x)"), False),
    # two input-dependent tensors of different shapes added: the smaller repeated, then a sum (hunt 25)
    ("add-broadcast", Fn(lambda x: x + x.sum(1, keepdim=True), "x + x.sum(1, keepdim=True)"), True),
    ("sub-spatial-mean", Fn(lambda x: x - x.mean((2, 3), keepdim=True), "x - x.mean((2, 3), keepdim=True)"), True),
    # sums over dimensions: a mean times the count (hunt 24)
    ("sum-method", Fn(lambda x: x.sum(dim=3, keepdim=True), "x.sum(dim=3, keepdim=True)"), True),
    ("sum-fn", Fn(lambda x: torch.sum(x, (2, 3)), "torch.sum(x, (2, 3))"), True),
    # adaptive average pools with windows of different sizes: gather, window sums, a scale
    ("adaptive-uneven", nn.AdaptiveAvgPool2d((3, 2)), True),
    ("adaptive-overlap", Fn(lambda x: F.adaptive_avg_pool2d(x, 3), "F.adaptive_avg_pool2d(x, 3)"), True),
    ("adaptive-larger", nn.AdaptiveAvgPool2d((5, 7)), True),
    # a softmax or log-softmax closing the network picks the class its scores pick (appended below)
    ("softmax-output", Fn(lambda x: x, "identity"), False),
    ("log-softmax-output", Fn(lambda x: x, "identity"), True),
]


CLOSING = {
    "softmax-output": nn.Softmax(dim=1),
    "log-softmax-output": Fn(lambda x: F.log_softmax(x, dim=-1), "F.log_softmax(x, -1)"),
    "softmax-output-over-batch": Fn(lambda x: F.softmax(x, dim=0), "F.softmax(x, 0)"),
    "softmax-output-float64": Fn(lambda x: F.softmax(x, dim=1, dtype=torch.float64).float(), "softmax in float64"),
    "softmax-output-scaled": Fn(lambda x: 2 * F.softmax(x, dim=1), "2 softmax(x)"),
    "softmax-output-float16-positional": Fn(lambda x: torch.softmax(x, 1, torch.float16), "torch.softmax(x, 1, float16)"),
    "log-softmax-method-float16-positional": Fn(lambda x: x.log_softmax(1, torch.float16), "x.log_softmax(1, float16)"),
}


def _refusal_model(case: str, op: nn.Module, image: bool) -> nn.Module:
    net = _sandwich(op, image)
    if case in CLOSING:
        net.append(CLOSING[case])
    return net


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand((6, 1, 4, 4), generator=gen), torch.zeros(6, dtype=torch.long)


def _assert_refused(net: nn.Module, x: torch.Tensor, fragments: tuple[str, ...]) -> None:
    y = net(x).argmax(1)
    with pytest.raises(CertificateUnavailable) as info:
        certify_l2(net, x, y, budget="fast")
    message = str(info.value)
    assert message.startswith("certificate unavailable: "), message
    assert any(f.lower() in message.lower() for f in fragments), f"{message!r} names none of {fragments}"


@pytest.mark.parametrize("case, op, image, fragments", REFUSED, ids=[c[0] for c in REFUSED])
def test_unsupported_op_is_refused_naming_it(case: str, op: nn.Module, image: bool, fragments: tuple[str, ...]) -> None:
    x, _ = _inputs()
    _assert_refused(_refusal_model(case, op, image), x, fragments)


def test_probabilities_from_a_closing_softmax_are_certified_as_the_scores_before_it() -> None:
    x, _ = _inputs()
    scores = _sandwich(Fn(lambda x: x, "identity"), False)
    y = scores(x).argmax(1)
    want = certify_l2(scores, x, y).radius
    assert (want > 0).all()
    net = _refusal_model("softmax-output", Fn(lambda x: x, "identity"), False)
    model, info = wrap_model(RawModel(net, format="torch", input_shape=None, num_classes=None), sample_shape=(1, 4, 4), probe=x)
    assert info.output_kind == "probabilities"
    cert = certify_l2(model, x, y)
    assert torch.allclose(cert.radius, want, rtol=1e-2) and (cert.radius <= want).all()  # less only by the tie margin
    assert any("ends in a softmax" in note for note in cert.notes), cert.notes


def test_probabilities_not_from_a_softmax_are_refused() -> None:
    x, _ = _inputs()
    normalized = Fn(lambda z: torch.relu(z) / torch.relu(z).sum(1, keepdim=True).clamp_min(1e-6), "relu / sum")
    net = _sandwich(Fn(lambda x: x, "identity"), False).append(normalized).eval()
    model, info = wrap_model(RawModel(net, format="torch", input_shape=None, num_classes=None), sample_shape=(1, 4, 4), probe=x)
    assert info.output_kind == "probabilities"
    _assert_refused(model, x, ("probabilities", "div", "sum"))


def test_a_closing_softmax_that_rounds_two_scores_to_a_tie_inside_the_ball_is_not_certified_there() -> None:
    """Scores 2e-6 apart that close in slowly: a float32 softmax ties them (argmax: the first) near the edge
    of the ball the scores alone certify, so the softmax model's radius must stop short of it."""
    x0 = torch.full((1, 1, 4, 4), 0.5)
    w = torch.full((16,), 1e-5 / 4)  # ||w|| = 1e-5
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2), nn.Softmax(dim=1)).eval().requires_grad_(False)
    net[1].weight.zero_()
    net[1].weight[1] = w
    net[1].bias.copy_(torch.tensor([0.0, 2e-6 - float(w @ x0.flatten())]))
    y = torch.ones(1, dtype=torch.long)
    scores = certify_l2(net[:2], x0, y).radius
    assert net(x0).argmax(1).item() == 1 and scores.item() > 0.19  # 2e-6 / 1e-5, less float32 rounding
    inside = x0 - 0.199 * (w / w.norm()).view(1, 1, 4, 4)  # margin 1e-8 there: a tie for float32 exp
    assert (inside - x0).norm().item() < scores.item() and net[:2](inside).argmax(1).item() == 1
    assert net(inside).argmax(1).item() == 0 and 0 <= inside.min() and inside.max() <= 1
    assert certify_l2(net, x0, y).radius.item() < 0.199


@pytest.mark.parametrize("case, op, image", CERTIFIED, ids=[c[0] for c in CERTIFIED])
def test_exact_rewrite_is_certified_soundly(case: str, op: nn.Module, image: bool) -> None:
    """Clamps, concatenation and data movement get a certificate, and no attack or probe breaks it."""
    x, _ = _inputs()
    net = _refusal_model(case, op, image).requires_grad_(False)
    certify_l2(net, x, net(x).argmax(1), budget="fast")  # raises if refused
    assert_radii_survive(RandomNet(-1, net, (1, 4, 4), 3, f"{case}: {' '.join(repr(net).split())}", copy.deepcopy(net).double()))


def test_a_clamp_or_max_adds_no_float32_rounding_of_its_own() -> None:
    """float32 computes clamp(x, lo, hi) and max(u, v) exactly; the ReLUs and sums the bound writes
    them as are not what the model runs. Charged as if they were, a clamp at float16's range
    (x - (-65504) rounds x to 2^-8) took every radius to 0, as did max(u, v) with v far below u.
    Such ops, which pick u here, now certify what the net without them certifies."""
    x, _ = _inputs()
    torch.manual_seed(0)
    plain = _sandwich(nn.ReLU(), True).requires_grad_(False)
    y = plain(x).argmax(1)
    base = certify_l2(plain, x, y).radius
    assert base.gt(0).all()
    ops = {
        "clamp": Fn(lambda h: torch.clamp(h, -65504.0, 65504.0), "clamp(h, -65504, 65504)"),
        "hardtanh": nn.Hardtanh(-1e5, 1e5),
        "max-far-below": Fn(lambda h: torch.maximum(h, h.flip(3) - 1e5), "max(h, flip(h) - 1e5)"),
    }
    for case, op in ops.items():
        net = copy.deepcopy(plain)
        net.insert(2, op)  # after the convolution's ReLU (`_sandwich`)
        assert torch.equal(net(x), plain(x)), case
        radius = certify_l2(net, x, y).radius
        assert (radius >= 0.9 * base).all(), (case, radius, base)


CLAMP_SPELLINGS = {
    "clamp": Fn(lambda h: torch.clamp(h, 0.1, 0.3), "torch.clamp(h, 0.1, 0.3)"),
    "clamp-min-method": Fn(lambda h: h.clamp_min(0.1), "h.clamp_min(0.1)"),
    "Hardtanh": nn.Hardtanh(-0.1, 0.7),
    "Threshold": nn.Threshold(0.1, 0.1),
    "minimum-full-like": Fn(lambda h: torch.minimum(h, torch.full_like(h, 0.3)), "minimum(h, full_like(h, 0.3))"),
    "Hardsigmoid": nn.Hardsigmoid(),
}


@pytest.mark.parametrize("case", CLAMP_SPELLINGS)
def test_a_clamp_in_the_graph_clips_at_the_float32_bound_the_model_clips_at(case: str) -> None:
    """The clamp's steps charge no rounding (`_Builder.rounding_free`): sound only if the float32
    model's clamp returns exactly the bound the graph holds. torch rounds a Python 0.1 to
    float32(0.1), 1.5e-9 away from 0.1: the graph must hold float32(0.1), in every spelling."""
    from robaudit.certify.rounding import local_rounding

    x = torch.rand((2, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), CLAMP_SPELLINGS[case], nn.Linear(4, 3)).eval()
    graph = build_graph(net, x[:1])
    steps = [i for i, node in enumerate(graph.nodes) if not node.rounds]
    assert steps, graph.nodes
    shifts = [graph.nodes[i].op.bias for i in steps if getattr(graph.nodes[i].op, "bias", None) is not None]
    assert shifts and all(torch.equal(b, b.float().double()) for b in shifts), shifts
    magnitudes = [v.abs() for v in graph.forward(x.to(torch.float64))]
    assert max(float(torch.as_tensor(local_rounding(graph, i, magnitudes)).max()) for i in steps) < 1e-30
    with torch.no_grad():  # and the graph computes the float32 model's clamp exactly
        torch.testing.assert_close(graph.forward(x.to(torch.float64))[-1].float(), net(x), rtol=1e-6, atol=1e-6)


def test_a_decision_that_never_changes_gets_the_capped_radius() -> None:
    """Random net 300142 clamps its input to [-0.05, 0.85], so every score is bounded and class 3 wins
    everywhere. crown proved radii up to 6e32 there, where the float64 graph's clamp (x - lo at
    |x| ~ 1e31) cancels to nonsense, and the checks inside those balls refused the net. Radii stop at
    10^6 pixel units, as the Lipschitz bounds' do for a margin that cannot change."""
    from robaudit.certify.radius import RADIUS_CAP

    rn = random_net(300_142, True)
    x, y = pick_inputs(rn, 3, torch.Generator().manual_seed(10_000 + 300_142))
    far = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 1e8
    assert (rn.model(torch.cat([x, far])).argmax(1) == 3).all() and (y == 3).all()
    radius = certify_l2(rn.model, x, y, budget="fast").radius  # refused before the cap
    assert (radius > 0).all() and (radius <= RADIUS_CAP).all() and (radius == RADIUS_CAP).any(), radius


def assert_radii_survive(rn: RandomNet, budgets: tuple[str, ...] = ("fast", "default")) -> None:
    """Certify a few inputs of one net under each budget (every method alone too) and attack every radius."""
    outcome = Outcome()
    for budget in budgets:
        got = check_net(rn, Effort(inputs=4, every_method_alone=True), torch.Generator().manual_seed(2), budget)
        outcome.violations += got.violations
        outcome.samples += got.samples
        outcome.positive += got.positive
    assert not outcome.violations, "\n".join(outcome.violations)
    assert outcome.samples > 0 and outcome.positive > 0, (outcome.samples, outcome.positive)
