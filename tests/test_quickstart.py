"""The embedded quickstart: puzzles, checker, task, tokenizer, warm start and its cache."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from tre_lightning.tasks.embedded import EmbeddedTask, Puzzle, WarmStartConfig, WarmStartSource, check
from tre_lightning.tasks.embedded import puzzles as pz
from tre_lightning.tasks.embedded import warmstart as ws
from tre_lightning.tasks.embedded.tokenizer import QUICKSTART_CHARS, is_filler, quickstart_tokenizer, useful_token_ids
from tre_lightning.tasks.base import Task

# ----------------------------------------------------------------- checker


@pytest.mark.parametrize(
    ("digits", "descending", "response", "expected"),
    [
        ("58213", False, "12358", True),
        ("58213", False, "  12358\n", True),  # surrounding whitespace is ignored
        ("58213", False, "12385", False),  # not sorted
        ("58213", False, "1235", False),  # a digit missing
        ("58213", False, "123588", False),  # a digit too many
        ("58213", False, "12359", False),  # right order, wrong digit
        ("58213", False, "1 2358", False),  # separators are not allowed
        ("58213", False, "12358.", False),
        ("58213", False, "", False),
        ("58213", False, "<|f7|>12358", False),  # a filler token in the answer
        ("58213", True, "85321", True),
        ("58213", True, "12358", False),  # ascending where descending was asked
        ("11446", False, "11446", True),
        ("11446", False, "146", False),  # the warm start's systematic mistake
        ("11446", False, "1446", False),
        ("11446", True, "64411", True),
        ("0000", False, "0000", True),
        ("0000", False, "000", False),
        ("7", False, "7", True),
    ],
)
def test_check_hand_written_cases(digits: str, descending: bool, response: str, expected: bool) -> None:
    assert check(Puzzle(digits, descending), response) is expected


def test_check_never_raises_on_odd_input() -> None:
    p = Puzzle("321")
    for response in [None, 123, "１２３", "\x00", "1" * 10_000, "<|im_end|>"]:
        assert check(p, response) is False  # type: ignore[arg-type]


def test_puzzle_prompt_answer_and_roundtrip() -> None:
    p = Puzzle("90210", descending=True)
    assert p.prompt == "desc 90210"
    assert p.answer == "92100"
    assert Puzzle("90210").prompt == "sort 90210"
    assert Puzzle("90210").answer == "00129"
    assert Puzzle.from_example(p.to_example()) == p
    assert check(p, p.answer)


@pytest.mark.parametrize("digits", ["", "12a", "1 2", 123])
def test_puzzle_rejects_bad_digits(digits: object) -> None:
    with pytest.raises(ValueError, match="digits"):
        Puzzle(digits)  # type: ignore[arg-type]


def test_count_runs() -> None:
    assert pz.count_runs(Puzzle("12345")) == 0
    assert pz.count_runs(Puzzle("11446")) == 2
    assert pz.count_runs(Puzzle("99999")) == 1


# --------------------------------------------------------------- generator


def test_generator_is_reproducible_from_the_seed() -> None:
    a = pz.generate(200, seed=3, min_len=4, max_len=7, descending_fraction=0.5)
    b = pz.generate(200, seed=3, min_len=4, max_len=7, descending_fraction=0.5)
    c = pz.generate(200, seed=4, min_len=4, max_len=7, descending_fraction=0.5)
    assert a == b
    assert a != c
    assert len(set(a)) == 200  # distinct
    assert all(4 <= len(p.digits) <= 7 for p in a)
    assert {len(p.digits) for p in a} == {4, 5, 6, 7}
    share = sum(p.descending for p in a) / len(a)
    assert 0.35 < share < 0.65
    assert not any(p.descending for p in pz.generate(50, seed=3, descending_fraction=0.0))


def test_generator_streams_are_independent() -> None:
    assert pz.generate(20, seed=0, stream="a") != pz.generate(20, seed=0, stream="b")


def test_split_is_disjoint_and_reproducible() -> None:
    train, val = pz.split(500, 100, seed=1, min_len=3, max_len=4)
    assert not set(train) & set(val)
    assert (train, val) == pz.split(500, 100, seed=1, min_len=3, max_len=4)


def test_generator_respects_exclude_and_family_size() -> None:
    family = [Puzzle(f"{i}") for i in range(10)]  # all one-digit ascending puzzles
    got = pz.generate(5, seed=0, min_len=1, max_len=1, exclude=family[:5])
    assert set(got) == set(family[5:])
    with pytest.raises(ValueError, match="distinct"):
        pz.generate(6, seed=0, min_len=1, max_len=1, exclude=family[:5])
    with pytest.raises(ValueError, match="max_len"):
        pz.generate(1, seed=0, min_len=5, max_len=4)


def test_noisy_solution() -> None:
    p = Puzzle("64141")  # answer 11446: runs "11" and "44"
    rng = random.Random(0)
    assert pz.noisy_solution(p, rng, merge_prob=0.0, token_noise=0.0) == "11446"
    assert pz.noisy_solution(p, rng, merge_prob=1.0, token_noise=0.0) == "146"
    outs = Counter(pz.noisy_solution(p, random.Random(i), merge_prob=0.5, token_noise=0.0) for i in range(2000))
    assert set(outs) == {"11446", "1446", "1146", "146"}
    assert 0.2 < outs["11446"] / 2000 < 0.3  # (1 - 0.5) ** 2 runs
    noisy = [pz.noisy_solution(Puzzle("0123456789"), random.Random(i), 0.0, 0.3) for i in range(300)]
    wrong = sum(c != d for s in noisy for c, d in zip(s, "0123456789", strict=True)) / 3000
    assert 0.22 < wrong < 0.32  # 0.3 * 9/10 of the replacements change the digit
    with pytest.raises(ValueError):
        pz.noisy_solution(p, rng, merge_prob=1.5)


# -------------------------------------------------------------------- task


def test_task_implements_the_protocol_and_scores_by_rule() -> None:
    task = EmbeddedTask(n_train=64, n_val=16, seed=2)
    assert isinstance(task, Task)
    assert task.binary_reward
    train, val = task.train_examples(), task.val_examples()
    assert len(train) == 64 and len(val) == 16
    assert not {(e["digits"], e["descending"]) for e in train} & {(e["digits"], e["descending"]) for e in val}
    ex = val[0]
    assert task.messages(ex) == [{"role": "user", "content": ex["prompt"]}]
    rows = [ex, ex, ex, ex]
    wrong = ex["answer"][::-1] if len(set(ex["answer"])) > 1 else ex["answer"] + "0"
    assert task.score(rows, [ex["answer"], wrong, "", None]) == [1.0, 0.0, 0.0, 0.0]  # type: ignore[list-item]
    assert EmbeddedTask(n_train=64, n_val=16, seed=2).val_examples() == val


def test_task_format_score() -> None:
    task = EmbeddedTask(n_train=8, n_val=4, format_score=0.1)
    ex = {"digits": "321", "descending": False}
    assert task.score([ex, ex, ex], ["123", "321", "abc"]) == [1.0, 0.1, 0.0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_train": 0},
        {"n_val": -1},
        {"min_len": 0},
        {"min_len": 5, "max_len": 4},
        {"descending_fraction": 1.5},
        {"format_score": 1.0},
        {"seed": -1},
        {"n_train": 2.5},
    ],
)
def test_task_validates_its_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="EmbeddedTask"):
        EmbeddedTask(**kwargs)


def test_task_score_length_mismatch() -> None:
    with pytest.raises(ValueError):
        EmbeddedTask(n_train=4, n_val=4).score([], ["1"])


# --------------------------------------------------------------- tokenizer


def test_tokenizer_vocabulary_is_mostly_fillers() -> None:
    tok = quickstart_tokenizer(4096)
    assert len(tok) == 4096
    useful = useful_token_ids(tok)
    assert len(useful) == 4 + len(QUICKSTART_CHARS) == 42
    assert useful == list(range(42))
    ids = tok.apply_chat_template([{"role": "user", "content": "sort 3021"}], add_generation_prompt=True,
                                  tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert max(ids) < 42  # prompts never use a filler
    assert tok.decode(tok("desc 90210", add_special_tokens=False)["input_ids"]) == "desc 90210"
    assert is_filler("<|f12|>") and not is_filler("<|im_end|>") and not is_filler("7")
    with pytest.raises(ValueError):
        quickstart_tokenizer(10)


# -------------------------------------------------------------- warm start

TINY = {"vocab_size": 128, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
        "num_key_value_heads": 1, "steps": 40, "batch_size": 16, "warmup_steps": 5, "lr": 1e-2}


def test_warm_start_config_validation() -> None:
    with pytest.raises(ValueError, match="steps"):
        WarmStartConfig(steps=0)
    with pytest.raises(ValueError, match="merge_prob"):
        WarmStartConfig(merge_prob=1.2)
    with pytest.raises(ValueError, match="lr"):
        WarmStartConfig(lr=0.0)


def test_warm_start_never_sees_validation_puzzles() -> None:
    task = EmbeddedTask(n_train=16, n_val=200, min_len=2, max_len=3)
    seen = set(ws.puzzles_for_warm_start(WarmStartConfig(steps=40, batch_size=16), task))
    assert len(seen) == 640
    assert not seen & set(task.val_puzzles())


def test_cache_key_tracks_what_the_warm_start_depends_on() -> None:
    task = EmbeddedTask()
    base = ws.cache_key(WarmStartConfig(), task)
    assert base == ws.cache_key(WarmStartConfig(), EmbeddedTask())
    assert base != ws.cache_key(WarmStartConfig(steps=801), task)
    assert base != ws.cache_key(WarmStartConfig(merge_prob=0.4), task)
    assert base != ws.cache_key(WarmStartConfig(), EmbeddedTask(max_len=9))
    assert base != ws.cache_key(WarmStartConfig(), EmbeddedTask(seed=1))  # another validation split
    assert base == ws.cache_key(WarmStartConfig(), EmbeddedTask(n_train=10))  # PPO prompts do not matter


def test_warm_start_trains_caches_and_reuses(tmp_path, monkeypatch) -> None:
    task = EmbeddedTask(n_train=16, n_val=8, min_len=3, max_len=4)
    src = WarmStartSource(task=task, cache_dir=str(tmp_path), verbose=False, torch_threads=None, **TINY)
    tok = src.tokenizer()
    assert len(tok) == 128
    actor = src.causal_lm()
    folder = src.path()
    assert folder.parent == tmp_path and folder.name == f"warmstart-{src.key}"
    info = json.loads((folder / "warmstart.json").read_text())
    assert info["steps"] == 40
    assert info["final_loss"] < 3.0  # ln(128) = 4.85 at the start: it learned the answer format
    critic = src.causal_lm()  # a new copy with the same weights
    assert critic is not actor
    for a, b in zip(actor.parameters(), critic.parameters(), strict=True):
        assert torch.equal(a, b)
    assert actor.config.vocab_size == 128

    # a second source with the same settings loads the cache and does not train
    def boom(*args, **kwargs):
        raise AssertionError("the cached warm start should have been reused")

    monkeypatch.setattr(ws, "train_warm_start", boom)
    again = WarmStartSource(task=task, cache_dir=str(tmp_path), verbose=False, torch_threads=None, **TINY)
    reloaded = again.causal_lm()
    for a, b in zip(actor.parameters(), reloaded.parameters(), strict=True):
        assert torch.equal(a, b)
    # another setting is another cache entry (and would train)
    other = WarmStartSource(task=task, cache_dir=str(tmp_path), verbose=False, torch_threads=None,
                            **{**TINY, "merge_prob": 0.1})
    with pytest.raises(AssertionError, match="reused"):
        other.causal_lm()


def test_warm_start_is_deterministic(tmp_path) -> None:
    task = EmbeddedTask(n_train=16, n_val=8, min_len=3, max_len=3)
    cfg = WarmStartConfig(**{**TINY, "steps": 5})
    m1, _, _ = ws.train_warm_start(cfg, task, log=None)
    m2, _, _ = ws.train_warm_start(cfg, task, log=None)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_source_rejects_other_tasks_and_bad_threads() -> None:
    with pytest.raises(TypeError):
        WarmStartSource(task=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="torch_threads"):
        WarmStartSource(torch_threads=0)


def test_source_implements_model_source_protocol(tmp_path) -> None:
    from tre_lightning.models.source import ModelSource

    src = WarmStartSource(task=EmbeddedTask(n_train=4, n_val=4), cache_dir=str(tmp_path), verbose=False,
                          torch_threads=None, **TINY)
    assert isinstance(src, ModelSource)


def test_source_sets_torch_threads(tmp_path) -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        src = WarmStartSource(task=EmbeddedTask(n_train=4, n_val=4), cache_dir=str(tmp_path), torch_threads=1,
                              verbose=False, **{**TINY, "steps": 2})
        assert torch.get_num_threads() == 2  # building the config object changes nothing
        src.causal_lm()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_default_cache_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TRE_LIGHTNING_CACHE", str(tmp_path / "c"))
    assert ws.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TRE_LIGHTNING_CACHE")
    assert ws.default_cache_dir().parts[-2:] == (".cache", "tre_lightning")
