"""Datasets: the built-ins (python-docs, digits) and uploaded text or image files.

A .jsonl file's first line decides its format, and every line must follow it: `{"text"}`
lines are one corpus (as a .txt file), `{"messages": [...]}` lines are chats and
`{"prompt", "completion"}` lines are prompt/completion pairs; the last two are examples,
trained one per sequence with the loss on assistant messages or on the completion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.chat import ChatMessage, as_dicts, render_fallback
from common.errors import DataError, pydantic_problems
from common.ml.builtin_data import BUILTINS

TEXT_SUFFIXES = (".txt", ".jsonl")
MODES = {1: "L", 3: "RGB", 4: "RGBA"}
MAX_SIDE = 4096  # the image families' height/width bound


class ChatExample(BaseModel):
    """A `{"messages": [...]}` line: the loss is taken on the assistant messages."""

    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] = Field(min_length=1)

    @field_validator("messages")
    @classmethod
    def _has_an_answer(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "assistant" for m in messages):
            raise ValueError("needs at least one assistant message (the loss is taken on them)")
        return messages

    def rendered(self) -> str:
        return render_fallback(as_dicts(self.messages), False)


class PromptCompletion(BaseModel):
    """A `{"prompt", "completion"}` line: the loss is taken on the completion."""

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: str
    completion: str = Field(min_length=1)

    def rendered(self) -> str:
        return self.prompt + self.completion


Example = ChatExample | PromptCompletion


@dataclass
class TextData:
    """A training corpus as one string; for example data (chat, prompt/completion) also the
    examples, and `text` is them rendered with the fallback template (to fit a tokenizer)."""

    text: str
    source: str
    examples: list[Example] | None = None


@dataclass
class ImageData:
    """Images (N, C, H, W) as float32 in [0, 1], with optional integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    source: str

    @property
    def n_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1


Dataset = TextData | ImageData


def validate_data(data: dict, family_kind: str) -> list[str]:
    """Every problem with the data spec for a family of `family_kind`; [] if it loads."""
    try:
        load_data(data, family_kind)
    except DataError as e:
        return e.problems
    return []


def load_data(data: dict, family_kind: str) -> Dataset:
    """Load the dataset named by `data`; raise DataError listing every problem."""
    if not isinstance(data, dict):
        raise DataError(["data: must be an object with 'builtin' or 'path'"])
    data = {k: v for k, v in data.items() if v is not None}
    problems = [f"data.{k}: unknown field (allowed: builtin, path)" for k in data
                if k not in ("builtin", "path")]
    if ("builtin" in data) == ("path" in data):
        problems.append("data: give exactly one of 'builtin' or 'path'")
    if problems:
        raise DataError(problems)
    if "builtin" in data:
        return _load_builtin(data["builtin"], family_kind)
    return _load_path(data["path"], family_kind)


def _load_builtin(name: object, family_kind: str) -> Dataset:
    if name not in BUILTINS:
        raise DataError([f"data.builtin: unknown dataset {name!r} "
                         f"(choose from {', '.join(BUILTINS)})"])
    if BUILTINS[name] != family_kind:
        raise DataError([f"data.builtin: {name!r} is {BUILTINS[name]} data but the family "
                         f"needs {family_kind} data"])
    if name == "python-docs":
        from pydoc_data.topics import topics

        return TextData(text="\n\n".join(topics.values()), source="builtin:python-docs")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.long)
    return ImageData(images=images, labels=labels, source="builtin:digits")


def _load_path(raw: object, family_kind: str) -> Dataset:
    if not isinstance(raw, str) or not raw:
        raise DataError(["data.path: must be a non-empty string"])
    path = Path(raw)
    if not path.exists():
        raise DataError([f"data.path: {raw} does not exist"])
    kind = "image" if path.is_dir() or path.suffix == ".npz" else "text"
    if not path.is_dir() and path.suffix not in (*TEXT_SUFFIXES, ".npz"):
        raise DataError([f"data.path: unsupported file type {path.suffix!r} "
                         "(text: .txt, .jsonl; images: .npz or a directory of .png)"])
    if kind != family_kind:
        raise DataError([f"data.path: {path.name} is {kind} data but the family needs "
                         f"{family_kind} data"])
    if path.is_dir():
        return _load_png_dir(path)
    if path.suffix == ".npz":
        return _load_npz(path)
    return _load_text(path)


def _load_text(path: Path) -> TextData:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError([f"data.path: {path.name} is not UTF-8 text ({e.reason})"]) from e
    if path.suffix == ".jsonl":
        return _load_jsonl(path, raw)
    if len(raw.strip()) < 2:
        raise DataError([f"data.path: {path.name} has no text to train on"])
    return TextData(text=raw, source=str(path))


class TextLine(BaseModel):
    """A `{"text"}` line of a plain corpus."""

    model_config = ConfigDict(extra="ignore", strict=True)

    text: str


# the key that marks a line's format, checked in this order
LINE_FORMATS: dict[str, type[BaseModel]] = {"text": TextLine, "messages": ChatExample,
                                            "prompt": PromptCompletion,
                                            "completion": PromptCompletion}
FORMAT_NAMES = {TextLine: "text", ChatExample: "chat", PromptCompletion: "prompt/completion"}


def _line_format(row: dict) -> type[BaseModel]:
    return next((LINE_FORMATS[k] for k in LINE_FORMATS if k in row), TextLine)


