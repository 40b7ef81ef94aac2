"""The cut on the model shapes users build: a softmax inside a nested model, one-output
binary classifiers, feature maps made by operations, nested heads, keepdims pooling,
subclassed parts, and weights that change after the engine was made."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from audit import GradCAM, ModelStructureError


def tape_gradcam(inputs, feature, scores, images, targets) -> np.ndarray:
    """Grad-CAM written out on a flat graph: ``feature`` and ``scores`` are its tensors."""
    probe = keras.Model(inputs, [feature, scores])
    with tf.GradientTape() as tape:
        activations, logits = probe(images, training=False)
        score = tf.reduce_sum(tf.gather(logits, targets, axis=1, batch_dims=1))
    weights = tf.reduce_mean(tape.gradient(score, activations), axis=(1, 2))
    return tf.nn.relu(tf.einsum("bhwc,bc->bhw", activations, weights)).numpy()


def images_of(count: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3)).astype("float32")


def two_convs(size: int = 16):
    """Input -> conv c1 -> conv c2: (inputs, c2's output)."""
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="c1")(inputs)
    return inputs, keras.layers.Conv2D(6, 3, activation="relu", name="c2")(x)


def linear_copy(dense, tensor):
    """``dense`` without its activation, on a copy of its weights: the reference scores."""
    copy = keras.layers.Dense(dense.units)
    scores = copy(tensor)
    copy.set_weights(dense.get_weights())
    return scores


# ------------------------------------------------------------ nested softmax


def test_a_softmax_inside_a_nested_model_is_bypassed_at_any_depth():
    keras.utils.set_random_seed(1)
    inputs, features = two_convs()
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    dense = keras.layers.Dense(4, activation="softmax", name="out")
    classifier = keras.Model(inputs, dense(pooled), name="clf")
    dense.set_weights([dense.get_weights()[0] * 20, np.array([3.0, 0, 0, 0], "float32")])
    scores = linear_copy(dense, pooled)
    # A trained classifier wrapped with its preprocessing, once or twice over.
    once = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 255), classifier])
    twice = keras.Sequential(
        [keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 255), keras.Sequential([classifier])]
    )
    images, targets = images_of(4), np.array([0, 1, 2, 3])
    expected = tape_gradcam(inputs, features, scores, images / 255, targets)
    assert (expected.reshape(4, -1).max(axis=1) > 0).all()
    for model in (once, twice):
        cam = GradCAM(model)
        assert cam.softmax_bypassed and cam.layer_path.endswith("clf/c2")
        details = cam.explain_details(images, targets=targets)
        np.testing.assert_allclose(details.maps, expected, rtol=1e-4, atol=1e-6 * expected.max())
        np.testing.assert_allclose(
            details.probabilities, model.predict(images, verbose=0), rtol=1e-5, atol=1e-6
        )


def test_a_softmax_in_a_nested_head_model_is_bypassed():
    """``Model(inp, head(base(inp)))``: the target is in the base, the softmax in the head."""
    keras.utils.set_random_seed(2)
    inputs, features = two_convs()
    base = keras.Model(inputs, features, name="base")
    dense = keras.layers.Dense(3, activation="softmax", name="out")
    head = keras.Sequential(
        [keras.Input(features.shape[1:]), keras.layers.GlobalAveragePooling2D(), dense],
        name="head",
    )
    outer = keras.Input((16, 16, 3))
    model = keras.Model(outer, head(base(outer)))
    scores = linear_copy(dense, keras.layers.GlobalAveragePooling2D()(features))
    images, targets = images_of(3, seed=2) / 255, np.array([0, 1, 2])
    cam = GradCAM(model)
    assert cam.softmax_bypassed and cam.layer_path == "base/c2"
    details = cam.explain_details(images, targets=targets)
    expected = tape_gradcam(inputs, features, scores, images, targets)
    np.testing.assert_allclose(details.maps, expected, rtol=1e-4, atol=1e-6 * expected.max())
    np.testing.assert_allclose(
        details.probabilities, model.predict(images, verbose=0), rtol=1e-5, atol=1e-6
    )


def test_a_tf_nn_softmax_activation_is_bypassed():
    """tf.nn.softmax is named softmax_v2."""
    inputs, features = two_convs()
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    dense = keras.layers.Dense(3, activation=tf.nn.softmax)
    model = keras.Model(inputs, dense(pooled))
    scores = keras.Model(inputs, linear_copy(dense, pooled))
    images = images_of(2) / 255
    cam = GradCAM(model)
    assert cam.softmax_bypassed
    details = cam.explain_details(images)
    np.testing.assert_allclose(details.logits, scores.predict(images, verbose=0), rtol=1e-5)


