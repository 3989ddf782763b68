"""One image's record for the face cache: decode (bounded, at reduced scale), detect, choose the subject, align
and crop. ``prepare`` runs this per batch on this machine, ``pinsface.ray_engine`` on a Ray cluster's workers,
so both engines give the same faces."""

from __future__ import annotations

import itertools
from collections import deque
from pathlib import Path

import numpy as np

from pinsface.faces import (
    choose_subject,
    face_crops,
    fallback_landmarks,
    is_crop_like,
    landmarks_box,
    min_subject_size,
    refine_view,
    subject_scores,
)
from pinsface.finding import locate_faces
from pinsface.images import BadImage, decode_scaled, read_bytes
from pinsface.settings import DECODE_MIN_SIDE, FaceSettings


def face_record(
    image: np.ndarray,
    faces,
    settings: FaceSettings,
    digest: str,
    view=None,
    *,
    chosen: int | None = None,
    status: str | None = None,
) -> dict:
    """What the cache keeps for one image: every detection, the chosen face and its two crops.

    ``faces`` are in full-resolution coordinates; the crops are cut from ``view`` (an ``images.Decoded``, which
    must be fine enough for the chosen face) or, without one, from ``image``."""
    from pinsface.images import Decoded

    view = view if view is not None else Decoded(image, image.shape[:2])
    shape = tuple(view.full_size)
    if chosen is None:
        chosen, status = choose_subject(faces, shape, settings)
    if chosen >= 0:
        landmarks, box, fallback = faces[chosen].landmarks, faces[chosen].box, False
    else:
        landmarks = fallback_landmarks(shape, settings)
        box, fallback = landmarks_box(landmarks), True
    aligned, crop = face_crops(view, landmarks, box, settings)
    return {
        "hash": digest,
        "status": status,
        "n_faces": len(faces),
        "chosen": chosen,
        "boxes": np.array([f.box for f in faces], dtype=np.float32).reshape(-1, 4),
        "scores": np.array([f.confidence for f in faces], dtype=np.float32),
        "landmarks": np.array([f.landmarks for f in faces], dtype=np.float32).reshape(-1, 5, 2),
        "image_shape": np.array(shape, dtype=np.int32),
        "fallback": fallback,
        "aligned": aligned,
        "box": crop,
    }


# Decoded pixels held at once for one detector batch (bytes of RGB): a batch of large photos is split to fit.
BATCH_BYTES = 100_000_000
# Photos are scanned coarse to fine (FaceDetector.detect's coarse_sizes): first for faces from this fraction of
# the shorter side.
COARSE_FACE_FRACTION = 0.05
# Files decoded ahead of the detector (each at most a few tens of MB once decoded at reduced scale).
DECODE_AHEAD = 16
# Candidate faces per multi-face photo kept for the second pass.
MAX_CANDIDATES = 4


def decode_file(path: Path, settings: FaceSettings):
    """(Decoded, file bytes) or a BadImage, for one file; never raises otherwise."""
    try:
        data = read_bytes(path)
        return decode_scaled(data, settings.max_pixels, DECODE_MIN_SIDE), data
    except BadImage as exc:
        return exc
    except Exception as exc:  # noqa: BLE001  (a decoder bug on one file must not stop the run)
        return BadImage("unreadable", f"{type(exc).__name__}: {exc}")


def decoded_batches(pool, paths: list[tuple[int, Path]], batch_size: int, settings: FaceSettings):
    """Decode files on ``pool``, yielding batches of at most ``batch_size`` images and ``BATCH_BYTES``.

    Up to ``DECODE_AHEAD`` files are decoded ahead of the caller, so the next batch is being decoded (the
    decoders release the GIL) while the detector works on this one: the two cores both work."""
    pending: deque = deque()
    todo = iter(paths)

    def refill() -> None:
        for i, path in itertools.islice(todo, DECODE_AHEAD - len(pending)):
            pending.append((i, pool.submit(decode_file, path, settings)))

    batch, held = [], 0
    refill()
    while pending:
        i, future = pending.popleft()
        result = future.result()
        refill()
        batch.append((i, result))
        if not isinstance(result, BadImage):
            held += result[0].pixels.nbytes + len(result[1])
        if len(batch) >= batch_size or held >= BATCH_BYTES:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def is_held(faces, status: str, shape: tuple[int, ...], settings: FaceSettings) -> bool:
    """Whether an image's subject is left to the second pass: a photo (not a crop) with several faces."""
    multi = status in ("subject", "ambiguous") and not is_crop_like(faces, shape, settings)
    return multi and settings.subject_pass_min_photos > 0


