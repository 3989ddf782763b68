"""The REST API and web page over a trained run: ``create_app(run_dir, ServeSettings(...))`` wires the parts
together, and ``serve`` runs it with uvicorn.

One photo's path from upload to name (``POST /v1/identify``):

1. ``guard.py`` admits the request from its headers (host, size, API key) and times its body;
2. ``identify.py``, the router, reads the uploads and checks each photo's header (``uploads.py``);
3. ``batcher.py`` gathers the photos of concurrent requests into shared batches on the inference threads;
4. ``pinsface.predict.Recognizer`` finds, embeds and names their faces (``detect_batch``, ``name_batch``).

The other parts: ``state.py`` (the settings, metrics and state the routers share), ``errors.py`` (every error
as JSON), ``auth.py`` (the key, and the hosts answered), ``limits.py`` (connection caps and timeouts), and
one router per area besides identify: ``identities.py`` (list, enrol, forget), ``health.py`` (health and
metrics) and ``page.py`` (the web page and ``/docs``).
"""

from __future__ import annotations

import gc
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI

from pinsface.serve.auth import default_key_file, load_or_create_key, server_key
from pinsface.serve.errors import add_error_handlers
from pinsface.serve.guard import Guard, describe_key
from pinsface.serve.health import router as health_router
from pinsface.serve.identify import router as identify_router
from pinsface.serve.identities import router as identities_router
from pinsface.serve.page import mount_assets
from pinsface.serve.page import router as page_router
from pinsface.serve.state import ServerState, ServeSettings
from pinsface.serve.uploads import sniff

log = logging.getLogger(__name__)

# The app's routes, one router per area; who needs the key for which is auth.needs_key.
ROUTERS = (page_router, identify_router, identities_router, health_router)


@asynccontextmanager
async def _lifespan(app):
    worker = app.state.worker
    worker.start()
    # Build the detector and embedder graphs now, so the first request does not pay for them.
    await worker.run(lambda rec: rec.identify_many([np.zeros((64, 64, 3), np.uint8)]))
    # TensorFlow and Keras leave a great many long-lived objects, and each full garbage collection walked
    # them all while every thread waited (requests and /v1/health alike). Frozen, they are never scanned
    # again; what requests allocate is collected as before.
    gc.collect()
    gc.freeze()
    if getattr(app.state, "announce", None):
        print(app.state.announce, flush=True)
    yield
    worker.stop()


def create_app(
    run_dir: str | os.PathLike | None = None,
    settings: ServeSettings | None = None,
    recognizer=None,
    api_key: str | None = None,
    db: str | os.PathLike | None = None,
):
    """The FastAPI app for a run folder (or an already loaded ``recognizer``). The key is read from
    ``settings.api_key_file`` (created there when missing; default ``auth.default_key_file()``) unless
    ``api_key`` is given. With ``db`` (a library database), the People view too (``people.py``)."""
    import pinsface
    from pinsface.predict import Recognizer
    from pinsface.serve.people import Library
    from pinsface.serve.people import router as people_router

    settings = settings or ServeSettings()
    library = Library(db) if db is not None else None  # opened first: a bad database stops the server at once
    if recognizer is None:
        if run_dir is None:
            raise ValueError("create_app needs a run folder or a recognizer")
        recognizer = Recognizer.load(run_dir)
    if api_key is None:
        api_key = server_key(settings.api_key_file, Path(recognizer.run_dir))
    state = ServerState.create(recognizer, settings, api_key)
    state.library = library
    app = FastAPI(
        title="pinsface",
        version=pinsface.__version__,
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
        description="Name the faces in photos, enrol and forget people. State-changing endpoints need "
        "the API key in the `X-API-Key` header.",
    )
    app.state.pinsface, app.state.worker = state, state.worker
    add_error_handlers(app, state.metrics.count_error)
    for router in ROUTERS + ((people_router,) if library is not None else ()):
        app.include_router(router)
    mount_assets(app)
    describe_key(app, settings.auth)
    app.add_middleware(Guard, state=state)
    return app


def serve(
    run_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    log_level: str = "info",
    db: str | os.PathLike | None = None,
) -> None:
    """Load the run once and serve it with uvicorn until interrupted; print its URL once it is ready."""
    import dataclasses

    import uvicorn

    from pinsface.serve.auth import exposure_warning
    from pinsface.serve.limits import guarded_protocol

    settings = dataclasses.replace(settings or ServeSettings(), bind_host=host)
    if warning := exposure_warning(host, settings.auth):
        log.warning("%s", warning)
    app = create_app(run_dir, settings, db=db)
    shown = f"[{host}]" if ":" in host else host
    app.state.announce = (
        f"pinsface serve: http://{shown}:{port}/ (the API key is in {settings.api_key_file or default_key_file()})"
    )
    state = app.state.pinsface
    # One process: the recogniser's enrolled state lives in it (more processes would each hold their own).
    # Keep-alive a little longer than uvicorn's 5 s, so busy clients rarely reuse a connection as it closes.
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        workers=1,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=30,
        http=guarded_protocol(state.counts, settings.header_timeout_s),
    )


# load_or_create_key and sniff still import from here, where they were before the split.
__all__ = ["ServeSettings", "create_app", "serve", "load_or_create_key", "sniff"]
