"""The command line: parse flags, call the library, render, exit.

Exit codes: 0 all gates passed, 1 a gate check (--fail-under, --max-drop, [gate]) was
missed, 2 bad usage or bad input (one line on stderr, never a traceback), 3 an internal
error.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from robaudit import __version__
from robaudit.errors import RobauditError
from robaudit.progress import LineProgress, RichProgress
from robaudit.threads import quiet_openmp

EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3

app = typer.Typer(
    name="robaudit",
    help="Audit how robust a saved image classifier is against adversarial perturbation.\n\n"
    "Example: robaudit scan model.onnx --data cifar10 --threat linf:8/255 --json report.json",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

stdout = Console()
stderr = Console(stderr=True)


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print one line on stderr and return the exit to raise."""
    line = " ".join(str(message).split())
    stderr.print(f"[bold red]error:[/bold red] {escape(line)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"robaudit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Audit how robust a saved image classifier is against adversarial perturbation."""


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    from robaudit.threats import parse_number

    try:
        values = [parse_number(part) for part in text.split(",") if part.strip()]
    except RobauditError as exc:
        raise RobauditError(f"{flag} '{text}': {exc}") from None
    if not values:
        raise RobauditError(f"{flag} '{text}' needs comma-separated numbers, e.g. 0.5,0.5,0.5")
    return values


def _guard_outputs(outputs: list[Path | None], inputs: list[Path]) -> None:
    """Refuse to write a report over a file the scan reads, or into a folder that is not there."""
    if any(p.suffix.lower() == ".onnx" for p in inputs):  # an ONNX file's weights are inputs too
        from robaudit.models.onnx_file import external_data_files

        inputs = [*inputs, *(extra for p in inputs for extra in external_data_files(p))]
    resolved_inputs = {p.resolve() for p in inputs if p.exists()}
    for out in outputs:
        if out is None:
            continue
        if out.resolve() in resolved_inputs or (out.exists() and any(_same_file(out, p) for p in resolved_inputs)):
            raise RobauditError(f"refusing to write {out}: it is one of the command's inputs")
        if not out.parent.exists():
            raise RobauditError(f"cannot write {out}: folder {out.parent} does not exist")
        if out.is_dir():
            raise RobauditError(f"cannot write {out}: it is a folder")
        _check_writable(out)


def _guard_folders(folders: dict[str, Path | None], outputs: list[Path | None], inputs: list[Path]) -> None:
    """Folders the scan writes into (--plots, --checkpoint) hold none of its inputs, outputs or each other.

    A report written into the checkpoint folder replaced its manifest (the next resume then
    failed), and plots written into an image-folder dataset added files to the user's data.
    """
    def inside(path: Path, folder: Path) -> bool:
        return path.resolve().is_relative_to(folder.resolve())

    named = {flag: folder for flag, folder in folders.items() if folder is not None}
    for flag, folder in named.items():
        for source in inputs:
            if source.is_dir() and inside(folder, source):  # a dataset folder: writing there adds to the user's data
                raise RobauditError(f"{flag} {folder}: the folder lies inside the input folder {source}")
        for out in outputs:
            if out is not None and inside(out, folder):
                raise RobauditError(f"refusing to write {out} inside the {flag} folder {folder}")
        for other, there in named.items():
            if other != flag and inside(there, folder):
                raise RobauditError(f"{other} {there} must not lie inside the {flag} folder {folder}")


def _same_file(a: Path, b: Path) -> bool:
    """The same file under two names (a hard link), by device and inode."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_writable(out: Path) -> None:
    """Find an unwritable output before the scan, not after hours of attacks: create and remove a file beside it."""
    from robaudit.atomic import probe_folder

    try:
        if out.exists() and out.is_file():
            with out.open("ab"):  # opened for appending, nothing written: the file is unchanged
                pass
        if not out.exists() or out.is_file():  # reports are written beside the file, then renamed over it
            probe_folder(out.parent, out.name)
    except OSError as exc:
        raise RobauditError(f"cannot write {out}: {exc.strerror or exc}") from exc


def _distinct_outputs(outputs: dict[str, Path | None]) -> None:
    """Two output flags must not name the same file (the second would silently replace the first)."""
    seen: dict[Path, str] = {}
    for flag, out in outputs.items():
        if out is None:
            continue
        key = out.resolve()
        if key in seen:
            raise RobauditError(f"{seen[key]} and {flag} must be different files")
        seen[key] = flag


def _write_renderings(report, *, junit: Path | None, markdown: Path | None, html_path: Path | None) -> None:
    """The CI outputs of a report: JUnit XML, Markdown, self-contained HTML (docs/ci.md)."""
    if junit is not None:
        from robaudit.report.junit import write_junit

        write_junit(report, junit)
    if markdown is not None:
        from robaudit.report.markdown import write_markdown

        write_markdown(report, markdown)
    if html_path is not None:
        from robaudit.report.html import write_html

        write_html(report, html_path)


def _exit_on_failed_gate(checks) -> None:
    """One `gate failed:` line per missed check on stderr, then exit 1."""
    failed = [c for c in checks if not c.passed]
    for check in failed:
        stderr.print("[bold red]gate failed:[/bold red] " + escape(check.describe()), highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(EXIT_GATE_FAILED)


SCAN_EPILOG = (
    "Examples:\n\n"
    "  robaudit scan robaudit/demo/digits_cnn.onnx --data digits\n\n"
    "  robaudit scan model.onnx --data cifar10 --n 500 --threat linf:8/255 --threat l2:0.5 --json report.json\n\n"
    "  robaudit scan resnet.safetensors --arch resnet18 --num-classes 10 --data ./images "
    "--mean 0.4914,0.4822,0.4465 --std 0.2471,0.2435,0.2616\n\n"
    "  robaudit scan model.onnx --data ./test.npz --fail-under \"robust_accuracy[linf:8/255]=0.40\"\n\n"
    "  robaudit scan model.onnx --data ./test.npz --config audit.toml --baseline base.json "
    "--max-drop \"robust_accuracy[linf:8/255]=0.02\" --junit gate.xml --markdown \"$GITHUB_STEP_SUMMARY\" --html report.html\n\n"
    "  robaudit scan model.onnx --data ./test.npz --preset quick --strict\n\n"
    "Exit codes: 0 passed, 1 a gate check (--fail-under, --max-drop, [gate], --strict) was missed, 2 bad usage or input, "
    "3 internal error. CI recipes: docs/ci.md."
)


@app.command(epilog=SCAN_EPILOG)
def scan(
    model: Annotated[Path, typer.Argument(help="Model file: .onnx, TorchScript .pt, torch.export .pt2, .safetensors or a state dict (.pt/.pth, with --arch).", show_default=False)],
    data: Annotated[str, typer.Option("--data", "-d", metavar="NAME|PATH", help="Built-in dataset (digits, mnist, fashion-mnist, cifar10, cifar100, svhn; test split) or a path: .npz with x and y, .safetensors/.pt tensors, or a folder of images in class sub-folders.")] = "digits",
    threat: Annotated[Optional[list[str]], typer.Option("--threat", "-t", metavar="NORM:EPS", help="Threat NORM:EPS in pixel space, repeatable; fractions allowed. [default: linf:8/255]", show_default=False)] = None,
    n: Annotated[Optional[int], typer.Option("--n", "--samples", help="Stratified sample of N inputs (--samples under torchrun, whose own options take --n). Default: every sample of a file, 1000 of a built-in dataset.", show_default=False)] = None,
    first: Annotated[Optional[int], typer.Option("--first", metavar="N", help="The first N samples in the data's own order instead of a stratified sample (the RobustBench / AutoAttack convention).", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling and random starts (0 to 4294967295); the same seed gives the same report.")] = 0,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Where built-in datasets are cached. [default: $ROBAUDIT_CACHE or ~/.cache/robaudit]", show_default=False)] = None,
    format: Annotated[Optional[str], typer.Option("--format", metavar="FORMAT", help="Override the model format detected from the file: onnx, torchscript, torch-export, safetensors, state-dict, pickle.", show_default=False)] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", metavar="NAME|MODULE:FACTORY", help="Architecture for weights-only files: a torchvision model name (e.g. resnet18) or package.module:factory.", show_default=False)] = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="Number of classes, passed to --arch.", show_default=False)] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow loading a whole pickled module (.pt/.pth). Unpickling runs code from the file: only for files you trust.")] = False,
    mean: Annotated[Optional[str], typer.Option("--mean", metavar="M1,M2,...", help="Per-channel mean the model expects, applied inside the model so attacks work in pixel space, e.g. 0.4914,0.4822,0.4465.", show_default=False)] = None,
    std: Annotated[Optional[str], typer.Option("--std", metavar="S1,S2,...", help="Per-channel std the model expects, e.g. 0.2471,0.2435,0.2616.", show_default=False)] = None,
    input_range: Annotated[str, typer.Option("--input-range", metavar="LO,HI", help="Pixel range LO,HI of the inputs; attacks stay inside it.")] = "0,1",
    preset: Annotated[Optional[str], typer.Option("--preset", metavar="quick|standard|thorough|autoattack", help="Attack battery: quick (FGSM + short APGD), standard (AutoAttack strength: FMN, APGD-CE, APGD-T, Square), thorough (restarts, step-size grid, more queries) or autoattack (AutoAttack standard's attacks and budgets, FMN in FAB-T's place). [default: standard]", show_default=False)] = None,
    config_file: Annotated[Optional[Path], typer.Option("--config", metavar="AUDIT.toml", help="TOML file choosing the preset, attacks and their parameters, and threats (docs/attacks.md); flags override it.", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Override the iterations of every iterative attack.", show_default=False)] = None,
    restarts: Annotated[Optional[int], typer.Option("--restarts", help="Override the random restarts of every randomized attack; each restart runs only on points still robust.", show_default=False)] = None,
    step_sizes: Annotated[Optional[str], typer.Option("--step-sizes", metavar="S1,S2,...", help="Add a PGD run per step size (multiples of eps), e.g. 0.01,0.025,0.1; a point counts as broken if any run breaks it.", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Inputs per batch. [default: 256 on CPU, 1024 on CUDA]", show_default=False)] = None,
    device: Annotated[str, typer.Option("--device", metavar="auto|cpu|cuda", help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", metavar="N", help="CPU threads for torch. [default: the cores this process may use (its CPU affinity mask)]", show_default=False)] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON (schema: docs/report-schema.md).", show_default=False)] = None,
    save_adversarial: Annotated[Optional[Path], typer.Option("--save-adversarial", help="Write the verified adversarial examples to an .npz: <threat>__x, <threat>__index (the sample's index in the data) and <threat>__label (its true class) per threat.", show_default=False)] = None,
    fail_under: Annotated[Optional[list[str]], typer.Option("--fail-under", metavar="METRIC[THREAT]=MIN", help="Gate, repeatable: exit 1 when a metric is below its minimum, e.g. \"robust_accuracy[linf:8/255]=0.40\", \"clean_accuracy=0.9\", \"certified_accuracy[l2:0.5]=0.2\" or \"indicator_score=0.5\" (docs/ci.md).", show_default=False)] = None,
    max_drop: Annotated[Optional[list[str]], typer.Option("--max-drop", metavar="METRIC[THREAT]=DROP", help="Gate against --baseline, repeatable: exit 1 when a metric fell by more than DROP, absolute (0.02), relative to the baseline (5%) or both (0.02,5%), e.g. \"robust_accuracy[linf:8/255]=0.02\"; robust_accuracy without a threat means every threat.", show_default=False)] = None,
    baseline: Annotated[Optional[Path], typer.Option("--baseline", metavar="BASE.json", help="JSON report of an earlier scan that --max-drop and [gate.max_drop] compare with (overrides baseline in [gate]).", show_default=False)] = None,
    force_baseline: Annotated[bool, typer.Option("--force-baseline", help="Gate against a baseline scanned on other data (name, seed or samples differ) anyway.")] = False,
    junit: Annotated[Optional[Path], typer.Option("--junit", metavar="PATH", help="Write the gate as JUnit XML, one test case per check (GitLab, Jenkins).", show_default=False)] = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", metavar="PATH", help="Write a Markdown summary, e.g. --markdown \"$GITHUB_STEP_SUMMARY\" for a GitHub job summary.", show_default=False)] = None,
    html_path: Annotated[Optional[Path], typer.Option("--html", metavar="PATH", help="Write one self-contained HTML page with the plots embedded.", show_default=False)] = None,
    certify: Annotated[Optional[bool], typer.Option("--certify/--no-certify", help="Certified L2 radii (lower bounds no attack can break; docs/certify.md). Default: on when an L2 threat is scanned and a pilot of 8 samples projects no longer than the attacks took (at least 10 s).", show_default=False)] = None,
    certify_budget: Annotated[Optional[str], typer.Option("--certify-budget", metavar="fast|default|tight", help="Work per certificate: more shells and bound evaluations give larger (still sound) radii. [default: default]", show_default=False)] = None,
    indicator: Annotated[Optional[bool], typer.Option("--indicator/--no-indicator", help="Decision-surface indicator (docs/indicator.md): gradient and curvature of the decision function per sample, and a model score. Default: on when the attacks spent at least its cost (about 60 passes per sample).", show_default=False)] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", metavar="DIR", help="Write decision-surface slices (random and attack planes) of the first samples and accuracy-versus-eps curves as PNG into DIR (needs matplotlib: pip install '.[plot]' in a robaudit checkout).", show_default=False)] = None,
    checks: Annotated[bool, typer.Option("--checks/--no-checks", help="Trust checks (docs/trust.md): detect randomized models, probability outputs, masked or shattered gradients and attack failure; adapt (EOT, log-probabilities, surrogate transfer, score- and decision-based attacks) and report pass/warn/fail with evidence. --no-checks runs the battery alone.")] = True,
    strict: Annotated[bool, typer.Option("--strict", help="Fail the gate (exit 1) when any trust check fails: the evaluation itself is not trustworthy.")] = False,
    chunk_size: Annotated[int, typer.Option("--chunk-size", metavar="N", help="Samples audited together with one seed. Results depend on it, never on how many processes share the scan (torchrun, docs/scale.md).")] = 256,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", metavar="DIR", help="Keep every finished chunk in DIR; the same command run again resumes where a killed scan stopped.", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables; errors and failed gates still go to stderr.")] = False,
) -> None:
    """Attack a model on a dataset and report clean and robust accuracy.

    Every adversarial example is re-verified by an independent forward pass before it counts.
    """
    from robaudit.api import build_config
    from robaudit.scan import save_adversarial as write_adversarial, scan as run_scan
    from robaudit.threads import apply_threads

    apply_threads(threads)
    if certify is False and certify_budget is not None:
        raise RobauditError("--certify-budget sets the certificate's work, but --no-certify turns the certificate off; drop one of them")
    lo_hi = _floats(input_range, "--input-range")
    if lo_hi is None or len(lo_hi) != 2:
        raise RobauditError(f"--input-range '{input_range}' needs two numbers LO,HI, e.g. 0,1 or 0,255")
    config = build_config(  # every scan policy (audit file, defaults, gates turning stages on) lives in the API
        model, data, threats=threat, preset=preset, config_file=config_file, fail_under=fail_under or (),
        max_drop=max_drop or (), baseline=baseline, force_baseline=force_baseline, certify=certify, indicator=indicator,
        checks=checks, format=format, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle,
        mean=_floats(mean, "--mean"), std=_floats(std, "--std"), input_range=(lo_hi[0], lo_hi[1]), n=n, first=first, seed=seed,
        data_dir=data_dir, steps=steps, restarts=restarts, step_sizes=_floats(step_sizes, "--step-sizes"),
        batch_size=batch_size, device=device, certify_budget="default" if certify_budget is None else certify_budget, plots=plots, strict=strict,
        chunk_size=chunk_size, checkpoint=checkpoint, keep_adversarial=save_adversarial is not None,
    )  # fmt: skip
    if certify_budget is not None and config.certify == "auto" and not any(t.norm == "l2" for t in config.threats):
        raise RobauditError(
            f"--certify-budget {certify_budget} sets the certificate's work, but without an L2 threat the certificate "
            "runs only with --certify; add --certify or an L2 threat (-t l2:EPS)"
        )
    baseline_path = config.baseline.path if config.baseline is not None else None
    inputs = [model, Path(data), *([config_file] if config_file else []), *([Path(baseline_path)] if baseline_path else [])]
    _guard_outputs([json_path, save_adversarial, junit, markdown, html_path], inputs)
    _distinct_outputs({"--json": json_path, "--save-adversarial": save_adversarial, "--junit": junit, "--markdown": markdown, "--html": html_path})
    _guard_folders({"--plots": plots, "--checkpoint": checkpoint}, [json_path, save_adversarial, junit, markdown, html_path], inputs)

    from robaudit.distributed import RankFailure, join

    _RUNNING.update(started=time.monotonic(), checkpoint=checkpoint)
    cluster = join(device)
    try:
        if quiet or not cluster.is_main:  # one progress display: rank 0's
            result = run_scan(config, cluster=cluster)
        elif not stderr.is_terminal:  # a CI log: one line per finished stage
            started = time.monotonic()
            result = run_scan(config, progress=lambda: LineProgress(started=started), cluster=cluster)
        else:
            # no time-remaining column: later attacks run only on the points still robust, so a linear ETA jumps
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=stderr, transient=True) as progress:
                result = run_scan(config, progress=lambda: RichProgress(progress), cluster=cluster)
    except Exception as exc:  # the ranks this one stops can then say why (`Cluster.stopped`)
        reported = cluster.failure(exc)  # after the launcher's SIGTERM, whatever surfaced: the rank failure
        if reported is not exc:
            raise reported from exc
        if not isinstance(exc, RankFailure):
            said = str(exc) if isinstance(exc, RobauditError) else f"internal error ({type(exc).__name__}: {exc})"
            cluster.report_error(" ".join(said.split())[:500])
        raise
    finally:
        cluster.close()
    if cluster.terminated is not None:  # the SIGTERM's exception was swallowed somewhere, and the scan went on
        raise RankFailure(cluster.terminated)
    if result is None:  # another rank writes the report
        return

    report = result.report
    if not quiet:  # the tables first: a file that cannot be written after all loses nothing on screen
        from robaudit.report.terminal import render

        render(report, stdout)
    if json_path is not None:
        report.write_json(json_path)
    if save_adversarial is not None:
        write_adversarial(save_adversarial, result)
    _write_renderings(report, junit=junit, markdown=markdown, html_path=html_path)
    _exit_on_failed_gate(report.gate)


