"""Per-image region metrics of a CAM, computed on device inside the compiled step.

Written in ``keras.ops``, so the same functions run in the TensorFlow, JAX and
PyTorch steps (only the stable descending sort is spelled per backend).

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

import keras

METRICS = ("mass", "area", "lift", "pointing", "rank_acc", "iou")

ops = keras.ops


def _undefined_where(condition, values):
    return ops.where(condition, ops.cast(float("nan"), values.dtype), values)


def _flat(maps, regions):
    """``(B, P)`` float32 maps and ``(B, R, P)`` float32 coverage."""
    maps, regions = ops.cast(maps, "float32"), ops.cast(regions, "float32")
    batch, count = ops.shape(regions)[0], ops.shape(regions)[1]
    return ops.reshape(maps, (ops.shape(maps)[0], -1)), ops.reshape(regions, (batch, count, -1))


def region_mass(maps, regions):
    """``mass`` alone: ``(batch, regions)``, NaN for a zero map (coverage-weighted)."""
    flat_maps, coverage = _flat(maps, regions)
    total = ops.sum(flat_maps, axis=1)
    mass = ops.divide_no_nan(ops.einsum("bp,brp->br", flat_maps, coverage), total[:, None])
    return _undefined_where(ops.broadcast_to(~(total > 0)[:, None], ops.shape(mass)), mass)


def hot_mask(maps, threshold: float):
    """``maps >= threshold * max`` per map (all False for a zero map): weak localisation."""
    peak = ops.max(maps, axis=(1, 2), keepdims=True)
    return ops.logical_and(maps >= threshold * peak, peak > 0)


def descending_order(values):
    """Indices that sort each row of ``(B, P)`` in descending order, ties in pixel order
    (a stable sort; ``keras.ops.argsort`` promises neither direction nor stability)."""
    from audit.backends import running_backend

    backend = running_backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.argsort(values, axis=1, direction="DESCENDING", stable=True)
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.argsort(-values, axis=1, stable=True)
    import torch

    return torch.argsort(values, dim=1, descending=True, stable=True)


def region_metrics(
    maps,
    regions,
    *,
    iou_threshold: float = 0.5,
    pointing_tolerance: int = 0,
    ranked: bool = True,
) -> dict:
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
    regions = ops.cast(regions, "float32")
    pixels = ops.cast(ops.shape(maps)[1] * ops.shape(maps)[2], "float32")
    flat_maps, coverage = _flat(maps, regions)  # (B, P), (B, R, P)
    flat_regions = ops.cast(coverage >= 0.5, "float32")  # the binary region

    total = ops.sum(flat_maps, axis=1)  # (B,)
    peak = ops.max(flat_maps, axis=1)
    zero_map = ops.logical_not(peak > 0.0)
    covered = ops.sum(coverage, axis=2)  # (B, R), in pixels
    region_pixels = ops.sum(flat_regions, axis=2)  # (B, R), binary pixels
    empty = covered < 1e-6
    undefined_map = ops.broadcast_to(zero_map[:, None], ops.shape(empty))

    inside = ops.einsum("bp,brp->br", flat_maps, coverage)
    mass = ops.divide_no_nan(inside, total[:, None])
    area = covered / pixels
    lift = ops.divide_no_nan(mass, area)

    at_peak = ops.cast(flat_maps >= peak[:, None], "float32")  # every maximal pixel
    pointing_regions = flat_regions
    if pointing_tolerance > 0:
        size = 2 * pointing_tolerance + 1
        dilated = ops.max_pool(
            ops.transpose(regions, (0, 2, 3, 1)),
            size,
            strides=1,
            padding="same",
            data_format="channels_last",
        )
        pointing_regions = ops.reshape(
            ops.transpose(dilated, (0, 3, 1, 2)), ops.shape(flat_regions)
        )
    pointing = ops.cast(ops.einsum("bp,brp->br", at_peak, pointing_regions) > 0, "float32")

    # Relevance Rank Accuracy: walk the pixels in descending order of L (one stable
    # argsort per map) and count, per region, how many of its pixels are among the
    # first |R|: a cumulative sum of the region read at position |R| - 1.
    rank_acc = None
    if ranked:
        order = descending_order(flat_maps)  # (B, P)
        order = ops.broadcast_to(order[:, None, :], ops.shape(flat_regions))
        hits = ops.cumsum(ops.take_along_axis(flat_regions, order, axis=2), axis=2)  # (B, R, P)
        last = ops.maximum(ops.cast(region_pixels, "int32") - 1, 0)
        found = ops.take_along_axis(hits, last[..., None], axis=2)[..., 0]
        rank_acc = ops.divide_no_nan(found, region_pixels)

    hot = ops.cast(flat_maps >= iou_threshold * peak[:, None], "float32")  # (B, P)
    intersection = ops.einsum("bp,brp->br", hot, flat_regions)
    union = ops.sum(hot, axis=1)[:, None] + region_pixels - intersection
    iou = ops.divide_no_nan(intersection, union)

    no_lift = ops.logical_or(undefined_map, empty)
    no_binary = ops.logical_or(undefined_map, region_pixels < 0.5)
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
