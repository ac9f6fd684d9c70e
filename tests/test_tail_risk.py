"""The tail-risk testbed: the repeat task, the shared warm-start mechanism, the invalid-mass
diagnostic and the sweep report (docs/tail_risk.md)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from tre_lightning.checks import ArgumentError
from tre_lightning.evaluation import tail_risk as tr
from tre_lightning.tasks.embedded import EmbeddedTask
from tre_lightning.tasks.embedded.tokenizer import quickstart_tokenizer
from tre_lightning.tasks.embedded.repeat import RepeatTask, repeat_answer, repeat_solution
from tre_lightning.tasks.embedded.warmstart import WarmStartConfig, _batches, cache_key
from tre_lightning.training.policy_loss import invalid_mass

# ------------------------------------------------------------------ the repeat task


def test_repeat_answer_by_hand() -> None:
    assert repeat_answer("4827", 10) == "4827482748"
    assert repeat_answer("4827", 3) == "482"
    assert repeat_answer("01", 5) == "01010"


def test_score_is_exact_and_one_invalid_token_ruins_it() -> None:
    task = RepeatTask(horizon=8)
    ex = {"pattern": "4827"}
    rs = ["48274827", " 48274827\n", "4827482", "482748274", "4827x827", "48274828", ""]
    assert task.score([ex] * len(rs), rs) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert task.score([{"nothing": 1}], ["1"]) == [0.0]  # a malformed row scores 0, never raises


def test_splits_are_disjoint_and_reproducible() -> None:
    task = RepeatTask(n_train=300, n_val=20, seed=3)
    train = {e["pattern"] for e in task.train_examples()}
    val = {e["pattern"] for e in task.val_examples()}
    assert len(val) == 20 and len(train) == 300 and not train & val
    assert all(len(p) == 4 and p.isdigit() for p in train | val)
    assert val == {e["pattern"] for e in RepeatTask(n_train=300, n_val=20, seed=3).val_examples()}
    assert val != {e["pattern"] for e in RepeatTask(n_train=300, n_val=20, seed=4).val_examples()}


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"horizon": 0}, "horizon"), ({"horizon": 40, "train_horizon": 32}, "horizon"), ({"period": 1}, "period"),
    ({"n_train": 9990, "n_val": 64}, "n_train"), ({"fork_wrong_prob": 1.5}, "fork_wrong_prob"),
    ({"filler_noise": 1.0}, "filler_noise"), ({"n_forks": 4, "period": 4}, "n_forks"),
])
def test_arguments_are_validated(kwargs: dict, param: str) -> None:
    with pytest.raises(ArgumentError, match=param):
        RepeatTask(**kwargs)


def test_solver_forks_and_fillers_by_hand() -> None:
    rng = random.Random(0)
    clean = repeat_solution("4827", 10, n_forks=2, fork_wrong_prob=0.0, filler_noise=0.0, n_fillers=5, rng=rng)
    assert "".join(clean) == "4827482748"
    # always the wrong branch at the 2 forks (steps 1, 2: 8 -> 3, 2 -> 7), then repeated coherently
    wrong = repeat_solution("4827", 10, n_forks=2, fork_wrong_prob=1.0, filler_noise=0.0, n_fillers=5, rng=rng)
    assert "".join(wrong) == "4377437743"
    noisy = repeat_solution("0123", 200, n_forks=0, fork_wrong_prob=0.0, filler_noise=0.5, n_fillers=5, rng=rng)
    fillers = [w for w in noisy if isinstance(w, int)]
    assert 60 < len(fillers) < 140 and all(0 <= f < 5 for f in fillers)
    assert all(w == str(t % 4) for t, w in enumerate(noisy) if isinstance(w, str))  # repeats under the fillers


def test_invalid_token_ids_are_all_but_the_digits() -> None:
    tok = quickstart_tokenizer(256)
    ids = RepeatTask().invalid_token_ids(tok)
    digits = {tok.convert_tokens_to_ids(c) for c in "0123456789"}
    assert len(ids) == 256 - 10 and not set(ids) & digits


# ------------------------------------------------------------------ the shared warm start


def test_quickstart_cache_key_is_unchanged_by_the_refactor() -> None:
    """The key of the quickstart's default warm start before the repeat family existed (a0618407…,
    the cache folder the code before the refactor created): the quickstart must keep reusing its cache.
    Checked to fail when the sorting task's key payload gains a "family" entry."""
    assert cache_key(WarmStartConfig(), EmbeddedTask()) == "a0618407033724c5"


