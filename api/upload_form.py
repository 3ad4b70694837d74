"""An upload's multipart body read as it streams, under a byte cap, with nothing spooled.

FastAPI reads a `File()`/`Form()` body whole before any dependency runs, and Starlette's
parser spools every part past 1 MB to a temp file: an upload of any size, even without a
key, reached the API's disk before the 413. Here the route authenticates first, then
python-multipart's push parser turns the body stream into parts whose data is handed on
chunk by chunk, and the body is cut at its cap.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import anyio.from_thread
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from common.errors import InvalidSpec

FIELD_BYTES = 1024  # a form field other than the file (`purpose`) is a short word
PART_END = None


@dataclass
class _PartStart:
    name: str
    filename: str | None


FormEvent = _PartStart | bytes | None  # a part's start, a chunk of its data, its end


@dataclass
class FormPart:
    """One part of the form: its name, its filename if it is a file, and its data (read once)."""

    name: str
    filename: str | None
    _events: Iterator[FormEvent]
    _ended: bool = field(default=False)

    def chunks(self) -> Iterator[bytes]:
        """The part's bytes as they arrive."""
        while not self._ended:
            event = next(self._events, PART_END)  # a truncated body raised in _form_events
            if not isinstance(event, bytes):
                self._ended = True
                return
            yield event

    def text(self) -> str:
        """A short text field, at most FIELD_BYTES."""
        data = b""
        for chunk in self.chunks():
            data += chunk
            if len(data) > FIELD_BYTES:
                raise InvalidSpec(f"form field {self.name!r} is over {FIELD_BYTES} bytes",
                                  param=self.name)
        return data.decode("utf-8", "replace")

    def skip(self) -> None:
        for _ in self.chunks():
            pass


def boundary_of(content_type: str) -> bytes:
    """The multipart boundary, or a 422 for a body that is not multipart/form-data."""
    media, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if media != b"multipart/form-data" or not boundary:
        raise InvalidSpec("send the upload as multipart/form-data with fields `file` and "
                          "`purpose`", param="file")
    return boundary


def form_parts(body: Iterator[bytes], content_type: str) -> Iterator[FormPart]:
    """The parts of a multipart/form-data body, in order; each part's data is read (or
    skipped) before the next part is parsed, so no part is held in memory or on disk."""
    events = _form_events(body, boundary_of(content_type))
    for event in events:
        if isinstance(event, _PartStart):
            part = FormPart(event.name, event.filename, events)
            yield part
            part.skip()


def body_from_thread(stream: AsyncIterator[bytes]) -> Iterator[bytes]:
    """A request's body stream read from a sync route's worker thread, chunk by chunk."""
    async def next_chunk() -> bytes | None:
        return await anext(stream, None)

    while (chunk := anyio.from_thread.run(next_chunk)) is not None:
        if chunk:
            yield chunk


def _form_events(body: Iterator[bytes], boundary: bytes) -> Iterator[FormEvent]:
    """python-multipart's callbacks as a stream: a _PartStart, the part's data chunks, then
    PART_END, for each part; a 422 for a body that ends before its closing boundary."""
    pending: list[FormEvent] = []
    ended: list[bool] = []
    headers: dict[bytes, bytes] = {}
    name, value = bytearray(), bytearray()

    def header_end() -> None:
        headers[bytes(name).lower()] = bytes(value)
        name.clear()
        value.clear()

    def headers_finished() -> None:
        _, options = parse_options_header(headers.get(b"content-disposition"))
        filename = options.get(b"filename")
        pending.append(_PartStart(
            options.get(b"name", b"").decode("utf-8", "replace"),
            None if filename is None else filename.decode("utf-8", "replace")))
        headers.clear()

    parser = MultipartParser(boundary, {
        "on_header_field": lambda data, start, end: name.extend(data[start:end]),
        "on_header_value": lambda data, start, end: value.extend(data[start:end]),
        "on_header_end": header_end,
        "on_headers_finished": headers_finished,
        "on_part_data": lambda data, start, end: pending.append(bytes(data[start:end])),
        "on_part_end": lambda: pending.append(PART_END),
        "on_end": lambda: ended.append(True),
    })
    try:
        for chunk in body:
            parser.write(chunk)
            yield from _drain(pending)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidSpec(f"the multipart body is malformed: {exc}", param="file") from None
    yield from _drain(pending)
    if not ended:
        raise InvalidSpec("the multipart body ends before its closing boundary", param="file")


def _drain(pending: list[FormEvent]) -> Iterator[FormEvent]:
    events = pending[:]
    pending.clear()
    yield from events
