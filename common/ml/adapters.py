"""LoRA adapters through peft, over an `lm` base or a pretrained diffusion pipeline's UNet:
wrap for training, save and load the adapter alone (peft's adapter_model.safetensors +
adapter_config.json), merge it in. The family says which modules the adapter wraps and
peft's task type (Family.adapter_targets, ADAPTER_TASK)."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from common.adapter_spec import AdapterSpec
from common.errors import CheckpointError, InvalidTrainSpec

if TYPE_CHECKING:
    from common.ml.families import AnyFamily

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def lora_config(spec: AdapterSpec, base: nn.Module, family: AnyFamily) -> Any:
    """peft's LoraConfig for the spec, over the modules the family targets; ValueError when
    they match nothing."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    # GPT-2's Conv1D stores its weight transposed: peft must know (it warns, then fixes it)
    transposed = any(isinstance(m, Conv1D) for m in base.modules())
    return LoraConfig(task_type=family.ADAPTER_TASK, r=spec.r, lora_alpha=spec.alpha,
                      lora_dropout=spec.dropout,
                      target_modules=family.adapter_targets(base, spec.target_modules),
                      fan_in_fan_out=transposed)


def with_adapter(base: nn.Module, spec: AdapterSpec, family: AnyFamily) -> nn.Module:
    """`base` wrapped with a fresh LoRA adapter: only the adapter's parameters train."""
    from peft import get_peft_model

    try:
        with quiet_peft():
            return get_peft_model(base, lora_config(spec, base, family))
    except ValueError as e:  # no default modules for the arch, or names matching no module
        message = str(e).split("\n")[0]
        raise InvalidTrainSpec(f"adapter.target_modules: {message}") from e


def adapter_problems(family: str, config: dict, spec: AdapterSpec) -> list[str]:
    """What the family and peft say of the adapter: a from-config base is built on the meta
    device (no weights allocated); a pretrained base is known only on the worker that loads
    it."""
    import torch

    from common.ml.families import get_family

    module = get_family(family)
    cfg = module.Config.model_validate(config)
    problems = module.adapter_problems(cfg)
    if problems or getattr(cfg, "pretrained", None):
        return problems
    with torch.device("meta"):
        try:
            with_adapter(module.build_model(cfg), spec, module)
        except InvalidTrainSpec as e:
            return [str(e)]
    return []


def is_adapted(model: nn.Module) -> bool:
    """Whether `model` is a peft wrapper; without importing peft (seconds) when nothing has."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def base_of(model: nn.Module) -> nn.Module:
    """The model under a peft wrapper (the model itself when there is none)."""
    return model.get_base_model() if is_adapted(model) else model  # type: ignore[operator]


def save_adapter(model: nn.Module, directory: Path) -> None:
    """The adapter's weights and config only, as peft writes them (safetensors)."""
    model.save_pretrained(str(directory), safe_serialization=True)  # type: ignore[operator]
    (Path(directory) / "README.md").unlink(missing_ok=True)  # peft's model-card stub


def load_adapter(base: nn.Module, directory: Path, *, trainable: bool = False,
                 name: str = "default") -> nn.Module:
    """`base` with the adapter saved in `directory` (as adapter `name`); CheckpointError if
    it is unusable."""
    from peft import PeftModel

    _check_files(directory)
    try:
        with quiet_peft():
            return PeftModel.from_pretrained(base, str(directory), adapter_name=name,
                                             is_trainable=trainable)
    except Exception as e:  # peft raises ValueError, RuntimeError, OSError for bad files
        raise CheckpointError(f"{directory}: adapter corrupt or not for this base ({e})") from e


def add_adapter(model: nn.Module, directory: Path, name: str) -> None:
    """Load one more adapter onto a peft model's base (inference): the base is shared."""
    _check_files(directory)
    try:
        model.load_adapter(str(directory), adapter_name=name)  # type: ignore[operator]
    except Exception as e:  # as in load_adapter
        raise CheckpointError(f"{directory}: adapter corrupt or not for this base ({e})") from e


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Without the deprecation warning peft's wrapping triggers in transformers 5 (it asks
    `is_gradient_checkpointing`), which would fill every LoRA job's log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        yield


def _check_files(directory: Path) -> None:
    if not (Path(directory) / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{Path(directory) / ADAPTER_WEIGHTS}: missing")


def merged(model: nn.Module) -> nn.Module:
    """The base with the adapter's update added into its weights (peft's merge_and_unload)."""
    return model.merge_and_unload()  # type: ignore[operator]
