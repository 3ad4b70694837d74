"""How the API writes JSON: any text that is stored reads back, as valid JSON.

The API refuses a lone UTF-16 surrogate (api/json_body.py), but a row written before it
did, or by another writer, may hold one: UTF-8 cannot encode it, and FastAPI's default
answer (pydantic's JSON or Starlette's JSONResponse) failed every later read of it with a
500. Such a string is written as its JSON escape (`"\\ud800"`), which every JSON reader
parses.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from fastapi.responses import JSONResponse


class AnyTextJSONResponse(JSONResponse):
    """JSONResponse whose render escapes what UTF-8 cannot hold rather than failing."""

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)
        except orjson.JSONEncodeError:  # a lone surrogate, or an integer past 64 bits
            return json.dumps(content, ensure_ascii=True, allow_nan=False,
                              separators=(",", ":")).encode("ascii")
