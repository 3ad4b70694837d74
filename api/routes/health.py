"""Health probes: no key needed."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.broker import broker_ok
from api.deps import SessionDep
from api.json_body import GenqRoute

router = APIRouter(tags=["health"], route_class=GenqRoute)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The API process is up (on the event loop: no thread or connection it could wait for)."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(session: SessionDep) -> JSONResponse:
    """The database and the broker answer."""
    checks = {"database": "ok", "broker": "ok"}
    try:
        session.execute(text("SELECT 1"))
    except Exception as exc:
        checks["database"] = f"down: {type(exc).__name__}"
    if not broker_ok():
        checks["broker"] = "down"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ready else "unavailable", **checks},
                        status_code=200 if ready else 503)
