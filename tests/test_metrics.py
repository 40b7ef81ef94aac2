"""Region metrics on hand-made arrays, following Quantus' definitions."""

import numpy as np
import pytest

from audit.measure.metrics import region_metrics


def run(maps, regions, **kwargs):
    out = region_metrics(np.asarray(maps, "float32"), np.asarray(regions, "float32"), **kwargs)
    return {key: value.numpy() for key, value in out.items()}


def test_mass_area_lift_on_a_hand_made_map():
    cam = np.zeros((4, 4))
    cam[0, 0], cam[0, 1], cam[3, 3] = 3.0, 1.0, 4.0
    obj = np.zeros((4, 4))
    obj[:2, :2] = 1  # holds 3 + 1 of the 8 units of mass, 4 of 16 pixels
    out = run(cam[None], np.stack([obj, 1 - obj])[None])
    np.testing.assert_allclose(out["mass"][0], [0.5, 0.5])
    np.testing.assert_allclose(out["area"][0], [0.25, 0.75])
    np.testing.assert_allclose(out["lift"][0], [2.0, 2 / 3], rtol=1e-6)
    # The single peak (4.0 at [3, 3]) lies in the background.
    np.testing.assert_allclose(out["pointing"][0], [0.0, 1.0])
    # Relevance Rank Accuracy: the top 4 are (3,3), (0,0), (0,1) and one of the 13 zero
    # pixels; 2 of those zeros are the object's, so it gets (2 + 1 * 2/13) / 4.
    np.testing.assert_allclose(out["rank_acc"][0][0], (2 + 2 / 13) / 4, rtol=1e-6)
    # Binarised at 0.5 * max = 2: pixels (0,0) and (3,3). IoU with the object: 1 / 5.
    np.testing.assert_allclose(out["iou"][0][0], 1 / 5)


def test_rank_accuracy_and_iou_against_brute_force():
    rng = np.random.default_rng(0)
    maps = rng.gamma(1.0, size=(5, 9, 7))
    regions = (rng.uniform(size=(5, 2, 9, 7)) < 0.3).astype(float)
    out = run(maps, regions, iou_threshold=0.4)
    for b in range(5):
        flat = maps[b].ravel()
        top = np.argsort(-flat, kind="stable")
        for r in range(2):
            region = regions[b, r].ravel().astype(bool)
            k = region.sum()  # continuous values: no ties, Quantus' argsort definition
            assert out["rank_acc"][b, r] == pytest.approx(region[top[:k]].sum() / k, abs=1e-6)
            hot = flat >= 0.4 * flat.max()
            iou = (hot & region).sum() / (hot | region).sum()
            assert out["iou"][b, r] == pytest.approx(iou, abs=1e-6)
            assert out["mass"][b, r] == pytest.approx(flat[region].sum() / flat.sum(), rel=1e-5)


def test_rank_accuracy_with_ties_is_the_mean_over_every_tie_order():
    rng = np.random.default_rng(1)
    maps = rng.integers(0, 3, size=(4, 5, 4)).astype(float)  # many ties
    regions = (rng.uniform(size=(4, 2, 5, 4)) < 0.4).astype(float)
    out = run(maps, regions)
    for b in range(4):
        flat = maps[b].ravel()
        for r in range(2):
            region = regions[b, r].ravel().astype(bool)
            k = region.sum()
            # Brute force: average over 4000 random tie orders.
            hits = [
                region[np.lexsort((rng.random(flat.size), -flat))[:k]].sum() / k
                for _ in range(4000)
            ]
            assert out["rank_acc"][b, r] == pytest.approx(np.mean(hits), abs=0.01)
    # Where the region lies does not matter: the same scene flipped upside down.
    flipped = run(maps[:, ::-1], regions[:, :, ::-1])
    np.testing.assert_allclose(flipped["rank_acc"], out["rank_acc"], rtol=1e-6)


def test_pointing_tolerance_grows_the_binary_region_and_thin_regions_are_undefined():
    cam = np.zeros((1, 5, 5))
    cam[0, 2, 2] = 1.0  # the peak
    coverage = np.zeros((1, 1, 5, 5))
    coverage[0, 0, 2, 2] = 0.3  # the peak cell is under half covered: not in R ...
    coverage[0, 0, 0, :] = 1.0  # ... R is the top row
    assert run(cam, coverage)["pointing"][0, 0] == 0.0
    # A tolerance of one cell grows R (the top row) to row 1, not to the 0.3 cell.
    assert run(cam, coverage, pointing_tolerance=1)["pointing"][0, 0] == 0.0
    assert run(cam, coverage, pointing_tolerance=(2, 0))["pointing"][0, 0] == 1.0
    assert run(cam, coverage, pointing_tolerance=(0, 2))["pointing"][0, 0] == 0.0
    # A thin region (some coverage, no cell half covered) has no pointing, rank or IoU.
    thin = np.full((1, 1, 5, 5), 0.0)
    thin[0, 0, 2, :] = 0.2
    out = run(cam, thin)
    assert not out["empty"][0, 0] and out["mass"][0, 0] == pytest.approx(0.2)
    assert all(np.isnan(out[name][0, 0]) for name in ("pointing", "rank_acc", "iou"))


