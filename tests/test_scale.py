"""Scans shared among torchrun ranks, and checkpoints that survive a SIGKILL: real processes only.

The per-sample results must not depend on how many processes ran the scan, and a scan
killed mid-way and run again must give the report an uninterrupted run gives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, CliResult, assert_one_line_error, run_cli

DEMO = REPO / "robaudit" / "demo" / "digits_cnn.onnx"
# 24 samples in 3 chunks of 8: uneven shards on 2 ranks (chunks 0 and 2, and 1); an L2 threat so the
# certificate and the indicator are merged too
SCAN = [
    "scan", DEMO, "--data", "digits", "--samples", "24", "--chunk-size", "8", "--threat", "l2:0.5",
    "--preset", "quick", "--certify", "--certify-budget", "fast", "--indicator", "-q",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "NO_COLOR": "1"}


def comparable(path: Path) -> dict:
    """The report without what may differ between equal scans: wall times, the creation time."""
    report = json.loads(path.read_text())
    report.pop("timing")
    report.pop("created")
    report["config"].pop("checkpoint", None)
    return report


def torchrun(*args: str | Path, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "robaudit", *map(str, args)]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)


# The checkpoint tests below need 3 finished chunks, not their certificate or indicator (a default-budget
# certificate of 24 samples took 30 s of each of their scans)
PLAIN = [*SCAN[:12], "--no-certify", "--no-indicator", "-q"]


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished checkpoint of PLAIN and its report; tests copy it (`finished_checkpoint`) and tamper with the copy."""
    root = tmp_path_factory.mktemp("plain")
    result = run_cli(*PLAIN, "--checkpoint", root / "ck", "--json", root / "report.json", env={"OMP_NUM_THREADS": "1"})
    assert result.code == 0, result.stderr
    return root / "ck", root / "report.json"


