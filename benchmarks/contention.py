"""Wall time of the real demo scan under CPU contention, for each thread policy.

The scan is the README quick start with the quick preset, run as the CLI would run it
once ``--threads`` is wired in: a fresh ``python`` process that calls
`robaudit.threads.apply_threads` and then the CLI's ``main()``. Each variant is a
thread count and the environment the process starts with (``OMP_WAIT_POLICY`` must
be set before torch is imported, so it goes in the environment here, as it would at
the top of ``robaudit/__main__.py``). Busy load is N processes running
``while True: pass``; variants are interleaved round by round so that drifting
background load (other jobs on the machine) hits them alike.

    python benchmarks/contention.py                              # N=0 and N=4, 2 rounds
    python benchmarks/contention.py --loads 0 4 --rounds 3 2 --variants default threads=1 passive --json benchmarks/results/contention.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCAN = ["scan", "robaudit/demo/digits_cnn.onnx", "--data", "digits", "--preset", "quick", "--quiet"]

# name -> (thread request passed to apply_threads: None for the default, an int, or "auto"; extra environment).
# "auto" is a candidate policy measured and not adopted: the affinity cores, but no more
# than the 1-minute load average leaves idle.
VARIANTS: dict[str, tuple[object, dict[str, str]]] = {
    "default": (None, {}),
    "threads=1": (1, {}),
    "passive": (None, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "auto+passive": ("auto", {"OMP_WAIT_POLICY": "PASSIVE"}),
}

WRAPPER = """
import os, sys
from robaudit.threads import apply_threads, default_threads
request = {request!r}
if request == "auto":
    request = max(1, min(default_threads(), round(os.cpu_count() - os.getloadavg()[0])))
used = apply_threads(request)
sys.stderr.write(f"robaudit-threads={{used}}\\n")
from robaudit.cli import main
sys.argv = ["robaudit", *sys.argv[1:]]
main()
"""


def start_busy(count: int) -> list[subprocess.Popen]:
    """N single-core spinners: the other jobs of a loaded machine."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def clean_env() -> dict[str, str]:
    """The caller's environment without thread settings, so each variant sets only its own."""
    drop = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def run_scan(request: object, extra_env: dict[str, str], timeout: float) -> dict:
    """One scan in a fresh process; wall seconds, the thread count it used and the report's own timing."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-c", WRAPPER.format(request=request), *SCAN, "--json", str(report)]
        load = os.getloadavg()[0]
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env={**clean_env(), **extra_env}, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - start
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise RuntimeError(f"scan failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
        used = int(next(line for line in done.stderr.splitlines() if line.startswith("robaudit-threads=")).split("=")[1])
        timing = json.loads(report.read_text())["timing"]
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    return {
        "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "threads": used, "loadavg_1min_before": round(load, 2),
        "report_total_s": timing["total_s"],
    }  # fmt: skip


def measure_load(busy: int, variants: list[str], rounds: int, settle: float, timeout: float) -> dict:
    """All variants, interleaved for `rounds` rounds, with `busy` spinners running."""
    procs = start_busy(busy)
    try:
        time.sleep(settle if busy else 0)  # let the 1-minute load average see the spinners
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for r in range(rounds):
            for name in variants:
                request, env = VARIANTS[name]
                runs[name].append(run_scan(request, env, timeout))
                print(f"busy={busy} round={r} {name}: {runs[name][-1]}", flush=True)
    finally:
        stop_busy(procs)
    medians = {name: statistics.median(run["wall_s"] for run in rs) for name, rs in runs.items()}
    base = medians[variants[0]]
    return {
        "busy_processes": busy,
        "median_wall_s": medians,
        "median_cpu_s": {name: statistics.median(run["cpu_s"] for run in rs) for name, rs in runs.items()},
        "ratio_to_" + variants[0]: {name: round(m / base, 3) for name, m in medians.items()},
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 4], help="numbers of busy processes")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, nargs="+", default=[2], help="rounds per load (one number: every load)")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds the spinners run before the first scan")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per scan")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if len(args.rounds) not in (1, len(args.loads)):
        parser.error("--rounds takes one number, or one per load")

    import torch

    results = {
        "description": "wall seconds of the quick demo scan (README quick start, --preset quick) per thread policy, "
        "with N busy 'while True: pass' processes; medians over interleaved rounds",
        "command": "python benchmarks/contention.py " + " ".join(sys.argv[1:]),
        "scan": "python -m robaudit " + " ".join(SCAN),
        "variants": {name: {"threads": str(VARIANTS[name][0]), "env": VARIANTS[name][1]} for name in args.variants},
        "machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "loads": [
            measure_load(n, args.variants, rounds, args.settle, args.timeout)
            for n, rounds in zip(args.loads, args.rounds * len(args.loads) if len(args.rounds) == 1 else args.rounds)
        ],
    }  # fmt: skip
    for load in results["loads"]:
        print(f"N={load['busy_processes']}: median wall s {load['median_wall_s']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
