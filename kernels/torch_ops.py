"""Pure-torch LoRA shrink/expand: the CPU path and the references the Triton kernels are checked against.

Both functions work on the normalised sliced layout used inside the package
(x [T, H_in], a [S, L, R, H_in], t [S, T, R] fp32; y [T, *], b a list of S
[L, H_out_s, R]) and honour the same contract as the kernels: fp32 math,
t in fp32, y rounded once, rows without an adapter never written (rows with
one are written back whole; columns outside the slices keep their bits).

Three strategies:
  * "segmented" (backend "torch"): tokens grouped by adapter via the mapping;
    each adapter matrix is read once. When segments are many and of similar
    length (decode with many adapters) they are padded to one [segments, len, H]
    batch and done in a single bmm; otherwise (long prefill runs) one fp32 GEMM
    per segment. Per-segment launches cost ~0.1 ms each on CPU, which dominated
    steps that mix a dozen adapters.
  * `apply_slot_major` (AdapterPool.apply on backend "torch"): shrink and expand
    fused over the pool's slot-major layout, by one of several exact plans
    (`candidate_plans`): segments batched as strided views of the pool (a run
    of slots), or one index_select of the active slots, or of each token's
    slot, or one GEMM per segment on views, or a step cut in two (the short
    segments batched, the long ones one GEMM each). Which is fastest depends on
    the CPU and the shapes: the caller measures them (kernels/plan_tuner.py)
    and passes its choice. The scale multiplies the [tokens, R] intermediate;
    columns past the batch's largest true rank are skipped. No per-call
    checks: the pool resolved them at construction.
  * "gather" (gather + bmm): every token gathers its own adapter matrix and
    does a batched mat-vec. The textbook baseline; memory grows with
    T * R * H, so it runs in token chunks of at most _GATHER_CHUNK_BYTES.
"""

from __future__ import annotations

import torch

from .mapping import LoRAMapping, restrict_mapping, slot_grid, token_slots

# Bound on the gathered fp32 weights the gather path materialises at once.
_GATHER_CHUNK_BYTES = 256 << 20


# Pad segments into one bmm when the padding at most doubles the work (and there is more than one); the same
# bound picks the short segments of a length split.
_MAX_PAD_RATIO = 2.0
# A padded grid of apply_slot_major with more cells per token than this is not a candidate plan: its cost, and
# the time to tune it, grow with the padding (a 512-token prefill beside decode tokens would pad every row to
# 512). Below it, padding may still pay for reading the weights as views instead of copying them: timing decides.
_MAX_CANDIDATE_PAD = 8.0


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
        # One index_select per call (advanced indexing is several times slower on CPU).
        w = a.index_select(1, slots).transpose(0, 1).reshape(len(m.active_slots), S * R, H).float()
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
            cols.copy_(cols.float().addmm_(t[s].float() * scale[s, slot], b[slot].float().T))
        return
    tok = m.sorted_tokens.long()
    ts = t.index_select(1, tok).float()
    rows = y.index_select(0, tok)
    padded = _padded(m)
    if padded is not None:
        pad_rows, real, slots = padded
        tp = torch.cat([ts, ts.new_zeros(ts.shape[0], 1, ts.shape[2])], dim=1)[:, pad_rows]  # [S, seg, len, R]
        # Scale the small rank-sized intermediate, not B.
        tp *= scale[:, slots][:, :, None, None]
    for s, (b, off) in enumerate(zip(bs, offsets)):
        acc = rows[:, off:off + b.shape[1]].float()
        if padded is not None:
            acc += torch.bmm(tp[s], b.index_select(0, slots).float().transpose(1, 2))[real]
        else:
            for slot, start, n in zip(m.active_slots, m.seg_starts, m.seg_lens):
                acc[start:start + n].addmm_(ts[s, start:start + n] * scale[s, slot], b[slot].float().T)
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


def _grids(active_slots, longest: int, num_tokens: int, max_pad: float = _MAX_CANDIDATE_PAD) -> list[str]:
    """The padded grids that batch these segments with at most `max_pad` cells per token."""
    if len(active_slots) < 2:
        return []
    span = active_slots[-1] - active_slots[0] + 1
    return [name for name, rows in (("span", span), ("active", len(active_slots)))
            if rows * longest <= max_pad * num_tokens]


