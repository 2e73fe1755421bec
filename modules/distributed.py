"""Losses and metrics over the global batch when a method trains on several processes.

Under data parallelism (Lightning's DDP or FSDP) each rank computes its loss on its own shard and
the strategy averages the gradients over the ranks. A loss that is a mean over rows or tokens is
therefore a mean of per-rank means, which is not the global batch's mean when the shards hold
different numbers of tokens (SFT's token-weighted mean) or rows (a smaller last batch, DAPO's
dynamic sampling). `distributed_mean` rescales each rank's mean so that the averaged gradient is
the gradient of the global mean: `mean_r · n_r · world / Σ n`. The counts are summed with the
strategy's all-reduce (`trainer.strategy.reduce`); on one process every function here returns its
input unchanged, so single-device numbers stay bit-identical.
"""

from __future__ import annotations

import torch


def world_size(module) -> int:
    trainer = getattr(module, "_trainer", None)
    return int(trainer.world_size) if trainer is not None else 1


def sync_metrics(module) -> bool:
    """Whether `self.log` must reduce over ranks (`sync_dist`): only with several processes."""
    return world_size(module) > 1


def global_sum(module, value) -> torch.Tensor:
    """`value` summed over the data-parallel ranks (no gradient), as a float tensor on the module's device."""
    value = torch.as_tensor(value, dtype=torch.float32, device=module.device).detach()
    if world_size(module) == 1:
        return value
    return module.trainer.strategy.reduce(value.clone(), reduce_op="sum")


def distributed_mean(module, local_mean: torch.Tensor, local_count) -> torch.Tensor:
    """This rank's share of the global mean, given its mean over `local_count` rows or tokens.

    DDP averages the ranks' gradients, so the share is scaled by the world size: the average of
    the shares is exactly `Σ_r mean_r · n_r / Σ_r n_r`.
    """
    world = world_size(module)
    if world == 1:
        return local_mean
    count = torch.as_tensor(local_count, dtype=torch.float32, device=local_mean.device).detach()
    return local_mean * count * world / global_sum(module, count).clamp_min(1)


def shard_for_fsdp(module) -> None:
    """FSDP2 (`fully_shard`) over the device mesh Lightning's ModelParallelStrategy gives the module.

    Each decoder layer is one shard group (its frozen base weights and its LoRA weights gathered
    together for its forward and freed after): the decoder layers, nearly all of the weights, are
    sharded, every process holding 1/world of them. The embeddings, final norm and LM head stay
    whole on every process: pmetal's chunked LM-head loss reads the head's weight outside a
    module call, which a sharded (DTensor) weight does not allow. They are frozen under LoRA, so
    no gradient of theirs needs reducing; full fine-tuning is therefore refused under FSDP.

    Raises:
        PmetalError: under full fine-tuning (see above), or under a quantized base (QLoRA): pmetal's packed 4-bit weights are buffers,
            which `fully_shard` replicates rather than shards, so FSDP would save no memory.
    """
    from torch.distributed.fsdp import fully_shard

    from pmetal.errors import PmetalError
    from pmetal.perf import decoder_layers

    policy = module.policy
    if module.hparams.get("quantization") or getattr(policy, "pmetal_quantization", None) or any(
        hasattr(m, "qweight") for m in policy.modules()
    ):
        raise PmetalError(
            "--strategy fsdp does not shard a quantized base (QLoRA): pmetal's packed 4-bit weights are buffers, which "
            "FSDP2's fully_shard replicates on every process. Use --strategy ddp (each GPU holds the whole 4-bit base "
            "and trains on its own shard of the data), or FSDP without --quantization"
        )
    if hasattr(module, "rollout_settings"):
        raise PmetalError(
            f"--strategy fsdp does not run {type(module).__name__}: each rank generates rollouts of its own length, "
            "and FSDP's per-layer all-gathers need every rank to run the same forwards; use --strategy ddp")
    if module.hparams.get("adapter") == "full":
        raise PmetalError("--strategy fsdp trains adapters (LoRA/DoRA) only: the embeddings and LM head stay whole "
                          "and frozen on every process; use --strategy ddp for full fine-tuning")
    mesh = module.device_mesh
    if any(type(m).__name__.startswith("FSDP") for m in policy.modules()):
        return  # configure_model runs again on a second fit of the same module
    layers = decoder_layers(policy)
    for layer in layers:
        fully_shard(layer, mesh=mesh)

