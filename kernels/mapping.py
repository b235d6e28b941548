"""Token -> adapter-slot mapping, precomputed once per forward pass.

Every LoRA layer of a step sees the same tokens with the same adapters, so the
work of grouping tokens by adapter (a sort, a bincount and one host sync) is
done once here and the resulting `LoRAMapping` is handed to every
`lora_shrink` / `lora_expand` call of that step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class LoRAMapping:
    """Tokens grouped by adapter slot (SGMV "segments") plus the kernels' tile list.

    idx:           [T] int32, slot of each token, -1 = no adapter.
    num_slots:     number of device slots the ids refer to (0 <= idx < num_slots).
    sorted_tokens: [Ta] int32, indices of the Ta tokens that have an adapter,
                   grouped by slot (stable, so a prefill run stays in order).
    active_slots:  slots present in the batch, ascending; one segment each.
    seg_starts / seg_lens: each segment's span in `sorted_tokens` (host ints,
                   used by the torch path without a device sync).
    max_seg_len:   longest segment (0 when no token has an adapter).
    block_m:       token rows per Triton tile, picked from max_seg_len.
    tiles:         [3, num_tiles] int32 on idx's device: per tile of at most
                   block_m tokens of one segment, (start in sorted_tokens,
                   number of valid rows, slot). The Triton grids launch
                   exactly num_tiles token tiles, so a long prefill segment
                   gets many tiles and a decode token gets one, with no
                   empty programs.
    static:        a per-token mapping of fixed shape (`per_token_mapping`, for
                   CUDA graphs): one tile per token, whatever the batch holds;
                   the segment fields are empty and only the Triton kernels
                   read it.
    """

    idx: torch.Tensor
    num_slots: int
    sorted_tokens: torch.Tensor
    active_slots: tuple[int, ...]
    seg_starts: tuple[int, ...]
    seg_lens: tuple[int, ...]
    max_seg_len: int
    block_m: int
    tiles: torch.Tensor
    static: bool = False

    @property
    def num_tokens(self) -> int:
        return self.idx.shape[0]

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[1]

    @cached_property
    def segment_grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The segments padded to a [segments, longest] grid, for the torch path's single bmm: (position of
        each cell in sorted order, Ta for padding; mask of real cells; the active slots as a tensor).
        Cached, so every layer of a step reuses it."""
        device = self.sorted_tokens.device
        starts = torch.tensor(self.seg_starts, device=device)[:, None]
        lens = torch.tensor(self.seg_lens, device=device)[:, None]
        offset = torch.arange(self.max_seg_len, device=device)[None, :]
        real = offset < lens
        rows = torch.where(real, starts + offset, self.sorted_tokens.shape[0])
        return rows, real, torch.tensor(self.active_slots, device=device)

    @property
    def has_lora(self) -> bool:
        """False when no token uses an adapter: shrink returns zeros, expand does nothing."""
        return bool(self.active_slots)


def _pick_block_m(max_seg_len: int) -> int:
    # tl.dot needs >= 16 rows. Decode segments are 1..few tokens, so a 16-row
    # tile wastes least; long prefill runs amortise each A/B tile over 64 rows.
    for bm in (16, 32):
        if max_seg_len <= bm:
            return bm
    return 64


def _tiles(slots, seg_starts, seg_lens, block_m: int, device: torch.device) -> torch.Tensor:
    """[3, num_tiles] int32: each segment cut into tiles of at most block_m tokens (start, rows, slot)."""
    tile_rows = [[], [], []]
    for slot, start, n in zip(slots, seg_starts, seg_lens):
        for r in range(0, n, block_m):
            tile_rows[0].append(start + r)
            tile_rows[1].append(min(block_m, n - r))
            tile_rows[2].append(slot)
    return torch.tensor(tile_rows, dtype=torch.int32).reshape(3, -1).to(device)


def make_lora_mapping(idx: torch.Tensor, num_slots: int) -> LoRAMapping:
    """Group tokens by adapter slot. Call once per forward pass.

    It syncs with the host once (segment sizes) and copies the small tile
    list to idx's device.
    """
    if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"idx must be a 1-D integer tensor, got {tuple(idx.shape)} {idx.dtype}")
    if num_slots < 0:
        raise ValueError(f"num_slots must be >= 0, got {num_slots}")
    device = idx.device
    idx = idx.to(torch.int32)
    # counts[0] counts the -1 tokens, counts[s + 1] slot s. bincount's length
    # reveals ids >= num_slots and the appended minimum ids < -1: one sync.
    num_tokens = idx.shape[0]
    shifted = (idx.to(torch.int64) + 1).clamp_(min=0)
    stats = torch.bincount(shifted, minlength=num_slots + 1)
    if num_tokens:
        stats = torch.cat([stats, idx.min().to(torch.int64).view(1)])
    stats = stats.tolist()
    counts, low = (stats[:-1], stats[-1]) if num_tokens else (stats, -1)
    if low < -1:
        raise ValueError(f"slot ids must be >= -1, got {low}")
    if len(counts) > num_slots + 1:
        raise ValueError(f"slot id {len(counts) - 2} out of range for num_slots={num_slots}")

    active = tuple(s for s in range(num_slots) if counts[s + 1])
    seg_lens = tuple(counts[s + 1] for s in active)
    seg_starts, pos = [], 0
    for n in seg_lens:
        seg_starts.append(pos)
        pos += n
    max_seg_len = max(seg_lens, default=0)
    block_m = _pick_block_m(max_seg_len)

    # A stable sort puts the -1 tokens first (dropped) and keeps each
    # adapter's tokens in their original order.
    order = torch.sort(idx, stable=True).indices[counts[0]:].to(torch.int32)

    tiles = _tiles(active, seg_starts, seg_lens, block_m, device)

    return LoRAMapping(
        idx=idx,
        num_slots=num_slots,
        sorted_tokens=order,
        active_slots=active,
        seg_starts=tuple(seg_starts),
        seg_lens=seg_lens,
        max_seg_len=max_seg_len,
        block_m=block_m,
        tiles=tiles,
    )


