"""Text to image through the queue: `genq train diffusion`, `genq generate MODEL "a
handwritten digit three"`, and the official openai SDK's batch flow on
/v1/images/generations (url and b64_json answers, in the OpenAI Images shape)."""

from __future__ import annotations

import base64
import io
import json
import uuid

import openai
import pytest
from PIL import Image

from api.client import Client
from common.errors import GenqAPIError
from tests.conftest import wait_for
from tests.test_batches import run_batch
from tests.test_cli import genq

TINY = {"block_channels": [8, 16], "norm_groups": 4, "attention_head_dim": 4, "text_width": 16,
        "max_caption_tokens": 8, "sample_steps": 2}


@pytest.fixture(scope="module")
def cli_env(stack) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {**stack.env, "GENQ_API_URL": stack.api_url, "GENQ_API_KEY": stack.api_key}


@pytest.fixture(scope="module")
def model(stack, cli_env) -> str:  # type: ignore[no-untyped-def]
    """A tiny diffusion model trained on the captioned digits with the CLI."""
    done = genq("train", "diffusion", "--steps", "4", "--batch-size", "8", "--config",
                json.dumps(TINY), "--watch", env=cli_env, timeout=300)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split()[1]
    job = stack.client().get_job(job_id)
    assert job["status"] == "succeeded", job
    kinds = sorted(a["kind"] for a in stack.client().artifacts(job_id))
    assert kinds == ["checkpoint_grid", "image_grid", "loss_plot"]  # one checkpoint, at step 4
    return job["result"]["model"]


def test_cli_generate_saves_a_png_of_the_prompt(stack, model, cli_env, tmp_path):  # type: ignore[no-untyped-def]
    done = genq("generate", model, "a handwritten digit three", "--seed", "3", "--size",
                "32x32", "--steps", "2", "--guidance-scale", "2", "--out", str(tmp_path),
                env=cli_env, timeout=120)
    assert done.returncode == 0, done.stderr
    (png,) = tmp_path.glob("*.png")
    image = Image.open(png)
    assert image.format == "PNG" and image.size == (32, 32)
    c = stack.client()
    job = c.get_job(done.stdout.split()[1])
    (item,) = c.items(job["id"])
    assert item["request"]["gen"]["prompt"] == "a handwritten digit three"
    assert item["request"]["gen"]["guidance_scale"] == 2.0


def test_a_generate_job_draws_n_images_per_prompt(stack, model):  # type: ignore[no-untyped-def]
    c = stack.client()
    job = c.wait(c.create_job({"type": "generate", "model": model, "n": 2, "seed": 1,
                               "prompts": ["a handwritten digit one",
                                           "a handwritten digit seven"]})["id"], timeout=120)
    assert job["status"] == "succeeded", job
    items = list(c.items(job["id"]))
    assert [len(i["response"]["artifact_ids"]) for i in items] == [2, 2]


@pytest.mark.parametrize(("spec", "param"), [
    ({"labels": [3]}, "labels"),  # a label-conditioned family's input
    ({"n": 2}, "prompts"),  # no prompt
    ({"prompts": ["a one"], "label_smoothing": 1}, "label_smoothing"),
    ({"prompts": ["a one"], "size": "big"}, "size"),
    ({"prompts": ["a one"], "steps": 0}, "steps"),
])
def test_bad_generate_specs_are_422_naming_the_field(stack, model, spec, param):  # type: ignore[no-untyped-def]
    with pytest.raises(GenqAPIError) as bad:
        stack.client().create_job({"type": "generate", "model": model, **spec})
    assert bad.value.status == 422 and param in str(bad.value), bad.value


def test_text_models_refuse_image_fields(stack, trained_lstm):  # type: ignore[no-untyped-def]
    with pytest.raises(GenqAPIError) as bad:
        stack.client().create_job({"type": "generate", "model": trained_lstm["result"]["model"],
                                   "prompts": ["a"], "guidance_scale": 2.0})
    assert bad.value.status == 422
    assert bad.value.message.startswith("guidance_scale: a text model does not take it")


