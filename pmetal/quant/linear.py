"""`QuantLinear`: a frozen linear layer whose weight is stored block-quantized (NF4/FP4/INT8).

QLoRA (Dettmers et al., 2023, arXiv:2305.14314, Sec. 3, Eq. 5): Y = X · dequant(W_q)ᵀ + X·L1·L2, the
base weight frozen in 4 bits and dequantized to the compute dtype on the fly. Where it departs:
the backward pass re-dequantizes the weight instead of keeping the dequantized copy alive from the
forward pass (the same choice as bitsandbytes' `MatMul4Bit`), so activation memory holds no full
weight; the base weight never gets a gradient.

The codes and scaling constants are buffers: `.to(device)` moves them, `state_dict()` saves them,
the optimizer never sees them; `.to(dtype)` / `.half()` leave them alone (see `_apply`).
"""

from __future__ import annotations

import torch
from torch import nn

from pmetal.quant import functional as QF

_STATE_BUFFERS = ("qweight", "absmax", "nested_absmax", "nested_offset")
BACKENDS = ("auto", "pmetal", "bitsandbytes")
_compiled_dequantize = None


def compile_dequantize(enabled: bool = True) -> None:
    """Optional CUDA accelerator: run the pure-PyTorch dequantizer through torch.compile (fused
    kernels; one compile per weight shape). Same values; the eager path stays the default."""
    global _compiled_dequantize
    _compiled_dequantize = torch.compile(QF.dequantize, dynamic=False) if enabled else None


