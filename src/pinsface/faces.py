"""Find faces with MTCNN, pick the subject's face, and cut the two crops the models use."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pinsface.detector_boxes import above, landmarks_in_box, moved, proposals, suppress, to_square
from pinsface.settings import FaceSettings


@dataclass
class Detection:
    """One face as the detector found it. (What the public API returns is ``pinsface.DetectedFace``, and a named
    face ``pinsface.Face``.)"""

    box: np.ndarray  # (4,) x1, y1, x2, y2 in image pixels
    confidence: float
    landmarks: np.ndarray  # (5, 2): left eye, right eye, nose, left mouth, right mouth

    @property
    def size(self) -> float:
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))


def scale_pyramid(width, height, min_face_size, scale_factor, min_size=12):
    """MTCNN's pyramid: the scales at which P-net's 12-px window sees faces from ``min_face_size`` pixels up to the
    image's shorter side. (mtcnn 1.0.0 counts the levels as if the minimum were 12, so that for any larger one
    its last levels are smaller than the window, and its whole batch fails.)"""
    m = min_size / min_face_size
    levels = int(np.floor(np.log(min_size / (min(width, height) * m)) / np.log(scale_factor))) + 1
    return m * scale_factor ** np.arange(max(levels, 1))


# The smallest pyramid level P-net gives a window on (its 12-px window, with the padding of its pooling).
PNET_MIN_SIDE = 11
# R-net and O-net run on calls of exactly this many patches (the last call padded): a patch's outputs then never
# depend on how many others share its call (in their last bits they do with the call's size).
RNET_CALL = 64
ONET_CALL = 16


def _run_fixed(net, patches, call: int) -> list[np.ndarray]:
    """``net``'s outputs for ``patches`` (float32, normalised), run ``call`` patches at a time."""
    patches = np.asarray(patches, dtype=np.float32)
    parts = []
    for k in range(0, max(len(patches), 1), call):
        part = patches[k : k + call]
        pad = np.zeros((call - len(part), *patches.shape[1:]), np.float32)
        parts.append([np.asarray(t) for t in net(np.concatenate([part, pad]))])
    return [np.concatenate(column)[: len(patches)] for column in zip(*parts)]


