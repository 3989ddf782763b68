"""Uploaded photos, checked before any work is queued: the caps on files, bytes and memory (``read_uploads``),
each photo's format and pixel count read from its header (``sniff``), and the pixels of one request together
(``pixel_budget``)."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import File, UploadFile

from pinsface.images import FORMATS, BadImage, read_header
from pinsface.serve.errors import ApiError, retry_later
from pinsface.serve.state import ServerState, ServeSettings

# The photos of an identify or enrol request.
FILES = File(..., description=f"one or more photos ({', '.join(FORMATS)})")


def sniff(data: bytes, max_pixels: int) -> int:
    """The pixel count of an encoded photo, read from its header only; ``BadImage`` for a non-image, a format
    not in ``images.FORMATS`` or a photo over ``max_pixels`` (see ``images.read_header``)."""
    with read_header(data, max_pixels) as image:
        width, height = image.size
    return width * height


def sniff_all(uploads: list[tuple[str, bytes]], max_pixels: int) -> list[int | BadImage]:
    """Each upload's pixel count, or the ``BadImage`` that says why it is not a photo the server takes."""
    out = []
    for _, data in uploads:
        try:
            out.append(sniff(data, max_pixels))
        except BadImage as exc:
            out.append(exc)
    return out


def pixel_budget(settings: ServeSettings, pixels: list[int]) -> None:
    """One request's photos may not decode to more than ``max_request_pixels`` together (a few huge PNGs within
    every size cap would otherwise hold gigabytes while they are decoded)."""
    if sum(pixels) > settings.max_request_pixels:
        raise ApiError(
            413,
            "too_many_pixels",
            f"the photos hold {sum(pixels) / 1e6:.0f} megapixels together; at most "
            f"{settings.max_request_pixels / 1e6:.0f} per request",
        )


def _upload_size(state: ServerState, files: list[UploadFile]) -> int:
    """The bytes a request's files will hold in memory (their declared sizes, or the cap where none is given);
    413 for a request over the caps on files and bytes."""
    settings = state.settings
    if len(files) > settings.max_files:
        raise ApiError(413, "too_many_files", f"{len(files)} files; at most {settings.max_files} per request")
    if len(files) > settings.max_pending:
        raise ApiError(413, "too_many_files", f"{len(files)} files; the queue holds {settings.max_pending}")
    for f in files:
        if f.size is not None and f.size > state.file_limit:
            raise ApiError(413, "file_too_large", f"{f.filename} is over {settings.max_upload_mb:g} MB")
    size = sum(f.size or state.file_limit for f in files)
    if size > state.held_limit:
        raise ApiError(413, "request_too_large", f"the uploads are over {settings.max_pending_mb:g} MB")
    return size


@asynccontextmanager
async def read_uploads(state: ServerState, files: list[UploadFile]):
    """The uploads as (name, bytes), counted against the memory budget until the request is done."""
    settings = state.settings
    size = _upload_size(state, files)
    if state.bytes_held + size > state.held_limit:
        raise retry_later("busy", "too many uploads are held in memory; retry later", settings.retry_after_s)
    state.bytes_held += size
    try:
        out = []
        for f in files:
            name = (f.filename or "upload")[-200:]
            data = await f.read(state.file_limit + 1)
            if len(data) > state.file_limit:
                raise ApiError(413, "file_too_large", f"{name} is over {settings.max_upload_mb:g} MB")
            out.append((name, data))
        yield out
    finally:
        state.bytes_held -= size
