"""Every model family through the API: train, checkpoint, register, resume exactly, generate."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from sqlalchemy import select

from common.db import engine_for, session_factory
from common.errors import GenqAPIError
from common.ml.checkpoint import load_model
from common.ml.families import get_family
from common.models import Checkpoint, Item, Job, Model

TINY = {
    "vae": {"config": {"hidden": 32, "latent": 4, "conditional": True}},
    "gan": {"config": {"hidden": 32, "latent": 8}},
    "gpt": {
        "config": {"vocab_size": 300, "n_positions": 64, "n_embd": 32, "n_layer": 1, "n_head": 2},
        "seq_len": 32,
    },
    # an EMA copy too: it is part of what resumes exactly
    "diffusion": {"config": {"block_channels": [8, 16], "norm_groups": 4, "attention_head_dim": 4,
                             "text_width": 16, "max_caption_tokens": 8, "sample_steps": 2,
                             "ema_decay": 0.9}},
}


def train(stack, family: str, steps: int, **extra):
    from api.client import Client

    # the API's first spec of a family imports its libraries (diffusers: tens of seconds on
    # a loaded machine) before it answers
    c = Client(stack.api_url, api_key=stack.api_key, timeout=600)
    spec = {
        "type": "train",
        "family": family,
        "steps": steps,
        "batch_size": 8,
        "checkpoint_every": 5,
        "log_every": 5,
        "schedule": "constant",
        **TINY[family],
        **extra,
    }
    job = c.wait(c.create_job(spec)["id"], timeout=300)
    assert job["status"] == "succeeded", (job, stack.log("w1")[-2000:])
    return job


def weights(stack, checkpoint_id: str) -> dict[str, torch.Tensor]:
    from common.db import engine_for, session_factory
    from common.models import Checkpoint

    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        uri = s.get(Checkpoint, checkpoint_id).uri
    return load_model(Path(uri.removeprefix("file://"))).model.state_dict()


@pytest.mark.parametrize("family", ["vae", "gan"])
def test_image_family_trains_generates_pngs_and_artifacts(stack, family):
    c = stack.client()
    job = train(stack, family, 12)
    kinds = {a["kind"]: a for a in c.artifacts(job["id"])}
    assert {"loss_plot", "image_grid"} <= set(kinds)
    for kind in ("loss_plot", "image_grid"):
        png = c.request("GET", f"/v1/artifacts/{kinds[kind]['id']}")
        assert Image.open(io.BytesIO(png)).format == "PNG"
    spec = {"type": "generate", "model": job["result"]["model"], "n": 2, "seed": 1}
    if family == "vae":
        spec = {**spec, "labels": [7]}
    gen = c.wait(c.create_job(spec)["id"], timeout=120)
    assert gen["status"] == "succeeded", gen
    items = list(c.items(gen["id"]))
    assert len(items) == 2
    if family == "vae":  # one label conditions every image, not just the first
        assert [item["request"]["gen"]["label"] for item in items] == [7, 7]
    for item in items:
        (art_id,) = item["response"]["artifact_ids"]
        image = Image.open(io.BytesIO(c.request("GET", f"/v1/artifacts/{art_id}")))
        assert image.format == "PNG" and min(image.size) >= 64
    with pytest.raises(GenqAPIError) as bad:  # labels must be one, or one per image
        c.create_job({**spec, "n": 3, "labels": [1, 2]})
    assert bad.value.status == 422 and "labels" in bad.value.message


def test_a_gan_on_labelled_digits_is_conditional_by_default(stack):
    """Issue 24: `genq train gan` on the labelled digits, then "a 7": it conditions on the
    labels without being told to (an unconditional model failed the items)."""
    c = stack.client()
    job = train(stack, "gan", 5)  # TINY's gan config says nothing of `conditional`
    model = job["result"]["model"]
    gen = c.wait(c.create_job({"type": "generate", "model": model, "n": 2,
                               "labels": [7]})["id"], timeout=120)
    assert gen["status"] == "succeeded", gen
    assert [item["status"] for item in c.items(gen["id"])] == ["succeeded", "succeeded"]
    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        uri = s.get(Checkpoint, job["result"]["checkpoint_id"]).uri
    config = load_model(Path(uri.removeprefix("file://"))).config
    assert config.conditional is True and config.n_classes == 10


def test_label_for_an_unconditional_model_fails_each_item_by_its_own_name(stack):
    c = stack.client()
    model = train(stack, "gan", 5, config={"hidden": 32, "latent": 8,
                                           "conditional": False})["result"]["model"]
    gen = c.wait(c.create_job({"type": "generate", "model": model, "n": 2,
                               "labels": [3]})["id"], timeout=120)
    items = list(c.items(gen["id"]))
    assert [item["status"] for item in items] == ["failed", "failed"]
    for item in items:  # the item's error is its own, naming the field and no other item
        assert item["error"]["code"] == "invalid_request"
        assert item["error"]["message"].startswith("label: the model is unconditional")


def test_gpt_trains_and_generates_with_beams(stack):
    c = stack.client()
    job = train(stack, "gpt", 10)
    model = job["result"]["model"]
    gen = c.wait(
        c.create_job(
            {
                "type": "generate",
                "model": model,
                "prompts": ["The ", "def"],
                "max_tokens": 6,
                "temperature": 0,
                "num_beams": 2,
            }
        )["id"],
        timeout=120,
    )
    assert gen["status"] == "succeeded", gen
    texts = [i["response"]["texts"][0] for i in c.items(gen["id"])]
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_gpt_batch_reuses_the_apis_token_ids_and_matches_a_generate_job(stack, tmp_path):
    """The API tokenizes a batch's prompts (to cut shards by token count); the worker
    generates from those ids exactly what a generate job gives for the same prompts."""
    c = stack.client()
    model = train(stack, "gpt", 10)["result"]["model"]
    prompts = ["The ", "def f(x):\n    return x", "", "é 漢字 🙂", "text<|endoftext|>more"]
    job = c.wait(c.create_job({"type": "generate", "model": model, "prompts": prompts,
                               "max_tokens": 5, "temperature": 0})["id"], timeout=120)
    assert job["status"] == "succeeded", job
    expected = {i["request"]["gen"]["prompt"]: i["response"]["texts"] for i in c.items(job["id"])}

    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({
        "custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
        "body": {"model": model, "prompt": p, "max_tokens": 5, "temperature": 0}}) + "\n"
        for i, p in enumerate(prompts)))
    batch = c.wait_batch(c.create_batch(c.upload_file(path)["id"])["id"], timeout=120)
    assert batch["status"] == "completed", batch
    with session_factory(engine_for(stack.env["GENQ_DATABASE_URL"]))() as s:
        requests = s.scalars(select(Item.request).join(Job, Item.job_id == Job.id)
                             .where(Job.parent_id == batch["id"])).all()
        uri = s.get(Checkpoint, s.scalar(select(Model.checkpoint_id)
                                          .where(Model.name == model))).uri
    tokenizer = load_model(Path(uri.removeprefix("file://"))).tokenizer
    encode = get_family("gpt").encode
    assert len(requests) == len(prompts)
    for request in requests:
        gen = request["gen"]
        assert gen["prompt_ids"] == encode(tokenizer, gen["prompt"])
    rows = [json.loads(line) for line in c.file_content(batch["output_file_id"]).splitlines()]
    got = {prompts[int(r["custom_id"][1:])]: [ch["text"] for ch in r["response"]["body"]["choices"]]
           for r in rows}
    assert got == expected


@pytest.mark.parametrize("family", ["lstm", "vae", "gan", "gpt", "diffusion"])
def test_resume_from_checkpoint_is_exact(stack, family):
    extra = {"seq_len": 16} if family == "lstm" else {}
    if family == "lstm":
        TINY.setdefault("lstm", {"config": {"hidden": 32, "n_embd": 16}})
    straight = train(stack, family, 10, **extra)
    first = train(stack, family, 5, **extra)
    resumed = train(stack, family, 10, resume_from=first["result"]["checkpoint_id"], **extra)
    a = weights(stack, straight["result"]["checkpoint_id"])
    b = weights(stack, resumed["result"]["checkpoint_id"])
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{family}: {name} differs after resume"


def test_gpt_fine_tunes_a_local_pretrained_directory(stack):
    """A transformers directory under GENQ_HOME/pretrained is loaded (never downloaded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from common.ml.families.lm import train_tokenizer

    target = stack.home / "pretrained" / "tiny-gpt2"
    target.mkdir(parents=True)
    tokenizer = train_tokenizer("hello world, tiny corpus for a tokenizer " * 50, 300)
    get_family("gpt").save_tokenizer(tokenizer, target)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2)
    ).save_pretrained(target)
    job = train(stack, "gpt", 3, config={"pretrained": "tiny-gpt2"}, seq_len=32)
    assert job["result"]["model"]


