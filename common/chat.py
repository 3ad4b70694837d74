"""Chat messages and how they become text: a tokenizer's own chat template, else genq's.

genq's fallback template (for models whose tokenizer has none): each message is one line
`"{role}: {content}\n"`; a generation prompt appends `"assistant: "`. Training
(common/ml/examples.py) and the Batch API (common/ml/prompt_ids.py) both use a model's own
template when it has one and this one otherwise, so a model sees at generation time the
text it was trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Role = Literal["system", "developer", "user", "assistant"]
# (messages as {"role", "content"} dicts, add_generation_prompt) -> text
Render = Callable[[list[dict[str, str]], bool], str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Role
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


def as_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as chat templates take them: string contents (list contents keep text parts)."""
    return [{"role": m.role, "content": m.text()} for m in messages]


def render_fallback(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """genq's template: `role: content` lines, then `assistant: ` for a generation prompt."""
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def tokenizer_render(tokenizer: Any) -> Render:
    """The tokenizer's chat template as a Render, or the fallback when it has none.

    transformers 5 raises on apply_chat_template without a template, so ask first.
    """
    if not getattr(tokenizer, "chat_template", None):
        return render_fallback
    return lambda messages, gen: tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=gen)


def chat_segments(render: Render, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces: trained ones are what each
    assistant message adds after its generation prompt (its content and end-of-turn);
    the text between two answers is one piece, as a generation prompt is encoded whole.

    Found by rendering growing prefixes, so it works for any template that renders a
    conversation as the text of its first messages followed by the rest.
    """
    segments: list[tuple[str, bool]] = []
    done = ""

    def extend(text: str, trained: bool) -> None:
        nonlocal done
        if not text.startswith(done):
            raise ValueError("the chat template does not render a conversation as a "
                             "continuation of its first messages")
        if len(text) > len(done) and segments and segments[-1][1] == trained:
            segments[-1] = (segments[-1][0] + text[len(done):], trained)
        elif len(text) > len(done):
            segments.append((text[len(done):], trained))
        done = text

    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            extend(render(messages[:k], True), False)
        extend(render(messages[:k + 1], False), message["role"] == "assistant")
    return segments
