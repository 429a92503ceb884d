"""Chunk results on disk: the resumable checkpoint folder, and the spool a scan always uses.

Every finished chunk pass is written as one file, atomically (a temporary file in the
same folder, then `os.replace`), so a scan killed at any moment leaves only whole
files. With ``--checkpoint DIR`` the folder is the user's and outlives the scan: the
same command run again loads what is there and audits only the rest. A manifest holds
the scan's fingerprint (model file hash, data and its sample, seed, threats, battery,
chunk size, ...) and a checkpoint written for anything else is refused. Two things a
file hash cannot see are checked as well: what the network computes (an edited `--arch`
file or other class code behind a pickle changes the network, not the file), and the
pixels of every chunk read back (an image folder whose files were replaced).

Files hold plain tensors, lists and JSON text only, read back with
``torch.load(weights_only=True)``: loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from collections.abc import Callable
from typing import IO, Any, TypeVar

import torch

try:
    import fcntl
except ImportError:  # not on Windows: checkpoint folders are then not locked
    fcntl = None

from robaudit.atomic import write_atomic
from robaudit.precision import full_precision
from robaudit.attacks.runner import AttackRecord, MinimalOutcome, ThreatOutcome
from robaudit.checks.verdict import CheckResult
from robaudit.data.dataset import pixel_bytes
from robaudit.errors import RobauditError
from robaudit.report.schema import CertificateSummary
from robaudit.stages.certify import CertifyResult
from robaudit.stages.chunk import ChunkAttacks, ChunkFinal
from robaudit.stages.measure import IndicatorResult
from robaudit.stages.trust import TrustReport
from robaudit.threats import Threat

MANIFEST = "manifest.json"
DECISIONS = "decisions.json"
FORMAT = 1
PROBE_KEY = "model_probe"  # the network's scores on fixed random inputs, compared with a tolerance
PROBE_ROWS = 8
PROBE_RTOL = 1e-5  # of the largest score: above float32 reordering (other thread counts), in full float32 precision
PIXELS = "pixels"  # per-chunk file stage: the digest of the chunk's pixels
LOCK = ".lock"  # rank 0 holds an advisory lock on it while the scan runs (`_hold`)
DECISION_KEYS = {"indicator", "certify", "certify_reason", "masking"}  # what `scan._decide` stores
T = TypeVar("T")


class ChunkStore:
    """Where a scan keeps its finished chunk passes: a checkpoint folder or a private spool."""

    def __init__(self, root: Path, keep: bool, lock: IO[bytes] | None = None) -> None:
        self.root = root
        self.keep = keep  # a user's checkpoint folder stays; a spool is removed by `close`
        self._lock = lock  # rank 0's hold on the folder (`_hold`), released by `close`

    @classmethod
    def spool(cls) -> ChunkStore:
        return cls(Path(tempfile.mkdtemp(prefix="robaudit-spool-")), keep=False)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases its lock
            self._lock = None
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ files
    def _path(self, k: int, stage: str) -> Path:
        return self.root / f"chunk-{k:06d}.{stage}.pt"

    def has(self, k: int, stage: str) -> bool:
        return self._path(k, stage).exists()

    def save(self, k: int, stage: str, payload: dict[str, Any]) -> None:
        try:
            write_atomic(self._path(k, stage), lambda handle: torch.save(payload, handle))
        except OSError as exc:
            raise RobauditError(
                f"--checkpoint {self.root}: cannot write {self._path(k, stage).name} ({exc.strerror or exc}; was the "
                "folder removed or its disk filled?)"
            ) from None

    def load(self, k: int, stage: str) -> dict[str, Any]:
        path = self._path(k, stage)
        try:
            data = torch.load(path, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing problem
            raise RobauditError(f"checkpoint file {path} cannot be read ({type(exc).__name__}); delete it to redo that chunk") from exc
        held = data.get("k") if isinstance(data, dict) else None
        if held is not None and held != k:  # a file copied over another chunk's: its results are for other samples
            raise RobauditError(f"checkpoint file {path} holds chunk {held + 1}, not chunk {k + 1}; delete it to redo that chunk")
        return data

    def read(self, k: int, stage: str, parse: Callable[[dict[str, Any]], T]) -> T:
        """`parse` of a stored chunk file; a file robaudit did not write that way is a one-line error."""
        data = self.load(k, stage)
        try:
            return parse(data)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
            raise RobauditError(
                f"checkpoint file {self._path(k, stage)} does not hold what robaudit writes there "
                f"({type(exc).__name__}); delete it to redo that chunk"
            ) from None

    def discard(self, k: int, stage: str) -> None:
        """Remove a chunk file that no longer matches the others (a final pass of attacks being redone)."""
        self._path(k, stage).unlink(missing_ok=True)

    def missing(self, k: int) -> bool:
        """Whether chunk `k`'s attacks must run (again): no attacks file, or, in a checkpoint, no pixel digest for it."""
        return not self.has(k, "attacks") or (self.keep and not self.has(k, PIXELS))

    def save_pixels(self, k: int, x: torch.Tensor) -> None:
        """Written before the chunk's results, so every stored result has the digest of the pixels it came from."""
        if self.keep:
            self.save(k, PIXELS, {"sha256": pixel_digest(x)})

    def check_pixels(self, k: int, x: torch.Tensor) -> None:
        """Refuse to reuse a chunk's results for pixels other than the ones it was computed on."""
        if not self.keep:
            return
        stored = self.load(k, PIXELS)["sha256"] if self.has(k, PIXELS) else None
        if stored != pixel_digest(x):
            why = "holds no digest of its pixels" if stored is None else "was computed on other pixels (the data changed)"
            raise RobauditError(
                f"--checkpoint {self.root}: chunk {k + 1} ({self._path(k, 'attacks').name}) {why}; use a new folder, "
                "or delete this one to start over"
            )

    def decisions(self) -> dict[str, Any] | None:
        path = self.root / DECISIONS
        if not path.exists():
            return None
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RobauditError(f"--checkpoint {self.root}: {DECISIONS} cannot be read ({exc}); use a new folder") from None
        if not isinstance(found, dict) or not DECISION_KEYS <= set(found):
            raise RobauditError(f"--checkpoint {self.root}: {DECISIONS} is not robaudit's; use a new folder")
        return found

    def save_decisions(self, decisions: dict[str, Any]) -> None:
        write_atomic(self.root / DECISIONS, lambda handle: handle.write(json.dumps(decisions, indent=1).encode()))