def shape_class(m: LoRAMapping) -> str:
    """The key a tuned plan is kept under: tokens with an adapter, segments, longest segment and the span of
    the active slots, each rounded up to a power of two."""
    span = m.active_slots[-1] - m.active_slots[0] + 1 if m.active_slots else 0
    return (f"t{round_pow2(m.sorted_tokens.shape[0])}.s{round_pow2(len(m.active_slots))}"
            f".l{round_pow2(m.max_seg_len)}.p{round_pow2(span)}")


def round_pow2(n: int) -> int:
    """n rounded up to a power of two (0 stays 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def candidate_plans(m: LoRAMapping) -> list[str]:
    """The plans apply_slot_major can run `m` with, the untuned default first; empty when the whole batch is
    on one adapter (one GEMM, nothing to choose). Plans: "span" / "active" (a padded grid, weights as views or
    gathered), "token" (every token gathers its own adapter's weights: a grid of one-cell rows), "segment"
    (one GEMM per segment on views), and "split+<grid>" (the short segments batched in <grid>, the long ones
    one GEMM each: `length_split`). The untuned order: a grid padded at most _MAX_PAD_RATIO, a split, one GEMM
    per segment, per-token rows, then grids padded more."""
    if _one_adapter_for_all(m):
        return []
    grids = _grids(m.active_slots, m.max_seg_len, m.sorted_tokens.shape[0])
    plans = _grids(m.active_slots, m.max_seg_len, m.sorted_tokens.shape[0], _MAX_PAD_RATIO)
    split = length_split(m)
    if split is not None:
        short = split[0]
        plans += [f"split+{g}" for g in _grids(short.active_slots, short.max_seg_len, short.sorted_tokens.shape[0])]
        plans.append("split+token")
    plans.append("segment")
    if len(m.active_slots) > 1:
        plans.append("token")
    return plans + [g for g in grids if g not in plans]


def length_split(m: LoRAMapping) -> tuple[LoRAMapping, LoRAMapping] | None:
    """`m` cut into its short segments (the most, shortest first, that still have a padded grid within
    _MAX_PAD_RATIO) and its long ones, strictly longer; None when no such cut of at least two short segments
    exists. A step where one sequence prefills beside many decoding ones has no grid as a whole (the long
    segment would pad every row): the split batches the short ones and runs the long ones one GEMM each.
    Cached on the mapping: every layer of the step reuses it."""
    cache = m.__dict__
    if "_length_split" not in cache:
        by_len = sorted(zip(m.seg_lens, m.active_slots))
        parts, tokens = None, 0
        for k, (n, _) in enumerate(by_len, 1):
            tokens += n
            short = sorted(s for _, s in by_len[:k])
            if 2 <= k < len(by_len) and n < by_len[k][0] and _grids(short, n, tokens, _MAX_PAD_RATIO):
                parts = (short, sorted(s for _, s in by_len[k:]))
        cache["_length_split"] = None if parts is None else tuple(restrict_mapping(m, tuple(p)) for p in parts)
    return cache["_length_split"]


def apply_slot_major(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bs, scale: torch.Tensor,
                     offsets, m: LoRAMapping, rank: int, slot_ranks=None, plan: str | None = None) -> None:
    """y[tok, off_s:off_s+H_s] += B_s[slot] (scale[slot, s] * A_s[slot] x[tok]), shrink and expand in one go.

    The adapter pool's CPU layout, read without weight copies: a [L, R, S, H_in] slot-major, rank-major
    (a[slot, :r] is one contiguous [r*S, H_in] matrix for every r), bs S tensors [L, H_out_s, R], scale
    [L, S] fp32, `rank` the largest true rank among the batch's slots (columns past it are zero padding
    and are skipped; with `slot_ranks`, each slot's own true rank, a segment done on its own runs at
    its slot's rank). `plan`, one of `candidate_plans(m)` (default: the first), says how segments are
    run: batched as views of the pool ("span"), one index_select of the active slots ("active") or of each
    token's slot ("token"), one GEMM each on views ("segment"), or a `length_split` ("split+<grid>"); every
    plan gives the same result to fp32 rounding, and which is fastest depends on the machine and the shapes
    (kernels/plan_tuner.py measures it). The scale multiplies the rank-sized intermediate, and y's rows are
    updated with one index_add_ (fp32) or one read-add-write (fp16/bf16, rounded once). Rows without an
    adapter are untouched.
    """
    S, H = a.shape[2:]
    r = rank
    widths = [b.shape[1] for b in bs]
    if m.sorted_tokens.shape[0] == 0 or r == 0:
        return
    if len(m.seg_lens) == 1 and m.seg_lens[0] == m.num_tokens:
        slot = m.active_slots[0]
        t = (x.float() @ a[slot, :r].view(r * S, H).float().T).view(-1, r, S).mul_(scale[slot])
        rows = y.float()
        for s, (b, off, w) in enumerate(zip(bs, offsets, widths)):
            rows[:, off:off + w].addmm_(t[:, :, s], b[slot, :, :r].float().T)
        if rows is not y:
            y.copy_(rows)
        return
    plan = plan or candidate_plans(m)[0]
    if plan.startswith("split+"):
        short, long = length_split(m)
        apply_slot_major(x, y, a, bs, scale, offsets, short, rank, slot_ranks, plan.removeprefix("split+"))
        apply_slot_major(x, y, a, bs, scale, offsets, long, rank, slot_ranks, "segment")
        return
    if plan == "segment":
        tok = m.sorted_tokens.long()
        xs = x.index_select(0, tok).float()
        t = torch.empty(tok.shape[0] * r * S, dtype=torch.float32, device=x.device)
        deltas = [torch.empty((tok.shape[0], w), dtype=torch.float32, device=x.device) for w in widths]
        for slot, start, n in zip(m.active_slots, m.seg_starts, m.seg_lens):
            rs = r if slot_ranks is None else slot_ranks[slot]
            if rs == 0:  # the slot's adapter does not target these projections
                for d in deltas:
                    d[start:start + n].zero_()
                continue
            ts = t[start * r * S:(start + n) * r * S][:n * rs * S].view(n, rs, S)
            torch.mm(xs[start:start + n], a[slot, :rs].view(rs * S, H).float().T, out=ts.view(n, rs * S))
            ts.mul_(scale[slot])
            for s, b in enumerate(bs):
                torch.mm(ts[:, :, s], b[slot, :, :rs].float().T, out=deltas[s][start:start + n])
        real_tok = tok
    else:
        cell_tok, real_cells, real_tok, lo = slot_grid(m, plan)
        longest = 1 if plan == "token" else m.max_seg_len
        if plan == "span":
            n_rows = m.active_slots[-1] - lo + 1
            sel = slice(lo, lo + n_rows)
            w = a[sel, :r]
            sc = scale[sel]
            bsel = [b[sel, :, :r] for b in bs]
        else:
            n_rows = len(m.active_slots) if plan == "active" else m.sorted_tokens.shape[0]
            slots = m.segment_grid[2] if plan == "active" else token_slots(m)
            w = a[:, :r].index_select(0, slots)
            sc = scale.index_select(0, slots)
            bsel = [b[:, :, :r].index_select(0, slots) for b in bs]
        xp = x.index_select(0, cell_tok).float().view(n_rows, longest, H)
        t = torch.bmm(xp, w.reshape(n_rows, r * S, H).float().transpose(1, 2)).view(n_rows, longest, r, S)
        # Scale the small intermediate and lay it out slice-major in the same op: contiguous [rows, longest,
        # r] operands per slice (a strided one costs bmm a copy per batch entry).
        ts = torch.empty((S, n_rows, longest, r), dtype=torch.float32, device=x.device)
        torch.mul(t.permute(3, 0, 1, 2), sc.T[:, :, None, None], out=ts)
        deltas = []
        for s, b in enumerate(bsel):
            d = torch.bmm(ts[s], b.float().transpose(1, 2)).view(n_rows * longest, -1)
            deltas.append(d if real_cells is None else d.index_select(0, real_cells))
    _add_rows(y, real_tok, deltas, offsets, widths)


def _add_rows(y: torch.Tensor, tok: torch.Tensor, deltas, offsets, widths) -> None:
    """y[tok, off_s:off_s+w_s] += deltas[s], each y element rounded once."""
    covers = list(offsets) == [sum(widths[:i]) for i in range(len(widths))] and sum(widths) == y.shape[1]
    if y.dtype == torch.float32 and covers:
        # One index_add_ of whole rows (per-slice index_add_ into column views is ~3x slower).
        y.index_add_(0, tok, deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=1))
        return
    rows = y.index_select(0, tok).float()
    for d, off, w in zip(deltas, offsets, widths):
        rows[:, off:off + w] += d
    y.index_copy_(0, tok, rows.to(y.dtype))
