"""Triton paged attention over the KV cache in place (decode, and prefill over cached prefixes).

Imported lazily by `kernels.paged_attention` (only when the Triton path is
used), so importing `kernels` never imports triton; like `triton_ops`, the
kernel is interpreted on CPU tensors when TRITON_INTERPRET=1 is set before
this module is imported.

Layout read in place (scheduler/kv_cache.py): one layer's K and V are
[num_slots, Hkv, D] with any strides; token position p of a sequence lives
in slot block_tables[b, p // block_size] * block_size + p % block_size.
Only block-table entries below cdiv(context_len, block_size) are read and
only positions below context_len are loaded, so padding entries (the null
row, or anything else) are never touched.

Work decomposition: one program per (sequence, KV head, tile of BLOCK_Q
queries). Its rows are the BLOCK_Q queries x BLOCK_G query heads that share
that KV head (GQA), so every K/V tile is read once per group, not once per
query head. The program walks the context in tiles of BLOCK_N positions
(several cache blocks when block_size < BLOCK_N: block ids are gathered per
position), with an online softmax in fp32 (running max, running sum, exp2
with the scale folded into log2 e) and an fp32 accumulator. Query i of a
chunk of q_len tokens sits at position context_len - q_len + i and sees
positions <= its own (cached prefix + causal within the chunk); decode is
the q_len = 1 case. No split over the context (flash-decoding): B x Hkv
programs fill an H200 at serving batch sizes; a long-context, small-batch
split is the next step if the bench shows idle SMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from lorabus.kernels.triton_ops import check_device

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_LOG2E = 1.4426950408889634


@triton.jit
def _paged_attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, ctx_ptr, cuq_ptr,
    qk_scale, G, D, block_size, max_q_tiles,
    sqt, sqh, sqd, sks, skh, skd, svs, svh, svd, sot, soh, sod, sbt_b, sbt_n,
    BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    qt = pid % max_q_tiles
    pid = pid // max_q_tiles
    h = tl.program_id(1)
    b = pid

    q_start = tl.load(cuq_ptr + b)
    q_len = tl.load(cuq_ptr + b + 1) - q_start
    if qt * BLOCK_Q >= q_len:
        return
    ctx = tl.load(ctx_ptr + b)

    BLOCK_R: tl.constexpr = BLOCK_Q * BLOCK_G
    rows = tl.arange(0, BLOCK_R)
    qi = qt * BLOCK_Q + rows // BLOCK_G          # query index inside the chunk
    g = rows % BLOCK_G
    r_mask = (qi < q_len) & (g < G)
    q_pos = ctx - q_len + qi                      # absolute position of each row's query
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D

    tok = (q_start + qi).to(tl.int64)
    head = (h * G + g).to(tl.int64)
    q_ptrs = q_ptr + tok[:, None] * sqt + head[:, None] * sqh + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=r_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full((BLOCK_R,), -1.0e30, dtype=tl.float32)  # finite: a row with no keys stays NaN-free
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)

    # Keys this tile can see: up to the last valid query's position (causal), at most ctx.
    last_q = tl.minimum(qt * BLOCK_Q + BLOCK_Q, q_len)
    n_end = tl.minimum(ctx, ctx - q_len + last_q)
    offs_n0 = tl.arange(0, BLOCK_N)
    k_base = k_ptr + h.to(tl.int64) * skh
    v_base = v_ptr + h.to(tl.int64) * svh
    bt_row = bt_ptr + b.to(tl.int64) * sbt_b
    for start in range(0, n_end, BLOCK_N):
        offs_n = start + offs_n0
        n_mask = offs_n < n_end
        blk = tl.load(bt_row + (offs_n // block_size) * sbt_n, mask=n_mask, other=0).to(tl.int64)
        slot = blk * block_size + (offs_n % block_size)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + slot[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + slot[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask, other=0.0)

        s = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * qk_scale
        visible = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = o_ptr + tok[:, None] * sot + head[:, None] * soh + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])


INTERPRETED = isinstance(_paged_attn_kernel, InterpretedFunction)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _dot_dtype(dtype: torch.dtype):
    # The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton
    # #11584): widen bf16 there (exact for K, V and q; p rounds to fp32, not bf16).
    if INTERPRETED and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPE[dtype]


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_q_len: int,
                    scale: float, block_size: int, out: torch.Tensor) -> torch.Tensor:
    """out[T, Hq, D] = attention of q[T, Hq, D] (sequences packed by cu_seqlens_q) over the paged cache."""
    check_device(q)
    T, Hq, D = q.shape
    B = block_tables.shape[0]
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    if T == 0 or B == 0:
        return out
    block_q = 1 if max_q_len == 1 else min(16, _next_pow2(max_q_len))
    # tl.dot wants >= 16 rows: decode pads the head group, it costs no memory traffic.
    block_g = max(_next_pow2(G), 16 // block_q)
    block_n = 64 if q.device.type == "cuda" else max(16, min(32, _next_pow2(block_size)))
    max_q_tiles = triton.cdiv(max_q_len, block_q)
    grid = (B * max_q_tiles, Hkv)
    _paged_attn_kernel[grid](
        q, k_cache, v_cache, out, block_tables, context_lens, cu_seqlens_q,
        scale * _LOG2E, G, D, block_size, max_q_tiles,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *block_tables.stride(),
        BLOCK_Q=block_q, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=max(16, _next_pow2(D)),
        DOT_DTYPE=_dot_dtype(q.dtype), PRECISION="ieee",
    )
    return out
