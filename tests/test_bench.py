"""The benchmark code itself: the GPU section at a tiny size on CPU (so a lent GPU's minutes
are not spent finding its bugs) and RESULTS.md's sections. No timing is asserted."""

from __future__ import annotations

import contextlib
import os

import openai
import pytest

from bench import harness
from bench.gpu import GpuSizes, bench_gpu, peak_flops, train_flops_per_token
from bench.harness import Figure, Report, write_results
from bench.training import TrainRun

TINY = {"vocab_size": 300, "n_positions": 64, "n_embd": 16, "n_layer": 1, "n_head": 2}


@pytest.fixture
def stack_settings(stack, monkeypatch):  # type: ignore[no-untyped-def]
    """This process reads the stack's database, as the bench reads its own stack's."""
    from common.config import get_settings

    monkeypatch.setenv("GENQ_DATABASE_URL", stack.env["GENQ_DATABASE_URL"])
    get_settings.cache_clear()
    yield stack
    monkeypatch.undo()
    get_settings.cache_clear()


def test_gpu_section_runs_end_to_end_at_a_tiny_size_on_cpu(stack_settings):
    stack = stack_settings
    sdk = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key=stack.api_key, max_retries=0)
    sizes = GpuSizes(
        train=TrainRun(config=TINY, steps=30, batch=4, seq=16, precision="bf16", device="cpu",
                       queue="cpu"),
        train_rounds=1, gen_requests=12, gen_tokens=3, gen_rounds=1, b1_requests=2)
    report = Report("gpu")
    bench_gpu(report, stack.client(), sdk, sizes)
    names = [f.name for f in report.figures]
    assert [n.split(" (")[0] for n in names] == [
        "GPU training steps/s through the queue",
        "GPU training model FLOPs utilisation, through the queue",
        "GPU training model FLOPs utilisation, bare loop",
        "GPU bulk generation through the Batch API",
        "GPU generated tokens/s through the queue vs a B=1 loop",
    ], names
    assert all(f.value > 0 for f in report.figures)
    train, _, _, gen, gain = report.figures
    assert train.rounds and len(train.rounds) == 1 and train.ratio and train.ratio > 0
    assert gen.rounds and gen.ratio and gen.ratio > 0 and gain.baseline and gain.baseline > 0
    assert "no peak known" in report.figures[1].note  # a CPU has no entry in the table
    assert "|" in report.text("test")


def test_scale_section_runs_end_to_end_at_a_tiny_size(stack_settings, monkeypatch):
    """The million-line bench with 40 and 120 lines: every custom_id checked, RSS sampled, a
    memory ratio read against its ceiling."""
    from bench import scale

    stack = stack_settings
    monkeypatch.setattr(scale, "N_SMALL", 40)
    monkeypatch.setattr(scale, "N_BIG", 120)
    monkeypatch.setattr(scale, "N_WARMUP", 10)
    sdk = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key=stack.api_key, max_retries=0)
    report = Report("scale")
    scale.bench_scale(report, stack.client(), sdk, "SQLite",
                      pids=(stack.procs["api"].pid, stack.procs["w1"].pid))
    names = [f.name for f in report.figures]
    assert names[:3] == ["SQLite: 120-line batch vs 40 lines, throughput",
                         "SQLite: 120-line batch vs 40 lines, API peak RSS",
                         "SQLite: 120-line batch vs 40 lines, worker peak RSS"], names
    assert all(f.value > 0 and f.baseline for f in report.figures[:3])
    assert len(names) == 3
    memory = report.figures[1]
    assert memory.at_most and "≤ 1.5" in memory.row()
    assert memory.row().split("|")[6].strip() == ("yes" if memory.ratio <= 1.5 else "**no**")


def test_mfu_arithmetic():
    assert peak_flops("NVIDIA H200") == peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("cpu") is None
    config = {"n_layer": 12, "n_embd": 768}
    assert train_flops_per_token(124_000_000, config, 1024) == 6 * 124e6 + 12 * 12 * 768 * 1024


