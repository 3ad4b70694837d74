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
import math
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
import numpy.lib.format as npformat
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.chat import ChatMessage, as_dicts, render_fallback
from common.config import get_settings
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
    """Every problem with the data spec for a family of `family_kind`; [] if it loads.

    Images are checked without holding them: sizes and the GENQ_MAX_DECODED_BYTES budget from
    the headers first, then the pixels one image (or one chunk of an .npz array) at a time,
    so validating costs the API process at most one image's memory."""
    try:
        _dataset(data, family_kind, decode=False)
    except DataError as e:
        return e.problems
    return []


def load_data(data: dict, family_kind: str) -> Dataset:
    """Load the dataset named by `data`; raise DataError listing every problem."""
    dataset = _dataset(data, family_kind, decode=True)
    assert dataset is not None  # decode=True always returns the data
    return dataset


def _dataset(data: dict, family_kind: str, *, decode: bool) -> Dataset | None:
    """The dataset, or with decode=False only its checks (None: every check passed)."""
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
    return _load_path(data["path"], family_kind, decode)


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


def _load_path(raw: object, family_kind: str, decode: bool) -> Dataset | None:
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
        if (path / METADATA).is_file():
            return _load_image_folder(path, decode)
        return _load_png_dir(path, decode)
    if path.suffix == ".npz":
        return _load_npz(path, decode)
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


FLOAT_BYTES = 4  # images are held as float32 (ImageData), whatever they were stored as
LABEL_BYTES = 8  # labels as int64
CHUNK_BYTES = 16 << 20  # of an .npz array read at a time while checking its values


def _budget_problem(name: str, nbytes: int, what: str) -> str | None:
    """The problem with `nbytes` of decoded images past GENQ_MAX_DECODED_BYTES, else None."""
    cap = get_settings().max_decoded_bytes
    if nbytes <= cap:
        return None
    return (f"data.path: {name} decodes to {nbytes:,} bytes ({what}), more than "
            f"GENQ_MAX_DECODED_BYTES ({cap:,})")


@dataclass
class NpyHeader:
    """An .npz member's shape and dtype, read without decoding its data."""

    member: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def count(self) -> int:
        return math.prod(self.shape)


