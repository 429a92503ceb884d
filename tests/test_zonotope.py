"""The zonotope gradient bound (`robaudit/certify/zonotope.py`): sound against brute force, and tighter.

A Lipschitz bound below the true gradient norm somewhere on the ball would certify a
radius an attack can break, so every check here compares the bound with an exhaustive
maximum (all vertices of a small zonotope; a dense grid of 2-D balls).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch import nn

from robaudit.certify.budget import BUDGETS
from robaudit.certify.certificate import _batch
from robaudit.certify.graph import build_graph
from robaudit.certify.interval import IntervalBound
from robaudit.certify.zonotope import norm_bound, supported, zonotope_lipschitz

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def _vertex_max(c: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """max over e in {-1, 1}^k of ||c + sum e_k m_k|| by enumeration (the maximum of a convex function)."""
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=m.shape[2])), dtype=F64)  # (2^k, k)
    return (c[:, :, None] + torch.einsum("vk,bpkd->bpvd", signs, m)).norm(dim=3).amax(dim=2)


@pytest.mark.parametrize("steps", [0, 5, 40])
def test_norm_bound_covers_every_vertex_and_descent_only_tightens(steps: int) -> None:
    gen = torch.Generator().manual_seed(steps)
    for k, d in ((1, 3), (6, 2), (9, 4), (11, 16)):
        c = torch.randn(3, 2, d, generator=gen, dtype=F64)
        m = torch.randn(3, 2, k, d, generator=gen, dtype=F64) * torch.rand(3, 2, k, 1, generator=gen, dtype=F64)
        exact = _vertex_max(c, m)
        bound = norm_bound(c, m, steps)
        assert (bound >= exact).all(), (k, d, bound, exact)
        assert (bound <= norm_bound(c, m, 0) * (1 + 1e-12)).all()
        if steps == 40 and k >= 9:  # the descent closes most of the gap on these random zonotopes
            assert ((bound / exact).median() < 1.15), (bound / exact)


def test_norm_bound_of_a_point_and_of_a_segment_is_exact() -> None:
    c = torch.tensor([[[3.0, 4.0]]], dtype=F64)
    assert torch.allclose(norm_bound(c, torch.zeros(1, 1, 0, 2, dtype=F64)), torch.tensor([[5.0]], dtype=F64))
    m = torch.tensor([[[[0.6, 0.8]]]], dtype=F64)  # along c: the farthest point is c + m
    assert torch.allclose(norm_bound(c, m, 10), torch.tensor([[6.0]], dtype=F64), rtol=1e-6)


def _grid_max(net: nn.Module, centre: torch.Tensor, alpha: float, label: int, k: int) -> torch.Tensor:
    """Per other class, the largest ||grad (f_label - f_j)|| on a dense polar grid of the 2-D disk."""
    r = torch.linspace(0, alpha, 60, dtype=F64)
    t = torch.linspace(0, 2 * torch.pi, 240, dtype=F64)
    pts = centre + torch.stack([torch.outer(r, t.cos()), torch.outer(r, t.sin())], dim=-1).reshape(-1, 2)
    pts.requires_grad_(True)
    out = net(pts)
    norms = []
    for j in range(k):
        if j == label:
            continue
        (g,) = torch.autograd.grad((out[:, label] - out[:, j]).sum(), pts, retain_graph=True)
        norms.append(g.norm(dim=1).max())
    return torch.stack(norms)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.inner(x))


NETS = {
    "deep-relu": lambda: nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)),
    "tanh-leaky-softplus": lambda: nn.Sequential(
        nn.Linear(2, 12), nn.Tanh(), nn.Linear(12, 12), nn.LeakyReLU(0.3), nn.Linear(12, 12), nn.Softplus(beta=2.0),
        nn.Linear(12, 3),
    ),
    "residual-batchnorm": lambda: nn.Sequential(
        nn.Linear(2, 12), nn.BatchNorm1d(12), nn.ReLU(), Residual(), nn.Linear(12, 3)
    ),
}


@pytest.mark.parametrize("kind", list(NETS))
def test_zonotope_bound_covers_brute_force_gradient_maximum_on_2d_inputs(kind: str) -> None:
    torch.manual_seed(5)
    net = NETS[kind]().double()
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm1d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.3, 2.0)
            mod.weight.data.uniform_(-1.5, 1.5)
    net.eval()
    centres = torch.randn(4, 2, dtype=F64)
    graph = build_graph(net, centres[:1])
    assert supported(graph)
    labels = net(centres).argmax(1)
    batch = _batch(graph, centres, labels)
    bound = IntervalBound(graph, BUDGETS["default"])
    for alpha in (0.05, 0.3, 1.0):
        radii = torch.full((4,), alpha, dtype=F64)
        lo, hi, deriv, _ = bound._forward(batch, torch.arange(4), radii)
        for steps in (0, 20):
            z = zonotope_lipschitz(graph, batch.rows, deriv, 1 << 20, steps, bound.prefix.jacobian)
            assert z is not None
            for i in range(4):
                brute = _grid_max(net, centres[i], alpha, int(labels[i]), 3)
                assert (z[i] >= brute).all(), (kind, alpha, steps, i, z[i], brute)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(128, 10),
    ).double().eval()


def test_zonotope_tightens_the_interval_bound_on_a_cnn() -> None:
    """Not vacuous: on a CNN the zonotope bound is well below the interval bound on most pairs."""
    net = _cnn()
    x = torch.rand(6, 1, 8, 8, dtype=F64)
    graph = build_graph(net, x[:1])
    labels = net(x).argmax(1)
    batch = _batch(graph, x, labels)
    radii = torch.full((6,), 0.5, dtype=F64)
    plain = IntervalBound(graph, BUDGETS["default"], zonotope=False).lipschitz(batch, torch.arange(6), radii)
    every = dataclasses.replace(BUDGETS["default"], zonotope_pairs=9)
    tight = IntervalBound(graph, every).lipschitz(batch, torch.arange(6), radii)
    assert (tight <= plain).all()
    assert (tight / plain).median() < 0.95, tight / plain
    # by default only the 3 pairs with the smallest margin / bound of each sample get it
    closest = IntervalBound(graph, BUDGETS["default"]).lipschitz(batch, torch.arange(6), radii)
    changed = closest < plain
    assert (changed.sum(dim=1) <= 3).all() and changed.any(), changed
    picked = (batch.margins / plain).topk(3, dim=1, largest=False).indices
    assert torch.allclose(closest.gather(1, picked), tight.gather(1, picked), rtol=1e-9)


def test_zonotope_gives_up_past_its_size_cap_and_skips_max_pooling() -> None:
    net = _cnn()
    x = torch.rand(2, 1, 8, 8, dtype=F64)
    graph = build_graph(net, x[:1])
    batch = _batch(graph, x, net(x).argmax(1))
    ib = IntervalBound(graph, BUDGETS["default"])
    deriv = ib._forward(batch, torch.arange(2), torch.full((2,), 2.0, dtype=F64))[2]
    assert zonotope_lipschitz(graph, batch.rows, deriv, 100, 0, ib.prefix.jacobian) is None
    assert zonotope_lipschitz(graph, batch.rows, deriv, 1 << 20, 0, ib.prefix.jacobian) is not None
    pooled = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3))
    graph = build_graph(pooled.double().eval(), x[:1])
    assert not supported(graph)
    assert IntervalBound(graph, BUDGETS["default"]).zonotope == 0
    assert IntervalBound(graph, dataclasses.replace(BUDGETS["default"], zonotope_elems=0)).zonotope == 0
