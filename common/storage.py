"""Object storage on fsspec: local files by default, s3:// (MinIO, AWS) when configured."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from common.config import get_settings

CHUNK = 1 << 20


class Storage:
    """Keys are relative paths ("checkpoints/job_x/step-10/model.safetensors") under one root."""

    def __init__(self, root: str, *, s3_endpoint_url: str = ""):
        self.root = root.rstrip("/")
        self._options: dict[str, Any] = {}
        if root.startswith("s3://"):
            # No listings cache: other machines write to the bucket, and a cached listing
            # would hide their objects from exists() and downloads.
            self._options["use_listings_cache"] = False
            if s3_endpoint_url:
                self._options["client_kwargs"] = {"endpoint_url": s3_endpoint_url}
        self._pid = 0
        _, self.base = fsspec.core.url_to_fs(self.root, **self._options)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            Path(self.base).mkdir(parents=True, exist_ok=True)

    @property
    def fs(self) -> AbstractFileSystem:
        """The filesystem, made anew in a forked child (s3fs's event loop is not fork-safe)."""
        if self._pid != os.getpid():
            self._fs, _ = fsspec.core.url_to_fs(self.root, **self._options)
            self._pid = os.getpid()
        return self._fs

    def _path(self, key: str) -> str:
        key = key.strip("/")
        if not key or ".." in key.split("/"):
            raise ValueError(f"bad storage key {key!r}")
        return f"{self.base}/{key}"

    def uri(self, key: str) -> str:
        return f"{self.root}/{key.strip('/')}"

    def key_of(self, uri: str) -> str:
        if not uri.startswith(self.root + "/"):
            raise ValueError(f"{uri!r} is not under storage root {self.root!r}")
        return uri[len(self.root) + 1 :]

    def put_bytes(self, key: str, data: bytes) -> str:
        return self.put_stream(key, iter([data]))[0]

    def put_stream(self, key: str, chunks: Iterator[bytes]) -> tuple[str, int, str]:
        """Write chunks to key; returns (uri, bytes, sha256)."""
        digest, size = hashlib.sha256(), 0
        path = self._path(key)
        target = path + ".tmp" if self.is_local else path
        if self.is_local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        with self.fs.open(target, "wb") as out:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        if self.is_local:
            Path(target).replace(path)
        return self.uri(key), size, digest.hexdigest()

    def put_file(self, key: str, local: Path) -> tuple[str, int, str]:
        with open(local, "rb") as f:
            return self.put_stream(key, iter(lambda: f.read(CHUNK), b""))

    def put_dir(self, prefix: str, local: Path) -> tuple[str, int]:
        """Upload every file of a local folder; returns (uri, total bytes)."""
        total = 0
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            _, size, _ = self.put_file(f"{prefix}/{file.relative_to(local).as_posix()}", file)
            total += size
        return self.uri(prefix), total

    def get_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    def open(self, key: str) -> IO[bytes]:
        return self.fs.open(self._path(key), "rb")

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        with self.open(key) as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def local_dir(self, prefix: str, cache: Path) -> Path:
        """A local folder holding prefix: the folder itself when local, else a cached copy.

        A copy counts only once its ".complete" marker is written, so a download cut short
        is fetched again; FileNotFoundError when nothing is stored under prefix.
        """
        path = self._path(prefix)
        if self.is_local:
            if not Path(path).is_dir():
                raise FileNotFoundError(self.uri(prefix))
            return Path(path)
        def download(tmp: Path) -> None:
            files = self.fs.find(path)
            if not files:
                raise FileNotFoundError(self.uri(prefix))
            for remote in files:
                local = tmp / remote[len(path) + 1 :]
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(remote, str(local))

        return complete_folder(cache / prefix, download)

    def local_file(self, key: str, cache: Path) -> Path:
        if self.is_local:
            return Path(self._path(key))
        target = cache / key
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            part = Path(f"{target}.part-{os.getpid()}")
            self.fs.get_file(self._path(key), str(part))
            part.replace(target)
        return target

    def remove_stale_parts(self, prefix: str, *, older_than_s: float) -> int:
        """Delete `.tmp` files under prefix unwritten for older_than_s (a writer killed
        mid-stream left them); returns how many. Object stores write no such files."""
        if not self.is_local:
            return 0
        folder, removed = Path(self._path(prefix)), 0
        cutoff = time.time() - older_than_s
        for part in folder.glob("*.tmp") if folder.is_dir() else ():
            try:
                if part.stat().st_mtime < cutoff:
                    part.unlink()
                    removed += 1
            except FileNotFoundError:  # its writer just finished (renamed) or another reaper
                continue
        return removed

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def delete(self, key: str) -> None:
        path = self._path(key)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


def complete_folder(target: Path, fill: Callable[[Path], None]) -> Path:
    """target, built once per machine: fill(tmp) writes a private temp folder, which is
    marked ".complete" and renamed into place; an unmarked folder is built again."""
    if (target / ".complete").exists():
        return target
    tmp = target.with_name(f"{target.name}.part-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    try:
        tmp.replace(target)
    except OSError:  # another process of this machine finished the same folder first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / ".complete").exists():
            raise
    return target


@lru_cache(maxsize=4)
def storage_for(root: str, s3_endpoint_url: str = "") -> Storage:
    return Storage(root, s3_endpoint_url=s3_endpoint_url)


def get_storage() -> Storage:
    """The configured store."""
    settings = get_settings()
    return storage_for(settings.storage_root, settings.s3_endpoint_url)
