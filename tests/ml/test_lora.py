"""LoRA fine-tuning of `lm` models through peft: what trains, what a checkpoint holds, exact
resume, the stored from-config base, merge."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from common.errors import InvalidTrainSpec
from common.ml.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from common.ml.checkpoint import MODEL_FILE, load_model, read_meta
from common.ml.train import TrainHooks, run_training
from common.train_spec import TrainSpec
from tests.ml.conftest import straight_and_resumed

GPT2 = {"arch": "gpt2", "vocab_size": 300, "n_positions": 64, "n_embd": 32, "n_layer": 2,
        "n_head": 2}


def lora_spec(tiny_spec: Callable[..., dict], arch: str, **adapter: object) -> dict:
    spec = tiny_spec("lm", steps=8, grad_accum=2, warmup_steps=2, batch_size=8,
                     checkpoint_every=3, weight_decay=0.1, eval_every=2)
    if arch == "gpt2":
        spec["config"] = dict(GPT2)
    spec["adapter"] = {"r": 4, "alpha": 8, "dropout": 0.1, **adapter}
    return spec


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_model(checkpoint).model.state_dict()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_exact_resume_and_a_small_checkpoint(arch: str, tiny_spec: Callable[..., dict],
                                                  tmp_path: Path) -> None:
    """Stop at step 5 and resume: bitwise the weights of an uninterrupted run; each
    checkpoint holds the adapter (peft's files) and training state, not the base."""
    spec = lora_spec(tiny_spec, arch)
    straight, stopped, resumed = straight_and_resumed(spec, 5, tmp_path)
    assert resumed.step == 8
    a, b = weights(straight.checkpoint), weights(resumed.checkpoint)
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name

    files = {f.name for f in straight.checkpoint.iterdir()}
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG, "config.json", "state.pt"} <= files
    assert MODEL_FILE not in files
    base = tmp_path / "straight" / "base"  # a from-config base is kept once per run
    assert read_meta(straight.checkpoint)["base"] == {"uri": str(base)}
    adapter_bytes = (straight.checkpoint / ADAPTER_WEIGHTS).stat().st_size
    base_bytes = (base / MODEL_FILE).stat().st_size
    assert adapter_bytes < base_bytes * 0.1, (adapter_bytes, base_bytes)
    state_bytes = (straight.checkpoint / "state.pt").stat().st_size
    assert state_bytes < base_bytes * 0.2, (state_bytes, base_bytes)  # Adam moments: adapter's


def test_only_the_adapter_trains(tiny_spec: Callable[..., dict], tmp_path: Path) -> None:
    spec = lora_spec(tiny_spec, "llama", target_modules="all-linear")
    spec.update(steps=3, eval_every=None)
    outcome = run_training(spec, tmp_path, hooks=TrainHooks())
    trained = load_model(outcome.checkpoint).model
    base = load_model(tmp_path / "base").model.state_dict()
    lora = {k: v for k, v in trained.state_dict().items() if "lora_" in k}
    # all-linear: every projection of both layers, A and B each (not the lm head)
    assert len(lora) == 2 * 7 * 2, sorted(lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k), "B moved off 0"
    for name, value in trained.get_base_model().state_dict().items():
        plain = name.replace(".base_layer", "")
        if "lora_" not in name:
            assert torch.equal(value, base[plain]), name


def test_adapter_fields_are_bounded_and_lm_only() -> None:
    def problems(adapter: object, family: str = "lm") -> str:
        with pytest.raises(ValidationError) as e:
            TrainSpec.model_validate({"family": family, "adapter": adapter})
        return str(e.value)

    assert "adapter.r" in problems({"r": 0})
    assert "adapter.alpha" in problems({"alpha": 0})
    assert "adapter.dropout" in problems({"dropout": 1.0})
    assert "adapter.method" in problems({"method": "ia3"})
    assert "adapter.target_modules" in problems({"target_modules": "q_proj"})
    assert "adapter.target_modules" in problems({"target_modules": []})
    assert "adapter: only the diffusion and lm families" in problems({}, family="lstm")
    spec = TrainSpec.model_validate({"family": "gpt", "adapter": {"target_modules": "all-linear"}})
    assert spec.adapter is not None and spec.adapter.r == 8


def test_target_modules_matching_nothing_fail_the_spec(tiny_spec: Callable[..., dict],
                                                       tmp_path: Path) -> None:
    spec = lora_spec(tiny_spec, "llama", target_modules=["no_such_proj"])
    with pytest.raises(InvalidTrainSpec, match=r"^adapter\.target_modules:"):
        run_training(spec, tmp_path, hooks=TrainHooks())


def test_merge_writes_full_weights_that_generate_alike(tiny_spec: Callable[..., dict],
                                                       tmp_path: Path) -> None:
    spec = lora_spec(tiny_spec, "gpt2", merge=True)
    spec.update(steps=4, eval_every=None, lr=3e-2)
    outcome = run_training(spec, tmp_path, hooks=TrainHooks())
    assert outcome.merged is not None
    assert (outcome.merged / MODEL_FILE).is_file() and "adapter" not in read_meta(outcome.merged)
    adapted, merged = load_model(outcome.checkpoint).model, load_model(outcome.merged).model
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=x).logits, merged(input_ids=x).logits,
                                   rtol=1e-4, atol=1e-5)


def test_a_bf16_base_with_gradient_checkpointing_resumes_exactly(
        tiny_spec: Callable[..., dict], tmp_path: Path) -> None:
    """A frozen base cast to bf16 (as on a GPU) keeps the adapter fp32, trains close to an
    fp32 run, and with gradient checkpointing still resumes bit-for-bit."""
    spec = {**lora_spec(tiny_spec, "llama"), "gradient_checkpointing": True}
    spec.update(steps=6, eval_every=None)
    bf16 = {"base_dtype": torch.bfloat16}
    straight, _, resumed = straight_and_resumed(spec, 3, tmp_path, **bf16)
    fp32 = run_training({**spec, "gradient_checkpointing": False}, tmp_path / "fp32",
                        hooks=TrainHooks())
    assert abs(straight.metrics["loss"] - fp32.metrics["loss"]) < 0.05, (straight.metrics,
                                                                       fp32.metrics)
    from safetensors.torch import load_file

    a = load_file(straight.checkpoint / ADAPTER_WEIGHTS)
    b = load_file(resumed.checkpoint / ADAPTER_WEIGHTS)
    assert a.keys() == b.keys() and all(v.dtype == torch.float32 for v in a.values())
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_gradient_checkpointing_is_lm_only() -> None:
    with pytest.raises(ValidationError, match="gradient_checkpointing: lm only"):
        TrainSpec.model_validate({"family": "lstm", "gradient_checkpointing": True})
