"""The patches pass (`patches.py`): CROWN's backward bounds of conv units over their receptive fields.

It must give the dense backward pass's bound term for term (it leaves out only the
L2-ball coupling, which the dense pass may add on top): checked here with exact float64
agreement at zero rounding allowance, on a net with every layout change the pass makes
(strided windows, windows merged across a residual sum, windows turned into the whole
node, a shared window cut to the node) and on one with every op it reads as a
convolution or a shift (grouped and dilated convs, average pools, zero and constant
padding), and with its outward rounding on. Soundness of
the radii it leads to is attacked in `test_certify_property.py`.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from robaudit.certify.budget import get_budget
from robaudit.certify.certificate import _batch
from robaudit.certify import crown as crown_module
from robaudit.certify.crown import CROWN_RTOL, CrownBound
from robaudit.certify.graph import build_graph
from robaudit.certify.patches import Geometry, backward_windows

pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(nn.Module):
    """Normalization, strided and padded convs, batch norm, tanh, a residual sum whose branches
    reach the block's input with different windows, a kernel-2 conv that pads beyond the map."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8)
        self.c2, self.c3, self.skip = nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 8, 1, 1, 0)
        self.c4, self.c5 = nn.Conv2d(8, 6, 3, 2, 0), nn.Conv2d(6, 5, 2, 1, 1)
        self.c6 = nn.Conv2d(5, 4, 3, 1, 1)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1((x - 0.4) / 0.3)))
        h = torch.relu(self.c3(torch.tanh(self.c2(h))) + self.skip(h))
        h = torch.relu(self.c5(torch.relu(self.c4(h))))
        return self.fc(torch.relu(self.c6(h)).flatten(1))


