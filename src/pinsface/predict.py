"""Name the faces in new photos: ``Recognizer`` finds every face, names it or says it is unknown.

A face is accepted as identity k only when the head's probability for k is high enough *and* its embedding
is close enough to k's nearest enrolled faces. Both thresholds are calibrated at training time (see
``pinsface.gallery``): the distance for a target false-accept rate, the probability on correctly named faces.
"""

from __future__ import annotations

import contextlib
import glob
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pinsface.ahead import ahead
from pinsface.errors import BadImage
from pinsface.faces import FaceDetector, choose_face
from pinsface.finding import display_name, find_faces
from pinsface.runfolder import Run, RunState
from pinsface.settings import Settings


@dataclass
class Face:
    """One face found in a photo, named (``identity``) or unknown (``identity is None``)."""

    box: list[float]  # x1, y1, x2, y2
    detector_confidence: float
    landmarks: list[list[float]]  # left eye, right eye, nose, left mouth, right mouth
    identity: str | None
    probability: float | None  # the head's probability for the best-matching identity (None in gallery mode)
    distance: float  # mean descriptor distance to that identity's 5 nearest enrolled faces (dlib: < 0.6 same)
    best_match: str  # the best-matching identity, even when rejected as unknown
    alternatives: list[dict] = field(default_factory=list)  # top-k: {"identity", "probability", "distance"}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ImageResult:
    source: str
    faces: list[Face]
    error: str | None = None  # a BadImage reason: the file could not be used
    note: str | None = None  # e.g. "no face found"

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "faces": [f.to_dict() for f in self.faces],
            "error": self.error,
            "note": self.note,
        }


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, folders (recursively, image extensions only) and glob patterns -> a sorted list of files."""
    from pinsface.dataset import IMAGE_EXTENSIONS

    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(
                str(p)
                for p in sorted(path.rglob("*"))
                if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            )
        elif any(ch in item for ch in "*?[") and not os.path.lexists(item):  # an existing file is a file
            files.extend(sorted(glob.glob(item, recursive=True)))
        else:
            files.append(item)
    return files


class Recognizer:
    """A trained run, ready to name faces. ``Recognizer.load(run_dir)``, then ``identify`` / ``identify_many``;
    ``enroll`` and ``forget`` change who it knows and save that in the run folder."""

    def __init__(self, run: Run, settings: Settings, state: RunState, mode: str = "head"):
        self.run = run
        self.mode = mode  # "head" or "gallery" (pinsface.scoring)
        self.settings = settings
        self._state = state
        # Detection here passes no per-image minimum, so the portrait-dataset rule (min_face_fraction) does
        # not apply: in a photo any face of min_face_size pixels counts.
        self.face_settings = settings.faces
        self._detector: FaceDetector | None = None
        self._embedder = None
        self._writing = threading.Lock()  # one enrolment or forgetting at a time; naming reads self._state
        # Gallery mode's FAISS index grows in place on enrolment (shared by the old and new state): searched
        # and grown under this lock, held for the search or the append alone.
        self._index_lock = threading.Lock()

    @classmethod
    def load(cls, run_dir: str | os.PathLike, mode: str | None = None) -> Recognizer:
        """Load a run folder written by ``pinsface train`` / ``run`` (must be an ``embedding`` run).
        ``mode`` (head, gallery, auto) overrides the run's ``Settings.mode``."""
        from pinsface.scoring import resolve_mode

        run = Run(run_dir)
        settings = run.settings()
        if settings.model != "embedding":
            raise ValueError(f"{run_dir} is a {settings.model} run: naming faces needs an embedding run")
        state = run.load_state(settings)
        mode = resolve_mode(mode or settings.mode, len(state.labels))
        if mode == "head" and state.head.n_classes != len(state.labels):
            raise ValueError(
                f"{run_dir}: the head knows {state.head.n_classes} of {len(state.labels)} "
                "identities (people were enrolled in gallery mode): use mode 'gallery'"
            )
        return cls(run, settings, state, mode)

    @property
    def run_dir(self) -> Path:
        return self.run.path

    @property
    def labels(self) -> list[str]:
        return list(self._state.labels)

    @property
    def model(self):
        return self._state.model

    @property
    def gallery(self):
        return self._state.gallery

    @property
    def generation(self) -> int:
        """The saved state this recogniser holds (see ``pinsface.runfolder``)."""
        return self._state.generation

    @property
    def head(self):
        """The head as arrays (``pinsface.head.ArrayHead``): what names faces, with any imprinted people."""
        return self._state.head

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:
            self._detector = FaceDetector(self.face_settings)
        return self._detector

    @property
    def embedder(self):
        if self._embedder is None:
            from pinsface.embeddings import run_embedder

            self._embedder = run_embedder(self.settings, self.model.get_layer(self.settings.backbone))
        return self._embedder

    def embed(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Backbone embeddings of aligned crops and of their mirror images (the head averages the two)."""
        return self.embedder.both_views(crops)

    def identify(
        self,
        image: str | os.PathLike | bytes | np.ndarray,
        top_k: int = 3,
        threshold: float | None = None,
        min_probability: float | None = None,
    ) -> list[Face]:
        """Every face in one image: ``identify_many([image])``'s one result. Raises ``BadImage`` for a file that
        cannot be used.

        ``threshold`` (a distance) and ``min_probability`` override the run's calibrated thresholds."""
        (found,) = find_faces(self.detector, [image], self.face_settings)
        if found.error is not None:
            raise BadImage(found.error, found.note or "")
        return self._name([found.chips], [found.faces], top_k, threshold, min_probability)[0]

    def describe(self, image: str | os.PathLike | bytes | np.ndarray) -> list:
        """Every face in one image with its descriptor (``pinsface.describe``), embedded by this run's backbone.
        Raises ``BadImage``."""
        from pinsface.api import described_faces

        (found,) = find_faces(self.detector, [image], self.face_settings)
        if found.error is not None:
            raise BadImage(found.error, found.note or "")
        return described_faces(found, self.embedder, self.face_settings)

    def identify_many(
        self,
        sources: list,
        batch_size: int = 32,
        top_k: int = 3,
        threshold: float | None = None,
        min_probability: float | None = None,
        progress: bool = False,
    ) -> list[ImageResult]:
        """Every face in many images, detection and embedding batched. Bad files get an error entry."""
        from tqdm import tqdm

        results: list[ImageResult] = []
        bar = tqdm(total=len(sources), desc="photos", unit="photo", disable=not progress, leave=False)
        batches = (sources[lo : lo + batch_size] for lo in range(0, len(sources), batch_size))
        # The next two batches are decoded and their faces found (in two threads) while this one's are embedded:
        # the detector and the backbone share the cores, and each fills the gaps the others leave. Large photos
        # need it most: their detection is most of the work, and two batches keep both cores on it.
        for batch, detected in ahead(batches, self.detect_batch, 2):
            results.extend(self.name_batch(detected, top_k, threshold, min_probability))
            bar.update(len(batch))
        bar.close()
        return results

    def name_batch(
        self, detected, top_k: int = 3, threshold: float | None = None, min_probability: float | None = None
    ) -> list[ImageResult]:
        """The second half of ``identify_many`` for one batch: the faces ``detect_batch`` found, named."""
        entries, names, chips, found = detected
        faces = self._name(chips, found, top_k, threshold, min_probability) if chips else []
        it = iter(zip(names, faces))
        results = []
        for entry in entries:
            if entry is None:
                name, named = next(it)
                entry = ImageResult(name, named, note=None if named else "no face found")
            results.append(entry)
        return results

    def detect_batch(self, batch: list) -> tuple[list, list[str], list, list]:
        """The first half of ``identify_many`` for one batch of sources: (an ImageResult for each bad file and
        None for the others, the good ones' names, the aligned chips of the faces found in each, and those faces
        in full-resolution coordinates). It uses the detector alone, so it may run beside ``name_batch``. Only
        the chips are kept, not the decoded photos: batches waiting to be named hold little memory."""
        entries, names, chips, found = [], [], [], []
        for one in find_faces(self.detector, batch, self.face_settings):
            if one.error is not None:
                entries.append(ImageResult(one.source, [], error=one.error, note=one.note))
                continue
            entries.append(None)
            names.append(one.source)
            chips.append(one.chips)
            found.append(one.faces)
        return entries, names, chips, found

    def _name(
        self,
        chips: list[list[np.ndarray]],
        detections,
        top_k: int,
        threshold: float | None,
        min_probability: float | None,
    ) -> list[list[Face]]:
        """The faces of each image named, from their aligned ``chips``."""
        crops = [chip for image_chips in chips for chip in image_chips]
        owners = [(i, face) for i, faces in enumerate(detections) for face in faces]
        out: list[list[Face]] = [[] for _ in chips]
        if not crops:
            return out
        emb, emb_flip = self.embed(np.stack(crops))
        for (i, face), named in zip(owners, self.name_embeddings(emb, emb_flip, top_k, threshold, min_probability)):
            out[i].append(
                Face(
                    box=[round(float(v), 2) for v in face.box],
                    detector_confidence=round(face.confidence, 4),
                    landmarks=[[round(float(a), 2), round(float(b), 2)] for a, b in face.landmarks],
                    **named,
                )
            )
        return out

    def name_embeddings(
        self,
        emb: np.ndarray,
        emb_flip: np.ndarray,
        top_k: int = 3,
        threshold: float | None = None,
        min_probability: float | None = None,
    ) -> list[dict]:
        """Faces' identities from their embeddings and their mirror images' (``embed``): per face, the ``Face``
        fields other than box and landmarks."""
        state = self._state  # one consistent state for the whole batch, even if enrolment swaps it meanwhile
        matches = self.match(emb, emb_flip, top_k, threshold, min_probability, state)
        labels = state.labels

        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        return [
            {
                "identity": labels[m.best] if m.accepted else None,
                "probability": rounded(m.probability),
                "distance": round(m.distance, 4),
                "best_match": labels[m.best],
                "alternatives": [
                    {"identity": labels[k], "probability": rounded(p), "distance": round(d, 4)}
                    for k, p, d in m.alternatives
                ],
            }
            for m in matches
        ]

    def match(
        self,
        emb: np.ndarray,
        emb_flip: np.ndarray,
        top_k: int = 3,
        threshold: float | None = None,
        min_probability: float | None = None,
        state: RunState | None = None,
    ) -> list:
        """The ``scoring.Match`` of each face embedding: its best identity and whether it is named."""
        from pinsface.scoring import (
            checked_probabilities,
            head_probabilities,
            identity_scores,
            keep_trained_answers,
            match_faces,
            match_nearest,
            nearest_identities,
        )

        state = state or self._state
        g = state.gallery
        p_min = g.probability_thresholds() if min_probability is None else min_probability
        d_max = g.threshold_distance if threshold is None else threshold
        if self.mode == "gallery":
            with self._index_lock:
                nearest = nearest_identities(g, emb, emb_flip, max(top_k, 1))
            return match_nearest(*nearest, d_max, top_k)
        probs, dists = head_probabilities(state.head, emb, emb_flip), g.distances(emb, emb_flip)
        scores = identity_scores(probs, dists, g.knn_weight, g.knn_tau)
        trained = g.trained_mask()
        checked = checked_probabilities(state.head, emb, emb_flip, probs, trained)
        matches = match_faces(checked, dists, p_min, d_max, top_k, scores=scores)
        return keep_trained_answers(
            matches, checked, dists, p_min, d_max, trained, top_k=top_k, blend=(g.knn_weight, g.knn_tau)
        )

    def faces_for_enrolment(self, images: list) -> tuple[np.ndarray, np.ndarray, int, list[dict], list[int]]:
        """(embeddings, mirror embeddings, faces used, skipped files, which images gave the faces) of the
        subject's face in each photo."""
        crops, skipped, kept = [], [], []
        for k, one in enumerate(find_faces(self.detector, images, self.face_settings)):
            if one.error is not None:
                skipped.append({"source": one.source, "reason": one.error})
            elif one.faces:
                crops.append(one.chips[choose_face(one.faces, one.full_size)])
                kept.append(k)
        if not crops:
            return np.zeros((0, 128), np.float32), np.zeros((0, 128), np.float32), 0, skipped, []
        emb, emb_flip = self.embed(np.stack(crops))
        return emb, emb_flip, len(crops), skipped, kept

    def enroll(self, name: str, images: list, save: bool = True, find_faces=None) -> dict:
        """Add (or extend) a person from a few photos, with no training: returns a summary.

        Photos already enrolled (by content) are skipped. The faces are found and embedded first (by
        ``find_faces``, default ``faces_for_enrolment``: the server runs it on its inference thread); then
        ``enroll_faces`` adds them (see there)."""
        from pinsface.dataset import check_identity_name
        from pinsface.enrol import photo_hash

        name = check_identity_name(name)
        hashes = [photo_hash(image) for image in images]
        known = self.gallery.photo_hashes
        fresh = [k for k, h in enumerate(hashes) if h not in known and h not in hashes[:k]]
        emb, emb_flip, used, skipped, kept = (find_faces or self.faces_for_enrolment)([images[k] for k in fresh])
        duplicates = [{"source": display_name(images[k]), "identity": known.get(hashes[k])} for k in range(len(images))]
        duplicates = [d for k, d in enumerate(duplicates) if k not in fresh]
        if not used and not duplicates:
            raise ValueError(f"no usable face in the {len(images)} photo(s) given for {name!r}")
        summary = self.enroll_faces(name, emb, emb_flip, [hashes[fresh[k]] for k in kept], save) if used else {}
        index = self.gallery.find(name)
        summary = {"identity": self.labels[index] if index >= 0 else name, "new_identity": False, **summary}
        elsewhere = sorted({d["identity"] for d in duplicates if self.gallery.find(d["identity"]) != index})
        summary["warnings"] = summary.get("warnings", []) + [
            {"code": "photo_enrolled_as", "identity": who, "message": f"a photo given was enrolled as {who} before"}
            for who in elsewhere
        ]
        summary.update({"photos": len(images), "faces_used": used, "skipped": skipped, "duplicates": duplicates})
        return summary

    def enroll_faces(self, name: str, emb: np.ndarray, emb_flip: np.ndarray, hashes: list[str], save=True) -> dict:
        """Add faces (embeddings) under ``name``: its head column is imprinted from them (``pinsface.head``),
        nothing is trained and no threshold moves. Holding the run folder's lock, the latest saved state is read
        (another process may have changed it), the change is made on copies and saved (the change alone, see
        ``Run.save_state``), then the new state replaces the old one in one step: naming never waits for it."""
        from pinsface.enrol import enrol_change, looks_like

        warnings = looks_like(self.gallery, name, emb, emb_flip)

        def change(gallery, head):
            return enrol_change(gallery, head, name, emb, emb_flip, hashes, imprint=self.mode == "head")

        summary = self._update(change, save)
        summary["warnings"] = warnings
        return summary

    def forget(self, name: str, save: bool = True) -> dict:
        """Remove a person: their faces and head column; nothing is trained and no threshold moves."""
        from pinsface.enrol import forget_change

        return self._update(lambda gallery, head: forget_change(gallery, head, name), save)

    def refit(self, epochs: int = 30, save: bool = True) -> dict:
        """Train the head's output layer (and tune its stack) on every enrolled face, then recalibrate both
        thresholds and save a whole new generation. Slow: ``pinsface refit`` runs it on demand."""
        from pinsface.fitting import refit_head, to_keras_head
        from pinsface.models import build_embedding_model

        with self.run.lock() if save else contextlib.nullcontext():
            if save and self.run.generation() != self._state.generation:
                self._state = self.run.load_state(self.settings)
            gallery = self._state.gallery.copy()
            dim = gallery.embeddings.shape[1]
            keras_head = refit_head(to_keras_head(self.head, self.settings, dim), gallery, self.settings, epochs=epochs)
            gallery.calibrate(keras_head)
            model = build_embedding_model(self.model.get_layer(self.settings.backbone), keras_head, self.settings)
            state = RunState(
                list(gallery.labels), model, gallery, self._state.generation, type(self.head).from_keras(keras_head)
            )
            if save:
                state.generation = self.run.save_state(state.labels, model, gallery)
            self._state = state
        return {"identities": len(state.labels), "calibration": gallery.calibration, "generation": state.generation}

    def _update(self, change, save: bool) -> dict:
        with self._writing, self.run.lock() if save else contextlib.nullcontext():
            if save and self.run.generation() != self._state.generation:
                self._state = self.run.load_state(self.settings)
            gallery = self._state.gallery.copy()
            try:
                with self._index_lock:
                    head, delta, summary = change(gallery, self._state.head)
                state = RunState(list(gallery.labels), self._state.model, gallery, self._state.generation, head)
                if save:
                    state.generation = self.run.save_state(
                        state.labels, state.model, gallery, model_changed=False, head=head, change=delta
                    )
            except BaseException:
                self._state.gallery.changed()  # its FAISS index may have grown with the abandoned change
                raise
            self._state = state
        summary.update(
            {"identities": len(state.labels), "calibration": gallery.calibration, "generation": state.generation}
        )
        return summary

    def identities(self) -> list[dict]:
        """Every known identity: ``{"name", "faces" (enrolled face count), "enrolled" (added after training)}``."""
        g = self.gallery
        counts = np.bincount(np.concatenate([g.owner, g.val_owner]).astype(np.int64), minlength=len(g.labels))
        trained = set(g.trained_labels)
        return [
            {"name": name, "faces": int(counts[i]), "enrolled": name not in trained} for i, name in enumerate(g.labels)
        ]

    def save(self) -> None:
        """Save the current labels, model and gallery as the run folder's newest state."""
        self._state.generation = self.run.save_state(self.labels, self.model, self.gallery, head=self.head)


__all__ = ["Recognizer", "Face", "ImageResult", "expand_inputs"]


def annotate(image: np.ndarray, faces: list[Face], path: Path) -> Path:
    """Write a copy of ``image`` with each face's box and name drawn, sized to stay legible at any resolution."""
    import cv2

    canvas = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    h, w = canvas.shape[:2]
    thickness = max(2, round(min(h, w) / 300))
    for face in faces:
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        known = face.identity is not None
        color = (60, 180, 75) if known else (40, 40, 230)
        score = f"{face.probability:.2f}" if face.probability is not None else f"d {face.distance:.2f}"
        text = f"{face.identity} {score}" if known else f"unknown (~{face.best_match}?)"
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness)
        # Text about an eighth of the box tall and never wider than the box, but at least readable (12 px).
        weight = max(1, thickness // 2)
        (w1, h1), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 1.0, weight)
        scale = max(0.4, min((y2 - y1) / 8 / h1, (x2 - x1) / w1))
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, weight)
        ty = y1 - 6 if y1 - th - base - 8 > 0 else max(y1, 0) + th + base + 4  # no room above: inside the top
        tx = min(max(0, x1), max(0, w - tw - 4))
        cv2.rectangle(canvas, (tx, ty - th - base - 2), (tx + tw + 4, ty + base), color, -1)
        cv2.putText(
            canvas, text, (tx + 2, ty - 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), weight, cv2.LINE_AA
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), canvas)
    return Path(path)


def format_table(results: list[ImageResult]) -> str:
    lines = [f"{'photo':40s} {'face':>4s}  {'identity':28s} {'prob':>5s} {'dist':>5s}  box"]
    for r in results:
        name = r.source if len(r.source) <= 40 else "..." + r.source[-37:]
        if r.error:
            lines.append(f"{name:40s} {'-':>4s}  error: {r.error}")
            continue
        if not r.faces:
            lines.append(f"{name:40s} {'-':>4s}  ({r.note})")
        for i, f in enumerate(r.faces):
            who = f.identity if f.identity else f"unknown (nearest: {f.best_match})"
            box = ",".join(str(int(v)) for v in f.box)
            prob = f"{f.probability:5.2f}" if f.probability is not None else f"{'-':>5s}"
            lines.append(f"{name if i == 0 else '':40s} {i + 1:>4d}  {who[:28]:28s} {prob} {f.distance:5.2f}  {box}")
    return "\n".join(lines)
