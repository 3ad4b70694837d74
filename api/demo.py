"""`genq demo`: train two small models on built-in data, generate from them, show where to look.

The first minute should show something that visibly works: a small GPT-2-shaped `lm` on
Python's docs (its byte-level BPE tokens are word pieces, so a few hundred steps already
write words), then a label-conditioned `vae` on the digits, asked for each digit 0-9, whose
images are laid out as one PNG grid.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from api.client import Client
from api.follow import follow
from common.config import get_settings
from common.errors import DemoFailed

PROMPTS = ["The ", "Python ", "def ", "A class ", "Exceptions "]


TEXT_CONFIG = {"n_embd": 128, "n_layer": 2, "n_head": 4, "n_positions": 128, "vocab_size": 1024}
DIGITS = range(10)
PER_DIGIT = 4  # rows of the grid


def run_demo(console: Console, *, steps: int = 800, digit_steps: int = 3000,
             out: Path = Path("genq-demo")) -> None:
    """Use a running stack, else start one here and stop it afterwards."""
    from api.stack import Stack

    settings = get_settings()
    stack = None
    c = Client()
    try:
        if not (c.healthy() and c.api_key):
            console.print("starting a local stack in .genq/ for the demo…")
            stack = Stack(settings, with_flower=True)
            stack.start()
            stack.wait_for_worker()
            c = Client(api_key=stack.api_key)
        console.print(f"[bold]1. training[/bold] a small GPT-2-shaped language model on "
                      f"Python's docs ({steps} steps)")
        model = train(c, {"type": "train", "family": "lm", "steps": steps, "batch_size": 32,
                          "lr": 3e-3, "seq_len": 64, "checkpoint_every": max(steps // 2, 1),
                          "config": TEXT_CONFIG})
        console.print(f"[bold]2. generating[/bold] from model {model['name']!r} through the "
                      "Batch API")
        for prompt, completion in generate_texts(c, model["name"]):
            console.print(f"  [dim]{prompt}[/dim]{completion!r}")
        console.print(f"[bold]3. training[/bold] a label-conditioned VAE on the digits "
                      f"({digit_steps} steps), then drawing each digit {PER_DIGIT} times")
        digits = train(c, {"type": "train", "family": "vae", "steps": digit_steps,
                           "batch_size": 64, "checkpoint_every": digit_steps,
                           "data": {"builtin": "digits"},
                           "config": {"hidden": 256, "latent": 16}})
        grid = draw_digits(c, digits["name"], out / "digits.png")
        console.print(f"  saved {grid.resolve()}  (columns 0-9, {PER_DIGIT} draws each)")
        show_where(console, settings, model["job_id"], model["name"], stack is not None)
    finally:
        if stack is not None and stack.procs:
            stack.stop()


def train(c: Client, spec: dict[str, Any]) -> dict[str, str]:
    """Run a training job with a progress bar; the model it registered and the job's id."""
    job = follow(c, c.create_job(spec)["id"])
    if job["status"] != "succeeded":
        raise DemoFailed(f"training job {job['id']} ended {job['status']}: {job.get('error')}")
    return {"name": job["result"]["model"], "job_id": job["id"]}


def draw_digits(c: Client, model: str, path: Path) -> Path:
    """Ask `model` for each digit PER_DIGIT times and lay the PNGs out as one grid."""
    from PIL import Image

    labels = [d for d in DIGITS for _ in range(PER_DIGIT)]
    job = c.wait(c.create_job({"type": "generate", "model": model, "n": len(labels),
                               "labels": labels, "seed": 0})["id"], timeout=600)
    if job["status"] != "succeeded":
        raise DemoFailed(f"generation job {job['id']} ended {job['status']}: {job.get('error')}")
    drawn: dict[int, list[Image.Image]] = {d: [] for d in DIGITS}
    for item in c.items(job["id"]):
        label = int(item["request"]["gen"]["label"])
        for art in (item.get("response") or {}).get("artifact_ids", []):
            png = c.request("GET", f"/v1/artifacts/{art}")
            drawn[label].append(Image.open(io.BytesIO(png)).convert("L"))
    if any(len(images) < PER_DIGIT for images in drawn.values()):
        raise DemoFailed(f"generation job {job['id']} drew {sum(map(len, drawn.values()))} of "
                         f"{len(labels)} images")
    side = max(max(im.size) for images in drawn.values() for im in images)
    scale = max(1, 48 // side)  # an 8x8 digit shown at 48x48
    cell, pad = side * scale, 4
    grid = Image.new("L", (len(drawn) * (cell + pad) + pad, PER_DIGIT * (cell + pad) + pad), 255)
    for col, images in enumerate(drawn.values()):
        for row, im in enumerate(images[:PER_DIGIT]):
            big = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
            grid.paste(big, (pad + col * (cell + pad), pad + row * (cell + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def generate_texts(c: Client, model: str) -> list[tuple[str, str]]:
    """Bulk-generate through the OpenAI-compatible Batch API: upload JSONL, batch, output file."""
    lines = [
        {
            "custom_id": f"prompt-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": model, "prompt": p, "max_tokens": 60, "temperature": 0.7, "seed": i},
        }
        for i, p in enumerate(PROMPTS)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo-prompts.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        upload = c.upload_file(path, purpose="batch")
    batch = c.wait_batch(
        c.create_batch(upload["id"], endpoint="/v1/completions")["id"], timeout=600
    )
    if batch["status"] != "completed" or not batch.get("output_file_id"):
        raise DemoFailed(f"batch {batch['id']} ended {batch['status']}")
    texts: dict[str, str] = {}
    for raw in c.file_content(batch["output_file_id"]).decode().splitlines():
        row: dict[str, Any] = json.loads(raw)
        texts[row["custom_id"]] = row["response"]["body"]["choices"][0]["text"]
    missing = [p for i, p in enumerate(PROMPTS) if not texts.get(f"prompt-{i}")]
    if missing:
        raise DemoFailed(f"no text came back for prompts {missing}")
    return [(p, texts[f"prompt-{i}"]) for i, p in enumerate(PROMPTS)]


def show_where(console: Console, settings: Any, job_id: str, model: str, temporary: bool) -> None:
    api = f"http://{settings.api_host}:{settings.api_port}"
    console.print("[bold]4. where to look[/bold]")
    console.print(f"  API      {api}/v1/jobs/{job_id}   (docs at {api}/docs)")
    console.print(
        f"  Flower   http://127.0.0.1:{settings.flower_port}   (user {settings.flower_user}, "
        f"password in {settings.home_dir / 'flower_password'})"
    )
    console.print(
        f"  model    {model!r} is registered in {settings.home_dir}; "
        f"`genq generate {model} 'Some prompt'`"
    )
    if temporary:
        console.print("  The demo's stack is stopped now; run [bold]genq up[/bold] to keep it up.")