@app.command(short_help="Show a saved JSON report, or write it as JUnit, Markdown or HTML.", epilog="Examples:\n\n  robaudit report report.json\n\n  robaudit report report.json --html report.html --markdown summary.md --junit gate.xml")
def report(
    path: Annotated[Path, typer.Argument(help="A JSON report written by `robaudit scan --json`.", show_default=False)],
    junit: Annotated[Optional[Path], typer.Option("--junit", metavar="PATH", help="Write its gate checks as JUnit XML.", show_default=False)] = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", metavar="PATH", help="Write a Markdown summary.", show_default=False)] = None,
    html_path: Annotated[Optional[Path], typer.Option("--html", metavar="PATH", help="Write one self-contained HTML page.", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Write the files only, no tables.")] = False,
) -> None:
    """Show a saved JSON report in the terminal, or turn it into JUnit, Markdown or HTML."""
    from robaudit.report.schema import read_report
    from robaudit.report.terminal import render

    _guard_outputs([junit, markdown, html_path], [path])
    _distinct_outputs({"--junit": junit, "--markdown": markdown, "--html": html_path})
    saved = read_report(path)
    _write_renderings(saved, junit=junit, markdown=markdown, html_path=html_path)
    if not quiet:
        render(saved, stdout)


COMPARE_EPILOG = (
    "Examples:\n\n"
    "  robaudit compare base.json new.json\n\n"
    "  robaudit compare base.json new.json --max-drop \"robust_accuracy[linf:8/255]=0.02\" --max-drop \"clean_accuracy=1%\"\n\n"
    "  robaudit compare base.json new.json --config audit.toml --json diff.json --junit compare.xml\n\n"
    "Exit codes: 0 no drop beyond the allowed one, 1 a metric dropped more than allowed, "
    "2 bad usage or input (reports of different data or threats without --force), 3 internal error."
)


@app.command(short_help="Compare two reports: deltas, flipped samples, allowed drops.", epilog=COMPARE_EPILOG)
def compare(
    base: Annotated[Path, typer.Argument(help="The baseline JSON report (robaudit scan --json).", show_default=False)],
    new: Annotated[Path, typer.Argument(help="The new JSON report.", show_default=False)],
    max_drop: Annotated[Optional[list[str]], typer.Option("--max-drop", metavar="METRIC[THREAT]=DROP", help="Allowed drop, repeatable: absolute (0.02), relative to BASE (5%) or both (0.02,5%), e.g. \"robust_accuracy[linf:8/255]=0.02\"; robust_accuracy without a threat means every threat.", show_default=False)] = None,
    config_file: Annotated[Optional[Path], typer.Option("--config", metavar="AUDIT.toml", help="Take the allowed drops from the [gate.max_drop] table of an audit file.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Compare even when the data (name, seed, samples) or the threat settings differ.")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", metavar="PATH", help="Write the comparison as JSON: deltas, flipped samples, checks.", show_default=False)] = None,
    junit: Annotated[Optional[Path], typer.Option("--junit", metavar="PATH", help="Write the drop checks as JUnit XML.", show_default=False)] = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", metavar="PATH", help="Write the comparison as Markdown (e.g. \"$GITHUB_STEP_SUMMARY\").", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No tables; failed checks still go to stderr.")] = False,
) -> None:
    """Compare two reports: metric deltas, samples that flipped from robust to broken, and allowed drops.

    Samples are matched by their index in the source data; reports of different data or threats are refused.
    """
    from robaudit.compare import compare as run_compare, render as render_comparison, write_outputs
    from robaudit.gate import parse_max_drop, read_gate_config
    from robaudit.report.schema import read_report

    rules = [parse_max_drop(f) for f in (max_drop or [])]
    if config_file is not None:
        rules += read_gate_config(config_file).max_drops
    _guard_outputs([json_path, junit, markdown], [base, new, *([config_file] if config_file else [])])
    _distinct_outputs({"--json": json_path, "--junit": junit, "--markdown": markdown})
    result = run_compare(
        read_report(base), read_report(new), base_path=str(base), new_path=str(new), max_drops=rules, force=force
    )
    write_outputs(result, json_path=json_path, junit=junit, markdown=markdown)
    if not quiet:
        render_comparison(result, stdout)
    _exit_on_failed_gate(result.checks)


SURFACE_EPILOG = (
    "Examples:\n\n"
    "  robaudit surface robaudit/demo/digits_cnn.onnx --data digits --index 3\n\n"
    "  robaudit surface natural.onnx robust.onnx --data ./test.npz --index 0 --threat l2:0.5 --png surface.png\n\n"
    "Several models are drawn on the same grid and colour scale. Exit codes: 0 done, 2 bad usage or input."
)


@app.command(short_help="Draw the decision function on two planes through one sample.", epilog=SURFACE_EPILOG)
def surface(
    models: Annotated[list[Path], typer.Argument(help="One or more model files (same formats as scan); compared on one grid and colour scale.", show_default=False)],
    data: Annotated[str, typer.Option("--data", "-d", metavar="NAME|PATH", help="Built-in dataset or a data file/folder, as for scan.")] = "digits",
    index: Annotated[int, typer.Option("--index", "-i", help="Which sample of the data (position in the file or split).")] = 0,
    threat: Annotated[str, typer.Option("--threat", "-t", metavar="NORM:EPS", help="Norm of the attack direction and the default span (2x the ball's L2 radius).")] = "linf:8/255",
    span: Annotated[Optional[float], typer.Option("--span", help="Half-width of the plane in pixel L2 units.", show_default=False)] = None,
    grid: Annotated[int, typer.Option("--grid", help="Grid points per axis (odd, so the sample is on the grid).")] = 41,
    png: Annotated[Optional[Path], typer.Option("--png", help="Also write the slices as a PNG (needs matplotlib: pip install '.[plot]' in a robaudit checkout).", show_default=False)] = None,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Cache of built-in datasets.", show_default=False)] = None,
    format: Annotated[Optional[str], typer.Option("--format", metavar="FORMAT", help="Override the detected model format.", show_default=False)] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", metavar="NAME|MODULE:FACTORY", help="Architecture for weights-only files.", show_default=False)] = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="Number of classes, passed to --arch.", show_default=False)] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow loading a whole pickled module (runs code from the file).")] = False,
    mean: Annotated[Optional[str], typer.Option("--mean", metavar="M1,M2,...", help="Per-channel mean, applied inside the model.", show_default=False)] = None,
    std: Annotated[Optional[str], typer.Option("--std", metavar="S1,S2,...", help="Per-channel std.", show_default=False)] = None,
    input_range: Annotated[str, typer.Option("--input-range", metavar="LO,HI", help="Pixel range of the inputs.")] = "0,1",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random directions.")] = 0,
) -> None:
    """Draw the decision function g = z_y - max z_j on a random plane and on the attack plane through one sample.

    The g = 0 boundary is marked; how far it lies from the sample along the attack direction is the story.
    """
    import torch

    from robaudit.measures import render_terminal, save_png, shared_range
    from robaudit.scan import ScanConfig, check_seed, prepare, resolve_device
    from robaudit.stages.measure import require_matplotlib, surface_pair
    from robaudit.threats import parse_threat

    lo_hi = _floats(input_range, "--input-range")
    if lo_hi is None or len(lo_hi) != 2 or not lo_hi[0] < lo_hi[1]:
        raise RobauditError(f"--input-range '{input_range}' needs two numbers LO,HI with LO < HI")
    check_seed(seed)
    if grid < 3 or grid > 201 or grid % 2 == 0:
        raise RobauditError(f"--grid must be odd and lie between 3 and 201 (so the sample is the centre point), got {grid}")
    if span is not None and not 0 < span < math.inf:
        raise RobauditError(f"--span must be a positive finite number, got {span}")
    parsed = parse_threat(threat)
    if parsed.is_spatial:
        raise RobauditError("surface slices need an Lp threat (linf, l2 or l1) for the attack direction")
    if png is not None:
        require_matplotlib("--png")
        _guard_outputs([png], [*models, Path(data)])
    slices = []
    for path in models:
        config = ScanConfig(
            model=path, data=data, format=format, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle,
            mean=_floats(mean, "--mean"), std=_floats(std, "--std"), input_range=(lo_hi[0], lo_hi[1]),
            data_dir=data_dir, threats=[parsed],
        )  # fmt: skip
        _, dataset, model, _, _ = prepare(config, resolve_device("cpu"))
        if not 0 <= index < len(dataset.y):
            raise RobauditError(f"--index {index} is outside the data (0 to {len(dataset.y) - 1})")
        x, label = dataset.x[index], int(dataset.y[index])
        with torch.no_grad():
            pred = int(model(x.unsqueeze(0)).argmax(1))
        slices += surface_pair(
            model, x, label, parsed, None, lower=lo_hi[0], upper=lo_hi[1], seed=seed, grid=grid, span=span,
            name=f"{path.name} (label {label}, predicted {pred})",
        )  # fmt: skip
    vmin, vmax = shared_range(slices)
    for item in slices:
        render_terminal(item, stdout, vmin=vmin, vmax=vmax)
    if png is not None:
        save_png(slices, png, shared_scale=True)
        stdout.print(f"wrote {escape(str(png))}")


_RUNNING: dict = {}  # set when a scan starts: what Ctrl-C would lose


def _interrupted() -> str:
    """One line on what Ctrl-C cost: the whole scan, or nothing that a rerun with the checkpoint cannot resume."""
    if "started" not in _RUNNING:
        return "interrupted"
    minutes, seconds = divmod(int(time.monotonic() - _RUNNING["started"]), 60)
    after = f"interrupted after {minutes} min {seconds:02d} s: no report written"
    if _RUNNING.get("checkpoint") is not None:
        return f"{after}; finished chunks are kept in {_RUNNING['checkpoint']}: run the same command to resume"
    return f"{after} and the attack results so far are lost (--checkpoint DIR keeps finished chunks for a rerun)"


def _is_usage_error(exc: BaseException) -> bool:
    """Click's usage errors (typer vendors click in recent releases, so match by shape, not class)."""
    return hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)


def main() -> None:
    """Console-script entry point: turns every error into one line and an exit code."""
    quiet_openmp()  # before anything imports torch (docs/benchmarks.md, "Threads and CPU contention")
    # libtorch prints its C++ warnings straight to stderr (e.g. the TorchScript interpreter's about
    # a scripted model's own interpolate call), between the progress lines; errors still show
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    try:
        code = app(standalone_mode=False)
    except RobauditError as exc:
        rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else "0"
        message = str(exc) if rank == "0" or str(exc).startswith("rank ") else f"rank {rank}: {exc}"
        raise SystemExit(_exit_with(fail(message, getattr(exc, "exit_code", EXIT_USAGE)))) from None
    except KeyboardInterrupt:
        stderr.print(_interrupted(), highlight=False, soft_wrap=True)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if type(exc).__name__ == "NoArgsIsHelpError" and getattr(exc, "ctx", None) is not None:
            stdout.print(exc.ctx.get_help(), highlight=False, markup=False)
            raise SystemExit(0) from None
        if _is_usage_error(exc):
            ctx = getattr(exc, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            raise SystemExit(_exit_with(fail(exc.format_message() + hint, exc.exit_code))) from None
        if type(exc).__name__ == "Abort":
            stderr.print("aborted")
            raise SystemExit(130) from None
        if os.environ.get("ROBAUDIT_DEBUG"):
            raise
        message = f"internal error: {exc.__class__.__name__}: {exc} (set ROBAUDIT_DEBUG=1 for the traceback)"
        raise SystemExit(_exit_with(fail(message, EXIT_INTERNAL))) from None
    if code == 130:  # typer turns Ctrl-C into exit code 130 without a word
        stderr.print(_interrupted(), highlight=False, soft_wrap=True)
    raise SystemExit(code if isinstance(code, int) else 0)


def _exit_with(exit_: typer.Exit) -> int:
    return exit_.exit_code


if __name__ == "__main__":
    main()
