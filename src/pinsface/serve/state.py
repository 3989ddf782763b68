"""What the server's parts share: its settings (``ServeSettings``), its metrics, and ``ServerState``, one per app
(``app.state.pinsface``), which the routers take with ``Depends(server_state)``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Request

from pinsface.serve.auth import allowed_hosts
from pinsface.serve.batcher import InferenceWorker
from pinsface.serve.limits import ConnectionCounts
from pinsface.settings import SERVE_MAX_PIXELS

if TYPE_CHECKING:
    from pinsface.predict import Recognizer

MB = 1024 * 1024


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


class Metrics:
    """The Prometheus series of one app (its own registry), read by ``GET /metrics``."""

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

    def count_error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def observe_batch(self, images: int, seconds: float) -> None:
        self.batch_images.observe(images)
        self.batch_seconds.observe(seconds)


@dataclass(eq=False)
class ServerState:
    """One app's recogniser, its worker, settings, key, metrics and counters."""

    settings: ServeSettings
    recognizer: Recognizer
    worker: InferenceWorker
    api_key: str
    metrics: Metrics
    counts: ConnectionCounts  # open connections, kept by limits.guarded_protocol where it serves the app
    allowed_hosts: frozenset[str]
    started: float = field(default_factory=time.time)
    in_flight: int = 0  # requests in progress, health excepted (the guard counts them)
    bytes_held: int = 0  # uploaded bytes held in memory by requests in progress (uploads.read_uploads)
    # What /v1/health and /v1/identities read, taken on the worker thread after each change (``snapshot``).
    identities: list[dict[str, Any]] = field(default_factory=list)
    thresholds: dict[str, Any] = field(default_factory=dict)
    library: Any = None  # serve/people.Library with a library database (serve --db), else None

    @classmethod
    def create(cls, recognizer: Recognizer, settings: ServeSettings, api_key: str) -> ServerState:
        metrics = Metrics()
        worker = InferenceWorker(
            recognizer,
            max_batch=settings.max_batch,
            max_wait=settings.max_wait_ms / 1000,
            max_pending=settings.max_pending,
            max_batch_pixels=5 * settings.max_pixels,
            on_batch=metrics.observe_batch,
        )
        state = cls(
            settings=settings,
            recognizer=recognizer,
            worker=worker,
            api_key=api_key,
            metrics=metrics,
            counts=ConnectionCounts(settings.max_connections_per_client, settings.max_connections),
            allowed_hosts=allowed_hosts(settings.bind_host, settings.allowed_hosts),
        )
        state.snapshot(recognizer)
        worker.on_change = state.snapshot
        metrics.pending.set_function(lambda: worker.pending)
        return state

    @property
    def run_dir(self) -> Path:
        return Path(self.recognizer.run_dir)

    @property
    def request_limit(self) -> int:
        """Bytes in one request's body."""
        return int(self.settings.max_request_mb * MB)

    @property
    def file_limit(self) -> int:
        """Bytes in one uploaded file."""
        return int(self.settings.max_upload_mb * MB)

    @property
    def held_limit(self) -> int:
        """Uploaded bytes held in memory by all requests in progress."""
        return int(self.settings.max_pending_mb * MB)

    def snapshot(self, rec: Recognizer) -> None:
        """Copy what /v1/health and /v1/identities read from the recogniser, after each change."""
        self.identities = rec.identities()
        self.thresholds = {
            "probability": round(float(rec.gallery.threshold_probability), 4),
            "distance": round(float(rec.gallery.threshold_distance), 4),
            "target_far": rec.gallery.target_far,
        }


async def server_state(request: Request) -> ServerState:
    """The app's state, for a router's endpoint: ``state: ServerState = Depends(server_state)``. A coroutine, so
    FastAPI runs it on the event loop (a plain function would wait for a thread of the pool)."""
    return request.app.state.pinsface
