"""CAM methods that are cheap functions of one forward and one backward pass.

Every method is a pure function (``keras.ops``: it runs on the TensorFlow, JAX and
PyTorch backends alike) of the target layer's activations ``A`` and the
gradients ``G`` of the per-sample target logit with respect to ``A``, both shaped
``(batch, height, width, channels)`` and float32. It returns the map
``(batch, height, width)``, already passed through ReLU and never normalised,
so maps stay comparable across images and classes.

Adding a method is one function decorated with ``@cam_method(name)``
(``audit.engine.registry``: the decorator records what the method needs).

Two opt-in methods cost more or ignore the gradients (docs/metrics.md lists the costs):

* ``eigencam`` (Muhammad & Yeasin 2020) is class-agnostic: the activations projected
  on their first principal component. Same cost as the others (an SVD of an
  ``(h*w, channels)`` matrix per image).
* ``scorecam`` (Wang et al. 2020) needs forward passes, not gradients: one masked
  forward per channel and image (``score_channels`` channels of highest spatial
  variance, as in Faster Score-CAM, or all of them). It is a ``ScoreCAM`` object,
  registered with ``forward_passes=True``; the engine passes it the images, the
  targets and the model's forward function (images -> probabilities).

Two methods are registered in the variant other tools compute as well, for comparing
maps with them (docs/engine.md, "Which variant each method is"): ``gradcam++-authors``
(the alphas normalised as in the Grad-CAM++ authors' code) and ``scorecam-nobaseline``
(Score-CAM weights without the black image's score subtracted).
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import ops

from audit.engine.registry import built_in_names, cam_method, cam_spec, spec_of

CamMethod = Callable[..., object]

# Guards divisions by sums that are legitimately zero (a dead channel).
_EPS = 1e-7


def _weighted_sum(weights, activations):
    """ReLU(sum_k w_k A_k) for channel weights ``(batch, channels)``."""
    return ops.relu(ops.einsum("bc,bhwc->bhw", weights, activations))


@cam_method("gradcam")
def gradcam(activations, gradients):
    """Grad-CAM (Selvaraju et al. 2017): alpha_k = mean_ij G_k; L = ReLU(sum_k alpha_k A_k)."""
    weights = ops.mean(gradients, axis=(1, 2))
    return _weighted_sum(weights, activations)


@cam_method("hirescam")
def hirescam(activations, gradients):
    """HiResCAM (Draelos & Carin 2020): L = ReLU(sum_k G_k * A_k), element-wise.

    Unlike Grad-CAM it does not average the gradients spatially, so the map is
    faithful to what the head computes when the head is GAP + Dense.
    """
    return ops.relu(ops.sum(gradients * activations, axis=-1))


def _plus_plus_alphas(activations, gradients):
    """Grad-CAM++'s closed-form alphas: with the exponential-score approximation the
    higher derivatives become powers of the first, a_ij = G^2 / (2 G^2 + sum_ab A * G^3);
    0 where the denominator is 0."""
    grads_2 = ops.square(gradients)
    grads_3 = grads_2 * gradients
    activation_sums = ops.sum(activations, axis=(1, 2), keepdims=True)
    return ops.divide_no_nan(grads_2, 2.0 * grads_2 + activation_sums * grads_3)


@cam_method("gradcam++", aliases=("gradcampp",))
def gradcam_plus_plus(activations, gradients):
    """Grad-CAM++ (Chattopadhay et al. 2018) in pytorch-grad-cam's closed form (without
    its eps): w_k = sum_ij a_ij ReLU(G_k), L = ReLU(sum_k w_k A_k).

    The alphas are not normalised, as in the paper's equations; ``gradcam++-authors``
    normalises them as the authors' code does.
    """
    weights = ops.sum(_plus_plus_alphas(activations, gradients) * ops.relu(gradients), axis=(1, 2))
    return _weighted_sum(weights, activations)


@cam_method("gradcam++-authors")
def gradcam_plus_plus_authors(activations, gradients):
    """Grad-CAM++ as its authors' code computes it (adityac94/Grad_CAM_plus_plus): each
    channel's alphas are divided by their sum over the positions where G_k > 0 (left
    as they are where that sum is 0), so w_k = sum_ij a_ij ReLU(G_k) / sum_{ij: G_k > 0}
    a_ij is an alpha-weighted mean of the positive gradients, not a sum.

    The code also multiplies the gradients by exp(score): a factor per image, left out
    so that maps compare across images (it cancels in a normalised map).
    """
    alphas = _plus_plus_alphas(activations, gradients)
    totals = ops.sum(ops.where(gradients > 0, alphas, 0.0), axis=(1, 2))
    totals = ops.where(totals == 0, 1.0, totals)
    weights = ops.sum(alphas * ops.relu(gradients), axis=(1, 2)) / totals
    return _weighted_sum(weights, activations)


@cam_method("xgradcam")
def xgradcam(activations, gradients):
    """XGrad-CAM (Fu et al. 2020): w_k = sum_ij G_k A_k / (sum_ij A_k); L = ReLU(sum_k w_k A_k)."""
    activation_sums = ops.sum(activations, axis=(1, 2))
    weights = ops.sum(gradients * activations, axis=(1, 2)) / (activation_sums + _EPS)
    return _weighted_sum(weights, activations)


@cam_method("layercam")
def layercam(activations, gradients):
    """LayerCAM (Jiang et al. 2021): L = ReLU(sum_k ReLU(G_k) * A_k).

    The outer ReLU matters only for layers whose activations can be negative.
    """
    return ops.relu(ops.sum(ops.relu(gradients) * activations, axis=-1))


@cam_method("eigencam", gradients=False, class_agnostic=True)
def eigencam(activations, gradients):
    """Eigen-CAM: the centred activations ``(h*w, channels)`` projected on their first
    principal component. The gradients are ignored (the map is class-agnostic).

    A principal component's sign is arbitrary; it is chosen so that the projection
    agrees with the total activation (sum over channels), then ReLU as for the others.
    """
    del gradients
    batch, height, width, channels = ops.shape(activations)
    flat = ops.reshape(activations, (batch, height * width, channels))
    centred = flat - ops.mean(flat, axis=1, keepdims=True)
    _, _, v_transposed = ops.svd(centred, full_matrices=False)  # (B, min(P, C), C)
    projection = ops.einsum("bpc,bc->bp", centred, v_transposed[:, 0, :])
    total = ops.sum(flat, axis=-1)
    total = total - ops.mean(total, axis=1, keepdims=True)
    sign = ops.where(ops.sum(projection * total, axis=1, keepdims=True) < 0, -1.0, 1.0)
    return ops.relu(ops.reshape(projection * sign, (batch, height, width)))


def _map_indices(function, count: int):
    """``stack([function(i) for i in range(count)])``, one index at a time: the memory
    of one call. TensorFlow: ``tf.map_fn`` without parallel iterations; JAX: a
    ``lax.map`` loop (not ``count`` unrolled copies); PyTorch: a loop."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.map_fn(
            function, tf.range(count), fn_output_signature=tf.float32, parallel_iterations=1
        )
    return ops.map(function, ops.arange(count, dtype="int32"))