class FaceDetector:
    """Batched MTCNN (its networks: ``pinsface.detector_nets``). ``detect`` takes RGB uint8 images and returns
    every face in each.

    An image's faces do not depend on the other images in the call: images share a P-net call only when they
    have the same shape and pyramid, R-net and O-net run on calls of a fixed size, and every sort and suppression
    looks at one image's boxes (``pinsface.detector_boxes``)."""

    def __init__(self, settings: FaceSettings | None = None):
        from pinsface.detector_nets import compiled_networks

        self.settings = settings or FaceSettings()
        self._pnet, self._rnet, self._onet = compiled_networks()

    def detect(
        self,
        images: list[np.ndarray],
        min_face_sizes: list[float] | None = None,
        thresholds: tuple[float, float, float] | None = None,
        coarse_sizes: list[float] | None = None,
    ) -> list[list[Detection]]:
        """Faces per image, in its pixels. Same-shape images with the same pyramid go through MTCNN together.
        Images that the old path would shrink first (``detection_factor`` under 1: photos over 720 px on the long
        side) go through ``_detect_large``, which scans them no finer than the smallest wanted face needs; the
        rest (the Pins crops among them) through ``_small_faces``, MTCNN as mtcnn's own ``detect_faces`` runs
        it. ``thresholds`` override the settings' three.

        ``coarse_sizes`` (per image, pixels) make the scan coarse to fine: an image is first scanned for faces of
        about that size and up, and down to its ``min_face_sizes`` only where that found no face
        ``COARSE_ACCEPT`` times the size scanned for. Any face it missed is then under 1 / ``COARSE_ACCEPT``
        of the one it found: the margin by which ``choose_subject`` asks a subject to lead. MTCNN's time grows
        with the square of the smallest face's share of the image."""
        s = self.settings
        thresholds = thresholds or s.thresholds
        results: list[list[Detection]] = [[] for _ in images]
        wanted = [max(s.min_face_size, min_face_sizes[i] if min_face_sizes else 0) for i in range(len(images))]
        coarse = [max(w, coarse_sizes[i]) if coarse_sizes else w for i, w in enumerate(wanted)]
        groups = _same_pyramid_groups(images, wanted, coarse, s)
        for (large, shape, min_face, coarse_face), indices in groups.items():
            # MTCNN's memory grows with the batch times the pixels PNet scans: bound it for any photo size.
            per_batch = max(1, int(DETECT_BATCH_PIXELS / (shape[0] * shape[1] * (12.0 / min_face) ** 2)))
            for k in range(0, len(indices), per_batch):
                part = indices[k : k + per_batch]
                batch = [images[i] for i in part]
                if large:
                    rows = self._detect_large(batch, min_face, thresholds, coarse_face)
                else:
                    rows = self._small_faces(batch, min_face, thresholds)
                self._collect(rows, part, min_face_sizes, results)
        # Smaller images were scanned for their coarse size alone: scan again where that was not enough.
        scanned = [i for (large, *_), indices in groups.items() if not large for i in indices]
        finer = [i for i in scanned if coarse[i] > wanted[i] and not _enough([f.size for f in results[i]], coarse[i])]
        if finer:
            again = self.detect([images[i] for i in finer], [wanted[i] for i in finer], thresholds)
            for i, faces in zip(finer, again):
                results[i] = faces
        for faces in results:
            faces.sort(key=lambda face: -face.confidence)
        return results

    def _small_faces(self, batch: list[np.ndarray], min_face: float, thresholds: tuple) -> np.ndarray:
        """MTCNN on same-shape images, as mtcnn's own ``detect_faces`` runs it on each alone (with the pyramid
        of ``scale_pyramid``): final rows (image index, x1, y1, x2, y2, confidence, 5 landmark x, 5 landmark y),
        boxes fitted to the image. The levels are area-resampled and the patches bilinearly cut from the whole
        normalised image."""
        import tensorflow as tf

        images = _normalise(np.stack(batch))
        h, w = batch[0].shape[:2]
        found = []
        for scale in scale_pyramid(w, h, min_face, PYRAMID_FACTOR):
            size = np.asarray([h, w]) * scale
            if size.astype(int).min() < PNET_MIN_SIDE:
                continue
            found.append(self._pnet_windows(tf.image.resize(images, size, method="area"), scale, thresholds[0]))
        boxes = _candidates(found)

        def cut(rows: np.ndarray, side: int):
            edges = rows[:, [2, 1, 4, 3]] / np.asarray([[h, w, h, w]])
            return tf.image.crop_and_resize(images, edges, rows[:, 0].astype(int), (side, side))

        if not len(boxes):
            return np.empty((0, 16))
        boxes = self._rnet_squares(boxes, cut(boxes, 24), thresholds[1])
        if not len(boxes):
            return np.empty((0, 16))
        offsets, points, scores = _run_fixed(self._onet, cut(boxes, 48), ONET_CALL)
        points = landmarks_in_box(points, boxes)
        boxes[:, 5] = scores[:, 1]
        boxes = suppress(above(np.concatenate([moved(boxes, offsets), points], axis=1), thresholds[2]), 0.7, "min")
        return _fit_to_image(boxes, w, h)

    def _pnet_windows(self, level, scale: float, threshold: float) -> np.ndarray:
        """P-net's windows above ``threshold`` on one pyramid level (a batch of normalised images at ``scale``),
        in image pixels, suppressed image by image."""
        offsets, scores = self._pnet(level)
        return suppress(proposals(np.asarray(offsets), np.asarray(scores), threshold, scale), 0.5, sort=False)

    def _rnet_squares(self, boxes: np.ndarray, patches, threshold: float) -> np.ndarray:
        """The candidate ``boxes`` that R-net, shown their ``patches``, scores above ``threshold``: moved by its
        offsets, suppressed and made square for O-net."""
        offsets, scores = _run_fixed(self._rnet, patches, RNET_CALL)
        boxes[:, 5] = scores[:, 1]
        return to_square(suppress(above(moved(boxes, offsets), threshold), 0.7))

    def _refine_landmarks(self, halvings: list[_Halvings], boxes: np.ndarray) -> np.ndarray:
        """Final MTCNN rows with their box and landmarks re-estimated: O-net run again on the face's own square
        and on slightly shifted and scaled copies of it, the results averaged, twice over. O-net's landmarks move
        with the exact patch it is given (by 1-2% of the face between two decodings of one photo, enough to move
        a descriptor by 0.1); the average is steadier, so chips match across decoding scales."""
        boxes = boxes.copy()
        for _ in range(REFINE_STEPS):
            square = to_square(boxes[:, :6])
            side = square[:, 3] - square[:, 1]
            variants = []
            for dx, dy, scale in _jitters(REFINE_JITTER):
                v = square.copy()
                cx, cy = (v[:, 1] + v[:, 3]) / 2 + dx * side, (v[:, 2] + v[:, 4]) / 2 + dy * side
                half = side * scale / 2
                v[:, 1], v[:, 3], v[:, 2], v[:, 4] = cx - half, cx + half, cy - half, cy + half
                variants.append(v)
            allv = np.concatenate(variants)
            patches, cut = _patches(halvings, allv, 48)
            offsets, points, _ = _run_fixed(self._onet, _normalise(patches), ONET_CALL)
            width, height = cut[:, 2:3] - cut[:, 0:1], cut[:, 3:4] - cut[:, 1:2]
            pts = np.concatenate([cut[:, 0:1] + width * points[:, :5], cut[:, 1:2] + height * points[:, 5:]], axis=1)
            k = len(variants)
            boxes[:, 6:16] = pts.reshape(k, len(boxes), 10).mean(0) - 0.5
            boxes[:, 1:5] = moved(allv, offsets)[:, 1:5].reshape(k, len(boxes), 4).mean(0)
        return boxes

    @staticmethod
    def _collect(rows, indices, min_face_sizes, results) -> None:
        for row in np.asarray(rows).reshape(-1, 16):
            i = indices[int(row[0])]
            landmarks = np.stack([row[6:11], row[11:16]], axis=1).astype(np.float32)
            face = Detection(row[1:5].astype(np.float32), float(row[5]), landmarks)
            if min_face_sizes is None or face.size >= min_face_sizes[i]:
                results[i].append(face)

    def _detect_large(
        self, batch: list[np.ndarray], min_face: float, thresholds: tuple, coarse_face: float | None = None
    ) -> np.ndarray:
        """MTCNN on same-shape large images, for faces of ``min_face`` pixels and up: rows as ``_small_faces``
        gives them.

        Every network input is cut from the image at its own resolution and area-resampled (as the original
        MTCNN does), rather than sampled bilinearly from one shrunken copy: the pyramid comes from exact halvings
        of the image, each R-net and O-net patch from the halving nearest its size. The landmarks then hardly
        depend on the scale a photo was decoded at, and no step touches every pixel of a 12-megapixel image.

        With ``coarse_face``, the pyramid's coarse levels (those that see faces of about that size and up) are
        scanned first; its finer levels only in the images where that found no face ``COARSE_ACCEPT`` times the
        size the coarse levels see, and only for faces the coarse levels did not find."""
        halvings = [_Halvings(image) for image in batch]
        h, w = batch[0].shape[:2]
        scales = [s for s in scale_pyramid(w, h, min_face, PYRAMID_FACTOR) if min(w * s, h * s) >= 12]
        split = 0
        if coarse_face and coarse_face > min_face and len(scales) > 1:
            # Level k sees faces from min_face / PYRAMID_FACTOR**k pixels up; the coarse levels start at the last
            # one that still sees a face of coarse_face pixels.
            split = int(np.floor(np.log(coarse_face / min_face) / -np.log(PYRAMID_FACTOR) + 1e-9))
            split = min(split, len(scales) - 1)
        rows = self._large_faces(halvings, scales[split:], thresholds)
        if split:
            cover = min_face / PYRAMID_FACTOR**split
            index = rows[:, 0].astype(int)
            sizes = np.minimum(rows[:, 3] - rows[:, 1], rows[:, 4] - rows[:, 2])
            rest = [i for i in range(len(batch)) if not _enough(sizes[index == i], cover)]
            if rest:
                known = [rows[index == i] for i in rest]
                extra = self._large_faces([halvings[i] for i in rest], scales[:split], thresholds, known)
                extra[:, 0] = np.asarray(rest)[extra[:, 0].astype(int)]
                rows = np.concatenate([rows, extra])
        return rows

    def _large_faces(
        self, halvings: list[_Halvings], scales: list[float], thresholds: tuple, known: list | None = None
    ) -> np.ndarray:
        """MTCNN's three stages over the pyramid levels ``scales`` of same-shape images: final rows with refined
        landmarks (see ``_detect_large``). Faces overlapping one of ``known`` (per image, rows found before) are
        left out."""
        none = np.empty((0, 16))
        h, w = halvings[0].levels[0].shape[:2]
        found = []
        for scale in scales:
            size = (int(w * scale), int(h * scale))
            level = _normalise(np.stack([hv.resized(size) for hv in halvings]))
            found.append(self._pnet_windows(level, scale, thresholds[0]))
        boxes = _candidates(found)
        if not len(boxes):
            return none
        boxes = self._rnet_squares(boxes, _normalise(_patches(halvings, boxes, 24)[0]), thresholds[1])
        if not len(boxes):
            return none
        patches, cut = _patches(halvings, boxes, 48)
        offsets, points, scores = _run_fixed(self._onet, _normalise(patches), ONET_CALL)
        # Landmarks relative to the patch actually cut (``cut``: its edges in image pixels).
        width, height = cut[:, 2:3] - cut[:, 0:1], cut[:, 3:4] - cut[:, 1:2]
        points = np.concatenate([cut[:, 0:1] + width * points[:, :5], cut[:, 1:2] + height * points[:, 5:]], axis=1)
        boxes[:, 5] = scores[:, 1]
        boxes = suppress(
            above(np.concatenate([moved(boxes, offsets), points - 0.5], axis=1), thresholds[2]), 0.7, "min"
        )
        if known is not None:
            boxes = boxes[[not _overlaps(row[1:5], known[int(row[0])]) for row in boxes]]
        if not len(boxes):
            return none
        boxes = self._refine_landmarks(halvings, boxes)
        return _fit_to_image(boxes, w, h)


