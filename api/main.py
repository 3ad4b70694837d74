"""The FastAPI app: routers, error handlers, one middleware, and nothing else."""

from __future__ import annotations

import logging

from fastapi import Depends, FastAPI

from api.deps import limit_json_body
from api.errors import ERROR_RESPONSES, install_error_handlers
from api.json_response import AnyTextJSONResponse
from api.routes import batches, files, health, jobs, models, monitoring, workers
from api.unread_body import CloseOnUnreadBody
from common.config import get_settings


def create_app() -> FastAPI:
    """Build the API application."""
    logging.basicConfig(
        level=get_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = FastAPI(
        dependencies=[Depends(limit_json_body)],
        default_response_class=AnyTextJSONResponse,  # any stored text reads back
        responses=ERROR_RESPONSES,  # every route may answer these, all in one JSON shape
        title="genq",
        version="0.1.0",
        description="A distributed asynchronous job queue for generative models.",
    )
    install_error_handlers(app)
    app.add_middleware(CloseOnUnreadBody)
    for router in (health.router, jobs.router, models.router, workers.router, monitoring.router):
        app.include_router(router)
    for router in (files.router, batches.router):
        app.include_router(router)
    return app


app = create_app()
