"""The `genq` command: run the stack, submit and watch jobs, manage keys."""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from api.client import FINISHED, Client
from api.follow import describe_end, follow
from common.batches.schemas import BATCH_FINISHED, BatchStatus
from common.config import get_settings
from common.errors import GenqAPIError
from common.family_names import ALIASES, CLASSES
from common.gpus import machine_gpu_count

app = typer.Typer(
    help="genq: a job queue for generative models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database commands.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
console = Console()
err = Console(stderr=True, soft_wrap=True)  # one-line errors stay one line in logs


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn API, connection and stack errors into one line and exit 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from common.errors import DemoFailed, StackError

        try:
            return fn(*args, **kwargs)
        except GenqAPIError as exc:
            err.print(f"[red]error:[/red] {exc} [dim](HTTP {exc.status}, {exc.code})[/dim]")
        except httpx.ConnectError:
            err.print(
                f"[red]error:[/red] cannot reach genq at {get_settings().api_url}: "
                "is `genq up` running? (or set GENQ_API_URL)"
            )
        except httpx.HTTPError as exc:
            err.print(f"[red]error:[/red] talking to {get_settings().api_url}: {exc}")
        except (StackError, DemoFailed) as exc:  # may quote a log: no markup in it
            err.print(f"[red]error:[/red] {escape(str(exc))}")
        except FileNotFoundError as exc:
            err.print(f"[red]error:[/red] {exc.strerror}: {exc.filename}")
        raise typer.Exit(1)

    return wrapper


def client() -> Client:
    c = Client()
    if not c.api_key:
        err.print(
            "[red]error:[/red] no API key: set GENQ_API_KEY, or run `genq up` in this "
            "folder (it saves one in .genq/api_key)"
        )
        raise typer.Exit(1)
    return c


# ------------------------------------------------------------------ stack


@app.command()
@friendly
def up(
    gpus: Annotated[
        int | None, typer.Option(help="GPU workers (default: one per CUDA device)")
    ] = None,
    flower: Annotated[bool, typer.Option(help="Start Flower")] = True,
) -> None:
    """Start Redis, the API, workers and Flower in this folder (.genq/); Ctrl-C stops all."""
    from api.stack import Stack, stop_on_termination

    count = machine_gpu_count() if gpus is None else gpus
    stack = Stack(get_settings(), gpus=count, with_flower=flower)
    stop_on_termination()  # Ctrl-C, systemd's stop and a closed terminal: a clean stop
    try:
        stack.start()
        print_stack(stack)
        stack.watch(say=lambda line: console.print(f"[yellow]{line}[/yellow]"))
    except KeyboardInterrupt:
        console.print("\nstopping (running jobs checkpoint and re-queue)…")
    finally:
        if stack.procs:
            try:
                stack.stop()
            except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
                console.print("stopping at once…")
                stack.kill()
            console.print("stopped.")


def print_stack(stack: Any) -> None:
    s = stack.settings
    console.print(f"[bold green]genq is up[/bold green] (state in {s.home_dir})")
    console.print(f"  API      http://{s.api_host}:{s.api_port}   docs: /docs")
    if stack.with_flower:
        console.print(
            f"  Flower   http://127.0.0.1:{s.flower_port}   user {s.flower_user}, "
            f"password in {s.home_dir / 'flower_password'}"
        )
    console.print(f"  API key  {stack.api_key}   (saved in {s.home_dir / 'api_key'})")
    console.print(f"  logs     {stack.logs}")
    console.print("Ctrl-C stops everything.")


@app.command()
@friendly
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues")] = "cpu",
    gpu: Annotated[int | None, typer.Option(help="GPU index: sets CUDA_VISIBLE_DEVICES")] = None,
    name: Annotated[str | None, typer.Option(help="Node name (default: queues and pid)")] = None,
    loglevel: str = "INFO",
) -> None:
    """Run a worker (prefork, concurrency 1; one per GPU)."""
    from common.errors import Conflict
    from worker.main import start_worker

    allowed = get_settings().queue_names
    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in wanted if q not in allowed]
    if unknown:
        err.print(
            f"[red]error:[/red] --queues: unknown {unknown}; configured: {allowed} "
            "(add custom queues with GENQ_QUEUES)"
        )
        raise typer.Exit(2)
    try:
        start_worker(queues=wanted, gpu=gpu, name=name, loglevel=loglevel)
    except Conflict as exc:
        err.print(f"[red]error:[/red] --name: {exc.message}")
        raise typer.Exit(1) from None


