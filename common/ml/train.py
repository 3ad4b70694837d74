"""The one training loop: every family, resumable bit-for-bit, checkpoints, metrics, artifacts."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
import torch.nn as nn
from pydantic import ValidationError

from common.adapter_spec import AdapterSpec
from common.errors import (
    CheckpointError,
    DataError,
    GenqError,
    InvalidTrainSpec,
    NanLoss,
    RetryableError,
    Stopped,
    StopReason,
    pydantic_problems,
    raise_if_stopped,
)
from common.family_names import canonical_family
from common.gen_params import GenParams
from common.ml.adapters import base_of, load_adapter, merged, with_adapter
from common.ml.artifacts import save_grid, save_loss_plot
from common.ml.checkpoint import (
    load_base,
    load_metrics,
    load_tokenizer,
    load_train_state,
    load_weights_into,
    read_meta,
    save_checkpoint,
)
from common.ml.data import ImageData, TextData, load_data
from common.ml.examples import encode_examples
from common.ml.families import AnyFamily, ImageFamily, TextFamily, TextToImageFamily, get_family
from common.ml.sampling import seed_torch
from common.retention import checkpoint_dirname, checkpoints_to_keep, step_of
from common.train_spec import TrainSpec, memory_problems

log = logging.getLogger(__name__)

SEED_MIX = 1_000_003
EVAL_BATCHES = 4  # held-out batches per evaluation, the same ones every time


def _ignore(*args: Any) -> None:
    return None


@dataclass
class TrainHooks:
    """How the caller watches and steers a run."""

    should_stop: Callable[[], StopReason | None] = lambda: None  # a reason stops the run
    on_progress: Callable[[int, int, dict[str, float]], None] = _ignore  # every step
    on_metrics: Callable[[int, dict[str, float]], None] = _ignore  # every log_every steps
    on_checkpoint: Callable[[int, Path, dict[str, float]], None] = _ignore  # complete dir
    # a LoRA run's from-config base, written once: returns where it is kept (its base.uri)
    on_base: Callable[[Path], str] = str
    locate: Callable[[str], Path] = Path  # a base.uri back to a local folder


@dataclass
class TrainArtifact:
    kind: str  # "loss_plot" | "image_grid"
    path: Path
    content_type: str


@dataclass
class TrainOutcome:
    stopped: StopReason | None  # None: all steps done
    step: int
    checkpoint: Path
    metrics: dict[str, float]
    artifacts: list[TrainArtifact] = field(default_factory=list)
    merged: Path | None = None  # adapter.merge: a full checkpoint of base + adapter merged


def parse_spec(spec: TrainSpec | dict) -> TrainSpec:
    """The spec as TrainSpec; a dict is validated, every problem named in one error."""
    if isinstance(spec, TrainSpec):
        return spec
    try:
        return TrainSpec.model_validate(spec)
    except ValidationError as e:
        raise InvalidTrainSpec("; ".join(pydantic_problems(e))) from e


SAMPLES_FILE = "samples.png"  # a text-to-image checkpoint's grid of its validation prompts


def _mix(seed: int, n: int) -> int:
    return (seed * SEED_MIX + n) % (2**63 - 1)


class Batches:
    """The batch for micro-step m is a pure function of (seed, m): resuming replays it exactly.

    Text is cut into random windows of `tokens`; rows (`rows`: examples' inputs and targets,
    common/ml/examples.py, or images and caption ids; by default images and their labels)
    are shuffled afresh each epoch.
    """

    def __init__(self, data: TextData | ImageData, tokens: torch.Tensor | None, batch_size: int,
                 seq_len: int, seed: int, device: str,
                 rows: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.tokens, self.b, self.t = tokens, batch_size, seq_len
        self.rows: tuple[torch.Tensor, torch.Tensor | None] | None = rows
        if isinstance(data, ImageData) and rows is None:
            self.rows = (data.images, data.labels)
        self.seed, self.device = seed, device
        self._perm: tuple[int, torch.Tensor] | None = None

    def steps_per_epoch(self, grad_accum: int) -> int:
        if self.tokens is not None:
            return max(1, len(self.tokens) // (self.b * self.t * grad_accum))
        assert self.rows is not None
        return max(1, len(self.rows[0]) // (self.b * grad_accum))

    def __call__(self, m: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.tokens is not None:
            g = torch.Generator().manual_seed(_mix(self.seed, m))
            starts = torch.randint(0, len(self.tokens) - self.t, (self.b, 1), generator=g)
            idx = starts + torch.arange(self.t)  # (B, T)
            return self.tokens[idx].to(self.device), self.tokens[idx + 1].to(self.device)
        assert self.rows is not None
        x, y = self.rows
        n = len(x)
        per = max(1, n // self.b)
        epoch, k = divmod(m, per)
        if self._perm is None or self._perm[0] != epoch:  # a fresh shuffle each epoch
            g = torch.Generator().manual_seed(_mix(self.seed + 7919, epoch))
            self._perm = (epoch, torch.randperm(n, generator=g))
        idx = self._perm[1][k * self.b:(k + 1) * self.b]
        return x[idx].to(self.device), None if y is None else y[idx].to(self.device)


def _rng_state() -> dict:
    """RNG states as tensors and plain types, so state.pt loads with weights_only=True."""
    np_state = cast(tuple, np.random.get_state(legacy=True))
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))


def _optimizer(name: str, params: list[nn.Parameter], s: TrainSpec,
               betas: tuple[float, float]) -> torch.optim.Optimizer:
    """Weight decay on matrices only (nanoGPT style)."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=s.lr, momentum=0.9)
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(groups, lr=s.lr, betas=betas)


