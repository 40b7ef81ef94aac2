"""The reports of a run, built from its store (never recomputed).

build     report.json: the verdicts with every number and its CI (the source of truth)
outcome   PASS < INCONCLUSIVE < WARN < FAIL, and the --fail-on gate
text      the sentences every report and the dashboard share
markdown  report.md
html      report.html
write     writes the three
summary   the run summary printed by ``bias-audit run``
overlay   CAM overlays of stored maps on their images
"""
