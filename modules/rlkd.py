"""RLKD: GRPO plus knowledge distillation from a frozen teacher, on the policy's own rollouts.

``L = (1 - alpha) * L_grpo + alpha * T^2 * L_distill`` where ``L_grpo`` is the GRPO loss of
``GrpoModule`` (DeepSeekMath, arXiv:2402.03300) and ``L_distill`` the generalized JSD
(``pmetal.losses.distill.jsd_loss``; GKD, Agarwal et al. 2024, arXiv:2306.13649, Eq. 1) between
the teacher's and the student's token distributions at temperature ``T``, averaged over the
completion tokens of the rollout. Sampling from the student and distilling on those samples is
GKD's on-policy setting (λ = 1); PMetal's RLKD blends it with the RL objective as above.

Follows PMetal's RLKD (Rust): forward KL (``distill_beta=0``) with the ``T^2`` factor of
Hinton et al. 2015, teacher temperature 2.0, alpha 0.3, optional linear annealing to
``final_alpha``. Departures: ``distill_beta`` selects any point of the generalized JSD; annealing
is off unless ``final_alpha`` is given; the logits of student and teacher are computed only at the
completion positions (never ``[batch, sequence, vocab]``), from one policy forward that also
gives the GRPO log-probs. The teacher must share the policy's tokenizer (checked); it is frozen,
kept out of checkpoints and optimizer, and may be quantized (``teacher_quantization``).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch

from pmetal.errors import PmetalError
from pmetal.modules.grpo import GrpoModule
from pmetal.modules.teacher import FrozenTeacherMixin
from pmetal.modules.teacher import check_same_vocabulary  # noqa: F401 (its home before modules/teacher.py)


class RlkdModule(FrozenTeacherMixin, GrpoModule):
    """GRPO + distillation from a frozen teacher (see the module docstring).

    Args:
        model: the student to fine-tune (a local HF directory, hub id, .gguf, or "default").
        teacher_model: the frozen teacher (same tokenizer as the student).
        alpha: weight of the distillation term; 0 = pure GRPO, 1 = pure distillation.
        final_alpha: anneal alpha linearly to this value over training; None keeps alpha constant.
        teacher_temperature: softmax temperature of both distributions in the distillation term.
        distill_beta: generalized-JSD interpolation: 0 = forward KL(teacher || student) (PMetal),
            1 = reverse KL(student || teacher), in between the JSD mixture.
        teacher_quantization: quantize the teacher's linear layers ("nf4", "fp4", "int8") to save memory.
        **kwargs: GrpoModule's settings (rewards, num_generations, beta, ...) and the base module's.
    """

    def __init__(
        self,
        model: str = "default",
        teacher_model: str = "default",
        alpha: float = 0.3,
        final_alpha: Optional[float] = None,
        teacher_temperature: float = 2.0,
        distill_beta: float = 0.0,
        teacher_quantization: Optional[Literal["nf4", "fp4", "int8"]] = None,
        **kwargs: Any,
    ) -> None:
        from pmetal.ranges import check_settings

        check_settings(type(self).__name__, dict(locals()))  # every argument the range table names
        super().__init__(model, **kwargs)
        self._teacher: list[torch.nn.Module] = []  # a list keeps it out of state_dict and the optimizer
        self._load_teacher()

    def _load_teacher(self) -> None:
        from pmetal.modules.teacher import load_teacher

        hp = self.hparams
        self._teacher.append(load_teacher(self, hp.teacher_model, quantization=hp.teacher_quantization, method="RLKD"))

    def current_alpha(self) -> float:
        hp = self.hparams
        if hp.final_alpha is None:
            return hp.alpha
        progress = min(1.0, self.global_step / max(1, self._total_steps()))
        return hp.alpha + (hp.final_alpha - hp.alpha) * progress

    def micro_batch_loss(self, part: dict[str, torch.Tensor], num_sequences: int, num_tokens: int):
        from pmetal.logps import backbone_and_head, selected_hidden
        from pmetal.losses.distill import jsd_loss
        from pmetal.vlm import multimodal_model

        hp = self.hparams
        ids, attention, labels = part["input_ids"], part["attention_mask"], part["labels"]
        _, head = backbone_and_head(self.policy)
        pixels = part.get("pixel_inputs")  # a VLM teacher sees the images too; a text teacher only the text
        hidden, targets, scored = selected_hidden(self.policy, ids, attention, labels,
                                                  pixel_inputs=pixels)  # [M, H], [M], [n, T]
        student_logits = head(hidden).float()  # [M, V]: completion positions only
        with torch.no_grad():
            _, teacher_head = backbone_and_head(self.teacher)
            teacher_pixels = pixels if multimodal_model(self.teacher) is not None else None
            teacher_hidden, _, _ = selected_hidden(self.teacher, ids, attention, labels,
                                                   pixel_inputs=teacher_pixels)  # [M, H]
            teacher_logits = teacher_head(teacher_hidden).float()  # [M, V']

        student_logps = torch.log_softmax(student_logits / self._loss_temperature, dim=-1)  # [M, V]
        sampled_logps = student_logps.gather(1, targets[:, None]).squeeze(1)  # [M]
        token_logps = torch.zeros(scored.shape, dtype=sampled_logps.dtype, device=ids.device)
        token_logps = token_logps.masked_scatter(scored, sampled_logps)  # [n, T]
        if hp.top_entropy_quantile < 1.0 and "token_entropy" not in part:  # GRPO's entropy mask, first pass
            with torch.no_grad():
                entropy = -(student_logps.exp() * student_logps).sum(-1)  # [M]
            part["token_entropy"] = torch.zeros_like(token_logps).masked_scatter(scored, entropy)
        policy_loss, metrics = self.policy_loss(token_logps, part, num_sequences, num_tokens)
        vocab = min(len(self.tokenizer), student_logits.shape[-1], teacher_logits.shape[-1])  # padded heads differ
        distill = jsd_loss(student_logits[:, :vocab], teacher_logits[:, :vocab], beta=hp.distill_beta,
                           temperature=hp.teacher_temperature) * hp.teacher_temperature**2
        # jsd_loss is a mean over this micro-batch's tokens; weight it so micro-batches sum to the rollout mean
        distill_share = distill * (targets.numel() / max(num_tokens, 1))
        alpha = self.current_alpha()
        metrics["distill_loss"] = distill.detach()
        metrics["grpo_loss"] = policy_loss.detach() * num_tokens / max(targets.numel(), 1)
        metrics["alpha"] = torch.tensor(alpha)
        return (1.0 - alpha) * policy_loss + alpha * distill_share, metrics