def _candidates(found: list[np.ndarray]) -> np.ndarray:
    """The P-net windows of every pyramid level, suppressed together and made square for R-net."""
    return to_square(suppress(np.concatenate(found), 0.7)) if found else np.empty((0, 6))


def _fit_to_image(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Final rows with their boxes clipped to the image, as mtcnn's ``fit_to_image``."""
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, width - 1)
    boxes[:, [2, 4]] = np.clip(boxes[:, [2, 4]], 0, height - 1)
    return boxes


def _same_pyramid_groups(images, wanted: list[float], coarse: list[float], settings: FaceSettings) -> dict:
    """Image indices grouped by (large, shape, smallest face, coarse face): the images of a group have the same
    pyramid and share P-net calls. Images too small for P-net's window are in none."""
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        if detection_factor(h, w, wanted[i], settings) < 1.0:
            # The smallest face the old path could see in a shrunk copy: at least 12 px there.
            floor = 12.0 * max(h, w) / settings.detect_max_side
            key = (True, image.shape, round(max(wanted[i], floor), 3), round(max(coarse[i], floor), 3))
        elif min(h, w) >= 12:  # PNet's window: nothing smaller can hold a face
            key = (False, image.shape, max(12.0, coarse[i]), None)
        else:
            continue
        groups.setdefault(key, []).append(i)
    return groups