def finished_checkpoint(plain_checkpoint: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the module's finished checkpoint."""
    import shutil

    return Path(shutil.copytree(plain_checkpoint[0], tmp_path / "ck"))


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The reference: one process, no checkpoint."""
    out = tmp_path_factory.mktemp("single") / "report.json"
    result = run_cli(*SCAN, "--json", out, env={"OMP_NUM_THREADS": "1"})
    assert result.code == 0, result.stderr
    report = comparable(out)
    assert report["summary"]["certificate"]["available"] and report["summary"]["indicator"] is not None
    assert json.loads(out.read_text())["timing"]["chunks"] == 3
    return report


@pytest.mark.parametrize("ranks", [2, 4])  # 4 ranks for 3 chunks: one rank has nothing to do
def test_gloo_ranks_give_the_single_process_report(single: dict, tmp_path: Path, ranks: int) -> None:
    out = tmp_path / "report.json"
    result = torchrun(*SCAN, "--json", out, nproc=ranks)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(out.read_text())["timing"]["ranks"] == ranks
    assert comparable(out) == single


def test_sigkill_then_resume_gives_the_uninterrupted_report(single: dict, tmp_path: Path) -> None:
    ckpt, out = tmp_path / "ckpt", tmp_path / "report.json"
    proc = subprocess.Popen([sys.executable, "-m", "robaudit", *map(str, SCAN), "--checkpoint", str(ckpt), "--json", str(out)],
                            env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (ckpt / "chunk-000000.attacks.pt").exists():  # the first chunk is done: kill mid-scan
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in ckpt.glob("chunk-*.pt"))
    assert "chunk-000002.final.pt" not in done and not out.exists()

    # resumed on two ranks: chunk files from one process are picked up by whichever rank owns them
    result = torchrun(*SCAN, "--checkpoint", ckpt, "--json", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert comparable(out) == single
    # and once more: everything is in the checkpoint, nothing is attacked again, same report
    again = run_cli(*SCAN, "--checkpoint", ckpt, "--json", tmp_path / "again.json", env={"OMP_NUM_THREADS": "1"})
    assert again.code == 0, again.stderr
    assert comparable(tmp_path / "again.json") == single


def test_a_checkpoint_of_another_scan_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    first = run_cli(*SCAN[:5], "8", "--chunk-size", "8", "--preset", "quick", "--no-checks", "-q", "--checkpoint", ckpt)
    assert first.code == 0, first.stderr
    for change in (["--seed", "1"], ["--threat", "linf:2/255"], ["--preset", "standard"]):
        result = run_cli(*SCAN[:5], "8", "--chunk-size", "8", "--preset", "quick", "--no-checks", "-q", "--checkpoint", ckpt,
                         *change)  # fmt: skip
        assert_one_line_error(result, "was written by another scan")
    cpu = run_cli(*SCAN[:5], "8", "--chunk-size", "8", "--preset", "quick", "--no-checks", "-q", "--checkpoint", ckpt,
                  "--device", "cpu")  # fmt: skip
    assert cpu.code == 0, cpu.stderr  # "auto" resolved to the CPU here: the same device, the same results
    other = tmp_path / "other.onnx"
    other.write_bytes(DEMO.read_bytes())  # the same model under another path: its checkpoint is this one
    same = run_cli("scan", other, *SCAN[2:5], "8", "--chunk-size", "8", "--preset", "quick", "--no-checks", "-q",
                   "--checkpoint", ckpt)  # fmt: skip
    assert same.code == 0, same.stderr


def test_an_audit_file_with_another_preset_does_not_resume_from_the_checkpoint(tmp_path: Path) -> None:
    """With [[attacks]] the preset still sets the trust checks (a strict decision check under standard)."""
    ckpt = tmp_path / "ckpt"
    for preset in ("quick", "standard"):
        (tmp_path / f"{preset}.toml").write_text(f'preset = "{preset}"\n\n[[attacks]]\nattack = "fgsm"\n')
    scan = [*SCAN[:5], "8", "--chunk-size", "8", "--threat", "linf:0.1", "-q", "--checkpoint", ckpt]
    first = run_cli(*scan, "--config", tmp_path / "quick.toml", "--json", tmp_path / "quick.json")
    assert first.code == 0, first.stderr
    assert json.loads((tmp_path / "quick.json").read_text())["config"]["preset"] == "quick"
    assert_one_line_error(run_cli(*scan, "--config", tmp_path / "standard.toml"), "differs in: preset")


def test_a_gate_that_turns_the_certificate_on_may_come_and_go_on_resume(tmp_path: Path) -> None:
    """Gates are not part of a checkpoint, nor is the stage a gate turns on: a CLI review found the checkpoint of a
    scan with a certified gate refused without it ("it differs in: certify"), and the reverse. The resumed scan
    keeps the checkpoint's decision, so its certificate is the first run's."""
    ckpt = tmp_path / "ckpt"
    base = [*SCAN[:5], "8", "--chunk-size", "8", "--threat", "l2:0.3", "--preset", "quick", "--no-checks", "--no-indicator",
            "--certify-budget", "fast", "-q", "--checkpoint", ckpt]  # fmt: skip
    gate = ["--fail-under", "certified_accuracy[l2:0.3]=0"]
    reports = []
    for k, extra in enumerate([gate, [], gate]):
        out = tmp_path / f"run{k}.json"
        result = run_cli(*base, *extra, "--json", out, env={"OMP_NUM_THREADS": "1"})
        assert result.code == 0, result.stderr
        reports.append(json.loads(out.read_text())["summary"]["certificate"])
    assert reports[0]["available"] and reports[0] == reports[1] == reports[2]
    turned_on = run_cli(*base, "--certify", env={"OMP_NUM_THREADS": "1"})  # the user's own flag is part of it
    assert_one_line_error(turned_on, "it differs in: certify")


def test_a_checkpoint_written_by_other_robaudit_code_is_refused(tmp_path: Path) -> None:
    """An edited checkout keeps its version string: its chunks were audited by other attack code."""
    import shutil

    ckpt = tmp_path / "ckpt"
    args = [*SCAN[:5], "8", "--chunk-size", "8", "--preset", "quick", "--no-checks", "-q", "--checkpoint", ckpt]
    assert run_cli(*args).code == 0
    copy = tmp_path / "copy"
    shutil.copytree(REPO / "robaudit", copy / "robaudit", ignore=shutil.ignore_patterns("__pycache__"))
    edited = copy / "robaudit" / "attacks" / "apgd.py"
    edited.write_text(edited.read_text() + "\n# an edit\n")
    result = subprocess.run([sys.executable, "-m", "robaudit", *map(str, args)], capture_output=True, text=True,
                            timeout=300, env=ENV, cwd=copy)  # fmt: skip
    assert_one_line_error(CliResult(result.returncode, result.stdout, result.stderr), "robaudit_code_sha256")


ARCH_FILE = """
import os

import torch.nn as nn


class Scaled(nn.Module):
    def forward(self, x):
        return (x - {mean}) / 0.3081


def build(num_classes=10):
    act = getattr(nn, os.environ.get("MYNET_ACT", "ReLU"))
    return nn.Sequential(Scaled(), nn.Flatten(), nn.Linear(64, 32), act(), nn.Linear(32, num_classes))
"""


def test_a_checkpoint_of_another_network_in_the_same_weights_file_is_refused(tmp_path: Path) -> None:
    """The file's hash cannot see the --arch code or what it reads: an edited or differently built factory
    is another network, however small the edit."""
    from safetensors.torch import save_file

    arch = tmp_path / "mynet.py"
    arch.write_text(ARCH_FILE.format(mean="0.1307"))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    weights = tmp_path / "net.safetensors"
    save_file({f"{int(k[0]) + 1}{k[1:]}": v for k, v in net.state_dict().items()}, str(weights))
    ckpt = tmp_path / "ckpt"
    scan = ["scan", weights, "--arch", f"{arch}:build", "--data", "digits", "--samples", "8", "--preset", "quick",
            "--no-checks", "--no-certify", "-q", "--checkpoint", ckpt]  # fmt: skip
    first = run_cli(*scan)
    assert first.code in (0, 1), first.stderr
    # the same code and weights, another network: seen by what it computes
    assert_one_line_error(run_cli(*scan, env={"MYNET_ACT": "Sigmoid"}), "what the model computes")
    arch.write_text(ARCH_FILE.format(mean="0.1312"))  # a constant moved by 4e-4: seen in the code
    assert_one_line_error(run_cli(*scan), "model_code_sha256")
    arch.write_text(ARCH_FILE.format(mean="0.1307"))  # the network the checkpoint was written for: resumed
    again = run_cli(*scan, "--json", tmp_path / "again.json")
    assert again.code == first.code, again.stderr


def test_a_checkpoint_is_not_reused_for_other_pixels(tmp_path: Path) -> None:
    """An image folder whose files were replaced (same names, same labels) is other data."""
    import numpy as np
    from PIL import Image

    from tests.conftest import bundled_digits

    x, y = bundled_digits()
    folder = tmp_path / "images"

    def write(images: np.ndarray) -> None:
        for i in range(8):
            (folder / str(int(y[i]))).mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i].reshape(8, 8).astype(np.uint8)).save(folder / str(int(y[i])) / f"{i}.png")

    pixels = x[:8].astype(np.float64)  # uint8 digits in 0..255
    write(pixels)
    ckpt = tmp_path / "ckpt"
    scan = ["scan", DEMO, "--data", folder, "--chunk-size", "4", "--preset", "quick", "--no-checks", "--no-certify",
            "-q", "--checkpoint", ckpt]  # fmt: skip
    first = run_cli(*scan)
    assert first.code in (0, 1), first.stderr
    write(255.0 - pixels)  # every file replaced by another image of the same label
    assert_one_line_error(run_cli(*scan), "computed on other pixels")
    write(pixels)
    again = run_cli(*scan)
    assert again.code == first.code, again.stderr


def test_a_non_checkpoint_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    result = run_cli(*SCAN[:5], "8", "--preset", "quick", "--no-checks", "-q", "--checkpoint", folder)
    assert_one_line_error(result, "not empty")
    assert (folder / "notes.txt").read_text() == "mine" and len(list(folder.iterdir())) == 1


def test_a_rank_that_dies_fails_the_run_without_a_report(tmp_path: Path) -> None:
    ckpt, out = tmp_path / "ckpt", tmp_path / "report.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "robaudit",
               *map(str, SCAN), "--checkpoint", str(ckpt), "--json", str(out)]  # fmt: skip
    proc = subprocess.Popen(command, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (ckpt / "manifest.json").exists():  # both ranks are past loading: kill rank 1
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    rank1 = _rank_pid(proc.pid, 1)
    os.kill(rank1, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert not out.exists()
    ours = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "rank 1 (pid" in ours[0] and "died" in ours[0] and "no report written" in ours[0], stderr[-3000:]


def test_the_launchers_sigterm_is_reported_even_where_library_code_swallowed_its_exception() -> None:
    """CI once saw rank 0 end with "internal error: AttributeError: module 'triton.language' has no attribute
    'core'": the SIGTERM's exception was raised inside an import that torch guards with a broad except, and a
    half-imported module failed later. Whatever surfaces after the SIGTERM, the rank failure is reported."""
    from robaudit.distributed import Cluster, RankFailure

    cluster = Cluster(rank=0, world=2)
    try:
        cluster.on_terminate(signal.SIGTERM, None)
    except RankFailure:
        pass  # what a broad `except Exception` in library code does
    assert cluster.terminated and "SIGTERM" in cluster.terminated and "no report written" in cluster.terminated
    reported = cluster.failure(AttributeError("module 'triton.language' has no attribute 'core'"))  # the later symptom
    assert isinstance(reported, RankFailure) and str(reported) == cluster.terminated
    fresh = Cluster(rank=0, world=2)
    error = ValueError("an error of this rank's own")
    assert fresh.failure(error) is error  # without a SIGTERM, errors are this rank's own


def test_a_rank_that_stops_on_an_error_is_named_with_its_error_by_the_others(tmp_path: Path) -> None:
    """Rank 1 cannot read its copy of the model: rank 0 says which rank stopped and why, not just "died"."""
    import torch

    from tests.rank_flaky import FailsOnRank1

    model = tmp_path / "model.pt"
    torch.save(FailsOnRank1(), model)
    out = tmp_path / "report.json"
    result = torchrun("scan", model, "--format", "pickle", "--trust-pickle", "--data", "digits", "--samples", "16",
                      "--preset", "quick", "--no-certify", "-q", "--json", out)  # fmt: skip
    assert result.returncode != 0 and not out.exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert any("corrupt" in line and "rank 0" not in line for line in errors), result.stderr[-3000:]  # rank 1's own
    stopped = [line for line in errors if "so rank 0 stopped too" in line]
    assert len(stopped) == 1 and "rank 1 of 2 stopped:" in stopped[0] and "corrupt" in stopped[0], result.stderr[-3000:]


def _rank_pid(parent: int, rank: int) -> int:
    """The worker process torchrun started with RANK=rank."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in Path("/proc").glob("[0-9]*"):
            try:
                if int((child / "stat").read_text().split(")")[-1].split()[1]) != parent:
                    continue
                environ = (child / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if f"RANK={rank}".encode() in environ:
                return int(child.name)
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank} under {parent}")


class _MaskedWhenBright(torch.nn.Module):
    """The demo CNN, but bright inputs pass through round(): zero gradients there, masking signs."""

    def __init__(self) -> None:
        super().__init__()
        from tests.conftest import demo_classifier

        self.net = demo_classifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x.flatten(1).mean(dim=1) > 0.5).view(-1, *([1] * (x.dim() - 1)))
        return self.net(torch.where(bright, torch.round(x * 4) / 4, x))


