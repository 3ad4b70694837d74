"""Any transformers causal LM: from a config (`arch` + its fields, trained from scratch), a
local pretrained folder, or a hub id resolved on the worker (common/ml/pretrained.py)."""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import (
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from common.errors import ConfigProblem, ModelNotFound, UnknownField
from common.gen_params import GenParams
from common.ml.data import ImageData, TextData
from common.ml.families.base import SUBMITTED, FamilyConfig, TextFamily
from common.ml.pretrained import (
    ModelSource,
    Resolved,
    check_local_or_hub,
    resolve,
    source_of,
)
from common.ml.sampling import Completion

EOT = "<|endoftext|>"
# genq's small GPT-2 when a config names no sizes (what `gpt` configs have always meant)
GPT2_DEFAULTS = {"n_positions": 128, "n_embd": 32, "n_layer": 2, "n_head": 2}
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # the trained tokenizer's EOT
# Sizes transformers takes at any value (a model of 0 layers builds): genq wants one at least.
LAYER_COUNTS = {"num_hidden_layers", "n_layer"}
MAX_ARCH_INT = 1 << 24  # any integer arch field: widths, vocabularies, positions, experts
SIZES = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "intermediate_size", "max_position_embeddings", "head_dim", "n_positions", "n_embd",
         "n_layer", "n_head", "n_inner"}