def pixel_digest(x: torch.Tensor) -> str:
    return hashlib.sha256(pixel_bytes(x)).hexdigest()


def model_probe(
    model: torch.nn.Module, sample_shape: tuple[int, ...], input_range: tuple[float, float], device: torch.device,
) -> list[list[float]] | None:  # fmt: skip
    """The network's scores on fixed random inputs in the box, or None for a network whose scores are random.

    A checkpoint stores them, so results computed by one network are never reused for
    another that sits in a file with the same hash. The inputs do not come from the data,
    whose changes the per-chunk pixel digests name.
    """
    lower, upper = input_range
    gen = torch.Generator().manual_seed(0)
    x = (lower + (upper - lower) * torch.rand((PROBE_ROWS, *sample_shape), generator=gen)).to(device)
    with torch.no_grad(), torch.random.fork_rng(devices=[]), full_precision():  # no TF32: the same on every card
        scores = []
        for _ in range(2):
            torch.manual_seed(0)
            scores.append(model(x).detach().to("cpu", torch.float64))
    if not torch.equal(scores[0], scores[1]):
        return None
    return scores[0].flatten(1).tolist()


def code_digest(net: torch.nn.Module, arch: str | None) -> str:
    """SHA-256 of the user's Python source behind the network: the `--arch` module and every module class's file.

    The weights file's hash cannot see this code, and an edit to it (another activation,
    another normalization constant) is another network. torch's, torchvision's and
    onnx2torch's own files are left out: they come with the installed versions.
    """
    import inspect
    import sys

    libraries = [Path(m.__file__).resolve().parent for m in _libraries()]
    files: set[Path] = set()
    for module in net.modules():
        try:
            source = inspect.getsourcefile(type(module))
        except (TypeError, OSError):  # a class defined in C or in no file
            source = None
        if source:
            files.add(Path(source).resolve())
    spec = arch.rpartition(":")[0] if arch and ":" in arch else ""
    if spec.endswith(".py"):
        files.add(Path(spec).expanduser().resolve())
    elif spec and getattr(sys.modules.get(spec), "__file__", None):
        files.add(Path(sys.modules[spec].__file__).resolve())
    digest = hashlib.sha256()
    for file in sorted(files):
        if any(file.is_relative_to(lib) for lib in libraries) or not file.is_file():
            continue
        digest.update(str(file).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def robaudit_digest() -> str:
    """SHA-256 of robaudit's own source files: chunks audited by other attack code are not merged.

    The version string stays the same across edits of a development checkout, and ranks
    on several machines may run different installs of one version.
    """
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def _libraries() -> list:
    import importlib

    found = []
    for name in ("torch", "torchvision", "onnx2torch"):
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    return [m for m in found if getattr(m, "__file__", None)]


def _same_probe(found: Any, mine: Any) -> bool:
    if found is None or mine is None:
        return found is None and mine is None
    a, b = torch.tensor(found, dtype=torch.float64), torch.tensor(mine, dtype=torch.float64)
    if a.shape != b.shape:
        return False
    scale = float(a.abs().max()) if a.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=PROBE_RTOL, atol=PROBE_RTOL * scale))


