"""Request and response models: the single source of validation for API, CLI and worker."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, Self, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from common.adapter_spec import AdapterSpec
from common.chat import ChatMessage
from common.config import get_settings
from common.gen_params import GenParams, Label, Prompt
from common.ml.pretrained import ModelSource
from common.train_spec import TrainSpec


class JobOptions(BaseModel):
    """What every job adds to its own spec: where and how often it runs."""

    model_config = ConfigDict(extra="forbid")

    queue: str = "auto"
    priority: int = Field(0, ge=0, le=9)
    max_attempts: int | None = Field(None, ge=1, le=20)
    # an urgent job waiting longer than GENQ_PREEMPT_AFTER_S may take this one's worker:
    # it checkpoints (training) or stops at an item chunk and resumes later; priority 9 never
    preemptible: bool = True

    @field_validator("queue")
    @classmethod
    def _known_queue(cls, queue: str) -> str:
        allowed = ["auto", *get_settings().queue_names]
        if queue not in allowed:
            raise ValueError(f"{queue!r} is not one of {allowed}")
        return queue


def _type_required(schema: dict[str, Any]) -> None:
    """POST /v1/jobs picks the spec by its `type`, so the schema says `type` is required
    (in Python it defaults, for callers that build one spec kind)."""
    required = schema.setdefault("required", [])
    if "type" not in required:
        required.insert(0, "type")


class TrainJobSpec(TrainSpec, JobOptions):
    """A training job: POST /v1/jobs with type `train`."""

    model_config = ConfigDict(json_schema_extra=_type_required)

    type: Literal["train"] = "train"
    name: str | None = Field(None, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")

    @model_validator(mode="after")
    def _no_local_path(self) -> Self:
        if self.data is not None and self.data.path is not None:
            raise ValueError("data.path: unknown field (give data.builtin or data.file_id)")
        return self


class GenerateSpec(GenParams, JobOptions):
    """A generation job: POST /v1/jobs with type `generate`."""

    model_config = ConfigDict(json_schema_extra=_type_required)

    type: Literal["generate"] = "generate"
    model: str = Field(min_length=1, max_length=128)
    prompts: list[Prompt] | None = Field(None, min_length=1, max_length=10_000)
    # conversations, each rendered with the model's chat template (else genq's fallback)
    chats: list[Annotated[list[ChatMessage], Field(min_length=1)]] | None = Field(
        None, min_length=1, max_length=10_000)
    n: int | None = Field(None, ge=1, le=10_000)
    labels: list[Label] | None = Field(None, min_length=1, max_length=10_000)

    @model_validator(mode="after")
    def _what_to_generate(self) -> Self:
        problems: list[str] = []
        if self.prompts is None and self.chats is None and self.n is None and self.labels is None:
            problems.append("prompts: give prompts or chats (text models) or n / labels "
                            "(image models)")
        if self.prompts is not None and self.chats is not None:
            problems.append("chats: give prompts or chats, not both")
        if self.labels is not None and self.n is not None and len(self.labels) not in (1, self.n):
            problems.append(f"labels: give one label for all {self.n} images or exactly n "
                            f"labels, got {len(self.labels)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


JobSpec = Annotated[TrainJobSpec | GenerateSpec, Field(discriminator="type")]


class Progress(BaseModel):
    done: int
    total: int
    unit: str
    rate: float | None = None
    eta_s: float | None = None


class Waiting(BaseModel):
    """Why a queued job has not started: `priority` (messages ahead of it on its queue, the
    1-based `position`), `quota` (its owner's `limit` on `queue` is reached: `max_running`
    with `in_flight` of `max`, or `gpu_seconds_per_day` with `used` of `max`), `fair_share`
    (a batch shard released as workers free up), `no_worker` (no live worker listens on
    its queue) or `backoff` (a retry, `until`)."""

    reason: Literal["priority", "quota", "fair_share", "no_worker", "backoff"]
    position: int | None = None
    until: datetime | None = None
    limit: Literal["max_running", "gpu_seconds_per_day"] | None = None
    queue: str | None = None
    in_flight: int | None = None
    used: float | None = None
    max: float | None = None

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Only the fields of its reason: {"reason": "priority", "position": 3}."""
        return {k: v for k, v in handler(self).items() if v is not None}


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: str = "job"
    type: str
    family: str | None
    status: str
    queue: str
    priority: int
    spec: dict[str, Any]
    attempt: int
    max_attempts: int
    attempts: list[Any] = Field(default_factory=list)
    worker: str | None
    progress: Progress
    metrics: dict[str, Any]
    result: dict[str, Any]
    error: dict[str, Any] | None
    cancel_requested: bool
    waiting: Waiting | None = None  # queued jobs only (GET /v1/jobs/{id} and lists)
    model_id: str | None
    parent_id: str | None
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None


Row = TypeVar("Row")
Cursor = TypeVar("Cursor")


class CursorPage(BaseModel, Generic[Row, Cursor]):
    """One page of a keyset-paged list: next_cursor, when has_more, is the next `after`."""

    object: str = "list"
    data: list[Row]
    has_more: bool
    next_cursor: Cursor | None = None


class JobList(CursorPage[JobOut, str]):
    pass


class ItemOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    index: int
    custom_id: str
    status: str
    request: dict[str, Any]
    response: dict[str, Any] | None
    error: dict[str, Any] | None
    tokens_in: int
    tokens_out: int
    finished_at: datetime | None


class ItemList(CursorPage[ItemOut, int]):
    pass


class ModelAdapter(BaseModel):
    """A LoRA model's adapter and its base: the model's `source` (a hub commit, a local
    folder) or, with `base_stored`, the from-config base kept with its training job."""

    spec: AdapterSpec
    base_stored: bool


class ModelOut(BaseModel):
    """OpenAI's model object, plus genq's fields."""

    id: str
    object: str = "model"
    created: int
    owned_by: str
    family: str
    checkpoint_id: str
    genq_id: str
    created_by_job: str | None
    source: ModelSource | None = None  # the hub id + resolved commit, or the local folder
    adapter: ModelAdapter | None = None  # a LoRA model; None: full weights


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelOut]


class CheckpointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: str = "checkpoint"
    job_id: str
    step: int
    bytes: int
    metrics: dict[str, Any]
    created_at: datetime


class ArtifactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: str = "artifact"
    job_id: str
    kind: str
    filename: str
    bytes: int
    sha256: str
    content_type: str
    created_at: datetime
