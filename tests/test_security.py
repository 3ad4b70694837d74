"""Issue 6: strangers, revoked keys, floods, oversized input and outages never get a 5xx or data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from common.errors import GenqAPIError
from tests.conftest import (
    BACKENDS,
    ROOT,
    Stack,
    _free_port,
    fresh_database,
    spawn_api,
    start_stack,
)
from tests.test_reliability import RedisServer


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_key(stack: Stack, owner: str) -> str:
    from common.auth import create_key
    from common.db import engine_for, session_factory

    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        return create_key(s, owner=f"{owner}-{uuid.uuid4().hex[:6]}")[1]


@pytest.fixture(scope="module", params=BACKENDS)
def quiet_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """An API with no workers on its own Redis and database: fuzzed jobs just stay queued."""
    redis = RedisServer()
    redis.start()
    with fresh_database(request.param) as db:
        stack = start_stack(db, redis.url)
        yield stack
        stack.stop_all()
    redis.stop()


def test_stranger_sees_nothing(stack, trained_lstm, tmp_path):
    from common.auth import create_key
    from common.db import engine_for, session_factory

    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        _, other = create_key(s, owner=f"stranger-{uuid.uuid4().hex[:6]}")
    job_id = trained_lstm["id"]
    result = trained_lstm["result"]
    arts = httpx.get(f"{stack.api_url}/v1/jobs/{job_id}/artifacts", headers=auth(stack.api_key))
    assert arts.status_code == 200 and arts.json(), arts.text
    c = stack.client()
    lines = "".join(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/completions",
                                "body": {"model": result["model"], "prompt": "a",
                                         "max_tokens": 2}}) + "\n" for i in range(2))
    upload = tmp_path / "mine.jsonl"
    upload.write_text(lines)
    file_id = c.upload_file(upload)["id"]
    batch_id = c.create_batch(file_id)["id"]
    paths = [f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/items", f"/v1/jobs/{job_id}/artifacts",
             f"/v1/jobs/{job_id}/metrics", f"/v1/jobs/{job_id}/logs",
             f"/v1/jobs/{job_id}/events", f"/v1/checkpoints/{result['checkpoint_id']}",
             f"/v1/models/{result['model']}", f"/v1/artifacts/{arts.json()[0]['id']}",
             f"/v1/files/{file_id}", f"/v1/files/{file_id}/content", f"/v1/batches/{batch_id}"]
    for path in paths:
        assert httpx.get(stack.api_url + path, headers=auth(stack.api_key)).status_code == 200, path
        resp = httpx.get(stack.api_url + path, headers=auth(other))
        assert resp.status_code == 404, (path, resp.text)
    for method, path in [("POST", f"/v1/jobs/{job_id}/cancel"),
                         ("POST", f"/v1/batches/{batch_id}/cancel"),
                         ("DELETE", f"/v1/files/{file_id}")]:
        resp = httpx.request(method, stack.api_url + path, headers=auth(other))
        assert resp.status_code == 404, (path, resp.text)
    assert httpx.get(f"{stack.api_url}/v1/files", headers=auth(other)).json()["data"] == []
    assert httpx.get(f"{stack.api_url}/v1/batches", headers=auth(other)).json()["data"] == []
    assert c.get_batch(batch_id)["status"] != "cancelled"
    listed = httpx.get(f"{stack.api_url}/v1/jobs", headers=auth(other)).json()
    assert listed["data"] == []
    assert httpx.get(f"{stack.api_url}/v1/models", headers=auth(other)).json()["data"] == []


def test_revoked_key_is_401(stack):
    from common.auth import create_key
    from common.db import engine_for, session_factory

    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        row, key = create_key(s, owner="soon-gone")
    assert httpx.get(f"{stack.api_url}/v1/jobs", headers=auth(key)).status_code == 200
    subprocess.run([sys.executable, "-m", "api.cli", "keys", "revoke", row.id], env=stack.env,
                   cwd=ROOT, check=True, capture_output=True)
    resp = httpx.get(f"{stack.api_url}/v1/jobs", headers=auth(key))
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"


def test_rate_limit_is_429_and_shared_by_every_api_process(quiet_stack):
    """The count lives in Redis: two API processes (replicas) together allow the limit once,
    and a restarted one does not start from zero."""
    limited = [spawn_api(quiet_stack, GENQ_RATE_LIMIT_PER_MINUTE="5") for _ in range(2)]
    headers = auth(quiet_stack.api_key)
    try:
        codes = [httpx.get(f"{limited[i % 2].api_url}/v1/jobs", headers=headers).status_code
                 for i in range(7)]
        assert codes[:5] == [200] * 5 and codes[5:] == [429, 429], codes
        limited[0].stop_all()
        limited[0] = spawn_api(quiet_stack, GENQ_RATE_LIMIT_PER_MINUTE="5")
        resp = httpx.get(f"{limited[0].api_url}/v1/jobs", headers=headers)
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
        assert httpx.get(f"{limited[1].api_url}/healthz").status_code == 200  # probes are free
        other = auth(make_key(quiet_stack, "other-owner"))  # another key has its own count
        assert httpx.get(f"{limited[1].api_url}/v1/jobs", headers=other).status_code == 200
    finally:
        for api in limited:
            api.stop_all()


def test_unknown_keys_are_rate_limited_too(quiet_stack):
    """Issue 26 item 6: a key is counted before it is looked up, so one bad key sent again
    and again gets 401s, then 429 with Retry-After; made-up keys and missing ones count
    against the address too; a valid key keeps its own count."""
    api = spawn_api(quiet_stack, GENQ_RATE_LIMIT_PER_MINUTE="5")
    try:
        def get(headers: dict[str, str]) -> httpx.Response:
            return httpx.get(f"{api.api_url}/v1/jobs", headers=headers, timeout=60)

        answers = [get(auth("gq-bogus-key")) for _ in range(7)]
        assert [r.status_code for r in answers] == [401] * 5 + [429] * 2, answers
        assert all(1 <= int(r.headers["Retry-After"]) <= 60 for r in answers[5:])
        assert answers[-1].json()["error"]["code"] == "rate_limited"
        fresh = get(auth(f"gq-{uuid.uuid4().hex}"))  # a new made-up key: its address is over
        assert fresh.status_code == 429 and fresh.headers["Retry-After"], fresh.text
        assert get({}).status_code == 429
        assert get(auth(make_key(quiet_stack, "valid"))).status_code == 200
    finally:
        api.stop_all()


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"type": "generate", "model": "m", "prompts": ["x" * 40_000]}, 422, "prompts[0]"),
        ({"type": "generate", "model": "m", "prompts": ["x"], "max_tokens": 10**7}, 422,
         "max_tokens"),
        ({"type": "generate", "model": "m", "prompts": ["x"] * 10_001}, 422, "prompts"),
        ({"type": "train", "family": "lstm", "steps": 10**9}, 422, "steps"),
        # absurd values that once reached a worker and hung it or crashed it there
        ({"type": "train", "family": "lstm", "config": {"n_layer": 2**64}}, 422,
         "config.n_layer"),
        ({"type": "train", "family": "lstm", "config": {"hidden": 10**7}}, 422, "config.hidden"),
        ({"type": "train", "family": "lstm", "config": {"hidden": 65_536, "n_layer": 64}}, 422,
         "config"),  # each field in bounds, but trillions of parameters together
        ({"type": "train", "family": "vae", "config": {"latent": 2**63}}, 422, "config.latent"),
        # each in bounds, but tens of GB of activations (GENQ_MAX_TRAIN_MEMORY_BYTES)
        ({"type": "train", "family": "lstm", "batch_size": 4096, "seq_len": 8192}, 422,
         "batch_size"),
        ({"type": "train", "family": "lm", "batch_size": 16, "seq_len": 8192}, 422, "seq_len"),
        ({"type": "train", "family": "lstm", "log_every": 2**63}, 422, "log_every"),
        ({"type": "train", "family": "lstm", "timeout_s": 1e300}, 422, "timeout_s"),
        ({"type": "train", "family": "lstm", "data": {"file_id": ""}}, 422, "data.file_id"),
        ({"type": "train", "family": "lstm", "resume_from": ""}, 422, "resume_from"),
        ({"type": "train", "family": "gpt", "config": {"pretrained": "x" * 5000}}, 422,
         "config.pretrained"),
        ({"type": "generate", "model": "m", "prompts": ["x"], "temperature": 1e-320}, 422,
         "temperature"),
        ({"type": "generate", "model": "m", "n": 2, "labels": [10**9]}, 422, "labels[0]"),
    ],
)
def test_oversized_input_names_the_field(stack, body, status, param):
    # a generous timeout: the first training spec imports torch in the API process
    resp = httpx.post(f"{stack.api_url}/v1/jobs", json=body, headers=auth(stack.api_key),
                      timeout=120)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param


def test_upload_and_batch_line_caps(stack, trained_lstm, tmp_path):
    """An upload past GENQ_MAX_UPLOAD_BYTES is 413 naming the file; a batch past
    GENQ_MAX_BATCH_LINES fails validation with a per-line error, and nothing runs."""
    capped = spawn_api(stack, GENQ_MAX_UPLOAD_BYTES="2000", GENQ_MAX_BATCH_LINES="3")
    try:
        c = capped.client()
        line = json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/completions",
                           "body": {"model": trained_lstm["result"]["model"], "prompt": "a"}})
        big = tmp_path / "big.jsonl"
        big.write_text((line + "\n") * 40)
        before = c.request("GET", "/v1/files", params={"limit": 100})["data"]
        with pytest.raises(GenqAPIError) as info:
            c.upload_file(big)
        assert info.value.status == 413 and info.value.param == "file"
        assert c.request("GET", "/v1/files", params={"limit": 100})["data"] == before

        four = tmp_path / "four.jsonl"
        four.write_text("".join(line.replace('"x"', f'"{i}"') + "\n" for i in range(4)))
        batch = c.wait_batch(c.create_batch(c.upload_file(four)["id"])["id"], timeout=120)
        assert batch["status"] == "failed"
        assert [e["code"] for e in batch["errors"]["data"]] == ["too_many_requests"]
        assert batch["request_counts"]["total"] == 0
    finally:
        capped.stop_all()


def test_an_upload_is_capped_as_it_streams_and_read_only_after_the_key(quiet_stack, tmp_path):
    """Issue 26 item 4: a chunked upload of many MB is cut at GENQ_MAX_UPLOAD_BYTES with a
    413 naming `file` before the client has sent it all, an announced one at once, one
    without a valid key is a 401 unread; none leaves bytes in storage or the temp dir."""
    storage, tmp = tmp_path / "storage", tmp_path / "tmp"
    tmp.mkdir()
    api = spawn_api(quiet_stack, GENQ_MAX_UPLOAD_BYTES="2000", GENQ_STORAGE_URL=str(storage),
                    TMPDIR=str(tmp))
    key = make_key(quiet_stack, "uploader")
    boundary = "genq-upload-test"
    form = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    total = 256 << 20

    def upload(headers: dict[str, str], sent: list[int]) -> httpx.Response:
        def body() -> Iterator[bytes]:
            head = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
                    f'batch\r\n--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                    f'filename="big.jsonl"\r\n\r\n')
            yield head.encode()
            chunk = b"x" * (64 << 10)
            while sent[0] < total:
                sent[0] += len(chunk)
                yield chunk
            yield f"\r\n--{boundary}--\r\n".encode()

        return httpx.post(f"{api.api_url}/v1/files", content=body(), headers={**form, **headers},
                          timeout=300)

    try:
        for headers, status in [(auth(key), 413), ({}, 401), (auth("gq-bogus"), 401)]:
            sent = [0]
            resp = upload(headers, sent)
            assert resp.status_code == status, resp.text[:300]
            assert sent[0] < total, "the API read the whole upload before answering"
        assert resp.json()["error"]["code"] == "invalid_api_key"
        capped = upload(auth(key), [0])
        assert capped.json()["error"]["param"] == "file"
        announced = httpx.post(f"{api.api_url}/v1/files", headers=auth(key),
                               data={"purpose": "batch"},
                               files={"file": ("big.jsonl", b"x" * (1 << 20))})
        assert announced.status_code == 413 and announced.json()["error"]["param"] == "file"
        small = httpx.post(f"{api.api_url}/v1/files", headers=auth(key),
                           files={"file": ("ok.jsonl", b"{}\n")}, data={"purpose": "batch"})
        assert small.status_code == 200 and small.json()["bytes"] == 3, small.text
        listed = httpx.get(f"{api.api_url}/v1/files", headers=auth(key)).json()["data"]
        assert [f["id"] for f in listed] == [small.json()["id"]]
        kept = [p for folder in (storage, tmp) for p in folder.rglob("*") if p.is_file()]
        assert [p.stat().st_size for p in kept] == [3], kept
    finally:
        api.stop_all()


def test_oversized_json_body_is_413(stack):
    body = b'{"type": "generate", "model": "m", "prompts": ["' + b"x" * (33 << 20) + b'"]}'
    resp = httpx.post(f"{stack.api_url}/v1/jobs", content=body, timeout=60,
                      headers={**auth(stack.api_key), "content-type": "application/json"})
    assert resp.status_code == 413, resp.text[:300]
    assert resp.json()["error"]["param"] == "body"


def test_json_cap_holds_for_chunked_bodies_and_any_case(quiet_stack):
    """No Content-Length (chunked) or `Application/JSON`: the cap holds while the body streams."""
    capped = spawn_api(quiet_stack, GENQ_MAX_JSON_BYTES="2000")
    body = b'{"type": "generate", "model": "m", "prompts": ["' + b"x" * 5000 + b'"]}'
    try:
        for content_type in ("application/json", "Application/JSON", "text/plain"):
            resp = httpx.post(f"{capped.api_url}/v1/jobs", timeout=60,
                              content=iter([body[:1000], body[1000:]]),  # chunked
                              headers={**auth(capped.api_key), "content-type": content_type})
            assert resp.status_code == 413, (content_type, resp.text[:300])
            assert resp.json()["error"]["param"] == "body"
        small = httpx.post(f"{capped.api_url}/v1/jobs",
                           headers={**auth(capped.api_key), "content-type": "application/json"},
                           content=iter([b'{"type": "generate", "model": "nope", ',
                                         b'"prompts": ["a"]}']))
        assert small.status_code == 404, small.text  # under the cap: read, then looked up
    finally:
        capped.stop_all()


def test_text_stored_by_another_writer_always_reads_back(quiet_stack, tmp_path):
    """Issue 26 item 3: a lone surrogate already in a row (written before the API refused
    them, or by another writer) reads back as valid JSON from every read of it."""
    from sqlalchemy import update

    from common.db import engine_for, session_factory
    from common.models import Item, Job

    key = make_key(quiet_stack, "surrogates")
    c = quiet_stack.client(key)
    job = c.create_job({"type": "train", "family": "lstm", "steps": 5,
                        "config": {"hidden": 8, "n_embd": 8}})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    batch = c.create_batch(c.upload_file(bad)["id"], metadata={"k": "v"})
    lone = "a\ud800b"
    with session_factory(engine_for(quiet_stack.env["GENQ_DATABASE_URL"]))() as s:
        spec = s.get(Job, job["id"]).spec
        s.execute(update(Job).where(Job.id == job["id"]).values(
            spec={**spec, "name": lone}, error={"code": "x", "message": lone}))
        batch_spec = s.get(Job, batch["id"]).spec
        s.execute(update(Job).where(Job.id == batch["id"]).values(
            spec={**batch_spec, "metadata": {"k": lone}}))
        s.add(Item(job_id=job["id"], index=0, custom_id="0", status="succeeded",
                   request={"prompt": lone}, response={"text": lone}))
        s.commit()
    reads = {f"/v1/jobs/{job['id']}": lambda b: b["spec"]["name"],
             f"/v1/jobs/{job['id']}/items": lambda b: b["data"][0]["response"]["text"],
             "/v1/jobs?limit=100": lambda b: next(
                 j["error"]["message"] for j in b["data"] if j["id"] == job["id"]),
             f"/v1/batches/{batch['id']}": lambda b: b["metadata"]["k"],
             "/v1/batches?limit=100": lambda b: b["data"][0]["metadata"]["k"]}
    for path, value in reads.items():
        resp = httpx.get(quiet_stack.api_url + path, headers=auth(key))
        assert resp.status_code == 200, (path, resp.text[:300])
        assert value(json.loads(resp.content)) == lone, path  # valid JSON, the text as stored
    with httpx.stream("GET", f"{quiet_stack.api_url}/v1/jobs/{job['id']}/events",
                      headers=auth(key), timeout=60) as events:
        data = next(line for line in events.iter_lines() if line.startswith("data: "))
    assert json.loads(data.removeprefix("data: "))["error"]["message"] == lone


def test_database_outage_is_503_and_password_not_logged(stack):
    """An API whose PostgreSQL is down answers 503 with a code, never 500, and keeps secrets."""
    password = f"pw-{uuid.uuid4().hex}"
    url = f"postgresql://genq:{password}@127.0.0.1:{_free_port()}/genq"
    down = spawn_api(stack, GENQ_DATABASE_URL=url)
    try:
        for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/readyz")]:
            resp = httpx.request(method, down.api_url + path, headers=auth(stack.api_key),
                                 json={"type": "train", "family": "lstm", "steps": 1}, timeout=30)
            assert resp.status_code == 503, (path, resp.text)
            assert password not in resp.text
    finally:
        down.stop_all()
    assert password not in down.log("api")
    assert stack.api_key not in stack.log("api") + stack.log("w1")


def test_weights_load_safely():
    """Weights come from safetensors; other state loads weights_only; no remote code."""
    sources = "\n".join(p.read_text() for p in Path(ROOT, "common").rglob("*.py"))
    sources += "\n".join(p.read_text() for p in Path(ROOT, "worker").rglob("*.py"))
    assert "trust_remote_code=True" not in sources
    for line in sources.splitlines():
        if "torch.load(" in line:
            assert "weights_only=True" in line, line


def test_celery_gets_child_limits():
    code = ("from common.celery_app import get_celery; c = get_celery().conf; "
            "print(c.worker_max_tasks_per_child, c.worker_max_memory_per_child)")
    env = {"GENQ_WORKER_MAX_TASKS_PER_CHILD": "7", "GENQ_WORKER_MAX_MEMORY_PER_CHILD_KB": "900000"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**__import__("os").environ, **env}, check=True)
    assert out.stdout.split() == ["7", "900000"]


def fuzz(stack: Stack, *, examples: int, checks: list[Any]) -> tuple[list[str], list[int]]:
    """Schemathesis over every operation of /openapi.json with a key of its own: the
    failures (a 5xx, or an answer failing one of `checks`) and every status seen."""
    from common.auth import create_key
    from common.db import engine_for, session_factory

    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        _, key = create_key(s, owner=f"fuzzer-{uuid.uuid4().hex[:6]}")
    schema = schemathesis.openapi.from_url(f"{stack.api_url}/openapi.json")
    failures: list[str] = []
    statuses: list[int] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 10

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):  # type: ignore[no-untyped-def]
            resp = case.call(headers=auth(key), timeout=30)
            statuses.append(resp.status_code)
            if resp.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {resp.status_code}: "
                                f"{resp.text[:300]}")
            try:  # the answer is one the schema declares
                case.validate_response(resp, checks=checks)
            except Exception as exc:  # schemathesis' failure group, one line per check
                failures.append(f"{case.method} {case.formatted_path} -> {resp.status_code}: "
                                f"{str(exc)[:400]}")

        check()
    return failures, statuses


def test_fuzz_no_5xx(quiet_stack):
    """Schemathesis over every operation, authorised: nothing answers 5xx, and every answer
    conforms to the schema (a declared status, content type and body)."""
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    failures, statuses = fuzz(quiet_stack, examples=6, checks=[
        status_code_conformance, content_type_conformance, response_schema_conformance])
    assert not failures, "\n".join(failures[:10])
    assert len(statuses) >= 60 and any(code < 300 for code in statuses)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not os.environ.get("GENQ_DEEP_FUZZ"),
                    reason="the deep fuzz run is `make fuzz` (GENQ_DEEP_FUZZ=1)")
def test_deep_fuzz_every_check(quiet_stack):
    """`make fuzz`: schemathesis' checks, GENQ_DEEP_FUZZ examples an operation (60 by
    default: over 1,000 cases), the rate limit off, no worker (training jobs stay queued)."""
    from schemathesis.checks import CHECKS

    api = spawn_api(quiet_stack, GENQ_RATE_LIMIT_PER_MINUTE="0")
    examples = int(os.environ["GENQ_DEEP_FUZZ"]) if os.environ["GENQ_DEEP_FUZZ"].isdigit() else 60
    try:
        # every check but positive_data_acceptance: the specs have rules across fields that
        # JSON Schema cannot state (a generate job needs prompts, chats or labels; a model
        # config's sizes must fit together), and those are a 422 naming the field by design
        checks = [c for c in CHECKS.get_all() if c.__name__ != "positive_data_acceptance"]
        failures, statuses = fuzz(api, examples=max(examples, 2), checks=checks)
    finally:
        api.stop_all()
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])
    assert len(statuses) >= 1000 or examples < 60, len(statuses)


def test_a_workers_current_job_shows_to_its_owner_only(stack):
    from common.auth import create_key
    from common.db import engine_for, session_factory

    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        _, other = create_key(s, owner=f"stranger-{uuid.uuid4().hex[:6]}")
    c = stack.client()
    job = c.create_job({"type": "train", "family": "lstm", "steps": 400, "batch_size": 4,
                        "seq_len": 16, "config": {"hidden": 16, "n_embd": 8, "n_layer": 1}})

    def current(key: str) -> set[str]:
        workers = httpx.get(f"{stack.api_url}/v1/workers", headers=auth(key)).json()["data"]
        return {w["current_job"] for w in workers if w["current_job"]}

    try:
        deadline = time.monotonic() + 60
        while job["id"] not in current(stack.api_key):
            assert time.monotonic() < deadline, "the job never showed as running"
            time.sleep(0.2)
        assert current(other) == set()  # the stranger sees the worker, not whose job it runs
    finally:
        c.request("POST", f"/v1/jobs/{job['id']}/cancel")
        c.wait(job["id"], timeout=60)


def test_one_key_holding_many_waits_leaves_the_api_to_everyone_else(quiet_stack):
    """Issue 26 item 2: one key holds 25 `/events` streams and 105 `?wait=` reads (cap 100
    in this API process): 30 reads and a 26th stream answer 429 at once with Retry-After,
    the held ones hold no thread and no connection, and meanwhile health probes, another
    key's reads and submits, and its event stream answer."""
    import asyncio

    api = spawn_api(quiet_stack, GENQ_MAX_HELD_PER_OWNER="100", GENQ_RATE_LIMIT_PER_MINUTE="0")
    holder, other = auth(make_key(quiet_stack, "holder")), auth(make_key(quiet_stack, "other"))
    spec = {"type": "train", "family": "lstm", "steps": 5, "config": {"hidden": 8, "n_embd": 8}}
    try:
        waited = httpx.post(f"{api.api_url}/v1/jobs", json=spec, headers=holder,
                            timeout=120).json()["id"]

        async def run() -> tuple[list[int], list[httpx.Response], dict[str, int]]:
            limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=api.api_url, limits=limits,
                                         timeout=120) as client:
                opened, done = asyncio.Semaphore(0), asyncio.Event()

                async def hold_stream() -> int:
                    async with client.stream("GET", f"/v1/jobs/{waited}/events",
                                             headers=holder) as stream:
                        lines = stream.aiter_lines()
                        while not (await anext(lines)).startswith("event: status"):
                            pass
                        opened.release()  # its first event came: it is held
                        await done.wait()
                        return stream.status_code

                streams = [asyncio.create_task(hold_stream()) for _ in range(25)]
                for _ in streams:
                    await asyncio.wait_for(opened.acquire(), timeout=120)
                holds = [asyncio.create_task(client.get(f"/v1/jobs/{waited}?wait=60",
                                                        headers=holder)) for _ in range(105)]
                while sum(t.done() for t in holds) < 30:  # the refused ones come back first
                    await asyncio.sleep(0.1)
                codes = {
                    "healthz": (await client.get("/healthz", timeout=30)).status_code,
                    "readyz": (await client.get("/readyz", timeout=30)).status_code,
                    "models": (await client.get("/v1/models", headers=other,
                                                timeout=30)).status_code,
                    "submit": (await client.post("/v1/jobs", json=spec, headers=other,
                                                 timeout=30)).status_code,
                    "own_stream": (await client.get(f"/v1/jobs/{waited}/events",
                                                    headers=holder, timeout=30)).status_code,
                }
                mine = (await client.post("/v1/jobs", json=spec, headers=other)).json()["id"]
                async with client.stream("GET", f"/v1/jobs/{mine}/events", headers=other,
                                         timeout=30) as stream:
                    codes["other_stream"] = stream.status_code
                assert all(not t.done() or t.result().status_code == 429 for t in holds), (
                    "a held read answered before its wait was over")
                assert not any(t.done() for t in streams), "a held stream ended early"
                done.set()
                return (list(await asyncio.gather(*streams)), list(await asyncio.gather(*holds)),
                        codes)

        streamed, answers, codes = asyncio.run(run())
        assert codes == {"healthz": 200, "readyz": 200, "models": 200, "submit": 201,
                         "own_stream": 429, "other_stream": 200}, codes
        assert streamed == [200] * 25
        refused = [r for r in answers if r.status_code == 429]
        assert len(refused) == 30 and all(r.headers["Retry-After"] for r in refused)
        assert all(r.json()["error"]["code"] == "rate_limited" for r in refused)
        assert sorted(r.status_code for r in answers) == [200] * 75 + [429] * 30
        assert all(r.json()["status"] == "queued" for r in answers if r.status_code == 200)
    finally:
        api.stop_all()


