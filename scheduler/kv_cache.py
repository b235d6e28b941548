"""Paged KV cache: fixed-size blocks in one preallocated tensor per layer, handed out to sequences.

The whole budget is allocated once at start-up; a sequence holds a list of block ids (its block
table) and returns them when it finishes, so memory is reused without per-step allocation and no
sequence is padded to another's length.
"""

from __future__ import annotations

import torch


class BlockAllocator:
    """Free-list of KV block ids; pure bookkeeping, shared by the engine and the scheduler simulation."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.reset()

    def reset(self) -> None:
        """Every block free again (the scheduler dropped all its sequences)."""
        self._free = list(range(self.num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, num_tokens: int) -> list[int] | None:
        need = self.blocks_for(num_tokens)
        if need > len(self._free):
            return None
        return [self._free.pop() for _ in range(need)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


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

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's K/V in every layer (a choice of an n-sample job takes its prompt's last, partial block)."""
        self.k_blocks[:, dst] = self.k_blocks[:, src]
        self.v_blocks[:, dst] = self.v_blocks[:, src]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)