# MTCNN's pyramid: each level this factor of the one before.
PYRAMID_FACTOR = 0.709
# A coarse scan (FaceDetector.detect's coarse_sizes) is enough for an image when it found a face this many times
# the smallest size it looks for.
COARSE_ACCEPT = 1.5


def _enough(sizes, cover: float) -> bool:
    """Whether a coarse scan that sees faces of ``cover`` pixels and up, and found faces of these ``sizes``, is
    enough for its image (see ``FaceDetector.detect``)."""
    return bool(np.any(np.asarray(sizes) >= COARSE_ACCEPT * cover))


def _overlaps(box: np.ndarray, rows: np.ndarray, threshold: float = 0.7) -> bool:
    """Whether ``box`` (x1, y1, x2, y2) covers ``threshold`` of the smaller of itself and any box of ``rows``
    (MTCNN rows): the same face, as MTCNN's last "min" suppression judges."""
    if not len(rows):
        return False
    x1, y1 = np.maximum(box[0], rows[:, 1]), np.maximum(box[1], rows[:, 2])
    x2, y2 = np.minimum(box[2], rows[:, 3]), np.minimum(box[3], rows[:, 4])
    inter = np.clip(x2 - x1 + 1, 0, None) * np.clip(y2 - y1 + 1, 0, None)
    area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    areas = (rows[:, 3] - rows[:, 1] + 1) * (rows[:, 4] - rows[:, 2] + 1)
    return bool(np.any(inter / np.minimum(area, areas) > threshold))


