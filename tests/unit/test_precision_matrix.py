"""Every method and mode under 32-true, bf16-mixed and 16-mixed, through the commands users run.

Each case of tests/method_matrix.py (SFT full/LoRA/DoRA/QLoRA, DPO's four losses, SimPO, ORPO,
KTO, GRPO, DAPO, GSPO, speculative and async-reward GRPO, RLKD, GKD distillation, VLM SFT and GRPO, the three
embedding losses) takes 2 optimizer steps (under 16-mixed, more where the gradient scaler skips
the first ones: `Case.fp16_steps`) on a tiny random model through `pmetal fit --method X
--trainer.precision P` or the PMetal command (`pmetal train|grpo|rlkd|embed-train --precision P`),
in-process. CPU autocast stands in for MPS/CUDA: under bf16-mixed it runs the matmuls in bf16, and
pmetal runs 16-mixed on the CPU as fp16 autocast with a gradient scaler (Lightning alone would
swap in bf16). The frozen base is loaded in the dtype a GPU run loads it in (bf16/fp16 under the
mixed precisions), so the dtype mix is the GPU's. Every loss must be finite, the trainable
parameters must change and the frozen ones (and an NF4 base's packed weights) must not.
"""

from __future__ import annotations

import pytest

from tests.method_matrix import CASES, GPU_WEIGHT_DTYPE, PRECISIONS, run_case, write_data

# The precision Apple-silicon users run (macOS 14+) goes through the MPS dispatch guard as well: no
# float64 and no operator without an MPS kernel in any method or mode (tests/unit/test_mps_readiness.py
# has the guard's own tests and the QLoRA/VLM/engine steps).
MPS_GUARDED = ("bf16-mixed",)


def test_the_matrix_covers_every_method():
    from pmetal.cli.methods import METHODS

    assert {case.method for case in CASES} == set(METHODS)


@pytest.fixture(scope="module")
def matrix_inputs(tiny_model_dir, tiny_bert_dir, tiny_vlm_dirs, colour_images, tmp_path_factory):
    from tests.tiny import make_tiny_causal_lm

    models = {"lm": str(tiny_model_dir), "bert": str(tiny_bert_dir), "idefics3": str(tiny_vlm_dirs["idefics3"]),
              "qwen2_vl": str(tiny_vlm_dirs["qwen2_vl"]),
              "lm_teacher": str(make_tiny_causal_lm(tmp_path_factory.mktemp("tiny-teacher"), seed=1))}
    return models, write_data(tmp_path_factory.mktemp("matrix-data"), images=colour_images)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_method_trains_under_precision(case, precision, matrix_inputs, tmp_path):
    import lightning as L

    models, data = matrix_inputs
    L.seed_everything(0, verbose=False)
    steps = case.fp16_steps if precision == "16-mixed" else 2
    outcome = run_case(case, precision, models, data, tmp_path / "run", steps=steps,
                       weight_dtype=GPU_WEIGHT_DTYPE[precision], mps_guard=precision in MPS_GUARDED)
    assert outcome.rc == 0, f"{case.name} under {precision}: exit code {outcome.rc}"
    assert outcome.steps == steps and outcome.precision_plugin == precision
    assert outcome.ok, f"{case.name} under {precision}: {outcome.problem()}"
    if case.frozen_base:  # only the adapter trains (ok: the frozen base and an NF4 base's packed weights stayed)
        # (PEFT's trained copies, `modules_to_save`, are the adapter's too: a reward model's score head)
        assert all("lora_" in n or "modules_to_save" in n for n in outcome.changed), outcome.changed[:5]
