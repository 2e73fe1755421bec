"""pmetal.quant.functional against bitsandbytes on CPU (bit-exact) and a float64 reference.

The bitsandbytes these tests compare with is the one `constraints.txt` pins (0.50.2 when written);
`test_compares_against_the_pinned_bitsandbytes` fails when another version is installed, so a new
release is compared on purpose, never by accident.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from pmetal.errors import PmetalError
from pmetal.quant import functional as QF

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
bnbf = pytest.importorskip("bitsandbytes.functional")


def _pinned_bitsandbytes() -> str:
    constraints = Path(__file__).resolve().parents[2] / "constraints.txt"
    return re.search(r"^bitsandbytes==(\S+)$", constraints.read_text(), re.MULTILINE).group(1)


BNB_PINNED = _pinned_bitsandbytes()


def test_compares_against_the_pinned_bitsandbytes():
    import bitsandbytes

    assert BNB_PINNED == "0.50.2"
    assert bitsandbytes.__version__ == BNB_PINNED, (
        f"these tests compare with bitsandbytes {BNB_PINNED} (constraints.txt); "
        f"{bitsandbytes.__version__} is installed"
    )


def _bnb_default_dequantize(packed, absmax, quant_type, block_size, shape, dtype):
    """bitsandbytes' default-backend (pure PyTorch) 4-bit dequantizer, without its torch.compile wrapper."""
    from bitsandbytes.backends.default import ops

    fn = getattr(ops._dequantize_4bit_compute, "__wrapped__", ops._dequantize_4bit_compute)
    return fn(packed.reshape(-1), absmax, bnbf.get_4bit_type(quant_type, device="cpu"), block_size, shape, dtype)


def _weights():
    g = torch.Generator().manual_seed(0)
    return {
        "randn_64x128": torch.randn(64, 128, generator=g),
        "eye_96": torch.eye(96),
        "odd_3x37": torch.randn(3, 37, generator=g),
        "odd_257x33_small": torch.randn(257, 33, generator=g) * 0.02,
        "zeros_4x64": torch.zeros(4, 64),
        "constant_8x64": torch.full((8, 64), 0.5),
        "heavy_tail_96x256": torch.randn(96, 256, generator=g) ** 3,
        "bf16_40x130": torch.randn(40, 130, generator=g).to(torch.bfloat16),
        "fp16_50x64": torch.randn(50, 64, generator=g).half(),
        # 257 * 96 = 24672 values = 385.5 blocks of 64: a final partial block, rows not whole blocks
        "partial_257x96": torch.randn(257, 96, generator=g),
    }


