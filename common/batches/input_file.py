"""A batch input file checked line by line: every problem collected with its line number."""

from __future__ import annotations

from collections.abc import Iterator
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
from common.config import get_settings
from common.errors import NotFound, pydantic_problems
from common.gen_params import ItemInput, unsupported_fields
from common.ml.prompt_ids import load_chat_render
from common.models import Checkpoint, Model
from common.results import find_model
from common.storage import get_storage
from common.train_spec import family_kind, generation_kind, takes_prompts

MAX_REPORTED_ERRORS = 1000


# ------------------------------------------------------------------ validation


@dataclass
class Parsed:
    """A validated input file: one item request per line, or the errors found."""

    custom_ids: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    models: dict[str, Model] = field(default_factory=dict)
    renders: dict[str, Render] = field(default_factory=dict)  # by model id

    def error(self, line: int, code: str, message: str, param: str | None = None) -> None:
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(LineError(code=code, message=message, param=param, line=line))


def parse_input(
    session: Session,
    lines: Iterator[bytes],
    *,
    owner: str,
    endpoint: str,
    default_model: str | None,
) -> Parsed:
    """Check every line of a batch input file; collect every problem with its line number."""
    settings = get_settings()
    parsed, seen = Parsed(), set()
    count = 0
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        count += 1
        if count > settings.max_batch_lines:
            parsed.error(n, "too_many_requests",
                         f"a batch holds at most {settings.max_batch_lines} requests")
            break
        try:
            row = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:  # invalid UTF-8 lands here too
            parsed.error(n, "invalid_json", f"line is not valid JSON: {exc}")
            continue
        if not isinstance(row, dict):
            parsed.error(n, "invalid_json", "line must be a JSON object")
            continue
        line = _envelope(parsed, n, row)
        if line is None:
            continue
        if line.custom_id in seen:
            parsed.error(n, "duplicate_custom_id", f"custom_id {line.custom_id!r} is used twice",
                         "custom_id")
            continue
        seen.add(line.custom_id)
        request = _check_line(session, parsed, n, line, owner=owner, endpoint=endpoint,
                              default_model=default_model)
        if request is not None:
            parsed.custom_ids.append(line.custom_id)
            parsed.requests.append(request)
    if count == 0:
        parsed.error(1, "empty_file", "the input file has no requests")
    return parsed


def _envelope(parsed: Parsed, n: int, row: dict[str, Any]) -> BatchLine | None:
    """The line's envelope, or None with one error for each bad field of it."""
    try:
        return BatchLine.model_validate(row)
    except ValidationError as exc:
        for field_name in dict.fromkeys(str(e["loc"][0]) for e in exc.errors()):
            code, message = LINE_FIELD_ERRORS[field_name]
            parsed.error(n, code, message, field_name)
        return None


def _check_line(
    session: Session, parsed: Parsed, n: int, line: BatchLine, *,
    owner: str, endpoint: str, default_model: str | None,
) -> dict[str, Any] | None:
    if line.url != endpoint:
        parsed.error(n, "mismatched_endpoint",
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
            parsed.error(n, "invalid_value", f"body.{where}: {message}", f"body.{where}")
        return None
    name = spec.model or default_model
    if not name:
        parsed.error(n, "missing_required_parameter", "body.model is required", "body.model")
        return None
    model = _model(session, parsed, owner, name)
    if model is None:
        parsed.error(n, "model_not_found", f"no model named {name!r}", "body.model")
        return None
    wanted = "image" if image else "text"
    if family_kind(model.family) != wanted:
        parsed.error(n, "invalid_model", f"{name} is a {model.family} model; "
                     f"{endpoint} needs a {wanted} model", "body.model")
        return None
    base = {"model_id": model.id, "model": model.name, "url": endpoint, "body": body}
    if isinstance(spec, ImageBody):
        return _image_line(parsed, n, spec, model, base)
    chat = endpoint == "/v1/chat/completions"
    prompt = _prompt(parsed, n, spec, render=_render(session, parsed, model) if chat else None)
    if prompt is None:
        return None
    try:
        gen = ItemInput(prompt=prompt, n=spec.n, **spec.params.model_dump())
    except ValidationError as exc:  # the prompt cap, which a chat template can cross
        where = "body.messages" if endpoint == "/v1/chat/completions" else "body.prompt"
        parsed.error(n, "invalid_value", "; ".join(pydantic_problems(exc)), where)
        return None
    return {**base, "gen": gen.model_dump()}


def _image_line(parsed: Parsed, n: int, spec: ImageBody, model: Model,
                base: dict[str, Any]) -> dict[str, Any] | None:
    """An images line's item: a prompt for a text-to-image model, else none; every field
    the model cannot honour is an error naming it."""
    gen = spec.gen
    prompted = takes_prompts(model.family)
    if prompted and gen.prompt is None:
        parsed.error(n, "missing_required_parameter", "body.prompt is required", "body.prompt")
        return None
    if not prompted and gen.prompt is not None:
        parsed.error(n, "invalid_value", f"body.prompt: a {model.family} model draws without "
                     "a prompt (give label to condition it)", "body.prompt")
        return None
    problems = unsupported_fields(generation_kind(model.family), gen)
    if problems:
        parsed.error(n, "invalid_value", f"body.{problems[0]}",
                     f"body.{problems[0].split(':', 1)[0]}")
        return None
    return {**base, "response_format": spec.response_format, "gen": gen.model_dump()}


def _prompt(parsed: Parsed, n: int, spec: TextBody, *, render: Render | None) -> str | None:
    """The line's prompt; for chat (`render` given) its messages rendered for generation."""
    if render is not None:
        if not spec.messages:
            parsed.error(n, "missing_required_parameter", "body.messages is required",
                         "body.messages")
            return None
        try:
            prompt = render(as_dicts(spec.messages), True)
        except Exception as exc:  # a template's own raise_exception, or a jinja error
            parsed.error(n, "invalid_value", f"body.messages: the model's chat template "
                         f"refused them ({exc})", "body.messages")
            return None
    else:
        if spec.prompt is None:
            parsed.error(n, "missing_required_parameter", "body.prompt is required", "body.prompt")
            return None
        prompt = spec.prompt if isinstance(spec.prompt, str) else spec.prompt[0]
    return prompt


def _render(session: Session, parsed: Parsed, model: Model) -> Render:
    """The model's chat template (its tokenizer's, else genq's fallback), read once a file."""
    if model.id not in parsed.renders:
        checkpoint = session.get(Checkpoint, model.checkpoint_id)
        parsed.renders[model.id] = (load_chat_render(get_storage(), checkpoint.uri)
                                    if checkpoint else render_fallback)
    return parsed.renders[model.id]


def _model(session: Session, parsed: Parsed, owner: str, name: str) -> Model | None:
    if name not in parsed.models:
        try:
            parsed.models[name] = find_model(session, owner=owner, name=name)
        except NotFound:
            return None
    return parsed.models[name]

