"""Kill-and-resume for DPO, KTO, GRPO (with DAPO's dynamic sampling), Online DPO, XPO, GKD, reward models and embeddings.

Each method trains 6 steps straight; then the same run is SIGKILLed when step 5 starts (a forked
child: no second import of the libraries), after the step-4 checkpoint, and resumed from it
(GRPO with ``num_iterations=2`` steps twice a batch: 8 steps, checkpoints every 4, killed when
step 6 is reached, after its metrics.csv row was written, which the resumed run writes again). The
resumed run must reproduce the straight run's loss at every step and its final weights bit for
bit: the loaders resume mid-epoch, and `RngCheckpoint` restores the random state that dropout
(DPO's LoRA dropout, BERT's dropout), GRPO's sampled rollouts, DAPO's extra prompt draws and GKD's
on-policy coin and samples use.
"""

from __future__ import annotations

import json
import multiprocessing
import zlib
from itertools import islice
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
STEPS, KILL_AT = 6, 5
# (optimizer steps per batch, steps, checkpoint every, kill when this step is reached) where not (1, 6, 2, 5)
SCHEDULES = {"grpo_mu2": (2, 8, 4, 6)}


def _head(name: str, tmp: Path, rows: int) -> str:
    path = tmp / f"{name}.jsonl"
    with (ROOT / "examples" / "data" / f"{name}.jsonl").open() as f:
        path.write_text("".join(islice(f, rows)))
    return str(path)


def _build(method: str, tiny_model_dir, tiny_bert_dir, tmp):
    """(module, datamodule) of `method`'s run (a module-level function: the killed run is a spawned process)."""
    from pmetal.data.embedding import EmbeddingDataModule
    from pmetal.data.kto import KtoDataModule
    from pmetal.data.preference import PreferenceDataModule
    from pmetal.data.prompts import PromptDataModule
    from pmetal.data.distill import DistillDataModule
    from pmetal.modules.distill import DistillModule
    from pmetal.modules.agent import AgentGrpoModule
    from pmetal.modules.dpo import DpoModule
    from pmetal.modules.embed import EmbedModule
    from pmetal.modules.grpo import GrpoModule
    from pmetal.modules.kto import KtoModule
    from pmetal.modules.online_dpo import OnlineDpoModule, XpoModule
    from pmetal.modules.reward import RewardModule

    lm = dict(model=str(tiny_model_dir), learning_rate=1e-2, gradient_checkpointing=False)
    # 3 batches per epoch: the kill falls in the second epoch, mid-way
    builders = {
        "dpo": lambda: (DpoModule(lora_dropout=0.1, **lm),
                        PreferenceDataModule(_head("dpo", tmp, 6), batch_size=2, max_seq_len=48, seed=1)),
        "reward": lambda: (RewardModule(lora_dropout=0.1, **lm),  # LoRA plus the fully trained score head
                           PreferenceDataModule(_head("dpo", tmp, 6), batch_size=2, max_seq_len=48, seed=1)),
        "kto": lambda: (KtoModule(**lm), KtoDataModule(_head("kto", tmp, 6), batch_size=2, max_seq_len=48, seed=1)),
        "grpo": lambda: (GrpoModule(num_generations=2, max_completion_length=4, reward_fns=["length"],
                                    dynamic_sampling=True, max_sampling_rounds=2, micro_batch_size=2, **lm),
                         PromptDataModule(_head("grpo", tmp, 6), batch_size=2, seed=1)),
        "grpo_mu2": lambda: (GrpoModule(num_generations=2, max_completion_length=4, reward_fns=["length"],
                                        num_iterations=2, micro_batch_size=2, **lm),
                             PromptDataModule(_head("grpo", tmp, 6), batch_size=2, seed=1)),
        "online_dpo": lambda: (OnlineDpoModule(max_completion_length=4, reward_fns=[DISTINCT], micro_batch_size=2,
                                               **lm), PromptDataModule(_head("grpo", tmp, 6), batch_size=2, seed=1)),
        "xpo": lambda: (XpoModule(max_completion_length=4, reward_fns=[DISTINCT], micro_batch_size=2, alpha=0.1,
                                  **lm), PromptDataModule(_head("grpo", tmp, 6), batch_size=2, seed=1)),
        "distill": lambda: (DistillModule(teacher_model=_teacher(tmp), lmbda=0.5, max_completion_length=4, temperature=1.0, **lm),
                            DistillDataModule(_head("sft", tmp, 6), batch_size=2, max_seq_len=64, val_fraction=0,
                                              seed=1)),
        "grpo_tools": lambda: (AgentGrpoModule(tools=["pmetal.examples.agent_tools:lookup"], max_tool_turns=1,
                                               num_generations=2, max_completion_length=4, reward_fns=["length"],
                                               micro_batch_size=2, **lm),
                               PromptDataModule(_head("tool_grpo", tmp, 6), batch_size=2, seed=1)),
        "embed": lambda: (EmbedModule(model=str(tiny_bert_dir), learning_rate=1e-3, evaluate_before_training=False),
                          EmbeddingDataModule(_head("embed", tmp, 12), batch_size=4, val_fraction=0, seed=1)),
    }
    return builders[method]()


