"""Reviewer decisions: an append-only JSON-lines log in the store (``decisions.jsonl``).

The dashboard appends one line per decision; reports and later runs of the same
model line read them. Lines are never rewritten; the latest decision for a (model
line, class) is the one in force.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
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
        if self.decision not in CHOICES:
            raise ValueError(f"decision must be one of {', '.join(CHOICES)}, got {self.decision!r}")
        if not self.reviewer.strip():
            raise ValueError("a decision needs the reviewer's name")
        if self.decision == "accept" and not self.note.strip():
            raise ValueError("accepting a flagged class needs a reason in the note")


def record_decision(store: Path, decision: Decision) -> Decision:
    """Append a decision (timestamped now) as one line; returns what was written."""
    stamped = Decision(**{**asdict(decision), "decided_at": datetime.now(timezone.utc).isoformat()})
    line = json.dumps(asdict(stamped), ensure_ascii=False) + "\n"
    path = Path(store) / DECISIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    # One write of one line in append mode: concurrent writers never interleave lines.
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())
    return stamped


def read_decisions(store: Path, line: str | None = None) -> list[Decision]:
    """Every decision in the log, oldest first (optionally of one model line)."""
    path = Path(store) / DECISIONS
    if not path.exists():
        return []
    decisions = []
    for text in path.read_text(encoding="utf-8").splitlines():
        if not text.strip():
            continue
        try:
            decision = Decision(**json.loads(text))
        except (ValueError, TypeError):
            continue  # a torn or foreign line is ignored, never fatal
        if line is None or decision.model_line == line:
            decisions.append(decision)
    return decisions


def latest_decisions(store: Path, line: str) -> dict[str, Decision]:
    """The decision in force per class name for a model line."""
    return {decision.class_name: decision for decision in read_decisions(store, line)}