class _PaddedNet(nn.Module):
    """Asymmetric zero padding before a strided conv (as ONNX Pad reads), a grouped conv, an
    average pool with padding, a dilated conv, an even-kernel "same" conv (a pad node), a
    concatenation, shuffle and chunk of channels, a max pool, two maps concatenated along the
    width (pad nodes and a sum), a constant padding, a max pool with dilation, a closing
    average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, 2, 0), nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, 1, 1, groups=4)
        self.dilated = nn.Conv2d(8, 6, 3, 1, 2, dilation=2)
        self.same = nn.Conv2d(6, 6, 2, padding="same")
        self.extra, self.shuffle = nn.Conv2d(6, 2, 3, 1, 1), nn.ChannelShuffle(2)
        self.left, self.right = nn.Conv2d(4, 6, (3, 2), 1, (1, 0)), nn.Conv2d(4, 6, (3, 3), 1, (1, 0))
        self.c2, self.c3 = nn.Conv2d(6, 6, 3, 1, 0), nn.Conv2d(6, 4, 3, 1, 1)
        self.fc = nn.Linear(4 * 4 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(F.pad(x, (0, 1, 0, 1)))))
        h = F.avg_pool2d(torch.relu(self.grouped(h)), 3, 1, 1)
        h = torch.relu(self.same(torch.tanh(self.dilated(h))))
        a, b = self.shuffle(torch.cat([h, torch.tanh(self.extra(h))], dim=1)).chunk(2, dim=1)
        h = F.max_pool2d(torch.relu(a) + b, 3, 1, 1)
        h = torch.relu(torch.cat([self.left(h), self.right(h)], dim=3))  # widths 6 + 5
        h = torch.relu(self.c2(F.pad(h, (1, 2, 2, 1), value=0.3)))  # 8 x 12
        h = torch.relu(self.c3(F.max_pool2d(h, 2, 1, 1, dilation=2)))  # 8 x 12 (dilated window 3)
        return self.fc(F.avg_pool2d(h, 2).flatten(1))


def _setup(make: type[nn.Module] = _Net):
    gen = torch.Generator().manual_seed(0)
    net = make().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / math.sqrt(max(1, p[0].numel()))))
        net.b1.running_mean.uniform_(-0.2, 0.2, generator=gen)
        net.b1.running_var.uniform_(0.5, 2.0, generator=gen)
    x = torch.rand(3, 3, 14, 14, generator=gen)
    y = net(x).argmax(1)
    graph = build_graph(net, x[:1])
    crown = CrownBound(graph, get_budget("default"))
    batch = _batch(graph, x.double(), y)
    idx, eps = torch.arange(3), torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64)
    ctx = crown._intermediate(batch, idx, eps, 4096)
    ctx.ball = {}  # the one term the patches pass leaves out
    return graph, crown, batch, idx, eps, ctx


@pytest.mark.parametrize("make", [_Net, _PaddedNet])
def test_the_patches_pass_gives_the_dense_bound_term_for_term(monkeypatch: pytest.MonkeyPatch, make) -> None:
    graph, crown, batch, idx, eps, ctx = _setup(make)
    monkeypatch.setattr(crown_module, "CROWN_RTOL", 0.0)  # both passes without their outward rounding
    plan = crown.patch_plan
    covered = [i for i, node in enumerate(graph.nodes) if node.op is not None and plan.covers(i)]
    layouts = {geo for i in covered for geo in plan.plan(i).values()}
    assert any(geo.shared for geo in layouts) and any(geo.stride[0] > 1 for geo in layouts)
    if make is _Net:
        assert len(covered) >= 11
    else:  # every conv and pool, both pads among the nodes their passes go through
        kinds = [type(graph.nodes[i].op).__name__ for i in covered]
        assert kinds.count("ConvOp") == 9 and kinds.count("AvgPoolOp") == 2, kinds
        passed = [type(graph.nodes[j].op).__name__ for j in {j for i in covered for j in plan.plan(i)}]
        assert passed.count("SelectOp") == 5 and passed.count("PadOp") == 5 and passed.count("MaxPoolOp") == 2, passed
    gen = torch.Generator().manual_seed(1)
    for i in covered:
        shape = graph.nodes[i].shape
        numel = math.prod(shape)
        eye = torch.eye(numel, dtype=torch.float64).reshape(1, numel, *shape).expand(3, -1, *shape)
        dense = crown._backward(batch, idx, eps, i, torch.cat([eye, -eye], 1), ctx).reshape(3, 2, numel)
        units = torch.stack([torch.randperm(numel, generator=gen)[: max(1, numel // 2)] for _ in range(3)])
        args = (batch.values[0][idx], eps, i, units, ctx.relaxed, ctx.noise)
        exact = backward_windows(plan, *args, 0.0)
        want = dense.gather(2, units[:, None].expand(-1, 2, -1))
        scale = 1 + want.abs()
        assert torch.allclose(exact / scale, want / scale, rtol=0, atol=1e-13), i
        rounded = backward_windows(plan, *args, CROWN_RTOL)
        assert bool((rounded <= exact).all()), i  # the rounding allowance only lowers the bound


def test_nodes_behind_an_op_the_pass_does_not_know_keep_the_dense_pass() -> None:
    class Crop(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :, 1:, 1:]

    for net in (
        nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.ReplicationPad2d(1), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
            nn.Linear(256, 3),
        ),
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), Crop(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3)),
        nn.Sequential(  # a pool whose windows at the border divide by less than the kernel: no convolution
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.Conv2d(4, 4, 3), nn.ReLU(),
            nn.Flatten(), nn.Linear(144, 3),
        ),
        nn.Sequential(  # ceil mode adds a window beyond the padded map, which divides by less
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AvgPool2d(3, 2, 0, ceil_mode=True), nn.Conv2d(4, 4, 3), nn.ReLU(),
            nn.Flatten(), nn.Linear(16, 3),
        ),
    ):
        x = torch.rand(1, net[0].in_channels, 10, 10)
        graph = build_graph(net.eval(), x)
        plan = CrownBound(graph, get_budget("default")).patch_plan
        convs = [i for i, node in enumerate(graph.nodes) if type(node.op).__name__ == "ConvOp"]
        assert plan.covers(convs[0]) and not plan.covers(convs[1])


def test_symmetric_same_padding_is_the_convs_own_and_the_pass_covers_it() -> None:
    """padding="same" with an odd kernel pads symmetrically, as torch runs it: the conv's own
    padding. An even kernel pads one more on the right: a pad node stays, and the pass
    goes through it as a shift. Both graphs compute the model's scores."""
    torch.manual_seed(0)
    for kernel, padded in ((3, False), (2, True)):
        net = nn.Sequential(
            nn.Conv2d(1, 4, kernel, padding="same"), nn.ReLU(), nn.Conv2d(4, 4, kernel, padding="same"), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
        ).eval()
        x = torch.rand(2, 1, 8, 8)
        graph = build_graph(net, x[:1])
        kinds = [type(node.op).__name__ for node in graph.nodes]
        assert ("PadOp" in kinds) == padded, kinds
        with torch.no_grad():
            assert torch.allclose(graph.logits(x.to(torch.float64)), net(x).double(), atol=1e-5)
        plan = CrownBound(graph, get_budget("default")).patch_plan
        convs = [i for i, kind in enumerate(kinds) if kind == "ConvOp"]
        assert all(plan.covers(i) for i in convs)


def test_windows_that_grow_as_large_as_the_node_become_the_whole_node() -> None:
    graph, crown, *_ = _setup()
    plan = crown.patch_plan
    last = max(i for i, node in enumerate(graph.nodes) if node.op is not None and plan.covers(i))
    layout = plan.plan(last)
    assert layout[0] == Geometry.whole(14, 14)  # every position of the last conv sees the whole image
