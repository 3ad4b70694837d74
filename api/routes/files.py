"""/v1/files: upload (multipart, streamed and size-capped after the key), list, read,
download, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from api.deps import OwnerDep, SessionDep
from api.json_body import GenqRoute
from api.upload_form import body_from_thread, form_parts
from common import files
from common.batches.schemas import FileDeleted, FileList, FileOut
from common.config import get_settings
from common.errors import InvalidSpec, TooLarge
from common.storage import Storage, get_storage

router = APIRouter(prefix="/v1/files", tags=["files"], route_class=GenqRoute)

MULTIPART_SLACK = 64 << 10  # headers, boundaries and `purpose` around the file part

# The form the route reads itself (api/upload_form.py), as FastAPI would have declared it.
UPLOAD_FORM: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "title": "FileUpload", "required": ["file", "purpose"],
        "properties": {
            "file": {"type": "string", "contentMediaType": "application/octet-stream",
                     "title": "File"},
            "purpose": {"type": "string", "title": "Purpose"},
        }}}}}}


@router.post("", response_model=FileOut, openapi_extra=UPLOAD_FORM)
def upload_file(request: Request, session: SessionDep, owner: OwnerDep) -> FileOut:
    """Upload a batch input (.jsonl) or a training dataset (.txt, .jsonl, .npz)."""
    cap = get_settings().max_upload_bytes
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > cap + MULTIPART_SLACK:
        raise TooLarge(f"file is larger than {cap} bytes", param="file")
    storage = get_storage()
    purpose, stored = _read_upload(request, storage)
    try:
        return files.file_out(files.record_file(session, stored, owner=owner, purpose=purpose))
    except BaseException:
        files.discard_bytes(storage, stored)
        raise


def _read_upload(request: Request, storage: Storage) -> tuple[str, files.StoredBytes]:
    """The form's `purpose`, and its `file` streamed to storage under GENQ_MAX_UPLOAD_BYTES
    as it arrives (checked against `purpose` first when that came first)."""
    body = files.capped(body_from_thread(request.stream()),
                       get_settings().max_upload_bytes + MULTIPART_SLACK)
    purpose: str | None = None
    stored: files.StoredBytes | None = None
    try:
        for part in form_parts(body, request.headers.get("content-type", "")):
            if part.name == "purpose":
                purpose = part.text()
            elif part.name == "file":
                if part.filename is None or stored is not None:
                    raise InvalidSpec("`file` must be one file part", param="file")
                if purpose is not None:
                    files.check_upload(purpose, part.filename)
                stored = files.store_bytes(storage, filename=part.filename or "upload",
                                           chunks=part.chunks())
        if purpose is None or stored is None:
            raise InvalidSpec("the form needs the fields `file` and `purpose`",
                              param="purpose" if stored else "file")
        files.check_upload(purpose, stored.filename)
    except BaseException:
        if stored is not None:
            files.discard_bytes(storage, stored)
        raise
    return purpose, stored


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
    name = files.safe_filename(row.filename)  # a header holds ASCII, whoever wrote the row
    return StreamingResponse(
        storage.iter_bytes(storage.key_of(row.uri)), media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{name}"',
                 "Content-Length": str(row.bytes)},
    )


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, session: SessionDep, owner: OwnerDep) -> FileDeleted:
    """Delete a file and its bytes."""
    files.delete_file(session, get_storage(), owner=owner, file_id=file_id)
    return FileDeleted(id=file_id)
