"""Each contract is declared once and every layer honours it: walked through real jobs.

A generation parameter the public schema offers must change what generate() does; a
training field the API accepts must be accepted by the worker's own parse of the job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from common.gen_params import GenParams
from common.schemas import JobOptions
from common.train_spec import TrainSpec

JOB_ENVELOPE = {"type", "name", *JobOptions.model_fields}
GENERATE_INPUTS = {"model", "prompts", "chats", "n", "labels"}  # what to generate, not how

# Each probe: parameters that, when they reach generate(), make two runs of one prompt
# agree (a plain run at temperature 1 samples them apart), or cap the tokens.
AGREEING_PROBES: dict[str, dict[str, Any]] = {
    "temperature": {"temperature": 0},
    "top_k": {"top_k": 1},
    "top_p": {"top_p": 1e-6},
    "num_beams": {"num_beams": 2},
    "seed": {"seed": 5},
}
CAPPING_PROBES = {"max_tokens": {"max_tokens": 3}}
# Image parameters, which a text model refuses (422): size is probed on PNG sizes in
# tests/test_diffusion_api.py, and the diffusion ones on what the UNet is asked in
# tests/ml/test_diffusion.py (test_every_drawing_parameter_reaches_the_unet).
IMAGE_PARAMETERS = {"size", "steps", "guidance_scale", "negative_prompt"}


def schema_properties(stack, name: str) -> set[str]:
    schema = httpx.get(f"{stack.api_url}/openapi.json").json()
    return set(schema["components"]["schemas"][name]["properties"])


def generated_texts(client, model: str, params: dict[str, Any]) -> list[tuple[str, int]]:
    job = client.create_job({"type": "generate", "model": model, "prompts": ["the ", "the "],
                             "max_tokens": 12, **params})
    job = client.wait(job["id"], timeout=120)
    assert job["status"] == "succeeded", job
    return [(item["response"]["texts"][0], item["tokens_out"]) for item in client.items(job["id"])]


def test_every_public_generation_parameter_reaches_generate(stack, trained_lstm):
    public = schema_properties(stack, "GenerateSpec") - JOB_ENVELOPE - GENERATE_INPUTS
    assert public == set(GenParams.model_fields)
    assert public == set(AGREEING_PROBES) | set(CAPPING_PROBES) | IMAGE_PARAMETERS, (
        "give a new parameter a probe")
    c, model = stack.client(), trained_lstm["result"]["model"]
    plain = generated_texts(c, model, {})
    assert plain[0][0] != plain[1][0], "the control run should sample two different texts"
    for name, params in AGREEING_PROBES.items():
        first, second = generated_texts(c, model, params)
        assert first[0] == second[0], f"{name} did not reach generate(): {first} vs {second}"
    for name, params in CAPPING_PROBES.items():
        for text, tokens_out in generated_texts(c, model, params):
            assert tokens_out == len(text) <= params["max_tokens"] < 12, name  # LSTM: 1 char/token


def test_the_cli_offers_every_generation_parameter():
    import inspect

    from api.cli import generate

    assert set(GenParams.model_fields) <= set(inspect.signature(generate).parameters)


def test_every_image_parameter_reaches_an_images_batch_line():
    """Each GenParams field beyond text sampling is taken by a Batch API images line and
    stored on its item: a new image field cannot be dropped there (the body ignores keys
    it does not know, as OpenAI's does)."""
    from common.batches.schemas import ImageBody
    from common.gen_params import HONOURED, TextParams

    image_fields = set(GenParams.model_fields) - set(TextParams.model_fields)
    assert image_fields >= {"seed", *HONOURED["image"], *HONOURED["text-to-image"]}
    values = {"seed": 7, "size": "32x48", "steps": 3, "guidance_scale": 2.5,
              "negative_prompt": "blurry"}
    assert set(values) == image_fields, "give a new image field a value here"
    gen = ImageBody.model_validate({"prompt": "a red square", **values}).gen
    assert {name: getattr(gen, name) for name in values} == values


def test_api_and_worker_accept_the_same_training_fields(stack, tmp_path: Path):
    """The API's schema is the worker's TrainSpec plus the envelope, and a job setting every
    field (in two jobs: steps then epochs, the second resuming the first) runs."""
    assert schema_properties(stack, "TrainJobSpec") - JOB_ENVELOPE == set(TrainSpec.model_fields)
    c = stack.client()
    first = {"family": "lstm", "config": {"n_embd": 8, "hidden": 16},
             "data": {"builtin": "python-docs"}, "steps": 6, "batch_size": 4, "lr": 0.01,
             "warmup_steps": 2, "schedule": "constant", "optimizer": "sgd",
             "weight_decay": 0.01, "precision": "bf16", "grad_accum": 2, "clip": 0.5, "seed": 3,
             "seq_len": 16, "checkpoint_every": 2, "keep_last": 1, "log_every": 2,
             "eval_every": 3, "timeout_s": 600}
    job = c.wait(c.create_job({"type": "train", **first})["id"], timeout=300)
    assert job["status"] == "succeeded", job
    assert job["result"]["step"] == 6
    assert [m["step"] for m in c.metrics(job["id"], ["loss"])] == [2, 4, 6]  # log_every
    assert [m["step"] for m in c.metrics(job["id"], ["eval_loss"])] == [3, 6]  # eval_every
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    file_id = c.upload_file(corpus, purpose="dataset")["id"]
    second = {"family": "lstm", "data": {"file_id": file_id}, "epochs": 1, "batch_size": 4,
              "seq_len": 16, "resume_from": job["result"]["checkpoint_id"]}
    # the lm family's own: gradient checkpointing, and a LoRA adapter whose every field
    # reaches the registered model
    third = {"family": "lm", "config": {"n_embd": 16, "n_layer": 1, "n_head": 2},
             "steps": 2, "batch_size": 2, "seq_len": 16, "gradient_checkpointing": True,
             "adapter": {"method": "lora", "r": 2, "alpha": 4, "dropout": 0.1,
                         "target_modules": ["c_attn"], "merge": False}}
    assert set(first) | set(second) | set(third) == set(TrainSpec.model_fields)
    resumed = c.wait(c.create_job({"type": "train", **second})["id"], timeout=300)
    assert resumed["status"] == "succeeded", resumed
    assert resumed["result"]["step"] == len(corpus.read_text()) // (4 * 16)
    lora = c.wait(c.create_job({"type": "train", **third})["id"], timeout=300)
    assert lora["status"] == "succeeded", lora
    model = c.request("GET", f"/v1/models/{lora['result']['model']}")
    assert model["adapter"]["spec"] == third["adapter"]
