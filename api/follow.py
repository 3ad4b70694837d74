"""A job followed from the terminal: a live progress bar until it ends, then how it ended
(`genq watch`, `genq train --follow`, `genq demo`)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from api.client import FINISHED, Client

console = Console()


def follow(c: Client, job_id: str) -> dict[str, Any]:
    job = c.get_job(job_id)
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(
            f"{job_id} {job['status']}", total=max(job["progress"]["total"], 1), info=""
        )
        while True:
            p, m = job["progress"], job["metrics"]
            info = f"loss {m['loss']:.4f}" if "loss" in m else ""
            bar.update(
                task,
                completed=p["done"],
                total=max(p["total"], 1),
                description=f"{job_id} {job['status']}",
                info=info,
            )
            if job["status"] in FINISHED:
                break
            job = c.get_job(job_id, wait=0.5)  # at once when it finishes
    describe_end(job)
    return job


def describe_end(job: dict[str, Any]) -> None:
    if job["status"] == "succeeded":
        extra = f" → model {job['result']['model']}" if job["result"].get("model") else ""
        console.print(f"[green]succeeded[/green]{extra}")
    elif job["status"] == "failed":
        e = job["error"] or {}
        console.print(f"[red]failed[/red]: {e.get('code')}: {e.get('message')}")
    else:
        console.print(f"[yellow]{job['status']}[/yellow]")
