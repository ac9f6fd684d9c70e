"""The vLLM engine without vLLM: name mapping, gathering, output conversion,
the missing-vLLM error, and the engine's control flow against a fake ``vllm``.

The real-engine test (``-m gpu``) is at the end; everything it does not need
a GPU for is exercised here with a fake ``vllm`` module whose "model" is a
real tiny HF Qwen2 that loads the pushed weights.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from transformers import Qwen2ForCausalLM

from tre_lightning.models.tiny import tiny_qwen2_config
from tre_lightning.rollout.base import SamplingParams
from tre_lightning.rollout.hf import HFGenerateEngine
from tre_lightning.rollout.vllm import (
    VLLMEngine,
    VLLMUnavailableError,
    check_vllm_available,
    gather_weights_for_vllm,
    lora_scalings,
    request_outputs_to_rollout,
    to_hf_checkpoint_names,
    to_vllm_sampling_kwargs,
)

VOCAB = 48
EOS, PAD = 1, 0


def tiny(tie: bool = True, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_qwen2_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                               tie_word_embeddings=tie))  # fmt: skip
    if not tie:
        with torch.no_grad():  # decisive logits: greedy decoding is stable across implementations
            model.lm_head.weight.mul_(20)
    return model


# --------------------------------------------------------------------------- #
# the missing-vLLM / missing-CUDA error
# --------------------------------------------------------------------------- #


def test_missing_vllm_or_cuda_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "vllm" else real_find_spec(n, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VLLMUnavailableError) as err:
        VLLMEngine(model="/nonexistent")
    message = str(err.value)
    assert "tre-lightning[vllm]" in message and "CUDA" in message and "drop +engine=vllm" in message
    assert isinstance(err.value, RuntimeError)


def test_cuda_missing_alone_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "vllm" else real_find_spec(n, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VLLMUnavailableError, match="no CUDA GPU") as err:
        check_vllm_available()
    assert "not installed" not in str(err.value)


def test_constructor_validates_before_checking_vllm() -> None:
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMEngine(model="m", gpu_memory_utilization=1.5)


# --------------------------------------------------------------------------- #
# sampling parameters
# --------------------------------------------------------------------------- #


def test_sampling_parameters_map_one_to_one() -> None:
    """Only our temperature / top-p / top-k; every other vLLM processor off; ends exactly at our eos ids."""
    kw = to_vllm_sampling_kwargs(SamplingParams(n=8, temperature=1.0, top_p=0.7, top_k=0, max_new_tokens=512),
                                 logprobs=True, eos_token_ids=[EOS, 9])  # fmt: skip
    assert kw == {"n": 8, "temperature": 1.0, "top_p": 0.7, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                  "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_tokens": 0, "max_tokens": 512,
                  "ignore_eos": True, "stop_token_ids": [EOS, 9], "logprobs": 0, "detokenize": False}  # fmt: skip
    greedy = to_vllm_sampling_kwargs(SamplingParams(n=4, greedy=True, top_k=5, top_p=0.5), logprobs=False, seed=3)
    assert greedy["temperature"] == 0.0 and greedy["top_k"] == 0 and greedy["top_p"] == 1.0
    assert greedy["n"] == 1, "vLLM refuses greedy sampling with n > 1: one completion, repeated by the engine"
    assert greedy["logprobs"] is None and greedy["seed"] == 3 and greedy["stop_token_ids"] == []
    assert to_vllm_sampling_kwargs(SamplingParams(top_k=20), logprobs=False)["top_k"] == 20


# --------------------------------------------------------------------------- #
# RequestOutput -> Rollout
# --------------------------------------------------------------------------- #


@dataclass
class FakeLogprob:
    logprob: float
    rank: int = 1


@dataclass
class FakeCompletion:
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Any]] | None = None
    text: str = ""


@dataclass
class FakeRequestOutput:
    prompt_token_ids: list[int]
    outputs: list[FakeCompletion] = field(default_factory=list)


def test_request_outputs_convert_to_right_padded_rollout() -> None:
    prompt_ids = torch.tensor([[PAD, 5, 6], [7, 8, 9]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])

    def comp(index: int, ids: list[int]) -> FakeCompletion:
        lps = [{t: FakeLogprob(-0.1 * (k + 1)), 99: FakeLogprob(-9.0)} for k, t in enumerate(ids)]
        return FakeCompletion(index, ids, lps)

    outputs = [
        # completion order scrambled on purpose: rows follow `.index`
        FakeRequestOutput([5, 6], [comp(1, [11, EOS]), comp(0, [10, 12, 13, EOS])]),
        FakeRequestOutput([7, 8, 9], [comp(0, [14, 15, 16, 17, 18]), comp(1, [EOS])]),
    ]
    r = request_outputs_to_rollout(outputs, prompt_ids, prompt_mask, n=2, pad_token_id=PAD, eos_token_ids=[EOS],
                                   with_log_probs=True)  # fmt: skip
    assert torch.equal(r.prompt_ids, prompt_ids.repeat_interleave(2, dim=0))
    assert torch.equal(r.prompt_mask, prompt_mask.repeat_interleave(2, dim=0))
    assert r.response_ids.tolist() == [
        [10, 12, 13, EOS, PAD],
        [11, EOS, PAD, PAD, PAD],
        [14, 15, 16, 17, 18],
        [EOS, PAD, PAD, PAD, PAD],
    ]
    assert r.response_lengths.tolist() == [4, 2, 5, 1]
    assert r.response_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert r.log_probs is not None
    assert torch.allclose(r.log_probs[0], torch.tensor([-0.1, -0.2, -0.3, -0.4, 0.0]))
    assert torch.allclose(r.log_probs[3], torch.tensor([-0.1, 0, 0, 0, 0]))
    assert r.input_ids.shape == (4, 8)


def test_tokens_after_an_eos_are_masked_and_plain_float_logprobs_work() -> None:
    ids = [3, EOS, 4, 5]
    out = [FakeRequestOutput([2], [FakeCompletion(0, ids, [{t: -1.0} for t in ids])])]
    r = request_outputs_to_rollout(out, torch.tensor([[2]]), torch.tensor([[1]]), n=1, pad_token_id=PAD,
                                   eos_token_ids=[EOS], with_log_probs=True)  # fmt: skip
    assert r.response_ids.tolist() == [[3, EOS, PAD, PAD]]
    assert r.response_lengths.tolist() == [2]
    assert r.log_probs is not None and r.log_probs.tolist() == [[-1.0, -1.0, 0.0, 0.0]]


def test_conversion_errors() -> None:
    prompt = torch.tensor([[2]]), torch.tensor([[1]])
    with pytest.raises(ValueError, match="2 request outputs for 1 prompts"):
        request_outputs_to_rollout([FakeRequestOutput([2]), FakeRequestOutput([2])], *prompt, n=1, pad_token_id=0)
    with pytest.raises(ValueError, match="expected 2 completions"):
        request_outputs_to_rollout([FakeRequestOutput([2], [FakeCompletion(0, [3])])], *prompt, n=2, pad_token_id=0)
    with pytest.raises(ValueError, match="no logprobs"):
        request_outputs_to_rollout([FakeRequestOutput([2], [FakeCompletion(0, [3])])], *prompt, n=1, pad_token_id=0,
                                   with_log_probs=True)  # fmt: skip
    empty = request_outputs_to_rollout([FakeRequestOutput([2], [FakeCompletion(0, [])])], *prompt, n=1, pad_token_id=0)
    assert empty.response_ids.shape == (1, 1) and empty.response_lengths.tolist() == [0]


# --------------------------------------------------------------------------- #
# names and gathering, against a real tiny HF Qwen2
# --------------------------------------------------------------------------- #


def test_plain_model_names_are_checkpoint_names() -> None:
    model = tiny(tie=True)
    mapped = dict(to_hf_checkpoint_names(model.named_parameters()))
    assert set(mapped) == set(model.state_dict()) - {"lm_head.weight"}  # tied: vLLM re-ties
    untied = tiny(tie=False)
    assert set(dict(to_hf_checkpoint_names(untied.named_parameters()))) == set(untied.state_dict())


def test_wrapper_prefixes_are_stripped() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = tiny()
    expected = set(model.state_dict()) - {"lm_head.weight"}
    compiled = torch.compile(model)  # lazy: only the names matter here
    assert set(dict(to_hf_checkpoint_names(compiled.named_parameters()))) == expected

    class DDPLike(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    assert set(dict(to_hf_checkpoint_names(DDPLike(model).named_parameters()))) == expected
    wrapped = tiny()
    for i, layer in enumerate(wrapped.model.layers):
        wrapped.model.layers[i] = checkpoint_wrapper(layer)
    names = [n for n, _ in wrapped.named_parameters()]
    assert any("_checkpoint_wrapped_module" in n for n in names)
    assert set(dict(to_hf_checkpoint_names(wrapped.named_parameters()))) == expected


def test_value_head_and_other_adapters_are_dropped() -> None:
    model = tiny()
    extra = [("value_head.linear.weight", torch.zeros(1, 32)), ("v_head.weight", torch.zeros(1))]
    mapped = dict(to_hf_checkpoint_names([*model.named_parameters(), *extra]))
    assert not any("head" in n and "lm_head" not in n for n in mapped)


class FakeLoraLinear(nn.Module):
    """PEFT's LoraLayer layout: base_layer, lora_A/lora_B ModuleDicts, scaling dict."""

    def __init__(self, base: nn.Linear, r: int = 4, alpha: float = 8.0, adapters: tuple[str, ...] = ("default",)):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({a: nn.Linear(base.in_features, r, bias=False) for a in adapters})
        self.lora_B = nn.ModuleDict({a: nn.Linear(r, base.out_features, bias=False) for a in adapters})
        self.scaling = {a: alpha / r for a in adapters}
        for a in adapters:
            nn.init.normal_(self.lora_B[a].weight, std=0.5)  # PEFT starts at 0; non-zero to see the merge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = "default"
        return self.base_layer(x) + self.lora_B[a](self.lora_A[a](x)) * self.scaling[a]


