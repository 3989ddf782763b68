"""The People view's API (``pinsface serve RUN --db DB``): a photo library's clusters and people with face
thumbnails; name a cluster (enrolling its faces into the served run), merge two, move or unassign one face; the
photos of a person.

``router`` holds the endpoints under ``/v1/library``, included by ``create_app`` with a library; ``Library``
(``ServerState.library``) holds the database (a few connections, each used by one request at a time) and the
thumbnails made so far. Thumbnails are addressed by face or photo id: the path read is always the database's,
never the client's. Who needs the key is ``auth.needs_key``'s rule, as for every endpoint.
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
from collections import Counter, OrderedDict

# FastAPI reads the endpoints' annotations (strings, with the __future__ import) from this module's globals.
from fastapi import APIRouter, Depends, Query, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from pinsface.serve.errors import ApiError, retry_later
from pinsface.serve.identities import clean_name
from pinsface.serve.state import ServerState, server_state

POOL_SIZE = 4  # connections kept open; more requests at once open (and close) their own
THUMB_CACHE_BYTES = 64 * 2**20  # thumbnails kept in memory, least recently used dropped first
PHOTO_SIDE = 640  # a photo's thumbnail, longest side in pixels
MAX_ID = 2**62
MAX_GROUPS = 200  # groups (people and clusters) per page
MAX_PER_GROUP = 48  # face ids listed per group
MAX_PHOTOS = 200  # photos per search
ENROL_MAX_FACES = 200  # faces of a named cluster enrolled into the run at once (the best detections)
FACE_ID = PathParam(..., ge=1, le=MAX_ID, description="a face's id")
CLUSTER_ID = PathParam(..., ge=1, le=MAX_ID, description="a cluster's id")
PHOTO_ID = PathParam(..., ge=1, le=MAX_ID, description="a photo's id")
CACHE_HEADERS = {"Cache-Control": "private, max-age=3600"}


class NameBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., max_length=1000, description="the person's name")


class MergeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    other: int = Field(..., ge=1, le=MAX_ID, description="the cluster whose faces move into this one")


class MoveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=1000, description="the person it goes to; none: a new cluster")


class Library:
    """The library database of a server: a small pool of connections and a cache of thumbnails. Opening it
    checks the database (a bad path or a newer schema stops the server before it serves)."""

    def __init__(self, url):
        from pinsface.library_db import LibraryDB

        self.url = str(url)
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._idle.put(LibraryDB.open(self.url))
        self._thumbs: OrderedDict = OrderedDict()
        self._thumb_bytes = 0
        self._thumb_lock = threading.Lock()

    @contextlib.contextmanager
    def connection(self):
        """A connection for this thread alone until the ``with`` ends; one that failed is closed, not reused."""
        from pinsface.library_db import LibraryDB

        try:
            db = self._idle.get_nowait()
        except queue.Empty:
            db = LibraryDB.open(self.url)
        try:
            yield db
        except (ValueError, ApiError):  # "no such cluster" and the like: the connection is fine
            self._give_back(db)
            raise
        except BaseException:
            db.close()
            raise
        self._give_back(db)

    def _give_back(self, db) -> None:
        if self._idle.qsize() < POOL_SIZE:
            self._idle.put(db)
        else:
            db.close()

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    def thumbnail(self, key: tuple, make) -> bytes | None:
        """The cached thumbnail ``key``, made by ``make()`` (None: the photo cannot be read) when missing."""
        with self._thumb_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        data = make()
        if data is None:
            return None
        with self._thumb_lock:
            if key not in self._thumbs:
                self._thumbs[key] = data
                self._thumb_bytes += len(data)
            while self._thumb_bytes > THUMB_CACHE_BYTES:
                _, dropped = self._thumbs.popitem(last=False)
                self._thumb_bytes -= len(dropped)
        return data

    def forget(self, names: list[str]) -> int | None:
        """Erase the people called ``names`` from the library (``LibraryDB.forget_person``): faces erased, or
        None when none of them is in it."""
        erased = None
        with self.connection() as db:
            for name in dict.fromkeys(names):
                if db.person_id(name, create=False) is not None:
                    erased = (erased or 0) + db.forget_person(name)
        return erased

    def forget_everywhere(self, name: str, forget_run) -> dict:
        """``DELETE /v1/identities/{name}``: ``forget_run()`` forgets the person in the run, and they are erased
        from the library too (their descriptors and names), also when only the library knows them."""
        try:
            summary = forget_run()
        except ApiError as exc:
            if exc.code != "unknown_identity":
                raise
            erased = self.forget([name])
            if erased is None:
                message = f"{name!r} is known neither to this run nor to the library"
                raise ApiError(404, "unknown_identity", message) from exc
            return {"identity": name, "in_run": False, "library_faces_erased": erased}
        summary["library_faces_erased"] = self.forget([name, summary.get("identity", name)]) or 0
        return summary


def _face_jpeg(library: Library, face_id: int) -> bytes:
    from pinsface.library_sheet import thumbnail_jpeg

    with library.connection() as db:
        face = _live_face(db, face_id)
    data = library.thumbnail(("face", face_id), lambda: thumbnail_jpeg(face["source"], face["box"]))
    if data is None:
        raise ApiError(404, "photo_unreadable", f"the photo of face {face_id} can no longer be read")
    return data


def _photo_jpeg(library: Library, photo_id: int) -> bytes:
    with library.connection() as db:
        photo = db.photo(photo_id)
    if photo is None:
        raise ApiError(404, "unknown_photo", f"no photo {photo_id} in the library")
    data = library.thumbnail(("photo", photo_id, photo["hash"]), lambda: _scaled_photo(photo["source"]))
    if data is None:
        raise ApiError(404, "photo_unreadable", f"photo {photo_id} can no longer be read")
    return data


def _scaled_photo(source: str) -> bytes | None:
    """The whole photo, at most ``PHOTO_SIDE`` pixels on its longest side, as JPEG; None if it cannot be read."""
    from PIL import Image

    from pinsface.images import BadImage, load_scaled
    from pinsface.library_sheet import THUMB_MAX_PIXELS

    try:
        view = load_scaled(source, THUMB_MAX_PIXELS, PHOTO_SIDE)
    except BadImage:
        return None
    image = Image.fromarray(view.pixels)
    image.thumbnail((PHOTO_SIDE, PHOTO_SIDE))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _kind(members: list[dict]) -> str:
    """A group of ``library_sheet.groups``: a named "person", an unnamed "cluster", or the "unclustered" faces."""
    first = members[0]
    return "person" if first["person"] else "cluster" if first["cluster"] is not None else "unclustered"


def _groups(library: Library, limit: int, offset: int, per_group: int) -> dict:
    """The People view's list: named people, then unnamed clusters (largest first), then the faces in none."""
    from pinsface.library_sheet import groups

    with library.connection() as db:
        faces = db.face_groups()
    grouped = groups(faces)  # the contact sheet's grouping: one rule for both
    out = []
    for _, members in grouped[offset : offset + limit]:
        first = members[0]
        clusters = [c for c, _ in Counter(f["cluster"] for f in members if f["cluster"] is not None).most_common()]
        out.append(
            {
                "kind": _kind(members),
                "name": first["person"],
                "cluster": clusters[0] if clusters else None,
                "clusters": clusters,
                "faces": len(members),
                "face_ids": [f["id"] for f in members[:per_group]],
            }
        )
    kinds = Counter(_kind(fs) for _, fs in grouped)
    return {
        "faces": len(faces),
        "people": kinds["person"],
        "clusters": kinds["cluster"],
        "total_groups": len(grouped),
        "groups": out,
    }


