"""The two models: ``embedding`` (the brief's dense head on a pretrained face embedding) and ``pixels-mlp``."""

from __future__ import annotations

from pinsface._tf import import_tensorflow_quietly

import_tensorflow_quietly()

import keras  # noqa: E402  (after TensorFlow's quiet import)

from pinsface.layers import CosineLogits, HorizontalFlip, L2Normalize
from pinsface.settings import Settings


def augmentation(settings: Settings, name: str = "augment") -> keras.Sequential:
    """Random flips, zooms and rotations; Keras runs these only in training."""
    layers = []
    if settings.augment_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=settings.seed))
    if settings.augment_zoom:
        layers.append(keras.layers.RandomZoom(settings.augment_zoom, fill_mode="constant", seed=settings.seed))
    if settings.augment_rotation:
        layers.append(keras.layers.RandomRotation(settings.augment_rotation, fill_mode="constant", seed=settings.seed))
    return keras.Sequential(layers, name=name)


def _dense_stack(x, settings: Settings, prefix: str):
    for i, units in enumerate(settings.hidden_units):
        x = keras.layers.Dense(units, activation="relu", name=f"{prefix}dense_{units}")(x)
        if settings.dropout:
            x = keras.layers.Dropout(settings.dropout, name=f"{prefix}dropout_{i}")(x)
    return x


def build_head(n_classes: int, settings: Settings, input_dim: int = 128) -> keras.Model:
    """Embedding -> identity probabilities: L2 norm, Dense 512/256/128 ReLU with Dropout, softmax."""
    inputs = keras.Input((input_dim,), name="embedding")
    x = L2Normalize(scale=float(input_dim) ** 0.5, name="l2_normalize")(inputs)
    if settings.input_noise:
        x = keras.layers.GaussianNoise(settings.input_noise, seed=settings.seed, name="embedding_noise")(x)
    deep = _dense_stack(x, settings, "head_")
    if settings.cosine_scale:
        logits = CosineLogits(n_classes, settings.cosine_scale, name="cosine_logits")(deep)
    else:
        logits = keras.layers.Dense(n_classes, name="logits")(deep)
    outputs = keras.layers.Softmax(name="probabilities")(logits)
    return keras.Model(inputs, outputs, name="head")


def build_embedding_model(backbone: keras.Model, head: keras.Model, settings: Settings) -> keras.Model:
    """The whole network: aligned 150x150 RGB crop (0-255) -> identity probabilities.

    With ``test_time_flip`` the prediction averages the crop and its mirror image.
    """
    size = backbone.input_shape[1]
    inputs = keras.Input((size, size, 3), name="aligned_face")
    x = augmentation(settings)(inputs)
    probs = head(backbone(x))
    if settings.test_time_flip:
        flipped = head(backbone(HorizontalFlip(name="mirror")(x)))
        probs = keras.layers.Average(name="flip_average")([probs, flipped])
    return keras.Model(inputs, probs, name="pinsface_embedding")


def build_pixels_mlp(n_classes: int, settings: Settings, size: int = 100) -> keras.Model:
    """The brief's network: 100x100 grayscale box crop scaled to [0,1], flattened, Dense 512/256/128, softmax."""
    inputs = keras.Input((size, size, 1), name="gray_face")
    x = keras.layers.Rescaling(1.0 / 255.0, name="to_unit_range")(inputs)
    x = augmentation(settings)(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = _dense_stack(x, settings, "")
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="pinsface_pixels_mlp")
