"""End to end on CPU: a few PPO iterations of a tiny random model, for every regularizer."""

from __future__ import annotations

import csv
import math
import warnings

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from test_module_support import CharTask, IndexTask, LengthTask, fixed_engine_for, tiny_module, tiny_source, fit, trainer, validate

from tre_lightning import regularizers as R
from tre_lightning.callbacks import PMaxMonitor, SampleLogger
from tre_lightning.training import NonFiniteError

REGULARIZERS = {
    "none": lambda: None,
    "ent": lambda: [R.Ent(coef=0.01)],
    "tre_k": lambda: [R.TREK(coef=0.01, top_k=2)],
    "tre_p": lambda: [R.TREP(coef=0.01, top_p=0.9)],
    "min_ent": lambda: [R.MinEnt(coef=0.01)],
    "forking": lambda: [R.ForkingTokens()],
    "kl_cov": lambda: [R.KLCov(coef=1.0)],
    "clip_cov": lambda: [R.ClipCov()],
    "tre_p+kl_cov": lambda: [R.TREP(coef=0.01), R.KLCov(coef=1.0)],
}


def _read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", list(REGULARIZERS))
def test_ppo_iterations_every_regularizer(name: str, tmp_path) -> None:
    module = tiny_module(CharTask(binary=True), REGULARIZERS[name](), n=2, max_new_tokens=6)
    module.configure_model()
    before = {k: v.detach().clone() for k, v in module.model.actor.state_dict().items()}
    critic_before = {k: v.detach().clone() for k, v in module.model.critic.state_dict().items()}
    pmax = PMaxMonitor()
    logger = CSVLogger(tmp_path, name="csv", version="")
    t = trainer(tmp_path, max_steps=2, logger=logger, callbacks=[pmax],
                limit_val_batches=1, val_check_interval=2)
    fit(t, module)

    assert t.global_step == 2  # one per PPO iteration
    assert any(not torch.equal(before[k], v) for k, v in module.model.actor.state_dict().items())
    assert any(not torch.equal(critic_before[k], v) for k, v in module.model.critic.state_dict().items())
    # P-max logged every step, a probability
    assert [s for s, _ in pmax.history] == [1, 2]
    assert all(0.0 < v <= 1.0 for _, v in pmax.history)
    rows = _read_csv(tmp_path / "csv" / "metrics.csv")
    logged = {k for row in rows for k, v in row.items() if v != ""}
    for key in ("policy/p_max", "policy/entropy", "policy/clipfrac", "policy/approx_kl", "value/loss",
                "value/explained_variance", "reward/mean", "reward/std", "train/grad_norm_actor",
                "train/response_length", "perf/rollout_tokens_per_s", "perf/train_tokens_per_s", "val/pass@1",
                "val/reward"):
        assert key in logged, key
    for row in rows:
        for k, v in row.items():
            if v != "":
                assert math.isfinite(float(v)), (k, v)
    if name not in ("none",):
        reg_keys = {k for k in logged if k.startswith("policy/")} - {
            "policy/p_max", "policy/entropy", "policy/clipfrac", "policy/clipfrac_lower", "policy/approx_kl"}
        assert reg_keys, "the regularizer's own metrics are logged"


def test_shared_backbone_trains_actor_and_head() -> None:
    module = tiny_module(LengthTask(), share_backbone=True)
    module.configure_model()
    assert module.model.critic is None and module.model.value_head is not None
    head = module.model.value_head.linear.weight.detach().clone()
    emb = module.model.actor.get_input_embeddings().weight.detach().clone()
    out = {}

    class Grab(PMaxMonitor):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            out.update(outputs["metrics"])

    fit(trainer(max_steps=2, callbacks=[Grab()]), module)
    assert not torch.equal(head, module.model.value_head.linear.weight)
    assert not torch.equal(emb, module.model.actor.get_input_embeddings().weight)
    assert math.isfinite(out["value/loss"]) and math.isfinite(out["policy/p_max"])


def test_reference_kl_in_reward() -> None:
    module = tiny_module(LengthTask(), kl_coef=0.1, kl_estimator="k3")
    module.configure_model()
    assert module.model.reference is not None and not any(p.requires_grad for p in module.model.reference.parameters())
    seen = []

    class Grab(PMaxMonitor):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(outputs["metrics"]["train/ref_kl"])

    fit(trainer(max_steps=2, callbacks=[Grab()]), module)
    assert abs(seen[0]) < 1e-5  # the reference is the initial actor: no divergence at the first rollout
    assert seen[1] > 0  # k3 >= 0, and the actor has moved


def test_first_minibatch_ratio_is_one() -> None:
    """Behaviour log-probs and the first policy pass agree (same weights, different batching)."""
    source = tiny_source()
    module = tiny_module(LengthTask(), engine=fixed_engine_for(source), source=source, batch_size=2,
                         mini_batch_size=2, micro_batch_size=1)
    seen = []

    class Grab(PMaxMonitor):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(outputs["metrics"])

    fit(trainer(max_steps=1, callbacks=[Grab()]), module)
    assert abs(seen[0]["policy/approx_kl"]) < 1e-6
    assert seen[0]["policy/clipfrac"] == 0.0


