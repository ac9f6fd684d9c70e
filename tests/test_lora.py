"""LoRA adapters (peft) on the actor/critic: trainable parameters, the adapters-disabled reference,
merged export, the KV-cache decode loop on the peft actor, keyed refusals, one PPO fit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from test_module_support import CharTask, fit, tiny_module, tiny_source, trainer  # noqa: E402

from tre_lightning.checks import ArgumentError, ConfigError  # noqa: E402
from tre_lightning.models import ActorCritic, LoraSettings  # noqa: E402
from tre_lightning.models.lora import AdaptersDisabled, is_peft_model  # noqa: E402

# tiny_source(): hidden 32, 2 layers, 4 heads of 8 (2 kv heads: k/v out 16), intermediate 64
H, KV, I, LAYERS = 32, 16, 64, 2
# (in, out) of each linear layer of a Qwen2 decoder layer
LINEARS = {"q_proj": (H, H), "k_proj": (H, KV), "v_proj": (H, KV), "o_proj": (H, H),
           "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}


def _lora_count(rank: int, names: list[str]) -> int:
    """LoRA parameters by hand: A (r, in) + B (out, r) per adapted layer."""
    return LAYERS * sum(rank * (LINEARS[n][0] + LINEARS[n][1]) for n in names)


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _built(lora: LoraSettings, *, with_reference: bool = True, **kwargs) -> ActorCritic:
    ac = ActorCritic(tiny_source(), lora=lora, **kwargs)
    ac.build(with_reference=with_reference, seed=0)
    return ac


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on one row
    return ids, mask


def _update(actor: nn.Module, steps: int = 3) -> None:
    """A few Adam steps on the adapters (lora_B starts at zero: an untrained adapter changes nothing)."""
    opt = torch.optim.Adam([p for p in actor.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = _batch(1)
    for _ in range(steps):
        loss = actor(input_ids=ids, attention_mask=mask).logits.logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_trainable_parameters_all_linear_and_listed_targets() -> None:
    ac = _built(LoraSettings(rank=4), with_reference=False)
    assert is_peft_model(ac.actor)
    assert _trainable(ac.actor) == _lora_count(4, list(LINEARS))
    critic_full = sum(p.numel() for p in ac.critic.parameters())
    assert _trainable(ac.critic) == critic_full  # lora.critic=false: the critic is trained in full
    ac = _built(LoraSettings(rank=2, target_modules=["q_proj", "v_proj"], critic=True), with_reference=False)
    assert _trainable(ac.actor) == _lora_count(2, ["q_proj", "v_proj"])
    assert _trainable(ac.critic) == _lora_count(2, ["q_proj", "v_proj"]) + H + 1  # + the value head (H -> 1)
    # the optimizer steps exactly those
    assert sum(p.numel() for p in ac.critic_parameters() if p.requires_grad) == _trainable(ac.critic)


def test_reference_is_the_base_model_and_differs_from_the_updated_actor() -> None:
    """Mutation checked: AdaptersDisabled.forward without ``disable_adapter()`` (reference = adapted
    actor) fails the base-model equality after the update."""
    ac = _built(LoraSettings(rank=4))
    assert isinstance(ac.reference, AdaptersDisabled) and ac.ref is None
    assert not any(k.startswith("ref") for k in ac.state_dict())  # no second copy of the weights
    base = tiny_source().causal_lm().eval()
    ids, mask = _batch()
    _update(ac.actor)
    ac.actor.eval()
    with torch.no_grad():
        ref = ac.reference_logits(ids, mask, 5, 1.0)
        policy, _ = ac.policy_logits(ids, mask, 5, 1.0)
        expected = base(input_ids=ids, attention_mask=mask,
                        position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits[:, -6:-1]
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)
    assert (policy - ref).abs().max() > 1e-3
    # the adapters are on again after the reference pass
    with torch.no_grad():
        again, _ = ac.policy_logits(ids, mask, 5, 1.0)
    torch.testing.assert_close(again, policy)


def test_export_merges_into_an_ordinary_hf_folder(tmp_path) -> None:
    """Mutation checked: export_hf saving the peft actor unmerged (adapter files only) fails the
    config/weights check; merging in place (no copy) fails ``is_peft_model(ac.actor)`` afterwards."""
    from transformers import AutoModelForCausalLM

    from tre_lightning.training.export import export_hf

    ac = _built(LoraSettings(rank=4), with_reference=False)
    _update(ac.actor)
    ac.actor.eval()
    export_hf(ac.actor, ac.tokenizer, str(tmp_path))
    assert (tmp_path / "config.json").is_file() and not (tmp_path / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert not any("lora" in k for k in merged.state_dict())
    ids, mask = _batch()
    with torch.no_grad():
        adapted, _ = ac.policy_logits(ids, mask, 5, 1.0)
        from tre_lightning.models.forward import policy_forward

        exported, _ = policy_forward(merged, ids, mask, 5, 1.0)
    torch.testing.assert_close(exported, adapted, atol=1e-5, rtol=1e-4)
    assert is_peft_model(ac.actor) and _trainable(ac.actor) == _lora_count(4, list(LINEARS))


def test_kv_cache_decode_on_the_peft_actor_equals_the_merged_model() -> None:
    from tre_lightning.rollout.decode import decode

    ac = _built(LoraSettings(rank=4), with_reference=False)
    _update(ac.actor)
    ac.actor.eval()
    merged = copy.deepcopy(ac.actor).merge_and_unload().eval()
    ids, mask = _batch()
    kwargs = dict(n=2, max_new_tokens=6, sample=lambda logits: logits.argmax(-1), eos_token_ids=[10**6],
                  pad_token_id=0)
    with_cache = decode(ac.actor, ids, mask, use_cache=True, **kwargs)
    assert torch.equal(with_cache, decode(merged, ids, mask, use_cache=True, **kwargs))
    assert torch.equal(with_cache, decode(ac.actor, ids, mask, use_cache=False, **kwargs))


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"rank": 0}, "rank"), ({"alpha": 0.0}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"target_modules": []}, "target_modules"), ({"target_modules": "q_proj"}, "target_modules"),
    ({"bias": "some"}, "bias"), ({"critic": 1}, "critic"),
])
def test_bad_settings_name_the_parameter(kwargs, param) -> None:
    with pytest.raises(ArgumentError) as err:
        LoraSettings(**kwargs)
    assert err.value.param == param


def test_config_errors_are_keyed_and_unknown_targets_refused() -> None:
    from tre_lightning.cli.build import ObjectBuilder

    node = {"_target_": "tre_lightning.models.ActorCritic",
            "policy": {"_target_": "tre_lightning.models.TinyRandomSource", "hidden_size": 32},
            "lora": {"_target_": "tre_lightning.models.LoraSettings", "rank": -1}}
    with pytest.raises(ConfigError) as err:
        ObjectBuilder().build(node, "model")
    assert str(err.value).startswith("model.lora.rank:")
    with pytest.raises(ArgumentError) as err:
        _built(LoraSettings(target_modules=["no_such_proj"]), with_reference=False)
    assert err.value.param == "lora.target_modules"
    with pytest.raises(ArgumentError) as err:
        ActorCritic(tiny_source(), lora="rank=8")
    assert err.value.param == "lora"


def test_4bit_policy_needs_lora() -> None:
    class FourBit:
        load_in_4bit = True

        def tokenizer(self):  # pragma: no cover - never called
            raise AssertionError

        def causal_lm(self):  # pragma: no cover - never called
            raise AssertionError

    with pytest.raises(ArgumentError) as err:
        ActorCritic(FourBit())
    assert err.value.param == "policy.load_in_4bit"
    with pytest.raises(ArgumentError) as err:
        ActorCritic(tiny_source(), critic=FourBit(), lora=LoraSettings())
    assert err.value.param == "critic.load_in_4bit" and "lora.critic=true" in str(err.value)
    ActorCritic(FourBit(), lora=LoraSettings(critic=True))  # QLoRA: accepted (the copied critic gets adapters)


@pytest.mark.slow
def test_ppo_fit_with_lora_and_kl(tmp_path) -> None:
    """Two PPO iterations with a KL against the adapters-disabled base: only adapters change.

    Mutation checked: AdaptersDisabled.forward without ``disable_adapter()`` gives train/ref_kl == 0."""
    module = tiny_module(CharTask(), lora=LoraSettings(rank=4), kl_coef=0.05)
    t = trainer(tmp_path, max_steps=2)
    fit(t, module)
    actor = module.model.actor
    base = tiny_source().causal_lm().state_dict()
    for name, value in actor.get_base_model().state_dict().items():
        if "lora_" not in name:
            torch.testing.assert_close(value, base[name.replace(".base_layer", "")])
    assert any(p.abs().max() > 0 for n, p in actor.named_parameters() if "lora_B" in n)
    # iteration 0 samples from the base model (lora_B = 0); iteration 1 from the updated actor, so its
    # KL to the adapters-disabled reference is not 0 (it would be exactly 0 with the adapters left on)
    assert float(t.callback_metrics["train/ref_kl"]) != 0.0


@pytest.mark.slow
def test_tre_train_with_lora_and_export(tmp_path) -> None:
    """tre-train model=tiny_random_lora with a KL: trains, checkpoints, exports a merged HF folder."""
    from hydra import compose, initialize_config_module
    from test_entry_points import TINY
    from transformers import AutoModelForCausalLM

    from tre_lightning.cli.train import run

    overrides = [f"output_dir={tmp_path}", *TINY, "model=tiny_random_lora", "model.lora.rank=4",
                 "ppo.kl_coef=0.05"]
    with initialize_config_module(config_module="tre_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    run(cfg)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_model", local_files_only=True)
    assert not any("lora" in k for k in merged.state_dict())
    assert not (tmp_path / "hf_model" / "adapter_config.json").exists()


@pytest.mark.slow
def test_lightning_cli_with_lora_overlay(tmp_path, monkeypatch) -> None:
    from pathlib import Path

    from test_entry_points import LIGHTNING_TINY

    from tre_lightning.cli.lightning import EXAMPLE_CONFIG, run

    monkeypatch.chdir(tmp_path)
    overlay = Path(EXAMPLE_CONFIG).parent / "lora.yaml"
    cli = run(["fit", "--config", str(EXAMPLE_CONFIG), "--config", str(overlay), *LIGHTNING_TINY,
               "--model.model.lora.init_args.rank", "4", "--model.ppo.kl_coef", "0.05"])
    assert cli.trainer.global_step == 2
    model = cli.model.model
    assert model.lora.rank == 4 and is_peft_model(model.actor)
    assert isinstance(model.reference, AdaptersDisabled)


def test_gradient_checkpointing_still_trains_the_adapters() -> None:
    """The adapters get gradients with HF checkpointing on. With transformers 5.24 forcing
    ``use_reentrant=True`` passes too (checked): this guards the combination, not that setting."""
    ac = _built(LoraSettings(rank=4), with_reference=False, gradient_checkpointing=True)
    ac.actor.train()
    ids, mask = _batch()
    logits, _ = ac.policy_logits(ids, mask, 5, 1.0)
    logits.logsumexp(-1).mean().backward()
    grads = [p.grad for n, p in ac.actor.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads)
