"""HF generate engine: left-padded batches, KV cache, eos / pad handling, lengths, FSDP2."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from test_module_support import tiny_source

from tre_lightning.rollout import HFGenerateEngine, SamplingParams, response_mask_from_eos

PROMPTS = ["hi", "what is two plus two?", "abc"]


@pytest.fixture(scope="module")
def setup():
    source = tiny_source(hidden_size=32)
    tok = source.tokenizer()
    model = source.causal_lm().eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS]
    enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    return tok, model, enc["input_ids"], enc["attention_mask"]


def _manual_greedy(model, ids, mask, steps, eos):
    """Greedy decoding with a full forward per step (no KV cache), positions skipping left padding."""
    out = []
    for row in range(ids.shape[0]):
        seq = ids[row][mask[row].bool()].tolist()
        gen = []
        for _ in range(steps):
            x = torch.tensor([seq])
            with torch.no_grad():
                nxt = int(model(input_ids=x).logits[0, -1].argmax())
            gen.append(nxt)
            seq.append(nxt)
            if nxt in eos:
                break
        out.append(gen)
    return out


def test_greedy_matches_step_by_step_decoding(setup) -> None:
    tok, model, ids, mask = setup
    assert (mask[:, 0] == 0).any(), "the batch must contain left padding"
    engine = HFGenerateEngine()
    engine.sync_weights(model)
    r = engine.generate(ids, mask, SamplingParams(n=2, max_new_tokens=7, greedy=True))
    expected = _manual_greedy(model, ids, mask, 7, [tok.eos_token_id])
    assert r.response_ids.shape[0] == 2 * len(PROMPTS)
    for i, exp in enumerate(expected):
        for j in range(2):  # rows i*n .. i*n+n-1 belong to prompt i
            row = 2 * i + j
            n_valid = int(r.response_lengths[row])
            assert r.response_ids[row, :n_valid].tolist() == exp
            assert torch.equal(r.prompt_ids[row], ids[i]) and torch.equal(r.prompt_mask[row], mask[i])


def test_eos_ends_response_and_pads_after(setup) -> None:
    tok, model, ids, mask = setup
    free = _manual_greedy(model, ids, mask, 6, [])
    # make the 3rd greedy token of prompt 0 the eos (if it did not appear before)
    eos = free[0][2]
    first = free[0].index(eos)
    engine = HFGenerateEngine(eos_token_ids=[eos], pad_token_id=tok.pad_token_id)
    engine.sync_weights(model)
    r = engine.generate(ids, mask, SamplingParams(n=1, max_new_tokens=6, greedy=True))
    assert int(r.response_lengths[0]) == first + 1  # eos included
    assert r.response_mask[0].tolist()[: first + 1] == [1] * (first + 1)
    assert r.response_mask[0, first + 1 :].sum() == 0
    assert (r.response_ids[0, first + 1 :] == tok.pad_token_id).all()
    for row in range(len(PROMPTS)):
        seq = free[row]
        want = seq.index(eos) + 1 if eos in seq else 6
        assert int(r.response_lengths[row]) == want
        assert r.response_ids[row, :want].tolist() == seq[:want]
    assert torch.equal(r.response_lengths, r.response_mask.sum(1))


def test_max_new_tokens_and_reproducible_sampling(setup) -> None:
    _, model, ids, mask = setup
    engine = HFGenerateEngine()
    engine.sync_weights(model)
    params = SamplingParams(n=3, max_new_tokens=5, temperature=1.0, top_p=1.0)
    torch.manual_seed(7)
    a = engine.generate(ids, mask, params)
    torch.manual_seed(7)
    b = engine.generate(ids, mask, params)
    torch.manual_seed(8)
    c = engine.generate(ids, mask, params)
    assert a.response_ids.shape[1] <= 5 and int(a.response_lengths.max()) <= 5
    assert torch.equal(a.response_ids, b.response_ids)
    assert not torch.equal(a.response_ids, c.response_ids)
    assert model.training is False


def test_tiny_top_p_is_greedy(setup) -> None:
    _, model, ids, mask = setup
    engine = HFGenerateEngine()
    engine.sync_weights(model)
    greedy = engine.generate(ids, mask, SamplingParams(n=1, max_new_tokens=5, greedy=True))
    nucleus = engine.generate(ids, mask, SamplingParams(n=1, max_new_tokens=5, top_p=1e-6))
    assert torch.equal(greedy.response_ids, nucleus.response_ids)


def test_restores_training_mode(setup) -> None:
    _, model, ids, mask = setup
    engine = HFGenerateEngine()
    engine.sync_weights(model)
    model.train()
    try:
        engine.generate(ids, mask, SamplingParams(n=1, max_new_tokens=2))
        assert model.training
    finally:
        model.eval()


def test_errors(setup) -> None:
    _, model, ids, mask = setup
    with pytest.raises(RuntimeError, match="sync_weights"):
        HFGenerateEngine().generate(ids, mask, SamplingParams())
    engine = HFGenerateEngine()
    engine.sync_weights(model)
    right_padded = torch.flip(mask, dims=[1])
    with pytest.raises(ValueError, match="left-padded"):
        engine.generate(ids, right_padded, SamplingParams())


def test_response_mask_from_eos() -> None:
    ids = torch.tensor([[5, 1, 0, 0], [5, 6, 7, 8], [1, 1, 0, 0], [5, 2, 6, 1]])
    mask = response_mask_from_eos(ids, [1, 2])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]


FSDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from torch.distributed.fsdp import fully_shard, FSDPModule
    from test_module_support import tiny_source
    from tre_lightning.rollout import HFGenerateEngine, SamplingParams
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    dist.init_process_group("gloo", rank=0, world_size=1)
    source = tiny_source(hidden_size=32)
    tok = source.tokenizer()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in ["hi", "a longer prompt"]]
    enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    params = SamplingParams(n=2, max_new_tokens=6, greedy=True)
    plain = HFGenerateEngine(); plain.sync_weights(source.causal_lm().eval())
    want = plain.generate(enc["input_ids"], enc["attention_mask"], params)
    sharded = source.causal_lm().eval()
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    assert isinstance(sharded, FSDPModule)
    engine = HFGenerateEngine(); engine.sync_weights(sharded)
    assert "generate" in vars(sharded), "generate registered as an FSDP forward method"
    got = engine.generate(enc["input_ids"], enc["attention_mask"], params)
    assert torch.equal(got.response_ids, want.response_ids), (got.response_ids, want.response_ids)
    assert torch.equal(got.response_mask, want.response_mask)
    dist.destroy_process_group()
    print("FSDP2-OK")
    """
)


