"""Attack throughput on a GPU: robaudit's APGD against bare forward+backward passes.

The reference is the most a gradient attack could do: one forward and one backward to
the input per sample and iteration, nothing else. robaudit's figure is APGD-CE run
through the runner exactly as a scan runs it (chunks of the batch size, which backs
off on CUDA out-of-memory; pass counting; projection; re-verification of every
candidate), with its passes counted by the runner. A tiny eps keeps every point
robust, so every iteration runs on the full batch. The ratio is robaudit's
forward+backward passes per second over the bare ones: 1.0 means no overhead.

    python benchmarks/gpu_throughput.py                          # CUDA, resnet18 at 3x224x224; skips without CUDA
    python benchmarks/gpu_throughput.py --model cifar-resnet --batch 1024
    python benchmarks/gpu_throughput.py --device cpu --model tiny --batch 64 --steps 5   # the CPU check
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the robaudit/ of this checkout

from robaudit.attacks import AttackRun, run_threat  # noqa: E402
from robaudit.attacks.apgd import APGD  # noqa: E402
from robaudit.batching import AdaptiveBatch  # noqa: E402
from robaudit.threats import Threat  # noqa: E402

# name -> (per-sample input shape, number of classes)
MODELS = {"resnet18": ((3, 224, 224), 1000), "cifar-resnet": ((3, 32, 32), 10), "tiny": ((1, 8, 8), 10)}


def build_model(name: str) -> nn.Module:
    """Random weights (throughput does not depend on them), eval mode, no parameter gradients."""
    torch.manual_seed(0)
    if name == "tiny":
        from robaudit.demo import digits_cnn

        net = digits_cnn()
    else:
        from torchvision.models import resnet18

        net = resnet18(num_classes=MODELS[name][1])
        if name == "cifar-resnet":  # the CIFAR stem: 3x3 first convolution, no max-pool
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
    return net.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """The reference: one forward and one backward to the input."""
    point = x.detach().requires_grad_(True)
    loss = nn.functional.cross_entropy(net(point), y, reduction="sum")
    torch.autograd.grad(loss, point)


def bare_rate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int, device: torch.device) -> float:
    """Forward+backward passes per second (a forward and a backward count one each)."""
    for _ in range(2):  # warm-up (cuDNN picks its kernels)
        bare_step(net, x, y)
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        bare_step(net, x, y)
    sync(device)
    return 2 * len(x) * iters / (time.perf_counter() - start)


def robaudit_run(net: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int, steps: int, batch: int, device: torch.device) -> dict:
    """APGD-CE through the runner, as a scan runs it; passes and seconds from the runner's record."""
    size = AdaptiveBatch(batch)
    outcome = run_threat(
        net, x, y, torch.ones(len(x), dtype=torch.bool), Threat(norm="linf", eps=1e-7), [AttackRun(APGD(loss="ce", steps=steps))],
        lower=0.0, upper=1.0, num_classes=classes, batch_size=size, device=device, seed=0,
    )  # fmt: skip
    record = outcome.records[0]
    return {
        "samples_per_s": len(x) / record.seconds,
        "passes_per_s": (record.forwards + record.backwards) / record.seconds,
        "forwards_per_sample": record.forwards / len(x),
        "backwards_per_sample": record.backwards / len(x),
        "seconds": record.seconds,
        "batch_size_note": size.note,
    }


def measure(args: argparse.Namespace, device: torch.device) -> dict:
    shape, classes = MODELS[args.model]
    net = build_model(args.model).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch * args.chunks, *shape, generator=g)
    with torch.no_grad():
        y = torch.cat([net(x[i : i + args.batch].to(device)).argmax(1).cpu() for i in range(0, len(x), args.batch)])
    xb, yb = x[: args.batch].to(device), y[: args.batch].to(device)
    robaudit_run(net, x[: args.batch], y[: args.batch], classes, 2, args.batch, device)  # warm-up
    rates, runs = [], []
    for _ in range(args.repeats):  # interleaved, fastest of each: other work on the machine slows both alike
        rates.append(bare_rate(net, xb, yb, args.steps, device))
        runs.append(robaudit_run(net, x, y, classes, args.steps, args.batch, device))
    bare = max(rates)
    best = max(runs, key=lambda r: r["passes_per_s"])
    return {
        "model": args.model, "input_shape": list(shape), "batch_size": args.batch, "samples": len(x), "apgd_steps": args.steps,
        "bare_passes_per_s": bare, "bare_samples_per_s": bare / 2,
        "robaudit": best, "ratio": best["passes_per_s"] / bare,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default; skipped without a CUDA device) or cpu")
    parser.add_argument("--model", choices=list(MODELS), default="resnet18")
    parser.add_argument("--batch", type=int, default=256, help="batch size (robaudit's halves on out-of-memory)")
    parser.add_argument("--chunks", type=int, default=2, help="robaudit attacks batch x chunks samples")
    parser.add_argument("--steps", type=int, default=20, help="APGD steps, and bare iterations")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    device = torch.device(args.device)
    result = measure(args, device)
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result["torch"], result["python"] = torch.__version__, platform.python_version()
    result["command"] = "python benchmarks/gpu_throughput.py " + " ".join(sys.argv[1:])
    r = result["robaudit"]
    print(
        f"{args.model} batch {args.batch} on {result['device']}: bare fwd+bwd {result['bare_samples_per_s']:.1f} samples/s; "
        f"robaudit APGD {r['samples_per_s']:.2f} samples/s ({r['forwards_per_sample']:.0f}+{r['backwards_per_sample']:.0f} "
        f"passes each), {r['passes_per_s']:.0f} passes/s = {result['ratio']:.3f} of bare"
        + (f"; {r['batch_size_note']}" if r["batch_size_note"] else "")
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