class FakePeftModel(nn.Module):
    """``base_model.model.<hf model>`` like ``peft.PeftModel``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.base_model = nn.Module()
        self.base_model.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.model(*args, **kwargs)


def _lora_model(adapters: tuple[str, ...] = ("default",)) -> FakePeftModel:
    model = tiny()
    for layer in model.model.layers:
        layer.self_attn.q_proj = FakeLoraLinear(layer.self_attn.q_proj, adapters=adapters)
        layer.self_attn.v_proj = FakeLoraLinear(layer.self_attn.v_proj, adapters=adapters)
    return FakePeftModel(model)


def test_lora_is_merged_into_base_weights_and_loads_into_a_plain_model() -> None:
    peft = _lora_model()
    scalings = lora_scalings(peft)
    assert scalings == {f"model.layers.{i}.self_attn.{p}_proj": 2.0 for i in range(2) for p in ("q", "v")}
    mapped = dict(to_hf_checkpoint_names(peft.named_parameters(), lora_scaling=scalings))
    plain = tiny(seed=1)
    assert set(mapped) == set(plain.state_dict()) - {"lm_head.weight"}
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    expected = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(mapped["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6)
    assert torch.equal(mapped["model.layers.0.self_attn.q_proj.bias"], layer.base_layer.bias)
    missing, unexpected = plain.load_state_dict(mapped, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(2, VOCAB, (2, 7))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, peft(input_ids=ids).logits, atol=1e-4)


def test_gather_merges_lora_with_scalings_read_from_the_model() -> None:
    peft = _lora_model(adapters=("default", "other"))
    got = dict(gather_weights_for_vllm(peft, dtype=torch.bfloat16))
    ref = dict(to_hf_checkpoint_names(peft.named_parameters(), lora_scaling=2.0))
    assert set(got) == set(ref) and all(t.dtype == torch.bfloat16 for t in got.values())
    assert torch.allclose(got["model.layers.1.self_attn.v_proj.weight"].float(),
                          ref["model.layers.1.self_attn.v_proj.weight"], atol=1e-2)  # fmt: skip


def test_modules_to_save_and_lora_errors() -> None:
    w = torch.ones(3, 2)
    named = [
        ("base_model.model.score.original_module.weight", w * 0),
        ("base_model.model.score.modules_to_save.default.weight", w),
    ]
    assert [(n, t.sum().item()) for n, t in to_hf_checkpoint_names(named)] == [("score.weight", 6.0)]
    with pytest.raises(ValueError, match="incomplete LoRA"):
        list(to_hf_checkpoint_names([("a.lora_A.default.weight", torch.ones(1, 2))]))
    with pytest.raises(NotImplementedError, match="embedding"):
        list(to_hf_checkpoint_names([("emb.lora_embedding_A.default", torch.ones(1, 2))]))
    with pytest.raises(ValueError, match="no LoRA scaling"):
        list(to_hf_checkpoint_names(
            [("x.base_layer.weight", w), ("x.lora_A.default.weight", torch.ones(1, 2)),
             ("x.lora_B.default.weight", torch.ones(3, 1))], lora_scaling={}))  # fmt: skip


# --------------------------------------------------------------------------- #
# the engine's control flow, against a fake `vllm` whose model is a real HF model
# --------------------------------------------------------------------------- #


class FakeVllmModel:
    """Stands in for vLLM's model: ``load_weights`` takes HF checkpoint names."""

    def __init__(self, path: str) -> None:
        self.hf = Qwen2ForCausalLM.from_pretrained(path).eval()
        self.loaded: list[str] = []

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.hf.named_parameters())
        for name, tensor in weights:
            params[name].data.copy_(tensor)  # KeyError = a name vLLM would not know
            self.loaded.append(name)
        return {n for n, _ in weights}


