"""Does robaudit see through gradient masking? Deliberately masked models against their true robustness.

Each masked model is a real file built from an unmasked source by ``tests/masked_models.py``
(input quantization, saturated softmax, scaled or clamped logits, a saturating output
layer, Gaussian input noise and inference-time dropout; ONNX graph edits or TorchScript).
The masks that keep decisions identical do not change the true robustness at all, so the
robust accuracy of the unmasked source is the number an honest audit must reach (for the
randomized ones it is the reference only approximately). Per masked model and threat:

* ``true``: robaudit's default ``standard`` scan of the unmasked source;
* ``plain PGD``: robaudit with the trust checks off and a battery of PGD-100 alone
  (a TOML battery file: ``[[attacks]] attack = "pgd"  steps = 100``), what a naive audit reports;
* ``quick`` / ``standard``: robaudit's default scans (trust checks on) of the masked file;
* which trust checks fired (``report.summary.diagnostics``), and wall time.

The unmasked sources appear as control rows (mask ``none``): there the checks should
stay quiet. Healthy third-party controls (COLT, oval21, CIFAR ResNet PGD-AT) have no
masked variants. Fixture models come from ``../shared/fixtures`` and are skipped when it
is absent.

    python benchmarks/masking_zoo.py                       # everything, n=200 digits (MNIST/CIFAR: 100)
    python benchmarks/masking_zoo.py --only cnn_quantized cnn_noise
    python benchmarks/masking_zoo.py --presets             # true and plain PGD only
    python benchmarks/masking_zoo.py --presets standard --n 100 --threads 1

Masked files are built into ``benchmarks/.zoo/masking/`` (git-ignored) and rebuilt when
their recipe changes (``--force`` rebuilds all). Results go to
``benchmarks/results/masking_zoo.json`` (rewritten after every model, so an interrupted
run keeps what it measured) and a markdown table is printed. A run that crashes is a
result (its error is recorded), not the end of the benchmark.

The scans use the Python API (``robaudit.scan.ScanConfig``); the trust-check fields
(``ScanConfig.checks``, ``report.summary.diagnostics``) are used when this checkout has
them and left out otherwise (the JSON says ``checks_api``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):  # the robaudit of this checkout and the mask builders
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import masked_models as mm  # noqa: E402
from robaudit.battery import read_config  # noqa: E402
from robaudit.data import load_data  # noqa: E402
from robaudit.scan import ScanConfig, scan  # noqa: E402
from robaudit.threats import parse_threat  # noqa: E402

DEFAULT_ZOO = ROOT / "benchmarks" / ".zoo" / "masking"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "masking_zoo.json"
PRESETS = ("quick", "standard")
PGD_TOML = '[[attacks]]\nattack = "pgd"\nsteps = 100\n'
RECIPE_VERSION = 1
CONFIG_FIELDS = {f.name for f in dataclasses.fields(ScanConfig)}
CHECKS_API = "checks" in CONFIG_FIELDS


# --------------------------------------------------------------------------- building the zoo


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(masked: mm.Masked, zoo: Path, force: bool, log) -> tuple[Path, dict]:
    """The masked file in the zoo, rebuilt when missing, forced, or its recipe changed; plus its recipe."""
    target = zoo / masked.file_name()
    meta_path = zoo / f"{masked.name}.json"
    recipe = {
        "version": RECIPE_VERSION,
        "builder": masked.build.__name__,
        "params": masked.params,
        "source": masked.source,
        "source_sha256": _sha256(masked.src.path),
        "builders_sha256": _sha256(Path(mm.__file__)),
    }
    if not force and target.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("recipe") == recipe:
            return target, meta
    log(f"building {masked.name} ({masked.build.__name__} {masked.params}) ...")
    zoo.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    masked.write(zoo)
    meta = {"recipe": recipe, "sha256": _sha256(target)}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return target, meta


def measured_identity(source: mm.Source, masked: mm.Masked, path: Path) -> dict:
    """Argmax agreement of the masked file with its source on the whole data file (one call each)."""
    data = load_data(source.data, n=None, seed=0)
    x = data.x.to(torch.float32)
    torch.manual_seed(0)
    src = mm.decisions(source.path, x, source.mean, source.std)
    got = mm.decisions(path, x, source.mean, source.std)
    return {
        "samples": len(x),
        "agreement": float((src == got).float().mean()),
        "identical": bool(torch.equal(src, got)),
        "source_accuracy": float((src == data.y).float().mean()),
        "masked_accuracy": float((got == data.y).float().mean()),
    }


# --------------------------------------------------------------------------- scanning


def _plain(value: Any) -> Any:
    """Dataclasses and other objects as JSON-ready data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "__dict__"):
        return _plain(vars(value))
    return str(value)


