"""Compare: two runs side by side, new and resolved flags, per-class deltas."""

import streamlit as st

from audit.config import ConfigError
from audit.runs.compare import compare_runs
from dashboard.store import escape_markdown, list_runs, run_path, store_path

store = store_path()
st.title("Compare runs")
runs = list_runs(str(store))
complete = runs[runs["outcome"] != "n/a"]["run_id"].tolist() if len(runs) else []
if len(complete) < 2:
    st.info("The store needs at least two finished runs to compare.")
    st.stop()
left, right = st.columns(2)
old = left.selectbox("Earlier run", complete, index=1)
new = right.selectbox("Later run", complete, index=0)
try:
    result = compare_runs(run_path(store, old), run_path(store, new))
except ConfigError as error:  # runs of other classes: nothing lines up
    st.error(str(error))
    st.stop()
for note in result["notes"]:
    st.warning(escape_markdown(note.removeprefix("note: ")))  # it may name classes
left.metric("Outcome", result["old_outcome"])
right.metric("Outcome", result["new_outcome"])
for title, key in (
    ("New flags (added, or more severe)", "new_flags"),
    ("Resolved flags", "resolved_flags"),
    ("Eased flags (less severe)", "eased_flags"),
):
    st.subheader(title)
    st.dataframe(
        [{"flag": flag, "severity": severity} for flag, severity in result[key].items()],
        hide_index=True,
    )
st.subheader("Per-class deltas of spurious mass")
st.dataframe(result["deltas"], hide_index=True, width="stretch")