def test_p_max_is_the_token_mean_of_the_peak_probability() -> None:
    """The logged P-max equals an independent computation on the rollout (one mini-batch, before the update)."""
    source = tiny_source()
    engine = fixed_engine_for(source)
    module = tiny_module(LengthTask(), engine=engine, source=source, batch_size=2, mini_batch_size=2,
                         micro_batch_size=4)
    module.configure_model()
    import copy

    actor0 = copy.deepcopy(module.model.actor)
    pmax = PMaxMonitor()
    fit(trainer(max_steps=1, callbacks=[pmax]), module)
    r = engine.rollouts[0]
    ids, att = r.input_ids, r.attention_mask
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = actor0(input_ids=ids, attention_mask=att, position_ids=pos).logits
    width = r.response_ids.shape[1]
    peak = torch.softmax(logits[:, -width - 1 : -1].double(), -1).amax(-1)
    mask = r.response_mask.double()
    expected = float((peak * mask).sum() / mask.sum())
    assert pmax.history[0][1] == pytest.approx(expected, rel=1e-5)


class _NaNLoss:
    """A regularizer whose loss term is NaN (non-rewards: NaN rewards are scored 0 by the module's reward guard)."""

    name = "nan_loss"
    coef = 1.0

    def __call__(self, ctx):
        return R.RegularizerOutput(loss=ctx.log_probs * math.nan)


def test_nonfinite_loss_skips_steps_then_raises() -> None:
    module = tiny_module(CharTask(), [_NaNLoss()], max_consecutive_nonfinite=3, batch_size=4, mini_batch_size=2)
    module.configure_model()
    before = {k: v.detach().clone() for k, v in module.model.actor.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NonFiniteError, match="max_consecutive_nonfinite=3"):
            fit(trainer(max_steps=5), module)
    # two mini-batch steps per iteration: the error comes in the 2nd iteration, after 3 skips
    assert module.learner.nonfinite_total == 3
    for k, v in module.model.actor.state_dict().items():
        assert torch.equal(before[k], v), k


def test_validation_protocol_metrics(tmp_path) -> None:
    """Pass@1 and mean reward over 5 prompts (2 padded rows in the last batch are not counted)."""
    module = tiny_module(IndexTask(n_val=5))
    t = trainer(tmp_path, max_steps=1, limit_val_batches=1.0)
    [metrics] = validate(t, module, verbose=False)
    assert metrics["val/pass@1"] == pytest.approx(3 / 5)
    assert metrics["val/reward"] == pytest.approx(3 / 5)
    assert metrics["val/response_length"] > 0


def test_validation_does_not_change_training() -> None:
    """Validation reseeds and restores the RNG: training with and without it is identical."""
    results = []
    for val in (False, True):
        module = tiny_module(CharTask(binary=True))
        kwargs = dict(limit_val_batches=1, val_check_interval=1, num_sanity_val_steps=1) if val else {}
        fit(trainer(max_steps=2, **kwargs), module)
        results.append({k: v.clone() for k, v in module.model.actor.state_dict().items()})
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_sample_logger_writes_csv(tmp_path) -> None:
    module = tiny_module(CharTask(binary=True))
    logger = CSVLogger(tmp_path, name="csv", version="")
    samples = SampleLogger(every_n_steps=2, max_rows=3)
    fit(trainer(tmp_path, max_steps=3, logger=logger, callbacks=[samples]), module)
    rows = _read_csv(tmp_path / "csv" / "samples.csv")
    assert [int(r["step"]) for r in rows] == [1, 1, 1, 3, 3, 3]
    assert all(r["prompt"].startswith("<|im_start|>user\nsay ") for r in rows)
    assert all(float(r["reward"]) in (0.0, 1.0) for r in rows)


def test_export_hf_round_trip(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module = tiny_module(CharTask())
    fit(trainer(max_steps=1), module)
    module.export_hf(str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    ids = tok(["say a"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, module.model.actor(ids).logits)
    assert tok.chat_template == module.tokenizer.chat_template


def test_config_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="micro_batch_size"):
        tiny_module(n=2, mini_batch_size=2, micro_batch_size=3)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precisions_run(precision: str) -> None:
    module = tiny_module(LengthTask(), share_backbone=precision == "bf16-true")
    seen = []

    class Grab(PMaxMonitor):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(outputs["metrics"])

    fit(trainer(max_steps=1, precision=precision, callbacks=[Grab()]), module)
    assert math.isfinite(seen[0]["value/loss"]) and math.isfinite(seen[0]["policy/p_max"])


@pytest.mark.gpu
def test_fp16_mixed_is_rejected() -> None:
    """fp16 AMP needs a grad scaler that the directly stepped optimizers would bypass (CPU turns it into bf16)."""
    module = tiny_module(LengthTask())
    with pytest.raises(ValueError, match="16-mixed"):
        fit(trainer(max_steps=1, precision="16-mixed", accelerator="gpu"), module)
