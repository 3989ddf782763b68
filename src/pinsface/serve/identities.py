"""The people a run knows: list them, enrol one from photos, forget one (``/v1/identities``). Enrolling and
forgetting save the run folder before they answer; the recogniser swaps its state in one step
(``Recognizer.enroll`` and ``Recognizer.forget``), and the faces of an enrolment are found on the inference
thread, between naming batches."""

# FastAPI reads the endpoints' annotations (strings, with the __future__ import) from this module's globals.
from __future__ import annotations

import unicodedata

import anyio.from_thread
import numpy as np
from fastapi import APIRouter, Depends, UploadFile
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from pinsface.images import BadImage, load_scaled
from pinsface.runfolder import RunBusy
from pinsface.serve.batcher import QueueFull
from pinsface.serve.errors import ApiError, queue_full, retry_later
from pinsface.serve.state import ServerState, server_state
from pinsface.serve.uploads import FILES, pixel_budget, read_uploads, sniff
from pinsface.settings import DECODE_MIN_SIDE

router = APIRouter(tags=["identities"])


@router.get("/v1/identities")
async def identities(state: ServerState = Depends(server_state)):
    """Every identity the run knows: face count, and whether it was enrolled after training."""
    people = state.identities
    return {"count": len(people), "identities": people}


@router.post("/v1/identities/{name}/faces")
async def enroll(
    name: str = PathParam(..., description="the person's name"),
    files: list[UploadFile] = FILES,
    state: ServerState = Depends(server_state),
):
    """Enrol a person from photos (the largest face of each), or add photos to one already known.
    Saved in the run folder before the response is sent."""
    name = clean_name(name)
    async with read_uploads(state, files) as uploads:
        await run_in_threadpool(_check_photos, state, uploads)
        try:
            return await run_in_threadpool(_enroll_and_save, state, name, [data for _, data in uploads])
        except QueueFull as exc:
            raise queue_full(exc, state.settings.retry_after_s) from exc


@router.delete("/v1/identities/{name}")
async def forget(
    name: str = PathParam(..., description="the person's name"), state: ServerState = Depends(server_state)
):
    """Forget a person: their faces leave the gallery and their column the head. Saved before the response.
    With a library (``serve --db``), they leave it too (``people.Library.forget_everywhere``)."""
    name = clean_name(name)
    if state.library is not None:
        return await run_in_threadpool(state.library.forget_everywhere, name, lambda: _forget_and_save(state, name))
    return await run_in_threadpool(_forget_and_save, state, name)


def clean_name(name: str) -> str:
    """An identity name from a URL: trimmed and NFC, then checked by the one name rule
    (``pinsface.dataset.name_problem``)."""
    from pinsface.dataset import name_problem

    name = unicodedata.normalize("NFC", name).strip()
    problem = name_problem(name)
    if problem:
        raise ApiError(422, "invalid_name", problem)
    return name


def _run_busy(state: ServerState, exc: RunBusy) -> ApiError:
    """Another process (a CLI enrolment, another server) is writing the run folder."""
    return retry_later("run_busy", str(exc), state.settings.retry_after_s)


def _check_photos(state: ServerState, uploads: list[tuple[str, bytes]]) -> None:
    """Every photo must decode, or the enrolment is refused before any work; decoded as the recogniser decodes
    it (a large photo at reduced scale), which then decodes the bytes again."""
    max_pixels = state.settings.max_pixels
    pixels = []
    for file_name, data in uploads:
        try:
            pixels.append(sniff(data, max_pixels))
        except BadImage as exc:
            raise ApiError(422, "bad_image", f"{file_name}: {exc}", reason=exc.reason, file=file_name) from exc
    pixel_budget(state.settings, pixels)
    for file_name, data in uploads:
        try:
            load_scaled(data, max_pixels, DECODE_MIN_SIDE)
        except BadImage as exc:
            raise ApiError(422, "bad_image", f"{file_name}: {exc}", reason=exc.reason, file=file_name) from exc


