"""Causal evidence and the verdicts' decision table (docs/flags.md), on hand-built tables."""

import numpy as np
import pandas as pd
import pytest

from audit.analysis.associations import mantel_haenszel, slice_associations
from audit.analysis.tables import Analysis
from audit.analysis.verdicts import causal_evidence, class_verdicts, judge_slice_flags
from audit.config.decisions import PolicySection

NAMES = [str(c) for c in range(5)]


def audit_table(rng, *, shortcut: float, mix: float = 0.0, n: int = 1000) -> pd.DataFrame:
    """Images of 5 classes with a ``background`` slice; a model that is right 90% of the
    time and, with probability ``shortcut``, answers 3 on "stripes". ``mix``: extra share
    of class 3 images on stripes (a slice that holds more of a class, no shortcut)."""
    labels = rng.integers(0, 5, n)
    stripes = rng.random(n) < np.where(labels == 3, 0.2 + mix, 0.2)
    wrong = rng.random(n) < 0.1
    preds = np.where(wrong, (labels + rng.integers(1, 5, n)) % 5, labels)
    preds = np.where(stripes & (rng.random(n) < shortcut), 3, preds)
    return pd.DataFrame(
        {
            "row": np.arange(n),
            "status": "ok",
            "label_index": labels,
            "pred": preds,
            "background": np.where(stripes, "stripes", "plain"),
        }
    )


def test_mantel_haenszel_matches_hand_computed_numbers():
    # One stratum: plain risk difference 8/20 - 2/20 = 0.30, Sato's variance reduces to
    # the unpooled binomial variance for one stratum: 0.4*0.6/20 + 0.1*0.9/20.
    result = mantel_haenszel(np.array([8]), np.array([20]), np.array([2]), np.array([20]))
    assert result["rd"] == pytest.approx(0.30)
    half = 1.959964 * np.sqrt(0.4 * 0.6 / 20 + 0.1 * 0.9 / 20)
    assert result["rd_low"] == pytest.approx(0.30 - half, abs=1e-4)
    assert result["rd_high"] == pytest.approx(0.30 + half, abs=1e-4)
    assert result["p_value"] < 0.05
    # Two strata with opposite rates: pooled they would differ, stratified they do not.
    result = mantel_haenszel(
        np.array([18, 1]), np.array([20, 10]), np.array([9, 2]), np.array([10, 20])
    )
    assert result["rd"] == pytest.approx(0.0, abs=1e-12)
    assert result["p_value"] > 0.3


def test_a_slice_that_drives_a_class_is_evidence_and_a_class_mix_is_not():
    policy = PolicySection()
    rng = np.random.default_rng(0)
    driven = slice_associations(audit_table(rng, shortcut=0.6), ["background"], NAMES, policy)
    _, driven = causal_evidence(pd.DataFrame(), driven, policy)
    hits = driven[driven["evidence"]]
    assert set(zip(hits["value"], hits["class_name"], strict=True)) == {("stripes", "3")}
    row = hits.iloc[0]
    assert row["rate_slice"] > 0.5 and row["rate_rest"] < 0.3 and row["rd_low"] > 0.3
    assert row["examples"] and len(row["examples"]) <= 5
    # Stripes hold twice as many 3s but predictions follow the digits: no evidence,
    # and every class's difference is ruled out (the test had the power to see one).
    mixed = slice_associations(
        audit_table(rng, shortcut=0.0, mix=0.3), ["background"], NAMES, policy
    )
    _, mixed = causal_evidence(pd.DataFrame(), mixed, policy)
    assert not mixed["evidence"].any()
    assert mixed.loc[mixed["value"] == "stripes", "ruled_out"].all()


def probe_table(**columns) -> pd.DataFrame:
    base = {
        "class_index": [0, 1, 2],
        "class_name": ["0", "1", "2"],
        "n_mixed_rand": [80, 80, 80],
        "bg_gap": [0.05, 0.05, 0.05],
        "bg_gap_low": [0.01, 0.01, 0.01],
        "bg_gap_high": [0.12, 0.12, 0.12],
        "bg_gap_median_others": [0.05, 0.05, 0.05],
        "bg_gap_excess": [0.0, 0.0, 0.0],
        "bg_gap_excess_low": [-0.08, -0.08, -0.08],
        "bg_gap_excess_high": [0.08, 0.08, 0.08],
        "bg_gap_p_value": [0.5, 0.5, 0.5],
        "intervention_evidence": [False, False, False],
        "n_transplant": [80, 80, 80],
        "transplant": [0.02, 0.02, 0.02],
        "transplant_low": [0.0, 0.0, 0.0],
        "transplant_high": [0.09, 0.09, 0.09],
        "transplant_median_others": [0.02, 0.02, 0.02],
        "transplant_excess": [0.0, 0.0, 0.0],
        "transplant_excess_low": [-0.06, -0.06, -0.06],
        "transplant_excess_high": [0.07, 0.07, 0.07],
        "transplant_p_value": [0.5, 0.5, 0.5],
        "transplant_evidence": [False, False, False],
    }
    table = pd.DataFrame(base)
    for name, values in columns.items():
        table[name] = values
    return table


