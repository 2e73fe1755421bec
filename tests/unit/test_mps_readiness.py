"""MPS readiness, proven on the CPU: one training step of every method under MpsReadinessMode.

The mode fails on any float64/complex128 tensor and on operators without MPS kernels (the list
is pmetal/mps_unsupported_ops.txt). Each step runs through Lightning exactly as a user's run
would: data loading, rollouts (GRPO/DAPO/RLKD), forward, backward, clipping, optimizer step.
What this cannot prove: MPS numerics and speed, and ops whose MPS support depends on the macOS
version; those need Apple hardware.

Every mode of every method (DPO's losses, DoRA, GSPO, speculative rollouts, the embedding losses,
...) also runs under the guard, under bf16 autocast, through the commands users type: the
bf16-mixed column of tests/unit/test_precision_matrix.py. The steps here add what that matrix does
not vary: QLoRA on pmetal's NF4 kernels for every method, both VLM families, the engine's modes.
"""

from __future__ import annotations

import functools
import json

import pytest

from pmetal.cli.methods import METHODS
from pmetal.mps_guard import MpsReadinessError, MpsReadinessMode, unsupported_ops


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _build(method, tiny_model_dir, tiny_bert_dir, tmp_path, **module_kwargs):
    spec = METHODS[method]
    module_cls, dm_cls = spec.module_class(), spec.datamodule_class()
    if module_kwargs:
        module_cls = functools.partial(module_cls, **module_kwargs)
    model = str(tiny_model_dir)
    if method == "sft":
        data = _write(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                              {"role": "assistant", "content": f"a{i}"}]} for i in range(4)])
        return module_cls(model=model), dm_cls(path=data, batch_size=2, val_fraction=0.0)
    if method in ("dpo", "simpo", "orpo", "reward"):
        data = _write(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
                                             for i in range(4)])
        return module_cls(model=model), dm_cls(path=data, batch_size=2, val_fraction=0.0)
    if method == "kto":
        data = _write(tmp_path / "k.jsonl", [{"prompt": f"q{i}", "completion": f"c{i}", "label": i % 2 == 0}
                                             for i in range(4)])
        return module_cls(model=model), dm_cls(path=data, batch_size=4, val_fraction=0.0)
    if method in ("online_dpo", "xpo"):
        data = _write(tmp_path / "o.jsonl", [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(4)])
        return module_cls(model=model, reward_fns=[_length_parity], max_completion_length=6, micro_batch_size=2), dm_cls(
            path=data, batch_size=4, seed=0)
    if method == "distill":  # a teacher with other weights (a copy of the student would give no gradient)
        from tests.tiny import make_tiny_causal_lm

        data = _write(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(4)])
        teacher = str(make_tiny_causal_lm(tmp_path / "teacher", seed=1))
        return (module_cls(model=model, teacher_model=teacher, lmbda=1.0, max_completion_length=4),
                dm_cls(path=data, batch_size=2, val_fraction=0.0))
    if method in ("grpo", "dapo", "rloo", "rlkd"):
        data = _write(tmp_path / "g.jsonl", [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(4)])
        kwargs = dict(model=model, reasoning_rewards=True, num_generations=4, max_completion_length=6,
                      micro_batch_size=2)
        if method == "rlkd":
            kwargs["teacher_model"] = model
        if method == "dapo":
            kwargs["max_sampling_rounds"] = 1
        return module_cls(**kwargs), dm_cls(path=data, batch_size=2, seed=0)  # an order whose rewards spread
    if method == "agent":  # GRPO with tools: episodes rendered with the tool schemas, their masks in the update
        data = _write(tmp_path / "t.jsonl", [{"prompt": f"Code of {n}?", "name": n} for n in ("zorblat", "quenby")])
        return module_cls(model=model, tools=["pmetal.examples.agent_tools:lookup"], reward_fns=["tests.method_matrix:crc_reward"],
                          num_generations=2, max_completion_length=4, micro_batch_size=4, max_tool_turns=1), \
            dm_cls(path=data, batch_size=2, seed=0)
    if method == "embed":
        data = _write(tmp_path / "e.jsonl", [{"anchor": f"code {i}", "positive": f"item {i}"} for i in range(4)])
        return module_cls(model=str(tiny_bert_dir), evaluate_before_training=False), dm_cls(
            path=data, batch_size=4, val_fraction=0.0)
    raise AssertionError(f"no readiness case for method {method!r}: add one")


