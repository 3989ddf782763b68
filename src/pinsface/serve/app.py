"""The REST API and web page over a ``Recognizer``: ``create_app(run_dir, ServeSettings(...))``.

Uploads are checked in the request (size caps, API key, image format and pixel count read from the content's
header) before any work is queued; naming, enrolling and forgetting go through one ``InferenceWorker``.
"""

from __future__ import annotations

import gc
import hmac
import logging
import os
import secrets
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

# FastAPI reads the endpoints' annotations (strings, with the __future__ import) from this module's globals.
from fastapi import FastAPI, File, HTTPException, Query, Security, UploadFile
from fastapi import Path as PathParam

from pinsface.images import FORMATS, BadImage, load_scaled, read_header
from pinsface.run import RunBusy
from pinsface.serve.auth import allowed_hosts, default_key_file
from pinsface.serve.batcher import InferenceWorker, QueueFull
from pinsface.serve.limits import ConnectionCounts
from pinsface.settings import DECODE_MIN_SIDE, SERVE_MAX_PIXELS

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass
class ServeSettings:
    api_key_file: str | None = None  # default: pinsface.serve.auth.default_key_file(), created on first start
    auth: Literal["write", "all"] = "all"  # which endpoints need the key: every one, or ("write", --public-read)
    # the state-changing ones
    max_upload_mb: float = 10.0  # per file
    max_request_mb: float = 50.0  # per request, all files together
    max_files: int = 32  # per request
    max_pixels: int = SERVE_MAX_PIXELS  # per photo, read from its header before it is decoded
    max_request_pixels: int = 100_000_000  # all the photos of one request together; past it 413
    max_pending: int = 256  # images queued or being named; past it requests get 503 + Retry-After
    max_batch: int = 32  # images per shared detector/embedder batch
    max_wait_ms: float = 10.0  # how long a batch waits for more requests
    max_requests: int = 256  # requests in progress (health excepted); past it 503 + Retry-After
    max_pending_mb: float = 1024.0  # uploaded bytes held in memory by requests in progress; past it 503
    retry_after_s: int = 1
    bind_host: str = "127.0.0.1"  # the address served: a Host header may name it (pinsface.serve.auth)
    allowed_hosts: tuple[str, ...] = ()  # more host names a Host header may name
    max_connections_per_client: int = 64  # open connections per client address; past it 429 and closed
    max_connections: int = 1024  # open connections in all
    header_timeout_s: float = 10.0  # a request's headers must all arrive within this
    body_grace_s: float = 10.0  # a request's body may take this long, plus a second per min_body_rate_kb
    min_body_rate_kb: float = 64.0  # KB/s a body must average after the grace
    body_idle_s: float = 10.0  # the longest pause within a body


