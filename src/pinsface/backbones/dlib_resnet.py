"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1``) rebuilt in Keras.

The architecture follows face-api.js's ``FaceRecognitionNet``: a 7x7 stride-2 stem, max-pooling, then
residual blocks at 32, 64, 128 and 256 channels, global average pooling and a bias-free 128-D projection.
Each convolution in the shipped weights is followed by an affine "scale" layer (dlib's batch-norm
replacement); it is folded into the convolution at load time, so the Keras graph is plain Conv2D layers.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import resources

from pinsface._tf import import_tensorflow_quietly

import_tensorflow_quietly()

import keras  # noqa: E402  (after TensorFlow's quiet import)
import numpy as np

from pinsface.layers import ChannelZeroPad

NAME = "dlib-resnet-v1"
INPUT_SIZE = 150
EMBEDDING_DIM = 128
MEAN_RGB = (122.782, 117.001, 104.298)
# dlib's own same-person threshold for Euclidean distance between descriptors.
SAME_PERSON_DISTANCE = 0.6

WEIGHTS_FILE = "face_recognition_model.bin"
MANIFEST_FILE = "face_recognition_model-weights_manifest.json"
SHA256 = {
    WEIGHTS_FILE: "b413e420d6840b2775fba32008db6f3cddb07d485967fb42cfcf379c16a8c589",
    MANIFEST_FILE: "cbaffa501b0b9275a12b63357a6843e7e30c054e1c9151e1a5f879b26e32986b",
}

# (block name, output channels, down-sampling?) in network order.
BLOCKS = (
    ("conv32_1", 32, False),
    ("conv32_2", 32, False),
    ("conv32_3", 32, False),
    ("conv64_down", 64, True),
    ("conv64_1", 64, False),
    ("conv64_2", 64, False),
    ("conv64_3", 64, False),
    ("conv128_down", 128, True),
    ("conv128_1", 128, False),
    ("conv128_2", 128, False),
    ("conv256_down", 256, True),
    ("conv256_1", 256, False),
    ("conv256_2", 256, False),
    ("conv256_down_out", 256, True),
)


class WeightsError(RuntimeError):
    """The shipped weights are missing or do not match their checksum."""


def _read_verified(name: str) -> bytes:
    path = resources.files("pinsface.backbones") / "weights" / name
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise WeightsError(f"backbone weights file missing: {path}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256[name]:
        raise WeightsError(f"checksum mismatch for {path}: got {digest}, expected {SHA256[name]}")
    return data


@lru_cache(maxsize=1)
def load_weight_map() -> dict[str, np.ndarray]:
    """Read and dequantise the shipped tensors: name -> float32 array (checksums verified)."""
    manifest = json.loads(_read_verified(MANIFEST_FILE))
    blob = _read_verified(WEIGHTS_FILE)
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for group in manifest:
        for spec in group["weights"]:
            shape = spec["shape"]
            count = int(np.prod(shape))
            quant = spec.get("quantization")
            if quant:
                if quant["dtype"] != "uint8":
                    raise WeightsError(f"unsupported quantisation {quant['dtype']} for {spec['name']}")
                raw = np.frombuffer(blob, dtype=np.uint8, count=count, offset=offset)
                values = raw.astype(np.float32) * np.float32(quant["scale"]) + np.float32(quant["min"])
                offset += count
            else:
                values = np.frombuffer(blob, dtype=np.float32, count=count, offset=offset).copy()
                offset += 4 * count
            tensors[spec["name"]] = values.reshape(shape)
    if offset != len(blob):
        raise WeightsError(f"weights file has {len(blob) - offset} unread bytes")
    return tensors


def _folded_conv(weights: dict[str, np.ndarray], prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``scale(conv(x) + b)`` into a single convolution's kernel and bias."""
    kernel = weights[f"{prefix}/conv/filters"]
    bias = weights[f"{prefix}/conv/bias"]
    gain = weights[f"{prefix}/scale/weights"]
    shift = weights[f"{prefix}/scale/biases"]
    return kernel * gain, bias * gain + shift


def _conv(x, filters: int, size: int, stride: int, name: str, relu: bool):
    padding = "valid" if stride > 1 else "same"
    x = keras.layers.Conv2D(filters, size, strides=stride, padding=padding, name=name)(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _residual(x, filters: int, name: str, down: bool):
    out = _conv(x, filters, 3, 2 if down else 1, f"{name}_conv1", relu=True)
    out = _conv(out, filters, 3, 1, f"{name}_conv2", relu=False)
    shortcut = x
    if down:
        shortcut = keras.layers.AveragePooling2D(2, 2, padding="valid", name=f"{name}_pool")(x)
        if shortcut.shape[-1] != filters:
            shortcut = ChannelZeroPad(filters - shortcut.shape[-1], name=f"{name}_chpad")(shortcut)
        # dlib adds tensors of different sizes by zero-padding the smaller one at the bottom/right.
        dh = shortcut.shape[1] - out.shape[1]
        dw = shortcut.shape[2] - out.shape[2]
        if dh or dw:
            out = keras.layers.ZeroPadding2D(((0, dh), (0, dw)), name=f"{name}_pad")(out)
    out = keras.layers.Add(name=f"{name}_add")([out, shortcut])
    return keras.layers.ReLU(name=f"{name}_relu")(out)


def build_dlib_resnet(pretrained: bool = True, name: str = NAME) -> keras.Model:
    """The embedding network: (N, 150, 150, 3) RGB in 0-255 -> (N, 128) dlib face descriptors."""
    inputs = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="face_rgb")
    x = keras.layers.Normalization(mean=list(MEAN_RGB), variance=[255.0**2] * 3, name="normalize")(inputs)
    x = _conv(x, 32, 7, 2, "conv32_down", relu=True)
    x = keras.layers.MaxPooling2D(3, 2, padding="valid", name="stem_pool")(x)
    for block, filters, down in BLOCKS:
        x = _residual(x, filters, block, down)
    x = keras.layers.GlobalAveragePooling2D(name="avg")(x)
    outputs = keras.layers.Dense(EMBEDDING_DIM, use_bias=False, name="fc")(x)
    model = keras.Model(inputs, outputs, name=name)
    if pretrained:
        load_pretrained(model)
    return model


def load_pretrained(model: keras.Model) -> None:
    weights = load_weight_map()
    convs = ["conv32_down"] + [f"{block}_conv{i}" for block, _, _ in BLOCKS for i in (1, 2)]
    for layer_name in convs:
        prefix = layer_name.replace("_conv1", "/conv1").replace("_conv2", "/conv2")
        model.get_layer(layer_name).set_weights(list(_folded_conv(weights, prefix)))
    model.get_layer("fc").set_weights([weights["fc"]])
