"""``POST /v1/identify``: name every face in the uploaded photos. The first stop of a photo's path to a name:
its header is checked here (``uploads``), then it waits in the shared batches of ``batcher.InferenceWorker``,
whose threads run ``Recognizer.detect_batch`` and ``Recognizer.name_batch`` (``pinsface.predict``)."""

# FastAPI reads the endpoints' annotations (strings, with the __future__ import) from this module's globals.
from __future__ import annotations

from fastapi import APIRouter, Depends, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from pinsface.images import BadImage
from pinsface.serve.batcher import QueueFull
from pinsface.serve.errors import queue_full
from pinsface.serve.state import Metrics, ServerState, server_state
from pinsface.serve.uploads import FILES, pixel_budget, read_uploads, sniff_all

router = APIRouter(tags=["faces"])


@router.post("/v1/identify")
async def identify(
    files: list[UploadFile] = FILES,
    top_k: int = Query(3, ge=1, le=20, description="alternatives listed per face"),
    threshold: float | None = Query(None, ge=0, le=10, description="distance threshold override"),
    min_probability: float | None = Query(None, ge=0, le=1, description="probability threshold override"),
    state: ServerState = Depends(server_state),
):
    """Every face in each photo, in the record of `pinsface predict --json`. A bad file gets an `error`
    in its record (the response is still 200); a photo without a face gets a `note`."""
    async with read_uploads(state, files) as uploads:
        return await _identify_uploads(state, uploads, top_k, threshold, min_probability)


async def _identify_uploads(
    state: ServerState,
    uploads: list[tuple[str, bytes]],
    top_k: int,
    threshold: float | None,
    min_probability: float | None,
) -> dict:
    """Each upload's ``ImageResult``: the photos that pass their checks are named in shared batches, the others
    get their ``error``."""
    from pinsface.predict import ImageResult

    checked = await run_in_threadpool(sniff_all, uploads, state.settings.max_pixels)
    pixel_budget(state.settings, [c for c in checked if not isinstance(c, BadImage)])
    good = [i for i, c in enumerate(checked) if not isinstance(c, BadImage)]
    results: list = [None] * len(uploads)
    for i, c in enumerate(checked):
        if isinstance(c, BadImage):
            results[i] = ImageResult(uploads[i][0], [], error=c.reason)
    if good:
        try:
            named = await state.worker.identify(
                [uploads[i][1] for i in good], [checked[i] for i in good], top_k, threshold, min_probability
            )
        except QueueFull as exc:
            raise queue_full(exc, state.settings.retry_after_s) from exc
        for i, result in zip(good, named):
            result.source = uploads[i][0]
            results[i] = result
    _count(state.metrics, results)
    return {"results": [r.to_dict() for r in results]}


def _count(metrics: Metrics, results: list) -> None:
    for r in results:
        if r.error:
            metrics.errors.labels(f"image_{r.error}").inc()
        for face in r.faces:
            metrics.faces.labels("named" if face.identity else "unknown").inc()
