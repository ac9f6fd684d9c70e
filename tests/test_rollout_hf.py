"""HF engine, both backends (our decode loop, HF generate): left-padded batches, KV cache, eos / pad
handling, lengths, FSDP2, ranks in lock-step, and sampling from our SamplingParams alone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_module_support import tiny_source
from test_sampling import assert_sampled_from, reference_probs

from tre_lightning.models import TinyRandomSource
from tre_lightning.rollout import HFGenerateEngine, SamplingParams, response_mask_from_eos

BACKENDS = ["loop", "generate"]

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


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_matches_step_by_step_decoding(setup, backend) -> None:
    tok, model, ids, mask = setup
    assert (mask[:, 0] == 0).any(), "the batch must contain left padding"
    engine = HFGenerateEngine(backend=backend)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_eos_ends_response_and_pads_after(setup, backend) -> None:
    tok, model, ids, mask = setup
    free = _manual_greedy(model, ids, mask, 6, [])
    # make the 3rd greedy token of prompt 0 the eos (if it did not appear before)
    eos = free[0][2]
    first = free[0].index(eos)
    engine = HFGenerateEngine(eos_token_ids=[eos], pad_token_id=tok.pad_token_id, backend=backend)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_new_tokens_and_reproducible_sampling(setup, backend) -> None:
    _, model, ids, mask = setup
    engine = HFGenerateEngine(backend=backend)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_top_p_is_greedy(setup, backend) -> None:
    _, model, ids, mask = setup
    engine = HFGenerateEngine(backend=backend)
    engine.sync_weights(model)
    greedy = engine.generate(ids, mask, SamplingParams(n=1, max_new_tokens=5, greedy=True))
    nucleus = engine.generate(ids, mask, SamplingParams(n=1, max_new_tokens=5, top_p=1e-6))
    assert torch.equal(greedy.response_ids, nucleus.response_ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_restores_training_mode(setup, backend) -> None:
    _, model, ids, mask = setup
    engine = HFGenerateEngine(backend=backend)
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
    for backend in ("loop", "generate"):
        engine = HFGenerateEngine(backend=backend); engine.sync_weights(sharded)
        assert "generate" in vars(sharded), "generate registered as an FSDP forward method"
        got = engine.generate(enc["input_ids"], enc["attention_mask"], params)
        assert torch.equal(got.response_ids, want.response_ids), (backend, got.response_ids, want.response_ids)
        assert torch.equal(got.response_mask, want.response_mask)
    dist.destroy_process_group()
    print("FSDP2-OK")
    """
)


def test_generate_through_fsdp2_sharded_actor(tmp_path) -> None:
    """The engine registers ``generate`` as an FSDP forward method; both backends equal the unsharded model."""
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


def test_backend_is_validated() -> None:
    with pytest.raises(ValueError, match=r"backend must be one of \['loop', 'generate'\], got 'vllm'"):
        HFGenerateEngine(backend="vllm")
    assert HFGenerateEngine().backend == "loop"


# --------------------------------------------------------------------------- the loop equals HF generate


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("use_cache", [True, False])
def test_loop_greedy_tokens_equal_hf_generate(n: int, use_cache: bool) -> None:
    """Greedy tokens of the decode loop == HF generate's, prompts of 1-30 characters, left padding, n samples.

    ``n = 3`` runs each prompt once and repeats its KV cache (generate runs it
    3 times); ``use_cache=False`` recomputes the whole sequence every step.
    """
    source = tiny_source(hidden_size=32)
    tok = source.tokenizer()
    model = source.causal_lm().eval()
    texts = ["a", "hello there", "what is two plus two? tell me", "x y", "0123456789"]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert len(set(enc["attention_mask"].sum(1).tolist())) == len(texts), "prompts of different lengths"
    params = SamplingParams(n=n, max_new_tokens=10, greedy=True)
    ref = HFGenerateEngine(backend="generate", use_cache=use_cache)
    ref.sync_weights(model)
    loop = HFGenerateEngine(backend="loop", use_cache=use_cache)
    loop.sync_weights(model)
    want = ref.generate(enc["input_ids"], enc["attention_mask"], params)
    got = loop.generate(enc["input_ids"], enc["attention_mask"], params)
    assert torch.equal(got.response_ids, want.response_ids)
    assert torch.equal(got.response_mask, want.response_mask)
    assert torch.equal(got.prompt_ids, want.prompt_ids)


