"""The one place that maps errors to HTTP: JSON {"error": {"code", "message", "param"}}."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException

from api.json_response import AnyTextJSONResponse
from common.errors import GenqError, RateLimited

log = logging.getLogger(__name__)

HTTP_CODES = {400: "invalid_request", 401: "invalid_api_key", 404: "not_found",
              405: "method_not_allowed", 409: "conflict", 413: "too_large",
              422: "invalid_request", 429: "rate_limited", 503: "unavailable"}


class ErrorProblem(BaseModel):
    param: str | None = None
    message: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None
    errors: list[ErrorProblem] | None = None  # 422: every problem, each naming its field


class ErrorBody(BaseModel):
    """Every error the API answers: {"error": {"code", "message", "param"}}."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description} for status, description in (
        (400, "Bad request"), (401, "Missing, unknown or revoked API key"),
        (404, "Not found (or another owner's)"), (409, "Conflict"),
        (413, "Body or upload over its cap"), (422, "Invalid input; `param` names the field"),
        (429, "Rate limited, or too many held requests; see Retry-After"),
        (503, "The broker or the database is unavailable; see Retry-After"))}


def error_body(code: str, message: str, param: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param, **extra}}


def field_name(loc: tuple[Any, ...]) -> str:
    """('body', 'train', 'data', 'builtin') -> 'data.builtin'; list indexes as [i]."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    if parts and parts[0] in ("train", "generate"):
        parts = parts[1:]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def error_param(err: dict[str, Any]) -> str | None:
    if str(err.get("type", "")).startswith("union_tag"):
        return "type"  # the discriminator itself is missing or unknown
    return field_name(tuple(err.get("loc", ()))) or None


def validation_message(err: dict[str, Any]) -> str:
    msg = str(err.get("msg", "invalid"))
    return msg.removeprefix("Value error, ")


NAMED_PROBLEM = re.compile(r"^([A-Za-z_][\w.\[\]]*): (.+)$", re.S)


def validation_problems(err: dict[str, Any]) -> list[dict[str, Any]]:
    """One {param, message} per problem; a whole-spec check lists its problems as
    "field: message; field: message", and each names its own field."""
    if err.get("type") == "json_invalid":  # the body is not JSON (or holds a lone surrogate)
        return [{"param": "body", "message": f"invalid JSON: {err.get('ctx', {}).get('error')}"}]
    param, message = error_param(err), validation_message(err)
    if param is not None or err.get("type") != "value_error":
        return [{"param": param, "message": message}]
    problems = []
    for part in message.split("; "):
        named = NAMED_PROBLEM.match(part)
        problems.append({"param": named.group(1), "message": named.group(2)} if named
                        else {"param": None, "message": part})
    return problems


def json_type(content_type: str) -> bool:
    """application/json, application/*+json, any case and parameters."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                             and media.endswith("+json"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GenqError)
    async def _genq(_: Request, exc: GenqError) -> AnyTextJSONResponse:
        headers = ({"Retry-After": str(exc.retry_after_s)} if isinstance(exc, RateLimited)
                   else None)
        return AnyTextJSONResponse(error_body(exc.code, exc.message, exc.param),
                                   status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> AnyTextJSONResponse:
        sent = request.headers.get("content-type", "")
        if request.method in ("POST", "PUT", "PATCH") and not json_type(sent) and any(
            tuple(e.get("loc", ())) == ("body",) for e in exc.errors()
        ):  # e.g. curl -d without a header sends a form: say what to change
            message = (f"send the body as JSON with the header 'Content-Type: application/json' "
                       f"(got {sent or 'no content type'!r})")
            return AnyTextJSONResponse(error_body("invalid_request", message, "body"),
                                       status_code=422)
        errors = [problem for e in exc.errors() for problem in validation_problems(e)]
        first = errors[0] if errors else {"param": None, "message": "invalid request"}
        message = "; ".join(
            f"{e['param']}: {e['message']}" if e["param"] else e["message"] for e in errors
        )
        body = error_body("invalid_request", message, first["param"], errors=errors)
        return AnyTextJSONResponse(body, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> AnyTextJSONResponse:
        code = HTTP_CODES.get(exc.status_code, "error")
        return AnyTextJSONResponse(
            error_body(code, str(exc.detail), getattr(exc, "param", None)),
            status_code=exc.status_code, headers=exc.headers,
        )

    @app.exception_handler(DataError)
    async def _unstorable(_: Request, exc: DataError) -> AnyTextJSONResponse:
        # e.g. a NUL byte, which PostgreSQL text cannot hold: the input is bad, not the server
        log.info("rejected a value the database cannot store: %s", exc.orig)
        return AnyTextJSONResponse(
            error_body("invalid_request", "the request holds a value the database cannot store "
                       "(such as a NUL character)"),
            status_code=422,
        )

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    async def _db_down(_: Request, exc: Exception) -> AnyTextJSONResponse:
        log.warning("database unavailable: %s", exc)
        return AnyTextJSONResponse(
            error_body("database_unavailable", "the database is unavailable; try again shortly"),
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> AnyTextJSONResponse:
        log.exception("unhandled error")
        return AnyTextJSONResponse(error_body("internal_error", "internal server error"),
                                   status_code=500)
