"""Aggregation, statistics, flags, interventions and strategies on fixed numbers."""

from functools import partial

import numpy as np
import pandas as pd
import pytest
from scipy.stats import bootstrap

from audit.analysis.aggregate import Aggregator
from audit.analysis.fill import fill_objects, intervene
from audit.analysis.flags import benjamini_hochberg, bootstrap_difference_ci, evaluate_flags
from audit.analysis.intervals import bootstrap_mean_ci
from audit.analysis.strategies import cluster_maps, eigengap_clusters
from audit.config.decisions import PolicySection


def test_benjamini_hochberg_on_fixed_numbers():
    # Hand-computed: sorted p (0.005, 0.01, 0.03, 0.04), q = p * m / rank, made monotone.
    q = benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.005, np.nan]))
    np.testing.assert_allclose(q[:4], [0.02, 0.04, 0.04, 0.02])
    assert np.isnan(q[4])
    # The textbook example of Benjamini & Hochberg (1995), 15 p-values: 4 rejected at 0.05.
    p = np.array(
        [
            0.0001,
            0.0004,
            0.0019,
            0.0095,
            0.0201,
            0.0278,
            0.0298,
            0.0344,
            0.0459,
            0.3240,
            0.4262,
            0.5719,
            0.6528,
            0.7590,
            1.0,
        ]
    )
    assert (benjamini_hochberg(p) < 0.05).sum() == 4


def test_bootstrap_ci_agrees_with_scipy():
    values = np.random.default_rng(0).gamma(2.0, 0.1, size=300)
    ours = bootstrap_mean_ci(values, resamples=4000, seed=1)
    theirs = bootstrap(
        (values,), np.mean, n_resamples=4000, method="percentile", random_state=2
    ).confidence_interval
    assert ours[0] == pytest.approx(theirs.low, abs=0.004)
    assert ours[1] == pytest.approx(theirs.high, abs=0.004)
    assert ours[0] < values.mean() < ours[1]
    # A large group uses the normal approximation, which agrees with the bootstrap.
    big = np.random.default_rng(3).uniform(size=30_000)
    low, high = bootstrap_mean_ci(big)
    assert low == pytest.approx(big.mean() - 1.96 * big.std() / np.sqrt(len(big)), abs=1e-4)
    assert high > big.mean()


def test_difference_ci_covers_the_true_difference():
    rng = np.random.default_rng(4)
    group, reference = rng.normal(0.3, 0.1, 400), rng.normal(0.2, 0.1, 800)
    low, high = bootstrap_difference_ci(group, reference, resamples=2000, seed=0)
    assert low < 0.1 < high and high - low < 0.05


def test_small_samples_get_t_intervals_that_cover():
    """Below 30 values a mean's CI is Student's t interval and a difference's Welch's:
    the percentile bootstrap covered a nominal 95% only 51% of the time at two values."""
    from scipy import stats

    pair = np.array([0.2, 0.4])
    expected = stats.t.interval(0.95, 1, loc=0.3, scale=stats.sem(pair))
    np.testing.assert_allclose(bootstrap_mean_ci(pair), expected)
    rng = np.random.default_rng(8)
    true_mean = 2 / 7  # Beta(2, 5): mass-like, skewed
    covered = [
        low <= true_mean <= high
        for low, high in (bootstrap_mean_ci(rng.beta(2, 5, 3)) for _ in range(600))
    ]
    assert np.mean(covered) > 0.92
    covered = [
        low <= 0 <= high
        for low, high in (
            bootstrap_difference_ci(rng.beta(2, 5, 3), rng.beta(2, 5, 4), resamples=100, seed=0)
            for _ in range(600)
        )
    ]
    assert np.mean(covered) > 0.92
    assert np.isnan(bootstrap_difference_ci(pair[:1], pair, resamples=100, seed=0)[0])
    # A share's interval stays within [0, 1], a lift's above 0.
    from audit.analysis.intervals import mean_with_ci

    spread = np.array([0.02, 0.9, 0.05])
    share = mean_with_ci(spread, "mass_background", share=True, resamples=100, seed=0)
    assert share["mass_background_low"] == 0 and share["mass_background_high"] == 1
    lift = mean_with_ci(spread * 9, "lift_background", share=False, resamples=100, seed=0)
    assert lift["lift_background_low"] == 0


def test_a_slice_with_one_image_per_class_gets_an_honest_effect_ci():
    """A rare slice spread one image per class: a within-class bootstrap saw no spread
    (its 95% CI covered 28%); the pooled within-class variance covers."""
    from audit.analysis.flags import _Sample, _within_classes

    rng = np.random.default_rng(3)
    classes, per_class = 20, 30
    # The slice as the reference, and with another spread (a biased slice may well
    # have one): borrowing the reference's spread covered 56% there.
    for draw, true_effect, floor in (
        (lambda n: rng.beta(2, 5, n), 0.0, 0.92),
        (lambda n: rng.beta(0.5, 0.5, n), 0.5 - 2 / 7, 0.88),
    ):
        covered = []
        for _ in range(300):
            group = _Sample(np.arange(classes), draw(classes), np.arange(classes))
            reference = _Sample(
                np.arange(classes * per_class) + 1000,
                rng.beta(2, 5, classes * per_class),
                np.repeat(np.arange(classes), per_class),
            )
            record = _within_classes(group, reference, PolicySection())
            covered.append(record["effect_low"] <= true_effect <= record["effect_high"])
        assert np.mean(covered) > floor