@pytest.mark.parametrize("softmax", [keras.ops.softmax, keras.ops.log_softmax])
def test_a_softmax_operation_is_bypassed_and_survives_saving(softmax, tmp_path):
    """``keras.ops.softmax(x)`` in a functional model is an operation, not a layer; it is
    skipped like a Softmax layer, also nested in a wrapper and after a safe-mode load. A
    log-softmax too: its outputs are log-probabilities."""
    from audit.engine.models import load_model

    keras.utils.set_random_seed(8)
    inputs, features = two_convs()
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    dense = keras.layers.Dense(4, name="out")
    scores = dense(pooled)
    dense.set_weights([dense.get_weights()[0] * 20, np.array([3.0, 0, 0, 0], "float32")])
    classifier = keras.Model(inputs, softmax(scores), name="clf")
    assert not any(isinstance(op, keras.layers.Softmax) for op in classifier.operations)
    wrapped = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Rescaling(1.0), classifier])
    classifier.save(tmp_path / "clf.keras")
    loaded = load_model(tmp_path / "clf.keras")  # safe mode
    images, targets = images_of(4, seed=8) / 255, np.array([0, 1, 2, 3])
    expected = tape_gradcam(inputs, features, scores, images, targets)
    assert (expected.reshape(4, -1).max(axis=1) > 0).all()
    for model in (classifier, wrapped, loaded):
        cam = GradCAM(model)
        assert cam.softmax_bypassed
        details = cam.explain_details(images, targets=targets)
        np.testing.assert_allclose(details.maps, expected, rtol=1e-4, atol=1e-6 * expected.max())
        outputs = model.predict(images, verbose=0)
        if softmax is keras.ops.log_softmax:
            outputs = np.exp(outputs)
        np.testing.assert_allclose(details.probabilities, outputs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("after", ["float32_activation", "identity", "cast"])
def test_a_softmax_under_steps_that_keep_its_values_is_bypassed(after):
    """Mixed precision ends a model in ``Activation("linear", dtype="float32")``; an
    ``Identity`` layer or a cast keeps the values too: the softmax under them is found,
    so the probabilities are the model's, not a softmax of them."""
    keras.utils.set_random_seed(10)
    inputs, features = two_convs()
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    dense = keras.layers.Dense(3, activation="softmax")
    output = dense(pooled)
    dense.set_weights([dense.get_weights()[0] * 20, np.array([3.0, 0, 0], "float32")])
    if after == "float32_activation":
        output = keras.layers.Activation("linear", dtype="float32")(output)
    elif after == "identity":
        output = keras.layers.Identity()(output)
    else:
        output = keras.ops.cast(output, "float32")
    model = keras.Model(inputs, output)
    scores = keras.Model(inputs, linear_copy(dense, pooled))
    images = images_of(3, seed=10) / 255
    cam = GradCAM(model)
    assert cam.softmax_bypassed
    details = cam.explain_details(images)
    np.testing.assert_allclose(details.logits, scores.predict(images, verbose=0), rtol=1e-5)
    predicted = model.predict(images, verbose=0)
    twice = np.exp(predicted) / np.exp(predicted).sum(axis=1, keepdims=True)
    assert np.abs(twice - predicted).max() > 0.1  # a second softmax would be seen
    np.testing.assert_allclose(details.probabilities, predicted, rtol=1e-5, atol=1e-6)


def test_a_nested_classifier_under_a_float32_activation_is_cut_inside():
    """Mixed precision's output layer after a wrapped classifier: the target and the
    softmax are inside it; the cut goes in, the float32 step adds nothing."""
    keras.utils.set_random_seed(11)
    inputs, features = two_convs()
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    dense = keras.layers.Dense(3, activation="softmax")
    classifier = keras.Model(inputs, dense(pooled), name="clf")
    outer = keras.Input((16, 16, 3))
    model = keras.Model(
        outer, keras.layers.Activation("linear", dtype="float32")(classifier(outer))
    )
    scores = linear_copy(dense, pooled)
    images, targets = images_of(3, seed=11) / 255, np.array([0, 1, 2])
    expected = tape_gradcam(inputs, features, scores, images, targets)
    assert expected.max() > 0
    cam = GradCAM(model)
    assert cam.softmax_bypassed and cam.layer_path == "clf/c2"
    details = cam.explain_details(images, targets=targets)
    np.testing.assert_allclose(details.maps, expected, rtol=1e-4, atol=1e-6 * expected.max())
    np.testing.assert_allclose(
        details.probabilities, model.predict(images, verbose=0), rtol=1e-5, atol=1e-6
    )


def test_probabilities_from_an_unknown_softmax_are_warned_about():
    """A softmax written out (exp / sum) is no softmax the cut knows: Grad-CAM explains
    probabilities. The engine says so once; logits and a known softmax say nothing."""
    keras.utils.set_random_seed(12)
    inputs, features = two_convs()
    scores = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(features))
    exp = keras.ops.exp(scores)
    written_out = keras.Model(inputs, exp / keras.ops.sum(exp, axis=-1, keepdims=True))
    images = images_of(8, seed=12) / 255
    cam = GradCAM(written_out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cam.explain(images[:2])  # two rows tell nothing yet
    with pytest.warns(UserWarning, match="look like probabilities.*Softmax layer"):
        cam.explain(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cam.explain(images)  # once per model, whatever engine
        GradCAM(written_out).explain(images)
        for model in (
            keras.Model(inputs, scores),
            keras.Model(inputs, keras.layers.Softmax()(scores)),
        ):
            GradCAM(model).explain(images)


def test_a_softmax_over_the_batch_is_not_bypassed():
    inputs, features = two_convs()
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    layer = keras.Model(inputs, keras.layers.Softmax(axis=0)(keras.layers.Dense(3)(pooled)))
    operation = keras.Model(inputs, keras.ops.softmax(keras.layers.Dense(3)(pooled), axis=0))
    for model in (layer, operation):
        assert not GradCAM(model).softmax_bypassed


def test_a_log_softmax_activation_is_bypassed():
    inputs, features = two_convs()
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    dense = keras.layers.Dense(3, activation="log_softmax")
    model = keras.Model(inputs, dense(pooled))
    scores = keras.Model(inputs, linear_copy(dense, pooled))
    images = images_of(2) / 255
    cam = GradCAM(model)
    assert cam.softmax_bypassed and not cam.multi_label
    details = cam.explain_details(images)
    np.testing.assert_allclose(details.logits, scores.predict(images, verbose=0), rtol=1e-5)
    np.testing.assert_allclose(
        details.probabilities, np.exp(model.predict(images, verbose=0)), rtol=1e-5, atol=1e-6
    )


@pytest.mark.filterwarnings("ignore:You are using a softmax over axis -1")  # Keras' own
def test_a_softmax_operation_over_one_output_is_refused():
    inputs, features = two_convs()
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    model = keras.Model(inputs, keras.ops.softmax(keras.layers.Dense(1)(pooled)))
    with pytest.raises(ModelStructureError, match="softmax over one output.*sigmoid"):
        GradCAM(model)


MULTI_LABEL_ENDINGS = ["dense_sigmoid", "sigmoid_layer", "sigmoid_op"]


@pytest.mark.parametrize("ending", MULTI_LABEL_ENDINGS)
def test_a_multi_label_model_is_explained_from_its_logits_and_keeps_its_sigmoids(ending):
    """Several sigmoid outputs: maps of the logits (a saturated sigmoid's gradient is 0 in
    float32, which made the map zero), probabilities the model's own sigmoids."""
    keras.utils.set_random_seed(9)
    inputs, features = two_convs()
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    dense = keras.layers.Dense(3, activation="sigmoid" if ending == "dense_sigmoid" else None)
    scores = dense(pooled)
    # Class 0's logit is ~40: its sigmoid is exactly 1 in float32.
    dense.set_weights([dense.get_weights()[0] * 5, np.array([40.0, 0, 0], "float32")])
    if ending == "sigmoid_layer":
        output = keras.layers.Activation("sigmoid")(scores)
    elif ending == "sigmoid_op":
        output = keras.ops.sigmoid(scores)
    else:
        output = scores
        scores = linear_copy(dense, pooled)
    model = keras.Model(inputs, output)
    images, targets = images_of(3, seed=9) / 255, np.array([0, 1, 2])
    expected = tape_gradcam(inputs, features, scores, images, targets)
    assert (expected.reshape(3, -1).max(axis=1) > 0).all()
    cam = GradCAM(model)
    assert cam.softmax_bypassed and cam.multi_label and cam.num_classes == 3
    details = cam.explain_details(images, targets=targets)
    np.testing.assert_allclose(details.maps, expected, rtol=1e-4, atol=1e-6 * expected.max())
    assert not details.zero.any()
    predicted = model.predict(images, verbose=0)
    assert (predicted[:, 0] == 1.0).all()  # saturated
    np.testing.assert_allclose(details.probabilities, predicted, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cam.probabilities(images), predicted, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- binary models


def binary_model(ending: str, images: np.ndarray):
    """conv -> GAP -> one score z, as ``Dense(1)`` (``dense``), ``Dense(1, "sigmoid")``
    (``dense_sigmoid``, also ``wrapped`` in a Sequential) or ``Dense(1)`` and a sigmoid
    layer (``sigmoid_layer``) or operation (``sigmoid_op``), z centred on ``images`` (both
    classes predicted).
    Returns the model, its input, c2's output and z."""
    inputs, features = two_convs()
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    activation = "sigmoid" if ending in ("dense_sigmoid", "wrapped") else None
    dense = keras.layers.Dense(1, activation=activation)
    output = dense(pooled)
    if ending == "sigmoid_layer":
        output = keras.layers.Activation("sigmoid")(output)
    if ending == "sigmoid_op":  # keras.ops.sigmoid: an operation, not a layer
        output = keras.ops.sigmoid(output)
    kernel = dense.get_weights()[0] * 10
    centre = np.median(keras.Model(inputs, pooled).predict(images, verbose=0) @ kernel)
    dense.set_weights([kernel, np.array([-centre], "float32")])
    model = keras.Model(inputs, output, name="clf")
    if ending == "wrapped":
        model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Rescaling(1.0), model])
    return model, inputs, features, linear_copy(dense, pooled)


@pytest.mark.parametrize(
    "ending", ["dense", "dense_sigmoid", "sigmoid_layer", "sigmoid_op", "wrapped"]
)
def test_a_one_output_binary_classifier_is_two_classes(ending):
    """Logits [-z/2, z/2]: softmax [1 - sigmoid(z), sigmoid(z)]; class 1's map is half
    the Grad-CAM of z, class 0's half that of -z."""
    keras.utils.set_random_seed(3)
    images, targets = images_of(6, seed=3) / 255, np.array([1, 0, 1, 0, 1, 0])
    model, inputs, features, z = binary_model(ending, images)
    cam = GradCAM(model)
    assert cam.num_classes == 2
    assert cam.softmax_bypassed == (ending != "dense")
    details = cam.explain_details(images, targets=targets)
    score = keras.Model(inputs, z).predict(images, verbose=0)[:, 0]
    assert score.min() < 0 < score.max()
    np.testing.assert_allclose(details.logits, np.stack([-score, score], 1) / 2, rtol=1e-5)
    sigmoid = 1 / (1 + np.exp(-score))
    np.testing.assert_allclose(details.probabilities[:, 1], sigmoid, rtol=1e-5)
    assert ((details.predictions == 1) == (score > 0)).all()
    first = np.zeros(6, "int32")
    positive = tape_gradcam(inputs, features, z, images, first) / 2
    negative = tape_gradcam(inputs, features, -z, images, first) / 2
    assert positive.max() > 0 and negative.max() > 0
    expected = np.where(targets[:, None, None] == 1, positive, negative)
    np.testing.assert_allclose(details.maps, expected, rtol=1e-4, atol=1e-6 * expected.max())


def test_a_softmax_over_one_output_is_refused():
    inputs, features = two_convs()
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="softmax")(pooled))
    with pytest.raises(ModelStructureError, match="softmax over one output.*sigmoid"):
        GradCAM(model)


