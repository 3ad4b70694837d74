"""How the API reads a JSON body: capped while it streams in (413), and only text SQL can
store (a lone UTF-16 surrogate is a 422, not a 500 later).

Python's json module reads `"\\ud800"` (and the raw bytes ED A0 80) as a lone surrogate,
which no UTF-8 column can hold: once stored it broke every later read of the owner's lists.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

from common.config import get_settings

# Raw bytes of an encoded surrogate (never valid UTF-8), or a \uD800-\uDFFF escape.
MAYBE_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]|\\u[dD][89a-fA-F]")


def parse_json(body: bytes) -> Any:
    """json.loads, raising JSONDecodeError (a 422 naming `body`) for any lone surrogate."""
    value = json.loads(body)
    found = MAYBE_SURROGATE.search(body)
    if found is None:
        return value
    try:  # escaped pairs (an emoji as \ud83d\ude00) are fine; only a lone half fails here
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise json.JSONDecodeError("a lone UTF-16 surrogate (\\ud800-\\udfff) is not text",
                                   body.decode("utf-8", "replace"), found.start()) from None
    return value


class BodyTooLarge(HTTPException):
    """413 while a body streams in (FastAPI passes HTTPException through its body parsing)."""

    def __init__(self, cap: int):
        super().__init__(413, f"request body is over the limit of {cap} bytes "
                              "(GENQ_MAX_JSON_BYTES)")
        self.param = "body"


class StorableJsonRequest(Request):
    async def body(self) -> bytes:
        """The body, read up to GENQ_MAX_JSON_BYTES whatever its content type or framing
        (chunked bodies announce no length); 413 at the first byte past it."""
        if not hasattr(self, "_body"):
            cap, size, chunks = get_settings().max_json_bytes, 0, []
            async for chunk in self.stream():
                size += len(chunk)
                if size > cap:
                    raise BodyTooLarge(cap)
                chunks.append(chunk)
            self._body = b"".join(chunks)
        return self._body

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class GenqRoute(APIRoute):
    """Every route of the API reads its body through StorableJsonRequest."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(StorableJsonRequest(request.scope, request.receive))

        return route