def test_pretrained_outside_the_root_is_refused(stack):
    import httpx

    resp = httpx.post(
        f"{stack.api_url}/v1/jobs",
        headers={"Authorization": f"Bearer {stack.api_key}"},
        json={"type": "train", "family": "gpt", "config": {"pretrained": "/etc"}},
    )
    assert resp.status_code == 422 and "config.pretrained" in resp.json()["error"]["message"]


def test_nan_loss_fails_at_once_with_the_step(stack):
    """A diverging run is a deterministic failure: no retry, the step named, a checkpoint kept."""
    c = stack.client()
    spec = {"type": "train", "family": "vae", "steps": 40, "batch_size": 8, "lr": 10,
            "optimizer": "sgd", "clip": None, "checkpoint_every": 1, "max_attempts": 3,
            **TINY["vae"]}
    job = c.wait(c.create_job(spec)["id"], timeout=120)
    assert job["status"] == "failed" and job["attempt"] == 1, job
    error = job["error"]
    assert error["code"] == "nan_loss" and error["retryable"] is False
    assert error["step"] >= 2 and f"at step {error['step']}" in error["message"]
    assert [a["error"]["code"] for a in job["attempts"]] == ["nan_loss"]


def _upload(stack, tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return stack.client().upload_file(path, purpose="dataset")["id"]


def _npz(images, labels=None) -> bytes:  # type: ignore[no-untyped-def]
    import numpy as np

    buf = io.BytesIO()
    arrays = {"images": np.asarray(images)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_uploaded_datasets_train(stack, tmp_path):
    """An .npz of images and a .zip of label-folder PNGs train image models by file id."""
    import zipfile

    import numpy as np

    rng = np.random.default_rng(0)
    npz = _upload(stack, tmp_path, "faces.npz",
                  _npz(rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), np.arange(40) % 4))
    job = train(stack, "vae", 6, data={"file_id": npz})
    assert job["result"]["model"]

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(24):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(png, "PNG")
            z.writestr(f"shapes/{i % 3}/img{i}.png", png.getvalue())
    zipped = _upload(stack, tmp_path, "shapes.zip", archive.getvalue())
    job = train(stack, "gan", 4, data={"file_id": zipped})
    assert job["result"]["model"]


def _zip_without_pngs() -> bytes:
    import zipfile

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "no pictures here")
    return archive.getvalue()


