"""The run store: one folder per run, written atomically, resumable, never pickled.

    STORE/<run_id>/manifest.json     config, model hash, dataset fingerprint, versions,
                                     timings, status (running | complete | failed,
                                     with the reason in ``failure``), the process
                                     that last computed it (for messages)
    STORE/<run_id>/.lock             held (flock) while a process computes the run: a
                                     running run that none holds shows as interrupted
    STORE/<run_id>/images.parquet    one row per entry: prediction and metrics, or skip reason
    STORE/<run_id>/cams/part-*.npz   low-res fp16 CAMs with their row numbers
    STORE/<run_id>/parts/part-*.parquet   per-chunk rows while running (resume reads them)

A chunk's rows and CAMs are written (temp file + rename) before the next chunk
starts, so a killed run resumes at the first missing chunk, and the final
``images.parquet`` is assembled from the parts in row order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

MANIFEST = "manifest.json"
IMAGES = "images.parquet"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; runs are shared read-only
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, default=str)))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    if path.is_dir():  # a SavedModel folder: hash its files in order
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(child.relative_to(path).as_posix().encode())
            digest.update(file_sha256(child).encode())
        return digest.hexdigest()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RunStore:
    """One run's folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> dict:
        return read_json(self.manifest_path)

    def write_manifest(self, payload: dict) -> None:
        write_json(self.manifest_path, payload)

    def update_manifest(self, **changes) -> dict:
        payload = self.manifest() | changes
        self.write_manifest(payload)
        return payload

    def part_path(self, chunk: int) -> Path:
        return self.root / "parts" / f"part-{chunk:06d}.parquet"

    def cams_path(self, chunk: int) -> Path:
        return self.root / "cams" / f"part-{chunk:06d}.npz"

    def done_chunks(self) -> set[int]:
        """Chunks whose rows and CAMs are both on disk."""
        parts = self.root / "parts"
        if not parts.exists():
            return set()
        done = set()
        for part in parts.glob("part-*.parquet"):
            chunk = int(part.stem.split("-")[1])
            if self.cams_path(chunk).exists():
                done.add(chunk)
        return done

    def write_chunk(self, chunk: int, rows: pd.DataFrame, cam_rows, cams: np.ndarray) -> None:
        """CAMs first, rows second: a part file means its chunk is complete."""

        def save_cams(tmp: Path) -> None:
            with tmp.open("wb") as handle:
                np.savez(handle, rows=np.asarray(cam_rows, dtype="int64"), maps=cams)

        atomic_write(self.cams_path(chunk), save_cams)
        atomic_write(self.part_path(chunk), lambda tmp: rows.to_parquet(tmp, index=False))

    def assemble(self) -> pd.DataFrame:
        """Join the parts into ``images.parquet``, sorted by row."""
        parts = sorted((self.root / "parts").glob("part-*.parquet"))
        table = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
        table = table.sort_values("row", kind="stable").reset_index(drop=True)
        atomic_write(self.root / IMAGES, lambda tmp: table.to_parquet(tmp, index=False))
        return table

    def images(self) -> pd.DataFrame:
        return pd.read_parquet(self.root / IMAGES)

    def cams(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, maps) of every stored CAM, in row order."""
        rows, maps = [], []
        for part in sorted((self.root / "cams").glob("part-*.npz")):
            with np.load(part, allow_pickle=False) as data:
                rows.append(data["rows"])
                maps.append(data["maps"])
        if not rows:
            return np.zeros(0, "int64"), np.zeros((0, 0, 0), "float16")
        rows_all, maps_all = np.concatenate(rows), np.concatenate(maps)
        order = np.argsort(rows_all, kind="stable")
        return rows_all[order], maps_all[order]


def baseline_mismatch(
    manifest: dict,
    *,
    fingerprint: str | None = None,
    regions: list[dict] | None = None,
    class_names: list[str] | None = None,
) -> str | None:
    """What keeps a run (its ``manifest.json``) from being a baseline for an audit with
    this dataset fingerprint, these regions and these class names: ``"dataset"``,
    ``"regions"`` or ``"class names"``; None when it fits (values not given are not
    compared)."""
    if fingerprint is not None and manifest.get("dataset", {}).get("fingerprint") != fingerprint:
        return "dataset"
    # Through JSON, as the manifest holds them (tuples are lists there).
    if regions is not None and manifest.get("regions") != json.loads(json.dumps(regions)):
        return "regions"
    if class_names is not None and manifest.get("class_names") != list(class_names):
        return "class names"
    return None


def run_manifests(store: Path) -> tuple[dict[Path, dict], dict[Path, str]]:
    """Every run folder in ``store`` with its manifest, and the folders whose
    ``manifest.json`` is not a JSON object (torn, hand-edited) with why, each in
    folder order."""
    manifests, unreadable = {}, {}
    for path in sorted(Path(store).glob(f"*/{MANIFEST}")):
        try:
            manifest = read_json(path)
        except FileNotFoundError:
            continue  # deleted meanwhile
        except (OSError, ValueError) as error:
            unreadable[path.parent] = str(error)
            continue
        if isinstance(manifest, dict):
            manifests[path.parent] = manifest
        else:
            unreadable[path.parent] = f"JSON of type {type(manifest).__name__}, not an object"
    return manifests, unreadable


def latest_run(
    store: Path,
    key: str | None = None,
    complete: bool = False,
    *,
    prefer_complete: bool = False,
    fingerprint: str | None = None,
    regions: list[dict] | None = None,
    class_names: list[str] | None = None,
) -> Path | None:
    """The newest run folder in ``store`` (optionally with this run key, or complete
    with at least one audited image).

    ``prefer_complete``: the newest complete run if there is one (audited images or
    not), else the newest unfinished one: what resuming a run key means, since a
    finished run of it is never computed again.

    ``fingerprint``, ``regions`` and ``class_names``, when given, keep only runs that
    audited the same dataset with the same regions and classes (``baseline_mismatch``):
    the runs a baseline comparison is meaningful against.

    A folder whose manifest cannot be read as a JSON object (a disk filled up, a hand
    edit) is skipped with a warning naming it: one broken folder never blocks new runs.
    """
    runs = []
    manifests, unreadable = run_manifests(store)
    for folder, why in unreadable.items():
        warnings.warn(f"{folder / MANIFEST}: skipped, not a run's manifest ({why})", stacklevel=2)
    for folder, payload in manifests.items():
        if complete and (
            payload.get("status") != "complete" or payload.get("counts", {}).get("ok") == 0
        ):
            continue  # a run with no audited image is no baseline
        if key is not None and payload.get("run_key") != key:
            continue
        wanted = {"fingerprint": fingerprint, "regions": regions, "class_names": class_names}
        if baseline_mismatch(payload, **wanted) is None:
            finished = prefer_complete and payload.get("status") == "complete"
            runs.append((finished, payload.get("started", ""), folder))
    return max(runs)[-1] if runs else None


LOCK = ".lock"


class RunBusyError(RuntimeError):
    """Another process holds the run's lock: it is computing that run now."""


