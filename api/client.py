"""The Python SDK: a small httpx client for genq's API (the CLI is built on it)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from common.batches.schemas import BATCH_FINISHED
from common.config import get_settings
from common.errors import GenqAPIError
from common.models import FINISHED

LONG_POLL_S = 30.0  # how long one held read may wait (the API allows up to 60 s)


def default_api_key() -> str:
    """GENQ_API_KEY, else the key `genq up` saved in GENQ_HOME/api_key."""
    settings = get_settings()
    if settings.api_key:
        return settings.api_key
    path = settings.home_dir / "api_key"
    return path.read_text().strip() if path.exists() else ""


# A create is checked whole before it answers: a training spec's model is built on the meta
# device (the API's first one imports torch and the family's library), a batch file is read
# and tokenized line by line. Seconds on an idle machine, more on a loaded one.
CREATE_TIMEOUT_S = 600.0


class Client:
    """genq API client: `Client().create_job({...})`."""

    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, timeout: float = 30.0
    ):
        self.base_url = (base_url or get_settings().api_url).rstrip("/")
        self.api_key = api_key if api_key is not None else default_api_key()
        self.http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {self.api_key}"} if self.api_key else {},
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.http.request(method, path, **kwargs)
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
            except Exception:
                err = {"code": "http_error", "message": resp.text[:500] or resp.reason_phrase}
            raise GenqAPIError(
                resp.status_code, err.get("code", ""), err.get("message", ""), err.get("param")
            )
        ctype = resp.headers.get("content-type", "")
        return resp.json() if ctype.startswith("application/json") else resp.content

    def healthy(self) -> bool:
        try:
            return self.http.get("/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    # jobs
    def create_job(
        self, spec: dict[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/v1/jobs", json=spec, headers=headers,
                            timeout=CREATE_TIMEOUT_S)

    def get_job(self, job_id: str, wait: float = 0) -> dict[str, Any]:
        """A job; with `wait`, the API answers once it has finished or `wait` seconds passed."""
        return self._held_get(f"/v1/jobs/{job_id}", wait)

    def _held_get(self, path: str, wait: float) -> Any:
        if wait <= 0:
            return self.request("GET", path)
        return self.request("GET", path, params={"wait": round(wait, 3)}, timeout=wait + 30)

    def _wait_for(self, get: Any, finished: tuple[str, ...], timeout: float) -> dict[str, Any]:
        """Held reads until the status is final or timeout seconds have passed."""
        deadline = time.monotonic() + timeout
        while True:
            asked = time.monotonic()
            wait = min(LONG_POLL_S, max(deadline - asked, 0.0))
            state: dict[str, Any] = get(wait)
            if state["status"] in finished or time.monotonic() >= deadline:
                return state
            if time.monotonic() - asked < wait / 2:  # an API that does not hold reads
                time.sleep(0.5)

    def list_jobs(self, **params: Any) -> dict[str, Any]:
        return self.request("GET", "/v1/jobs", params={k: v for k, v in params.items() if v})

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel")

    def items(self, job_id: str) -> Iterator[dict[str, Any]]:
        after = None
        while True:
            page = self.request(
                "GET",
                f"/v1/jobs/{job_id}/items",
                params={"limit": 1000, **({"after": after} if after is not None else {})},
            )
            yield from page["data"]
            if not page["has_more"]:
                return
            after = page["next_cursor"]

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/jobs/{job_id}/artifacts")

    def download_artifact(self, artifact_id: str, dest: Path) -> Path:
        dest.write_bytes(self.request("GET", f"/v1/artifacts/{artifact_id}"))
        return dest

    def metrics(self, job_id: str, names: list[str] | None = None) -> list[dict[str, Any]]:
        """A job's metric points: step, name, value, at."""
        params = {"name": names} if names else {}
        return self.request("GET", f"/v1/jobs/{job_id}/metrics", params=params)["data"]

    def logs(self, job_id: str, after: int | None = None) -> list[dict[str, Any]]:
        """A job's log lines after the line id `after` (all when None)."""
        lines: list[dict[str, Any]] = []
        while True:
            params = {"limit": 1000, **({"after": after} if after is not None else {})}
            page = self.request("GET", f"/v1/jobs/{job_id}/logs", params=params)
            lines += page["data"]
            if not page["has_more"]:
                return lines
            after = page["next_cursor"]

    def events(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Follow a job's server-sent events: (kind, job snapshot) until it finishes."""
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as resp:
            if resp.status_code >= 400:
                resp.read()
                self.request("GET", f"/v1/jobs/{job_id}")  # raises the API's error
            kind = ""
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    yield kind, json.loads(line[5:])

    def wait(self, job_id: str, timeout: float = 3600) -> dict[str, Any]:
        """Until the job has finished (or timeout seconds); returns its last state."""
        return self._wait_for(lambda wait: self.get_job(job_id, wait), FINISHED, timeout)

    # models & workers
    def models(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/models")["data"]

    def workers(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/workers")["data"]

    # files & batches (OpenAI-compatible; the `openai` SDK works against /v1 too)
    def upload_file(self, path: Path, purpose: str = "batch") -> dict[str, Any]:
        with path.open("rb") as f:
            return self.request(
                "POST", "/v1/files", data={"purpose": purpose}, files={"file": (path.name, f)},
                timeout=CREATE_TIMEOUT_S,
            )

    def file_content(self, file_id: str) -> bytes:
        return self.request("GET", f"/v1/files/{file_id}/content")

    def create_batch(
        self,
        input_file_id: str,
        endpoint: str = "/v1/completions",
        model: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": "24h",
        }
        if model:
            body["model"] = model
        if metadata:
            body["metadata"] = metadata
        return self.request("POST", "/v1/batches", json=body, timeout=CREATE_TIMEOUT_S)

    def get_batch(self, batch_id: str, wait: float = 0) -> dict[str, Any]:
        """A batch; with `wait`, the API answers once it has finished or `wait` seconds passed."""
        return self._held_get(f"/v1/batches/{batch_id}", wait)

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/batches/{batch_id}/cancel")

    def wait_batch(self, batch_id: str, timeout: float = 3600) -> dict[str, Any]:
        """Until the batch is completed, failed, cancelled or expired (or timeout seconds)."""
        return self._wait_for(lambda wait: self.get_batch(batch_id, wait), BATCH_FINISHED,
                              timeout)