@cam_method(
    "scorecam",
    gradients=False,
    forward_passes=True,
    configure=lambda score_channels=32, **_: ScoreCAM(score_channels),
)
@cam_method(
    "scorecam-nobaseline",
    gradients=False,
    forward_passes=True,
    configure=lambda score_channels=32, **_: ScoreCAM(score_channels, baseline=False),
)
class ScoreCAM:
    """Score-CAM: channel weights from the model's own response to masked inputs.

    For each channel k of the target layer, ``H_k`` is ``A_k`` upsampled to the input
    (half-pixel bilinear) and min-max scaled to [0, 1]; its weight is
    ``p(X * H_k)[c] - p(0)[c]``, the gain in the model's class-c probability (its
    softmax, or a multi-label model's sigmoid) over a black image; the map is
    ``ReLU(sum_k w_k A_k)``. ``channels`` limits the sum to the k channels of highest
    spatial variance per image (Faster Score-CAM); None uses every channel (one forward
    pass per channel: for 1280 channels, 1280x a plain pass).

    ``baseline=False`` (``scorecam-nobaseline``) weighs by ``p(X * H_k)[c]`` alone, as
    the authors' code and tf-keras-vis do. The black image's score is what the paper's
    "increase of confidence" is measured from; subtracting it lowers every weight by
    the same amount, so a map can be all zero (e.g. where every masked image scores
    below the black one).
    """

    def __init__(self, channels: int | None = 32, *, baseline: bool = True) -> None:
        if channels is not None and channels < 1:
            raise ValueError(f"score_channels must be at least 1 or None, got {channels}")
        self.channels = channels
        self.baseline = baseline

    def __call__(self, activations, gradients, *, images, targets, forward):
        del gradients
        count = activations.shape[-1]
        if self.channels is not None and self.channels < count:
            variance = ops.var(activations, axis=(1, 2))
            _, picked = ops.top_k(variance, k=self.channels)
            activations = ops.take_along_axis(activations, picked[:, None, None, :], axis=3)
            count = self.channels
        size = tuple(images.shape[1:3])
        chosen = ops.cast(targets, "int32")[:, None]
        floor = 0.0
        if self.baseline:
            black = forward(ops.zeros_like(images))
            floor = ops.take_along_axis(black, chosen, axis=1)[:, 0]

        def channel_score(index):
            channel = ops.take(activations, ops.reshape(index, (1,)), axis=3)
            upsampled = ops.image.resize(
                channel, size, interpolation="bilinear", data_format="channels_last"
            )
            low = ops.min(upsampled, axis=(1, 2, 3), keepdims=True)
            high = ops.max(upsampled, axis=(1, 2, 3), keepdims=True)
            mask = ops.divide_no_nan(upsampled - low, high - low)
            probabilities = forward(images * mask)
            return ops.take_along_axis(probabilities, chosen, axis=1)[:, 0] - floor

        scores = _map_indices(channel_score, count)  # (channels, batch)
        return _weighted_sum(ops.transpose(scores), activations)


def get_cam_method(name: str, *, score_channels: int | None = 32) -> CamMethod:
    """Return the CAM method registered under ``name`` (case, dashes and underscores
    ignored; ``audit.engine.registry``).

    ``score_channels``: for ``scorecam``, how many channels to score (None = all).
    """
    return cam_spec(name).build(score_channels=score_channels)


def needs_forward(method: CamMethod) -> bool:
    """Whether the method scores masked forward passes (Score-CAM) instead of gradients."""
    return spec_of(method).forward_passes


def uses_gradients(method: CamMethod) -> bool:
    """False for the methods that ignore the gradients (Eigen-CAM, Score-CAM): they have
    no counterfactual form."""
    return spec_of(method).gradients and not spec_of(method).forward_passes


def class_agnostic(method: CamMethod) -> bool:
    """True when the map does not depend on the explained class (Eigen-CAM)."""
    return spec_of(method).class_agnostic


# The built-in methods by name (Score-CAM with its default 32 channels).
CAM_METHODS: dict[str, CamMethod] = {name: get_cam_method(name) for name in built_in_names()}
