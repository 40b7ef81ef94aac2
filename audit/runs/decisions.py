"""Reviewer decisions: an append-only JSON-lines log in the store (``decisions.jsonl``).

The dashboard appends one line per decision; reports and later runs of the same
model line read them. Lines are never rewritten; the latest decision for a (model
line, class) is the one in force. A line that is not a decision (torn by a killed
writer, edited by hand) is skipped with a warning that names it; every other line
is still read, and the next append starts on a line of its own.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

DECISIONS = "decisions.jsonl"
CHOICES = {
    "retrain-rebalanced": "retrain with rebalanced or augmented data",
    "collect-data": "collect more data",
    "relabel": "relabel",
    "accept": "accept (with a reason)",
}


# A version ends the stem after a separator: v or not, then a number, with more numbers
# after "." or "-" (v3, v2.1, 2026-11-01). Digits that belong to the name stay
# (vgg16, resnet50, efficientnet_b0): another model is another line.
VERSION_SUFFIX = re.compile(r"[-_.][vV]?\d+(?:[.-]\d+)*$")


def model_line(model_path: str) -> str:
    """The model's line: its file stem without a trailing version (``cls_v3`` -> ``cls``,
    ``resnet50_v2.1`` -> ``resnet50``, ``vgg16`` -> ``vgg16``)."""
    stem = Path(model_path).stem
    return VERSION_SUFFIX.sub("", stem) or stem


@dataclass(frozen=True)
class Decision:
    model_line: str
    class_name: str
    decision: str
    reviewer: str
    note: str
    run_id: str
    decided_at: str = ""

    def __post_init__(self) -> None:
        for name in (entry.name for entry in fields(self)):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name} must be text, got {type(value).__name__} {value!r}")
        if self.decision not in CHOICES:
            raise ValueError(f"decision must be one of {', '.join(CHOICES)}, got {self.decision!r}")
        if not self.reviewer.strip():
            raise ValueError("a decision needs the reviewer's name")
        if self.decision == "accept" and not self.note.strip():
            raise ValueError("accepting a flagged class needs a reason in the note")


@dataclass(frozen=True)
class DecisionLog:
    """What the log holds: its decisions, oldest first, and the lines skipped as not a
    decision, as ``(line number, why)``."""

    decisions: list[Decision]
    skipped: list[tuple[int, str]]


def record_decision(store: Path, decision: Decision) -> Decision:
    """Append a decision (timestamped now) as one line; returns what was written."""
    stamped = Decision(**{**asdict(decision), "decided_at": datetime.now(timezone.utc).isoformat()})
    line = (json.dumps(asdict(stamped), ensure_ascii=False) + "\n").encode("utf-8")
    path = Path(store) / DECISIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    # One unbuffered write of one line in append mode: concurrent writers never
    # interleave lines. A last line left without its end (a writer killed mid-line) is
    # ended first, in the same write, so this line never joins it.
    with path.open("a+b", buffering=0) as handle:
        end = handle.seek(0, os.SEEK_END)
        if end:
            handle.seek(end - 1)
            if handle.read(1) != b"\n":
                line = b"\n" + line
        written = handle.write(line)
        if written != len(line):  # a full disk: say so rather than show it recorded
            raise OSError(f"only {written} of {len(line)} bytes of the decision reached {path}")
        os.fsync(handle.fileno())
    return stamped


def read_decision_log(store: Path, line: str | None = None) -> DecisionLog:
    """The log's decisions, oldest first (optionally of one model line), and the lines
    that are not a decision, each skipped with a warning naming the file and the line.

    The log is read as bytes and each line decoded on its own: a torn line, a cut
    UTF-8 character or a field of the wrong type costs that line only.
    """
    path = Path(store) / DECISIONS
    decisions, skipped = [], []
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return DecisionLog(decisions, skipped)
    with handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                decision = Decision(**json.loads(raw.decode("utf-8")))
            except UnicodeDecodeError:
                skipped.append((number, "not UTF-8 text"))
            except json.JSONDecodeError as error:
                skipped.append((number, f"not JSON: {error}"))
            except (TypeError, ValueError, RecursionError) as error:
                skipped.append((number, f"not a decision: {error}"))
            else:
                if line is None or decision.model_line == line:
                    decisions.append(decision)
    for number, why in skipped:
        warnings.warn(
            f"{path}, line {number}: skipped ({why}); the other lines are read. Correct "
            "or delete the line to clear this warning.",
            stacklevel=2,
        )
    return DecisionLog(decisions, skipped)


def read_decisions(store: Path, line: str | None = None) -> list[Decision]:
    """Every decision in the log, oldest first (optionally of one model line); a line
    that is not one is skipped with a warning (``read_decision_log``)."""
    return read_decision_log(store, line).decisions


def latest_decisions(store: Path, line: str) -> dict[str, Decision]:
    """The decision in force per class name for a model line."""
    return {decision.class_name: decision for decision in read_decisions(store, line)}
