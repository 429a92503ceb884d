"""Does the decision-surface indicator order models the way measured robust accuracy does?

Trains a zoo of small 8x8-digits classifiers (robaudit's digits training split, see
benchmarks/zoo.py) with different robustness recipes, then for each model and threat:

* robust accuracy with robaudit's ``standard`` battery through the runner
  (APGD-CE x 2 starts, APGD-T x 9 targets, Square 5000 queries; the minimal-norm FMN
  stage of the preset is left out: ``run_threat`` runs fixed-radius attacks only);
* the indicator (``robaudit.measures.measure_indicator``, default budget) on the same samples;
* the ``quick`` battery (FGSM + APGD-CE 50 steps), the cheapest attack baseline to rank by;

and reports the Spearman rank correlation between the indicator's per-threat score and
the robust accuracy across the zoo (and between the overall score and the mean robust
accuracy), plus the cost of both in passes per sample and seconds.

Negative control: ``cnn_quantized`` is the natural CNN behind input quantization
(``round(3x)/3``: gradient exactly zero). It is reported apart and left out of the
correlation; the indicator must flag it rather than call it robust.

    python benchmarks/indicator_zoo.py                # train what is missing, evaluate, write JSON (~3 min)
    python benchmarks/indicator_zoo.py --set heldout --out benchmarks/results/indicator_zoo_heldout.json
    python benchmarks/indicator_zoo.py --n 100 --force
    python benchmarks/indicator_zoo.py --only cnn cnn_at_linf10

``--set heldout`` evaluates eight models trained only after the score's formula was
fixed (docs/indicator.md tells how it was chosen on the main zoo).

Models are cached in ``benchmarks/.zoo/indicator/`` (git-ignored). Single-threaded by
default (``--threads``), seeded. Needs scikit-learn for the training split.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmark the robaudit of this checkout, installed or not
    sys.path.insert(0, str(ROOT))

from robaudit.attacks.runner import run_threat  # noqa: E402
from robaudit.battery import build_battery, preset_specs  # noqa: E402
from robaudit.data.sampling import stratified_indices  # noqa: E402
from robaudit.measures import measure_indicator  # noqa: E402
from robaudit.measures.bounds import l2_radius  # noqa: E402
from robaudit.measures.decision import LocalModel, decision, gradient  # noqa: E402
from robaudit.measures.score import safety  # noqa: E402
from robaudit.threats import Threat, parse_threat  # noqa: E402

DEFAULT_ZOO = ROOT / "benchmarks" / ".zoo" / "indicator"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "indicator_zoo.json"
DEFAULT_THREATS = ["linf:0.1", "l2:0.5"]
RECIPE_VERSION = 1
QUANT_LEVELS = 3  # negative control: round(3x)/3


def _zoo_module():
    spec = importlib.util.spec_from_file_location("robaudit_bench_zoo", Path(__file__).resolve().parent / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- architectures

ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus, "tanh": nn.Tanh}


def mlp(act: str) -> nn.Module:
    """64-64-64-10 MLP."""
    a = ACTIVATIONS[act]
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), a(), nn.Linear(64, 64), a(), nn.Linear(64, 10))


def cnn(act: str) -> nn.Module:
    """The layers of robaudit.demo.digits_cnn with a chosen activation."""
    a = ACTIVATIONS[act]
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), a(), nn.Conv2d(16, 16, 3, stride=2, padding=1), a(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )  # fmt: skip


ARCHS = {"mlp": mlp, "cnn": cnn}


class Quantized(nn.Module):
    """Input quantization in front of a net: gradients are exactly zero (gradient masking)."""

    def __init__(self, net: nn.Module, levels: int = QUANT_LEVELS) -> None:
        super().__init__()
        self.net, self.levels = net, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * self.levels) / self.levels)


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Recipe:
    name: str
    arch: str  # a key of ARCHS
    act: str  # a key of ACTIVATIONS
    method: str  # natural | pgd | gradreg | noise
    strength: float = 0.0  # pgd: Linf eps; gradreg: lambda; noise: sigma
    epochs: int = 30
    lr: float = 2e-3
    seed: int = 0
    batch_size: int = 64
    version: int = RECIPE_VERSION

    def describe(self) -> str:
        what = {
            "natural": "natural",
            "pgd": f"PGD-7 AT linf eps {self.strength:g}",
            "gradreg": f"Jacobian-of-g regularizer lambda {self.strength:g}",
            "noise": f"Gaussian noise sigma {self.strength:g}",
        }[self.method]
        return f"{self.arch}/{self.act}, {what}" + (f", seed {self.seed}" if self.seed else "")


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("mlp", "mlp", "relu", "natural"),
        Recipe("mlp_softplus", "mlp", "softplus", "natural"),
        Recipe("mlp_tanh", "mlp", "tanh", "natural"),
        Recipe("cnn", "cnn", "relu", "natural"),
        Recipe("cnn_softplus", "cnn", "softplus", "natural"),
        Recipe("cnn_noise03", "cnn", "relu", "noise", 0.3),
        Recipe("mlp_softplus_noise01", "mlp", "softplus", "noise", 0.1),
        Recipe("cnn_gradreg01", "cnn", "relu", "gradreg", 0.1),
        Recipe("mlp_softplus_gradreg1", "mlp", "softplus", "gradreg", 1.0),
        Recipe("cnn_at_linf05", "cnn", "relu", "pgd", 0.05),
        Recipe("cnn_at_linf10", "cnn", "relu", "pgd", 0.1),
        Recipe("mlp_softplus_at_linf10", "mlp", "softplus", "pgd", 0.1),
    )
}
# Trained only after the formula was fixed, to check it on models it was not designed on.
HELDOUT: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("cnn_s1", "cnn", "relu", "natural", seed=1),
        Recipe("mlp_at_linf05", "mlp", "relu", "pgd", 0.05),
        Recipe("mlp_tanh_at_linf10", "mlp", "tanh", "pgd", 0.1),
        Recipe("cnn_noise01", "cnn", "relu", "noise", 0.1),
        Recipe("mlp_softplus_noise03", "mlp", "softplus", "noise", 0.3),
        Recipe("mlp_gradreg01", "mlp", "relu", "gradreg", 0.1),
        Recipe("cnn_softplus_gradreg03", "cnn", "softplus", "gradreg", 0.3),
        Recipe("cnn_at_linf10_s1", "cnn", "relu", "pgd", 0.1, seed=1),
    )
}
SETS = {"main": RECIPES, "heldout": HELDOUT}
CONTROL = "cnn_quantized"  # Quantized(RECIPES["cnn"])


# --------------------------------------------------------------------------- training


def train(recipe: Recipe, data) -> tuple[nn.Module, dict]:
    """Train one model deterministically (eval mode on return)."""
    zoo = _zoo_module()
    torch.manual_seed(recipe.seed)
    x_train, y_train, x_test, y_test = data
    model = ARCHS[recipe.arch](recipe.act)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    steps = recipe.epochs * math.ceil(len(x_train) / recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=steps, pct_start=0.25)
    gen = torch.Generator().manual_seed(recipe.seed)
    started = time.perf_counter()
    for epoch in range(recipe.epochs):
        ramp = min(1.0, (epoch + 1) / 10)  # eps / lambda warm-up over 10 epochs
        for batch in torch.randperm(len(x_train), generator=gen).split(recipe.batch_size):
            xb, yb = x_train[batch], y_train[batch]
            if recipe.method == "pgd":
                model.eval()
                xb = zoo._pgd(model, xb, yb, "linf", recipe.strength * ramp, 7, gen)
            elif recipe.method == "noise":
                xb = (xb + recipe.strength * torch.randn(xb.shape, generator=gen)).clamp(0, 1)
            model.train()
            optimizer.zero_grad()
            xb = xb.clone().requires_grad_(recipe.method == "gradreg")
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            if recipe.method == "gradreg":  # penalize ||grad_x g||_2^2, g = z_y - max_{j!=y} z_j
                (jac,) = torch.autograd.grad(decision(logits, yb).sum(), xb, create_graph=True)
                loss = loss + recipe.strength * ramp * jac.flatten(1).pow(2).sum(1).mean()
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    seconds = round(time.perf_counter() - started, 1)
    return model, {"recipe": asdict(recipe), "test_accuracy": round(accuracy, 4), "train_seconds": seconds}


def load(name: str, zoo: Path, data, force: bool) -> tuple[nn.Module, dict]:
    """A cached model (retrained when missing, stale or forced)."""
    from safetensors.torch import load_file, save_file

    recipe = {**RECIPES, **HELDOUT}[name]
    weights, meta_path = zoo / f"{name}.safetensors", zoo / f"{name}.json"
    if not force and weights.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("recipe") == asdict(recipe):
            model = ARCHS[recipe.arch](recipe.act)
            model.load_state_dict(load_file(str(weights)))
            return model.eval().requires_grad_(False), meta
    print(f"training {name} ...", file=sys.stderr, flush=True)
    model, meta = train(recipe, data)
    zoo.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return model, meta


# --------------------------------------------------------------------------- evaluation


def ranks(values: list[float]) -> list[float]:
    """Average ranks (1-based), ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of the ranks (the tie-corrected Spearman rho)."""
    ra, rb = np.array(ranks(a)), np.array(ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom else float("nan")


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, preset: str = "standard") -> dict:
    """A preset battery's robust accuracy and cost (passes per sample, seconds)."""
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    started = time.perf_counter()
    out = run_threat(
        model, x, y, correct, threat, build_battery(preset_specs(preset)), lower=0.0, upper=1.0,
        num_classes=10, batch_size=250, device=torch.device("cpu"), seed=0,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    n = len(x)
    return {
        "robust_accuracy": float((correct & ~out.broken).float().mean()),
        "forwards_per_sample": sum(r.forwards for r in out.records) / n,
        "backwards_per_sample": sum(r.backwards for r in out.records) / n,
        "seconds_per_sample": seconds / n,
        "broken_by": {r.name: r.broke for r in out.records},
    }


def hvp_cost(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 30) -> float:
    """Wall time of one batched HVP in units of one batched forward+backward (gradient).

    The fastest of ``repeats`` calls of each: on a shared machine the minimum is the
    least disturbed measurement.
    """

    def fastest(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    grad_s = fastest(lambda: gradient(model, x, y))
    local = LocalModel(model, x, y)
    v = torch.randn_like(x)
    return fastest(lambda: local.hvp(v)) / grad_s


def evaluate(
    name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threats: list[Threat], budget: str, seeds: list[int]
) -> dict:
    samples, ind = measure_indicator(model, x, y, threats, budget=budget, box=(0.0, 1.0), batch_size=64, seed=seeds[0])
    other = {s: measure_indicator(model, x, y, threats, budget=budget, box=(0.0, 1.0), seed=s)[1] for s in seeds[1:]}
    attacks = {t.canonical: robust_accuracy(model, x, y, t) for t in threats}
    quick = {t.canonical: robust_accuracy(model, x, y, t, "quick") for t in threats}
    shown = "  ".join(f"{k} RA {v['robust_accuracy']:.3f}" for k, v in attacks.items())
    print(f"  {name}: score {ind.score:.3f}  {shown}", file=sys.stderr, flush=True)
    n = len(x)
    return {
        "indicator": ind.to_dict(),
        "indicator_other_seeds": {
            str(k): {"score": v.score, **{p: v.parts[p] for p in v.parts if p.startswith("score[")}} for k, v in other.items()
        },
        "indicator_seconds_per_sample": ind.seconds / n,
        "hvp_cost_in_gradients": hvp_cost(model, x[:64], y[:64]),
        "attacks": attacks,
        "quick_battery": quick,
        "samples": [s.to_dict() for s in samples],
    }


# --------------------------------------------------------------------------- report


def summarize(results: dict, threats: list[Threat]) -> dict:
    """Spearman of the score (and of the other parts, for the record) against robust accuracy."""
    names = [k for k in results if k != CONTROL]
    keys = [t.canonical for t in threats]
    ra = {k: [results[m]["attacks"][k]["robust_accuracy"] for m in names] for k in keys}
    mean_ra = [sum(results[m]["attacks"][k]["robust_accuracy"] for k in keys) / len(keys) for m in names]
    parts = lambda m: results[m]["indicator"]["parts"]  # noqa: E731
    out = {
        "models": names,
        "spearman_score_vs_mean_robust_accuracy": spearman([results[m]["indicator"]["score"] for m in names], mean_ra),
        "spearman_per_threat": {k: spearman([parts(m)[f"score[{k}]"] for m in names], ra[k]) for k in keys},
    }
    seeds = list(results[names[0]]["indicator_other_seeds"])
    if seeds:  # the indicator's own randomness (Lanczos start, curvature directions, probes)
        other = lambda m, s, key: results[m]["indicator_other_seeds"][s][key]  # noqa: E731
        out["other_indicator_seeds"] = {
            s: {
                "spearman_score_vs_mean_robust_accuracy": spearman([other(m, s, "score") for m in names], mean_ra),
                "spearman_per_threat": {k: spearman([other(m, s, f"score[{k}]") for m in names], ra[k]) for k in keys},
            }
            for s in seeds
        }
    # Alternatives (not the score): how other summaries would have ranked the zoo.
    alt = {}
    for k in keys:
        for part, sign in (("mean_clipped_safety", 1), ("predicted_robust_accuracy", 1), ("median_predicted_drop", -1)):
            vals = [parts(m).get(f"{part}[{k}]", float("nan")) for m in names]
            alt[f"{part}[{k}]"] = spearman([sign * v for v in vals], ra[k])
        hessian_only = [_hessian_at_x_score(results[m]["samples"], k, threats) for m in names]
        alt[f"median rho with L = Hessian at x only (curvature only for piecewise-linear nets)[{k}]"] = spearman(
            hessian_only, ra[k]
        )
    threat_free = (("median_jacobian_l1", -1), ("median_jacobian_l2", -1), ("mean_jacobian_zero_ratio", 1), ("median_margin", 1))
    for part, sign in threat_free:
        alt[f"{part} vs mean RA"] = spearman([sign * parts(m).get(part, float("nan")) for m in names], mean_ra)
    for k in keys:  # the cheapest attack baseline, for comparison
        quick = [results[m]["quick_battery"][k]["robust_accuracy"] for m in names]
        alt[f"quick battery robust accuracy[{k}]"] = spearman(quick, ra[k])
    out["spearman_alternatives"] = alt
    out["cost_per_sample"] = {m: cost(results[m]) for m in results}
    out["indicator_never_costs_more_than_the_battery"] = all(
        c["indicator_seconds"] <= c["standard_battery_seconds"]
        and c["indicator_pass_equivalents"] <= c["standard_battery_passes"]
        for c in out["cost_per_sample"].values()
    )
    return out


def cost(r: dict) -> dict:
    """Per-sample cost of the indicator and the batteries (all threats together).

    Passes: forward + backward; an HVP counts as 2 x its measured time relative to one
    forward+backward on this model (``hvp_cost_in_gradients``).
    """
    ind = r["indicator"]
    hvp_passes = 2 * r["hvp_cost_in_gradients"]
    total = lambda runs, key: sum(a[key] for a in runs.values())  # noqa: E731
    return {
        "indicator_forwards": ind["forwards_per_sample"],
        "indicator_backwards": ind["backwards_per_sample"],
        "indicator_hvps": ind["hvp_per_sample"],
        "hvp_in_passes": hvp_passes,
        "indicator_pass_equivalents": (
            ind["forwards_per_sample"] + ind["backwards_per_sample"] + ind["hvp_per_sample"] * hvp_passes
        ),
        "indicator_seconds": r["indicator_seconds_per_sample"],
        "standard_battery_passes": total(r["attacks"], "forwards_per_sample") + total(r["attacks"], "backwards_per_sample"),
        "standard_battery_seconds": total(r["attacks"], "seconds_per_sample"),
        "quick_battery_passes": (
            total(r["quick_battery"], "forwards_per_sample") + total(r["quick_battery"], "backwards_per_sample")
        ),
        "quick_battery_seconds": total(r["quick_battery"], "seconds_per_sample"),
    }


def _hessian_at_x_score(samples: list[dict], key: str, threats: list[Threat]) -> float:
    """The score with the bound as first specified: L = the Hessian at x (curvature only where piecewise linear)."""
    threat = next(t for t in threats if t.canonical == key)
    rho = []
    for s in samples:
        dual = {"linf": s["jacobian_l1"], "l2": s["jacobian_l2"], "l1": s["jacobian_linf"]}[threat.norm]
        curv = s["curvature_by_threat"][key] if s["piecewise_linear"] else s["hessian_max_abs"]
        drop = threat.eps * dual + 0.5 * curv * l2_radius(threat, 64) ** 2
        rho.append(safety(s["g"], max(drop, s["observed_drop"][key])))
    return float(np.median(rho))


def table(results: dict, threats: list[Threat]) -> str:
    keys = [t.canonical for t in threats]
    head = ["model", "training", "clean"] + [f"RA {k}" for k in keys] + [f"score {k}" for k in keys]
    head += ["score", "masking?", "indicator ms/sample (passes)", "standard ms/sample (passes)", "quick ms/sample (passes)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        ind, c = r["indicator"], cost(r)
        p = ind["parts"]
        row = [name, r["training"], f"{p['clean_accuracy']:.3f}"]
        row += [f"{r['attacks'][k]['robust_accuracy']:.3f}" for k in keys]
        row += [f"{p[f'score[{k}]']:.3f}" for k in keys]
        row += [
            f"{ind['score']:.3f}", "yes" if ind["masking_suspected"] else "no",
            f"{1e3 * c['indicator_seconds']:.2f} ({c['indicator_pass_equivalents']:.0f})",
            f"{1e3 * c['standard_battery_seconds']:.1f} ({c['standard_battery_passes']:.0f})",
            f"{1e3 * c['quick_battery_seconds']:.2f} ({c['quick_battery_passes']:.0f})",
        ]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=360, help="stratified test samples (default: all 360)")
    parser.add_argument("--threats", nargs="+", default=DEFAULT_THREATS)
    parser.add_argument("--set", choices=sorted(SETS), default="main", help="main zoo (+ control) or the held-out zoo")
    parser.add_argument("--only", nargs="+", choices=sorted([*RECIPES, *HELDOUT, CONTROL]))
    parser.add_argument("--budget", default="default", help="indicator budget (fast, default, thorough)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="indicator seeds; the first fills the table")
    parser.add_argument("--zoo", type=Path, default=DEFAULT_ZOO)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true", help="retrain even when cached")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threats = [parse_threat(t) for t in args.threats]
    data = _zoo_module().load_split()
    x_test, y_test = data[2], data[3]
    idx = stratified_indices(y_test.numpy(), min(args.n, len(y_test)), seed=0)
    x, y = x_test[idx], y_test[idx]

    results: dict[str, dict] = {}
    started = time.perf_counter()
    warm, _ = load(next(iter(RECIPES)), args.zoo, data, args.force)
    measure_indicator(warm, x[:4], y[:4], threats)  # one-time torch start-up cost out of the first timing
    default = [*RECIPES, CONTROL] if args.set == "main" else list(HELDOUT)
    for name in args.only or default:
        base = "cnn" if name == CONTROL else name
        model, meta = load(base, args.zoo, data, args.force)
        if name == CONTROL:
            model = Quantized(model).eval()
            training = f"natural cnn behind input quantization round({QUANT_LEVELS}x)/{QUANT_LEVELS}"
        else:
            training = {**RECIPES, **HELDOUT}[name].describe()
        r = evaluate(name, model, x, y, threats, args.budget, args.seeds)
        r["training"] = training
        r["train_seconds"] = meta["train_seconds"]
        results[name] = r

    summary = summarize(results, threats) if len([k for k in results if k != CONTROL]) >= 3 else {}
    text = table(results, threats)
    print(text)
    for key, value in summary.items():
        if key not in ("models", "cost_per_sample"):
            print(f"{key}: {json.dumps(value, indent=None)}")
    report = {
        "benchmark": "indicator_zoo",
        "set": args.set,
        "command": "python " + " ".join(["benchmarks/indicator_zoo.py", *sys.argv[1:]]),
        "n": len(x),
        "threats": [t.canonical for t in threats],
        "budget": args.budget,
        "indicator_seeds": args.seeds,
        "battery": "standard preset through run_threat (APGD-CE x2, APGD-T x9, Square 5000; FMN stage not run)",
        "environment": {
            "torch": torch.__version__, "threads": args.threads, "machine": platform.machine(),
            "python": platform.python_version(),
        },  # fmt: skip
        "seconds_total": round(time.perf_counter() - started, 1),
        "summary": summary,
        "table_markdown": text,
        "models": {k: {kk: vv for kk, vv in v.items() if kk != "samples"} for k, v in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, allow_nan=False, default=str) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