def test_masking_seen_in_one_chunk_brings_the_adaptive_battery_to_every_chunk() -> None:
    import numpy as np

    import robaudit
    from tests.conftest import bundled_digits

    x, y = bundled_digits()
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    dark, bright = x[:8] * 0.5, np.clip(x[8:16] * 0.5 + 0.5, 0, 1)  # chunk 0 plain, chunk 1 masked
    data = (np.concatenate([dark, bright]), np.concatenate([y[:8], y[8:16]]))
    report = robaudit.audit(_MaskedWhenBright(), data, threats=["linf:8/255"], preset="quick", chunk_size=8,
                            certify=False, indicator=False)  # fmt: skip
    adaptations = report.summary.diagnostics["adaptations"]
    assert any(a.startswith("gradient masking signs (") for a in adaptations), adaptations  # chunk 1 saw it
    assert any("in another chunk" in a for a in adaptations), adaptations  # chunk 0 was adapted too
    assert report.summary.diagnostics["masking_suspected"]


def test_ranks_that_loaded_other_pixels_stop_with_one_line(tmp_path: Path) -> None:
    """Hunt 18: two machines, the same command on their own copies, one copy mirrored. The report merged both
    (clean accuracy 0.708 for 1.0) and carried rank 0's data digest. Every rank now compares what it loaded."""
    import numpy as np

    from conftest import bundled_digits

    x_u8, y = bundled_digits()
    x = x_u8[:24].astype(np.float32) / 255
    for name, pixels in (("a", x), ("b", x[..., ::-1].copy())):
        (tmp_path / name).mkdir()
        np.savez(tmp_path / name / "data.npz", x=pixels, y=y[:24])
    port = str(29500 + os.getpid() % 400)
    command = [sys.executable, "-m", "robaudit", "scan", str(DEMO), "--data", "data.npz", "--chunk-size", "8",
               "--preset", "quick", "--no-certify", "--no-indicator", "-q"]  # fmt: skip
    procs = [
        subprocess.Popen(command, cwd=tmp_path / name, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
                              "RANK": str(rank), "LOCAL_RANK": str(rank)})  # fmt: skip
        for rank, name in enumerate(("a", "b"))
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "rank 1 loaded other inputs than rank 0 (they differ in: data_sha256)" in lines[0], err


