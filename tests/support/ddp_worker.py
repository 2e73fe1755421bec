"""The runs of tests/unit/test_distributed.py: SFT, DPO (with a resume) and GRPO on 1 or 2 CPU processes.

Run by the test as two processes (`LOCAL_RANK`/`WORLD_SIZE` set, gloo) with a batch of B per rank,
and in the test's own process with a batch of 2B: both train on the same global batches.
"""

from __future__ import annotations

import builtins
import json
import os
import sys
from pathlib import Path

import torch

from pmetal.callbacks.rollout import RolloutCallback

STEPS = 3


class FixedRollouts(RolloutCallback):
    """Completions chosen by prompt index (not sampled), so 1 and 2 processes update on the same rollouts.

    Lengths differ by prompt, so the ranks hold different token counts (DAPO's normalization).
    """

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        from pmetal.rl.rollout import RolloutRow, assemble
        from pmetal.losses.policy import group_advantages

        rows = []
        for g, (index, prompt) in enumerate(zip(batch["index"], batch["prompt_ids"])):
            for j in range(2):
                completion = [100 + (7 * index + 3 * j + k) % 50 for k in range(2 + (index + j) % 4)]
                rows.append(RolloutRow(list(prompt), completion, [0.0] * len(completion), float(j == index % 2), g, False))
        rewards = torch.tensor([r.reward for r in rows])
        rollout = assemble(rows, group_advantages(rewards, 2), pad_token_id=0, group_size=2, device=pl_module.device)
        with torch.no_grad():
            rollout.old_logps = pl_module.token_logps({"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
                                                       "labels": rollout.labels}).float()
        rollout.metrics = {"reward/mean": float(rewards.mean())}
        batch["rollout"] = rollout


def _recorder(path: Path):
    from lightning.pytorch import Callback

    class Record(Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            index = batch.get("index")
            if index is not None:
                self.seen.append([int(i) for i in (index.tolist() if torch.is_tensor(index) else index)])

        def on_train_end(self, trainer, pl_module):
            path.write_text(json.dumps(self.seen))

    return Record()


def run_all(out: Path, model_dir: str, data: dict, world: int, strategy: str = "auto") -> None:
    import lightning as L

    from pmetal.cli.runner import build_trainer, fit
    from pmetal.data.datamodule import SftDataModule
    from pmetal.data.preference import PreferenceDataModule
    from pmetal.data.prompts import PromptDataModule
    from pmetal.modules.dpo import DpoModule
    from pmetal.modules.grpo import GrpoModule
    from pmetal.modules.sft import SftModule

    per_rank = 2 // world  # global batch 2 prompts / pairs / bins
    rank = int(os.environ.get("RANK", 0)) if world > 1 else 0
    kwargs = dict(accelerator="cpu", precision="32-true", devices=world, strategy=strategy if world > 1 else "auto",
                  enable_progress_bar=False, checkpoint_every_n_steps=2)

    def trainer(name, steps=STEPS, extra=None, **more):
        return build_trainer(out / name, max_steps=steps, callbacks=extra, **kwargs, **more)

    def modules(cls, dm_cls, dm_kwargs, **module_kwargs):
        L.seed_everything(0, verbose=False)
        return cls(model=model_dir, learning_rate=1e-2, gradient_checkpointing=False, **module_kwargs), dm_cls(**dm_kwargs)

    # SFT: packed bins (batch_size bins per rank), token-weighted mean over the global batch
    module, dm = modules(SftModule, SftDataModule, dict(path=data["sft"], batch_size=per_rank, max_seq_len=48,
                                                         pack_tokens=48, val_fraction=0, seed=3))
    fit(trainer("sft"), module, dm)
    if strategy == "fsdp":
        return
    # DPO straight, then the same run stopped at step 2 and resumed (a constant learning rate: the
    # stopped run's max_steps=2 would otherwise give it another schedule)
    for name, steps, ckpt in (("dpo", 4, None), ("dpo_part", 2, None), ("dpo_part", 4, "dpo_part/checkpoints/last.ckpt")):
        module, dm = modules(DpoModule, PreferenceDataModule, dict(path=data["dpo"], batch_size=per_rank, max_seq_len=64,
                                                                   seed=3), lr_schedule="constant")
        fit(trainer(name, steps, [_recorder(out / f"{name}_seen_rank{rank}.json")]), module, dm,
            ckpt_path=str(out / ckpt) if ckpt else None)
    # GRPO/DAPO update: whole groups per rank, tokens counted over the whole rollout
    module, dm = modules(GrpoModule, PromptDataModule, dict(path=data["grpo"], batch_size=per_rank, seed=3),
                         num_generations=2, loss_type="dapo", micro_batch_size=2, reward_fns=["length"],
                         max_grad_norm=1.0)
    fit(trainer("grpo", extra=[FixedRollouts(), _recorder(out / f"grpo_seen_rank{rank}.json")], gradient_clip_val=None),
        module, dm)


def _record_writes(out: Path) -> list:
    """On rank > 0: note every file written under the run directories (there should be none)."""
    import safetensors.torch

    writes: list = []
    real_open, real_save, real_st, real_replace = builtins.open, torch.save, safetensors.torch.save_file, os.replace

    def note(path):
        path = Path(path) if isinstance(path, (str, os.PathLike)) else None
        if path is not None and out in path.resolve().parents and "_seen_rank" not in path.name:
            writes.append(str(path))

    def open_(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            note(file)
        return real_open(file, mode, *a, **k)

    builtins.open = open_
    torch.save = lambda obj, f, *a, **k: (note(f) if not hasattr(f, "write") else None, real_save(obj, f, *a, **k))[1]
    safetensors.torch.save_file = lambda t, f, *a, **k: (note(f), real_st(t, f, *a, **k))[1]
    os.replace = lambda src, dst, *a, **k: (note(dst), real_replace(src, dst, *a, **k))[1]
    return writes


if __name__ == "__main__":
    out, model_dir, data_json, strategy = Path(sys.argv[1]).resolve(), sys.argv[2], sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    rank, world, env = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), dict(os.environ)
    writes = _record_writes(out) if rank > 0 else None
    for name in strategy.split("+"):  # one process group, several strategies in turn
        os.environ.update(env)  # Lightning's teardown drops WORLD_SIZE and friends
        run_all(out / name, model_dir, json.loads(data_json), world=world, strategy=name)
    if writes is not None:
        (out / f"rank{rank}_writes.json").write_text(json.dumps(writes))
