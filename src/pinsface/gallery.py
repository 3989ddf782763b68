"""Who a run knows: enrolled face embeddings per identity, calibrated "unknown" thresholds, enrolment.

The gallery keeps the embeddings of the training faces (the enrolled faces) and of the validation faces (held
out from the head's training). A face is accepted as the head's top identity k when both hold:

- the mean Euclidean distance from its descriptor to k's ``knn`` nearest faces in the gallery (training and
  validation faces alike; fewer for an identity with few faces, see ``knn_distances``) is at most
  ``threshold_distance``, in dlib's descriptor space where 0.6 separates people;
- the head's probability for k is at least ``threshold_probability``.

The distance threshold is calibrated for a target false-accept rate, leave-one-out over every gallery face.
Each face is scored against its own identity without itself (a genuine match). It is also scored against the
nearest other identity (an impostor: exactly what a stranger who resembles someone looks like, because these
distances do not depend on what the head learnt). The threshold is the ``target_far`` quantile of the impostor
distances. The head's probability for a stranger cannot be simulated that way, since the head was trained on
the face's own identity. So the probability threshold is set on the genuine side only: it keeps
``PROBABILITY_KEEP`` of the validation faces the head names correctly, and rejects faces the head hesitates on.

Measured on 95 Pins identities with 10 strangers (bench/openset.py): at equal stranger rejection, the
k-nearest distance names 1.2 points more known faces than the distance to the identity's centroid did. The
probability threshold then rejects another 0.6% of the strangers for 0.15% of the known faces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

KNN = 5
PROBABILITY_KEEP = 0.995


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def face_vectors(emb: np.ndarray, emb_flip: np.ndarray) -> np.ndarray:
    """One descriptor per face: its embedding averaged with its mirror image's."""
    return (emb + emb_flip) / 2


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(sq, 0))


