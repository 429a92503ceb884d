"""Certified radii against the exact smallest adversarial distance of tiny ReLU nets.

An attack gives an upper bound on the distance to the decision boundary, and may miss a
narrow region; for a net with a handful of ReLU units the distance itself can be computed.
The net is affine on each region of fixed ReLU states, so the closest point with another
class on top is, per region and rival class, a projection onto a polyhedron: a least
distance program, solved exactly by non-negative least squares (Lawson and Hanson,
*Solving Least Squares Problems*, ch. 23). The minimum over every region and rival is the
distance D in exact arithmetic; every budget's radius must stay at or below it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from robaudit.certify import certify_l2

optimize = pytest.importorskip("scipy.optimize")  # scikit-learn, a test extra, brings scipy

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, CLASSES = 4, 3


def least_distance(g: np.ndarray, h: np.ndarray) -> np.ndarray | None:
    """The shortest z with g z >= h, or None where no z satisfies it (Lawson and Hanson's LDP via NNLS)."""
    e = np.vstack([g.T, h[None, :]])
    f = np.zeros(e.shape[0])
    f[-1] = 1.0
    u, _ = optimize.nnls(e, f, maxiter=50 * e.shape[1])
    r = e @ u - f
    if abs(r[-1]) < 1e-12:  # the residual vanishes exactly when the constraints are inconsistent
        return None
    return -r[:-1] / r[-1]


def layers(net: nn.Sequential) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy()) for m in net if isinstance(m, nn.Linear)]


def exact_distance(net: nn.Sequential, x: np.ndarray, y: int) -> tuple[float, np.ndarray | None]:
    """The smallest ||x' - x|| at which a class other than y scores at least as high, over all ReLU regions,
    and the step z = x' - x that reaches it."""
    affine = layers(net)
    units = [w.shape[0] for w, _ in affine[:-1]]
    best, step = np.inf, None
    for states in itertools.product((0.0, 1.0), repeat=sum(units)):
        rows, rhs = [], []  # the region's constraints on z = x' - x, as rows @ z >= rhs
        a, c = np.eye(len(x)), np.zeros(len(x))  # the layer input as a @ x' + c
        start = 0
        for (w, b), n in zip(affine[:-1], units):
            s = np.asarray(states[start:start + n])
            start += n
            pre_a, pre_c = w @ a, w @ c + b
            sign = np.where(s > 0, 1.0, -1.0)[:, None]  # active: pre >= 0; inactive: pre <= 0
            rows.append(sign * pre_a)
            rhs.append(-(sign[:, 0] * (pre_a @ x + pre_c)))
            a, c = s[:, None] * pre_a, s * pre_c
        w, b = affine[-1]
        out_a, out_c = w @ a, w @ c + b
        for j in range(out_a.shape[0]):
            if j == y:
                continue
            rival_a = out_a[j] - out_a[y]  # class j at least as high: rival_a @ x' + rival_c >= 0
            rival_c = out_c[j] - out_c[y]
            g = np.vstack([*rows, rival_a[None, :]])
            h = np.concatenate([*rhs, [-(rival_a @ x + rival_c)]])
            z = least_distance(g, h)
            if z is not None and float(np.linalg.norm(z)) < best:
                best, step = float(np.linalg.norm(z)), z
    return best, step


def tiny_net(seed: int) -> nn.Sequential:
    """One or two hidden ReLU layers (at most 8 units), some units exactly at their kink at the first sample."""
    gen = torch.Generator().manual_seed(seed)
    widths = [DIM, 4 + seed % 3] + ([3] if seed % 2 else []) + [CLASSES]
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        lin = nn.Linear(a, b).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn((b, a), generator=gen, dtype=torch.float64))
            lin.bias.copy_(0.5 * torch.randn((b,), generator=gen, dtype=torch.float64))
        mods += [lin, nn.ReLU()] if i < len(widths) - 2 else [lin]
    net = nn.Sequential(*mods).float().eval()
    if seed % 3 == 0:  # a unit exactly at 0 at the sample, and a duplicate of it: degenerate kinks
        x0 = torch.full((1, DIM), 0.5)
        first = net[0]
        with torch.no_grad():
            first.bias[0] = -(first.weight[0] @ x0[0])
            first.weight[1], first.bias[1] = first.weight[0], first.bias[0]
    return net


@pytest.mark.parametrize("budget", ["fast", "default", "tight"])
def test_radii_never_exceed_the_exact_distance_to_the_boundary(budget: str) -> None:
    checked, ratios = 0, []
    for seed in range(12):
        net = tiny_net(seed)
        gen = torch.Generator().manual_seed(100 + seed)
        x = torch.cat([torch.full((1, DIM), 0.5), torch.rand((3, DIM), generator=gen)])
        y = net(x).argmax(1)
        y[3] = (y[3] + 1) % CLASSES  # a label the model does not give: radius 0
        radius = certify_l2(net, x, y, budget=budget).radius
        assert radius[3] == 0
        for i in range(3):
            d, _ = exact_distance(net, x[i].double().numpy(), int(y[i]))
            r = float(radius[i])
            assert r <= d, (seed, i, budget, r, d)
            if r > 0:
                checked += 1
                ratios.append(r / d)
    assert checked >= 24, checked  # most balls certify something: the comparison is not vacuous
    assert float(np.median(ratios)) > (0.5 if budget == "fast" else 0.8), sorted(ratios)


def test_the_oracle_distance_is_reached_and_nothing_nearer_flips() -> None:
    """The oracle is exact both ways: just past its point the class changes, and no point nearer than its
    distance (20,000 directions) changes it. An oracle that overstated distances would pass any radius."""
    for seed in range(6):
        net = tiny_net(seed).double()
        x = torch.rand((1, DIM), generator=torch.Generator().manual_seed(7 + seed), dtype=torch.float64)
        y = int(net(x).argmax(1))
        d, z = exact_distance(net, x[0].numpy(), y)
        assert z is not None and np.isfinite(d)
        with torch.no_grad():
            scores = net(x + (1 + 1e-6) * torch.from_numpy(z))[0]
        assert scores.max() - scores[y] > 0, seed  # past the closest point another class scores higher
        dirs = torch.randn((20000, DIM), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        dirs /= dirs.norm(dim=1, keepdim=True)
        with torch.no_grad():
            for scale in (0.25, 0.5, 0.75, 0.999):
                assert (net(x + scale * d * dirs).argmax(1) == y).all(), (seed, scale)
