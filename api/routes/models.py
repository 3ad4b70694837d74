"""/v1/models (OpenAI list shape), /v1/checkpoints/{id}, /v1/artifacts/{id}."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api.deps import OwnerDep, SessionDep
from api.json_body import GenqRoute
from api.views import model_out
from common import jobs, results
from common.models import Artifact, Model
from common.schemas import ArtifactOut, CheckpointOut, ModelList, ModelOut
from common.storage import get_storage

router = APIRouter(tags=["models"], route_class=GenqRoute)


@router.get("/v1/models", response_model=ModelList)
def list_models(session: SessionDep, owner: OwnerDep) -> ModelList:
    """Your registered models."""
    rows = session.scalars(select(Model).where(Model.owner == owner).order_by(Model.created_at))
    return ModelList(data=[model_out(m) for m in rows])


@router.get("/v1/models/{name}", response_model=ModelOut)
def get_model(name: str, session: SessionDep, owner: OwnerDep) -> ModelOut:
    """One model, by name or id."""
    return model_out(results.find_model(session, owner=owner, name=name))


@router.get("/v1/checkpoints/{checkpoint_id}", response_model=CheckpointOut)
def get_checkpoint(checkpoint_id: str, session: SessionDep, owner: OwnerDep) -> CheckpointOut:
    """One checkpoint's step, size and metrics."""
    ckpt = results.get_checkpoint(session, owner=owner, checkpoint_id=checkpoint_id)
    return CheckpointOut.model_validate(ckpt)


@router.get("/v1/jobs/{job_id}/artifacts", response_model=list[ArtifactOut])
def list_artifacts(job_id: str, session: SessionDep, owner: OwnerDep) -> list[ArtifactOut]:
    """A job's artifacts (loss curve, sample grids, images)."""
    job = jobs.get_job(session, owner=owner, job_id=job_id)
    rows = session.scalars(
        select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.created_at)
    )
    return [ArtifactOut.model_validate(a) for a in rows]


@router.get("/v1/artifacts/{artifact_id}")
def download_artifact(artifact_id: str, session: SessionDep, owner: OwnerDep) -> StreamingResponse:
    """Download an artifact's bytes (by id only, never by path)."""
    art = results.get_artifact(session, owner=owner, artifact_id=artifact_id)
    storage = get_storage()
    return StreamingResponse(
        storage.iter_bytes(storage.key_of(art.uri)),
        media_type=art.content_type,
        headers={"Content-Disposition": f'attachment; filename="{art.filename}"'},
    )
