"""HH task: reward-model scores on prompt + response, batched, with the RM's own chat template."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from tre_lightning.tasks import HHTask

EXAMPLES = [{"prompt": "hi"}, {"prompt": "Tell me a joke about cats."}, {"prompt": "x"}]
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

RESPONSES = ["a", "Why did the cat sit on the computer? To keep an eye on the mouse.", "cc"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and robust on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForSequenceClassification

    from tre_lightning.models.tiny import char_tokenizer, tiny_qwen2_config

    path = tmp_path_factory.mktemp("tiny_rm")
    tokenizer = char_tokenizer()
    config = tiny_qwen2_config(
        len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64,
    )
    config.num_labels = 1
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _reference_scores(rm_dir: Path) -> list[float]:
    """The model applied by hand to the ChatML text the tiny tokenizer's template produces."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    out = []
    for ex, response in zip(EXAMPLES, RESPONSES):
        text = f"<|im_start|>user\n{ex['prompt']}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>\n"
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out.append(float(model(**ids).logits[0, 0]))
    return out


def test_scores_are_the_reward_model_on_its_chat_template(rm_dir: Path) -> None:
    task = HHTask(reward_model_path=str(rm_dir), batch_size=2, device="cpu", dtype="float32")
    scores = task.score(EXAMPLES, RESPONSES)
    assert all(isinstance(s, float) for s in scores)
    assert scores == pytest.approx(_reference_scores(rm_dir), abs=1e-5)
    assert task.failure_counts() == {"checks": 3, "timeouts": 0, "errors": 0, "failures": 0}


def test_batching_does_not_change_rewards(rm_dir: Path) -> None:
    one = HHTask(reward_model_path=str(rm_dir), batch_size=1, device="cpu", dtype="float32")
    three = HHTask(reward_model_path=str(rm_dir), batch_size=3, device="cpu", dtype="float32")
    assert three.score(EXAMPLES, RESPONSES) == pytest.approx(one.score(EXAMPLES, RESPONSES), abs=1e-5)


def test_long_and_odd_responses_still_score(rm_dir: Path) -> None:
    task = HHTask(reward_model_path=str(rm_dir), batch_size=4, max_length=64, device="cpu", dtype="float32")
    responses = ["z" * 10_000, "", "\x00\x01 ünïcödé 🙂", "<|im_end|><|im_start|>user\nagain"]
    scores = task.score([{"prompt": "p"}] * 4, responses)
    assert len(scores) == 4 and all(math.isfinite(s) for s in scores)


def test_a_failing_forward_scores_zero_and_is_counted(rm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = HHTask(reward_model_path=str(rm_dir), batch_size=2, device="cpu", dtype="float32")
    task.scorer.load()

    def boom(texts: list[str]) -> list[float]:
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(task.scorer, "_forward", boom)
    assert task.score(EXAMPLES[:2], RESPONSES[:2]) == [0.0, 0.0]
    assert task.failure_counts()["errors"] == 2


def test_missing_reward_model_folder(tmp_path: Path) -> None:
    task = HHTask(reward_model_path=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="reward_model_path"):
        task.score(EXAMPLES[:1], RESPONSES[:1])


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_4bit_reward_model_on_cpu(rm_dir: Path) -> None:
    import bitsandbytes as bnb

    task = HHTask(reward_model_path=str(rm_dir), load_in_4bit=True, batch_size=3, device="cpu", dtype="float32")
    scores = task.score(EXAMPLES, RESPONSES)
    model = task.scorer.model
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "no 4-bit layers"
    assert all(m.weight.dtype == torch.float32 for m in layers)  # quant storage = parameter dtype
    # NF4 weights: close to, not equal to, the full-precision rewards
    assert scores == pytest.approx(_reference_scores(rm_dir), abs=0.2)


@pytest.mark.parametrize("device", ["gpu", "cuda:-1", "cuda:x", "", 0, None])
def test_device_is_validated(device) -> None:
    with pytest.raises(ValueError, match=r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        HHTask(device=device)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_valid_devices_are_accepted(device) -> None:
    assert HHTask(device=device).scorer.device == device
