"""The whole path: API → Redis → worker → SQL and storage, with real processes."""

from __future__ import annotations

import httpx
import pytest

from common.errors import GenqAPIError


def test_train_registers_model_with_checkpoint(stack, trained_lstm):
    c = stack.client()
    result = trained_lstm["result"]
    assert trained_lstm["progress"] == {**trained_lstm["progress"], "done": 30, "total": 30}
    ckpt = c.request("GET", f"/v1/checkpoints/{result['checkpoint_id']}")
    assert ckpt["step"] == 30 and ckpt["bytes"] > 0
    names = [m["id"] for m in c.models()]
    assert result["model"] in names
    metrics = trained_lstm["metrics"]
    assert metrics["loss"] > 0


def test_generate_writes_items(stack, trained_lstm):
    c = stack.client()
    model = trained_lstm["result"]["model"]
    job = c.create_job({"type": "generate", "model": model, "prompts": ["The ", "def f"],
                        "max_tokens": 12, "temperature": 0.8, "seed": 3})
    assert job["status"] == "queued" and job["progress"]["total"] == 2
    job = c.wait(job["id"], timeout=120)
    assert job["status"] == "succeeded", job
    items = list(c.items(job["id"]))
    assert [i["custom_id"] for i in items] == ["0", "1"]
    for item in items:
        assert item["status"] == "succeeded"
        (text,) = item["response"]["texts"]
        assert isinstance(text, str) and len(text) > 0
        assert item["tokens_out"] > 0


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        ({"type": "train", "family": "lstm", "steps": -1}, "steps"),
        ({"type": "train", "family": "nope"}, "family"),
        ({"type": "train", "family": "lstm", "batch_size": "many"}, "batch_size"),
        ({"type": "generate", "model": "x", "prompts": ["a"], "max_tokens": 0}, "max_tokens"),
        ({"type": "generate", "model": "x", "prompts": ["a"], "temperature": 9}, "temperature"),
        ({"type": "wat"}, "type"),
        ({"type": "train", "family": "vae", "data": {"builtin": "python-docs"}}, "data.builtin"),
        ({"type": "train", "family": "lstm", "steps": 3, "epochs": 2}, "epochs"),
        ({"type": "train", "family": "lstm", "queue": "nope"}, "queue"),
        ({"type": "generate", "model": "x"}, "prompts"),
    ],
)
def test_invalid_spec_names_the_field(stack, spec, param):
    resp = httpx.post(f"{stack.api_url}/v1/jobs", json=spec,
                      headers={"Authorization": f"Bearer {stack.api_key}"})
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["param"] == param, err
    assert err["message"]


def test_invalid_model_config_lists_every_field(stack):
    resp = httpx.post(f"{stack.api_url}/v1/jobs",
                      json={"type": "train", "family": "lstm", "config": {"hidden": 0, "bogus": 1}},
                      headers={"Authorization": f"Bearer {stack.api_key}"})
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert "config.hidden" in error["message"] and "config.bogus" in error["message"]
    assert {e["param"] for e in error["errors"]} == {"config.hidden", "config.bogus"}


def test_data_kind_mismatch_is_422(stack):
    with pytest.raises(GenqAPIError) as exc:
        stack.client().create_job({"type": "train", "family": "vae",
                                   "data": {"builtin": "python-docs"}})
    assert exc.value.status == 422 and "data.builtin" in exc.value.message


def test_generate_unknown_model_is_404_naming_model(stack):
    with pytest.raises(GenqAPIError) as exc:
        stack.client().create_job({"type": "generate", "model": "no-such-model", "prompts": ["a"]})
    assert exc.value.status == 404 and exc.value.param == "model"


@pytest.mark.parametrize("path", ["/v1/jobs/job_nope", "/v1/jobs/job_nope/items",
                                  "/v1/checkpoints/ckpt_nope", "/v1/artifacts/art_nope",
                                  "/v1/models/nope"])
def test_unknown_ids_are_404(stack, path):
    resp = httpx.get(stack.api_url + path, headers={"Authorization": f"Bearer {stack.api_key}"})
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] in ("not_found", "model_not_found")


