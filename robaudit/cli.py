"""The command line: parse flags, call the library, render, exit.

Exit codes: 0 all gates passed, 1 a --fail-under threshold was missed, 2 bad usage or
bad input (one line on stderr, never a traceback), 3 an internal error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from robaudit import __version__
from robaudit.errors import RobauditError

EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3

app = typer.Typer(
    name="robaudit",
    help="Audit how robust a saved image classifier is against adversarial perturbation.\n\n"
    "Example: [bold]robaudit scan model.onnx --data cifar10 --threat linf:8/255 --json report.json[/bold]",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
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


class RichProgress:
    """A progress sink that draws one bar per threat."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = None

    def start(self, description: str, total: int) -> None:
        self.task = self.progress.add_task(f"attacking {description}", total=total)

    def advance(self, amount: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, amount)

    def finish(self) -> None:
        if self.task is not None:
            task = self.progress.tasks[self.task]
            self.progress.update(self.task, completed=task.total)


def _guard_outputs(outputs: list[Path | None], inputs: list[Path]) -> None:
    """Refuse to write a report over a file the scan reads, or into a folder that is not there."""
    resolved_inputs = {p.resolve() for p in inputs if p.exists()}
    for out in outputs:
        if out is None:
            continue
        if out.resolve() in resolved_inputs:
            raise RobauditError(f"refusing to write {out}: it is one of the scan's inputs")
        if not out.parent.exists():
            raise RobauditError(f"cannot write {out}: folder {out.parent} does not exist")
        if out.is_dir():
            raise RobauditError(f"cannot write {out}: it is a folder")


SCAN_EPILOG = (
    "Examples:\n\n"
    "  robaudit scan robaudit/demo/digits_cnn.onnx --data digits\n\n"
    "  robaudit scan model.onnx --data cifar10 --n 500 --threat linf:8/255 --threat l2:0.5 --json report.json\n\n"
    "  robaudit scan resnet.safetensors --arch resnet18 --num-classes 10 --data ./images "
    "--mean 0.4914,0.4822,0.4465 --std 0.2471,0.2435,0.2616\n\n"
    "  robaudit scan model.onnx --data ./test.npz --fail-under \"robust_accuracy[linf:8/255]=0.40\"\n\n"
    "Exit codes: 0 passed, 1 a --fail-under threshold was missed, 2 bad usage or input, 3 internal error."
)