def test_code_tables_equal_bitsandbytes():
    assert torch.equal(QF.code_4bit("nf4"), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(QF.code_4bit("fp4"), bnbf.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(QF.dynamic_map(), bnbf.create_dynamic_map())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_bytes_and_values_equal_bitsandbytes(quant_type, block_size, double_quant):
    for name, w in _weights().items():
        packed, state = QF.quantize_4bit(w, quant_type, block_size, double_quant)
        bnb_packed, bnb_state = bnbf.quantize_4bit(w, blocksize=block_size, quant_type=quant_type,
                                                   compress_statistics=double_quant)  # fmt: skip
        assert bnb_packed.shape == (packed.numel(), 1), name  # bnb: [(numel + 1) // 2, 1]
        assert torch.equal(packed, bnb_packed.view(-1)), name
        assert torch.equal(state.absmax, bnb_state.absmax), name
        if double_quant:
            assert state.absmax.dtype == torch.uint8
            assert torch.equal(state.nested_absmax, bnb_state.state2.absmax), name
            assert torch.equal(state.nested_offset, bnb_state.offset), name
        for dtype in (torch.float32, torch.bfloat16, torch.float16) if block_size == 64 else (torch.float32,):
            ours = QF.dequantize_4bit(packed, state, dtype)
            assert ours.shape == w.shape and ours.dtype == dtype
            if w.shape[-1] % block_size == 0:  # bnb's native CPU kernel (see functional's docstring)
                bnb_state.dtype = dtype
                reference = bnbf.dequantize_4bit(bnb_packed, bnb_state)
            else:
                reference = _bnb_default_dequantize(bnb_packed, state.absmax_fp32(), quant_type, block_size, w.shape, dtype)
            assert torch.equal(ours, reference), (name, dtype)


@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_in_half_precision_is_the_rounded_fp32_result(block_size, dtype):
    # Half-precision results are scaled and cast in one kernel where blocks are whole; they must
    # equal the fp32 result (checked against bitsandbytes above) rounded once.
    for name, w in _weights().items():
        packed, state = QF.quantize_4bit(w, "nf4", block_size, double_quant=True)
        assert torch.equal(QF.dequantize_4bit(packed, state, dtype), QF.dequantize_4bit(packed, state).to(dtype)), name


def test_bnb_native_cpu_dequantizer_misreads_blocks_spanning_rows():
    # Why tests use bnb's default backend for such shapes: its native CPU kernel is wrong there.
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    packed, state = QF.quantize_nf4(w, block_size=256)
    bnb_packed, bnb_state = bnbf.quantize_4bit(w, blocksize=256, quant_type="nf4")
    ours = (QF.dequantize_nf4(packed, state) - w).abs().max()
    native = (bnbf.dequantize_4bit(bnb_packed, bnb_state) - w).abs().max()
    assert ours < 0.6 < native


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_final_partial_block_follows_the_flat_layout(quant_type, double_quant):
    # (257, 96), block 64: the bytes and absmax agree with bitsandbytes' quantizer; the values are
    # code * absmax of the value's block in the flattened weight (the layout bnb's quantizer, CUDA and
    # default backends use, and that its own round trip needs). bnb 0.50's native CPU dequantizer
    # instead reads row r, column c with absmax[r * (96 // 64) + c // 64]: a documented departure.
    w = torch.randn(257, 96, generator=torch.Generator().manual_seed(6))
    packed, state = QF.quantize_4bit(w, quant_type, 64, double_quant)
    bnb_packed, bnb_state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    assert torch.equal(packed, bnb_packed.view(-1)) and torch.equal(state.absmax, bnb_state.absmax)
    absmax = state.absmax_fp32()
    assert absmax.numel() == 386  # 385 whole blocks and the final 32 values
    if not double_quant:  # the partial block's absmax is over its 32 values only
        assert state.absmax[-1] == w.view(-1)[-32:].abs().amax()
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).view(-1).long()
    values = QF.code_4bit(quant_type)[codes]
    flat_block = torch.arange(w.numel()) // 64
    expected = (values * absmax[flat_block]).view(w.shape)
    ours = QF.dequantize_4bit(packed, state)
    assert torch.equal(ours, expected)
    assert torch.equal(ours, _bnb_default_dequantize(bnb_packed, absmax, quant_type, 64, w.shape, torch.float32))
    assert (ours - w).abs().max() <= absmax.max() * 0.5  # within half a code step of the largest block
    native = bnbf.dequantize_4bit(bnb_packed, bnb_state)
    rows, cols = torch.meshgrid(torch.arange(257), torch.arange(96), indexing="ij")
    assert torch.equal(native, values.view(w.shape) * absmax[rows * (96 // 64) + cols // 64])
    assert (native - w).abs().max() > 2 * (ours - w).abs().max()


def test_nested_absmax_codes_equal_bitsandbytes_quantize_blockwise():
    g = torch.Generator().manual_seed(2)
    code = bnbf.create_dynamic_map()
    for values in (torch.randn(1_000_000, generator=g), torch.rand(1_000_000, generator=g) * 2 - 1,
                   torch.randn(300_000, generator=g) * 1e-3,
                   torch.cat([(code[:-1] + code[1:]) / 2, code, torch.linspace(-1, 1, 65536)])):  # fmt: skip
        ours, absmax = QF.quantize_dynamic_blockwise(values)
        theirs, state = bnbf.quantize_blockwise(values, blocksize=256)
        assert torch.equal(absmax, state.absmax)
        assert torch.equal(ours, theirs)
        assert torch.equal(QF.dequantize_dynamic_blockwise(ours, absmax), bnbf.dequantize_blockwise(theirs, state))


def test_hand_computed_nf4_block():
    # one block of 64: absmax 2; x/absmax = 1 -> code 15, -1 -> 0, 0 -> 7, 0.5 -> nearest 0.4407 -> 12
    w = torch.zeros(64)
    w[0], w[1], w[3] = 2.0, -2.0, 1.0
    packed, state = QF.quantize_nf4(w, block_size=64)
    assert state.absmax.tolist() == [2.0]
    assert packed[:2].tolist() == [(15 << 4) | 0, (7 << 4) | 12]  # even element in the high nibble
    assert packed[2:].tolist() == [0x77] * 30
    back = QF.dequantize_nf4(packed, state)
    assert back[:4].tolist() == pytest.approx([2.0, -2.0, 0.0, 2 * 0.44070982933044434])


def test_double_quant_saves_memory_and_stays_close():
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(3))
    packed, plain = QF.quantize_nf4(w)
    _, nested = QF.quantize_nf4(w, double_quant=True)
    assert QF.quantized_nbytes(packed, plain) / w.numel() == pytest.approx(0.5 + 4 / 64)
    assert QF.quantized_nbytes(packed, nested) / w.numel() == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256) + 4 / w.numel())
    assert (nested.absmax_fp32() - plain.absmax).abs().max() < 0.01 * plain.absmax.max()


@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
def test_int8_equals_float64_reference(block_size):
    for name, w in _weights().items():
        codes, state = QF.quantize_int8(w, block_size)
        flat = w.double().reshape(-1)
        n = flat.numel()
        padded = torch.nn.functional.pad(flat, (0, (-n) % block_size)).view(-1, block_size)
        absmax = padded.abs().amax(-1)
        expected = torch.round(padded / absmax.clamp(min=1e-300).view(-1, 1) * 127).reshape(-1)[:n]
        mismatch = (codes.double() != expected)
        # fp32 vs float64 rounding can only flip values within an ulp of a .5 boundary
        assert mismatch.float().mean() <= 1e-3, name
        assert (codes.double() - expected).abs().max() <= 1, name
        assert torch.equal(state.absmax, absmax.float()), name
        back = QF.dequantize_int8(codes, state)
        step = (absmax / 127).repeat_interleave(block_size)[:n].view(w.shape)
        assert ((back.double() - w.double()).abs() <= step * 0.5 + 1e-6).all(), name


def test_int8_grid_equals_bitsandbytes_linear_map():
    # bnb's blockwise 8-bit with create_linear_map(signed=True) has the same grid k/127 (index layout differs:
    # it stores the index into a 256-entry map holding two zeros)
    code = bnbf.create_linear_map(signed=True)
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(4))
    codes, state = QF.quantize_int8(w, 256)
    theirs, bnb_state = bnbf.quantize_blockwise(w, code=code, blocksize=256)
    theirs_as_int8 = torch.round(code[theirs.long().view(-1)] * 127)
    disagree = codes.float() != theirs_as_int8
    assert disagree.float().mean() < 0.01
    # bnb looks values up on a 65536-point grid (see quantize_dynamic_blockwise), so it can only
    # differ within ~1.5e-5 (0.002 steps of 1/127) of a midpoint between two grid values
    steps = (w.view(-1, 256) / state.absmax.view(-1, 1)).reshape(-1)[disagree] * 127
    assert ((steps - steps.floor() - 0.5).abs() < 0.003).all()
    step = (state.absmax / 127).repeat_interleave(256).view(w.shape)
    gap = (QF.dequantize_int8(codes, state) - bnbf.dequantize_blockwise(theirs, bnb_state)).abs()
    assert (gap <= step * 1.001).all() and (gap[~disagree.view(w.shape)] <= 1e-6).all()
    assert torch.equal(state.absmax, bnb_state.absmax)


def test_quantization_error_no_worse_than_bitsandbytes():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(256, 512, generator=g) * 0.02
    x = torch.randn(16, 512, generator=g)
    exact = x @ w.T
    for quant_type in ("nf4", "fp4"):
        packed, state = QF.quantize_4bit(w, quant_type, 64, True)
        bnb_packed, bnb_state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
        ours = (x @ QF.dequantize_4bit(packed, state).T - exact).abs().mean()
        theirs = (x @ bnbf.dequantize_4bit(bnb_packed, bnb_state).T - exact).abs().mean()
        assert ours <= theirs * (1 + 1e-6)
    codes, state = QF.quantize_int8(w, 64)
    assert (x @ QF.dequantize_int8(codes, state).T - exact).abs().mean() < 0.1 * ours


def test_bad_settings_have_clear_errors():
    w = torch.randn(4, 64)
    with pytest.raises(PmetalError, match=r"block size 48 is not supported; expected one of \(32, 64"):
        QF.quantize_nf4(w, block_size=48)
    with pytest.raises(PmetalError, match=r"unknown quantization 'nf3'; expected one of \('nf4', 'fp4', 'int8'\)"):
        QF.quantize(w, "nf3")
