"""Reward functions that fail never stop or hang the run; model output never breaks decoding or scoring.

* :class:`RewardGuard`: an exception costs 0 for the responses that cause it,
  a hang costs 0 after ``timeout`` seconds, wrong lengths and non-finite
  values become counted zeros; the run goes on (also inside ``PPOModule``).
  The isolation modes themselves (worker process vs thread, exits,
  interrupts, orphans) are in ``test_reward_guard_process.py``.
* Fuzz of the rollout decoding path: arbitrary token ids (outside the
  tokenizer's vocabulary, eos and pad anywhere, empty and full-length
  responses) through the HF engine's post-processing, the module's decoding
  and every task's ``score`` (each through the guard, in the isolation it
  gets by default): no exception escapes and no call fails or times out.

No assertion here is about elapsed time: the time limits that must not fire
are far above what a call needs on a loaded machine, and the ones that must
fire are checked by their counters.
"""

from __future__ import annotations

import math
import threading
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch import Callback
from test_module_support import CharTask, fit, tiny_module, tiny_source, trainer
from test_reward_guard_support import Scripted

from tre_lightning.training.config import RolloutConfig
from tre_lightning.rollout.base import SamplingParams
from tre_lightning.rollout.hf import HFGenerateEngine
from tre_lightning.tasks.guard import MAX_ABANDONED, RewardGuard, decode_responses

# --------------------------------------------------------------------------- RewardGuard


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_an_exception_zeroes_only_the_responses_that_raise(isolation: str) -> None:
    guard = RewardGuard(Scripted("raise_on_boom"), timeout=600.0, isolation=isolation)
    with pytest.warns(RuntimeWarning, match=r"2 of 4 responses scored 0 .*\(2 errors"):
        report = guard.score([{}] * 4, ["ab", "boom", "abc", "xboom"])
    assert report.rewards == [2.0, 0.0, 3.0, 0.0]
    assert (report.errors, report.timeouts, report.invalid, report.failures) == (2, 0, 0, 2)
    assert report.metrics()["reward/failures"] == 2.0


def test_an_exception_everywhere_scores_zero() -> None:
    guard = RewardGuard(Scripted("raise"), timeout=None)
    with pytest.warns(RuntimeWarning):
        report = guard.score([{}] * 3, ["a", "b", "c"])
    assert report.rewards == [0.0] * 3 and report.errors == 3


def test_a_hang_is_cut_at_the_time_limit_and_later_calls_stay_bounded() -> None:
    """Thread isolation: a hung call is abandoned at the limit (time-outs); once ``MAX_ABANDONED`` are stuck,
    later calls skip the task (also time-outs) until the stuck calls end.

    Checked against: no skip (the task is called for every batch: ``task.calls`` grows past MAX_ABANDONED)."""
    task = Scripted("hang")
    guard = RewardGuard(task, timeout=0.3, isolation="thread")
    try:
        for call in range(MAX_ABANDONED + 2):
            with pytest.warns(RuntimeWarning, match="time-outs"):
                report = guard.score([{}] * 2, ["a", "b"])
            assert report.rewards == [0.0, 0.0] and report.timeouts == 2
            assert ("skipped" in report.messages[0]) == (call >= MAX_ABANDONED)
        assert guard.totals["timeouts"] == 2 * (MAX_ABANDONED + 2)
    finally:
        task.release.set()
    for thread in list(guard._abandoned):
        thread.join()
    assert task.calls == MAX_ABANDONED  # the skipped batches never reached the task
    assert guard._stuck() == 0  # released: the task is called again
    task.mode = "ok"
    assert guard.score([{}], ["abc"]).rewards == [3.0] and task.calls == MAX_ABANDONED + 1


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_wrong_length_and_non_finite_values_become_counted_zeros(isolation: str) -> None:
    with pytest.warns(RuntimeWarning, match="returned 2 rewards for 3 responses"):
        report = RewardGuard(Scripted("short"), isolation=isolation).score([{}] * 3, ["a", "b", "c"])
    assert report.rewards == [0.0] * 3 and report.invalid == 3
    with pytest.warns(RuntimeWarning, match="a non-sequence"):
        report = RewardGuard(Scripted("none"), isolation=isolation).score([{}] * 2, ["a", "b"])
    assert report.rewards == [0.0, 0.0] and report.invalid == 2
    with pytest.warns(RuntimeWarning, match="5 rewards were not finite numbers"):
        report = RewardGuard(Scripted("odd_values"), isolation=isolation).score([{}] * 8, ["x"] * 8)
    assert report.rewards == [0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 2.0]
    assert report.invalid == 5 and all(math.isfinite(r) for r in report.rewards)


