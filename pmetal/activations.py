"""Activation memory for long rows: the inputs of checkpointed decoder layers offloaded to host memory,
and each layer's MLP run over the sequence in chunks.

With gradient checkpointing on every layer, what stays on the device between forward and backward
is one [tokens, hidden] input per layer; at long context (or a large model) those add up to most of
the peak. `offload_checkpointed_inputs` moves them to host memory as they are saved and brings each
back when the backward pass recomputes its layer, in the manner of Unsloth's offloaded gradient
checkpointing (Han & Han 2024) and of `torch.autograd.graph.save_on_cpu`, with two departures:
the device-to-host copy runs on a side CUDA stream (the forward pass does not wait for it), and the
host copy is split into fixed-size pinned blocks, because PyTorch's pinned-memory cache rounds every
allocation up to a power of two (a 2.9 GB layer input would take 4 GB of host memory).

Inside a layer, the peak at long context is the MLP's intermediate ([tokens, intermediate] several
times over). `chunk_mlps` runs each layer's MLP over `chunk_size` tokens at a time, each chunk
checkpointed, so only one chunk's intermediate is alive, in forward and in backward; the price is
one more MLP forward per step. The MLP acts on each token alone, so the result is the plain path's.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from pmetal.errors import PmetalError
from pmetal.perf import decoder_layers

log = logging.getLogger("pmetal")

#: bytes per pinned host block of an offloaded tensor: a power of two, so none is wasted.
HOST_BLOCK_BYTES = 64 * 1024**2
#: saved tensors smaller than this stay where they are (rotary tables, masks, scalars).
MIN_OFFLOAD_BYTES = 1024**2


class HostOffload:
    """`saved_tensors_hooks` that keep large saved tensors in host memory.

    On CUDA the copy is asynchronous: pinned blocks filled on a side stream, the device memory
    released once that stream is done with it (`record_stream`), and the backward pass's stream waits
    for the copy before the tensor comes back. Off CUDA tensors are kept as they are (CPU and MPS
    share memory with the host), unless `copy_off_cuda` (tests: the same block-splitting path, run
    synchronously).
    """

    def __init__(self, block_bytes: int = HOST_BLOCK_BYTES, min_bytes: int = MIN_OFFLOAD_BYTES,
                 copy_off_cuda: bool = False) -> None:
        self.block_bytes, self.min_bytes, self.copy_off_cuda = block_bytes, min_bytes, copy_off_cuda
        self.offloaded_bytes = 0  # since the last reset, for logs and tests
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def pack(self, tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        if isinstance(tensor, nn.Parameter) or size < self.min_bytes or tensor.is_sparse:
            return tensor
        if not (tensor.is_cuda or self.copy_off_cuda):
            return tensor
        self.offloaded_bytes += size
        flat = tensor.detach().reshape(-1)  # a copy only when the tensor is not contiguous
        per_block = max(1, self.block_bytes // tensor.element_size())
        pin = tensor.is_cuda
        blocks = [torch.empty(min(per_block, flat.numel() - start), dtype=tensor.dtype, pin_memory=pin)
                  for start in range(0, flat.numel(), per_block)]
        event = None
        if tensor.is_cuda:
            stream = self._side_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                self._copy_out(flat, blocks, per_block, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            flat.record_stream(stream)  # the device memory is reused only after the copy
        else:
            self._copy_out(flat, blocks, per_block, non_blocking=False)
        return (tensor.device, tensor.shape, blocks, event)

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, shape, blocks, event = packed
        if event is not None:
            torch.cuda.current_stream(device).wait_event(event)
        flat = torch.empty(sum(b.numel() for b in blocks), dtype=blocks[0].dtype, device=device)
        start = 0
        for block in blocks:
            flat[start : start + block.numel()].copy_(block, non_blocking=device.type == "cuda")
            start += block.numel()
        return flat.view(shape)

    @staticmethod
    def _copy_out(flat: torch.Tensor, blocks: list[torch.Tensor], per_block: int, non_blocking: bool) -> None:
        for index, block in enumerate(blocks):
            block.copy_(flat[index * per_block : index * per_block + block.numel()], non_blocking=non_blocking)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _OffloadedCheckpoint:
    """A layer's checkpoint function whose saved inputs go through `offload`'s hooks.

    The checkpoint saves its inputs before it installs its own hooks for the layer's insides: under
    these hooks only the layer's inputs are packed; the recomputation runs in backward, outside
    them, so the recomputed activations stay on the device.
    """

    def __init__(self, checkpoint_fn, offload: HostOffload) -> None:
        self.checkpoint_fn, self.offload = checkpoint_fn, offload

    def __call__(self, function, *args, **kwargs):
        with self.offload.hooks():
            return self.checkpoint_fn(function, *args, **kwargs)


def offload_checkpointed_inputs(model: nn.Module, offload: HostOffload | None = None) -> HostOffload:
    """Keep the inputs of every checkpointed decoder layer of `model` in host memory (see HostOffload).

    Call after `pmetal.perf.enable_gradient_checkpointing`. Raises PmetalError when no layer is
    checkpointed (nothing would be offloaded). Idempotent. Returns the hooks' owner.
    """
    blocks = [b for b in decoder_layers(model) if getattr(b, "gradient_checkpointing", False)]
    if not blocks:
        raise PmetalError("activation offload moves the inputs of checkpointed layers to host memory: "
                          "turn gradient checkpointing on (--gradient-checkpointing)")
    offload = offload or HostOffload()
    for block in blocks:
        current = block._gradient_checkpointing_func
        if not isinstance(current, _OffloadedCheckpoint):
            block._gradient_checkpointing_func = _OffloadedCheckpoint(current, offload)
    return offload


def _chunked_forward(mlp: nn.Module, chunk: int, x: torch.Tensor, *args, **kwargs):
    """`mlp`'s class forward over `chunk` tokens at a time (dimension -2), each chunk checkpointed.

    The class forward is looked up at each call, so fused kernels applied before or after
    (`pmetal.kernels`, which patches the class) run inside the chunks."""
    body = functools.partial(type(mlp).forward, mlp)
    if args or kwargs or x.dim() < 2 or x.shape[-2] <= chunk:
        return body(x, *args, **kwargs)
    parts = x.split(chunk, dim=-2)
    if torch.is_grad_enabled():
        run = functools.partial(torch.utils.checkpoint.checkpoint, body, use_reentrant=False)
        return torch.cat([run(part) for part in parts], dim=-2)
    return torch.cat([body(part) for part in parts], dim=-2)


def chunk_mlps(model: nn.Module, chunk_size: int) -> int:
    """Run the MLP (`layer.mlp`) of every decoder layer over at most `chunk_size` tokens at a time.

    Returns the number of MLPs chunked. Raises PmetalError for a chunk size below 1 or a model
    without per-layer MLPs. Calling it again changes the chunk size.
    """
    if chunk_size < 1:
        raise PmetalError(f"mlp chunk size {chunk_size}: expected a number of tokens >= 1")
    mlps = [layer.mlp for layer in decoder_layers(model) if isinstance(getattr(layer, "mlp", None), nn.Module)]
    if not mlps:
        raise PmetalError(f"{type(model).__name__} has no per-layer MLP (layer.mlp) to chunk")
    for mlp in mlps:
        mlp.forward = functools.partial(_chunked_forward, mlp, chunk_size)
    return len(mlps)


def configure_long_rows(model: nn.Module, *, kernels: str, device_type: str, offload_activations: bool = False,
                        mlp_chunk_size: int | None = None) -> None:
    """SFT's long-row settings on `model`, in the order they compose: fused kernels
    (`pmetal.kernels.apply_kernels`), then the chunked MLP (its chunks run the fused MLP), then the
    offload of checkpointed layer inputs. SftModule and the benchmarks both call this."""
    from pmetal.kernels import apply_kernels

    apply_kernels(model, kernels, device_type)
    if mlp_chunk_size is not None:
        chunk_mlps(model, mlp_chunk_size)
    if offload_activations:
        offload_checkpointed_inputs(model)
