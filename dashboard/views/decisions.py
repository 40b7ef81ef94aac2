"""Decisions: record what to do about each flagged class; append-only, shown in later runs."""

from dataclasses import asdict

import pandas as pd
import streamlit as st

from audit.runs.decisions import (
    CHOICES,
    DECISIONS,
    Decision,
    model_line,
    read_decision_log,
    record_decision,
)
from dashboard.store import current_run, escape_markdown

store, run, result = current_run()
line = model_line(result["model"]["path"])
st.title("Decisions")


def record() -> None:
    """The form's submit callback: it may clear the inputs, which the page body cannot.

    The reviewer and the note stay on a refusal; the note is cleared once recorded.
    """
    state = st.session_state
    try:
        record_decision(
            store,
            Decision(
                model_line=line,
                class_name=state["decision_class"],
                decision=state["decision_choice"],
                reviewer=state["decision_reviewer"],
                note=state["decision_note"],
                run_id=run,
            ),
        )
    except ValueError as error:
        state["decision_outcome"] = ("warning", escape_markdown(error))
    except OSError as error:
        state["decision_outcome"] = (
            "error",
            f"Could not record the decision in {escape_markdown(store / DECISIONS)}: "
            f"{escape_markdown(error.strerror or error)}. Is the store writable?",
        )
    else:
        state["decision_outcome"] = ("success", "Decision recorded.")
        state["decision_note"] = ""


flagged = [e["class_name"] for e in result["classes"] if e["status"] != "ok"]
if flagged:
    with st.form("decision"):
        st.selectbox("Flagged class", flagged, key="decision_class")
        st.selectbox("Decision", list(CHOICES), format_func=CHOICES.get, key="decision_choice")
        st.text_input("Reviewer", key="decision_reviewer")
        st.text_area("Note (required to accept)", key="decision_note")
        st.form_submit_button("Record decision", on_click=record)
    if "decision_outcome" in st.session_state:
        kind, message = st.session_state.pop("decision_outcome")
        getattr(st, kind)(message)  # escaped where it holds user or system text
else:
    st.success("No flagged class in this run.")

st.subheader("Decisions for this model line")
log = read_decision_log(store, line)
if log.skipped:
    numbers = ", ".join(str(number) for number, _ in log.skipped[:10])
    numbers += ", ..." if len(log.skipped) > 10 else ""
    st.warning(
        f"Skipped {len(log.skipped)} line(s) of {escape_markdown(store / DECISIONS)} that are "
        "not a decision (torn by a killed writer, or edited by hand): line(s) "
        f"{escape_markdown(numbers)}. Every other decision is shown; correct or delete "
        "those lines to clear this warning."
    )
decisions = log.decisions
if decisions:
    st.dataframe(
        pd.DataFrame([asdict(d) for d in reversed(decisions)]), hide_index=True, width="stretch"
    )
else:
    st.caption("No decisions recorded yet.")
