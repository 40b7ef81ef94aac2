"""Runs: the audits in the store and the trend of each class's spurious mass."""

import altair as alt
import pandas as pd
import streamlit as st

from audit.report.outcome import INCONCLUSIVE
from dashboard.store import (
    escape_markdown,
    list_runs,
    report,
    selected_run,
    store_path,
    unreadable_runs,
)

store = store_path()
st.title("Runs")
runs = list_runs(str(store))
unreadable = unreadable_runs(str(store))
if unreadable:
    st.warning(
        f"Left out {len(unreadable)} folder(s) whose manifest.json is not a run's (torn, "
        f"edited by hand, or a name no page may open): {escape_markdown(', '.join(unreadable))}. "
        "Restore or remove them."
    )
if not len(runs):
    st.info(
        f"No audit runs in {escape_markdown(store)} yet: run `bias-audit run` or "
        "`bias-audit demo` first."
    )
    st.stop()
selected_run(store)
st.dataframe(runs, hide_index=True, width="stretch")
if (runs["outcome"] == INCONCLUSIVE).any():
    st.warning(
        f"{INCONCLUSIVE}: nothing flagged, but most classes with audited images had too few "
        "images for any test (the `untested` column counts them): no evidence of health. "
        "`--fail-on inconclusive` fails such a run."
    )

st.subheader("Spurious mass per class across runs of a model line")
line = st.selectbox("Model line", sorted(runs["model_line"].unique()))
points = []
for run in runs[(runs["model_line"] == line) & (runs["outcome"] != "n/a")].itertuples():
    result = report(str(store), run.run_id)
    spurious = [r["name"] for r in result["regions"] if r["role"] == "spurious"]
    if not spurious:
        continue
    for entry in result["classes"]:
        points.append(
            {
                "run": f"{run.started} {run.run_id[-8:]}",
                "class": entry["class_name"],
                "region": spurious[0],
                "mass": entry["mass"][spurious[0]]["mean"],
            }
        )
if points:
    trend = pd.DataFrame(points)
    regions = escape_markdown(", ".join(trend["region"].unique()))
    st.caption(
        f"Mean mass on {regions} of correctly predicted images, per class and run "
        "(oldest left); a single run shows as points."
    )
    chart = (
        alt.Chart(trend)
        .mark_line(point=True)
        .encode(
            x=alt.X("run:N", sort="ascending", title="run"),
            y=alt.Y("mass:Q", title="spurious mass"),
            color=alt.Color("class:N"),
            tooltip=["run", "class", "region", alt.Tooltip("mass:Q", format=".2f")],
        )
    )
    st.altair_chart(chart, width="stretch")
else:
    st.caption("No finished run of this model line has a spurious region to trend.")
