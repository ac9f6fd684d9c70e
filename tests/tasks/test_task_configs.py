"""Every task builds from its Hydra YAML and through jsonargparse; constructors validate."""

from __future__ import annotations

import json
import pickle

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from tre_lightning.tasks import CountdownTask, HHTask, MathTask, Task

EXPECTED = {
    "math": (MathTask, {"train_size": 7500, "val_size": 5000, "max_response_tokens": 8192}, True),
    "countdown": (CountdownTask, {"train_size": 7500, "val_size": 5000, "max_response_tokens": 512}, True),
    "hh": (HHTask, {"train_size": 7500, "val_size": 5000, "max_response_tokens": 1024}, False),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hydra_yaml_instantiates(name: str) -> None:
    cls, attrs, binary = EXPECTED[name]
    with initialize_config_module(config_module="tre_lightning.conf", version_base="1.3"):
        cfg = compose(config_name=None, overrides=[f"+task={name}", "task.seed=3"])
    task = instantiate(cfg.task)
    assert type(task) is cls and isinstance(task, Task)
    assert task.name == name and task.binary_reward is binary and task.seed == 3
    for key, value in attrs.items():
        assert getattr(task, key) == value


def test_hydra_overrides_reach_the_constructor() -> None:
    with initialize_config_module(config_module="tre_lightning.conf", version_base="1.3"):
        cfg = compose(config_name=None, overrides=["+task=countdown", "task.format_score=0.1", "task.train_size=5",
                                                    "task.val_size=3"])
    task = instantiate(cfg.task)
    assert task.grader.format_score == 0.1
    assert len(task.train_examples()) == 5 and len(task.val_examples()) == 3
    with initialize_config_module(config_module="tre_lightning.conf", version_base="1.3"):
        cfg = compose(config_name=None, overrides=["+task=countdown", "task.format_score=1.5"])
    with pytest.raises(Exception, match="format_score: must be a finite number in"):
        instantiate(cfg.task)


@pytest.mark.parametrize(
    ("class_path", "init_args", "cls"),
    [
        ("tre_lightning.tasks.MathTask", {"use_math_verify": False, "time_limit": 2.5}, MathTask),
        ("tre_lightning.tasks.CountdownTask", {"format_score": 0.1, "train_size": 4, "val_size": 2}, CountdownTask),
        ("tre_lightning.tasks.HHTask", {"reward_model_path": "/tmp/rm", "load_in_4bit": True}, HHTask),
    ],
)
def test_jsonargparse_class_path(class_path: str, init_args: dict, cls: type) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--task", type=Task)
    cfg = parser.parse_args(["--task", json.dumps({"class_path": class_path, "init_args": init_args})])
    task = parser.instantiate(cfg).task
    assert type(task) is cls
    if cls is MathTask:
        assert task.grader.time_limit == 2.5 and task.grader.symbolic is False
    elif cls is CountdownTask:
        assert task.grader.format_score == 0.1 and len(task.train_examples()) == 4
    else:
        assert task.reward_model_path == "/tmp/rm" and task.scorer.load_in_4bit is True


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (MathTask, {"train_size": 0}, "train_size"),
        (MathTask, {"val_size": -1}, "val_size"),
        (MathTask, {"time_limit": -1.0}, "time_limit"),
        (MathTask, {"num_workers": 100}, "num_workers"),
        (MathTask, {"max_response_tokens": 0}, "max_response_tokens"),
        (CountdownTask, {"format_score": 1.0}, "format_score"),
        (CountdownTask, {"min_numbers": 1}, "min_numbers"),
        (CountdownTask, {"min_numbers": 5, "max_numbers": 4}, "max_numbers"),
        (CountdownTask, {"max_number": 0}, "max_number"),
        (CountdownTask, {"max_target": 0}, "max_target"),
        (CountdownTask, {"train_size": None}, "train_size"),
        (CountdownTask, {"val_path": "x.jsonl"}, "train_path"),
        (HHTask, {"batch_size": 0}, "batch_size"),
        (HHTask, {"max_length": 2}, "max_length"),
        (HHTask, {"dtype": "float8"}, "dtype"),
        (HHTask, {"prompt_key": ""}, "prompt_key"),
        (HHTask, {"train_size": 0}, "train_size"),
    ],
)
def test_constructor_validation_names_the_parameter(cls: type, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_tasks_pickle_for_spawned_workers() -> None:
    countdown = CountdownTask(train_size=3, val_size=2)
    countdown.score([{"nums": [1, 2], "target": 3}], ["<answer>1+2</answer>"])
    clone = pickle.loads(pickle.dumps(countdown))
    assert clone.train_examples() == countdown.train_examples()
    assert clone.failure_counts()["checks"] == 1
    math_clone = pickle.loads(pickle.dumps(MathTask(use_math_verify=False)))
    assert math_clone.score([{"problem": "p", "answer": "2"}], ["\\boxed{2}"]) == [1.0]
    hh_clone = pickle.loads(pickle.dumps(HHTask(reward_model_path="/nowhere")))
    assert hh_clone.scorer.model is None


def test_failure_count_api() -> None:
    task = CountdownTask(train_size=1, val_size=1)
    assert task.failure_counts() == {"checks": 0, "timeouts": 0, "errors": 0, "failures": 0}
    task.score([{"nums": [1], "target": 1}] * 2, ["<answer>1</answer>", "x"])
    assert task.failure_counts()["checks"] == 2
    task.reset_failure_counts()
    assert task.failure_counts()["checks"] == 0
