"""A run's outcome (PASS < INCONCLUSIVE < WARN < FAIL) from its class verdicts, and
whether it reaches a ``--fail-on`` level.
"""

from __future__ import annotations

OUTCOMES = {"none": "PASS", "warn": "WARN", "fail": "FAIL"}
INCONCLUSIVE = "INCONCLUSIVE"
NO_IMAGES = "NO IMAGES AUDITED"  # no verdict: every row was skipped
# The gate's order: ``--fail-on LEVEL`` fails a run whose outcome is LEVEL or later.
# INCONCLUSIVE (no flag, but too few images to test most classes) sits below WARN, so
# `--fail-on warn` keeps passing it and `--fail-on inconclusive` is the strict level.
OUTCOME_ORDER = ("PASS", INCONCLUSIVE, "WARN", "FAIL")
FAIL_ON_LEVELS = tuple(outcome.lower() for outcome in OUTCOME_ORDER[1:])


def untested_classes(classes: list[dict]) -> tuple[list[dict], list[dict]]:
    """The classes with audited images (``n`` > 0), and those of them that no test
    could judge (``tested`` false: too few measured images for any test)."""
    audited = [entry for entry in classes if entry["n"]]
    return audited, [entry for entry in audited if entry.get("tested") is False]


def run_outcome(classes: list[dict], severity: str) -> str:
    """The run's outcome from its class verdicts (each with its ``n`` audited images)
    and its overall severity.

    FAIL or WARN as the severity says; otherwise INCONCLUSIVE when more than half of
    the classes with audited images are untested (so when none was tested), else PASS:
    an ``ok`` that no test backs is no evidence of health. NO IMAGES AUDITED when no
    class has an audited image.
    """
    audited, untested = untested_classes(classes)
    if not audited:
        return NO_IMAGES
    if severity != "none":
        return OUTCOMES[severity]
    return INCONCLUSIVE if 2 * len(untested) > len(audited) else "PASS"


def reaches(outcome: str, fail_on: str | None) -> bool:
    """Whether an outcome fails the gate ``fail_on`` (one of FAIL_ON_LEVELS; None or
    "never": no gate). NO IMAGES AUDITED is no verdict and reaches no level."""
    if fail_on in (None, "never") or outcome not in OUTCOME_ORDER:
        return False
    return OUTCOME_ORDER.index(outcome) >= OUTCOME_ORDER.index(fail_on.upper())
