"""How far could better intermediate bounds take `crown` on the digits residual net? An oracle experiment.

For each of the first ``--n`` test digits and each fraction f of its smallest adversarial
L2 distance (FMN + DeepFool, as `certify_zoo.py`), every unit of every ReLU input is
maximized and minimized over the ball of radius f x distance by projected gradient ascent
(``--steps`` steps, one run per unit and sign; the extremes over all points visited are
kept). Those ranges lie inside the true ones, so they are tighter than any sound
interval bound. CROWN's final backward pass (its single-neuron relaxations, no L2-ball
coupling, no refinement) is then evaluated once on robaudit's own intervals and once on
the oracle ranges. A negative lower bound of the smallest margin on the oracle ranges
means that no improvement of the intermediate bounds alone lets this relaxation
certify f x distance. NOT a certificate: the oracle intervals are not sound. ("own
intervals" is one unrefined `default` pass; the radius search itself refines them, see
docs/certify.md.)

    python benchmarks/certify_oracle.py --n 2 --fractions 0.2 0.3   # about 15 minutes on one thread
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

RESULTS = ROOT / "benchmarks" / "results" / "certify_oracle.json"


def oracle_ranges(graph, nodes: list[int], x: torch.Tensor, eps: float, steps: int) -> dict:
    """Per node, the smallest and largest value of each unit that gradient ascent reaches on the ball."""
    out = {}
    for i in nodes:
        units = math.prod(graph.nodes[i].shape)
        unit = torch.arange(units).repeat(2)
        sign = torch.cat([torch.ones(units), -torch.ones(units)]).double()
        delta = torch.randn(2 * units, *x.shape[1:], dtype=torch.float64, generator=torch.Generator().manual_seed(i)) * 1e-3
        lo = hi = None
        for _ in range(steps):
            delta.requires_grad_(True)
            values = graph.forward(x + delta)[i].reshape(2 * units, -1)
            seen = values.detach()
            lo = seen.amin(0) if lo is None else torch.minimum(lo, seen.amin(0))
            hi = seen.amax(0) if hi is None else torch.maximum(hi, seen.amax(0))
            (grad,) = torch.autograd.grad((values.gather(1, unit[:, None])[:, 0] * sign).sum(), delta)
            with torch.no_grad():
                norm = grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *([1] * (x.dim() - 1)))
                delta = delta + 8.0 * eps / steps * grad / norm
                delta = delta * (eps / delta.flatten(1).norm(dim=1)).clamp(max=1.0).view_as(norm)
        out[i] = (lo.view(graph.nodes[i].shape), hi.view(graph.nodes[i].shape))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.3])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--fmn-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import certify_zoo
    from zoo import load_split

    from robaudit.certify.budget import get_budget
    from robaudit.certify.certificate import _batch
    from robaudit.certify.crown import CrownBound
    from robaudit.certify.graph import build_graph
    from robaudit.certify.ops import ActOp, MaxPoolOp

    data = load_split()
    x, y = data[2][: args.n], data[3][: args.n]
    model, _, _ = certify_zoo.train("resnet", data)
    distance = certify_zoo.attack_distance(model, x, y, (-math.inf, math.inf), args.fmn_steps)
    x64 = x.double()
    graph = build_graph(model, x64[:1])
    crown = CrownBound(graph, get_budget("default"))
    crown.lipschitz = None  # no L2-ball coupling: the single-neuron relaxations alone
    own = CrownBound._intermediate
    rows = []
    for k in range(args.n):
        batch, idx = _batch(graph, x64[k : k + 1], y[k : k + 1]), torch.tensor([0])
        for fraction in args.fractions:
            eps = torch.tensor([fraction * distance[k].item()], dtype=torch.float64)
            ours = crown._margins(batch, idx, eps)[0].amin().item()
            ranges = oracle_ranges(graph, crown.needs, x64[k : k + 1], eps.item(), args.steps)

            def on_oracle(self, batch, idx, eps, refine=None, ranges=ranges):
                ctx = own(self, batch, idx, eps, refine)
                for i, (lo, hi) in ranges.items():
                    for c in self.graph.consumers[i]:
                        if isinstance(self.graph.nodes[c].op, (ActOp, MaxPoolOp)):
                            ctx.relaxed[c] = self._relax(self.graph.nodes[c].op, lo[None], hi[None])
                return ctx

            CrownBound._intermediate = on_oracle
            try:
                oracle = crown._margins(batch, idx, eps)[0].amin().item()
            finally:
                CrownBound._intermediate = own
            unstable = {str(i): int(((lo < 0) & (hi > 0)).sum()) for i, (lo, hi) in ranges.items() if not graph.exact[i]}
            row = {"digit": k, "attack_distance": round(distance[k].item(), 4), "fraction": fraction,
                   "lower_bound_own_intervals": round(ours, 3), "lower_bound_oracle_intervals": round(oracle, 3),
                   "unstable_units_oracle": unstable}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"description": __doc__.split("\n\n")[0], "command": "python benchmarks/certify_oracle.py " + " ".join(sys.argv[1:]),
              "steps": args.steps, "fmn_steps": args.fmn_steps, "torch": torch.__version__, "rows": rows}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
