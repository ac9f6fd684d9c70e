"""QLoRA: a frozen 4-bit NF4 base (bitsandbytes, quant storage = compute dtype) under LoRA adapters.

bitsandbytes >= 0.50 has a CPU backend, so everything but the CUDA fit runs here; the ``gpu`` row
runs a short PPO fit on a CUDA device. (Dimensions >= 64: bitsandbytes' CPU inference path packs
weights in blocks of 64 input features.)
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from test_module_support import CharTask, fit, tiny_module, tiny_source, trainer  # noqa: E402

from tre_lightning.checks import ArgumentError  # noqa: E402
from tre_lightning.models import ActorCritic, LoraSettings, PretrainedSource  # noqa: E402
from tre_lightning.models.lora import AdaptersDisabled  # noqa: E402
from tre_lightning.models.quant import quantized_linear_count  # noqa: E402

H, KV, I, LAYERS = 64, 32, 128, 2  # 4 heads of 16, 2 kv heads


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    src = tiny_source(hidden_size=H, intermediate_size=I)
    path = tmp_path_factory.mktemp("tiny")
    src.causal_lm().save_pretrained(path)
    src.tokenizer().save_pretrained(path)
    return str(path)


def _qlora(folder: str, **lora) -> ActorCritic:
    ac = ActorCritic(PretrainedSource(folder, dtype="bfloat16", load_in_4bit=True),
                     lora=LoraSettings(rank=4, **{"critic": True, **lora}))
    ac.build(with_reference=True, seed=0)
    return ac


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 60, (3, 12), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def _train(ac: ActorCritic, steps: int) -> None:
    """A few Adam steps on the adapters (lora_B starts at zero)."""
    opt = torch.optim.Adam([p for p in ac.actor.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = _batch()
    for _ in range(steps):
        opt.zero_grad()
        ac.policy_logits(ids, mask, 5, 1.0)[0].float().logsumexp(-1).mean().backward()
        opt.step()


def test_qlora_build_trains_adapters_only_and_reference_is_the_4bit_base(folder) -> None:
    ac = _qlora(folder)
    assert quantized_linear_count(ac.actor) == 7 * LAYERS and quantized_linear_count(ac.critic) == 7 * LAYERS
    per_layer = sum(i + o for i, o in ((H, H), (H, KV), (H, KV), (H, H), (H, I), (H, I), (I, H)))
    trainable = [p for p in ac.actor.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 4 * per_layer * LAYERS
    assert isinstance(ac.reference, AdaptersDisabled) and ac.ref is None
    ids, mask = _batch()
    logits, _ = ac.policy_logits(ids, mask, 5, 1.0)
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for n, p in ac.actor.named_parameters() if "lora_B" in n)


def test_adapters_below_get_gradients_after_an_eval_forward(folder) -> None:
    """A rollout (eval, no grad) before the update. Mutation checked: without
    ``_keep_4bit_trainable_layout`` bitsandbytes' CPU backend repacks the layers for inference and the
    training forward fails (in-place bias add on a tensor without autograd)."""
    ac = _qlora(folder)
    ids, mask = _batch()
    ac.actor.eval()
    with torch.no_grad():
        ac.policy_logits(ids, mask, 5, 1.0)
    ac.actor.train()
    ac.policy_logits(ids, mask, 5, 1.0)[0].float().logsumexp(-1).mean().backward()
    grads = [p.grad for n, p in ac.actor.named_parameters() if "lora_B" in n]
    assert len(grads) == 7 * LAYERS and all(g is not None and g.abs().max() > 0 for g in grads)


def test_qlora_export_dequantizes_and_merges(folder, tmp_path) -> None:
    """Mutation checked: peft's own merge_and_unload on the 4-bit base (re-quantizing W + dW to NF4)
    fails the first assert (the export stays a 4-bit model with a quantization config); the closeness
    bound alone does not catch it at this update size."""
    from transformers import AutoModelForCausalLM

    from tre_lightning.models.forward import policy_forward
    from tre_lightning.training.export import export_hf

    ac = _qlora(folder)
    ids, mask = _batch()
    _train(ac, 3)
    export_hf(ac.actor, ac.tokenizer, str(tmp_path))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert quantized_linear_count(merged) == 0 and getattr(merged.config, "quantization_config", None) is None
    with torch.no_grad():
        adapted = ac.policy_logits(ids, mask, 5, 1.0)[0].float()
        base = ac.reference_logits(ids, mask, 5, 1.0).float()
        exported = policy_forward(merged, ids, mask, 5, 1.0)[0].float()
    update = (adapted - base).abs().max()
    assert update > 0.1
    assert (exported - adapted).abs().max() < 0.1 * update  # bf16 rounding, not a lost update
    assert quantized_linear_count(ac.actor) == 7 * LAYERS  # the training model is untouched


def test_checkpoint_holds_no_4bit_weights_and_reloads_strictly(folder, tmp_path) -> None:
    """Mutation checked: without ``keep_4bit_out_of_state_dict`` the strict load fails (the 4-bit
    quant-state entries are unexpected keys)."""
    ac = _qlora(folder)
    ids, mask = _batch()
    _train(ac, 2)
    state = ac.state_dict()
    assert not any("base_layer.weight" in k for k in state) and any("lora_B" in k for k in state)
    torch.save(state, tmp_path / "state.pt")
    fresh = _qlora(folder)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.policy_logits(ids, mask, 5, 1.0)[0], ac.policy_logits(ids, mask, 5, 1.0)[0])


def test_4bit_policy_with_a_copied_critic_needs_lora_critic(folder) -> None:
    source = PretrainedSource(folder, dtype="bfloat16", load_in_4bit=True)
    with pytest.raises(ArgumentError) as err:
        ActorCritic(source, lora=LoraSettings())
    assert err.value.param == "lora.critic"
    ActorCritic(source, lora=LoraSettings(), share_backbone=True)  # the value head on the 4-bit actor


def test_a_4bit_policy_under_fsdp2_is_refused_at_construction(folder) -> None:
    """One keyed line before any model is built (sharding it would fail later with ``quant_state is required``)."""
    from tre_lightning.checks import ArgumentError
    from tre_lightning.models.fsdp import FSDPConfig

    source = PretrainedSource(folder, dtype="bfloat16", load_in_4bit=True)
    with pytest.raises(ArgumentError, match=r"^fsdp must be null for a 4-bit \(QLoRA\) policy"):
        ActorCritic(source, lora=LoraSettings(critic=True), fsdp=FSDPConfig())
    ActorCritic(source, lora=LoraSettings(critic=True))  # the same on one device is fine


def test_qlora_config_builds(tmp_path) -> None:
    from hydra import compose, initialize_config_module

    from tre_lightning.cli.build import ObjectBuilder
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="tre_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=["model=pretrained_qlora", f"model.policy.path={tmp_path}",
                                          "model.lora.critic=true"])
    (tmp_path / "config.json").write_text("{}")
    model = ObjectBuilder().build(OmegaConf.to_container(cfg.model, resolve=True), "model")
    assert model.policy_source.load_in_4bit and model.lora.critic and model.policy_source.dtype == "bfloat16"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_ppo_fit_on_gpu(folder, tmp_path) -> None:
    """Two PPO iterations with a 4-bit base on CUDA (bf16 compute) and a KL to the base."""
    source = PretrainedSource(folder, dtype="bfloat16", load_in_4bit=True)
    module = tiny_module(CharTask(), source=source, lora=LoraSettings(rank=4, critic=True), kl_coef=0.05)
    t = trainer(tmp_path, accelerator="gpu", devices=1, max_steps=2)
    fit(t, module)
    assert quantized_linear_count(module.model.actor) == 7 * LAYERS
    assert float(t.callback_metrics["train/ref_kl"]) != 0.0
    assert next(p for p in module.model.actor.parameters() if p.requires_grad).is_cuda


@pytest.mark.slow
def test_qlora_ppo_fit_on_cpu(folder, tmp_path) -> None:
    """The same fit on bitsandbytes' CPU backend (rollouts in eval mode, updates in train mode)."""
    source = PretrainedSource(folder, dtype="bfloat16", load_in_4bit=True)
    module = tiny_module(CharTask(), source=source, lora=LoraSettings(rank=4, critic=True), kl_coef=0.05)
    t = trainer(tmp_path, max_steps=2)
    fit(t, module)
    assert quantized_linear_count(module.model.actor) == 7 * LAYERS
    assert float(t.callback_metrics["train/ref_kl"]) != 0.0