def test_guard_catches_float64_and_unsupported_ops():
    import torch

    assert "aten::_linalg_eigh" in unsupported_ops()
    with pytest.raises(MpsReadinessError, match="float64"), MpsReadinessMode():
        torch.ones(2, dtype=torch.float64) + 1
    with pytest.raises(MpsReadinessError, match="no MPS kernel"), MpsReadinessMode():
        torch.linalg.eigh(torch.eye(2))


def _guarded_step(module, datamodule, tmp_path) -> list[str]:
    """One training step through Lightning under MpsReadinessMode; the names of the parameters it changed."""
    import lightning as L
    import torch

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=None if not module.automatic_optimization else 1.0,
                        default_root_dir=str(tmp_path))
    trainable = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    with MpsReadinessMode() as mode:
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
    assert "aten::mm" in mode.seen or "aten::addmm" in mode.seen or "aten::bmm" in mode.seen
    return [n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p.detach(), trainable[n])]


QLORA = {"quantization": "nf4", "quant_backend": "pmetal"}  # pmetal's kernels: the ones MPS runs
LM_METHODS = [m for m in METHODS if m not in ("embed", "reward")]  # reward: a full-precision base only


@pytest.mark.parametrize("method,qlora", [(m, False) for m in METHODS] + [(m, True) for m in LM_METHODS],
                         ids=[m for m in METHODS] + [f"{m}-qlora" for m in LM_METHODS])  # fmt: skip
def test_one_training_step_is_mps_ready(method, qlora, tiny_model_dir, tiny_bert_dir, tmp_path):
    """Every method, and every language-model method on an NF4 base (QLoRA), takes a step."""
    import lightning as L
    import torch

    from pmetal.quant import QuantLinear

    L.seed_everything(0)
    module, datamodule = _build(method, tiny_model_dir, tiny_bert_dir, tmp_path, **(QLORA if qlora else {}))
    packed = {n: b.clone() for n, b in module.named_buffers() if n.endswith("qweight")}
    assert bool(packed) == qlora
    changed = _guarded_step(module, datamodule, tmp_path)
    assert changed, f"{method}: the training step changed no parameter"
    if qlora:
        assert all(isinstance(m.base_layer, QuantLinear) for m in module.policy.modules() if hasattr(m, "lora_A"))
        assert all(torch.equal(b, packed[n]) for n, b in module.named_buffers() if n in packed)
        assert all("lora_" in n for n in changed), "only adapters train on a quantized base"


def _length_parity(prompts, completions, **kwargs):  # a reward whose groups spread (the chunks sample other text)
    return [float(len(c) % 2) for c in completions]


def test_grpo_async_rewards_overlapping_the_reference_and_update_is_mps_ready(tiny_model_dir, tiny_bert_dir, tmp_path):
    """GRPO with async rewards: chunked rollouts, the KL reference forward and the update started
    while the worker scores (the rewards resolve into the rollout on the main thread, under the guard)."""
    import lightning as L

    L.seed_everything(0)
    module, datamodule = _build("grpo", tiny_model_dir, tiny_bert_dir, tmp_path, async_rewards=True,
                                rollout_chunks=2, beta=0.04, reward_fns=[_length_parity])
    assert _guarded_step(module, datamodule, tmp_path), "the async-rewards step changed no parameter"


@pytest.mark.parametrize("options", [
    dict(loss_type="cispo", tis_cap=2.0, top_entropy_quantile=0.5),
    dict(advantage_estimator="reinforce_pp", importance_sampling_level="sequence"),
], ids=["cispo-tis-entropy", "reinforce_pp-gspo"])  # fmt: skip
def test_grpo_loss_variants_are_mps_ready(options, tiny_model_dir, tiny_bert_dir, tmp_path):
    """CISPO with truncated importance sampling and the entropy mask (the entropy over the
    vocabulary), and REINFORCE++'s batch advantages under GSPO, take a step."""
    import lightning as L

    L.seed_everything(0)
    module, datamodule = _build("grpo", tiny_model_dir, tiny_bert_dir, tmp_path, reward_fns=[_length_parity],
                                **options)
    assert _guarded_step(module, datamodule, tmp_path), f"{options}: the step changed no parameter"


