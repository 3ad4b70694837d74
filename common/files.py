"""Uploaded and generated files (OpenAI's /v1/files): streamed to storage, tracked in SQL."""

from __future__ import annotations

import re
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sqlalchemy import select
from sqlalchemy.orm import Session

from common.batches.schemas import UPLOAD_PURPOSES, FileOut
from common.config import get_settings
from common.errors import InvalidSpec, TooLarge
from common.models import File, new_id, utcnow
from common.owned import get_owned
from common.paging import keyset_page
from common.storage import Storage, complete_folder


def safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name.rsplit("/", 1)[-1])[-120:] or "upload"


def check_upload(purpose: str, filename: str) -> None:
    """Purposes genq accepts from users and the file types each takes."""
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidSpec(f"purpose must be one of {sorted(UPLOAD_PURPOSES)}", param="purpose")
    suffixes = UPLOAD_PURPOSES[purpose]
    if not filename.lower().endswith(suffixes):
        raise InvalidSpec(f"a {purpose} file must end in {' or '.join(suffixes)}", param="file")


@dataclass(frozen=True)
class StoredBytes:
    """An upload's bytes in storage, not yet recorded as a file."""

    file_id: str
    key: str
    uri: str
    size: int
    filename: str


def capped(chunks: Iterator[bytes], cap: int) -> Iterator[bytes]:
    """The chunks, cut with a 413 naming `file` at the first byte past cap."""
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        if seen > cap:
            raise TooLarge(f"file is larger than {cap} bytes", param="file")
        yield chunk


def store_bytes(storage: Storage, *, filename: str, chunks: Iterator[bytes],
                limit: int | None = None) -> StoredBytes:
    """Stream chunks to storage, 413 at the first byte past the size limit; whatever the
    stream raises, nothing is left behind."""
    file_id = new_id("file-")
    key = f"files/{file_id}"
    cap = get_settings().max_upload_bytes if limit is None else limit

    try:
        uri, size, _ = storage.put_stream(key, capped(chunks, cap))
    except BaseException:  # over the cap, a malformed or cut body, a client gone
        storage.delete(key + ".tmp")
        storage.delete(key)
        raise
    return StoredBytes(file_id=file_id, key=key, uri=uri, size=size, filename=filename)


def discard_bytes(storage: Storage, stored: StoredBytes) -> None:
    storage.delete(stored.key)


def record_file(session: Session, stored: StoredBytes, *, owner: str, purpose: str) -> File:
    """The stored bytes as the owner's file (committed)."""
    row = File(id=stored.file_id, owner=owner, purpose=purpose,
               filename=safe_filename(stored.filename), bytes=stored.size, uri=stored.uri,
               created_at=utcnow())
    session.add(row)
    session.commit()
    return row


def get_file(session: Session, *, owner: str, file_id: str, param: str = "file_id") -> File:
    return get_owned(session, File, file_id, owner=owner, what="file", param=param)


def list_files(
    session: Session, *, owner: str, purpose: str | None, after: str | None, limit: int
) -> tuple[list[File], bool]:
    """Newest first; `after` is the last id of the previous page."""
    query = select(File).where(File.owner == owner)
    if purpose:
        query = query.where(File.purpose == purpose)
    start = None
    if after:
        cursor = get_file(session, owner=owner, file_id=after, param="after")
        start = (cursor.created_at, cursor.id)
    page = keyset_page(session, query, (File.created_at, File.id), after=start, limit=limit,
                       newest_first=True)
    return page.rows, page.has_more


def delete_file(session: Session, storage: Storage, *, owner: str, file_id: str) -> None:
    row = get_file(session, owner=owner, file_id=file_id)
    storage.delete(storage.key_of(row.uri))
    session.delete(row)
    session.commit()


def file_out(row: File) -> FileOut:
    return FileOut(id=row.id, bytes=row.bytes, created_at=int(row.created_at.timestamp()),
                   filename=row.filename, purpose=row.purpose)