def test_loop_stops_when_every_row_has_ended() -> None:
    """Width = the step at which the last row hit eos (as generate), pad after each row's eos."""
    source = tiny_source(hidden_size=32)
    tok = source.tokenizer()
    model = source.causal_lm().eval()
    enc = tok(["hi", "abc"], padding=True, return_tensors="pt")
    free = HFGenerateEngine(eos_token_ids=[tok.eos_token_id], backend="loop")
    free.sync_weights(model)
    seqs = free.generate(enc["input_ids"], enc["attention_mask"], SamplingParams(max_new_tokens=8, greedy=True))
    eos = int(seqs.response_ids[0, 1])  # row 0's 2nd greedy token
    ends = [row.tolist().index(eos) + 1 if eos in row.tolist() else 8 for row in seqs.response_ids]
    for backend in BACKENDS:
        engine = HFGenerateEngine(eos_token_ids=[eos], pad_token_id=0, backend=backend)
        engine.sync_weights(model)
        r = engine.generate(enc["input_ids"], enc["attention_mask"], SamplingParams(max_new_tokens=8, greedy=True))
        assert r.response_ids.shape[1] == max(ends) and r.response_lengths.tolist() == ends, backend


# --------------------------------------------------------------------------- sampling from SamplingParams alone

NASTY_GENERATION_CONFIG = {
    "do_sample": True, "num_beams": 1, "temperature": 0.3, "top_k": 5, "top_p": 0.5, "min_p": 0.2,
    "typical_p": 0.8, "epsilon_cutoff": 3e-4, "eta_cutoff": 1e-3, "top_h": 0.5, "repetition_penalty": 1.3,
    "no_repeat_ngram_size": 2, "min_new_tokens": 3, "min_length": 5, "bad_words_ids": [[7]],
    "suppress_tokens": [8], "begin_suppress_tokens": [9], "forced_bos_token_id": 10, "forced_eos_token_id": 11,
    "sequence_bias": [[[12], 5.0]], "exponential_decay_length_penalty": [2, 1.5], "renormalize_logits": True,
    "remove_invalid_values": True, "max_time": 0.001, "max_length": 6, "max_new_tokens": 2,
    "num_return_sequences": 2, "eos_token_id": [1, 13], "pad_token_id": 0, "low_memory": True,
    "guidance_scale": 1.5, "output_scores": True, "return_dict_in_generate": True, "use_cache": False,
    "stop_strings": ["x"],
}


def _sampling_source() -> TinyRandomSource:
    """300 tokens, logits of std ~0.8 (init_std 0.2): T and top-50 both change the distribution a lot."""
    return TinyRandomSource(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                            n_filler=200, init_std=0.2, seed=0)


@pytest.fixture(scope="module")
def clean_and_nasty(tmp_path_factory: pytest.TempPathFactory):
    """The same weights loaded twice with AutoModelForCausalLM: with a plain and with a hostile generation_config.json."""
    from transformers import AutoModelForCausalLM

    source = _sampling_source()
    folder = tmp_path_factory.mktemp("nasty")
    source.causal_lm().save_pretrained(folder)
    clean = AutoModelForCausalLM.from_pretrained(folder).eval()
    (folder / "generation_config.json").write_text(json.dumps(NASTY_GENERATION_CONFIG))
    nasty = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert nasty.generation_config.top_k == 5 and nasty.generation_config.repetition_penalty == 1.3
    tok = source.tokenizer()
    enc = tok(["hello", "a much longer prompt"], padding=True, return_tensors="pt")
    return clean, nasty, enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampling", [
    SamplingParams(n=3, max_new_tokens=6, temperature=0.7, top_p=0.9),
    SamplingParams(n=1, max_new_tokens=6, temperature=1.0, top_p=1.0),
    SamplingParams(n=2, max_new_tokens=6, greedy=True),
], ids=["eval-like", "train-like", "greedy"])
def test_the_models_generation_config_changes_nothing(clean_and_nasty, backend: str, sampling: SamplingParams) -> None:
    """Same seed, same weights: identical tokens whatever the model's generation_config.json says.

    Checked to fail on the engine before this fix (generate inherited top_k=5,
    repetition_penalty, stop_strings ... from the model's generation config).
    """
    clean, nasty, ids, mask = clean_and_nasty
    outs = []
    for model in (clean, nasty):
        engine = HFGenerateEngine(eos_token_ids=[1], pad_token_id=0, backend=backend)
        engine.sync_weights(model)
        torch.manual_seed(11)
        outs.append(engine.generate(ids, mask, sampling).response_ids)
    assert outs[0].shape == (ids.shape[0] * sampling.n, 6)
    assert torch.equal(outs[0], outs[1])
    assert nasty.generation_config.top_k == 5, "the model's own generation config is restored after the call"