class _DequantMatmul(torch.autograd.Function):
    """y = x @ dequant(W)ᵀ; grad_x = grad_y @ dequant(W) (dequantized again), no grad for W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantLinear") -> torch.Tensor:  # x [..., in]
        ctx.layer = layer
        return torch.nn.functional.linear(x, layer.dequantize(x.dtype))  # [..., out]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # grad_out [..., out]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.layer.dequantize(grad_out.dtype)  # [..., in]
        return grad_x, None


class QuantLinear(nn.Linear):
    """A linear layer y = x Wᵀ + b with W stored as block-quantized codes.

    It subclasses nn.Linear so that code looking for linear layers (PEFT's "all-linear", module
    scans) finds it, but holds no weight parameter: `weight` is a read-only dequantized copy.

    Args:
        in_features: input size.
        out_features: output size.
        bias: whether the layer has a (frozen, full-precision) bias.
        quant_type: "nf4", "fp4" or "int8".
        block_size: values per absmax block (32 ... 4096).
        double_quant: store the absmax constants as 8-bit codes (QLoRA's double quantization).
        compute_dtype: dtype of the dequantized weight and the matmul; None follows the input
            (and autocast).
        backend: "pmetal" (pure PyTorch, every device), "bitsandbytes" (its kernels; CUDA or CPU
            with bitsandbytes installed, 4-bit only) or "auto" (bitsandbytes on CUDA when it is
            installed, else pmetal). Both give the same values.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        quant_type: str = "nf4",
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: no full-precision weight is ever allocated
        if quant_type not in QF.QUANT_TYPES:
            raise QF.PmetalError(f"unknown quantization {quant_type!r}; expected one of {QF.QUANT_TYPES}")
        if backend not in BACKENDS:
            raise QF.PmetalError(f"unknown quantization backend {backend!r}; expected one of {BACKENDS}")
        QF.check_block_size(block_size)
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.block_size, self.double_quant = quant_type, block_size, double_quant
        self.compute_dtype, self.backend = compute_dtype, backend
        n = in_features * out_features
        nblocks = -(-n // block_size)
        if quant_type == "int8":
            self.register_buffer("qweight", torch.zeros(n, dtype=torch.int8, device=device))
        else:
            self.register_buffer("qweight", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax", torch.zeros(nblocks, dtype=torch.uint8, device=device))
            nested = -(-nblocks // QF.NESTED_BLOCK_SIZE)
            self.register_buffer("nested_absmax", torch.zeros(nested, dtype=torch.float32, device=device))
            self.register_buffer("nested_offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.zeros(nblocks, dtype=torch.float32, device=device))
            self.nested_absmax = self.nested_offset = None
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self._bnb_state = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "QuantLinear":
        """Quantize an nn.Linear (on its device); the result holds no full-precision weight."""
        return cls.from_weight(linear.weight, linear.bias, **kwargs)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,  # [out, in]
        bias: torch.Tensor | None = None,
        *,
        quant_type: str = "nf4",
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> "QuantLinear":
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias is not None, quant_type=quant_type, block_size=block_size,
                    double_quant=double_quant, compute_dtype=compute_dtype, backend=backend, device="meta")  # fmt: skip
        codes, state = QF.quantize(weight, quant_type, block_size, double_quant)
        layer.load_quantized(codes, state, bias)
        return layer

    @torch.no_grad()
    def load_quantized(self, codes: torch.Tensor, state: QF.QuantState, bias: torch.Tensor | None = None) -> None:
        """Install already-quantized codes (e.g. from a bitsandbytes checkpoint) without requantizing."""
        if state.shape != (self.out_features, self.in_features) or state.quant_type != self.quant_type:
            raise QF.PmetalError(
                f"quantized weight {state.quant_type} {state.shape} does not fit {self.quant_type} "
                f"({self.out_features}, {self.in_features})"
            )
        if state.block_size != self.block_size or state.double_quant != self.double_quant:
            raise QF.PmetalError(
                f"quantized weight has block size {state.block_size}, double_quant={state.double_quant}; "
                f"layer expects {self.block_size}, {self.double_quant}"
            )
        self.qweight = codes.reshape(-1).contiguous()
        self.absmax = state.absmax
        if state.double_quant:
            self.nested_absmax, self.nested_offset = state.nested_absmax, state.nested_offset.reshape(())
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._bnb_state = None

    # -- quantization state -------------------------------------------------------------------

    @property
    def quant_state(self) -> QF.QuantState:
        return QF.QuantState(self.quant_type, self.block_size, (self.out_features, self.in_features),
                             self.absmax, self.nested_absmax, self.nested_offset)  # fmt: skip

    def _use_bitsandbytes(self) -> bool:
        if self.quant_type == "int8" or self.backend == "pmetal":
            return False
        if self.backend == "auto" and self.qweight.device.type != "cuda":
            return False
        from pmetal.quant.bnb_compat import bitsandbytes_available

        return bitsandbytes_available()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] in `dtype` (default: compute dtype, else fp32)."""
        dtype = dtype or self.compute_dtype or torch.float32
        if self._use_bitsandbytes():
            from pmetal.quant.bnb_compat import bnb_dequantize

            return bnb_dequantize(self, dtype)
        if _compiled_dequantize is not None and self.qweight.device.type == "cuda":
            return _compiled_dequantize(self.qweight, self.quant_state, dtype)
        return QF.dequantize(self.qweight, self.quant_state, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight [out, in]: a new tensor without grad (for DoRA's norm, merging, inspection).

        Writing to it changes a copy, not the layer: merge through `QuantLoraLinear` (registered by
        `register_peft`), which requantizes, or dequantize the model first (`pmetal merge`).
        """
        with torch.no_grad():
            return self.dequantize()

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or torch.float32

    def quantized_nbytes(self) -> int:
        """Bytes held by the codes and scaling constants (the bias excluded)."""
        return QF.quantized_nbytes(self.qweight, self.quant_state)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = self.compute_dtype or x.dtype
        with torch.autocast(x.device.type, enabled=False):
            out = _DequantMatmul.apply(x.to(dtype), self)
            if self.bias is not None:
                out = out + self.bias.to(dtype)
        return out

    # -- device / dtype moves -----------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) casts every floating buffer; the fp32 absmax constants must stay fp32.
        saved = {k: self._buffers.pop(k) for k in _STATE_BUFFERS if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        for name, tensor in saved.items():
            moved = fn(tensor)
            if moved.dtype != tensor.dtype:
                moved = tensor.to(moved.device)
            self._buffers[name] = moved
        self._bnb_state = None
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, block_size={self.block_size}, double_quant={self.double_quant}")  # fmt: skip