def _unknown(exc: ValueError, code: str) -> ApiError:
    return ApiError(404, code, str(exc))


def _live_face(db, face_id: int) -> dict:
    found = db.face_list([face_id])
    if not found:
        raise ApiError(404, "unknown_face", f"no face {face_id} in the library")
    return found[0]


router = APIRouter(prefix="/v1/library", tags=["library"])


def _library(state: ServerState) -> Library:
    return state.library


@router.get("/people")
def people(
    limit: int = Query(50, ge=1, le=MAX_GROUPS, description="groups per page"),
    offset: int = Query(0, ge=0, le=MAX_ID, description="groups skipped"),
    per_group: int = Query(12, ge=0, le=MAX_PER_GROUP, description="face ids listed per group"),
    state: ServerState = Depends(server_state),
):
    """Named people, then clusters without a name (largest first), then the faces in no cluster: each with its
    face count, clusters and the ids of its first faces (thumbnails at ``faces/{id}/thumbnail``)."""
    return _groups(_library(state), limit, offset, per_group)


@router.get("/faces/{face_id}/thumbnail", response_class=Response)
def face_thumbnail(face_id: int = FACE_ID, state: ServerState = Depends(server_state)):
    """The face with a margin, a square JPEG cut from its photo on the server."""
    return Response(_face_jpeg(_library(state), face_id), media_type="image/jpeg", headers=CACHE_HEADERS)