class FakeLLM:
    instances: list[FakeLLM] = []
    tokenizer_eos = EOS

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls: list[str] = []
        model = FakeVllmModel(kwargs["model"])
        runner = types.SimpleNamespace(model=model)
        worker = types.SimpleNamespace(worker=types.SimpleNamespace(model_runner=runner))
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=worker))
        self.model = model
        FakeLLM.instances.append(self)

    def get_tokenizer(self) -> Any:
        return types.SimpleNamespace(eos_token_id=self.tokenizer_eos, pad_token_id=PAD)

    def generate(self, prompts: list[dict], params: Any, use_tqdm: bool = True) -> list[FakeRequestOutput]:
        """Greedy decoding with vLLM's (v0.10-v0.11) stop rules and argument checks.

        A request stops at the tokenizer's eos unless ``ignore_eos``, and at any
        of ``stop_token_ids`` (the token is kept in ``token_ids``); greedy with
        ``n > 1`` and ``top_k < -1`` are refused, as vLLM's SamplingParams does.
        """
        self.calls.append("generate")
        kw = params.kwargs
        assert kw["temperature"] == 0.0, "the fake engine decodes greedily only"
        if kw["n"] != 1:
            raise ValueError(f"n must be 1 when using greedy sampling, got {kw['n']}.")
        if kw.get("top_k", 0) < -1:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {kw['top_k']}.")
        return self._decode(prompts, kw)

    def _decode(self, prompts: list[dict], kw: dict[str, Any]) -> list[FakeRequestOutput]:
        stops = set(kw.get("stop_token_ids") or []) | (set() if kw.get("ignore_eos") else {self.tokenizer_eos})
        outs = []
        for prompt in prompts:
            seq: list[int] = []
            ids = torch.tensor([prompt["prompt_token_ids"]])
            while len(seq) < kw["max_tokens"] and not (seq and seq[-1] in stops):
                with torch.no_grad():
                    seq.append(int(self.model.hf(input_ids=ids).logits[0, -1].argmax()))
                ids = torch.cat([ids, torch.tensor([[seq[-1]]])], dim=1)
            comps = [FakeCompletion(j, seq, [{t: FakeLogprob(-0.5)} for t in seq]) for j in range(kw["n"])]
            outs.append(FakeRequestOutput(prompt["prompt_token_ids"], comps))
        return outs

    def sleep(self, level: int = 1) -> None:
        self.calls.append(f"sleep({level})")

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(f"wake_up({tags})")

    def reset_prefix_cache(self) -> bool:
        self.calls.append("reset_prefix_cache")
        return True


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    import tre_lightning.rollout.vllm as vllm_mod

    module = types.ModuleType("vllm")
    module.LLM = FakeLLM  # type: ignore[attr-defined]
    module.SamplingParams = FakeSamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(vllm_mod, "check_vllm_available", lambda: None)
    FakeLLM.instances = []
    monkeypatch.setattr(FakeLLM, "tokenizer_eos", EOS)
    return FakeLLM