def test_grader_counters_are_reported_as_deltas_and_gradients_are_off() -> None:
    task = Scripted("grader_counters")
    guard = RewardGuard(task, timeout=600.0, isolation="thread")  # the worker process: test_reward_guard_process
    with torch.enable_grad():
        report = guard.score([{}] * 2, ["a", "bb"])
    assert report.rewards == [1.0, 2.0] and report.failures == 0
    assert (report.grader_timeouts, report.grader_errors) == (2, 1)
    assert task.grad_enabled == [False]  # scored without autograd, also in the worker thread


def test_guard_arguments_are_validated() -> None:
    for bad in (0, -1.0, math.inf, "10"):
        with pytest.raises(ValueError, match="timeout must be"):
            RewardGuard(Scripted("ok"), timeout=bad)


# --------------------------------------------------------------------------- inside the module


class Record(Callback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.append(dict(outputs["metrics"]))


class Failing(CharTask):
    """CharTask whose score raises, hangs or returns NaN on every call (in a thread: the module's process
    path is in ``test_reward_guard_module.py``)."""

    score_isolation = "thread"

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.release = threading.Event()

    def score(self, examples, responses):
        if self.mode == "raise":
            raise RuntimeError("reward worker died")
        if self.mode == "hang":
            self.release.wait(60)
        if self.mode == "nan":
            return [math.nan] * len(responses)
        return super().score(examples, responses)


@pytest.mark.parametrize(("mode", "counter"), [("raise", "reward/score_errors"), ("hang", "reward/score_timeouts"),
                                               ("nan", "reward/invalid")])
def test_training_goes_on_when_the_reward_function_fails(mode: str, counter: str) -> None:
    task = Failing(mode)
    module = tiny_module(task, batch_size=4, mini_batch_size=2, n=2, max_new_tokens=6, score_timeout=0.3)
    module.configure_model()
    before = {k: v.detach().clone() for k, v in module.model.critic.state_dict().items()}
    record = Record()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = trainer(max_steps=3, callbacks=[record], limit_val_batches=1, val_check_interval=3,
                        check_val_every_n_epoch=None)
            fit(t, module)
    finally:
        task.release.set()
    assert t.global_step == 3
    sequences = 4 * 2
    for m in record.metrics:
        assert m["reward/failures"] == sequences and m[counter] == sequences
        assert m["reward/mean"] == 0.0
        assert m["train/nonfinite_skips"] == 0.0
    assert any("scored 0 because the reward function failed" in str(w.message) for w in caught)
    # the critic still learned (returns are 0, values were not): the update ran with finite numbers
    assert any(not torch.equal(before[k], v) for k, v in module.model.critic.state_dict().items())
    assert all(torch.isfinite(v).all() for v in module.model.actor.state_dict().values())
    assert math.isfinite(float(t.callback_metrics["val/reward"]))  # validation scored through the guard too


def test_healthy_rewards_report_no_failures() -> None:
    record = Record()
    fit(trainer(max_steps=1, callbacks=[record]), tiny_module(CharTask(), batch_size=4, mini_batch_size=2))
    m = record.metrics[0]
    for name in ("reward/failures", "reward/score_errors", "reward/score_timeouts", "reward/invalid",
                 "reward/grader_timeouts", "reward/grader_errors", "reward/decode_failures"):
        assert m[name] == 0.0, name


# --------------------------------------------------------------------------- fuzzing the decoding path


class ScriptedModel(torch.nn.Module):
    """Stands in for the actor in ``HFGenerateEngine``: ``generate`` appends given response tokens."""

    def __init__(self, vocab_size: int, eos: int, pad: int) -> None:
        super().__init__()
        from transformers import GenerationConfig

        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
        self.vocab_size = vocab_size
        self.response: torch.Tensor | None = None

    def generate(self, input_ids, attention_mask, generation_config, synced_gpus):
        assert generation_config.max_new_tokens >= self.response.shape[1]
        return torch.cat([input_ids, self.response.to(input_ids.dtype)], dim=1)


def _tasks():
    from tre_lightning.tasks.embedded import EmbeddedTask
    from tre_lightning.tasks import CountdownTask, MathTask

    countdown = CountdownTask(train_size=4, val_size=4)
    embedded = EmbeddedTask(n_train=4, n_val=4)
    math_task = MathTask(use_math_verify=False)
    return [
        (countdown, list(countdown.train_examples())),
        (embedded, list(embedded.train_examples())),
        (math_task, [{"problem": "1+1?", "solution": "\\boxed{2}"}, {"problem": "x", "solution": "\\boxed{\\frac12}"}]),
    ]


_SOURCE = tiny_source(n_filler=8)
_TOKENIZER = _SOURCE.tokenizer()
_VOCAB = len(_TOKENIZER) + 16  # the model's vocabulary is larger than the tokenizer's (as Qwen's is)
_EOS, _PAD = _TOKENIZER.eos_token_id, _TOKENIZER.pad_token_id
_TASKS = _tasks()
_GUARDS = [RewardGuard(task, timeout=600.0) for task, _ in _TASKS]  # a time-out here would be a failure
FUZZ_EXAMPLES = 300


def teardown_module() -> None:
    for guard in _GUARDS:
        guard.close()

SPECIAL = [_EOS, _PAD, 0, _VOCAB - 1, len(_TOKENIZER), len(_TOKENIZER) - 1]

token = st.one_of(st.integers(0, _VOCAB - 1), st.sampled_from(SPECIAL))


@st.composite
def rollouts(draw):
    prompts = draw(st.integers(1, 2))
    n = draw(st.integers(1, 3))
    max_new = draw(st.integers(1, 24))
    width = draw(st.integers(0, max_new))  # HF stops early when every row has finished
    rows = draw(st.lists(st.lists(token, min_size=width, max_size=width), min_size=prompts * n,
                         max_size=prompts * n))
    prompt_len = draw(st.integers(1, 6))
    pads = draw(st.lists(st.integers(0, prompt_len - 1), min_size=prompts, max_size=prompts))
    return prompts, n, max_new, width, rows, prompt_len, pads


def _run_decoding_path(case) -> None:
    prompts, n, max_new, width, rows, prompt_len, pads = case
    prompt_ids = torch.randint(4, len(_TOKENIZER), (prompts, prompt_len))
    prompt_mask = torch.ones(prompts, prompt_len, dtype=torch.long)
    for i, p in enumerate(pads):  # left padding
        prompt_mask[i, :p] = 0
        prompt_ids[i, :p] = _PAD
    model = ScriptedModel(_VOCAB, _EOS, _PAD)
    model.response = torch.tensor(rows, dtype=torch.long).reshape(prompts * n, width)
    engine = HFGenerateEngine(backend="generate")  # the scripted model answers generate() only
    engine.sync_weights(model)
    rollout = engine.generate(prompt_ids, prompt_mask, SamplingParams(n=n, max_new_tokens=max_new))
    # the engine's post-processing: mask up to and including the first eos, pad after it
    assert rollout.response_ids.shape[0] == prompts * n and rollout.response_mask.shape == rollout.response_ids.shape
    for row, mask, length in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist(),
                                 rollout.response_lengths.tolist(), strict=True):
        first_eos = row.index(_EOS) if _EOS in row else None
        expected = len(row) if first_eos is None else first_eos + 1
        assert length == expected == sum(mask) and mask == [1] * expected + [0] * (len(row) - expected)
        assert all(t == _PAD for t in row[expected:])
    texts, failed = decode_responses(_TOKENIZER, rollout.response_ids, rollout.response_lengths)
    assert len(texts) == prompts * n and failed == 0 and all(isinstance(t, str) for t in texts)
    for (task, examples), guard in zip(_TASKS, _GUARDS, strict=True):
        chosen = [examples[i % len(examples)] for i in range(len(texts))]
        report = guard.score(chosen, texts)
        assert report.failures == 0, report.messages  # no error, no time-out, no invalid value
        assert all(math.isfinite(r) for r in report.rewards) and len(report.rewards) == len(texts)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.data_too_large])