@pytest.mark.parametrize(("sampling", "expected"), [
    (SamplingParams(temperature=1.0, top_p=1.0), []),
    (SamplingParams(temperature=0.7, top_p=0.8), ["TemperatureLogitsWarper", "TopPLogitsWarper"]),
    (SamplingParams(temperature=1.3, top_k=20), ["TemperatureLogitsWarper", "TopKLogitsWarper"]),
    (SamplingParams(greedy=True, temperature=0.5, top_k=3), []),
])
def test_generate_backend_applies_only_our_processors(clean_and_nasty, monkeypatch, sampling, expected) -> None:
    """The logits processors and stopping criteria HF generate actually builds, on the hostile model.

    Checked to fail on the engine before this fix (``top_k=None`` gave
    ``TopKLogitsWarper(top_k=50)``, and the model's config added its own).
    """
    _, nasty, ids, mask = clean_and_nasty
    seen: dict[str, list[str]] = {}
    build_processors, build_criteria = nasty._get_logits_processor, nasty._get_stopping_criteria

    def processors(*args, **kwargs):
        out = build_processors(*args, **kwargs)
        seen["processors"] = [type(p).__name__ for p in out]
        return out

    def criteria(*args, **kwargs):
        out = build_criteria(*args, **kwargs)
        seen["criteria"] = sorted(type(c).__name__ for c in out)
        return out

    monkeypatch.setattr(nasty, "_get_logits_processor", processors)
    monkeypatch.setattr(nasty, "_get_stopping_criteria", criteria)
    engine = HFGenerateEngine(eos_token_ids=[1], pad_token_id=0, backend="generate")
    engine.sync_weights(nasty)
    engine.generate(ids, mask, SamplingParams(**{**vars(sampling), "max_new_tokens": 3}))
    assert seen["processors"] == expected
    assert seen["criteria"] == ["EosTokenCriteria", "MaxLengthCriteria"]


