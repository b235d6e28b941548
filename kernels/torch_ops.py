"""Pure-torch LoRA shrink/expand: the CPU path and the references the Triton kernels are checked against.

Both functions work on the normalised sliced layout used inside the package
(x [T, H_in], a [S, L, R, H_in], t [S, T, R] fp32; y [T, *], b a list of S
[L, H_out_s, R]) and honour the same contract as the kernels: fp32 math,
t in fp32, y rounded once, rows without an adapter never written (rows with
one are written back whole; columns outside the slices keep their bits).

Two strategies:
  * "segmented" (backend "torch"): tokens grouped by adapter via the mapping;
    each adapter matrix is read once. When segments are many and of similar
    length (decode with many adapters) they are padded to one [segments, len, H]
    batch and done in a single bmm; otherwise (long prefill runs) one fp32 GEMM
    per segment. Per-segment launches cost ~0.1 ms each on CPU, which dominated
    steps that mix a dozen adapters.
  * "gather" (gather + bmm): every token gathers its own adapter matrix and
    does a batched mat-vec. The textbook baseline; memory grows with
    T * R * H, so it runs in token chunks of at most _GATHER_CHUNK_BYTES.
"""

from __future__ import annotations

import torch

from .mapping import LoRAMapping

# Bound on the gathered fp32 weights the gather path materialises at once.
_GATHER_CHUNK_BYTES = 256 << 20


# Pad segments into one bmm when the padding at most doubles the work (and there is more than one).
_MAX_PAD_RATIO = 2.0


def _one_adapter_for_all(m: LoRAMapping) -> bool:
    return len(m.seg_lens) == 1 and m.seg_lens[0] == m.num_tokens


def _padded(m: LoRAMapping) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The mapping's padded segment grid, or None when a per-segment loop is the better plan."""
    num_segments, longest = len(m.active_slots), m.max_seg_len
    if num_segments < 2 or num_segments * longest > _MAX_PAD_RATIO * m.sorted_tokens.shape[0]:
        return None
    return m.segment_grid


def shrink_segmented(x: torch.Tensor, a: torch.Tensor, m: LoRAMapping, t: torch.Tensor) -> None:
    """t[:, tok] = x[tok] @ a[:, slot].T for each segment; t is pre-zeroed fp32 [S, T, R]."""
    S, _, R, H = a.shape
    if _one_adapter_for_all(m):  # the whole batch on one adapter: no gather or scatter needed
        slot = m.active_slots[0]
        t.copy_((x.float() @ a[:, slot].reshape(S * R, H).float().T).view(-1, S, R).transpose(0, 1))
        return
    tok = m.sorted_tokens.long()
    xs = x.index_select(0, tok).float()
    padded = _padded(m)
    if padded is not None:
        rows, real, slots = padded
        w = a[:, slots].transpose(0, 1).reshape(len(m.active_slots), S * R, H).float()
        xp = torch.cat([xs, xs.new_zeros(1, H)])[rows]  # [segments, longest, H]
        ts = torch.bmm(xp, w.transpose(1, 2))[real]
    else:
        ts = torch.empty((tok.shape[0], S * R), dtype=torch.float32, device=x.device)
        for slot, start, n in zip(m.active_slots, m.seg_starts, m.seg_lens):
            # All slices of the slot as one [S*R, H] matrix: one GEMM per segment.
            ts[start:start + n] = xs[start:start + n] @ a[:, slot].reshape(S * R, H).float().T
    t.index_copy_(1, tok, ts.view(-1, S, R).transpose(0, 1))


def expand_segmented(y, t, bs, scale, offsets, m: LoRAMapping) -> None:
    """y[tok, off_s:off_s+H_s] += scale[s, slot] * t[s, tok] @ b_s[slot].T, one rounding per element."""
    if _one_adapter_for_all(m):
        slot = m.active_slots[0]
        for s, (b, off) in enumerate(zip(bs, offsets)):
            cols = y[:, off:off + b.shape[1]]
            cols.copy_(cols.float().addmm_(t[s].float(), (b[slot].float() * scale[s, slot]).T))
        return
    tok = m.sorted_tokens.long()
    ts = t.index_select(1, tok).float()
    rows = y.index_select(0, tok)
    padded = _padded(m)
    if padded is not None:
        pad_rows, real, slots = padded
        tp = torch.cat([ts, ts.new_zeros(ts.shape[0], 1, ts.shape[2])], dim=1)[:, pad_rows]  # [S, seg, len, R]
    for s, (b, off) in enumerate(zip(bs, offsets)):
        acc = rows[:, off:off + b.shape[1]].float()
        if padded is not None:
            # Scaling the small [H_out, R] matrices, not the [n, H_out] products.
            w = b[slots].float() * scale[s, slots][:, None, None]
            acc += torch.bmm(tp[s], w.transpose(1, 2))[real]
        else:
            for slot, start, n in zip(m.active_slots, m.seg_starts, m.seg_lens):
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
