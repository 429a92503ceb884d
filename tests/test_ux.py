"""What a new user meets first: help that fits 80 columns, outputs checked before the scan,
RobustBench-style --first N, an AutoAttack preset, and Ctrl-C saying what was lost."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, assert_one_line_error, run_cli

DEMO = REPO / "robaudit" / "demo" / "digits_cnn.onnx"


@pytest.mark.parametrize("command", ["scan", "report", "compare", "surface"])
def test_help_fits_80_columns_and_names_every_option_in_full(command: str) -> None:
    result = run_cli(command, "--help", env={"COLUMNS": "80"})
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert "…" not in result.stdout and "\\[" not in result.stdout
    from robaudit.cli import app
    import typer.main

    params = typer.main.get_command(app).commands[command].params  # type: ignore[attr-defined]
    for param in params:
        for name in param.opts:
            if name.startswith("-"):
                assert re.search(rf"(^|[\s,/]){re.escape(name)}\b", result.stdout), name
    if command == "scan":
        assert "'.[plot]'" in result.stdout  # the markup no longer swallows [plot]


def test_bare_robaudit_prints_the_help_once() -> None:
    result = run_cli(env={"COLUMNS": "80"})
    assert result.code == 0
    assert result.stdout.count("Usage:") == 1 and "scan" in result.stdout


@pytest.mark.parametrize("flag", ["--json", "--html", "--markdown", "--junit", "--save-adversarial"])
def test_an_unwritable_output_fails_before_the_first_attack(tmp_path: Path, flag: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    started = time.monotonic()
    # a "folder" that is a file, and /proc, where no one (not even root) creates files
    for target in (blocker / "report.out", Path("/proc/robaudit-report.out")):
        result = run_cli("scan", DEMO, "--n", "200", "--preset", "thorough", flag, target)
        assert_one_line_error(result, f"cannot write {target}")
    assert time.monotonic() - started < 60  # a thorough scan of 200 digits would take minutes
    assert blocker.read_text() == "mine"


def test_first_n_and_the_autoattack_preset(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = run_cli("scan", DEMO, "--first", "6", "--preset", "autoattack", "--no-checks", "-q", "--json", out)
    assert result.code == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["data"]["indices"] == [0, 1, 2, 3, 4, 5] and report["config"]["first"] == 6
    linf = [a for a in report["config"]["attacks"] if "linf" in a.get("norms", ["linf"])]  # the entries linf runs
    attacks = [(a["attack"], a["params"].get("steps"), a["restarts"]) for a in linf]
    assert attacks[:4] == [("apgd-ce", 100, 1), ("apgd-t", 100, 1), ("fmn", 100, 1), ("square", None, 1)]
    assert linf[1]["params"]["n_targets"] == 9
    assert linf[3]["params"]["n_queries"] == 5000
    l1 = [(a["attack"], a["restarts"], a["params"].get("n_targets")) for a in report["config"]["attacks"] if a.get("norms") == ["l1"]]
    assert l1 == [("apgd-ce", 5, None), ("apgd-t", 1, 5), ("fab-t", 1, 9)]  # AutoAttack's L1 budgets
    assert_one_line_error(run_cli("scan", DEMO, "--first", "6", "--n", "6"), "--first and --n")


@pytest.mark.parametrize("checkpoint", [False, True])
def test_ctrl_c_says_in_one_line_what_was_lost(tmp_path: Path, checkpoint: bool) -> None:
    extra = ["--checkpoint", str(tmp_path / "ckpt")] if checkpoint else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "robaudit", "scan", str(DEMO), "--n", "300", "--preset", "thorough",
                             "-q", *extra], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    time.sleep(8)  # loaded and attacking
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 130 and len(lines) == 1, stderr
    assert lines[0].startswith("interrupted after") and "no report written" in lines[0]
    assert ("run the same command to resume" in lines[0]) == checkpoint


def test_a_log_without_a_terminal_gets_one_line_per_finished_stage(tmp_path: Path) -> None:
    result = run_cli("scan", DEMO, "--n", "16", "--chunk-size", "8", "--threat", "l2:0.5", "--preset", "quick")
    assert result.code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(re.match(r"^\[\d+:\d\d\] .+: done in \d+\.\d s$", line) for line in lines), lines
    assert any(line.startswith(("[", )) and "chunk 2/2 · attacking l2:0.5 (fgsm, apgd-ce)" in line for line in lines)
    assert any("trust checks · attacking l2:0.5" in line for line in lines)


class _Halve(torch.nn.Module):
    """A scripted model whose float scale_factor makes TorchScript's interpreter warn in C++ on every load."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.nn.functional.interpolate(x, scale_factor=0.5, mode="nearest").flatten(1))


def test_native_torch_warnings_about_the_users_model_stay_out_of_the_log(tmp_path: Path) -> None:
    """libtorch's own C++ warning ("[W... register_prim_ops_fulljit.cpp] Warning: The default behavior for
    interpolate...") came out mid-scan, between the progress lines (hunt of 2026-12-05)."""
    torch.manual_seed(0)
    path = tmp_path / "halve.pt"
    torch.jit.save(torch.jit.script(_Halve().eval()), str(path))
    result = run_cli("scan", path, "--first", "16", "--preset", "quick", "--no-certify", "--data", "digits")
    assert result.code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(re.match(r"^\[\d+:\d\d\] .+: done in \d+\.\d s$", line) for line in lines), lines


def test_the_certificate_line_names_the_methods_that_ran() -> None:
    """The certificate's bar is labelled with the method running on each batch (a batch of a large network can
    take an hour); in a log its one line lists them."""
    result = run_cli("scan", DEMO, "--n", "8", "--threat", "l2:0.5", "--preset", "quick", "--certify",
                     "--certify-budget", "fast")  # fmt: skip
    assert result.code == 0, result.stderr
    line = next((line for line in result.stderr.splitlines() if "certifying L2 radii" in line), None)
    assert line is not None and re.search(r"certifying L2 radii \((interval|crown)(, [a-z-]+)+\): done in", line), (
        result.stderr
    )