@app.command(epilog=SCAN_EPILOG)
def scan(
    model: Annotated[Path, typer.Argument(help="Model file: .onnx, TorchScript .pt, torch.export .pt2, .safetensors or a state dict (.pt/.pth, with --arch).", show_default=False)],
    data: Annotated[str, typer.Option("--data", "-d", metavar="NAME|PATH", help="Built-in dataset (digits, mnist, fashion-mnist, cifar10, cifar100, svhn; test split) or a path: .npz with x and y, .safetensors/.pt tensors, or a folder of images in class sub-folders.")] = "digits",
    threat: Annotated[Optional[list[str]], typer.Option("--threat", "-t", metavar="NORM:EPS", help="Threat NORM:EPS in pixel space, repeatable; fractions allowed. \\[default: linf:8/255]", show_default=False)] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="Stratified sample of N inputs. Default: every sample of a file, 1000 of a built-in dataset.", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling and random starts; the same seed gives the same report.")] = 0,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Where built-in datasets are cached. \\[default: $ROBAUDIT_CACHE or ~/.cache/robaudit]", show_default=False)] = None,
    format: Annotated[Optional[str], typer.Option("--format", metavar="FORMAT", help="Override the model format detected from the file: onnx, torchscript, torch-export, safetensors, state-dict, pickle.", show_default=False)] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", metavar="NAME|MODULE:FACTORY", help="Architecture for weights-only files: a torchvision model name (e.g. resnet18) or package.module:factory.", show_default=False)] = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="Number of classes, passed to --arch.", show_default=False)] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow loading a whole pickled module (.pt/.pth). Unpickling runs code from the file: only for files you trust.")] = False,
    mean: Annotated[Optional[str], typer.Option("--mean", metavar="M1,M2,...", help="Per-channel mean the model expects, applied inside the model so attacks work in pixel space, e.g. 0.4914,0.4822,0.4465.", show_default=False)] = None,
    std: Annotated[Optional[str], typer.Option("--std", metavar="S1,S2,...", help="Per-channel std the model expects, e.g. 0.2471,0.2435,0.2616.", show_default=False)] = None,
    input_range: Annotated[str, typer.Option("--input-range", metavar="LO,HI", help="Pixel range LO,HI of the inputs; attacks stay inside it.")] = "0,1",
    preset: Annotated[Optional[str], typer.Option("--preset", metavar="quick|standard|thorough", help="Attack battery: quick (FGSM + short APGD), standard (AutoAttack strength: FMN, APGD-CE, APGD-T, Square) or thorough (restarts, step-size grid, more queries). \\[default: standard]", show_default=False)] = None,
    config_file: Annotated[Optional[Path], typer.Option("--config", metavar="AUDIT.toml", help="TOML file choosing the preset, attacks and their parameters, and threats (docs/attacks.md); flags override it.", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Override the iterations of every iterative attack.", show_default=False)] = None,
    restarts: Annotated[Optional[int], typer.Option("--restarts", help="Override the random restarts of every randomized attack; each restart runs only on points still robust.", show_default=False)] = None,
    step_sizes: Annotated[Optional[str], typer.Option("--step-sizes", metavar="S1,S2,...", help="Add a PGD run per step size (multiples of eps), e.g. 0.01,0.025,0.1; a point counts as broken if any run breaks it.", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Inputs per batch. \\[default: 256 on CPU, 1024 on CUDA]", show_default=False)] = None,
    device: Annotated[str, typer.Option("--device", metavar="auto|cpu|cuda", help="auto, cpu or cuda.")] = "auto",
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON (schema: docs/report-schema.md).", show_default=False)] = None,
    save_adversarial: Annotated[Optional[Path], typer.Option("--save-adversarial", help="Write the verified adversarial examples to an .npz: <threat>__x and <threat>__index per threat.", show_default=False)] = None,
    fail_under: Annotated[Optional[list[str]], typer.Option("--fail-under", metavar="METRIC[THREAT]=MIN", help="Gate, repeatable: exit 1 when a metric is below its minimum, e.g. \"robust_accuracy[linf:8/255]=0.40\" or \"clean_accuracy=0.9\".", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables; errors and failed gates still go to stderr.")] = False,
) -> None:
    """Attack a model on a dataset and report clean and robust accuracy.

    Every adversarial example is re-verified by an independent forward pass before it counts.
    """
    from robaudit.gate import parse_threshold
    from robaudit.scan import DEFAULT_THREAT, ScanConfig, save_adversarial as write_adversarial, scan as run_scan
    from robaudit.threats import parse_threat

    lo_hi = _floats(input_range, "--input-range")
    if lo_hi is None or len(lo_hi) != 2:
        raise RobauditError(f"--input-range '{input_range}' needs two numbers LO,HI, e.g. 0,1 or 0,255")
    from robaudit.battery import DEFAULT_PRESET, read_config

    file_config = read_config(config_file) if config_file is not None else {}
    threat_specs = threat or file_config.get("threats") or [DEFAULT_THREAT]
    attack_specs = None if preset is not None else file_config.get("attacks")
    config = ScanConfig(
        model=model,
        data=data,
        format=format,
        arch=arch,
        num_classes=num_classes,
        trust_pickle=trust_pickle,
        mean=_floats(mean, "--mean"),
        std=_floats(std, "--std"),
        input_range=(lo_hi[0], lo_hi[1]),
        n=n,
        seed=seed,
        data_dir=data_dir,
        threats=[parse_threat(t) for t in threat_specs],
        preset=preset or file_config.get("preset", DEFAULT_PRESET),
        attacks=attack_specs,
        steps=steps,
        restarts=restarts,
        step_sizes=_floats(step_sizes, "--step-sizes"),
        batch_size=batch_size,
        device=device,
        thresholds=[parse_threshold(f) for f in (fail_under or [])],
    )
    inputs = [model, Path(data), *([config_file] if config_file else [])]
    _guard_outputs([json_path, save_adversarial], inputs)
    if json_path is not None and save_adversarial is not None and json_path.resolve() == save_adversarial.resolve():
        raise RobauditError("--json and --save-adversarial must be different files")

    if quiet:
        result = run_scan(config)
    else:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=stderr, transient=True) as progress:
            result = run_scan(config, progress=lambda: RichProgress(progress))

    report = result.report
    if json_path is not None:
        report.write_json(json_path)
    if save_adversarial is not None:
        write_adversarial(save_adversarial, result)
    if not quiet:
        from robaudit.report.terminal import render

        render(report, stdout)
    failed = [c for c in report.gate if not c.passed]
    for check in failed:
        stderr.print(
            f"[bold red]gate failed:[/bold red] "
            + escape(f"{check.metric} = {check.value:.4f} is below {check.threshold:.4f} ({check.expression})"),
            highlight=False,
            soft_wrap=True,
        )
    if failed:
        raise typer.Exit(EXIT_GATE_FAILED)


@app.command(epilog="Example:\n\n  robaudit report report.json")
def report(
    path: Annotated[Path, typer.Argument(help="A JSON report written by `robaudit scan --json`.", show_default=False)],
) -> None:
    """Show a saved JSON report in the terminal."""
    from robaudit.report.schema import read_report
    from robaudit.report.terminal import render

    render(read_report(path), stdout)


def _is_usage_error(exc: BaseException) -> bool:
    """Click's usage errors (typer vendors click in recent releases, so match by shape, not class)."""
    return hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)


def main() -> None:
    """Console-script entry point: turns every error into one line and an exit code."""
    try:
        code = app(standalone_mode=False)
    except RobauditError as exc:
        raise SystemExit(_exit_with(fail(str(exc)))) from None
    except KeyboardInterrupt:
        stderr.print("interrupted")
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
    raise SystemExit(code if isinstance(code, int) else 0)


def _exit_with(exit_: typer.Exit) -> int:
    return exit_.exit_code


if __name__ == "__main__":
    main()
