"""robaudit's certified L2 radii beside auto_LiRPA's CROWN on the third-party fixture models.

Is robaudit "CROWN-tight" on deep nets it has never seen? This bounds the same networks
with auto_LiRPA (the reference CROWN implementation) and with robaudit, per image, on the
first N images each model classifies correctly (N = 5 by default).

Besides the four fixtures, `--vnncomp2022 DIR` (a checkout of
github.com/ChristopherBrix/vnncomp2022_benchmarks) adds four CIFAR-10 nets that are
not fixtures: `cifar_base` (benchmarks/cifar_biasfield: eight convolutions, no pooling)
and `sri_resnet_a` (benchmarks/sri_resnet_a: three residual blocks with strided 1x1
shortcuts), both read with the usual CIFAR-10 normalization, and the fixture
oval21_cifar_base_kw's two siblings `oval21_cifar_deep_kw` (four convolutions, two Gemms)
and `oval21_cifar_wide_kw` (two wider convolutions, two Gemms), read with its
normalization; all on the fixtures' CIFAR-10 images. Their .onnx.gz files are unpacked
into a temporary folder.

- Stage `lirpa` (auto_LiRPA on PYTHONPATH: see certify_vs_lirpa.py's docstring for how to
  fetch it and its small dependencies): the largest L2 radius, in pixel units with the
  fixture's normalization as the first layer and no [0, 1] box, at which CROWN proves every
  margin positive (geometric growth from 1e-3, then 12 bisection steps). Each network is
  written out as explicit torch code from onnx2torch's modules (auto_LiRPA cannot parse
  onnx2torch's graph modules), checked against robaudit's own wrapper of the file. The
  normalization is a dense 1x1 convolution with a diagonal weight: auto_LiRPA 0.7.1 under
  torch 2.14 gave unsound bounds (lower bounds above the true margin) for `(x - m) / s`
  with buffers and for a grouped 1x1 convolution. So every bound is checked: at eps = 0 it
  must equal the true margin (to 1e-4 relative to 1 + |margin|: auto_LiRPA computes in float32,
  and cifar_base's image 1, margin 11.6, is off by just over 1e-4), and every radius must lie below
  the attack distance.
- Stage `robaudit --budget B`: `certify_l2` per image on the model loaded exactly as
  certify_fixtures.py loads it, and the same attack distance (FMN + DeepFool, the smaller of
  the runs with and without the [0, 1] box).

auto_LiRPA bounds the float32 network in float32 with no rounding allowance; robaudit's radii
also cover the float32 model's rounding (docs/certify.md). Results go to
benchmarks/results/certify_vs_lirpa_fixtures.json, one key per stage.

    PYTHONPATH=/path/to/auto_LiRPA:/path/to/deps python benchmarks/certify_vs_lirpa_fixtures.py lirpa
    python benchmarks/certify_vs_lirpa_fixtures.py robaudit --budget default
    python benchmarks/certify_vs_lirpa_fixtures.py robaudit --budget tight --only eran_mnist_relu_9_200 colt_mnist_0.1
    python benchmarks/certify_vs_lirpa_fixtures.py robaudit --vnncomp2022 ../vnncomp2022_benchmarks --only cifar_base sri_resnet_a

`--pad-nodes` (stage robaudit) certifies each net with every padded Conv rewritten as a
constant Pad node and an unpadded Conv (the same function, as tf2onnx writes SAME
padding), under the key `robaudit_<budget>_pad_nodes`: the radii should equal the plain
run's wherever CROWN's pass over receptive fields goes through pad nodes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

RESULTS = ROOT / "benchmarks" / "results" / "certify_vs_lirpa_fixtures.json"
MODELS = ("cifar10_resnet_2b", "oval21_cifar_base_kw", "eran_mnist_relu_9_200", "colt_mnist_0.1")
DATA = {"MNIST": "mnist_test_first100.npz", "CIFAR-10": "cifar10_test_first100.npz"}
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]
OVAL_MEAN, OVAL_STD = [0.485, 0.456, 0.406], [0.225, 0.225, 0.225]
DEEP = {  # not fixtures: from vnncomp2022_benchmarks (`--vnncomp2022`); path, mean, std
    "cifar_base": ("benchmarks/cifar_biasfield/onnx/cifar_base.onnx.gz", CIFAR_MEAN, CIFAR_STD),
    "sri_resnet_a": ("benchmarks/sri_resnet_a/onnx/resnet_3b2_bn_mixup_adv_4.0_bs128_lr-1.onnx.gz", CIFAR_MEAN, CIFAR_STD),
    "oval21_cifar_deep_kw": ("benchmarks/oval21/onnx/cifar_deep_kw.onnx.gz", OVAL_MEAN, OVAL_STD),
    "oval21_cifar_wide_kw": ("benchmarks/oval21/onnx/cifar_wide_kw.onnx.gz", OVAL_MEAN, OVAL_STD),
}
_DEEP_FILES: dict[str, Path] = {}  # name -> unpacked .onnx
_PAD_FILES: dict[str, Path] = {}  # name -> the net rewritten with Pad nodes (--pad-nodes)


def fixtures() -> Path:
    return ROOT.parent / "shared" / "fixtures"


def manifest() -> dict:
    models = json.loads((fixtures() / "manifest.json").read_text())["models"]
    for name, path in _DEEP_FILES.items():
        _, mean, std = DEEP[name]
        models[name] = {"dataset": "CIFAR-10", "mean": mean, "std": std, "file": str(path)}
    for name, path in _PAD_FILES.items():
        models[name] = {**models[name], "file": str(path)}
    return models


def unpack_deep(root: Path, names: list[str]) -> None:
    """Unpack the chosen vnncomp2022 nets into a temporary folder (absolute paths join over the fixtures root)."""
    import gzip
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="robaudit-vnncomp2022-"))
    for name in names:
        target = folder / f"{name}.onnx"
        target.write_bytes(gzip.decompress((root / DEEP[name][0]).read_bytes()))
        _DEEP_FILES[name] = target


def pad_nodes(names: list[str]) -> None:
    """Rewrite each net's padded Convs as Pad + Conv into a temporary folder (opset 11+: pads as an input)."""
    import tempfile

    import onnx
    from onnx import helper, numpy_helper

    folder = Path(tempfile.mkdtemp(prefix="robaudit-pad-nodes-"))
    models = manifest()
    for name in names:
        proto = onnx.load(str(fixtures() / models[name]["file"]))
        opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        nodes = []
        for node in proto.graph.node:
            pads = [a for a in node.attribute if a.name == "pads"]
            if node.op_type == "Conv" and pads and any(pads[0].ints):
                t, l, b, r = pads[0].ints
                spelled = [0, 0, t, l, 0, 0, b, r]
                tag = f"{node.name or node.output[0]}_pad"
                if opset >= 11:
                    proto.graph.initializer.append(numpy_helper.from_array(np.array(spelled, dtype=np.int64), tag + "s"))
                    nodes.append(helper.make_node("Pad", [node.input[0], tag + "s"], [tag], mode="constant", name=tag))
                else:
                    nodes.append(helper.make_node("Pad", [node.input[0]], [tag], mode="constant", pads=spelled, name=tag))
                node.input[0] = tag
                node.attribute.remove(pads[0])
            nodes.append(node)
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
        onnx.checker.check_model(proto)
        target = folder / f"{name}.onnx"
        onnx.save(proto, str(target))
        _PAD_FILES[name] = target


