"""The Storage API on a local file:// root and on S3 (moto's server over real HTTP)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.storage import Storage
from tests.conftest import BACKENDS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free local port, with dummy credentials in the environment."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    dummy = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in dummy}
    os.environ.update(dummy)
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _s3_storage(endpoint: str) -> Storage:
    import boto3

    bucket = f"genq-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return Storage(f"s3://{bucket}/prefix", s3_endpoint_url=endpoint)


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "file":
        return Storage(f"file://{tmp_path / 'objects'}")
    return _s3_storage(request.getfixturevalue("s3_endpoint"))


def _checkpoint_folder(root: Path) -> Path:
    folder = root / "step-00000010"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(3000))
    (folder / "config.json").write_text('{"family": "lstm"}')
    (folder / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*") if p.is_file() and p.name != ".complete"}


def test_bytes_round_trip_and_uri(store: Storage) -> None:
    uri = store.put_bytes("artifacts/job_1/a.txt", b"hello")
    assert uri == f"{store.root}/artifacts/job_1/a.txt"
    assert store.key_of(uri) == "artifacts/job_1/a.txt"
    assert store.get_bytes("artifacts/job_1/a.txt") == b"hello"
    assert store.exists("artifacts/job_1/a.txt")
    assert not store.exists("artifacts/job_1/missing.txt")
    with pytest.raises(ValueError):
        store.key_of("s3://elsewhere/x")


def test_put_stream_hashes_and_iter_bytes_streams(store: Storage) -> None:
    chunks = [os.urandom(700_000), os.urandom(900_000), b"tail"]
    data = b"".join(chunks)
    uri, size, sha = store.put_stream("files/big.bin", iter(chunks))
    assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
    assert store.key_of(uri) == "files/big.bin"
    parts = list(store.iter_bytes("files/big.bin"))
    assert b"".join(parts) == data and len(parts) >= 2


@pytest.mark.parametrize("key", ["../x", "a/../../b", "", "/", "a/./../b"])
def test_rejects_escaping_keys(store: Storage, key: str) -> None:
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        store.get_bytes(key)


def test_checkpoint_folder_round_trips(store: Storage, tmp_path: Path) -> None:
    folder = _checkpoint_folder(tmp_path / "local")
    uri, total = store.put_dir("checkpoints/job_1/step-00000010", folder)
    assert store.key_of(uri) == "checkpoints/job_1/step-00000010"
    assert total == sum(len(b) for b in _tree(folder).values())

    cache = tmp_path / "cache"
    got = store.local_dir("checkpoints/job_1/step-00000010", cache)
    assert _tree(got) == _tree(folder)
    if not store.is_local:
        # A cached copy is complete (marker) and reused without downloading again.
        assert (got / ".complete").exists()
        (got / "model.safetensors").write_bytes(b"local edit")
        assert (store.local_dir("checkpoints/job_1/step-00000010", cache)
                / "model.safetensors").read_bytes() == b"local edit"
        # A half download (no marker) is fetched again.
        (got / ".complete").unlink()
        again = store.local_dir("checkpoints/job_1/step-00000010", cache)
        assert _tree(again) == _tree(folder) and (again / ".complete").exists()
        assert not list(cache.rglob("*.part*"))

    store.delete("checkpoints/job_1/step-00000010")
    assert not store.exists("checkpoints/job_1/step-00000010/config.json")
    with pytest.raises(FileNotFoundError):
        store.local_dir("checkpoints/job_1/step-00000010", tmp_path / "cache2")


def test_sees_objects_written_by_another_machine(s3_endpoint: str, tmp_path: Path) -> None:
    """No stale listing cache: an object another host uploads is visible at once."""
    import boto3

    store = _s3_storage(s3_endpoint)
    bucket, prefix = store.base.split("/", 1)
    store.put_bytes("shared/a", b"1")
    assert not store.exists("shared/b")
    assert store.local_dir("shared", tmp_path / "c1").is_dir()  # lists the folder
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(
        Bucket=bucket, Key=f"{prefix}/shared/b", Body=b"2")
    assert store.exists("shared/b")
    assert store.get_bytes("shared/b") == b"2"
    assert sorted(p.name for p in store.local_dir("shared", tmp_path / "c2").iterdir()) == [
        ".complete", "a", "b"]


def test_local_file(store: Storage, tmp_path: Path) -> None:
    store.put_bytes("files/file-1/data.txt", b"abc")
    path = store.local_file("files/file-1/data.txt", tmp_path / "cache")
    assert path.read_bytes() == b"abc"
    assert store.local_file("files/file-1/data.txt", tmp_path / "cache") == path


def test_delete_missing_is_quiet(store: Storage) -> None:
    store.delete("nothing/here")
    store.put_bytes("one/two.txt", b"2")
    store.delete("one/two.txt")
    assert not store.exists("one/two.txt")


def test_checkpoint_through_results_on_s3(s3_endpoint: str, tmp_path: Path) -> None:
    """A real model checkpoint goes to S3 via common.results and loads back from the cache."""
    pytest.importorskip("torch")
    ml_checkpoint = pytest.importorskip("common.ml.checkpoint")
    families = pytest.importorskip("common.ml.families")
    from sqlalchemy import create_engine

    from common import results
    from common.models import Base, Job

    store = _s3_storage(s3_endpoint)
    vae = families.get_family("vae")
    config = vae.Config()
    model = vae.build_model(config, None, arch=None)
    local = tmp_path / "ckpt"
    ml_checkpoint.save_checkpoint(local, family="vae", config=config, model=model,
                                  tokenizer_or_none=None, train_state=None, metrics={"loss": 1.0})

    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(engine)
    from sqlalchemy.orm import Session

    with Session(engine, expire_on_commit=False) as session:
        job = Job(id="job_s3test", owner="o", type="train", family="vae", status="running",
                  queue="cpu", spec={})
        session.add(job)
        session.commit()
        ckpt = results.save_checkpoint(session, store, job=job, step=10, local=local,
                                       metrics={"loss": 1.0})
        model_row = results.register_model(session, job=job, name="s3-vae", checkpoint=ckpt)
        assert ckpt.uri.startswith(store.root + "/checkpoints/job_s3test/")
        assert model_row.checkpoint_id == ckpt.id

    loaded = ml_checkpoint.load_model(store.local_dir(store.key_of(ckpt.uri), tmp_path / "cache"))
    import torch

    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_stack_on_s3(s3_endpoint, backend, redis_server, tmp_path):
    """API + worker with GENQ_STORAGE_URL=s3://…: train from an uploaded dataset, resume from
    a checkpoint, generate, download artifacts and batch output, all through the bucket. On
    a database and a Redis db of its own (the session worker's reaper must not take its jobs)."""
    import boto3
    import httpx

    from tests.conftest import own_stack

    bucket = f"genq-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    env = {"GENQ_STORAGE_URL": f"s3://{bucket}/genq", "GENQ_S3_ENDPOINT_URL": s3_endpoint}
    with own_stack(redis_server, 7, backend, env_extra=env) as stack:
        stack.start_worker("s3w", queues="cpu")
        c = stack.client()
        text = tmp_path / "corpus.txt"
        text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
        dataset = c.upload_file(text, purpose="dataset")["id"]
        spec = {"type": "train", "family": "lstm", "steps": 10, "batch_size": 4, "seq_len": 16,
                "checkpoint_every": 5, "data": {"file_id": dataset},
                "config": {"hidden": 16, "n_embd": 8, "n_layer": 1}}
        first = c.wait(c.create_job(spec)["id"], timeout=120)
        assert first["status"] == "succeeded", (first, stack.log("s3w")[-2000:])
        resumed = c.wait(c.create_job({**spec, "steps": 14, "name": "s3-lstm",
                                       "resume_from": first["result"]["checkpoint_id"]})["id"],
                         timeout=120)
        assert resumed["status"] == "succeeded", resumed
        keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint)
                .list_objects_v2(Bucket=bucket)["Contents"]]
        assert any(k.endswith("/model.safetensors") for k in keys)
        assert not (stack.home / "storage").exists()  # nothing went to the local default

        plot = next(a for a in resumed["result"]["artifacts"] if a["kind"] == "loss_plot")
        assert c.request("GET", plot["url"])[:4] == b"\x89PNG"
        gen = c.wait(c.create_job({"type": "generate", "model": "s3-lstm", "prompts": ["the "],
                                   "max_tokens": 8})["id"], timeout=60)
        assert gen["status"] == "succeeded"
        lines = tmp_path / "batch.jsonl"
        lines.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/completions", '
                         '"body": {"model": "s3-lstm", "prompt": "the ", "max_tokens": 4}}\n')
        batch = c.wait_batch(c.create_batch(c.upload_file(lines)["id"])["id"], timeout=60)
        assert batch["status"] == "completed", batch
        out = httpx.get(f"{stack.api_url}/v1/files/{batch['output_file_id']}/content",
                        headers={"Authorization": f"Bearer {stack.api_key}"})
        assert out.status_code == 200
        assert [json.loads(line)["custom_id"] for line in out.text.splitlines()] == ["a"]


