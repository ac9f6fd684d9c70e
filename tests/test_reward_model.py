"""Reward-model training: Bradley-Terry loss, a tiny model learning a synthetic preference,
and the Hydra / Lightning CLI entries."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tre_lightning.training.reward_model import (
    PreferenceCollator,
    PreferenceDataModule,
    RewardModelModule,
    bradley_terry_loss,
    load_preferences,
)
from tre_lightning.tasks import DataError, HHTask

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",
    "ignore:.*does not have many workers.*",
    "ignore:.*number of training batches.*smaller than the logging interval.*",
    "ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
    "ignore:Total length of `list` across ranks is zero.*",  # no validation split: intended
    "ignore:LightningCLI's args parameter is intended.*",
    "ignore::jsonargparse._deprecated.JsonargparseDeprecationWarning",
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and robust on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_bradley_terry_loss_by_hand() -> None:
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # -log σ(1) = log(1 + e^-1); -log σ(-2) = log(1 + e^2)
    bt = (math.log1p(math.exp(-1)) + math.log1p(math.exp(2))) / 2
    assert float(bradley_terry_loss(chosen, rejected, 0.0)) == pytest.approx(bt)
    # center term: mean((1 + 0)^2, (0 + 2)^2) = 2.5
    assert float(bradley_terry_loss(chosen, rejected, 0.01)) == pytest.approx(bt + 0.01 * 2.5)


def test_collator_pads_right_and_stacks_chosen_first() -> None:
    items = [{"chosen": [5, 6, 7], "rejected": [8]}, {"chosen": [9], "rejected": [3, 4]}]
    batch = PreferenceCollator(pad_token_id=0)(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0], [8, 0, 0], [3, 4, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0]]


def _pairs(n: int, seed: int) -> list[dict]:
    """Synthetic preference: letters are preferred to digits."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(4, 12)
        rows.append(
            {
                "prompt": rng.choice(["Say something.", "Reply please.", "Go on."]),
                "chosen": "".join(rng.choice("abcdefghij") for _ in range(k)),
                "rejected": "".join(rng.choice("0123456789") for _ in range(rng.randint(4, 12))),
            }
        )
    return rows


