"""A batch input file checked line by line: every problem collected with its line number."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError
from sqlalchemy.orm import Session

from common.batches.schemas import (
    IMAGE_ENDPOINT,
    LINE_FIELD_ERRORS,
    BatchLine,
    ImageBody,
    LineError,
    TextBody,
)
from common.chat import Render, as_dicts, render_fallback
from common.errors import NotFound, pydantic_problems
from common.gen_params import ItemInput, unsupported_fields
from common.ml.prompt_ids import load_chat_render
from common.models import Checkpoint, Model
from common.results import find_model
from common.storage import get_storage
from common.train_spec import family_kind, generation_kind, takes_prompts

MAX_REPORTED_ERRORS = 1000
PROGRESS_EVERY = 10_000  # lines between progress reports while validating


# ------------------------------------------------------------------ validation


@dataclass
class Checker:
    """Checks a batch file's lines one at a time, keeping only what is the same for every
    line (the models and chat templates met) and the first MAX_REPORTED_ERRORS problems:
    its memory does not grow with the file."""

    session: Session
    owner: str
    endpoint: str
    default_model: str | None
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0
    models: dict[str, Model] = field(default_factory=dict)
    renders: dict[str, Render] = field(default_factory=dict)  # by model id

    def error(self, line: int, code: str, message: str, param: str | None = None) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(LineError(code=code, message=message, param=param, line=line))

    def check(self, n: int, raw: bytes) -> tuple[str, dict[str, Any]] | None:
        """Line n's custom_id and item request, or None with its errors recorded."""
        try:
            row = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:  # invalid UTF-8 lands here too
            self.error(n, "invalid_json", f"line is not valid JSON: {exc}")
            return None
        if not isinstance(row, dict):
            self.error(n, "invalid_json", "line must be a JSON object")
            return None
        line = _envelope(self, n, row)
        if line is None:
            return None
        request = _check_line(self, n, line)
        return None if request is None else (line.custom_id, request)


Checked = tuple[str, dict[str, Any]]  # a line's custom_id and item request


@dataclass
class Validated:
    """What the first pass over a file learns: how many requests, and its problems; for a
    valid file of at most `keep` requests (validate_file), every line's checked request."""

    requests: int
    errors: list[LineError]
    error_count: int
    first_model: Model | None
    whole: list[Checked] | None = None
    last_line: int = 0  # the number of the file's last line with a request


