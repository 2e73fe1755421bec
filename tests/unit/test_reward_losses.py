"""`pmetal.losses.reward.bradley_terry_loss` against hand-computed values and TRL 1.16's RewardTrainer.

TRL's `RewardTrainer.compute_loss` is called on a minimal stand-in `self` whose model returns the
given scores (chosen rows then rejected rows, as TRL concatenates them), so the reference is TRL's
own code, not a re-derivation.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from pmetal.losses.reward import bradley_terry_loss


def _scores(seed: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    chosen, rejected, margin = (torch.randn(n, generator=generator, dtype=torch.float64) * 2 for _ in range(3))
    return chosen, rejected, margin.abs()


def _hand(chosen, rejected, margin=None, center=None) -> float:
    total = 0.0
    for i in range(len(chosen)):
        d = float(chosen[i] - rejected[i]) - (float(margin[i]) if margin is not None else 0.0)
        total += -math.log(1.0 / (1.0 + math.exp(-d)))
    loss = total / len(chosen)
    if center:
        loss += center * sum(float(chosen[i] + rejected[i]) ** 2 for i in range(len(chosen))) / len(chosen)
    return loss


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.0, 0.01, 0.5])
def test_bradley_terry_matches_hand_computed_values(with_margin, center):
    chosen, rejected, margin = _scores(1)
    margin = margin if with_margin else None
    loss = bradley_terry_loss(chosen, rejected, margin, center)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(_hand(chosen, rejected, margin, center), rel=1e-12)


def test_worked_example():
    """One pair scored 2 vs 0: −log σ(2) = log(1 + e^−2) = 0.126928...; a margin of 2 makes it log 2."""
    c, r = torch.tensor([2.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)
    assert bradley_terry_loss(c, r).item() == pytest.approx(0.12692801104297263, rel=1e-12)
    assert bradley_terry_loss(c, r, torch.tensor([2.0], dtype=torch.float64)).item() == pytest.approx(math.log(2))
    assert bradley_terry_loss(c, r, center_coefficient=0.25).item() == pytest.approx(0.12692801104297263 + 1.0)


def _trl_reward_loss(chosen, rejected, margin=None, center=None):
    """TRL 1.16's RewardTrainer.compute_loss on a stand-in whose model returns the scores `[2B, 1]`."""
    from collections import defaultdict

    from trl import RewardTrainer

    logits = torch.cat([chosen, rejected])[:, None]
    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=False),
        args=SimpleNamespace(center_rewards_coefficient=center),
        accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
    )
    inputs = {"input_ids": None}
    if margin is not None:
        inputs["margin"] = margin
    loss = RewardTrainer.compute_loss(stand_in, lambda **kw: SimpleNamespace(logits=logits), inputs)
    return loss, stand_in._metrics["eval"]


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_bradley_terry_matches_trl(with_margin, center):
    pytest.importorskip("trl")
    chosen, rejected, margin = _scores(7, 8)
    margin = margin if with_margin else None
    ours_c, ours_r = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
    theirs_c, theirs_r = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
    ours = bradley_terry_loss(ours_c, ours_r, margin, center)
    theirs, trl_metrics = _trl_reward_loss(theirs_c, theirs_r, margin, center)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    (ours + 0).backward(), theirs.backward()
    torch.testing.assert_close(ours_c.grad, theirs_c.grad)
    torch.testing.assert_close(ours_r.grad, theirs_r.grad)
    from pmetal.modules.reward import reward_metrics

    metrics = reward_metrics(chosen, rejected)
    for name in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward"):  # TRL's names and values
        assert metrics[name].item() == pytest.approx(trl_metrics[name][0], rel=1e-6), name


def test_bad_settings_are_clear_errors():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        bradley_terry_loss(z, z, center_coefficient=-1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        bradley_terry_loss(z, torch.zeros(2))
