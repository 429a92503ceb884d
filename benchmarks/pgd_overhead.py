"""Time per PGD iteration against one bare forward + backward of the same model and batch.

The reference cost of a gradient attack is one forward plus one backward pass per
iteration; everything robaudit adds (the wrapper, pass counting, projection, per-sample
bookkeeping) is overhead measured here. Points are kept unbroken (a tiny eps) so every
iteration runs on the full batch.

    python benchmarks/pgd_overhead.py                 # demo model, CPU
    python benchmarks/pgd_overhead.py --device cuda   # on a GPU
    python benchmarks/pgd_overhead.py --model ../shared/fixtures/models/cifar10_resnet_2b.onnx --shape 3,32,32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from robaudit.attacks import PGD, AttackContext
from robaudit.attacks.counting import CountingModel
from robaudit.demo import demo_path
from robaudit.models import load_model, wrap_model
from robaudit.threats import Threat


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """The reference: one forward and one backward to the input."""
    point = x.detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(net(point), y, reduction="sum")
    torch.autograd.grad(loss, point)


def measure(model_path: Path, shape: tuple[int, ...], batch: int, steps: int, repeats: int, device: torch.device) -> dict:
    raw = load_model(model_path)
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    model, info = wrap_model(raw, sample_shape=shape, probe=x[:8].cpu(), device=device)
    with torch.no_grad():
        y = model(x).argmax(1)
    raw_net = raw.net.to(device)

    ctx = AttackContext(lower=0.0, upper=1.0, num_classes=info.num_classes, generator=torch.Generator().manual_seed(0))
    threat = Threat(norm="linf", eps=1e-7)
    attack = PGD(steps=steps)
    counted = CountingModel(model)
    reference = raw_net if info.batching == "batched" and raw.input_shape == shape else model
    for _ in range(3):  # warm-up
        bare_step(reference, x, y)
    attack.perturb(counted, x, y, threat, ctx)
    # Interleaved blocks, fastest of each kind: other work on the machine slows both alike.
    bare_times, pgd_times = [], []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            bare_step(reference, x, y)
        _sync(device)
        bare_times.append((time.perf_counter() - start) / steps)
        start = time.perf_counter()
        attack.perturb(counted, x, y, threat, ctx)
        _sync(device)
        pgd_times.append((time.perf_counter() - start) / steps)
    bare, per_iter = min(bare_times), min(pgd_times)
    return {"model": model_path.name, "batch": batch, "bare_ms": 1e3 * bare, "pgd_iter_ms": 1e3 * per_iter, "ratio": per_iter / bare}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=demo_path())
    parser.add_argument("--shape", default="1,8,8", help="per-sample input shape of the data, e.g. 3,32,32")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    device = torch.device(args.device)
    result = measure(args.model, shape, args.batch, args.steps, args.repeats, device)
    print(
        f"{result['model']}  batch {result['batch']}  device {device}: bare fwd+bwd {result['bare_ms']:.2f} ms, "
        f"PGD iteration {result['pgd_iter_ms']:.2f} ms, ratio {result['ratio']:.3f}"
    )


if __name__ == "__main__":
    main()
