"""The L2-ball coupling of a ReLU layer's units (`robaudit/certify/ball.py`, SDP-CROWN's offset).

Sound: the bound must lie below the true minimum of lam . relu(z) - g . z over the box and
the ball, which a dense search finds on small layers. Useful: it is exact on the paper's
example and never below the per-unit (CROWN) intercepts. In use: on a CIFAR-10 fixture its
radii are larger than without it, and no attack breaks them.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from conftest import fixtures_dir
from robaudit.certify.ball import Ball

F64 = torch.float64


def true_minimum(lam, g, neg, lo, hi, centre, radius, gen, points=20000):
    """min of lam . s(z) - g . z over {z in [lo, hi], ||z - c|| <= R}: random points and projected descent."""
    m = lam.numel()
    best = math.inf
    z = lo + (hi - lo) * torch.rand(points, m, generator=gen, dtype=F64)
    d = z - centre
    d = d * (radius / d.norm(dim=1, keepdim=True)).clamp(max=1) * torch.rand(points, 1, generator=gen, dtype=F64) ** (1 / m)
    z = (centre + d).clamp(lo, hi)
    for _ in range(200):  # projected subgradient descent from every point (the box then the ball, alternately)
        s = torch.where(z >= 0, 1.0, neg)
        z = z - 0.02 * radius * (lam * s - g)
        for _ in range(3):
            z = z.clamp(lo, hi)
            d = z - centre
            z = centre + d * (radius / d.norm(dim=1, keepdim=True).clamp_min(1e-300)).clamp(max=1)
        ok = ((z - centre).norm(dim=1) <= radius * (1 + 1e-12)) & (z >= lo).all(1) & (z <= hi).all(1)
        s = torch.where(z >= 0, z, neg * z)
        val = (lam * s - g * z).sum(1)
        best = min(best, float(val[ok].min())) if bool(ok.any()) else best
    return best


def ball_of(lo, hi, centre, radius):
    free = (lo < 0) & (hi > 0)
    return Ball.gather(free[None], lo[None], hi[None], centre[None], torch.tensor([radius], dtype=F64))


@pytest.mark.parametrize("seed", range(40))
def test_the_coupled_offset_never_exceeds_the_true_minimum(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    m = int(torch.randint(2, 6, (1,), generator=gen))
    neg = [0.0, 0.0, 0.1][seed % 3]
    lo = -torch.rand(m, generator=gen, dtype=F64) * 2
    hi = torch.rand(m, generator=gen, dtype=F64) * 2
    centre = lo + (hi - lo) * torch.rand(m, generator=gen, dtype=F64)
    radius = float(torch.rand(1, generator=gen, dtype=F64)) * float((hi - lo).norm()) * 0.6 + 1e-3
    lam = torch.randn(m, generator=gen, dtype=F64)
    slope = torch.rand(m, generator=gen, dtype=F64)  # any g: the bound holds whatever the slopes
    g = lam * (neg + (1 - neg) * slope)
    bound, size = ball_of(lo, hi, centre, radius).offset(lam[None, None], g[None, None], neg)
    truth = true_minimum(lam, g, neg, lo, hi, centre, radius, gen)
    assert float(bound) <= truth + 1e-9, (float(bound), truth)
    assert float(size) >= abs(float(bound)) * 0.5  # the sum of |terms| the outward rounding scales with


def test_the_offset_is_exact_on_the_papers_example() -> None:
    """-relu(z1) - relu(z2) on the unit disk, g = -(0.5, 0.5): CROWN's intercept is -1, the true minimum -1/sqrt(2)."""
    lo, hi, centre = torch.full((2,), -1.0, dtype=F64), torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64)
    lam = torch.full((1, 1, 2), -1.0, dtype=F64)
    g = torch.full((1, 1, 2), -0.5, dtype=F64)
    bound, _ = ball_of(lo, hi, centre, 1.0).offset(lam, g, 0.0)
    crown = float((lam.clamp_max(0) * 0.5).sum())  # chord intercepts u l / (u - l) = 0.5 each
    assert crown == -1.0
    assert float(bound) == pytest.approx(-1 / math.sqrt(2), rel=1e-2)  # mu from 6 bisection steps
    assert float(bound) <= -1 / math.sqrt(2)


