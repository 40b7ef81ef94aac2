"""Where the audit pass runs, chosen by name (``run_audit(engine=...)``, ``--engine``).

An engine measures the rows still to do (``local.PassWork``) and writes their chunks;
every engine writes the same records.

    local  decode threads feed one compiled step in this process (the default)
    ray    Ray Data: decoding in CPU tasks, the step in actors (``pip install "bias-audit[ray]"``)
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

from audit.config import ConfigError


class Engine(NamedTuple):
    module: str  # imported only when the engine is used (Ray is optional)
    measure: str  # (work, step, address) -> compute seconds
    check: str | None  # (address) -> None, or ConfigError: run before any run folder exists
    compiles_step: bool  # the engine compiles its own steps (the caller need not warm up)


ENGINES = {
    "local": Engine("audit.engines.local", "measure_local", None, compiles_step=False),
    "ray": Engine("audit.engines.ray", "measure_ray", "check_ray_address", compiles_step=True),
}


def engine(name: str) -> Engine:
    """The engine called ``name``, or a ``ConfigError`` listing the engines."""
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; use {' or '.join(ENGINES)}")
    return ENGINES[name]


def check(name: str, address: str | None = None) -> None:
    """What an engine needs before the run starts (Ray: a cluster it can reach at
    ``address``)."""
    chosen = engine(name)
    if chosen.check is not None:
        getattr(importlib.import_module(chosen.module), chosen.check)(address)


def measure(name: str, work, step, address: str | None = None) -> float:
    """Measure ``work`` on the engine ``name`` (``step``: the compiled step, for engines
    that do not compile their own); returns its compute seconds."""
    chosen = engine(name)
    return getattr(importlib.import_module(chosen.module), chosen.measure)(work, step, address)