def test_results_keep_the_section_a_run_did_not_measure(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path / "RESULTS.md")
    cpu = Report("cpu", [Figure("cpu figure one", 1.0, "x")])
    write_results([cpu], "make bench")
    text = harness.RESULTS.read_text()
    assert "cpu figure one" in text and harness.NO_GPU in text
    gpu = Report("gpu", [Figure("gpu figure", 2.0, "y")])
    write_results([gpu], "python -m bench --only gpu")
    text = harness.RESULTS.read_text()
    assert "cpu figure one" in text and "gpu figure" in text and harness.NO_GPU not in text
    write_results([Report("cpu", [Figure("cpu figure two", 1.0, "x")])], "make bench")
    text = harness.RESULTS.read_text()
    assert "cpu figure one" not in text and "cpu figure two" in text and "gpu figure" in text


def test_lora_training_bench_runs_at_a_tiny_size(stack_settings):
    """The LoRA figure: the same peft model trained through the queue and in a bare loop."""
    from bench.training import bench_lora_training

    run = TrainRun(config=TINY, steps=30, batch=4, seq=16,
                   adapter={"r": 2, "alpha": 4, "target_modules": ["c_attn"]})
    report = Report("cpu")
    bench_lora_training(report, stack_settings.client(), run, rounds=1)
    (figure,) = report.figures
    assert figure.name.startswith("LoRA training steps/s through the queue")
    assert figure.value > 0 and figure.baseline and figure.baseline > 0 and figure.ratio


def test_image_quality_bench_runs_at_a_tiny_size(stack_settings):
    """The quality figures: each family trained, asked for each digit, and classified."""
    from bench.image_quality import QualitySizes, bench_image_quality, digit_classifier

    tiny = {"steps": 2, "batch_size": 8}
    sizes = QualitySizes(per_digit=1, labelled={
        "vae": {"config": {"conditional": True, "hidden": 16, "latent": 2}, **tiny}},
        diffusion={"config": {"block_channels": [8, 16], "norm_groups": 4,
                              "attention_head_dim": 4, "text_width": 8, "sample_steps": 2},
                   **tiny}, timeout_s=300, grid=None)
    report = Report("quality")
    bench_image_quality(report, stack_settings.client(), sizes)
    assert [f.name.split(" digits")[0] for f in report.figures] == ["diffusion", "vae"]
    _, real = digit_classifier()
    for figure in report.figures:
        assert 0 <= figure.value <= 1 and figure.baseline == real > 0.9
        assert "(10 images" in figure.name and figure.target_on_value
        assert "| value ≥ 0.8 |" in figure.row()


@pytest.mark.timeout(600)
def test_a_sigterm_stops_the_benchmark_and_its_stack(tmp_path):
    """`make bench` stopped as a CI runner or `timeout` stops it leaves no Redis, API or
    worker behind (they run in sessions of their own, so nothing else would stop them)."""
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT, wait_for
    from tests.test_cli import alive, descendants, up_env

    proc = subprocess.Popen([sys.executable, "-m", "bench", "--only", "quality"], cwd=ROOT,
                            env=up_env(), stdout=open(tmp_path / "bench.log", "w"),
                            stderr=subprocess.STDOUT)
    children: set[int] = set()
    try:
        def stack_up() -> bool:
            assert proc.poll() is None, (tmp_path / "bench.log").read_text()
            children.update(descendants(proc.pid))
            return len(children) >= 3  # redis, the API, the worker (and its pool child)

        wait_for(stack_up, timeout=120, interval=0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(300)  # workers checkpoint first: minutes on a loaded machine
    finally:
        if proc.poll() is None:
            proc.kill()
        # whatever happened, nothing of it may outlive the test and load the rest of the
        # suite (a leftover worker once trained beside it for 20 minutes)
        for pid in children | descendants(proc.pid):
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    output = (tmp_path / "bench.log").read_text()
    assert code == 130, output
    assert "Traceback" not in output and "nothing written" in output
    wait_for(lambda: not any(alive(pid) for pid in children), timeout=10)
