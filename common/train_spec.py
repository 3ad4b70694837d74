"""The training spec, declared once: what POST /v1/jobs accepts and what run_training reads.

The API's job envelope (common/schemas.py TrainJobSpec) adds only the queue options on top;
the worker parses a job's stored spec with that same class, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.adapter_spec import AdapterSpec
from common.config import get_settings
from common.family_names import FamilyName
from common.gen_params import NotTiny, Seed
from common.ml.builtin_data import BUILTINS

if TYPE_CHECKING:
    from common.ml.families import AnyFamily


def _family(name: str) -> AnyFamily:
    """The registered family `name` (its class states the facts below)."""
    from common.ml.families import get_family  # torch: only once a family is asked about

    return get_family(name)


def family_kind(family: str) -> str:
    """What a family trains on and draws: "text" or "image"."""
    return _family(family).KIND


def generation_kind(family: str) -> str:
    """What a family's models generate from: "text", "image" (a label at most) or
    "text-to-image"."""
    from common.ml.families import TextToImageFamily

    module = _family(family)
    return "text-to-image" if isinstance(module, TextToImageFamily) else module.KIND


def takes_prompts(family: str) -> bool:
    """Whether the family's models generate for prompts (text, and text-to-image)."""
    return generation_kind(family) != "image"


def _only_the(names: list[str]) -> str:
    """'only the lm family takes', or 'only the lm and diffusion families take'."""
    if len(names) == 1:
        return f"only the {names[0]} family takes"
    return f"only the {' and '.join(names)} families take"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(Strict):
    """Training data: a built-in dataset or an uploaded file (purpose `dataset`).

    `path` is a local file: the worker sets it from file_id, and in-process callers (tests,
    benchmarks) may give it; the API refuses it (TrainJobSpec).
    """

    builtin: Literal["python-docs", "digits"] | None = None
    file_id: str | None = Field(None, min_length=1, max_length=64)
    path: str | None = Field(None, max_length=4096)

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if sum(v is not None for v in (self.builtin, self.file_id, self.path)) != 1:
            raise ValueError("give exactly one of data.builtin or data.file_id")
        return self