def test_openai_sdk_batch_on_images_generations(stack, model):  # type: ignore[no-untyped-def]
    sdk = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key=stack.api_key, max_retries=0)
    body = {"model": model, "prompt": "a handwritten digit three", "size": "16x16", "seed": 2,
            "steps": 2, "guidance_scale": 2.0, "negative_prompt": "a handwritten digit eight"}
    rows = [
        {"custom_id": "url", "method": "POST", "url": "/v1/images/generations",
         "body": {**body, "n": 2}},
        {"custom_id": "b64", "method": "POST", "url": "/v1/images/generations",
         "body": {**body, "response_format": "b64_json"}},
        {"custom_id": "no-prompt", "method": "POST", "url": "/v1/images/generations",
         "body": {"model": model}},
        {"custom_id": "label", "method": "POST", "url": "/v1/images/generations",
         "body": {**body, "label": 3}},
    ]
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    upload = sdk.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    batch = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/images/generations",
                               completion_window="24h")
    batch = wait_for(lambda: (b := sdk.batches.retrieve(batch.id)).status != "validating" and b,
                     timeout=120)
    assert batch.status == "failed"  # bad lines fail the file, as OpenAI does: none queued
    errors = {e.line: (e.code, e.param, e.message) for e in batch.errors.data}
    assert errors[3][:2] == ("missing_required_parameter", "body.prompt")
    assert errors[4] == ("invalid_value", "body.label",
                         "body.label: a text-to-image model draws for a prompt, not a label")

    batch = run_batch(sdk, rows[:2], "/v1/images/generations", timeout=120)
    assert batch.status == "completed" and batch.request_counts.completed == 2, batch
    lines = {json.loads(line)["custom_id"]: json.loads(line)["response"]["body"]
             for line in sdk.files.content(batch.output_file_id).text.splitlines()}
    assert set(lines["url"]) == {"created", "data"} and len(lines["url"]["data"]) == 2
    for entry in lines["url"]["data"]:
        png = stack.client().request("GET", entry["url"].removeprefix(stack.api_url))
        assert Image.open(io.BytesIO(png)).size == (16, 16)
    (entry,) = lines["b64"]["data"]
    assert set(entry) == {"b64_json"}
    image = Image.open(io.BytesIO(base64.b64decode(entry["b64_json"])))
    assert image.format == "PNG" and image.size == (16, 16)


def test_trains_on_an_uploaded_imagefolder_zip(stack, tmp_path):  # type: ignore[no-untyped-def]
    """The Hugging Face imagefolder layout: images beside a metadata.jsonl of captions."""
    import zipfile

    archive = tmp_path / "shapes.zip"
    with zipfile.ZipFile(archive, "w") as z:
        lines = []
        for i, (colour, rgb) in enumerate([("red", (255, 0, 0)), ("blue", (0, 0, 255))] * 3):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
            z.writestr(f"images/{i}.png", buf.getvalue())
            lines.append(json.dumps({"file_name": f"images/{i}.png", "text": f"a {colour} square"}))
        z.writestr("metadata.jsonl", "\n".join(lines) + "\n")
    c = stack.client()
    file_id = c.upload_file(archive, purpose="dataset")["id"]
    job = c.wait(c.create_job({"type": "train", "family": "diffusion", "steps": 2,
                               "batch_size": 4, "data": {"file_id": file_id},
                               "config": TINY})["id"], timeout=300)
    assert job["status"] == "succeeded", job
    grid = next(a for a in c.artifacts(job["id"]) if a["kind"] == "image_grid")
    image = Image.open(io.BytesIO(c.request("GET", f"/v1/artifacts/{grid['id']}")))
    assert image.mode == "RGB"  # a row for each of the two captions
    gen = c.wait(c.create_job({"type": "generate", "model": job["result"]["model"],
                               "prompts": ["a red square"], "seed": 1})["id"], timeout=120)
    (item,) = c.items(gen["id"])
    (art,) = item["response"]["artifact_ids"]
    assert Image.open(io.BytesIO(c.request("GET", f"/v1/artifacts/{art}"))).mode == "RGB"