def test_engine_generates_like_hf_and_picks_up_pushed_weights(fake_vllm: type[FakeLLM], tmp_path) -> None:
    start = tiny(tie=False, seed=0)
    start.save_pretrained(tmp_path / "start")
    engine = VLLMEngine(model=str(tmp_path / "start"), dtype="float32", seed=5, enable_prefix_caching=True)
    prompts = torch.tensor([[PAD, 5, 6, 7], [8, 9, 10, 11]])
    mask = (prompts != PAD).long()
    sampling = SamplingParams(n=2, greedy=True, max_new_tokens=6)

    actor = tiny(tie=False, seed=3)  # different weights from the folder the engine starts from
    hf_engine = HFGenerateEngine(eos_token_ids=[EOS], pad_token_id=PAD)
    hf_engine.sync_weights(actor)
    before = engine.generate(prompts, mask, sampling)
    expected_start = HFGenerateEngine(eos_token_ids=[EOS], pad_token_id=PAD)
    expected_start.sync_weights(start)
    ref_start = expected_start.generate(prompts, mask, sampling)
    assert torch.equal(before.response_ids, ref_start.response_ids)

    engine.sync_weights(actor)
    llm = fake_vllm.instances[0]
    assert llm.kwargs["seed"] == 5 and llm.kwargs["dtype"] == "float32"
    assert llm.kwargs["generation_config"] == "vllm", "the model's generation_config.json must not set defaults"
    assert "distributed_executor_backend" not in llm.kwargs  # no process group here
    assert set(llm.model.loaded) == set(actor.state_dict())
    for name, p in actor.state_dict().items():
        assert torch.equal(llm.model.hf.state_dict()[name], p), name
    after = engine.generate(prompts, mask, sampling)
    ref = hf_engine.generate(prompts, mask, sampling)
    assert torch.equal(after.response_ids, ref.response_ids)
    assert torch.equal(after.response_mask, ref.response_mask)
    assert not torch.equal(after.response_ids, before.response_ids)
    assert after.log_probs is not None and after.log_probs.shape == after.response_ids.shape
    assert llm.calls == ["generate", "reset_prefix_cache", "generate"]