def _imagefolder_without_a_caption() -> bytes:
    import zipfile

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("metadata.jsonl", '{"file_name": "a.png", "text": "a square"}\n'
                                     '{"file_name": "b.png"}\n')
        for name in ("a.png", "b.png"):
            png = io.BytesIO()
            Image.new("RGB", (8, 8)).save(png, "PNG")
            z.writestr(name, png.getvalue())
    return archive.getvalue()


def _zeros_npz() -> bytes:
    """Issue 26: 300 MB of uint8 zeros (1.2 GB as float32, past the default 1 GiB of
    GENQ_MAX_DECODED_BYTES) in an .npz of some 300 KB."""
    import zipfile

    import numpy as np

    archive = io.BytesIO()
    header = {"descr": "|u1", "fortran_order": False, "shape": (4_800, 250, 250)}
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z, \
            z.open("images.npy", "w", force_zip64=True) as out:
        np.lib.format.write_array_header_1_0(out, header)
        for _ in range(300):
            out.write(bytes(1_000_000))
    return archive.getvalue()


def _zip_of_large_pngs() -> bytes:
    """Issue 26: six black 4096x4096 RGB PNGs (each 201 MB as float32, 1.2 GB together) in a
    zip of some 300 KB."""
    import zipfile

    png = io.BytesIO()
    Image.new("RGB", (4096, 4096)).save(png, "PNG", compress_level=1)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(6):
            z.writestr(f"{i}.png", png.getvalue())
    return archive.getvalue()


BAD_DATASETS = {
    "notes.txt": (lambda: b"plain text, not pictures", "vae", "text data"),
    "zeros.npz": (_zeros_npz, "vae", "more than GENQ_MAX_DECODED_BYTES (1,073,741,824)"),
    "large-pngs.zip": (_zip_of_large_pngs, "gan",
                       "more than GENQ_MAX_DECODED_BYTES (1,073,741,824)"),
    "broken.npz": (lambda: b"PK\x03\x04 not really a zip", "vae", "not a readable .npz"),
    "labels-only.npz": (lambda: _npz_labels_only(), "vae", "no 'images' array"),
    "nothing.zip": (_zip_without_pngs, "gan", "no .png files"),
    "uncaptioned.zip": (_imagefolder_without_a_caption, "gan",
                        "metadata.jsonl line 2: b.png: a missing caption"),
}


def _npz_labels_only() -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, labels=np.arange(3))
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(BAD_DATASETS))
def test_bad_dataset_is_422_before_anything_is_queued(stack, tmp_path, name):
    make, family, says = BAD_DATASETS[name]
    c = stack.client()
    file_id = _upload(stack, tmp_path, name, make())
    before = c.list_jobs(limit=100)["data"]
    with pytest.raises(GenqAPIError) as info:
        c.create_job({"type": "train", "family": family, "steps": 2,
                      "data": {"file_id": file_id}})
    assert info.value.status == 422 and info.value.param == "data.file_id", info.value
    assert says in info.value.message, info.value.message
    assert c.list_jobs(limit=100)["data"] == before
