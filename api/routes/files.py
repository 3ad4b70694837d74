"""/v1/files: upload (multipart, streamed and size-capped), list, read, download, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi import File as FormFile
from fastapi.responses import StreamingResponse

from api.deps import OwnerDep, SessionDep
from api.json_body import GenqRoute
from common import files
from common.batches.schemas import FileDeleted, FileList, FileOut
from common.config import get_settings
from common.errors import TooLarge
from common.storage import CHUNK, get_storage

router = APIRouter(prefix="/v1/files", tags=["files"], route_class=GenqRoute)

MULTIPART_SLACK = 64 << 10  # headers and boundaries around the file part


@router.post("", response_model=FileOut)
def upload_file(
    request: Request,
    file: Annotated[UploadFile, FormFile()],
    purpose: Annotated[str, Form()],
    session: SessionDep,
    owner: OwnerDep,
) -> FileOut:
    """Upload a batch input (.jsonl) or a training dataset (.txt, .jsonl, .npz)."""
    cap = get_settings().max_upload_bytes
    if int(request.headers.get("content-length") or 0) > cap + MULTIPART_SLACK:
        raise TooLarge(f"file is larger than {cap} bytes", param="file")
    filename = file.filename or "upload"
    files.check_upload(purpose, filename)
    row = files.store_file(
        session, get_storage(), owner=owner, purpose=purpose, filename=filename,
        chunks=iter(lambda: file.file.read(CHUNK), b""),
    )
    return files.file_out(row)


@router.get("", response_model=FileList)
def list_files(
    session: SessionDep,
    owner: OwnerDep,
    purpose: Annotated[str | None, Query()] = None,
    after: Annotated[str | None, Query(description="cursor: the last file id seen")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> FileList:
    """Your files, newest first."""
    rows, has_more = files.list_files(session, owner=owner, purpose=purpose, after=after,
                                      limit=limit)
    data = [files.file_out(r) for r in rows]
    return FileList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


@router.get("/{file_id}", response_model=FileOut)
def get_file(file_id: str, session: SessionDep, owner: OwnerDep) -> FileOut:
    """One file's metadata."""
    return files.file_out(files.get_file(session, owner=owner, file_id=file_id))


@router.get("/{file_id}/content")
def file_content(file_id: str, session: SessionDep, owner: OwnerDep) -> StreamingResponse:
    """Download a file's bytes (batch output and error files included)."""
    row = files.get_file(session, owner=owner, file_id=file_id)
    storage = get_storage()
    return StreamingResponse(
        storage.iter_bytes(storage.key_of(row.uri)), media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{row.filename}"',
                 "Content-Length": str(row.bytes)},
    )


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, session: SessionDep, owner: OwnerDep) -> FileDeleted:
    """Delete a file and its bytes."""
    files.delete_file(session, get_storage(), owner=owner, file_id=file_id)
    return FileDeleted(id=file_id)