class TrainSpec(Strict):
    """How to train one model: the family, its config, the data and the loop's knobs."""

    family: FamilyName
    config: dict[str, Any] = Field(default_factory=dict)  # the family's Config fields
    data: DataSpec | None = None  # default: the built-in dataset of the family's kind
    steps: int | None = Field(None, ge=1, le=10_000_000)  # default 200 unless epochs is given
    epochs: int | None = Field(None, ge=1, le=100_000)
    batch_size: int = Field(16, ge=1, le=4096)
    lr: Annotated[float, NotTiny] = Field(1e-3, gt=0, le=10)
    warmup_steps: int = Field(0, ge=0, le=10_000_000)
    schedule: Literal["cosine", "constant"] = "cosine"
    optimizer: Literal["adamw", "adam", "sgd"] | None = None  # None: the family's default
    weight_decay: Annotated[float, NotTiny] = Field(0.0, ge=0, le=10)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = Field(1, ge=1, le=1024)
    clip: Annotated[float, NotTiny] | None = Field(1.0, gt=0, le=1e6)  # null: no gradient clipping
    seed: Seed = 0
    seq_len: int = Field(64, ge=2, le=8192)  # text families
    checkpoint_every: int = Field(50, ge=1, le=10_000_000)
    keep_last: int = Field(2, ge=1, le=100)
    log_every: int = Field(10, ge=1, le=10_000_000)
    # held-out loss every N steps (a tenth of the data is held out)
    eval_every: int | None = Field(None, ge=1, le=10_000_000)
    timeout_s: Annotated[float, NotTiny] | None = Field(None, gt=0, le=30 * 86_400)
    resume_from: str | None = Field(None, min_length=1, max_length=64)  # a checkpoint id
    # LoRA fine-tuning (a family with ADAPTERS: lm, a pretrained diffusion pipeline's
    # UNet); None: every weight trains
    adapter: AdapterSpec | None = None
    # recompute activations in the backward pass (less memory for large bases; lm)
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _coherent(self) -> TrainSpec:
        from common.ml.families import families_that, validate_model_config

        problems: list[str] = []
        family = _family(self.family)
        if self.steps is None and self.epochs is None:
            self._apply_recipe()
            self.steps = self.steps or 200
        if self.steps is not None and self.epochs is not None:
            problems.append("epochs: give steps or epochs, not both")
        kind = family.KIND
        if self.data is None:
            self.data = DataSpec(builtin="python-docs" if kind == "text" else "digits")
        if self.data.builtin and BUILTINS[self.data.builtin] != kind:
            problems.append(f"data.builtin: {self.data.builtin!r} is {BUILTINS[self.data.builtin]} "
                            f"data, family {self.family!r} needs {kind} data")
        for name in family.PRETRAINED_FIELDS:
            if isinstance(self.config.get(name), str):
                self.config[name] = confine_pretrained(self.config[name], problems, name)
        if self.adapter is not None and not family.ADAPTERS:
            takers = families_that(lambda f: f.ADAPTERS)
            problems.append(f"adapter: {_only_the(takers)} an adapter, not {self.family!r}")
        if self.gradient_checkpointing and not family.supports_gradient_checkpointing:
            able = families_that(lambda f: f.supports_gradient_checkpointing)
            problems.append(f"gradient_checkpointing: {' and '.join(able)} only, "
                            f"not {self.family!r}")
        problems += validate_model_config(self.family, self.config)
        if not problems:
            from common.ml.families import get_family

            family = get_family(self.family)
            problems += memory_problems(family, family.Config.model_validate(self.config),
                                        self.batch_size, self.seq_len)
        if not problems and self.adapter is not None:
            from common.ml.adapters import adapter_problems

            problems += adapter_problems(self.family, self.config, self.adapter)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _apply_recipe(self) -> None:
        """With no config and no steps, the family's recipe fills the fields the spec left
        out (the diffusion family's recipe trains a model that draws legible digits)."""
        if self.config:
            return
        for name, value in _family(self.family).RECIPE.items():
            if name not in self.model_fields_set:
                setattr(self, name, value)

    @property
    def data_source(self) -> dict[str, str]:
        """The data as the loader takes it: {"builtin": name} or {"path": local file}."""
        assert self.data is not None  # the validator fills it
        return self.data.model_dump(exclude_none=True)


def memory_problems(family: Any, cfg: Any, batch_size: int, seq_len: int) -> list[str]:
    """A batch whose activations the family estimates past GENQ_MAX_TRAIN_MEMORY_BYTES, on
    the field most to blame: seq_len where it is further past its default than batch_size
    (text families), else batch_size. `family` is a Family, `cfg` its Config."""
    need = family.train_memory(cfg, batch_size, seq_len)
    cap = get_settings().max_train_memory_bytes
    if need is None or need <= cap:
        return []
    fields = TrainSpec.model_fields
    longer = seq_len / fields["seq_len"].default > batch_size / fields["batch_size"].default
    field = "seq_len" if family.KIND == "text" and longer else "batch_size"
    batch = (f"{batch_size} sequences of {seq_len} tokens" if family.KIND == "text"
             else f"{batch_size} images")
    size = f"{need / 2**30:,.1f} GiB" if need >= 2**30 else f"{need / 2**20:,.1f} MiB"
    return [f"{field}: a batch of {batch} would need about {size} of "
            f"activation memory, more than GENQ_MAX_TRAIN_MEMORY_BYTES ({cap:,}), so lower "
            f"{field} (grad_accum keeps the effective batch)"]


def confine_pretrained(path: str, problems: list[str], name: str = "pretrained") -> str:
    """A pretrained folder resolved inside GENQ_PRETRAINED_ROOT, never elsewhere; a hub id
    `org/name` with no such folder stays as it is, for the worker to resolve."""
    from common.ml.pretrained import is_hub_id

    root = get_settings().pretrained_dir
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        problems.append(f"config.{name}: must be a folder inside {root} (GENQ_PRETRAINED_ROOT) "
                        "or a hub id org/name")
        return path
    if is_hub_id(path) and not resolved.exists():
        return path
    return str(resolved)
