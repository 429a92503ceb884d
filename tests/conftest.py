"""Shared fixtures: real model files made by the tests, real data files, and a CLI runner."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle OpenMP threads sleep (docs/benchmarks.md)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# pytest-xdist (`-n auto` in pyproject.toml) runs one worker per core: share the cores
# out, so the workers' intra-op threads do not oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    from robaudit.threads import default_threads

    torch.set_num_threads(max(1, default_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


def fixtures_dir() -> Path:
    """The third-party fixtures beside the checkout; tests skip cleanly when absent."""
    if not (FIXTURES / "manifest.json").exists():
        pytest.skip("../shared/fixtures is not present (a user's own checkout has none)")
    return FIXTURES


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path, timeout: float = 300, env: dict[str, str] | None = None) -> CliResult:
    """Run robaudit in a real subprocess, as a user would."""
    full_env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "robaudit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def assert_one_line_error(result: CliResult, fragment: str | None = None) -> None:
    """Exit 2, exactly one non-empty line on stderr, no traceback."""
    assert result.code == 2, (result.code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert lines[0].startswith("error:"), lines[0]
    if fragment:
        assert fragment.lower() in lines[0].lower(), lines[0]


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    with resources.files("robaudit.data").joinpath("digits_test.npz").open("rb") as handle:
        archive = np.load(handle)
        return archive["x"], archive["y"]


def demo_classifier() -> torch.nn.Module:
    """The shipped demo CNN with its weights, frozen in eval mode (a real trained model)."""
    from safetensors.torch import load_file

    from robaudit.demo import demo_path, digits_cnn

    model = digits_cnn()
    model.load_state_dict(load_file(str(demo_path("digits_cnn.safetensors"))))
    return model.eval().requires_grad_(False)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one intra-op thread; on a busy 2-core machine the
    threads' spin-waiting made forward passes 10-50x slower (measured while developing)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class ModelFiles:
    """One trained digits CNN saved in every format the tests need, plus its own accuracy."""

    onnx: Path
    onnx_batch1: Path
    torchscript: Path
    export: Path
    safetensors: Path
    data_npz: Path
    accuracy: float
    predictions: np.ndarray


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    from safetensors.torch import save_file

    from robaudit.demo import digits_cnn

    root = tmp_path_factory.mktemp("models")
    x_u8, y_np = bundled_digits()
    x = torch.from_numpy(x_u8).float() / 255
    y = torch.from_numpy(y_np).long()
    torch.manual_seed(1)
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):  # a few epochs of full-batch training: a real, imperfect model
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        preds = model(x).argmax(1)
    accuracy = float((preds == y).float().mean())

    files = ModelFiles(
        onnx=root / "cnn.onnx",
        onnx_batch1=root / "cnn_batch1.onnx",
        torchscript=root / "cnn.torchscript.pt",
        export=root / "cnn.pt2",
        safetensors=root / "cnn.safetensors",
        data_npz=root / "digits.npz",
        accuracy=accuracy,
        predictions=preds.numpy(),
    )
    example = torch.zeros(1, 1, 8, 8)
    torch.onnx.export(
        model, (example,), str(files.onnx), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    torch.onnx.export(model, (example,), str(files.onnx_batch1), input_names=["input"], dynamo=False)
    torch.jit.trace(model, example).save(str(files.torchscript))
    torch.export.save(torch.export.export(model, (torch.zeros(4, 1, 8, 8),)), str(files.export))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(files.safetensors))
    np.savez(files.data_npz, x=x_u8, y=y_np)
    return files


# --- CI outputs and `robaudit compare` (tests/test_ci_outputs.py, tests/test_compare.py) ---------------

CI_ATTACKS = """threats = ["linf:0.1", "l2:0.5"]

[[attacks]]
attack = "fmn"
steps = 10

[[attacks]]
attack = "apgd-ce"
steps = 20
"""


@dataclass
class CiScan:
    """One real `robaudit scan` with every CI output, and how it exited."""

    result: CliResult
    json: Path
    junit: Path
    markdown: Path
    html: Path


def degrade_onnx(source: Path, target: Path, noise: float = 0.5, seed: int = 0) -> Path:
    """A deliberately worse copy of an ONNX model: Gaussian noise on every weight tensor."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.ndim >= 2:
            noisy = (w + rng.normal(0.0, noise * float(w.std()), w.shape)).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    onnx.save(model, str(target))
    return target


def _ci_scan(model: Path, data: Path, root: Path, name: str, *args: str | Path) -> CiScan:
    scan = CiScan(
        result=None, json=root / f"{name}.json", junit=root / f"{name}.xml",  # type: ignore[arg-type]
        markdown=root / f"{name}.md", html=root / f"{name}.html",
    )  # fmt: skip
    scan.result = run_cli(
        "scan", model, "--data", data, "--n", "30", "--certify-budget", "fast", "--json", scan.json,
        "--junit", scan.junit, "--markdown", scan.markdown, "--html", scan.html, "-q", *args,
    )  # fmt: skip
    return scan


@pytest.fixture(scope="session")
def ci_base(model_files: ModelFiles, tmp_path_factory: pytest.TempPathFactory) -> CiScan:
    """The baseline: the trained CNN under a [gate] from TOML and a --fail-under flag, one minimum missed."""
    root = tmp_path_factory.mktemp("ci_base")
    config = root / "audit.toml"
    config.write_text(
        CI_ATTACKS
        + "\n[gate.min]\nclean_accuracy = 0.5\n\"robust_accuracy[linf:0.1]\" = 0.99\n"
        + "\"certified_accuracy[l2:0.5]\" = 0.0\nindicator_score = 0.0\n"
    )
    return _ci_scan(
        model_files.onnx, model_files.data_npz, root, "base", "--config", config,
        "--fail-under", "robust_accuracy[l2:0.5]=0.0", "--plots", root / "plots",
    )  # fmt: skip


@pytest.fixture(scope="session")
def ci_degraded(model_files: ModelFiles, ci_base: CiScan, tmp_path_factory: pytest.TempPathFactory) -> CiScan:
    """A noisy copy of the same CNN on the same data and seed, gated by --max-drop 0 against the baseline."""
    root = tmp_path_factory.mktemp("ci_degraded")
    config = root / "attacks.toml"
    config.write_text(CI_ATTACKS)
    model = degrade_onnx(model_files.onnx, root / "degraded.onnx")
    return _ci_scan(
        model, model_files.data_npz, root, "degraded", "--config", config, "--certify", "--indicator",
        "--baseline", ci_base.json, "--max-drop", "robust_accuracy[linf:0.1]=0",
    )  # fmt: skip
