"""Uploaded image zips: Hugging Face imagefolders (images + metadata.jsonl captions) and the
PNG folders before them, extracted safely and loaded with every problem named."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import InvalidSpec
from common.files import dataset_path
from common.ml.data import MAX_SIDE, ImageData, load_data, validate_data
from common.models import File
from common.storage import Storage


def image(size: tuple[int, int] = (8, 8), mode: str = "RGB", fmt: str = "PNG",
          color: int | tuple[int, ...] = 0) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt)
    return buf.getvalue()


def metadata(*rows: object) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


def extract(tmp_path: Path, members: dict[str, bytes]) -> Path:
    """Upload a zip of `members` to a local store and extract it as a job would."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    storage = Storage(str(tmp_path / "store"))
    uri = storage.put_bytes("files/file-test", archive.getvalue())
    file = File(id="file-test", owner="o", purpose="dataset", filename="upload.zip", uri=uri)
    return dataset_path(storage, file, tmp_path / "cache")


def load(folder: Path) -> ImageData:
    loaded = load_data({"path": str(folder)}, "image")
    assert isinstance(loaded, ImageData)
    return loaded


def test_an_imagefolder_loads_captioned_in_metadata_order(tmp_path: Path) -> None:
    """PNG and JPEG, in a top folder and a nested one; greyscale converts to the first's RGB;
    an image metadata.jsonl does not name is ignored."""
    folder = extract(tmp_path, {
        "birds/metadata.jsonl": metadata(
            {"file_name": "red.png", "text": "a red square", "source": "extra keys are fine"},
            {"file_name": "night/grey.jpg", "text": "a grey square"},
            {"file_name": "night/white.jpeg", "text": ""}),
        "birds/red.png": image(color=(255, 0, 0)),
        "birds/night/grey.jpg": image(mode="L", fmt="JPEG", color=128),
        "birds/night/white.jpeg": image(fmt="JPEG", color=(255, 255, 255)),
        "birds/unlisted.png": image(size=(16, 16)),
    })
    data = load(folder)
    assert data.captions == ["a red square", "a grey square", ""]
    assert data.labels is None
    assert data.images.shape == (3, 3, 8, 8)
    assert data.images[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert np.allclose(data.images[1].numpy(), 128 / 255, atol=0.02)  # grey in every channel
    assert np.allclose(data.images[2].numpy(), 1.0, atol=0.02)


def test_the_first_image_sets_the_mode(tmp_path: Path) -> None:
    folder = extract(tmp_path, {
        "metadata.jsonl": metadata({"file_name": "a.png", "text": "grey"},
                                   {"file_name": "b.png", "text": "see-through"}),
        "a.png": image(mode="L", color=200),
        "b.png": image(mode="RGBA", color=(10, 20, 30, 0)),
    })
    data = load(folder)
    assert data.images.shape == (2, 1, 8, 8)
    assert data.captions == ["grey", "see-through"]


GOOD = {"file_name": "a.png", "text": "fine"}
BAD_LINES = {  # line 2 of metadata.jsonl, the problem said about it
    "invalid-json": ('{"file_name": "b.png",', "line 2: invalid JSON"),
    "not-an-object": ('["b.png", "caption"]', "line 2: must be a JSON object"),
    "missing-file-name": ({"text": "x"}, "line 2: file_name: Field required"),
    "empty-file-name": ({"file_name": "", "text": "x"}, "line 2: file_name: String should"),
    "missing-caption": ({"file_name": "b.png"}, "line 2: b.png: a missing caption"),
    "caption-not-text": ({"file_name": "b.png", "text": 3}, "line 2: b.png: text: Input should"),
    "climbs-out": ({"file_name": "../a.png", "text": "x"}, "line 2: ../a.png leaves the folder"),
    "absolute": ({"file_name": "/etc/a.png", "text": "x"}, "line 2: /etc/a.png leaves the folder"),
    "missing-image": ({"file_name": "gone.png", "text": "x"}, "line 2: gone.png does not exist"),
    "not-an-image": ({"file_name": "notes.txt", "text": "x"},
                     "line 2: notes.txt is not a PNG or JPEG"),
    "unreadable": ({"file_name": "sub/broken.jpg", "text": "x"},
                   "line 2: sub/broken.jpg is not a readable JPEG"),
    "other-size": ({"file_name": "b.png", "text": "x"},
                   "line 2: b.png is 16x8 but line 1's a.png is 8x8"),
    "too-large": ({"file_name": "wide.png", "text": "x"},
                  f"line 2: wide.png is {MAX_SIDE + 1}x1; images must be at most"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_bad_line_is_named(tmp_path: Path, case: str) -> None:
    line, says = BAD_LINES[case]
    folder = extract(tmp_path, {
        "metadata.jsonl": metadata(GOOD, line),
        "a.png": image(),
        "b.png": image(size=(16, 8)),
        "notes.txt": b"not a picture",
        "sub/broken.jpg": b"\xff\xd8 not really a JPEG",
        "wide.png": image(size=(MAX_SIDE + 1, 1), mode="L"),
    })
    problems = validate_data({"path": str(folder)}, "image")
    assert len(problems) == 1 and problems[0].startswith(f"data.path: metadata.jsonl {says}"), \
        problems
    assert str(tmp_path) not in problems[0]  # the API shows it: no temporary paths


def test_an_empty_metadata_file_is_a_problem(tmp_path: Path) -> None:
    folder = extract(tmp_path, {"metadata.jsonl": b"\n\n", "a.png": image()})
    assert validate_data({"path": str(folder)}, "image") == [
        'data.path: metadata.jsonl has no lines (one per image: {"file_name": ..., '
        '"text": ...})']


def test_every_problem_is_listed_up_to_ten(tmp_path: Path) -> None:
    rows = [{"file_name": f"{i}.png"} for i in range(12)]
    folder = extract(tmp_path, {"metadata.jsonl": metadata(*rows),
                                **{f"{i}.png": image() for i in range(12)}})
    problems = validate_data({"path": str(folder)}, "image")
    assert problems[0] == "data.path: metadata.jsonl line 1: 0.png: a missing caption (no 'text')"
    assert len(problems) == 11 and problems[-1] == "... and 2 more"


def test_zips_without_metadata_load_as_before(tmp_path: Path) -> None:
    """Flat PNGs are unlabeled, integer-named folders are labels; JPEGs are not read."""
    flat = load(extract(tmp_path / "flat", {
        "a.png": image(), "deep/b.png": image(), "c.jpg": image(fmt="JPEG")}))
    assert flat.images.shape == (2, 3, 8, 8) and flat.labels is None and flat.captions is None
    labelled = load(extract(tmp_path / "labelled", {
        f"shapes/{i % 3}/img{i}.png": image(mode="L") for i in range(6)}))
    assert labelled.images.shape == (6, 1, 8, 8) and labelled.labels is not None
    assert sorted(labelled.labels.tolist()) == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("with_metadata", [True, False])
def test_unsafe_members_are_never_written(tmp_path: Path, with_metadata: bool) -> None:
    """Absolute paths, '..', hidden files and deep nesting are skipped, with or without
    metadata.jsonl (an imagefolder skips hidden folders too); nothing lands outside the
    extracted folder."""
    unsafe = ["../evil.png", "/abs/evil.png", "sub/../../evil.png", ".hidden.png",
              "/".join("d" * 9) + "/evil.png"]
    members = {name: image() for name in unsafe} | {"a.png": image()}
    if with_metadata:
        members |= {"metadata.jsonl": metadata(GOOD), ".git/evil.png": image()}
    folder = extract(tmp_path / "zone", members)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                     if p.is_file() and "store" not in p.parts)
    assert written == sorted([f"zone/cache/datasets/file-test/{n}" for n in (
        ".complete", "a.png", *(["metadata.jsonl"] if with_metadata else []))])
    assert load(folder).images.shape == (1, 3, 8, 8)


def test_two_metadata_files_side_by_side_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec, match="2 metadata.jsonl files side by side") as info:
        extract(tmp_path, {"train/metadata.jsonl": metadata(GOOD), "train/a.png": image(),
                           "test/metadata.jsonl": metadata(GOOD), "test/a.png": image()})
    assert info.value.param == "data.file_id"