def _load_jsonl(path: Path, raw: str) -> TextData:
    """`text`, chat or prompt/completion lines, the format set by the first line."""
    texts: list[str] = []
    examples: list[Example] = []
    problems: list[str] = []
    line_type: type[BaseModel] | None = None
    for n, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"data.path: {path.name} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: invalid JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: must be a JSON object")
            continue
        line_type = line_type or _line_format(row)
        if _line_format(row) is not line_type:
            problems.append(f"{where}: a {FORMAT_NAMES[_line_format(row)]} line in a "
                            f"{FORMAT_NAMES[line_type]} file (its first line sets the format)")
            continue
        try:
            parsed = line_type.model_validate(row)
        except ValidationError as e:
            problems += [f"{where}: {p}" for p in pydantic_problems(e)]
            continue
        if isinstance(parsed, TextLine):
            texts.append(parsed.text)
        else:
            assert isinstance(parsed, ChatExample | PromptCompletion)
            examples.append(parsed)
    if problems:
        raise DataError(problems[:10] + ([f"... and {len(problems) - 10} more"]
                                         if len(problems) > 10 else []))
    if line_type in (None, TextLine):
        text = "\n\n".join(texts)
        if len(text.strip()) < 2:
            raise DataError([f"data.path: {path.name} has no text to train on"])
        return TextData(text=text, source=str(path))
    return TextData(text="\n\n".join(e.rendered() for e in examples), source=str(path),
                    examples=examples)



def _load_npz(path: Path) -> ImageData:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except Exception as e:  # zipfile, pickle and value errors all mean "not a usable npz"
        raise DataError([f"data.path: {path.name} is not a readable .npz file ({e})"]) from e
    if "images" not in arrays:
        raise DataError([f"data.path: {path.name} has no 'images' array "
                         f"(found: {', '.join(arrays) or 'nothing'})"])
    problems = []
    images = arrays["images"]
    if images.ndim not in (3, 4) or 0 in images.shape:
        problems.append(f"data.path: 'images' must be (N, H, W) or (N, H, W, C) with every "
                        f"size >= 1, got shape {images.shape}")
    elif max(images.shape[1:3]) > MAX_SIDE:
        problems.append(f"data.path: images must be at most {MAX_SIDE} pixels a side, got "
                        f"{images.shape[1]}x{images.shape[2]}")
    elif images.ndim == 4 and images.shape[-1] not in MODES:
        problems.append(f"data.path: 'images' must have 1, 3 or 4 channels, "
                        f"got {images.shape[-1]}")
    if not (np.issubdtype(images.dtype, np.number) and not np.issubdtype(images.dtype,
                                                                          np.complexfloating)):
        problems.append(f"data.path: 'images' must be numeric, got {images.dtype}")
    elif images.size and not np.isfinite(images).all():
        problems.append("data.path: 'images' contains nan or inf")
    elif images.size and (images.min() < 0 or images.max() > 255):
        problems.append("data.path: 'images' values must be in [0, 1] or [0, 255]")
    labels = arrays.get("labels")
    if labels is not None:
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            problems.append(f"data.path: 'labels' must be 1-D integers, got {labels.dtype} "
                            f"{labels.shape}")
        elif images.ndim in (3, 4) and len(labels) != images.shape[0]:
            problems.append(f"data.path: 'labels' has {len(labels)} entries for "
                            f"{images.shape[0]} images")
        elif labels.size and labels.min() < 0:
            problems.append("data.path: 'labels' must be >= 0")
    if problems:
        raise DataError(problems)
    return ImageData(images=_to_tensor(images), labels=None if labels is None
                     else torch.tensor(labels, dtype=torch.long), source=str(path))


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W[, C]) in [0, 255] or [0, 1] -> float32 (N, C, H, W) in [0, 1]."""
    x = torch.tensor(images.astype(np.float32))
    if images.dtype == np.uint8 or float(x.max()) > 1.0:
        x = x / 255.0
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    return x.permute(0, 3, 1, 2).contiguous()


def _load_png_dir(path: Path) -> ImageData:
    """PNGs directly in `path` (unlabeled) or in integer-named subfolders (labelled)."""
    from PIL import Image

    files = sorted(path.glob("*.png"))
    labelled = sorted(p for p in path.glob("*/*.png") if p.parent.name.isdigit())
    if not files and not labelled:
        raise DataError([f"data.path: {path} has no .png files"])
    use = files or labelled
    arrays, problems = [], []
    for file in use:
        try:
            with Image.open(file) as im:  # reads the header only, until the pixels are asked
                if max(im.size) > MAX_SIDE:
                    problems.append(f"data.path: {file.name} is {im.width}x{im.height}; images "
                                    f"must be at most {MAX_SIDE} pixels a side")
                    continue
                ok = im if im.mode in ("L", "RGB", "RGBA") else im.convert("RGB")
                arrays.append(np.asarray(ok))
        except Exception as e:  # PIL raises many types for a bad file
            problems.append(f"data.path: {file.name} is not a readable PNG ({e})")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        problems.append(f"data.path: all PNGs must have the same size and mode, "
                        f"found {sorted(shapes)}")
    if problems:
        raise DataError(problems[:10])
    labels = None if files else torch.tensor([int(p.parent.name) for p in use])
    return ImageData(images=_to_tensor(np.stack(arrays)), labels=labels, source=str(path))
