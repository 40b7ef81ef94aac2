"""Opening a run: its identity (dataset fingerprint, library versions), a new folder or
the one to resume, the newest baseline, and what a run that stops on an error leaves.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import platform
import warnings
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from audit.config import AuditConfig, ConfigError
from audit.data.manifest import (
    Entries,
)
from audit.runs.history import index_run
from audit.runs.store import RunStore, latest_run


def dataset_fingerprint(entries: Entries) -> tuple[str, str]:
    """Two hashes of the entries table and the files it names, in one pass.

    The identity (the table and every file's size) is what a baseline must share: a
    copy restored without its file times is the same dataset. The version adds the
    modification times (what make and rsync go by): a run key and the face cache are
    keyed on it, so a file rewritten in place, even at the same size, is new data,
    never a reused run's.
    """
    buffer = io.StringIO()
    entries.table.to_csv(buffer, index=False)
    identity, version = hashlib.sha256(), hashlib.sha256()
    for digest in (identity, version):
        digest.update(buffer.getvalue().encode())
    for column, base in (("path", entries.root), ("mask_path", entries.mask_base)):
        if column in entries.table.columns:
            for value in entries.table[column].dropna():
                path = base / str(value)
                try:
                    stat = path.stat()
                except (OSError, ValueError):  # missing or unreadable: a skipped row
                    identity.update(b"-1")
                    version.update(b"-1")
                    continue
                identity.update(str(stat.st_size).encode())
                version.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return identity.hexdigest(), version.hexdigest()


def library_versions() -> dict:
    import audit

    backend = keras.backend.backend()
    versions = {
        "bias_audit": audit.__version__,
        "keras_backend": backend,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    if backend != "tensorflow":
        versions[backend] = importlib.import_module(backend).__version__
    return versions


@contextlib.contextmanager
def failed_on_error(run: RunStore):
    """A run that stops on an error ends ``failed`` with the reason in its manifest
    (``bias-audit history``, the dashboard and ``--resume`` show it), and the error goes
    on up naming the run (``audit.errors.failed_run``). A Ctrl-C leaves it ``running``:
    no process holds it, so it shows as interrupted. Where even the manifest cannot be
    written (the disk full), it shows as interrupted too."""
    try:
        yield
    except Exception as error:
        if run.exists():
            failure = {
                "error": type(error).__name__,
                "message": str(error),
                "at": datetime.now(timezone.utc).isoformat(),
            }
            with contextlib.suppress(AttributeError):  # an exception class with __slots__
                error.failed_run = run.root
            with contextlib.suppress(OSError, ValueError):
                run.update_manifest(status="failed", failure=failure)
                index_run(run.root.parent, run.root)
        raise


def remove_temporaries(run_dir: Path) -> None:
    """The temporary files of writes a killed process left (``atomic_write``'s
    ``.<name>.*.tmp``): the run's lock is held, so no write of it is under way."""
    for temporary in run_dir.rglob(".*.tmp"):
        with contextlib.suppress(OSError):
            temporary.unlink()


def open_run(config: AuditConfig, run_key: str, resume: bool) -> tuple[RunStore, bool]:
    store_root = Path(config.output.store)
    if config.output.run_id:
        run = RunStore(store_root / config.output.run_id)
        if run.exists():
            existing = run.manifest().get("run_key")
            if existing != run_key:
                raise ConfigError(
                    f"run {run.root} exists with a different model, data or config (or was "
                    "made by an earlier bias-audit, whose run keys differ); runs are never "
                    "overwritten: choose another output.run_id"
                )
            if not resume and run.manifest().get("status") != "complete":
                raise ConfigError(f"run {run.root} is incomplete; pass --resume to continue it")
            return run, True
        return run, False
    # A complete run of this key first: one killed since (the same inputs started
    # again) must not make the finished one be computed again.
    previous = latest_run(store_root, run_key, prefer_complete=True)
    if resume and previous is not None:
        return RunStore(previous), True
    if previous is not None and RunStore(previous).manifest().get("status") != "complete":
        warnings.warn(
            f"an unfinished run of the same model, data and config is in {previous}; this "
            "starts a new one (--resume would have continued it)",
            stacklevel=3,
        )
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    name = f"{stamp}-{run_key[:8]}"
    root, count = store_root / name, 1
    while root.exists():  # the same inputs started again within the same second
        count += 1
        root = store_root / f"{name}-{count}"
    return RunStore(root), False


def latest_baseline(config: AuditConfig, fingerprint: str, class_names: list[str]) -> Path:
    """The newest complete run in the store that audited this dataset with the same
    regions and class names: the runs a baseline comparison means something against."""
    from audit.runs.store import baseline_mismatch, latest_run, run_manifests

    store = Path(config.output.store)
    regions = [region.model_dump() for region in config.regions]
    wanted = {"fingerprint": fingerprint, "regions": regions, "class_names": class_names}
    found = latest_run(store, complete=True, **wanted)
    if found is not None:
        return found
    finished = run_manifests(store)[0].values()  # latest_run warned of unreadable ones
    differ = Counter(
        baseline_mismatch(run, **wanted) for run in finished if run.get("status") == "complete"
    )
    why = ", ".join(f"{count} in {what}" for what, count in differ.most_common())
    raise ConfigError(
        f"--baseline latest: no complete run in {store} audited this dataset "
        f"(fingerprint {fingerprint[:12]}) with the same regions "
        f"({', '.join(region['name'] for region in regions)}) and class names "
        f"({f'the complete runs there differ: {why}' if why else 'none is complete'}); "
        "name a run with --baseline RUN, or run this audit once without --baseline "
        "to make the first one"
    )