def _can_hide_folders() -> bool:
    """Whether this process may make a mount namespace (root on Linux, util-linux unshare)."""
    import shutil
    import subprocess

    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not os.environ.get("GENQ_TEST_POSTGRES_URL"),
                    reason="a worker sharing no disk needs a network database: set "
                           "GENQ_TEST_POSTGRES_URL")
@pytest.mark.skipif(not _can_hide_folders(), reason="needs a mount namespace (unshare -m)")
def test_a_worker_shares_no_disk_with_the_api(s3_endpoint, redis_server, tmp_path):
    """Issue 24: workers on other hosts need nothing of the API's disk. Each worker runs in a
    mount namespace of its own where the API's home and the client's folder are empty
    tmpfs mounts, with its own GENQ_HOME, TMPDIR and HF_HOME, against PostgreSQL, Redis and
    S3 (moto); it trains from an uploaded dataset, is killed -9 whole mid-run, a second
    such worker resumes the job from its S3 checkpoint, and it serves a batch."""
    import signal
    import sys

    import boto3

    from tests.conftest import _TMP, finish, fresh_database, start_stack, wait_for

    bucket = f"genq-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    with fresh_database("postgresql") as db:
        stack = start_stack(db, redis_server.rsplit("/", 1)[0] + "/14", env_extra={
            "GENQ_STORAGE_URL": f"s3://{bucket}/genq", "GENQ_S3_ENDPOINT_URL": s3_endpoint,
            "GENQ_LEASE_S": "5"})

        def remote_worker(name: str) -> Path:
            home = _TMP / f"host-{name}-{uuid.uuid4().hex[:6]}"
            (home / "tmp").mkdir(parents=True)
            hide = " && ".join(f"mount -t tmpfs none {folder}"
                               for folder in (stack.home, client_dir))
            stack.env.update({"GENQ_HOME": str(home), "TMPDIR": str(home / "tmp"),
                              "HF_HOME": str(home / "hf")})
            stack.spawn(name, ["unshare", "-m", "--propagation", "private", "sh", "-c",
                               f"{hide} && exec {sys.executable} -m api.cli worker "
                               f"--queues cpu --name {name}"])
            stack.wait_worker(name)
            return home

        try:
            c = stack.client()
            corpus = client_dir / "corpus.txt"
            corpus.write_text("the quick brown fox jumps over the lazy dog. " * 300)
            dataset = c.upload_file(corpus, purpose="dataset")["id"]
            remote_worker("far1")
            spec = {"type": "train", "family": "lstm", "steps": 400, "batch_size": 4,
                    "seq_len": 16, "checkpoint_every": 10, "log_every": 10, "name": "far-lstm",
                    "data": {"file_id": dataset},
                    "config": {"hidden": 16, "n_embd": 8, "n_layer": 1}}
            job = c.create_job(spec)

            def past_a_checkpoint() -> bool:
                now = c.get_job(job["id"])
                assert now["status"] in ("queued", "running"), now
                return now["status"] == "running" and now["progress"]["done"] >= 12

            wait_for(past_a_checkpoint, timeout=120, interval=0.1)
            stack.stop("far1", sig=signal.SIGKILL)
            far2 = remote_worker("far2")
            done = finish(c, job["id"])
            assert done["status"] == "succeeded" and done["attempt"] >= 2, (
                done, stack.log("far2")[-2000:])
            logs = [line["message"] for line in c.logs(job["id"])]
            assert any("resuming from checkpoint" in m for m in logs), logs

            lines = client_dir / "batch.jsonl"
            lines.write_text("".join(json.dumps({
                "custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                "body": {"model": "far-lstm", "prompt": "the ", "max_tokens": 6}}) + "\n"
                for i in range(5)))
            batch = c.wait_batch(c.create_batch(c.upload_file(lines)["id"])["id"], timeout=120)
            assert batch["status"] == "completed", batch
            out = c.file_content(batch["output_file_id"]).decode().splitlines()
            assert sorted(json.loads(line)["custom_id"] for line in out) == [
                f"r{i}" for i in range(5)]
            # the API's home holds its log, its own copy of the dataset (checked at submit)
            # and the logs this test opened there; the worker fetched its copy from S3
            assert not (stack.home / "storage").exists()
            assert sorted(p.name for p in stack.home.iterdir()) == [
                "api.log", "cache", "far1.log", "far2.log"]
            assert [p.name for p in (far2 / "cache" / "datasets").iterdir()] == [
                p.name for p in (stack.home / "cache" / "datasets").iterdir()]
        finally:
            stack.stop_all()