def data(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    archive = np.load(fixtures() / "data" / DATA[manifest()[name]["dataset"]])
    return torch.from_numpy(archive["x"]).float(), torch.from_numpy(archive["y"]).long()


def robaudit_model(name: str, probe: torch.Tensor) -> nn.Module:
    from certify_fixtures import load_fixture

    return load_fixture(fixtures(), manifest()[name], probe).eval()


def picked(name: str, n: int) -> list[int]:
    """The first n images the model (as robaudit loads it) classifies correctly."""
    x, y = data(name)
    with torch.no_grad():
        pred = robaudit_model(name, x[:1])(x).argmax(1)
    return [k for k in range(len(x)) if pred[k] == y[k]][:n]


class _Normalize(nn.Module):
    """(x - mean) / std as a dense 1x1 convolution with a diagonal weight (bounded soundly by auto_LiRPA)."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        c = len(mean)
        self.conv = nn.Conv2d(c, c, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.diag(1 / torch.tensor(std)).view(c, c, 1, 1))
            self.conv.bias.copy_(-torch.tensor(mean) / torch.tensor(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Explicit(nn.Module):
    """The fixture network as plain torch code over onnx2torch's layers, for auto_LiRPA to parse."""

    def __init__(self, name: str) -> None:
        super().__init__()
        import onnx
        from onnx2torch import convert

        entry = manifest()[name]
        self.name = name
        self.g = convert(onnx.load(str(fixtures() / entry["file"]))).eval()  # (an absolute path stays itself)
        self.norm = None if entry["mean"] == [0.0] else _Normalize(entry["mean"], entry["std"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, z = self.g, (self.norm(x) if self.norm is not None else x)
        if self.name == "cifar10_resnet_2b":
            r1 = torch.relu(g.Conv_0(z))
            r7 = torch.relu(g.Conv_4(torch.relu(g.Conv_2(r1))) + g.Conv_5(r1))
            r12 = torch.relu(g.Conv_10(torch.relu(g.Conv_8(r7))) + r7)
            return g.Gemm_16(torch.relu(g.Gemm_14(r12.flatten(1))))
        if self.name in ("oval21_cifar_base_kw", "oval21_cifar_wide_kw"):  # one layout, the second wider
            z = torch.relu(g.Conv_2(torch.relu(g.Conv_0(z))))
            return g.Gemm_7(torch.relu(g.Gemm_5(z.flatten(1))))
        if self.name == "oval21_cifar_deep_kw":  # four convolutions, two Gemms
            for k in (0, 2, 4, 6):
                z = torch.relu(getattr(g, f"Conv_{k}")(z))
            return g.Gemm_11(torch.relu(g.Gemm_9(z.flatten(1))))
        if self.name == "eran_mnist_relu_9_200":  # its in-graph Sub 0 / Div 1 are identities; it ends in a ReLU
            z = z.flatten(1)
            for k in range(5, 22, 2):
                z = torch.relu(getattr(g, f"Gemm_{k}")(z))
            return z
        if self.name == "colt_mnist_0.1":  # its Shape/Gather/Concat/Reshape chain is flatten(1)
            z = torch.relu(g.Conv_1(torch.relu(g.Conv(z))))
            return g.Gemm_1(torch.relu(g.Gemm(z.flatten(1))))
        if self.name == "cifar_base":  # Conv/ReLU seven times, a last Conv to 10x1x1, flatten
            for k in range(0, 15, 2):
                z = getattr(g, f"Conv_{k}")(z)
                z = torch.relu(z) if k < 14 else z
            return z.flatten(1)
        if self.name == "sri_resnet_a":  # stem, three blocks relu(shortcut(z) + conv(relu(conv(z)))), two Gemms
            z = torch.relu(g.Conv_0(z))
            for a, b, c in ((2, 3, 5), (8, 9, 11), (14, 15, 17)):
                z = torch.relu(getattr(g, f"Conv_{a}")(z) + getattr(g, f"Conv_{c}")(torch.relu(getattr(g, f"Conv_{b}")(z))))
            return g.Gemm_23(torch.relu(g.Gemm_21(z.flatten(1))))
        raise KeyError(self.name)


def stage_lirpa(names: list[str], n: int, steps: int) -> None:
    import auto_LiRPA
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    out = {"auto_LiRPA": auto_LiRPA.__version__, "torch": torch.__version__, "models": {}}
    for name in names:
        x, y = data(name)
        idx = picked(name, n)
        model = Explicit(name).eval().requires_grad_(False)
        with torch.no_grad():
            agree = (model(x[:50]) - robaudit_model(name, x[:1])(x[:50])).abs().max().item()
        bounded = BoundedModule(model, x[:1].clone(), bound_opts={"conv_mode": "patches"}, device="cpu")
        bounded.eval()

        def lower(xi: torch.Tensor, yi: int, eps: float) -> tuple[torch.Tensor, float]:
            c = torch.zeros(1, 9, 10)
            for k, j in enumerate(j for j in range(10) if j != yi):
                c[0, k, yi], c[0, k, j] = 1.0, -1.0
            start = time.perf_counter()
            ball = BoundedTensor(xi, PerturbationLpNorm(norm=2, eps=eps))
            lb, _ = bounded.compute_bounds(x=(ball,), C=c, method="CROWN", bound_upper=False)
            return lb.detach().view(-1).double(), time.perf_counter() - start

        rows = []
        for i in idx:
            xi, yi = x[i : i + 1], int(y[i])
            with torch.no_grad():
                z = model(xi)[0].double()
            margins = z[yi] - torch.cat([z[:yi], z[yi + 1 :]])
            at_zero, seconds = lower(xi, yi, 0.0)
            if float(((at_zero - margins).abs() / (1 + margins.abs())).max()) > 1e-4:  # float32 through deep nets
                raise SystemExit(f"{name} image {i}: auto_LiRPA's bound at eps=0 is not the margin: unsound setup")
            lo, hi, e, calls = 0.0, None, 1e-3, [seconds]
            while hi is None and e < 8.0:  # grow geometrically, then bisect
                ok = bool((lower(xi, yi, e)[0] > 0).all())
                lo, hi, e = (e, None, e * 4) if ok else (lo, e, e)
            for _ in range(steps if hi is not None else 0):
                mid = (lo + hi) / 2
                bound, seconds = lower(xi, yi, mid)
                calls.append(seconds)
                lo, hi = (mid, hi) if bool((bound > 0).all()) else (lo, mid)
            rows.append({"index": i, "crown_radius": lo, "seconds_per_bound": round(float(np.mean(calls)), 3)})
            print(f"{name} image {i}: CROWN radius {lo:.6g}", flush=True)
        out["models"][name] = {"explicit_vs_robaudit_max_abs": agree, "rows": rows}
    save("lirpa_crown", out)


def stage_robaudit(names: list[str], n: int, budget: str, fmn_steps: int, key: str) -> None:
    from certify_zoo import attack_distance
    from robaudit.certify import certify_l2

    out = {"budget": budget, "torch": torch.__version__, "models": {}}
    for name in names:
        x, y = data(name)
        idx = picked(name, n)
        model = robaudit_model(name, x[:1])
        rows = []
        for i in idx:
            start = time.perf_counter()
            cert = certify_l2(model, x[i : i + 1], y[i : i + 1], budget=budget)
            rows.append({"index": i, "radius": float(cert.radius[0]), "method": cert.method[0],
                         "seconds": round(time.perf_counter() - start, 2)})  # fmt: skip
            print(f"{name} image {i}: robaudit {budget} radius {rows[-1]['radius']:.6g}", flush=True)
        xs, ys = x[idx], y[idx]
        boxed = attack_distance(model, xs, ys, (0.0, 1.0), fmn_steps)
        free = torch.minimum(attack_distance(model, xs, ys, (-math.inf, math.inf), fmn_steps), boxed)
        for row, d in zip(rows, free.tolist()):
            row["attack_distance"] = d
        out["models"][name] = {"rows": rows}
    save(key, out)


def save(key: str, value: dict) -> None:
    """Store a stage's results; models run before under the same key and not rerun now are kept."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    kept = results.get(key, {}).get("models", {})
    results[key] = {**value, "models": {**kept, **value["models"]}}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["lirpa", "robaudit"])
    parser.add_argument("--only", nargs="+", choices=[*MODELS, *DEEP], default=list(MODELS))
    parser.add_argument("--vnncomp2022", type=Path, help="checkout of vnncomp2022_benchmarks, for the nets that are not fixtures (DEEP)")
    parser.add_argument("--n", type=int, default=5, help="images per model (the first it classifies correctly)")
    parser.add_argument("--budget", default="default", help="robaudit's certify budget (stage robaudit)")
    parser.add_argument("--steps", type=int, default=12, help="bisection steps of the CROWN radius (stage lirpa)")
    parser.add_argument("--fmn-steps", type=int, default=1000)
    parser.add_argument("--pad-nodes", action="store_true", help="padded Convs as Pad + Conv (stage robaudit)")
    args = parser.parse_args()
    deep = [name for name in args.only if name in DEEP]
    if deep:
        if args.vnncomp2022 is None:
            parser.error(f"{', '.join(deep)}: give --vnncomp2022 DIR (a checkout of vnncomp2022_benchmarks)")
        unpack_deep(args.vnncomp2022, deep)
    if args.stage == "lirpa":
        stage_lirpa(args.only, args.n, args.steps)
    else:
        if args.pad_nodes:
            pad_nodes(args.only)
        key = f"robaudit_{args.budget}" + ("_pad_nodes" if args.pad_nodes else "")
        stage_robaudit(args.only, args.n, args.budget, args.fmn_steps, key)


if __name__ == "__main__":
    main()
