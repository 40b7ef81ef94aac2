"""Guided Grad-CAM and the trust checks of the maps (sanity and faithfulness)."""

import html
import json

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from audit.analysis.tables import Analysis
from audit.analysis.trust import (
    _baseline,
    deletion_insertion,
    randomisation_check,
    spearman_rows,
    trust_verdict,
)
from audit.analysis.verdicts import class_verdicts
from audit.engine.explain import GradCAM
from audit.engine.guided import GuidedGradCAM, guided_model, guided_picture


def _tiny_relu_net():
    keras.utils.set_random_seed(7)
    inputs = keras.Input((2, 2, 1))
    hidden = keras.layers.Dense(3, activation="relu", name="hidden")(keras.layers.Flatten()(inputs))
    grid = keras.layers.Reshape((1, 1, 3), name="grid")(hidden)
    outputs = keras.layers.Dense(2, name="out")(keras.layers.Flatten()(grid))
    return keras.Model(inputs, outputs)


def test_guided_backprop_matches_the_hand_derived_gradient():
    model = _tiny_relu_net()
    images = np.random.default_rng(0).normal(size=(6, 2, 2, 1)).astype("float32")
    targets = np.array([0, 1, 0, 1, 0, 1])
    got = GuidedGradCAM(model, layer="grid").guided_backprop(images, targets)
    w1, b1 = model.get_layer("hidden").get_weights()
    w2, _ = model.get_layer("out").get_weights()
    for image, target, gradient in zip(images, targets, got, strict=True):
        before_relu = image.reshape(-1) @ w1 + b1
        upstream = w2[:, target]  # d logit / d hidden
        # Guided rule at the ReLU: pass where its input > 0 AND the gradient > 0.
        passed = upstream * (before_relu > 0) * (upstream > 0)
        np.testing.assert_allclose(gradient.reshape(-1), w1 @ passed, atol=1e-6)
    # The ordinary gradient differs where a negative gradient was blocked.
    with tf.GradientTape() as tape:
        tensor = tf.constant(images)
        tape.watch(tensor)
        score = tf.reduce_sum(tf.gather(model(tensor), targets, axis=1, batch_dims=1))
    plain = tape.gradient(score, tensor).numpy()
    assert not np.allclose(plain, got)


