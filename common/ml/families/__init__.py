"""Registry of model families and validation of their configs."""

from __future__ import annotations

import importlib
import types
import typing
import warnings
from collections.abc import Callable

import torch
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from common.config import get_settings
from common.errors import ConfigProblem, UnknownField
from common.family_names import ALIASES, CLASSES
from common.ml.families.base import (
    SUBMITTED,
    AnyFamily,
    Family,
    FamilyConfig,
    ImageFamily,
    TextFamily,
    TextToImageFamily,
)

__all__ = ["FAMILIES", "AnyFamily", "Family", "FamilyConfig", "ImageFamily", "TextFamily",
           "TextToImageFamily", "families_that", "get_family", "validate_model_config"]


def _instance(path: str) -> AnyFamily:
    """The family whose class is at `module:Class` (common.family_names.CLASSES)."""
    module, _, name = path.partition(":")
    family = getattr(importlib.import_module(module), name)()
    if not isinstance(family, TextFamily | ImageFamily | TextToImageFamily):
        raise TypeError(f"{path} is not a TextFamily, ImageFamily or TextToImageFamily")
    return family


_REGISTERED = {name: _instance(path) for name, path in CLASSES.items()}
# an alias is the same object as its family: `gpt` specs, checkpoints and models are `lm` ones
FAMILIES: dict[str, AnyFamily] = {
    **_REGISTERED, **{alias: _REGISTERED[name] for alias, name in ALIASES.items()}}


def families_that(has: Callable[[AnyFamily], bool]) -> list[str]:
    """The names (aliases aside) of the families for which `has` holds, in registry order."""
    return [name for name, family in _REGISTERED.items() if has(family)]


def get_family(name: str) -> AnyFamily:
    """Return the family registered as `name`; ValueError names the choices."""
    if name not in FAMILIES:
        raise ValueError(f"family: unknown family {name!r} (choose from {', '.join(FAMILIES)})")
    return FAMILIES[name]


def validate_model_config(family: str, config: object) -> list[str]:
    """Every problem with `config` for `family`, each naming its field; [] if it is fine.

    Unknown fields come first, then the rest in the order the config gives its keys.
    """
    if family not in FAMILIES:
        return [f"family: unknown family {family!r} (choose from {', '.join(FAMILIES)})"]
    if not isinstance(config, dict):
        return ["config: must be an object"]
    config_type = FAMILIES[family].Config
    try:
        cfg = config_type.model_validate(config, context=SUBMITTED)
    except ValidationError as e:
        order = {key: i for i, key in enumerate(config)}

        def position(error: ErrorDetails) -> tuple[bool, int]:
            key = error["loc"][0] if error["loc"] else None
            unknown = (error["type"] == "extra_forbidden"
                       or isinstance(error.get("ctx", {}).get("error"), UnknownField))
            return not unknown, order.get(key, len(order))

        return [_problem(error, config_type) for error in sorted(e.errors(), key=position)]
    return _size_problems(FAMILIES[family], cfg)


def _size_problems(family: AnyFamily, cfg: FamilyConfig) -> list[str]:
    """A model over GENQ_MAX_MODEL_PARAMS, counted on the meta device (nothing allocated)."""
    if getattr(cfg, "pretrained", None):
        return []  # its size is the directory's, not the config's
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unfitted vocabulary has zero-element tensors
        model = family.build_model(cfg)
    count = sum(p.numel() for p in model.parameters())
    cap = get_settings().max_model_params
    if count > cap:
        return [f"config: the model would have {count:,} parameters, more than "
                f"GENQ_MAX_MODEL_PARAMS ({cap:,})"]
    return []


def _problem(error: ErrorDetails, config_type: type[FamilyConfig]) -> str:
    """One pydantic error as `config.<field>: <what it must be>`."""
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, ConfigProblem):  # a problem of the whole config has no field
        return f"config.{cause}" if cause.field else f"config: {cause.args[0].removeprefix(': ')}"
    if not error["loc"]:
        return f"config: {error['msg']}"
    name = str(error["loc"][0])
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"config.{name}: unknown field (allowed: {', '.join(config_type.model_fields)})"
    field = config_type.model_fields[name]
    if kind.endswith("_type"):
        return f"config.{name}: must be {_type_names(field)}, got {error['input']!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"config.{name}: must be {_bounds(field)}"
    if kind in ("too_short", "too_long"):
        least = kind == "too_short"
        limit = error["ctx"]["min_length" if least else "max_length"]
        return f"config.{name}: must hold at {'least' if least else 'most'} {limit} item(s)"
    if kind == "literal_error":
        return f"config.{name}: must be {error['ctx']['expected']}"
    if cause is not None:  # a field validator's ValueError says what is wrong
        return f"config.{name}: {cause}"
    return f"config.{name}: {error['msg']}"


def _type_names(field: FieldInfo) -> str:
    """'int', or 'str or null' for an optional field."""
    hint = field.annotation
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    return " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o))
                       for o in options)


def _bounds(field: FieldInfo) -> str:
    """'>= 1', or 'in [0, 1)' for a field bounded on both sides."""
    lower = [(m.ge, "[", ">=") if hasattr(m, "ge") else (m.gt, "(", ">")
             for m in field.metadata if hasattr(m, "ge") or hasattr(m, "gt")]
    upper = [(m.le, "]", "<=") if hasattr(m, "le") else (m.lt, ")", "<")
             for m in field.metadata if hasattr(m, "le") or hasattr(m, "lt")]
    if lower and upper:
        (low, opening, _), (high, closing, _) = lower[0], upper[0]
        return f"in {opening}{low}, {high}{closing}"
    return " and ".join(f"{op} {value}" for value, _, op in lower + upper)
