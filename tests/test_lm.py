"""The `lm` family through the API: any transformers causal LM from a config, and a hub id
resolved on the worker from its Hugging Face cache (offline), its commit recorded."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from common.db import engine_for, session_factory
from common.ml.checkpoint import read_meta
from common.models import Checkpoint, Job
from tests.conftest import Stack, fresh_database, start_stack

TEXT = "hello world, a tiny corpus for a tiny tokenizer. " * 40
TOKEN = "hf_genqtestsecret0123456789"  # the worker's HF_TOKEN: never in SQL, logs or the API
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ARCHS = {
    "llama": {"arch": "llama", "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64},
    "qwen2": {"arch": "qwen2", "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64,
              "max_position_embeddings": 64},
    "gpt2": {"arch": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64},
}


def train(stack: Stack, config: dict, steps: int = 3, **extra: object) -> dict:
    c = stack.client()
    spec = {"type": "train", "family": "lm", "config": config, "steps": steps,
            "batch_size": 4, "seq_len": 32, "checkpoint_every": 10, "log_every": 5, **extra}
    return c.wait(c.create_job(spec)["id"], timeout=300)


def checkpoint_dir(stack: Stack, checkpoint_id: str) -> Path:
    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        return Path(s.get(Checkpoint, checkpoint_id).uri.removeprefix("file://"))


def generate(stack: Stack, model: str) -> list[str]:
    c = stack.client()
    job = c.wait(c.create_job({"type": "generate", "model": model, "prompts": ["hello", ""],
                               "max_tokens": 4, "temperature": 0})["id"], timeout=120)
    assert job["status"] == "succeeded", job
    return [item["response"]["texts"][0] for item in c.items(job["id"])]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_lm_trains_any_architecture_from_a_config_and_generates(stack, arch):
    job = train(stack, {**ARCHS[arch], "vocab_size": 300})
    assert job["status"] == "succeeded", (job, stack.log("w1")[-3000:])
    meta = read_meta(checkpoint_dir(stack, job["result"]["checkpoint_id"]))
    assert meta["family"] == "lm" and meta["arch"]["model_type"] == arch
    assert "source" not in meta
    model = stack.client().request("GET", f"/v1/models/{job['result']['model']}")
    assert model["family"] == "lm" and model["source"] is None
    texts = generate(stack, job["result"]["model"])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_gpt_is_an_alias_of_lm(stack):
    """A `gpt` checkpoint (meta family "gpt") resumes under `lm`, and the reverse is the same."""
    first = train(stack, ARCHS["gpt2"], family="gpt")
    assert first["status"] == "succeeded" and first["family"] == "gpt", first
    assert read_meta(checkpoint_dir(stack, first["result"]["checkpoint_id"]))["family"] == "gpt"
    resumed = train(stack, ARCHS["gpt2"], steps=5, resume_from=first["result"]["checkpoint_id"])
    assert resumed["status"] == "succeeded", (resumed, stack.log("w1")[-3000:])
    assert resumed["result"]["step"] == 5


def test_bad_arch_fields_and_sources_are_422s_naming_the_field(stack):
    def problem(config: dict) -> str:
        resp = httpx.post(f"{stack.api_url}/v1/jobs",
                          headers={"Authorization": f"Bearer {stack.api_key}"},
                          json={"type": "train", "family": "lm", "config": config})
        assert resp.status_code == 422, resp.text
        error = resp.json()["error"]
        assert error["param"] == error["message"].split(":")[0], error
        return error["message"]

    assert "config.hiden_size: unknown field for arch 'llama'" in problem(
        {**ARCHS["llama"], "hiden_size": 32})
    assert "config.arch:" in problem({"arch": "not-an-arch"})
    assert "config.pretrained:" in problem({"pretrained": "no-such-folder"})
    assert "config.pretrained:" in problem({"pretrained": "not a hub id/x y"})
    assert "config.revision:" in problem({"revision": "main"})


# ---------------------------------------------------------------- hub ids, offline cache


def tiny_hub_model(folder: Path) -> None:
    """A tiny llama with its tokenizer, as save_pretrained writes it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from common.ml.families.lm import train_tokenizer

    tokenizer = train_tokenizer(TEXT, 300)
    tokenizer.save_pretrained(folder)
    eot = tokenizer.eos_token_id
    AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)).save_pretrained(folder)


def cache_repo(hub_cache: Path, repo_id: str, commit: str, files: Path) -> None:
    """huggingface_hub's cache layout: blobs by hash, refs/main, snapshots/<commit> links."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in files.iterdir():
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        (repo / "blobs" / blob).write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob)


@pytest.fixture(scope="module")
def offline_stack(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own whose worker has a pre-populated HF cache, HF_HUB_OFFLINE=1 and a
    token; its own database and Redis db, so the session's worker never takes its jobs."""
    hf_home = tmp_path_factory.mktemp("hf-home")
    files = tmp_path_factory.mktemp("tiny-llama")
    tiny_hub_model(files)
    cache_repo(hf_home / "hub", "genq-test/tiny-llama", COMMIT, files)
    with fresh_database("sqlite") as db:
        s = start_stack(db, redis_server.rsplit("/", 1)[0] + "/12", env_extra={
            "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_TOKEN": TOKEN})
        try:
            s.start_worker("hub1", queues="cpu")
            yield s
        finally:
            s.stop_all()


