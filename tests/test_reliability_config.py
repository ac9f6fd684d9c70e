"""Bad configurations and bad data fail at once, with one clear error, before any model is built.

Every case of ``CASES`` goes through both entry points: Hydra (``compose`` +
``tre_lightning.cli.train.build``, what ``tre-train`` runs first) and the
Lightning CLI (``TRECLI`` with the arguments, in-process). A spy records every
HF model construction (``PreTrainedModel.__init__``, which ``from_pretrained``
and the tiny random models go through) and every tokenizer read from disk; it
must stay empty. (Building the objects themselves is allowed: every
constructor is cheap, and ``PPOModule`` builds its models only in
``configure_model``.) A few cases also run through
the real ``tre-train`` / ``tre-lightning`` processes, with the spy installed
by a ``sitecustomize`` (it records and exits with status 97 if a model is built);
a valid config shows that the spy does fire.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import HydraException

from tre_lightning.checks import ConfigError
from tre_lightning.cli.train import build as validate_config
from tre_lightning.tasks import DataError
from tre_lightning.training.data import check_task_data

HYDRA_BASE = [
    "model=tiny_random",
    "task=countdown",
    "task.train_size=16",
    "task.val_size=4",
    "regularizers=tre_p",
    "rollout=tiny",
    "ppo=tiny",
    "optim=tiny",
    "evaluation=tiny",
    "trainer=cpu",
    "trainer.max_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "export_hf=null",
    "validate_first=false",
]

CLI_BASE_YAML = """\
trainer:
  accelerator: cpu
  max_steps: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
model:
  model:
    policy:
      class_path: tre_lightning.models.TinyRandomSource
      init_args: {hidden_size: 32, intermediate_size: 64}
  task:
    class_path: tre_lightning.tasks.CountdownTask
    init_args: {train_size: 16, val_size: 4}
  regularizers:
    - class_path: tre_lightning.regularizers.TREP
      init_args: {coef: 0.001, top_p: 0.99}
  rollout: {n: 2, max_new_tokens: 8, max_prompt_length: 512}
  ppo: {batch_size: 4, mini_batch_size: 2, micro_batch_size: 2}
  evaluation: {n: 2, max_new_tokens: 8, batch_size: 2, max_examples: 4}
