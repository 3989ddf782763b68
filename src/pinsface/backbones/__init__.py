"""Pretrained face-embedding networks, one file each; ``get_backbone`` picks one by name."""

from __future__ import annotations

from pinsface._tf import import_tensorflow_quietly

import_tensorflow_quietly()

import keras  # noqa: E402  (after TensorFlow's quiet import)

from pinsface.backbones import dlib_resnet

BACKBONES = {dlib_resnet.NAME: dlib_resnet.build_dlib_resnet}


def get_backbone(name: str = dlib_resnet.NAME, pretrained: bool = True) -> keras.Model:
    try:
        build = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None
    return build(pretrained=pretrained)
