"""`genq demo`: train a small model on built-in data, generate from it, show where to look."""

from __future__ import annotations

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


def run_demo(console: Console, *, steps: int = 300) -> None:
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
        console.print(f"[bold]1. training[/bold] a character LSTM on Python's docs ({steps} steps)")
        job = c.create_job(
            {
                "type": "train",
                "family": "lstm",
                "steps": steps,
                "batch_size": 32,
                "lr": 3e-3,
                "seq_len": 64,
                "checkpoint_every": 100,
                "config": {"hidden": 128, "n_embd": 64, "n_layer": 1},
            }
        )
        job = follow(c, job["id"])
        if job["status"] != "succeeded":
            raise DemoFailed(f"training job {job['id']} ended {job['status']}: {job.get('error')}")
        model = job["result"]["model"]
        console.print(f"[bold]2. generating[/bold] from model {model!r} through the Batch API")
        text = generate_texts(c, model)
        for prompt, completion in text:
            console.print(f"  [dim]{prompt}[/dim]{completion!r}")
        show_where(console, settings, job["id"], model, stack is not None)
    finally:
        if stack is not None and stack.procs:
            stack.stop()


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
    console.print("[bold]3. where to look[/bold]")
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