def test_key_required_and_owner_scoped(stack, trained_lstm):
    assert httpx.get(f"{stack.api_url}/v1/jobs").status_code == 401
    bad = httpx.get(f"{stack.api_url}/v1/jobs", headers={"Authorization": "Bearer gq-wrong"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    from common.auth import create_key
    from common.db import engine_for, session_factory

    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        _, other = create_key(s, owner="someone-else")
    stranger = stack.client(key=other)
    with pytest.raises(GenqAPIError) as exc:
        stranger.get_job(trained_lstm["id"])
    assert exc.value.status == 404
    with pytest.raises(GenqAPIError):
        stranger.cancel(trained_lstm["id"])
    assert stranger.models() == []
    assert stranger.list_jobs()["data"] == []


def test_health_probes_need_no_key(stack):
    assert httpx.get(f"{stack.api_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.api_url}/readyz")
    assert ready.status_code == 200 and ready.json()["broker"] == "ok"


def test_idempotency_key_returns_same_job(stack):
    c = stack.client()
    spec = {"type": "train", "family": "lstm", "steps": 1, "batch_size": 2, "seq_len": 8}
    first = c.create_job(spec, idempotency_key="abc-1")
    again = c.create_job(spec, idempotency_key="abc-1")
    assert first["id"] == again["id"]
    with pytest.raises(GenqAPIError) as exc:
        c.create_job({**spec, "steps": 2}, idempotency_key="abc-1")
    assert exc.value.status == 409
    assert c.wait(first["id"], timeout=120)["status"] == "succeeded"


def test_idempotency_key_holds_under_a_race_and_refuses_an_empty_key(stack, trained_lstm):
    from concurrent.futures import ThreadPoolExecutor

    headers = {"Authorization": f"Bearer {stack.api_key}"}
    spec = {"type": "generate", "model": trained_lstm["result"]["model"], "prompts": ["a"],
            "max_tokens": 2}
    empty = httpx.post(f"{stack.api_url}/v1/jobs", json=spec,
                       headers={**headers, "Idempotency-Key": ""})
    assert empty.status_code == 422 and empty.json()["error"]["param"] == "idempotency-key"

    def create(_: int) -> httpx.Response:
        return httpx.post(f"{stack.api_url}/v1/jobs", json=spec, timeout=60,
                          headers={**headers, "Idempotency-Key": "raced-1"})

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(create, range(10)))
    assert [r.status_code for r in answers if r.status_code >= 500] == []
    assert len({r.json()["id"] for r in answers}) == 1  # every racer got the one job
    batch = {"input_file_id": "file-nope", "endpoint": "/v1/completions",
             "completion_window": "24h"}
    again = httpx.post(f"{stack.api_url}/v1/batches", json=batch,
                       headers={**headers, "Idempotency-Key": "raced-1"})
    assert again.status_code == 409  # the key belongs to the job: never a 500


def test_a_batch_idempotency_key_answers_the_first_batch_also_under_a_race(
        stack, trained_lstm, tmp_path):
    """Issue 26 item 5: POST /v1/batches sent again with its Idempotency-Key answers the
    first batch, sequentially and when ten race; with another request it is a 409."""
    import json
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    c = stack.client()
    lines = "".join(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/completions",
                                "body": {"model": trained_lstm["result"]["model"], "prompt": "a",
                                         "max_tokens": 2}}) + "\n" for i in range(3))
    upload = tmp_path / "in.jsonl"
    upload.write_text(lines)
    batch = {"input_file_id": c.upload_file(upload)["id"], "endpoint": "/v1/completions",
             "completion_window": "24h"}

    def create(key: str, body: dict = batch) -> httpx.Response:
        return httpx.post(f"{stack.api_url}/v1/batches", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {stack.api_key}",
                                   "Idempotency-Key": key})

    first, again = create("batch-seq"), create("batch-seq")
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.json()["id"] == first.json()["id"]
    other = create("batch-seq", {**batch, "metadata": {"run": "2"}})
    assert other.status_code == 409, other.text
    assert other.json()["error"]["code"] == "idempotency_conflict"

    raced = f"batch-race-{uuid.uuid4().hex[:6]}"
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: create(raced), range(10)))
    assert [r.status_code for r in answers] == [200] * 10, [r.text[:200] for r in answers]
    ids = {r.json()["id"] for r in answers}
    assert len(ids) == 1  # every racer got the one batch
    listed = c.request("GET", "/v1/batches", params={"limit": 100})["data"]
    assert sum(b["id"] in ids | {first.json()["id"]} for b in listed) == 2
    done = c.wait_batch(ids.pop(), timeout=300)
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}, done


def test_list_jobs_filters_and_pages(stack, trained_lstm):
    c = stack.client()
    page = c.list_jobs(type="train", status="succeeded", limit=1)
    assert len(page["data"]) == 1 and page["data"][0]["type"] == "train"
    if page["has_more"]:
        nxt = c.list_jobs(type="train", limit=1, after=page["next_cursor"])
        assert nxt["data"][0]["id"] != page["data"][0]["id"]


def test_migrations_build_exactly_the_tables_the_models_declare(db_url):
    """Alembic's own comparison of a migrated database with common/models.py: a column, index
    or table added to one and not the other fails here, on SQLite and PostgreSQL."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from common.db import engine_for
    from common.models import Base

    with engine_for(db_url).connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
