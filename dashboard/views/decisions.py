"""Decisions: record what to do about each flagged class; append-only, shown in later runs."""

from dataclasses import asdict

import pandas as pd
import streamlit as st

from audit.decisions import CHOICES, Decision, model_line, read_decisions, record_decision
from dashboard.store import current_run

store, run, result = current_run()
line = model_line(result["model"]["path"])
st.title("Decisions")
flagged = [e["class_name"] for e in result["classes"] if e["status"] != "ok"]
if flagged:
    with st.form("decision", clear_on_submit=True):
        class_name = st.selectbox("Flagged class", flagged)
        choice = st.selectbox("Decision", list(CHOICES), format_func=CHOICES.get)
        reviewer = st.text_input("Reviewer")
        note = st.text_area("Note (required to accept)")
        if st.form_submit_button("Record decision"):
            try:
                record_decision(
                    store,
                    Decision(
                        model_line=line,
                        class_name=class_name,
                        decision=choice,
                        reviewer=reviewer,
                        note=note,
                        run_id=run,
                    ),
                )
                st.success("Decision recorded.")
            except ValueError as error:
                st.warning(str(error))
else:
    st.success("No flagged class in this run.")

st.subheader("Decisions for this model line")
decisions = read_decisions(store, line)
if decisions:
    st.dataframe(
        pd.DataFrame([asdict(d) for d in reversed(decisions)]), hide_index=True, width="stretch"
    )
else:
    st.caption("No decisions recorded yet.")
