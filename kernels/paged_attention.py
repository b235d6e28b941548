"""Paged attention over the KV cache: decode (one query per sequence) and prefill over cached prefixes.

The cache is read where it lies (scheduler/kv_cache.py layout): one layer's
K and V are [num_slots, Hkv, D] (e.g. `PagedKVCache.k[layer]`); position p
of sequence b is slot block_tables[b, p // block_size] * block_size +
p % block_size. A 4-D [num_blocks, block_size, Hkv, D] cache is accepted
too (block_size is then its dim 1). Entries of block_tables at or past
cdiv(context_lens[b], block_size) are padding and never read, whatever they
hold (the engine pads with its null block).

GQA: query head i uses KV head i // G, G = Hq // Hkv (the `repeat_kv` /
SDPA enable_gqa convention).

Backends: "triton" (kernels/paged_attention_triton.py; CUDA, or CPU under
TRITON_INTERPRET=1), "torch" (the reference: block-level index_select of the
sequence's blocks + SDPA in fp32, one call per sequence), "auto" = triton on
CUDA tensors, torch elsewhere. Triton is imported only when used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import resolve_backend

BACKENDS = ("auto", "triton", "torch")


def _block_size(k_cache: torch.Tensor, block_size: int | None) -> int:
    if k_cache.dim() == 4:
        if block_size not in (None, k_cache.shape[1]):
            raise ValueError(f"block_size={block_size} but the 4-D cache has blocks of {k_cache.shape[1]}")
        return k_cache.shape[1]
    if block_size is None or block_size < 1:
        raise ValueError("a [num_slots, Hkv, D] cache needs block_size=")
    return block_size


def _flat(cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, Hkv, D] -> [num_slots, Hkv, D] (a view when the cache is contiguous across blocks)."""
    return cache.flatten(0, 1) if cache.dim() == 4 else cache


