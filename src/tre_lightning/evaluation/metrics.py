"""Evaluation metrics and the paper's evaluation protocol.

Protocol (paper, section 6): 8 samples per test prompt, temperature 1.0,
top-p 0.7 (the sampling settings live in :class:`tre_lightning.training.config.EvalConfig`,
``conf/eval/paper.yaml``). MATH and Countdown report Pass@1 = mean correctness
over samples and prompts; HH reports the mean reward. :func:`eval_metrics`
builds the matching metric collection for a task.

The metrics are torchmetrics whose states are sums and counts reduced with
``dist_reduce_fx="sum"``, so a result computed across several processes equals
the single-process result (up to floating-point summation order; exact for
Pass@1 with power-of-two sample counts such as 8).

pass@k uses the unbiased estimator of Chen et al. (2021): for a prompt with n
samples of which c are correct, ``pass@k = 1 - C(n - c, k) / C(n, k)``,
averaged over prompts; for k = 1 it is c / n.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection


def pass_at_k(num_samples: Tensor, num_correct: Tensor, k: int) -> Tensor:
    """Unbiased pass@k per prompt.

    Args:
        num_samples: (P,) samples per prompt, n >= k.
        num_correct: (P,) correct samples per prompt, 0 <= c <= n.
        k: samples per attempt (>= 1).

    Returns:
        (P,) float64 estimates ``1 - C(n-c, k) / C(n, k)``, computed as
        ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` (no large binomials).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = torch.as_tensor(num_samples).detach().to("cpu", torch.float64).reshape(-1)
    c = torch.as_tensor(num_correct).detach().to("cpu", torch.float64).reshape(-1)
    if n.shape != c.shape:
        raise ValueError(f"num_samples {tuple(n.shape)} and num_correct {tuple(c.shape)} differ in shape")
    if bool((n < k).any()):
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got min {int(n.min())}")
    if bool((c < 0).any()) or bool((c > n).any()):
        raise ValueError("num_correct must lie in [0, num_samples]")
    out = torch.empty_like(n)
    for idx in range(n.numel()):
        ni, ci = int(n[idx]), int(c[idx])
        if ni - ci < k:
            out[idx] = 1.0
            continue
        prob_all_wrong = 1.0
        for i in range(ni - ci + 1, ni + 1):
            prob_all_wrong *= 1.0 - k / i
        out[idx] = 1.0 - prob_all_wrong
    return out


class PassAtK(Metric):
    """Mean over prompts of the unbiased pass@k.

    ``update(correct)`` with a (P, n) tensor, one row per prompt: bools, or
    rewards of which those >= ``threshold`` count as correct (1.0 by default,
    so a Countdown format score such as 0.1 is not a pass); or
    ``update(num_correct=..., num_samples=...)`` with (P,) counts (prompts
    with different sample counts).
    States: ``total`` (sum of per-prompt estimates, float64) and ``prompts``
    (count), both summed across processes.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, k: int = 1, threshold: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.threshold = float(threshold)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prompts", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        correct: Tensor | None = None,
        *,
        num_correct: Tensor | None = None,
        num_samples: Tensor | None = None,
    ) -> None:
        if correct is not None:
            if num_correct is not None or num_samples is not None:
                raise ValueError("pass either correct or (num_correct, num_samples), not both")
            if correct.dim() != 2:
                raise ValueError(f"correct must be (prompts, samples), got shape {tuple(correct.shape)}")
            values = correct.detach().to(torch.float64)
            if bool(torch.isnan(values).any()):
                raise ValueError("correct contains NaN")
            num_correct = (values >= self.threshold).to(torch.float64).sum(dim=1).cpu()
            num_samples = torch.full_like(num_correct, correct.shape[1])
        elif num_correct is None or num_samples is None:
            raise ValueError("pass correct, or both num_correct and num_samples")
        estimates = pass_at_k(num_samples, num_correct, self.k)
        self.total += estimates.sum().to(self.total.device)
        self.prompts += estimates.numel()

    def compute(self) -> Tensor:
        if int(self.prompts) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.total / self.prompts


class MeanReward(Metric):
    """Mean of scalar rewards over every sample (HH). States: float64 sum and count."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, rewards: Tensor) -> None:
        values = rewards.detach().to(torch.float64).reshape(-1)
        if not bool(torch.isfinite(values).all()):
            raise ValueError("rewards must be finite")
        self.total += values.sum().to(self.total.device)
        self.count += values.numel()

    def compute(self) -> Tensor:
        if int(self.count) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.total / self.count


def eval_metrics(binary_reward: bool, ks: Iterable[int] = (1,), prefix: str | None = None) -> MetricCollection:
    """The metrics of the protocol: ``pass@k`` for each k (binary rewards) or ``reward`` (mean).

    Feed them with :func:`update_eval_metrics`.
    """
    if binary_reward:
        metrics: dict[str, Metric] = {f"pass@{k}": PassAtK(k) for k in ks}
    else:
        metrics = {"reward": MeanReward()}
    # compute_groups=False: pass@1 and pass@k states can coincide on the first
    # batch, and a shared compute group would then stop updating one of them.
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


def update_eval_metrics(metrics: MetricCollection, rewards: Tensor | Sequence[Sequence[float]]) -> None:
    """Update every metric with a (prompts, samples) grid of rewards.

    For pass@k a reward counts as correct when it is >= the metric's threshold
    (1.0: a Countdown format score such as 0.1 is not a pass).
    """
    grid = torch.as_tensor(rewards, dtype=torch.float64)
    if grid.dim() != 2:
        raise ValueError(f"rewards must be (prompts, samples), got shape {tuple(grid.shape)}")
    for metric in metrics.values():
        metric.update(grid)