@pytest.mark.parametrize("stage", ["final", "attacks"])
def test_a_chunk_file_copied_over_another_chunks_is_refused(plain_checkpoint, tmp_path: Path, stage: str) -> None:
    """Hunt 18: chunk 2's final file copied over chunk 3's was merged (the indicator of 8 samples was another 8's);
    a copied attacks file ended in an internal error. The file says which chunk it holds."""
    ckpt, scan = finished_checkpoint(plain_checkpoint, tmp_path), PLAIN
    (ckpt / f"chunk-000002.{stage}.pt").write_bytes((ckpt / f"chunk-000001.{stage}.pt").read_bytes())
    result = run_cli(*scan, "--checkpoint", ckpt, env={"OMP_NUM_THREADS": "1"})
    assert_one_line_error(result, "holds chunk 2, not chunk 3")


def test_a_resumed_report_says_how_many_chunks_it_reused(plain_checkpoint, tmp_path: Path) -> None:
    """Hunt 18: nothing in a resumed report said so, and its attack seconds mixed two runs without a word."""
    ckpt, scan = finished_checkpoint(plain_checkpoint, tmp_path), PLAIN
    first, second = plain_checkpoint[1], tmp_path / "second.json"
    for path in ckpt.glob("chunk-000002.*"):
        path.unlink()
    assert run_cli(*scan, "--checkpoint", ckpt, "--json", second, env={"OMP_NUM_THREADS": "1"}).code == 0
    assert json.loads(first.read_text())["timing"]["chunks_resumed"] == 0
    assert json.loads(second.read_text())["timing"]["chunks_resumed"] == 2
    assert comparable(first) == comparable(second)


