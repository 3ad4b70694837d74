"""Full and LoRA fine-tuning of tiny `lm` configs through the API: what a LoRA checkpoint
and a registered LoRA model hold, generation from base + adapter, merge, 422s."""

from __future__ import annotations

import uuid

import httpx
import pytest

from common.db import engine_for, session_factory
from common.ml.adapters import ADAPTER_WEIGHTS
from common.ml.checkpoint import MODEL_FILE, read_meta
from common.models import Checkpoint
from tests.test_lm import ARCHS, checkpoint_dir, generate, train

ADAPTER = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}


def stored_bytes(stack, checkpoint_id: str) -> int:
    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        return s.get(Checkpoint, checkpoint_id).bytes


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_full_and_lora_fine_tuning_then_generation(stack, arch):
    config = {**ARCHS[arch], "vocab_size": 300}
    full = train(stack, config)
    assert full["status"] == "succeeded", (full, stack.log("w1")[-3000:])
    lora = train(stack, config, adapter=ADAPTER, name=f"lora-{arch}-{uuid.uuid4().hex[:6]}")
    assert lora["status"] == "succeeded", (lora, stack.log("w1")[-3000:])

    folder = checkpoint_dir(stack, lora["result"]["checkpoint_id"])
    assert (folder / ADAPTER_WEIGHTS).is_file() and not (folder / MODEL_FILE).exists()
    meta = read_meta(folder)
    assert meta["adapter"] == {**ADAPTER, "target_modules": None, "merge": False}
    base = checkpoint_dir(stack, lora["result"]["checkpoint_id"]).parent / "base"
    assert meta["base"]["uri"] == f"file://{base}" and (base / MODEL_FILE).is_file()
    base_bytes = sum(f.stat().st_size for f in base.iterdir())
    full_bytes = stored_bytes(stack, full["result"]["checkpoint_id"])
    lora_bytes = stored_bytes(stack, lora["result"]["checkpoint_id"])
    assert (folder / ADAPTER_WEIGHTS).stat().st_size < (base / MODEL_FILE).stat().st_size * 0.1
    assert lora_bytes < base_bytes * 0.5 and lora_bytes < full_bytes * 0.5, (lora_bytes,
                                                                            full_bytes)

    model = stack.client().request("GET", f"/v1/models/{lora['result']['model']}")
    assert model["adapter"] == {"spec": meta["adapter"], "base_stored": True}
    assert model["source"] is None
    assert stack.client().request("GET", f"/v1/models/{full['result']['model']}")[
        "adapter"] is None
    for job in (full, lora):
        texts = generate(stack, job["result"]["model"])
        assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_merge_registers_full_weights_that_generate_as_base_plus_adapter(stack):
    """Two runs alike but for merge: the merged model's full weights generate what base +
    adapter do (greedy), so the adapter model really loads both."""
    config = {**ARCHS["llama"], "vocab_size": 300}
    adapter = {**ADAPTER, "target_modules": "all-linear"}
    kept = train(stack, config, steps=4, lr=0.05, adapter=adapter)
    merged = train(stack, config, steps=4, lr=0.05, adapter={**adapter, "merge": True})
    assert kept["status"] == merged["status"] == "succeeded", (kept, merged)
    model = stack.client().request("GET", f"/v1/models/{merged['result']['model']}")
    assert model["adapter"] is None
    # the job's last checkpoint stays the adapter's (resumable); the model is the merge
    assert (checkpoint_dir(stack, merged["result"]["checkpoint_id"]) / ADAPTER_WEIGHTS).is_file()
    folder = checkpoint_dir(stack, model["checkpoint_id"])
    assert folder.name == "merged" and (folder / MODEL_FILE).is_file()
    assert "adapter" not in read_meta(folder)
    assert generate(stack, merged["result"]["model"]) == generate(stack, kept["result"]["model"])


