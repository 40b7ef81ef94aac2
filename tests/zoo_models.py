"""Small models for the model-zoo tests, built in seconds with random weights: a CNN
with a residual branch and a Functional Vision Transformer (its class token a
registered layer, so the file loads in safe mode in any process that imports this)."""

import keras
import numpy as np


@keras.saving.register_keras_serializable(package="zoo_models")
class ClassToken(keras.layers.Layer):
    """A learned class token in front of the patch tokens."""

    def build(self, input_shape):
        self.token = self.add_weight(shape=(1, 1, input_shape[-1]), initializer="random_normal")

    def call(self, tokens):
        batch = keras.ops.shape(tokens)[0]
        token = keras.ops.broadcast_to(self.token, (batch, 1, tokens.shape[-1]))
        return keras.ops.concatenate([keras.ops.cast(token, tokens.dtype), tokens], axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1] + 1, input_shape[2])


def residual_cnn(size: int = 32, classes: int = 4) -> keras.Model:
    """A stem, one residual block (conv -> relu, added to the stem) and a softmax head."""
    keras.utils.set_random_seed(0)  # the same weights whatever ran before in the process
    inputs = keras.Input((size, size, 3))
    stem = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    branch = keras.layers.Conv2D(8, 3, padding="same", name="branch_conv")(stem)
    branch = keras.layers.Activation("relu", name="branch_relu")(branch)
    merged = keras.layers.Add(name="add")([stem, branch])
    merged = keras.layers.Activation("relu", name="out_relu")(merged)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(merged)
    logits = keras.layers.Dense(classes, name="logits")(pooled)
    return keras.Model(inputs, keras.layers.Activation("softmax", name="probs")(logits))


def tiny_vit(
    size: int = 32,
    patch: int = 8,
    width: int = 16,
    blocks: int = 2,
    classes: int = 3,
    pooling: str = "token",
) -> keras.Model:
    """A ViT: patches, a class token, pre-norm blocks, a final norm, and a head on the
    class token (``pooling="token"``) or on the mean of every token (``"gap"``)."""
    keras.utils.set_random_seed(0)  # the same weights whatever ran before in the process
    inputs = keras.Input((size, size, 3))
    patches = keras.layers.Conv2D(width, patch, strides=patch, name="patches")(inputs)
    tokens = keras.layers.Reshape(((size // patch) ** 2, width), name="tokens")(patches)
    x = ClassToken(name="class_token")(tokens)
    for index in range(1, blocks + 1):
        normed = keras.layers.LayerNormalization(name=f"block{index}_ln1")(x)
        attended = keras.layers.MultiHeadAttention(2, width // 2, name=f"block{index}_mha")(
            normed, normed
        )
        x = keras.layers.Add(name=f"block{index}_add1")([x, attended])
        normed = keras.layers.LayerNormalization(name=f"block{index}_ln2")(x)
        hidden = keras.layers.Dense(2 * width, activation="gelu", name=f"block{index}_mlp1")(normed)
        hidden = keras.layers.Dense(width, name=f"block{index}_mlp2")(hidden)
        x = keras.layers.Add(name=f"block{index}_add2")([x, hidden])
    x = keras.layers.LayerNormalization(name="encoder_norm")(x)
    if pooling == "token":
        pooled = x[:, 0]
    else:
        pooled = keras.layers.GlobalAveragePooling1D(name="token_pool")(x)
    logits = keras.layers.Dense(classes, name="logits")(pooled)
    return keras.Model(inputs, keras.layers.Activation("softmax", name="probs")(logits))


def images(count: int = 5, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (count, size, size, 3)).astype("float32")


def hub_vit_backbone(keras_hub):
    """A Keras Hub ViT backbone: 32x32 images in 8x8 patches, two blocks of width 16."""
    return keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    )