def _enroll_and_save(state: ServerState, name: str, photos: list[bytes]) -> dict:
    """Run in a thread of the pool: the enrolment's summary, with how the person's faces cluster."""
    recognizer, worker = state.recognizer, state.worker

    def find_faces(images):
        # Detection and embedding run on the detection thread, between detection batches and beside naming;
        # the rest of the enrolment (imprinting and saving) runs here while naming goes on.
        return anyio.from_thread.run(worker.run, lambda rec: rec.faces_for_enrolment(images), False)

    try:
        summary = recognizer.enroll(name, photos, find_faces=find_faces)
    except ValueError as exc:
        raise ApiError(422, "no_face", str(exc)) from exc
    except RunBusy as exc:
        raise _run_busy(state, exc) from exc
    finally:
        state.snapshot(recognizer)
    summary.pop("skipped", None)
    summary["cluster"] = cluster_summary(recognizer, summary["identity"], summary["faces_used"])
    summary["faces"] = len(summary["cluster"]["faces"])
    return summary


def _forget_and_save(state: ServerState, name: str) -> dict:
    recognizer = state.recognizer
    if recognizer.gallery.find(name) < 0:
        raise ApiError(404, "unknown_identity", f"{name!r} is not known to this run")
    if len(recognizer.labels) <= 2:
        raise ApiError(409, "too_few_identities", "a run must keep at least two identities")
    try:
        return recognizer.forget(name)
    except RunBusy as exc:
        raise _run_busy(state, exc) from exc
    except ValueError as exc:  # forgotten meanwhile by another request
        raise ApiError(404, "unknown_identity", str(exc)) from exc
    finally:
        state.snapshot(recognizer)


def cluster_summary(recognizer, name: str, n_new: int) -> dict:
    """How one identity's faces lie: each face's distance to the identity's mean face and a 2-D projection
    (PCA) of its faces with the nearest other identities' mean faces; the last ``n_new`` training faces are new."""
    from pinsface.face_index import face_vectors

    g = recognizer.gallery
    index = g.find(name)
    if index < 0:  # nothing was added (every photo was enrolled before, under another name)
        return {"faces": [], "neighbours": [], "threshold_distance": round(float(g.threshold_distance), 4)}
    train = face_vectors(g.embeddings, g.flips)[g.owner == index]
    val = face_vectors(g.val_embeddings, g.val_flips)[g.val_owner == index]
    mine = np.concatenate([train, val]).astype(np.float64)
    new = np.zeros(len(mine), bool)
    new[max(0, len(train) - n_new) : len(train)] = True
    centre = mine.mean(0)
    spread = np.linalg.norm(mine - centre, axis=1)
    others = [k for k in range(len(g.labels)) if k != index]
    gaps = np.linalg.norm(g.centroids[others] - centre, axis=1) if others else np.zeros(0)
    nearest = [others[k] for k in np.argsort(gaps)[:3]]
    xy = _plane(np.concatenate([mine, g.centroids[nearest]]) if nearest else mine)

    def r(v) -> float:
        return round(float(v), 4)

    return {
        "faces": [
            {"x": r(x), "y": r(y), "new": bool(n), "distance_to_mean": r(d)}
            for (x, y), n, d in zip(xy[: len(mine)], new, spread)
        ],
        "neighbours": [
            {"name": g.labels[k], "x": r(x), "y": r(y), "distance_to_mean": r(gaps[others.index(k)])}
            for k, (x, y) in zip(nearest, xy[len(mine) :])
        ],
        "threshold_distance": r(g.threshold_distance),
    }


def _plane(points: np.ndarray) -> np.ndarray:
    """``points`` projected on their first two principal axes (zeros where there are fewer)."""
    centred = points - points.mean(0)
    if len(points) < 2:
        return np.zeros((len(points), 2))
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    return xy
