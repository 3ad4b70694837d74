"""Where a causal LM's or a diffusion pipeline's starting weights come from: a folder under
GENQ_PRETRAINED_ROOT or a Hugging Face hub id, resolved on the worker into its own cache (no
torch here: the API checks the syntax at submit).

huggingface_hub reads its own settings on the worker: HF_HOME / HF_HUB_CACHE (the cache),
HF_HUB_OFFLINE=1 (the cache only) and HF_TOKEN (gated and private models). genq never reads
the token; it only scrubs it from the error messages it records.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from common.errors import ModelNotFound, RetryableError

# What a causal LM needs: configs, safetensors weights, tokenizer files, chat templates.
# Pickled weights (*.bin) are never fetched: weights load from safetensors only.
WEIGHTS_AND_TOKENIZER = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken",
                         "*.jinja"]
# What a Stable Diffusion pipeline needs: its index and the five folders the diffusion family
# loads, configs and safetensors. Not the fp16 and non-EMA variants beside each weights
# file, nor the single-file checkpoints at the root (each a copy of the whole pipeline).
PIPELINE_FILES = ["model_index.json",
                  *(f"{part}/*.{ext}" for part in ("unet", "vae", "text_encoder")
                    for ext in ("json", "safetensors")),
                  "tokenizer/*.json", "tokenizer/*.txt", "scheduler/*.json"]
PIPELINE_VARIANTS = ["*.fp16.*", "*non_ema*"]
# A tokenizer alone (the diffusion family's config.tokenizer): never the model's weights
TOKENIZER_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
COMMIT = re.compile(r"^[0-9a-f]{40}$")


class ModelSource(BaseModel):
    """Where a model's starting weights came from (none: trained from a config)."""

    hub_id: str | None = None  # org/name on the Hugging Face hub
    revision: str | None = None  # as asked: a branch, tag or commit (None: main)
    commit: str | None = None  # the commit the revision resolved to, on the worker
    local_dir: str | None = None  # a folder under GENQ_PRETRAINED_ROOT


def source_of(pretrained: str | None, revision: str | None,
              commit: str | None) -> ModelSource | None:
    """Where a config's `pretrained` comes from: a local folder (an absolute path, already
    confined to GENQ_PRETRAINED_ROOT) or a hub id at its revision and resolved commit; None
    for a model built from a config."""
    if pretrained is None:
        return None
    if Path(pretrained).is_absolute():
        return ModelSource(local_dir=pretrained)
    return ModelSource(hub_id=pretrained, revision=revision, commit=commit)


def check_local_or_hub(value: str, *, holds: str | None, what: str) -> None:
    """At submit: `value` (a config's source field, a folder already confined to
    GENQ_PRETRAINED_ROOT) is a hub id, or a folder holding the file `holds` (None: any
    folder); else ValueError saying which `what` it must be."""
    if not Path(value).is_absolute():
        if not is_hub_id(value):
            raise ValueError(f"{value!r} is neither a folder inside GENQ_PRETRAINED_ROOT "
                             "nor a hub id org/name")
    elif holds is None and not Path(value).is_dir():
        raise ValueError(f"must be a directory holding {what}")
    elif holds is not None and not (Path(value) / holds).is_file():
        raise ValueError(f"must be {what} ({holds} not found)")


def is_hub_id(value: str) -> bool:
    """Whether `value` is a hub model id `org/name` (huggingface_hub's own syntax check)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if value.count("/") != 1 or value.startswith(("/", ".")):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


@dataclass(frozen=True)
class Resolved:
    path: Path  # a local folder holding config.json, weights and tokenizer
    commit: str | None  # the hub commit; None for a local folder


def resolve(pretrained: str, revision: str | None = None, *,
            allow: list[str] = WEIGHTS_AND_TOKENIZER, ignore: list[str] | None = None) -> Resolved:
    """A local folder as it is; a hub id fetched into (or, offline, found in) the HF cache:
    the files matching `allow` and not `ignore` (a causal LM's by default).

    An id or revision the hub (or the offline cache) does not have raises ModelNotFound,
    which fails the job at once; an unreachable hub while online is RetryableError.
    """
    if Path(pretrained).is_absolute():
        return Resolved(Path(pretrained), None)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{pretrained}@{revision}" if revision else pretrained
    try:
        path = Path(snapshot_download(pretrained, revision=revision, allow_patterns=allow,
                                      ignore_patterns=ignore))
    except GatedRepoError as e:
        raise ModelNotFound(f"config.pretrained: {where} is gated and the worker's HF_TOKEN "
                            f"has no access ({_scrub(e)})", param="config.pretrained") from None
    except RevisionNotFoundError:
        raise ModelNotFound(f"config.revision: {pretrained} has no revision {revision!r}",
                            param="config.revision") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"config.pretrained: no model {pretrained!r} on the hub (or it is "
                            f"private and the worker's HF_TOKEN cannot read it)",
                            param="config.pretrained") from None
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise ModelNotFound(f"config.pretrained: {where} is not in this worker's Hugging Face "
                                f"cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set",
                                param="config.pretrained") from None
        raise RetryableError(f"the hub is unreachable and {where} is not cached: "
                             f"{_scrub(e)}") from None
    # The cache's layout is snapshots/<commit>: the folder name is the commit it resolved to.
    return Resolved(path, path.name if COMMIT.match(path.name) else None)


def _scrub(exc: BaseException) -> str:
    """The error's message without the worker's token (it never reaches SQL or logs)."""
    from huggingface_hub import get_token

    message, token = str(exc), get_token()
    return message.replace(token, "***") if token else message