def test_bg_gap_has_a_rate_interval_and_a_clean_model_no_evidence():
    """BG-gap is 1 - the Mixed-Rand rate: its CI is Wilson's. With a percentile bootstrap
    a class with every decision flipped had the CI [1, 1], and ten classes sharing one
    true BG-gap of 0.85 gave some class intervention evidence in 27% of runs."""
    from audit.analysis.probe_stats import summarise_interventions

    rng = np.random.default_rng(5)
    names = [str(c) for c in range(10)]

    def outcomes(flip_rate):
        labels = np.repeat(np.arange(10), 20)
        flipped = rng.random(len(labels)) < flip_rate
        return pd.DataFrame(
            {"label_index": labels, "pred_original": labels, "pred_mixed_rand": labels + flipped}
        )

    table = summarise_interventions(outcomes(1.0), names, PolicySection())
    assert (table["bg_gap"] == 1).all() and (table["bg_gap_low"] < 0.9).all()
    runs = [summarise_interventions(outcomes(0.85), names, PolicySection()) for _ in range(100)]
    assert not any(table["intervention_evidence"].any() for table in runs)


def synthetic_images(n_per_class=60, shift=0.25, seed=0):
    """Three classes; class 2 puts `shift` more mass on the background."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in range(3):
        for _ in range(n_per_class):
            background = np.clip(rng.normal(0.4 + (shift if label == 2 else 0), 0.08), 0, 1)
            rows.append(
                {
                    "label_index": label,
                    "pred": label,
                    "correct": True,
                    "status": "ok",
                    "mass_object": 1 - background,
                    "mass_background": background,
                    "lift_object": (1 - background) / 0.3,
                    "lift_background": background / 0.7,
                    "pointing_object": 1.0,
                    "pointing_background": 0.0,
                    "site": rng.choice(["a", "b"]),
                }
            )
    frame = pd.DataFrame(rows)
    frame["row"] = np.arange(len(frame))
    for column in ("mass", "lift", "pointing"):
        for region in ("object", "background"):
            frame[f"pred_{column}_{region}"] = frame[f"{column}_{region}"]
    return frame


def aggregator_of(images, chunks=1):
    aggregator = Aggregator(["object", "background"], ["site"])
    for part in np.array_split(np.arange(len(images)), chunks):
        aggregator.add(images.iloc[part])
    return aggregator


def test_wilson_interval_agrees_with_scipy():
    from scipy.stats import binomtest

    from audit.analysis.intervals import wilson_interval

    for successes, trials in ((0, 1), (0, 30), (3, 30), (15, 30), (30, 30), (612, 1000)):
        expected = binomtest(successes, trials).proportion_ci(method="wilson")
        low, high = wilson_interval(successes, trials)
        assert low == pytest.approx(expected.low, abs=1e-12)
        assert high == pytest.approx(expected.high, abs=1e-12)
    assert np.isnan(wilson_interval(0, 0)).all()


def test_every_group_rate_has_its_interval():
    images = synthetic_images()
    images.loc[images.index[::4], "correct"] = False
    images.loc[images.index[::3], "pointing_background"] = 1.0
    groups = aggregator_of(images).finalize(["a", "b", "c"], resamples=50)
    for rate in ("accuracy", "pointing_background"):
        assert (groups[f"{rate}_low"] <= groups[rate]).all()
        assert (groups[rate] <= groups[f"{rate}_high"]).all()
        assert (groups[f"{rate}_low"] < groups[f"{rate}_high"]).all()
    # A rate of n out of n still has a lower bound below 1 (a bootstrap gives 1).
    assert (groups["pointing_object"] == 1.0).all()
    assert groups["pointing_object_high"].to_numpy() == pytest.approx(1.0)
    assert (groups["pointing_object_low"] < 0.99).all()
    # The worst-group accuracy carries the worst value's own interval.
    slices = groups[groups["kind"] == "slice"]
    worst = slices.loc[slices["accuracy"].idxmin()]
    assert (slices["worst_group_accuracy"] == worst["accuracy"]).all()
    assert (slices["worst_group_accuracy_low"] == worst["accuracy_low"]).all()
    assert (slices["worst_group_accuracy_high"] == worst["accuracy_high"]).all()


def test_a_tied_worst_group_is_the_least_certain_value():
    images = synthetic_images()  # every row correct: each site's accuracy is 1.0
    images.loc[images["site"] == "a", "site"] = np.where(
        np.arange((images["site"] == "a").sum()) < 25, "a", "b"
    )
    slices = aggregator_of(images).finalize(["a", "b", "c"], resamples=50)
    slices = slices[slices["kind"] == "slice"].set_index("value")
    assert (slices["accuracy"] == 1.0).all() and slices.loc["a", "n"] == 25
    assert (slices["worst_group_value"] == "a").all()  # 25 rows: the lower bound
    assert (slices["worst_group_accuracy_low"] == slices.loc["a", "accuracy_low"]).all()


def test_zero_maps_are_counted_per_group_and_left_out_of_the_means():
    images = synthetic_images()
    zero = images.index[images["label_index"] == 1][:5]
    metrics = ("mass_", "lift_", "pointing_")
    for column in [c for c in images.columns if c.startswith(metrics)]:
        images.loc[zero, column] = np.nan  # what the step stores for a zero map
        images.loc[zero[2:], f"pred_{column}"] = np.nan  # the predicted map of three
    groups = (
        aggregator_of(images)
        .finalize(["a", "b", "c"], resamples=50)
        .set_index(["kind", "class_index"])
    )
    assert groups.loc[("true", 1), "n_zero_map"] == 5
    assert groups.loc[("true", 0), "n_zero_map"] == 0
    assert groups.loc[("pred", 1), "n_zero_map"] == 3  # measured on the predicted maps
    kept = images[(images["label_index"] == 1)].drop(index=zero)
    assert groups.loc[("true", 1), "mass_background"] == pytest.approx(
        kept["mass_background"].mean()
    )


def test_accumulators_merge_to_the_same_result_in_any_order():
    images = synthetic_images()
    whole = aggregator_of(images).finalize(["a", "b", "c"], resamples=200)
    streamed = aggregator_of(images, chunks=7).finalize(["a", "b", "c"], resamples=200)
    shuffled = images.sample(frac=1.0, random_state=1)
    left, right = aggregator_of(shuffled.iloc[:70]), aggregator_of(shuffled.iloc[70:])
    merged = right.merge(left).finalize(["a", "b", "c"], resamples=200)
    pd.testing.assert_frame_equal(whole, streamed)
    pd.testing.assert_frame_equal(whole, merged)
    true_rows = whole[whole["kind"] == "true"]
    assert true_rows["n"].tolist() == [60, 60, 60]
    assert {"slice", "class_slice", "pred"} <= set(whole["kind"])
    assert whole.loc[whole["kind"] == "slice", "worst_group_accuracy"].notna().all()


def test_the_shifted_class_is_flagged_and_the_others_are_not():
    flags = evaluate_flags(
        aggregator_of(synthetic_images()),
        ["a", "b", "c"],
        ["background"],
        PolicySection(bootstrap_resamples=500),
    )
    true_flags = flags[flags["kind"] == "true"].set_index("class_index")
    assert true_flags.loc[2, "flagged"] and true_flags.loc[2, "severity"] == "warn"
    assert not true_flags.loc[0, "flagged"] and not true_flags.loc[1, "flagged"]
    assert true_flags.loc[2, "q_value"] < 1e-6
    assert true_flags.loc[2, "effect_low"] > 0.15
    assert len(true_flags.loc[2, "examples"]) == 5
    assert not flags[flags["kind"] == "slice"]["flagged"].any()  # sites are balanced


def test_a_significant_but_tiny_effect_is_not_flagged():
    images = synthetic_images(n_per_class=2000, shift=0.02)
    flags = evaluate_flags(
        aggregator_of(images),
        ["a", "b", "c"],
        ["background"],
        PolicySection(bootstrap_resamples=300),
    )
    shifted = flags[(flags["kind"] == "true") & (flags["class_index"] == 2)].iloc[0]
    assert shifted["q_value"] < 0.05  # significant...
    assert shifted["effect_low"] < 0.05 and not shifted["flagged"]  # ...but below the floor


def test_small_groups_are_not_tested():
    flags = evaluate_flags(
        aggregator_of(synthetic_images(n_per_class=10)),
        ["a", "b", "c"],
        ["background"],
        PolicySection(),
    )
    assert flags["p_value"].isna().all() and not flags["flagged"].any()


def test_interventions_on_hand_made_arrays():
    stripes = np.zeros((16, 16, 3), "float32")
    stripes[::2], stripes[1::2] = 0.2, 0.5  # horizontal stripes
    images = np.stack([stripes, np.full_like(stripes, 0.6)])
    images[0, 6:10, 6:10] = 1.0  # object of image 0
    images[1, 0, 0] = 0.9  # object of image 1
    objects = np.zeros((2, 16, 16), bool)
    objects[0, 6:10, 6:10] = True
    objects[1, 0, 0] = True
    out = intervene(images, objects, fill_objects(images, objects)[[1, 0]])  # swapped
    mean = images[0][~objects[0]].mean(axis=0)  # the mean background colour
    np.testing.assert_allclose(out["object_only"][0, 0, 0], mean, rtol=1e-6)  # bg -> its mean
    np.testing.assert_allclose(out["object_only"][0, 15, 15], mean, rtol=1e-6)
    np.testing.assert_allclose(out["object_only"][0, 7, 7], 1.0)  # the object stays
    # The object is removed without a trace: the stripes run on through it (no
    # silhouette of the object is left for the model to read).
    np.testing.assert_array_equal(out["background_only"][0], stripes)
    np.testing.assert_array_equal(out["background_only"][1], np.full_like(stripes, 0.6))
    np.testing.assert_allclose(out["mixed_rand"][0, 7, 7], 1.0)  # own object kept
    np.testing.assert_allclose(out["mixed_rand"][0, 15, 15], 0.6)  # partner's background
    np.testing.assert_allclose(out["mixed_rand"][0, 0, 0], 0.6)  # partner's object removed
    # Only the asked-for copies are made, and they are the same.
    only = intervene(images, objects, fill_objects(images, objects)[[1, 0]], kinds=["mixed_rand"])
    assert list(only) == ["mixed_rand"]
    np.testing.assert_array_equal(only["mixed_rand"], out["mixed_rand"])


def test_an_object_covering_the_image_is_filled_with_the_background_colour():
    images = np.full((1, 8, 8, 3), 0.3, "float32")
    images[0, 0, 0] = 0.7  # the only background pixel
    objects = np.ones((1, 8, 8), bool)
    objects[0, 0, 0] = False
    # No shifted copy has background to give: the mean background colour, everywhere.
    np.testing.assert_allclose(fill_objects(images, objects), 0.7)


def test_eigengap_and_a_minority_strategy_cluster():
    block = np.zeros((10, 10))
    block[:6, :6] = 1
    block[6:, 6:] = 1
    np.fill_diagonal(block, 0)
    assert eigengap_clusters(block) == 2
    rng = np.random.default_rng(0)
    maps = rng.uniform(0, 0.1, size=(60, 8, 8))
    maps[:, 3:5, 3:5] += 1.0  # most maps look at the centre
    maps[:9, 3:5, 3:5] -= 1.0
    maps[:9, 0:2, 6:8] += 1.0  # 15% look at a corner "watermark"
    labels = cluster_maps(maps)
    corner = labels[:9]
    assert len(set(corner.tolist())) == 1 and corner[0] not in labels[9:]


def test_a_minority_strategy_needs_its_ci_above_the_class_not_one_odd_map():
    from audit.analysis.strategies import cluster_records

    rng = np.random.default_rng(1)
    labels = np.array([0] * 50 + [1] * 9 + [2])  # most, a corner 15%, one odd map
    background = np.concatenate([rng.normal(0.2, 0.05, 50), rng.normal(0.6, 0.05, 9), [0.95]]).clip(
        0, 1
    )
    group = pd.DataFrame(
        {
            "row": np.arange(60),
            "label_index": 4,
            "correct": True,
            "mass_object": 1 - background,
            "mass_background": background,
        }
    )
    manifest = {
        "class_names": [str(c) for c in range(5)],
        "regions": [
            {"name": "object", "role": "expected"},
            {"name": "background", "role": "spurious"},
        ],
    }
    maps = rng.random((60, 4, 4))
    records = {r["cluster"]: r for r in cluster_records(group, maps, labels, manifest)}
    assert [records[c]["minority_strategy"] for c in (0, 1, 2)] == [False, True, False]
    corner = records[1]
    assert (
        corner["mass_background_low"] < corner["mass_background"] < corner["mass_background_high"]
    )
    assert corner["spurious_excess_low"] > 0.1 and corner["accuracy_low"] < 1.0
    # The odd map exceeds its class by far more, but a single map has no CI.
    assert records[2]["spurious_excess"] > 0.6 and np.isnan(records[2]["spurious_excess_low"])


def baseline_tests(after, before, paired, kind, policy=None):
    flags = evaluate_flags(
        aggregator_of(after),
        ["a", "b", "c"],
        ["background"],
        policy or PolicySection(bootstrap_resamples=500),
        aggregator_of(before),
        paired,
    )
    return flags[flags["kind"] == kind]


def test_a_slice_against_a_baseline_of_the_same_images_is_compared_image_by_image():
    before = synthetic_images(shift=0.0)
    after = before.copy()
    # The new model puts 0.065 more mass on site a's backgrounds, image by image; the
    # images' own spread hides that from a comparison of two samples.
    moved = after["site"] == "a"
    noise = np.random.default_rng(5).normal(0, 0.003, moved.sum())
    after.loc[moved, "pred_mass_background"] += 0.065 + noise
    independent = baseline_tests(after, before, False, "slice").set_index("value")
    paired = baseline_tests(after, before, True, "slice").set_index("value")
    assert not independent["flagged"].any()
    assert independent.loc["a", "effect_low"] < PolicySection().effect_floor
    assert paired["flagged"].tolist() == [True, False]
    assert paired.loc["a", "effect"] == pytest.approx(0.065, abs=0.002)
    assert paired.loc["a", "effect_high"] - paired.loc["a", "effect_low"] < 0.005
    assert paired.loc["a", "n"] == moved.sum() and "signed-rank" in paired.loc["a", "test"]
    assert paired.loc["b", "p_value"] == 1.0  # identical maps: no evidence either way
    assert (paired["reference"] == "baseline run, same group, same images").all()
    # Rows one run did not measure are left out.
    after.loc[after.index[moved][:10], "pred_mass_background"] = np.nan
    assert baseline_tests(after, before, True, "slice").set_index("value").loc["a", "n"] == (
        moved.sum() - 10
    )


def test_groups_whose_rows_depend_on_the_model_stay_two_sample_against_a_baseline():
    # The new model predicts 40 images of classes 0 and 1 as class 2, from their
    # backgrounds: new false positives that pairing class 2's rows would leave out.
    before = synthetic_images(shift=0.0)
    after = before.copy()
    switched = after.index[after["label_index"] < 2][::3][:40]
    after.loc[switched, ["pred", "correct"]] = [2, False]
    after.loc[switched, "pred_mass_background"] = 0.85
    for paired in (False, True):
        tests = baseline_tests(after, before, paired, "pred").set_index("class_index")
        assert tests.loc[2, "flagged"] and tests.loc[2, "n"] == 100
        assert "Mann-Whitney" in tests.loc[2, "test"]
        assert (tests["reference"] == "baseline run, same group").all()


def confounded_sites(site_effect=0.0, n=2000, seed=0):
    """Two classes whose background mass differs by class; 80% of class 0 at site a and
    80% of class 1 at site b. ``site_effect`` adds background mass at site a only."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    at_a = rng.random(n) < np.where(labels == 0, 0.8, 0.2)
    background = np.where(labels == 0, 0.55, 0.35) + rng.normal(0, 0.08, n)
    background = np.clip(background + site_effect * at_a, 0, 1)
    frame = pd.DataFrame(
        {
            "row": np.arange(n),
            "label_index": labels,
            "pred": labels,
            "correct": True,
            "status": "ok",
            "site": np.where(at_a, "a", "b"),
        }
    )
    for prefix in ("", "pred_"):
        frame[f"{prefix}mass_background"] = background
        frame[f"{prefix}mass_object"] = 1 - background
        frame[f"{prefix}lift_background"] = background / 0.7
        frame[f"{prefix}lift_object"] = (1 - background) / 0.3
        frame[f"{prefix}pointing_background"] = 0.0
        frame[f"{prefix}pointing_object"] = 1.0
    return frame


