"""Class detail: worst-first gallery with CAM overlays, strategies and interventions."""

import math

import numpy as np
import streamlit as st
from PIL import Image

from audit.analysis.verdicts import SEVERITY_ORDER
from audit.measure import spec
from audit.report.overlay import colorize
from audit.report.text import (
    interventions_text,
    main_map_text,
    status_text,
    transplant_text,
    unreadable_note,
    with_ci,
)
from dashboard.store import current_run, escape_markdown, run_path, table, thumbnail

PAGE_SIZE = 12

store, run, result = current_run()
st.title("Class detail")


def worst_first(entry: dict) -> tuple:
    """The Classes page's default order: severity, then the smallest true-label q-value."""
    tests = [t for t in entry["tests"] if t["kind"] == "true" and t.get("q_value") is not None]
    q_values = [t["q_value"] for t in tests]
    return -SEVERITY_ORDER[entry["severity"]], min(q_values, default=1.0)


names = [entry["class_name"] for entry in sorted(result["classes"], key=worst_first)]
name = st.selectbox("Class", names)
entry = next(e for e in result["classes"] if e["class_name"] == name)
index = entry["class_index"]
st.caption(f"Status: {status_text(entry)}, confidence {entry.get('confidence', 'normal')}")
for reason in entry["reasons"]:
    st.text(reason)
if entry.get("evidence"):
    st.text(f"Evidence: {entry['evidence']}")


view = entry["true_label"]
accuracy = with_ci(view["accuracy"], view.get("accuracy_low"), view.get("accuracy_high"))
numbers = [f"{view['n']} images, accuracy {accuracy}"]
numbers += [
    f"mass on {region} (correct images) {with_ci(**view['mass'][region])}"
    for region in [r["name"] for r in result["regions"]]
]
if view.get("n_zero_map"):
    numbers.append(f"{view['n_zero_map']} zero maps (left out of the means)")
st.text("; ".join(numbers) + " (95% CIs)")
extra = main_map_text(view, [r["name"] for r in result["regions"]])
if extra:
    st.text(extra)

images = table(str(store), run, "images")
spurious = [r["name"] for r in result["regions"] if r["role"] == "spurious"]
rows = images[(images["status"] == "ok") & (images["label_index"] == index)]
strategies = table(str(store), run, "strategies")
strategies = strategies[strategies["class_index"] == index] if len(strategies) else strategies

left, middle, right = st.columns(3)
correctness = left.selectbox("Predictions", ["all", "correct", "incorrect"])
slice_columns = result["dataset"].get("slice_columns", [])
slice_options = ["all"] + [
    f"{column} = {value}"
    for column in slice_columns
    if column in rows
    for value in sorted(rows[column].dropna().astype(str).unique())
]
chosen_slice = middle.selectbox("Slice", slice_options)
cluster_options = (
    ["all"] + [f"cluster {c}" for c in strategies["cluster"].tolist()]
    if len(strategies)
    else ["all"]
)
chosen_cluster = right.selectbox("Strategy", cluster_options)

if correctness != "all":
    rows = rows[rows["correct"].astype(bool) == (correctness == "correct")]
if chosen_slice != "all":
    column, value = chosen_slice.split(" = ", 1)
    rows = rows[rows[column].astype(str) == value]
if chosen_cluster != "all":
    members = strategies[strategies["cluster"] == int(chosen_cluster.split()[1])]["members"]
    rows = rows[rows["row"].isin(list(members.iloc[0]))]
if spurious:
    rows = rows.sort_values(spec.column("mass", spurious[0]), ascending=False, na_position="last")

pages = max(1, math.ceil(len(rows) / PAGE_SIZE))
page = st.number_input("Page", min_value=1, max_value=pages, value=1, step=1)
most_mass = escape_markdown(", ".join(spurious)) or "n/a"
st.caption(f"{len(rows)} images, worst first (most mass on {most_mass})")
shown = rows.iloc[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
pictures, captions, unreadable = [], [], 0
for row in shown.itertuples():
    mask_path = getattr(row, "mask_path", None)
    picture = thumbnail(str(store), run, result["dataset"], int(row.row), row.path, mask_path)
    if picture is None:
        unreadable += 1
        continue
    pictures.append(picture)
    caption = f"row {row.row}: predicted {escape_markdown(row.pred_label)}"
    if spurious:
        mass = getattr(row, spec.column("mass", spurious[0]))
        caption += f", {escape_markdown(spurious[0])} mass {mass:.2f}"
    captions.append(caption)
if unreadable:
    st.warning(escape_markdown(unreadable_note(unreadable, result["dataset"]["root"])))
if pictures:
    st.image(pictures, caption=captions, width=160)

guided_folder = run_path(store, run) / "guided"
guided = [(e["row"], guided_folder / f"{e['row']}.png") for e in entry["examples"]]
guided = [(row, path) for row, path in guided if path.exists()]
if guided:
    st.subheader("Guided Grad-CAM (the report's examples)")
    st.image(
        [Image.open(path) for _, path in guided],
        caption=[f"row {row}" for row, _ in guided],
        width=160,
    )
elif result.get("guided_note"):
    st.caption(escape_markdown(result["guided_note"]))

st.subheader("Strategies (CAM clusters)")
if len(strategies):
    columns = st.columns(max(1, len(strategies)))
    for column, strategy in zip(columns, strategies.itertuples(), strict=False):
        mean_map = np.asarray(strategy.mean_map, "float32").reshape(strategy.map_shape)
        picture = Image.fromarray((colorize(mean_map) * 255).astype("uint8")).resize((96, 96))
        column.image(picture, width=96)
        accuracy = with_ci(
            strategy.accuracy,
            getattr(strategy, "accuracy_low", None),  # runs before the CIs have none
            getattr(strategy, "accuracy_high", None),
        )
        column.caption(
            f"cluster {strategy.cluster}: {strategy.size} images ({strategy.fraction:.0%}), "
            f"accuracy {accuracy}" + (", minority strategy" if strategy.minority_strategy else "")
        )
else:
    st.caption("Too few images to cluster.")

st.subheader("Interventions")
probe = entry["interventions"]
if probe and transplant_text(probe):
    st.text(transplant_text(probe))
if probe and probe.get("n_probe"):
    st.text(interventions_text(probe))
    rates = [
        {
            "intervention": label,
            "still predicted": probe.get(f"rate_{name}"),
            "low": probe.get(f"rate_{name}_low"),
            "high": probe.get(f"rate_{name}_high"),
        }
        for name, label in (
            ("object_only", "object only"),
            ("background_only", "background only"),
            ("mixed_rand", "background swapped (Mixed-Rand)"),
        )
        if probe.get(f"rate_{name}") is not None  # the diagnostics may not have run
    ]
    st.dataframe(
        rates,
        hide_index=True,
        column_config={
            name: st.column_config.NumberColumn(format="%.2f")
            for name in ("still predicted", "low", "high")
        },
    )
else:
    st.caption("No interventions for this class (no expected region, or too few images).")
