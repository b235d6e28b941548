"""Paged KV cache: fixed-size blocks in one preallocated tensor per layer, handed out to sequences.

The whole budget is allocated once at start-up; a sequence holds a list of block ids (its block
table) and returns them when it finishes, so memory is reused without per-step allocation and no
sequence is padded to another's length. Blocks holding a computed prompt prefix may be shared by the
sequences whose prompts start the same way, under the same adapter (the prefix cache: `BlockAllocator`,
docs/scheduling.md "Prefix caching").
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

import torch

ROOT = 0  # the serial a prompt's first block key chains from (cached blocks get 1, 2, ...)


class BlockAllocator:
    """KV block ids: who holds each block, and (with `prefix_cache`) which hold computed prompt prefixes.

    Pure bookkeeping, shared by the engine and the scheduler simulation. Without the prefix cache it is a
    free list. With it, a full block whose K/V a sequence computed for its prompt is published under a
    key: (the key's serial of the block before it, the adapter identity, the block's token ids). The chain
    of serials makes a key name the whole prefix up to its block, and dict equality compares the token ids
    themselves, so two prefixes never share a block by a hash collision. A published block is shared
    (reference-counted) by every later sequence whose prompt starts with the same prefix under the same
    identity; once no sequence holds it, it stays cached, and counts as free: `allocate` takes the free
    list first, then evicts cached blocks least recently released first.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = False,
                 publishable: Callable[[list[int]], bool] | None = None):
        self.num_blocks, self.block_size, self.prefix_cache = num_blocks, block_size, prefix_cache
        # The K/V check a block passes before it is published (the engine's: every value finite).
        self.publishable = publishable
        # Prompt tokens looked up (those in blocks a sequence may share) and found cached; never reset.
        self.queried_tokens = self.hit_tokens = 0
        self.reset()

    def reset(self) -> None:
        """Every block free again, the prefix cache empty (the scheduler dropped all its sequences)."""
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._refs = [0] * self.num_blocks
        self._cached: dict[tuple, tuple[int, int]] = {}  # key → (block, serial)
        self._key_of: dict[int, tuple] = {}  # cached block → its key
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks no one holds, the next to evict first
        self._serial = ROOT

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: free ones and cached ones no sequence holds."""
        return len(self._free) + len(self._idle)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, num_tokens: int) -> list[int] | None:
        need = self.blocks_for(num_tokens)
        if need > self.num_free:
            return None
        blocks = []
        for _ in range(need):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._idle.popitem(last=False)
                self._uncache(block)
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Release a sequence's blocks. Cached ones become evictable, its last blocks first: a prefix's
        tail goes before its head, which more prompts share."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._key_of:
                self._idle[block] = None
            else:
                self._free.append(block)

    # ---- the prefix cache -------------------------------------------------------------------------

    def _block_tokens(self, ids: list[int], count: int):
        """The token ids of `ids`' first `count` blocks, one tuple each."""
        bs = self.block_size
        return (tuple(ids[i * bs:(i + 1) * bs]) for i in range(count))

    def cached_prefix(self, identity: Hashable, ids: list[int], limit: int) -> list[int]:
        """The cached blocks that hold the longest prefix of `ids` under `identity`, at most `limit` blocks."""
        blocks, parent = [], ROOT
        for tokens in self._block_tokens(ids, limit):
            entry = self._cached.get((parent, identity, tokens))
            if entry is None:
                break
            block, parent = entry
            blocks.append(block)
        return blocks

    def held_only_by(self, blocks: list[int]) -> int:
        """How many of one sequence's blocks are freed when it releases them (no other sequence holds them)."""
        refs = self._refs
        return sum(refs[block] == 1 for block in blocks)

    def idle_among(self, blocks: list[int]) -> int:
        """How many of these cached blocks no sequence holds (taking them uses up free blocks)."""
        return sum(block in self._idle for block in blocks)

    def acquire(self, blocks: list[int], queried_tokens: int) -> None:
        """A sequence takes these cached blocks (its hits) after looking up `queried_tokens` of its prompt."""
        for block in blocks:
            self._refs[block] += 1
            self._idle.pop(block, None)
        self.queried_tokens += queried_tokens
        self.hit_tokens += len(blocks) * self.block_size

    def publish(self, identity: Hashable, ids: list[int], blocks: list[int]) -> None:
        """Cache `blocks`, which hold the K/V of `ids`' first full blocks under `identity`. A prefix already
        cached (another sequence published it first) keeps its block; this one's stays private."""
        if self.publishable is not None and not self.publishable(
                [b for b in blocks if b not in self._key_of]):
            return
        parent = ROOT
        for tokens, block in zip(self._block_tokens(ids, len(blocks)), blocks):
            key = (parent, identity, tokens)
            entry = self._cached.get(key)
            if entry is None:
                if block in self._key_of:  # cached under another prefix: the chain cannot go on through it
                    return
                self._serial += 1
                entry = self._cached[key] = (block, self._serial)
                self._key_of[block] = key
            parent = entry[1]

    def drop(self, stale: Callable[[Hashable], bool]) -> None:
        """Forget every cached block whose identity is `stale` (its adapter's content changed): no later
        sequence can hit it; a block no one holds is free again."""
        for block, key in list(self._key_of.items()):
            if stale(key[1]):
                self._uncache(block)
                if block in self._idle:
                    del self._idle[block]
                    self._free.append(block)

    def _uncache(self, block: int) -> None:
        del self._cached[self._key_of.pop(block)]


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        # One block past the allocatable ones is the null block: no sequence holds it, so nothing ever
        # writes it and it stays zero. Block tables are padded with it. Masked attention weights are 0,
        # but 0 times a NaN is NaN, so a padding index into real memory (another sequence's, or a freed
        # block's stale K/V) would let that memory poison every padded row; `clear` zeroes a sequence's
        # blocks when it first runs for the same reason (attention reads whole blocks, past the
        # sequence's context in its last one).
        # The block after it is the pad block: the padding rows of a decode step padded to a CUDA-graph
        # bucket (scheduler/decode_graphs.py) write their K/V there and read only that, so the null block
        # stays zero and no sequence's block is touched.
        self.num_blocks, self.block_size = num_blocks, block_size
        self.null_block, self.pad_block = num_blocks, num_blocks + 1
        shape = (num_layers, (num_blocks + 2) * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # The same memory as [layer][block, offset in block, kv head, dim], read a block at a time.
        self.k_blocks = self.k.view(num_layers, num_blocks + 2, block_size, num_kv_heads, head_dim)
        self.v_blocks = self.v.view(num_layers, num_blocks + 2, block_size, num_kv_heads, head_dim)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def clear(self, blocks: torch.Tensor) -> None:
        """Zero these blocks in every layer (stale K/V of a previous holder, maybe NaN)."""
        self.k_blocks.index_fill_(1, blocks, 0)
        self.v_blocks.index_fill_(1, blocks, 0)

    def finite(self, blocks: list[int]) -> bool:
        """Every K/V value of these blocks is finite (what a block must be to be shared by the prefix cache)."""
        if not blocks:
            return True
        index = torch.tensor(blocks, dtype=torch.long, device=self.k.device)
        return bool(torch.isfinite(self.k_blocks.index_select(1, index)).all()
                    and torch.isfinite(self.v_blocks.index_select(1, index)).all())

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's K/V in every layer (a choice of an n-sample job takes its prompt's last, partial block)."""
        self.k_blocks[:, dst] = self.k_blocks[:, src]
        self.v_blocks[:, dst] = self.v_blocks[:, src]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)