def test_bad_adapters_are_422s_naming_the_field(stack):
    def param(spec: dict) -> str:
        resp = httpx.post(f"{stack.api_url}/v1/jobs",
                          headers={"Authorization": f"Bearer {stack.api_key}"},
                          json={"type": "train", **spec})
        assert resp.status_code == 422, resp.text
        return resp.json()["error"]["param"]

    lm = {"family": "lm", "config": ARCHS["gpt2"]}
    assert param({**lm, "adapter": {"r": 0}}) == "adapter.r"
    assert param({**lm, "adapter": {"alpha": 10**9}}) == "adapter.alpha"
    assert param({**lm, "adapter": {"dropout": -0.1}}) == "adapter.dropout"
    assert param({**lm, "adapter": {"method": "dora"}}) == "adapter.method"
    assert param({**lm, "adapter": {"target_modules": "c_attn"}}) == "adapter.target_modules"
    assert param({**lm, "adapter": {"target_modules": ["c attn"]}}) == "adapter.target_modules[0]"
    assert param({**lm, "adapter": {"rank": 4}}) == "adapter.rank"
    assert param({"family": "lstm", "adapter": {}}) == "adapter"
    # a from-config base is built on the meta device at submit: peft checks the names
    assert param({**lm, "adapter": {"target_modules": ["q_proj"]}}) == "adapter.target_modules"
    # a pretrained base is known only on the worker: the job fails at once
    from tests.test_lm import tiny_hub_model

    folder = f"base-{uuid.uuid4().hex[:6]}"
    tiny_hub_model(stack.home / "pretrained" / folder)
    job = train(stack, {"pretrained": folder}, adapter={"target_modules": ["c_attn"]},
                max_attempts=3)
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_spec", job
    assert job["attempt"] == 1 and job["error"]["message"].startswith("adapter.target_modules:")


def test_the_cli_trains_a_lora_adapter_and_generates_from_it(stack):
    import json

    from tests.test_cli import genq

    env = {**stack.env, "GENQ_API_URL": stack.api_url, "GENQ_API_KEY": stack.api_key}
    name = f"cli-lora-{uuid.uuid4().hex[:6]}"
    done = genq("train", "lm", "--config", json.dumps(ARCHS["gpt2"]), "--adapter",
                json.dumps({"r": 4}), "--steps", "3", "--batch-size", "4", "--name", name,
                "--watch", env=env, timeout=300)
    assert done.returncode == 0, (done.stdout, done.stderr)
    model = stack.client().request("GET", f"/v1/models/{name}")
    assert model["adapter"]["spec"]["r"] == 4
    texts = genq("generate", name, "hello", "--max-tokens", "4", env=env)
    assert texts.returncode == 0, texts.stderr


def test_a_batch_naming_two_lora_models_of_one_base_loads_the_base_once(stack, tmp_path):
    """Through the official SDK on /v1/chat/completions: lines alternate between two
    adapters of one local base; every custom_id comes back once, each adapter answers its
    own lines, and the worker loaded the base once (the second adapter joined it)."""
    import torch

    from tests.test_batches import lines_for, read_jsonl, run_batch, sdk
    from tests.test_lm import tiny_hub_model

    folder = f"base-{uuid.uuid4().hex[:6]}"
    torch.manual_seed(0)  # the base's random weights: the same every run
    tiny_hub_model(stack.home / "pretrained" / folder)
    models = []
    for word in ("hello", "tiny"):  # each adapter learns to say its word
        corpus = tmp_path / f"{word}.txt"
        corpus.write_text(f"{word} " * 400)
        file_id = stack.client().upload_file(corpus, purpose="dataset")["id"]
        job = train(stack, {"pretrained": folder}, steps=20, lr=0.05,
                    data={"file_id": file_id}, adapter={**ADAPTER, "target_modules": "all-linear"})
        assert job["status"] == "succeeded", (job, stack.log("w1")[-3000:])
        models.append(job["result"]["model"])
    rows = []
    for i, model in enumerate(models * 4):
        row = lines_for(model, i + 1, endpoint="/v1/chat/completions")[i]
        row["body"].update(temperature=0, seed=None, max_tokens=6)
        rows.append(row)
    client = sdk(stack)
    batch = run_batch(client, rows, "/v1/chat/completions", timeout=180)
    assert batch.status == "completed", batch
    out = read_jsonl(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(r["custom_id"] for r in rows)
    assert all(o["error"] is None and o["response"]["status_code"] == 200 for o in out)
    by_model: dict[str, list[str]] = {m: [] for m in models}
    for o in sorted(out, key=lambda o: int(o["custom_id"].split("-")[1])):
        body = o["response"]["body"]
        by_model[body["model"]].append(body["choices"][0]["message"]["content"])
    for model, word in zip(models, ("hello", "tiny"), strict=True):
        assert all(word in text for text in by_model[model]), by_model

    log = stack.log("w1")
    base = f"local {stack.home.resolve() / 'pretrained' / folder}"
    assert log.count(f"with its base {base}") == 1, log[-3000:]
    assert log.count(f"added to the cached base {base}") == 1, log[-3000:]
