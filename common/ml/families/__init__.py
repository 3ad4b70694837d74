"""Registry of model families and validation of their configs."""

from __future__ import annotations

import dataclasses
import types
import typing
from types import ModuleType

from common.ml.families import gan, gpt, lstm, vae

FAMILIES: dict[str, ModuleType] = {"vae": vae, "gan": gan, "lstm": lstm, "gpt": gpt}


def get_family(name: str) -> ModuleType:
    """Return the family module for `name`; ValueError names the choices."""
    if name not in FAMILIES:
        raise ValueError(f"family: unknown family {name!r} (choose from {', '.join(FAMILIES)})")
    return FAMILIES[name]


def _type_problem(value: object, hint: object) -> str | None:
    """Describe why `value` does not fit the type hint, or None if it does."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return None
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return None
        if option is str and isinstance(value, str):
            return None
    names = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o))
                        for o in options)
    return f"must be {names}, got {value!r}"


def validate_model_config(family: str, config: dict) -> list[str]:
    """Every problem with `config` for `family`, each naming its field; [] if it is fine."""
    if family not in FAMILIES:
        return [f"family: unknown family {family!r} (choose from {', '.join(FAMILIES)})"]
    if not isinstance(config, dict):
        return ["config: must be an object"]
    module = FAMILIES[family]
    hints = typing.get_type_hints(module.Config)
    names = [f.name for f in dataclasses.fields(module.Config)]
    problems = [
        f"config.{key}: unknown field (allowed: {', '.join(names)})"
        for key in config
        if key not in names
    ]
    typed_ok = {}
    for key, value in config.items():
        if key in names:
            problem = _type_problem(value, hints[key])
            if problem:
                problems.append(f"config.{key}: {problem}")
            else:
                typed_ok[key] = value
    for key, check, message in module.RULES:
        if key in typed_ok and typed_ok[key] is not None and not check(typed_ok[key]):
            problems.append(f"config.{key}: {message}")
    if not problems:
        problems.extend(module.check_config(module.Config(**config)))
    return problems
