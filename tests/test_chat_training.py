"""Chat and prompt/completion datasets through the API and a real worker, and chat batches
rendered with the model's own template (or genq's fallback)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from common.chat import render_fallback
from common.db import engine_for, session_factory
from common.errors import GenqAPIError
from common.models import Item, Job

TINY_GPT = {"vocab_size": 300, "n_positions": 64, "n_embd": 32, "n_layer": 1, "n_head": 2}
ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What follows 3?"}]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _dataset(stack: Any, tmp_path: Path, name: str, rows: list[Any]) -> str:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(stack.client().upload_file(path, purpose="dataset")["id"])


def _chats(n: int = 40) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"What follows {i}?"},
                          {"role": "assistant", "content": f"{i + 1}."}]} for i in range(n)]


def _train(stack: Any, file_id: str, **extra: Any) -> dict:
    c = stack.client()
    spec = {"type": "train", "family": "gpt", "steps": 6, "batch_size": 8, "seq_len": 48,
            "checkpoint_every": 5, "log_every": 2, "config": TINY_GPT,
            "data": {"file_id": file_id}, **extra}
    job = c.wait(c.create_job(spec)["id"], timeout=300)
    assert job["status"] == "succeeded", (job, stack.log("w1")[-2000:])
    assert job["result"]["model"]
    return job


def _chat_batch_prompts(stack: Any, tmp_path: Path, model: str) -> list[str]:
    """Run a two-line /v1/chat/completions batch; the prompts its items were given."""
    c = stack.client()
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({
        "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": ASK, "max_tokens": 4, "temperature": 0}}) + "\n"
        for i in range(2)))
    batch = c.wait_batch(c.create_batch(c.upload_file(path)["id"],
                                        endpoint="/v1/chat/completions")["id"], timeout=120)
    assert batch["status"] == "completed", batch
    rows = [json.loads(line) for line in c.file_content(batch["output_file_id"]).splitlines()]
    assert sorted(r["custom_id"] for r in rows) == ["r0", "r1"]
    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        return list(s.scalars(select(Item.request).join(Job, Item.job_id == Job.id)
                              .where(Job.parent_id == batch["id"])))


def test_a_chat_dataset_trains_and_its_model_chats_with_the_fallback(stack, tmp_path):
    file_id = _dataset(stack, tmp_path, "chats.jsonl", _chats())
    model = _train(stack, file_id)["result"]["model"]
    requests = _chat_batch_prompts(stack, tmp_path, model)
    assert {r["gen"]["prompt"] for r in requests} == {render_fallback(ASK, True)}


def test_a_prompt_completion_dataset_trains(stack, tmp_path):
    rows = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(40)]
    job = _train(stack, _dataset(stack, tmp_path, "pairs.jsonl", rows), eval_every=3)
    assert job["result"]["model"]


def test_a_fine_tuned_model_chats_with_its_own_template(stack, tmp_path):
    """A pretrained directory whose tokenizer has a chat template: training renders the
    chats with it, the checkpoint keeps it, and chat batch lines are rendered with it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from common.ml.families.lm import train_tokenizer

    target = stack.home / "pretrained" / "tiny-chatml"
    target.mkdir(parents=True)
    tokenizer = train_tokenizer(" ".join(json.dumps(c) for c in _chats()), 300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(str(target))
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32,
                               n_layer=1, n_head=2)).save_pretrained(target)
    file_id = _dataset(stack, tmp_path, "chats.jsonl", _chats())
    model = _train(stack, file_id, config={"pretrained": "tiny-chatml"})["result"]["model"]
    requests = _chat_batch_prompts(stack, tmp_path, model)
    expected = tokenizer.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True)
    assert {r["gen"]["prompt"] for r in requests} == {expected}
    assert expected.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("rows, says", [
    (_chats(3) + [{"messages": [{"role": "user", "content": "no answer"}]}],
     "bad.jsonl line 4: messages: needs at least one assistant message (the loss is taken"),
    ([{"prompt": "a", "completion": "b"}, "", "{oops", {"prompt": "c", "completion": "d"}],
     "bad.jsonl line 3: invalid JSON"),
])
def test_a_bad_line_is_a_422_naming_it_before_anything_is_queued(stack, tmp_path, rows, says):
    c = stack.client()
    file_id = _dataset(stack, tmp_path, "bad.jsonl", rows)
    before = c.list_jobs(limit=100)["data"]
    with pytest.raises(GenqAPIError) as info:
        c.create_job({"type": "train", "family": "gpt", "steps": 2, "config": TINY_GPT,
                      "data": {"file_id": file_id}})
    assert info.value.status == 422 and info.value.param == "data.file_id", info.value
    assert info.value.message.startswith(f"dataset {file_id}: {says}"), info.value.message
    assert c.list_jobs(limit=100)["data"] == before


def test_resume_on_a_chat_dataset_is_exact(stack, tmp_path):
    """Stopped at step 5 and resumed, a chat run ends on the weights of an unbroken one."""
    import torch

    from common.ml.checkpoint import load_model
    from common.models import Checkpoint

    file_id = _dataset(stack, tmp_path, "chats.jsonl", _chats())
    extra = {"steps": 10, "schedule": "constant", "config": {**TINY_GPT, "dropout": 0.1}}
    straight = _train(stack, file_id, **extra)
    first = _train(stack, file_id, **{**extra, "steps": 5})
    resumed = _train(stack, file_id, **extra, resume_from=first["result"]["checkpoint_id"])
    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        a, b = (load_model(Path(s.get(Checkpoint, j["result"]["checkpoint_id"]).uri
                                .removeprefix("file://"))).model.state_dict()
                for j in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_job_renders_chats_with_the_models_template(stack, trained_lstm):
    """`chats` on a generate job: each conversation rendered for generation (an lstm has no
    chat template: genq's fallback), one item each; prompts and chats together are a 422."""
    c = stack.client()
    model = trained_lstm["result"]["model"]
    chats = [[{"role": "user", "content": "Hi"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]]
    job = c.wait(c.create_job({"type": "generate", "model": model, "chats": chats,
                               "max_tokens": 4})["id"], timeout=120)
    assert job["status"] == "succeeded", job
    items = sorted(c.items(job["id"]), key=lambda i: i["index"])
    assert [i["request"]["gen"]["prompt"] for i in items] == [
        render_fallback(chat, True) for chat in chats]
    assert all(len(i["response"]["texts"]) == 1 for i in items)
    with pytest.raises(GenqAPIError) as info:
        c.create_job({"type": "generate", "model": model, "chats": chats, "prompts": ["x"]})
    assert info.value.status == 422 and info.value.param == "chats"
