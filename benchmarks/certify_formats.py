"""Do certificates hold on models saved the way users save them? Unusual layers, three formats.

Trains four digits models built from layers the certificate added late (clamps, torch.cat,
slices and splits, transposes and channel shuffles, padding of every mode, nearest
upsampling, ceil-mode max pools, in-model normalisation), saves each as ONNX with both of
torch's exporters (dynamo and the TorchScript-based one, at their default opsets) and as
traced TorchScript, loads every file the way `robaudit scan` does, and on the first
``--n`` test digits compares the `default` certificate with the smallest adversarial L2
distance that FMN and DeepFool find (certify_zoo.py's `attack_distance`, with and
without the [0, 1] box). A radius above a found distance would be a bug in the
certificate. The same network should get the same radii in every format as unsaved:
the largest relative difference is reported (the dynamo exporter folds BatchNorm into
the convolution before it, which changes the float arithmetic and so the radii slightly).

It also saves eight small nets with layers the bound must refuse (SiLU, GELU, SELU, x * x,
exp, LayerNorm, a product of branches, sign) in the three formats and checks that each is
refused, naming the layer. (ELU with alpha 1, the maximum of two branches and abs, once in
this list, are bounded exactly now.)

Usage (from the repository root, about 12 minutes on one CPU thread):
    python benchmarks/certify_formats.py            # writes benchmarks/results/certify_formats.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from certify_zoo import attack_distance  # noqa: E402
from robaudit.certify import CertificateUnavailable, certify_l2  # noqa: E402
from robaudit.models import load_model, wrap_model  # noqa: E402
from zoo import load_split  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "certify_formats.json"
FORMATS = ("onnx-dynamo", "onnx-torchscript-exporter", "torchscript")


class Branches(nn.Module):
    """torch.cat of a ReLU and a tanh branch with per-channel scales, a crop, a transpose + matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 5, padding=2)
        self.scale = nn.Parameter(torch.linspace(0.5, 2, 8).view(1, 8, 1, 1))
        self.w = nn.Parameter(torch.randn(6, 5) * 0.3)
        self.out = nn.Linear(8 * 6 * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.relu(self.a(x)), torch.tanh(self.b(x))], 1) * self.scale / 1.5
        h = F.relu(h[:, :, 1:7, 1:7].permute(0, 1, 3, 2) @ self.w)
        return self.out(h.flatten(1))


class Pools(nn.Module):
    """ReLU6, padded and overlapping max pools (one in ceil_mode), Hardtanh, average pools."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.out = nn.Linear(6 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu6(self.c1(x) * 3), 3, stride=2, padding=1)  # 4x4
        h = F.avg_pool2d(F.hardtanh(self.c2(h)), 3, stride=1, padding=1, count_include_pad=False)
        h = F.max_pool2d(h, 3, stride=2, ceil_mode=True)  # 2x2
        return self.out(F.adaptive_avg_pool2d(h, 2).flatten(1))


class Padded(nn.Module):
    """An input clamp, reflect-padded conv, depthwise conv, replicate pad + crop, nearest upsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")
        self.d = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.out = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.d(F.max_pool2d(F.relu(self.c(x.clamp(0.1, 0.9))), 2)))
        h = F.relu(F.pad(h, (1, 0, 0, 1), mode="replicate")[:, :, 1:, :-1]) + h
        return self.out(F.interpolate(h, scale_factor=2, mode="nearest").flatten(1))


class Mobile(nn.Module):
    """MobileNetV2 / ShuffleNetV2 parts: ReLU6 + BatchNorm stem, chunk, depthwise separable branch,
    torch.cat, channel shuffle, Hardtanh, global average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw, self.pw = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.out = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        parts = h.chunk(2, 1)
        h = torch.cat([parts[0], F.relu6(self.bn(self.pw(self.dw(parts[1]))))], 1)
        h = h.view(-1, 2, 4, 8, 8).transpose(1, 2).reshape(-1, 8, 8, 8)
        return self.out(F.adaptive_avg_pool2d(F.hardtanh(h, 0.0, 4.0), 1).flatten(1))


class Refused(nn.Module):
    """One layer the bound must refuse, between two linear layers."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b, self.out, self.norm = nn.Linear(64, 32), nn.Linear(64, 32), nn.Linear(32, 10), nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        h = self.a(x)
        h = {
            "silu": lambda: F.silu(h), "gelu": lambda: F.gelu(h), "selu": lambda: F.selu(h), "square": lambda: h * h,
            "exp": lambda: h.exp(), "layernorm": lambda: F.relu(self.norm(h)),
            "product": lambda: F.relu(h) * torch.sigmoid(self.b(x)), "sign": lambda: torch.sign(h),
        }[self.kind]()  # fmt: skip
        return self.out(h)


