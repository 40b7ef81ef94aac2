"""The short text summary printed at the end of a run (the reports come later)."""

from __future__ import annotations

import pandas as pd


def class_table(images: pd.DataFrame, manifest: dict) -> pd.DataFrame:
    """Per true class: rows, accuracy, and mean mass/lift per region on correct rows."""
    ok = images[images["status"] == "ok"]
    region_names = [region["name"] for region in manifest["regions"]]
    rows = []
    for index, name in enumerate(manifest["class_names"]):
        of_class = ok[ok["label_index"] == index]
        correct = of_class[of_class["correct"].astype(bool)]
        row = {"class": name, "n": len(of_class), "accuracy": of_class["correct"].mean()}
        for region in region_names:
            row[f"mass_{region}"] = correct[f"mass_{region}"].mean()
        for region in manifest["regions"]:
            if region["role"] == "expected":
                row[f"lift_{region['name']}"] = correct[f"lift_{region['name']}"].mean()
        rows.append(row)
    return pd.DataFrame(rows)


def format_summary(images: pd.DataFrame, manifest: dict) -> str:
    counts = manifest["counts"]
    lines = [
        f"run {manifest['run_id']}: {counts['rows']} rows, {counts['ok']} audited, "
        f"{counts['skipped']} skipped; layer {manifest['model']['layer']}, "
        f"{manifest['model']['method']}, {manifest['timings']['total_seconds']:.1f} s "
        f"(audit pass {manifest['timings']['pass_seconds']:.1f} s)",
    ]
    for reason, count in list(counts["skip_reasons"].items())[:8]:
        lines.append(f"  skipped {count:>5d} x {reason}")
    ok = images[images["status"] == "ok"]
    if len(ok):
        lines.append(f"accuracy {ok['correct'].astype(bool).mean():.3f}; per class (correct rows):")
        table = class_table(images, manifest)
        lines.append(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return "\n".join(lines)
