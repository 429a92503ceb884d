"""Certificates on classifiers whose file ends in a softmax or log-softmax, in every format.

Trains a digits CNN and saves it four ways: as plain scores, and closed by a softmax, a
log-softmax and a saturated softmax (softmax(20 z)). Each is written as ONNX (opsets 11,
13 and 17: onnx2torch turns opset < 13 Softmax into its own module) and as traced and
scripted TorchScript, and loaded the way `robaudit scan` loads it. On the first ``--n``
test digits it compares the `default` certificate of every file with the certificate of
the plain scores (the closing op is left out of the bound, so the radii should be those
of the scores less at most the float32 tie margin over the slope) and with the smallest
adversarial L2 distance that FMN and DeepFool find (in [0, 1]), on the file's own model
and on the plain scores (the same decisions; a saturated softmax hides its gradients from
the attacks). A radius above a found distance would be a bug.

Usage (from the repository root, about 8 minutes on one CPU thread):
    python benchmarks/certify_softmax.py          # writes benchmarks/results/certify_softmax.json
"""

from __future__ import annotations

import argparse
import json
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
from robaudit.certify import certify_l2  # noqa: E402
from robaudit.models import load_model, wrap_model  # noqa: E402
from zoo import load_split  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "certify_softmax.json"


class Closed(nn.Module):
    """The trained scores, closed by `kind`: none, softmax, log_softmax or a softmax of 20x the scores."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        if self.kind == "softmax":
            return F.softmax(z, dim=1)
        if self.kind == "log_softmax":
            return F.log_softmax(z, dim=-1)
        if self.kind == "softmax_20x":
            return torch.softmax(20 * z, 1)
        return z


def train(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 10)
    )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval().requires_grad_(False)


def save(module: nn.Module, folder: Path, name: str, fmt: str) -> Path:
    example = torch.zeros(2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt.startswith("onnx"):
            path = folder / f"{name}_{fmt}.onnx"
            torch.onnx.export(
                module, (example,), str(path), input_names=["x"], output_names=["out"], dynamo=False,
                dynamic_axes={"x": {0: "b"}, "out": {0: "b"}}, opset_version=int(fmt.split("-")[1]),
            )  # fmt: skip
        else:
            path = folder / f"{name}_{fmt}.pt"
            traced = torch.jit.trace(module, example) if fmt == "trace" else torch.jit.script(module)
            traced.save(str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40, help="test digits (default 40)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_split()
    x, y = x_test[: args.n], y_test[: args.n]
    net = train(x_train, y_train)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        reference = scores_distance = None
        for kind in ("none", "softmax", "log_softmax", "softmax_20x"):
            module = Closed(net, kind).eval()
            for fmt in ("onnx-11", "onnx-13", "onnx-17", "trace", "script"):
                model = wrap_model(load_model(save(module, folder, kind, fmt)), sample_shape=(1, 8, 8), probe=x[:8])[0]
                right = model(x).argmax(1) == y
                start = time.perf_counter()
                cert = certify_l2(model, x, y)
                seconds = time.perf_counter() - start
                own = attack_distance(model, x, y, (0.0, 1.0), fmn_steps=500)
                if reference is None:
                    reference, scores_distance = cert.radius, own
                distance = torch.minimum(own, scores_distance)
                sure = right & (cert.radius > 0)
                ratio = (cert.radius[sure] / reference[sure]).tolist() if bool(sure.any()) else []
                row = {
                    "closing": kind, "format": fmt, "output_kind": model.output_kind, "correct": int(right.sum()),
                    "certified": int(sure.sum()),
                    "median_radius_vs_scores": float(torch.tensor(ratio).median()) if ratio else None,
                    "min_radius_vs_scores": min(ratio) if ratio else None,
                    "max_radius_vs_scores": max(ratio) if ratio else None,
                    "median_ratio_to_attack": float((cert.radius[sure] / distance[sure]).median()) if ratio else None,
                    "own_attack_found": int(torch.isfinite(own[right]).sum()),
                    "violations": int((cert.radius[right] >= distance[right]).sum()),
                    "seconds_per_sample": round(seconds / len(x), 4),
                    "softmax_note": next((note for note in cert.notes if "ends in a" in note), None),
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = {
        "description": "closing softmax / log-softmax: certified radii vs the plain scores' radii and vs FMN+DeepFool",
        "command": "python benchmarks/certify_softmax.py" + (f" --n {args.n}" if args.n != 40 else ""),
        "torch": torch.__version__, "n": args.n, "rows": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