def test_engine_ends_responses_at_our_eos_ids_only(fake_vllm: type[FakeLLM], tmp_path) -> None:
    """With eos_token_ids not the tokenizer's, vLLM must neither stop at the tokenizer's eos nor miss ours
    (``ignore_eos=True`` + ``stop_token_ids``); the responses equal the HF engine's with the same ids.
    Checked to fail with the previous mapping (no ``ignore_eos`` / ``stop_token_ids``)."""
    start = tiny(tie=False, seed=0)
    start.save_pretrained(tmp_path / "start")
    prompts = torch.tensor([[PAD, 5, 6, 7], [8, 9, 10, 11]])
    mask = (prompts != PAD).long()
    sampling = SamplingParams(n=3, greedy=True, max_new_tokens=8)
    free = HFGenerateEngine(eos_token_ids=[EOS], pad_token_id=PAD)
    free.sync_weights(start)
    greedy = free.generate(prompts, mask, SamplingParams(greedy=True, max_new_tokens=8)).response_ids
    # row 0's 4th greedy token ends responses; the tokenizer's eos (row 0's 2nd token) must not
    fake_vllm.tokenizer_eos = int(greedy[0, 1])
    ours = [int(greedy[0, 3])]
    assert fake_vllm.tokenizer_eos not in greedy[0, 2:4].tolist() and ours[0] not in greedy[0, :3].tolist()
    hf_engine = HFGenerateEngine(eos_token_ids=ours, pad_token_id=PAD)
    hf_engine.sync_weights(start)
    want = hf_engine.generate(prompts, mask, sampling)
    engine = VLLMEngine(model=str(tmp_path / "start"), dtype="float32", eos_token_ids=ours, pad_token_id=PAD)
    got = engine.generate(prompts, mask, sampling)
    width = want.response_ids.shape[1]
    assert torch.equal(got.response_ids[:, :width], want.response_ids) and not got.response_mask[:, width:].any()
    assert torch.equal(got.response_lengths, want.response_lengths)
    assert int(got.response_lengths[0]) == 4


