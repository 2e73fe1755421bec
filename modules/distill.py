"""GKD: on-policy distillation of a student from a frozen teacher of the same tokenizer.

Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes" (GKD, arXiv:2306.13649), Algorithm 1: at each step, with probability ``lmbda`` the
batch's completions are replaced by the student's own samples for the same prompts (on-policy),
else the dataset's completions are kept (supervised, off-policy); the student then minimizes the
generalized JSD (Eq. 1, ``pmetal.losses.distill``) between the teacher's and its own token
distributions at every completion token, averaged over the tokens. ``beta=0`` is the forward
KL(teacher || student), ``beta=1`` the reverse KL, in between the JSD mixture; ``lmbda=0`` is
offline logit distillation on the dataset, ``lmbda=1`` purely on-policy distillation.

The samples come from pmetal's rollout engine (``pmetal.generation.generate``: the student in eval
mode, KV cache, per-row stop); the prompts are the data rows up to their last assistant turn
(``pmetal.data.distill.batch_prompts``). Teacher and student run on the same token ids, so they
must share a tokenizer (checked when the teacher loads, ``modules/teacher.py``); the teacher is
frozen, in eval mode, without gradients, out of checkpoints and the optimizer.

Where pmetal departs from the paper and TRL's ``GKDTrainer``:
- The divergence never builds ``[batch, sequence, vocab]`` logits: both LM heads run chunk by chunk
  of completion tokens (``chunked_jsd_loss``), with the gradient made in closed form in forward.
- ``teacher_temperature`` divides both models' logits in the divergence (1 by default, as
  ``GKDTrainer`` compares them); ``temperature`` is the sampling temperature (TRL's default 0.9).
  The sampling settings are the GRPO family's (``modules/sampling.py``: ``max_completion_length``,
  TRL's ``max_new_tokens``, and ``temperature``, ``top_p``, ``top_k``, ``min_p``); GKD restates only
  the defaults of the first two (128 tokens, TRL's 0.9).
- The on-policy coin is one draw per training batch from torch's CPU generator (restored on resume
  by ``RngCheckpoint``; rank 0's draw under several processes, so every rank makes the same kind
  of step), where TRL draws Python's ``random`` per process.
- TRL's ``seq_kd`` (supervised training on teacher samples) is not implemented; vision-language
  students are refused.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch

from pmetal.errors import PmetalError
from pmetal.modules.sampling import SamplingModule
from pmetal.modules.teacher import FrozenTeacherMixin


class DistillModule(FrozenTeacherMixin, SamplingModule):
    """Generalized knowledge distillation (GKD) from a frozen teacher (see the module docstring).

    Args:
        model: the student to fine-tune (a local HF directory, hub id, .gguf, or "default").
        teacher_model: the frozen teacher: a local HF directory, hub id, .gguf or "default"; it
            must share the student's tokenizer.
        lmbda: the on-policy fraction: the probability that a batch's completions are replaced by
            the student's own samples; 0 = offline distillation on the dataset's completions.
        beta: generalized-JSD interpolation: 0 = forward KL(teacher || student), 1 = reverse
            KL(student || teacher), in between the JSD with mixture beta*teacher + (1-beta)*student.
        teacher_temperature: softmax temperature of both distributions in the divergence.
        teacher_quantization: quantize the teacher's linear layers ("nf4", "fp4", "int8") to save memory.
        learning_rate: peak learning rate of AdamW.
        **kwargs: the sampling settings of the student's on-policy completions (`SamplingModule`:
            max_completion_length, temperature, top_p, top_k, min_p) and the base module's (adapter,
            lora_r, quantization, warmup_steps, ...).
    """

    def __init__(
        self,
        model: str = "default",
        teacher_model: str = "default",
        lmbda: float = 0.5,
        beta: float = 0.5,
        teacher_temperature: float = 1.0,
        max_completion_length: int = 128,
        temperature: float = 0.9,
        teacher_quantization: Optional[Literal["nf4", "fp4", "int8"]] = None,
        learning_rate: float = 2e-4,
        **kwargs: Any,
    ) -> None:
        from pmetal.ranges import check_settings, out_of_range

        check_settings(type(self).__name__, dict(lmbda=lmbda, teacher_temperature=teacher_temperature))
        if rule := out_of_range("distill_beta", beta):  # a mixture weight (the table's "beta" is a KL weight >= 0)
            raise PmetalError(f"beta={beta} is out of range; expected {rule.describe()}")
        super().__init__(model, max_completion_length=max_completion_length, temperature=temperature,
                         learning_rate=learning_rate, **kwargs)
        if self.is_vlm:
            raise PmetalError(f"{model} is a vision-language model; distill trains text models only")
        from pmetal.modules.teacher import load_teacher

        # a list keeps the teacher out of state_dict, checkpoints and the optimizer
        self._teacher: list[torch.nn.Module] = [load_teacher(self, teacher_model, quantization=teacher_quantization,
                                                             method="GKD")]
        self._stop_ids: tuple[object, list[int]] | None = None  # (tokenizer, its stop ids), read once

    # ------------------------------------------------------------------ on-policy batches
    def on_policy_step(self) -> bool:
        """Whether this batch's completions are the student's samples (probability `lmbda`)."""
        lmbda = self.hparams.lmbda
        if lmbda in (0.0, 1.0):  # no draw: the random state stays as without distillation
            return lmbda == 1.0
        draw = bool(torch.rand(()).item() < lmbda)
        trainer = self._trainer
        return bool(trainer.strategy.broadcast(draw, src=0)) if trainer is not None else draw

    def stop_ids(self) -> list[int]:
        from pmetal.generation import stop_token_ids

        if self._stop_ids is None or self._stop_ids[0] is not self.tokenizer:
            self._stop_ids = (self.tokenizer, stop_token_ids(self.tokenizer, self.policy))
        return self._stop_ids[1]

    def sample_batch(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The batch with each row's completion replaced by one the student samples, and the
        completions' TRL metrics (`completions/mean_length`, `completions/clipped_ratio`)."""
        from pmetal.data.distill import batch_prompts, sampled_batch
        from pmetal.generation import generate

        prompts = batch_prompts(batch)
        if not prompts:
            return batch, {}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        policy, was_training = self.policy, self.policy.training
        policy.eval()
        try:
            with torch.autocast(self.device.type, enabled=False):  # the engine runs in the weights' dtype
                gen = generate(policy, prompts, self.sampling_config(), stop_ids=self.stop_ids(), pad_token_id=pad)
        finally:
            policy.train(was_training)
        lengths = gen.lengths.float()
        metrics = {"completions/mean_length": float(lengths.mean()),
                   "completions/clipped_ratio": float((~gen.stopped).float().mean())}
        return sampled_batch(prompts, gen.completion_ids, gen.completion_mask, pad), metrics

    # ------------------------------------------------------------------ loss
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean generalized JSD over the batch's completion tokens, and its statistics."""
        from pmetal.logps import selected_hidden
        from pmetal.modules.distributed import distributed_mean

        inputs = (batch["input_ids"], batch.get("attention_mask"), batch["labels"], batch.get("position_ids"),
                  batch.get("seq_lens"))
        hidden, targets, _ = selected_hidden(self.policy, *inputs)  # [M, H]
        with torch.no_grad():
            teacher_hidden, _, _ = selected_hidden(self.teacher, *inputs)  # [M, H']
        out = self._divergence(hidden, teacher_hidden)
        num_tokens = targets.numel()
        metrics = {"forward_kl": out.forward_kl.mean() if num_tokens else out.loss.detach(),
                   "entropy": out.entropy.mean() if num_tokens else out.loss.detach(),
                   "tokens": float(num_tokens)}
        return distributed_mean(self, out.loss, num_tokens), metrics

    def _divergence(self, hidden: torch.Tensor, teacher_hidden: torch.Tensor):
        """`chunked_jsd_loss` through both LM heads, cut to the shared vocabulary (padded heads differ)."""
        from pmetal.logps import backbone_and_head
        from pmetal.losses.distill import chunked_jsd_loss

        hp = self.hparams
        (_, head), (_, teacher_head) = backbone_and_head(self.policy), backbone_and_head(self.teacher)
        weight, teacher_weight = _head_weight(head), _head_weight(teacher_head)
        vocab = min(len(self.tokenizer), weight.shape[0], teacher_weight.shape[0])
        cut = lambda b: None if b is None else b[:vocab]  # noqa: E731
        return chunked_jsd_loss(
            hidden, weight[:vocab], teacher_hidden, teacher_weight[:vocab], student_bias=cut(head.bias),
            teacher_bias=cut(teacher_head.bias), beta=hp.beta, temperature=hp.teacher_temperature,
            student_softcap=_softcap(self.policy), teacher_softcap=_softcap(self.teacher),
        )

    def training_step(self, batch, batch_idx):
        sampled = {}
        if self.on_policy_step():
            batch, sampled = self.sample_batch(batch)
        size = int(batch["input_ids"].shape[0])
        self.log("train/on_policy", float(bool(sampled)), batch_size=size)
        for name, value in sampled.items():
            self.log(f"train/{name}", value, batch_size=size)
        return super().training_step(batch, batch_idx)


def _head_weight(head: torch.nn.Module) -> torch.Tensor:
    """The LM head's weight; a head with its own forward (a LoRA or quantized head) is refused by name."""
    if type(head) is not torch.nn.Linear:
        raise PmetalError(f"distill needs plain linear LM heads (got {type(head).__name__}); leave lm_head out of "
                          "target_modules and of the quantization")
    return head.weight


def _softcap(model) -> Optional[float]:
    """Final-logit softcapping of the model's (text) config (Gemma 2), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    return getattr(config, "final_logit_softcapping", None)