def run_head(head, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``head`` on a few or many embeddings. A direct call, because ``Model.predict`` costs tens of
    milliseconds per call whatever the input, which is most of the work for one photo's faces."""
    import keras

    if len(x) == 0:
        return np.zeros((0, head.output_shape[-1]), np.float32)
    return np.concatenate([keras.ops.convert_to_numpy(head(x[lo:lo + chunk], training=False))
                           for lo in range(0, len(x), chunk)])


def knn_distances(d: np.ndarray, owner: np.ndarray, n_identities: int, k: int = KNN) -> np.ndarray:
    """(queries, identities): the mean of each identity's smallest entries in the rows of ``d`` (query x gallery
    face): its ``k`` nearest faces, or one per 10 faces for an identity with fewer than 10k, at least one.
    Infinite entries (excluded faces) are skipped.

    The fewer faces an identity has, the farther its k-th nearest lies. For someone enrolled from 10 photos,
    the nearest face named 95% of their other photos at the calibrated distance (bench/openset.py), and the
    mean of the 5 nearest only 89%."""
    out = np.full((d.shape[0], n_identities), np.inf, dtype=np.float32)
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(n_identities + 1))
    d = d[:, order]  # each identity's faces side by side: one copy, then slices
    for c in range(n_identities):
        lo, hi = bounds[c], bounds[c + 1]
        if hi == lo:
            continue
        kk = min(k, max(1, (hi - lo) // 10))
        nearest = np.partition(d[:, lo:hi], kk - 1, axis=1)[:, :kk]
        finite = np.isfinite(nearest)
        count = finite.sum(1)
        total = np.where(finite, nearest, 0).sum(1)
        out[:, c] = np.where(count > 0, total / np.maximum(count, 1), np.inf)
    return out


@dataclass
class Gallery:
    labels: list[str]
    embeddings: np.ndarray  # (n, d) enrolled (training) faces
    flips: np.ndarray
    owner: np.ndarray  # (n,) label index
    val_embeddings: np.ndarray  # (m, d) faces held out from the head's training, used for calibration
    val_flips: np.ndarray
    val_owner: np.ndarray
    threshold_probability: float = 0.0
    threshold_distance: float = 10.0
    target_far: float = 0.07
    calibration: dict = field(default_factory=dict)
    knn: int = KNN

    def __post_init__(self):
        self._centroids = None
        self._index = None
        self._face_index = None
        self.stale = False  # thresholds from an older scoring method: calibrate before use

    def changed(self) -> None:
        """Forget what was derived from the faces, after enrolling or forgetting someone."""
        self._centroids = None
        self._index = None
        self._face_index = None

    def added(self, emb: np.ndarray, emb_flip: np.ndarray, identity: int) -> None:
        """After enrolment appended faces of ``identity`` to the training faces: the FAISS index grows in place."""
        face_index = self._face_index
        self.changed()
        if face_index is not None:
            face_index.add(face_vectors(emb, emb_flip), np.full(len(emb), identity), len(self.labels))
            self._face_index = face_index

    @property
    def face_index(self):
        """The gallery faces (training, then validation, then any enrolled since) in a ``FaceIndex``."""
        if self._face_index is None:
            from pinsface.face_index import FaceIndex

            vectors, owner = self.index
            self._face_index = FaceIndex(vectors, owner, len(self.labels), self.knn)
            self._face_index.validation = (len(self.embeddings), len(self.val_embeddings))
        return self._face_index

    @property
    def centroids(self) -> np.ndarray:
        if self._centroids is None:
            vectors = face_vectors(self.embeddings, self.flips)
            sums = np.zeros((len(self.labels), vectors.shape[1]))
            np.add.at(sums, self.owner, vectors)
            counts = np.bincount(self.owner, minlength=len(self.labels))[:, None]
            self._centroids = sums / np.maximum(counts, 1)
        return self._centroids

    @property
    def index(self) -> tuple[np.ndarray, np.ndarray]:
        """(descriptors, owners) of every gallery face, training and validation."""
        if self._index is None:
            vectors = np.concatenate([face_vectors(self.embeddings, self.flips),
                                      face_vectors(self.val_embeddings, self.val_flips)]).astype(np.float32)
            self._index = vectors, np.concatenate([self.owner, self.val_owner]).astype(np.int64)
        return self._index

    def distances(self, emb: np.ndarray, emb_flip: np.ndarray) -> np.ndarray:
        """Mean distance of each face's descriptor to each identity's ``knn`` nearest gallery faces:
        (faces, identities)."""
        vectors, owner = self.index
        d = pairwise_distances(face_vectors(emb, emb_flip).astype(np.float32), vectors)
        return knn_distances(d, owner, len(self.labels), self.knn)

    def leave_one_out(self, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """(genuine, impostor) distance of every gallery face, scored with itself removed from the gallery:
        to its own identity, and to the nearest other identity."""
        from pinsface.face_index import ALL_PAIRS_LIMIT

        if len(self.embeddings) + len(self.val_embeddings) > ALL_PAIRS_LIMIT:
            return self.leave_one_out_indexed()
        vectors, owner = self.index
        rows = np.arange(len(vectors))
        genuine = np.empty(len(vectors), np.float32)
        impostor = np.empty(len(vectors), np.float32)
        for lo in range(0, len(vectors), chunk):
            r = rows[lo:lo + chunk]
            d = pairwise_distances(vectors[r], vectors)
            d[np.arange(len(r)), r] = np.inf
            k = knn_distances(d, owner, len(self.labels), self.knn)
            genuine[r] = k[np.arange(len(r)), owner[r]]
            k[np.arange(len(r)), owner[r]] = np.inf
            impostor[r] = k.min(1)
        return genuine, impostor

    def leave_one_out_indexed(self) -> tuple[np.ndarray, np.ndarray]:
        """``leave_one_out`` from the FAISS index's nearest faces instead of all pairs, in the same order; on a
        gallery above ``face_index.IMPOSTOR_TRIALS`` faces, the impostor distances of a random sample of them."""
        face_index = self.face_index
        genuine, impostor = face_index.leave_one_out()
        n_train, n_val = face_index.validation
        order = np.r_[np.arange(n_train), np.arange(n_train + n_val, face_index.n), np.arange(n_train, n_train + n_val)]
        impostor = impostor[order]
        return genuine[order], impostor[~np.isnan(impostor)]

    @staticmethod
    def probabilities(head, emb: np.ndarray, emb_flip: np.ndarray) -> np.ndarray:
        """The head's probabilities for each face, averaged with its mirror image's."""
        return (run_head(head, emb) + run_head(head, emb_flip)) / 2

    def calibrate(self, head, target_far: float | None = None) -> dict:
        """Set both thresholds: the distance for the target false-accept rate, the probability on the genuine side."""
        if target_far is not None:
            self.target_far = target_far
        genuine, impostor = self.leave_one_out()
        probs = self.probabilities(head, self.val_embeddings, self.val_flips)
        n_train = len(self.embeddings)
        self.threshold_probability, self.threshold_distance, self.calibration = calibrate_thresholds(
            probs, self.val_owner, genuine[n_train:], impostor, self.target_far)
        self.stale = False
        return self.calibration

    def save(self, path: Path) -> None:
        meta = {"labels": self.labels, "threshold_probability": self.threshold_probability,
                "threshold_distance": self.threshold_distance, "target_far": self.target_far,
                "calibration": self.calibration, "knn": self.knn}
        tmp = Path(path).with_suffix(".tmp.npz")
        # Uncompressed: compression took 2 s of every save (enrolment included) for a file half the size.
        np.savez(tmp, meta=np.array(json.dumps(meta, ensure_ascii=False)),
                 embeddings=self.embeddings, flips=self.flips, owner=self.owner,
                 val_embeddings=self.val_embeddings, val_flips=self.val_flips, val_owner=self.val_owner)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Gallery":
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in ("embeddings", "flips", "owner", "val_embeddings", "val_flips", "val_owner")}
        gallery = cls(meta["labels"], **arrays, threshold_probability=meta["threshold_probability"],
                      threshold_distance=meta["threshold_distance"], target_far=meta["target_far"],
                      calibration=meta["calibration"], knn=meta.get("knn", KNN))
        # Galleries saved before nearest-face distances hold thresholds for centroid distances.
        gallery.stale = "knn" not in meta
        return gallery

    @classmethod
    def load_for_run(cls, run_dir: Path, model, settings) -> "Gallery":
        """A run's gallery, recalibrated with the run's target FAR if it was saved by an older scoring method."""
        gallery = cls.load(Path(run_dir) / "gallery.npz")
        if gallery.stale:
            gallery.calibrate(model.get_layer("head"), settings.target_far)
        return gallery


def calibrate_thresholds(val_probs: np.ndarray, val_owner: np.ndarray, val_genuine: np.ndarray,
                         impostor: np.ndarray, target_far: float = 0.07,
                         keep: float = PROBABILITY_KEEP) -> tuple[float, float, dict]:
    """(probability threshold, distance threshold, report).

    ``impostor``: each gallery face's distance to the nearest identity other than its own; the distance
    threshold accepts at most ``target_far`` of them. ``val_genuine``: each validation face's distance to its
    own identity. The probability threshold keeps ``keep`` of the validation faces the head names correctly.
    """
    pred = np.argmax(val_probs, 1)
    p = val_probs[np.arange(len(pred)), pred]
    correct = pred == val_owner
    t_d = float(np.quantile(impostor, target_far, method="lower")) if len(impostor) else 10.0
    t_p = float(np.quantile(p[correct], 1 - keep, method="lower")) if correct.any() else 0.0
    named = correct & (p >= t_p) & (val_genuine <= t_d)
    report = {"target_far": target_far, "impostor_accept_rate": float(np.mean(impostor <= t_d)),
              "n_impostor_trials": int(len(impostor)), "genuine_named_rate": float(np.mean(named)),
              "head_top1": float(np.mean(correct)), "n_validation_faces": int(len(pred)),
              "threshold_probability": t_p, "threshold_distance": t_d}
    return t_p, t_d, report


def build_gallery(labels, train_emb, train_flip, train_y, val_emb, val_flip, val_y, head,
                  target_far: float = 0.07) -> Gallery:
    gallery = Gallery(list(labels), train_emb.astype(np.float32), train_flip.astype(np.float32),
                      train_y.astype(np.int32), val_emb.astype(np.float32), val_flip.astype(np.float32),
                      val_y.astype(np.int32))
    gallery.calibrate(head, target_far)
    return gallery


def enroll(recognizer, name: str, emb: np.ndarray, emb_flip: np.ndarray, epochs: int = 30) -> dict:
    """Add faces to ``name`` (a new or known identity) and refit the head on all enrolled faces."""
    from pinsface.dataset import identity_key

    gallery = recognizer.gallery
    keys = [identity_key(label) for label in gallery.labels]
    new = identity_key(name) not in keys
    if new:
        gallery.labels.append(name)
        index = len(gallery.labels) - 1
    else:
        index = keys.index(identity_key(name))
    gallery.embeddings = np.concatenate([gallery.embeddings, emb.astype(np.float32)])
    gallery.flips = np.concatenate([gallery.flips, emb_flip.astype(np.float32)])
    gallery.owner = np.concatenate([gallery.owner, np.full(len(emb), index, np.int32)])
    gallery.added(emb, emb_flip, index)
    if getattr(recognizer, "mode", "head") == "head":  # gallery mode has no head to refit
        _refit(recognizer, epochs)
    recognizer.labels = list(gallery.labels)
    return {"identity": gallery.labels[index], "new_identity": new, "identities": len(gallery.labels),
            "calibration": gallery.calibration}


def forget(recognizer, name: str, epochs: int = 30) -> dict:
    from pinsface.dataset import identity_key

    gallery = recognizer.gallery
    keys = [identity_key(label) for label in gallery.labels]
    if identity_key(name) not in keys:
        raise ValueError(f"{name!r} is not known to this run")
    index = keys.index(identity_key(name))

    def without(owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows to keep, their owners renumbered past the removed identity)"""
        keep = owner != index
        return keep, np.where(owner[keep] > index, owner[keep] - 1, owner[keep]).astype(np.int32)

    keep, gallery.owner = without(gallery.owner)
    gallery.embeddings, gallery.flips = gallery.embeddings[keep], gallery.flips[keep]
    keep, gallery.val_owner = without(gallery.val_owner)
    gallery.val_embeddings, gallery.val_flips = gallery.val_embeddings[keep], gallery.val_flips[keep]
    removed = gallery.labels.pop(index)
    gallery.changed()
    _refit(recognizer, epochs, drop=index)
    recognizer.labels = list(gallery.labels)
    return {"identity": removed, "identities": len(gallery.labels), "calibration": gallery.calibration}


def _refit(recognizer, epochs: int, drop: int | None = None, tune_stack_epochs: int = 3) -> None:
    """Rebuild the head for the gallery's identities: the dense stack is kept, known identities keep their
    output weights, a new identity starts from the mean of its faces' features (imprinting); the output layer
    trains on every enrolled face and its mirror image, then the whole head for ``tune_stack_epochs`` at a low
    learning rate (measured on 95 identities + 1 enrolled: 94% of the new person's photos named instead of
    77% with the output layer alone, for -0.4 points on the others' validation top-1)."""
    import keras

    from pinsface.models import build_embedding_model, build_head

    gallery = recognizer.gallery
    settings = recognizer.settings
    old_head = recognizer.model.get_layer("head")
    n = len(gallery.labels)
    head = build_head(n, settings, gallery.embeddings.shape[1])
    for layer in head.layers:
        if layer.weights and layer.name != "cosine_logits":
            layer.set_weights(old_head.get_layer(layer.name).get_weights())
            layer.trainable = False
    features = keras.Model(head.input, head.get_layer("cosine_logits").input)
    x = np.concatenate([gallery.embeddings, gallery.flips])
    y = np.concatenate([gallery.owner, gallery.owner])
    h = features.predict(x, batch_size=2048, verbose=0)
    old_w = old_head.get_layer("cosine_logits").get_weights()[0]
    if drop is not None and drop < old_w.shape[1]:  # an identity enrolled in gallery mode has no column
        old_w = np.delete(old_w, drop, axis=1)
    w = np.zeros((old_w.shape[0], n), np.float32)
    w[:, :old_w.shape[1]] = old_w
    # ReLU features share one big common direction: imprint the new identity with its features' offset from
    # the mean of everyone's, or it would look like everybody.
    for k in range(old_w.shape[1], n):
        w[:, k] = unit(h[y == k].mean(0) - h.mean(0)) * np.linalg.norm(old_w, axis=0).mean()
    out_layer = head.get_layer("cosine_logits")
    out_layer.set_weights([w])
    if drop is None and epochs:
        inputs = keras.Input(h.shape[1:])
        probe = keras.Model(inputs, keras.layers.Softmax()(out_layer(inputs)))
        counts = np.bincount(y, minlength=n).astype(np.float64)
        weights = {k: float(len(y) / (n * max(c, 1))) for k, c in enumerate(counts)}
        probe.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.CategoricalCrossentropy(label_smoothing=settings.label_smoothing))
        # At least a few hundred steps, however few faces are enrolled.
        batch = 256
        epochs = max(epochs, int(np.ceil(300 / np.ceil(len(h) / batch))))
        probe.fit(h, keras.utils.to_categorical(y, n), epochs=epochs, batch_size=batch, verbose=0,
                  class_weight=weights, shuffle=True)
        if tune_stack_epochs:
            # Then a short, gentle pass over the whole head, so its features can also tell the new face apart.
            for layer in head.layers:
                layer.trainable = True
            head.compile(optimizer=keras.optimizers.Adam(3e-4),
                         loss=keras.losses.CategoricalCrossentropy(label_smoothing=settings.label_smoothing))
            head.fit(x, keras.utils.to_categorical(y, n), epochs=tune_stack_epochs, batch_size=batch, verbose=0,
                     class_weight=weights, shuffle=True)
    backbone = recognizer.model.get_layer(settings.backbone)
    recognizer.model = build_embedding_model(backbone, head, settings)
    gallery.calibrate(head)
