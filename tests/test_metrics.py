"""Evaluation metrics: unbiased pass@k, mean reward, the paper's protocol, multi-process sums."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tre_lightning.evaluation.metrics import MeanReward, PassAtK, eval_metrics, pass_at_k, update_eval_metrics


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (8, 2, 1, 0.25),
        (8, 0, 1, 0.0),
        (8, 8, 1, 1.0),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (8, 2, 2, 13 / 28),  # 1 - C(6,2)/C(8,2) = 1 - 15/28
        (5, 4, 2, 1.0),  # n - c < k
        (10, 3, 5, 1 - math.comb(7, 5) / math.comb(10, 5)),
        (200, 1, 100, 0.5),
    ],
)
def test_pass_at_k_values(n: int, c: int, k: int, expected: float) -> None:
    got = pass_at_k(torch.tensor([n]), torch.tensor([c]), k)
    assert got.dtype == torch.float64
    assert float(got[0]) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 4 samples"):
        pass_at_k(torch.tensor([3]), torch.tensor([1]), 4)
    with pytest.raises(ValueError, match=r"\[0, num_samples\]"):
        pass_at_k(torch.tensor([3]), torch.tensor([4]), 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        PassAtK(0)


GRID = torch.tensor(
    [
        [1, 0, 0, 0, 0, 0, 0, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ],
    dtype=torch.float32,
)


def test_pass_at_k_metric_over_prompts() -> None:
    p1, p2 = PassAtK(1), PassAtK(2)
    p1.update(GRID)
    p2.update(GRID)
    assert float(p1.compute()) == pytest.approx((2 / 8 + 1 + 0) / 3, abs=1e-12)
    assert float(p2.compute()) == pytest.approx((13 / 28 + 1 + 0) / 3, abs=1e-12)


def test_pass_at_1_is_mean_correctness_and_ignores_format_scores() -> None:
    rewards = torch.tensor([[1.0, 0.1, 0.1, 1.0], [0.0, 0.1, 1.0, 0.0]])
    metric = PassAtK(1)
    metric.update(rewards)
    assert float(metric.compute()) == pytest.approx(3 / 8)


def test_pass_at_k_with_counts_of_different_sizes() -> None:
    metric = PassAtK(1)
    metric.update(num_correct=torch.tensor([1, 3]), num_samples=torch.tensor([2, 4]))
    assert float(metric.compute()) == pytest.approx((0.5 + 0.75) / 2)
    with pytest.raises(ValueError, match="either correct or"):
        metric.update(GRID, num_correct=torch.tensor([1]), num_samples=torch.tensor([2]))
    with pytest.raises(ValueError, match=r"\(prompts, samples\)"):
        metric.update(torch.ones(8))


def test_mean_reward() -> None:
    metric = MeanReward()
    metric.update(torch.tensor([[1.5, -0.5], [2.0, 1.0]]))
    metric.update(torch.tensor([3.0]))
    assert float(metric.compute()) == pytest.approx(7.0 / 5)
    with pytest.raises(ValueError, match="finite"):
        metric.update(torch.tensor([float("nan")]))
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(MeanReward().compute()))


def test_eval_metrics_collections() -> None:
    binary = eval_metrics(True, ks=(1, 2), prefix="val/")
    update_eval_metrics(binary, GRID)
    out = {k: float(v) for k, v in binary.compute().items()}
    assert out == pytest.approx({"val/pass@1": (2 / 8 + 1) / 3, "val/pass@2": (13 / 28 + 1) / 3})
    scalar = eval_metrics(False)
    update_eval_metrics(scalar, [[1.0, 2.0], [3.0, 6.0]])
    assert float(scalar.compute()["reward"]) == pytest.approx(3.0)


def test_split_updates_merge_to_the_same_result() -> None:
    whole, left, right = PassAtK(2), PassAtK(2), PassAtK(2)
    whole.update(GRID)
    left.update(GRID[:1])
    right.update(GRID[1:])
    left.merge_state(right)
    assert float(left.compute()) == float(whole.compute())


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        p1, p2, reward = PassAtK(1), PassAtK(2), MeanReward()
        rows = GRID[rank::world]
        p1.update(rows)
        p2.update(rows)
        reward.update(rows * 3.0 - 1.0)
        values = torch.stack([p1.compute(), p2.compute(), reward.compute()])
        torch.save(values, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~15 s on a shared 2-core machine
def test_two_processes_give_the_single_process_result(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = torch.stack(
        [
            torch.tensor((2 / 8 + 1 + 0) / 3, dtype=torch.float64),
            torch.tensor((13 / 28 + 1 + 0) / 3, dtype=torch.float64),
            torch.tensor(float((GRID * 3.0 - 1.0).mean()), dtype=torch.float64),
        ]
    )
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got, single, rtol=0, atol=1e-12)