def test_redoing_a_chunks_attacks_redoes_its_final_pass_and_adaptation(tmp_path: Path) -> None:
    """Red team 2026-12-06: after "delete it to redo that chunk" on an attacks file, the chunk's old final pass was
    kept, so its adaptive battery (masking seen in another chunk) was silently dropped from the resumed report."""
    import numpy as np

    import robaudit
    from tests.conftest import bundled_digits

    x, y = bundled_digits()
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    data = (np.concatenate([x[:8] * 0.5, np.clip(x[8:16] * 0.5 + 0.5, 0, 1)]), np.concatenate([y[:8], y[8:16]]))
    settings = dict(threats=["linf:8/255"], preset="quick", chunk_size=8, certify=False, indicator=False,
                    checkpoint=tmp_path / "ck")  # fmt: skip
    first = robaudit.audit(_MaskedWhenBright(), data, **settings)
    assert any("in another chunk" in a for a in first.summary.diagnostics["adaptations"])
    (tmp_path / "ck" / "chunk-000000.attacks.pt").unlink()
    (tmp_path / "ck" / "chunk-000001.pixels.pt").unlink()  # a chunk without its pixel digest is redone too
    again = robaudit.audit(_MaskedWhenBright(), data, **settings)
    assert again.summary.diagnostics["adaptations"] == first.summary.diagnostics["adaptations"]
    assert again.timing["chunks_resumed"] == 0
    assert [s.threats for s in again.samples] == [s.threats for s in first.samples]


