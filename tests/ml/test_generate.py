"""Batched generation: output types, seeded reproducibility, beams, batching, early stop."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

from common.ml.checkpoint import LoadedModel, load_model
from common.ml.generate import GenOutput, GenRequest, generate
from common.ml.train import TrainOutcome


def _run(loaded: LoadedModel, requests: list[GenRequest], **kwargs: Any) -> dict[str, GenOutput]:
    batches: list[list[GenOutput]] = []
    generate(loaded, requests, on_outputs=batches.append, **kwargs)
    return {o.key: o for batch in batches for o in batch}


def _texts(o: GenOutput) -> list[str]:
    assert o.texts is not None and o.images is None
    return o.texts


def _pngs(o: GenOutput) -> list[bytes]:
    assert o.images is not None and o.texts is None
    return o.images


@pytest.fixture(scope="module")
def models(trained: dict[str, TrainOutcome]) -> dict[str, LoadedModel]:
    return {family: load_model(outcome.checkpoint) for family, outcome in trained.items()}


@pytest.mark.parametrize("family", ["lstm", "gpt"])
def test_text_outputs(models: dict[str, LoadedModel], family: str) -> None:
    requests = [GenRequest(key="greedy", prompt="The ", max_tokens=8, temperature=0),
                GenRequest(key="sampled", prompt="def f(x):", max_tokens=6, n=3, top_k=5,
                           top_p=0.9),
                GenRequest(key="empty", prompt="", max_tokens=4)]
    out = _run(models[family], requests)
    assert set(out) == {"greedy", "sampled", "empty"}
    for r in requests:
        o = out[r.key]
        assert len(_texts(o)) == r.n and len(o.finish_reasons) == r.n
        assert all(isinstance(t, str) for t in _texts(o))
        assert set(o.finish_reasons) <= {"stop", "length"}
        assert 0 < o.tokens_out <= r.n * r.max_tokens
    assert out["greedy"].tokens_in > 0 and out["empty"].tokens_in == 0
    assert not _texts(out["greedy"])[0].startswith("The ")
    with pytest.raises(ValidationError, match="max_tokens"):  # the API's bound, here too
        GenRequest(key="z", prompt="a", max_tokens=0, n=2)


@pytest.mark.parametrize("family", ["vae", "gan"])
def test_image_outputs(models: dict[str, LoadedModel], family: str) -> None:
    out = _run(models[family], [GenRequest(key="three", label=3, n=2), GenRequest(key="any")])
    assert len(_pngs(out["three"])) == 2 and len(_pngs(out["any"])) == 1
    for png in _pngs(out["three"]) + _pngs(out["any"]):
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and min(im.size) >= 64
    assert out["any"].texts is None and out["any"].finish_reasons == ["stop"]


@pytest.mark.parametrize("family", ["vae", "gan", "lstm", "gpt"])
def test_seeded_requests_reproducible_across_batches(models: dict[str, LoadedModel],
                                                     family: str) -> None:
    loaded = models[family]
    target = GenRequest(key="t", prompt="x = ", max_tokens=10, seed=1234, n=2, label=None)
    alone = _run(loaded, [target])["t"]
    crowd = [GenRequest(key=f"n{i}", prompt="import " * i, max_tokens=10) for i in range(4)]
    together = _run(loaded, [*crowd[:2], target, *crowd[2:]], max_batch=3)["t"]
    assert (alone.texts, alone.images) == (together.texts, together.images)
    other = _run(loaded, [GenRequest(key="o", prompt="x = ", max_tokens=10, seed=99, n=2)])["o"]
    assert (other.texts, other.images) != (alone.texts, alone.images)


def test_identical_seeded_requests_share_one_result(models: dict[str, LoadedModel]) -> None:
    calls: list[int] = []
    requests = [GenRequest(key=k, prompt="a", max_tokens=5, seed=7) for k in ("a", "b", "c")]
    batches: list[list[GenOutput]] = []

    def record(outputs: list[GenOutput]) -> None:
        batches.append(outputs)
        calls.append(1)

    generate(models["gpt"], requests, on_outputs=record)
    outs = {o.key: o for batch in batches for o in batch}
    assert len(calls) == 1 and set(outs) == {"a", "b", "c"}
    assert outs["a"].texts == outs["b"].texts == outs["c"].texts


def test_gpt_beams_and_batching(models: dict[str, LoadedModel]) -> None:
    loaded = models["gpt"]
    beams = [GenRequest(key=f"b{i}", prompt="class " + "A" * i, max_tokens=6, num_beams=3, n=2)
             for i in range(3)]
    out = _run(loaded, beams)
    assert all(len(_texts(out[r.key])) == 2 for r in beams)
    batches: list[list[GenOutput]] = []
    greedy = [GenRequest(key=f"g{i}", prompt="x" * (i + 1), max_tokens=4, temperature=0)
              for i in range(6)]
    generate(loaded, greedy, on_outputs=batches.append, token_budget=20)
    assert len(batches) > 1 and sum(len(b) for b in batches) == 6
    single = _run(loaded, [greedy[0]])["g0"]
    batched = {o.key: o for b in batches for o in b}["g0"]
    assert single.texts == batched.texts


def test_should_stop_between_batches(models: dict[str, LoadedModel]) -> None:
    batches: list[list[GenOutput]] = []
    requests = [GenRequest(key=f"r{i}", prompt="p", max_tokens=3, seed=i) for i in range(5)]
    generate(models["lstm"], requests, on_outputs=batches.append,
             should_stop=lambda: len(batches) >= 2)
    assert len(batches) == 2


def test_bad_label_is_rejected(models: dict[str, LoadedModel]) -> None:
    with pytest.raises(ValueError, match=r"requests\[x\]\.label"):
        generate(models["vae"], [GenRequest(key="x", label=42)], on_outputs=lambda o: None)


def test_prompt_ids_from_the_api_match_the_workers_encoding(
        models: dict[str, LoadedModel], trained: dict[str, TrainOutcome]) -> None:
    """Batches are tokenized in the API (tokenizers only); the worker reuses those ids, so they
    must be what the family's own encode gives, and generation from them the same."""
    from common.ml.families import get_family
    from common.ml.prompt_ids import encode_prompts, load_prompt_tokenizer
    from common.storage import Storage

    loaded = models["gpt"]
    checkpoint = trained["gpt"].checkpoint
    storage = Storage(str(checkpoint.parent))
    tokenizer = load_prompt_tokenizer(storage, storage.uri(checkpoint.name))
    assert tokenizer is not None
    prompts = ["The ", "", "def f(x):\n    return x  # é, 漢字, 🙂", "  two  spaces ",
               "text<|endoftext|>more", "\t\n", "x" * 300]
    encode = get_family("gpt").encode
    assert encode_prompts(tokenizer, prompts) == [encode(loaded.tokenizer, p) for p in prompts]

    plain = [GenRequest(key=str(i), prompt=p, max_tokens=5, temperature=0)
             for i, p in enumerate(prompts[:5])]
    with_ids = [GenRequest(key=r.key, prompt=r.prompt, max_tokens=5, temperature=0, prompt_ids=ids)
                for r, ids in zip(plain, encode_prompts(tokenizer, prompts[:5]), strict=True)]
    a, b = _run(loaded, plain), _run(loaded, with_ids)
    assert {k: (_texts(o), o.tokens_in) for k, o in a.items()} == \
        {k: (_texts(o), o.tokens_in) for k, o in b.items()}

    lstm = trained["lstm"].checkpoint  # character-level: no tokenizer.json, so none to use
    lstm_storage = Storage(str(lstm.parent))
    assert load_prompt_tokenizer(lstm_storage, lstm_storage.uri(lstm.name)) is None


