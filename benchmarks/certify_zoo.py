"""How tight are robaudit's certified L2 radii? Certified radius / smallest adversarial distance.

Trains a small zoo on robaudit's digits training split (8x8, 10 classes, inputs (1, 8, 8)
in [0, 1]; ``scripts/make_digits.py: digits_split()``, needs scikit-learn) and, on the
first ``--n`` test digits, compares each sample's certified radius (``certify_l2``) with
the smallest adversarial L2 perturbation that strong minimal-norm attacks find: FMN
(``--fmn-steps`` steps) and DeepFool (all 9 candidate classes), per-sample minimum over
both, run once without a box and once in the [0, 1] box. The certificate covers the
whole ball, so the main ratio uses the smallest distance found anywhere; the ratio
against the box-confined attacks alone (larger distances, smaller ratios) is reported
too. A violation (certified radius above an adversarial distance) would be a bug in
the certificate. The true minimal distance is at most the one found, so the true
ratio is at least the one reported.

    tanh_mlp      64-64-10, tanh (one hidden layer: the closed form applies)
    relu_mlp      64-128-128-10, ReLU (the zoo's `mlp` architecture)
    cnn           robaudit.demo.digits_cnn: conv 16, conv 16 stride 2, linear
    resnet        benchmarks/zoo.py ZooResNet: BatchNorm, two residual blocks, global average pool
    cnn_l2_at     digits_cnn, PGD-7 adversarial training under L2 eps 0.5
    mobile        MobileDigits: ReLU6, chunk, depthwise separable branch, cat, channel shuffle, Hardtanh

All trained with AdamW (weight decay 0.01), 30 epochs, seeded and single-threaded.

Usage (from the repository root, about 10 minutes on one CPU thread):
    python benchmarks/certify_zoo.py                        # writes benchmarks/results/certify_zoo.json
    python benchmarks/certify_zoo.py --only tanh_mlp relu_mlp --budgets default tight
    python benchmarks/certify_zoo.py --only cnn --n 40 --unstable   # where the bounds lose: unstable ReLUs
    python benchmarks/certify_zoo.py --only resnet --n 40 --apgd-check   # are the attack distances near minimal?
    python benchmarks/certify_zoo.py --only mobile --budgets fast default --out benchmarks/results/certify_zoo_mobile.json

Before / after a change to robaudit.certify: run this script (of this checkout) against
another checkout of robaudit with ``--robaudit PATH`` (its root; imported instead of this
checkout's robaudit, attacks included), e.g. a worktree of the commit before the change:
    git worktree add /tmp/robaudit_before <commit>
    python benchmarks/certify_zoo.py --robaudit /tmp/robaudit_before --out benchmarks/results/certify_zoo_before.json
    python benchmarks/certify_zoo.py --out benchmarks/results/certify_zoo_after.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:  # benchmark the robaudit of this checkout, installed or not
        sys.path.insert(0, str(path))
# robaudit (and zoo.py, which imports robaudit.demo) are imported only after `use_robaudit`
# has chosen the checkout to benchmark (--robaudit), so a "before" run needs no copy of this script.

RESULTS = ROOT / "benchmarks" / "results" / "certify_zoo.json"


def use_robaudit(path: Path | None) -> dict:
    """Import robaudit from `path` (another checkout) or from this one; return where it came from.

    Must run before anything imports robaudit: once imported, every ``robaudit.*`` import
    resolves inside that package, whatever sys.path says later (zoo.py adds this checkout).
    """
    root = Path(path).resolve() if path is not None else ROOT
    if not (root / "robaudit" / "__init__.py").is_file():
        sys.exit(f"--robaudit {path}: no robaudit/__init__.py there (give the checkout's root)")
    if "robaudit" in sys.modules:
        sys.exit("robaudit was imported before --robaudit was applied; import it lazily")
    while str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    import robaudit

    where = Path(robaudit.__file__).resolve().parent
    if where != root / "robaudit":
        sys.exit(f"imported robaudit from {where}, not from {root}")
    return {"path": str(root), **_git_state(root)}


def _git_state(root: Path) -> dict:
    """Commit and uncommitted robaudit/ changes of the benchmarked checkout, so a result names its code."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "robaudit")
    return {"commit": git("rev-parse", "HEAD") or None, "uncommitted_robaudit_files": len(changed.splitlines())}


