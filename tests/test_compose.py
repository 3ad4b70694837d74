"""docker-compose.yml, .env.example and the Dockerfile agree with Settings and DESIGN.md §9."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, Any] = COMPOSE["services"]
ENV_EXAMPLE = (ROOT / ".env.example").read_text()
FIELDS = {f"GENQ_{name.upper()}" for name in Settings.model_fields}
ONE_SHOT = {"migrate", "createbucket", "cli"}
GENQ_NAME = re.compile(r"\bGENQ_[A-Z0-9_]+")


def _command(service: dict[str, Any]) -> str:
    parts = []
    for key in ("entrypoint", "command"):
        value = service.get(key) or []
        parts.extend(value if isinstance(value, list) else [value])
    return " ".join(str(p) for p in parts)


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_expected_services() -> None:
    assert {"redis", "postgres", "minio", "createbucket", "migrate", "api", "worker-cpu",
            "worker-gpu", "flower"} <= set(SERVICES)


def test_genq_names_are_settings_fields() -> None:
    used_compose = set(GENQ_NAME.findall(COMPOSE_TEXT))
    used_example = set(GENQ_NAME.findall(ENV_EXAMPLE))
    assert used_compose - FIELDS == set(), "docker-compose.yml names unknown settings"
    assert used_example - FIELDS == set(), ".env.example names unknown settings"


def test_env_example_lists_every_setting() -> None:
    listed = set(re.findall(r"^#?\s*(GENQ_[A-Z0-9_]+)=", ENV_EXAMPLE, re.MULTILINE))
    assert FIELDS - listed == set(), "add these to .env.example"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "GENQ_FLOWER_PASSWORD",
                 "POSTGRES_PASSWORD", "REDIS_PASSWORD"):
        assert re.search(rf"^{name}=", ENV_EXAMPLE, re.MULTILINE), name


def test_genq_services_point_at_compose_backends() -> None:
    for name in ("api", "worker-cpu", "worker-gpu", "flower", "migrate"):
        env = _env(SERVICES[name])
        assert "postgresql://" in env["GENQ_DATABASE_URL"], name
        assert "@redis:6379/0" in env["GENQ_BROKER_URL"], name
        assert "s3://genq/" in env["GENQ_STORAGE_URL"], name
        assert "http://minio:9000" in env["GENQ_S3_ENDPOINT_URL"], name
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env), name


def test_long_running_services_have_healthchecks() -> None:
    for name, service in SERVICES.items():
        if name not in ONE_SHOT:
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_one_shots_gate_the_app() -> None:
    assert _command(SERVICES["migrate"]).split() == ["db", "upgrade"]
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker-cpu", "worker-gpu"):
        deps = SERVICES[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["createbucket"]["condition"] == "service_completed_successfully", name
    assert "mb" in _command(SERVICES["createbucket"])


def test_declared_volumes() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    used = set()
    for service in SERVICES.values():
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source")
            if source and not source.startswith((".", "/", "~")):
                used.add(source)
    assert used <= declared
    assert {"redis-data", "postgres-data", "minio-data", "flower-data"} <= used


def test_redis_is_durable() -> None:
    redis = SERVICES["redis"]
    assert "--appendonly yes" in _command(redis)
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_flower_has_auth_and_no_public_port() -> None:
    flower = SERVICES["flower"]
    command = _command(flower)
    assert "FLOWER_BASIC_AUTH" in _env(flower) or "--basic_auth" in command
    assert "--persistent=True" in command and "--db=/data/flower.db" in command
    for port in flower.get("ports") or []:
        assert str(port).startswith("127.0.0.1:"), port


def test_published_ports_are_private_by_default() -> None:
    for name, service in SERVICES.items():
        for port in service.get("ports") or []:
            if name != "api":
                assert str(port).startswith(("127.0.0.1:", "${PUBLISH_ADDR:-127.0.0.1}:")), port


def test_workers() -> None:
    cpu, gpu = SERVICES["worker-cpu"], SERVICES["worker-gpu"]
    # one worker a container: a fixed --name is unique and is what the healthcheck pings
    assert _command(cpu).split() == ["worker", "--queues", "cpu", "--name", "cpu"]
    assert _command(gpu).split() == ["worker", "--queues", "gpu", "--gpu", "0", "--name", "gpu0"]
    assert "-d cpu@$$HOSTNAME" in " ".join(cpu["healthcheck"]["test"])
    assert "-d gpu0@$$HOSTNAME" in " ".join(gpu["healthcheck"]["test"])
    for worker in (cpu, gpu):
        grace = str(worker["stop_grace_period"])
        assert grace.endswith("s") and int(grace[:-1]) >= 60
        assert "container_name" not in worker  # --scale needs generated names
    assert "profiles" not in cpu and gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["build"]["args"]["VARIANT"] == "cuda"


def test_api_serves_on_all_interfaces_with_readiness_probe() -> None:
    api = SERVICES["api"]
    assert "uvicorn api.main:app --host 0.0.0.0" in _command(api)
    assert "/readyz" in " ".join(api["healthcheck"]["test"])


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert "ARG VARIANT=cpu" in text and "download.pytorch.org/whl/cpu" in text
    assert "pip install --no-deps '.[s3]'" in text
    instructions = [line.split()[0] for line in text.splitlines()
                    if line and not line.startswith((" ", "#"))]
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert instructions.index("USER") > max(
        i for i, word in enumerate(instructions) if word in ("RUN", "COPY"))
    assert 'ENTRYPOINT ["genq"]' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git", ".genq"} <= set(ignored)


def _compose_cli() -> list[str] | None:
    for argv in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(argv[0]) is None:
            continue
        try:
            ok = subprocess.run([*argv, "version"], capture_output=True, timeout=20).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            continue
        if ok:
            return argv
    return None


def test_docker_compose_config_validates(tmp_path: Path) -> None:
    """`docker compose config` needs no daemon; skipped where the compose plugin is missing."""
    argv = _compose_cli()
    if argv is None:
        pytest.skip("docker compose is not installed")
    env_file = tmp_path / "env"
    env_file.write_text("POSTGRES_PASSWORD=p\nREDIS_PASSWORD=r\nAWS_ACCESS_KEY_ID=genq\n"
                        "AWS_SECRET_ACCESS_KEY=secretsecret\nGENQ_FLOWER_PASSWORD=f\n")
    for profiles in ([], ["--profile", "gpu", "--profile", "cli"]):
        result = subprocess.run(
            [*argv, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml"),
             "--env-file", str(env_file), *profiles, "config", "-q"],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