"""


@dataclass
class Case:
    """One bad configuration, as Hydra overrides and as Lightning CLI arguments.

    ``key``/``cli_key``: what the message must name (Hydra / CLI spelling);
    ``allowed``: the allowed range or values the message must state;
    ``hydra_allowed`` / ``cli_allowed``: where one entry point words it differently (a value of the wrong
    type is refused by jsonargparse's own type check, before our constructors: "expected int, got 'abc'").
    """

    id: str
    hydra: list[str]
    cli: list[str]
    key: str
    allowed: str
    cli_key: str | None = None
    hydra_allowed: str | None = None
    cli_allowed: str | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def expected_cli_key(self) -> str:
        if self.cli_key is not None:
            return self.cli_key
        if self.key.startswith(("model.", "trainer.")):
            return self.key
        if self.key.startswith("evaluation."):
            return "model.evaluation." + self.key[len("evaluation."):]
        return "model." + self.key


def _reg(class_name: str, **init_args: object) -> str:
    return "--model.regularizers=" + json.dumps(
        [{"class_path": f"tre_lightning.regularizers.{class_name}", "init_args": init_args}]
    )


CASES = [
    # rollout: out of range, wrong type, unknown choice
    Case("rollout.n=0", ["rollout.n=0"], ["--model.rollout.n=0"], "rollout.n", "an int >= 1"),
    Case("rollout.n=two", ["rollout.n=two"], ["--model.rollout.n=two"], "rollout.n", "an int >= 1",
         cli_allowed="expected int, got 'two'"),
    Case("rollout.temperature=0", ["rollout.temperature=0"], ["--model.rollout.temperature=0"],
         "rollout.temperature", "a finite number > 0"),
    Case("rollout.top_p=1.5", ["rollout.top_p=1.5"], ["--model.rollout.top_p=1.5"], "rollout.top_p", "in (0, 1]"),
    Case("rollout.top_k=-1", ["rollout.top_k=-1"], ["--model.rollout.top_k=-1"], "rollout.top_k", "an int >= 0"),
    Case("rollout.max_new_tokens=0", ["rollout.max_new_tokens=0"], ["--model.rollout.max_new_tokens=0"],
         "rollout.max_new_tokens", "an int >= 1"),
    Case("rollout.max_prompt_length=-5", ["rollout.max_prompt_length=-5"], ["--model.rollout.max_prompt_length=-5"],
         "rollout.max_prompt_length", "an int >= 1"),
    Case("rollout.prompt_overflow=drop", ["rollout.prompt_overflow=drop"], ["--model.rollout.prompt_overflow=drop"],
         "rollout.prompt_overflow", "['truncate_left', 'error']"),
    Case("rollout.score_timeout=0", ["rollout.score_timeout=0"], ["--model.rollout.score_timeout=0"],
         "rollout.score_timeout", "a finite number > 0 or null"),
    # PPO: batch geometry, clipping, GAE, choices, counters, types
    Case("ppo.batch_size=0", ["ppo.batch_size=0"], ["--model.ppo.batch_size=0"], "ppo.batch_size", "an int >= 1"),
    Case("ppo.batch_size=abc", ["ppo.batch_size=abc"], ["--model.ppo.batch_size=abc"], "ppo.batch_size",
         "an int >= 1", cli_allowed="expected int, got 'abc'"),
    Case("ppo.batch_size=2.5", ["ppo.batch_size=2.5"], ["--model.ppo.batch_size=2.5"], "ppo.batch_size",
         "an int >= 1", cli_allowed="expected int, got '2.5'"),
    Case("mini-batch does not divide the batch", ["ppo.mini_batch_size=3"], ["--model.ppo.mini_batch_size=3"],
         "ppo.mini_batch_size", "a divisor of batch_size (4)"),
    Case("micro-batch larger than the mini-batch", ["ppo.micro_batch_size=64"], ["--model.ppo.micro_batch_size=64"],
         "ppo.micro_batch_size", "ppo.mini_batch_size × rollout.n = 2 × 2 = 4"),
    Case("ppo.ppo_epochs=0", ["ppo.ppo_epochs=0"], ["--model.ppo.ppo_epochs=0"], "ppo.ppo_epochs", "an int >= 1"),
    Case("clip eps < 0", ["ppo.clip_ratio_low=-0.1"], ["--model.ppo.clip_ratio_low=-0.1"], "ppo.clip_ratio_low",
         "in [0, 1)"),
    Case("ppo.clip_ratio_high=-1", ["ppo.clip_ratio_high=-1"], ["--model.ppo.clip_ratio_high=-1"],
         "ppo.clip_ratio_high", "a finite number >= 0"),
    Case("ppo.dual_clip=0.5", ["ppo.dual_clip=0.5"], ["--model.ppo.dual_clip=0.5"], "ppo.dual_clip", "a finite number > 1 or null"),
    Case("ppo.gamma=1.5", ["ppo.gamma=1.5"], ["--model.ppo.gamma=1.5"], "ppo.gamma", "in [0, 1]"),
    Case("ppo.lam=-0.1", ["ppo.lam=-0.1"], ["--model.ppo.lam=-0.1"], "ppo.lam", "in [0, 1]"),
    Case("ppo.loss_aggregation=mean", ["ppo.loss_aggregation=mean"], ["--model.ppo.loss_aggregation=mean"],
         "ppo.loss_aggregation", "'token-mean', 'seq-mean-token-sum'"),
    Case("ppo.kl_coef=-1", ["ppo.kl_coef=-1"], ["--model.ppo.kl_coef=-1"], "ppo.kl_coef", "a finite number >= 0"),
    Case("ppo.kl_estimator=k9", ["ppo.kl_estimator=k9"], ["--model.ppo.kl_estimator=k9"], "ppo.kl_estimator",
         "['k1', 'abs', 'k2', 'k3']"),
    Case("ppo.max_consecutive_nonfinite=0", ["ppo.max_consecutive_nonfinite=0"],
         ["--model.ppo.max_consecutive_nonfinite=0"], "ppo.max_consecutive_nonfinite", "an int >= 1"),
    Case("ppo.shuffle=maybe", ["ppo.shuffle=maybe"], ["--model.ppo.shuffle=maybe"], "ppo.shuffle", "true or false",
         cli_allowed="expected bool, got 'maybe'"),
    Case("ppo.value_clip_range=0", ["ppo.value_clip_range=0"], ["--model.ppo.value_clip_range=0"],
         "ppo.value_clip_range", "a finite number > 0 or null"),
    # optimizer
    Case("optim.actor_lr=0", ["optim.actor_lr=0"], ["--model.optim.actor_lr=0"], "optim.actor_lr", "a finite number > 0"),
    Case("optim.betas=[0.9]", ["optim.betas=[0.9]"], ["--model.optim.betas=[0.9]"], "optim.betas",
         "a pair [beta1, beta2]"),
    Case("optim.warmup_ratio=1.0", ["optim.warmup_ratio=1.0"], ["--model.optim.warmup_ratio=1.0"],
         "optim.warmup_ratio", "in [0, 1)"),
    Case("optim.schedule=exp", ["optim.schedule=exp"], ["--model.optim.schedule=exp"], "optim.schedule",
         "['constant', 'linear', 'cosine']"),
    # evaluation: n < 1, and the group-based pass@k needs k <= n samples per prompt
    Case("evaluation.n=0", ["evaluation.n=0"], ["--model.evaluation.n=0"], "evaluation.n", "an int >= 1"),
    Case("pass@k with k > n samples", ["evaluation.pass_k=[4]"], ["--model.evaluation.pass_k=[4]"], "evaluation.pass_k",
         "list of ints in [1, 2]"),
    Case("evaluation.top_p=0", ["evaluation.top_p=0"], ["--model.evaluation.top_p=0"], "evaluation.top_p", "in (0, 1]"),
    Case("evaluation.max_new_tokens=0", ["evaluation.max_new_tokens=0"], ["--model.evaluation.max_new_tokens=0"],
         "evaluation.max_new_tokens", "an int >= 1"),
    # regularizers: out of range, unknown name
    Case("TRE-P with P = 1.5", ["regularizers.tre_p.top_p=1.5"], [_reg("TREP", coef=0.001, top_p=1.5)],
         "regularizers.tre_p.top_p", "(0, 1]", cli_key="model.regularizers[0].top_p"),
    Case("TRE-K with K = 0", ["regularizers=tre_k", "regularizers.tre_k.top_k=0"], [_reg("TREK", top_k=0)],
         "regularizers.tre_k.top_k", "an int >= 1", cli_key="model.regularizers[0].top_k"),
    Case("Ent with coef < 0", ["regularizers=ent", "regularizers.ent.coef=-1"], [_reg("Ent", coef=-1)],
         "regularizers.ent.coef", ">= 0", cli_key="model.regularizers[0].coef"),
    Case("KL-Cov unknown estimator", ["regularizers=kl_cov", "regularizers.kl_cov.kl_estimator=k9"],
         [_reg("KLCov", kl_estimator="k9")], "regularizers.kl_cov.kl_estimator",
         "one of ['k1', 'abs', 'k3']", cli_key="model.regularizers",
         cli_allowed="Literal['k1', 'abs', 'k3']"),
    Case("unknown regularizer name", ["+regularizers.foo._target_=tre_lightning.regularizers.Foo"],
         ["--model.regularizers+=tre_lightning.regularizers.Foo"], "regularizers.foo",
         "tre_lightning.regularizers.Foo", cli_key="model.regularizers",
         hydra_allowed="tre_lightning.regularizers has no 'Foo' (it has: ClipCov, Ent, ForkingTokens"),
    Case("unknown regularizer option", ["regularizers=foo"], [_reg("Nope")], "regularizers",
         "tre_lightning.regularizers.Nope", cli_key="model.regularizers",
         hydra_allowed="Available options in 'regularizers'"),
    # model sources
    Case("missing model path", ["model=pretrained"], ["--model.model.policy=tre_lightning.models.PretrainedSource"],
         "model.policy.path", "required"),
    Case("model path does not exist", ["model=pretrained", "model.policy.path=/nonexistent/model"],
         ["--model.model.policy=tre_lightning.models.PretrainedSource",
          "--model.model.policy.path=/nonexistent/model"],
         "model.policy.path", "expected a local HF model folder"),
    Case("unknown source argument", ["+model.policy.bogus=1"], ["--model.model.policy.init_args.bogus=1"],
         "model.policy.bogus", "unknown argument"),
    Case("share_backbone with a critic",
         ["model.share_backbone=true", "model.critic={_target_:tre_lightning.models.TinyRandomSource}"],
         ["--model.model.share_backbone=true", "--model.model.critic=tre_lightning.models.TinyRandomSource"],
         "model.critic", "null when share_backbone is true"),
    # task
    Case("task.max_response_tokens=0", ["task.max_response_tokens=0"],
         ["--model.task.init_args.max_response_tokens=0"], "task.max_response_tokens", ">= 1"),
    Case("task.train_path does not exist", ["task.train_path=/nonexistent/train.jsonl"],
         ["--model.task.init_args.train_path=/nonexistent/train.jsonl"], "task.train_path", "does not exist"),
    Case("MATH without its data files", ["task=math"], ["--model.task=tre_lightning.tasks.MathTask"],
         "task.train_path", "required for MathTask"),
    Case("task.train_size=0", ["task.train_size=0"], ["--model.task.init_args.train_size=0"], "task.train_size",
         ">= 1"),
    # run-level
    Case("fp16 precision", ["trainer.precision=16-mixed"], ["--trainer.precision=16-mixed"], "trainer.precision",
         "32-true, bf16-mixed or bf16-true"),
    Case("seed=-1", ["seed=-1"], ["--model.seed=-1"], "seed", "an int in [0, 4294967295]", cli_key="model.seed"),
]
assert len(CASES) >= 25


# --------------------------------------------------------------------------- the spy


class _Spy:
    def __init__(self) -> None:
        self.calls: list[str] = []


@pytest.fixture
def spy(monkeypatch) -> _Spy:
    """Records every model construction and tokenizer load from disk."""
    import transformers
    from transformers import PreTrainedModel

    record = _Spy()
    model_init = PreTrainedModel.__init__
    tok_load = transformers.AutoTokenizer.from_pretrained

    @functools.wraps(model_init)
    def spy_model(self, *args, **kwargs):
        record.calls.append(f"model {type(self).__name__}")
        return model_init(self, *args, **kwargs)

    @functools.wraps(tok_load)
    def spy_tokenizer(*args, **kwargs):
        record.calls.append("tokenizer")
        return tok_load(*args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "__init__", spy_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy_tokenizer)
    return record


@pytest.fixture(scope="module")
def hydra_ctx():
    with initialize_config_module(config_module="tre_lightning.conf", version_base="1.3"):
        yield


def _compose(overrides: list[str], tmp_path: Path):
    return compose("train", overrides=[f"output_dir={tmp_path}", *HYDRA_BASE, *overrides])


@pytest.fixture
def cli_config(tmp_path) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(CLI_BASE_YAML)
    return path


def _cli(config: Path, args: list[str]):
    from tre_lightning.cli.lightning import run

    return run(["fit", "--config", str(config), *args])


def _assert_clear(message: str, key: str, allowed: str) -> None:
    assert key in message, f"key {key!r} not named in: {message}"
    assert allowed in message, f"allowed values {allowed!r} not stated in: {message}"
    assert "Traceback" not in message
    assert len(message) < 800


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_config_hydra(case: Case, spy: _Spy, hydra_ctx, tmp_path) -> None:
    try:
        cfg = _compose(case.hydra, tmp_path)
    except HydraException as err:  # an unknown group option: Hydra's own error at composition
        assert case.hydra_allowed is not None, f"composition failed unexpectedly: {err}"
        _assert_clear(str(err), case.key, case.hydra_allowed)
    else:
        with pytest.raises(ConfigError) as info:
            validate_config(cfg)
        _assert_clear(str(info.value), case.key, case.hydra_allowed or case.allowed)
        assert info.value.key.startswith(case.key)
        assert "\n" not in str(info.value)
    assert spy.calls == []


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_config_lightning_cli(case: Case, spy: _Spy, cli_config, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        _cli(cli_config, case.cli)
    _assert_clear(str(info.value), case.expected_cli_key, case.cli_allowed or case.allowed)
    assert "\n" not in str(info.value)
    assert spy.calls == []


TRAINER_CASES = [
    Case("trainer.max_steps=-5", ["trainer.max_steps=-5"], ["--trainer.max_steps=-5"], "trainer",
         "must be a non-negative integer or -1", cli_key="trainer"),
    Case("callback argument out of range", ["callbacks.samples.every_n_steps=0"],
         ["--trainer.callbacks+=tre_lightning.callbacks.SampleLogger", "--trainer.callbacks.every_n_steps=0"],
         "callbacks.samples.every_n_steps", "must be an int >= 1, got 0", cli_key="trainer.callbacks[0].every_n_steps"),
]


@pytest.mark.parametrize("case", TRAINER_CASES, ids=[c.id for c in TRAINER_CASES])
def test_bad_trainer_or_callback_argument(case: Case, spy: _Spy, hydra_ctx, cli_config, monkeypatch,
                                          tmp_path) -> None:
    """Errors of the trainer's and the callbacks' own checks: also one clear error before any model."""
    from tre_lightning.cli.train import run

    with pytest.raises(ConfigError) as info:
        run(_compose(case.hydra, tmp_path))
    _assert_clear(str(info.value), case.key, case.allowed)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        _cli(cli_config, case.cli)
    _assert_clear(str(info.value), case.expected_cli_key, case.allowed)
    assert not any(c.startswith("model ") for c in spy.calls)


def test_valid_configs_pass_and_the_spy_sees_models(spy: _Spy, hydra_ctx, tmp_path) -> None:
    """Control: the base configs build, and building the module's models is what the spy records."""
    cfg = _compose([], tmp_path)
    module = validate_config(cfg).module
    assert type(module.task).__name__ == "CountdownTask" and len(module.regularizers) == 1
    assert spy.calls == []
    module.configure_model()
    assert any(c.startswith("model ") for c in spy.calls)


def test_valid_cli_config_builds_the_module_only_after_validation(spy: _Spy, cli_config, monkeypatch,
                                                                  tmp_path) -> None:
    from tre_lightning.cli.lightning import run

    monkeypatch.chdir(tmp_path)
    cli = run(["--config", str(cli_config)], run=False)
    assert spy.calls == []  # models come in configure_model
    assert cli.model.model.actor is None


def _experiments() -> list[str]:
    import tre_lightning.conf

    folder = Path(tre_lightning.conf.__file__).resolve().parent / "experiment"
    return ["(defaults)", *sorted(f"experiment={p.stem}" for p in folder.glob("*.yaml")), "strategy=fsdp"]


@pytest.mark.parametrize("choice", _experiments())
def test_every_shipped_config_validates(choice: str, spy: _Spy, hydra_ctx, tmp_path) -> None:
    """No false alarms: the shipped presets pass, once the local paths they require are given."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    # one batch of rows at least: the paper presets draw 512 prompts per iteration
    data = _rows_file(tmp_path / "data.jsonl", [{"prompt": f"p{i}", "problem": f"p{i}", "solution": "\\boxed{1}"}
                                                for i in range(1024)])
    paths = {"model.policy.path": model, "task.train_path": data, "task.val_path": data,
             "task.reward_model_path": model}
    # building the trainer of a GPU preset needs a GPU: on a CPU machine check the rest
    overrides = ([] if choice == "(defaults)" else [choice]) + ([] if torch.cuda.is_available() else [
        "trainer.accelerator=cpu", "trainer.devices=1"])
    for _ in range(len(paths) + 1):
        cfg = compose("train", overrides=[f"output_dir={tmp_path}", *overrides])
        try:
            validate_config(cfg)
            break
        except ConfigError as err:
            assert err.key in paths and ("required" in err.message or "does not exist" in err.message), str(err)
            overrides.append(f"{err.key}={paths[err.key]}")
    else:
        pytest.fail("still invalid")
    assert spy.calls == []


def test_shipped_lightning_example_validates(spy: _Spy, monkeypatch, tmp_path) -> None:
    from tre_lightning.cli.lightning import EXAMPLE_CONFIG, run

    monkeypatch.chdir(tmp_path)
    cli = run(["--config", str(EXAMPLE_CONFIG)], run=False)
    assert cli.model.model.actor is None and spy.calls == []
    with pytest.raises(ConfigError, match=r"^model.model: required"):
        run(["fit"])


# --------------------------------------------------------------------------- data, before the models


def _rows_file(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


DATA_CASES = [
    ("wrong column", [{"target": 3, "nums": [1, 2]}, {"target": 5, "numbers": [1, 4]}], "line 2", "nums"),
    ("malformed row", [{"target": 3, "nums": [1, 2]}, "{not json"], "line 2", None),
    ("wrong type", [{"target": 3, "nums": [1, 2]}, {"target": "five", "nums": [1, 4]}], "line 2", "target"),
]


@pytest.mark.parametrize(("name", "rows", "row", "column"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_hydra_names_file_row_column(name, rows, row, column, spy: _Spy, hydra_ctx, tmp_path) -> None:
    from tre_lightning.cli.train import run

    data = _rows_file(tmp_path / "countdown.jsonl", rows)
    cfg = _compose([f"task.train_path={data}", "task.train_size=null", "task.val_size=null"], tmp_path)
    with pytest.raises(DataError) as info:
        run(cfg)
    assert info.value.file == str(data) and info.value.row == row and info.value.column == column
    assert str(data) in str(info.value) and row in str(info.value)
    assert not any(c.startswith("model ") for c in spy.calls)


def test_bad_data_lightning_cli(spy: _Spy, cli_config, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    data = _rows_file(tmp_path / "countdown.jsonl", [{"target": 3, "nums": [1, 2]}, {"target": 5}])
    with pytest.raises(DataError) as info:
        _cli(cli_config, [f"--model.task.init_args.train_path={data}", "--model.task.init_args.train_size=null",
                          "--model.task.init_args.val_size=null"])
    assert (info.value.file, info.value.row, info.value.column) == (str(data), "line 2", "nums")
    assert not any(c.startswith("model ") for c in spy.calls)


def test_empty_split_and_too_few_examples(tmp_path) -> None:
    from tre_lightning.tasks import CountdownTask, MathTask

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty split") as info:
        check_task_data(MathTask(train_path=str(empty), val_path=str(empty), use_math_verify=False), batch_size=1)
    assert info.value.file == str(empty)
    with pytest.raises(ConfigError, match=r"task: the train split has 3 examples.*batch_size <= 3"):
        check_task_data(CountdownTask(train_size=3, val_size=1), batch_size=4)
    check_task_data(CountdownTask(train_size=4, val_size=1), batch_size=4)


# --------------------------------------------------------------------------- the real processes

_SITECUSTOMIZE = textwrap.dedent(
    """
    import os
    _marker = os.environ.get("TRE_SPY_MARKER")
    if _marker:
        import transformers.modeling_utils as _mu
        _init = _mu.PreTrainedModel.__init__
        def _spy(self, *args, **kwargs):
            with open(_marker, "a") as f:
                f.write(type(self).__name__ + "\\n")
            os._exit(97)
        _mu.PreTrainedModel.__init__ = _spy
    """
)


def _script(name: str) -> list[str]:
    import shutil

    found = shutil.which(name, path=os.path.dirname(sys.executable))
    if found:
        return [found]
    module = {"tre-train": "tre_lightning.cli.train", "tre-lightning": "tre_lightning.cli.lightning"}[name]
    return [sys.executable, "-m", module]


def _spawn(cmd: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    spy_dir = tmp_path / "spy"
    spy_dir.mkdir(exist_ok=True)
    (spy_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    marker = tmp_path / "models_built.txt"
    env = dict(os.environ, OMP_NUM_THREADS="1", TRE_SPY_MARKER=str(marker), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(spy_dir), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    return proc, marker


SUBPROCESS_CASES = ["mini-batch does not divide the batch", "TRE-P with P = 1.5", "missing model path"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_tre_train_process_bad_config(case_id: str, tmp_path) -> None:
    case = next(c for c in CASES if c.id == case_id)
    cmd = [*_script("tre-train"), *HYDRA_BASE, *case.hydra, f"hydra.run.dir={tmp_path / 'run'}"]
    proc, marker = _spawn(cmd, tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not marker.exists()
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tre-train: error: invalid configuration: ")
    _assert_clear(last, case.key, case.allowed)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("case_id", ["micro-batch larger than the mini-batch", "unknown regularizer name"])
def test_tre_lightning_process_bad_config(case_id: str, tmp_path) -> None:
    case = next(c for c in CASES if c.id == case_id)
    config = tmp_path / "base.yaml"
    config.write_text(CLI_BASE_YAML)
    proc, marker = _spawn([*_script("tre-lightning"), "fit", "--config", str(config), *case.cli], tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not marker.exists()
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tre-lightning: error: invalid configuration: ")
    _assert_clear(last, case.expected_cli_key, case.allowed)
    assert "Traceback" not in proc.stderr


def test_process_spy_fires_on_a_valid_config(tmp_path) -> None:
    """Control for the two tests above: with a valid config the spy sees the first model (and exits 97)."""
    cmd = [*_script("tre-train"), *HYDRA_BASE, f"hydra.run.dir={tmp_path / 'run'}"]
    proc, marker = _spawn(cmd, tmp_path)
    assert proc.returncode == 97, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert marker.read_text().strip().splitlines()[0] == "Qwen2ForCausalLM"
