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

On 95 Pins identities with 10 strangers (bench/openset.py, figures in docs/benchmarks.md), at equal stranger
rejection the k-nearest distance names more known faces than the distance to the identity's centroid did, and
the probability threshold then rejects a few more strangers for very few known faces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pinsface.face_index import KNN, face_vectors, knn_distances, pairwise_distances

PROBABILITY_KEEP = 0.995


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
    # Naming blends the head with the nearest faces (pinsface.scoring.identity_scores); chosen on validation.
    knn_weight: float = 0.0
    knn_tau: float = 0.04
    trained_labels: list[str] | None = None  # the identities the run was trained on; the rest were enrolled
    # sha256 of each enrolled photo -> the identity it was enrolled under: enrolling a photo again adds nothing.
    photo_hashes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.trained_labels is None:
            self.trained_labels = list(self.labels)
        self._centroids = None
        self._index = None
        self._face_index = None
        self._keys = None  # identity_key(label) -> index, for find
        # Arrays with room to append in place, shared by copies: {field: [buffer, rows used]}. Only the gallery
        # whose array is the buffer's used rows appends in place; any other copies first.
        self._room: dict = {}
        self.stale = False  # thresholds from an older scoring method: calibrate before use

    def changed(self) -> None:
        """Forget what was derived from the faces, after enrolling or forgetting someone."""
        self._centroids = None
        self._index = None
        self._face_index = None

    def copy(self) -> Gallery:
        """A gallery to change while this one stays as it is. The face arrays are shared: enrolment appends past
        the rows this one sees (``_append``), and forgetting makes new ones. So is the FAISS index, which
        enrolment grows in place: call ``changed`` on this gallery if the copy's change is abandoned."""
        import copy

        new = copy.copy(self)
        new.labels, new.trained_labels = list(self.labels), list(self.trained_labels)
        new.calibration = dict(self.calibration)
        new.photo_hashes = dict(self.photo_hashes)
        new._keys = dict(self._keys) if self._keys is not None else None
        return new

    @property
    def face_index(self):
        """The gallery faces (training, then validation, then any enrolled since) in a ``FaceIndex``."""
        if self._face_index is None:
            from pinsface.face_index import FaceIndex

            vectors, owner = self.index
            self._face_index = FaceIndex(vectors, owner, len(self.labels), self.knn)
            self._face_index.validation = (len(self.embeddings), len(self.val_embeddings))
        return self._face_index

    def index_to_save(self):
        """The ``FaceIndex`` worth saving with the gallery, or None: only an inverted file (above
        ``face_index.FLAT_LIMIT`` faces) takes long to build; a flat index is a copy of the faces."""
        from pinsface import face_index

        if self.size <= face_index.FLAT_LIMIT:
            return None
        return self.face_index if self.face_index.kind == "ivf" else None

    def use_saved_index(self, data: bytes, validation: tuple[int, int], source: str | None = None) -> None:
        """Search with the index ``FaceIndex.write`` saved (``data``: the file's bytes, checked by the caller,
        from ``source``) rather than building one. ``validation``:
        where the validation faces were among its rows (its rows are the training faces before them, the
        validation faces, then the rest of the training faces). Raises ``ValueError`` when it does not fit."""
        from pinsface.face_index import FaceIndex

        first, count = (int(v) for v in validation)
        if count != len(self.val_embeddings) or not 0 <= first <= len(self.embeddings):
            raise ValueError(f"its validation faces ({first}, {count}) are not this gallery's")
        train, val = face_vectors(self.embeddings, self.flips), face_vectors(self.val_embeddings, self.val_flips)
        vectors = np.concatenate([train[:first], val, train[first:]]).astype(np.float32, copy=False)
        owner = np.concatenate([self.owner[:first], self.val_owner, self.owner[first:]]).astype(np.int64)
        index = FaceIndex(vectors, owner, len(self.labels), self.knn, saved=data, source=source)
        index.validation = (first, count)
        self._face_index = index

    @property
    def size(self) -> int:
        """Faces held: enrolled and validation faces alike."""
        return len(self.owner) + len(self.val_owner)

    def find(self, name: str) -> int:
        """The index of an identity, matched as folder names are (case- and spacing-insensitive), or -1."""
        from pinsface.dataset import identity_key

        if self._keys is None or len(self._keys) != len(self.labels):
            self._keys = {}
            for i, label in enumerate(self.labels):
                self._keys.setdefault(identity_key(label), i)
        return self._keys.get(identity_key(name), -1)

    def _append(self, field_name: str, rows: np.ndarray) -> None:
        """``self.<field_name>`` with ``rows`` appended, in place where there is room (see ``_room``)."""
        current = getattr(self, field_name)
        room = self._room.get(field_name)
        n, m = len(current), len(rows)
        at_tip = room is not None and room[1] == n and np.shares_memory(room[0][:1], current[:1])
        if not at_tip or n + m > len(room[0]):
            # A quarter more room than needed: copies of the whole gallery become rare as it grows.
            buffer = np.empty((n + m + (n + m) // 4 + 16, *current.shape[1:]), current.dtype)
            buffer[:n] = current
            room = self._room[field_name] = [buffer, n]
        room[0][n : n + m] = rows
        room[1] = n + m
        setattr(self, field_name, room[0][: n + m])

    def add_faces(self, name: str, emb: np.ndarray, emb_flip: np.ndarray) -> tuple[int, bool]:
        """Enrol faces under ``name``, a new identity or a known one: (its index, whether it is new). The face
        arrays and the FAISS index grow in place: enrolment copies no array the size of the gallery."""
        index = self.find(name)
        new = index < 0
        if new:
            from pinsface.dataset import identity_key

            self.labels.append(name)
            index = len(self.labels) - 1
            if self._keys is not None:
                self._keys.setdefault(identity_key(name), index)
        self._append("embeddings", emb.astype(np.float32))
        self._append("flips", emb_flip.astype(np.float32))
        self._append("owner", np.full(len(emb), index, np.int32))
        face_index = self._face_index
        self.changed()
        if face_index is not None:  # the FAISS index grows in place rather than being rebuilt
            face_index.add(face_vectors(emb, emb_flip), np.full(len(emb), index), len(self.labels))
            self._face_index = face_index
        return index, new

    def remove_identity(self, name: str) -> int:
        """Drop an identity and all its faces; later identities move down one place. Returns its old index."""
        index = self.find(name)
        if index < 0:
            raise KeyError(name)

        def without(owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """(rows to keep, their owners renumbered past the removed identity)"""
            keep = owner != index
            return keep, np.where(owner[keep] > index, owner[keep] - 1, owner[keep]).astype(np.int32)

        keep, self.owner = without(self.owner)
        self.embeddings, self.flips = self.embeddings[keep], self.flips[keep]
        keep, self.val_owner = without(self.val_owner)
        self.val_embeddings, self.val_flips = self.val_embeddings[keep], self.val_flips[keep]
        removed = self.labels.pop(index)
        self.photo_hashes = {h: who for h, who in self.photo_hashes.items() if who != removed}
        self.changed()
        return index

    def apply(self, change: GalleryChange) -> int:
        """Replay a saved enrolment or forgetting (``GalleryChange``); the identity's index."""
        if change.op == "remove":
            return self.remove_identity(change.name)
        index, _ = self.add_faces(change.name, change.embeddings, change.flips)
        self.photo_hashes.update(dict.fromkeys(change.hashes, self.labels[index]))
        return index

    def trained_mask(self) -> np.ndarray:
        """Which identities the head was trained on (the others were enrolled since)."""
        trained = np.zeros(len(self.labels), bool)
        for name in self.trained_labels:
            if (k := self.find(name)) >= 0:
                trained[k] = True
        return trained

    def probability_thresholds(self) -> np.ndarray:
        """The head's minimum probability per identity. It is calibrated on the trained identities, whose
        columns training pushed towards their faces; an imprinted column is only their mean direction and
        scores lower on the same person's faces, so people enrolled since are named on distance alone (as in
        gallery mode), once the blended scores rank them first (``scoring.checked_probabilities``)."""
        return np.where(self.trained_mask(), self.threshold_probability, 0.0).astype(np.float32)

    def identity_faces(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings, mirror embeddings) of one identity's enrolled faces."""
        mine = self.owner == index
        return self.embeddings[mine], self.flips[mine]

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
            vectors = np.concatenate(
                [face_vectors(self.embeddings, self.flips), face_vectors(self.val_embeddings, self.val_flips)]
            ).astype(np.float32, copy=False)
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
            r = rows[lo : lo + chunk]
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

    def calibrate(self, head, target_far: float | None = None, distances=None) -> dict:
        """Set both thresholds: the distance for the target false-accept rate, the probability on the genuine side.
        ``distances``: this gallery's ``leave_one_out()``, when already computed."""
        if target_far is not None:
            self.target_far = target_far
        from pinsface.scoring import head_probabilities

        genuine, impostor = distances if distances is not None else self.leave_one_out()
        probs = head_probabilities(head, self.val_embeddings, self.val_flips)
        n_train = len(self.embeddings)
        self.threshold_probability, self.threshold_distance, self.calibration = calibrate_thresholds(
            probs, self.val_owner, genuine[n_train:], impostor, self.target_far
        )
        self.stale = False
        return self.calibration

    def save(self, path: Path) -> None:
        meta = {
            "labels": self.labels,
            "threshold_probability": self.threshold_probability,
            "threshold_distance": self.threshold_distance,
            "target_far": self.target_far,
            "calibration": self.calibration,
            "knn": self.knn,
            "trained_labels": self.trained_labels,
            "knn_weight": self.knn_weight,
            "knn_tau": self.knn_tau,
            "photo_hashes": self.photo_hashes,
        }
        # Uncompressed: compression cost seconds of every save (enrolment included) for a file half the size.
        np.savez(
            path,
            meta=np.array(json.dumps(meta, ensure_ascii=False)),
            embeddings=self.embeddings,
            flips=self.flips,
            owner=self.owner,
            val_embeddings=self.val_embeddings,
            val_flips=self.val_flips,
            val_owner=self.val_owner,
        )

    @classmethod
    def load(cls, path: Path) -> Gallery:
        import zipfile

        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in ("val_embeddings", "val_flips", "val_owner")}
        # The enrolled faces are read into arrays with room to grow, so that enrolment need not copy them.
        room = {}
        with zipfile.ZipFile(path) as archive:
            for key in ("embeddings", "flips", "owner"):
                found = _read_with_room(archive, key)
                if found is None:  # not a plain array: np.load's answer (or its error), without room
                    with np.load(path, allow_pickle=False) as data:
                        arrays[key] = data[key]
                else:
                    room[key] = found
                    arrays[key] = found[0][: found[1]]
        gallery = cls(
            meta["labels"],
            **arrays,
            threshold_probability=meta["threshold_probability"],
            threshold_distance=meta["threshold_distance"],
            target_far=meta["target_far"],
            calibration=meta["calibration"],
            knn=meta.get("knn", KNN),
            trained_labels=meta.get("trained_labels"),
            knn_weight=float(meta.get("knn_weight", 0.0)),
            knn_tau=float(meta.get("knn_tau", 0.04)),
            photo_hashes=dict(meta.get("photo_hashes") or {}),
        )
        gallery._room = room
        gallery.validate()
        # Galleries saved before nearest-face distances hold thresholds for centroid distances.
        gallery.stale = "knn" not in meta
        return gallery

    def validate(self) -> None:
        """Shapes and owners that agree, so a damaged or edited file fails here rather than naming wrongly."""
        n = len(self.labels)
        for emb, flip, owner, what in (
            (self.embeddings, self.flips, self.owner, "enrolled"),
            (self.val_embeddings, self.val_flips, self.val_owner, "validation"),
        ):
            if emb.ndim != 2 or emb.shape != flip.shape or owner.shape != (len(emb),):
                raise ValueError(
                    f"{what} faces: embeddings {emb.shape}, mirror images {flip.shape} and owners "
                    f"{owner.shape} do not agree"
                )
            if len(owner) and (owner.min() < 0 or owner.max() >= n):
                raise ValueError(f"{what} faces belong to identity {int(owner.max())}, but only {n} are named")


@dataclass
class GalleryChange:
    """One enrolment (``add``: faces under a name, and the sha256 of their photos) or forgetting (``remove``),
    saved on its own in the run folder and replayed on the saved gallery (``Gallery.apply``)."""

    op: str  # "add" or "remove"
    name: str
    embeddings: np.ndarray | None = None
    flips: np.ndarray | None = None
    hashes: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        meta = {"op": self.op, "name": self.name, "hashes": self.hashes}
        arrays = {} if self.op == "remove" else {"embeddings": self.embeddings, "flips": self.flips}
        np.savez(path, meta=np.array(json.dumps(meta, ensure_ascii=False)), **arrays)

    @classmethod
    def load(cls, path: Path) -> GalleryChange:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta["op"] not in ("add", "remove") or not isinstance(meta["name"], str):
                raise ValueError(f"not a gallery change: {meta.get('op')!r}")
            if meta["op"] == "remove":
                return cls("remove", meta["name"])
            emb, flips = data["embeddings"].astype(np.float32), data["flips"].astype(np.float32)
        if emb.ndim != 2 or emb.shape != flips.shape:
            raise ValueError(f"embeddings {emb.shape} and mirror images {flips.shape} do not agree")
        return cls("add", meta["name"], emb, flips, [str(h) for h in meta.get("hashes", [])])


def _read_with_room(archive, key: str) -> list | None:
    """[buffer, rows]: the array ``key`` of an npz archive read into the first rows of a buffer a quarter
    larger; None for anything but a plain C-ordered array of at least one dimension."""
    with archive.open(key + ".npy") as fh:
        version = np.lib.format.read_magic(fh)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = header(fh)
        if dtype.hasobject or fortran_order or not shape:
            return None
        rows = shape[0]
        buffer = np.empty((rows + rows // 4 + 16, *shape[1:]), dtype)
        view = memoryview(buffer[:rows].reshape(-1).view(np.uint8))
        done, chunk = 0, 1 << 24
        while done < len(view):
            data = fh.read(min(chunk, len(view) - done))
            if not data:
                raise ValueError(f"{key}: the file ends early")
            view[done : done + len(data)] = data
            done += len(data)
    return [buffer, rows]


def calibrate_thresholds(
    val_probs: np.ndarray,
    val_owner: np.ndarray,
    val_genuine: np.ndarray,
    impostor: np.ndarray,
    target_far: float = 0.07,
    keep: float = PROBABILITY_KEEP,
) -> tuple[float, float, dict]:
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
    report = {
        "target_far": target_far,
        "impostor_accept_rate": float(np.mean(impostor <= t_d)),
        "n_impostor_trials": int(len(impostor)),
        "genuine_named_rate": float(np.mean(named)),
        "head_top1": float(np.mean(correct)),
        "n_validation_faces": int(len(pred)),
        "threshold_probability": t_p,
        "threshold_distance": t_d,
    }
    return t_p, t_d, report


def new_gallery(labels, vectors: dict, y: dict) -> Gallery:
    """A gallery of the training faces (enrolled) and validation faces (for calibration), not yet calibrated.
    ``vectors``: "train" and "val" each to its faces' (embeddings, mirrored embeddings); ``y``: their identities."""
    (train_emb, train_flip), (val_emb, val_flip) = vectors["train"], vectors["val"]
    train_y, val_y = y["train"], y["val"]
    return Gallery(
        list(labels),
        train_emb.astype(np.float32),
        train_flip.astype(np.float32),
        train_y.astype(np.int32),
        val_emb.astype(np.float32),
        val_flip.astype(np.float32),
        val_y.astype(np.int32),
        trained_labels=list(labels),
    )
