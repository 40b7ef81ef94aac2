"""Stage timings the library reports, for benchmarks and profiles to listen to
without patching it.

The audit marks its stages (``stage("analysis: interventions")``) and counts what
they process (``count("forward images", n)``); a listener (``listen``) hears every
start and end with the seconds. With no listener, a stage costs one list check.

    from audit.timing import listen

    def heard(event, name, value):  # event: "start", "end" (value: seconds) or "count"
        ...

    with listen(heard):
        run_audit(config)

Stages may nest (the analysis holds the interventions); a stage entered from several
threads at once (the chunk writes) is heard once per entry.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

Listener = Callable[[str, str, float], None]
_LISTENERS: list[Listener] = []


def _tell(event: str, name: str, value: float) -> None:
    for listener in list(_LISTENERS):
        listener(event, name, value)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark a stage: listeners hear ``("start", name, 0)`` and ``("end", name, seconds)``."""
    if not _LISTENERS:
        yield
        return
    _tell("start", name, 0.0)
    start = time.perf_counter()
    try:
        yield
    finally:
        _tell("end", name, time.perf_counter() - start)


# Counted once each time a compiled program is traced (TensorFlow, JAX): the audit step,
# the analysis's engine, a compiled forward pass, the Guided Grad-CAM gradients.
COMPILES = "compiles"


def compiled() -> None:
    """Report one more trace of a compiled program (``COMPILES``)."""
    count(COMPILES, 1)


def count(name: str, amount: float) -> None:
    """Report ``amount`` more of ``name`` (images a stage saw, rows written)."""
    if _LISTENERS:
        _tell("count", name, amount)


@contextlib.contextmanager
def counting(name: str) -> Iterator[list[float]]:
    """``[total]`` of ``name``'s counts while the block runs (read it after the block)."""
    total = [0.0]

    def heard(event: str, heard_name: str, value: float) -> None:
        if event == "count" and heard_name == name:
            total[0] += value

    with listen(heard):
        yield total


@contextlib.contextmanager
def listen(listener: Listener) -> Iterator[Listener]:
    """Hear every stage and count while the block runs."""
    _LISTENERS.append(listener)
    try:
        yield listener
    finally:
        _LISTENERS.remove(listener)
