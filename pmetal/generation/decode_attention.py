"""Decode attention as one Triton kernel: a few query rows per KV head, reading only the allowed columns.

A decode round asks little of attention: per (row, KV head), ``group x T`` query rows (grouped
query heads times the round's tokens) against a slot cache of ``capacity`` columns. Batched
matmuls read the whole capacity from the first token on and launch several kernels per layer
(scores, mask, softmax, values); fused SDPA kernels tile over the query and leave most of each
tile empty. Here one program per (row, KV head) walks the cache in blocks of columns with an
online softmax (Milakov & Gimelshein 2018, as FlashAttention does) and **skips every block the
mask allows nothing in**: the columns not yet written, left padding, a finished row's tail. So a
round reads about the columns written so far, with no recompilation as they grow, and the mask
stays the one source of what a row sees (holes from rejected drafts included).

The output is written straight in the ``[B, T, Hq, D]`` layout attention functions return.
Numerics: scores and the softmax in float32, the probabilities cast to the value dtype for the
second product, float32 accumulation (what fused SDPA kernels do); float32 inputs use IEEE
products, not TF32.

Departures: none in what is computed. A row with no allowed column at all returns zeros (the
matmul path returns the mean of the values there; such rows are never read).
"""

from __future__ import annotations

import functools
import os

import torch

BLOCK_COLUMNS = 64  # cache columns per step of a program's loop
SCAN_COLUMNS = 1024  # mask columns per step of the bounding scan
LAUNCH = {"num_warps": 4, "num_stages": 2}


def interpreting() -> bool:
    """Triton's interpreter is on (``TRITON_INTERPRET=1``): the kernel runs on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - no Triton (CPU and MPS builds of torch): the matmul path is used
        return False
    return True


def kernel_supported(device: torch.device) -> bool:
    """Whether :func:`decode_attention` can run on ``device``: CUDA with Triton, or the interpreter."""
    if not triton_importable():
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def decode_attention_kernel(
        Q, K, V, Mask, Out,
        sqb, sqh, sqt, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smt, smn, sob, sot, soh, sod,
        T, C, GROUP, D,
        SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SCAN: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        # The columns any query row may see lie within those of the last token's row (causal within the
        # round, the same cache columns before it): one scan of that mask row bounds the block loop.
        first, last = C, -1
        scan = tl.arange(0, SCAN)
        for start in range(0, C, SCAN):
            cols = start + scan
            seen = tl.load(Mask + b * smb + (T - 1) * smt + cols * smn, mask=cols < C, other=0) != 0
            first = tl.minimum(first, tl.min(tl.where(seen, cols, C)))
            last = tl.maximum(last, tl.max(tl.where(seen, cols, -1)))
        r = tl.arange(0, BLOCK_R)  # query row r = j * T + t: head h * GROUP + j, token t
        head = h * GROUP + r // T
        t = r % T
        row_ok = r < GROUP * T
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(Q + b * sqb + head[:, None] * sqh + t[:, None] * sqt + d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_R], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        n = tl.arange(0, BLOCK_N)
        for start in range((first // BLOCK_N) * BLOCK_N, last + 1, BLOCK_N):  # blocks nobody may see are never read
            cols = start + n
            col_ok = cols < C
            allowed = tl.load(Mask + b * smb + t[:, None] * smt + cols[None, :] * smn,
                              mask=row_ok[:, None] & col_ok[None, :], other=0) != 0
            kv_ok = col_ok[:, None] & d_ok[None, :]
            k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + d[None, :] * skd, mask=kv_ok, other=0.0)
            v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + d[None, :] * svd, mask=kv_ok, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(allowed, s * SCALE, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.where(allowed, tl.exp(s - m_new[:, None]), 0.0)
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(Out + b * sob + t[:, None] * sot + head[:, None] * soh + d[None, :] * sod,
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    return decode_attention_kernel


_PREPARED: dict = {}  # "kernel": the launcher, "op": the registered op; filled by prepare(), outside any compile


def prepare() -> None:
    """Build the kernel (and register its op) once, eagerly: traced code then only reads module state.

    The engine calls it when it decides to use the kernel, before any round is compiled or captured,
    so that ``torch.compile`` never traces Triton's decoration or the op's registration."""
    if _PREPARED:
        return
    kernel = _kernel()
    if interpreting():  # the interpreter runs the kernel on the host directly, outside the op registry
        _PREPARED["kernel"] = kernel
        return
    from torch.library import triton_op, wrap_triton

    _PREPARED["kernel"] = wrap_triton(kernel)

    @triton_op("pmetal::decode_attention", mutates_args=())
    def decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                            scale: float) -> torch.Tensor:
        return _launch(query, key, value, mask, scale)

    _PREPARED["op"] = decode_attention_op


def _launch(query, key, value, mask, scale: float) -> torch.Tensor:
    b, hq, t, d = query.shape
    hkv, capacity = key.shape[1], key.shape[2]
    group = hq // hkv
    out = torch.empty((b, t, hq, d), dtype=query.dtype, device=query.device)
    block_r = max(16, 1 << (group * t - 1).bit_length())
    block_d = max(16, 1 << (d - 1).bit_length())
    _PREPARED["kernel"][(b, hkv)](
        query, key, value, mask, out,
        *query.stride(), *key.stride(), *value.stride(), mask.stride(0), mask.stride(2), mask.stride(3), *out.stride(),
        t, capacity, group, d,
        SCALE=scale, BLOCK_R=block_r, BLOCK_N=BLOCK_COLUMNS, BLOCK_D=block_d, SCAN=SCAN_COLUMNS,
        IEEE=query.dtype == torch.float32, **LAUNCH,
    )
    return out


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Attention of ``query [B, Hq, T, D]`` over ``key/value [B, Hkv, C, D]`` where ``mask [B, 1, T, C]`` (bool).

    Grouped-query heads ``Hq = group x Hkv`` share their KV head (head ``h`` reads KV head
    ``h // group``, transformers' ``repeat_kv`` order). Returns ``[B, T, Hq, D]``. Through
    ``torch.compile`` it is one opaque op (``pmetal::decode_attention``), captured in CUDA graphs
    like any kernel. Call :func:`prepare` first where it may be compiled.
    """
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"decode_attention needs a [B, 1, T, C] boolean mask, got {tuple(mask.shape)} {mask.dtype}")
    if not _PREPARED:
        prepare()
    scale = float(scale if scale is not None else query.shape[-1] ** -0.5)
    if "op" in _PREPARED:
        return _PREPARED["op"](query, key, value, mask, scale)
    return _launch(query, key, value, mask, scale)