class LMConfig(FamilyConfig):
    """genq's fields; every other key is a field of `arch`'s transformers config
    (LlamaConfig's hidden_size, GPT2Config's n_embd, ...), checked by building it.
    With `pretrained`, the model's own config is used and no arch field may be given."""

    model_config = FamilyConfig.model_config | {"extra": "allow"}

    arch: str = "gpt2"  # a transformers model_type with a causal-LM head
    # byte-level BPE trained on the data: 256 bytes + EOT at least
    vocab_size: int = Field(512, ge=257, le=1_000_000)
    dropout: float = Field(0.0, ge=0, lt=1)  # gpt2: resid, embd and attn dropout
    # a folder in GENQ_PRETRAINED_ROOT (made absolute) or org/name
    pretrained: str | None = Field(None, max_length=1024)
    revision: str | None = Field(None, min_length=1, max_length=255,
                                 pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")  # hub ids only
    commit: str | None = None  # set by the worker: the commit `revision` resolved to

    @field_validator("pretrained")
    @classmethod
    def _holds_a_model(cls, pretrained: str | None, info: ValidationInfo) -> str | None:
        if pretrained is not None and info.context == SUBMITTED:
            check_local_or_hub(pretrained, holds="config.json",
                               what="a local directory holding a transformers model")
        return pretrained

    @model_validator(mode="wrap")
    @classmethod
    def _arch_fields(cls, data: Any, handler: ModelWrapValidatorHandler[LMConfig],
                     info: ValidationInfo) -> LMConfig:
        """GPT-2 sizes by default; a submitted config's arch fields checked by transformers."""
        if not isinstance(data, dict):
            return handler(data)
        data = _with_gpt2_defaults(data)
        problems = _arch_problems(data) if info.context == SUBMITTED else []
        errors = [InitErrorDetails(type="value_error", loc=(p.field,) if p.field else (),
                                   input=data.get(p.field), ctx={"error": p}) for p in problems]
        try:
            cfg = handler(data)
        except ValidationError as e:
            found = [*errors, *cast(list[InitErrorDetails], e.errors())]
            raise ValidationError.from_exception_data(cls.__name__, found) from e
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return cfg

    @property
    def arch_fields(self) -> dict[str, Any]:
        """The transformers config fields given for `arch` (everything but genq's own)."""
        return dict(self.model_extra or {})


def _with_gpt2_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A gpt2 config from scratch gets genq's small sizes where it names none."""
    if data.get("pretrained") or data.get("arch", "gpt2") != "gpt2":
        return data
    from transformers import GPT2Config

    given = {GPT2Config.attribute_map.get(k, k) for k in data}
    return {**{k: v for k, v in GPT2_DEFAULTS.items() if k not in given}, **data}


def _config_class(arch: str) -> Any:
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[arch]


def _arch_problems(data: dict[str, Any]) -> list[ConfigProblem]:
    """Each problem with the arch and its fields, each on its own field ("" for the whole)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    genq = set(LMConfig.model_fields)
    extra = {k: v for k, v in data.items() if k not in genq}
    problems: list[ConfigProblem] = []
    pretrained, revision = data.get("pretrained"), data.get("revision")
    if isinstance(data.get("commit"), str):
        problems.append(ConfigProblem("commit", "set by the worker (the commit the revision "
                                                "resolved to); pin one with config.revision"))
    if isinstance(revision, str) and not (isinstance(pretrained, str)
                                          and not Path(pretrained).is_absolute()):
        problems.append(ConfigProblem("revision", "only with a hub id in config.pretrained"))
    if isinstance(pretrained, str):
        own = [k for k in ("arch", "vocab_size", "dropout") if k in data] + list(extra)
        return problems + [ConfigProblem(k, "the pretrained model's own config sets it: "
                                            "remove it (or train from a config)") for k in own]
    arch = data.get("arch", "gpt2")
    if not isinstance(arch, str):
        return problems  # the field's own type error says it
    if arch not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        close = difflib.get_close_matches(arch, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return problems + [ConfigProblem("arch", f"{arch!r} is not a transformers architecture "
                                                 f"with a causal-LM head{hint}")]
    config_class = _config_class(arch)
    known = {f.name for f in dataclasses.fields(config_class)}
    aliases = config_class.attribute_map
    if arch != "gpt2" and "dropout" in data:
        problems.append(ConfigProblem("dropout", f"gpt2 only: give {arch}'s own dropout fields"))
    fine: dict[str, Any] = {}
    for key, value in extra.items():
        name = aliases.get(key, key)
        if name in TOKEN_IDS:
            problems.append(ConfigProblem(key, "set from the tokenizer trained on the data"))
        elif name not in known:
            close = difflib.get_close_matches(key, sorted(known | set(aliases)), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            problems.append(UnknownField(key, f"unknown field for arch {arch!r} (neither "
                                               f"genq's nor {config_class.__name__}'s{hint})"))
        elif name in fine or name in extra and name != key:
            problems.append(ConfigProblem(key, f"the same field as {name}: give one"))
        else:
            problem = _field_problem(arch, key, value)
            if problem is None and isinstance(value, int) and not isinstance(value, bool):
                problem = _size_problem(key, value)
            if problem:
                problems.append(ConfigProblem(key, problem))
            else:
                fine[name] = value
    if problems:
        return problems
    try:
        cfg = LMConfig.model_validate(data)
    except ValidationError:
        return []  # genq's own fields are wrong: their errors say so
    try:
        with torch.device("meta"):  # the shapes, without allocating any weights
            _from_config(_arch_config(cfg, eot=0))
    except Exception as e:  # transformers raises ValueError, AssertionError, TypeError...
        message = str(e).split("\n")[-1].strip()
        return [ConfigProblem("", f"transformers cannot build this {arch} model: {message}")]
    return []


def _size_problem(key: str, value: int) -> str | None:
    """Bounds on integer arch fields, checked before any model is built from them (a layer
    count of 2**64 would hang the build, even on the meta device)."""
    top = 1024 if key in LAYER_COUNTS else MAX_ARCH_INT
    if key in SIZES and not 1 <= value <= top:
        return f"must be in [1, {top}]"
    return f"must be <= {top}" if value > top else None


def _field_problem(arch: str, key: str, value: Any) -> str | None:
    """What transformers' strict config says of one field's value, else None."""
    from huggingface_hub.errors import StrictDataclassFieldValidationError
    from transformers import AutoConfig

    try:
        AutoConfig.for_model(arch, **{key: value})
    except StrictDataclassFieldValidationError as e:
        message = str(e).split("\n")[-1].strip()
        wrong = re.search(r"expected (.+), got \w+ \(value: (.*)\)$", message)
        return f"must be {wrong[1]}, got {wrong[2]}" if wrong else message
    except Exception:  # noqa: BLE001 - a cross-field check, which the whole config settles
        return None
    return None


def _arch_config(cfg: LMConfig, eot: int) -> Any:
    """The transformers config of a model trained from scratch on genq's tokenizer."""
    from transformers import AutoConfig

    fields: dict[str, Any] = {"vocab_size": cfg.vocab_size, **cfg.arch_fields,
                              **dict.fromkeys(TOKEN_IDS, eot)}
    if cfg.arch == "gpt2":
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            fields.setdefault(name, cfg.dropout)
    return AutoConfig.for_model(cfg.arch, **fields)


def _from_config(config: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def train_tokenizer(text: str, vocab_size: int) -> Any:
    """Byte-level BPE trained on `text`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT,
                                   pad_token=EOT, padding_side="left",
                                   model_max_length=int(1e12))


def _ready(tokenizer: Any) -> Any:
    """Left padding, and a pad token (the end-of-text one) where the tokenizer has none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class LMFamily(TextFamily[LMConfig, nn.Module, Any]):
    Config = LMConfig
    BETAS = (0.9, 0.95)
    ADAPTER_TASK = "CAUSAL_LM"
    PRETRAINED_FIELDS = ("pretrained",)
    ADAPTERS = True

    def prepare(self, cfg: LMConfig, data: TextData | ImageData) -> tuple[LMConfig, Any]:
        """Train (or load the pretrained) tokenizer and size the vocabulary to it; a hub id
        is resolved here, on the worker, and its commit kept in the config."""
        if not isinstance(data, TextData):
            raise ValueError("data: this family needs text data")
        if cfg.pretrained:
            found = resolve(cfg.pretrained, cfg.revision)
            return cfg.model_copy(update={"commit": found.commit}), self._tokenizer_of(found)
        tokenizer = train_tokenizer(data.text, cfg.vocab_size)
        return cfg.model_copy(update={"vocab_size": len(tokenizer)}), tokenizer

    def build_model(self, cfg: LMConfig, tokenizer: Any = None,
                    arch: dict | None = None) -> nn.Module:
        """From a saved architecture (checkpoints), the pretrained model, or the config."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if arch is not None:
            return _from_config(AutoConfig.for_model(**arch))
        if cfg.pretrained:  # prepare resolved it: the commit is in this worker's cache now
            found = resolve(cfg.pretrained, cfg.commit or cfg.revision)
            try:
                return AutoModelForCausalLM.from_pretrained(
                    str(found.path), local_files_only=True, trust_remote_code=False,
                    use_safetensors=True, dtype=torch.float32)
            except OSError as e:  # no safetensors weights, a config with no causal-LM head
                raise ModelNotFound(f"config.pretrained: {cfg.pretrained} holds no causal LM "
                                    f"with safetensors weights ({e})",
                                    param="config.pretrained") from None
        eot = tokenizer.eos_token_id if tokenizer is not None else 0
        return _from_config(_arch_config(cfg, eot))

    def train_memory(self, cfg: LMConfig, batch_size: int, seq_len: int) -> int | None:
        """Per token, each layer: about 10 x width of projections, norms and residuals, twice
        the MLP's width, and the attention scores (2 x heads x seq_len, as eager attention
        keeps them); plus the logits with their softmax and gradient (3 x vocabulary).
        From the config, or a local pretrained folder's config.json; None for a hub id
        (its config is the worker's to fetch)."""
        from transformers import AutoConfig

        if cfg.pretrained is None:
            arch = _arch_config(cfg, eot=0)
        elif Path(cfg.pretrained).is_absolute():
            try:
                arch = AutoConfig.from_pretrained(cfg.pretrained, local_files_only=True,
                                                  trust_remote_code=False)
            except (OSError, ValueError):
                return None  # the folder's own problem, said where it is loaded
        else:
            return None
        arch = getattr(arch, "text_config", None) or arch  # a multimodal config's language half
        width = getattr(arch, "hidden_size", 0) or 0
        layers = getattr(arch, "num_hidden_layers", 0) or 0
        heads = getattr(arch, "num_attention_heads", 0) or 0
        inner = getattr(arch, "intermediate_size", None) or getattr(arch, "n_inner", None) \
            or 4 * width
        vocab = getattr(arch, "vocab_size", 0) or cfg.vocab_size
        per_token = layers * (10 * width + 2 * inner + 2 * heads * seq_len) + 3 * vocab
        return batch_size * seq_len * per_token * 4

    def source(self, cfg: LMConfig) -> ModelSource | None:
        """The hub id, revision and resolved commit, or the local folder; None from scratch."""
        return source_of(cfg.pretrained, cfg.revision, cfg.commit)

    def _tokenizer_of(self, found: Resolved) -> Any:
        try:
            return self.load_tokenizer(found.path)
        except (OSError, ValueError) as e:
            raise ModelNotFound(f"config.pretrained: no tokenizer in {found.path.name} ({e})",
                                param="config.pretrained") from None

    def architecture(self, model: Any) -> dict:
        """The transformers config that rebuilds this model without its source."""
        return model.config.to_dict()

    def enable_gradient_checkpointing(self, model: Any) -> None:
        # non-reentrant: a LoRA run's frozen embeddings give no input that requires grad
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def context_limit(self, model: nn.Module) -> int | None:
        c = model.config
        return getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None)

    def encode(self, tokenizer: Any, text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False, verbose=False)

    def save_tokenizer(self, tokenizer: Any, directory: Path) -> None:
        tokenizer.save_pretrained(str(directory))

    def load_tokenizer(self, directory: Path) -> Any:
        from transformers import AutoTokenizer

        return _ready(AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                    trust_remote_code=False))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
             phase: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Next-token cross-entropy."""
        x, y = batch  # (B, T) each
        # use_cache=False: a training forward would otherwise fill a KV cache it never reads
        logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), {}

    @torch.no_grad()
    def complete(self, model: Any, tokenizer: Any, prompts: list[list[int]],
                 params: GenParams, n: int) -> list[list[Completion]]:
        """n continuations per prompt via model.generate, left-padded with an attention mask."""
        if params.max_tokens == 0:
            return [[Completion("", 0, "length")] * n for _ in prompts]
        device = next(model.parameters()).device
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        rows = [p or [eos] for p in prompts]  # an empty prompt starts after end-of-text
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # (B, T)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        kwargs: dict[str, Any] = {"max_new_tokens": params.max_tokens, "pad_token_id": pad,
                                  "eos_token_id": eos}
        copies = 1
        if params.num_beams > 1:  # deterministic beam search: temperature does not apply
            kwargs.update(num_beams=max(params.num_beams, n), num_return_sequences=n,
                          early_stopping=True, do_sample=False)
        elif not params.sampling:
            kwargs.update(do_sample=False)
            copies = n  # greedy continuations are identical: compute one, copy it
        else:
            kwargs.update(do_sample=True, num_return_sequences=n, temperature=params.temperature,
                          top_k=params.top_k or 0,
                          top_p=params.top_p if params.top_p is not None else 1.0)
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, width:].tolist()
        per_row = len(out) // len(rows)
        results = []
        for i in range(len(rows)):
            completions = []
            for gen in out[i * per_row:(i + 1) * per_row]:
                stop = eos in gen
                gen = gen[:gen.index(eos)] if stop else gen
                completions.append(Completion(tokenizer.decode(gen, skip_special_tokens=True),
                                              len(gen) + int(stop), "stop" if stop else "length"))
            results.append([c for c in completions for _ in range(copies)])
        return results