def test_engine_sleep_level_1_wakes_for_a_rollout_without_push(fake_vllm: type[FakeLLM], tmp_path) -> None:
    tiny().save_pretrained(tmp_path / "m")
    engine = VLLMEngine(model=str(tmp_path / "m"), enable_sleep_mode=True)
    prompts, mask = torch.tensor([[5, 6]]), torch.tensor([[1, 1]])
    engine.generate(prompts, mask, SamplingParams(greedy=True, max_new_tokens=2))
    engine.generate(prompts, mask, SamplingParams(greedy=True, max_new_tokens=2))  # e.g. validation
    engine.sync_weights(tiny(seed=2))
    assert fake_vllm.instances[0].calls == [
        "generate", "sleep(1)", "wake_up(None)", "generate", "sleep(1)",
        "wake_up(['weights'])", "wake_up(['kv_cache'])", "reset_prefix_cache",
    ]  # fmt: skip


def test_engine_sleep_level_2_order(fake_vllm: type[FakeLLM], tmp_path) -> None:
    tiny().save_pretrained(tmp_path / "m")
    engine = VLLMEngine(model=str(tmp_path / "m"), enable_sleep_mode=True, sleep_level=2, sync_chunk_bytes=1)
    prompts, mask = torch.tensor([[5, 6]]), torch.tensor([[1, 1]])
    engine.generate(prompts, mask, SamplingParams(greedy=True, max_new_tokens=2))
    with pytest.raises(RuntimeError, match="call sync_weights"):
        engine.generate(prompts, mask, SamplingParams(greedy=True, max_new_tokens=2))
    engine.sync_weights(tiny(seed=2))
    engine.generate(prompts, mask, SamplingParams(greedy=True, max_new_tokens=2))
    calls = fake_vllm.instances[0].calls
    # level-2 sleep after each rollout; weights woken before loading, KV cache after
    assert calls == ["generate", "sleep(2)", "wake_up(['weights'])", "wake_up(['kv_cache'])",
                     "reset_prefix_cache", "generate", "sleep(2)"]  # fmt: skip
    assert engine.llm.kwargs["enable_sleep_mode"] is True


def test_engine_falls_back_to_apply_model(fake_vllm: type[FakeLLM], tmp_path) -> None:
    tiny().save_pretrained(tmp_path / "m")
    engine = VLLMEngine(model=str(tmp_path / "m"))
    llm = engine.llm
    model = llm.model
    llm.llm_engine = types.SimpleNamespace()  # no in-process model path
    applied: list[int] = []

    def apply_model(fn: Any) -> list[Any]:
        applied.append(1)
        return [fn(model)]

    llm.apply_model = apply_model
    engine.sync_weights(tiny(seed=4))
    assert applied and set(model.loaded) == set(tiny().state_dict()) - {"lm_head.weight"}