def _check(q, k_cache, v_cache, block_tables, context_lens, out, T):
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, Hq, D], got {tuple(q.shape)}")
    if k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache must be equal [num_slots, Hkv, D], got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    _, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    if k_cache.shape[2] != D or Hq % Hkv:
        raise ValueError(f"q heads {Hq} x {D} do not fit a cache of {Hkv} heads x {k_cache.shape[2]}")
    if q.dtype != k_cache.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"dtypes differ: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    if block_tables.dim() != 2 or block_tables.dtype not in (torch.int32, torch.int64):
        raise ValueError("block_tables must be a 2-D int32/int64 tensor [B, max_blocks]")
    if context_lens.shape != (block_tables.shape[0],):
        raise ValueError(f"context_lens must be [B={block_tables.shape[0]}], got {tuple(context_lens.shape)}")
    if out is not None and (out.shape != (T, Hq, D) or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must be a {q.dtype} tensor of shape {(T, Hq, D)} on {q.device}")


def resolve_attention_backend(backend: str, device: torch.device) -> str:
    """The backend `backend` means on `device`: auto is triton on CUDA, torch elsewhere."""
    return resolve_backend(backend, device, BACKENDS, "attention backend")


def _use_triton(backend: str, q: torch.Tensor) -> bool:
    return resolve_attention_backend(backend, q.device) == "triton"


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, *, block_size: int | None = None,
                           backend: str = "auto") -> torch.Tensor:
    """out[b, i] = softmax(scale * q[b, i] . K_b^T) V_b over sequence b's first context_lens[b] positions.

    q [B, Hq, D]; k_cache, v_cache [num_slots, Hkv, D] (block_size= required) or
    [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32;
    context_lens [B] int32 (the new token's K/V already written, so it counts).
    A sequence with context 0 gets zeros. Returns out ([B, Hq, D], q's dtype).
    """
    bs = _block_size(k_cache, block_size)
    k_cache, v_cache = _flat(k_cache), _flat(v_cache)
    B = q.shape[0]
    _check(q, k_cache, v_cache, block_tables, context_lens, out, B)
    if block_tables.shape[0] != B:
        raise ValueError(f"q has {B} sequences but block_tables has {block_tables.shape[0]}")
    if out is None:
        out = torch.empty_like(q)
    if _use_triton(backend, q):
        from . import paged_attention_triton as pt
        cu = torch.arange(B + 1, dtype=torch.int32, device=q.device)
        return pt.paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu, 1, scale, bs, out)
    cu = torch.arange(B + 1, dtype=torch.int32)
    return _ref(q, k_cache, v_cache, block_tables, context_lens, cu, scale, bs, out)


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            scale: float, out: torch.Tensor | None = None, *, max_q_len: int | None = None,
                            block_size: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Chunked prefill over cached prefixes, many sequences in one call (varlen).

    q [T, Hq, D]: sequence b's chunk is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]
    (cu_seqlens_q [B+1] int32, starting at 0). Its K/V are already in the cache,
    so context_lens[b] = cached prefix + chunk length; chunk token i sits at
    position context_lens[b] - q_len_b + i and attends to every position up to
    its own (the prefix, causal within the chunk). max_q_len (the longest
    chunk) saves a host sync when given. Returns out [T, Hq, D].
    """
    bs = _block_size(k_cache, block_size)
    k_cache, v_cache = _flat(k_cache), _flat(v_cache)
    T = q.shape[0]
    _check(q, k_cache, v_cache, block_tables, context_lens, out, T)
    if cu_seqlens_q.shape != (block_tables.shape[0] + 1,):
        raise ValueError(f"cu_seqlens_q must be [B+1={block_tables.shape[0] + 1}], got {tuple(cu_seqlens_q.shape)}")
    if out is None:
        out = torch.empty_like(q)
    if _use_triton(backend, q):
        from . import paged_attention_triton as pt
        if max_q_len is None:
            max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if T else 0
        return pt.paged_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q,
                                  max(1, max_q_len), scale, bs, out)
    return _ref(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q.cpu(), scale, bs, out)


def paged_attention_decode_ref(q, k_cache, v_cache, block_tables, context_lens, scale, out=None, *,
                               block_size=None):
    """Torch reference / CPU path of `paged_attention_decode` (same arguments)."""
    return paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale, out,
                                  block_size=block_size, backend="torch")


def paged_attention_prefill_ref(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale, out=None, *,
                                block_size=None):
    """Torch reference / CPU path of `paged_attention_prefill` (same arguments)."""
    return paged_attention_prefill(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, scale, out,
                                   block_size=block_size, backend="torch")


def _ref(q, k_cache, v_cache, block_tables, context_lens, cu, scale, bs, out):
    """Per sequence: index_select its blocks (block-level, no per-token indexing), SDPA in fp32."""
    Hkv = k_cache.shape[1]
    D = k_cache.shape[2]
    kb = k_cache[: k_cache.shape[0] // bs * bs].view(-1, bs, Hkv, D)  # whole blocks (drops the null row)
    vb = v_cache[: v_cache.shape[0] // bs * bs].view(-1, bs, Hkv, D)
    ctxs, starts = context_lens.tolist(), cu.tolist()
    for b, ctx in enumerate(ctxs):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        if ctx == 0:
            out[s:e].zero_()
            continue
        ids = block_tables[b, : -(-ctx // bs)].to(device=k_cache.device, dtype=torch.long)
        k = kb.index_select(0, ids).flatten(0, 1)[:ctx].transpose(0, 1).float()   # [Hkv, ctx, D]
        v = vb.index_select(0, ids).flatten(0, 1)[:ctx].transpose(0, 1).float()
        qs = q[s:e].transpose(0, 1).float()                                         # [Hq, n, D]
        n = e - s
        # Row i sits at position ctx - n + i: sees keys <= that (bottom-right-aligned causal).
        mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n) if n > 1 else None
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[s:e] = o.transpose(0, 1).to(out.dtype)
    return out