@router.get("/photos/{photo_id}/thumbnail", response_class=Response)
def photo_thumbnail(photo_id: int = PHOTO_ID, state: ServerState = Depends(server_state)):
    """The whole photo, scaled down (JPEG); boxes from ``/photos`` are in the photo's full-size pixels."""
    return Response(_photo_jpeg(_library(state), photo_id), media_type="image/jpeg", headers=CACHE_HEADERS)


@router.get("/photos")
def photos(
    name: str = Query(..., max_length=1000, description="the person"),
    with_: list[str] = Query([], alias="with", max_length=8, description="other people in the photo too"),
    limit: int = Query(100, ge=1, le=MAX_PHOTOS),
    state: ServerState = Depends(server_state),
):
    """The photos holding that person (and every ``with`` person), as ``pinsface find``: the photo's id, path,
    size and the boxes (x1, y1, x2, y2) of those people's faces."""
    names = [clean_name(n) for n in [name, *with_]]
    with _library(state).connection() as db:
        found = db.find_photos(names)
    for p in found:
        p["size"] = list(p["size"])
    return {"count": len(found), "photos": found[:limit]}


@router.post("/clusters/{cluster_id}/name")
async def name_cluster(body: NameBody, cluster_id: int = CLUSTER_ID, state: ServerState = Depends(server_state)):
    """Name a cluster (clusters given one name are that person's together); its faces are enrolled into the
    served run, as ``pinsface name --run`` does."""
    from starlette.concurrency import run_in_threadpool

    name = clean_name(body.name)

    def store():
        with _library(state).connection() as db:
            try:
                db.name_cluster(cluster_id, name)
            except ValueError as exc:
                raise _unknown(exc, "unknown_cluster") from exc
            return db.face_list(cluster=cluster_id)

    faces = await run_in_threadpool(store)
    enrolled = await _enrol(state, name, faces) if faces else None
    return {"cluster": cluster_id, "name": name, "faces": len(faces), "enrolled": enrolled}


@router.post("/clusters/{cluster_id}/merge")
def merge(body: MergeBody, cluster_id: int = CLUSTER_ID, state: ServerState = Depends(server_state)):
    """Move every face of cluster ``other`` into this one, which keeps its name (or takes the other's)."""
    if body.other == cluster_id:
        raise ApiError(422, "same_cluster", "a cluster cannot be merged into itself")
    with _library(state).connection() as db:
        try:
            db.merge_clusters(cluster_id, body.other)
        except ValueError as exc:
            raise _unknown(exc, "unknown_cluster") from exc
    return {"cluster": cluster_id, "merged": body.other}


@router.post("/faces/{face_id}/move")
def move(body: MoveBody, face_id: int = FACE_ID, state: ServerState = Depends(server_state)):
    """Take one face out of its cluster into a new cluster of its own, given to the person ``name`` when there
    is one; clustering never moves it again."""
    name = clean_name(body.name) if body.name is not None else None
    with _library(state).connection() as db:
        _live_face(db, face_id)
        cluster = db.split_face(face_id, name)
    return {"face": face_id, "cluster": cluster, "name": name}


@router.post("/faces/{face_id}/unassign")
def unassign(face_id: int = FACE_ID, state: ServerState = Depends(server_state)):
    """Take one face out of its cluster and name; clustering leaves it alone from then on."""
    with _library(state).connection() as db:
        _live_face(db, face_id)
        db.unassign(face_id)
    return {"face": face_id, "cluster": None, "name": None}


async def _enrol(state: ServerState, name: str, faces: list[dict]) -> dict:
    """Enrol a named cluster's faces into the served run: cut again from their photos here, embedded and
    enrolled on the worker's thread beside naming (which then sees the new person)."""
    from starlette.concurrency import run_in_threadpool

    from pinsface.library_export import enrol_chips, face_chips
    from pinsface.runfolder import RunBusy
    from pinsface.serve.batcher import QueueFull

    worker = state.worker
    settings = state.recognizer.face_settings
    chips, hashes, skipped = await run_in_threadpool(face_chips, faces, settings, ENROL_MAX_FACES)
    if not chips:
        return {"identity": name, "faces_used": 0, "already_enrolled": 0, "skipped": skipped}
    try:
        summary = await worker.run(lambda rec: enrol_chips(rec, name, chips, hashes), False)
    except (QueueFull, RunBusy) as exc:
        message = f"the cluster is named, but its faces could not be enrolled now ({exc}): name it again later"
        raise retry_later("busy", message, state.settings.retry_after_s) from exc
    keep = ("identity", "new_identity", "faces_used", "already_enrolled", "identities", "warnings")
    return {
        **{k: summary[k] for k in keep if k in summary},
        "skipped": skipped,
        "left_out": max(0, len(faces) - ENROL_MAX_FACES),
    }