def test_ppo_module_trains_with_the_vllm_engine(fake_vllm: type[FakeLLM], tmp_path) -> None:
    """The module's side of the engine protocol: rollouts come from vLLM, every PPO update is pushed
    into it (after waking the weights), so the engine ends on the trained actor's weights."""
    from test_module_support import tiny_module, tiny_source, fit, trainer, validate

    class SamplingFakeLLM(FakeLLM):  # the fake decodes greedily whatever the temperature
        def generate(self, prompts: list[dict], params: Any, use_tqdm: bool = True) -> list[FakeRequestOutput]:
            self.calls.append("generate")
            return self._decode(prompts, params.kwargs)

    sys.modules["vllm"].LLM = SamplingFakeLLM  # type: ignore[attr-defined]
    source = tiny_source()
    source.causal_lm().save_pretrained(tmp_path / "start")
    tok = source.tokenizer()
    engine = VLLMEngine(model=str(tmp_path / "start"), dtype="float32", enable_sleep_mode=True,
                        eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    module = tiny_module(engine=engine, source=source, lr=1e-2)
    fit(trainer(max_steps=2), module)
    llm = fake_vllm.instances[0]
    assert llm.calls.count("generate") == 2
    # one push at configure_model and one after each of the 2 updates, each woken in the documented order
    assert llm.calls.count("reset_prefix_cache") == 3
    assert llm.calls[-4:] == ["sleep(1)", "wake_up(['weights'])", "wake_up(['kv_cache'])", "reset_prefix_cache"]
    pushed = llm.model.hf.state_dict()
    initial = source.causal_lm().state_dict()
    for name, value in module.model.actor.state_dict().items():
        assert torch.equal(pushed[name], value), name
    assert any(not torch.equal(initial[n], v) for n, v in module.model.actor.state_dict().items())


# --------------------------------------------------------------------------- #
# the real engine (GPU + the vllm extra)
# --------------------------------------------------------------------------- #


@pytest.mark.gpu
def test_real_vllm_matches_hf_greedily_and_takes_pushed_weights(tmp_path) -> None:
    pytest.importorskip("vllm", reason="needs the vllm extra")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tre_lightning.models.tiny import char_tokenizer

    tok = char_tokenizer()

    def model(seed: int) -> Qwen2ForCausalLM:
        torch.manual_seed(seed)
        cfg = tiny_qwen2_config(
            vocab_size=len(tok), hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=256, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )  # fmt: skip
        cfg.tie_word_embeddings = False
        m = Qwen2ForCausalLM(cfg)
        with torch.no_grad():
            m.lm_head.weight.mul_(20)
        return m

    start, actor = model(0), model(1)
    start.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    engine = VLLMEngine(model=str(tmp_path / "m"), dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True,
                        max_model_len=128)  # fmt: skip
    enc = tok(["ab", "hello", "xyz12"], padding=True, return_tensors="pt")
    sampling = SamplingParams(n=2, greedy=True, max_new_tokens=12)

    def hf(m: nn.Module) -> Any:
        e = HFGenerateEngine(eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
        e.sync_weights(m.cuda())
        return e.generate(enc.input_ids.cuda(), enc.attention_mask.cuda(), sampling)

    before = engine.generate(enc.input_ids, enc.attention_mask, sampling)
    ref_start = hf(start)
    assert torch.equal(before.response_ids.cpu(), ref_start.response_ids.cpu())
    engine.sync_weights(actor.cuda())
    after = engine.generate(enc.input_ids, enc.attention_mask, sampling)
    ref_actor = hf(actor)
    assert torch.equal(after.response_ids.cpu(), ref_actor.response_ids.cpu())
    assert not torch.equal(after.response_ids.cpu(), before.response_ids.cpu())
    assert after.log_probs is not None and bool((after.log_probs <= 0).all())