@app.command()
@friendly
def demo(
    steps: Annotated[int, typer.Option(help="Training steps of the text model", min=1)] = 800,
    digit_steps: Annotated[int, typer.Option(help="Training steps of the digits model",
                                             min=1)] = 3000,
    out: Annotated[Path, typer.Option(help="Folder for the digits grid")] = Path("genq-demo"),
) -> None:
    """Train a text model and a digits model on built-in data, generate from both."""
    from api.demo import run_demo

    run_demo(console, steps=steps, digit_steps=digit_steps, out=out)


@db_app.command("upgrade")
@friendly
def db_upgrade() -> None:
    """Apply Alembic migrations to GENQ_DATABASE_URL."""
    from common.migrate import upgrade

    upgrade()
    console.print(f"database at {redact(get_settings().db_url)} is up to date")


def redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


MaxRunning = Annotated[list[str] | None, typer.Option(
    "--max-running", help="QUEUE=N: at most N of the owner's jobs in flight on QUEUE (repeat "
    "per queue)")]
GpuSeconds = Annotated[float | None, typer.Option(
    "--gpu-seconds-per-day", min=0, help="GPU-seconds the owner's jobs may run per rolling day")]


@keys_app.command("create")
@friendly
def keys_create(owner: str = "default", name: str = "", max_running: MaxRunning = None,
                gpu_seconds_per_day: GpuSeconds = None) -> None:
    """Create an API key (printed once), optionally with quotas for its owner."""
    from common.auth import create_key
    from common.db import session_scope
    from common.migrate import upgrade

    limits = parse_max_running(max_running)
    upgrade()
    with session_scope() as session:
        row, plain = create_key(session, owner=owner, name=name)
        quota = apply_quota(session, owner, limits, gpu_seconds_per_day, clear=False)
    console.print(f"{plain}\n[dim]id {row.id}, owner {owner}; shown once, stored hashed[/dim]")
    if quota:
        console.print(f"quota of {owner}: {quota}")


@keys_app.command("update")
@friendly
def keys_update(
    owner: str,
    max_running: MaxRunning = None,
    gpu_seconds_per_day: GpuSeconds = None,
    no_limits: Annotated[bool, typer.Option("--no-limits", help="Drop every limit first")] = False,
) -> None:
    """Set an owner's quotas (every key of that owner shares them)."""
    from common.db import session_scope
    from common.migrate import upgrade

    limits = parse_max_running(max_running)
    if not (limits or gpu_seconds_per_day is not None or no_limits):
        err.print("[red]error:[/red] give --max-running QUEUE=N, --gpu-seconds-per-day S "
                  "or --no-limits")
        raise typer.Exit(2)
    upgrade()
    with session_scope() as session:
        quota = apply_quota(session, owner, limits, gpu_seconds_per_day, clear=no_limits)
    console.print(f"quota of {owner}: {quota or 'no limits'}")


def parse_max_running(values: list[str] | None) -> dict[str, int]:
    """--max-running gpu=1 --max-running cpu=4 -> {"gpu": 1, "cpu": 4}; a CLI error naming
    the option for a bad value or a queue that is not configured."""
    queues = get_settings().queue_names
    limits: dict[str, int] = {}
    for value in values or []:
        queue, _, n = value.partition("=")
        if queue not in queues or not n.isdigit() or int(n) < 1:
            err.print(f"[red]error:[/red] --max-running: {value!r} is not QUEUE=N with QUEUE "
                      f"one of {', '.join(queues)} and N a whole number >= 1")
            raise typer.Exit(2)
        limits[queue] = int(n)
    return limits


