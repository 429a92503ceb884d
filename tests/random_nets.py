"""Random small classifiers built from every op the certificate supports, one per seed.

`random_net(seed)` draws an architecture (flat or image input, depth, widths, conv
geometry, activations with their parameters, batch norms with random statistics,
pools, residual sums and differences, constant scales, reshapes, optional input
normalization through `wrap_model`) and random weights, then rescales the logits to a
random spread so that margins range from small to large. The same seed always gives the
same network, so a failing seed is a reproducer by itself.
"""

from __future__ import annotations

import copy
import functools
import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from robaudit.models import AuditModel, wrap_model
from robaudit.models.detect import RawModel

F64 = torch.float64


# --------------------------------------------------------------------------- building blocks


class Act(nn.Module):
    """An activation in one of its spellings: module, functional, or tensor method (fx sees each differently)."""

    def __init__(self, kind: str, style: str, slope: float = 0.01, beta: float = 1.0, threshold: float = 20.0) -> None:
        super().__init__()
        self.kind, self.style = kind, style
        self.slope, self.beta, self.threshold = slope, beta, threshold
        self.alpha = min(slope, 1.0) if kind == "elu" else slope  # ELU is convex for alpha <= 1, CELU for any
        self.module = {
            "relu": lambda: nn.ReLU(),
            "leaky_relu": lambda: nn.LeakyReLU(slope),
            "tanh": lambda: nn.Tanh(),
            "sigmoid": lambda: nn.Sigmoid(),
            "softplus": lambda: nn.Softplus(beta, threshold),
            "elu": lambda: nn.ELU(self.alpha),
            "celu": lambda: nn.CELU(self.alpha),
        }[kind]() if style == "module" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.module is not None:
            return self.module(x)
        if self.kind == "leaky_relu":
            return F.leaky_relu(x, self.slope)
        if self.kind == "softplus":
            return F.softplus(x, self.beta, self.threshold)
        if self.kind == "elu":
            return F.elu(x, self.alpha)
        if self.kind == "celu":
            return torch.celu(x, self.alpha) if self.style == "method" else F.celu(x, self.alpha)
        if self.style == "method":
            return getattr(x, self.kind)()
        return {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[self.kind](x)

    def extra_repr(self) -> str:
        extra = {"leaky_relu": f", slope={self.slope}", "softplus": f", beta={self.beta}, threshold={self.threshold}"}
        extra |= {"elu": f", alpha={self.alpha}", "celu": f", alpha={self.alpha}"}
        return f"{self.kind}, {self.style}{extra.get(self.kind, '')}"


class Residual(nn.Module):
    """x + body(x) or x - body(x)."""

    def __init__(self, body: nn.Module, sign: int) -> None:
        super().__init__()
        self.body, self.sign = body, sign

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.sign > 0 else x - self.body(x)

    def extra_repr(self) -> str:
        return "add" if self.sign > 0 else "sub"


class Affine(nn.Module):
    """A constant elementwise scale and shift, spelled as mul/add, sub/div or negation."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, style: str) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.style = style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "mul-add":
            return x * self.scale + self.shift
        if self.style == "sub-div":
            return (x - self.shift) / self.scale
        return -x + self.shift

    def extra_repr(self) -> str:
        return self.style


class Reshape(nn.Module):
    """Per-sample reshape in the spellings real models use."""

    def __init__(self, shape: tuple[int, ...], style: str) -> None:
        super().__init__()
        self.shape, self.style = tuple(shape), style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "view":  # contiguous first: a transpose or permute drawn before may leave x strided
            return x.contiguous().view(x.size(0), *self.shape)
        if self.style == "flatten":
            return torch.flatten(x, 1)
        return x.reshape(-1, *self.shape)

    def extra_repr(self) -> str:
        return f"{self.style} -> {self.shape}"


class GlobalMean(nn.Module):
    """Mean over the spatial dims (a global average pool written as a mean)."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "method":
            return x.mean((2, 3))
        return torch.mean(x, dim=(-2, -1), keepdim=True).flatten(1)

    def extra_repr(self) -> str:
        return self.style


class Clamp(nn.Module):
    """A clamp in one of its spellings (certified as a pair of ReLUs), or another op written with ReLUs:
    Softshrink, a Threshold at its own value, fmax / fmin."""

    def __init__(self, style: str, lo: float, hi: float) -> None:
        super().__init__()
        self.style, self.lo, self.hi = style, lo, hi
        self.module = {"ReLU6": nn.ReLU6(), "Hardtanh": nn.Hardtanh(lo, hi)}.get(style)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.module is not None:
            return self.module(x)
        if self.style == "clamp":
            return torch.clamp(x, self.lo, self.hi)
        if self.style == "clamp_min":
            return x.clamp(min=self.lo)
        if self.style == "clamp_max":
            return torch.clamp_max(x, self.hi)
        if self.style == "relu6":
            return F.relu6(x * 4)
        if self.style == "softshrink":
            return F.softshrink(x, (self.hi - self.lo) / 4)
        if self.style == "threshold":
            return F.threshold(x, self.lo, self.lo)  # max(x, lo)
        if self.style == "fmax":
            return torch.fmax(x, self.lo * x)  # max of two input-dependent tensors, not monotone for lo < 0
        if self.style == "fmin":
            return x.fmin(torch.tensor(self.hi))
        return F.hardtanh(x, self.lo, self.hi)

    def extra_repr(self) -> str:
        return f"{self.style}, {self.lo}, {self.hi}"


class Move(nn.Module):
    """Values moved, not computed: flips, rolls, transposes, crops padded back, channel shuffles, gathers,
    halves swapped by chunk."""

    def __init__(self, style: str, shape: tuple[int, ...], perm: torch.Tensor | None = None) -> None:
        super().__init__()
        self.style, self.shape = style, shape
        self.register_buffer("perm", perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.style
        if s == "flip":
            return x.flip(-1)
        if s == "roll":
            return torch.roll(x, 1, -1)
        if s == "transpose":
            return x.transpose(-1, -2)
        if s == "gather":
            return x[:, self.perm]
        if s == "repeat-slice":  # rotate the channels (or features) by one
            return x.repeat(1, 2, *([1] * (len(self.shape) - 1)))[:, 1 : self.shape[0] + 1]
        if s == "chunk-swap":
            return torch.cat([x.chunk(2, 1)[1], x.chunk(2, 1)[0]], 1)
        if s == "shuffle":
            c, h, w = self.shape
            return x.view(-1, 2, c // 2, h, w).transpose(1, 2).reshape(-1, c, h, w)
        mode = s.removeprefix("crop-pad-")
        return F.pad(x[..., 1:, :], (0, 0, 0, 1), mode=mode, **({"value": 0.25} if mode == "constant" else {}))

    def extra_repr(self) -> str:
        return self.style


class CeilPool(nn.Module):
    """A max pool in ceil_mode, upsampled back to its input's size (nearest)."""

    def __init__(self, kernel: int, stride: int, padding: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.pool, self.size = nn.MaxPool2d(kernel, stride, padding, ceil_mode=True), size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.pool(x), size=self.size)

    def extra_repr(self) -> str:
        return f"ceil_mode, size={self.size}"


class Concat(nn.Module):
    """torch.cat of two branches (and maybe a constant), projected back to the input width."""

    def __init__(self, gen: _Gen, shape: tuple[int, ...]) -> None:
        super().__init__()
        image = len(shape) == 3
        width = shape[0]
        self.act = gen.act()
        self.a = nn.Conv2d(width, 2, 3, padding=1) if image else nn.Linear(width, 3)
        self.b = nn.Conv2d(width, 1, 1) if image else nn.Linear(width, 2)
        extra = 1 if gen.r.random() < 0.5 else 0
        self.const = nn.Parameter(gen.randn(1, extra, *shape[1:]) if image else gen.randn(1, extra)) if extra else None
        self.rest = (extra, *shape[1:])  # the constant's per-sample shape (torch.fx cannot unpack a traced shape)
        total = (2 + 1 if image else 3 + 2) + extra + width
        self.proj = nn.Conv2d(total, width, 1) if image else nn.Linear(total, width)
        for m in (self.a, self.b, self.proj):
            gen.init_linear(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.act(self.a(x)), self.b(x), x]
        if self.const is not None:
            parts.insert(1, self.const.expand(x.shape[0], *self.rest))
        return self.proj(torch.cat(parts, 1))


def _extras(gen: _Gen, seed: int) -> None:
    """Insert shape-keeping clamps, moves, concatenations and ceil-mode pools at random places of `gen.layers`
    (before the last layer), drawn from their own generator so the base draws do not change."""
    r = random.Random(seed * 7919 + 1)
    base = gen.r
    gen.r = r  # Concat's layers draw from the extras' stream too
    try:
        for _ in range(r.randint(1, 3)):
            at = r.randint(0, len(gen.layers) - 1)
            shape = _shape_after(gen.layers[:at], gen.input_shape)
            if len(shape) not in (1, 3):
                continue
            kind = r.choice(["clamp", "move", "move", "concat"] + (["pool"] if len(shape) == 3 else []))
            if kind == "clamp":
                lo = round(r.uniform(-1.5, 0.5), 2)
                hi = round(lo + r.uniform(0.2, 2.0), 2)
                styles = ["ReLU6", "Hardtanh", "clamp", "clamp_min", "clamp_max", "relu6", "hardtanh"]
                styles += ["softshrink", "threshold", "fmax", "fmin"]
                layer: nn.Module = Clamp(r.choice(styles), lo, hi)
            elif kind == "concat":
                layer = Concat(gen, shape)
            elif kind == "pool":
                k = r.choice([2, 3])
                layer = CeilPool(k, r.choice([1, 2, 3]), r.choice([0, k // 2]), (shape[1], shape[2]))
                try:
                    layer(torch.zeros(1, *shape))
                except RuntimeError:  # a window larger than the input
                    continue
            else:
                styles = ["flip", "roll", "gather", "repeat-slice"] + (["chunk-swap"] if shape[0] % 2 == 0 else [])
                if len(shape) == 3:
                    styles += ["crop-pad-constant", "crop-pad-replicate"] if shape[1] >= 2 else []
                    styles += ["crop-pad-reflect"] * 3 if shape[1] >= 3 else []
                    styles += ["transpose"] * 3 if shape[1] == shape[2] else []
                    styles += ["shuffle"] * 3 if shape[0] % 2 == 0 else []
                style = r.choice(styles)
                perm = torch.randperm(shape[0], generator=torch.Generator().manual_seed(seed)) if style == "gather" else None
                layer = Move(style, shape, perm)
            gen.layers.insert(at, layer)
    finally:
        gen.r = base


# --------------------------------------------------------------------------- the generator


@dataclass
class RandomNet:
    """A random classifier, its float64 twin and a one-line-per-layer description."""

    seed: int
    model: nn.Module  # what is certified: a float32 nn.Module or AuditModel, (B, *sample_shape) -> (B, K)
    sample_shape: tuple[int, ...]
    num_classes: int
    arch: str
    net64: nn.Module = field(repr=False)
    mean: torch.Tensor | None = None  # input normalization (float64 copies of the float32 values)
    std: torch.Tensor | None = None
    model_shape: tuple[int, ...] | None = None

    def logits64(self, x: torch.Tensor) -> torch.Tensor:
        """The network evaluated in float64 (an AuditModel would round its output to float32)."""
        z = x.to(F64)
        if self.mean is not None:
            z = (z - self.mean) / self.std
        if self.model_shape is not None:
            z = z.reshape(len(z), *self.model_shape)
        return self.net64(z).reshape(len(z), -1)

    def logits32(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x.to(torch.float32)).reshape(len(x), -1)


class _Gen:
    """Draws layers while tracking the per-sample shape."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.g = torch.Generator().manual_seed(seed)
        self.layers: list[nn.Module] = []
        self.input_shape: tuple[int, ...] = ()  # the first layer's per-sample input shape

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.g)

    def uniform(self, lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=self.g)

    def act(self) -> Act:
        kinds = ["relu", "relu", "leaky_relu", "leaky_relu", "tanh", "sigmoid", "softplus", "softplus", "elu", "celu"]
        kind = self.r.choice(kinds)
        style = self.r.choice(["module", "functional", "method"])
        slope = self.r.choice([0.01, 0.1, 0.3, 0.7, 1.0, 1.5, 3.0])
        beta = self.r.choice([0.3, 1.0, 1.0, 2.0, 5.0, 20.0])
        threshold = self.r.choice([20.0, 20.0, 20.0, 10.0])
        return Act(kind, style, slope=slope, beta=beta, threshold=threshold)

    def init_linear(self, m: nn.Linear | nn.Conv2d) -> None:
        fan_in = m.weight[0].numel()
        gain = self.r.uniform(0.5, 2.5)
        with torch.no_grad():
            m.weight.copy_(self.randn(*m.weight.shape) * gain / math.sqrt(fan_in))
            if m.bias is not None:
                m.bias.copy_(self.randn(*m.bias.shape) * self.r.choice([0.0, 0.1, 0.5]))

    def linear(self, d_in: int, d_out: int) -> nn.Linear:
        m = nn.Linear(d_in, d_out, bias=self.r.random() < 0.85)
        self.init_linear(m)
        return m

    def batchnorm(self, channels: int, image: bool) -> nn.Module:
        eps = self.r.choice([1e-5, 1e-3, 0.1])
        m = nn.BatchNorm2d(channels, eps=eps) if image else nn.BatchNorm1d(channels, eps=eps)
        with torch.no_grad():
            m.running_mean.copy_(self.randn(channels) * 0.7)
            m.running_var.copy_(torch.exp(self.randn(channels) * 0.8))
            m.weight.copy_(1 + 0.6 * self.randn(channels))  # sometimes negative
            m.bias.copy_(0.4 * self.randn(channels))
        return m.eval()

    def affine(self, shape: tuple[int, ...]) -> Affine:
        style = self.r.choice(["mul-add", "sub-div", "neg"])
        if len(shape) == 3 and self.r.random() < 0.5:  # per channel
            cshape: tuple[int, ...] = (shape[0], 1, 1)
        elif self.r.random() < 0.5:
            cshape = ()
        else:
            cshape = shape
        scale = self.uniform(0.3, 2.0, *cshape) * torch.where(self.uniform(0, 1, *cshape) < 0.3, -1.0, 1.0)
        if style == "sub-div":
            scale = scale.abs()
        return Affine(scale, 0.5 * self.randn(*cshape), style)

    def conv(self, c_in: int, hw: tuple[int, int]) -> nn.Conv2d | None:
        """A Conv2d with random geometry whose output is at least 1x1, or None."""
        for _ in range(20):
            c_out = self.r.randint(1, 6)
            k = self.r.choice([1, 2, 3, 3, 5])
            stride = self.r.choice([1, 1, 1, 2, (1, 2)])
            dilation = self.r.choice([1, 1, 1, 2])
            padding: int | str | tuple[int, int] = self.r.choice([0, 1, 1, 2, (0, 1)])
            if stride == 1 and self.r.random() < 0.15:
                padding = "same"
            groups = self.r.choice([g for g in range(1, 4) if c_in % g == 0 and c_out % g == 0])
            ks = (k, self.r.choice([k, 1, 3])) if self.r.random() < 0.2 else (k, k)
            m = nn.Conv2d(c_in, c_out, ks, stride, padding, dilation, groups, bias=self.r.random() < 0.85)
            try:
                out = m(torch.zeros(1, c_in, *hw))
            except RuntimeError:
                continue
            if out.shape[-1] >= 1 and out.shape[-2] >= 1:
                self.init_linear(m)
                return m
        return None

    def pool(self, hw: tuple[int, int]) -> nn.Module | None:
        kind = self.r.choice(["max", "max", "avg", "adaptive"])
        for _ in range(20):
            k = self.r.choice([2, 2, 3])
            stride = self.r.choice([1, 2, k])
            padding = self.r.choice([0, 0, 1]) if k >= 2 else 0
            if kind == "max":
                dilation = self.r.choice([1, 1, 2])
                m: nn.Module = nn.MaxPool2d(k, stride, padding, dilation)
            elif kind == "avg":
                m = nn.AvgPool2d(k, stride, padding, count_include_pad=self.r.random() < 0.5)
            else:
                divisors = [(a, b) for a in range(1, hw[0] + 1) for b in range(1, hw[1] + 1)]
                divisors = [(a, b) for a, b in divisors if hw[0] % a == 0 and hw[1] % b == 0]
                m = nn.AdaptiveAvgPool2d(self.r.choice(divisors))
            try:
                out = m(torch.randn(1, 1, *hw))
            except RuntimeError:
                continue
            if out.shape[-1] >= 1 and out.shape[-2] >= 1 and bool(torch.isfinite(out).all()):
                return m  # (a max-pool window lying entirely in the padding would give -inf)
        return None


def _shape_after(layers: list[nn.Module], shape: tuple[int, ...]) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(nn.Sequential(*layers)(torch.zeros(1, *shape)).shape[1:])


def _flat_part(gen: _Gen, width: int, depth: int) -> int:
    """Hidden dense layers (with batch norms, residual blocks, constant affines) from `width`; returns the width."""
    r = gen.r
    for _ in range(depth):
        choice = r.random()
        if choice < 0.25 and width >= 1:
            hidden = r.randint(1, 12)
            body = [gen.linear(width, hidden), gen.act(), gen.linear(hidden, width)]
            if r.random() < 0.3:
                body.append(gen.act())
            gen.layers.append(Residual(nn.Sequential(*body), r.choice([1, 1, -1])))
            continue
        out = r.randint(2, 16)
        gen.layers.append(gen.linear(width, out))
        width = out
        if r.random() < 0.25:
            gen.layers.append(gen.batchnorm(width, image=False))
        if r.random() < 0.15:
            gen.layers.append(gen.affine((width,)))
        if r.random() < 0.92:
            gen.layers.append(gen.act())
    return width


def _image_part(gen: _Gen, shape: tuple[int, int, int], depth: int) -> tuple[int, int, int]:
    """Conv / pool / residual stages from `shape`; returns the output shape."""
    r = gen.r
    for _ in range(depth):
        c, h, w = shape
        choice = r.random()
        if choice < 0.5:
            conv = gen.conv(c, (h, w))
            if conv is None:
                continue
            gen.layers.append(conv)
            if r.random() < 0.3:
                gen.layers.append(gen.batchnorm(conv.out_channels, image=True))
            if r.random() < 0.1:
                gen.layers.append(gen.affine(_shape_after(gen.layers, gen.input_shape)))
            if r.random() < 0.9:
                gen.layers.append(gen.act())
        elif choice < 0.7:
            pool = gen.pool((h, w))
            if pool is not None:
                gen.layers.append(pool)
        else:
            k, d = r.choice([(1, 1), (3, 1), (3, 2)])
            mid = r.randint(1, 4)
            conv1 = nn.Conv2d(c, mid, k, padding=d * (k // 2), dilation=d)
            conv2 = nn.Conv2d(mid, c, 3, padding=1, bias=r.random() < 0.5)
            gen.init_linear(conv1)
            gen.init_linear(conv2)
            body: list[nn.Module] = [conv1]
            if r.random() < 0.4:
                body.append(gen.batchnorm(mid, image=True))
            body += [gen.act(), conv2]
            gen.layers.append(Residual(nn.Sequential(*body), r.choice([1, 1, -1])))
            if r.random() < 0.5:
                gen.layers.append(gen.act())
        shape = _shape_after(gen.layers, gen.input_shape)  # type: ignore[assignment]
    return shape


def _describe(net: nn.Module) -> str:
    return " ".join(repr(net).split())


@functools.lru_cache(maxsize=None)
def random_net(seed: int, extras: bool = False) -> RandomNet:
    """The random classifier of `seed` (float32, eval mode, no gradients on parameters); built once per process.

    With `extras`, clamps, data movement and concatenations are inserted too (`_extras`);
    the rest of the network is the same as without."""
    gen = _Gen(seed)
    r = gen.r
    k = r.randint(2, 5)
    kind = r.choice(["flat", "flat", "image", "image", "image", "flat-to-image"])
    linear_only = r.random() < 0.05
    model_shape: tuple[int, ...] | None = None
    if kind == "flat":
        d = r.choice([2, 2, 3, 4, 6, 8, 12, 16])
        gen.input_shape = (d,)
        width = _flat_part(gen, d, 0 if linear_only else r.randint(1, 4))
        if linear_only and r.random() < 0.5:
            gen.layers += [gen.linear(d, 6), gen.affine((6,))]
            width = 6
        gen.layers.append(gen.linear(width, k))
    else:
        if kind == "image":
            shape = (r.randint(1, 3), r.randint(3, 7), r.randint(3, 7))
            gen.input_shape = shape
        else:
            shape = r.choice([(1, 3, 3), (1, 4, 4), (2, 2, 3), (1, 3, 4)])
            d = math.prod(shape)
            gen.input_shape = (d,)
            if r.random() < 0.5:
                gen.layers.append(Reshape(shape, r.choice(["view", "reshape"])))
            else:  # the wrapper reshapes flat data to the model's (image) input shape
                model_shape = shape
                gen.input_shape = shape
        if r.random() < 0.15:
            gen.layers.append(gen.affine(shape))
        if not linear_only:
            shape = _image_part(gen, shape, r.randint(1, 4))
        head = r.choice(["flatten", "flatten", "mean", "adaptive"]) if not linear_only else "flatten"
        if head == "mean":
            gen.layers.append(GlobalMean(r.choice(["method", "function"])))
            width = shape[0]
        elif head == "adaptive":
            gen.layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            width = shape[0]
        else:
            gen.layers.append(r.choice([nn.Flatten(), Reshape((math.prod(shape),), r.choice(["view", "flatten"]))]))
            width = math.prod(shape)
        if not linear_only:
            width = _flat_part(gen, width, r.choice([0, 0, 1, 2]))
        gen.layers.append(gen.linear(width, k))
    if extras:
        _extras(gen, seed)
    net = nn.Sequential(*gen.layers).eval().requires_grad_(False)
    sample_shape: tuple[int, ...] = gen.input_shape
    if model_shape is not None:
        sample_shape = (math.prod(model_shape),)

    # Random logit spread: margins from tiny to large; sometimes a few training steps on random labels.
    probe = torch.randn((64, *sample_shape), generator=gen.g)
    run = (lambda z: net(z.reshape(len(z), *model_shape))) if model_shape is not None else net
    if r.random() < 0.15:
        net.requires_grad_(True)
        labels = torch.randint(0, k, (64,), generator=gen.g)
        optimizer = torch.optim.Adam(net.parameters(), lr=0.03)
        for _ in range(15):
            optimizer.zero_grad()
            F.cross_entropy(run(probe), labels).backward()
            optimizer.step()
        net.requires_grad_(False)
    with torch.no_grad():
        spread = run(probe).std().item()
        last = net[-1]
        factor = math.exp(r.uniform(math.log(0.3), math.log(10.0))) / max(spread, 1e-6)
        last.weight.mul_(factor)
        if last.bias is not None:
            last.bias.mul_(factor)

    mean = std = None
    model: nn.Module = net
    if model_shape is not None or r.random() < 0.2:
        channels = sample_shape[0] if len(sample_shape) == 3 else 1
        m_list = [round(r.uniform(-0.5, 0.8), 3) for _ in range(channels)] if r.random() < 0.7 else None
        s_list = [round(r.uniform(0.2, 2.0), 3) for _ in range(channels)] if m_list or r.random() < 0.5 else None
        raw = RawModel(net, format="torch", input_shape=model_shape, num_classes=None)
        model, _ = wrap_model(raw, sample_shape=sample_shape, probe=probe[:4], mean=m_list, std=s_list)
        assert isinstance(model, AuditModel) and model.output_kind == "logits"
        if model.mean is not None:
            mean, std = model.mean.detach().to(F64), model.std.detach().to(F64)
    net64 = copy.deepcopy(net).double()
    arch = f"seed={seed} sample_shape={sample_shape} classes={k}"
    if model_shape is not None:
        arch += f" model_shape={model_shape}"
    if mean is not None:
        arch += f" mean={mean.flatten().tolist()} std={std.flatten().tolist()}"
    return RandomNet(seed, model, sample_shape, k, f"{arch} net={_describe(net)}", net64, mean, std, model_shape)