def test_a_ball_as_large_as_the_box_gives_the_per_unit_minimum() -> None:
    gen = torch.Generator().manual_seed(7)
    lo, hi = -torch.rand(6, generator=gen, dtype=F64), torch.rand(6, generator=gen, dtype=F64)
    centre = (lo + hi) / 2
    lam = torch.randn(1, 1, 6, generator=gen, dtype=F64)
    chord = hi / (hi - lo)
    g = torch.where(lam < 0, lam * chord, lam * (hi >= -lo).to(F64))  # CROWN's lines
    crown = float((lam.clamp_max(0) * (-chord * lo)).sum())
    bound, _ = ball_of(lo, hi, centre, 10.0).offset(lam, g, 0.0)
    assert float(bound) >= crown - 1e-12  # never below CROWN's intercepts


def cifar_fixture(n: int):
    """oval21_cifar_base_kw as `robaudit scan` loads it, and the first n CIFAR-10 test images."""
    from robaudit.models import load_model, wrap_model

    root = fixtures_dir()
    entry = json.loads((root / "manifest.json").read_text())["models"]["oval21_cifar_base_kw"]
    data = np.load(root / "data" / "cifar10_test_first100.npz")
    x, y = torch.tensor(data["x"][:n]).float(), torch.tensor(data["y"][:n]).long()
    mean = None if entry["mean"] == [0.0] else entry["mean"]
    std = None if entry["std"] == [1.0] else entry["std"]
    model, _ = wrap_model(load_model(root / entry["file"]), sample_shape=tuple(x.shape[1:]), probe=x[:1], mean=mean, std=std)
    return model, x, y


@pytest.mark.usefixtures("one_thread")
def test_coupling_raises_radii_on_a_cifar10_fixture_and_attacks_do_not_break_them() -> None:
    """oval21_cifar_base_kw (3072 inputs): with the ball the default budget proves larger radii, all below FMN's."""
    from robaudit.attacks.base import AttackContext
    from robaudit.attacks.fmn import FMN
    from robaudit.certify import certify_l2
    from robaudit.certify.budget import get_budget
    from robaudit.threats import Threat

    model, x, y = cifar_fixture(3)
    base = dataclasses.replace(get_budget("default"), bab_evals=0)
    without = certify_l2(model, x, y, budget=dataclasses.replace(base, crown_ball=False)).radius
    with_ball = certify_l2(model, x, y, budget=dataclasses.replace(base, crown_ball=True)).radius
    ok = without > 0
    assert bool(ok.any())
    assert bool((with_ball[ok] >= 1.2 * without[ok]).all()), (with_ball, without)
    ctx = AttackContext(lower=0.0, upper=1.0, num_classes=10, generator=torch.Generator().manual_seed(0))
    adv = FMN(steps=300).perturb(model, x, y, Threat("l2", 1.0), ctx)
    with torch.no_grad():
        wrong = model(adv).argmax(1) != y
    dist = (adv - x).flatten(1).double().norm(dim=1)
    assert bool((with_ball[wrong] < dist[wrong]).all()), (with_ball, dist)


