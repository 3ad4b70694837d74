"""Settings: every GENQ_* variable, read once."""

from __future__ import annotations

from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """genq configuration; each field is the variable GENQ_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="GENQ_", env_file=".env", extra="ignore")

    home: Path = Field(Path(".genq"), description="Folder for the embedded stack's state.")
    database_url: str = Field("", description="SQLAlchemy URL; default sqlite under home.")
    db_pool_size: int = Field(5, description="PostgreSQL connections kept open per process.")
    db_max_overflow: int = Field(10, description="Extra PostgreSQL connections under load.")
    broker_url: str = Field("redis://127.0.0.1:6390/0", description="Celery broker (Redis).")
    storage_url: str = Field("", description="fsspec URL for objects; default home/storage.")
    s3_endpoint_url: str = Field("", description="S3 endpoint (MinIO, moto) for s3:// storage.")

    api_url: str = Field("http://127.0.0.1:8000", description="Where clients reach the API.")
    api_key: str = Field("", description="Key the CLI/SDK send; default home/api_key.")
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    redis_port: int = Field(6390, description="Port of the embedded Redis (genq up).")
    flower_port: int = 5555
    flower_user: str = "genq"
    flower_password: str = Field("", description="Flower basic-auth password; default generated.")

    queues: str = Field("gpu,cpu", description="Comma-separated queues (custom ones allowed).")
    visibility_timeout_s: int = Field(43200, description="Redis redelivery timeout; > longest job.")
    lease_s: int = Field(120, description="A running job without heartbeat this long is reaped.")
    heartbeat_s: float = Field(3.0, description="Heartbeat interval of a running job.")
    reaper_interval_s: float = Field(15.0, description="How often a worker's reaper looks.")
    cancel_grace_s: float = Field(10.0, description="Force cancel revokes after this.")
    preempt_after_s: float = Field(
        600.0, ge=0, description="A queued job waiting this long while every worker of its "
                                 "queue runs a lower-priority preemptible job preempts the "
                                 "lowest (0 = never).")
    max_attempts: int = Field(3, description="Attempts before a transient failure is final.")
    retry_backoff_s: float = Field(2.0, description="First retry delay; doubles per attempt.")
    worker_max_tasks_per_child: int = 0
    torch_threads: int = Field(
        0, ge=0, le=1024, description="Threads of torch in each worker's pool child (0: torch's "
                                      "default, one per core); fewer beside other CPU-heavy "
                                      "processes, whose spinning threads otherwise crawl.")
    worker_max_memory_per_child_kb: int = 0
    pretrained_root: Path | None = Field(
        None,
        description="Folder lm `config.pretrained` folders must be in; default home/pretrained.",
    )
    model_cache_bytes: int = Field(2 << 30, description="Per-process model cache bound.")

    shard_size: int = Field(1000, description="Requests per batch shard (about: a shard ends "
                                              "where a generation batch ends).")
    item_chunk: int = Field(
        256, description="Generated items committed together (at least once a second)."
    )
    token_budget: int = Field(8192, description="Tokens per dynamic generation batch.")
    gpu_dtype: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="Weights of text models generating on a GPU (CPU: always fp32).")
    max_json_bytes: int = Field(32 << 20, description="Largest accepted JSON request body.")
    max_upload_bytes: int = Field(2 << 30, description="Largest accepted upload (a million "
                                                       "batch lines with long prompts).")
    stale_upload_s: float = Field(
        3600.0, description="A partial upload file unwritten this long (its API was killed "
                            "mid-write) is removed by the reaper.")
    max_batch_lines: int = Field(1_000_000, description="Most requests in one batch file.")
    max_prompt_chars: int = Field(32_000, description="Longest accepted prompt.")
    max_tokens_cap: int = Field(4096, description="Largest accepted max_tokens.")
    max_model_params: int = Field(
        1_000_000_000, description="Most parameters a training spec's model may have.")
    max_decoded_bytes: int = Field(
        1 << 30, ge=1, description="Most bytes an image dataset (and each file of it) may "
                                   "decode to as float32, checked from the headers first.")
    max_train_memory_bytes: int = Field(
        32 << 30, ge=1, description="Most activation memory a training spec's batch may need, "
                                    "estimated from its family, config, batch_size and "
                                    "seq_len.")
    rate_limit_per_minute: int = Field(600, description="Requests per key per minute (0 = off).")
    max_held_per_owner: int = Field(
        50, ge=0, description="Held requests (?wait=) and event streams open at once per owner, "
        "per API process (0 = no cap); past it a 429.")
    metrics_public: bool = Field(False, description="Serve /metrics without an API key.")

    up_max_restarts: int = Field(
        5, ge=1, description="genq up restarts a crashed child; this many exits of one child "
                             "within 5 minutes stop the stack instead.")

    log_level: str = "INFO"

    @cached_property
    def home_dir(self) -> Path:
        # resolved once: every session (db_url) and storage lookup reads it, and resolve()
        # walks the path with a syscall a component
        return self.home.resolve()

    @property
    def pretrained_dir(self) -> Path:
        return (self.pretrained_root or self.home_dir / "pretrained").resolve()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'genq.db'}"

    @property
    def storage_root(self) -> str:
        return self.storage_url or f"file://{self.home_dir / 'storage'}"

    @property
    def queue_names(self) -> list[str]:
        return [q.strip() for q in self.queues.split(",") if q.strip()]


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
