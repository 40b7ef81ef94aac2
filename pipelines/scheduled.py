"""``python -m pipelines.scheduled CONFIG``: the scheduled audit of every new model
version (the same as ``bias-audit schedule run CONFIG``), for a cron line or an
orchestrator task. What it does is ``audit.runs.schedule``."""

from audit.errors import guarded
from audit.runs.schedule import main

if __name__ == "__main__":
    raise SystemExit(guarded("schedule", main))
