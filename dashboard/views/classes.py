"""Classes: the per-class table of a run, sortable, with CI bars, and the slice tables."""

import altair as alt
import pandas as pd
import streamlit as st

from audit.analysis.verdicts import SEVERITY_ORDER
from audit.measure import spec
from audit.report.build import metric_cis
from audit.report.outcome import INCONCLUSIVE
from audit.report.text import drives_text, outcome_reason, status_text, trust_lines, with_ci
from audit.runs.decisions import latest_decisions, model_line
from dashboard.store import current_run, escape_markdown

TWO_DIGITS = st.column_config.NumberColumn(format="%.2f")
THREE_DIGITS = st.column_config.NumberColumn(format="%.3f")
RATES = ("accuracy", "precision", "loc_error")


def two_digits(table: pd.DataFrame) -> dict:
    """Means and rates and their 95% CI bounds (``*_low``, ``*_high``) with two decimals."""
    return {
        column: TWO_DIGITS
        for column in table.columns
        if column.startswith((*(f"{name}_" for name in spec.names()), "bg_gap", "transplant"))
        or column.removesuffix("_low").removesuffix("_high").endswith(RATES)
    }


store, run, result = current_run()
st.title("Classes")
st.caption(f"Run {escape_markdown(run)}: outcome {result['outcome']}")
reason = outcome_reason(result)
if reason:
    st.warning(f"{INCONCLUSIVE}: nothing flagged, but {escape_markdown(reason)}.")
spurious = [r["name"] for r in result["regions"] if r["role"] == "spurious"]
trust = result.get("trust")
with st.expander(f"Trust in the maps: {trust['verdict'] if trust else 'not checked'}"):
    for line in trust_lines(trust):
        st.text(line)
    if trust and trust["verdict"] == "untrusted":
        st.warning("Every heatmap flag of this run has low confidence.")
# The decision in force now (decisions.jsonl), not the one in the report's snapshot.
decisions = latest_decisions(store, model_line(result["model"]["path"]))
view = st.radio("View", ["true label", "predicted label"], horizontal=True)
key = "true_label" if view == "true label" else "predicted_label"

rows = []
for entry in result["classes"]:
    side = entry[key]
    tests = [t for t in entry["tests"] if t["kind"] == ("true" if key == "true_label" else "pred")]
    q_values = [t["q_value"] for t in tests if t.get("q_value") is not None]
    effects = [t["effect_low"] for t in tests if t.get("effect_low") is not None]
    rate = "accuracy" if key == "true_label" else "precision"
    # The columns a reviewer reads first come first (status, evidence, decision): the
    # table is wider than a page.
    row = {
        "class": entry["class_name"],
        "status": status_text(entry),
        # Every test of the class with its numbers, in one line (dataframe cells are text).
        "evidence": entry.get("evidence"),
        "decision": getattr(decisions.get(entry["class_name"]), "decision", None),
        "n": side["n"],
        **{name: side.get(name) for name in (rate, f"{rate}_low", f"{rate}_high")},
    }
    # The metrics shown for each region's role (audit.measure.spec), with their CIs.
    for metric in spec.metrics(aggregated=True):
        cis = metric_cis(side, metric)
        for region in result["regions"]:
            if cis and region["role"] in metric.shown_for:
                ci, column = cis[region["name"]], spec.column(metric.name, region["name"])
                row |= {column: ci["mean"], f"{column}_low": ci["low"]}
                row[f"{column}_high"] = ci["high"]
    row |= {
        **{
            name: (entry["interventions"] or {}).get(name)
            for name in ("bg_gap", "bg_gap_low", "bg_gap_high")
        },
        **{
            name: (entry["interventions"] or {}).get(name)
            for name in ("transplant_excess", "transplant_excess_low", "transplant_excess_high")
        },
        "q_value": min(q_values) if q_values else None,
        "effect_ci_low": max(effects) if effects else None,
        "zero_maps": side.get("n_zero_map"),
        "confidence": entry.get("confidence", "normal"),
        **{name: side.get(name) for name in ("loc_error", "loc_error_low", "loc_error_high")},
        "severity": entry["severity"],
    }
    rows.append(row)
