"""Per-image region metrics of a CAM, computed in TensorFlow inside the compiled step.

For a map ``L >= 0`` (upsampled to the mask size) and a binary region ``R``:

==========  ================================================================  ===========
metric      definition                                                        undefined
==========  ================================================================  ===========
mass        sum(L * R) / sum(L)  (Relevance Mass Accuracy, Arras et al.;       zero map
            the energy-based pointing game)
area        |R| / |image|                                                     never
lift        mass / area  (1 = what uniform attention gives; < 1 avoids R)     zero map,
                                                                              empty R
pointing    1 if a maximal pixel of L lies in R (ties: any maximal pixel),    zero map
            optionally within ``tolerance`` pixels (a square neighbourhood)
rank_acc    |top-|R| pixels of L  ∩  R| / |R|  (Relevance Rank Accuracy;      zero map,
            ties broken by pixel order, as a stable argsort does)             empty R
iou         IoU(L >= t * max L, R), t = 0.5 by default                        zero map,
                                                                              empty R
==========  ================================================================  ===========

Undefined values are returned as NaN *inside* these tensors together with the
flags ``zero_map`` and ``empty``; the run store keeps them as nulls with the reason,
so no aggregate ever averages a made-up number.
"""

from __future__ import annotations

import tensorflow as tf

METRICS = ("mass", "area", "lift", "pointing", "rank_acc", "iou")


def _undefined_where(condition: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
    return tf.where(condition, tf.constant(float("nan"), values.dtype), values)


def region_mass(maps: tf.Tensor, regions: tf.Tensor) -> tf.Tensor:
    """``mass`` alone: ``(batch, regions)``, NaN for a zero map (coverage-weighted)."""
    flat_maps = tf.reshape(tf.cast(maps, tf.float32), (tf.shape(maps)[0], -1))
    coverage = tf.reshape(
        tf.cast(regions, tf.float32), (tf.shape(regions)[0], tf.shape(regions)[1], -1)
    )
    total = tf.reduce_sum(flat_maps, axis=1)
    mass = tf.math.divide_no_nan(tf.einsum("bp,brp->br", flat_maps, coverage), total[:, None])
    return _undefined_where(tf.broadcast_to(~(total > 0)[:, None], tf.shape(mass)), mass)


def hot_mask(maps: tf.Tensor, threshold: float) -> tf.Tensor:
    """``maps >= threshold * max`` per map (all False for a zero map): weak localisation."""
    peak = tf.reduce_max(maps, axis=(1, 2), keepdims=True)
    return tf.logical_and(maps >= threshold * peak, peak > 0)


def region_metrics(
    maps: tf.Tensor,
    regions: tf.Tensor,
    *,
    iou_threshold: float = 0.5,
    pointing_tolerance: int = 0,
    ranked: bool = True,
) -> dict[str, tf.Tensor]:
    """Every metric for every (image, region) pair.

    Args:
        maps: ``(batch, H, W)`` non-negative maps at the regions' resolution.
        regions: ``(batch, regions, H, W)`` masks in {0, 1}, or coverage fractions in
            [0, 1] of masks area-averaged to a coarser grid: ``mass``, ``area`` and
            ``lift`` weigh pixels by their coverage; ``pointing``, ``rank_acc`` and
            ``iou`` use the pixels at least half covered.

        ranked: compute ``rank_acc``, which needs one sort of every map (the costliest
            metric on a CPU); without it the result has no ``rank_acc`` key.

    Returns:
        ``(batch, regions)`` float32 tensors named as in ``METRICS``, plus
        ``zero_map`` ``(batch,)`` and ``empty`` ``(batch, regions)`` booleans.
    """
    maps = tf.cast(maps, tf.float32)
    regions = tf.cast(regions, tf.float32)
    pixels = tf.cast(tf.shape(maps)[1] * tf.shape(maps)[2], tf.float32)
    flat_maps = tf.reshape(maps, (tf.shape(maps)[0], -1))  # (B, P)
    coverage = tf.reshape(regions, (tf.shape(regions)[0], tf.shape(regions)[1], -1))
    flat_regions = tf.cast(coverage >= 0.5, tf.float32)  # the binary region

    total = tf.reduce_sum(flat_maps, axis=1)  # (B,)
    peak = tf.reduce_max(flat_maps, axis=1)
    zero_map = tf.logical_not(peak > 0.0)
    covered = tf.reduce_sum(coverage, axis=2)  # (B, R), in pixels
    region_pixels = tf.reduce_sum(flat_regions, axis=2)  # (B, R), binary pixels
    empty = covered < 1e-6
    undefined_map = tf.broadcast_to(zero_map[:, None], tf.shape(empty))

    inside = tf.einsum("bp,brp->br", flat_maps, coverage)
    mass = tf.math.divide_no_nan(inside, total[:, None])
    area = covered / pixels
    lift = tf.math.divide_no_nan(mass, area)

    at_peak = tf.cast(flat_maps >= peak[:, None], tf.float32)  # every maximal pixel
    pointing_regions = flat_regions
    if pointing_tolerance > 0:
        size = 2 * pointing_tolerance + 1
        dilated = tf.nn.max_pool2d(
            tf.transpose(regions, (0, 2, 3, 1)), size, strides=1, padding="SAME"
        )
        pointing_regions = tf.reshape(tf.transpose(dilated, (0, 3, 1, 2)), tf.shape(flat_regions))
    pointing = tf.cast(tf.einsum("bp,brp->br", at_peak, pointing_regions) > 0, tf.float32)

    # Relevance Rank Accuracy: walk the pixels in descending order of L (one stable
    # argsort per map) and count, per region, how many of its pixels are among the
    # first |R|: a cumulative sum of the region read at position |R| - 1.
    rank_acc = None
    if ranked:
        order = tf.argsort(flat_maps, axis=1, direction="DESCENDING", stable=True)  # (B, P)
        in_order = tf.gather(flat_regions, order, axis=2, batch_dims=1)  # (B, R, P)
        hits = tf.cumsum(in_order, axis=2)
        last = tf.maximum(tf.cast(region_pixels, tf.int32) - 1, 0)
        found = tf.gather(hits, last[..., None], axis=2, batch_dims=2)[..., 0]
        rank_acc = tf.math.divide_no_nan(found, region_pixels)

    hot = tf.cast(flat_maps >= iou_threshold * peak[:, None], tf.float32)  # (B, P)
    intersection = tf.einsum("bp,brp->br", hot, flat_regions)
    union = tf.reduce_sum(hot, axis=1)[:, None] + region_pixels - intersection
    iou = tf.math.divide_no_nan(intersection, union)

    no_lift = tf.logical_or(undefined_map, empty)
    no_binary = tf.logical_or(undefined_map, region_pixels < 0.5)
    result = {
        "mass": _undefined_where(undefined_map, mass),
        "area": area,
        "lift": _undefined_where(no_lift, lift),
        "pointing": _undefined_where(undefined_map, pointing),
        "iou": _undefined_where(no_binary, iou),
        "zero_map": zero_map,
        "empty": empty,
    }
    if rank_acc is not None:
        result["rank_acc"] = _undefined_where(no_binary, rank_acc)
    return result
