"""Reward models: a Bradley–Terry scorer trained on preference pairs (InstructGPT, Ouyang et al. 2022).

The causal LM becomes a sequence classifier with one output (its body kept, the LM head dropped, a
new score head), read at each sequence's last real token; the loss is
`pmetal.losses.reward.bradley_terry_loss` on the scores of the chosen and rejected completions
(InstructGPT Eq. 1; with the data's `margin` column, Llama 2 Eq. 2). LoRA (or DoRA) trains the body
and the score head is trained fully (PEFT `modules_to_save`); `adapter="full"` trains everything.

Departures from the paper: each pair is its own example (InstructGPT batches all K-choose-2 pairs
of one prompt together); the optional reward centring of TRL (`center_rewards_coefficient`). Logged
metrics carry TRL's `RewardTrainer` names: `accuracy` (fraction of pairs scored chosen above
rejected), `margin`, `min_reward`, `mean_reward`, `max_reward` (under train/ and val/).

The saved model is the sequence classifier with the adapter merged in (safetensors, with the
tokenizer): `AutoModelForSequenceClassification.from_pretrained` loads it, and so does
`pmetal grpo --reward-model DIR`. Each row is scored on the tokens that scorer sees: the whole
conversation as the chat template renders it, or, for raw-text rows (`chat_template=False`),
`prompt + completion` without the EOS the data appends (`RewardModule.as_scored`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch

from pmetal.errors import PmetalError
from pmetal.losses.reward import bradley_terry_loss, check_center_coefficient
from pmetal.modules.preference import PreferenceModule, concat_sides


class RewardModule(PreferenceModule):
    """A Bradley–Terry reward model on preference pairs (see PmetalModule for the model/adapter/optimizer arguments).

    Args:
        center_rewards_coefficient: weight of TRL's reward-centring term `mean((r_chosen + r_rejected)^2)`,
            which keeps the scores near zero mean (Eisenstein et al. 2023 use 0.01); None for none.
        **kwargs: the arguments of PmetalModule (model, adapter, lora_r, learning_rate, ...).
    """

    needs_reference = False
    artifact_kind = "model"

    def __init__(self, center_rewards_coefficient: Optional[float] = None, **kwargs) -> None:
        # Check the settings before the (slow) model load.
        try:
            check_center_coefficient(center_rewards_coefficient)
        except ValueError as exc:
            raise PmetalError(str(exc)) from exc
        if kwargs.get("quantization"):
            raise PmetalError("reward models train on a full-precision base (the saved model has the adapter "
                              "merged into its weights); drop quantization")
        if kwargs.get("vlm"):
            raise PmetalError("reward models are trained on text-only language models; drop vlm")
        kwargs["vlm"] = False
        super().__init__(**kwargs)  # save_hyperparameters also records center_rewards_coefficient
        self.artifact_kind = "model"  # the fused classifier, whatever the adapter

    def wrap_adapter(self, model: torch.nn.Module, **kwargs) -> torch.nn.Module:
        """The causal LM as a one-score sequence classifier; LoRA on its body, the score head trained fully."""
        from pmetal.classifier import sequence_classifier_from_causal_lm

        classifier = sequence_classifier_from_causal_lm(model, num_labels=1)
        if self.hparams.adapter == "full":
            return super().wrap_adapter(classifier)
        policy = super().wrap_adapter(classifier, task_type="SEQ_CLS", modules_to_save=["score"])
        for p in policy.parameters():  # the trained head's copy starts in the base's (bf16/fp16) dtype:
            if p.requires_grad and p.dtype != torch.float32:  # master weights stay fp32, as LoRA's do
                p.data = p.data.float()  # (fp16 gradients cannot be unscaled under 16-mixed)
        return policy

    # ------------------------------------------------------------------ steps
    def pair_rewards(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores `[B]` of the chosen and the rejected sequences, from one `[2B, T]` forward (fp32)."""
        input_ids, attention_mask, _ = concat_sides(batch, "chosen_", "rejected_")
        input_ids, attention_mask = self.as_scored(input_ids, attention_mask)
        scores = self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        chosen, rejected = scores[:, 0].float().chunk(2)
        return chosen, rejected

    def as_scored(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preference rows ending where `--reward-model` reads the score: chat rows gain what the template
        writes after the closed turn; raw-text rows (the DataModule's `chat_template=False`) lose the EOS
        the data appends, since the scorer reads `prompt + completion` as it is."""
        pad = self.tokenizer.pad_token_id
        if "_row_ends" not in self.__dict__:  # the tokenizer and the DataModule's rendering are fixed per fit
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            raw = getattr(datamodule, "chat_template", None) is False
            self._row_ends = ("raw", self.tokenizer.eos_token_id) if raw else ("chat", *chat_turn_suffix(self.tokenizer))
        if self._row_ends[0] == "raw":
            return drop_final_token(input_ids, attention_mask, self._row_ends[1], pad_token_id=pad)
        return append_after_turn(input_ids, attention_mask, *self._row_ends[1:], pad_token_id=pad)

    def compute_loss(self, batch):
        chosen, rejected = self.pair_rewards(batch)
        loss = bradley_terry_loss(chosen, rejected, batch.get("margin"), self.hparams.center_rewards_coefficient)
        from pmetal.modules.distributed import distributed_mean

        # the loss is a mean over this rank's pairs: weighted by their count in the global mean
        return distributed_mean(self, loss, chosen.numel()), reward_metrics(chosen, rejected)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, out_dir: str | Path, state_dict: Optional[dict] = None) -> Path:
        """Write the sequence classifier with the adapter merged in, its tokenizer and pmetal's settings."""
        if state_dict is not None:
            raise PmetalError("saving a reward model from sharded (FSDP) weights is not supported; "
                              "train it without --strategy fsdp")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        merged = copy.deepcopy(self.policy)  # the trained module keeps its adapter (training may go on)
        if self.hparams.adapter != "full":
            merged = merged.merge_and_unload()
        merged.config.pad_token_id = self.tokenizer.pad_token_id
        merged.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        self.write_settings(out)
        return out


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL RewardTrainer's logged numbers for one batch of pair scores `[B]` each."""
    chosen, rejected = chosen.detach(), rejected.detach()
    every = torch.cat([chosen, rejected])
    return {
        "accuracy": (chosen > rejected).float().mean(),
        "margin": (chosen - rejected).mean(),
        "min_reward": every.min(),
        "mean_reward": every.mean(),
        "max_reward": every.max(),
    }


def chat_turn_suffix(tokenizer) -> tuple[int | None, list[int]]:
    """(end-of-turn id, the tokens the chat template writes after a closed assistant turn).

    Preference rows end at the completion's end-of-turn token (what a language model learns to
    emit); a whole conversation rendered by the template, as `--reward-model` and TRL score it, may
    go on (SmolLM2's "\n"). The reward is read at the last token, so training appends those tokens
    and scores where the scorer will. (None, []) without a chat template or when nothing follows.
    """
    from pmetal.data.render import render_prompt_completion

    if not getattr(tokenizer, "chat_template", None):
        return None, []
    prompt = [{"role": "user", "content": "x"}]
    row, _, _ = render_prompt_completion(tokenizer, prompt, "y")
    whole = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "y"}], tokenize=False)
    whole_ids = tokenizer(whole)["input_ids"]
    if whole_ids[: len(row)] != row or len(whole_ids) == len(row):
        return None, []
    return row[-1], whole_ids[len(row):]


