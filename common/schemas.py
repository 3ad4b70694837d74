"""Request and response models: the single source of validation for API, CLI and worker."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.config import get_settings

Family = Literal["vae", "gan", "lstm", "gpt"]
TEXT_FAMILIES = ("lstm", "gpt")
IMAGE_FAMILIES = ("vae", "gan")
BUILTIN_DATA = {"python-docs": "text", "digits": "image"}


def family_kind(family: str) -> str:
    return "text" if family in TEXT_FAMILIES else "image"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(Strict):
    """Training data: a built-in dataset or an uploaded file (purpose `dataset`)."""

    builtin: Literal["python-docs", "digits"] | None = None
    file_id: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.builtin is None) == (self.file_id is None):
            raise ValueError("give exactly one of data.builtin or data.file_id")
        return self


class TrainSpec(Strict):
    """A training job: POST /v1/jobs with type `train`."""

    type: Literal["train"] = "train"
    family: Family
    name: str | None = Field(None, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    config: dict[str, Any] = Field(default_factory=dict)
    data: DataSpec | None = None
    steps: int | None = Field(None, ge=1, le=10_000_000)
    epochs: int | None = Field(None, ge=1, le=100_000)
    batch_size: int = Field(16, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0, le=10)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    optimizer: Literal["adamw", "adam", "sgd"] | None = None
    weight_decay: float = Field(0.0, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = Field(1, ge=1, le=1024)
    clip: float | None = Field(1.0, gt=0)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    seq_len: int = Field(64, ge=2, le=8192)
    checkpoint_every: int = Field(50, ge=1)
    keep_last: int = Field(2, ge=1, le=100)
    log_every: int = Field(10, ge=1)
    eval_every: int | None = Field(None, ge=1)
    timeout_s: float | None = Field(None, gt=0)
    resume_from: str | None = None
    queue: str = "auto"
    priority: int = Field(0, ge=0, le=9)
    max_attempts: int | None = Field(None, ge=1, le=20)

    @model_validator(mode="after")
    def _coherent(self) -> TrainSpec:
        from common.ml.families import validate_model_config

        problems: list[str] = []
        if self.steps is None and self.epochs is None:
            self.steps = 200
        if self.steps is not None and self.epochs is not None:
            problems.append("epochs: give steps or epochs, not both")
        if self.data is None:
            self.data = DataSpec(
                builtin="python-docs" if self.family in TEXT_FAMILIES else "digits"
            )
        if self.data.builtin and BUILTIN_DATA[self.data.builtin] != family_kind(self.family):
            problems.append(
                f"data.builtin: {self.data.builtin!r} is {BUILTIN_DATA[self.data.builtin]} data, "
                f"family {self.family!r} needs {family_kind(self.family)} data"
            )
        if self.family == "gpt" and isinstance(self.config.get("pretrained"), str):
            self.config["pretrained"] = confine_pretrained(self.config["pretrained"], problems)
        problems += validate_model_config(self.family, self.config)
        check_queue(self.queue, problems)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class SamplingParams(Strict):
    max_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, ge=0, le=5)
    top_k: int | None = Field(None, ge=1, le=100_000)
    top_p: float | None = Field(None, gt=0, le=1)
    num_beams: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)

    @field_validator("max_tokens")
    @classmethod
    def _cap_tokens(cls, v: int) -> int:
        cap = get_settings().max_tokens_cap
        if v > cap:
            raise ValueError(f"max_tokens must be <= {cap}")
        return v


class GenerateSpec(SamplingParams):
    """A generation job: POST /v1/jobs with type `generate`."""

    type: Literal["generate"] = "generate"
    model: str = Field(min_length=1, max_length=128)
    prompts: list[str] | None = Field(None, min_length=1, max_length=10_000)
    n: int | None = Field(None, ge=1, le=10_000)
    labels: list[int] | None = Field(None, min_length=1, max_length=10_000)
    queue: str = "auto"
    priority: int = Field(0, ge=0, le=9)
    max_attempts: int | None = Field(None, ge=1, le=20)

    @field_validator("prompts")
    @classmethod
    def _prompt_length(cls, v: list[str] | None) -> list[str] | None:
        cap = get_settings().max_prompt_chars
        for i, p in enumerate(v or []):
            if len(p) > cap:
                raise ValueError(f"prompts[{i}] is longer than {cap} characters")
        return v

    @model_validator(mode="after")
    def _what_to_generate(self) -> GenerateSpec:
        problems: list[str] = []
        if self.prompts is None and self.n is None and self.labels is None:
            problems.append("prompts: give prompts (text models) or n / labels (image models)")
        if self.labels is not None and self.n is not None and len(self.labels) not in (1, self.n):
            problems.append(f"labels: give one label for all {self.n} images or exactly n "
                            f"labels, got {len(self.labels)}")
        check_queue(self.queue, problems)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def confine_pretrained(path: str, problems: list[str]) -> str:
    """A pretrained directory resolved inside GENQ_PRETRAINED_ROOT, never elsewhere."""
    root = get_settings().pretrained_dir
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        problems.append(f"config.pretrained: must be a folder inside {root} (GENQ_PRETRAINED_ROOT)")
        return path
    return str(resolved)


def check_queue(queue: str, problems: list[str]) -> None:
    allowed = ["auto", *get_settings().queue_names]
    if queue not in allowed:
        problems.append(f"queue: {queue!r} is not one of {allowed}")


JobSpec = Annotated[TrainSpec | GenerateSpec, Field(discriminator="type")]


class Progress(BaseModel):
    done: int
    total: int
    unit: str
    rate: float | None = None
    eta_s: float | None = None


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
    model_id: str | None
    parent_id: str | None
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None


class JobList(BaseModel):
    object: str = "list"
    data: list[JobOut]
    has_more: bool
    next_cursor: str | None = None


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


class ItemList(BaseModel):
    object: str = "list"
    data: list[ItemOut]
    has_more: bool
    next_cursor: int | None = None


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