def test_repeat_key_ignores_the_horizon_only() -> None:
    cfg = WarmStartConfig(merge_prob=0.0, token_noise=0.0)
    assert cache_key(cfg, RepeatTask(horizon=4)) == cache_key(cfg, RepeatTask(horizon=32))
    assert cache_key(cfg, RepeatTask(filler_noise=0.01)) != cache_key(cfg, RepeatTask())
    assert cache_key(cfg, RepeatTask()) != cache_key(cfg, EmbeddedTask())


def test_repeat_rows_are_train_prompts_with_labels_on_the_answer() -> None:
    tok = quickstart_tokenizer(256)
    task = RepeatTask(horizon=4, n_train=50, n_val=10, train_horizon=12, fork_wrong_prob=0.0, filler_noise=0.0)
    cfg = WarmStartConfig(vocab_size=256, merge_prob=0.0, token_noise=0.0, steps=2, batch_size=3)
    batches = list(_batches(cfg, task, tok))
    assert len(batches) == 2 and all(b[0].shape[0] == 3 for b in batches)
    val = {e["prompt"] for e in task.val_examples()}
    for ids, mask, labels in batches:
        for row in range(3):
            target = tok.decode(labels[row][labels[row] != -100])
            text = tok.decode(ids[row][mask[row].bool()])
            prompt = text.split("user\n")[1].split("<|im_end|>")[0]
            assert prompt not in val and target == repeat_answer(prompt, 12)


def test_repeat_rows_refuse_the_sorting_noise() -> None:
    with pytest.raises(ArgumentError, match="merge_prob"):
        next(RepeatTask().warm_start_rows(WarmStartConfig(), quickstart_tokenizer(256)))


# ------------------------------------------------------------------ the invalid-mass diagnostic


