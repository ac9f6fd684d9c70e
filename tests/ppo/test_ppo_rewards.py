"""token_level_rewards and last_token_index against loops."""

from __future__ import annotations

import pytest
import torch

from tre_lightning.ppo import last_token_index, token_level_rewards

CASES = [(b, t, s) for (b, t) in [(1, 1), (2, 3), (4, 7), (6, 12)] for s in (0, 1, 2)]


def ref_rewards(scores, lengths, length, kl, kl_coef):
    out = torch.zeros(len(lengths), length, dtype=torch.float64)
    for b, n in enumerate(lengths):
        for t in range(n):
            if kl is not None:
                out[b, t] = -kl_coef * float(kl[b, t])
        if n > 0:
            out[b, n - 1] += float(scores[b])
    return out


@pytest.mark.parametrize(("batch", "length", "seed"), CASES)
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_matches_loop_reference(rb, batch, length, seed, kl_coef):
    g = rb.gen(seed)
    lengths = rb.lengths(batch, length, g)
    mask = rb.mask(lengths, length)
    scores = rb.randn(g, (batch,))
    kl = rb.with_garbage(rb.randn(g, (batch, length)), mask, g)
    out = token_level_rewards(scores, mask, kl, kl_coef)
    torch.testing.assert_close(out, ref_rewards(scores, lengths, length, kl, kl_coef))
    torch.testing.assert_close(token_level_rewards(scores, mask), ref_rewards(scores, lengths, length, None, 0.0))


def test_hand_case():
    # row 0: 3 tokens, score 1 -> [-.1*0.5, -.1*1, 1 - .1*2, 0]; row 1: 1 token, score -2 -> [-2 - .1*(-1), 0, 0, 0]
    scores = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float64)
    kl = torch.tensor([[0.5, 1.0, 2.0, 9.0], [-1.0, 9.0, 9.0, 9.0]], dtype=torch.float64)
    expected = torch.tensor([[-0.05, -0.1, 0.8, 0.0], [-1.9, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(token_level_rewards(scores, mask, kl, kl_coef=0.1), expected)


def test_empty_row_and_interior_gap():
    mask = torch.tensor([[0, 0, 0], [1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    assert last_token_index(mask).tolist() == [-1, 2, 1]
    out = token_level_rewards(torch.tensor([5.0, 1.0, 2.0]), mask)
    assert out.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 2.0, 0.0]]
    assert out.dtype == torch.float32


def test_invalid_arguments(arg_error):
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"scores must have shape \(B,\).*\(2, 1\).*\(2, 3\)"):
        token_level_rewards(torch.zeros(2, 1), mask)
    with pytest.raises(ValueError, match=r"scores.*\(3,\).*\(2, 3\)"):
        token_level_rewards(torch.zeros(3), mask)
    with arg_error("kl_coef", "a finite number >= 0"):
        token_level_rewards(torch.zeros(2), mask, torch.zeros(2, 3), kl_coef=-0.1)
    with pytest.raises(ValueError, match="kl must be given"):
        token_level_rewards(torch.zeros(2), mask, None, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"kl and mask .*\(2, 4\).*\(2, 3\)"):
        token_level_rewards(torch.zeros(2), mask, torch.zeros(2, 4), kl_coef=0.1)
    with pytest.raises(ValueError, match="mask must be 2-D"):
        last_token_index(torch.ones(3))
