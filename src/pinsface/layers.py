"""Small Keras layers that the saved models need, registered so ``load_model(safe_mode=True)`` works."""

from __future__ import annotations

from pinsface._tf import import_tensorflow_quietly

import_tensorflow_quietly()

import keras  # noqa: E402  (after TensorFlow's quiet import)
from keras import ops


@keras.saving.register_keras_serializable(package="pinsface")
class ChannelZeroPad(keras.layers.Layer):
    """Append ``extra`` all-zero channels (dlib's residual shortcut when the width doubles)."""

    def __init__(self, extra: int, **kwargs):
        super().__init__(**kwargs)
        self.extra = int(extra)

    def call(self, x):
        return ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, self.extra]])

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] + self.extra)

    def get_config(self):
        return {**super().get_config(), "extra": self.extra}


@keras.saving.register_keras_serializable(package="pinsface")
class L2Normalize(keras.layers.Layer):
    """Scale each vector to unit length (optionally times a fixed ``scale``)."""

    def __init__(self, scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, x):
        return self.scale * x / ops.sqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), 1e-12))

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package="pinsface")
class HorizontalFlip(keras.layers.Layer):
    """Mirror images left-right, deterministically (for test-time flip averaging)."""

    def call(self, x):
        return ops.flip(x, axis=2)


@keras.saving.register_keras_serializable(package="pinsface")
class CosineLogits(keras.layers.Layer):
    """Normalised-softmax output: ``scale * cos(x, w_k)`` per class, so the prediction is the nearest class
    direction on the unit sphere (the geometry face embeddings are trained for)."""

    def __init__(self, units: int, scale: float = 16.0, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.scale = float(scale)

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel", shape=(input_shape[-1], self.units), initializer="glorot_uniform", trainable=True
        )

    def call(self, x):
        x = x / ops.sqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), 1e-12))
        w = self.kernel / ops.sqrt(ops.maximum(ops.sum(ops.square(self.kernel), axis=0, keepdims=True), 1e-12))
        return self.scale * ops.matmul(x, w)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "scale": self.scale}