MODELS = {"branches": Branches, "pools": Pools, "padded": Padded, "mobile": Mobile}
REFUSED = ("silu", "gelu", "selu", "square", "exp", "layernorm", "product", "sign")


def fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 1500) -> nn.Module:
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,), generator=gen)
        net.train()
        optimizer.zero_grad()
        F.cross_entropy(net(x[batch]), y[batch]).backward()
        optimizer.step()
    return net.eval().requires_grad_(False)


def save(net: nn.Module, fmt: str, example: torch.Tensor, folder: Path, name: str) -> Path:
    """The file a user would write, with each exporter's defaults (opset included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            path = folder / f"{name}.pt"
            torch.jit.trace(net, example[:1]).save(str(path))
        elif fmt == "onnx-dynamo":
            path = folder / f"{name}_dynamo.onnx"
            batch = torch.export.Dim("batch")
            torch.onnx.export(net, (example[:2],), str(path), dynamo=True, dynamic_shapes=({0: batch},))
        else:
            path = folder / f"{name}_ts.onnx"
            torch.onnx.export(
                net, (example[:1],), str(path), input_names=["x"], dynamic_axes={"x": {0: "b"}}, dynamo=False
            )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=30, help="test digits to certify (default 30)")
    parser.add_argument("--fmn-steps", type=int, default=500)
    parser.add_argument("--only", nargs="+", choices=list(MODELS), help="models to run (default: all)")
    parser.add_argument("--no-refusals", action="store_true", help="skip the layers that must be refused")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_split()
    x, y = x_test[: args.n], y_test[: args.n]
    folder = Path(tempfile.mkdtemp(prefix="robaudit_certify_formats_"))
    rows, refusals = [], []
    for name, factory in MODELS.items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        net = fit(factory(), x_train, y_train)
        accuracy = float((net(x_test).argmax(1) == y_test).float().mean())
        distance = None
        unsaved = certify_l2(net, x, y, budget="default").radius
        for fmt in FORMATS:
            model, _ = wrap_model(load_model(save(net, fmt, x, folder, name)), sample_shape=(1, 8, 8), probe=x[:2])
            if distance is None:
                free = attack_distance(model, x, y, (-math.inf, math.inf), args.fmn_steps)
                distance = torch.minimum(free, attack_distance(model, x, y, (0.0, 1.0), args.fmn_steps))
            start = time.process_time()
            cert = certify_l2(model, x, y, budget="default")
            seconds = (time.process_time() - start) / len(x)
            ok = (cert.radius > 0) & torch.isfinite(distance)
            row = {
                "model": name, "format": fmt, "test_accuracy": round(accuracy, 3),
                "certified": int((cert.radius > 0).sum()), "n": len(x),
                "median_ratio": round(float((cert.radius[ok] / distance[ok]).median()), 3) if ok.any() else None,
                "violations": int((cert.radius > distance).sum()), "cpu_s_per_sample": round(seconds, 3),
                "max_rel_radius_diff_vs_unsaved": float(
                    ((cert.radius - unsaved).abs() / unsaved.abs().clamp_min(1e-12)).max()
                ),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    for kind in () if args.no_refusals else REFUSED:
        torch.manual_seed(0)
        net = Refused(kind).eval().requires_grad_(False)
        for fmt in FORMATS:
            model, _ = wrap_model(load_model(save(net, fmt, x, folder, kind)), sample_shape=(1, 8, 8), probe=x[:2])
            try:
                certify_l2(model, x[:4], model(x[:4]).argmax(1), budget="fast")
                message = None
            except CertificateUnavailable as exc:
                message = str(exc)
            refusals.append({"layer": kind, "format": fmt, "refused": message is not None, "message": message})
            print(json.dumps(refusals[-1]), flush=True)
    result = {
        "description": "default certificate / smallest FMN or DeepFool L2 distance, per model and save format; "
        "and layers that must be refused",
        "command": "python benchmarks/certify_formats.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "rows": rows,
        "refusals": refusals,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