@given(case=rollouts())
def test_fuzz_rollout_decoding_and_scoring(case) -> None:
    _run_decoding_path(case)


def test_module_decoding_never_raises_on_bad_ids() -> None:
    """The loop's decoding: ids the tokenizer cannot decode (negative, huge) give '' for that row only."""
    module = tiny_module(CharTask())
    good = _TOKENIZER("ab", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[*good, _EOS], [-1, 5, 6], [2**40, 5, 6], [_VOCAB + 10**6, *good]])
    lengths = torch.tensor([3, 3, 3, 3])
    texts, failures = decode_responses(module.tokenizer, ids, lengths)
    assert texts[0] == "ab" and texts[3] == "ab"
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    assert failures == 0  # the out-of-range rows decoded after dropping the bad ids
    assert texts[1] == _TOKENIZER.decode(ids[1, 1:]) and texts[2] == _TOKENIZER.decode(ids[2, 1:])


def _hostile() -> list[str]:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_reliability_hostile", Path(__file__).parent / "tasks" /
                                                  "_task_hostile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.HOSTILE)


def test_hostile_strings_through_tokenizer_decoding_and_every_task() -> None:
    """The hostile corpus of the grader tests, as token ids through decode + score (the module's path)."""
    for text in _hostile():
        ids = _TOKENIZER(text[:20_000], add_special_tokens=False)["input_ids"]
        row = torch.tensor([ids + [_EOS]], dtype=torch.long) if ids else torch.tensor([[_EOS]])
        texts, failed = decode_responses(_TOKENIZER, row, torch.tensor([row.shape[1]]))
        assert failed == 0
        for (task, examples), guard in zip(_TASKS, _GUARDS, strict=True):
            for candidate in (texts[0], text):  # decoded, and the raw string itself
                report = guard.score(examples[:1], [candidate])
                assert report.failures == 0 and math.isfinite(report.rewards[0]), report.messages


