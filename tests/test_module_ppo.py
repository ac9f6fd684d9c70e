"""The PPO update of PPOModule against an independent, hand-written PPO step,
and regularizers at their neutral settings (coefficient 0, ``unselected_weight=1``, ``detach_prob=0``)
against no regularizer."""

from __future__ import annotations

import copy

import pytest
import torch
from test_module_support import LengthTask, fixed_engine_for, tiny_module, tiny_source, fit, trainer, validate

from tre_lightning import regularizers as R

LR = 5e-2
# Adam's eps well above gradient noise: parameters whose gradient is 0 in exact arithmetic
# (e.g. attention key biases) would otherwise take lr-sized steps on rounding noise
EPS = 1e-3


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _reference_step(actor, critic, rollout, scores, *, mini_rows, lr, clip=0.2, dual=3.0, vclip=0.5, max_norm=1.0):
    """One PPO iteration written out by hand (no tre_lightning.ppo code)."""
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], 1)
    att = torch.cat([rollout.prompt_mask, rollout.response_mask], 1)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    R_ = rollout.response_ids.shape[1]
    mask = rollout.response_mask.float()

    def logp(model, rows):
        logits = model(input_ids=ids[rows], attention_mask=att[rows], position_ids=pos[rows]).logits
        logits = logits[:, -R_ - 1 : -1].float()
        return torch.log_softmax(logits, -1).gather(-1, rollout.response_ids[rows].unsqueeze(-1)).squeeze(-1)

    def values(rows):
        h = critic.backbone(input_ids=ids[rows], attention_mask=att[rows], position_ids=pos[rows]).last_hidden_state
        return critic.value_head.linear(h[:, -R_ - 1 : -1].float()).squeeze(-1)

    all_rows = torch.arange(ids.shape[0])
    with torch.no_grad():
        old_lp = logp(actor, all_rows)
        old_v = values(all_rows)
    # GAE with gamma = lambda = 1 and the score on the last valid token: A_t = score - V_t, returns = score
    adv = (scores[:, None] - old_v) * mask
    ret = scores[:, None].expand_as(mask) * mask
    n = mask.sum()
    mean = (adv * mask).sum() / n
    var = (((adv - mean) ** 2) * mask).sum() / (n - 1)
    adv = (adv - mean) / torch.sqrt(var + 1e-8) * mask

    actor_opt = torch.optim.AdamW(actor.parameters(), lr=lr, weight_decay=0.01, eps=EPS)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=lr, weight_decay=0.01, eps=EPS)
    for rows in mini_rows:
        actor_opt.zero_grad()
        critic_opt.zero_grad()
        m = mask[rows]
        ratio = torch.exp(logp(actor, rows) - old_lp[rows])
        a = adv[rows]
        loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip))
        loss = torch.where(a < 0, torch.minimum(loss, -a * dual), loss)
        ((loss * m).sum() / m.sum()).backward()
        v = values(rows)
        v_clipped = old_v[rows] + (v - old_v[rows]).clamp(-vclip, vclip)
        vloss = 0.5 * torch.maximum((v - ret[rows]) ** 2, (v_clipped - ret[rows]) ** 2)
        ((vloss * m).sum() / m.sum()).backward()
        for model in (actor, critic):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
            scale = min(1.0, max_norm / (float(norm) + 1e-6))
            for g in grads:
                g.mul_(scale)
        actor_opt.step()
        critic_opt.step()


@pytest.mark.parametrize("micro", [1, 2])
def test_update_equals_hand_written_ppo(micro: int) -> None:
    source = tiny_source()
    engine = fixed_engine_for(source)
    module = tiny_module(
        LengthTask(), engine=engine, source=source, batch_size=2, mini_batch_size=1, micro_batch_size=micro, lr=LR,
        shuffle=False, n=2, max_new_tokens=6, eps=EPS,
    )
    module.configure_model()
    actor0, critic0 = copy.deepcopy(module.model.actor), copy.deepcopy(module.model.critic)
    fit(trainer(max_steps=1), module)

    rollout = engine.rollouts[0]
    # score independently: LengthTask's reward is the number of characters of the valid,
    # non-special response tokens (one character per token in the char tokenizer) / 10
    tok = module.tokenizer
    specials = set(tok.all_special_ids)
    scores = torch.tensor(
        [sum(1 for t, m in zip(ids.tolist(), mask.tolist()) if m and t not in specials) / 10
         for ids, mask in zip(rollout.response_ids, rollout.response_mask)]
    )
    assert scores.std() > 0

    _reference_step(actor0, critic0, rollout, scores, mini_rows=[torch.tensor([0, 1]), torch.tensor([2, 3])], lr=LR)

    got, want = _params(module.model.actor), _params(actor0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    got_c, want_c = _params(module.model.critic), _params(critic0)
    for name in want_c:
        torch.testing.assert_close(got_c[name], want_c[name], rtol=1e-4, atol=1e-5, msg=name)


def test_micro_batch_accumulation_matches_one_pass() -> None:
    """Token-mean over micro-batches (mini-batch normalizer) equals the whole mini-batch in one pass."""
    results = []
    for micro in (1, 4):
        source = tiny_source()
        module = tiny_module(LengthTask(), engine=fixed_engine_for(source), source=source, batch_size=2,
                             mini_batch_size=2, micro_batch_size=micro, lr=LR, shuffle=False, eps=EPS)
        fit(trainer(max_steps=1), module)
        results.append(_params(module.model.actor))
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-4, atol=1e-5, msg=name)


ZERO_COEF = {
    "ent": lambda: R.Ent(coef=0.0),
    "tre_k": lambda: R.TREK(coef=0.0),
    "tre_p": lambda: R.TREP(coef=0.0),
    "min_ent": lambda: R.MinEnt(coef=0.0),
    "forking": lambda: R.ForkingTokens(unselected_weight=1.0),
    "kl_cov": lambda: R.KLCov(coef=0.0),
    "clip_cov": lambda: R.ClipCov(detach_prob=0.0),
}


def _run(regularizers) -> dict[str, torch.Tensor]:
    source = tiny_source()
    module = tiny_module(LengthTask(), regularizers, fixed_engine_for(source), source=source, lr=LR,
                         micro_batch_size=2, eps=EPS)
    fit(trainer(max_steps=2), module)
    return _params(module.model.actor)


def test_zero_coefficients_give_vanilla_ppo() -> None:
    vanilla = _run(None)
    everything = _run([make() for make in ZERO_COEF.values()])
    for name in vanilla:
        torch.testing.assert_close(everything[name], vanilla[name], rtol=0, atol=1e-7, msg=name)
    # and the update is not trivially zero
    initial = _params(tiny_source().causal_lm())
    assert any(not torch.allclose(vanilla[k], initial[k]) for k in vanilla)