def this_process() -> dict:
    """What a manifest records of the process computing its run (for messages only)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def hold_run(run_dir: Path, wait: float = 2.0):
    """Take the run's lock (``RUN/.lock``, an advisory ``flock``) for this process.

    Returns the open lock file: the lock lasts until it is closed (use it as a context
    manager) or the process ends, however it ends (the kernel releases it), so a killed
    run is never mistaken for a running one. Raises ``RunBusyError`` when another process
    holds it for ``wait`` seconds (readers asking ``run_locked`` hold it for an instant).
    Where there is no ``fcntl`` (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:
        return contextlib.nullcontext()
    handle = open(Path(run_dir) / LOCK, "a+")  # noqa: SIM115 - the caller closes it
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                raise RunBusyError(f"run {run_dir} is being computed by another process") from None
            time.sleep(0.05)


def run_locked(run_dir: Path) -> bool | None:
    """Whether a process holds the run's lock now; None where this cannot be told (no
    ``fcntl``, or no lock file: a run from before runs were locked)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        handle = open(Path(run_dir) / LOCK)  # noqa: SIM115 - closed below
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released by closing
        except BlockingIOError:
            return True
        except OSError:
            return None
    return False


def failure_text(manifest: dict) -> str | None:
    """Why a failed run stopped (its manifest's ``failure``) as one line
    (``RuntimeError: ...``); None for any other run."""
    failure = manifest.get("failure") if manifest.get("status") == "failed" else None
    if not isinstance(failure, dict):
        return None
    return f"{failure.get('error', 'error')}: {failure.get('message', '')}"


def run_state(run_dir: Path, manifest: dict | None = None) -> str | None:
    """The run's status as shown: its manifest's (``running``, ``complete``, or
    ``failed``: stopped on an error, the reason in its ``failure``), except
    ``interrupted`` for a running run that no process holds (killed: ``--resume``
    continues it)."""
    if manifest is None:
        manifest = read_json(Path(run_dir) / MANIFEST)
    status = manifest.get("status")
    if status == "running" and run_locked(run_dir) is False:
        return "interrupted"
    return status
