"""Per-image region metrics of a CAM, computed on device inside the compiled step.

Written in ``keras.ops``, so the same functions run in the TensorFlow, JAX and
PyTorch steps.

For a map ``L >= 0`` (upsampled to the mask size) and a binary region ``R``:

==========  ================================================================  ===========
metric      definition                                                        undefined
==========  ================================================================  ===========
mass        sum(L * R) / sum(L)  (Relevance Mass Accuracy, Arras et al.;       zero map
            the energy-based pointing game)
area        |R| / |image|                                                     never
lift        mass / area  (1 = what uniform attention gives; < 1 avoids R)     zero map,
                                                                              empty R
pointing    1 if a maximal pixel of L lies in R (ties: any maximal pixel),    zero map,
            optionally within ``tolerance`` pixels of R (R grown by a         thin R
            square of that half-width)
rank_acc    |top-|R| pixels of L  ∩  R| / |R|  (Relevance Rank Accuracy;      zero map,
            pixels tied at the |R|-th value share the remaining places        empty R,
            in proportion: the expected value over every tie order)           thin R
iou         IoU(L >= t * max L, R), t = 0.5 by default                        zero map,
                                                                              empty R,
                                                                              thin R
==========  ================================================================  ===========

On a measuring grid coarser than the mask, R is the cells at least half covered;
"thin R" is a region with some coverage but no such cell (a stroke or outline):
its pointing, rank accuracy and IoU are undefined there, while mass, area and lift
still weigh every cell by its coverage (``dilate`` or ``box_from_mask`` widen it).

Quantus' Relevance Rank Accuracy takes the top pixels of a plain ``argsort``, so
ties (large zero areas of a ReLU map, flat bilinear patches) count in or out by
their position in the image; here they do not depend on where R lies.

Undefined values are returned as NaN *inside* these tensors together with the
flags ``zero_map`` and ``empty``; the run store keeps them as nulls with the reason,
so no aggregate ever averages a made-up number.
"""

from __future__ import annotations

from collections.abc import Collection

import keras

from audit.measure import spec

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


def region_metrics(
    maps,
    regions,
    *,
    iou_threshold: float = 0.5,
    pointing_tolerance: int | tuple[int, int] = 0,
    names: Collection[str] | None = None,
) -> dict:
    """Every metric for every (image, region) pair.

    Args:
        maps: ``(batch, H, W)`` non-negative maps at the regions' resolution.
        regions: ``(batch, regions, H, W)`` masks in {0, 1}, or coverage fractions in
            [0, 1] of masks area-averaged to a coarser grid: ``mass``, ``area`` and
            ``lift`` weigh pixels by their coverage; ``pointing``, ``rank_acc`` and
            ``iou`` use the pixels at least half covered.

        pointing_tolerance: in cells of this grid, one number or (rows, columns).
        names: the metrics to compute (default: every one in ``audit.measure.spec``);
            the built-in ones are always computed but ``rank_acc``, which needs one
            sort of every map (the costliest metric on a CPU). Added metrics are called
            here, their values null on a zero map.

    Returns:
        ``(batch, regions)`` float32 tensors named as in ``audit.measure.spec``, plus
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
    rows, columns = (
        pointing_tolerance if isinstance(pointing_tolerance, tuple) else (pointing_tolerance,) * 2
    )
    if rows > 0 or columns > 0:  # grow the binary region by the tolerance
        binary = ops.transpose(ops.reshape(flat_regions, ops.shape(regions)), (0, 2, 3, 1))
        dilated = ops.max_pool(
            binary,
            (2 * rows + 1, 2 * columns + 1),
            strides=1,
            padding="same",
            data_format="channels_last",
        )
        pointing_regions = ops.reshape(
            ops.transpose(dilated, (0, 3, 1, 2)), ops.shape(flat_regions)
        )
    pointing = ops.cast(ops.einsum("bp,brp->br", at_peak, pointing_regions) > 0, "float32")

    # Relevance Rank Accuracy: the |R|-th largest value v of L (one sort per map);
    # pixels above v are all in the top |R|, and the places left go to the pixels
    # tied at v in proportion to how many of them lie in R.
    rank_acc = None
    wanted_names = spec.names() if names is None else tuple(names)
    if "rank_acc" in wanted_names:
        count = ops.shape(flat_maps)[1]
        ascending = ops.sort(flat_maps, axis=1)
        wanted = ops.cast(region_pixels, "int32")  # (B, R)
        position = ops.clip(count - wanted, 0, count - 1)
        kth = ops.take_along_axis(ascending, position, axis=1)[..., None]  # (B, R, 1)
        values = flat_maps[:, None, :]
        above = ops.cast(values > kth, "float32")
        tied = ops.cast(values == kth, "float32")
        places = region_pixels - ops.sum(above, axis=2)
        found = ops.sum(above * flat_regions, axis=2) + places * ops.divide_no_nan(
            ops.sum(tied * flat_regions, axis=2), ops.sum(tied, axis=2)
        )
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
        "pointing": _undefined_where(
            ops.logical_or(
                undefined_map, ops.logical_and(region_pixels < 0.5, ops.logical_not(empty))
            ),
            pointing,
        ),
        "iou": _undefined_where(no_binary, iou),
        "zero_map": zero_map,
        "empty": empty,
    }
    if rank_acc is not None:
        result["rank_acc"] = _undefined_where(no_binary, rank_acc)
    for name in wanted_names:
        added = spec.metric(name)
        if added.compute is not None:
            value = ops.cast(added.compute(maps, regions), "float32")
            result[name] = _undefined_where(undefined_map, value)
    return result