def apply_quota(session: Any, owner: str, limits: dict[str, int], gpu_seconds: float | None,
                *, clear: bool) -> str:
    """Store the limits; what the owner's quota is now, as one line ('' for none)."""
    from common.quotas import get_quota, set_quota

    if limits or gpu_seconds is not None or clear:
        set_quota(session, owner, max_running=limits, gpu_seconds_per_day=gpu_seconds,
                  clear=clear)
    return describe_quota(get_quota(session, owner))


def describe_quota(quota: Any) -> str:
    if quota is None:
        return ""
    parts = [f"{q}: {n} in flight" for q, n in sorted((quota.max_running or {}).items())]
    if quota.gpu_seconds_per_day is not None:
        parts.append(f"{quota.gpu_seconds_per_day:g} GPU-s/day")
    return ", ".join(parts)


@keys_app.command("revoke")
@friendly
def keys_revoke(key_id: str) -> None:
    """Revoke an API key by id."""
    from common.auth import revoke_key
    from common.db import session_scope
    from common.errors import NotFound

    try:
        with session_scope() as session:
            revoke_key(session, key_id=key_id)
    except NotFound as exc:
        err.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from None
    console.print(f"revoked {key_id}")


@keys_app.command("list")
@friendly
def keys_list() -> None:
    """List API keys (ids and owners, never the keys)."""
    from common.auth import list_keys
    from common.db import session_scope
    from common.models import Quota

    with session_scope() as session:
        rows = list_keys(session)
        quotas = {q.owner: describe_quota(q) for q in session.query(Quota)}
    table = Table("id", "owner", "name", "created", "revoked", "quota")
    for r in rows:
        table.add_row(
            r.id,
            r.owner,
            r.name,
            f"{r.created_at:%Y-%m-%d %H:%M}",
            f"{r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked_at else "",
            quotas.get(r.owner, ""),
        )
    console.print(table)


# ------------------------------------------------------------------ jobs

_ALIAS_OF = {name: alias for alias, name in ALIASES.items()}
# "vae | gan | diffusion | lstm | lm (alias gpt)"
FAMILY_CHOICES = " | ".join(f"{name} (alias {_ALIAS_OF[name]})" if name in _ALIAS_OF else name
                            for name in CLASSES)


@app.command()
@friendly
def train(
    family: Annotated[str, typer.Argument(help=FAMILY_CHOICES)],
    steps: Annotated[int | None, typer.Option(
        help="Default 200; diffusion with no --config: its recipe's")] = None,
    name: Annotated[str | None, typer.Option(help="Model name to register")] = None,
    data: Annotated[str | None, typer.Option(help="python-docs | digits | file-…")] = None,
    config: Annotated[str | None, typer.Option(help="Model config as JSON")] = None,
    adapter: Annotated[str | None, typer.Option(
        help='LoRA adapter as JSON (lm), e.g. \'{"r": 8}\'')] = None,
    batch_size: Annotated[int | None, typer.Option(help="Default 16 (or the recipe's)")] = None,
    lr: Annotated[float | None, typer.Option(help="Default 0.001 (or the recipe's)")] = None,
    queue: str = "auto",
    priority: Annotated[int | None, typer.Option(help="0-9, 9 most urgent (default 0)")] = None,
    watch_: Annotated[bool, typer.Option("--watch", help="Follow progress")] = False,
) -> None:
    """Submit a training job."""
    spec: dict[str, Any] = {"type": "train", "family": family, "queue": queue}
    for key, value in (("steps", steps), ("batch_size", batch_size), ("lr", lr),
                       ("priority", priority)):
        if value is not None:  # unset: the server's default, or the family's recipe
            spec[key] = value
    if name:
        spec["name"] = name
    if data:
        spec["data"] = {"file_id": data} if data.startswith("file-") else {"builtin": data}
    if config:
        spec["config"] = parse_json(config, "--config")
    if adapter:
        spec["adapter"] = parse_json(adapter, "--adapter")
    job = client().create_job(spec)
    length = (f"{job['spec']['steps']} steps" if job["spec"].get("steps")
              else f"{job['spec'].get('epochs')} epochs")
    console.print(f"submitted {job['id']} ({job['family']}, {length}, queue {job['queue']})")
    if watch_:
        follow(client(), job["id"])