def token_slots(m: LoRAMapping) -> torch.Tensor:
    """The slot of each token in sorted order (int64, on the mapping's device), cached on the mapping."""
    cache = m.__dict__
    if "_token_slots" not in cache:
        device = m.sorted_tokens.device
        cache["_token_slots"] = torch.repeat_interleave(torch.tensor(m.active_slots, device=device),
                                                        torch.tensor(m.seg_lens, device=device))
    return cache["_token_slots"]


def slot_grid(m: LoRAMapping, plan: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
    """The torch path's padded [slots, longest] grid of sorted tokens, cached on the mapping per plan.

    plan "span": one grid row per slot in active_slots[0]..active_slots[-1] (the weights are then a view of
    the slot-major pool, no gather); plan "active": one row per active slot (weights via one index_select);
    plan "token": one row of one cell per token (its weights gathered per token, see `token_slots`).
    Returns (token of each cell, flattened [rows * longest], padding cells point at a real token and are
    dropped; flat indices of the real cells or None when every cell is real; token of each real cell in
    cell order; first slot of the grid (span) or -1).
    """
    cache = m.__dict__.setdefault("_slot_grids", {})
    if plan in cache:
        return cache[plan]
    if plan == "token":
        tok = m.sorted_tokens.long()
        cache[plan] = (tok, None, tok, -1)
        return cache[plan]
    longest = m.max_seg_len
    lo = m.active_slots[0] if plan == "span" else -1
    row_of = [s - lo for s in m.active_slots] if plan == "span" else list(range(len(m.active_slots)))
    rows = (m.active_slots[-1] - lo + 1) if plan == "span" else len(m.active_slots)
    cell_pos = [0] * (rows * longest)  # padding: position 0 in sorted order (a real token, result dropped)
    real = []
    for r, start, n in zip(row_of, m.seg_starts, m.seg_lens):
        base = r * longest
        cell_pos[base:base + n] = range(start, start + n)
        real.extend(range(base, base + n))
    device = m.sorted_tokens.device
    tok = m.sorted_tokens.long()
    cell_tok = tok.index_select(0, torch.tensor(cell_pos, dtype=torch.long, device=device))
    all_real = len(real) == rows * longest
    real_t = None if all_real else torch.tensor(real, dtype=torch.long, device=device)
    real_tok = cell_tok if all_real else cell_tok.index_select(0, real_t)
    cache[plan] = (cell_tok, real_t, real_tok, lo)
    return cache[plan]


def per_token_mapping(idx: torch.Tensor, num_slots: int, tiles: torch.Tensor) -> LoRAMapping:
    """A mapping whose shapes depend only on the token count, for a step captured in a CUDA graph: token i
    is tile i (one row, or none when idx[i] is -1), so the kernels' grids are fixed and a replay reads the
    slots from `tiles` [3, T] int32, which the caller refreshes in place before each replay with
    `fill_per_token_tiles`. No host sync; the Triton kernels only (a per-token gather, S-LoRA style)."""
    if tiles.shape != (3, idx.shape[0]) or tiles.dtype != torch.int32:
        raise ValueError(f"tiles must be int32 [3, {idx.shape[0]}], got {tiles.dtype} {tuple(tiles.shape)}")
    return LoRAMapping(idx=idx, num_slots=num_slots, sorted_tokens=tiles[0], active_slots=tuple(range(num_slots)),
                       seg_starts=(), seg_lens=(), max_seg_len=1, block_m=_pick_block_m(1), tiles=tiles,
                       static=True)


def fill_per_token_tiles(idx: torch.Tensor, tiles: torch.Tensor) -> None:
    """tiles [3, T] int32 for `per_token_mapping`: (start = the token itself, rows = 1 if it has an
    adapter else 0, its slot or 0); in place, device ops only."""
    tiles[0].copy_(torch.arange(idx.shape[0], device=idx.device))
    tiles[1].copy_(idx >= 0)
    tiles[2].copy_(idx.clamp(min=0))


def restrict_mapping(m: LoRAMapping, slots: tuple[int, ...]) -> LoRAMapping:
    """`m` cut down to the tokens of `slots` (a subset of m.active_slots, ascending); the other tokens count
    as having no adapter. Built from m's segments with device ops only (no host sync)."""
    keep = [i for i, s in enumerate(m.active_slots) if s in slots]
    seg_lens = tuple(m.seg_lens[i] for i in keep)
    seg_starts = tuple(sum(seg_lens[:j]) for j in range(len(keep)))
    device = m.sorted_tokens.device
    positions = [p for i in keep for p in range(m.seg_starts[i], m.seg_starts[i] + m.seg_lens[i])]
    sorted_tokens = m.sorted_tokens.index_select(0, torch.tensor(positions, dtype=torch.long, device=device))
    kept = torch.tensor(slots, dtype=m.idx.dtype, device=device)
    idx = torch.where(torch.isin(m.idx, kept), m.idx, -1)
    max_seg_len = max(seg_lens, default=0)
    block_m = _pick_block_m(max_seg_len)
    return LoRAMapping(idx=idx, num_slots=m.num_slots, sorted_tokens=sorted_tokens, active_slots=tuple(slots),
                       seg_starts=seg_starts, seg_lens=seg_lens, max_seg_len=max_seg_len, block_m=block_m,
                       tiles=_tiles(slots, seg_starts, seg_lens, block_m, device))
