"""What DPO, SimPO, ORPO and KTO share on top of `PmetalModule`.

- `pair_logps`: policy log-probs of the chosen and rejected completions from ONE forward. By
  default (`shared_prompt`, `PairPreferenceModule`) each pair is one row holding the prompt once,
  the two completions attending to it but not to each other (`pmetal.shared_prompt`); otherwise,
  and where the model cannot take a custom 4-D mask, the two halves concatenated (`[2B, T]`).
- `reference_values`: reference log-probs (the base with the adapter disabled; a frozen copy only
  under full fine-tuning), cached per example: filled once before training from the DataModule's
  splits (`precompute_ref_logps`; full fine-tuning then drops its frozen copy), or on each example's
  first visit and reused in later epochs (`reuse_ref_logps`, where the reference forward is
  deterministic). The cache is saved in checkpoints, so a resumed run reuses the same values.
- `preference_metrics`: the logged numbers TRL users know (`rewards/*`, `logps/*`, `logits/*`;
  docs/metrics.md).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch

from pmetal.errors import PmetalError
from pmetal.modules.base import PmetalModule
from pmetal.shared_prompt import shared_prompt_logps, shared_prompt_supported
from pmetal.tokens import IGNORE_INDEX

log = logging.getLogger("pmetal")

_CACHE_KEY = "pmetal_reference_cache"
# config fields of dropout that Hugging Face models apply functionally (no nn.Dropout module to find)
_DROPOUT_SETTINGS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")


class SideLogps(NamedTuple):
    """Log-probs of one side of a pair (`[B]` each, fp32)."""

    sum: torch.Tensor
    mean: torch.Tensor
    num_tokens: torch.Tensor
    logits_sum: torch.Tensor | None = None  # sum over the completion tokens of the mean logit (no gradient)


def mean_logit(logits_sum: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """The mean logit over every completion token of some rows (their per-row sums and token counts `[B]`):
    TRL's `logits/*`."""
    return logits_sum.sum() / num_tokens.sum().clamp_min(1)


def _pad_to(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value) if x.shape[1] < length else x


def concat_sides(batch: dict[str, torch.Tensor], first: str, second: str) -> tuple[torch.Tensor, ...]:
    """`(input_ids, attention_mask, labels)` `[2B, T]`: rows of `<first>*` then `<second>*`, right-padded to one T."""
    length = max(batch[f"{first}input_ids"].shape[1], batch[f"{second}input_ids"].shape[1])
    out = []
    for key, value in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        parts = [_pad_to(batch[f"{side}{key}"], length, value) for side in (first, second)]
        out.append(torch.cat(parts, dim=0))
    return tuple(out)


def split_sides(sums: torch.Tensor, means: torch.Tensor, counts: torch.Tensor,
                logits_sums: torch.Tensor | None = None) -> tuple[SideLogps, SideLogps]:
    """Split `[2B]` results of a concatenated forward into the two `[B]` halves."""
    half = sums.shape[0] // 2
    first, second = slice(None, half), slice(half, None)
    return tuple(SideLogps(sums[part], means[part], counts[part], None if logits_sums is None else logits_sums[part])
                 for part in (first, second))


def completion_sides(out, labels: torch.Tensor) -> tuple[SideLogps, SideLogps]:
    """The two `[B]` halves of a concatenated `[2B, T]` forward, over the completion tokens of `labels`.

    `out` is a `pmetal.logps.CompletionLogps` with `token_logps` and `token_mean_logits`; it may have
    scored more tokens than the completions (ORPO's full-sequence NLL).
    """
    completion = labels != IGNORE_INDEX
    completion[:, 0] = False  # nothing predicts position 0
    sums = (out.token_logps * completion).sum(-1)
    counts = completion.sum(-1)
    logits = (out.token_mean_logits * completion).sum(-1) if out.token_mean_logits is not None else None
    return split_sides(sums, sums / counts.clamp_min(1), counts, logits)