def parse_json(text: str, option: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        err.print(f"[red]error:[/red] {option} is not valid JSON: {exc}")
        raise typer.Exit(2) from None


@app.command()
@friendly
def generate(
    model: Annotated[str, typer.Argument(help="Model name")],
    prompts: Annotated[list[str] | None, typer.Argument(
        help="Prompts (text and text-to-image models)")] = None,
    n: Annotated[int | None, typer.Option(
        help="Images to generate (image models); with prompts, outputs per prompt")] = None,
    label: Annotated[list[int] | None, typer.Option(help="Class label(s) to condition on")] = None,
    max_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: Annotated[int | None, typer.Option(help="Beam search width (lm)")] = None,
    seed: int | None = None,
    size: Annotated[str | None, typer.Option(help="Image size WIDTHxHEIGHT (image models)")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (diffusion)")] = None,
    guidance_scale: Annotated[float | None, typer.Option(
        help="Classifier-free guidance (diffusion)")] = None,
    negative_prompt: Annotated[str | None, typer.Option(
        help="What to guide away from (diffusion)")] = None,
    out: Annotated[Path, typer.Option(help="Folder for images")] = Path("genq-results"),
    priority: Annotated[int | None, typer.Option(help="0-9, 9 most urgent (default 0)")] = None,
) -> None:
    """Generate from a model and print (or save) the results."""
    if label and n is not None and len(label) not in (1, n):
        err.print(f"[red]error:[/red] --label: give one label for all {n} images or exactly "
                  f"{n} labels (got {len(label)})")
        raise typer.Exit(2)
    spec: dict[str, Any] = {
        "type": "generate",
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    for key, value in (
        ("prompts", prompts),
        ("n", n),
        ("labels", label),
        ("top_k", top_k),
        ("top_p", top_p),
        ("num_beams", num_beams),
        ("seed", seed),
        ("size", size),
        ("steps", steps),
        ("guidance_scale", guidance_scale),
        ("negative_prompt", negative_prompt),
        ("priority", priority),
    ):
        if value is not None and value != []:  # seed 0 and top_k 0 are values, not absences
            spec[key] = value
    c = client()
    job = c.create_job(spec)
    console.print(f"submitted {job['id']}")
    job = c.wait(job["id"])
    show_results(c, job, out)


@app.command()
@friendly
def jobs(
    status: Annotated[
        str | None, typer.Option(help="queued|running|succeeded|failed|cancelled")
    ] = None,
    type: Annotated[str | None, typer.Option(help="train|generate|batch")] = None,
    limit: int = 20,
) -> None:
    """List your jobs."""
    page = client().list_jobs(status=status, type=type, limit=limit)
    table = Table("id", "type", "family", "status", "progress", "attempt", "created")
    table.columns[0].no_wrap = True
    for j in page["data"]:
        p = j["progress"]
        table.add_row(
            j["id"],
            j["type"],
            j["family"] or "",
            colour(j["status"]) + waiting_note(j.get("waiting")),
            f"{p['done']}/{p['total']} {p['unit']}s",
            str(j["attempt"]),
            j["created_at"][:19].replace("T", " "),
        )
    console.print(table)


def waiting_note(waiting: dict[str, Any] | None) -> str:
    """' (#3 in queue)', ' (no worker)'…: why a queued job waits, for the jobs table."""
    if not waiting:
        return ""
    reason = waiting["reason"]
    if reason == "priority":
        return f" (#{waiting['position']} in queue)"
    return " (" + {"fair_share": "fair share", "no_worker": "no worker", "quota": "over quota",
                   "backoff": "retry back-off"}.get(reason, reason) + ")"


def colour(status: str) -> str:
    c = {"succeeded": "green", "failed": "red", "running": "cyan", "cancelled": "yellow"}
    return f"[{c.get(status, 'white')}]{status}[/]"


@app.command()
@friendly
def watch(job_id: str) -> None:
    """Follow a job with a live progress bar until it finishes."""
    job = follow(client(), job_id)
    raise typer.Exit(0 if job["status"] == "succeeded" else 1)


@app.command()
@friendly
def cancel(job_id: str) -> None:
    """Cancel a job (a running one stops at its next step)."""
    job = client().cancel(job_id)
    console.print(
        f"{job_id}: {job['status']}" + (" (cancel requested)" if job["status"] == "running" else "")
    )


@app.command()
@friendly
def results(
    job_id: str,
    out: Annotated[Path, typer.Option(help="Folder for images and plots")] = Path("genq-results"),
) -> None:
    """Print a job's texts; save its images and plots to a folder."""
    c = client()
    show_results(c, c.get_job(job_id), out)


def show_results(c: Client, job: dict[str, Any], out: Path) -> None:
    if job["status"] == "failed":
        describe_end(job)
    reasons: Counter[str] = Counter()
    items = 0
    for item in c.items(job["id"]):
        items += 1
        resp = item.get("response") or {}
        for text in resp.get("texts", []):
            prompt = item["request"].get("gen", {}).get("prompt", "")
            console.print(f"[bold]{item['custom_id']}[/bold] [dim]{prompt}[/dim]{text}")
        if item.get("error"):
            reasons[str(item["error"].get("message"))] += 1
    if reasons:  # one line per distinct reason, not one per item
        failed = sum(reasons.values())
        err.print(f"[red]{failed} of {items} item(s) failed:[/red]")
        for message, count in reasons.most_common():
            err.print(f"  {count} × {message}")
    saved = []
    for art in c.artifacts(job["id"]):
        out.mkdir(parents=True, exist_ok=True)
        saved.append(c.download_artifact(art["id"], out / f"{art['id']}-{art['filename']}"))
    if saved:
        console.print(f"saved {len(saved)} file(s) to {out}/")
    if job["result"]:
        console.print(f"[dim]result: {json.dumps(job['result'])}[/dim]")


@app.command()
@friendly
def logs(
    job_id: str,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Print until it ends")] = False,
) -> None:
    """Print a job's log lines."""
    c = client()
    after: int | None = None
    while True:
        for line in c.logs(job_id, after=after):
            style = {"ERROR": "red", "WARNING": "yellow"}.get(line["level"], "dim")
            console.print(
                f"[dim]{line['at'][11:19]}[/dim] [{style}]{line['level']:<7}[/] {line['message']}",
                highlight=False,
            )
            after = line["id"]
        if not follow_ or c.get_job(job_id)["status"] in FINISHED:
            return
        time.sleep(1)


@app.command()
@friendly
def metrics(
    job_id: str,
    name: Annotated[list[str] | None, typer.Option(help="Only these series (e.g. loss)")] = None,
) -> None:
    """Show a job's metric series: first, last, best and a sparkline of each."""
    points = client().metrics(job_id, names=name)
    if not points:
        console.print(f"{job_id}: no metrics yet")
        return
    series: dict[str, list[tuple[int, float]]] = {}
    for p in points:
        series.setdefault(p["name"], []).append((p["step"], p["value"]))
    table = Table("metric", "steps", "first", "last", "min", "max", "curve")
    for key, values in sorted(series.items()):
        ys = [v for _, v in values]
        table.add_row(
            key,
            f"{values[0][0]}–{values[-1][0]}",
            f"{ys[0]:.4g}",
            f"{ys[-1]:.4g}",
            f"{min(ys):.4g}",
            f"{max(ys):.4g}",
            sparkline(ys),
        )
    console.print(table)


def sparkline(values: list[float], width: int = 40) -> str:
    """A one-line chart of values, resampled to at most width characters."""
    bars = "▁▂▃▄▅▆▇█"
    if len(values) > width:
        values = [values[round(i * (len(values) - 1) / (width - 1))] for i in range(width)]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(bars[min(int((v - lo) / span * len(bars)), len(bars) - 1)] for v in values)


@app.command()
@friendly
def workers() -> None:
    """List live workers, their queues, device and current job."""
    table = Table("worker", "queues", "device", "current job", "heartbeat")
    for w in client().workers():
        d = w["device"]
        device = d.get("type", "") + (f" {d['name']}" if d.get("name") else "")
        table.add_row(
            w["hostname"],
            ",".join(w["queues"]),
            device,
            w["current_job"] or "",
            w["heartbeat_at"][11:19],
        )
    console.print(table)


# ------------------------------------------------------------------ batches (OpenAI Batch API)

batch_app = typer.Typer(
    help="Bulk generation through the OpenAI-compatible Batch API.", no_args_is_help=True
)
app.add_typer(batch_app, name="batch")


@batch_app.command("submit")
@friendly
def batch_submit(
    file: Annotated[Path, typer.Argument(help="JSONL: one {custom_id, method, url, body} a line")],
    model: Annotated[str | None, typer.Option(help="Model for lines whose body has none")] = None,
    endpoint: Annotated[
        str, typer.Option(help="/v1/completions | /v1/chat/completions | /v1/images/generations")
    ] = "/v1/completions",
    wait: Annotated[bool, typer.Option("--wait", help="Wait and download the output")] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="Where --wait saves the output JSONL (default FILE.output.jsonl)"),
    ] = None,
) -> None:
    """Upload FILE and create a batch; with --wait, follow it and save the output file."""
    c = client()
    upload = c.upload_file(file, purpose="batch")
    batch = c.create_batch(upload["id"], endpoint=endpoint, model=model)
    console.print(f"submitted batch {batch['id']} (input {upload['id']}): {batch['status']}")
    with console.status("a worker checks every line of the file…"):
        while batch["status"] == BatchStatus.validating:  # seconds; about a minute a 1M lines
            time.sleep(0.5)
            batch = c.get_batch(batch["id"])
    console.print(f"{batch['request_counts']['total']} requests: {batch['status']}")
    if batch["status"] == BatchStatus.failed:
        for e in (batch.get("errors") or {}).get("data", [])[:20]:
            err.print(f"  line {e['line']}: {e['code']}: {e['message']}")
        raise typer.Exit(1)
    if not wait:
        return
    batch = follow_batch(c, batch)
    counts = batch["request_counts"]
    console.print(f"{batch['status']}: {counts['completed']} completed, {counts['failed']} failed")
    if batch.get("output_file_id"):
        target = out or file.with_name(file.stem + ".output.jsonl")
        target.write_bytes(c.file_content(batch["output_file_id"]))
        console.print(f"output  {batch['output_file_id']} → {target}")
    if batch.get("error_file_id"):
        target = (out or file).with_name(file.stem + ".errors.jsonl")
        target.write_bytes(c.file_content(batch["error_file_id"]))
        console.print(f"errors  {batch['error_file_id']} → {target}")
    raise typer.Exit(0 if batch["status"] == BatchStatus.completed else 1)


def follow_batch(c: Client, batch: dict[str, Any]) -> dict[str, Any]:
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(batch["id"], total=max(batch["request_counts"]["total"], 1))
        while batch["status"] not in BATCH_FINISHED:
            batch = c.get_batch(batch["id"], wait=0.5)  # at once when it finishes
            counts = batch["request_counts"]
            bar.update(
                task,
                total=max(counts["total"], 1),
                completed=counts["completed"] + counts["failed"],
                description=f"{batch['id']} {batch['status']}",
            )
    return batch


def main() -> None:
    app()


if __name__ == "__main__":
    main()