def heatmap_flags(flagged: list[bool]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "kind": "true",
            "class_index": range(len(flagged)),
            "attribute": None,
            "value": None,
            "region": "background",
            "statistic": "mass",
            "group_mean": 0.7,
            "reference_mean": 0.5,
            "effect": 0.2,
            "effect_low": 0.1,
            "effect_high": 0.3,
            "p_value": 1e-6,
            "q_value": 1e-5,
            "flagged": flagged,
            "severity": ["warn" if f else "none" for f in flagged],
        }
    )


def verdicts_of(probe: pd.DataFrame, flags: pd.DataFrame, associations=None) -> list[dict]:
    policy = PolicySection()
    empty = pd.DataFrame()
    probe, associations = causal_evidence(
        probe, empty if associations is None else associations, policy
    )
    analysis = Analysis(empty, flags, probe, empty, None, associations)
    return class_verdicts(analysis, ["0", "1", "2"], policy.model_dump())


def test_decision_table():
    # Class 0: a heatmap flag both interventions rule out (a thin object): ok, with why.
    # Class 1: a heatmap flag the transplant test cannot rule out (too few images):
    # suspected. Class 2: transplant evidence without any heatmap flag: bias-driven.
    probe = probe_table(
        n_transplant=[80, 12, 80],
        transplant_excess_high=[0.07, 0.4, 0.9],
        transplant=[0.02, 0.1, 0.7],
        transplant_excess=[0.0, 0.08, 0.68],
        transplant_excess_low=[-0.06, -0.2, 0.5],
        transplant_p_value=[0.5, 0.2, 1e-9],
        transplant_evidence=[False, False, True],
    )
    verdicts = verdicts_of(probe, heatmap_flags([True, True, False]))
    assert [v["status"] for v in verdicts] == ["ok", "suspected", "bias-driven"]
    assert [v["severity"] for v in verdicts] == ["none", "warn", "fail"]
    assert verdicts[0]["ruled_out"] and "thin object" in verdicts[0]["reasons"][-1]
    assert "backgrounds produce the class" in " ".join(verdicts[2]["reasons"])
    # Every verdict carries its evidence chain in one line, with each test's CI.
    assert "transplant rate 0.70" in verdicts[2]["evidence"]
    assert "[0.50, 0.86]" not in verdicts[2]["evidence"]  # its own numbers, not invented
    assert "excess 0.68 [0.50, 0.90] (n=80) evidence" in verdicts[2]["evidence"]
    assert verdicts[0]["evidence"].startswith("heatmap mass on background 0.70 vs 0.50")
    assert all("\n" not in v["evidence"] for v in verdicts)


def test_causal_evidence_is_corrected_across_the_run():
    # A CI that clears the floor is not enough: its q-value, corrected across every
    # causal test of the run, must be below alpha too.
    probe = probe_table(
        transplant_excess_low=[0.11, -0.06, -0.06],
        transplant_evidence=[True, False, False],
        transplant_p_value=[0.04, 0.5, 0.5],
    )
    probe, _ = causal_evidence(probe, pd.DataFrame(), PolicySection())
    assert probe.loc[0, "transplant_q_value"] == pytest.approx(0.24)  # 0.04 * 6 tests / 1
    assert not probe["transplant_evidence"].any() and not probe["intervention_evidence"].any()
    # A class with too few probed images is not among the tests corrected for.
    probe = probe_table(n_transplant=[80, 5, 5], transplant_p_value=[0.01, 0.5, 0.5])
    probe, _ = causal_evidence(probe, pd.DataFrame(), PolicySection())
    assert np.isnan(probe.loc[1, "transplant_q_value"])
    assert probe.loc[0, "transplant_q_value"] == pytest.approx(0.04)  # 0.01 * 4 / 1


def test_a_flagged_slice_is_judged_by_what_it_drives():
    policy = PolicySection()
    rng = np.random.default_rng(1)
    flags = pd.DataFrame(
        {
            "kind": ["slice", "slice"],
            "class_index": [None, None],
            "attribute": ["background", "background"],
            "value": ["stripes", "plain"],
            "flagged": [True, True],
            "severity": ["warn", "warn"],
        }
    )
    for shortcut, expected in ((0.6, "fail"), (0.0, "none")):
        table = slice_associations(
            audit_table(rng, shortcut=shortcut), ["background"], NAMES, policy
        )
        _, table = causal_evidence(pd.DataFrame(), table, policy)
        judged = judge_slice_flags(flags, table, policy).set_index("value")
        assert judged.loc["stripes", "severity"] == expected
        assert judged.loc["stripes", "drives"] == (["3"] if shortcut else [])


def test_forward_passes_count_each_causal_test():
    from audit.analysis.verdicts import forward_passes

    probe = probe_table(n_transplant=[80, 40, np.nan]).assign(n_details=[40, 0, np.nan])
    assert forward_passes(probe) == {
        "mixed_rand": 240,
        "mixed_same": 0,
        "diagnostics": 80,
        "transplant": 120,
        "associations": 0,
    }
    assert forward_passes(pd.DataFrame())["transplant"] == 0