# Landmark refinement on large images (FaceDetector._refine_landmarks): rounds, and the shifts and scalings of
# the face's square (fractions of its side) whose O-net landmarks are averaged. Chosen on bench/photos.py --crops.
REFINE_STEPS = 2
REFINE_JITTER = 0.06


def _jitters(d: float) -> list[tuple[float, float, float]]:
    """(dx, dy, scale) of each variant of a face's square: itself, shifted by ``d`` of its side in 8 directions,
    and scaled by 1 +- d and 1 +- 2d."""
    shifts = [(dx * d, dy * d, 1.0) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
    return shifts + [(0.0, 0.0, 1 + d), (0.0, 0.0, 1 - d), (0.0, 0.0, 1 + 2 * d), (0.0, 0.0, 1 - 2 * d)]


def _normalise(images: np.ndarray):
    import tensorflow as tf

    return tf.convert_to_tensor((images.astype(np.float32) - 127.5) / 128.0)


class _Halvings:
    """An image and its successive exact 2x area reductions (cheap), made as needed: the source of any smaller
    copy, which is then one area resize from the nearest halving at least as large."""

    def __init__(self, image: np.ndarray):
        self.levels = [image]

    def level_for(self, factor: float) -> int:
        """The smallest halving at least ``factor`` times the image's size."""
        k = 0
        while 0.5 ** (k + 1) >= factor and min(self.levels[k].shape[:2]) >= 24:
            if k + 1 == len(self.levels):
                last = self.levels[k]
                self.levels.append(
                    cv2.resize(last, (last.shape[1] // 2, last.shape[0] // 2), interpolation=cv2.INTER_AREA)
                )
            k += 1
        return k

    def resized(self, size: tuple[int, int]) -> np.ndarray:
        source = self.levels[self.level_for(size[0] / self.levels[0].shape[1])]
        if (source.shape[1], source.shape[0]) == size:
            return source
        return cv2.resize(source, size, interpolation=cv2.INTER_AREA)


def _patches(halvings: list[_Halvings], boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size, 3) patches of ``boxes`` (MTCNN rows: image index, x1, y1, x2, y2, inclusive pixels), each
    cut from the halving nearest its size and area-resampled; and the edges (x1, y1, x2, y2) in image pixels of
    what each patch holds. Past the image's edges is mid-grey (0 once normalised), as MTCNN pads."""
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    cut = np.empty((len(boxes), 4), np.float64)
    for j, row in enumerate(boxes):
        hv = halvings[int(row[0])]
        side = max(row[3] - row[1] + 1, row[4] - row[2] + 1)
        k = hv.level_for(size / max(side, 1.0))
        source = hv.levels[k]
        fx = fy = 0.5**k  # exact: halving pixel i covers pixels 2i and 2i + 1
        x1, y1 = int(np.floor(row[1] * fx + 0.5)), int(np.floor(row[2] * fy + 0.5))
        x2, y2 = (
            max(x1 + 1, int(np.floor((row[3] + 1) * fx + 0.5))),
            max(y1 + 1, int(np.floor((row[4] + 1) * fy + 0.5))),
        )
        sh, sw = source.shape[:2]
        if x1 >= 0 and y1 >= 0 and x2 <= sw and y2 <= sh:
            crop = source[y1:y2, x1:x2]
        else:
            crop = np.full((y2 - y1, x2 - x1, 3), 128, np.uint8)
            sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, sw), min(y2, sh)
            if sx2 > sx1 and sy2 > sy1:
                crop[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = source[sy1:sy2, sx1:sx2]
        shrink = crop.shape[0] >= size and crop.shape[1] >= size
        out[j] = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        cut[j] = (x1 / fx, y1 / fy, x2 / fx, y2 / fy)
    return out, cut


# A face of the smallest wanted size reaches MTCNN at least this many pixels wide (its window is 12), and an
# image is never shrunk below this long side for it: dataset crops and small photos are scanned as they are.
DETECT_FACE_PX = 16
DETECT_KEEP_SIDE = 720
# Pixels of PNet's largest pyramid level in one MTCNN call (sets its peak memory).
DETECT_BATCH_PIXELS = 1_000_000


def detection_factor(height: int, width: int, min_face: float, settings: FaceSettings) -> float:
    """How much to shrink an image before MTCNN: to at most ``detect_max_side`` on the long side, and for large
    photos further, as far as the smallest wanted face allows (MTCNN's time grows with the pixels it scans)."""
    long_side = max(height, width)
    factor = min(1.0, settings.detect_max_side / long_side)
    return min(factor, max(DETECT_FACE_PX / max(min_face, 1.0), DETECT_KEEP_SIDE / long_side))


def detect_each(
    detector,
    images: list[np.ndarray],
    min_face_sizes: list[float] | None = None,
    coarse_sizes: list[float] | None = None,
) -> list[list[Detection] | Exception]:
    """``detector.detect`` that survives a failing image: if the batch raises, each image is retried alone and
    the one that fails gets its exception in place of its faces."""
    try:
        return detector.detect(images, min_face_sizes, coarse_sizes=coarse_sizes)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001  (each image is retried alone, to find the one that fails)
        if len(images) == 1:
            return [exc]
    out: list[list[Detection] | Exception] = []
    for i, image in enumerate(images):
        try:
            one = {"min_face_sizes": [min_face_sizes[i]] if min_face_sizes else None}
            if coarse_sizes:
                one["coarse_sizes"] = [coarse_sizes[i]]
            out.append(detector.detect([image], **one)[0])
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001  (one image's detector or OpenCV error must not stop the run)
            out.append(exc)
    return out


def retry_tight_crops(
    detector,
    images: list[np.ndarray],
    found: list,
    min_face_sizes: list[float],
    settings: FaceSettings,
    full_shapes: list[tuple[int, ...]] | None = None,
) -> list:
    """``found`` (per image: faces, or an exception), with each crop-shaped image (judged by its
    ``full_shapes``, for images decoded at reduced scale) in which no face was found scanned again inside a
    black border, at ``tight_crop_thresholds``.

    Dataset crops are often cut so tight that the chin or brow is past the edge, and MTCNN's windows cannot
    hold a face that is not all in the picture. With a border round it the face fits again. The retry's lower
    thresholds are safe because it only replaces a blind guess: without it the image would be aligned with the
    mean landmarks (``fallback_landmarks``). Faces come back in the image's own coordinates, partly outside it."""
    retry = [
        k
        for k, faces in enumerate(found)
        if isinstance(faces, list)
        and not faces
        and is_crop_shaped(full_shapes[k] if full_shapes else images[k].shape, settings)
    ]
    if not retry or settings.tight_crop_border <= 0:
        return found
    found = list(found)
    for k in retry:
        h, w = images[k].shape[:2]
        pad = int(round(settings.tight_crop_border * max(h, w)))
        padded = cv2.copyMakeBorder(images[k], pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        try:
            faces = detector.detect([padded], [min_face_sizes[k]], settings.tight_crop_thresholds)[0]
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception:  # noqa: BLE001  (the retry only adds to a result already in hand)
            continue
        found[k] = [Detection(f.box - pad, f.confidence, f.landmarks - pad) for f in faces]
    return found


def choose_face(faces: list[Detection], image_shape: tuple[int, ...]) -> int:
    """The subject of a portrait: among confident faces at least half the largest one's size, the most central."""
    if not faces:
        return -1
    h, w = image_shape[:2]
    largest = max(face.size for face in faces)
    best_conf = max(face.confidence for face in faces)
    candidates = [
        i for i, face in enumerate(faces) if face.size >= 0.5 * largest and face.confidence >= min(0.9, best_conf)
    ]

    def off_centre(i: int) -> float:
        box = faces[i].box
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        return ((cx - w / 2) / w) ** 2 + ((cy - h / 2) / h) ** 2

    return min(candidates, key=off_centre)


# What became of an image in a person's folder. The face cache stores each as its index here, so this order is
# fixed: new statuses go at the end, never in between. The FACE_STATUSES have a chosen face and train; "no_face"
# images are crop-like and are aligned with the mean landmarks when Settings.no_face_fallback is on; the rest
# are left out.
STATUSES = ("ok", "no_face", "small_face", "subject", "ambiguous", "no_face_photo")
FACE_STATUSES = ("ok", "small_face", "subject")
# One face under this fraction of the image's shorter side is a "small_face".
SMALL_FACE_FRACTION = 0.2
# In a photo with several faces the best one must score this many times the next, or the photo is "ambiguous".
SUBJECT_MARGIN = 1.5
# A face at least this fraction of the shorter side makes the image a crop around it (like the Pins photos).
CROP_FACE_FRACTION = 0.25


def subject_scores(faces: list[Detection], image_shape: tuple[int, ...]) -> np.ndarray:
    """How likely each face is the photo's subject: large, confident and central scores high."""
    h, w = image_shape[:2]
    scores = []
    for face in faces:
        cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
        off = ((cx - w / 2) / w) ** 2 + ((cy - h / 2) / h) ** 2
        scores.append(face.size * face.confidence**2 * np.exp(-off / (2 * 0.35**2)))
    return np.asarray(scores, dtype=np.float64)


def is_crop_shaped(image_shape: tuple[int, ...], settings: FaceSettings) -> bool:
    """A small, square or portrait image: shaped like a dataset's face crop (the Pins photos) more than a photo."""
    h, w = image_shape[:2]
    return max(h, w) <= settings.detect_max_side and 0.6 <= w / h <= 1.1


def is_crop_like(faces: list[Detection], image_shape: tuple[int, ...], settings: FaceSettings) -> bool:
    """Whether the image is a crop around one face rather than a photo of a scene."""
    if is_crop_shaped(image_shape, settings):
        return True
    return bool(faces) and max(face.size for face in faces) >= CROP_FACE_FRACTION * min(image_shape[:2])


def choose_subject(
    faces: list[Detection], image_shape: tuple[int, ...], settings: FaceSettings | None = None
) -> tuple[int, str]:
    """(index of the subject's face or -1, one of ``STATUSES``) for an image in a person's folder.

    One face: "ok", or "small_face" under ``SMALL_FACE_FRACTION`` of the shorter side. Several: in a crop-like
    image the portrait rule (``choose_face``) picks the centred face; in a photo the best ``subject_scores`` face
    is the "subject" when it clearly leads, else the photo is "ambiguous". None: "no_face" where the image is
    crop-like (the mean-landmark fallback fits it), "no_face_photo" elsewhere.
    """
    settings = settings or FaceSettings()
    if not faces:
        return -1, "no_face" if is_crop_like(faces, image_shape, settings) else "no_face_photo"
    if len(faces) == 1:
        small = faces[0].size < SMALL_FACE_FRACTION * min(image_shape[:2])
        return 0, "small_face" if small else "ok"
    if is_crop_like(faces, image_shape, settings):
        return choose_face(faces, image_shape), "subject"
    scores = subject_scores(faces, image_shape)
    order = np.argsort(-scores)
    best, second = int(order[0]), int(order[1])
    return best, "subject" if scores[best] >= SUBJECT_MARGIN * scores[second] else "ambiguous"


def min_subject_size(image_shape: tuple[int, ...], settings: FaceSettings) -> float:
    """The smallest face counted in a person's folder, in pixels: ``min_face_fraction`` of a photo's shorter side
    (``crop_min_face_fraction`` in a crop-shaped image, where a small face is not the subject), and at least
    ``min_face_size``."""
    fraction = settings.crop_min_face_fraction if is_crop_shaped(image_shape, settings) else settings.min_face_fraction
    return max(float(settings.min_face_size), fraction * min(image_shape[:2]))


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation mapping ``src`` onto ``dst`` (Umeyama), as 2x3."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(d) @ sign) / src_c.var(0).sum()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def face_template(settings: FaceSettings) -> np.ndarray:
    template = np.asarray(settings.template, dtype=np.float64) * (settings.aligned_size / 150.0)
    centre = settings.aligned_size / 2.0
    return (template - centre) * settings.template_scale + centre + np.asarray(settings.template_shift)


def align_face(image: np.ndarray, landmarks: np.ndarray, settings: FaceSettings | None = None) -> np.ndarray:
    """The aligned RGB face chip (dlib's get_face_chip framing at the default settings)."""
    settings = settings or FaceSettings()
    matrix = similarity_transform(landmarks, face_template(settings))
    size = settings.aligned_size
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def box_crop(image: np.ndarray, box: np.ndarray, size: int = 100) -> np.ndarray:
    """The brief's input: the detector box cut out (zero-padded past the edges), grayscale, size x size."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
    crop = np.zeros((y2 - y1, x2 - x1, 3), dtype=np.uint8)
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if sx2 > sx1 and sy2 > sy1:
        crop[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = image[sy1:sy2, sx1:sx2]
    gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)


def fallback_landmarks(image_shape: tuple[int, ...], settings: FaceSettings | None = None) -> np.ndarray:
    """Where a portrait's landmarks usually are, for aligning an image in which no face was detected."""
    settings = settings or FaceSettings()
    h, w = image_shape[:2]
    return np.asarray(settings.fallback_landmarks, dtype=np.float32) * np.array([w, h], dtype=np.float32)


def landmarks_box(landmarks: np.ndarray) -> np.ndarray:
    """A face box implied by 5 landmarks (for crops of fallback-aligned images)."""
    centre = landmarks.mean(0)
    eye_mouth = np.linalg.norm((landmarks[3] + landmarks[4]) / 2 - (landmarks[0] + landmarks[1]) / 2)
    half = 1.1 * eye_mouth
    return np.array(
        [centre[0] - half, centre[1] - 1.2 * half, centre[0] + half, centre[1] + 0.9 * half], dtype=np.float32
    )


# A chip is cut from an image in which the face is at least this many pixels wide (about its size in the chip):
# large photos are decoded at reduced scale only as far as that allows.
ALIGN_FACE_PX = 100


def to_full_face(face: Detection, view) -> Detection:
    """A face found in ``view.pixels`` (an ``images.Decoded``) in full-resolution coordinates."""
    corners = view.to_full(face.box.reshape(2, 2)).reshape(4)
    return Detection(corners.astype(np.float32), face.confidence, view.to_full(face.landmarks))


def crop_scale_ok(view, face_sizes: list[float]) -> bool:
    """Whether ``view`` is fine enough to cut chips of faces of these full-resolution sizes."""
    sx = min(view.scale)
    return sx >= 0.999 or all(size * sx >= ALIGN_FACE_PX for size in face_sizes)


def face_crops(view, landmarks: np.ndarray, box: np.ndarray, settings: FaceSettings) -> tuple[np.ndarray, np.ndarray]:
    """(aligned chip, box crop) of one face given in full-resolution coordinates, cut from ``view``."""
    aligned = align_face(view.pixels, view.from_full(landmarks), settings)
    crop = box_crop(view.pixels, view.from_full(np.asarray(box).reshape(2, 2)).reshape(4), settings.box_size)
    return aligned, crop


def face_window(face: Detection, settings: FaceSettings) -> tuple[float, float, float, float]:
    """The part of the photo (x1, y1, x2, y2 in full-resolution pixels) that ``face_crops`` cuts a face's aligned
    chip and box crop from."""
    size = settings.aligned_size
    inverse = cv2.invertAffineTransform(similarity_transform(face.landmarks, face_template(settings)))
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ inverse.T
    points = np.concatenate([corners, np.asarray(face.box, np.float64).reshape(2, 2)])
    (x1, y1), (x2, y2) = points.min(0), points.max(0)
    return float(x1), float(y1), float(x2), float(y2)


def refine_view(source, view, faces: list[Detection], settings: FaceSettings):
    """``view`` where it is fine enough to cut the chips and box crops of these faces (full-resolution
    ``Detection``s; see ``crop_scale_ok``), else ``view`` again, decoded from ``source`` (a path or bytes) fine
    enough. A JPEG is decoded only round them (``images.decode_windows``): its pixels elsewhere are black, so
    only these faces' crops are cut from it."""
    from pinsface.images import decode_windows, load_scaled, read_bytes, reduction_for

    if isinstance(source, np.ndarray) or not faces or crop_scale_ok(view, [face.size for face in faces]):
        return view
    fine = reduction_for(min(face.size for face in faces), ALIGN_FACE_PX)
    data = bytes(source) if isinstance(source, (bytes, bytearray)) else read_bytes(source)
    windows = [face_window(face, settings) for face in faces]
    if np.isfinite(windows).all():  # degenerate landmarks have no window: the whole photo is decoded
        decoded = decode_windows(data, windows, fine, settings.max_pixels)
        if decoded is not None:
            return decoded
    short = min(view.full_size)
    return load_scaled(data, settings.max_pixels, -(-short // fine) if fine > 1 else None)