def test_pointing_ties_and_tolerance():
    cam = np.zeros((1, 10, 10))
    cam[0, 0, 0] = cam[0, 9, 9] = 1.0  # two maximal pixels
    region = np.zeros((1, 1, 10, 10))
    region[0, 0, 9, 9] = 1
    assert run(cam, region)["pointing"][0, 0] == 1.0  # any maximal pixel counts
    far = np.zeros((1, 1, 10, 10))
    far[0, 0, 5, 5] = 1
    assert run(cam, far)["pointing"][0, 0] == 0.0
    assert run(cam, far, pointing_tolerance=4)["pointing"][0, 0] == 1.0


def test_zero_maps_and_empty_regions_are_flagged_not_invented():
    maps = np.zeros((2, 4, 4))
    maps[1, 1, 1] = 1.0
    regions = np.zeros((2, 2, 4, 4))
    regions[:, 0, :2, :2] = 1  # region 1 stays empty
    out = run(maps, regions)
    assert out["zero_map"].tolist() == [True, False]
    assert out["empty"].tolist() == [[False, True], [False, True]]
    assert np.isnan(out["mass"][0]).all() and np.isnan(out["pointing"][0]).all()
    assert out["mass"][1].tolist() == [1.0, 0.0]  # an empty region holds no mass
    assert np.isnan(out["lift"][1, 1]) and np.isnan(out["rank_acc"][1, 1])
    np.testing.assert_allclose(out["area"], [[0.25, 0.0], [0.25, 0.0]])


def test_coverage_fractions_weigh_mass_and_area():
    maps = np.ones((1, 4, 4))
    maps[0, 0, 0] = 5.0
    coverage = np.full((1, 1, 4, 4), 0.25)
    coverage[0, 0, 0, 0] = 1.0  # the peak cell is fully inside
    out = run(maps, coverage)
    np.testing.assert_allclose(out["mass"][0, 0], (5 + 15 * 0.25) / 20, rtol=1e-6)
    np.testing.assert_allclose(out["area"][0, 0], (1 + 15 * 0.25) / 16, rtol=1e-6)
    assert out["pointing"][0, 0] == 1.0  # the peak cell is at least half covered
    np.testing.assert_allclose(out["iou"][0, 0], 1.0)  # hot = {peak} = binary region


def test_weak_localisation_takes_the_largest_component_and_compares_boxes():
    from audit.measure.localisation import box_iou, localisation_iou

    hot = np.zeros((3, 10, 10), bool)
    hot[0, 2:6, 2:6] = True  # the object's box exactly ...
    hot[0, 8, 8] = True  # ... plus a one-pixel blob that is not the largest component
    hot[1, 0:2, 0:10] = True  # a band at the top: overlaps the object's box partly
    regions = np.zeros((3, 2, 10, 10), "float32")
    regions[:, 0, 2:6, 2:6] = 1.0  # expected: the object
    regions[:, 1] = 1.0 - regions[:, 0]  # spurious: the background
    regions[2, 0] = 0.0  # no object at all
    hot[2, 4, 4] = True
    hot = np.concatenate([hot, np.zeros((1, 10, 10), bool)])  # a zero map: no box, a miss
    regions = np.concatenate([regions, regions[:1]])
    got = localisation_iou(hot, regions[:, 0] >= 0.5)
    assert got[3] == 0.0
    assert got[0] == 1.0
    assert got[1] == box_iou((0, 0, 2, 10), (2, 2, 6, 6)) == 0.0
    assert np.isnan(got[2])
    assert box_iou((0, 0, 4, 4), (2, 2, 6, 6)) == 4 / 28
    assert np.isnan(localisation_iou(hot, None)).all()


def test_region_metrics_trace_with_unknown_image_sizes():
    """``audit.region_metrics`` inside a ``tf.function`` whose sizes are unknown."""
    import tensorflow as tf

    rng = np.random.default_rng(1)
    maps = rng.random((2, 6, 5)).astype("float32")
    regions = (rng.random((2, 2, 6, 5)) > 0.5).astype("float32")
    signature = [tf.TensorSpec((None, None, None)), tf.TensorSpec((None, 2, None, None))]
    traced = tf.function(lambda m, r: region_metrics(m, r), input_signature=signature)
    eager = region_metrics(maps, regions)
    for name, value in traced(maps, regions).items():
        np.testing.assert_allclose(value.numpy(), np.asarray(eager[name]), err_msg=name)


def test_area_downscale_is_tensorflows_area_resize():
    import tensorflow as tf

    from audit.engine.maps import area_downscale

    rng = np.random.default_rng(0)
    for shape, size in [((28, 28), (16, 16)), ((14, 20), (11, 16)), ((17, 9), (16, 8))]:
        maps = rng.random((3, *shape)).astype("float32")
        reference = tf.image.resize(maps[..., None], size, method="area")[..., 0].numpy()
        np.testing.assert_allclose(np.asarray(area_downscale(maps, size)), reference, atol=1e-6)
