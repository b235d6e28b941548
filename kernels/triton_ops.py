"""Triton SGMV-style LoRA shrink and expand kernels and their launchers.

Imported lazily (only when the Triton backend is used), so importing
`kernels` never imports triton. Triton decides whether a kernel is
interpreted when it is defined, i.e. when this module is imported: with
TRITON_INTERPRET=1 in the environment at that moment the kernels run on CPU
tensors through Triton's interpreter.

Work decomposition (both kernels, 1-D grid):
  The mapping groups tokens by adapter slot and cuts each group ("segment")
  into tiles of at most BLOCK_M tokens; `mapping.tiles` lists them exactly.
  The grid is  num_tiles x S x N_TILES (x SPLIT_K for shrink), flattened with
  the token tile outermost:
    * one token tile belongs to one adapter, so the program reads that
      adapter's A/B tile once for up to BLOCK_M tokens (the SGMV idea: a
      prefill run of 4k tokens reads each weight tile once per 64 tokens,
      not per token; a decode batch with a distinct adapter per token degrades
      gracefully to one token per tile, i.e. S-LoRA's per-token gather);
    * the S slices (q/k/v, gate/up) and output tiles of one token tile are
      adjacent program ids, so they run together and share the activation
      tile (x for shrink, t for expand) through L2;
    * programs never collide on an output element, except shrink's split-K
      partial sums, which are added atomically into the fp32 t.
Shrink (K = H_in large, N = R small) covers all of R in one output tile and
splits K when there are too few tiles to fill the GPU (decode). Expand
(K = R small, N = H_out large) tiles H_out and reads-adds-writes y in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .mapping import LoRAMapping

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, t_ptr, tok_ptr, tiles_ptr,
    num_tiles, R, K, n_tiles, k_per_split,
    sxm, sxk, sas, sal, sar, sak, sts, stm, str_,
    S: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = pid % SPLIT_K
    pid = pid // SPLIT_K
    pid_n = pid % n_tiles
    pid = pid // n_tiles
    s = (pid % S).to(tl.int64)  # int64: slice * stride can pass 2**31 for big pools
    tile = pid // S

    start = tl.load(tiles_ptr + tile)
    n_rows = tl.load(tiles_ptr + num_tiles + tile)
    slot = tl.load(tiles_ptr + 2 * num_tiles + tile).to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_rows
    # int64 rows: token * stride can pass 2**31 for long prefills.
    rows = tl.load(tok_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < R
    offs_k = pid_k * k_per_split + tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + rows[:, None] * sxm + offs_k[None, :] * sxk
    a_ptrs = a_ptr + s * sas + slot * sal + offs_n[None, :] * sar + offs_k[:, None] * sak
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, k_per_split, BLOCK_K):
        k_mask = offs_k < K
        xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(xt.to(DOT_DTYPE), at.to(DOT_DTYPE), input_precision=PRECISION)
        x_ptrs += BLOCK_K * sxk
        a_ptrs += BLOCK_K * sak
        offs_k += BLOCK_K

    t_ptrs = t_ptr + s * sts + rows[:, None] * stm + offs_n[None, :] * str_
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(t_ptrs, acc, mask=out_mask)
    else:
        tl.atomic_add(t_ptrs, acc, mask=out_mask)


@triton.jit
def _expand_kernel(
    y_ptr, t_ptr, meta_ptr, scale_ptr, tok_ptr, tiles_ptr,
    num_tiles, R, n_tiles, num_slots,
    sym, syn, sts, stm, str_,
    S: tl.constexpr, B_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = pid % n_tiles
    pid = pid // n_tiles
    s = (pid % S).to(tl.int64)
    tile = pid // S

    # Per-slice row of the meta table: B pointer, H_out, column offset in y, strides.
    meta = meta_ptr + s * 6
    h_out = tl.load(meta + 1)
    # n_tiles is sized for the widest slice; narrower slices (GQA k/v) stop here.
    if pid_n * BLOCK_N >= h_out:
        return
    b_ptr = tl.load(meta).to(tl.pointer_type(B_DTYPE))
    col0 = tl.load(meta + 2)
    sbl = tl.load(meta + 3)
    sbn = tl.load(meta + 4)
    sbk = tl.load(meta + 5)

    start = tl.load(tiles_ptr + tile)
    n_rows = tl.load(tiles_ptr + num_tiles + tile)
    slot = tl.load(tiles_ptr + 2 * num_tiles + tile).to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_rows
    rows = tl.load(tok_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < h_out
    offs_k = tl.arange(0, BLOCK_K)

    t_ptrs = t_ptr + s * sts + rows[:, None] * stm + offs_k[None, :] * str_
    b_ptrs = b_ptr + slot * sbl + offs_n[None, :] * sbn + offs_k[:, None] * sbk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, R, BLOCK_K):
        k_mask = offs_k < R - k
        tt = tl.load(t_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        bt = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        # t stays fp32 (no rounding of the shrink result); B is widened to
        # fp32, which a 3-pass tf32 dot multiplies exactly for fp16/bf16 B.
        acc += tl.dot(tt.to(tl.float32), bt.to(tl.float32), input_precision=PRECISION)
        t_ptrs += BLOCK_K * str_
        b_ptrs += BLOCK_K * sbk

    scale = tl.load(scale_ptr + s * num_slots + slot)
    y_ptrs = y_ptr + rows[:, None] * sym + (col0 + offs_n)[None, :] * syn
    out_mask = m_mask[:, None] & n_mask[None, :]
    yv = tl.load(y_ptrs, mask=out_mask)
    tl.store(y_ptrs, (yv.to(tl.float32) + scale * acc).to(y_ptr.dtype.element_ty), mask=out_mask)


INTERPRETED = isinstance(_shrink_kernel, InterpretedFunction)


def check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda" and t.device.index != torch.cuda.current_device():
        # Triton launches on the current device, not the tensors' one.
        raise RuntimeError(f"tensors are on {t.device} but the current CUDA device is "
                           f"{torch.cuda.current_device()}: use torch.cuda.set_device / torch.cuda.device")
    if t.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"backend='triton' on a {t.device.type} tensor needs Triton's interpreter: set "
            "TRITON_INTERPRET=1 in the environment before the first backend='triton' call "
            "(it imports kernels.triton_ops, whose kernels triton then interprets), or use backend='torch'")


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _target_programs(device: torch.device) -> int:
    # Enough programs to give every SM a couple; the interpreter has no SMs,
    # a small target there still exercises the split-K path in tests.
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _expand_precision(dtype: torch.dtype, device: torch.device) -> str:
    # fp32 callers get IEEE fp32. For fp16/bf16, "tf32x3" (NVIDIA only) is
    # exact for the widened B operand and ~fp32-accurate for t, at tensor-core speed.
    if dtype != torch.float32 and device.type == "cuda" and torch.version.hip is None:
        return "tf32x3"
    return "ieee"


def _dot_dtype(dtype: torch.dtype):
    # The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton
    # #11584), so widen bf16 there; bf16 -> fp32 is exact, the products too.
    if INTERPRETED and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPE[dtype]


def shrink(x: torch.Tensor, a: torch.Tensor, m: LoRAMapping, t: torch.Tensor) -> None:
    """t [S, T, R] fp32, pre-zeroed; x [T, H_in]; a [S, L, R, H_in]."""
    check_device(x)
    S, _, R, K = a.shape
    bm = m.block_m
    bn = min(128, max(16, _next_pow2(R)))
    bk = 64
    n_tiles = triton.cdiv(R, bn)
    k_tiles = triton.cdiv(K, bk)
    programs = m.num_tiles * S * n_tiles
    split = max(1, min(k_tiles, _target_programs(x.device) // programs))
    tiles_per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, tiles_per_split)  # drop splits that would get no K
    grid = (programs * split,)
    _shrink_kernel[grid](
        x, a, t, m.sorted_tokens, m.tiles,
        m.num_tiles, R, K, n_tiles, tiles_per_split * bk,
        x.stride(0), x.stride(1), *a.stride(), *t.stride(),
        S=S, SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        DOT_DTYPE=_dot_dtype(x.dtype), PRECISION="ieee",
    )


_META_CACHE: dict[tuple, torch.Tensor] = {}


def _meta_table(bs, offsets, device) -> torch.Tensor:
    # The table is a pure function of pointers, shapes and strides, so caching
    # on them can never go stale; it saves a host->device copy per layer call.
    rows = tuple((b.data_ptr(), b.shape[1], off, *b.stride()) for b, off in zip(bs, offsets))
    key = (device, rows)
    table = _META_CACHE.get(key)
    if table is None:
        if len(_META_CACHE) > 4096:
            _META_CACHE.clear()
        table = torch.tensor(rows, dtype=torch.int64).to(device)
        _META_CACHE[key] = table
    return table


def expand(y, t, bs, scale, offsets, m: LoRAMapping) -> None:
    """y [T, *] in place; t [S, T, R]; bs S tensors [L, H_out_s, R]; scale [S, L] fp32."""
    check_device(y)
    S, _, R = t.shape
    bm = m.block_m
    bn = 64
    bk = min(64, max(16, _next_pow2(R)))
    n_tiles = triton.cdiv(max(b.shape[1] for b in bs), bn)
    grid = (m.num_tiles * S * n_tiles,)
    _expand_kernel[grid](
        y, t, _meta_table(bs, offsets, y.device), scale, m.sorted_tokens, m.tiles,
        m.num_tiles, R, n_tiles, scale.shape[1],
        y.stride(0), y.stride(1), *t.stride(),
        S=S, B_DTYPE=_TL_DTYPE[bs[0].dtype], BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        PRECISION=_expand_precision(y.dtype, y.device),
    )
