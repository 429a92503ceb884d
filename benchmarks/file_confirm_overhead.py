"""What checking an ONNX scan against the file itself costs.

For an ONNX file, robaudit attacks and certifies onnx2torch's translation. It confirms
each verdict it prints (a clean sample classified correctly, an adversarial example
misclassified, a certificate probe keeping its class) by running the untouched file in
onnxruntime (`robaudit.attacks.runner.confirm_in_file`), and compares file and
translation at points inside every certified ball
(`robaudit.stages.certify.file_mismatch_in_balls`); when it loads the file, it checks
the translation node by node (`robaudit.models.onnx_nodes.check_nodes`). This runs one
real scan per model, as `robaudit scan` does, times every call of the three inside it,
and reports each as a fraction of the whole scan (all figures from the same run), with
the number of rows the file was asked about and how many verdicts it overturned.

Usage (from the repository root; one CPU thread; about 10 minutes):
    python benchmarks/file_confirm_overhead.py                  # writes benchmarks/results/file_confirm_overhead.json
    python benchmarks/file_confirm_overhead.py --only demo --n 50
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import robaudit.attacks.runner as runner
import robaudit.models.onnx_nodes as onnx_nodes
import robaudit.stages.certify as certify_stage
from robaudit.api import audit
from robaudit.demo import demo_path
from robaudit.models import AuditModel

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
CASES = {
    # name: model, data, threats, extra settings
    "demo": (demo_path("digits_cnn.onnx"), "digits", ["linf:0.1", "l2:0.5"], {"certify": True}),
    "mnistfc_256x2": (FIXTURES / "models/mnistfc_256x2.onnx", FIXTURES / "data/mnist_test_first100.npz",
                      ["linf:0.02", "l2:0.5"], {"certify": True}),
    "cifar10_resnet_2b": (FIXTURES / "models/cifar10_resnet_2b.onnx", FIXTURES / "data/cifar10_test_first100.npz",
                          ["linf:2/255"], {"certify": False}),
}  # fmt: skip


def _manifest_stats(name: str) -> dict:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    entry = manifest["models"].get(name)
    if entry is None:
        return {}
    return {"mean": entry["mean"], "std": entry["std"]}


def measure(name: str, n: int) -> dict:
    model, data, threats, extra = CASES[name]
    spent = {"seconds": 0.0, "rows": 0, "overturned": 0}
    original = runner.confirm_in_file

    def timed(model_, x, y, pred, claim):
        start = time.perf_counter()
        out = original(model_, x, y, pred, claim)
        spent["seconds"] += time.perf_counter() - start
        rows = (pred != y.cpu()) if claim == "misclassified" else (pred == y.cpu())
        spent["rows"] += int(rows.sum()) if isinstance(model_, AuditModel) and model_.file_twin is not None else 0
        spent["overturned"] += int((out != pred).sum())
        return out

    def stopwatch(fn, key: str):
        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - start
            return out

        return timed_call

    original_balls, original_nodes = certify_stage.file_mismatch_in_balls, onnx_nodes.check_nodes
    runner.confirm_in_file = timed
    certify_stage.file_mismatch_in_balls = stopwatch(original_balls, "balls_s")
    onnx_nodes.check_nodes = stopwatch(original_nodes, "nodes_s")
    try:
        start = time.perf_counter()
        report = audit(model, data, threats=threats, n=n, **_manifest_stats(name), **extra)
        total = time.perf_counter() - start
    finally:
        runner.confirm_in_file, certify_stage.file_mismatch_in_balls = original, original_balls
        onnx_nodes.check_nodes = original_nodes
    return {
        "model": name,
        "n": n,
        "threats": threats,
        "scan_s": round(total, 2),
        "confirm_s": round(spent["seconds"], 3),
        "fraction": round(spent["seconds"] / total, 4),
        "rows_asked": spent["rows"],
        "nodes_s": round(spent.get("nodes_s", 0.0), 3),
        "nodes_fraction": round(spent.get("nodes_s", 0.0) / total, 4),
        "balls_s": round(spent.get("balls_s", 0.0), 3),
        "balls_fraction": round(spent.get("balls_s", 0.0) / total, 4),
        "certificate": report.summary.certificate.reason if report.summary.certificate else None,
        "overturned": spent["overturned"],
        "confirmed_note": any("confirmed in onnxruntime" in note for note in report.model.notes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/file_confirm_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.only:
        row = measure(name, args.n)
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
