"""Datasets: the built-ins (python-docs, digits) and uploaded text or image files.

A .jsonl file's first line decides its format, and every line must follow it: `{"text"}`
lines are one corpus (as a .txt file), `{"messages": [...]}` lines are chats and
`{"prompt", "completion"}` lines are prompt/completion pairs; the last two are examples,
trained one per sequence with the loss on assistant messages or on the completion.

An image dataset is an .npz (`images`, optional `labels`), a folder of PNGs (flat, or in
integer-named label folders) or a Hugging Face imagefolder: PNG and JPEG images (.png, .jpg,
.jpeg; subfolders allowed) beside a `metadata.jsonl` whose `{"file_name", "text"}` lines name
each image (relative to that file) and caption it, loaded in the lines' order and converted
to the first image's mode. An uploaded .zip holding either folder is extracted first.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.chat import ChatMessage, as_dicts, render_fallback
from common.errors import DataError, pydantic_problems
from common.gen_params import MAX_SIDE
from common.ml.builtin_data import BUILTINS

TEXT_SUFFIXES = (".txt", ".jsonl")
MODES = {1: "L", 3: "RGB", 4: "RGBA"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
METADATA = "metadata.jsonl"  # an imagefolder's captions, as Hugging Face datasets names it


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
    """Images (N, C, H, W) as float32 in [0, 1], with optional integer labels (N,) and
    captions (N strings, what the text-to-image family trains on)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    source: str
    captions: list[str] | None = None

    def part(self, start: int, stop: int) -> ImageData:
        """Images [start, stop) with their labels and captions."""
        return ImageData(self.images[start:stop],
                         None if self.labels is None else self.labels[start:stop], self.source,
                         None if self.captions is None else self.captions[start:stop])

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
    return ImageData(images=images, labels=labels, source="builtin:digits",
                     captions=[digit_caption(int(d)) for d in digits.target])


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_caption(digit: int) -> str:
    """The built-in digits' caption of an image: "a handwritten digit seven"."""
    return f"a handwritten digit {DIGIT_WORDS[digit]}"


def _load_path(raw: object, family_kind: str) -> Dataset:
    if not isinstance(raw, str) or not raw:
        raise DataError(["data.path: must be a non-empty string"])
    path = Path(raw)
    if not path.exists():
        raise DataError([f"data.path: {raw} does not exist"])
    kind = "image" if path.is_dir() or path.suffix == ".npz" else "text"
    if not path.is_dir() and path.suffix not in (*TEXT_SUFFIXES, ".npz"):
        raise DataError([f"data.path: unsupported file type {path.suffix!r} "
                         "(text: .txt, .jsonl; images: .npz, or a directory of .png or "
                         f"with a {METADATA})"])
    if kind != family_kind:
        raise DataError([f"data.path: {path.name} is {kind} data but the family needs "
                         f"{family_kind} data"])
    if path.is_dir():
        return _load_image_folder(path) if (path / METADATA).is_file() else _load_png_dir(path)
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