class PreferenceModule(PmetalModule):
    """Base of the preference methods: pair log-probs, cached reference log-probs, shared metrics.

    Subclasses implement `compute_loss(batch)` and, when they compare against a reference,
    `_compute_reference(batch) -> [B, K]` (the per-example values worth caching).
    """

    needs_reference = True

    # ------------------------------------------------------------------ policy
    def pair_forward(self, batch: dict[str, torch.Tensor], *, score_chosen_prompt: bool = False):
        """One `[2B, T]` policy forward over the chosen then the rejected rows.

        Returns `(out, labels)`: a `pmetal.logps.CompletionLogps` with token log-probs and mean
        logits, and the completion labels `[2B, T]` (see `completion_sides`). With
        `score_chosen_prompt` the chosen rows are scored on every real token, prompt included
        (`out.sum[:B]`, `out.num_tokens[:B]`), as TRL's ORPO NLL is.
        """
        input_ids, attention_mask, labels = concat_sides(batch, "chosen_", "rejected_")
        scored = labels
        if score_chosen_prompt:
            half = batch["chosen_input_ids"].shape[0]
            scored = labels.clone()
            scored[:half] = input_ids[:half].masked_fill(attention_mask[:half] == 0, IGNORE_INDEX)
        attention = self._shared_prompt_attention(self.policy)
        if attention is None:
            out = self.completion_logps(input_ids, attention_mask, scored, return_token_logps=True,
                                        return_mean_logits=True)
        else:
            out = shared_prompt_logps(self.policy, batch, scored, attn_implementation=attention,
                                      return_token_logps=True, return_mean_logits=True)
        return out, labels

    def _shared_prompt_attention(self, model) -> str | None:
        """The attention implementation the shared-prompt layout runs with, or None for the plain path."""
        if not self.hparams.get("shared_prompt", False):
            return None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config
        attention = getattr(config, "_attn_implementation", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return attention if shared_prompt_supported(text, attention, self.is_vlm) else None

    def pair_logps(self, batch: dict[str, torch.Tensor]) -> tuple[SideLogps, SideLogps]:
        """Policy log-probs of chosen and rejected completions from one forward."""
        return completion_sides(*self.pair_forward(batch))

    def pair_reference_logps(self, batch: dict[str, torch.Tensor]):
        """Reference log-probs (`CompletionLogps` over chosen-then-rejected rows) of the completions of a batch."""
        input_ids, attention_mask, labels = concat_sides(batch, "chosen_", "rejected_")
        attention = self._shared_prompt_attention(self.policy)
        if attention is None:
            return self.reference_logps(input_ids, attention_mask, labels)
        with torch.no_grad():
            if self.hparams.adapter == "full":
                return shared_prompt_logps(self._reference_model(), batch, labels, attn_implementation=attention)
            with self.policy.disable_adapter():
                return shared_prompt_logps(self.policy, batch, labels, attn_implementation=attention)

    # ------------------------------------------------------------------ reference
    def _compute_reference(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def _precompute(self) -> bool:
        return bool(self.hparams.get("precompute_ref_logps", False))

    @property
    def _caches_reference(self) -> bool:
        """Whether reference values are kept by example index: precomputed, or reused from the first epoch
        when the reference forward is deterministic (no dropout in it), so a cached value is the one a
        recomputation would give (up to the rounding of another batch composition)."""
        if self._precompute:
            return True
        return bool(self.hparams.get("reuse_ref_logps", False)) and not self._reference_has_dropout()

    def _reference_has_dropout(self) -> bool:
        if self.hparams.adapter == "full":
            return False  # the frozen copy runs in eval mode
        base = self.policy.get_base_model() if hasattr(self.policy, "get_base_model") else self.policy
        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        if base.training and any(float(getattr(config, name, 0.0) or 0.0) > 0 for name in _DROPOUT_SETTINGS):
            return True
        return any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training and "lora_dropout" not in name
                   for name, m in base.named_modules())

    def reference_values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`[B, K]` reference values of the batch, from the cache where an earlier step or
        `precompute_ref_logps` filled it."""
        cache = self.__dict__.setdefault("_ref_cache", {})
        index = batch.get("index")
        if self._caches_reference and index is not None:
            keys = index.tolist()
            if all(k in cache for k in keys):
                return torch.stack([cache[k] for k in keys]).to(self.device)
            if self._precompute and self.hparams.adapter == "full" and cache:
                raise PmetalError(
                    "precompute_ref_logps cached the reference log-probs of the DataModule's splits and released "
                    "the frozen reference model; this batch holds examples outside those splits"
                )
        values = self._compute_reference(batch).float()
        if self._caches_reference and index is not None:
            # kept on the device: a copy to the host would wait for the reference forward every step
            for k, row in zip(index.tolist(), values.detach()):
                cache[k] = row
        return values

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        cache = self.__dict__.get("_ref_cache")
        if cache:  # a resumed run reuses the values the straight run would
            keys = sorted(cache)
            checkpoint[_CACHE_KEY] = {"index": torch.tensor(keys),
                                      "values": torch.stack([cache[k] for k in keys]).cpu()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(_CACHE_KEY)
        if saved is not None:
            self.__dict__["_ref_cache"] = dict(zip(saved["index"].tolist(), saved["values"]))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not self.trainer.ckpt_path:  # indices name examples of this fit's data only
            self.__dict__["_ref_cache"] = {}
        datamodule = getattr(self.trainer, "datamodule", None)
        if not (self.needs_reference and self._precompute and hasattr(datamodule, "ordered_dataloaders")):
            return
        count = 0
        with torch.no_grad(), self.trainer.precision_plugin.forward_context():
            for loader in datamodule.ordered_dataloaders():
                for batch in loader:
                    batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    count += len(self.reference_values(batch))
        log.info("precomputed reference log-probs of %d examples", count)
        if self.hparams.adapter == "full":
            self._frozen_reference.clear()  # the cache replaces the frozen copy: its memory goes back

    # ------------------------------------------------------------------ metrics
    @staticmethod
    def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                           chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                           chosen: SideLogps | None = None, rejected: SideLogps | None = None) -> dict[str, Any]:
        """`rewards/{chosen,rejected,margins,accuracies}`, `logps/{chosen,rejected}` (batch means) and,
        given the two sides, `logits/{chosen,rejected}` (the mean logit over their completion tokens)."""
        chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": chosen_logps.detach().mean(),
            "logps/rejected": rejected_logps.detach().mean(),
        }
        for name, side in (("chosen", chosen), ("rejected", rejected)):
            if side is not None and side.logits_sum is not None:
                metrics[f"logits/{name}"] = mean_logit(side.logits_sum, side.num_tokens)
        return metrics

    def batch_mean(self, losses: torch.Tensor) -> torch.Tensor:
        """The mean of per-example losses over the global batch (all ranks' examples)."""
        from pmetal.modules.distributed import distributed_mean

        return distributed_mean(self, losses.mean(), losses.numel())

    def _batch_size(self, batch: dict[str, torch.Tensor]) -> int:
        key = "chosen_input_ids" if "chosen_input_ids" in batch else "input_ids"
        return int(batch[key].shape[0])


class PairPreferenceModule(PreferenceModule):
    """The preference methods trained on pairs (DPO, SimPO, ORPO): the settings of their pair forward.

    Args:
        shared_prompt: run each pair as one row that holds the prompt once, chosen and rejected both
            attending to it but not to each other (`pmetal.shared_prompt`; the same log-probs and
            gradients as separate rows, fewer tokens). Needs attn_implementation "sdpa" or "eager"
            and a text model without sliding-window layers; elsewhere the separate rows are used.
        **kwargs: the arguments of PmetalModule (model, adapter, lora_r, learning_rate, ...).
    """

    def __init__(self, shared_prompt: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