@pytest.mark.parametrize(
    "squash",
    [keras.ops.tanh, keras.layers.Activation("relu"), keras.layers.Lambda(lambda z: z * 2)],
)
def test_one_output_that_may_already_be_a_probability_is_refused(squash):
    """Read as a score, a probability p > 0 makes class 1 win every image: refused."""
    inputs, features = two_convs()
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    model = keras.Model(inputs, squash(keras.layers.Dense(1)(pooled)))
    with pytest.raises(ModelStructureError, match="one output and does not end in a layer"):
        GradCAM(model)


# ------------------------------------------------------------ the target layer


def test_a_feature_map_made_by_an_operation_is_a_target():
    """``x + y`` is a Keras operation, not a layer (ConvNeXt's blocks end in one)."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c1")(inputs)
    y = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c2")(x)
    residual = x + y
    pooled = keras.layers.GlobalAveragePooling2D()(residual)
    dense = keras.layers.Dense(3, activation="softmax")
    model = keras.Model(inputs, dense(pooled))
    (operation,) = [op for op in model.operations if not isinstance(op, keras.layers.Layer)]
    images, targets = images_of(3, seed=4) / 255, np.array([0, 1, 2])
    expected = tape_gradcam(inputs, residual, linear_copy(dense, pooled), images, targets)
    assert expected.max() > 0
    for layer in (None, operation.name):
        cam = GradCAM(model, layer=layer)
        assert cam.layer_path == operation.name
        maps = cam.explain(images, targets=targets)
        np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-6 * expected.max())


def squeeze_excitation_base(size: int = 16) -> keras.Model:
    """conv -> a squeeze-excitation block (its own global pooling) -> conv ``top``."""
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="block")(inputs)
    squeeze = keras.layers.GlobalAveragePooling2D(name="se_squeeze")(x)
    excite = keras.layers.Dense(8, activation="sigmoid", name="se_excite")(squeeze)
    x = keras.layers.Multiply(name="se_scale")([x, keras.layers.Reshape((1, 1, 8))(excite)])
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="top")(x)
    return keras.Model(inputs, x, name="base")


def test_a_nested_head_that_pools_its_input_targets_the_base_output():
    """EfficientNet's shape: the head's pooling consumes the head's input, so the map is
    the base's output, not the input of a squeeze-excitation block's pooling."""
    base = squeeze_excitation_base()
    head = keras.Sequential(
        [
            keras.Input(base.output.shape[1:]),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(3),
        ],
        name="head",
    )
    inputs = keras.Input((16, 16, 3))
    assert GradCAM(keras.Model(inputs, head(base(inputs)))).layer_path == "base/top"


def test_global_pooling_that_keeps_dims_is_found_before_a_1x1_conv_head():
    """MobileNetV3's top: GAP(keepdims) -> 1x1 convs ``logits`` -> Flatten -> softmax."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="features")(inputs)
    x = keras.layers.GlobalAveragePooling2D(keepdims=True)(x)
    x = keras.layers.Conv2D(16, 1, activation="relu", name="conv_head")(x)
    x = keras.layers.Conv2D(4, 1, name="logits")(x)
    x = keras.layers.Activation("softmax")(keras.layers.Flatten()(x))
    cam = GradCAM(keras.Model(inputs, x))
    assert cam.layer_path == "features" and cam.feature_shape((16, 16)) == (7, 7)