def test_orpo_full_nll_on_raw_text_is_mps_ready(tiny_model_dir, tmp_path):
    """The modes this issue added: ORPO's full-sequence NLL, raw-text (no chat template) preference rows."""
    import lightning as L

    from pmetal.data.preference import PreferenceDataModule
    from pmetal.modules.orpo import OrpoModule

    L.seed_everything(0)
    data = _write(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
                                         for i in range(4)])
    module = OrpoModule(model=str(tiny_model_dir), nll_scope="full")
    datamodule = PreferenceDataModule(path=data, batch_size=2, chat_template=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=1.0, default_root_dir=str(tmp_path))
    with MpsReadinessMode():
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1


@pytest.mark.parametrize("method", ["sft", "grpo", "sft-qlora"])
@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl"])
def test_vlm_training_step_is_mps_ready(method, family, tiny_vlm_dirs, colour_images, tmp_path):
    """A VLM step (images through the vision tower, LoRA on the language model, QLoRA on an NF4
    language model) under the guard."""
    import lightning as L

    L.seed_everything(0)
    quantized = method.endswith("-qlora")
    method = method.removesuffix("-qlora")
    spec = METHODS[method]
    model = str(tiny_vlm_dirs[family])
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}
    if method == "sft":
        data = _write(colour_images / "mps-sft.jsonl", [{"image": f"{c}.png", "messages": [
            user, {"role": "assistant", "content": c}]} for c in ("red", "green")])
        module = spec.module_class()(model=model, **(QLORA if quantized else {}))
        datamodule = spec.datamodule_class()(path=data, batch_size=2, val_fraction=0.0)
    else:
        data = _write(colour_images / "mps-grpo.jsonl", [{"image": f"{c}.png", "prompt": "Colour?", "answer": c}
                                                         for c in ("red", "green")])
        module = spec.module_class()(model=model, reward_fns=["tests.unit.test_vlm:capture_reward"], num_generations=2,
                                     max_completion_length=6, micro_batch_size=2, learning_rate=1e-3)
        datamodule = spec.datamodule_class()(path=data, batch_size=2)
    assert _guarded_step(module, datamodule, tmp_path), f"{family} {method}: the training step changed no parameter"


@pytest.mark.parametrize("options", [dict(fuse_projections=True), dict(fuse_projections=True, speculative=True)],
                         ids=["fused", "fused-speculative"])
def test_rollout_engine_modes_are_mps_ready(options):
    """The engine's modes that can run on MPS (fused projections, speculation, the Gumbel-max round)
    under the guard; the Triton decode-attention kernel is CUDA-only and refused elsewhere."""
    import torch

    from pmetal.generation import SamplingConfig
    from pmetal.generation.engine import RolloutEngine
    from tests.unit.test_engine import PAD, PROMPTS, _tiny

    model = _tiny()
    engine = RolloutEngine(model, **options)
    with MpsReadinessMode() as mode:
        gen = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0.9), stop_ids=[], pad_token_id=PAD,
                              num_return_sequences=2, generator=torch.Generator().manual_seed(0))
    assert engine.fused(model) is not None and gen.completion_ids.shape == (6, 6)
    assert "aten::mm" in mode.seen or "aten::addmm" in mode.seen


def test_grpo_held_out_evaluation_is_mps_ready(tiny_model_dir, tmp_path):
    """`--eval-every` on an online method: the held-out prompts sampled and scored (eval/reward,
    eval/accuracy, pass@k) through the core sampler, under the guard."""
    import lightning as L

    from pmetal.data.prompts import PromptDataModule
    from pmetal.modules.grpo import GrpoModule

    L.seed_everything(0)
    data = _write(tmp_path / "g.jsonl", [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(4)])
    module = GrpoModule(model=str(tiny_model_dir), reward_fns=[_length_parity, "accuracy"], num_generations=2,
                        max_completion_length=4, micro_batch_size=4, gradient_checkpointing=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=1,
                        default_root_dir=str(tmp_path))
    with MpsReadinessMode():
        trainer.fit(module, datamodule=PromptDataModule(path=data, batch_size=2, val_fraction=0.5))
    assert "eval/reward" in trainer.callback_metrics and "eval/pass@2" in trainer.callback_metrics