def diagnostics_of(report) -> dict | None:
    """The trust checks' verdicts, whatever shape the diagnostics object has (None before the API exists)."""
    diag = getattr(report.summary, "diagnostics", None)
    if diag is None:
        return None
    get = (lambda o, k, d=None: o.get(k, d)) if isinstance(diag, dict) else (lambda o, k, d=None: getattr(o, k, d))
    checks = []
    for check in get(diag, "checks", []) or []:
        g = (lambda k, d=None: check.get(k, d)) if isinstance(check, dict) else (lambda k, d=None: getattr(check, k, d))
        checks.append({"name": g("name"), "threat": g("threat"), "verdict": g("verdict"), "summary": g("summary"),
                       "evidence": _plain(g("evidence", {}))})  # fmt: skip
    return {
        "verdict": get(diag, "verdict"),
        "checks": checks,
        "adaptations": [str(a) for a in (get(diag, "adaptations", []) or [])],
    }


def run_scan(model: Path, source: mm.Source, n: int | None, seed: int, *, mode: str, pgd_specs: list | None) -> dict:
    """One robaudit scan. mode: 'pgd' (checks off, PGD battery, no certify/indicator) or a preset name (defaults)."""
    kwargs: dict[str, Any] = dict(
        model=model, data=source.data, n=n, seed=seed, threats=[parse_threat(t) for t in source.threats],
        mean=source.mean, std=source.std, device="cpu",
    )  # fmt: skip
    if mode == "pgd":
        kwargs.update(attacks=pgd_specs, certify="off", indicator="off")
        if CHECKS_API:
            kwargs["checks"] = "off"
    else:
        kwargs["preset"] = mode
        if CHECKS_API:
            kwargs["checks"] = "on"
    config = ScanConfig(**kwargs)
    torch.manual_seed(seed)
    start = time.perf_counter()
    try:
        report = scan(config).report
    except Exception as exc:  # noqa: BLE001 - a crash on a masked model is a result
        return {
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=6),
            "seconds": round(time.perf_counter() - start, 2),
        }
    seconds = time.perf_counter() - start
    return {
        "clean_accuracy": report.summary.clean_accuracy,
        "robust_accuracy": {t.threat: t.robust_accuracy for t in report.summary.threats},
        "broken_by": {t.threat: {d.name: d.broke for d in t.attack_details} for t in report.summary.threats},
        "diagnostics": diagnostics_of(report),
        "output_kind": report.model.output_kind,
        "batching": report.model.batching,
        "model_notes": list(report.model.notes),
        "n": report.data.n,
        "forward_passes_per_sample": report.summary.forward_passes_per_sample,
        "backward_passes_per_sample": report.summary.backward_passes_per_sample,
        "seconds": round(seconds, 2),
    }


# --------------------------------------------------------------------------- output


def _acc(run: dict | None, threat: str) -> str:
    if run is None:
        return "-"
    if "error" in run:
        return "error"
    value = run["robust_accuracy"].get(threat)
    return "-" if value is None else f"{100 * value:.0f}"


def _fired(runs: dict[str, dict]) -> str:
    """Per preset: the overall verdict, then the checks that warned or failed (on any threat), worst first."""
    parts = []
    for preset, run in runs.items():
        diag = (run or {}).get("diagnostics")
        if diag is None:
            continue
        worst: dict[str, str] = {}
        for check in diag["checks"]:
            if check["verdict"] in ("warn", "fail") and worst.get(check["name"]) != "fail":
                worst[check["name"]] = check["verdict"]
        groups = [f"{v} {', '.join(n for n, w in worst.items() if w == v)}" for v in ("fail", "warn") if v in worst.values()]
        parts.append(f"{preset}: {diag['verdict']}" + (f" ({'; '.join(groups)})" if groups else ""))
    return " / ".join(parts) if parts else "-"


def _seconds(run: dict | None) -> str:
    return "-" if run is None else f"{run['seconds']:.1f}"


def table(rows: list[dict], presets: list[str]) -> str:
    columns = ["model", "mask", "decisions", "threat", "clean % (source)", "true %", "plain PGD %",
               *(f"{p} %" for p in presets), "checks fired", "s PGD", *(f"s {p}" for p in presets)]  # fmt: skip
    right = {c for c in columns if c.endswith("%") or c.startswith("s ")}
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if c in right else "---" for c in columns) + "|"]
    for row in rows:
        clean = row["true"].get("clean_accuracy")
        for spec, threat in zip(row["threat_specs"], row["threats"]):
            cells = [row["model"], row["mask"], row["decisions"], spec, "-" if clean is None else f"{100 * clean:.0f}"]
            cells += [_acc(row["true"], threat)]
            cells += [_acc(row.get("plain_pgd"), threat), *(_acc(row["presets"].get(p), threat) for p in presets)]
            cells += [_fired(row["presets"]), _seconds(row.get("plain_pgd"))]
            cells += [_seconds(row["presets"].get(p)) for p in presets]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _git() -> dict:
    import subprocess

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    changed = [line[3:] for line in git("status", "--porcelain", "--", "robaudit").splitlines()]
    return {"robaudit_commit": commit, "robaudit_uncommitted_changes": changed}


