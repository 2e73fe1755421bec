"""Block-wise NF4 / FP4 / INT8 quantization in pure PyTorch (CPU, CUDA, MPS).

NF4 and FP4 follow QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
arXiv:2305.14314, Sec. 3): each block of `block_size` consecutive values of the row-major flattened
weight is scaled by its absolute maximum ("absmax") and every scaled value is replaced by the index
of the nearest of 16 code values. Double quantization (QLoRA Sec. 3, "Double Quantization") stores
the fp32 absmax constants as 8-bit codes of the signed dynamic map (Dettmers, 2015,
arXiv:1511.04561) in blocks of 256 after subtracting their mean.

The layout is bitsandbytes' (0.50, CPU and default backends), byte for byte, so that weights move
between the two freely:

- codes: bitsandbytes' `get_4bit_type("nf4"|"fp4")` tables (FP4 listed in bit-pattern order);
- scaling: `x * (1 / absmax)` for whole blocks but `x / absmax` for a trailing partial block, then
  clamped to [-1, 1]; nearest code by `bucketize` on the midpoints of the sorted code (a value on a
  midpoint goes to the lower code); an all-zero block keeps absmax 0;
- packing: two codes per byte, the even-indexed value in the high nibble; an odd element count is
  padded with one zero value; the packed tensor has (numel + 1) // 2 bytes;
- double quantization: offset = mean(absmax) (fp32), then (absmax - offset) is quantized block-wise
  (blocks of 256) with the 256-entry dynamic map through bitsandbytes' CPU lookup table (see
  `quantize_dynamic_blockwise`).
  Dequantized absmax = dynamic[code] * nested_absmax + offset, in fp32.

Known disagreement (a departure on purpose, pmetal being the side that is right): bitsandbytes
0.50's native CPU *dequantize* kernel (`cdequantize_blockwise_cpu_{nf4,fp4}_*`, used when the last
dimension is even) reads row r, column c with the scale absmax[r * (n // block_size) + c // block_size]
for rows of n values, i.e. it assumes every row holds whole blocks. Its own quantizer stores the flat
layout (block = flat index // block_size, a final partial block scaled by the absmax of its own
values), so wherever n is not a multiple of the block size the native kernel decodes bitsandbytes'
own bytes with the wrong scales: a (257, 96) weight with block 64 (385 whole blocks and a final 32
values) comes back with a round-trip error ~4x the flat layout's, and a 64x128 weight with block 256
~2.6x. pmetal follows the flat layout that bitsandbytes' quantizer, default backend (its CPU fallback
for odd rows) and CUDA kernels use; tests compare against the native kernel where rows hold whole
blocks, against bitsandbytes' default-backend dequantizer everywhere, and pin the native kernel's
row-wise reading for (257, 96) so a bitsandbytes fix shows up.

INT8 departs from bitsandbytes on purpose: bitsandbytes' blockwise 8-bit uses the non-linear dynamic
map; pmetal's INT8 is symmetric linear int8 (q = round(x * 127 / absmax), round half to even, stored
as int8), the usual choice for weights. With bitsandbytes' `create_linear_map(signed=True)` as the
code, `quantize_blockwise` gives the same grid (tests compare the two; its index is q + 127 for
q <= 0 and q + 128 for q > 0 because that map holds two zeros, and its ties go to the lower value).

Everything here runs in fp32 or narrower (MPS has no float64).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from pmetal.errors import PmetalError

QUANT_TYPES = ("nf4", "fp4", "int8")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCK_SIZE = 256  # bitsandbytes' block size for the double-quantized absmax

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1) (QLoRA, Sec. 3, Eq. 4).
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# 1 sign, 2 exponent, 1 mantissa bit in bit-pattern order, scaled by 1/12 (bitsandbytes' FP4).
_FP4_UNSCALED = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


@lru_cache(maxsize=None)
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    if quant_type == "fp4":
        code = torch.tensor(_FP4_UNSCALED, dtype=torch.float32)
        return code.div_(code.abs().max())
    raise PmetalError(f"unknown 4-bit type {quant_type!r}; expected 'nf4' or 'fp4'")


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 code values [16] fp32 of 'nf4' or 'fp4', indexed by the 4-bit code."""
    return _code_cpu(quant_type).to(device)


