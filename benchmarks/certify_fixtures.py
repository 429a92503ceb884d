"""How tight are robaudit's certified L2 radii on third-party models? Radius / smallest adversarial distance.

The digits zoo of ``certify_zoo.py`` is small and trained by us; this runs the same
comparison on the VNN-COMP ONNX models in ``../shared/fixtures`` (see its README.md),
loaded exactly as a user's file is (``load_model`` + ``wrap_model`` with the model's
``--mean/--std`` from the fixtures' manifest.json):

    mnistfc_256x2              MNIST MLP 2x256 ReLU, input [1, 784, 1]
    eran_mnist_relu_9_200      MNIST MLP 9x200 ReLU
    oval21_cifar_base_kw       CIFAR-10 2 conv + 2 FC, Wong & Kolter robust training
    cifar10_resnet_2b          CIFAR-10 ResNet (2 blocks), PGD adversarial training
    verivital_convnet_maxpool  MNIST conv + ReLU + max pool + FC
    verivital_convnet_avgpool  MNIST conv + ReLU + pad + average pool + FC
    colt_mnist_0.1             MNIST 2 conv + 2 FC, COLT provable training (Linf 0.1)

On the first ``--n`` images of the model's data file each certified radius
(``certify_l2``, ``--budget``) is compared with the smallest adversarial L2 distance that
FMN (``--fmn-steps``) and DeepFool find (``certify_zoo.attack_distance``: per-sample
minimum, run without a box and in the [0, 1] box). For a model with verification-tool
counterexamples (``vnncomp/<model>_counterexamples.npz``: mnistfc_256x2) the images of
those instances are certified too and every radius is compared with every counterexample's
L2 distance (and the attacks'). A violation (radius above a known adversarial distance)
would be a bug in the certificate. Ratios are over correctly classified samples (a radius
of 0 there counts as ratio 0); the true minimal distance is at most the one found, so
the true ratio is at least the one reported.

Usage (from the repository root; one CPU thread; about 12 minutes for all seven with --n 20):
    python benchmarks/certify_fixtures.py                    # writes benchmarks/results/certify_fixtures.json
    python benchmarks/certify_fixtures.py --only mnistfc_256x2 colt_mnist_0.1 --n 5 --budget fast

Before / after a change to robaudit.certify (``--robaudit PATH`` imports robaudit, attacks
included, from another checkout's root; the benchmark code stays this one):
    git worktree add /tmp/robaudit_before <commit>
    python benchmarks/certify_fixtures.py --robaudit /tmp/robaudit_before \\
        --out benchmarks/results/certify_fixtures_before.json
    python benchmarks/certify_fixtures.py --out benchmarks/results/certify_fixtures_after.json
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
# certify_zoo imports robaudit only inside its functions, so --robaudit can still choose the checkout.
from certify_zoo import attack_distance, methods_text, use_robaudit  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "certify_fixtures.json"
FIXTURES = ROOT.parent / "shared" / "fixtures"
MODELS = [
    "mnistfc_256x2", "eran_mnist_relu_9_200", "oval21_cifar_base_kw", "cifar10_resnet_2b",
    "verivital_convnet_maxpool", "verivital_convnet_avgpool", "colt_mnist_0.1",
]  # fmt: skip
DATA = {"MNIST": "mnist_test_first100.npz", "CIFAR-10": "cifar10_test_first100.npz"}


def load_fixture(root: Path, entry: dict, probe: torch.Tensor) -> torch.nn.Module:
    """The model as `robaudit scan` sees it: the ONNX file wrapped with its --mean/--std."""
    from robaudit.models import load_model, wrap_model

    mean = None if entry["mean"] == [0.0] else entry["mean"]
    std = None if entry["std"] == [1.0] else entry["std"]
    model, _ = wrap_model(
        load_model(root / entry["file"]), sample_shape=tuple(probe.shape[1:]), probe=probe, mean=mean, std=std
    )
    return model


def _median(values: torch.Tensor) -> float | None:
    """Median rounded for the table; None (JSON null) for an empty set instead of NaN."""
    return round(values.median().item(), 4) if len(values) else None


def _mean(values: torch.Tensor) -> float | None:
    return round(values.mean().item(), 4) if len(values) else None


def compare(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    budget: str,
    fmn_steps: int,
    known: torch.Tensor | None = None,
) -> tuple[dict, dict]:
    """Certify and attack one set; `known`: further adversarial distances per sample (counterexamples).

    Returns the summary row and the per-sample figures (for before/after diffs).
    """
    from robaudit.certify import CertificateUnavailable, certify_l2

    with torch.no_grad():
        correct = model(x).argmax(1) == y
    start = time.perf_counter()
    boxed = attack_distance(model, x, y, (0.0, 1.0), fmn_steps)
    free = torch.minimum(attack_distance(model, x, y, (-math.inf, math.inf), fmn_steps), boxed)
    attack_seconds = time.perf_counter() - start
    best = free if known is None else torch.minimum(free, known)
    row: dict = {
        "samples": len(x),
        "correct": int(correct.sum()),
        "attack_seconds_per_sample": round(attack_seconds / len(x), 3),
    }
    samples = {
        "label": y.tolist(),
        "correct": correct.tolist(),
        "attack_l2": [round(v, 6) for v in free.tolist()],
        "attack_l2_box01": [round(v, 6) for v in boxed.tolist()],
    }
    if known is not None:
        samples["counterexample_l2"] = [round(v, 6) for v in known.tolist()]
    try:
        cert = certify_l2(model, x, y, budget=budget)
    except CertificateUnavailable as exc:
        row.update({"certified": 0, "unavailable": str(exc), "violations": 0, "methods": {}})
        return row, samples
    radius = cert.radius.double()
    ok = correct & torch.isfinite(best)
    ok_box = correct & torch.isfinite(boxed)
    ratio = radius[ok] / best[ok]
    row.update({
        "certified": int((radius > 0).sum()),
        "median_ratio": _median(ratio),
        "mean_ratio": _mean(ratio),
        "median_ratio_box01": _median(radius[ok_box] / boxed[ok_box]),
        "median_radius": _median(radius[correct]),
        "median_adversarial_distance": _median(best[ok]),
        "violations": int((radius > free).sum()),  # against the attacks; counterexamples: see run_model
        "seconds_per_sample": round(cert.seconds / len(x), 4),
        "methods": dict(Counter(cert.method)),
    })  # fmt: skip
    samples.update({"radius": [round(v, 8) for v in radius.tolist()], "method": list(cert.method)})
    return row, samples


def counterexample_set(root: Path, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict] | None:
    """Images of the vnncomp instances with tool counterexamples, and per image the smallest counterexample distance."""
    path = root / "vnncomp" / f"{name}_counterexamples.npz"
    if not path.exists():
        return None
    instances, found = np.load(root / "vnncomp" / f"{name}.npz"), np.load(path)
    index = found["index"]
    dist = np.linalg.norm((found["x"].astype(np.float64) - instances["x"][index]).reshape(len(index), -1), axis=1)
    pick = np.unique(index)
    smallest = np.array([dist[index == i].min() for i in pick])
    info = {
        "instances": pick.tolist(),
        "eps_linf": [round(float(e), 6) for e in instances["eps"][pick]],
        "counterexamples": [int((index == i).sum()) for i in pick],
        "_index": index,
        "_dist": dist,
        "_cex": torch.from_numpy(found["x"]).float(),
        "_labels": torch.from_numpy(instances["y"][index]).long(),
    }
    x, y = torch.from_numpy(instances["x"][pick]).float(), torch.from_numpy(instances["y"][pick]).long()
    return x, y, torch.from_numpy(smallest), info


def run_model(root: Path, name: str, entry: dict, n: int, budget: str, fmn_steps: int) -> list[tuple[dict, dict]]:
    """The first-n row of one model, plus its counterexample row where the fixtures have counterexamples."""
    archive = np.load(root / "data" / DATA[entry["dataset"]])
    x, y = torch.from_numpy(archive["x"][:n]).float(), torch.from_numpy(archive["y"][:n]).long()
    model = load_fixture(root, entry, x)
    row, samples = compare(model, x, y, budget, fmn_steps)
    out = [({"model": name, "set": f"first {n}", **row}, samples)]
    extra = counterexample_set(root, name)
    if extra is not None:
        xv, yv, smallest, info = extra
        row, samples = compare(model, xv, yv, budget, fmn_steps, known=smallest)
        index, dist, cex, labels = (info.pop(key) for key in ("_index", "_dist", "_cex", "_labels"))
        with torch.no_grad():  # the tools checked them with onnxruntime; recheck through robaudit's wrapper
            wrong = model(cex).argmax(1) != labels
        if "radius" in samples:
            radius = dict(zip(info["instances"], samples["radius"]))
            beaten = [i for i, d in zip(index.tolist(), dist.tolist()) if radius[i] > d]
            row["counterexample_violations"] = len(beaten)
            ratio = torch.tensor(samples["radius"]) / smallest  # against the tools' counterexamples alone
            row["median_ratio_counterexamples"] = _median(ratio[torch.tensor(samples["correct"])])
        row["counterexamples"] = len(index)
        row["counterexamples_misclassified"] = int(wrong.sum())
        out.append(({"model": name, "set": f"vnncomp counterexamples ({len(xv)} images)", **row}, {**info, **samples}))
    return out


def table_row(row: dict) -> str:
    """One Markdown line; a model without a certificate shows why instead of figures."""
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    if "unavailable" in row:
        cells = [row["model"], row["set"], f"{row['correct']}/{row['samples']}", f"0/{row['samples']}"]
        cells += [row["unavailable"]] + ["-"] * 7
    else:
        cells = [
            row["model"], row["set"], f"{row['correct']}/{row['samples']}", f"{row['certified']}/{row['samples']}",
            fmt(row["median_ratio"], ".3f"), fmt(row["mean_ratio"], ".3f"), fmt(row["median_ratio_box01"], ".3f"),
            fmt(row["median_radius"], ".4f"), fmt(row["median_adversarial_distance"], ".4f"),
            str(row["violations"] + row.get("counterexample_violations", 0)), fmt(row["seconds_per_sample"], ".3f"),
            methods_text(row["methods"]),
        ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=MODELS, help="models to run (default: all seven)")
    parser.add_argument("--n", type=int, default=20, help="first images of the model's data file (default 20 of 100)")
    parser.add_argument("--budget", default="default", help="certify_l2 budget (default: default)")
    parser.add_argument("--fmn-steps", type=int, default=1000)
    parser.add_argument("--fixtures", type=Path, default=FIXTURES, help="fixtures folder (default ../shared/fixtures)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--robaudit", type=Path, metavar="PATH", help="root of another robaudit checkout (default: this one)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not (args.fixtures / "manifest.json").exists():
        sys.exit(f"no fixtures at {args.fixtures} (expected manifest.json there; see --fixtures)")
    source = use_robaudit(args.robaudit)
    manifest = json.loads((args.fixtures / "manifest.json").read_text())["models"]
    rows: list[dict] = []
    per_sample: dict[str, dict] = {}
    result = {
        "description": "certified L2 radius (robaudit.certify.certify_l2) / smallest adversarial L2 distance (min over "
        "FMN and DeepFool, without a box and in the [0, 1] box; for the vnncomp rows also the verification tools' "
        "counterexamples) on VNN-COMP fixture models; ratios over correctly classified samples; "
        "median_ratio_box01 uses only the box-confined attacks; violations: radius > a known adversarial distance",
        "command": "python benchmarks/certify_fixtures.py " + " ".join(sys.argv[1:]),
        "robaudit": source,
        "config": {
            "n": args.n, "budget": args.budget, "fmn_steps": args.fmn_steps,
            "deepfool": {"steps": 100, "n_candidates": 10}, "threads": torch.get_num_threads(),
            "fixtures": str(args.fixtures.resolve()),
        },  # fmt: skip
        "torch": torch.__version__,
        "machine": platform.machine(),
        "rows": rows,
        "samples": per_sample,
    }
    header = (
        "| model | set | correct | certified | median ratio | mean ratio | ratio ([0,1] box) | median radius "
        "| median adv. dist. | violations | s / sample | methods |"
    )
    print(f"robaudit: {source['path']} ({source['commit']}, {source['uncommitted_robaudit_files']} uncommitted files)")
    print(header)
    print("|" + "---|" * (header.count("|") - 1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.only or MODELS:
        for row, samples in run_model(args.fixtures, name, manifest[name], args.n, args.budget, args.fmn_steps):
            rows.append(row)
            per_sample[f"{row['model']} / {row['set']}"] = samples
            print(table_row(row), flush=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every model: long runs keep partial results
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if any(row["violations"] or row.get("counterexample_violations") for row in rows):
        print("VIOLATION: a certified radius exceeds a known adversarial distance (a certificate bug)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
