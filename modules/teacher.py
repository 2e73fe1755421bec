"""The frozen teacher of the distillation methods (RLKD, GKD): loaded once, checked, never trained.

The teacher must share the student's tokenizer (the divergences compare distributions token id by
token id). It is kept in eval mode without gradients, outside the module's children (so out of
checkpoints, the optimizer and `state_dict`), in the student's weight dtype, optionally quantized.
"""

from __future__ import annotations

import torch

from pmetal.errors import PmetalError


def load_teacher(module, name: str, *, quantization: str | None = None, method: str) -> torch.nn.Module:
    """`name` loaded as `module`'s frozen teacher (its settings: trust_remote_code, attention, ...)."""
    from pmetal.vlm import load_model_tokenizer_processor

    hp = module.hparams
    dtype = next(module.policy.parameters()).dtype
    teacher, teacher_tokenizer, _ = load_model_tokenizer_processor(
        name, vlm=None if module.is_vlm else False, dtype=dtype, trust_remote_code=hp.trust_remote_code,
        attn_implementation=hp.attn_implementation, quantization=quantization, quant_backend=hp.quant_backend,
    )
    check_same_vocabulary(module.tokenizer, teacher_tokenizer, hp.model, name, method=method)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student_name: str, teacher_name: str,
                          method: str = "RLKD") -> None:
    """The teacher's token ids must mean what the student's mean, or the distillation is noise."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab == teacher_vocab:
        return
    differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=lambda item: item[1])
    example = differing[0] if differing else None
    raise PmetalError(
        f"the teacher {teacher_name!r} does not share the tokenizer of the student {student_name!r} "
        f"({len(teacher_vocab)} vs {len(student_vocab)} tokens; first difference: token {example[0]!r} id {example[1]}). "
        f"{method} compares token distributions position by position: pick a teacher of the same model family "
        "(same tokenizer)"
    )


class FrozenTeacherMixin:
    """The frozen teacher of a distilling method: kept in a one-item list (out of state_dict,
    checkpoints and the optimizer) and moved to the student's device when fitting starts."""

    _teacher: list[torch.nn.Module]

    @property
    def teacher(self) -> torch.nn.Module:
        return self._teacher[0]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.teacher.to(self.device)