def _json_objects(raw: str, name: str, problems: list[str]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each JSON-object line of a .jsonl text; a line that is
    not one is a problem naming it (blank lines are skipped)."""
    for n, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"data.path: {name} line {n}: invalid JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"data.path: {name} line {n}: must be a JSON object")
            continue
        yield n, row


def _load_jsonl(path: Path, raw: str) -> TextData:
    """`text`, chat or prompt/completion lines, the format set by the first line."""
    texts: list[str] = []
    examples: list[Example] = []
    problems: list[str] = []
    line_type: type[BaseModel] | None = None
    for n, row in _json_objects(raw, path.name, problems):
        where = f"data.path: {path.name} line {n}"
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
        raise DataError(_first_ten(problems))
    if line_type in (None, TextLine):
        text = "\n\n".join(texts)
        if len(text.strip()) < 2:
            raise DataError([f"data.path: {path.name} has no text to train on"])
        return TextData(text=text, source=str(path))
    return TextData(text="\n\n".join(e.rendered() for e in examples), source=str(path),
                    examples=examples)


def _first_ten(problems: list[str]) -> list[str]:
    """At most ten problems, and how many more there were."""
    return problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])


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


def _read_image(file: Path, name: str, mode: str | None = None) -> np.ndarray:
    """An image's pixels (H, W[, C]) in `mode` (default: its own if L, RGB or RGBA, else RGB);
    a ValueError naming it as `name` if it is unreadable or past MAX_SIDE a side."""
    from PIL import Image

    kind = "PNG" if file.suffix.lower() == ".png" else "JPEG"
    try:
        with Image.open(file) as im:  # reads the header only, until the pixels are asked
            width, height = im.size
            if max(width, height) <= MAX_SIDE:
                mode = mode or (im.mode if im.mode in MODES.values() else "RGB")
                return np.asarray(im if im.mode == mode else im.convert(mode))
    except Exception as e:  # PIL raises many types for a bad file
        said = str(e).replace(str(file), name)  # PIL names the file by its (temporary) path
        raise ValueError(f"{name} is not a readable {kind} ({said})") from e
    raise ValueError(f"{name} is {width}x{height}; images must be at most {MAX_SIDE} pixels "
                     "a side")


def _load_png_dir(path: Path) -> ImageData:
    """PNGs directly in `path` (unlabeled) or in integer-named subfolders (labelled)."""
    files = sorted(path.glob("*.png"))
    labelled = sorted(p for p in path.glob("*/*.png") if p.parent.name.isdigit())
    if not files and not labelled:
        raise DataError([f"data.path: {path} has no .png files"])
    use = files or labelled
    arrays, problems = [], []
    for file in use:
        try:
            arrays.append(_read_image(file, file.name))
        except ValueError as e:
            problems.append(f"data.path: {e}")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        problems.append(f"data.path: all PNGs must have the same size and mode, "
                        f"found {sorted(shapes)}")
    if problems:
        raise DataError(problems[:10])
    labels = None if files else torch.tensor([int(p.parent.name) for p in use])
    return ImageData(images=_to_tensor(np.stack(arrays)), labels=labels, source=str(path))


class CaptionedImage(BaseModel):
    """A metadata.jsonl line of an imagefolder: an image's path from the folder, its caption."""

    model_config = ConfigDict(extra="ignore", strict=True)

    file_name: str = Field(min_length=1)
    text: str


def _metadata_entries(path: Path) -> tuple[list[tuple[int, CaptionedImage]], list[str]]:
    """The valid lines of `path`/metadata.jsonl with their line numbers, and every problem."""
    try:
        raw = (path / METADATA).read_text(encoding="utf-8-sig")  # a BOM is not part of line 1
    except UnicodeDecodeError as e:
        raise DataError([f"data.path: {METADATA} is not UTF-8 text ({e.reason})"]) from e
    entries: list[tuple[int, CaptionedImage]] = []
    problems: list[str] = []
    for n, row in _json_objects(raw, METADATA, problems):
        where = f"data.path: {METADATA} line {n}"
        try:
            entries.append((n, CaptionedImage.model_validate(row)))
        except ValidationError as e:
            if isinstance(row.get("file_name"), str) and row["file_name"]:
                where += f": {row['file_name']}"
            problems += [f"{where}: a missing caption (no 'text')" if p == "text: Field required"
                         else f"{where}: {p}" for p in pydantic_problems(e)]
    return entries, problems


def _load_image_folder(path: Path) -> ImageData:
    """The images metadata.jsonl names, in its order, captioned by its `text`; the folder's
    other files are ignored. All must share a size; each takes the first one's mode."""
    entries, problems = _metadata_entries(path)
    if not entries and not problems:
        raise DataError([f"data.path: {METADATA} has no lines (one per image: "
                         '{"file_name": ..., "text": ...})'])
    arrays, captions = [], []
    mode, first = None, ""
    for n, entry in entries:
        where, name = f"data.path: {METADATA} line {n}", entry.file_name
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts:
            problems.append(f"{where}: {name} leaves the folder of {METADATA} (file_name must "
                            "be a relative path, without '..')")
            continue
        if relative.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(f"{where}: {name} is not a PNG or JPEG "
                            f"({', '.join(IMAGE_SUFFIXES)})")
            continue
        if not (path / relative).is_file():
            problems.append(f"{where}: {name} does not exist")
            continue
        try:
            pixels = _read_image(path / relative, name, mode)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        if mode is None:  # the first readable image sets the mode and the size
            mode, first = MODES[pixels.shape[2] if pixels.ndim == 3 else 1], f"line {n}'s {name}"
        elif pixels.shape[:2] != arrays[0].shape[:2]:
            problems.append(f"{where}: {name} is {pixels.shape[1]}x{pixels.shape[0]} but {first} "
                            f"is {arrays[0].shape[1]}x{arrays[0].shape[0]} (all images must be "
                            "the same size)")
            continue
        arrays.append(pixels)
        captions.append(entry.text)
    if problems:
        raise DataError(_first_ten(problems))
    return ImageData(images=_to_tensor(np.stack(arrays)), labels=None, source=str(path),
                     captions=captions)