class ResidualBlock(keras.Model):
    """A subclassed block, as in TensorFlow's custom layers guide: no layer graph."""

    def __init__(self, filters: int, **kwargs):
        super().__init__(**kwargs)
        self.first = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")
        self.second = keras.layers.Conv2D(filters, 3, padding="same")

    def call(self, x):
        return keras.ops.relu(self.second(self.first(x)) + x)


class PoolingHead(keras.Model):
    def __init__(self, classes: int, **kwargs):
        super().__init__(**kwargs)
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.out = keras.layers.Dense(classes)

    def call(self, x):
        return self.out(self.pool(x))


def test_subclassed_models_inside_a_functional_model_are_searched_around():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    x = ResidualBlock(8, name="block")(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="last_conv")(x)
    model = keras.Model(inputs, PoolingHead(3, name="head")(x))
    images = images_of(2) / 255
    for layer, shape in ((None, (14, 14)), ("last_conv", (14, 14)), ("stem", (16, 16))):
        cam = GradCAM(model, layer=layer)
        assert cam.layer_path == (layer or "last_conv")
        assert cam.explain(images).shape == (2, *shape)
    # The subclassed block's own output is a target like any layer's.
    assert GradCAM(model, layer="block").explain(images).shape == (2, 16, 16)


# ------------------------------------------------------------ changed weights