def _read_npy_header(stream: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the .npy file `stream` starts with; it is left at the data."""
    version = npformat.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = npformat.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = npformat.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return shape, dtype


def _npz_headers(path: Path) -> dict[str, NpyHeader]:
    """Each array of an .npz by name (as np.load names them), from its header alone."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as stream:
                    shape, dtype = _read_npy_header(stream)
                name = info.filename.removesuffix(".npy")
                headers[name] = NpyHeader(info.filename, shape, dtype)
    except Exception as e:  # zipfile, header and value errors all mean "not a usable npz"
        raise DataError([f"data.path: {path.name} is not a readable .npz file ({e})"]) from e
    return headers


def _npz_chunks(path: Path, header: NpyHeader) -> Iterator[np.ndarray]:
    """The values of one .npz array a chunk at a time (in its storage order)."""
    per = max(1, CHUNK_BYTES // max(1, header.dtype.itemsize))
    try:
        with zipfile.ZipFile(path) as archive, archive.open(header.member) as stream:
            _read_npy_header(stream)
            left = header.count
            while left:
                n = min(per, left)
                raw = stream.read(n * header.dtype.itemsize)
                if len(raw) < n * header.dtype.itemsize:
                    raise ValueError(f"'{header.member}' ends early")
                yield np.frombuffer(raw, header.dtype)
                left -= n
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError([f"data.path: {path.name} is not a readable .npz file ({e})"]) from e


def _image_shape_problems(path: Path, images: NpyHeader, labels: NpyHeader | None) -> list[str]:
    """What is wrong with the images' shape and type, and the decoded-size budget."""
    problems = []
    shape = images.shape
    if len(shape) not in (3, 4) or 0 in shape:
        problems.append(f"data.path: 'images' must be (N, H, W) or (N, H, W, C) with every "
                        f"size >= 1, got shape {shape}")
    elif max(shape[1:3]) > MAX_SIDE:
        problems.append(f"data.path: images must be at most {MAX_SIDE} pixels a side, got "
                        f"{shape[1]}x{shape[2]}")
    elif len(shape) == 4 and shape[-1] not in MODES:
        problems.append(f"data.path: 'images' must have 1, 3 or 4 channels, got {shape[-1]}")
    else:
        nbytes = images.count * FLOAT_BYTES + (labels.count * LABEL_BYTES if labels else 0)
        side = "x".join(str(d) for d in shape[1:])
        over = _budget_problem(path.name, nbytes, f"{shape[0]:,} images of {side} as float32")
        problems += [over] if over else []
    if not (np.issubdtype(images.dtype, np.number)
            and not np.issubdtype(images.dtype, np.complexfloating)):
        problems.append(f"data.path: 'images' must be numeric, got {images.dtype}")
    return problems


def _label_shape_problems(images: NpyHeader, labels: NpyHeader | None) -> list[str]:
    if labels is None:
        return []
    if len(labels.shape) != 1 or not np.issubdtype(labels.dtype, np.integer):
        return [f"data.path: 'labels' must be 1-D integers, got {labels.dtype} {labels.shape}"]
    if len(images.shape) in (3, 4) and labels.shape[0] != images.shape[0]:
        return [f"data.path: 'labels' has {labels.shape[0]} entries for {images.shape[0]} "
                "images"]
    return []


def _pixel_problems(chunks: Iterable[np.ndarray]) -> list[str]:
    """What is wrong with the images' values, read a chunk at a time: nothing is held."""
    low, high = math.inf, -math.inf
    for chunk in chunks:
        if not chunk.size:
            continue
        if not np.isfinite(chunk).all():
            return ["data.path: 'images' contains nan or inf"]
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    if low < 0 or high > 255:
        return ["data.path: 'images' values must be in [0, 1] or [0, 255]"]
    return []


def _label_value_problems(chunks: Iterable[np.ndarray]) -> list[str]:
    if any(chunk.size and chunk.min() < 0 for chunk in chunks):
        return ["data.path: 'labels' must be >= 0"]
    return []


def _load_npz(path: Path, decode: bool) -> ImageData | None:
    """`images` and optional `labels`: their headers are checked (shapes, types and the
    decoded-size budget) before anything is decoded, and the other arrays never are."""
    headers = _npz_headers(path)
    if "images" not in headers:
        raise DataError([f"data.path: {path.name} has no 'images' array "
                         f"(found: {', '.join(headers) or 'nothing'})"])
    images, labels = headers["images"], headers.get("labels")
    problems, label_problems = _image_shape_problems(path, images, labels), \
        _label_shape_problems(images, labels)
    if problems:
        raise DataError(problems + label_problems)
    with_labels = labels is not None and not label_problems
    pixels: np.ndarray | None = None
    ids: np.ndarray | None = None
    if decode:
        try:
            with np.load(path, allow_pickle=False) as archive:
                pixels = archive["images"]
                ids = archive["labels"] if with_labels else None
        except Exception as e:  # a member whose data is cut short or corrupt
            raise DataError([f"data.path: {path.name} is not a readable .npz file ({e})"]) from e
    problems = _pixel_problems(_npz_chunks(path, images) if pixels is None else [pixels])
    problems += label_problems
    if with_labels:
        assert labels is not None
        problems += _label_value_problems(_npz_chunks(path, labels) if ids is None else [ids])
    if problems:
        raise DataError(problems)
    if pixels is None:
        return None
    return ImageData(images=_to_tensor(pixels), labels=None if ids is None
                     else torch.tensor(ids, dtype=torch.long), source=str(path))


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W[, C]) in [0, 255] or [0, 1] -> float32 (N, C, H, W) in [0, 1]."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))
    if images.dtype == np.uint8 or float(x.max()) > 1.0:
        x = x / 255.0
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    return x.permute(0, 3, 1, 2).contiguous()


@dataclass
class ImageHeader:
    """An image file's size and mode, read from its header (no pixels decoded)."""

    file: Path
    name: str
    width: int
    height: int
    mode: str

    def nbytes(self, mode: str | None = None) -> int:
        """Its pixels decoded in `mode` (default: as _read_image picks) as float32."""
        mode = mode or (self.mode if self.mode in MODES.values() else "RGB")
        return self.width * self.height * len(mode) * FLOAT_BYTES


def _image_header(file: Path, name: str) -> ImageHeader:
    """The size and mode of an image; a ValueError naming it as `name` if it is unreadable
    or past MAX_SIDE a side."""
    from PIL import Image

    kind = "PNG" if file.suffix.lower() == ".png" else "JPEG"
    try:
        with Image.open(file) as im:  # reads the header only, until the pixels are asked
            (width, height), mode = im.size, im.mode
    except Exception as e:  # PIL raises many types for a bad file
        said = str(e).replace(str(file), name)  # PIL names the file by its (temporary) path
        raise ValueError(f"{name} is not a readable {kind} ({said})") from e
    if max(width, height) > MAX_SIDE:
        raise ValueError(f"{name} is {width}x{height}; images must be at most {MAX_SIDE} "
                         "pixels a side")
    return ImageHeader(file, name, width, height, mode)


def _read_image(header: ImageHeader, mode: str | None = None) -> np.ndarray:
    """An image's pixels (H, W[, C]) in `mode` (default: its own if L, RGB or RGBA, else RGB);
    a ValueError naming it if they cannot be decoded."""
    from PIL import Image

    kind = "PNG" if header.file.suffix.lower() == ".png" else "JPEG"
    try:
        with Image.open(header.file) as im:
            mode = mode or (im.mode if im.mode in MODES.values() else "RGB")
            return np.asarray(im if im.mode == mode else im.convert(mode))
    except Exception as e:  # PIL raises many types for a bad file
        said = str(e).replace(str(header.file), header.name)
        raise ValueError(f"{header.name} is not a readable {kind} ({said})") from e


def _images_budget(path: Path, headers: list[ImageHeader], mode: str | None = None) -> None:
    """DataError if one image, or all of them together, decode past GENQ_MAX_DECODED_BYTES."""
    total = 0
    for h in headers:
        total += h.nbytes(mode)
        alone = _budget_problem(h.name, h.nbytes(mode), f"{h.width}x{h.height} {mode or h.mode}")
        if alone:
            raise DataError([alone])
    over = _budget_problem(path.name, total, f"{len(headers):,} images as float32")
    if over:
        raise DataError([over])


def _load_png_dir(path: Path, decode: bool) -> ImageData | None:
    """PNGs directly in `path` (unlabeled) or in integer-named subfolders (labelled)."""
    files = sorted(path.glob("*.png"))
    labelled = sorted(p for p in path.glob("*/*.png") if p.parent.name.isdigit())
    if not files and not labelled:
        raise DataError([f"data.path: {path} has no .png files"])
    use = files or labelled
    headers, problems = [], []
    for file in use:
        try:
            headers.append(_image_header(file, file.name))
        except ValueError as e:
            problems.append(f"data.path: {e}")
    if problems:
        raise DataError(problems[:10])
    _images_budget(path, headers)
    arrays, shapes = [], set()
    for header in headers:
        try:
            pixels = _read_image(header)
        except ValueError as e:
            problems.append(f"data.path: {e}")
            continue
        shapes.add(pixels.shape)
        if decode:  # else each image is dropped once read: validating holds one at a time
            arrays.append(pixels)
    if len(shapes) > 1:
        problems.append(f"data.path: all PNGs must have the same size and mode, "
                        f"found {sorted(shapes)}")
    if problems:
        raise DataError(problems[:10])
    if not decode:
        return None
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


def _load_image_folder(path: Path, decode: bool) -> ImageData | None:
    """The images metadata.jsonl names, in its order, captioned by its `text`; the folder's
    other files are ignored. All must share a size; each takes the first one's mode."""
    entries, problems = _metadata_entries(path)
    if not entries and not problems:
        raise DataError([f"data.path: {METADATA} has no lines (one per image: "
                         '{"file_name": ..., "text": ...})'])
    headers: list[tuple[int, ImageHeader, str]] = []  # each image, its line and caption
    first: tuple[int, ImageHeader] | None = None
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
            header = _image_header(path / relative, name)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        if first is None:  # the first readable image sets the mode and the size
            first = (n, header)
        elif (header.width, header.height) != (first[1].width, first[1].height):
            problems.append(f"{where}: {name} is {header.width}x{header.height} but line "
                            f"{first[0]}'s {first[1].name} is {first[1].width}x"
                            f"{first[1].height} (all images must be the same size)")
            continue
        headers.append((n, header, entry.text))
    if problems:
        raise DataError(_first_ten(problems))
    assert first is not None  # no problems, and at least one line
    mode = first[1].mode if first[1].mode in MODES.values() else "RGB"
    _images_budget(path, [h for _, h, _ in headers], mode)
    arrays = []
    for n, header, _ in headers:
        try:
            pixels = _read_image(header, mode)
        except ValueError as e:
            problems.append(f"data.path: {METADATA} line {n}: {e}")
            continue
        if decode:  # else each image is dropped once read: validating holds one at a time
            arrays.append(pixels)
    if problems:
        raise DataError(_first_ten(problems))
    if not decode:
        return None
    return ImageData(images=_to_tensor(np.stack(arrays)), labels=None, source=str(path),
                     captions=[caption for _, _, caption in headers])
