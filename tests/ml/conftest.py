"""Shared fixtures for the model tests: tiny datasets and once-trained checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from common.ml.train import TrainHooks, TrainOutcome, run_training

# Tiny models gain nothing from a second thread, and lose a lot on a busy 2-core machine.
torch.set_num_threads(1)

IMAGE_FAMILIES = ("vae", "gan")
TEXT_FAMILIES = ("lstm", "gpt")
FAMILIES = IMAGE_FAMILIES + TEXT_FAMILIES

TINY = {
    "vae": {"hidden": 32, "latent": 4, "conditional": True},
    "gan": {"hidden": 32, "latent": 8, "conditional": True},
    "lstm": {"n_embd": 16, "hidden": 32},
    "gpt": {"vocab_size": 300, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2},
    "diffusion": {"block_channels": [8, 16], "norm_groups": 4, "attention_head_dim": 4,
                  "text_width": 16, "max_caption_tokens": 8, "ema_decay": 0.9,
                  "sample_steps": 3},
    "lm": {"arch": "llama", "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64},
}


def stopped_at(spec: dict, step: int, workdir: Path, **kwargs: object) -> TrainOutcome:
    """A run of `spec` told to shut down (as a worker's SIGTERM does) once it reaches `step`."""
    done = {"step": 0}
    hooks = TrainHooks(should_stop=lambda: "shutdown" if done["step"] >= step else None,
                       on_progress=lambda at, total, m: done.update(step=at))
    return run_training(spec, workdir, hooks=hooks, **kwargs)  # type: ignore[arg-type]


def straight_and_resumed(spec: dict, step: int, tmp_path: Path,
                         **kwargs: object) -> tuple[TrainOutcome, TrainOutcome, TrainOutcome]:
    """An uninterrupted run of `spec`, the same run shut down at `step`, and that one resumed
    from its checkpoint: exact resume means the first and the last end on equal weights."""
    straight = run_training(spec, tmp_path / "straight", hooks=TrainHooks(), **kwargs)  # type: ignore[arg-type]
    stopped = stopped_at(spec, step, tmp_path / "first", **kwargs)
    assert stopped.stopped == "shutdown" and stopped.step == step
    resumed = run_training(spec, tmp_path / "second", hooks=TrainHooks(),  # type: ignore[arg-type]
                           resume_from=stopped.checkpoint, **kwargs)
    return straight, stopped, resumed


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 20 kB of the built-in python-docs text: small enough for fast BPE."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("data") / "docs.txt"
    path.write_text("\n\n".join(topics.values())[:20_000])
    return path


def _tiny_spec(text_file: Path, family: str, **overrides: object) -> dict:
    image = family in IMAGE_FAMILIES or family == "diffusion"
    data = {"builtin": "digits"} if image else {"path": str(text_file)}
    spec = {"family": family, "config": dict(TINY[family]), "data": data, "steps": 20,
            "batch_size": 16, "lr": 3e-3, "seq_len": 32, "log_every": 5,
            "checkpoint_every": 1000}
    spec.update(overrides)
    return spec


@pytest.fixture(scope="session")
def tiny_spec(text_file: Path) -> Callable[..., dict]:
    """tiny_spec(family, **overrides): a training spec that runs in about a second."""
    return lambda family, **overrides: _tiny_spec(text_file, family, **overrides)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> dict[str, TrainOutcome]:
    """Each family trained for a few steps once per session (for generation/checkpoint tests)."""
    out = {}
    for family in FAMILIES:
        workdir = tmp_path_factory.mktemp(f"trained-{family}")
        out[family] = run_training(_tiny_spec(text_file, family, steps=10), workdir,
                                   hooks=TrainHooks())
    return out


@pytest.fixture
def npz_digits(tmp_path: Path) -> Path:
    """A small labelled .npz image file in [0, 255]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    path = tmp_path / "digits.npz"
    np.savez(path, images=(d.images[:64] * 16).astype(np.uint8), labels=d.target[:64])
    return path