def test_invalid_mass_matches_a_slow_reference() -> None:
    """Against a loop over tokens and positions, padded positions skipped (the rows have 5, 3 and 1
    valid tokens, so a product or a mean over padded positions would differ). Checked to fail when
    the per-sequence product ignores the mask."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g) * 2
    invalid = torch.tensor([False, True, False, True, True, False, False])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    step, seq = invalid_mass(logits, invalid, mask)
    eps_all, seqs = [], []
    for b in range(3):
        keep = 1.0
        for t in range(5):
            if mask[b, t] == 0:
                continue
            p = torch.softmax(logits[b, t].double(), dim=0)
            eps = sum(float(p[a]) for a in range(7) if invalid[a])
            eps_all.append(eps)
            keep *= 1 - eps
        seqs.append(1 - keep)
    assert float(step) == pytest.approx(sum(eps_all) / len(eps_all), rel=1e-5)
    assert float(seq) == pytest.approx(sum(seqs) / len(seqs), rel=1e-5)


def test_invalid_mass_refuses_a_mask_of_another_vocabulary() -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        invalid_mass(torch.zeros(1, 2, 5), torch.zeros(4, dtype=torch.bool), torch.ones(1, 2))


def test_the_loop_logs_the_invalid_mass_only_for_tasks_that_declare_it(tmp_path) -> None:
    from test_module_support import CharTask, fit, tiny_module, trainer

    class Declaring(CharTask):
        def invalid_token_ids(self, tokenizer):  # every token but the letters a-x
            keep = {tokenizer.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwx"}
            return [i for i in range(len(tokenizer)) if i not in keep]

    for task, expect in ((CharTask(binary=True), False), (Declaring(binary=True), True)):
        module = tiny_module(task)
        seen: dict[str, float] = {}
        original = module.log

        def log(name, value, *args, _seen=seen, _orig=original, **kwargs):
            _seen[name] = float(value)
            return _orig(name, value, *args, **kwargs)

        module.log = log  # type: ignore[method-assign]
        fit(trainer(tmp_path, max_steps=1), module)
        names = {"policy/invalid_mass", "policy/invalid_seq_mass", "train/invalid_seq_rate"}
        assert (names <= set(seen)) is expect and (not expect or not names & set(seen)) is not expect
        if expect:
            assert 0.0 < seen["policy/invalid_mass"] <= seen["policy/invalid_seq_mass"] <= 1.0
            assert 0.0 <= seen["train/invalid_seq_rate"] <= 1.0


# ------------------------------------------------------------------ the sweep report


def test_mean_se_by_hand() -> None:
    m, se, n = tr.mean_se([1.0, 2.0, 3.0, 4.0])
    assert (m, n) == (2.5, 4) and se == pytest.approx(math.sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3 / 4))
    assert math.isnan(tr.mean_se([1.0])[1]) and tr.mean_se([])[2] == 0


def _fake_run(root: Path, reg: str | None, coef: float | None, horizon: int, seed: int, before: float,
              after: float, invalid: float, p_max: float) -> None:
    folder = root / f"{reg}_{coef}_L{horizon}_s{seed}"
    (folder / ".hydra").mkdir(parents=True)
    regs = "{}" if reg is None else f"{{{reg}: {{coef: {coef}}}}}"
    (folder / ".hydra" / "config.yaml").write_text(f"seed: {seed}\ntask: {{horizon: {horizon}}}\nregularizers: {regs}\n")
    (folder / "csv").mkdir()
    rows = ["step,val/pass@1,reward/mean,policy/p_max,policy/invalid_mass", f"0,{before},,,"]
    rows += [f"{s},,0.5,{p_max},{invalid}" for s in range(3)]
    rows += [f"2,{after},,,"]
    (folder / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_report_cells_deltas_and_claims(tmp_path) -> None:
    """Five seeds with clear gaps: every claim reproduced; the same with 4 seeds: none (n < 5)."""
    for n_seeds, root in ((5, tmp_path / "five"), (4, tmp_path / "four")):
        for s in range(n_seeds):
            j = 0.001 * s  # seed noise
            for h in (4, 32):
                _fake_run(root, None, None, h, s, 0.2, 0.5 + j, 0.001 + j / 10, 0.99)
                _fake_run(root, "ent", 0.001, h, s, 0.2, (0.52 if h == 4 else 0.3) + j,
                          (0.002 if h == 4 else 0.02) + j / 10, 0.95)
                _fake_run(root, "tre_p", 0.001, h, s, 0.2, 0.6 + j, 0.0005 + j / 10, 0.97)
                _fake_run(root, "tre_k", 0.001, h, s, 0.2, 0.6 + j, 0.0005 + j / 10, 0.97)
        _fake_run(root / "again", None, None, 4, 0, 0.2, 0.9, 0.001, 0.99)  # the same cell run twice: counted once
        runs = tr.find_tail_runs([root])
        assert len(runs) == n_seeds * 8
        assert [r.pass_after for r in runs if (r.label, r.horizon, r.seed) == ("none", 4, 0)] == [0.5]
        cs = tr.cells(runs)
        d = tr.delta(cs, "ent α=0.001", 32)
        assert d is not None and d[0] == pytest.approx(-0.2) and d[2] == n_seeds
        pd = tr.paired(cs, "ent α=0.001", 32)  # per-seed differences: all exactly -0.2 (+ 0 seed noise)
        assert pd is not None and pd[0] == pytest.approx(-0.2) and pd[1] == pytest.approx(0.0, abs=1e-12)
        verdicts = tr.claims(cs, "ent α=0.001", "tre_p α=0.001", "tre_k α=0.001")
        word = "**reproduced**" if n_seeds == 5 else "**not reproduced**"
        assert word in verdicts[0] and word in verdicts[1] and word in verdicts[3]
        assert "**holds**" in verdicts[2]  # "≥ 0" needs no 5 seeds: it fails only below −2 SE
        md, files = tr.write_tail_risk_report([root], root / "out")
        assert "| ent α=0.001 | 32 | " + str(n_seeds) + " | 20.0" in md
        assert all(p.is_file() for p in files.values())


def test_report_refuses_a_folder_without_tail_runs(tmp_path) -> None:
    with pytest.raises(ValueError, match="no tail-risk runs"):
        tr.write_tail_risk_report([tmp_path], tmp_path / "out")


# ------------------------------------------------------------------ the presets (slow)


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "n_cells"), [("tail_risk_sweep", 90), ("tail_risk_alpha_ent", 10),
                                                 ("tail_risk_alpha_tre_p", 10)])
def test_every_cell_of_the_sweep_runs_two_iterations(tmp_path, preset: str, n_cells: int) -> None:
    """Every cell of the preset, 2 PPO iterations each (a 2-step warm start, 2 validation prompts),
    then the report reads them all back, one cell per (regularizer, α, horizon)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRE_LIGHTNING_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "tre_lightning.cli.train", "-m", f"experiment={preset}",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", "trainer.max_steps=2", "trainer.val_check_interval=2",
           "model.policy.steps=2", "model.policy.batch_size=2", "model.policy.verbose=false",
           "evaluation.n=1", "evaluation.max_examples=2", "ppo.batch_size=2", "ppo.mini_batch_size=2",
           "rollout.n=2", "callbacks.run_report.print_table=false"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = tr.find_tail_runs([tmp_path / "sweep"])
    assert len(runs) == n_cells
    assert all(r.pass_before is not None and r.pass_after is not None for r in runs)
    assert all(len(r.curve("policy/invalid_mass")[1]) == 2 for r in runs)
    cs = tr.cells(runs)
    assert len(cs) == n_cells // 5  # five seeds per cell