def open_checkpoint(root: Path, fingerprint: dict[str, Any], is_main: bool) -> ChunkStore:
    """Create the checkpoint folder (rank 0) or check that it belongs to this very scan."""
    if root.exists() and not root.is_dir():
        raise RobauditError(f"--checkpoint {root} exists and is not a folder")
    if is_main and not (root / MANIFEST).exists():
        _refuse_foreign(root)  # before the lock file is made: a folder of the user's own stays as it is
    lock = _hold(root) if is_main else None
    try:
        _check_or_create(root, fingerprint, is_main)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return ChunkStore(root, keep=True, lock=lock)


def _check_or_create(root: Path, fingerprint: dict[str, Any], is_main: bool) -> None:
    manifest = root / MANIFEST
    if manifest.exists():
        try:
            found = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise RobauditError(f"--checkpoint {root}: {MANIFEST} cannot be read ({exc}); use an empty folder") from exc
        if not isinstance(found, dict) or not all(isinstance(key, str) for key in found) or not set(found) & set(fingerprint):
            raise RobauditError(f"--checkpoint {root}: {MANIFEST} is not a robaudit checkpoint manifest; use an empty folder")
        differs = [key for key in sorted((set(found) | set(fingerprint)) - {PROBE_KEY}) if found.get(key) != fingerprint.get(key)]
        if PROBE_KEY not in found:
            differs = ["written by an older robaudit, which kept no record of what the model computes"]
        elif not differs and not _same_probe(found.get(PROBE_KEY), fingerprint.get(PROBE_KEY)):
            differs = ["what the model computes (the same file, another network: was its code changed?)"]
        if differs:
            raise RobauditError(
                f"--checkpoint {root} was written by another scan (it differs in: {', '.join(differs)}); "
                "use a new folder, or delete this one to start over"
            )
    elif is_main:
        _refuse_foreign(root)
        try:
            write_atomic(manifest, lambda handle: handle.write(json.dumps(fingerprint, indent=1).encode()))
        except OSError as exc:
            raise RobauditError(f"--checkpoint {root} cannot be written: {exc.strerror or exc}") from exc


def _refuse_foreign(root: Path) -> None:
    if root.exists() and any(p for p in root.iterdir() if not p.name.startswith(".")):
        raise RobauditError(f"--checkpoint {root} is not empty and holds no robaudit checkpoint; use a new folder")


def _hold(root: Path) -> IO[bytes] | None:
    """Rank 0's exclusive hold on a checkpoint folder (an advisory lock on `.lock` in it).

    Makes the folder. Two scans on one folder would write each other's chunks; the second
    is refused while the first runs. The other ranks of the same scan read and write under
    rank 0's hold. None where the system has no such locks (the folder is then used
    unguarded, as before).
    """
    try:
        root.mkdir(parents=True, exist_ok=True)  # also where there are no locks: the manifest goes in it next
        if fcntl is None:
            return None
        handle = open(root / LOCK, "ab")  # noqa: SIM115 - held open for the whole scan
    except OSError as exc:
        raise RobauditError(f"--checkpoint {root} cannot be written: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise RobauditError(
            f"--checkpoint {root} is in use by another robaudit scan right now; wait for it to finish, or use another folder"
        ) from None
    return handle


