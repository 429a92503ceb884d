"""robaudit's certified L2 radii beside auto_LiRPA's (CROWN, alpha-CROWN) on certify_zoo's `resnet`.

Is the residual net's gap to its target (certified / attack distance 0.3) robaudit's, or
the limit of the best known bounds? This runs auto_LiRPA, the reference CROWN / alpha-CROWN
implementation, on the same model and the same attack distances.

Stage `setup`: train the resnet exactly as benchmarks/certify_zoo.py does (its own `train`,
seed 0, one thread), compute its attack distances on the first N test digits with its own
`attack_distance` (FMN 1000 steps + DeepFool, min over no-box and [0,1]-box runs, as in
certify_zoo.evaluate), and cache model, data and distances under --work.

Stage `lirpa --method M`: per sample, bisection on eps in [0, attack distance] for the
largest eps whose 9 margins logit_y - logit_j auto_LiRPA proves > 0 over the L2 ball
(no box). Stage `robaudit`: robaudit.certify.certify_l2 at given budgets on the same samples.
Results go to benchmarks/results/certify_vs_lirpa.json (one key per stage and method).

auto_LiRPA is not a dependency of robaudit and is not on PyPI in a current version: fetch it
(github.com/Verified-Intelligence/auto_LiRPA, 0.7.1 was used) and put it on PYTHONPATH with
its small dependencies (appdirs tqdm pyyaml graphviz sortedcontainers psutil termcolor).
It supports torch < 2.9; under newer torch, `torch.clamp` has a zero gradient at its ends,
where every alpha starts, so alpha-CROWN silently returns the CROWN bound unless the two
alpha clamps in auto_LiRPA/operators/relu.py are given a straight-through gradient (bound
values are unchanged). Check that `alpha` differs from `crown` before trusting it.

    PYTHONPATH=/path/to/auto_LiRPA:/path/to/deps python benchmarks/certify_vs_lirpa.py setup
    ... certify_vs_lirpa.py lirpa --method crown
    ... certify_vs_lirpa.py lirpa --method alpha --bracket-from lirpa_crown --steps 7
    ... certify_vs_lirpa.py robaudit --budgets default tight
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

RESULTS = ROOT / "benchmarks" / "results" / "certify_vs_lirpa.json"
SETUP = Path("/tmp/robaudit_vs_lirpa/setup.pt")  # model, samples and distances shared by the stages (--work)


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def save_results(key: str, value) -> None:
    res = load_results()
    res[key] = value
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")


def get_model():
    import certify_zoo
    from zoo import load_split

    data = load_split()
    model, acc, secs = certify_zoo.train("resnet", data)
    return model, acc, secs, data


def stage_setup(n: int, fmn_steps: int) -> None:
    import certify_zoo

    model, acc, secs, data = get_model()
    print(f"test accuracy {acc:.4f}, trained in {secs:.1f} s", flush=True)
    x, y = data[2][:n], data[3][:n]
    t = time.perf_counter()
    boxed = certify_zoo.attack_distance(model, x, y, (0.0, 1.0), fmn_steps)
    free = torch.minimum(certify_zoo.attack_distance(model, x, y, (-math.inf, math.inf), fmn_steps), boxed)
    print(f"attack distances in {time.perf_counter() - t:.1f} s: {free.tolist()}", flush=True)
    SETUP.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "x": x, "y": y, "dist": free, "dist_box": boxed,
                "accuracy": acc}, SETUP)
    save_results("setup", {"n": n, "fmn_steps": fmn_steps, "deepfool": {"steps": 100, "n_candidates": 10},
                           "test_accuracy": round(acc, 4), "train_seconds": round(secs, 1),
                           "attack_distance": [round(v, 6) for v in free.tolist()],
                           "attack_distance_box01": [round(v, 6) for v in boxed.tolist()],
                           "torch": torch.__version__})


def load_setup():
    from zoo import ZooResNet

    s = torch.load(SETUP)
    model = ZooResNet()
    model.load_state_dict(s["state_dict"])
    model.eval().requires_grad_(False)
    with torch.no_grad():
        pred = model(s["x"]).argmax(1)
    return model, s, pred


METHODS = {
    # name: (auto_LiRPA method, optimize_bound_args or None)
    "crown": ("CROWN", None),
    # alpha-CROWN. With no interm_bounds handed to compute_bounds, every intermediate layer's
    # bounds are recomputed at every iteration with their own (start-node-specific) alphas,
    # all optimized (fix_interm_bounds only matters when interm bounds are passed in).
    "alpha": ("CROWN-Optimized", {"iteration": 20, "lr_alpha": 0.5, "fix_interm_bounds": False}),
    "alpha100": ("CROWN-Optimized", {"iteration": 100, "lr_alpha": 0.5, "fix_interm_bounds": False,
                                      "early_stop_patience": 30}),
    "alpha300": ("CROWN-Optimized", {"iteration": 300, "lr_alpha": 0.5, "fix_interm_bounds": False,
                                      "early_stop_patience": 50, "lr_decay": 0.99}),
}


def narrow(proves, i: int, eps: float, lo: float, hi: float) -> tuple[float, float]:
    """One proof attempt at eps: the bracket [lo, hi] keeps the side the radius lies on."""
    return (eps, hi) if proves(i, eps)[0] else (lo, eps)


def stage_lirpa(method_key: str, steps: int, indices: list[int] | None, bracket_from: str | None = None,
                hi_factor: float = 3.0) -> None:
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
    from auto_LiRPA.utils import stop_criterion_min
    import auto_LiRPA

    model, s, pred = load_setup()
    x, y, dist = s["x"], s["y"], s["dist"]
    method, opt = METHODS[method_key]
    bound_opts = {"conv_mode": "matrix"}
    if opt is not None:
        opt = dict(opt)
        opt["stop_criterion_func"] = stop_criterion_min(1e-12)  # stop once every margin is proven > 0
        opt["early_stop_patience"] = opt.get("early_stop_patience", 10)
        bound_opts["optimize_bound_args"] = opt
    lirpa = BoundedModule(model, torch.zeros(1, 1, 8, 8), bound_opts=bound_opts, device="cpu")
    lirpa.eval()

    def proves(i: int, eps: float) -> tuple[bool, float]:
        xi = x[i : i + 1]
        yi = int(y[i])
        others = [j for j in range(10) if j != yi]
        c = torch.zeros(1, 9, 10)
        for k, j in enumerate(others):
            c[0, k, yi] = 1.0
            c[0, k, j] = -1.0
        bt = BoundedTensor(xi, PerturbationLpNorm(norm=2, eps=eps))
        lb, _ = lirpa.compute_bounds(x=(bt,), C=c, method=method, bound_upper=False)
        return bool((lb > 0).all()), float(lb.min())

    start = None
    if bracket_from is not None:
        start = {r["i"]: r["radius"] for r in load_results()[bracket_from]["rows"]}
    rows = []
    idx = indices if indices is not None else list(range(len(x)))
    for i in idx:
        d = float(dist[i])
        t = time.perf_counter()
        if int(pred[i]) != int(y[i]) or not math.isfinite(d):
            rows.append({"i": i, "radius": 0.0, "dist": d, "seconds": 0.0, "calls": 0})
            continue
        lo, hi, calls = 0.0, d, 0
        if bracket_from is not None:
            # start from a radius a weaker method (e.g. CROWN) proved: alpha-CROWN starts from
            # CROWN's slopes and keeps the best bound, so it proves at least that much
            lo = float(start[i])
            ok, _ = proves(i, lo)  # checked, not assumed
            calls += 1
            if not ok:
                lo = 0.0
            else:
                lo, hi = narrow(proves, i, min(d, hi_factor * lo), lo, hi)
                calls += 1
        for _ in range(steps):
            lo, hi = narrow(proves, i, 0.5 * (lo + hi), lo, hi)
            calls += 1
        sec = time.perf_counter() - t
        rows.append({"i": i, "radius": lo, "dist": d, "ratio": lo / d, "seconds": sec, "calls": calls,
                     "upper_failed": hi})
        print(f"[{method_key}] sample {i}: radius {lo:.5f} / dist {d:.5f} = {lo / d:.4f}  ({sec:.1f} s)", flush=True)
    ratios = torch.tensor([r["radius"] / r["dist"] for r in rows if math.isfinite(r["dist"])])
    radii = torch.tensor([r["radius"] for r in rows])
    summary = {
        "auto_LiRPA": auto_LiRPA.__version__, "method": method, "bound_opts": {k: (v if k != "optimize_bound_args" else
                   {kk: vv for kk, vv in v.items() if kk != "stop_criterion_func"}) for k, v in bound_opts.items()},
        "bisection_steps": steps, "bracket_from": bracket_from, "hi_factor": hi_factor, "samples": len(rows),
        "seconds_per_call": round(sum(r["seconds"] for r in rows) / max(1, sum(r["calls"] for r in rows)), 2),
        "median_ratio": round(ratios.median().item(), 4), "mean_ratio": round(ratios.mean().item(), 4),
        "median_radius": round(radii.median().item(), 5),
        "median_attack_distance": round(torch.tensor([r["dist"] for r in rows]).median().item(), 5),
        "seconds_per_sample": round(sum(r["seconds"] for r in rows) / len(rows), 2),
        "violations": sum(r["radius"] > r["dist"] for r in rows), "rows": rows,
    }
    print({k: v for k, v in summary.items() if k != "rows"}, flush=True)
    save_results("lirpa_" + method_key + ("" if indices is None else "_subset"), summary)


def stage_robaudit(budgets: list[str]) -> None:
    from robaudit.certify import certify_l2

    model, s, pred = load_setup()
    x, y, dist = s["x"], s["y"], s["dist"]
    for budget in budgets:
        cert = certify_l2(model, x, y, budget=budget)
        r = cert.radius.double()
        ok = (r > 0) & torch.isfinite(dist)
        ratios = r / dist
        summary = {
            "budget": budget, "samples": len(x), "certified": int((r > 0).sum()),
            "median_ratio": round(ratios.median().item(), 4), "mean_ratio": round(ratios.mean().item(), 4),
            "median_ratio_certified_only": round(ratios[ok].median().item(), 4),
            "median_radius": round(r.median().item(), 5),
            "seconds_per_sample": round(cert.seconds / len(x), 2),
            "violations": int((r > dist).sum()), "radius": r.tolist(),
        }
        print({k: v for k, v in summary.items() if k != "radius"}, flush=True)
        save_results("robaudit_" + budget, summary)


def main() -> None:
    global SETUP
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["setup", "lirpa", "robaudit"])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--fmn-steps", type=int, default=1000)
    ap.add_argument("--method", choices=list(METHODS), default="crown")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--indices", type=int, nargs="+")
    ap.add_argument("--bracket-from", help="results key whose radii start the bisection (lower end)")
    ap.add_argument("--hi-factor", type=float, default=3.0)
    ap.add_argument("--budgets", nargs="+", default=["default", "tight"])
    ap.add_argument("--work", type=Path, default=SETUP.parent, help="folder for the cached model and distances")
    a = ap.parse_args()
    SETUP = a.work / "setup.pt"
    if a.stage == "setup":
        stage_setup(a.n, a.fmn_steps)
    elif a.stage == "lirpa":
        stage_lirpa(a.method, a.steps, a.indices, a.bracket_from, a.hi_factor)
    else:
        stage_robaudit(a.budgets)


if __name__ == "__main__":
    main()