def _layer_spreads_hold(model, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, gen: torch.Generator) -> tuple[int, float]:
    """Attack every coupled layer's ball: ||z - c|| may not exceed its radius R anywhere in the eps-ball.

    Projected gradient ascent of ||z_j(x + d) - z_j(x)|| over ||d|| <= eps (float64 graph values,
    random starts, then the sphere), for every ReLU layer's input the coupling uses. Returns how
    many layers were checked and the largest share of R an attack reached.
    """
    from robaudit.certify.budget import get_budget
    from robaudit.certify.certificate import _batch
    from robaudit.certify.crown import CrownBound
    from robaudit.certify.graph import build_graph

    graph = build_graph(model, x[:1])
    batch = _batch(graph, x.double(), y)
    crown = CrownBound(graph, get_budget("default"))
    idx = torch.arange(len(x))
    ctx = crown._intermediate(batch, idx, eps)
    checked, reach = 0, 0.0
    for relu, coupled in ctx.ball.items():
        j = graph.nodes[relu].inputs[0]
        radius = coupled.radius[:, 0]
        centre = batch.values[j].flatten(1)
        for _ in range(3):
            d = torch.randn(len(x), *x.shape[1:], generator=gen, dtype=F64)
            d = d / d.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1)) * eps.view(-1, *[1] * (x.dim() - 1))
            for _ in range(60):
                d.requires_grad_(True)
                with torch.enable_grad():
                    far = (graph.forward(x.double() + d)[j].flatten(1) - centre).norm(dim=1)
                    (grad,) = torch.autograd.grad(far.sum(), d)
                with torch.no_grad():
                    assert bool((far <= radius).all()), (relu, far.tolist(), radius.tolist())
                    reach = max(reach, float((far / radius).max()))
                    g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-300).view(-1, *[1] * (x.dim() - 1))
                    d = d + 0.3 * eps.view(-1, *[1] * (x.dim() - 1)) * g
                    d = d * (eps / d.flatten(1).norm(dim=1)).clamp(max=1).view(-1, *[1] * (x.dim() - 1))
        checked += 1
    return checked, reach


def test_every_coupled_layer_ball_holds_the_layer_on_random_nets() -> None:
    """R of each ReLU layer (`CrownBound._spread`) bounds how far the eps-ball moves that layer, on random nets.

    A sharp test of the coupling's one new input: an R below the layer's true spread is caught
    here even where the rest of CROWN's slack would hide it from the radius attacks. Not vacuous:
    many layers are checked, and on some the attacks reach most of R (the first layer's R is exact).
    """
    from random_nets import random_net
    from test_certify_property import pick_inputs

    checked, reach = 0, 0.0
    for seed in range(800, 830):
        rn = random_net(seed)
        gen = torch.Generator().manual_seed(seed)
        x, y = pick_inputs(rn, 3, gen)
        if len(x) == 0:
            continue
        for scale in (0.05, 0.3):
            eps = torch.full((len(x),), scale, dtype=F64) * (1 + x.flatten(1).double().norm(dim=1)) / 4
            got = _layer_spreads_hold(rn.model, x, y, eps, gen)
            checked += got[0]
            reach = max(reach, got[1])
    print(f"coupled layers checked: {checked}, largest share of R reached: {reach:.3f}")
    assert checked >= 20, checked
    assert reach > 0.8, reach


@pytest.mark.parametrize("scale", [1e-50, 1e-30, 1e-6, 1e6, 1e30, 1e50])
def test_the_float32_search_for_mu_stays_sound_at_extreme_scales(scale: float) -> None:
    """The search for mu runs in float32 (every mu is sound; only the final bound is float64): slopes far outside
    float32's range must still give a finite bound below the true minimum, which scales with them."""
    gen = torch.Generator().manual_seed(7)
    m = 4
    lo = -torch.rand(m, generator=gen, dtype=F64) * 2
    hi = torch.rand(m, generator=gen, dtype=F64) * 2
    centre = lo + (hi - lo) * torch.rand(m, generator=gen, dtype=F64)
    radius = 0.4 * float((hi - lo).norm())
    lam = torch.randn(m, generator=gen, dtype=F64)
    g = lam * torch.rand(m, generator=gen, dtype=F64)
    truth = true_minimum(lam, g, 0.0, lo, hi, centre, radius, gen)
    bound, _ = ball_of(lo, hi, centre, radius).offset((lam * scale)[None, None], (g * scale)[None, None], 0.0)
    assert math.isfinite(float(bound))
    assert float(bound) <= truth * scale + 1e-9 * abs(truth) * scale
    unscaled, _ = ball_of(lo, hi, centre, radius).offset(lam[None, None], g[None, None], 0.0)
    if 1e-30 <= scale <= 1e30:  # beyond float32's range the search steers blind, and stays sound
        assert float(bound) / scale == pytest.approx(float(unscaled), rel=1e-3)  # as tight as at scale 1