# ---------------------------------------------------------------------- chunk <-> plain data
def _json(value: Any) -> str:
    return json.dumps(value, default=_plain, allow_nan=True)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def _sparse(x_adv: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Only the rows that hold an adversarial example (the rest is never read)."""
    if x_adv.dim() == 0 or len(x_adv) == 0:
        return {"idx": torch.empty(0, dtype=torch.int64), "rows": torch.empty(0)}
    idx = torch.nonzero(mask).flatten()
    return {"idx": idx, "rows": x_adv[idx].to(torch.float32).contiguous()}


def _dense(stored: dict[str, torch.Tensor], n: int, shape: tuple[int, ...]) -> torch.Tensor:
    out = torch.zeros((n, *shape), dtype=torch.float32)
    if len(stored["idx"]):
        out[stored["idx"]] = stored["rows"]
    return out


def _records(records: list[AttackRecord]) -> str:
    return _json([asdict(r) for r in records])


def _unrecords(text: str) -> list[AttackRecord]:
    return [AttackRecord(**r) for r in json.loads(text)]


def attacks_to_plain(part: ChunkAttacks) -> dict[str, Any]:
    trust = None
    if part.trust is not None:
        trust = _json({**asdict(part.trust), "checks": [asdict(c) for c in part.trust.checks]})
    return {
        "format": FORMAT, "k": part.k, "start": part.start, "stop": part.stop, "seconds": part.seconds,
        "battery_passes": part.battery_passes, "clean_pred": part.clean_pred.cpu(),
        "minimal": {
            norm: {"distance": m.distance, "found_by": _json(m.found_by), "x_adv": _sparse(m.x_adv, torch.isfinite(m.distance)),
                   "records": _records(m.records)}
            for norm, m in part.minimal.items()
        },
        "outcomes": [
            {"threat": o.threat.canonical, "broken": o.broken, "broken_by": _json(o.broken_by), "distance": o.distance,
             "x_adv": _sparse(o.x_adv, o.broken), "records": _records(o.records), "transform": o.transform}
            for o in part.outcomes
        ],
        "trust": trust,
    }  # fmt: skip


def attacks_from_plain(data: dict[str, Any], threats: list[Threat], sample_shape: tuple[int, ...], dense: bool = True) -> ChunkAttacks:
    """A chunk's pass-1 results; ``dense=False`` leaves the adversarial inputs out (they are only needed on disk)."""
    n = data["stop"] - data["start"]
    by_name = {t.canonical: t for t in threats}

    def adv(stored: dict[str, torch.Tensor]) -> torch.Tensor:
        return _dense(stored, n, sample_shape) if dense else torch.empty(0)

    trust = None
    if data["trust"] is not None:
        fields = json.loads(data["trust"])
        fields["checks"] = [CheckResult(**c) for c in fields["checks"]]
        fields["passes"] = tuple(fields["passes"])
        trust = TrustReport(**fields)
    return ChunkAttacks(
        k=data["k"], start=data["start"], stop=data["stop"], clean_pred=data["clean_pred"],
        minimal={
            norm: MinimalOutcome(norm=norm, distance=m["distance"], found_by=json.loads(m["found_by"]), x_adv=adv(m["x_adv"]),
                                 records=_unrecords(m["records"]))
            for norm, m in data["minimal"].items()
        },
        outcomes=[
            ThreatOutcome(threat=by_name[o["threat"]], broken=o["broken"], broken_by=json.loads(o["broken_by"]),
                          distance=o["distance"], x_adv=adv(o["x_adv"]), records=_unrecords(o["records"]),
                          transform=o["transform"])
            for o in data["outcomes"]
        ],
        trust=trust, seconds=data["seconds"], battery_passes=data["battery_passes"],
    )  # fmt: skip


def final_to_plain(final: ChunkFinal) -> dict[str, Any]:
    indicator = None
    if final.indicator is not None:
        indicator = {"summary": _json(final.indicator.summary), "samples": _json(final.indicator.samples),
                     "seconds": final.indicator.seconds}  # fmt: skip
    certified = None
    if final.certified is not None:
        c = final.certified
        certified = {"summary": _json(asdict(c.summary)), "radius": c.radius, "method": c.method,
                     "adversarial_l2": c.adversarial_l2, "seconds": c.seconds}  # fmt: skip
    return {"format": FORMAT, "k": final.k, "indicator": indicator, "certified": certified}


def final_from_plain(data: dict[str, Any]) -> ChunkFinal:
    indicator = None
    if data["indicator"] is not None:
        d = data["indicator"]
        indicator = IndicatorResult(summary=json.loads(d["summary"]), samples=json.loads(d["samples"]), seconds=d["seconds"])
    certified = None
    if data["certified"] is not None:
        d = data["certified"]
        certified = CertifyResult(summary=CertificateSummary(**json.loads(d["summary"])), radius=d["radius"],
                                  method=d["method"], adversarial_l2=d["adversarial_l2"], seconds=d["seconds"])  # fmt: skip
    return ChunkFinal(k=data["k"], indicator=indicator, certified=certified)


def plan_chunks(n: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of every chunk, in sample order."""
    return [(start, min(n, start + size)) for start in range(0, n, size)]