def slice_test(images, value="a"):
    flags = evaluate_flags(
        aggregator_of(images), ["c0", "c1"], ["background"], PolicySection(bootstrap_resamples=300)
    )
    return flags[(flags["kind"] == "slice") & (flags["value"] == value)].iloc[0]


def test_a_slice_is_compared_within_classes_not_across_a_different_class_mix():
    # The maps ignore the site; only the class mix differs between sites. Pooled, site
    # a's background mass is 0.12 higher (Simpson's paradox); within classes it is not.
    images = confounded_sites()
    pooled = images.groupby("site")["pred_mass_background"].mean()
    assert pooled["a"] - pooled["b"] > 0.1
    clean = slice_test(images)
    assert not clean["flagged"] and clean["p_value"] > 0.01 and clean["strata"] == 2
    assert clean["effect_low"] < 0 < clean["effect_high"]
    assert "van Elteren" in clean["test"]
    # A real site effect within both classes is found, with the planted size in its CI.
    planted = slice_test(confounded_sites(site_effect=0.12))
    assert planted["flagged"] and planted["q_value"] < 1e-6
    assert planted["effect_low"] < 0.12 < planted["effect_high"]


def test_van_elteren_with_one_stratum_is_mann_whitney():
    from scipy.stats import mannwhitneyu

    from audit.analysis.flags import van_elteren_greater

    rng = np.random.default_rng(5)
    group, reference = rng.normal(0.1, 1, 40).round(1), rng.normal(0, 1, 70).round(1)  # ties
    expected = mannwhitneyu(
        group, reference, alternative="greater", method="asymptotic", use_continuity=False
    ).pvalue
    assert van_elteren_greater([group], [reference]) == pytest.approx(expected, rel=1e-9)
    assert van_elteren_greater([np.ones(5)], [np.ones(7)]) == 1.0  # all tied