class ApiError(HTTPException):
    """An error answered as JSON ``{"code", "message"}``. An HTTPException, so FastAPI's body parsing lets it
    through (it turns any other exception there into a 400)."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None, **extra):
        super().__init__(status, message, headers)
        self.status, self.code, self.message, self.headers, self.extra = status, code, message, headers, extra


def load_or_create_key(path: Path) -> str:
    """The API key in ``path``; a new random one, written readable by the owner only, if there is none."""
    path = Path(path)
    try:
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        key = ""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it just now
            return load_or_create_key(path)
        new = secrets.token_urlsafe(32)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new + "\n")
        log.warning("created an API key in %s (readable by its owner only)", path)
        return new
    if len(key) < 16:
        raise ValueError(f"the API key in {path} is shorter than 16 characters")
    return key


def sniff(data: bytes, max_pixels: int) -> int:
    """The pixel count of an encoded photo, read from its header only; ``BadImage`` for a non-image, a format
    not in ``images.FORMATS`` or a photo over ``max_pixels`` (see ``images.read_header``)."""
    with read_header(data, max_pixels) as image:
        width, height = image.size
    return width * height


def clean_name(name: str) -> str:
    """An identity name from a URL: trimmed and NFC, then checked by the one name rule
    (``pinsface.dataset.name_problem``)."""
    from pinsface.dataset import name_problem

    name = unicodedata.normalize("NFC", name).strip()
    problem = name_problem(name)
    if problem:
        raise ApiError(422, "invalid_name", problem)
    return name


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
    points = np.concatenate([mine, g.centroids[nearest]]) if nearest else mine
    centred = points - points.mean(0)
    if len(points) >= 2:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
        if xy.shape[1] < 2:
            xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    else:
        xy = np.zeros((len(points), 2))
    r = lambda v: round(float(v), 4)  # noqa: E731
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


class _Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # the *_created series only add noise here

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pinsface_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "pinsface_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.faces = Counter("pinsface_faces", "faces found, by result", ["result"], registry=self.registry)
        self.errors = Counter(
            "pinsface_errors", "errors, by code (per-file image errors included)", ["code"], registry=self.registry
        )
        self.batch_images = Histogram(
            "pinsface_batch_images",
            "images per inference batch",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 24, 32, 64),
        )
        self.batch_seconds = Histogram(
            "pinsface_batch_seconds",
            "inference time per batch",
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
        )
        self.pending = Gauge("pinsface_pending_images", "images queued or being named", registry=self.registry)


class _Guard:
    """ASGI middleware, outermost: checks the Host header, counts and times requests, refuses bodies over the
    request cap (413, chunked ones included) and requests without the right API key (401/403) before anything
    reads their body; times the body (408 when it comes too slowly, ``limits.BodyClock``), refuses a multipart
    body cut short (400), and adds the security headers to every response."""

    def __init__(self, app, state):
        self.app = app
        self.state = state

    def _needs_key(self, scope) -> bool:
        path = scope["path"]
        if not (path.startswith("/v1/") or path == "/metrics"):
            return False  # the page, its assets and the API description hold no data
        if self.state.settings.auth == "all":
            return True
        # Naming faces changes nothing; every other method than a read does.
        return scope["method"] not in ("GET", "HEAD", "OPTIONS") and path != "/v1/identify"

    def _admit(self, scope, headers: dict) -> None:
        """Raise the ApiError that refuses a request from its headers alone, if any."""
        from pinsface.serve.auth import host_of

        settings = self.state.settings
        if host_of(headers.get(b"host")) not in self.state.allowed_hosts:
            raise ApiError(400, "host_not_allowed", "the Host header names a host this server does not answer for")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.state.request_limit):
            raise ApiError(413, "request_too_large", f"the request is over {settings.max_request_mb:g} MB")
        if self._needs_key(scope):
            given = headers.get(b"x-api-key")
            if given is None:
                raise ApiError(401, "missing_api_key", "this endpoint needs an API key in the X-API-Key header")
            if not hmac.compare_digest(given, self.state.api_key.encode("utf-8")):
                raise ApiError(403, "invalid_api_key", "the API key is not valid")

    def _body_reader(self, scope, receive, headers: dict, refused: list):
        """``receive`` with the request cap, the body's clock and the multipart end check. The ApiError it
        raises is also put in ``refused``: the form parser turns any error into its own 400, which the guard
        replaces with it."""
        import asyncio

        from pinsface.serve.limits import BodyClock, BodyTooSlow

        settings, limit = self.state.settings, self.state.request_limit
        clock = BodyClock(settings.min_body_rate_kb * 1024, settings.body_grace_s, settings.body_idle_s)
        kind, _, params = headers.get(b"content-type", b"").partition(b";")
        boundary = (
            params.strip().removeprefix(b"boundary=").strip(b'"') if kind.strip() == b"multipart/form-data" else b""
        )
        state = {"done": False, "tail": b""}

        async def receive_wrapper():
            try:
                return await checked_receive()
            except ApiError as exc:
                refused.append(exc)
                raise

        async def checked_receive():
            if state["done"]:  # the body is in: what follows is a disconnect, waited for without a clock
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), clock.wait_for_next())
            except (BodyTooSlow, TimeoutError) as exc:
                self.state.counts.timed_out += 1
                raise ApiError(408, "request_timeout", "the request body came too slowly") from exc
            if message["type"] != "http.request":
                return message
            body = message.get("body", b"")
            clock.received += len(body)
            if clock.received > limit:
                raise ApiError(413, "request_too_large", f"the request is over {settings.max_request_mb:g} MB")
            state["tail"] = (state["tail"] + body)[-(len(boundary) + 16) :]
            if not message.get("more_body", False):
                state["done"] = True
                if boundary and b"--" + boundary + b"--" not in state["tail"]:
                    raise ApiError(400, "truncated_body", "the multipart body ends before its closing boundary")
            return message

        return receive_wrapper

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state
        started = time.perf_counter()
        status = {"code": 500, "sent": False}

        refused: list[ApiError] = []  # the body's refusal, answered in place of the app's response

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                message["headers"] = _with_security_headers(message.get("headers") or [], scope["path"])
            await send(message)

        async def app_send(message):
            if refused and message["type"] == "http.response.start":
                status["replaced"] = True
                exc = refused[0]
                state.metrics.errors.labels(exc.code).inc()
                return await _json_response(exc)(scope, receive, send_wrapper)
            if not status.get("replaced"):
                await send_wrapper(message)

        counted = False
        try:
            headers = dict(scope["headers"])
            if scope["path"] != "/v1/health":  # health answers even when everything else is refused
                if state.in_flight >= state.settings.max_requests:
                    raise ApiError(
                        503,
                        "busy",
                        "too many requests in progress; retry later",
                        headers={"Retry-After": str(state.settings.retry_after_s)},
                    )
                state.in_flight += 1
                counted = True
            self._admit(scope, headers)
            await self.app(scope, self._body_reader(scope, receive, headers, refused), app_send)
        except ApiError as exc:
            if status["sent"]:
                raise
            await _json_response(exc)(scope, receive, send_wrapper)
            state.metrics.errors.labels(exc.code).inc()
        finally:
            if counted:
                state.in_flight -= 1
            route = scope.get("route")
            name = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/") else "unmatched")
            state.metrics.requests.labels(scope["method"], name, str(status["code"])).inc()
            state.metrics.latency.labels(name).observe(time.perf_counter() - started)


SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


def _with_security_headers(headers, path: str) -> list:
    """``headers`` (ASGI pairs) with the security headers added where the response has not set them."""
    out = list(headers)
    present = {name.lower() for name, _ in out}
    extra = list(SECURITY_HEADERS)
    if not path.startswith("/docs"):  # Swagger UI runs inline script
        extra.append((b"content-security-policy", CONTENT_SECURITY_POLICY.encode()))
    out += [(name, value) for name, value in extra if name not in present]
    return out


def _json_response(exc: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(
        {"code": exc.code, "message": exc.message, **exc.extra}, status_code=exc.status, headers=exc.headers
    )


_STATUS_CODES = {
    400: "bad_request",
    401: "missing_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "busy",
}


def create_app(
    run_dir: str | os.PathLike | None = None,
    settings: ServeSettings | None = None,
    recognizer=None,
    api_key: str | None = None,
):
    """The FastAPI app for a run folder (or an already loaded ``recognizer``). The key is read from
    ``settings.api_key_file`` (created there when missing; default RUN_DIR/api_key) unless ``api_key`` is given."""
    from contextlib import asynccontextmanager

    import anyio.from_thread
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, Response
    from fastapi.security import APIKeyHeader
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    import pinsface
    from pinsface.predict import ImageResult, Recognizer

    settings = settings or ServeSettings()
    if recognizer is None:
        if run_dir is None:
            raise ValueError("create_app needs a run folder or a recognizer")
        recognizer = Recognizer.load(run_dir)
    run_dir = Path(recognizer.run_dir)
    if api_key is None:
        api_key = load_or_create_key(Path(settings.api_key_file) if settings.api_key_file else default_key_file())
        if (run_dir / "api_key").exists() and not settings.api_key_file:
            log.warning(
                "%s is no longer read (a copy of the run would carry it): the key is in %s; delete the old one",
                run_dir / "api_key",
                default_key_file(),
            )
    max_file = int(settings.max_upload_mb * 1024 * 1024)

    class State:
        pass

    state = State()
    state.settings, state.api_key, state.metrics = settings, api_key, _Metrics()
    state.started = time.time()
    state.in_flight = 0
    state.allowed_hosts = allowed_hosts(settings.bind_host, settings.allowed_hosts)
    state.request_limit = int(settings.max_request_mb * 1024 * 1024)
    state.counts = ConnectionCounts(settings.max_connections_per_client, settings.max_connections)

    def snapshot(rec) -> None:
        """What /v1/health and /v1/identities read, taken on the worker thread after each change."""
        state.identities = rec.identities()
        state.thresholds = {
            "probability": round(float(rec.gallery.threshold_probability), 4),
            "distance": round(float(rec.gallery.threshold_distance), 4),
            "target_far": rec.gallery.target_far,
        }

    def on_batch(images: int, seconds: float) -> None:
        state.metrics.batch_images.observe(images)
        state.metrics.batch_seconds.observe(seconds)

    snapshot(recognizer)
    worker = InferenceWorker(
        recognizer,
        max_batch=settings.max_batch,
        max_wait=settings.max_wait_ms / 1000,
        max_pending=settings.max_pending,
        max_batch_pixels=5 * settings.max_pixels,
        on_batch=on_batch,
        on_change=snapshot,
    )
    state.metrics.pending.set_function(lambda: worker.pending)

    @asynccontextmanager
    async def lifespan(app):
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

    app = FastAPI(
        title="pinsface",
        version=pinsface.__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="Name the faces in photos, enrol and forget people. State-changing endpoints need "
        "the API key in the `X-API-Key` header.",
    )
    app.state.pinsface = state
    app.state.worker = worker
    # For the API description only (the key itself is checked by _Guard before a body is read).
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's API key")
    write_key = [Security(key_header)]
    read_key = write_key if settings.auth == "all" else []

    def api_error(exc: ApiError):
        state.metrics.errors.labels(exc.code).inc()
        return _json_response(exc)

    @app.exception_handler(ApiError)
    async def on_api_error(request, exc: ApiError):
        return api_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc):
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return api_error(ApiError(exc.status_code, code, message, headers=getattr(exc, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc):
        errors = [
            {"where": ".".join(str(part) for part in e.get("loc", ())), "problem": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        message = "; ".join(f"{e['where']}: {e['problem']}" for e in errors) or "invalid request"
        return api_error(ApiError(422, "validation_error", message, errors=errors))

    @app.exception_handler(Exception)
    async def on_unexpected(request, exc):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return api_error(ApiError(500, "internal_error", f"unexpected error: {type(exc).__name__}"))

    state.bytes_held = 0
    max_held = int(settings.max_pending_mb * 1024 * 1024)

    @asynccontextmanager
    async def read_uploads(files: list[UploadFile]):
        """The uploads as (name, bytes), counted against the memory budget until the request is done."""
        if len(files) > settings.max_files:
            raise ApiError(413, "too_many_files", f"{len(files)} files; at most {settings.max_files} per request")
        if len(files) > settings.max_pending:
            raise ApiError(413, "too_many_files", f"{len(files)} files; the queue holds {settings.max_pending}")
        for f in files:
            if f.size is not None and f.size > max_file:
                raise ApiError(413, "file_too_large", f"{f.filename} is over {settings.max_upload_mb:g} MB")
        size = sum(f.size or max_file for f in files)
        if size > max_held:
            raise ApiError(413, "request_too_large", f"the uploads are over {settings.max_pending_mb:g} MB")
        if state.bytes_held + size > max_held:
            raise ApiError(
                503,
                "busy",
                "too many uploads are held in memory; retry later",
                headers={"Retry-After": str(settings.retry_after_s)},
            )
        state.bytes_held += size
        try:
            out = []
            for f in files:
                name = (f.filename or "upload")[-200:]
                data = await f.read(max_file + 1)
                if len(data) > max_file:
                    raise ApiError(413, "file_too_large", f"{name} is over {settings.max_upload_mb:g} MB")
                out.append((name, data))
            yield out
        finally:
            state.bytes_held -= size

    def run_busy(exc: RunBusy) -> ApiError:
        """Another process (a CLI enrolment, another server) is writing the run folder."""
        return ApiError(503, "run_busy", str(exc), headers={"Retry-After": str(settings.retry_after_s)})

    def busy(exc: QueueFull) -> ApiError:
        return ApiError(
            503, "busy", f"the server is busy: {exc}; retry later", headers={"Retry-After": str(settings.retry_after_s)}
        )

    def pixel_budget(pixels: list[int]) -> None:
        """One request's photos may not decode to more than ``max_request_pixels`` together (a few huge PNGs
        within every size cap would otherwise hold gigabytes while they are decoded)."""
        if sum(pixels) > settings.max_request_pixels:
            raise ApiError(
                413,
                "too_many_pixels",
                f"the photos hold {sum(pixels) / 1e6:.0f} megapixels together; at most "
                f"{settings.max_request_pixels / 1e6:.0f} per request",
            )

    def check(uploads: list[tuple[str, bytes]]) -> list[int | BadImage]:
        out = []
        for _, data in uploads:
            try:
                out.append(sniff(data, settings.max_pixels))
            except BadImage as exc:
                out.append(exc)
        return out

    files_param = File(..., description=f"one or more photos ({', '.join(FORMATS)})")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    try:
        import swagger_ui

        app.mount("/docs/assets", StaticFiles(directory=Path(swagger_ui.__file__).parent / "static"), name="docs")
        docs_assets = "/docs/assets"
    except ImportError:  # the page still lists the API without it
        docs_assets = None

    @app.get("/docs", include_in_schema=False)
    async def docs():
        from fastapi.openapi.docs import get_swagger_ui_html

        if docs_assets is None:
            return HTMLResponse(
                "<p>Install swagger-ui-py for this page; the API description is "
                '<a href="/openapi.json">/openapi.json</a>.</p>'
            )
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="pinsface API",
            swagger_js_url=f"{docs_assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{docs_assets}/swagger-ui.css",
            swagger_favicon_url=f"{docs_assets}/favicon-32x32.png",
        )

    @app.post("/v1/identify", tags=["faces"], dependencies=read_key)
    async def identify(
        files: list[UploadFile] = files_param,
        top_k: int = Query(3, ge=1, le=20, description="alternatives listed per face"),
        threshold: float | None = Query(None, ge=0, le=10, description="distance threshold override"),
        min_probability: float | None = Query(None, ge=0, le=1, description="probability threshold override"),
    ):
        """Every face in each photo, in the record of `pinsface predict --json`. A bad file gets an `error`
        in its record (the response is still 200); a photo without a face gets a `note`."""
        async with read_uploads(files) as uploads:
            return await identify_uploads(uploads, top_k, threshold, min_probability)

    async def identify_uploads(uploads, top_k, threshold, min_probability) -> dict:
        checked = await run_in_threadpool(check, uploads)
        pixel_budget([c for c in checked if not isinstance(c, BadImage)])
        good = [(i, data) for i, ((_, data), c) in enumerate(zip(uploads, checked)) if not isinstance(c, BadImage)]
        results: list = [None] * len(uploads)
        for i, c in enumerate(checked):
            if isinstance(c, BadImage):
                results[i] = ImageResult(uploads[i][0], [], error=c.reason)
        if good:
            try:
                named = await worker.identify(
                    [data for _, data in good], [checked[i] for i, _ in good], top_k, threshold, min_probability
                )
            except QueueFull as exc:
                raise busy(exc) from exc
            for (i, _), result in zip(good, named):
                result.source = uploads[i][0]
                results[i] = result
        for r in results:
            if r.error:
                state.metrics.errors.labels(f"image_{r.error}").inc()
            for face in r.faces:
                state.metrics.faces.labels("named" if face.identity else "unknown").inc()
        return {"results": [r.to_dict() for r in results]}

    @app.get("/v1/identities", tags=["identities"], dependencies=read_key)
    async def identities():
        """Every identity the run knows: face count, and whether it was enrolled after training."""
        people = state.identities
        return {"count": len(people), "identities": people}

    @app.post("/v1/identities/{name}/faces", tags=["identities"], dependencies=write_key)
    async def enroll(
        name: str = PathParam(..., description="the person's name"), files: list[UploadFile] = files_param
    ):
        """Enrol a person from photos (the largest face of each), or add photos to one already known.
        Saved in the run folder before the response is sent."""
        name = clean_name(name)
        async with read_uploads(files) as uploads:
            return await enroll_uploads(name, uploads)

    async def enroll_uploads(name: str, uploads) -> dict:
        def check_all():
            # Every photo must decode, or the request is refused before any work; decoded as the recogniser
            # decodes it (a large photo at reduced scale), which then decodes the bytes again.
            pixels = []
            for file_name, data in uploads:
                try:
                    pixels.append(sniff(data, settings.max_pixels))
                except BadImage as exc:
                    raise ApiError(422, "bad_image", f"{file_name}: {exc}", reason=exc.reason, file=file_name) from exc
            pixel_budget(pixels)
            for file_name, data in uploads:
                try:
                    load_scaled(data, settings.max_pixels, DECODE_MIN_SIDE)
                except BadImage as exc:
                    raise ApiError(422, "bad_image", f"{file_name}: {exc}", reason=exc.reason, file=file_name) from exc

        await run_in_threadpool(check_all)
        photos = [data for _, data in uploads]

        def find_faces(images):
            # Detection and embedding run on the detection thread, between detection batches and beside
            # naming; the rest of the enrolment (imprinting and saving) runs here while naming goes on.
            return anyio.from_thread.run(worker.run, lambda rec: rec.faces_for_enrolment(images), False)

        def enroll_and_save():
            try:
                summary = recognizer.enroll(name, photos, find_faces=find_faces)
            except ValueError as exc:
                raise ApiError(422, "no_face", str(exc)) from exc
            except RunBusy as exc:
                raise run_busy(exc) from exc
            finally:
                snapshot(recognizer)
            summary.pop("skipped", None)
            summary["cluster"] = cluster_summary(recognizer, summary["identity"], summary["faces_used"])
            summary["faces"] = len(summary["cluster"]["faces"])
            return summary

        try:
            return await run_in_threadpool(enroll_and_save)
        except QueueFull as exc:
            raise busy(exc) from exc

    @app.delete("/v1/identities/{name}", tags=["identities"], dependencies=write_key)
    async def forget(name: str = PathParam(..., description="the person's name")):
        """Forget a person: their faces leave the gallery and their column the head. Saved before the response."""
        name = clean_name(name)

        def forget_and_save():
            if recognizer.gallery.find(name) < 0:
                raise ApiError(404, "unknown_identity", f"{name!r} is not known to this run")
            if len(recognizer.labels) <= 2:
                raise ApiError(409, "too_few_identities", "a run must keep at least two identities")
            try:
                return recognizer.forget(name)
            except RunBusy as exc:
                raise run_busy(exc) from exc
            except ValueError as exc:  # forgotten meanwhile by another request
                raise ApiError(404, "unknown_identity", str(exc)) from exc
            finally:
                snapshot(recognizer)

        return await run_in_threadpool(forget_and_save)

    @app.head("/v1/health", include_in_schema=False, dependencies=read_key)
    @app.get("/v1/health", tags=["service"], dependencies=read_key)
    async def health():
        """Answered on the event loop from figures the worker keeps current: never waits for inference.
        ``status`` is "saturated" while new work would be refused (requests, images, memory or connections
        at their caps); ``load`` says which."""
        s = recognizer.settings
        connections = state.counts.snapshot()
        load = {
            "requests_in_progress": state.in_flight,
            "max_requests": settings.max_requests,
            "pending_images": worker.pending,
            "max_pending": settings.max_pending,
            "upload_mb_held": round(state.bytes_held / 2**20, 1),
            "max_pending_mb": settings.max_pending_mb,
            "connections": connections,
        }
        saturated = (
            state.in_flight >= settings.max_requests
            or worker.pending >= settings.max_pending
            or state.bytes_held >= settings.max_pending_mb * 2**20
            or connections["open"] >= connections["max_open"]
        )
        return {
            "status": "saturated" if saturated else "ok",
            "load": load,
            "version": pinsface.__version__,
            "model": {"kind": s.model, "backbone": s.backbone, "run": run_dir.name},
            "identities": len(state.identities),
            "thresholds": state.thresholds,
            "uptime_s": round(time.time() - state.started, 1),
            "pending_images": worker.pending,
            "limits": {
                "max_upload_mb": settings.max_upload_mb,
                "max_request_mb": settings.max_request_mb,
                "max_files": settings.max_files,
                "max_pending": settings.max_pending,
            },
            "auth": settings.auth,
        }

    @app.get("/metrics", tags=["service"], dependencies=read_key)
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_Guard, state=state)
    return app


def serve(
    run_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    log_level: str = "info",
) -> None:
    """Load the run once and serve it with uvicorn until interrupted; print its URL once it is ready."""
    import dataclasses

    import uvicorn

    from pinsface.serve.auth import exposure_warning
    from pinsface.serve.limits import guarded_protocol

    settings = dataclasses.replace(settings or ServeSettings(), bind_host=host)
    if warning := exposure_warning(host, settings.auth):
        log.warning("%s", warning)
    app = create_app(run_dir, settings)
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


__all__ = ["ServeSettings", "create_app", "serve", "load_or_create_key", "sniff"]
