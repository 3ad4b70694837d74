"""Chat and prompt/completion data: format recognition, chat-template rendering, loss masking."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from common.chat import chat_segments, render_fallback, tokenizer_render
from common.errors import DataError
from common.ml.checkpoint import load_model
from common.ml.data import ChatExample, PromptCompletion, load_data
from common.ml.examples import IGNORE, encode_examples
from common.ml.families import get_family
from common.ml.families.lm import train_tokenizer
from common.ml.families.lstm import CharTokenizer
from common.ml.prompt_ids import load_chat_render
from common.ml.train import TrainHooks
from common.storage import Storage
from tests.ml.conftest import straight_and_resumed

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"}]


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def bpe() -> Any:
    return train_tokenizer("system user assistant Be brief. Hi Hello. Bye! " * 40, 300)


@pytest.fixture(scope="module")
def templated() -> Any:
    """The BPE tokenizer with a ChatML template and its two markers as special tokens."""
    tok = train_tokenizer("system user assistant Be brief. Hi Hello. Bye! " * 40, 300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def test_fallback_template_is_the_documented_one() -> None:
    assert render_fallback(CHAT[:2], True) == "system: Be brief.\nuser: Hi\nassistant: "
    assert render_fallback(CHAT[:3], False) == "system: Be brief.\nuser: Hi\nassistant: Hello.\n"


def test_a_tokenizer_without_a_template_renders_with_the_fallback(bpe: Any) -> None:
    """transformers raises on apply_chat_template without a template; genq never calls it."""
    with pytest.raises(ValueError):
        bpe.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer_render(bpe) is render_fallback
    assert tokenizer_render(CharTokenizer.from_text("abc")) is render_fallback
    assert chat_segments(render_fallback, CHAT) == [
        ("system: Be brief.\nuser: Hi\nassistant: ", False), ("Hello.\n", True),
        ("user: Bye\nassistant: ", False), ("Bye!\n", True)]


def test_a_tokenizer_with_a_template_renders_with_it(templated: Any) -> None:
    render = tokenizer_render(templated)
    assert render(CHAT[:2], True) == templated.apply_chat_template(
        CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert chat_segments(render, CHAT) == [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("Hello.<|im_end|>\n", True),
        ("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", False),
        ("Bye!<|im_end|>\n", True)]


def test_the_batch_api_renders_a_checkpoints_template(templated: Any, bpe: Any,
                                                      tmp_path: Path) -> None:
    """The API reads the template from the checkpoint's files (no transformers tokenizer)."""
    storage = Storage(str(tmp_path / "store"))
    for name, tok in (("with", templated), ("without", bpe)):
        tok.save_pretrained(str(tmp_path / "store" / name))
    render = load_chat_render(storage, storage.uri("with"))
    assert render(CHAT[:2], True) == templated.apply_chat_template(
        CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert load_chat_render(storage, storage.uri("without")) is render_fallback


def _targets(tokenizer: Any, example: Any, seq_len: int = 256) -> tuple[list[int], list[int]]:
    family = "lstm" if isinstance(tokenizer, CharTokenizer) else "gpt"
    x, y = encode_examples(get_family(family).encode, tokenizer, [example], seq_len)
    return x[0].tolist(), y[0].tolist()


def test_chat_loss_is_on_assistant_tokens_only() -> None:
    """Character tokens: each target is the next character, -100 unless an assistant wrote it."""
    example = ChatExample.model_validate({"messages": CHAT})
    text = render_fallback(CHAT, False)
    tok = CharTokenizer.from_text(text)
    inputs, targets = _targets(tok, example)
    assert tok.decode(inputs) == text[:-1]
    trained = "".join(text[i + 1] for i, t in enumerate(targets) if t != IGNORE)
    assert trained == "Hello.\nBye!\n"
    assert [t for t in targets if t != IGNORE] == tok.encode("Hello.\nBye!\n")


def test_end_of_text_follows_a_last_answer_only(bpe: Any) -> None:
    ending = ChatExample.model_validate({"messages": CHAT[:3]})
    trailing = ChatExample.model_validate({"messages": CHAT[:4]})
    assert _targets(bpe, ending)[1][-1] == bpe.eos_token_id
    assert bpe.eos_token_id not in _targets(bpe, trailing)[1]


def test_chat_loss_with_a_template_covers_answers_and_end_of_turn(templated: Any) -> None:
    example = ChatExample.model_validate({"messages": CHAT})
    inputs, targets = _targets(templated, example)
    kept = [t for t in targets if t != IGNORE]
    assert templated.decode(kept) == "Hello.<|im_end|>\nBye!<|im_end|>\n"
    assert templated.eos_token_id not in kept  # the template ends turns; no end-of-text added


def test_prompt_completion_loss_is_on_the_completion_and_end_of_text(bpe: Any) -> None:
    example = PromptCompletion(prompt="Hi ", completion="Hello.")
    inputs, targets = _targets(bpe, example)
    prompt = bpe.encode("Hi ", add_special_tokens=False)
    completion = bpe.encode("Hello.", add_special_tokens=False)
    assert inputs == prompt + completion
    assert targets == [IGNORE] * (len(prompt) - 1) + completion + [bpe.eos_token_id]


def test_examples_pad_to_the_longest_and_cut_at_seq_len(bpe: Any) -> None:
    long = PromptCompletion(prompt="Hi", completion=" Hello." * 20)
    short = PromptCompletion(prompt="Hi", completion=" Bye!")
    x, y = encode_examples(get_family("gpt").encode, bpe, [long, short], 16)
    assert x.shape == y.shape == (2, 16)
    assert (y[1, 4:] == IGNORE).all() and (y[1] != IGNORE).sum() >= 2
    hopeless = PromptCompletion(prompt=" Hello." * 20, completion="Bye!")
    x, y = encode_examples(get_family("gpt").encode, bpe, [hopeless, short], 8)
    assert len(x) == 1  # the one whose completion lies past seq_len is left out
    with pytest.raises(ValueError, match="seq_len"):
        encode_examples(get_family("gpt").encode, bpe, [hopeless], 8)


def test_a_jsonl_files_first_line_sets_its_format(tmp_path: Path) -> None:
    chat = load_data({"path": str(jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}] * 2))}, "text")
    assert chat.examples and all(isinstance(e, ChatExample) for e in chat.examples)
    assert chat.text == "\n\n".join([render_fallback(CHAT, False)] * 2)
    pc = load_data({"path": str(jsonl(tmp_path / "p.jsonl",
                                      [{"prompt": "a", "completion": "b"}]))}, "text")
    assert pc.examples == [PromptCompletion(prompt="a", completion="b")] and pc.text == "ab"
    text = load_data({"path": str(jsonl(tmp_path / "t.jsonl",
                                        [{"text": "hello", "prompt": "x"}, {"text": "you"}]))},
                     "text")
    assert text.examples is None and text.text == "hello\n\nyou"