def requests_in(lines: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of every line that is not blank."""
    for n, raw in enumerate(lines, start=1):
        if raw.strip():
            yield n, raw


def validate_file(checker: Checker, read: Callable[[], Iterator[bytes]], *, cap: int,
                  on_progress: Callable[[int], None] = lambda n: None,
                  keep: int = 0) -> Validated:
    """Check every line of a batch input file (`read()` gives its lines from the start),
    collecting each problem with its line number. A valid file of at most `keep` requests
    comes back whole (`Validated.whole`), so its requests need not be read and checked again.

    Duplicate custom_ids are found from 8-byte digests (8 MB for a million lines), sorted
    once at the end; only a file with a repeated digest is read a second time, to name the
    lines that repeat one.
    """
    digests = bytearray()
    count, first_model, last_line = 0, None, 0
    whole: list[Checked] | None = [] if keep else None
    for n, raw in requests_in(read()):
        count += 1
        last_line = n
        if count > cap:
            checker.error(n, "too_many_requests", f"a batch holds at most {cap} requests")
            break
        checked = checker.check(n, raw)
        if checked is not None:
            digests += _digest(checked[0])
            if first_model is None:
                first_model = next(m for m in checker.models.values()
                                   if m.id == checked[1]["model_id"])
        if whole is not None:  # dropped at the first error or past `keep` requests
            if checked is None or count > keep:
                whole = None
            else:
                whole.append(checked)
        if count % PROGRESS_EVERY == 0:
            on_progress(count)
    if count == 0:
        checker.error(1, "empty_file", "the input file has no requests")
    repeated = repeated_digests(digests)
    if repeated:
        report_duplicates(checker, read(), repeated)
    checker.errors.sort(key=lambda e: e.line or 0)
    return Validated(requests=count, errors=checker.errors, error_count=checker.error_count,
                     first_model=first_model, whole=None if checker.errors else whole,
                     last_line=last_line)


def repeated_digests(digests: bytes | bytearray) -> set[bytes]:
    """The digests that occur more than once."""
    import numpy as np

    values = np.sort(np.frombuffer(bytes(digests), dtype=np.uint64))
    repeated = values[1:][values[1:] == values[:-1]]
    return {int(v).to_bytes(8, "little") for v in np.unique(repeated)}


def report_duplicates(checker: Checker, lines: Iterable[bytes], repeated: set[bytes]) -> None:
    """Name each line whose custom_id an earlier line already used."""
    seen: set[str] = set()
    for n, raw in requests_in(lines):
        try:
            custom_id = orjson.loads(raw).get("custom_id")
        except (orjson.JSONDecodeError, AttributeError):
            continue
        if not isinstance(custom_id, str) or _digest(custom_id) not in repeated:
            continue
        if custom_id in seen:
            checker.error(n, "duplicate_custom_id", f"custom_id {custom_id!r} is used twice",
                          "custom_id")
        seen.add(custom_id)


def _digest(custom_id: str) -> bytes:
    return hashlib.blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def _envelope(checker: Checker, n: int, row: dict[str, Any]) -> BatchLine | None:
    """The line's envelope, or None with one error for each bad field of it."""
    try:
        return BatchLine.model_validate(row)
    except ValidationError as exc:
        for field_name in dict.fromkeys(str(e["loc"][0]) for e in exc.errors()):
            code, message = LINE_FIELD_ERRORS[field_name]
            checker.error(n, code, message, field_name)
        return None


def _check_line(checker: Checker, n: int, line: BatchLine) -> dict[str, Any] | None:
    endpoint = checker.endpoint
    if line.url != endpoint:
        checker.error(n, "mismatched_endpoint",
                     f"url {line.url!r} is not the batch endpoint {endpoint!r}", "url")
        return None
    body = line.body
    image = endpoint == IMAGE_ENDPOINT
    try:
        spec: TextBody | ImageBody = (ImageBody if image else TextBody).model_validate(body)
    except ValidationError as exc:
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"])
            message = e["msg"].removeprefix("Value error, ")
            checker.error(n, "invalid_value", f"body.{where}: {message}", f"body.{where}")
        return None
    name = spec.model or checker.default_model
    if not name:
        checker.error(n, "missing_required_parameter", "body.model is required", "body.model")
        return None
    model = _model(checker, name)
    if model is None:
        checker.error(n, "model_not_found", f"no model named {name!r}", "body.model")
        return None
    wanted = "image" if image else "text"
    if family_kind(model.family) != wanted:
        checker.error(n, "invalid_model", f"{name} is a {model.family} model; "
                     f"{endpoint} needs a {wanted} model", "body.model")
        return None
    base = {"model_id": model.id, "model": model.name, "url": endpoint, "body": body}
    if isinstance(spec, ImageBody):
        return _image_line(checker, n, spec, model, base)
    chat = endpoint == "/v1/chat/completions"
    prompt = _prompt(checker, n, spec, render=_render(checker, model) if chat else None)
    if prompt is None:
        return None
    try:
        gen = ItemInput(prompt=prompt, n=spec.n, **spec.params.model_dump())
    except ValidationError as exc:  # the prompt cap, which a chat template can cross
        where = "body.messages" if endpoint == "/v1/chat/completions" else "body.prompt"
        checker.error(n, "invalid_value", "; ".join(pydantic_problems(exc)), where)
        return None
    return {**base, "gen": gen.model_dump()}


def _image_line(checker: Checker, n: int, spec: ImageBody, model: Model,
                base: dict[str, Any]) -> dict[str, Any] | None:
    """An images line's item: a prompt for a text-to-image model, else none; every field
    the model cannot honour is an error naming it."""
    gen = spec.gen
    prompted = takes_prompts(model.family)
    if prompted and gen.prompt is None:
        checker.error(n, "missing_required_parameter", "body.prompt is required", "body.prompt")
        return None
    if not prompted and gen.prompt is not None:
        checker.error(n, "invalid_value", f"body.prompt: a {model.family} model draws without "
                     "a prompt (give label to condition it)", "body.prompt")
        return None
    problems = unsupported_fields(generation_kind(model.family), gen)
    if problems:
        checker.error(n, "invalid_value", f"body.{problems[0]}",
                     f"body.{problems[0].split(':', 1)[0]}")
        return None
    return {**base, "response_format": spec.response_format, "gen": gen.model_dump()}


def _prompt(checker: Checker, n: int, spec: TextBody, *, render: Render | None) -> str | None:
    """The line's prompt; for chat (`render` given) its messages rendered for generation."""
    if render is not None:
        if not spec.messages:
            checker.error(n, "missing_required_parameter", "body.messages is required",
                         "body.messages")
            return None
        try:
            prompt = render(as_dicts(spec.messages), True)
        except Exception as exc:  # a template's own raise_exception, or a jinja error
            checker.error(n, "invalid_value", f"body.messages: the model's chat template "
                         f"refused them ({exc})", "body.messages")
            return None
    else:
        if spec.prompt is None:
            checker.error(n, "missing_required_parameter", "body.prompt is required", "body.prompt")
            return None
        prompt = spec.prompt if isinstance(spec.prompt, str) else spec.prompt[0]
    return prompt


def _render(checker: Checker, model: Model) -> Render:
    """The model's chat template (its tokenizer's, else genq's fallback), read once a file."""
    if model.id not in checker.renders:
        checkpoint = checker.session.get(Checkpoint, model.checkpoint_id)
        checker.renders[model.id] = (load_chat_render(get_storage(), checkpoint.uri)
                                    if checkpoint else render_fallback)
    return checker.renders[model.id]


def _model(checker: Checker, name: str) -> Model | None:
    if name not in checker.models:
        try:
            checker.models[name] = find_model(checker.session, owner=checker.owner, name=name)
        except NotFound:
            return None
    return checker.models[name]