def test_guided_clone_leaves_the_model_alone_and_handles_nested_relu6_layers():
    keras.utils.set_random_seed(1)
    base = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, include_top=False
    )
    model = keras.Sequential(
        [base, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")]
    )
    images = np.random.default_rng(2).random((3, 32, 32, 3)).astype("float32")
    before = model(images).numpy()
    clone = guided_model(model)
    np.testing.assert_allclose(clone(images).numpy(), before, rtol=1e-5)  # same forward
    relus = [layer for layer in base.layers if isinstance(layer, keras.layers.ReLU)]
    assert relus and all("call" not in vars(layer) for layer in relus)  # originals untouched
    result = GuidedGradCAM(model).explain(images, np.array([0, 1, 2]))
    assert result.shape == (3, 32, 32, 3) and np.isfinite(result).all()
    picture = guided_picture(result[0])
    assert picture.shape == (32, 32) and picture.dtype == np.uint8


def test_randomised_models_give_low_map_correlation_and_the_unchanged_one_scores_1(
    trained_cnn, digits_images
):
    images, labels = digits_images
    images, labels = images[:24], labels[:24].astype("int32")
    cam = GradCAM(trained_cnn)
    original = cam.explain(images, labels)
    np.testing.assert_allclose(spearman_rows(original, original), 1.0)
    stages = randomisation_check(trained_cnn, cam, images, labels, original, seed=0)
    assert stages[0]["layers_randomised"] == 0 and stages[0]["correlation"] == pytest.approx(1.0)
    # The classifier (a softmax Dense, scored through its linear twin) is randomised first:
    # the maps must move at once, and end up unrelated to the trained model's.
    assert stages[1]["layer"] == "classifier" and stages[1]["correlation"] < 0.9
    assert stages[-1]["correlation"] < 0.5
    assert [s["layers_randomised"] for s in stages] == sorted(
        s["layers_randomised"] for s in stages
    )
    # The model is restored: its maps are the original ones again.
    np.testing.assert_allclose(cam.explain(images, labels), original)


def test_the_randomisation_restores_every_weight_even_when_a_stage_fails(
    trained_cnn, digits_images
):
    """The cascade randomises the audited model in place: an error mid-way must still
    leave the model (and the softmax's linear twin in the engine) as it was."""
    images, labels = digits_images
    images, labels = images[:8], labels[:8].astype("int32")
    cam = GradCAM(trained_cnn)
    original = cam.explain(images, labels)
    before = [weights.copy() for weights in trained_cnn.get_weights()]
    explain, calls = cam.explain, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second stage: some layers are random by now
            changed = [
                not np.array_equal(got, want)
                for got, want in zip(trained_cnn.get_weights(), before, strict=True)
            ]
            assert any(changed)
            raise RuntimeError("stage failed")
        return explain(*args, **kwargs)

    cam.explain = failing
    with pytest.raises(RuntimeError, match="stage failed"):
        randomisation_check(trained_cnn, cam, images, labels, original, seed=0)
    cam.explain = explain
    for got, want in zip(trained_cnn.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(cam.explain(images, labels), original)


def test_deletion_insertion_equals_evaluating_every_curve_point():
    """The shared ends (the image, the baseline) give the same AUCs as evaluating every
    point of every curve."""
    rng = np.random.default_rng(0)
    count, side, steps = 5, 6, 4
    images = rng.random((count, side, side, 3)).astype("float32")
    targets = np.array([0, 1, 2, 0, 1])
    weights = rng.normal(size=(side * side * 3, 3)).astype("float32")

    def probability(batch):
        logits = batch.reshape(len(batch), -1) @ weights
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)

    maps_sets = [rng.random((count, side, side)).astype("float32") for _ in range(2)]
    got = deletion_insertion(probability, images, targets, maps_sets, steps=steps, baseline="mean")
    base = _baseline(images, "mean")
    for maps, (deletion, insertion) in zip(maps_sets, got, strict=True):
        order = np.argsort(-maps.reshape(count, -1), axis=1, kind="stable")
        curves = {"deletion": [], "insertion": []}
        for step in range(steps + 1):
            moved = np.zeros((count, side * side), bool)
            np.put_along_axis(moved, order[:, : round(side * side * step / steps)], True, 1)
            moved = moved.reshape(count, side, side, 1)
            for name, variant in (
                ("deletion", np.where(moved, base, images)),
                ("insertion", np.where(moved, images, base)),
            ):
                curves[name].append(probability(variant)[np.arange(count), targets])
        for name, auc in (("deletion", deletion), ("insertion", insertion)):
            points = np.stack(curves[name], axis=1)
            expected = (points[:, :-1] + points[:, 1:]).sum(axis=1) / (2 * steps)
            np.testing.assert_allclose(auc, expected, rtol=1e-6)


def test_a_failed_check_makes_the_maps_untrusted_and_lowers_flag_confidence():
    passing = {"status": "pass", "correlation": 0.1, "threshold": 0.5, "stages": []}
    failing = dict(passing, status="fail", correlation=0.8)
    faith = {"status": "pass", "gain": 0.3, "gain_ci": [0.2, 0.4]}
    trust = {"randomisation": failing, "random_logit": passing, "faithfulness": faith}
    trust.update(trust_verdict(trust))
    assert trust["verdict"] == "untrusted" and "randomised" in trust["reasons"][0]
    inconclusive = dict(
        trust, randomisation=passing, faithfulness=dict(faith, status="inconclusive")
    )
    assert trust_verdict(inconclusive)["verdict"] == "uncertain"
    # eigencam is class-agnostic: the random-logit check does not apply and does not count.
    agnostic = dict(
        trust, randomisation=passing, random_logit=dict(passing, status="not applicable")
    )
    assert trust_verdict(agnostic) == {"verdict": "trusted", "reasons": []}
    flags = pd.DataFrame(
        [
            {
                "class_index": 0,
                "flagged": True,
                "kind": "true",
                "statistic": "mass",
                "region": "background",
                "group_mean": 0.8,
                "reference_mean": 0.5,
                "effect_low": 0.2,
                "effect_high": 0.4,
                "q_value": 0.001,
            }
        ]
    )
    empty = pd.DataFrame()
    for given, confidence in ((trust, "low"), (None, "normal")):
        verdicts = class_verdicts(Analysis(empty, flags, empty, empty, given), ["a", "b"])
        assert verdicts[0]["status"] == "suspected"
        assert verdicts[0]["confidence"] == confidence
        assert verdicts[1]["confidence"] == "normal"  # no heatmap flag to downgrade
    assert (
        "failed the trust checks"
        in class_verdicts(Analysis(empty, flags, empty, empty, trust), ["a", "b"])[0]["reasons"][-1]
    )


def test_the_demo_audit_runs_the_checks_and_grad_cam_deletes_faster_than_random(biased_demo):
    """A trained model with a known object (the demo's digits): per-audit trust checks."""
    _, _, result = biased_demo
    trust = json.loads((result.run_dir / "trust.json").read_text())
    faith = trust["faithfulness"]
    assert faith["deletion_auc"] < faith["deletion_auc_random"]
    assert faith["insertion_auc"] > faith["insertion_auc_random"]
    assert faith["status"] == "pass" and trust["randomisation"]["status"] == "pass"
    assert trust["random_logit"]["correlation"] < trust["random_logit"]["threshold"]
    assert trust["verdict"] == "trusted" and len(trust["rows"]) == trust["samples"] == 16
    assert {entry["class_index"] for entry in trust["per_class"]} == set(range(10))  # spread
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["trust"]["verdict"] == "trusted"
    assert all(entry["confidence"] == "normal" for entry in report["classes"])
    # The demo's 48 px input is under trust.guided_min_side: no Guided Grad-CAM
    # pictures (they read as noise there), and the report says why.
    assert not (result.run_dir / "guided").exists()
    note = report["guided_note"]
    assert "48x48 px, under trust.guided_min_side (64 px)" in note
    page = (result.run_dir / "report.html").read_text()
    assert "Trust in the maps" in page and "Guided Grad-CAM, row" not in page
    assert f"<li>{html.escape(note)}</li>" in page
    assert "Counterfactual map (what argues against the class): mass object" in page
    markdown = (result.run_dir / "report.md").read_text()
    assert "Trust in the maps" in markdown and "48x48 px, under trust" in markdown