@pytest.mark.parametrize("stage", ["final", "attacks"])
def test_a_chunk_file_of_the_wrong_shape_is_a_one_line_error(plain_checkpoint, tmp_path: Path, stage: str) -> None:
    ckpt, scan = finished_checkpoint(plain_checkpoint, tmp_path), PLAIN
    torch.save({"k": 1, "stop": 16}, ckpt / f"chunk-000001.{stage}.pt")
    result = run_cli(*scan, "--checkpoint", ckpt, env={"OMP_NUM_THREADS": "1"})
    assert_one_line_error(result, f"chunk-000001.{stage}.pt does not hold what robaudit writes there")
    (ckpt / f"chunk-000001.{stage}.pt").unlink()  # as the message says: that chunk is redone
    (ckpt / "decisions.json").write_text("{}")
    assert_one_line_error(run_cli(*scan, "--checkpoint", ckpt, env={"OMP_NUM_THREADS": "1"}), "decisions.json is not robaudit's")


def test_a_checkpoint_folder_in_use_by_another_scan_is_refused(plain_checkpoint, tmp_path: Path) -> None:
    """Red team 2026-12-06: two scans on one folder wrote into each other's chunks; the second now waits its turn."""
    ckpt, scan = finished_checkpoint(plain_checkpoint, tmp_path), PLAIN
    holder = subprocess.Popen(  # a process holding the folder as a running scan's rank 0 does
        [sys.executable, "-c", f"import fcntl, sys, time; h = open({str(ckpt / '.lock')!r}, 'ab'); "
         "fcntl.flock(h, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run_cli(*scan, "--checkpoint", ckpt, env={"OMP_NUM_THREADS": "1"})
        assert_one_line_error(result, "is in use by another robaudit scan right now")
    finally:
        holder.kill()
        holder.wait()
    assert run_cli(*scan, "--checkpoint", ckpt, env={"OMP_NUM_THREADS": "1"}).code == 0  # free again: resumed


def test_a_foreign_folder_gets_no_lock_file(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's")
    assert_one_line_error(run_cli(*PLAIN, "--checkpoint", folder), "holds no robaudit checkpoint")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_a_new_checkpoint_folder_is_made_where_the_system_has_no_file_locks(tmp_path: Path, monkeypatch) -> None:
    """Without fcntl (Windows) the lock is skipped, but the folder must still be made before the manifest."""
    import robaudit.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "fcntl", None)
    root = tmp_path / "new" / "ck"
    store = checkpoint.open_checkpoint(root, {"robaudit": "test"}, is_main=True)
    assert (root / checkpoint.MANIFEST).exists() and not (root / checkpoint.LOCK).exists()
    store.close()