def test_api_predicts_the_batches_generate_packs(models: dict[str, LoadedModel]) -> None:
    """The API cuts shards where generate() will end a batch (common/ml/packing.py): its
    prediction from token ids alone must match the batches generate() reports."""
    from common.ml.packing import batch_starts, unit_cost

    loaded = models["gpt"]
    tokenizer = loaded.tokenizer
    prompts = [("def f(x): return x" * (1 + i % 5))[: 5 + 7 * (i % 9)] for i in range(50)]
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    requests = sorted((GenRequest(key=str(i), prompt=p, prompt_ids=t, max_tokens=3, temperature=0)
                       for i, (p, t) in enumerate(zip(prompts, ids, strict=True))),
                      key=lambda r: len(r.prompt_ids or []))
    for budget, max_batch in [(60, 64), (400, 8), (10_000, 64)]:
        batches: list[list[GenOutput]] = []
        generate(loaded, requests, token_budget=budget, max_batch=max_batch,
                 on_outputs=batches.append)
        sizes = [len(b) for b in batches]
        starts = batch_starts([(unit_cost(1, len(r.prompt_ids or []), 3), 1) for r in requests],
                              token_budget=budget, max_batch=max_batch)
        ends = [*starts[1:], len(requests)]
        assert [end - start for start, end in zip(starts, ends, strict=True)] == sizes
        assert len(sizes) > 1 or budget == 10_000, sizes  # the budget or max_batch binds


def test_shards_end_at_batch_starts() -> None:
    from common.ml.packing import spans_at_batch_starts

    every_64 = list(range(0, 10_000, 64))
    spans = spans_at_batch_starts(10_000, 1000, every_64)
    assert spans[0] == (0, 1024)
    assert all(end == begin for (_, end), (begin, _) in zip(spans, spans[1:], strict=False))
    assert spans[-1][1] == 10_000 and all(end % 64 == 0 for _, end in spans[:-1])
    # far from any batch start (or none known): plain cuts of the size
    assert spans_at_batch_starts(10, 4, every_64) == [(0, 4), (4, 8), (8, 10)]
    assert spans_at_batch_starts(10, 4, []) == [(0, 4), (4, 8), (8, 10)]
    assert spans_at_batch_starts(3, 4, every_64) == [(0, 3)]


@pytest.mark.parametrize("family", ["lstm", "gpt"])
def test_text_models_generate_with_bf16_weights(trained: dict[str, TrainOutcome],
                                                family: str) -> None:
    """What a GPU worker does by default (GENQ_GPU_DTYPE=bf16), here on the CPU."""
    import torch

    loaded = load_model(trained[family].checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    out = _run(loaded, [GenRequest(key="a", prompt="The ", max_tokens=5, temperature=0),
                        GenRequest(key="b", prompt="def f(x):", max_tokens=4, n=2, top_k=5)])
    assert out["a"].tokens_out >= 1 and len(_texts(out["b"])) == 2


def test_workers_keep_fp32_on_the_cpu() -> None:
    from worker.device import inference_dtype

    assert inference_dtype("cpu") is None