def _same_optimizer(state: dict, saved: dict, name: str) -> bool:
    """Whether a checkpoint's optimizer state fits this run's optimizer; a spec that resumes
    with another optimizer keeps the weights and starts that optimizer fresh."""
    if "optimizer" in state:
        same = state["optimizer"] == name
    else:  # checkpoints from before the name was saved: tell SGD from the Adams by their keys
        same = all(("betas" in g) == (name != "sgd") for g in saved.get("param_groups", []))
    if not same:
        log.info("resuming with optimizer %s: the checkpoint's optimizer state is not reused",
                 name)
    return same


def _devices(device: str) -> list:
    """CUDA devices whose RNG a fork_rng block must also save and restore."""
    return [torch.device(device).index or 0] if str(device).startswith("cuda") else []


def _lr_lambda(s: TrainSpec, total: int) -> Callable[[int], float]:
    """Linear warmup, then constant or cosine decay to a tenth of the peak."""

    def factor(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# What a failure of the machine, not of the spec, raises while a run is built: kept as it is,
# so the worker retries it (OSError covers storage and hub downloads).
ENVIRONMENT_ERRORS = (OSError, MemoryError, ConnectionError, TimeoutError, RetryableError,
                      CheckpointError, GenqError, Stopped)
ENVIRONMENT_MESSAGES = ("out of memory", "can't allocate memory", "CUDA")


@contextlib.contextmanager
def blamed_on_spec(what: str) -> Iterator[None]:
    """Turn an error raised while loading the job's data or building the model its config
    describes into InvalidTrainSpec (invalid_spec, never retried): torch's RuntimeError or
    IndexError on a config it cannot build, a tokenizer's error on odd text. The machine's
    errors (storage, memory, CUDA) keep their type, so a retry can still cure them."""
    try:
        yield
    except DataError as e:
        raise InvalidTrainSpec("; ".join(e.problems)) from e
    except (InvalidTrainSpec, *ENVIRONMENT_ERRORS):
        raise
    except ValueError as e:  # already says which field
        raise InvalidTrainSpec(str(e)) from e
    except Exception as e:
        if any(m in str(e) for m in ENVIRONMENT_MESSAGES):
            raise
        raise InvalidTrainSpec(f"{what}: {type(e).__name__}: {e}") from e


def _prune(directory: Path, keep_last: int) -> None:
    """Delete the local checkpoints the retention rule does not keep (common/retention.py)."""
    by_step = {step: p for p in directory.iterdir()
               if p.is_dir() and (step := step_of(p.name)) is not None}
    dirs = [by_step[step] for step in sorted(by_step)]
    keep = checkpoints_to_keep([load_metrics(p).get("loss") for p in dirs], keep_last)
    for i, p in enumerate(dirs):
        if i not in keep:
            shutil.rmtree(p, ignore_errors=True)


class Run:
    """One training run's state; `run_training` is its public face."""

    def __init__(self, spec: TrainSpec | dict, workdir: Path, hooks: TrainHooks,
                 resume_from: Path | None, device: str, base_dtype: torch.dtype | None = None):
        self.s = parse_spec(spec)
        self.workdir, self.hooks, self.device = Path(workdir), hooks, device
        self.base_dtype = base_dtype
        self.adapter: AdapterSpec | None = None  # the LoRA adapter being trained, if any
        self.base: dict | None = None  # where its from-config base is kept (base.uri)
        try:
            self.module: AnyFamily = get_family(self.s.family)
        except ValueError as e:
            raise InvalidTrainSpec(str(e)) from e
        self._build(resume_from)

    def _save_base(self, cfg: Any, model: nn.Module, tokenizer: Any) -> str:
        """The from-config base of a LoRA run as a full checkpoint (no training state)."""
        path = self.workdir / "base"
        save_checkpoint(path, family=self.s.family, config=cfg, model=model,
                        tokenizer_or_none=tokenizer, train_state=None, metrics={})
        return self.hooks.on_base(path)

    def _stop_if_asked(self) -> None:
        """A cancel (or shutdown, timeout, lost lease) while the run is being built ends it
        here, between phases that can each take long: nothing trained, nothing saved."""
        raise_if_stopped(self.hooks.should_stop(), {"step": 0})

    def _check_memory(self, cfg: Any, data: TextData | ImageData) -> None:
        """The spec was checked with the config it gave; this checks the config fitted to
        the data (an image family's size, a vocabulary), with the rows a batch really takes."""
        s = self.s
        rows = min(s.batch_size, len(data.images)) if isinstance(data, ImageData) \
            else s.batch_size
        problems = memory_problems(self.module, cfg, rows, s.seq_len)
        if problems:
            raise InvalidTrainSpec(problems[0])

    def _build(self, resume_from: Path | None) -> None:
        s, module = self.s, self.module
        self._stop_if_asked()
        with blamed_on_spec("data"):
            data = load_data(s.data_source, module.KIND)
        self._stop_if_asked()
        state = None
        if resume_from is not None:
            meta = read_meta(resume_from)
            if canonical_family(meta["family"]) != canonical_family(s.family):
                raise InvalidTrainSpec(f"resume_from: checkpoint is {meta['family']!r}, "
                                       f"spec is {s.family!r}")
            if ("adapter" in meta) != (s.adapter is not None):
                raise InvalidTrainSpec("adapter: the checkpoint was trained "
                                       f"{'with' if 'adapter' in meta else 'without'} one; "
                                       "resume it the same way")
            cfg = module.Config(**meta["config"])
            self._check_memory(cfg, data)
            tokenizer = load_tokenizer(module, Path(resume_from))
            if "adapter" in meta:
                self.adapter = AdapterSpec.model_validate(meta["adapter"])
                self.base = meta.get("base")
                base = load_base(module, meta, cfg, tokenizer, self.hooks.locate)
                model = load_adapter(base.to(dtype=self.base_dtype), Path(resume_from),
                                     trainable=True)
            else:
                model = module.build_model(cfg, tokenizer, arch=meta.get("arch"))
                load_weights_into(model, Path(resume_from))
            state = load_train_state(resume_from)
        else:
            with blamed_on_spec("config"):  # the config was validated with the spec
                cfg, tokenizer = module.prepare(module.Config(**s.config), data)
            self._check_memory(cfg, data)
            self._stop_if_asked()
            torch.manual_seed(s.seed)
            with blamed_on_spec("config"):
                model = module.build_model(cfg, tokenizer)
            if s.adapter is not None:
                self.adapter = s.adapter
                if module.source(cfg) is None:  # random weights: keep them, once
                    self.base = {"uri": self._save_base(cfg, model, tokenizer)}
                with blamed_on_spec("adapter"):
                    model = with_adapter(model.to(dtype=self.base_dtype), s.adapter, module)
        if s.gradient_checkpointing:
            module.enable_gradient_checkpointing(base_of(model))
        self._stop_if_asked()
        self.cfg, self.tokenizer, self.model = cfg, tokenizer, model.to(self.device)
        self._stop_if_asked()
        with blamed_on_spec("data"):
            self.batches, self.held_out = self._batches(data)
        total = s.steps or (s.epochs or 1) * self.batches.steps_per_epoch(s.grad_accum)
        self.total: int = total
        opt_name = self.optimizer_name = s.optimizer or module.OPTIMIZER
        self.phases = []
        cuda = str(self.device).startswith("cuda")
        for phase in module.PHASES:
            # frozen weights (a LoRA run's base) are neither stepped nor clipped
            params = [p for p in module.phase_params(model, phase) if p.requires_grad]
            opt = _optimizer(opt_name, params, s, module.BETAS)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(s, total))
            scaler = torch.amp.GradScaler("cuda", enabled=cuda and s.precision == "fp16")
            self.phases.append((phase, params, opt, sched, scaler))
        self.step = 0
        self.history: dict[str, list] = {"step": [], "loss": []}
        if state is not None:
            for (_, _, opt, sched, scaler), o, sc, gs in zip(
                    self.phases, state["optimizers"], state["schedulers"], state["scalers"],
                    strict=True):
                if _same_optimizer(state, o, opt_name):
                    opt.load_state_dict(o)
                sched.load_state_dict(sc)
                scaler.load_state_dict(gs)
            self.step = int(state["step"])
            self.history = state["history"]
            _set_rng_state(state["rng"])
        self.autocast: Any = contextlib.nullcontext
        if cuda and s.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if s.precision == "bf16" else torch.float16
            self.autocast = lambda: torch.autocast("cuda", dtype=dtype)
        elif s.precision != "fp32":
            log.info("precision %s ignored on %s; training in fp32", s.precision, self.device)

    def _batches(self, data: TextData | ImageData) -> tuple[Batches, Batches | None]:
        """Training batches, and held-out ones when eval_every is set (the data's last tenth)."""
        s = self.s
        if isinstance(data, TextData) and data.examples is not None:
            return self._example_batches(data)
        tokens = None
        seq_len = s.seq_len
        if isinstance(data, TextData) and isinstance(self.module, TextFamily):
            ids = on_helper_thread(self.module.encode, self.tokenizer, data.text)
            tokens = torch.tensor(ids, dtype=torch.long)
            if len(tokens) < 2:
                raise InvalidTrainSpec("data: the text encodes to fewer than 2 tokens")
            if seq_len >= len(tokens):
                log.warning("seq_len %d cut to %d: the text is short", seq_len, len(tokens) - 1)
                seq_len = len(tokens) - 1
            self._check_context(seq_len)
        if not s.eval_every:
            if isinstance(data, ImageData):
                return self._image_batches(data, s.seed), None
            return Batches(data, tokens, s.batch_size, seq_len, s.seed, self.device), None
        if tokens is not None:
            cut = len(tokens) - max(seq_len + 1, len(tokens) // 10)
            if cut < seq_len + 1:
                raise InvalidTrainSpec("eval_every: the text is too short to hold out a tenth")
            return (Batches(data, tokens[:cut], s.batch_size, seq_len, s.seed, self.device),
                    Batches(data, tokens[cut:], s.batch_size, seq_len, s.seed + 1, self.device))
        assert isinstance(data, ImageData)
        cut = len(data.images) - max(1, len(data.images) // 10)
        if cut < 1:
            raise InvalidTrainSpec("eval_every: too few images to hold out a tenth")
        parts = [data.part(0, cut), data.part(cut, len(data.images))]
        return (self._image_batches(parts[0], s.seed), self._image_batches(parts[1], s.seed + 1))

    def _image_batches(self, data: ImageData, seed: int) -> Batches:
        """Images with their labels, or (text-to-image) with their captions' token ids."""
        s, module = self.s, self.module
        if not isinstance(module, TextToImageFamily):
            return Batches(data, None, s.batch_size, s.seq_len, seed, self.device)
        assert data.captions is not None  # prepare() checked
        ids = module.encode_captions(self.tokenizer, data.captions,
                                     module.caption_length(self.model))
        return Batches(data, None, s.batch_size, s.seq_len, seed, self.device,
                       rows=(data.images, ids))

    def _example_batches(self, data: TextData) -> tuple[Batches, Batches | None]:
        """Chat or prompt/completion examples, one a sequence (the last tenth held out)."""
        s, module = self.s, self.module
        assert data.examples is not None and isinstance(module, TextFamily)
        try:
            inputs, targets = on_helper_thread(encode_examples, module.encode, self.tokenizer,
                                               data.examples, s.seq_len)
        except ValueError as e:  # a template that cannot be split, or nothing left to learn
            raise InvalidTrainSpec(str(e)) from e
        self._check_context(inputs.shape[1])
        if not s.eval_every:
            return Batches(data, None, s.batch_size, s.seq_len, s.seed, self.device,
                           rows=(inputs, targets)), None
        cut = len(inputs) - max(1, len(inputs) // 10)
        if cut < 1:
            raise InvalidTrainSpec("eval_every: too few examples to hold out a tenth")
        return (Batches(data, None, s.batch_size, s.seq_len, s.seed, self.device,
                        rows=(inputs[:cut], targets[:cut])),
                Batches(data, None, s.batch_size, s.seq_len, s.seed + 1, self.device,
                        rows=(inputs[cut:], targets[cut:])))

    def _check_context(self, seq_len: int) -> None:
        assert isinstance(self.module, TextFamily)
        limit = self.module.context_limit(self.model)
        if limit is not None and seq_len > limit:
            raise InvalidTrainSpec(f"seq_len: must be <= the model's context ({limit}), "
                                   f"got {seq_len}")

    def evaluate(self) -> float:
        """Mean loss on the held-out batches; the training RNG streams are left as they were."""
        assert self.held_out is not None
        phase = self.module.PHASES[0]
        self.model.eval()
        total = 0.0
        with torch.random.fork_rng(devices=_devices(self.device)), torch.no_grad():
            seed_torch(self.s.seed, self.device)
            for i in range(EVAL_BATCHES):
                with self.autocast():
                    loss, _ = self.module.loss(self.model, self.held_out(i), phase)
                total += loss.item()
        self.model.train()
        return total / EVAL_BATCHES

    def train_step(self) -> dict[str, float]:
        """One optimizer step per phase over grad_accum micro-batches; returns its metrics."""
        s, accum = self.s, self.s.grad_accum
        seed_torch(_mix(s.seed, self.step), self.device)  # dropout/noise: the step alone
        metrics: dict[str, float] = {"loss": 0.0}
        norms = []
        for phase, params, opt, sched, scaler in self.phases:
            opt.zero_grad(set_to_none=True)
            for j in range(accum):
                batch = self.batches(self.step * accum + j)
                with self.autocast():
                    loss, extras = self.module.loss(self.model, batch, phase)
                value = loss.item()
                if not math.isfinite(value):
                    raise NanLoss(self.step + 1, value)
                scaler.scale(loss / accum).backward()
                metrics["loss"] += value / accum
                for k, v in extras.items():
                    metrics[k] = metrics.get(k, 0.0) + v.item() / accum
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(params, s.clip or math.inf).item()
            if not math.isfinite(norm) and not scaler.is_enabled():
                raise NanLoss(self.step + 1, norm, what="gradient norm")
            norms.append(norm)
            if len(self.phases) > 1:
                metrics[f"grad_norm_{phase}"] = norm
            scaler.step(opt)
            scaler.update()
            sched.step()
        self.module.after_step(self.model)
        self.step += 1
        metrics["grad_norm"] = math.sqrt(sum(n * n for n in norms))
        return metrics

    def save(self, metrics: dict[str, float]) -> Path:
        path = self.workdir / "checkpoints" / checkpoint_dirname(self.step)
        state = {
            "step": self.step,
            "data_position": self.step * self.s.grad_accum,
            "total_steps": self.total,
            "optimizer": self.optimizer_name,
            "optimizers": [p[2].state_dict() for p in self.phases],
            "schedulers": [p[3].state_dict() for p in self.phases],
            "scalers": [p[4].state_dict() for p in self.phases],
            "rng": _rng_state(),
            "history": self.history,
        }
        save_checkpoint(path, family=self.s.family, config=self.cfg, model=self.model,
                        tokenizer_or_none=self.tokenizer, train_state=state,
                        metrics={"step": self.step, **metrics}, adapter=self.adapter,
                        base=self.base)
        if isinstance(self.module, TextToImageFamily):  # how the validation prompts look now
            self.save_samples(path / SAMPLES_FILE)
        self.hooks.on_checkpoint(self.step, path, {**metrics})
        _prune(path.parent, self.s.keep_last)
        return path

    def run(self) -> TrainOutcome:
        s, hooks = self.s, self.hooks
        self.model.train()
        recent: deque[float] = deque(maxlen=s.log_every)
        window: dict[str, float] = {}
        window_steps, window_start = 0, time.perf_counter()
        logged: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        stopped, saved_at, checkpoint = None, -1, None
        log.info("training %s for %d steps from step %d", s.family, self.total, self.step)
        while self.step < self.total:
            stopped = hooks.should_stop()
            if stopped:
                log.info("stopping at step %d: %s", self.step, stopped)
                break
            metrics = self.train_step()
            recent.append(metrics["loss"])
            for k, v in metrics.items():
                window[k] = window.get(k, 0.0) + v
            window_steps += 1
            hooks.on_progress(self.step, self.total, metrics)
            if self.step % s.log_every == 0 or self.step == self.total:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                logged = {k: v / window_steps for k, v in window.items()}
                logged["lr"] = float(self.phases[0][3].get_last_lr()[0])
                logged["samples_per_s"] = window_steps * s.batch_size * s.grad_accum / elapsed
                self.history["step"].append(self.step)
                self.history["loss"].append(logged["loss"])
                hooks.on_metrics(self.step, logged)
                log.info("step %d/%d loss %.4f", self.step, self.total, logged["loss"])
                window, window_steps, window_start = {}, 0, time.perf_counter()
            if s.eval_every and self.step % s.eval_every == 0:
                last_eval = {"eval_loss": self.evaluate()}
                hooks.on_metrics(self.step, last_eval)
                log.info("step %d/%d eval loss %.4f", self.step, self.total,
                         last_eval["eval_loss"])
            if self.step % s.checkpoint_every == 0 and self.step < self.total:
                checkpoint = self.save({**logged, **last_eval, "loss": sum(recent) / len(recent)})
                saved_at = self.step
        if saved_at != self.step or checkpoint is None:
            # no step ran (a resume at the end, or a stop before the first): the last known loss
            last = self.history["loss"][-1] if self.history["loss"] else math.nan
            loss = sum(recent) / len(recent) if recent else logged.get("loss", last)
            checkpoint = self.save({**logged, **last_eval, "loss": loss})
        final = {**logged, **last_eval, "step": float(self.step)}
        if recent:
            final["loss"] = sum(recent) / len(recent)
        artifacts = [] if stopped else self.artifacts()
        merge = not stopped and s.adapter is not None and s.adapter.merge
        return TrainOutcome(stopped=stopped, step=self.step, checkpoint=checkpoint,
                            metrics=final, artifacts=artifacts,
                            merged=self.save_merged(final) if merge else None)

    def save_merged(self, metrics: dict[str, float]) -> Path:
        """The adapter merged into the base, as a full checkpoint (the run is over: the
        merge may change the model in place)."""
        path = self.workdir / "merged"
        save_checkpoint(path, family=self.s.family, config=self.cfg, model=merged(self.model),
                        tokenizer_or_none=self.tokenizer, train_state=None,
                        metrics={"step": self.step, **metrics})
        return path

    def artifacts(self) -> list[TrainArtifact]:
        """The loss curve, and a grid of samples for image families."""
        out = []
        plot = self.workdir / "loss.png"
        save_loss_plot(self.history["step"], self.history["loss"], plot,
                       f"{self.s.family} training loss")
        out.append(TrainArtifact("loss_plot", plot, "image/png"))
        if isinstance(self.module, ImageFamily | TextToImageFamily):
            grid = self.workdir / "samples.png"
            self.save_samples(grid)
            out.append(TrainArtifact("image_grid", grid, "image/png"))
        return out

    def save_samples(self, path: Path) -> None:
        """A grid of samples under the run's seed: 64 images (by label for a conditional
        model), or a row of 8 for each validation prompt of a text-to-image model."""
        module, nrow = self.module, 8
        was_training = self.model.training
        self.model.eval()
        with torch.random.fork_rng(devices=_devices(self.device)), torch.no_grad():
            torch.manual_seed(self.s.seed)
            if isinstance(module, TextToImageFamily):
                prompts = [p for p in self.cfg.validation_prompts for _ in range(nrow)]
                images = module.images_for(self.model, self.tokenizer, self.cfg, prompts,
                                           GenParams())
            else:
                assert isinstance(module, ImageFamily)
                n_classes = getattr(self.cfg, "n_classes", 0)
                labels = torch.arange(64) % n_classes if n_classes else None
                images = module.sample_images(self.model, 64, labels)
        self.model.train(was_training)
        save_grid(images, path, nrow=nrow)


T = TypeVar("T")


def on_helper_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on a short-lived thread, so its allocations come from that thread's malloc
    arena rather than the main one.

    Tokenizing a whole training text makes hundreds of thousands of small allocations and
    frees in one go. Made on the main thread, they leave glibc's main heap in some 10,000
    free pieces, and the tensors a process allocates from then on (glibc serves them from
    that heap, worker/malloc.py) come slower: a worker's pool child that trained first
    generated the bench's 10,000 requests 8-14% slower than a fresh one. From a helper
    thread the pieces stay in the helper's arena. Nothing here uses OpenMP, whose thread
    team belongs to the thread that first runs a parallel region (the main one).
    """
    with ThreadPoolExecutor(1, thread_name_prefix="genq-tokenize") as pool:
        return pool.submit(fn, *args).result()


def run_training(spec: TrainSpec | dict, workdir: Path, *, hooks: TrainHooks,
                 resume_from: Path | None = None, device: str = "cpu",
                 base_dtype: torch.dtype | None = None) -> TrainOutcome:
    """Train `spec` in `workdir` (optionally resuming a checkpoint); see DESIGN.md section 6.
    `base_dtype` casts a LoRA run's frozen base (bf16 on a GPU); its adapter stays fp32.
    A stop asked before the first step (while the data loads or the model builds) raises
    its Stopped exception (common.errors), with no checkpoint written."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    return Run(spec, Path(workdir), hooks, resume_from, device, base_dtype).run()
