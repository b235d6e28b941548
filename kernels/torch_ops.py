"""Pure-torch LoRA shrink/expand: the CPU path and the references the Triton kernels are checked against.

Both functions work on the normalised sliced layout used inside the package
(x [T, H_in], a [S, L, R, H_in], t [S, T, R] fp32; y [T, *], b a list of S
[L, H_out_s, R]) and honour the same contract as the kernels: fp32 math,
t in fp32, y rounded once, rows without an adapter never written (rows with
one are written back whole; columns outside the slices keep their bits).

Two strategies:
  * "segmented" (backend "torch"): tokens grouped by adapter via the mapping,
    one fp32 GEMM per adapter segment; each adapter matrix is read once.
    Fast for prefill and fine for decode on CPU.
  * "gather" (gather + bmm): every token gathers its own adapter matrix and
    does a batched mat-vec. The textbook baseline; memory grows with
    T * R * H, so it runs in token chunks of at most _GATHER_CHUNK_BYTES.
"""

from __future__ import annotations

import torch

from .mapping import LoRAMapping

# Bound on the gathered fp32 weights the gather path materialises at once.
_GATHER_CHUNK_BYTES = 256 << 20


def shrink_segmented(x: torch.Tensor, a: torch.Tensor, m: LoRAMapping, t: torch.Tensor) -> None:
    """t[:, tok] = x[tok] @ a[:, slot].T for each segment; t is pre-zeroed fp32 [S, T, R]."""
    S, _, R, H = a.shape
    tok = m.sorted_tokens.long()
    xs = x.index_select(0, tok).float()
    ts = torch.empty((tok.shape[0], S * R), dtype=torch.float32, device=x.device)
    for slot, start, n in zip(m.active_slots, m.seg_starts, m.seg_lens):
        # All slices of the slot as one [S*R, H] matrix: one GEMM per segment.
        ts[start:start + n] = xs[start:start + n] @ a[:, slot].reshape(S * R, H).float().T
    t.index_copy_(1, tok, ts.view(-1, S, R).transpose(0, 1))


def expand_segmented(y, t, bs, scale, offsets, m: LoRAMapping) -> None:
    """y[tok, off_s:off_s+H_s] += scale[s, slot] * t[s, tok] @ b_s[slot].T, one rounding per element."""
    tok = m.sorted_tokens.long()
    ts = t.index_select(1, tok).float()
    rows = y.index_select(0, tok)
    for s, (b, off) in enumerate(zip(bs, offsets)):
        acc = rows[:, off:off + b.shape[1]].float()
        for slot, start, n in zip(m.active_slots, m.seg_starts, m.seg_lens):
            # Scaling the small [H_out, R] matrix, not the [n, H_out] product.
            acc[start:start + n].addmm_(ts[s, start:start + n], (b[slot].float() * scale[s, slot]).T)
        rows[:, off:off + b.shape[1]] = acc
    # Columns outside the slices go back bit-for-bit as they were read.
    y.index_copy_(0, tok, rows)


def shrink_gather(x: torch.Tensor, a: torch.Tensor, m: LoRAMapping, t: torch.Tensor) -> None:
    """Per-token gather of A[slot] then batched mat-vec, in bounded token chunks."""
    tok = m.sorted_tokens.long()
    slots = m.idx.index_select(0, tok).long()
    for c in _chunks(tok.shape[0], a.shape[0] * a.shape[2] * a.shape[3] * 4):
        w = a[:, slots[c]].float()  # [S, n, R, H_in]
        xc = x.index_select(0, tok[c]).float()
        t[:, tok[c]] = (w @ xc[None, :, :, None]).squeeze(-1)


def expand_gather(y, t, bs, scale, offsets, m: LoRAMapping) -> None:
    """Per-token gather of B[slot] then batched mat-vec, in bounded token chunks."""
    tok = m.sorted_tokens.long()
    slots = m.idx.index_select(0, tok).long()
    widest = max(b.shape[1] for b in bs)
    for c in _chunks(tok.shape[0], widest * t.shape[2] * 4):
        tc = t[:, tok[c]].float()
        rows = y.index_select(0, tok[c])
        for s, (b, off) in enumerate(zip(bs, offsets)):
            w = b[slots[c]].float()  # [n, H_out_s, R]
            delta = (w @ tc[s, :, :, None]).squeeze(-1) * scale[s, slots[c], None]
            rows[:, off:off + b.shape[1]] = rows[:, off:off + b.shape[1]].float() + delta
        y.index_copy_(0, tok[c], rows)


def _chunks(n: int, bytes_per_token: int):
    step = max(1, _GATHER_CHUNK_BYTES // max(1, bytes_per_token))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]