def _leaves(schema: dict, defs: dict, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], str]]:
    """(path, type) of every integer, number and string field of a JSON schema."""
    if "$ref" in schema:
        schema = defs[schema["$ref"].split("/")[-1]]
    for option in schema.get("anyOf", []):
        if option.get("type") != "null":
            yield from _leaves(option, defs, path)
    kind = schema.get("type")
    if kind == "object":
        for name, field in schema.get("properties", {}).items():
            yield from _leaves(field, defs, (*path, name))
    elif kind in ("integer", "number", "string"):
        yield path, kind


ABSURD = {"integer": [2**64, -(2**64)], "number": [1e308, -1e308, 1e-320],
          "string": ["x" * 100_000, "a\ud800b"]}  # a lone surrogate: refused as the body
SPEC_BASES = {"train": {"type": "train", "family": "lstm"},
              "generate": {"type": "generate", "model": "no-such-model", "prompts": ["a"]}}


def absurd_cases() -> list[tuple[str, dict, str]]:
    """(name, spec, field) for every numeric and string field of both specs and of every
    family's config, each set to each absurd value of its type."""
    from common.ml.families import FAMILIES
    from common.schemas import GenerateSpec, TrainJobSpec

    cases = []
    walks = [("train", TrainJobSpec.model_json_schema(), ()),
             ("generate", GenerateSpec.model_json_schema(), ())]
    walks += [(f"train:{name}", family.Config.model_json_schema(), ("config",))
              for name, family in FAMILIES.items()]
    for base, schema, prefix in walks:
        for path, kind in _leaves(schema, schema.get("$defs", {}), prefix):
            if path in (("type",), ("family",)) or path[-1] == "arch":
                continue  # the discriminators: an unknown one is its own 422
            if path == ("data", "path"):
                continue  # the worker's own field: any value from the API is refused
            for value in ABSURD[kind]:
                kind_of_spec, _, family = base.partition(":")
                spec = json.loads(json.dumps(SPEC_BASES[kind_of_spec]))
                if family:
                    spec["family"] = family
                node = spec
                for key in path[:-1]:
                    node = node.setdefault(key, {})
                node[path[-1]] = value
                cases.append((f"{base} {'.'.join(path)}={str(value)[:12]}", spec,
                              ".".join(path)))
    return cases