def _zoo_model(name: str) -> nn.Module:
    import zoo  # lazily: see use_robaudit

    return getattr(zoo, name)()


def tanh_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def relu_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


class MobileDigits(nn.Module):
    """MobileNetV2 / ShuffleNetV2 parts: ReLU6, a channel split by chunk, a depthwise separable
    branch, torch.cat, a channel shuffle (view, transpose), Hardtanh, reflect padding."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Conv2d(8, 8, 3, stride=1, padding=1, groups=8, padding_mode="reflect")
        self.pw = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        a, b = h.chunk(2, dim=1)
        h = torch.cat([a, F.relu6(self.bn(self.pw(self.dw(b))))], 1)
        h = h.view(-1, 2, 8, 8, 8).transpose(1, 2).reshape(-1, 16, 8, 8)
        h = F.hardtanh(self.down(h), 0.0, 4.0)
        return self.head(h.mean(dim=(2, 3)))


ZOO = {
    "tanh_mlp": (tanh_mlp, None),
    "relu_mlp": (relu_mlp, None),
    "cnn": (lambda: _zoo_model("ZooCNN"), None),
    "resnet": (lambda: _zoo_model("ZooResNet"), None),
    "cnn_l2_at": (lambda: _zoo_model("ZooCNN"), 0.5),
    "mobile": (MobileDigits, None),
}


def _pgd_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 7) -> torch.Tensor:
    """Training-time L2 PGD (random start, step 2.5 eps / steps, in the [0, 1] box)."""
    view = (-1, 1, 1, 1)
    delta = torch.randn_like(x)
    delta = delta / delta.flatten(1).norm(dim=1).view(view) * eps * torch.rand(len(x), 1, 1, 1)
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    for _ in range(steps):
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)
        with torch.no_grad():
            delta += 2.5 * eps / steps * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
            delta *= (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1).view(view)
            delta.copy_((x + delta).clamp(0, 1) - x)
    return (x + delta).detach()


def train(name: str, data, epochs: int = 30, seed: int = 0) -> tuple[nn.Module, float, float]:
    factory, adv_eps = ZOO[name]
    torch.manual_seed(seed)
    model = factory()
    x_train, y_train, x_test, y_test = data
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    steps = epochs * math.ceil(len(x_train) / 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.25)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in torch.randperm(len(x_train), generator=gen).split(64):
            xb, yb = x_train[batch], y_train[batch]
            if adv_eps:
                model.eval()
                xb = _pgd_l2(model, xb, yb, adv_eps)
            model.train()
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            schedule.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return model, accuracy, time.perf_counter() - start


def attack_distance(model: nn.Module, x: torch.Tensor, y: torch.Tensor, box: tuple[float, float], fmn_steps: int):
    """Per-sample smallest verified adversarial L2 distance over FMN and DeepFool (inf if none)."""
    from robaudit.attacks.base import AttackContext
    from robaudit.attacks.deepfool import DeepFool
    from robaudit.attacks.fmn import FMN
    from robaudit.threats import Threat

    ctx = AttackContext(lower=box[0], upper=box[1], num_classes=10, generator=torch.Generator().manual_seed(0))
    best = torch.full((len(x),), math.inf, dtype=torch.float64)
    for attack in (FMN(steps=fmn_steps), DeepFool(steps=100, n_candidates=10)):
        adv = attack.perturb(model, x, y, Threat("l2", 1.0), ctx).clamp(*box)
        with torch.no_grad():
            wrong = model(adv).argmax(1) != y
        dist = (adv - x).flatten(1).norm(dim=1).double()
        best = torch.where(wrong & (dist < best), dist, best)
    return best


def apgd_closer(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, distance: torch.Tensor,
    fractions: tuple[float, ...] = (0.97, 0.93, 0.88, 0.82, 0.75), starts: int = 3,
) -> torch.Tensor:  # fmt: skip
    """Per-sample distance after APGD-CE and 9-target APGD-T (100 steps, no box) at shrinking
    fractions of `distance`, each fraction tried only after the previous one broke the sample:
    a check that the minimal-norm attacks' distances are close to minimal."""
    from robaudit.attacks.apgd import APGD, APGDTargeted
    from robaudit.attacks.base import AttackContext
    from robaudit.threats import Threat

    best = distance.clone()
    for i in torch.nonzero(torch.isfinite(distance)).flatten().tolist():
        xi, yi = x[i : i + 1], y[i : i + 1]
        for fraction in fractions:
            eps = float(distance[i]) * fraction
            found = math.inf
            for seed in range(starts):
                ctx = AttackContext(lower=-math.inf, upper=math.inf, num_classes=10, generator=torch.Generator().manual_seed(seed))
                for attack in (APGD("ce", steps=100), APGDTargeted(steps=100, n_targets=9)):
                    adv = attack.perturb(model, xi, yi, Threat("l2", eps), ctx)
                    with torch.no_grad():
                        wrong = bool(model(adv).argmax(1) != yi)
                    dist = float((adv - xi).flatten(1).norm())
                    if wrong and dist <= eps * (1 + 1e-4):
                        found = min(found, dist)
                if math.isfinite(found):
                    break
            if not math.isfinite(found):
                break
            best[i] = min(float(best[i]), found)
    return best


