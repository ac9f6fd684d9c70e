"""The quickstart's warm start: a short supervised phase on noisy solutions, cached.

The paper starts PPO from Instruct models that already solve part of the
problems. The quickstart does the same in miniature: a tiny Qwen2 (built from
a config, random weights) is trained for a few hundred steps on solutions
written by the noisy solver of :func:`tre_lightning.tasks.embedded.puzzles.noisy_solution`
(never on the validation puzzles), so that it starts PPO with a modest
success rate. The result is saved as an ordinary HF model folder in a cache
directory, under a key that hashes everything that determines it (its
configuration, the task family and validation split, a format version); any
later run with the same settings loads it instead of training again. A sweep
therefore pays for the warm start once.

The same mechanism serves the tail-risk family (:class:`~tre_lightning.tasks.embedded.repeat.RepeatTask`):
a task with ``warm_start_key()`` and ``warm_start_rows(cfg, tokenizer)`` supplies
its own key payload and supervised rows; the sorting task keeps its original
key and data (so existing caches stay valid).

Cache directory: ``cache_dir`` if given, else ``$TRE_LIGHTNING_CACHE``, else
``~/.cache/tre_lightning``; the model lives in ``<cache>/warmstart-<key>/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tre_lightning.checks import ArgumentError
from tre_lightning.models.tiny import tiny_qwen2_config
from tre_lightning.tasks.embedded.puzzles import Puzzle, generate, noisy_solution
from tre_lightning.tasks.embedded.task import EmbeddedTask
from tre_lightning.tasks.embedded.tokenizer import quickstart_tokenizer
from tre_lightning.tasks.embedded.repeat import RepeatTask

__all__ = ["CACHE_VERSION", "WarmStartConfig", "WarmStartSource", "default_cache_dir", "train_warm_start"]

CACHE_VERSION = 1
"""Bumped whenever the warm-start procedure changes, so old caches are not reused."""

_INFO = "warmstart.json"


def default_cache_dir() -> Path:
    """``$TRE_LIGHTNING_CACHE`` or ``~/.cache/tre_lightning``."""
    env = os.environ.get("TRE_LIGHTNING_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tre_lightning"


@dataclass(frozen=True)
class WarmStartConfig:
    """Model size and supervised phase of the warm start.

    Attributes:
        vocab_size: tokenizer / model vocabulary (42 useful tokens + fillers).
        hidden_size, num_hidden_layers, num_attention_heads,
            num_key_value_heads, intermediate_size, max_position_embeddings:
            the Qwen2 sizes.
        init_std: std of the random initial weights.
        steps: supervised optimizer steps, >= 1.
        batch_size: sequences per step, >= 1.
        lr: peak AdamW learning rate (linear warm-up, then linear decay to 0).
        warmup_steps: linear warm-up steps, >= 0.
        weight_decay: AdamW weight decay, >= 0.
        max_grad_norm: gradient-norm clip, > 0.
        merge_prob: the noisy solver writes a run of repeated digits once with
            this probability (the warm start's systematic mistake).
        token_noise: per-digit probability of a random digit (slips).
        seed: weights, data order and noise.
    """

    vocab_size: int = 4096
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 128
    init_std: float = 0.02
    steps: int = 800
    batch_size: int = 64
    lr: float = 1e-2
    warmup_steps: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    merge_prob: float = 0.5
    token_noise: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "max_position_embeddings", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"WarmStartConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("warmup_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"WarmStartConfig.{name} must be an int >= 0, got {value!r}")
        for name, low_open in (("init_std", True), ("lr", True), ("max_grad_norm", True), ("weight_decay", False)):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or (value <= 0 if low_open else value < 0):
                raise ValueError(f"WarmStartConfig.{name} must be a finite number {'>' if low_open else '>='} 0, "
                                 f"got {value!r}")
        for name in ("merge_prob", "token_noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"WarmStartConfig.{name} must be in [0, 1], got {value!r}")


def cache_key(cfg: WarmStartConfig, task: EmbeddedTask | RepeatTask) -> str:
    """16 hex digits of a SHA-256 over the warm start's config, what its data depends on
    (the sorting task: its family and validation split; a task with ``warm_start_key``:
    that dict) and CACHE_VERSION."""
    if isinstance(task, EmbeddedTask):
        tc = task.config()
        task_payload = {k: tc[k] for k in ("seed", "n_val", "min_len", "max_len", "descending_fraction")}
    else:
        task_payload = task.warm_start_key()
    payload = {
        "version": CACHE_VERSION,
        "warmstart": asdict(cfg),
        "task": task_payload,
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class _PromptEncoder:
    """Token ids of a chat-templated prompt, without one Jinja render per example.

    Renders the template once around a sentinel and checks the shortcut against
    ``apply_chat_template`` on a probe prompt (character tokenizer: text and
    ids split the same way).
    """

    _SENTINEL = "\x00"

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tok = tokenizer
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": self._SENTINEL}], add_generation_prompt=True, tokenize=False
        )
        self.prefix, self.suffix = text.split(self._SENTINEL)
        probe = "sort 0123"
        want = _ids(tokenizer.apply_chat_template([{"role": "user", "content": probe}],
                                                  add_generation_prompt=True, tokenize=True))
        if self(probe) != want:
            raise RuntimeError("the prompt shortcut does not match apply_chat_template for this tokenizer")

    def __call__(self, content: str) -> list[int]:
        return list(self.tok(self.prefix + content + self.suffix, add_special_tokens=False)["input_ids"])


def _ids(encoded: Any) -> list[int]:
    """transformers 5 returns a BatchEncoding (dict) from apply_chat_template(tokenize=True)."""
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def _sorting_rows(cfg: WarmStartConfig, task: EmbeddedTask,
                  tokenizer: PreTrainedTokenizerBase) -> Iterator[tuple[str, list[int]]]:
    """(prompt content, target ids) of the sorting family: noisy solutions + end of sequence."""
    eos = tokenizer.eos_token_id
    char_ids = {c: tokenizer.convert_tokens_to_ids(c) for c in "0123456789"}
    rng = random.Random(f"tre-lightning/quickstart/warmstart-noise/{cfg.seed}")
    for p in puzzles_for_warm_start(cfg, task):
        answer = noisy_solution(p, rng, cfg.merge_prob, cfg.token_noise)
        yield p.prompt, [char_ids[c] for c in answer] + [eos]


def _rows(cfg: WarmStartConfig, task: EmbeddedTask | RepeatTask,
          tokenizer: PreTrainedTokenizerBase) -> Iterator[tuple[str, list[int]]]:
    if isinstance(task, EmbeddedTask):
        return _sorting_rows(cfg, task, tokenizer)
    return task.warm_start_rows(cfg, tokenizer)


def _batches(
    cfg: WarmStartConfig, task: EmbeddedTask | RepeatTask, tokenizer: PreTrainedTokenizerBase
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask, labels) batches, left-padded, labels on the response only."""
    encode = _PromptEncoder(tokenizer)
    pad = tokenizer.pad_token_id
    rows_iter = _rows(cfg, task, tokenizer)
    while True:
        rows: list[tuple[list[int], list[int]]] = []
        for prompt, target in rows_iter:
            rows.append((encode(prompt), target))
            if len(rows) == cfg.batch_size:
                break
        if not rows:
            return
        width = max(len(a) + len(b) for a, b in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (a, b) in enumerate(rows):
            off = width - len(a) - len(b)
            ids[i, off:] = torch.tensor(a + b)
            mask[i, off:] = 1
            labels[i, off + len(a):] = torch.tensor(b)
        yield ids, mask, labels
        if len(rows) < cfg.batch_size:
            return


def train_warm_start(
    cfg: WarmStartConfig,
    task: EmbeddedTask | RepeatTask,
    log: Callable[[str], None] | None = print,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Train the warm start in memory (no cache); returns (model, tokenizer, info).

    ``info`` has the final loss (mean of the last 50 steps), the wall time and
    the step count. Uses the global torch thread settings.
    """
    from transformers import Qwen2ForCausalLM

    tokenizer = quickstart_tokenizer(cfg.vocab_size)
    config = tiny_qwen2_config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.initializer_range = cfg.init_std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        return warm * max(0.0, 1.0 - step / cfg.steps)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses: list[float] = []
    t0 = time.perf_counter()
    every = max(1, cfg.steps // 8)
    for step, (ids, mask, labels) in enumerate(_batches(cfg, task, tokenizer)):
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        target = labels[:, 1:]
        keep = target != -100
        logits = model.lm_head(hidden[:, :-1][keep])  # the LM head on response positions only
        loss = torch.nn.functional.cross_entropy(logits.float(), target[keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(float(loss.detach()))
        if log is not None and ((step + 1) % every == 0 or step == 0):
            log(f"[warm start] step {step + 1}/{cfg.steps}  loss {losses[-1]:.3f}  "
                f"{time.perf_counter() - t0:.0f}s")
    model.eval()
    tail = losses[-50:]
    info = {
        "steps": len(losses),
        "final_loss": sum(tail) / len(tail),
        "train_seconds": time.perf_counter() - t0,
        "config": asdict(cfg),
        "task": task.config(),
        "version": CACHE_VERSION,
    }
    return model, tokenizer, info


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock file (POSIX ``flock``; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _complete(folder: Path) -> bool:
    return (folder / _INFO).is_file() and (folder / "config.json").is_file()


def ensure_warm_start(
    cfg: WarmStartConfig,
    task: EmbeddedTask | RepeatTask,
    cache_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = print,
) -> Path:
    """The cached warm-start folder for (cfg, task): trained and saved on first use.

    Concurrent callers wait on a lock file; the folder appears atomically
    (trained in a temporary folder, then renamed).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(cfg, task)
    folder = root / f"warmstart-{key}"
    if _complete(folder):
        return folder
    with _locked(root / f"warmstart-{key}.lock"):
        if _complete(folder):
            return folder
        if log is not None:
            log(f"[warm start] no cached warm start for key {key}: training one "
                f"({cfg.steps} supervised steps on noisy solutions); it will be saved to {folder}")
        model, tokenizer, info = train_warm_start(cfg, task, log=log)
        tmp = root / f".tmp-warmstart-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
        if folder.exists():  # an incomplete leftover
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        if log is not None:
            log(f"[warm start] done in {info['train_seconds']:.0f}s (final loss {info['final_loss']:.3f}); "
                f"cached in {folder}")
    return folder


class WarmStartSource:
    """Model source of the embedded quickstart: the cached warm start (trained on first use).

    Implements the :class:`~tre_lightning.models.source.ModelSource` protocol:
    ``tokenizer()`` is the quickstart's character tokenizer with fillers,
    ``causal_lm()`` a new copy of the warm-started tiny Qwen2 (actor and
    critic backbone start from it, as the paper's critic starts from the
    Instruct model).

    Args:
        task: the embedded task whose family it learns and whose validation
            puzzles it never sees; None = the task the run trains on (the
            module binds it, :meth:`bind_task`).
        cache_dir: where warm starts are cached (default
            ``$TRE_LIGHTNING_CACHE`` or ``~/.cache/tre_lightning``).
        vocab_size … seed: :class:`WarmStartConfig` fields.
        verbose: print progress of a warm start that has to be trained.
        torch_threads: sets ``torch.set_num_threads`` for the process when the
            model is first built or trained (None leaves torch's default). The tiny model runs fastest on
            one thread: each operation is too small to split, and on a 2-core
            machine that is also busy with other work, two threads made a PPO
            iteration 5-50x slower in our measurements (docs/quickstart.md).
    """

    def __init__(
        self,
        task: EmbeddedTask | RepeatTask | None = None,
        cache_dir: str | None = None,
        vocab_size: int = 4096,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        intermediate_size: int = 128,
        max_position_embeddings: int = 128,
        init_std: float = 0.02,
        steps: int = 800,
        batch_size: int = 64,
        lr: float = 1e-2,
        warmup_steps: int = 50,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        merge_prob: float = 0.5,
        token_noise: float = 0.05,
        seed: int = 0,
        verbose: bool = True,
        torch_threads: int | None = 1,
    ) -> None:
        if task is not None and not isinstance(task, EmbeddedTask | RepeatTask):
            raise TypeError(f"WarmStartSource.task must be an EmbeddedTask or a RepeatTask, got {type(task).__name__}")
        if torch_threads is not None and (
            isinstance(torch_threads, bool) or not isinstance(torch_threads, int) or torch_threads < 1
        ):
            raise ValueError(f"WarmStartSource.torch_threads must be an int >= 1 or None, got {torch_threads!r}")
        self.task: EmbeddedTask | RepeatTask | None = task
        self.cache_dir = cache_dir
        self.config = WarmStartConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            init_std=init_std,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup_steps=warmup_steps,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            merge_prob=merge_prob,
            token_noise=token_noise,
            seed=seed,
        )
        self.verbose = verbose
        self._tokenizer = quickstart_tokenizer(vocab_size)
        self._folder: Path | None = None
        self.torch_threads = torch_threads

    def bind_task(self, task: Any) -> None:
        """Learn the family of the run's ``task`` (and never its validation puzzles).

        Raises:
            ArgumentError: the source was given another task (its warm start
                could contain the run's validation puzzles) or a task that is
                not an ``EmbeddedTask`` or ``RepeatTask``.
        """
        if not isinstance(task, EmbeddedTask | RepeatTask):
            raise ArgumentError("task", "an EmbeddedTask or a RepeatTask (the warm start learns its family)", task)
        if self.task is not None and self.task is not task and self.task.config() != task.config():
            raise ArgumentError("task", f"the run's task {task!r} or null (a warm start trained on another task "
                                        "may have seen the run's validation puzzles)", self.task)
        self.task = task

    def _task(self) -> EmbeddedTask | RepeatTask:
        if self.task is None:
            raise RuntimeError("WarmStartSource has no task: pass task=EmbeddedTask(...) or build it into a "
                               "PPOModule, which binds the module's task")
        return self.task

    @property
    def key(self) -> str:
        """The cache key of this warm start."""
        return cache_key(self.config, self._task())

    def _apply_threads(self) -> None:
        if self.torch_threads is not None and torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)

    def path(self) -> Path:
        """The cached folder (trains the warm start if it is missing)."""
        self._apply_threads()
        if self._folder is None or not _complete(self._folder):
            self._folder = ensure_warm_start(self.config, self._task(), self.cache_dir,
                                             log=_stderr_print if self.verbose else None)
        return self._folder

    def info(self) -> dict[str, Any]:
        """What was recorded when the warm start was trained (loss, seconds, config)."""
        return json.loads((self.path() / _INFO).read_text())

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    def causal_lm(self) -> PreTrainedModel:
        from transformers import Qwen2ForCausalLM

        model = Qwen2ForCausalLM.from_pretrained(self.path(), local_files_only=True, dtype=torch.float32)
        model.generation_config.pad_token_id = self._tokenizer.pad_token_id
        model.generation_config.eos_token_id = self._tokenizer.eos_token_id
        return model

    def __repr__(self) -> str:
        c = self.config
        key = self.key if self.task is not None else "<task not bound>"
        return (f"WarmStartSource(key={key}, vocab={c.vocab_size}, hidden={c.hidden_size}, "
                f"layers={c.num_hidden_layers}, steps={c.steps}, merge_prob={c.merge_prob}, "
                f"token_noise={c.token_noise})")


def _stderr_print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def puzzles_for_warm_start(cfg: WarmStartConfig, task: EmbeddedTask) -> list[Puzzle]:
    """The supervised puzzles (for inspection and tests): disjoint from the validation split."""
    return generate(cfg.steps * cfg.batch_size, cfg.seed, task.min_len, task.max_len, task.descending_fraction,
                    exclude=task.val_puzzles(), stream="warmstart")
