"""Two CPU processes (gloo) against one: the same parameters, disjoint data, reduced metrics, rank 0 writes.

One launch of two processes (tests/support/ddp_worker.py) runs SFT, DPO (with a resume from a
checkpoint) and GRPO under DDP, then SFT under FSDP2; the test's own process runs the same with
the global batch on one process. Tolerance: 1e-5 absolute on the adapters and the logged losses
(2 processes sum gradients in another order than one process's batch: fp32 rounding); 2e-4 on
GRPO's adapter, whose gradient has entries near zero where AdamW's m/sqrt(v) magnifies that
rounding (a per-rank normalization error moves parameters by about the learning rate, 1e-2); 5e-5
on DPO's, for the same reason: its LoRA A matrices get an exactly zero gradient at step 1 (B starts
at 0) and tiny ones after, and with the shared-prompt pair forward (one row per pair) the fp32
gradients of one process and two differ by 2e-7 (checked: as with separate rows), which AdamW at
lr 1e-2 turned into 2.3e-5 on one entry. A wrong per-rank normalization still moves it by ~1e-2.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SUPPORT = ROOT / "tests" / "support"
ATOL = 1e-5


def _head(src: Path, dst: Path, n: int) -> str:
    with src.open() as f:
        dst.write_text("".join(islice(f, n)))
    return str(dst)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    data = {name: _head(ROOT / "examples" / "data" / f"{name}.jsonl", tmp / f"{name}.jsonl", rows)
            for name, rows in (("sft", 40), ("dpo", 11), ("grpo", 9))}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": f"{SUPPORT}{os.pathsep}{ROOT}", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "NODE_RANK": "0", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(SUPPORT / "ddp_worker.py"), str(tmp / "multi"),
                                       str(tiny_model_dir), json.dumps(data), "ddp+fsdp"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    # meanwhile, the same runs on one process with the global batch
    sys.path.insert(0, str(SUPPORT))
    import ddp_worker

    ddp_worker.run_all(tmp / "single", str(tiny_model_dir), data, world=1)
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return tmp


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "adapter_model.safetensors")


def _assert_same_adapter(a: Path, b: Path, atol: float = ATOL) -> None:
    x, y = _adapter(a), _adapter(b)
    assert x.keys() == y.keys()
    for key in x:
        assert torch.allclose(x[key], y[key], atol=atol, rtol=0), (key, (x[key] - y[key]).abs().max())


def _losses(run_dir: Path) -> list[float]:
    with (run_dir / "metrics.csv").open() as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_two_processes_train_like_one_with_the_global_batch(runs, method):
    single, multi = runs / "single" / method, runs / "multi" / "ddp" / method
    _assert_same_adapter(single, multi, atol={"grpo": 2e-4, "dpo": 5e-5}.get(method, ATOL))
    # the logged loss is the global batch's (reduced over the ranks), not rank 0's own
    assert _losses(multi) == pytest.approx(_losses(single), abs=ATOL)
    assert len(_losses(multi)) == (4 if method == "dpo" else 3)


def test_each_rank_sees_its_own_part_of_the_global_batch(runs):
    for method in ("dpo", "grpo"):
        single = json.loads((runs / "single" / f"{method}_seen_rank0.json").read_text())
        ranks = [json.loads((runs / "multi" / "ddp" / f"{method}_seen_rank{r}.json").read_text()) for r in range(2)]
        assert len(ranks[0]) == len(ranks[1]) == len(single)
        for step, (a, b) in enumerate(zip(*ranks)):
            assert not set(a) & set(b)
            assert a + b == single[step]


def test_resume_under_ddp_reproduces_the_uninterrupted_run(runs):
    multi = runs / "multi" / "ddp"
    _assert_same_adapter(multi / "dpo", multi / "dpo_part")
    straight = json.loads((multi / "dpo" / "loss_history.json").read_text())["train"]
    resumed = json.loads((multi / "dpo_part" / "loss_history.json").read_text())["train"]
    assert [s for s, _ in resumed] == [s for s, _ in straight] == [1, 2, 3, 4]
    assert [v for _, v in resumed] == pytest.approx([v for _, v in straight], abs=1e-6)


def test_only_rank_zero_writes(runs):
    assert json.loads((runs / "multi" / "rank1_writes.json").read_text()) == []
    run = runs / "multi" / "ddp" / "sft"
    assert (run / "final" / "adapter_model.safetensors").is_file() and (run / "loss.png").is_file()
    assert len(_losses(run)) == 3  # one row per step, not one per rank


def test_fsdp_shards_the_base_and_trains_the_adapter_like_one_process(runs):
    _assert_same_adapter(runs / "single" / "sft", runs / "multi" / "fsdp" / "sft")
    state = torch.load(runs / "multi" / "fsdp" / "sft" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["state_dict"] and all("lora_" in k for k in state["state_dict"])  # whole (unsharded) adapter


def test_fsdp_refuses_a_quantized_base(tiny_model_dir):
    from pmetal.errors import PmetalError
    from pmetal.modules.distributed import shard_for_fsdp
    from pmetal.modules.sft import SftModule

    module = SftModule(model=str(tiny_model_dir), quantization="nf4", quant_block_size=32, gradient_checkpointing=False)
    with pytest.raises(PmetalError, match="does not shard a quantized base"):
        shard_for_fsdp(module)


def test_an_fsdp_checkpoint_resumes_on_one_device_with_the_same_global_batch(runs, tiny_model_dir):
    import lightning as L

    from pmetal.cli.runner import build_trainer, fit
    from pmetal.data.datamodule import SftDataModule
    from pmetal.errors import PmetalError
    from pmetal.modules.sft import SftModule

    ckpt = str(runs / "multi" / "fsdp" / "sft" / "checkpoints" / "last.ckpt")  # 2 processes × 1 bin, step 3
    for bins, run in ((2, "resume_same"), (1, "resume_other")):
        L.seed_everything(0, verbose=False)
        module = SftModule(model=str(tiny_model_dir), learning_rate=1e-2, gradient_checkpointing=False)
        data = SftDataModule(path=str(runs / "sft.jsonl"), batch_size=bins, max_seq_len=48, pack_tokens=48,
                             val_fraction=0, seed=3)
        trainer = build_trainer(runs / run, accelerator="cpu", precision="32-true", max_steps=4, enable_progress_bar=False)
        if bins == 2:
            fit(trainer, module, data, ckpt_path=ckpt)
            assert trainer.global_step == 4
        else:
            with pytest.raises(PmetalError, match=r"global batch of 2 rows \(or packed bins\) \(2 process\(es\) × 1\), "
                                                  r"this run's is 1 .* batch size × devices = 2"):
                fit(trainer, module, data, ckpt_path=ckpt)


def test_fsdp_refuses_rollout_methods_with_a_clear_message(tiny_model_dir):
    from pmetal.errors import PmetalError
    from pmetal.modules.distributed import shard_for_fsdp
    from pmetal.modules.grpo import GrpoModule

    module = GrpoModule(model=str(tiny_model_dir), reward_fns=["length"], num_generations=2, gradient_checkpointing=False)
    with pytest.raises(PmetalError, match="does not run GrpoModule.*use --strategy ddp"):
        shard_for_fsdp(module)