def test_generate_through_fsdp2_sharded_actor(tmp_path) -> None:
    """The engine registers ``generate`` as an FSDP forward method; output equals the unsharded model."""
    import socket
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "fsdp_generate.py"
    script.write_text(FSDP_SCRIPT)
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.run([sys.executable, str(script), tests_dir, port], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "FSDP2-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"eos_token_ids": []}, "eos_token_ids"),
        ({"eos_token_ids": [1, -2]}, "eos_token_ids"),
        ({"eos_token_ids": [1.5]}, "eos_token_ids"),
        ({"eos_token_ids": [True]}, "eos_token_ids"),
        ({"eos_token_ids": "1"}, "eos_token_ids"),
        ({"pad_token_id": -1}, "pad_token_id"),
        ({"pad_token_id": "0"}, "pad_token_id"),
        ({"use_cache": "yes"}, "use_cache"),
    ],
)
def test_constructor_arguments_are_validated(kwargs, name) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be .*(>= 0|true or false)"):
        HFGenerateEngine(**kwargs)


def test_valid_constructor_arguments_are_kept() -> None:
    engine = HFGenerateEngine(eos_token_ids=(1, 2), pad_token_id=0, use_cache=False)
    assert engine.eos_token_ids == [1, 2] and engine.pad_token_id == 0 and engine.use_cache is False
