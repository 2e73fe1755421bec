"""Loss history and a PNG plot of the training (and validation) loss at the end of fit; an online
method's held-out reward (`eval/reward`, `--eval-every`) is drawn beside the loss on its own axis."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from lightning.pytorch import Callback

from pmetal.atomic import atomic_output, write_text_atomic

log = logging.getLogger("pmetal")


class LossHistory(Callback):
    """Records the training loss per optimizer step and the validation loss per validation run.

    Its state goes into checkpoints, so a resumed run continues the same curve. At the end of fit
    it writes `loss_history.json` and `loss.png` into the run directory; `plot_path` says where
    the plot went (None until then).
    """

    def __init__(self, filename: str = "loss.png") -> None:
        self.filename = filename
        self.plot_path: Path | None = None
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.eval_reward: list[tuple[int, float]] = []  # online methods: the held-out mean reward
        self._pending: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None and not pl_module.automatic_optimization:
            # a method that steps its own optimizer (GRPO) returns nothing: take the loss it logged,
            # once per optimizer step (a skipped rollout steps nothing and logs no new loss)
            logged = trainer.callback_metrics.get("train/loss")
            if logged is not None and not (self.train and self.train[-1][0] >= trainer.global_step):
                self.train.append((trainer.global_step, float(logged)))
            return
        if isinstance(loss, torch.Tensor):
            self._pending.append(float(loss.detach()))
        elif isinstance(loss, (int, float)):
            self._pending.append(float(loss))
        elif loss is None and not pl_module.automatic_optimization:
            # manual optimization (GRPO) returns nothing: take the loss it logged, once per optimizer step
            logged = trainer.callback_metrics.get("train/loss")
            if logged is not None and trainer.global_step > (self.train[-1][0] if self.train else 0):
                self._pending.append(float(logged))
        # one point per optimizer step: average the accumulated micro-batches
        if self._pending and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.train.append((trainer.global_step, sum(self._pending) / len(self._pending)))
            self._pending = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/loss")
        if value is not None:
            self.val.append((trainer.global_step, float(value)))
        reward = trainer.callback_metrics.get("eval/reward")
        if reward is not None:
            self.eval_reward.append((trainer.global_step, float(reward)))

    def state_dict(self) -> dict:
        return {"train": self.train, "val": self.val, "eval_reward": self.eval_reward}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train = [tuple(x) for x in state_dict.get("train", [])]
        self.val = [tuple(x) for x in state_dict.get("val", [])]
        self.eval_reward = [tuple(x) for x in state_dict.get("eval_reward", [])]

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        self.plot_path = self.write(trainer.default_root_dir)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A NaN/inf stop or Ctrl-C still leaves the curve of the steps that ran."""
        from pmetal.errors import NonFiniteLossError

        if trainer.is_global_zero and isinstance(exception, (NonFiniteLossError, KeyboardInterrupt)):
            self.write(trainer.default_root_dir)

    def write(self, run_dir: str | Path) -> Path | None:
        """Write `loss_history.json` and (when a step ran) the plot into `run_dir`; the plot's path."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        history = {"train": self.train, "val": self.val}
        if self.eval_reward:
            history["eval_reward"] = self.eval_reward
        write_text_atomic(run_dir / "loss_history.json", json.dumps(history))
        if not self.train:
            return None
        with atomic_output(run_dir / self.filename, directory=False) as staging:
            plot_losses(self.train, self.val, staging, eval_reward=self.eval_reward)
        return run_dir / self.filename


def plot_losses(train, val, path: Path, *, eval_reward=()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1.2)
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if eval_reward:  # a reward's scale is not the loss's: its own axis, on the right
        right = ax.twinx()
        right.plot([s for s, _ in eval_reward], [v for _, v in eval_reward], "s--", color="tab:green",
                   label="held-out reward")
        right.set_ylabel("held-out reward (eval/reward)")
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