@pytest.mark.parametrize("rows, says", [
    ([{"messages": CHAT}, "", {"messages": []}], "line 3: messages: List should have at least 1"),
    ([{"messages": CHAT}, {"messages": CHAT[:2]}],
     "line 2: messages: needs at least one assistant"),
    ([{"messages": CHAT}, {"messages": [{"role": "robot", "content": "x"}]}],
     "line 2: messages[0].role: Input should be"),
    ([{"messages": CHAT}, "{not json"], "line 2: invalid JSON"),
    ([{"messages": CHAT}, {"prompt": "a", "completion": "b"}],
     "line 2: a prompt/completion line in a chat file"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "line 2: completion: Field required"),
    ([{"prompt": "a", "completion": ""}], "line 1: completion: String should have at least 1"),
    ([{"prompt": 3, "completion": "b"}], "line 1: prompt: Input should be a valid string"),
])
def test_a_bad_line_is_named(tmp_path: Path, rows: list[Any], says: str) -> None:
    with pytest.raises(DataError) as info:
        load_data({"path": str(jsonl(tmp_path / "bad.jsonl", rows))}, "text")
    assert any(says in p for p in info.value.problems), info.value.problems


def _chat_file(path: Path, n: int = 48) -> Path:
    return jsonl(path, [{"messages": [{"role": "user", "content": f"What follows {i}?"},
                                      {"role": "assistant", "content": f"{i + 1}."}]}
                        for i in range(n)])


@pytest.mark.parametrize("family", ["gpt", "lstm"])
def test_exact_resume_on_chat_examples(family: str, tiny_spec: Callable[..., dict],
                                       tmp_path: Path) -> None:
    """Example batches are a pure function of (seed, step): a resumed run matches bitwise."""
    spec = tiny_spec(family, steps=8, batch_size=8, checkpoint_every=3, eval_every=2, seq_len=64,
                     data={"path": str(_chat_file(tmp_path / "chat.jsonl"))})
    straight, _, resumed = straight_and_resumed(spec, 5, tmp_path)
    a = load_model(straight.checkpoint).model.state_dict()
    b = load_model(resumed.checkpoint).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_batches_carry_masked_targets(tiny_spec: Callable[..., dict],
                                               tmp_path: Path) -> None:
    """What the loss sees: -100 on prompts and padding, for every sequence of the batch."""
    from common.ml.train import Run

    spec = tiny_spec("gpt", steps=1, batch_size=4,
                     data={"path": str(_chat_file(tmp_path / "chat.jsonl"))})
    run = Run(spec, tmp_path, TrainHooks(), None, "cpu")
    x, y = run.batches(0)
    assert y is not None and x.shape == y.shape and x.shape[0] == 4
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        kept = [t for t in row_y if t != IGNORE]
        answer = run.tokenizer.decode(kept)
        assert answer.endswith(".\n<|endoftext|>") and "What" not in answer
        assert len(kept) < len(row_x)


def test_a_template_that_refuses_an_example_names_it() -> None:
    strict = train_tokenizer("user assistant Hi Hello " * 20, 300)
    strict.chat_template = ("{% if messages[0]['role'] != 'user' %}"
                            "{{ raise_exception('conversations start with a user') }}{% endif %}"
                            + CHATML)
    good = ChatExample.model_validate({"messages": CHAT[1:3]})
    bad = ChatExample.model_validate({"messages": CHAT[:3]})
    with pytest.raises(ValueError, match="example 2: .*conversations start with a user"):
        encode_examples(get_family("gpt").encode, strict, [good, bad], 64)