# --------------------------------------------------------------------------- model text is never executed

_GRADER_SOURCES = ["tasks/countdown.py", "tasks/countdown_grader.py", "tasks/math.py", "tasks/math_grader.py",
                   "tasks/hh.py", "tasks/timeouts.py", "tasks/data_io.py", "quickstart/task.py",
                   "quickstart/puzzles.py", "scoring.py", "tasks/worker_process.py"]


def test_grader_code_has_no_eval_exec_or_unbounded_symbolic_parsing() -> None:
    """Static check of every module on the scoring path: no eval / exec / compile / __import__ calls, and
    sympy / math-verify are imported only by the helper process that runs under hard time and memory limits."""
    import ast
    from pathlib import Path

    import tre_lightning

    root = Path(tre_lightning.__file__).parent
    for rel in _GRADER_SOURCES:
        path = root / rel
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in {"eval", "exec", "compile", "__import__"}, f"{rel}:{node.lineno}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n and n.split(".")[0] in {"sympy", "math_verify", "latex2sympy2"} for n in names), \
                    f"{rel}:{node.lineno} imports a symbolic parser outside the sandboxed helper"
    worker = (root / "tasks" / "_symbolic_worker.py").read_text()
    assert "RLIMIT_AS" in worker and "ITIMER_PROF" in worker  # the helper's own memory and CPU-time caps


def test_code_in_model_output_is_never_run(tmp_path) -> None:
    """Responses that would create a file if any grader (or its helper process) evaluated them as Python."""
    from tre_lightning.tasks.embedded import EmbeddedTask
    from tre_lightning.tasks import CountdownTask, MathTask
    from tre_lightning.tasks.math_grader import math_verify_available

    def payload(i: int) -> str:
        return f"__import__('pathlib').Path({str(tmp_path / f'pwned{i}')!r}).touch()"

    wrappers = ["{}", "\\boxed{{{}}}", "<answer>{}</answer>", "$${}$$", "\\boxed{{\\text{{{}}}}}",
                "<answer>({})</answer>", "\\boxed{{x}} = \\boxed{{{}}}", "exec({!r})"]
    responses = [w.format(payload(i)) for i, w in enumerate(wrappers)]
    tasks = [(CountdownTask(train_size=1, val_size=1), {"nums": [1, 2], "target": 3}),
             (MathTask(use_math_verify=False), {"problem": "p", "solution": "\\boxed{2}"}),
             (EmbeddedTask(n_train=2, n_val=2), None)]
    if math_verify_available():
        tasks.append((MathTask(use_math_verify=True, time_limit=2.0), {"problem": "p", "solution": "\\boxed{2}"}))
    for task, example in tasks:
        example = example if example is not None else task.train_examples()[0]
        report = RewardGuard(task, timeout=30.0).score([example] * len(responses), responses)
        assert report.rewards == [0.0] * len(responses) and report.failures == 0
    assert list(tmp_path.iterdir()) == []


def test_tre_eval_scores_through_the_reward_guard() -> None:
    """``evaluate`` (tre-eval) guards ``task.score`` as training does: a raising reward scores 0, with a warning."""
    from tre_lightning.evaluation import EvalConfig, evaluate

    source = tiny_source()
    task = Failing("raise")
    cfg = EvalConfig(n=2, max_new_tokens=4, batch_size=4, max_examples=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = evaluate(source.causal_lm(), source.tokenizer(), task, cfg, max_prompt_length=64)
    assert out["val/reward"] == 0.0 and out["prompts"] == 3.0
    assert any("scored 0 because the reward function failed" in str(w.message) for w in caught)