def _write(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random causal LM (no score head yet) with a char tokenizer and a chat template."""
    from transformers import AutoModelForCausalLM

    from tre_lightning.models.tiny import char_tokenizer, tiny_qwen2_config

    path = tmp_path_factory.mktemp("tiny_base")
    tokenizer = char_tokenizer()
    config = tiny_qwen2_config(
        len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def pref_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("prefs")
    return _write(root / "train.jsonl", _pairs(96, 0)), _write(root / "val.jsonl", _pairs(48, 1))


def _trainer(root: Path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(root), **kwargs,
    )


def test_training_moves_pairwise_accuracy_above_chance(base_model: str, pref_files: tuple[str, str],
                                                        tmp_path: Path) -> None:
    pl.seed_everything(0)
    train, val = pref_files
    save_dir = tmp_path / "rm"
    module = RewardModelModule(base_model, lr=3e-3, warmup_ratio=0.1, save_dir=str(save_dir))
    data = PreferenceDataModule(train, base_model, val_path=val, batch_size=16, max_length=64)
    before = _trainer(tmp_path).validate(module, datamodule=data, verbose=False)[0]["val/accuracy"]
    trainer = _trainer(tmp_path, max_epochs=4)
    trainer.fit(module, datamodule=data)
    after = float(trainer.callback_metrics["val/accuracy"])
    assert before <= 0.8  # a random head (0.27 with this seed)
    assert after >= 0.9, (before, after)
    assert trainer.global_step == 24  # 96 pairs / 16 per batch x 4 epochs
    # the saved folder is what HHTask loads: preferred responses now score higher
    task = HHTask(reward_model_path=str(save_dir), device="cpu", dtype="float32", batch_size=8)
    pairs = _pairs(16, 2)
    chosen = task.score([{"prompt": p["prompt"]} for p in pairs], [p["chosen"] for p in pairs])
    rejected = task.score([{"prompt": p["prompt"]} for p in pairs], [p["rejected"] for p in pairs])
    assert sum(c > r for c, r in zip(chosen, rejected)) >= 14


def test_cosine_schedule_with_warmup(base_model: str, pref_files: tuple[str, str], tmp_path: Path) -> None:
    module = RewardModelModule(base_model, lr=1e-3, warmup_ratio=0.1)
    data = PreferenceDataModule(pref_files[0], base_model, batch_size=8, max_length=32, train_size=40)
    lrs: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    _trainer(tmp_path, max_epochs=2, callbacks=[Record()]).fit(module, datamodule=data)
    # 10 steps, warm-up ceil(0.1 * 10) = 1 step: lr 0 at step 0, then cosine from the peak
    assert lrs[0] == 0.0
    assert lrs[1] == pytest.approx(1e-3)
    assert lrs[5] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 9)))
    assert len(lrs) == 10 and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_hydra_config_trains_and_saves(base_model: str, pref_files: tuple[str, str], tmp_path: Path) -> None:
    from hydra import compose, initialize_config_module

    from tre_lightning.cli.train_rm import train

    with initialize_config_module(config_module="tre_lightning.conf", version_base="1.3"):
        cfg = compose(
            config_name="train_rm",
            overrides=[
                f"model_path={base_model}", f"train_path={pref_files[0]}", f"val_path={pref_files[1]}",
                f"save_dir={tmp_path / 'rm'}", f"trainer.default_root_dir={tmp_path}", "trainer.max_steps=3",
                "trainer.accumulate_grad_batches=1", "trainer.accelerator=cpu", "trainer.devices=1",
                "+trainer.logger=false", "+trainer.enable_checkpointing=false", "+trainer.enable_progress_bar=false",
                "data.batch_size=8", "data.max_length=32", "data.train_size=24", "module.lr=1e-3",
            ],
        )
    assert cfg.module.center_rewards_coefficient == 0.01 and cfg.module.warmup_ratio == 0.1
    metrics = train(cfg)
    assert "val/accuracy" in metrics and 0.0 <= metrics["val/accuracy"] <= 1.0
    assert (tmp_path / "rm" / "config.json").exists() and (tmp_path / "rm" / "tokenizer.json").exists()


def test_lightning_cli_fit(base_model: str, pref_files: tuple[str, str], tmp_path: Path) -> None:
    from tre_lightning.training.reward_model import cli_main

    cli_main(
        [
            "fit", f"--model.model_path={base_model}", f"--model.save_dir={tmp_path / 'rm'}", "--model.lr=1e-3",
            f"--data.train_path={pref_files[0]}", f"--data.tokenizer_path={base_model}", "--data.batch_size=8",
            "--data.max_length=32", "--trainer.max_steps=2", "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert (tmp_path / "rm" / "model.safetensors").exists()


def test_console_entry_explains_itself() -> None:
    exe = shutil.which("tre-train-rm")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "tre_lightning.cli.train_rm", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    for needle in ("tre-train-rm", "Usage", "model_path", "train_path", "save_dir", "center_rewards_coefficient",
                   "Bradley-Terry", "accumulate_grad_batches"):
        assert needle in out, needle


def test_preference_rows_and_errors(tmp_path: Path) -> None:
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rows = load_preferences(_write(tmp_path / "ok.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                                            {"chosen": conv, "rejected": conv}]))
    assert rows[0]["chosen"] == conv and rows[0]["rejected"][1]["content"] == "b" and rows[1]["chosen"] == conv
    rows_bad = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}]
    bad = _write(tmp_path / "bad.jsonl", rows_bad)
    with pytest.raises(DataError) as info:
        load_preferences(bad)
    assert (info.value.row, info.value.column) == ("line 2", "rejected")
    no_prompt = _write(tmp_path / "np.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"np.jsonl, line 1, column 'prompt'"):
        load_preferences(no_prompt)
    bad_conv = _write(tmp_path / "bc.jsonl", [{"chosen": [{"role": "user"}], "rejected": "b", "prompt": "q"}])
    with pytest.raises(DataError, match=r"column 'chosen': message 0"):
        load_preferences(bad_conv)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"lr": 0.0}, "lr"), ({"warmup_ratio": 1.0}, "warmup_ratio"),
     ({"center_rewards_coefficient": -1.0}, "center_rewards_coefficient"), ({"dtype": "int8"}, "dtype")],
)
def test_module_validation(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        RewardModelModule("/does/not/matter", **kwargs)