def distinct_reward(prompts, completions, **columns):
    """Distinct completions get distinct rewards (Online DPO drops tied pairs: a tie would skip a step)."""
    return [zlib.crc32(c.encode()) / 2**32 for c in completions]


DISTINCT = f"{__name__}:distinct_reward"  # by name: a checkpoint's settings hold no function object


def _teacher(tmp: Path) -> str:
    """A tiny teacher with the student's tokenizer and other weights, written once per test folder."""
    from tests.tiny import make_tiny_causal_lm

    folder = tmp / "teacher"
    if not (folder / "config.json").is_file():
        with torch.random.fork_rng():  # its seed must not move the run's random state (only the first run writes it)
            make_tiny_causal_lm(folder, seed=1)
    return str(folder)


def _fit(spec: tuple, run_dir: Path, *, kill: bool = False, resume: bool = False) -> None:
    import lightning as L

    from pmetal.cli.runner import build_trainer, fit, resolve_resume

    # one thread in every run, the spawned one too: the same reduction order, so bit-equal losses
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module, datamodule = _build(*spec)
    _, steps, every, kill_at = SCHEDULES.get(spec[0], (1, STEPS, 2, KILL_AT))
    extra = []
    if kill:
        import sys

        sys.path.insert(0, str(ROOT / "tests" / "support"))
        from killer import KillAtStep

        extra.append(KillAtStep(kill_at))
    trainer = build_trainer(run_dir, accelerator="cpu", precision="32-true", max_epochs=None, max_steps=steps,
                            checkpoint_every_n_steps=every, enable_progress_bar=False, callbacks=extra,
                            gradient_clip_val=1.0 if module.automatic_optimization else None)  # GRPO: max_grad_norm
    try:
        fit(trainer, module, datamodule, ckpt_path=resolve_resume(run_dir, "last") if resume else None)
    finally:
        torch.set_num_threads(threads)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def _csv_steps(run_dir: Path) -> list[int]:
    import csv

    with (run_dir / "metrics.csv").open(newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("method", ["dpo", "kto", "grpo", "grpo_mu2", "grpo_tools", "online_dpo", "xpo", "distill", "reward", "embed"])
def test_killed_run_resumes_to_the_same_losses_and_weights(method, tiny_model_dir, tiny_bert_dir, tmp_path):
    spec = (method, str(tiny_model_dir), str(tiny_bert_dir), tmp_path)
    _fit(spec, tmp_path / "straight")
    # spawned, not forked: a fork of a process whose threads hold locks can hang in the child
    child = multiprocessing.get_context("spawn").Process(target=_fit, args=(spec, tmp_path / "killed"),
                                                         kwargs={"kill": True})
    child.start()
    child.join(timeout=600)
    assert child.exitcode == -9
    assert not (tmp_path / "killed" / "final").exists()
    at_kill = _csv_steps(tmp_path / "killed")  # rows up to the kill, past the last checkpoint
    _fit(spec, tmp_path / "killed", resume=True)

    curves = [json.loads((tmp_path / run / "loss_history.json").read_text())["train"] for run in ("straight", "killed")]
    per_batch, last, _, _ = SCHEDULES.get(method, (1, STEPS, 2, KILL_AT))
    steps = list(range(per_batch, last + 1, per_batch))
    assert [s for s, _ in curves[0]] == [s for s, _ in curves[1]] == steps
    # metrics.csv: appended across the resume, one row per optimizer step, numbered as the curve
    assert _csv_steps(tmp_path / "straight") == _csv_steps(tmp_path / "killed") == steps
    assert at_kill == [s for s in steps if s <= SCHEDULES.get(method, (1, STEPS, 2, KILL_AT))[3]]
    assert [v for _, v in curves[0]] == [v for _, v in curves[1]]  # bit-exact on CPU
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if method != "embed":
        from safetensors.torch import load_file

        saved = "model.safetensors" if method == "reward" else "adapter_model.safetensors"  # reward: merged
        x, y = (load_file(tmp_path / run / "final" / saved) for run in ("straight", "killed"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
