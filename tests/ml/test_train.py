"""The training loop: learning, exact resume, checkpoints on disk, NaN handling, artifacts."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.config import get_settings
from common.errors import (
    Cancelled,
    InvalidTrainSpec,
    NanLoss,
    ShutdownRequested,
    StopForTimeout,
)
from common.ml.checkpoint import load_model, load_train_state
from common.ml.families import get_family
from common.ml.train import TrainHooks, on_helper_thread, run_training
from common.retention import checkpoint_dirname
from common.train_spec import TrainSpec
from tests.ml.conftest import straight_and_resumed


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.parametrize("family", ["vae", "lstm", "gpt"])
def test_loss_falls(family: str, tiny_spec: Callable[..., dict], tmp_path: Path) -> None:
    losses: list[float] = []
    hooks = TrainHooks(on_metrics=lambda step, m: losses.append(m["loss"]))
    outcome = run_training(tiny_spec(family, steps=40, log_every=1), tmp_path,
                           hooks=hooks)
    assert outcome.stopped is None and outcome.step == 40
    assert len(losses) == 40
    assert _mean(losses[-5:]) < _mean(losses[:5]) * 0.9


def test_gan_learns_the_data_mean(tiny_spec: Callable[..., dict], tmp_path: Path) -> None:
    """GAN losses do not fall monotonically; its samples must move toward the data instead."""
    from sklearn.datasets import load_digits

    real_mean = torch.tensor(load_digits().images, dtype=torch.float32).mean(0) / 16
    seen: list[dict[str, float]] = []
    hooks = TrainHooks(on_metrics=lambda step, m: seen.append(m))
    gan = get_family("gan")

    def distance(checkpoint: Path) -> float:
        model = load_model(checkpoint).model
        torch.manual_seed(0)
        fake = gan.sample_images(model, 256, torch.arange(256) % 10)
        return float((fake.mean(0)[0] - real_mean).abs().mean())

    spec = tiny_spec("gan", steps=60, log_every=10, checkpoint_every=1)
    outcome = run_training(spec, tmp_path, hooks=hooks)
    start = run_training({**spec, "steps": 1}, tmp_path / "init", hooks=TrainHooks())
    assert distance(outcome.checkpoint) < distance(start.checkpoint) * 0.7
    assert {"d_loss", "g_loss", "d_real", "d_fake", "grad_norm", "lr"} <= seen[-1].keys()


@pytest.mark.parametrize("family", ["vae", "gan", "diffusion", "lstm", "gpt", "lm"])
def test_exact_resume(family: str, tiny_spec: Callable[..., dict], tmp_path: Path) -> None:
    """Stopping at step k and resuming gives bitwise the weights of an uninterrupted run
    (with held-out evaluation on, which must not disturb the training RNG)."""
    dropout = {"lstm": {"dropout": 0.2, "n_layer": 2}, "gpt": {"dropout": 0.1}}.get(family, {})
    spec = tiny_spec(family, steps=8, grad_accum=2, warmup_steps=2, batch_size=8,
                     checkpoint_every=3, weight_decay=0.1, eval_every=2)
    spec["config"].update(dropout)
    straight, stopped, resumed = straight_and_resumed(spec, 5, tmp_path)
    assert stopped.artifacts == []
    assert load_train_state(stopped.checkpoint)["step"] == 5
    assert resumed.stopped is None and resumed.step == 8

    a = load_model(straight.checkpoint).model.state_dict()
    b = load_model(resumed.checkpoint).model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_checkpoints_kept_and_reported(tiny_spec: Callable[..., dict], tmp_path: Path) -> None:
    reported: list[tuple[int, Path, bool]] = []
    hooks = TrainHooks(on_checkpoint=lambda step, path, m: reported.append(
        (step, path, (path / "model.safetensors").is_file() and "loss" in m)))
    outcome = run_training(tiny_spec("vae", steps=10, checkpoint_every=2,
                                     keep_last=2), tmp_path, hooks=hooks)
    assert [r[0] for r in reported] == [2, 4, 6, 8, 10]
    assert all(r[2] for r in reported)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert {checkpoint_dirname(8), checkpoint_dirname(10)} <= set(kept) and len(kept) <= 3
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert outcome.checkpoint == tmp_path / "checkpoints" / checkpoint_dirname(10)
    state = load_train_state(outcome.checkpoint)
    assert {"optimizers", "schedulers", "rng", "step", "data_position"} <= state.keys()
    kinds = {a.kind: a for a in outcome.artifacts}
    assert set(kinds) == {"loss_plot", "image_grid"}
    for artifact in kinds.values():
        assert artifact.content_type == "image/png"
        with Image.open(artifact.path) as im:
            assert im.format == "PNG" and min(im.size) >= 64


def test_epochs_convert_to_steps(tiny_spec: Callable[..., dict], tmp_path: Path) -> None:
    spec = tiny_spec("vae", epochs=1, batch_size=256)
    del spec["steps"]
    outcome = run_training(spec, tmp_path, hooks=TrainHooks())
    assert outcome.step == 1797 // 256


def test_nan_loss_raises_with_step_and_keeps_last_checkpoint(tiny_spec: Callable[..., dict],
                                                             tmp_path: Path) -> None:
    spec = tiny_spec("vae", steps=40, batch_size=8, lr=10, optimizer="sgd", clip=None,
                     checkpoint_every=1)  # diverges within the API's lr bound
    with pytest.raises(NanLoss) as info:
        run_training(spec, tmp_path, hooks=TrainHooks())
    step = info.value.step
    assert step >= 2 and f"at step {step}" in str(info.value)
    last = tmp_path / "checkpoints" / checkpoint_dirname(step - 1)
    assert load_model(last).model is not None


def _no_build(*args: object, **kwargs: object) -> None:
    raise AssertionError("the model was built after the stop")


@pytest.mark.parametrize(("reason", "stop"), [
    ("cancel", Cancelled), ("shutdown", ShutdownRequested), ("timeout", StopForTimeout)])
def test_a_stop_while_building_ends_the_run_before_the_model_is_built(
        reason: str, stop: type[Exception], tiny_spec: Callable[..., dict], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 26: a cancel asked while the job loads its data or builds its model lands
    before the next phase, and no half checkpoint is written."""
    spec = TrainSpec.model_validate(tiny_spec("lstm"))  # validating builds on the meta device
    monkeypatch.setattr(type(get_family("lstm")), "build_model", _no_build)
    with pytest.raises(stop) as info:
        run_training(spec, tmp_path, hooks=TrainHooks(should_stop=lambda: reason))
    assert info.value.args[0] == {"step": 0}
    assert not (tmp_path / "checkpoints").exists()

    asked = []  # the stop lands after the data, before the model: prepare ran, build did not

    def after_the_data() -> str | None:
        asked.append(1)
        return reason if len(asked) > 1 else None

    with pytest.raises(stop):
        run_training(spec, tmp_path, hooks=TrainHooks(should_stop=after_the_data))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(("raised", "becomes"), [
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), InvalidTrainSpec),
    (IndexError("index out of range in self"), InvalidTrainSpec),
    (KeyError("n_head"), InvalidTrainSpec),
    (OSError("storage timed out"), OSError),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB"),
     torch.OutOfMemoryError),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory"), RuntimeError),
])
def test_an_error_building_the_users_model_is_the_specs(
        raised: Exception, becomes: type[Exception], tiny_spec: Callable[..., dict],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 26: what torch raises on a config it cannot build is InvalidTrainSpec (the
    worker's invalid_spec, never retried); the machine's own failures keep their type, so
    the worker still retries them."""
    def build(*args: object, **kwargs: object) -> None:
        raise raised

    spec = TrainSpec.model_validate(tiny_spec("lstm"))  # validating builds on the meta device
    monkeypatch.setattr(type(get_family("lstm")), "build_model", build)
    with pytest.raises(becomes) as info:
        run_training(spec, tmp_path, hooks=TrainHooks())
    assert type(info.value) is becomes
    if becomes is InvalidTrainSpec:
        assert str(info.value).startswith(f"config: {type(raised).__name__}: ")


def test_an_unreadable_image_is_the_specs(tiny_spec: Callable[..., dict], tmp_path: Path) -> None:
    """A PNG whose header reads but whose pixels do not is a DataError naming it (in the
    worker: invalid_spec), not PIL's OSError (which the worker would retry)."""
    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.new("L", (8, 8), 3).save(folder / "a.png")
    good = (folder / "a.png").read_bytes()
    (folder / "b.png").write_bytes(good[:len(good) // 2])  # the header, half the pixels
    with pytest.raises(InvalidTrainSpec, match="b.png is not a readable PNG"):
        run_training(tiny_spec("vae", data={"path": str(folder)}), tmp_path / "run",
                     hooks=TrainHooks())


def test_invalid_spec_lists_problems(tiny_spec: Callable[..., dict], tmp_path: Path) -> None:
    spec = tiny_spec("gpt", seq_len=500)
    with pytest.raises(InvalidTrainSpec, match="seq_len"):
        run_training(spec, tmp_path, hooks=TrainHooks())
    bad = tiny_spec("gpt")
    bad["config"] = {"n_layer": 0, "bogus": 1}
    with pytest.raises(InvalidTrainSpec) as info:
        run_training(bad, tmp_path, hooks=TrainHooks())
    assert "config.n_layer" in str(info.value) and "config.bogus" in str(info.value)
    with pytest.raises(InvalidTrainSpec, match="data.builtin"):
        run_training({**bad, "config": {}, "data": {"builtin": "digits"}}, tmp_path,
                     hooks=TrainHooks())


def test_null_clip_means_no_clipping(tiny_spec: Callable[..., dict], tmp_path: Path) -> None:
    norms: list[float] = []
    spec = tiny_spec("vae", steps=3, clip=None, lr=1e-3, data={"builtin": "digits", "path": None})
    run_training(spec, tmp_path, hooks=TrainHooks(
        on_progress=lambda step, total, m: norms.append(m["grad_norm"])))
    assert max(norms) > 1.0  # so clipping at 1.0 would have changed the updates
    clipped = run_training({**spec, "clip": 1.0, "steps": 3}, tmp_path / "c", hooks=TrainHooks())
    a = load_model(clipped.checkpoint).model.state_dict()
    b = load_model(tmp_path / "checkpoints" / checkpoint_dirname(3)).model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def pretrained_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """GENQ_PRETRAINED_ROOT at tmp_path: a spec's pretrained folder must lie inside it."""
    monkeypatch.setenv("GENQ_PRETRAINED_ROOT", str(tmp_path))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_pretrained_gpt_directory(pretrained_root: Path, text_file: Path) -> None:
    """Fine-tune from a local transformers directory (model + tokenizer), then generate."""
    tmp_path = pretrained_root
    from transformers import GPT2Config, GPT2LMHeadModel

    from common.ml.families.lm import train_tokenizer
    from common.ml.generate import GenOutput, GenRequest, generate

    tokenizer = train_tokenizer(text_file.read_text(), 300)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32,
                                       n_layer=1, n_head=2))
    pretrained = tmp_path / "pretrained"
    model.save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)
    spec = {"family": "gpt", "config": {"pretrained": str(pretrained)},
            "data": {"path": str(text_file)}, "steps": 3, "seq_len": 32, "batch_size": 4}
    outcome = run_training(spec, tmp_path / "run", hooks=TrainHooks())
    loaded = load_model(outcome.checkpoint)
    assert getattr(loaded.model.config, "n_layer", None) == 1
    out: list[GenOutput] = []
    generate(loaded, [GenRequest(key="a", prompt="The", max_tokens=4, temperature=0)],
             on_outputs=out.extend)
    assert out[0].texts is not None and len(out[0].texts) == 1


def test_resume_at_the_last_step_keeps_a_finite_loss(tiny_spec: Callable[..., dict],
                                                     tmp_path: Path) -> None:
    """A job re-run after its final checkpoint (a crash before it was recorded) trains no
    step, and its checkpoint's loss is the last one known, not NaN."""
    import json
    import math

    spec = tiny_spec("lstm", steps=6, checkpoint_every=3, log_every=3)
    first = run_training(spec, tmp_path / "a", hooks=TrainHooks())
    again = run_training(spec, tmp_path / "b", hooks=TrainHooks(), resume_from=first.checkpoint)
    assert again.step == 6
    loss = json.loads((again.checkpoint / "metrics.json").read_text())["loss"]
    assert math.isfinite(loss)


@pytest.mark.parametrize("family", ["vae", "gan", "lstm", "gpt"])
def test_eval_every_reports_held_out_loss(family: str, tiny_spec: Callable[..., dict],
                                          tmp_path: Path) -> None:
    seen: list[tuple[int, dict[str, float]]] = []
    hooks = TrainHooks(on_metrics=lambda step, m: seen.append((step, m)))
    outcome = run_training(tiny_spec(family, steps=9, eval_every=3, log_every=100), tmp_path,
                           hooks=hooks)
    evals = [(step, m["eval_loss"]) for step, m in seen if "eval_loss" in m]
    assert [step for step, _ in evals] == [3, 6, 9]
    assert all(math.isfinite(v) and v > 0 for _, v in evals)
    assert outcome.metrics["eval_loss"] == evals[-1][1]
    without = run_training(tiny_spec(family, steps=9, log_every=100), tmp_path / "plain",
                           hooks=TrainHooks())
    assert "eval_loss" not in without.metrics


def test_seed_torch_seeds_like_manual_seed_without_formatting_the_stack(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Training seeds every step: on CPU that must not cost torch's lazy-CUDA stack capture."""
    import traceback

    from common.ml.sampling import seed_torch

    torch.manual_seed(7)
    expected = torch.rand(5)
    captured: list[int] = []
    real = traceback.format_stack
    monkeypatch.setattr(traceback, "format_stack",
                        lambda *a, **k: captured.append(1) or real(*a, **k))
    seed_torch(7, "cpu")
    assert torch.equal(torch.rand(5), expected)
    assert captured == []
    if not torch.cuda.is_initialized():  # the control: torch.manual_seed queues a CUDA seed
        torch.manual_seed(7)
        assert captured


def test_text_is_tokenized_off_the_main_thread(tiny_spec: Callable[..., dict], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The training text's tokenizing churn stays out of the main thread's malloc arena,
    where the model's tensors live (common/ml/train.py, on_helper_thread)."""
    module = get_family("gpt")
    threads: list[str] = []
    encode = module.encode

    def spying_encode(tokenizer: object, text: str) -> list[int]:
        threads.append(threading.current_thread().name)
        return encode(tokenizer, text)

    monkeypatch.setattr(module, "encode", spying_encode)
    run_training(tiny_spec("gpt", steps=2), tmp_path, hooks=TrainHooks())
    assert threads and all(name.startswith("genq-tokenize") for name in threads), threads


def test_helper_thread_returns_and_raises() -> None:
    assert on_helper_thread(sorted, [3, 1, 2]) == [1, 2, 3]
    assert on_helper_thread(threading.current_thread) is not threading.main_thread()
    with pytest.raises(ZeroDivisionError):
        on_helper_thread(lambda: 1 / 0)


def test_training_memory_is_budgeted_at_submit_and_on_the_fitted_config(
        tiny_spec: Callable[..., dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 26: a batch past GENQ_MAX_TRAIN_MEMORY_BYTES is refused naming batch_size or
    seq_len, from the spec's config at submit and, before the model is built, from the
    config fitted to the data (here 32x32 images where the spec's config says 8x8)."""
    import numpy as np

    monkeypatch.setenv("GENQ_MAX_TRAIN_MEMORY_BYTES", "100000")
    get_settings.cache_clear()
    try:
        with pytest.raises(ValueError, match="batch_size: a batch of 64 images would need"):
            TrainSpec.model_validate(tiny_spec("vae", batch_size=64))
        with pytest.raises(ValueError, match=r"seq_len: a batch of 2 sequences of 4096 tokens"):
            TrainSpec.model_validate(tiny_spec("lstm", batch_size=2, seq_len=4096))
        np.savez(tmp_path / "big.npz", images=np.zeros((20, 32, 32), dtype=np.uint8),
                 labels=np.arange(20) % 2)
        spec = TrainSpec.model_validate(tiny_spec("vae", batch_size=16,
                                                  data={"path": str(tmp_path / "big.npz")}))
        monkeypatch.setattr(type(get_family("vae")), "build_model", _no_build)
        with pytest.raises(InvalidTrainSpec, match="^batch_size: a batch of 16 images"):
            run_training(spec, tmp_path / "run", hooks=TrainHooks())
    finally:
        get_settings.cache_clear()