def append_after_turn(input_ids: torch.Tensor, attention_mask: torch.Tensor, end_of_turn: int | None,
                      suffix: list[int], *, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows `[N, T]` with `suffix` written after each row that ends in `end_of_turn`."""
    if not suffix:
        return input_ids, attention_mask
    n = len(suffix)
    lengths = attention_mask.sum(-1)
    last = input_ids.gather(1, (lengths - 1).clamp_min(0)[:, None])[:, 0]
    ends_turn = (last == end_of_turn) & (lengths > 0)
    input_ids = torch.nn.functional.pad(input_ids, (0, n), value=pad_token_id)
    attention_mask = torch.nn.functional.pad(attention_mask, (0, n), value=0)
    positions = lengths[:, None] + torch.arange(n, device=input_ids.device)
    tokens = torch.tensor(suffix, dtype=input_ids.dtype, device=input_ids.device).expand(len(positions), n)
    input_ids = torch.where(ends_turn[:, None], input_ids.scatter(1, positions, tokens), input_ids)
    attention_mask = torch.where(ends_turn[:, None], attention_mask.scatter(1, positions, 1), attention_mask)
    return input_ids, attention_mask


def drop_final_token(input_ids: torch.Tensor, attention_mask: torch.Tensor, token: int | None, *,
                     pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows `[N, T]` without their last real token where it is `token` (turned into padding)."""
    if token is None:
        return input_ids, attention_mask
    last = (attention_mask.sum(-1) - 1).clamp_min(0)[:, None]
    drop = (input_ids.gather(1, last) == token) & (attention_mask.gather(1, last) == 1)
    input_ids = torch.where(drop, input_ids.scatter(1, last, pad_token_id), input_ids)
    attention_mask = torch.where(drop, attention_mask.scatter(1, last, 0), attention_mask)
    return input_ids, attention_mask