def unstable_relus(model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor, distance: torch.Tensor) -> dict:
    """Median count of ReLU units whose input can change sign on the ball, per ReLU layer.

    Counted with the `default` budget's CROWN intervals (the ones its relaxations use), on
    the certified samples, at eps = the certified radius and at eps = the attack distance:
    every such unit gets a single-neuron relaxation, which is where a bound loses tightness.
    """
    from robaudit.certify.certificate import _batch
    from robaudit.certify.crown import CrownBound
    from robaudit.certify.budget import get_budget
    from robaudit.certify.graph import build_graph

    keep = (radius > 0) & torch.isfinite(distance)
    if not bool(keep.any()):
        return {}
    graph = build_graph(model, x[:1])
    batch = _batch(graph, x[keep].double(), y[keep])
    crown = CrownBound(graph, get_budget("default"))
    out = {}
    everyone = torch.arange(int(keep.sum()))
    for where, eps in (("at_radius", radius[keep]), ("at_attack_distance", distance[keep])):
        ctx = crown._intermediate(batch, everyone, eps.double())
        out[where] = {
            f"node {i} ({math.prod(graph.nodes[i].shape)} units)": float(r.parts["free"].flatten(1).sum(1).double().median())
            for i, r in sorted(ctx.relaxed.items()) if "free" in r.parts
        }  # fmt: skip
    return out


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, budgets: list[str], fmn_steps: int, unstable: bool = False,
    apgd_check: bool = False,
) -> list[dict]:  # fmt: skip
    """One row per budget: certified radii against the attacks' smallest distances."""
    from robaudit.certify import certify_l2

    boxed = attack_distance(model, x, y, (0.0, 1.0), fmn_steps)
    free = torch.minimum(attack_distance(model, x, y, (-math.inf, math.inf), fmn_steps), boxed)
    check = {}
    if apgd_check:
        closer = apgd_closer(model, x, y, free)
        kept = torch.isfinite(free)
        shrink = closer[kept] / free[kept]
        check = {"apgd_check": {
            "samples_closer": int((shrink < 1).sum()), "samples": int(kept.sum()),
            "min_new_over_old": round(shrink.min().item(), 4), "median_new_over_old": round(shrink.median().item(), 4),
        }}  # fmt: skip
        free = closer
    with torch.no_grad():
        classified = int((model(x).argmax(1) == y).sum())
    rows = []
    for budget in budgets:
        cert = certify_l2(model, x, y, budget=budget)
        correct = cert.radius > 0
        ok = correct & torch.isfinite(free)
        ok_box = correct & torch.isfinite(boxed)
        ratio = cert.radius[ok] / free[ok]
        rows.append({
            "budget": budget,
            "samples": len(x),
            "correct": classified,  # a correct sample with radius 0 is not in the ratios: compare with certified
            "certified": int(correct.sum()),
            "median_ratio": round(ratio.median().item(), 4),
            "mean_ratio": round(ratio.mean().item(), 4),
            "median_ratio_box01": round((cert.radius[ok_box] / boxed[ok_box]).median().item(), 4),
            "median_radius": round(cert.radius[correct].median().item(), 4),
            "median_attack_distance": round(free[ok].median().item(), 4),
            "violations": int((cert.radius > free).sum()),
            "seconds_per_sample": round(cert.seconds / len(x), 4),
            "methods": dict(Counter(cert.method)),
            **check,
        })  # fmt: skip
        if unstable:
            rows[-1]["unstable_relus"] = unstable_relus(model, x, y, cert.radius, free)
    return rows