def dataset_path(storage: Storage, file: File, cache: Path) -> Path:
    """A local path the data loader can open for an uploaded dataset.

    The name keeps the upload's suffix (the loader picks the format by it); a .zip of images
    becomes the folder it holds, extracted once per machine.
    """
    local = storage.local_file(storage.key_of(file.uri), cache)
    suffix = PurePosixPath(file.filename).suffix.lower()
    folder = cache / "datasets"
    folder.mkdir(parents=True, exist_ok=True)
    if suffix == ".zip":
        return _extract_images(local, folder / file.id)
    named = folder / f"{file.id}{suffix}"
    try:
        named.symlink_to(local.resolve())
    except FileExistsError:  # another job on this machine named it first
        pass
    return named


IMAGEFOLDER_DEPTH = 8  # path parts an imagefolder zip's member may have


def _extract_images(archive: Path, target: Path) -> Path:
    """Unpack a zip's images safely: with a metadata.jsonl, it and the images under its folder
    (paths kept, as an imagefolder); else the .png members, flat or in integer-named label
    folders. Absolute, '..', hidden and deeply nested members are never written."""

    def unpack(tmp: Path) -> None:
        budget = 4 * get_settings().max_upload_bytes  # a zip bomb stops here
        try:
            with zipfile.ZipFile(archive) as z:
                files = [info for info in z.infolist() if not info.is_dir()]
                kept = _imagefolder_members(files)
                for info, relative in _png_members(files) if kept is None else kept:
                    budget -= info.file_size
                    if budget < 0:
                        raise InvalidSpec("the zip unpacks to too many bytes",
                                          param="data.file_id")
                    dest = tmp / relative
                    try:
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        with z.open(info) as src, open(dest, "wb") as out:
                            shutil.copyfileobj(src, out)
                    except (FileExistsError, NotADirectoryError, IsADirectoryError):
                        continue  # a file and a folder of the same name: the first one stays
        except zipfile.BadZipFile as exc:
            raise InvalidSpec(f"the dataset is not a readable zip file ({exc})",
                              param="data.file_id") from exc

    return complete_folder(target, unpack)


def _png_members(files: list[zipfile.ZipInfo]) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """The .png members, each with where it goes: flat, or in its integer-named label folder
    (label/x.png); a name met twice is renamed x-1.png, x-2.png..."""
    kept: dict[PurePosixPath, zipfile.ZipInfo] = {}
    for info in files:
        name = PurePosixPath(info.filename)
        if name.suffix.lower() != ".png" or name.name.startswith("."):
            continue
        parts = [p for p in name.parts if p not in ("", ".")]
        if name.is_absolute() or ".." in parts or len(parts) > 3:
            continue
        label = parts[-2] if len(parts) > 1 and parts[-2].isdigit() else ""
        dest = PurePosixPath(label, parts[-1])
        n = 1
        while dest in kept:  # the same name in two folders
            dest = dest.with_name(f"{name.stem}-{n}.png")
            n += 1
        kept[dest] = info
    return [(info, dest) for dest, info in kept.items()]


def _imagefolder_members(
    files: list[zipfile.ZipInfo],
) -> list[tuple[zipfile.ZipInfo, PurePosixPath]] | None:
    """The shallowest metadata.jsonl and the images under its folder, each with its path from
    that folder; None when the zip has no metadata.jsonl."""
    # the loader owns the format; imported here, as the API starts without torch
    from common.ml.data import IMAGE_SUFFIXES, METADATA

    named = []
    for info in files:
        name = PurePosixPath(info.filename)
        parts = tuple(p for p in name.parts if p not in ("", "."))
        if not (name.is_absolute() or ".." in parts or len(parts) > IMAGEFOLDER_DEPTH
                or any(p.startswith(".") for p in parts)):
            named.append((info, parts))
    found = sorted((parts for _, parts in named if parts[-1] == METADATA), key=len)
    if not found:
        return None
    top = [parts for parts in found if len(parts) == len(found[0])]
    if len(top) > 1:
        raise InvalidSpec(f"the zip holds {len(top)} {METADATA} files side by side "
                          f"({', '.join('/'.join(p) for p in top)}); an imagefolder has one",
                          param="data.file_id")
    root = found[0][:-1]
    kept: dict[PurePosixPath, zipfile.ZipInfo] = {}
    for info, parts in named:
        relative = PurePosixPath(*parts[len(root):])
        if parts[:len(root)] != root or relative in kept:  # outside, or a name given twice
            continue
        if relative.suffix.lower() in IMAGE_SUFFIXES or str(relative) == METADATA:
            kept[relative] = info
    return [(info, relative) for relative, info in kept.items()]
