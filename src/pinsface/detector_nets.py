"""MTCNN's three networks (P-net, R-net, O-net) as Keras models, with the weights the ``mtcnn`` package ships.

The layers, their order, the PReLUs' shared axes, the transpose before each flatten (the weights come from
Caffe, which flattens channel-first) and the softmax over the last axis are those of mtcnn 1.x's own
``mtcnn.network`` models, so the same weights give the same outputs. Only the weight files are taken from the
package; nothing of it is imported or changed at run time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from pinsface._tf import import_tensorflow_quietly

import_tensorflow_quietly()

import keras  # noqa: E402  (after TensorFlow's quiet import)
import tensorflow as tf  # noqa: E402  (after TensorFlow's quiet import)

L = keras.layers


class DetectorWeightsError(RuntimeError):
    """The mtcnn package's weight files are missing or not the arrays these networks take."""


def weights_folder() -> Path:
    """Where the installed mtcnn package keeps its weight files (found without importing it)."""
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise DetectorWeightsError("the mtcnn package is not installed: pip install 'mtcnn>=1.0,<2'")
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "weights"


def _conv_block(x, filters: int, kernel: int, name: str):
    x = L.Conv2D(filters, kernel, padding="valid", name=f"{name}_conv")(x)
    return L.PReLU(shared_axes=[1, 2], name=f"{name}_prelu")(x)


def _pnet() -> keras.Model:
    inputs = keras.Input((None, None, 3))
    x = _conv_block(inputs, 10, 3, "b1")
    x = L.MaxPooling2D(2, 2, padding="same")(x)
    x = _conv_block(x, 16, 3, "b2")
    x = _conv_block(x, 32, 3, "b3")
    offsets = L.Conv2D(4, 1, name="offsets")(x)
    scores = L.Conv2D(2, 1, activation="softmax", name="scores")(x)
    return keras.Model(inputs, [offsets, scores], name="pnet")


def _rnet() -> keras.Model:
    inputs = keras.Input((24, 24, 3))
    x = _conv_block(inputs, 28, 3, "b1")
    x = L.MaxPooling2D(3, 2, padding="same")(x)
    x = _conv_block(x, 48, 3, "b2")
    x = L.MaxPooling2D(3, 2, padding="valid")(x)
    x = _conv_block(x, 64, 2, "b3")
    x = L.Flatten()(L.Permute((2, 1, 3))(x))
    x = L.PReLU(name="fc_prelu")(L.Dense(128, name="fc")(x))
    offsets = L.Dense(4, name="offsets")(x)
    scores = L.Dense(2, activation="softmax", name="scores")(x)
    return keras.Model(inputs, [offsets, scores], name="rnet")


def _onet() -> keras.Model:
    inputs = keras.Input((48, 48, 3))
    x = _conv_block(inputs, 32, 3, "b1")
    x = L.MaxPooling2D(3, 2, padding="same")(x)
    x = _conv_block(x, 64, 3, "b2")
    x = L.MaxPooling2D(3, 2, padding="valid")(x)
    x = _conv_block(x, 64, 3, "b3")
    x = L.MaxPooling2D(2, 2, padding="same")(x)
    x = _conv_block(x, 128, 2, "b4")
    x = L.Flatten()(L.Permute((2, 1, 3))(x))
    x = L.PReLU(name="fc_prelu")(L.Dense(256, name="fc")(x))
    offsets = L.Dense(4, name="offsets")(x)
    points = L.Dense(10, name="landmarks")(x)
    scores = L.Dense(2, activation="softmax", name="scores")(x)
    return keras.Model(inputs, [offsets, points, scores], name="onet")


# The layers in the order mtcnn's weight files list their arrays (their own models' order).
WEIGHT_ORDER = {
    "pnet": ("b1_conv", "b1_prelu", "b2_conv", "b2_prelu", "b3_conv", "b3_prelu", "offsets", "scores"),
    "rnet": ("b1_conv", "b1_prelu", "b2_conv", "b2_prelu", "b3_conv", "b3_prelu", "fc", "fc_prelu", "offsets")
    + ("scores",),
    "onet": ("b1_conv", "b1_prelu", "b2_conv", "b2_prelu", "b3_conv", "b3_prelu", "b4_conv", "b4_prelu", "fc")
    + ("fc_prelu", "offsets", "landmarks", "scores"),
}
BUILDERS = {"pnet": _pnet, "rnet": _rnet, "onet": _onet}


# The SHA-256 of the weight files of mtcnn 1.0.0 (the only 1.x release). They are joblib pickles: a pickle
# can run code, so only these exact bytes, reviewed as part of that release, are ever unpickled.
WEIGHT_SHA256 = {
    "pnet": "ea6b0c3e685ebee3165326ad6484acc95f2ef78f1c94fbf40a55704fa989f7b5",
    "rnet": "cb00e6460f3c98b0bfafaba3c0a0ded4bdf6e62cee7174d969e8670d7e757fee",
    "onet": "94f6ea2f4cf985275ee958cdd762d17b6009348a4fb9d8c6be39ba73ffd22ca3",
}


def _weight_arrays(name: str) -> list:
    """The arrays of ``<name>.lz4`` in the mtcnn package (a joblib file, read the way that package reads it),
    once its checksum is one pinsface knows."""
    import hashlib
    import io

    import joblib

    path = weights_folder() / f"{name}.lz4"
    if not path.is_file():
        raise DetectorWeightsError(f"{path} not found: this mtcnn version does not ship the weights pinsface reads")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != WEIGHT_SHA256[name]:
        raise DetectorWeightsError(
            f"{path} is not the file of mtcnn 1.0.0 (its SHA-256 differs): pinsface unpickles only known weights; "
            "install mtcnn==1.0.0"
        )
    arrays = joblib.load(io.BytesIO(data))
    if not isinstance(arrays, list) or not all(isinstance(a, np.ndarray) for a in arrays):
        raise DetectorWeightsError(f"{path} does not hold a list of arrays")
    return arrays


def build_network(name: str) -> keras.Model:
    """One of "pnet", "rnet", "onet" with mtcnn's weights set. Raises ``DetectorWeightsError`` where the files
    do not give each layer arrays of the shapes it has."""
    model = BUILDERS[name]()
    arrays = _weight_arrays(name)
    at = 0
    for layer_name in WEIGHT_ORDER[name]:
        layer = model.get_layer(layer_name)
        wanted = [tuple(w.shape) for w in layer.weights]
        given = arrays[at : at + len(wanted)]
        if [tuple(a.shape) for a in given] != wanted:
            raise DetectorWeightsError(f"{name}.lz4 does not fit layer {layer_name} (wanted shapes {wanted})")
        layer.set_weights(given)
        at += len(wanted)
    if at != len(arrays):
        raise DetectorWeightsError(f"{name}.lz4 holds {len(arrays)} arrays, not the {at} the network takes")
    return model


def compiled_networks() -> tuple:
    """(pnet, rnet, onet), each a graph traced once for any batch and size: called eagerly, layer by layer, the
    same networks take about half as long again on the CPU."""
    sizes = {"pnet": None, "rnet": 24, "onet": 48}
    return tuple(
        tf.function(build_network(name), input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        for name, size in sizes.items()
    )