def candidate_order(faces, shape: tuple[int, ...]) -> list[int]:
    """The faces the second pass chooses among: the ``MAX_CANDIDATES`` likeliest subjects."""
    return [int(k) for k in np.argsort(-subject_scores(faces, shape))[:MAX_CANDIDATES]]


def record_faces(record: dict) -> list:
    """The ``Detection``s of a face record (full-resolution coordinates)."""
    from pinsface.faces import Detection

    return [
        Detection(box, float(score), landmarks)
        for box, score, landmarks in zip(record["boxes"], record["scores"], record["landmarks"])
    ]


def with_candidates(record: dict, path: Path, settings: FaceSettings) -> dict:
    """``record`` (a held photo's, made elsewhere: a Ray worker's) with its candidates' crops cut again from
    the file, for the second pass. Raises ``BadImage`` if the file can no longer be read."""
    faces = record_faces(record)
    order = candidate_order(faces, tuple(int(v) for v in record["image_shape"]))
    return {**record, "candidates": crops_again(faces, order, path, settings)}


def crops_again(faces: list, order: list[int], path: Path, settings: FaceSettings) -> dict:
    """{k: (aligned chip, box crop)} of faces ``order`` (full-resolution ``Detection``s found before) cut again from
    the file, decoded as the detector's pass decodes it. Raises ``BadImage`` if it can no longer be read."""
    decoded = decode_file(path, settings)
    if isinstance(decoded, BadImage):
        raise decoded
    view, data = decoded
    view = refine_view(data, view, [faces[k] for k in order], settings)
    return {k: face_crops(view, faces[k].landmarks, faces[k].box, settings) for k in order}


def image_records(detector, batch, hashes, settings: FaceSettings, held: dict) -> tuple[list[dict], list]:
    """Detect faces in one decoded batch and make each image's record. Returns (records, [(i, BadImage)]).

    Photos with several faces whose subject a second pass may settle are put in ``held`` (hash -> record
    with each candidate's crops) instead of being returned. With ``settings.every_face`` every photo is scanned
    down to its smallest face, none is held, and each record has the aligned chip of every face (``chips``)."""
    good = [(i, view, data) for i, (view, data) in ((i, r) for i, r in batch if not isinstance(r, BadImage))]
    errors = [(i, r) for i, r in batch if isinstance(r, BadImage)]
    views = [view for _, view, _ in good]
    min_sizes = [min_subject_size(view.full_size, settings) * min(view.scale) for view in views]
    # Coarse to fine: a photo is scanned down to the smallest size only when the coarse scan found no face large
    # enough that any face it could miss is too small to be the subject.
    coarse = [max(m, COARSE_FACE_FRACTION * min(view.pixels.shape[:2])) for m, view in zip(min_sizes, views)]
    if settings.every_face:
        coarse = min_sizes
    found = locate_faces(detector, views, min_sizes, settings, coarse_sizes=coarse)
    records = []
    for (i, view, data), faces in zip(good, found):
        if isinstance(faces, Exception):
            errors.append((i, BadImage("detector_error", f"{type(faces).__name__}: {faces}")))
            continue
        try:
            chosen, status = choose_subject(faces, view.full_size, settings)
            wanted = [faces[chosen]] if chosen >= 0 else []
            multi = is_held(faces, status, view.full_size, settings) and not settings.every_face
            order = candidate_order(faces, view.full_size) if multi else []
            if multi or settings.every_face:
                wanted = [faces[k] for k in (order if multi else range(len(faces)))]
            view = refine_view(data, view, wanted, settings)
            record = face_record(view.pixels, faces, settings, hashes[i], view, chosen=chosen, status=status)
            if settings.every_face:
                record["chips"] = [face_crops(view, f.landmarks, f.box, settings)[0] for f in faces]
            if multi:
                record["candidates"] = {
                    int(k): face_crops(view, faces[k].landmarks, faces[k].box, settings) for k in order
                }
                held[hashes[i]] = (i, record)
            else:
                records.append(record)
        except BadImage as exc:
            errors.append((i, exc))
        except Exception as exc:  # noqa: BLE001  (an OpenCV error on one image must not stop the run)
            errors.append((i, BadImage("detector_error", f"{type(exc).__name__}: {exc}")))
    return records, errors
