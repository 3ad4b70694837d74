"""The `adapter` of a training spec (common/train_spec.py), declared once: what the API
accepts, the worker trains (common/ml/adapters.py) and a registered model records."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from common.gen_params import NotTiny

# A module name as peft matches it: a suffix of a dotted module path (q_proj, attn.c_attn)
ModuleName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.]+$")]


class AdapterSpec(BaseModel):
    """A LoRA adapter (peft) over an `lm` base or a pretrained diffusion pipeline's UNet:
    only its matrices train."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, le=1024)  # the rank of each update B @ A
    alpha: int = Field(16, ge=1, le=65_536)  # the update is scaled by alpha / r
    dropout: Annotated[float, NotTiny] = Field(0.0, ge=0, lt=1)  # on the adapter's input
    # None: peft's default modules for the architecture (a UNet: to_q, to_k, to_v, to_out.0);
    # "all-linear": every linear but the head (of a diffusion model: the UNet's)
    target_modules: list[ModuleName] | Literal["all-linear"] | None = None
    merge: bool = False  # register the merged full weights instead of base + adapter

    @field_validator("target_modules", mode="wrap")
    @classmethod
    def _names_or_all_linear(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Errors of the branch the value meant (each branch of the union would report)."""
        if value is None or value == "all-linear":
            return value
        if not isinstance(value, list):
            raise ValueError(f"must be a list of module names or 'all-linear', got {value!r}")
        return _MODULE_NAMES.validate_python(value)


_MODULE_NAMES = TypeAdapter(Annotated[list[ModuleName], Field(min_length=1, max_length=256)])
