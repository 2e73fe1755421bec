"""Supervised fine-tuning: full, LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024).

The loss is next-token cross-entropy over the label tokens of the batch (assistant turns only by
default, end-of-turn included), averaged over tokens, as in Hugging Face's Trainer. It departs from
a plain `model(**batch, labels=...)` in one way: the LM head runs chunk by chunk inside
`pmetal.logps.lm_loss`, so the full-vocabulary logits of the batch never exist at once. Packed
batches (padding-free, attention confined to each row) go through the same call.

Long rows: fused RMSNorm/RoPE/SwiGLU kernels on CUDA (`pmetal.kernels`), the inputs of checkpointed
layers offloaded to host memory and the MLP chunked over the sequence (`pmetal.activations`); each
leaves the loss and gradients as they are (tests/unit/test_long_context.py).
"""

from __future__ import annotations

from typing import Literal, Optional

from pmetal.errors import PmetalError
from pmetal.modules.base import PmetalModule


class SftModule(PmetalModule):
    """Supervised fine-tuning on chat, instruction or plain-text data.

    Args:
        kernels: fused Triton kernels for RMSNorm, the rotary embedding and the SwiGLU MLP (Liger
            Kernel; the loss stays pmetal's chunked cross-entropy): "auto" (on CUDA when
            liger-kernel is installed; inside compiled layers torch.compile fuses the same work;
            off on CPU and MPS), "liger" (required: an error where they cannot run) or "off".
        offload_activations: keep the inputs of the checkpointed decoder layers in host memory
            (pinned, copied asynchronously on CUDA) until the backward pass needs them: the longest
            rows for the least device memory, at the cost of host-device copies; runs eager (no
            compile). Needs gradient checkpointing.
        mlp_chunk_size: run each decoder layer's MLP over this many tokens at a time, each chunk
            recomputed in backward, so the [tokens, intermediate] activations of a long row never
            exist at once (one more MLP forward per step; runs eager). None: whole rows.
        **kwargs: the arguments of PmetalModule (model, adapter, lora_r, learning_rate, ...).
    """

    auto_compile = True

    def __init__(
        self,
        kernels: Literal["auto", "liger", "off"] = "auto",
        offload_activations: bool = False,
        mlp_chunk_size: Optional[int] = None,
        **kwargs,
    ) -> None:
        from pmetal.kernels import resolve_kernels

        resolve_kernels(kernels, "cuda", available=True)  # the value is checked before the (slow) model load
        memory_tricks = offload_activations or mlp_chunk_size is not None
        if memory_tricks and kwargs.get("compile"):
            raise PmetalError("--offload-activations and --mlp-chunk-size run eager; drop --compile")
        if offload_activations and not kwargs.get("gradient_checkpointing", True):
            raise PmetalError("--offload-activations moves the inputs of checkpointed layers to host memory: "
                              "turn gradient checkpointing on")
        super().__init__(**kwargs)
        from pmetal.activations import configure_long_rows
        from pmetal.device import choose_device

        # The device this machine trains on; the fused forwards also check each tensor's device, so a
        # run sent elsewhere (--trainer.accelerator cpu on a CUDA machine) takes HF's path.
        configure_long_rows(self.policy, kernels=kernels, device_type=choose_device().accelerator,
                            offload_activations=offload_activations, mlp_chunk_size=mlp_chunk_size)

    @property
    def eager_only(self) -> str:
        hp = self.hparams
        return " and ".join(name for name, on in (("--offload-activations", hp.offload_activations),
                                                  ("--mlp-chunk-size", hp.mlp_chunk_size is not None)) if on)

    def compute_loss(self, batch):
        from pmetal.logps import lm_loss

        from pmetal.modules.distributed import distributed_mean

        loss, num_tokens = lm_loss(self.policy, batch)
        # the token-weighted mean over the global batch (every rank's tokens), not a mean of rank means
        return distributed_mean(self, loss, num_tokens), {"tokens": float(num_tokens)}