def write(args, rows: list[dict], sources: dict) -> None:
    result = {
        "benchmark": "masking_zoo",
        "n": args.n,
        "seed": args.seed,
        "threads": args.threads,
        "presets": args.presets,
        "checks_api": CHECKS_API,
        "pgd_battery": PGD_TOML,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **args.git_state,
        "sources": sources,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


# --------------------------------------------------------------------------- main


def _available(source: mm.Source) -> bool:
    return source.path.exists() and (not source.fixture or (mm.FIXTURES / "manifest.json").exists())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [*mm.SOURCES, *mm.REGISTRY]
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME",
                        help=f"models to run (default: all): {', '.join(names)}")  # fmt: skip
    parser.add_argument("--presets", nargs="*", default=list(PRESETS), choices=PRESETS,
                        help="robaudit presets to scan the masked models with, trust checks on (default: %(default)s; "
                             "none: only true and plain PGD)")  # fmt: skip
    parser.add_argument("--n", type=int, default=200, help="stratified sample per data set (default 200; the MNIST and "
                        "CIFAR fixture files hold 100)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="sampling and attack seed (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--zoo", type=Path, default=DEFAULT_ZOO, help="masked-model cache (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild every masked file")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default %(default)s)")
    args = parser.parse_args()
    args.git_state = _git()
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    selected = set(args.only or names)
    args.zoo.mkdir(parents=True, exist_ok=True)
    pgd_file = args.zoo / "plain_pgd.toml"
    pgd_file.write_text(PGD_TOML)
    pgd_specs = read_config(pgd_file)["attacks"]
    if not CHECKS_API:
        log("this robaudit has no trust checks yet (ScanConfig.checks): quick/standard run without them")

    rows: list[dict] = []
    sources: dict[str, dict] = {}
    for key, source in mm.SOURCES.items():
        masked_here = [m for m in mm.REGISTRY.values() if m.source == key and m.name in selected]
        if key not in selected and not masked_here:
            continue
        if not _available(source):
            log(f"skipping {key}: {source.path} is not present")
            continue
        n = min(args.n, load_data(source.data, n=None, seed=0).x.shape[0])
        log(f"{key}: standard scan of the unmasked source (the true robustness) ...")
        true = run_scan(source.path, source, n, args.seed, mode="standard", pgd_specs=pgd_specs)
        sources[key] = {"path": str(source.path), "data": source.data, "threats": list(source.threats), "n": n,
                        "mean": source.mean, "std": source.std, "standard": true}  # fmt: skip
        log(f"  robust {true.get('robust_accuracy', true.get('error'))} ({true['seconds']:.1f} s)")

        models = ([(key, "none (control)", source.path, None)] if key in selected else []) + [
            (m.name, m.mask, None, m) for m in masked_here
        ]
        for name, mask, path, masked in models:
            reference = {k: true[k] for k in ("robust_accuracy", "clean_accuracy", "error") if k in true}
            row = {"model": name, "source": key, "mask": mask, "threat_specs": list(source.threats),
                   "threats": [parse_threat(t).canonical for t in source.threats], "n": n,
                   "true": reference, "presets": {}}  # fmt: skip
            if masked is None:
                row.update(decisions="source", decisions_identical=True, randomized=False)
            else:
                try:
                    path, meta = build(masked, args.zoo, args.force, log)
                except Exception as exc:  # noqa: BLE001
                    log(f"  {name}: build FAILED: {type(exc).__name__}: {exc}")
                    row.update(decisions="-", build_error=f"{type(exc).__name__}: {exc}", plain_pgd=None)
                    rows.append(row)
                    continue
                identity = measured_identity(source, masked, path)
                claimed = masked.decisions_identical
                row.update(
                    file=str(path), builder=masked.build.__name__, params=masked.params, randomized=masked.randomized,
                    decisions_identical=claimed, decisions_measured=identity,
                    decisions=("random" if masked.randomized else "identical" if identity["identical"]
                               else f"{100 * identity['agreement']:.1f}% agree"),
                )  # fmt: skip
                if claimed and not identity["identical"]:
                    log(f"  WARNING {name}: registry says decisions are identical but {identity}")
            log(f"{name}: plain PGD (checks off) ...")
            row["plain_pgd"] = run_scan(path, source, n, args.seed, mode="pgd", pgd_specs=pgd_specs)
            for preset in args.presets:
                if masked is None and preset == "standard":
                    row["presets"][preset] = true  # the control's standard scan is its true robustness
                    continue
                log(f"{name}: {preset} (checks {'on' if CHECKS_API else 'not available'}) ...")
                row["presets"][preset] = run_scan(path, source, n, args.seed, mode=preset, pgd_specs=pgd_specs)
            for label, run in [("plain PGD", row["plain_pgd"]), *row["presets"].items()]:
                what = run.get("robust_accuracy") or run.get("error")
                fired = f"; {_fired({label: run})}" if run.get("diagnostics") else ""
                log(f"  {label}: {what} ({run['seconds']:.1f} s){fired}")
            rows.append(row)
            write(args, rows, sources)

    write(args, rows, sources)
    print(table(rows, args.presets))
    print(f"\nresults written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
