"""Runs: the audits in the store and the trend of each class's spurious mass."""

import pandas as pd
import streamlit as st

from dashboard.store import list_runs, report, selected_run, store_path

store = store_path()
st.title("Runs")
runs = list_runs(str(store))
if not len(runs):
    st.info(f"No audit runs in {store} yet: run `bias-audit run` or `bias-audit demo` first.")
    st.stop()
selected_run(store)
st.dataframe(runs, hide_index=True, width="stretch")

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
                f"mass_{spurious[0]}": entry["mass"][spurious[0]]["mean"],
            }
        )
if points:
    trend = pd.DataFrame(points)
    value = trend.columns[-1]
    st.caption(f"{value}: mean on correctly predicted images, per class and run (oldest left)")
    st.line_chart(trend.pivot_table(index="run", columns="class", values=value).sort_index())
