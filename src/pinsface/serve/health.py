"""How the server is doing: ``/v1/health`` (answered on the event loop, never waiting for inference) and the
Prometheus ``/metrics``."""

# FastAPI reads the endpoints' annotations (strings, with the __future__ import) from this module's globals.
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Response

import pinsface
from pinsface.serve.state import ServerState, server_state

router = APIRouter(tags=["service"])


@router.head("/v1/health", include_in_schema=False)
@router.get("/v1/health")
async def health(state: ServerState = Depends(server_state)):
    """Answered on the event loop from figures the worker keeps current: never waits for inference.
    ``status`` is "saturated" while new work would be refused (requests, images, memory or connections
    at their caps); ``load`` says which."""
    settings, s = state.settings, state.recognizer.settings
    load = _load(state)
    return {
        "status": "saturated" if _saturated(state, load) else "ok",
        "load": load,
        "version": pinsface.__version__,
        "model": {"kind": s.model, "backbone": s.backbone, "run": state.run_dir.name},
        "identities": len(state.identities),
        "thresholds": state.thresholds,
        "uptime_s": round(time.time() - state.started, 1),
        "pending_images": state.worker.pending,
        "limits": {
            "max_upload_mb": settings.max_upload_mb,
            "max_request_mb": settings.max_request_mb,
            "max_files": settings.max_files,
            "max_pending": settings.max_pending,
        },
        "auth": settings.auth,
        "library": state.library is not None,
    }


@router.get("/metrics")
async def metrics(state: ServerState = Depends(server_state)):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _load(state: ServerState) -> dict:
    """The work in progress, beside the caps past which new work is refused."""
    settings = state.settings
    return {
        "requests_in_progress": state.in_flight,
        "max_requests": settings.max_requests,
        "pending_images": state.worker.pending,
        "max_pending": settings.max_pending,
        "upload_mb_held": round(state.bytes_held / 2**20, 1),
        "max_pending_mb": settings.max_pending_mb,
        "connections": state.counts.snapshot(),
    }


def _saturated(state: ServerState, load: dict) -> bool:
    """Whether new work would be refused now."""
    settings, connections = state.settings, load["connections"]
    return (
        state.in_flight >= settings.max_requests
        or state.worker.pending >= settings.max_pending
        or state.bytes_held >= settings.max_pending_mb * 2**20
        or connections["open"] >= connections["max_open"]
    )
