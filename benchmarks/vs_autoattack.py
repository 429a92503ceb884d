"""Attack strength and cost: robaudit's ``standard`` preset against AutoAttack "standard".

For every model of the digits zoo (benchmarks/zoo.py) and every threat, this runs

* robaudit ``--preset standard`` through its Python API (``robaudit.scan.scan``) on the
  zoo's safetensors file with ``--arch benchmarks/zoo.py:<factory>`` - exactly what
  ``robaudit scan <file> --arch ... --data digits --threat <t> --preset standard`` reports;
* the original AutoAttack (github.com/fra31/auto-attack), ``version='standard'``, its
  own defaults (``seed=0``, ``run_standard_evaluation(x, y, bs=250)``);
* torchattacks' AutoAttack copy, ``version='standard'`` (``seed=0``),

on the same samples of robaudit's bundled digits test split, and records clean
accuracy, robust accuracy, model passes per sample and wall time. Every tool's
adversarial examples are re-checked here with a fresh forward pass of an independently
loaded torch model and a float64 norm check; robust accuracy is what survives that check.

Passes are counted with ``robaudit.attacks.counting.CountingModel`` for AutoAttack and
torchattacks (every forward/backward they make, including their clean pass and
sanity checks). For robaudit the table shows the report's
``summary.forward_passes_per_sample``/``backward_passes_per_sample`` (attacks only,
minimal-norm stage included); the JSON also holds an all-inclusive count (clean pass,
model probing and re-verification included) taken with a global module hook.

    pip install git+https://github.com/fra31/auto-attack   # the reference
    pip install torchattacks                              # optional, --tools to skip it
    python benchmarks/vs_autoattack.py                    # everything, all 360 test samples
    python benchmarks/vs_autoattack.py --n 200 --models cnn mlp --threats linf:0.1

Exit status 1 when robaudit's robust accuracy is higher than AutoAttack's anywhere
(robaudit found fewer adversarial examples: the acceptance rule is that it never may).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmark the robaudit of this checkout, installed or not
    sys.path.insert(0, str(ROOT))

from robaudit.attacks.counting import CountingModel  # noqa: E402
from robaudit.data import load_data  # noqa: E402
from robaudit.scan import ScanConfig, scan  # noqa: E402
from robaudit.threats import NORM_ATOL, NORM_RTOL, Threat, parse_threat, perturbation_norms  # noqa: E402

DEFAULT_THREATS = ["linf:0.1", "linf:0.2", "l2:0.5", "l2:1.0"]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "vs_autoattack.json"
TOOLS = ("robaudit", "autoattack", "torchattacks")
BOX_TOL = 1e-6


def _zoo():
    spec = importlib.util.spec_from_file_location("robaudit_bench_zoo", Path(__file__).resolve().parent / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _require(tools: list[str]) -> None:
    """Exit with an install hint when a third-party tool that was asked for is missing."""
    missing = []
    if "autoattack" in tools:
        try:
            import autoattack  # noqa: F401
        except ImportError:
            missing.append("AutoAttack (the reference): pip install git+https://github.com/fra31/auto-attack")
    if "torchattacks" in tools:
        try:
            import torchattacks  # noqa: F401
        except ImportError as exc:
            missing.append(f"torchattacks ({exc}): pip install torchattacks, or leave it out with --tools robaudit autoattack")
    if missing:
        sys.exit("vs_autoattack.py needs:\n  " + "\n  ".join(missing))


# --------------------------------------------------------------------------- checks


@torch.no_grad()
def verify(model: torch.nn.Module, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, threat: Threat) -> dict:
    """Independent check of adversarial candidates (rows where the tool claims success or changed x).

    Returns per-sample ``fooled`` (misclassified, in the ball, in the box) and counts of
    rows that are misclassified but violate the ball or the box.
    """
    x_adv = x_adv.detach().to(torch.float32).cpu()
    pred = model(x_adv).argmax(1)
    size = perturbation_norms(x_adv - x, threat.norm)
    in_ball = size <= threat.eps * (1 + NORM_RTOL) + NORM_ATOL
    flat = x_adv.flatten(1)
    in_box = (flat >= -BOX_TOL).all(1) & (flat <= 1 + BOX_TOL).all(1) & torch.isfinite(flat).all(1)
    wrong = pred != y
    return {
        "fooled": wrong & in_ball & in_box,
        "outside_ball": int((wrong & ~in_ball).sum()),
        "outside_box": int((wrong & ~in_box).sum()),
        "max_norm": float(size.max()) if len(size) else 0.0,
    }


@contextlib.contextmanager
def count_all_passes():
    """Count every forward/backward of a zoo network (classes named Zoo*), whoever makes it."""
    tally = {"forwards": 0, "backwards": 0}

    def hook(module, inputs, output):
        if type(module).__name__.startswith("Zoo") and isinstance(output, torch.Tensor):
            batch = int(inputs[0].shape[0])
            tally["forwards"] += batch
            if output.requires_grad:
                output.register_hook(lambda grad: tally.__setitem__("backwards", tally["backwards"] + batch))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield tally
    finally:
        handle.remove()


# --------------------------------------------------------------------------- tools


def run_robaudit(model, weights: Path, arch: str, threat: Threat, x, y, n: int | None, seed: int) -> dict:
    config = ScanConfig(model=weights, arch=arch, data="digits", n=n, seed=seed, threats=[threat],
                        preset="standard", device="cpu", keep_adversarial=True)  # fmt: skip
    with count_all_passes() as tally:
        start = time.perf_counter()
        result = scan(config)
        seconds = time.perf_counter() - start
    report = result.report
    assert torch.equal(result.data.y, y) and torch.allclose(result.data.x, x), "robaudit sampled other digits"
    summary = report.summary
    outcome = result.outcomes[0]
    clean = model(x).argmax(1) == y
    # Independent re-verification of every adversarial example robaudit claims.
    idx = torch.nonzero(outcome.broken).flatten()
    check = verify(model, outcome.x_adv[idx], x[idx], y[idx], threat)
    confirmed = torch.zeros(len(y), dtype=torch.bool)
    confirmed[idx[check["fooled"]]] = True
    robust = clean & ~confirmed
    threat_summary = summary.threats[0]
    return {
        "robust_accuracy": _fraction(robust),
        "reported_robust_accuracy": threat_summary.robust_accuracy,
        "reported_clean_accuracy": summary.clean_accuracy,
        "claimed_broken": len(idx),
        "reverify_failures": int(len(idx) - int(check["fooled"].sum())),
        "reverify_max_norm": check["max_norm"],
        "forward_passes_per_sample": summary.forward_passes_per_sample,
        "backward_passes_per_sample": summary.backward_passes_per_sample,
        "all_forward_passes_per_sample": tally["forwards"] / len(y),
        "all_backward_passes_per_sample": tally["backwards"] / len(y),
        "seconds": seconds,
        "stages": {
            **{
                f"minimal:{m.norm}": {d.name: {"broke": d.broke, "fwd": d.forward_passes, "bwd": d.backward_passes}
                                      for d in m.attack_details}
                for m in summary.minimal_norm
            },
            threat_summary.threat: {
                d.name: {"broke": d.broke, "robust_after": d.robust_accuracy_after, "fwd": d.forward_passes,
                         "bwd": d.backward_passes, **({"skipped": d.skipped} if d.skipped else {})}
                for d in threat_summary.attack_details
            },
        },  # fmt: skip
        "_robust": robust,
    }


def run_autoattack(referee, model, threat: Threat, x, y, seed: int, bs: int) -> dict:
    """AutoAttack on `model` (a private copy); `referee` (never handed to a tool) re-checks the result."""
    from autoattack import AutoAttack

    counted = CountingModel(model).eval()
    norm = {"linf": "Linf", "l2": "L2"}[threat.norm]
    # Defaults of the reference implementation; device='cpu' because its default is 'cuda',
    # verbose=False only silences its log lines.
    adversary = AutoAttack(counted, norm=norm, eps=threat.eps, version="standard", seed=seed, device="cpu", verbose=False)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        x_adv = adversary.run_standard_evaluation(x.clone(), y.clone(), bs=bs)
    seconds = time.perf_counter() - start
    return _finish(referee, counted, threat, x, y, x_adv, seconds, log.getvalue())


def run_torchattacks(referee, model, threat: Threat, x, y, seed: int, bs: int) -> dict:
    """torchattacks on `model` (a private copy; torchattacks switches train/eval modes); `referee` re-checks."""
    import torchattacks

    # eval() before wrapping: torchattacks restores the mode it found on the wrapper
    # afterwards, and a fresh nn.Module wrapper is in training mode.
    counted = CountingModel(model).eval()
    norm = {"linf": "Linf", "l2": "L2"}[threat.norm]
    attack = torchattacks.AutoAttack(counted, norm=norm, eps=threat.eps, version="standard", n_classes=10, seed=seed)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        x_adv = torch.cat([attack(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)])
    seconds = time.perf_counter() - start
    return _finish(referee, counted, threat, x, y, x_adv, seconds, log.getvalue())


def _fraction(mask: torch.Tensor) -> float:
    return int(mask.sum()) / len(mask)


def _finish(model, counted, threat, x, y, x_adv, seconds, log) -> dict:
    clean = model(x).argmax(1) == y
    check = verify(model, x_adv, x, y, threat)
    robust = clean & ~check["fooled"]
    return {
        "robust_accuracy": _fraction(robust),
        "invalid_outside_ball": check["outside_ball"],
        "invalid_outside_box": check["outside_box"],
        "max_norm": check["max_norm"],
        "forward_passes_per_sample": counted.forwards / len(y),
        "backward_passes_per_sample": counted.backwards / len(y),
        "seconds": seconds,
        "left_model_in_training_mode": counted.model.training,
        **({"log": log[-2000:]} if log.strip() else {}),
        "_robust": robust,
    }


# --------------------------------------------------------------------------- report


def _fmt_passes(r: dict | None) -> str:
    return "-" if r is None else f"{r['forward_passes_per_sample']:.0f}+{r['backward_passes_per_sample']:.0f}"


def _fmt_acc(r: dict | None) -> str:
    return "-" if r is None else f"{100 * r['robust_accuracy']:.1f}"


def table(rows: list[dict]) -> str:
    head = (
        "| model | threat | clean % | robaudit % | AutoAttack % | torchattacks % | passes fwd+bwd robaudit | AutoAttack "
        "| torchattacks | wall s robaudit | AutoAttack | torchattacks | passes ratio | wall ratio | check |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    lines = [head]
    for row in rows:
        ra, aa, ta = (row["tools"].get(t) for t in TOOLS)
        wall = lambda r: "-" if r is None else f"{r['seconds']:.1f}"  # noqa: E731
        lines.append(
            f"| {row['model']} | {row['threat']} | {100 * row['clean_accuracy']:.1f} | {_fmt_acc(ra)} | {_fmt_acc(aa)} "
            f"| {_fmt_acc(ta)} | {_fmt_passes(ra)} | {_fmt_passes(aa)} | {_fmt_passes(ta)} | {wall(ra)} | {wall(aa)} "
            f"| {wall(ta)} | {_ratio(row, 'passes')} | {_ratio(row, 'seconds')} | {row['verdict']} |"
        )
    return "\n".join(lines)


def _passes(r: dict) -> float:
    return r["forward_passes_per_sample"] + r["backward_passes_per_sample"]


def _ratio(row: dict, what: str) -> str:
    ra, aa = row["tools"].get("robaudit"), row["tools"].get("autoattack")
    if ra is None or aa is None:
        return "-"
    num, den = (_passes(ra), _passes(aa)) if what == "passes" else (ra["seconds"], aa["seconds"])
    return f"{num / den:.2f}x" if den else "-"


def totals(rows: list[dict]) -> dict:
    """Sums over the rows where every tool that ran produced a result (so ratios compare like with like)."""
    out = {}
    ran = {tool for row in rows for tool in row["tools"]}
    rows = [row for row in rows if set(row["tools"]) == ran]
    out["rows"] = len(rows)
    for tool in TOOLS:
        got = [row["tools"][tool] for row in rows if tool in row["tools"]]
        if got:
            out[tool] = {
                "forward_passes_per_sample": sum(r["forward_passes_per_sample"] for r in got),
                "backward_passes_per_sample": sum(r["backward_passes_per_sample"] for r in got),
                "seconds": sum(r["seconds"] for r in got),
            }
    if "robaudit" in out and "autoattack" in out:
        ra, aa = out["robaudit"], out["autoattack"]
        out["ratio_robaudit_over_autoattack"] = {
            "forward_passes": ra["forward_passes_per_sample"] / max(aa["forward_passes_per_sample"], 1e-12),
            "backward_passes": ra["backward_passes_per_sample"] / max(aa["backward_passes_per_sample"], 1e-12),
            "passes": _passes(ra) / max(_passes(aa), 1e-12),
            "wall_time": ra["seconds"] / max(aa["seconds"], 1e-12),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=None, help="zoo cache folder (default benchmarks/.zoo/)")
    parser.add_argument("--models", nargs="+", default=None, help="zoo models to run (default: all)")
    parser.add_argument("--threats", nargs="+", default=DEFAULT_THREATS, help="threats, robaudit syntax (default: %(default)s)")
    parser.add_argument("--n", type=int, default=None, help="stratified sample of the 360 digits test samples (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and attack seed (default 0)")
    parser.add_argument("--bs", type=int, default=250, help="batch size for AutoAttack/torchattacks (AutoAttack's default, 250)")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for every tool (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default %(default)s)")
    args = parser.parse_args()

    _require(args.tools)
    args.git_state = _git()  # the robaudit that is imported now is the one measured
    torch.set_num_threads(args.threads)
    zoo = _zoo()
    zoo_dir = args.zoo or zoo.DEFAULT_ZOO
    names = args.models or list(zoo.RECIPES)
    unknown = sorted(set(names) - set(zoo.RECIPES))
    if unknown:
        sys.exit(f"unknown zoo model(s) {', '.join(unknown)} (known: {', '.join(zoo.RECIPES)})")
    threats = [parse_threat(t) for t in args.threats]
    data = load_data("digits", n=args.n, seed=args.seed)
    x, y = data.x.to(torch.float32), data.y
    print(f"{len(y)} digits test samples; tools: {', '.join(args.tools)}; torch threads {args.threads}", file=sys.stderr)

    rows, models_meta = [], {}
    for name in names:
        # The referee re-checks every tool's examples and is never handed to a tool; each
        # third-party tool attacks its own fresh copy (so none can leave state for another).
        referee, weights, meta = zoo.load(name, zoo_dir, log=lambda m: print(m, file=sys.stderr))
        fresh = lambda: zoo.load(name, zoo_dir)[0]  # noqa: E731
        models_meta[name] = {k: meta[k] for k in ("arch", "test_accuracy", "recipe")}
        with torch.no_grad():
            clean = referee(x).argmax(1) == y
        for threat in threats:
            row = {"model": name, "threat": threat.canonical, "n": len(y), "clean_accuracy": _fraction(clean),
                   "tools": {}}  # fmt: skip
            for tool in args.tools:
                print(f"{name} {threat.canonical} {tool} ...", file=sys.stderr, flush=True)
                torch.manual_seed(args.seed)
                try:
                    if tool == "robaudit":
                        result = run_robaudit(referee, weights, meta["arch"], threat, x, y, args.n, args.seed)
                    elif tool == "autoattack":
                        result = run_autoattack(referee, fresh(), threat, x, y, args.seed, args.bs)
                    else:
                        result = run_torchattacks(referee, fresh(), threat, x, y, args.seed, args.bs)
                except Exception as exc:  # noqa: BLE001 - a crash of one tool is a result, not the end of the run
                    print(f"  {tool} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                    row.setdefault("errors", {})[tool] = f"{type(exc).__name__}: {exc}"
                    continue
                row["tools"][tool] = result
                assert not any(m.training for m in referee.modules()), "the referee model left eval mode"
            _compare(row)
            print(
                f"  clean {row['clean_accuracy']:.3f} | "
                + " | ".join(f"{t} {r['robust_accuracy']:.3f} ({_fmt_passes(r)} passes, {r['seconds']:.1f} s)"
                             for t, r in row["tools"].items())
                + f" | {row['verdict']}",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            for r in row["tools"].values():
                r.pop("_robust", None)
            rows.append(row)
            _write(args, threats, models_meta, rows, data.indices)  # partial results survive an interrupted run

    summary, weaker, failed = _write(args, threats, models_meta, rows, data.indices)
    print(table(rows))
    if "ratio_robaudit_over_autoattack" in summary:
        ratio = summary["ratio_robaudit_over_autoattack"]
        print(
            f"\nTotal cost robaudit / AutoAttack: passes (fwd+bwd) {ratio['passes']:.2f}x "
            f"(forward {ratio['forward_passes']:.2f}x, backward {ratio['backward_passes']:.2f}x), wall time {ratio['wall_time']:.2f}x"
        )
    if weaker:
        print(f"\nFAIL: robaudit standard found fewer adversarial examples than AutoAttack on: {'; '.join(weaker)}")
    if failed:
        print(f"\nFAIL: a tool crashed on: {'; '.join(failed)} (see 'errors' in the JSON)")
    print(f"\nresults written to {args.out}", file=sys.stderr)
    return 1 if weaker or failed else 0


def _write(args, threats: list[Threat], models_meta: dict, rows: list[dict], indices) -> tuple[dict, list[str], list[str]]:
    summary = totals(rows)
    weaker = [f"{r['model']} {r['threat']}" for r in rows if r["verdict"].startswith("WEAKER")]
    failed = [f"{r['model']} {r['threat']} {tool}" for r in rows for tool in r.get("errors", {})]
    result = {
        "benchmark": "vs_autoattack",
        "command": "python benchmarks/vs_autoattack.py " + " ".join(sys.argv[1:]),
        "n": len(indices),
        "seed": args.seed,
        "sample_indices": [int(i) for i in indices],
        "threats": [t.canonical for t in threats],
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "autoattack": _version("autoattack"),
            "torchattacks": _version("torchattacks"),
            **args.git_state,
        },
        "models": models_meta,
        "rows": rows,
        "totals": summary,
        "robaudit_weaker_than_autoattack": weaker,
        "failed": failed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return summary, weaker, failed


def _compare(row: dict) -> None:
    """Verdict of robaudit against AutoAttack, plus the per-sample disagreement."""
    ra, aa = row["tools"].get("robaudit"), row["tools"].get("autoattack")
    if ra is None or aa is None:
        row["verdict"] = "-"
        return
    aa_only = torch.nonzero(ra["_robust"] & ~aa["_robust"]).flatten()  # AutoAttack broke, robaudit did not
    ra_only = torch.nonzero(aa["_robust"] & ~ra["_robust"]).flatten()
    only_aa, only_ra = len(aa_only), len(ra_only)
    row["broken_only_by_autoattack"] = only_aa
    row["broken_only_by_robaudit"] = only_ra
    # Positions in the sample (see "sample_indices" for the digits test-split index).
    row["positions_broken_only_by_autoattack"] = aa_only.tolist()
    row["positions_broken_only_by_robaudit"] = ra_only.tolist()
    diff = ra["robust_accuracy"] - aa["robust_accuracy"]
    bad = ra.get("reverify_failures", 0)
    if diff > 1e-12:
        row["verdict"] = f"WEAKER by {100 * diff:.1f} pt"
    else:
        row["verdict"] = "ok" if diff == 0 else f"stronger by {100 * -diff:.1f} pt"
    if only_aa and not diff > 1e-12:
        row["verdict"] += f" ({only_aa} AA-only)"
    if bad:
        row["verdict"] += f"; {bad} robaudit examples FAILED re-verification"
    if abs(ra["reported_robust_accuracy"] - ra["robust_accuracy"]) > 1e-12 or abs(
        ra["reported_clean_accuracy"] - row["clean_accuracy"]
    ) > 1e-12:
        row["verdict"] += "; robaudit's report disagrees with the re-check"


def _git() -> dict:
    """Which robaudit was measured: the commit and the robaudit/ files changed since it."""
    import subprocess

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    changed = [line[3:] for line in git("status", "--porcelain", "--", "robaudit").splitlines()]
    return {"robaudit_commit": commit, "robaudit_uncommitted_changes": changed}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