def methods_text(methods: dict) -> str:
    """Method counts as one table cell, largest first ("interval 196, none 4")."""
    return ", ".join(f"{name} {count}" for name, count in sorted(methods.items(), key=lambda kv: (-kv[1], kv[0])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(ZOO), help="models to run (default: all)")
    parser.add_argument("--budgets", nargs="+", default=["default"], choices=["fast", "default", "tight"])
    parser.add_argument("--n", type=int, default=200, help="test digits to certify (default 200 of 360)")
    parser.add_argument("--fmn-steps", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--unstable", action="store_true",
        help="also count the ReLU units that can change sign on the ball (at the certified radius and the attack distance)",
    )
    parser.add_argument(
        "--apgd-check", action="store_true",
        help="also attack each sample with APGD at 0.97..0.75 of its distance (slow); ratios then use the closest point",
    )
    parser.add_argument(
        "--robaudit", type=Path, metavar="PATH", help="root of another robaudit checkout (default: this one)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    source = use_robaudit(args.robaudit)
    from zoo import load_split  # after use_robaudit: zoo.py imports robaudit.demo

    data = load_split()
    x, y = data[2][: args.n], data[3][: args.n]
    rows = []
    result = {
        "description": "certified L2 radius (robaudit.certify.certify_l2) / smallest adversarial L2 distance "
        "(min over FMN and DeepFool, run without a box and in the [0, 1] box) on the first n digits test samples; "
        "median_ratio_box01 uses only the box-confined attacks",
        "command": "python benchmarks/certify_zoo.py " + " ".join(sys.argv[1:]),
        "robaudit": source,
        "config": {
            "n": args.n, "fmn_steps": args.fmn_steps, "deepfool": {"steps": 100, "n_candidates": 10}, "threads": 1,
            "training": "AdamW lr 3e-3 (one-cycle), weight decay 0.01, 30 epochs, batch 64, seed 0",
        },  # fmt: skip
        "torch": torch.__version__,
        "machine": platform.machine(),
        "rows": rows,
    }
    header = (
        "| model | test acc. | budget | certified | median ratio | mean ratio | ratio ([0,1] box) "
        "| median radius | median attack dist. | violations | s / sample | methods |"
    )
    print(f"robaudit: {source['path']} ({source['commit']}, {source['uncommitted_robaudit_files']} uncommitted files)")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.only or list(ZOO):
        model, accuracy, seconds = train(name, data)
        for row in evaluate(model, x, y, args.budgets, args.fmn_steps, args.unstable, args.apgd_check):
            row = {"model": name, "test_accuracy": round(accuracy, 4), "train_seconds": round(seconds, 1), **row}
            rows.append(row)
            cells = [
                name, f"{accuracy:.3f}", row["budget"], f"{row['certified']}/{row['samples']}",
                f"{row['median_ratio']:.3f}", f"{row['mean_ratio']:.3f}", f"{row['median_ratio_box01']:.3f}",
                f"{row['median_radius']:.4f}", f"{row['median_attack_distance']:.4f}", str(row["violations"]),
                f"{row['seconds_per_sample']:.3f}", methods_text(row["methods"]),
            ]  # fmt: skip
            print("| " + " | ".join(cells) + " |", flush=True)
            if "apgd_check" in row:
                print(f"    APGD check of the attack distances: {row['apgd_check']}", flush=True)
            if "unstable_relus" in row:
                print(f"    unstable ReLU units (median): {row['unstable_relus']}", flush=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every model: long runs keep partial results
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
