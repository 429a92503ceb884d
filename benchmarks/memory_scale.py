"""Peak memory and wall time of a scan as --n grows, on ImageNet-size (3x224x224) images.

Question: does memory stay flat as the number of audited samples grows? The data layer
reads image folders lazily (headers at load time, pixels decoded per chunk) and the
scan audits fixed chunks, so 10k images should never sit in memory at once.

The script writes (once, cached in --workdir) a folder of smooth random JPEGs in 10
class folders and a tiny TorchScript model (AvgPool2d(28), Flatten, Linear(192, 10));
each image is filed under the class the model predicts for it, so every sample is
correctly classified and goes through the attacks. Then, each in a fresh process:

- the real CLI, `python -m robaudit scan model.pt --data FOLDER --n N` with the
  cheapest settings (a one-attack FGSM battery, no checks, certificates or
  indicator), for every N;
- the data layer alone: `load_data` plus `take` over all samples in chunks of 256;
- for contrast, the data layer materializing every pixel at once (`Dataset.x`, which
  is what `load_data` returned before it read lazily), for the smaller N.

Peak RSS is the measured process's ru_maxrss, read by a small wrapper process.

    OMP_NUM_THREADS=1 python benchmarks/memory_scale.py            # 1k, 5k, 10k
    OMP_NUM_THREADS=1 python benchmarks/memory_scale.py --sizes 500,1000 --out /tmp/m.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CLASSES = 10
SIDE = 224
# The cheapest scan that still runs the whole pipeline: one FGSM step per sample.
BATTERY = '[[attacks]]\nattack = "fgsm"\n'
SCAN_FLAGS = [
    "--threat", "linf:1/255", "--no-checks", "--no-certify", "--no-indicator",
    "--seed", "0", "-q",
]
# Runs the command and reports its peak RSS. A small process of its own, because a
# forked child's ru_maxrss starts from its parent's RSS (kept across exec): measured
# from this script (torch imported) every run would read at least ~1 GB.
WRAPPER = """
import json, os, subprocess, sys, resource
proc = subprocess.run(sys.argv[2:])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
open(sys.argv[1], "w").write(json.dumps({"rc": proc.returncode, "peak_kb": peak}))
"""
DATA_CHUNK = 256


# ----------------------------------------------------------------- fixtures


def tiny_net() -> torch.nn.Module:
    """A model whose cost is negligible next to the data: pool 224 -> 8, then linear."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.AvgPool2d(28), torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, CLASSES)
    ).eval()


def write_model(path: Path) -> torch.nn.Module:
    net = tiny_net()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        traced = torch.jit.trace(net, torch.zeros(1, 3, SIDE, SIDE))
        traced.save(str(path))
    return net


def smooth_image(rng: np.random.Generator) -> np.ndarray:
    """A 224x224 RGB pattern: a random 6x6 grid upsampled bicubically (JPEG-friendly)."""
    from PIL import Image

    grid = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(grid).resize((SIDE, SIDE), Image.BICUBIC))