@lru_cache(maxsize=None)
def _bounds_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code_cpu(quant_type)
    # argsort on CPU, always: FP4 has +0 and -0 and the order of that tie decides which code a
    # value just above zero gets; bitsandbytes' CPU result is the reference.
    order = torch.argsort(code)
    return (code[order[:-1]] + code[order[1:]]) / 2, order


@lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    # bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8),
    # computed the same way (fp32 linspace, means, Python floats) so the 256 values agree bit for bit.
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map [256] fp32 (sorted), used for the nested absmax.

    Cached per device: every dequantization of a double-quantized weight reads it, and a fresh
    host-to-device copy each time would synchronize the GPU with the host on every layer call.
    """
    return _on_device(_dynamic_map_cpu, torch.device(device))


_device_tables: dict[tuple, torch.Tensor] = {}


def _on_device(make_cpu_table, device: torch.device, *key) -> torch.Tensor:
    """A constant CPU table (from the lru-cached `make_cpu_table(*key)`), copied once per device.
    The copy is never written to: callers only index it."""
    cache_key = (make_cpu_table.__name__, *key, device)
    table = _device_tables.get(cache_key)
    if table is None:
        table = _device_tables[cache_key] = make_cpu_table(*key).to(device)
    return table


def check_block_size(block_size: int) -> int:
    if block_size not in BLOCK_SIZES:
        raise PmetalError(f"quantization block size {block_size} is not supported; expected one of {BLOCK_SIZES}")
    return block_size


# ---------------------------------------------------------------------------------------------
# block-wise absmax scaling (shared by every type)


def _blocks_absmax(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat [N] fp32 -> (absmax [nblocks] fp32, scaled [N] fp32 in [-1, 1]) with bitsandbytes' arithmetic."""
    n = flat.numel()
    rem = n % block_size
    full = n - rem
    whole = flat[:full].reshape(-1, block_size)
    absmax = whole.abs().amax(dim=-1)
    scaled = torch.clamp(whole * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    return absmax, scaled


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """values [N] fp32 (code values) * absmax of their block -> [N] fp32."""
    n = values.numel()
    rem = n % block_size
    if rem == 0:
        return (values.view(-1, block_size) * absmax.view(-1, 1)).view(n)
    full = n - rem
    head = (values[:full].view(-1, block_size) * absmax[:-1].view(-1, 1)).view(full)
    return torch.cat([head, values[full:] * absmax[-1]])


def _scale_blocks_(values: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """In-place `_scale_blocks` on a contiguous fp32 `values` [N]; returns it."""
    n = values.numel()
    full = n - n % block_size
    values[:full].view(-1, block_size).mul_(absmax[: full // block_size].view(-1, 1))
    if full < n:
        values[full:].mul_(absmax[-1])
    return values


# ---------------------------------------------------------------------------------------------
# double quantization of the absmax constants


def quantize_dynamic_blockwise(
    values: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """values [N] fp32 -> (codes [N] uint8 into `dynamic_map()`, block absmax [ceil(N/bs)] fp32).

    Matches bitsandbytes 0.50's native CPU `quantize_blockwise` (fp32 input) bit for bit. That
    kernel does not search the map: it normalizes x * (1 / absmax) and reads a 65536-entry table over a
    uniform grid of [-1, 1], entry floor((x + 1) * 32767.5 + 0.5), each entry being the map value
    nearest to its grid point. Near a midpoint between two map values (within ~1.5e-5) this picks
    the farther one, ~0.1% of values; we reproduce it rather than "fix" it so the bytes agree.
    """
    flat = values.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // block_size)
    padded = torch.nn.functional.pad(flat, (0, nblocks * block_size - n)).view(nblocks, block_size)
    absmax = padded.abs().amax(dim=-1)
    normed = (padded * (1.0 / absmax.view(-1, 1))).reshape(-1)[:n]
    slot = torch.floor((normed + 1.0) * 32767.5 + 0.5)
    # A block of zeros has absmax 0 and 0 * inf = NaN; bitsandbytes then stores code 0 (any code
    # decodes to 0 * 0 + offset, but the bytes should agree).
    slot = torch.nan_to_num(slot, nan=0.0).clamp(0, _GRID - 1).long()
    return _grid_table(flat.device)[slot], absmax


_GRID = 65536


@lru_cache(maxsize=None)
def _grid_table_cpu() -> torch.Tensor:
    grid = torch.linspace(-1, 1, _GRID, dtype=torch.float32)
    code = _dynamic_map_cpu()
    left = (torch.searchsorted(code, grid, right=True) - 1).clamp(0, code.numel() - 2)
    nearer_right = (grid - code[left + 1]).abs() < (grid - code[left]).abs()
    return (left + nearer_right.long()).to(torch.uint8)


def _grid_table(device: torch.device) -> torch.Tensor:
    return _on_device(_grid_table_cpu, torch.device(device))


def dequantize_dynamic_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE
) -> torch.Tensor:
    """codes [N] uint8, absmax [ceil(N/bs)] fp32 -> [N] fp32."""
    return _scale_blocks(dynamic_map(codes.device)[codes.long()], absmax, block_size)


# ---------------------------------------------------------------------------------------------
# quantization state


@dataclass
class QuantState:
    """Everything needed to rebuild a weight from its packed codes.

    `absmax` is fp32 [nblocks], or uint8 [nblocks] when double-quantized (then `nested_absmax`
    fp32 [ceil(nblocks/256)] and `nested_offset` fp32 [] are set).
    """

    quant_type: str
    block_size: int
    shape: tuple[int, ...]
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def absmax_fp32(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax
        return dequantize_dynamic_blockwise(self.absmax, self.nested_absmax) + self.nested_offset

    def to(self, device: torch.device | str) -> "QuantState":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantState(self.quant_type, self.block_size, self.shape, move(self.absmax),
                          move(self.nested_absmax), move(self.nested_offset))  # fmt: skip


def compress_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 absmax [B] -> (codes [B] uint8, nested_absmax [ceil(B/256)] fp32, offset [] fp32)."""
    offset = absmax.mean()
    codes, nested_absmax = quantize_dynamic_blockwise(absmax - offset)
    return codes, nested_absmax, offset


# ---------------------------------------------------------------------------------------------
# 4-bit


def quantize_4bit(
    weight: torch.Tensor, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = False
) -> tuple[torch.Tensor, QuantState]:
    """weight [any shape] float -> (packed [(numel + 1) // 2] uint8, QuantState).

    Same bytes as `bitsandbytes.functional.quantize_4bit(weight, blocksize=block_size,
    quant_type=quant_type, compress_statistics=double_quant)` on CPU (whose packed tensor is this
    one viewed as [(numel + 1) // 2, 1]).
    """
    check_block_size(block_size)
    bounds, order = _bounds_cpu(quant_type)
    flat = weight.detach().reshape(-1).float()
    absmax, scaled = _blocks_absmax(flat, block_size)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    idx = torch.bucketize(scaled, bounds.to(flat.device), out_int32=True)
    if quant_type != "nf4":
        idx = order.to(flat.device)[idx]
    idx = idx.to(torch.uint8)
    packed = (idx[::2] << 4) | idx[1::2]
    state = QuantState(quant_type, block_size, tuple(weight.shape), absmax)
    if double_quant:
        state.absmax, state.nested_absmax, state.nested_offset = compress_absmax(absmax)
    return packed, state


@lru_cache(maxsize=None)
def _pair_table_cpu(quant_type: str) -> torch.Tensor:
    """[256, 2] fp32: the two code values held by each byte (high nibble first)."""
    code = _code_cpu(quant_type)
    byte = torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=-1)


def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    return _on_device(_pair_table_cpu, torch.device(device), quant_type)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed [(numel + 1) // 2] uint8 -> weight [state.shape] in `dtype`.

    code value * absmax is computed in fp32 and then cast, as bitsandbytes does, so the result is
    bit-exact with `bitsandbytes.functional.dequantize_4bit` for fp32, bf16 and fp16.
    """
    n = state.numel
    table = _pair_table(state.quant_type, packed.device)
    # int32 indices and in-place scaling: the transient memory of a dequantization (it runs in every
    # forward and backward of a QLoRA layer) is the fp32 values plus the result, nothing more.
    index = packed.reshape(-1).int()
    if packed.device.type == "cpu":
        # Gathering each byte's two fp32 values as one int64 is faster on the CPU than gathering
        # rows of two; the bits are the same.
        values = torch.index_select(table.view(torch.int64).view(-1), 0, index).view(torch.float32)[:n]
    else:
        values = torch.index_select(table, 0, index).view(-1)[:n]  # [n] fp32
    absmax = state.absmax_fp32()
    if dtype != torch.float32 and n % state.block_size == 0:
        # One kernel for the scaling and the cast: the product is computed in fp32 and rounded
        # once on store, exactly like scaling in place and then casting.
        out = torch.empty(n, dtype=dtype, device=packed.device)
        torch.mul(values.view(-1, state.block_size), absmax.view(-1, 1), out=out.view(-1, state.block_size))
        return out.view(state.shape)
    _scale_blocks_(values, absmax, state.block_size)
    return values.to(dtype).view(state.shape)


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = False):
    """NF4: see `quantize_4bit`."""
    return quantize_4bit(weight, "nf4", block_size, double_quant)


def quantize_fp4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = False):
    """FP4: see `quantize_4bit`."""
    return quantize_4bit(weight, "fp4", block_size, double_quant)


def dequantize_nf4(packed: torch.Tensor, state: QuantState, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_4bit(packed, state, dtype)


def dequantize_fp4(packed: torch.Tensor, state: QuantState, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_4bit(packed, state, dtype)


# ---------------------------------------------------------------------------------------------
# INT8 (symmetric, block-wise absmax)


def quantize_int8(
    weight: torch.Tensor, block_size: int = 64, double_quant: bool = False
) -> tuple[torch.Tensor, QuantState]:
    """weight [any shape] float -> (codes [numel] int8 in [-127, 127], QuantState).

    q = round_half_even(clamp(x / absmax, -1, 1) * 127) per block.
    """
    check_block_size(block_size)
    flat = weight.detach().reshape(-1).float()
    absmax, scaled = _blocks_absmax(flat, block_size)
    codes = torch.round(scaled * 127.0).to(torch.int8)
    state = QuantState("int8", block_size, tuple(weight.shape), absmax)
    if double_quant:
        state.absmax, state.nested_absmax, state.nested_offset = compress_absmax(absmax)
    return codes, state


def dequantize_int8(codes: torch.Tensor, state: QuantState, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [numel] int8 -> weight [state.shape] in `dtype` (q / 127 * absmax in fp32, then cast)."""
    values = codes.reshape(-1).float() / 127.0
    return _scale_blocks(values, state.absmax_fp32(), state.block_size).to(dtype).view(state.shape)


# ---------------------------------------------------------------------------------------------
# generic entry points


def quantize(
    weight: torch.Tensor, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = True
) -> tuple[torch.Tensor, QuantState]:
    """Quantize with any of QUANT_TYPES; returns (codes, state) on the weight's device.

    On MPS the work is done on CPU (bucketize/searchsorted coverage on MPS varies between torch
    releases, and CPU is the reference for bit-exactness); it runs once, at load time.
    """
    if weight.device.type == "mps":
        codes, state = quantize(weight.detach().cpu(), quant_type, block_size, double_quant)
        return codes.to(weight.device), state.to(weight.device)
    if quant_type == "int8":
        return quantize_int8(weight, block_size, double_quant)
    if quant_type in ("nf4", "fp4"):
        return quantize_4bit(weight, quant_type, block_size, double_quant)
    raise PmetalError(f"unknown quantization {quant_type!r}; expected one of {QUANT_TYPES}")


def dequantize(codes: torch.Tensor, state: QuantState, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if state.quant_type == "int8":
        return dequantize_int8(codes, state, dtype)
    return dequantize_4bit(codes, state, dtype)


def quantized_nbytes(codes: torch.Tensor, state: QuantState) -> int:
    """Bytes held by the codes and every scaling constant of one quantized weight."""
    total = codes.numel() * codes.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.double_quant:
        total += state.nested_absmax.numel() * 4 + 4
    return total