def test_loop_backend_samples_the_raw_logits_with_our_params(clean_and_nasty, monkeypatch) -> None:
    """The loop hands the sampler the model's own next-token logits and our SamplingParams, nothing else."""
    import tre_lightning.rollout.hf as hf

    _, nasty, ids, mask = clean_and_nasty
    calls: list[tuple[torch.Tensor, SamplingParams]] = []

    def spy(logits, sampling, *args, **kwargs):
        calls.append((logits.clone(), sampling))
        return hf_sample(logits, sampling, *args, **kwargs)

    hf_sample = hf.sample_next_tokens
    monkeypatch.setattr(hf, "sample_next_tokens", spy)
    params = SamplingParams(n=2, max_new_tokens=3, temperature=0.7, top_p=0.9)
    engine = HFGenerateEngine(eos_token_ids=[1], pad_token_id=0)
    engine.sync_weights(nasty)
    engine.generate(ids, mask, params)
    assert len(calls) == 3 and all(s is params for _, s in calls)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = nasty(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(calls[0][0], want.repeat_interleave(2, dim=0), rtol=1e-5, atol=1e-5)


FREQ_DRAWS = 40_000


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("temperature", "top_p"), [(0.6, 1.0), (1.3, 0.7)])
def test_sampled_token_frequencies_follow_softmax_z_over_t(clean_and_nasty, backend, temperature, top_p) -> None:
    """First tokens of 40,000 rollouts of one prompt vs softmax(z / T) (top-p: the renormalised nucleus).

    z: the model's next-token logits for the prompt, computed by a plain
    forward. The bound (tests/test_sampling.py: distribution-free, fails a
    correct sampler with probability <= 1e-9; 0.11-0.14 in L1 here) must hold,
    and the same draws must reject transformers' default top-50 and an
    ignored temperature. Checked to fail on the engine before this fix (its
    ``top_k=None`` sampled from top-50) and on the hostile model without the fix.
    """
    _, nasty, ids, mask = clean_and_nasty
    prompt, prompt_mask = ids[1:], mask[1:]
    with torch.no_grad():
        z = nasty(input_ids=prompt, attention_mask=prompt_mask).logits[0, -1].double()
    engine = HFGenerateEngine(eos_token_ids=[1], pad_token_id=0, backend=backend)
    engine.sync_weights(nasty)
    torch.manual_seed(0)
    draws = torch.cat([engine.generate(prompt, prompt_mask, SamplingParams(
        n=FREQ_DRAWS // 4, max_new_tokens=1, temperature=temperature, top_p=top_p)).response_ids[:, 0]
        for _ in range(4)])
    assert_sampled_from(draws, reference_probs(z, temperature, top_p=top_p), wrong={
        "default top-50": reference_probs(z, temperature, top_k=50, top_p=top_p),
        "temperature ignored": reference_probs(z, 1.0, top_p=top_p),
    })


# --------------------------------------------------------------------------- ranks in lock-step

LOCKSTEP_SCRIPT = textwrap.dedent(
    """
    import datetime, os, sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from torch.distributed.fsdp import fully_shard
    from test_module_support import tiny_source
    from tre_lightning.rollout import HFGenerateEngine, SamplingParams
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    source = tiny_source(hidden_size=32)
    tok = source.tokenizer()
    enc = tok(["hi", "abc"] if rank == 0 else ["a longer prompt", "x"], padding=True, return_tensors="pt")
    params = SamplingParams(n=2, max_new_tokens=6, greedy=True)
    plain = source.causal_lm().eval()
    free = HFGenerateEngine(eos_token_ids=[tok.eos_token_id], pad_token_id=0); free.sync_weights(plain)
    greedy = free.generate(enc["input_ids"], enc["attention_mask"], params).response_ids
    # rank 0 ends every row at step 1 (its eos = each row's first greedy token), rank 1 runs all 6 steps
    eos = sorted(set(greedy[:, 0].tolist())) if rank == 0 else [tok.eos_token_id]
    want = HFGenerateEngine(eos_token_ids=eos, pad_token_id=0); want.sync_weights(plain)
    want = want.generate(enc["input_ids"], enc["attention_mask"], params)
    model = source.causal_lm().eval()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    calls = [0]
    model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    result = {}
    for backend in ("loop", "generate"):
        calls[0] = 0
        engine = HFGenerateEngine(eos_token_ids=eos, pad_token_id=0, backend=backend); engine.sync_weights(model)
        got = engine.generate(enc["input_ids"], enc["attention_mask"], params)
        result[backend] = (calls[0], got.response_lengths.tolist(), got.response_ids.shape[1],
                           torch.equal(got.response_ids[:, : want.response_ids.shape[1]], want.response_ids))
    everyone = [None, None]
    dist.all_gather_object(everyone, result)
    if rank == 0:
        print("LOCKSTEP", everyone)
    dist.destroy_process_group()
    """
)


def test_ranks_stay_in_lock_step_when_one_finishes_first(tmp_path) -> None:
    """Two gloo processes, FSDP2-sharded actor: rank 0's rows all end at step 1, rank 1's run 6 steps.

    Both ranks must make the same number of forward calls (6), or the sharded
    forward's all-gathers would pair up wrongly / hang (the process group
    times out after 60 s). Checked to fail with ``sync=False`` in the loop.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "lockstep.py"
    script.write_text(LOCKSTEP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", port, str(script), str(Path(__file__).parent)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "LOCKSTEP" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    everyone = eval(proc.stdout.split("LOCKSTEP", 1)[1].strip().splitlines()[0])  # noqa: S307 - our own output
    for backend in BACKENDS:
        (calls0, lengths0, width0, same0), (calls1, lengths1, width1, same1) = everyone[0][backend], everyone[1][backend]
        assert calls0 == calls1 == 6, (backend, calls0, calls1)
        assert lengths0 == [1, 1, 1, 1] and lengths1 == [6, 6, 6, 6], backend
        assert (width0, width1) == (1, 6) and same0 and same1, backend  # as generate: the longest response