def test_merging_never_changes_the_merged_accumulator():
    images = synthetic_images()
    part = aggregator_of(images.iloc[:50])
    before = part.finalize(["a", "b", "c"], resamples=50)
    total = aggregator_of(images.iloc[:0])
    total.merge(part).merge(aggregator_of(images.iloc[50:]))
    pd.testing.assert_frame_equal(part.finalize(["a", "b", "c"], resamples=50), before)


def test_single_values_have_no_ci_and_small_slices_no_worst_group():
    assert all(np.isnan(bootstrap_mean_ci(np.array([0.9]))))
    images = synthetic_images()
    images.loc[images.index[:3], "correct"] = False
    images["site"] = np.where(np.arange(len(images)) < 3, "tiny", "big")
    images.loc[images.index[5], "site"] = None  # a missing value is no slice
    groups = aggregator_of(images).finalize(["a", "b", "c"], resamples=50, min_support=20)
    slices = groups[groups["kind"] == "slice"].set_index("value")
    assert sorted(slices.index) == ["big", "tiny"]
    assert slices.loc["tiny", "accuracy"] == 0.0
    # The three-image slice does not set the worst group; the big one does.
    assert slices["worst_group_accuracy"].tolist() == [slices.loc["big", "accuracy"]] * 2


def test_a_class_that_eases_is_not_a_new_flag():
    from audit.runs.compare import _flag_changes, _flag_set

    def report(statuses, slice_flagged=False):
        severity = {"ok": "none", "suspected": "warn", "bias-driven": "fail"}
        return {
            "classes": [
                {"class_name": name, "status": status, "severity": severity[status]}
                for name, status in statuses.items()
            ],
            "slices": {
                "tests": [
                    {
                        "attribute": "site",
                        "value": "a",
                        "region": "background",
                        "flagged": slice_flagged,
                        "severity": "warn",
                    }
                ]
            },
        }

    old = _flag_set(report({"cat": "bias-driven", "dog": "suspected", "cow": "suspected"}))
    new = _flag_set(report({"cat": "suspected", "dog": "bias-driven", "cow": "ok"}, True))
    changes = _flag_changes(old, new)
    assert changes["new_flags"] == {
        "class dog: bias-driven (was suspected)": "fail",
        "slice site=a on background": "warn",
    }
    assert changes["eased_flags"] == {"class cat: suspected (was bias-driven)": "warn"}
    assert changes["resolved_flags"] == {"class cow: suspected": "warn"}
    assert _flag_changes(new, new)["new_flags"] == {}