def test_every_absurd_value_of_every_spec_field_is_a_422_naming_it(quiet_stack):
    """Issue 26: 2**64, -2**64, 1e308, -1e308, 1e-320 and 100,000-character strings in every
    field of the training and generation specs and of every family's config answer 422
    naming that field, a lone surrogate in any string field a 422 naming the body, and
    nothing is stored."""
    from sqlalchemy import func, select

    from common.db import engine_for, session_factory
    from common.models import Job

    api = spawn_api(quiet_stack, GENQ_RATE_LIMIT_PER_MINUTE="0")
    headers = auth(quiet_stack.api_key)
    engine = engine_for(quiet_stack.env["GENQ_DATABASE_URL"])
    with session_factory(engine)() as s:
        before = s.scalar(select(func.count()).select_from(Job))
    wrong = []
    cases = absurd_cases()
    assert len(cases) > 150
    try:
        with httpx.Client(base_url=api.api_url, headers=headers, timeout=60) as client:
            for name, spec, field in cases:
                body = json.dumps(spec)  # ASCII escapes: a lone surrogate goes as \ud800
                if "\\ud800" in body:
                    field = "body"  # caught before any field is read (test_http_bodies)
                resp = client.post("/v1/jobs", content=body,
                                   headers={"Content-Type": "application/json"})
                error = resp.json().get("error", {}) if resp.status_code == 422 else {}
                params = {error.get("param")} | {e.get("param") for e in error.get("errors", [])}
                if resp.status_code != 422 or not any(
                        p and (p == field or p.startswith(field + ".") or p.startswith(field + "["))
                        for p in params):
                    wrong.append(f"{name}: {resp.status_code} {resp.text[:200]}")
    finally:
        api.stop_all()
    assert not wrong, f"{len(wrong)} of {len(cases)}:\n" + "\n".join(wrong[:20])
    with session_factory(engine)() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == before
