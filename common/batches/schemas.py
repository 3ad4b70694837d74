"""OpenAI-shaped files and batches: request bodies, input lines and the objects the SDK parses."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.chat import ChatMessage
from common.gen_params import GenParams, ImageParams, ItemInput, Label, MaxTokens, Prompt

Item = TypeVar("Item")

TEXT_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
IMAGE_ENDPOINT = "/v1/images/generations"
Endpoint = Literal["/v1/completions", "/v1/chat/completions", "/v1/images/generations"]
UPLOAD_PURPOSES = {"batch": (".jsonl",), "dataset": (".txt", ".jsonl", ".npz", ".zip")}


class FileOut(BaseModel):
    """OpenAI's file object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None


class OpenAIList(BaseModel, Generic[Item]):
    """A page of an OpenAI list (files, batches): first_id/last_id, and `after` = last_id."""

    object: Literal["list"] = "list"
    data: list[Item]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileList(OpenAIList[FileOut]):
    pass


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchCreate(BaseModel):
    """POST /v1/batches; `model` (a genq extension) fills lines whose body has none."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: Endpoint
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(None, max_length=16)
    model: str | None = Field(None, min_length=1, max_length=128)


class BatchLine(BaseModel):
    """One line of a batch input file: OpenAI's request envelope around a body."""

    model_config = ConfigDict(extra="ignore")

    custom_id: str = Field(min_length=1, max_length=255)
    method: Literal["POST"] = "POST"
    url: str  # must be the batch's endpoint
    body: dict[str, Any]


# OpenAI's error code for a bad envelope field (batch.errors), and what to say of it
LINE_FIELD_ERRORS = {
    "custom_id": ("missing_required_parameter",
                  "custom_id must be a non-empty string (at most 255 characters)"),
    "method": ("invalid_method", "method must be POST"),
    "url": ("missing_required_parameter", "url must be the batch endpoint"),
    "body": ("missing_required_parameter", "body must be a JSON object"),
}


class LineError(BaseModel):
    """One rejected input line, as OpenAI reports it in batch.errors."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[LineError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchStatus(StrEnum):
    """OpenAI's batch statuses, as a parent job shows them (views.openai_status)."""

    validating = "validating"
    in_progress = "in_progress"
    finalizing = "finalizing"
    completed = "completed"
    failed = "failed"
    cancelling = "cancelling"
    cancelled = "cancelled"
    expired = "expired"

    @property
    def finished(self) -> bool:
        return self in BATCH_FINISHED


# OpenAI's final statuses (str members: a status read from JSON compares equal to them)
BATCH_FINISHED = (BatchStatus.completed, BatchStatus.failed, BatchStatus.cancelled,
                  BatchStatus.expired)


class BatchOut(BaseModel):
    """OpenAI's batch object; the id is the parent job's id (also GET /v1/jobs/{id})."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None


class BatchList(OpenAIList[BatchOut]):
    pass


# ------------------------------------------------------------------ input line bodies


class TextBody(GenParams):
    """The body of a /v1/completions or /v1/chat/completions line (unknown keys ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, min_length=1, max_length=128)
    prompt: str | list[str] | None = None  # capped as ItemInput.prompt
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    max_completion_tokens: MaxTokens | None = None  # OpenAI's newer name; wins over max_tokens
    n: int = Field(1, ge=1, le=16)
    stream: Literal[False] = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("give one prompt per line (a string, or a list of one string)")
        return v

    @property
    def params(self) -> GenParams:
        return super().params.model_copy(
            update={"max_tokens": self.max_completion_tokens or self.max_tokens})


class ImageBody(ImageParams):
    """The body of a /v1/images/generations line: OpenAI's Images body (prompt, n, size,
    response_format) plus genq's ImageParams (seed, and the diffusion fields steps,
    guidance_scale, negative_prompt) and, for the label-conditioned families (vae, gan),
    label."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, min_length=1, max_length=128)
    prompt: Prompt | None = None  # text-to-image models (diffusion)
    n: int = Field(1, ge=1, le=64)
    response_format: Literal["url", "b64_json"] = "url"
    label: Label | None = None

    @property
    def gen(self) -> ItemInput:
        """What the item stores: the request without its envelope fields."""
        return ItemInput(**self.model_dump(exclude={"model", "response_format"}))
