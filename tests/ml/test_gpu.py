"""CUDA paths: a bf16 training run and generation on the GPU (skipped without CUDA)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from common.ml.checkpoint import load_model
from common.ml.generate import GenOutput, GenRequest, generate
from common.ml.train import TrainHooks, run_training

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("family", ["gpt", "lm", "vae"])
def test_bf16_training_and_generation_on_cuda(family: str, tiny_spec: Callable[..., dict],
                                              tmp_path: Path) -> None:
    outcome = run_training(tiny_spec(family, steps=6, precision="bf16"), tmp_path,
                           hooks=TrainHooks(), device="cuda")
    assert outcome.stopped is None and outcome.metrics["loss"] == outcome.metrics["loss"]
    loaded = load_model(outcome.checkpoint, device="cuda")
    assert next(loaded.model.parameters()).is_cuda
    outputs: list[GenOutput] = []
    generate(loaded, [GenRequest(key="a", prompt="x", max_tokens=5, seed=1, n=2),
                      GenRequest(key="b", prompt="yy", max_tokens=5, temperature=0)],
             on_outputs=outputs.extend)
    assert {o.key for o in outputs} == {"a", "b"}