def test_a_reused_engine_sees_the_models_new_weights(tmp_path):
    """Training or load_weights after the engine was made: a softmax layer is scored
    through a linear twin on the very same variables."""
    keras.utils.set_random_seed(5)
    inputs, features = two_convs()
    model = keras.Model(
        inputs,
        keras.layers.Dense(4, activation="softmax")(
            keras.layers.GlobalAveragePooling2D()(features)
        ),
    )
    images, targets = images_of(4, seed=5) / 255, np.array([0, 1, 2, 3])
    cam = GradCAM(model)
    before = cam.explain_details(images, targets=targets)
    trained = keras.models.clone_model(model)
    trained.set_weights(
        [w + np.random.default_rng(5).normal(0, 0.5, w.shape) for w in model.get_weights()]
    )
    trained.save_weights(tmp_path / "trained.weights.h5")
    model.load_weights(tmp_path / "trained.weights.h5")
    after = cam.explain_details(images, targets=targets)
    fresh = GradCAM(model).explain_details(images, targets=targets)
    np.testing.assert_allclose(after.probabilities, model.predict(images, verbose=0), rtol=1e-5)
    assert np.abs(after.probabilities - before.probabilities).max() > 0.05
    np.testing.assert_allclose(after.maps, fresh.maps, rtol=1e-5, atol=1e-7)
