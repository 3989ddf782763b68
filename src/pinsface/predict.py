"""Name the faces in new photos: ``Recognizer`` finds every face, names it or says it is unknown.

A face is accepted as identity k only when the head's probability for k is high enough *and* its embedding
is close enough to k's nearest enrolled faces. Both thresholds are calibrated at training time (see
``pinsface.gallery``): the distance for a target false-accept rate, the probability on correctly named faces.
"""

from __future__ import annotations

import contextlib
import glob
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pinsface.ahead import ahead
from pinsface.faces import (
    FaceDetector,
    align_face,
    choose_face,
    crop_scale_ok,
    detect_each,
    min_subject_size,
    refine_view,
    retry_tight_crops,
    to_full_face,
)
from pinsface.images import BadImage, Decoded, load_scaled
from pinsface.run import Run, RunState
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


# Photos are decoded for naming at a scale whose shorter side is at least this (JPEG DCT scaling).
PHOTO_DECODE_MIN_SIDE = 1000
# Faces are named down to this fraction of a photo's shorter side (and FaceSettings.min_face_size pixels): 75 px
# in a 12-megapixel photo. MTCNN's time grows with the square of the smallest face's share of the photo (README).
PHOTO_MIN_FACE_FRACTION = 0.025


def min_face_px(view: Decoded, settings) -> float:
    """The smallest face looked for in ``view``, in its own pixels."""
    return max(settings.min_face_size, PHOTO_MIN_FACE_FRACTION * min(view.full_size)) * min(view.scale)


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
        if mode == "head" and state.model.output_shape[-1] != len(state.labels):
            raise ValueError(
                f"{run_dir}: the head knows {state.model.output_shape[-1]} of {len(state.labels)} "
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
        """The saved state this recogniser holds (see ``pinsface.run``)."""
        return self._state.generation

    @property
    def head(self):
        return self.model.get_layer("head")

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
        """Every face in one image. Raises ``BadImage`` for a file that cannot be used.

        ``threshold`` (a distance) and ``min_probability`` override the run's calibrated thresholds."""
        view = self._load(image)
        found = self.detector.detect([view.pixels], [min_face_px(view, self.face_settings)])[0]
        faces = [to_full_face(f, view) for f in found]
        view = self._fine_enough(image, view, faces)
        return self._name([self._chips(view, faces)], [faces], top_k, threshold, min_probability)[0]

    def _load(self, source) -> Decoded:
        """A photo decoded at bounded scale (``PHOTO_DECODE_MIN_SIDE``). Raises ``BadImage``."""
        return load_scaled(source, self.face_settings.max_pixels, PHOTO_DECODE_MIN_SIDE)

    def _chips(self, view: Decoded, faces) -> list[np.ndarray]:
        """The aligned chip of each face (given in full-resolution pixels) in ``view``."""
        return [align_face(view.pixels, view.from_full(face.landmarks), self.face_settings) for face in faces]

    def _fine_enough(self, source, view: Decoded, faces) -> Decoded:
        """``view``, or ``source`` decoded again finer where a face is too small in it for a good chip."""
        sizes = [f.size for f in faces]
        if crop_scale_ok(view, sizes):
            return view
        try:
            return refine_view(source, view, sizes, self.face_settings.max_pixels)
        except BadImage:  # the file changed under us: use what was decoded
            return view

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
        arrays, names, entries, decoded_sources = [], [], [], []
        for source in batch:
            name = source if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"
            if isinstance(name, (str, os.PathLike)):  # a name that is not UTF-8 is shown escaped
                name = os.fsencode(name).decode("utf-8", "backslashreplace")
            try:
                # Large photos are decoded at reduced scale (see faces.refine_view): memory stays bounded.
                arrays.append(load_scaled(source, self.face_settings.max_pixels, PHOTO_DECODE_MIN_SIDE))
                names.append(str(name))
                entries.append(None)
                decoded_sources.append(source)
            except BadImage as exc:
                entries.append(ImageResult(str(name), [], error=exc.reason))
        pixels = [view.pixels for view in arrays]
        wanted = [min_face_px(view, self.face_settings) for view in arrays]
        found = detect_each(self.detector, pixels, wanted) if arrays else []
        found = retry_tight_crops(
            self.detector,
            pixels,
            found,
            [min_subject_size(view.full_size, self.face_settings) * min(view.scale) for view in arrays],
            self.face_settings,
            [view.full_size for view in arrays],
        )
        pending = [j for j, e in enumerate(entries) if e is None]
        for k, faces in enumerate(found):
            if isinstance(faces, Exception):  # this image alone failed in the detector: report it, go on
                entries[pending[k]] = ImageResult(
                    names[k], [], error="detector_error", note=f"{type(faces).__name__}: {faces}"
                )
        keep = [k for k, faces in enumerate(found) if not isinstance(faces, Exception)]
        arrays, names = [arrays[k] for k in keep], [names[k] for k in keep]
        decoded_sources = [decoded_sources[k] for k in keep]
        found = [[to_full_face(f, view) for f in found[k]] for k, view in zip(keep, arrays)]
        chips = [
            self._chips(self._fine_enough(src, view, faces), faces)
            for src, view, faces in zip(decoded_sources, arrays, found)
        ]
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
        from pinsface.scoring import head_probabilities, identity_scores, match_faces, match_nearest, nearest_identities

        state = self._state  # one consistent state for the whole batch, even if enrolment swaps it meanwhile
        p_min = state.gallery.threshold_probability if min_probability is None else min_probability
        d_max = state.gallery.threshold_distance if threshold is None else threshold
        if self.mode == "gallery":
            matches = match_nearest(*nearest_identities(state.gallery, emb, emb_flip, max(top_k, 1)), d_max, top_k)
        else:
            g = state.gallery
            probs, dists = head_probabilities(state.model.get_layer("head"), emb, emb_flip), g.distances(emb, emb_flip)
            matches = match_faces(
                probs, dists, p_min, d_max, top_k, scores=identity_scores(probs, dists, g.knn_weight, g.knn_tau)
            )
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

    def faces_for_enrolment(self, images: list) -> tuple[np.ndarray, np.ndarray, int, list[dict]]:
        """(embeddings, mirror embeddings, faces used, skipped files) of the subject's face in each photo."""
        views, sources, skipped = [], [], []
        for source in images:
            try:
                views.append(self._load(source))
                sources.append(source)
            except BadImage as exc:
                skipped.append({"source": str(source), "reason": exc.reason})
        crops = []
        wanted = [min_face_px(view, self.face_settings) for view in views]
        for source, view, found in zip(sources, views, self.detector.detect([v.pixels for v in views], wanted)):
            if found:
                faces = [to_full_face(f, view) for f in found]
                face = faces[choose_face(faces, view.full_size)]
                view = self._fine_enough(source, view, [face])
                crops.append(align_face(view.pixels, view.from_full(face.landmarks), self.face_settings))
        if not crops:
            return np.zeros((0, 128), np.float32), np.zeros((0, 128), np.float32), 0, skipped
        emb, emb_flip = self.embed(np.stack(crops))
        return emb, emb_flip, len(crops), skipped

    def enroll(self, name: str, images: list, epochs: int = 30, save: bool = True) -> dict:
        """Add (or extend) a person from a few photos without retraining the backbone; returns a summary.

        The faces are found and embedded first; then, holding the run folder's lock, the latest saved state is
        read (another process may have enrolled someone meanwhile), the person is added, the head refitted and,
        with ``save``, the new state saved as one unit."""
        from pinsface.dataset import check_identity_name

        name = check_identity_name(name)
        emb, emb_flip, used, skipped = self.faces_for_enrolment(images)
        if not used:
            raise ValueError(f"no usable face in the {len(images)} photo(s) given for {name!r}")
        summary = self.enroll_embeddings(name, emb, emb_flip, epochs, save)
        summary.update({"photos": len(images), "faces_used": used, "skipped": skipped})
        return summary

    def enroll_embeddings(self, name: str, emb: np.ndarray, emb_flip: np.ndarray, epochs: int = 30, save: bool = True):
        """``enroll`` from faces already embedded (``embed``: the faces and their mirror images)."""
        from pinsface.dataset import check_identity_name

        name = check_identity_name(name)

        def change(gallery, head):
            from pinsface.train import refit_head

            index, new = gallery.add_faces(name, emb, emb_flip)
            summary = {"identity": gallery.labels[index], "new_identity": new}
            if self.mode == "gallery":  # no head to refit: the index grew in place
                return None, summary
            return refit_head(head, gallery, self.settings, epochs), summary

        return self._update(change, save)

    def forget(self, name: str, epochs: int = 30, save: bool = True) -> dict:
        """Remove a person; the head is refitted on the remaining enrolled faces."""

        def change(gallery, head):
            from pinsface.train import refit_head

            if gallery.find(name) < 0:
                raise ValueError(f"{name!r} is not known to this run")
            index = gallery.find(name)
            removed = gallery.labels[index]
            gallery.remove_identity(name)
            return refit_head(head, gallery, self.settings, epochs, drop=index), {"identity": removed}

        return self._update(change, save)

    def _update(self, change, save: bool) -> dict:
        from pinsface.models import build_embedding_model

        with self.run.lock() if save else contextlib.nullcontext():
            if save and self.run.generation() != self._state.generation:
                self._state = self.run.load_state(self.settings)
            gallery = self._state.gallery.copy()
            try:
                head, summary = change(gallery, self.head)
                model = self.model
                if head is not None:
                    gallery.calibrate(head)
                    model = build_embedding_model(self.model.get_layer(self.settings.backbone), head, self.settings)
                state = RunState(list(gallery.labels), model, gallery, self._state.generation)
                if save:
                    state.generation = self.run.save_state(state.labels, model, gallery, model_changed=head is not None)
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
        self._state.generation = self.run.save_state(self.labels, self.model, self.gallery)


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
