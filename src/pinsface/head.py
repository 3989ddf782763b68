"""The trained head as plain arrays, for naming and for enrolment by weight imprinting. No TensorFlow here.

The head (``pinsface.models.build_head``) is: L2 normalisation (times a fixed scale), a stack of Dense + ReLU
layers, and cosine logits, ``scale * cos(features, w_k)`` per identity, then a softmax. At inference it is a
few matrix products, so it is computed here with numpy: enrolment can then change who the head knows by
editing one column of the output matrix, without building, training or saving a Keras model.

Imprinting: a new person's column is the direction of their faces' mean (unit) feature, taken from the centre
of all the trained identities' features (ReLU features share one large common direction; without the offset a
new person would look like everybody) and whitened by the trained identities' within-person spread (a linear
discriminant: without it a new column lies along directions in which one person's photos already vary, and
takes faces from the people trained there). Known columns are left as they are, so adding or removing someone
never changes another person's weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# The ridge added to the within-person covariance, as a fraction of its mean variance. Tried on the small test
# run: smaller ridges lean on the few directions with little spread, and a new person's own photos then score
# low. bench/enrol.py measures the choice on 90 identities.
WHITEN_RIDGE = 1.0


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class ArrayHead:
    """The head's inference as arrays. ``kernel`` (features, identities) is the only part enrolment changes;
    copies share the dense stack (copy-on-write: a change makes a new kernel, never edits one in place)."""

    input_scale: float
    dense: tuple[tuple[np.ndarray, np.ndarray], ...]  # (weights, bias) per Dense + ReLU layer
    kernel: np.ndarray  # cosine logits' class directions (or the Dense logits' weights when cosine_scale is 0)
    cosine_scale: float  # 0: a plain Dense logits layer with ``bias``
    bias: np.ndarray | None = None
    centre: np.ndarray | None = None  # mean unit feature of the trained identities' faces, for imprinting
    whiten: np.ndarray | None = None  # inverse of their within-person covariance (regularised), for imprinting

    @classmethod
    def from_keras(cls, head) -> ArrayHead:
        """The arrays of a Keras head built by ``build_head``."""
        scale = float(head.get_layer("l2_normalize").scale)
        dense = tuple(
            tuple(np.asarray(a, np.float32) for a in layer.get_weights())
            for layer in head.layers
            if layer.name.startswith("head_dense_")
        )
        names = [layer.name for layer in head.layers]
        if "cosine_logits" in names:
            out = head.get_layer("cosine_logits")
            return cls(scale, dense, np.asarray(out.get_weights()[0], np.float32), float(out.scale))
        w, b = head.get_layer("logits").get_weights()
        return cls(scale, dense, np.asarray(w, np.float32), 0.0, np.asarray(b, np.float32))

    @property
    def n_classes(self) -> int:
        return int(self.kernel.shape[1])

    @property
    def output_shape(self) -> tuple[None, int]:
        return (None, self.n_classes)

    @property
    def imprintable(self) -> bool:
        return self.cosine_scale > 0

    def features(self, x: np.ndarray) -> np.ndarray:
        """The dense stack's output (what the logits layer sees) for embeddings ``x``."""
        h = self.input_scale * _unit_rows(np.asarray(x, np.float32))
        for w, b in self.dense:
            h = np.maximum(h @ w + b, 0.0)
        return h

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = self.features(x)
        if not self.cosine_scale:
            return h @ self.kernel + self.bias
        return self.cosine_scale * (_unit_rows(h) @ _unit_rows(self.kernel.T).T)

    def __call__(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Identity probabilities, (faces, identities): what the Keras head computes at inference."""
        z = self.logits(x)
        z = np.exp(z - z.max(1, keepdims=True))
        return (z / z.sum(1, keepdims=True)).astype(np.float32)

    def with_reference(self, trained_embeddings: np.ndarray, owner: np.ndarray) -> ArrayHead:
        """This head, knowing the trained identities' feature centre and within-person spread (``imprint``
        needs both): ``trained_embeddings`` of their faces, ``owner`` the identity of each."""
        h = _unit_rows(self.features(trained_embeddings)).astype(np.float64)
        sums = np.zeros((int(owner.max()) + 1, h.shape[1]))
        np.add.at(sums, owner, h)
        means = sums / np.maximum(np.bincount(owner, minlength=len(sums)), 1)[:, None]
        spread = h - means[owner]
        cov = spread.T @ spread / len(h)
        cov += WHITEN_RIDGE * np.trace(cov) / len(cov) * np.eye(len(cov))
        return replace(self, centre=h.mean(0).astype(np.float32), whiten=np.linalg.inv(cov).astype(np.float32))

    def direction(self, embeddings: np.ndarray) -> np.ndarray:
        """The imprinted class direction for one person's face embeddings (a unit vector)."""
        h = _unit_rows(self.features(embeddings)).mean(0)
        if self.centre is not None:
            h = self.whiten @ (h - self.centre)
        return (h / max(float(np.linalg.norm(h)), 1e-12)).astype(np.float32)

    def imprint(self, index: int, embeddings: np.ndarray) -> ArrayHead:
        """A head whose column ``index`` (the next new one when ``index == n_classes``) is imprinted from
        ``embeddings``; scaled to the mean length of the known columns (cosine logits ignore the length)."""
        if not self.imprintable:
            raise ValueError("only a head with cosine logits can be imprinted")
        column = self.direction(embeddings)
        length = float(np.linalg.norm(self.kernel, axis=0).mean()) if self.n_classes else 1.0
        if index == self.n_classes:
            kernel = np.concatenate([self.kernel, (column * length)[:, None]], axis=1)
        else:
            kernel = self.kernel.copy()
            kernel[:, index] = column * length
        return replace(self, kernel=kernel)

    def without(self, index: int) -> ArrayHead:
        """A head without identity ``index`` (those after it move down one place)."""
        if index >= self.n_classes:  # an identity enrolled in gallery mode has no column
            return self
        bias = None if self.bias is None else np.delete(self.bias, index)
        return replace(self, kernel=np.delete(self.kernel, index, axis=1), bias=bias)

    def columns(self, keep: np.ndarray) -> ArrayHead:
        """A head over some identities only (``keep``: a mask or indices of columns)."""
        bias = None if self.bias is None else self.bias[keep]
        return replace(self, kernel=self.kernel[:, keep], bias=bias)

    def with_kernel(self, kernel: np.ndarray, bias: np.ndarray | None = None) -> ArrayHead:
        return replace(self, kernel=np.asarray(kernel, np.float32), bias=self.bias if bias is None else bias)