def jpeg_bytes(array: np.ndarray) -> tuple[bytes, np.ndarray]:
    """The JPEG encoding of `array` and the pixels it decodes back to."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as img:
        return data, np.asarray(img.convert("RGB"))


def write_folder(root: Path, count: int, net: torch.nn.Module) -> None:
    """`count` JPEGs, each in the folder of the class `net` predicts for it (cached)."""
    marker = root / f".complete-{count}"
    if marker.is_file():
        return
    for cls in range(CLASSES):
        (root / str(cls)).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for start in range(0, count, 500):
        encoded = [jpeg_bytes(smooth_image(rng)) for _ in range(min(500, count - start))]
        pixels = torch.from_numpy(np.stack([p for _, p in encoded])).permute(0, 3, 1, 2)
        with torch.no_grad():
            labels = net(pixels.float() / 255).argmax(1).tolist()
        for offset, ((data, _), label) in enumerate(zip(encoded, labels, strict=True)):
            (root / str(label) / f"{start + offset:05d}.jpg").write_bytes(data)
    marker.write_text("done\n")


# ----------------------------------------------------------------- measuring


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run `cmd` to completion; its wall time and peak RSS (ru_maxrss via WRAPPER)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    figures = log.with_suffix(".rss.json")
    start = time.perf_counter()
    with open(log, "wb") as out:
        subprocess.run([sys.executable, "-c", WRAPPER, str(figures), *cmd],
                       stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env, check=True)
    wall = time.perf_counter() - start
    measured = json.loads(figures.read_text())
    return {"rc": measured["rc"], "wall_s": round(wall, 1),
            "peak_rss_mb": round(measured["peak_kb"] / 1024, 1)}


def scan_run(model: Path, folder: Path, n: int, workdir: Path) -> dict:
    report, battery = workdir / f"scan_{n}.json", workdir / "fgsm.toml"
    battery.write_text(BATTERY)
    cmd = [sys.executable, "-m", "robaudit", "scan", str(model), "--data", str(folder),
           "--n", str(n), "--config", str(battery), *SCAN_FLAGS, "--json", str(report)]
    result = run_measured(cmd, workdir / f"scan_{n}.log")
    if result["rc"] == 0:
        summary = json.loads(report.read_text())
        result["report_n"] = summary["data"]["n"]
        result["clean_accuracy"] = summary.get("summary", {}).get("clean_accuracy")
        timing = summary.get("timing", {})
        result["chunks"], result["report_total_s"] = timing.get("chunks"), timing.get("total_s")
    result["command"] = " ".join(["python", *(_shown(c) for c in cmd[1:])])
    return result


def _shown(arg: str) -> str:
    """A command argument as the docs show it: paths inside the repository relative."""
    prefix = f"{REPO}{os.sep}"
    return arg[len(prefix):] if arg.startswith(prefix) else arg


def data_layer_run(folder: Path, n: int, eager: bool, workdir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(folder), "--n", str(n)]
    if eager:
        cmd.append("--eager")
    tag = "eager" if eager else "chunked"
    log = workdir / f"data_{tag}_{n}.log"
    result = run_measured(cmd, log)
    if result["rc"] == 0:
        result.update(json.loads(log.read_text().strip().splitlines()[-1]))
    return result


def child(folder: Path, n: int, eager: bool) -> None:
    """Data layer alone, in this (fresh) process; prints one JSON line."""
    from robaudit.data import load_data

    baseline = _vm("VmRSS")
    start = time.perf_counter()
    data = load_data(str(folder), n=n, seed=0)
    loaded = time.perf_counter() - start
    after_load = _vm("VmHWM")
    total = 0.0
    if eager:
        total = float(data.x.sum())
    else:
        for begin in range(0, len(data), DATA_CHUNK):
            total += float(data.take(begin, begin + DATA_CHUNK).sum())
    print(json.dumps({
        "n": len(data), "rss_after_imports_mb": baseline, "peak_after_load_mb": after_load,
        "load_s": round(loaded, 1), "read_s": round(time.perf_counter() - start - loaded, 1),
        "checksum": round(total, 1), "own_vmhwm_mb": _vm("VmHWM"),
    }))


def _vm(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no {field} in /proc/self/status")


# ----------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,10000")
    parser.add_argument("--eager-sizes", default="1000,5000",
                        help="sizes at which to also materialize all pixels (memory-hungry)")
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / ".zoo" / "memory_scale")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memory_scale.json")
    parser.add_argument("--skip-scan", action="store_true", help="measure the data layer only")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.n, args.eager)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    eager_sizes = [int(s) for s in args.eager_sizes.split(",") if s]
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, folder = args.workdir / "tiny_pool_linear.pt", args.workdir / f"images_{max(sizes)}"
    net = write_model(model)
    t0 = time.perf_counter()
    write_folder(folder, max(sizes), net)
    print(f"folder ready ({time.perf_counter() - t0:.0f} s): {folder}", file=sys.stderr)
    results = {"setup": setup(folder, model, max(sizes)), "data_layer": [], "scan": []}
    for n in sizes:
        for eager in (False, True) if n in eager_sizes else (False,):
            row = {"mode": "eager" if eager else "chunked", **data_layer_run(folder, n, eager, args.workdir)}
            print(json.dumps(row), file=sys.stderr)
            results["data_layer"].append(row)
    if not args.skip_scan:
        for n in sizes:
            row = {"n": n, **scan_run(model, folder, n, args.workdir)}
            print(json.dumps(row), file=sys.stderr)
            results["scan"].append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


def setup(folder: Path, model: Path, count: int) -> dict:
    """What the figures depend on, recorded next to them."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    # Other work in progress in the same checkout runs too: record what differed.
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                             capture_output=True, text=True).stdout.split("\n")
    return {
        "robaudit_commit": commit,
        "uncommitted_changes": sorted(line[3:] for line in changed if line.strip()), "torch": torch.__version__, "python": platform.python_version(),
        "cpus": os.cpu_count(), "threads": 1, "images": count, "image_shape": [3, SIDE, SIDE],
        "image_format": "JPEG q90, smooth random patterns, filed by the model's prediction",
        "folder_mb": round(sum(f.stat().st_size for f in folder.rglob("*.jpg")) / 2**20, 1),
        "model": "TorchScript AvgPool2d(28) -> Flatten -> Linear(192, 10) (" + model.name + ")",
        "scan_flags": " ".join(SCAN_FLAGS), "scan_battery": BATTERY.strip().replace("\n", "; "),
        "data_chunk": DATA_CHUNK,
    }


if __name__ == "__main__":
    main()