def probe_set(tmp_path, counts):
    """Demo PNGs + masks with the given number of images per class (rows in label order)."""
    from audit.config import build_config
    from audit.data.preprocess import Preprocessor
    from audit.data.sources import read_entries
    from pipelines.demo import write_dataset
    from pipelines.demo_data import DemoSet, make_demo_set

    demo = make_demo_set(1000, seed=3)
    keep = np.concatenate([np.flatnonzero(demo.labels == c)[:n] for c, n in counts.items()])
    subset = DemoSet(demo.images[keep], demo.labels[keep], demo.masks[keep], demo.backgrounds)
    manifest = write_dataset(subset, tmp_path / "probe")
    config = build_config({"model": {"path": "m.keras"}, "dataset": {"manifest": str(manifest)}})
    entries = read_entries(config.dataset)
    sample = pd.DataFrame({"row": np.arange(len(keep)), "label_index": demo.labels[keep]})
    options = {
        "class_index": {str(c): c for c in range(10)},
        "preprocessor": Preprocessor((48, 48), config.preprocess),
        "regions": config.regions,
        "batch_size": 8,
        "seed": 0,
    }
    return entries, sample, options


def test_every_mixed_rand_image_gets_another_class_background(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from audit.analysis.probe_stats import summarise_interventions
    from audit.analysis.probes import run_interventions
    from audit.data.loader import load_batches

    # 60 images of class 0, 3 of class 1: most batches hold class 0 alone.
    entries, sample, options = probe_set(tmp_path, {0: 60, 1: 3})
    seen = []

    def probabilities(batch):  # records the interventions; predicts class 0 always
        seen.append(batch)
        return np.tile(np.eye(10)[0], (len(batch), 1))

    outcomes = run_interventions(probabilities, entries, sample, **options)
    assert len(outcomes) == 63 and outcomes["pred_mixed_rand"].notna().all()
    mixed = np.concatenate([np.split(batch, 3)[2] for batch in seen])  # the third variant
    with ThreadPoolExecutor(1) as pool:
        originals = np.concatenate(
            [
                batch.images
                for batch in load_batches(
                    entries,
                    outcomes["row"].tolist(),  # in the order they were probed
                    class_index=options["class_index"],
                    preprocessor=options["preprocessor"],
                    regions=[],
                    batch_size=len(outcomes),
                    pool=pool,
                )
            ]
        )
    # Never the image's own background (an unchanged image would hide any shortcut).
    assert all(not np.array_equal(m, o) for m, o in zip(mixed, originals, strict=True))
    table = summarise_interventions(outcomes, [str(c) for c in range(10)], PolicySection())
    assert table.set_index("class_index")["n_mixed_rand"].to_dict() == {0: 60, 1: 3}
    # A single-class sample has no partner: Mixed-Rand is left out, not faked.
    entries, sample, options = probe_set(tmp_path / "one", {2: 10})
    alone = run_interventions(probabilities, entries, sample, **options)
    assert alone["pred_mixed_rand"].isna().all()
    table = summarise_interventions(alone, [str(c) for c in range(10)], PolicySection())
    assert np.isnan(table["bg_gap"].iloc[0]) and not table["intervention_evidence"].any()


def test_the_two_diagnostic_interventions_run_where_there_is_a_finding(tmp_path):
    from functools import partial

    from audit.analysis.analyse import _interventions
    from audit.analysis.probes import run_interventions

    entries, sample, options = probe_set(tmp_path, {0: 30, 1: 30})
    calls = []

    def probabilities(batch):  # predicts class 0 for everything: class 0 keeps its label
        calls.append(len(batch))
        return np.tile(np.eye(10)[0], (len(batch), 1))

    probe = partial(run_interventions, probabilities, entries, **options)
    names = [str(c) for c in range(10)]
    none = pd.DataFrame(columns=["kind", "class_index", "flagged"])
    table = _interventions(probe, sample, none, names, PolicySection()).set_index("class_index")
    # Mixed-Rand everywhere: class 1 loses every image (intervention evidence).
    assert table["rate_mixed_rand"].tolist() == [1.0, 0.0]
    # Each rate has its 95% Wilson interval: 30 of 30 kept is not a certain 1.0.
    assert table["rate_mixed_rand_low"].round(3).tolist() == [0.886, 0.0]
    assert table["rate_mixed_rand_high"].round(3).tolist() == [1.0, 0.114]
    assert table["intervention_evidence"].tolist() == [False, True]
    # Only class 1 has a finding, so only it gets the object/background-only details.
    assert table["rate_object_only"].isna().tolist() == [True, False]
    assert sum(calls) == 60 + 2 * 30  # one forward per image, two more for class 1's
    # A heatmap flag on class 0 (not a slice flag) gets it the details too.
    flags = pd.DataFrame({"kind": ["true", "slice"], "class_index": [0, None], "flagged": True})
    flagged = _interventions(probe, sample, flags, names, PolicySection())
    assert flagged["rate_object_only"].notna().all()
    everything = _interventions(
        probe, sample, none, names, PolicySection(intervention_details="all")
    )
    assert everything["rate_object_only"].notna().all()


def test_sequential_mixed_rand_stops_classes_that_cannot_become_evidence(tmp_path):
    from audit.analysis.analyse import _interventions
    from audit.analysis.probes import run_interventions

    entries, sample, options = probe_set(tmp_path, {0: 80, 1: 100, 2: 100, 3: 90, 4: 90})
    names = [str(c) for c in range(10)]
    none = pd.DataFrame(columns=["kind", "class_index", "flagged"])

    def run(look, sample=sample):
        calls = []

        def always_zero(batch):  # class 0 keeps every image, the others lose every one
            calls.append(len(batch))
            return np.tile(np.eye(10)[0], (len(batch), 1))

        probe = partial(run_interventions, always_zero, entries, **options)
        policy = PolicySection(intervention_look=look, intervention_details="all")
        return _interventions(probe, sample, none, names, policy).set_index("class_index"), calls

    fixed, fixed_calls = run(0)
    looked, looked_calls = run(40)
    # No class can become evidence (class 0 is far below the others' median, 1.0, and
    # each other class is level with it): the two reference looks each, the same
    # decisions.
    assert looked["n_mixed_rand"].tolist() == [80] * 5
    assert not fixed["intervention_evidence"].any() and not looked["intervention_evidence"].any()
    # Mixed-Rand on every image or on 400, then the diagnostics (intervention_details:
    # all) on all of them or on the first looks (they describe, they decide nothing).
    assert sum(fixed_calls) == 3 * len(sample) and sum(looked_calls) == 400 + 2 * 200
    assert looked["n_details"].tolist() == [40] * 5
    # Fewer than five classes: the median would rest on one to three first looks, so
    # every sampled image is probed.
    three = sample[sample["label_index"] < 3]
    assert run(40, three)[0]["n_mixed_rand"].tolist() == [80, 100, 100]

    def by_pixels(batch):  # depends on the pasted background: a row's own outcome
        classes = (batch.reshape(len(batch), -1).sum(axis=1) * 7).astype(int) % 3
        return np.eye(10)[classes]

    # Each row keeps its background partner whatever round probes it.
    probe = partial(run_interventions, by_pixels, entries, **options)
    everything = probe(sample, kinds=("mixed_rand",)).set_index("row")
    rounds = probe(sample, kinds=("mixed_rand",), look=25, settled=lambda _: {0}).set_index("row")
    # Settled after its two reference looks, class 0 stops; the others go on.
    assert rounds["look"].max() == 3 and (rounds["label_index"] == 0).sum() == 50
    common = everything.loc[rounds.index, "pred_mixed_rand"]
    assert common.tolist() == rounds["pred_mixed_rand"].tolist()


def test_sequential_sampling_keeps_the_fixed_samples_decisions_in_simulation():
    """Ten classes, 200 correct images each: sequential looks of 40 find a planted BG-gap
    as often as probing all 200, raise no false alarm on clean classes, and cost a
    fraction of the forward passes (``probe_in_rounds`` with simulated outcomes)."""
    from audit.analysis.probe_stats import settled_classes, summarise_interventions
    from audit.analysis.probes import probe_in_rounds

    names = [str(c) for c in range(10)]
    policy = PolicySection()
    rng = np.random.default_rng(11)
    order = pd.DataFrame({"row": np.arange(2000), "label_index": np.repeat(np.arange(10), 200)})
    found = {"fixed": [], "sequential": []}
    false_alarms = {"fixed": 0, "sequential": 0}
    probed = []
    for _ in range(40):
        gaps = np.full(10, 0.1)
        gaps[0] = 0.4  # class 0 depends on its background
        flipped = rng.random(2000) < gaps[order["label_index"]]
        labels = order["label_index"].to_numpy()

        def probe(rows, flipped=flipped, labels=labels):
            return [
                {
                    "row": row,
                    "label_index": int(labels[row]),
                    "pred_original": int(labels[row]),
                    "pred_mixed_rand": int(labels[row] + flipped[row]) % 10,
                }
                for row in rows
            ]

        shuffled = order.sample(frac=1, random_state=int(rng.integers(1 << 30)))
        for name, look in (("fixed", 0), ("sequential", 40)):
            settled = partial(settled_classes, class_names=names, policy=policy)
            records = probe_in_rounds(shuffled, probe, look=look, settled=settled)
            table = summarise_interventions(pd.DataFrame(records), names, policy)
            evidence = table.set_index("class_index")["intervention_evidence"]
            found[name].append(bool(evidence[0]))
            false_alarms[name] += int(evidence.drop(0).sum())
            if look:
                probed.append(len(records))
    assert np.mean(found["fixed"]) >= 0.9 and np.mean(found["sequential"]) >= 0.9
    assert false_alarms == {"fixed": 0, "sequential": 0}
    # The planted class goes on to 200; most clean classes stop after two looks.
    assert np.mean(probed) < 0.7 * 2000


def test_the_median_of_other_classes_carries_its_own_interval():
    """The reference BG-gap is the median of the other classes' first looks (40 images
    each): its 95% interval covers the true median about 95% of the time, and one class
    with no failure out of 40 is not an exact 0."""
    from audit.analysis.probe_stats import median_rate_interval

    rng = np.random.default_rng(3)
    for classes, rate in ((1, 0.3), (3, 0.1), (9, 0.2)):
        covered = []
        for seed in range(300):
            counts = [(int(k), 40) for k in rng.binomial(40, rate, classes)]
            median, low, high = median_rate_interval(counts, seed=seed)
            assert low <= median <= high
            covered.append(low <= rate <= high)
        assert 0.9 <= np.mean(covered) <= 0.995, (classes, np.mean(covered))
    median, low, high = median_rate_interval([(0, 40)])
    assert median == 0 and low == 0 and 0.05 < high < 0.15
    assert median_rate_interval([]) == (0.0, 0.0, 0.0)


def test_transplants_paste_other_classes_objects_on_each_predicted_class_backgrounds(tmp_path):
    from audit.analysis.analyse import _transplants
    from audit.analysis.probes import run_transplants

    entries, sample, options = probe_set(tmp_path, {0: 30, 1: 30, 2: 30, 3: 30, 4: 30})
    seen = []

    def always_two(batch):  # a model that answers 2 whatever it is shown
        seen.append(batch)
        return np.tile(np.eye(10)[2], (len(batch), 1))

    # The backgrounds are the images *predicted* as each class, right or wrong: here
    # every image of class 4 was predicted 2, so class 4 has none and 2 has 60.
    predicted = sample.assign(pred=sample["label_index"].replace({4: 2}))
    backgrounds = predicted[["row", "pred"]]
    outcomes = run_transplants(always_two, entries, sample, backgrounds, **options)
    assert sorted(outcomes["row"]) == sorted(backgrounds["row"])  # each once
    assert (outcomes["donor_label"] != outcomes["pred"]).all()  # another class's object
    names = [str(c) for c in range(10)]
    probe = partial(run_transplants, always_two, entries, sample, **options)
    table = _transplants(probe, backgrounds, names, PolicySection()).set_index("class_index")
    assert table["n_transplant"].to_dict() == {0: 30, 1: 30, 2: 60, 3: 30}
    # Class 2's backgrounds "produce" 2 every time, the others' never: only 2 is evidence.
    assert table["transplant"].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert table["transplant_evidence"].tolist() == [False, False, True, False]
    assert table.loc[2, "transplant_excess_low"] > 0.8 and table.loc[2, "transplant_p_value"] < 1e-6
    # Each composite is the background image with its object removed (and another
    # class's object pasted): the image's own object pixels are not there.
    from concurrent.futures import ThreadPoolExecutor

    from audit.data.loader import load_batches

    composites = np.concatenate(seen[:1])
    first = outcomes.iloc[: len(composites)]
    with ThreadPoolExecutor(1) as pool:
        loaded = {
            row: (image, regions[0])
            for batch in load_batches(
                entries,
                sorted(set(first["row"]) | set(sample["row"])),
                class_index=options["class_index"],
                preprocessor=options["preprocessor"],
                regions=options["regions"],
                batch_size=300,
                pool=pool,
            )
            for row, image, regions in zip(batch.rows, batch.images, batch.regions, strict=True)
        }
    for composite, record in zip(composites, first.itertuples(), strict=True):
        image, own = loaded[record.row]
        assert not np.allclose(composite[own], image[own])  # its own object is gone


def test_mixed_same_pairs_each_image_with_its_own_class_and_gives_a_paired_gap(tmp_path):
    from audit.analysis.probe_stats import paired_gap, summarise_interventions
    from audit.analysis.probes import run_interventions

    entries, sample, options = probe_set(tmp_path, {0: 30, 1: 30})

    def always_zero(batch):
        return np.tile(np.eye(10)[0], (len(batch), 1))

    outcomes = run_interventions(
        always_zero, entries, sample, kinds=("mixed_rand", "mixed_same"), **options
    )
    assert outcomes["pred_mixed_same"].notna().all()  # every image found a partner
    table = summarise_interventions(outcomes, [str(c) for c in range(10)], PolicySection())
    assert table["n_bg_gap_same"].tolist() == [30, 30]
    assert table["bg_gap_same"].tolist() == [0.0, 0.0]  # same outcome both ways
    # Paired difference: 12 of 40 kept only on their own class's background, 2 the
    # other way; Agresti-Min's interval holds the plain difference 0.25.
    first = np.array([True] * 12 + [False] * 2 + [True] * 10 + [False] * 16)
    second = np.array([False] * 12 + [True] * 2 + [True] * 10 + [False] * 16)
    gap = paired_gap(first, second, "gap")
    assert gap["n_gap"] == 40 and gap["gap"] == pytest.approx(0.25)
    assert 0.05 < gap["gap_low"] < 0.25 < gap["gap_high"] < 0.45
    assert np.isnan(paired_gap(first[:0], second[:0], "gap")["gap"])
