"""How the API reads what clients send: the README's curl examples as written (real curl),
bodies that are not JSON, and lone surrogates, which no database column can store."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import httpx
import pytest

from tests.conftest import ROOT, fresh_database, start_stack

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl command")


def readme_curl_commands() -> list[str]:
    """Every `curl` command in the README's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()  # the trailing comment, as bash drops it
            if line.startswith("curl "):
                commands.append(line)
    return commands


def run_curl(command: str, *, api_url: str, key: str, job_id: str | None = None) -> str:
    command = command.replace("localhost:8000", api_url.removeprefix("http://"))
    if job_id:
        command = command.replace("JOB_ID", job_id)
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "KEY": key,
                               "H": f"Authorization: Bearer {key}"})
    assert done.returncode == 0, (command, done.stderr)
    return done.stdout


def test_readme_curl_examples_run_as_written(stack):
    commands = readme_curl_commands()
    posts = [c for c in commands if "-X POST" in c and "pretrained" not in c]
    reads = [c for c in commands if "-X POST" not in c]
    assert len(posts) == 2 and len(reads) >= 4, commands  # the tour's train, then generate
    c = stack.client()
    train = json.loads(run_curl(posts[0], api_url=stack.api_url, key=stack.api_key))
    assert train.get("status") == "queued", train
    assert c.wait(train["id"], timeout=600)["status"] == "succeeded"
    gen = json.loads(run_curl(posts[1], api_url=stack.api_url, key=stack.api_key))
    assert gen.get("status") == "queued", gen
    assert c.wait(gen["id"], timeout=120)["status"] == "succeeded"
    for command in reads:
        out = run_curl(command, api_url=stack.api_url, key=stack.api_key, job_id=train["id"])
        if "/events" in command:  # server-sent events, ending with the finished job
            assert "event: status" in out and '"succeeded"' in out, out
        else:
            body = json.loads(out)
            assert not isinstance(body, dict) or body.get("error") is None, (command, out)


def test_readme_hub_model_examples_are_accepted_as_written(redis_server):
    """The README's curl examples that name a hub model (no network here) are sent to a
    stack of its own with no worker: the API takes each as written, and nothing runs it."""
    hub_posts = [c for c in readme_curl_commands() if "-X POST" in c and "pretrained" in c]
    assert hub_posts, "the README shows a hub model trained through the API"
    with fresh_database("sqlite") as db:
        lone = start_stack(db, redis_server.rsplit("/", 1)[0] + "/13")
        try:
            for command in hub_posts:
                job = json.loads(run_curl(command, api_url=lone.api_url, key=lone.api_key))
                assert job.get("status") == "queued", (command, job)
                assert job["spec"]["config"]["pretrained"], job
        finally:
            lone.stop_all()


def test_a_body_that_is_not_json_says_to_send_json(stack):
    r = httpx.post(f"{stack.api_url}/v1/jobs", headers={"Authorization": f"Bearer {stack.api_key}"},
                   data={"type": "train", "family": "lstm"})  # a form, as curl -d sends
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["param"] == "body" and "Content-Type: application/json" in error["message"]
    assert "application/x-www-form-urlencoded" in error["message"]


LONE_SURROGATES = [b'{"type": "generate", "model": "m", "prompts": ["\\ud800"]}',
                   b'{"type": "generate", "model": "m", "prompts": ["\xed\xa0\x80"]}',
                   b'{"type": "train", "family": "lstm", "name": "\\udfff"}']


@pytest.mark.parametrize("body", LONE_SURROGATES)
def test_a_lone_surrogate_is_422_and_nothing_is_stored(stack, body):
    headers = {"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"}
    before = stack.client().list_jobs(limit=100)["data"]
    r = httpx.post(f"{stack.api_url}/v1/jobs", content=body, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["param"] == "body", r.text
    assert "surrogate" in r.json()["error"]["message"]
    assert stack.client().list_jobs(limit=100)["data"][:1] == before[:1]  # nothing new
    pair = b'{"type": "generate", "model": "nope", "prompts": ["\\ud83d\\ude00"]}'
    emoji = httpx.post(f"{stack.api_url}/v1/jobs", content=pair, headers=headers)
    assert emoji.status_code == 404  # an escaped pair is text: it reaches the model lookup