def no_token_anywhere(stack: Stack, job: dict) -> None:
    c = stack.client()
    shown = json.dumps([job, c.logs(job["id"]), c.models()])
    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        row = s.get(Job, job["id"])
        stored = json.dumps([row.spec, row.error, row.result, row.attempts_log], default=str)
    assert TOKEN not in shown and TOKEN not in stored
    assert TOKEN not in stack.log("hub1")


def test_hub_id_resolves_from_the_offline_cache_and_records_its_commit(offline_stack):
    name = f"tuned-{uuid.uuid4().hex[:6]}"
    job = train(offline_stack, {"pretrained": "genq-test/tiny-llama", "revision": "main"},
                name=name)
    assert job["status"] == "succeeded", (job, offline_stack.log("hub1")[-3000:])
    meta = read_meta(checkpoint_dir(offline_stack, job["result"]["checkpoint_id"]))
    source = {"hub_id": "genq-test/tiny-llama", "revision": "main", "commit": COMMIT}
    assert meta["source"] == source and meta["config"]["commit"] == COMMIT
    assert meta["arch"]["model_type"] == "llama"
    model = offline_stack.client().request("GET", f"/v1/models/{name}")
    assert model["source"] == {**source, "local_dir": None}
    assert len(generate(offline_stack, name)) == 2
    no_token_anywhere(offline_stack, job)


def test_lora_over_a_hub_model_records_its_base_and_generates(offline_stack):
    """The base is the hub commit (never copied into genq's storage): the checkpoint holds
    the adapter alone, and generation loads the base from the cache, then the adapter."""
    name = f"lora-{uuid.uuid4().hex[:6]}"
    job = train(offline_stack, {"pretrained": "genq-test/tiny-llama"}, name=name,
                adapter={"r": 4, "target_modules": "all-linear"})
    assert job["status"] == "succeeded", (job, offline_stack.log("hub1")[-3000:])
    folder = checkpoint_dir(offline_stack, job["result"]["checkpoint_id"])
    assert not (folder / "model.safetensors").exists() and not (folder.parent / "base").exists()
    meta = read_meta(folder)
    assert meta["source"]["commit"] == COMMIT and "base" not in meta
    model = offline_stack.client().request("GET", f"/v1/models/{name}")
    assert model["source"]["hub_id"] == "genq-test/tiny-llama"
    assert model["source"]["commit"] == COMMIT
    assert model["adapter"]["spec"]["r"] == 4 and model["adapter"]["base_stored"] is False
    assert len(generate(offline_stack, name)) == 2
    no_token_anywhere(offline_stack, job)


def test_unknown_hub_id_fails_at_once_with_model_not_found(offline_stack):
    job = train(offline_stack, {"pretrained": "genq-test/no-such-model"}, max_attempts=3)
    assert job["status"] == "failed" and job["error"]["code"] == "model_not_found", job
    assert job["attempt"] == 1 and not job["error"]["retryable"]
    assert "genq-test/no-such-model" in job["error"]["message"]
    no_token_anywhere(offline_stack, job)
    job = train(offline_stack, {"pretrained": "genq-test/tiny-llama", "revision": "v9"})
    assert job["error"]["code"] == "model_not_found" and job["attempt"] == 1, job
    assert "genq-test/tiny-llama@v9" in job["error"]["message"]


def test_the_readme_path_lora_on_a_hub_model_from_the_cli_then_an_sdk_batch(offline_stack):
    """What the README shows a user: `genq train lm` with a hub id and `--adapter`, then a
    `/v1/chat/completions` batch naming the LoRA model through the official openai SDK."""
    from tests.test_batches import lines_for, read_jsonl, run_batch, sdk
    from tests.test_cli import genq

    env = {**offline_stack.env, "GENQ_API_URL": offline_stack.api_url,
           "GENQ_API_KEY": offline_stack.api_key}
    name = f"smol-lora-{uuid.uuid4().hex[:6]}"
    done = genq("train", "lm", "--config", json.dumps({"pretrained": "genq-test/tiny-llama"}),
                "--adapter", json.dumps({"r": 8}), "--steps", "3", "--batch-size", "2",
                "--name", name, "--watch", env=env, timeout=600)
    assert done.returncode == 0, (done.stdout, done.stderr, offline_stack.log("hub1")[-3000:])
    model = offline_stack.client().request("GET", f"/v1/models/{name}")
    assert model["adapter"]["spec"]["r"] == 8 and model["source"]["commit"] == COMMIT

    rows = lines_for(name, 6, endpoint="/v1/chat/completions", max_tokens=4)
    batch = run_batch(sdk(offline_stack), rows, "/v1/chat/completions", timeout=300)
    assert batch.status == "completed", (batch, offline_stack.log("hub1")[-3000:])
    out = read_jsonl(sdk(offline_stack), batch.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(r["custom_id"] for r in rows)
    assert all(o["response"]["body"]["model"] == name for o in out)
