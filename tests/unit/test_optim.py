import math

import pytest
import torch

from pmetal.errors import PmetalError
from pmetal.optim import build_optimizer, build_scheduler, lr_multiplier


def test_warmup_then_cosine_by_hand():
    # warmup 3: (s+1)/4 for s = 0, 1, 2; then cosine over the 10 - 3 = 7 remaining steps
    values = [lr_multiplier(s, schedule="cosine", warmup_steps=3, total_steps=10) for s in range(11)]
    assert values[:3] == [0.25, 0.5, 0.75]
    assert values[3] == 1.0
    assert values[3 + 7 // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 7)))
    assert values[10] == pytest.approx(0.0)
    assert lr_multiplier(5, schedule="linear", warmup_steps=0, total_steps=10) == pytest.approx(0.5)
    assert lr_multiplier(9, schedule="constant", warmup_steps=0, total_steps=10) == 1.0
    with pytest.raises(PmetalError, match="unknown lr schedule"):
        lr_multiplier(0, schedule="step", warmup_steps=0, total_steps=1)


def test_optimizer_covers_trainable_only_and_skips_decay_on_vectors():
    layer = torch.nn.Linear(4, 4)
    frozen = torch.nn.Linear(4, 4).requires_grad_(False)
    opt = build_optimizer(list(layer.parameters()) + list(frozen.parameters()), 1e-3, weight_decay=0.1)
    groups = {g["weight_decay"]: [p.shape for p in g["params"]] for g in opt.param_groups}
    assert groups == {0.1: [torch.Size([4, 4])], 0.0: [torch.Size([4])]}
    sched = build_scheduler(opt, "linear", 0, 4)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.75)
    with pytest.raises(PmetalError, match="no trainable parameters"):
        build_optimizer(frozen.parameters(), 1e-3)


@pytest.mark.parametrize(
    "estimate, max_steps, steps_per_batch, expected",
    [
        (7, -1, 1, 7),  # SFT/DPO: one optimizer step per (accumulated) batch
        (4, -1, 2, 8),  # GRPO, 4 rollouts of 2 iterations each
        (4, 10, 2, 8),  # the epochs end first: 4 rollouts x 2 < max_steps
        (10, 10, 3, 10),  # max_steps (optimizer steps) ends first
        (float("inf"), -1, 1, 1000),  # no finite estimate (an iterable dataset without max_steps)
        (None, -1, 1, 1000),  # no trainer
    ],
)
def test_total_steps_is_one_rule_for_every_method(estimate, max_steps, steps_per_batch, expected):
    from types import SimpleNamespace

    from pmetal.modules.base import TrainableModule

    trainer = None if estimate is None else SimpleNamespace(estimated_stepping_batches=estimate, max_steps=max_steps)
    module = SimpleNamespace(_trainer=trainer, trainer=trainer, steps_per_batch=steps_per_batch)
    assert TrainableModule._total_steps(module) == expected