def test_unet_lora_models_of_one_pipeline_train_register_and_draw_in_one_batch(stack):  # type: ignore[no-untyped-def]
    """Two adapters and a merged one over one pipeline folder: the models record their
    adapter and source, and one SDK batch draws from all three (the adapters share the
    cached pipeline, each switched to in turn)."""
    from tests.ml.test_diffusion import save_tiny_pipeline

    folder = f"tiny-sd-{uuid.uuid4().hex[:6]}"
    save_tiny_pipeline(stack.home / "pretrained" / folder)
    c = Client(stack.api_url, api_key=stack.api_key, timeout=600)  # the first spec imports
    spec = {"type": "train", "family": "diffusion", "steps": 2, "batch_size": 4,
            "checkpoint_every": 1000, "config": {"pretrained": folder, "sample_steps": 2}}
    adapters = [{"r": 4}, {"r": 2, "target_modules": "all-linear"}, {"r": 4, "merge": True}]
    jobs = [c.create_job({**spec, "adapter": a}) for a in adapters]
    done = [c.wait(j["id"], timeout=300) for j in jobs]
    assert all(j["status"] == "succeeded" for j in done), (done, stack.log("w1")[-3000:])
    names = [j["result"]["model"] for j in done]
    views = [c.request("GET", f"/v1/models/{name}") for name in names]
    assert views[0]["adapter"] == {"spec": {"method": "lora", "r": 4, "alpha": 16,
                                            "dropout": 0.0, "target_modules": None,
                                            "merge": False}, "base_stored": False}
    assert views[1]["adapter"]["spec"]["target_modules"] == "all-linear"
    assert views[2]["adapter"] is None  # merged: full weights
    assert views[0]["source"]["local_dir"] == str((stack.home / "pretrained" / folder).resolve())

    sdk = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key=stack.api_key, max_retries=0)
    rows = [{"custom_id": name, "method": "POST", "url": "/v1/images/generations",
             "body": {"model": name, "prompt": "a handwritten digit two", "seed": 1,
                      "response_format": "b64_json"}} for name in names]
    batch = run_batch(sdk, rows, "/v1/images/generations", timeout=300)
    assert batch.status == "completed" and batch.request_counts.completed == 3, batch
    for line in sdk.files.content(batch.output_file_id).text.splitlines():
        (entry,) = json.loads(line)["response"]["body"]["data"]
        image = Image.open(io.BytesIO(base64.b64decode(entry["b64_json"])))
        assert image.mode == "RGB" and image.size == (64, 64)  # 8x8 latents x 2, upscaled


def test_a_unet_lora_needs_a_pretrained_pipeline(stack):  # type: ignore[no-untyped-def]
    import httpx

    def refused(spec: dict) -> dict:
        resp = httpx.post(f"{stack.api_url}/v1/jobs",
                          headers={"Authorization": f"Bearer {stack.api_key}"},
                          json={"type": "train", "family": "diffusion", **spec}, timeout=600)
        assert resp.status_code == 422, resp.text
        return resp.json()["error"]

    error = refused({"config": TINY, "adapter": {"r": 4}})
    assert error["param"] == "adapter" and "config.pretrained" in error["message"]
    assert refused({"config": {"pretrained": "org/pipe", "ema_decay": 0.9},
                    "adapter": {}})["param"] == "config.ema_decay"
    assert refused({"config": {"pretrained": "org/pipe"},
                    "adapter": {"r": 0}})["param"] == "adapter.r"


def test_the_readme_images_batch_example_runs_as_written(stack, model, tmp_path):  # type: ignore[no-untyped-def]
    """The README's SDK batch on /v1/images/generations against this stack: only its address
    and model name are swapped for the test's, and its key lies where the README reads it."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S)
               if "/v1/images/generations" in block]
    code = code.replace("http://127.0.0.1:8000/v1", f"{stack.api_url}/v1")
    code = code.replace('"digits-sd"', json.dumps(model))
    (tmp_path / ".genq").mkdir()
    (tmp_path / ".genq" / "api_key").write_text(stack.api_key + "\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for word in ("three", "seven"):
        image = Image.open(tmp_path / f"{word}.png")
        assert image.format == "PNG" and image.size == (64, 64)  # 8x8 digits, upscaled
