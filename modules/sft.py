"""Supervised fine-tuning: full, LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024).

The loss is next-token cross-entropy over the label tokens of the batch (assistant turns only by
default, end-of-turn included), averaged over tokens, as in Hugging Face's Trainer. It departs from
a plain `model(**batch, labels=...)` in one way: the LM head runs chunk by chunk inside
`pmetal.logps.lm_loss`, so the full-vocabulary logits of the batch never exist at once. Packed
batches (padding-free, attention confined to each row) go through the same call.
"""

from __future__ import annotations

from pmetal.modules.base import PmetalModule


class SftModule(PmetalModule):
    """Supervised fine-tuning on chat, instruction or plain-text data (see PmetalModule for the arguments)."""

    auto_compile = True

    def compute_loss(self, batch):
        from pmetal.logps import lm_loss

        from pmetal.modules.distributed import distributed_mean

        loss, num_tokens = lm_loss(self.policy, batch)
        # the token-weighted mean over the global batch (every rank's tokens), not a mean of rank means
        return distributed_mean(self, loss, num_tokens), {"tokens": float(num_tokens)}