classes = pd.DataFrame(rows)
order = st.selectbox("Sort by", ["severity", "q-value", "effect size", "class"])
if order == "severity":
    classes = classes.sort_values(
        ["severity", "q_value"],
        key=lambda c: c.map(SEVERITY_ORDER) if c.name == "severity" else c,
        ascending=[False, True],
    )
elif order == "q-value":
    classes = classes.sort_values("q_value", na_position="last")
elif order == "effect size":
    classes = classes.sort_values("effect_ci_low", ascending=False, na_position="last")
else:
    classes = classes.sort_values("class")
st.caption("Each mean is followed by its 95% CI, in its `_low` and `_high` columns.")
st.dataframe(
    classes,
    hide_index=True,
    width="stretch",
    column_config={
        "status": st.column_config.TextColumn(width="medium"),  # "bias-driven" in full
        "evidence": st.column_config.TextColumn(width="large"),
        "q_value": st.column_config.NumberColumn(format="%.1e"),
        "effect_ci_low": THREE_DIGITS,
    }
    | two_digits(classes),
)

for region in spurious:
    st.subheader(f"Mass on {escape_markdown(region)} with 95% CI")
    mass = spec.column("mass", region)
    data = classes.rename(columns={mass: "mass", f"{mass}_low": "low", f"{mass}_high": "high"})
    sort = data["class"].tolist()
    bars = (
        alt.Chart(data)
        .mark_bar()
        .encode(
            x=alt.X("mass:Q", scale=alt.Scale(domain=[0, 1]), title=f"mass on {region}"),
            y=alt.Y("class:N", sort=sort),
            color=alt.Color("status:N"),
        )
    )
    whiskers = (
        alt.Chart(data).mark_rule().encode(x="low:Q", x2="high:Q", y=alt.Y("class:N", sort=sort))
    )
    st.altair_chart(bars + whiskers, width="stretch")

st.subheader("Slices")
for association in result["slices"].get("drives") or []:
    st.error(escape_markdown(drives_text(association, str)))
groups = pd.DataFrame(result["slices"]["groups"])
if len(groups):
    slices = groups[groups["kind"] == "slice"]
    tests = pd.DataFrame(result["slices"]["tests"])
    columns = ["attribute", "value", "n", "accuracy", "accuracy_low", "accuracy_high"]
    columns += [
        column
        for region in spurious
        for mass in [spec.column("mass", region)]
        for column in (mass, f"{mass}_low", f"{mass}_high")
        if column in slices.columns
    ]
    shown = slices[["attribute", "value", "n"]]
    for test_region, frame in tests.groupby("region") if len(tests) else []:
        # The test of each slice value: its difference from the other values, with CI.
        prefix = f"{test_region}_" if len(spurious) > 1 else ""
        test = frame.set_index(["attribute", "value"])[
            ["flagged", "effect", "effect_low", "effect_high", "q_value"]
        ]
        test = test.rename(columns=lambda c, p=prefix: f"{p}{c}")
        shown = shown.merge(test, left_on=["attribute", "value"], right_index=True, how="left")
    # The flag's columns first (the table is wider than a page), then the group's numbers.
    numbers = [column for column in columns if column in slices.columns]
    shown = shown.merge(slices[numbers], on=["attribute", "value", "n"], how="left")
    st.dataframe(
        shown,
        hide_index=True,
        width="stretch",
        column_config=two_digits(shown)
        | {c: THREE_DIGITS for c in shown if "effect" in c}
        | {c: st.column_config.NumberColumn(format="%.1e") for c in shown if c.endswith("q_value")},
    )
    if "worst_group_value" in slices.columns:
        worst = slices.dropna(subset=["worst_group_value"]).drop_duplicates("attribute")
        for group in worst.itertuples():
            accuracy = with_ci(
                group.worst_group_accuracy,
                group.worst_group_accuracy_low,
                group.worst_group_accuracy_high,
            )
            st.caption(
                f"Worst group of {escape_markdown(str(group.attribute))}: "
                f"{escape_markdown(str(group.worst_group_value))}, accuracy {accuracy} "
                "(the lowest among values with enough rows)"
            )
else:
    st.caption("This dataset has no slice attributes.")
