"""The reference Grad-CAM implementations we compare against, written as their authors do.

Used by the benchmarks (speed) and the tests (equality of maps).
"""

from __future__ import annotations

import keras
import tensorflow as tf


def keras_example_heatmap(img_array, model, last_conv_layer_name, pred_index=None):
    """The official Keras example (keras.io/examples/vision/grad_cam), unnormalised.

    Kept as the example writes it, including building ``grad_model`` on every call;
    only the final ``/ reduce_max`` is left to the caller. The example removes the
    softmax by mutating ``model.layers[-1].activation``: pass ``logit_clone(model)``.
    """
    grad_model = keras.models.Model(
        model.inputs, [model.get_layer(last_conv_layer_name).output, model.output]
    )
    with tf.GradientTape() as tape:
        last_conv_layer_output, preds = grad_model(img_array)
        if pred_index is None:
            pred_index = tf.argmax(preds[0])
        class_channel = preds[:, pred_index]
    grads = tape.gradient(class_channel, last_conv_layer_output)
    pooled_grads = tf.reduce_mean(grads, axis=(0, 1, 2))
    heatmap = last_conv_layer_output[0] @ pooled_grads[..., tf.newaxis]
    return tf.maximum(tf.squeeze(heatmap), 0).numpy()


def logit_clone(model: keras.Model) -> keras.Model:
    """A copy of ``model`` with its final activation removed, as the Keras example does."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    clone.layers[-1].activation = None
    return clone
