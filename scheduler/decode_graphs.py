"""Decode-only steps padded to batch-size buckets, replayed from one CUDA graph per bucket on CUDA.

A decode step's shapes depend only on its number of sequences B once the block tables are padded to the
widest a sequence can hold (max model length / block size). `DecodeGraphs` pads B up to a bucket
(1, 2, 4, ..., max running) by copying the step's inputs into static buffers, so every decode step of a
bucket has the same shapes and addresses: on CUDA the bucket's forward pass is captured once into a
CUDA graph and then replayed, one launch for the whole step instead of a few hundred kernel launches.

Padding rows are rows of the padded batch like any other: token 0 at position 0, no adapter, context 1,
writing their K/V to the cache's pad block and reading only that (no sequence holds it). Their logits are
dropped. Adapters come through a per-token LoRA mapping of fixed shape (`kernels.mapping.per_token_mapping`)
whose tiles are refreshed before each replay; the graph launches the LoRA kernels whatever the step holds.

Modes: "graphs" (CUDA, the attention reading the cache in place and the Triton LoRA kernels: anything
else is refused at build time), "padded" (the same padding and the same forward body, run eagerly: what
the CPU tests check, since the padding is the part the two share), and "eager" (no padding, the model's
forward as is: the CPU default). Steps that are not decode-only, or have more sequences than the largest
bucket, always run eagerly.
"""

from __future__ import annotations

import torch

from lorabus import kernels
from lorabus.kernels.mapping import fill_per_token_tiles, per_token_mapping
from lorabus.scheduler.kv_cache import PagedKVCache
from lorabus.scheduler.model import CausalLM, PagedBatch, StepBatch

MODES = ("eager", "padded", "graphs")


def capturable(model: CausalLM) -> bool:
    """The model's decode step can be captured: cuda, attention reading the cache in place, Triton LoRA."""
    return model.device.type == "cuda" and model.attention.in_place and model.pool._backend == "triton"


def choose_mode(cuda_graphs: bool, model: CausalLM) -> str:
    """"graphs" where they can run and are wanted, else "eager"."""
    return "graphs" if cuda_graphs and capturable(model) else "eager"


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below `max_batch`, then `max_batch` itself: (1, 2, 4, ..., max_batch)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    buckets, n = [], 1
    while n < max_batch:
        buckets.append(n)
        n *= 2
    return (*buckets, max_batch)


def bucket_for(num_seqs: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding `num_seqs` sequences; None when none does."""
    return next((b for b in buckets if b >= num_seqs), None)


def is_decode_only(step: StepBatch) -> bool:
    """Every row of the step is one sequence's single new token."""
    if step.paged is not None:
        return step.paged.max_q_len == 1
    return not step.prefills and step.decode_rows.numel() == step.tokens.numel()


class DecodeGraphs:
    """`forward(step)` gives the same logits as `model.forward(step)`; decode-only steps go through the
    bucket's padded static buffers (and its CUDA graph in "graphs" mode)."""

    def __init__(self, model: CausalLM, kv: PagedKVCache, num_slots: int, max_batch: int, max_blocks: int,
                 mode: str = "eager"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        device = model.device
        if mode == "graphs" and not capturable(model):
            raise ValueError("CUDA graphs need a cuda device, the triton attention and the triton LoRA kernels")
        if mode == "padded" and getattr(model.attention, "seats", None) is not None:
            # The padded body reads block tables only: the seats would miss the step's K/V.
            raise ValueError("padded decode steps need the torch or triton attention, not seats")
        self.model, self.kv, self.num_slots, self.mode = model, kv, num_slots, mode
        self.buckets = batch_buckets(max_batch)
        self.max_blocks = max_blocks
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if mode == "eager":
            return  # no static buffers
        n, long = self.buckets[-1], dict(dtype=torch.long, device=device)
        # Static inputs of the largest bucket; a bucket of b sequences uses the first b rows of each.
        self.tokens, self.positions = torch.zeros(n, **long), torch.zeros(n, **long)
        self.write_slots, self.lora_idx = torch.zeros(n, **long), torch.zeros(n, **long)
        self.context_lens = torch.zeros(n, **long)
        self.tables = torch.zeros(n, max_blocks, **long)
        self.rows = torch.arange(n + 1, **long)  # decode rows, logit rows, and cu_seqlens (row i is sequence i)
        # Per-token LoRA tiles, one contiguous [3, b] buffer per bucket (the kernels read it by rows).
        self.tiles = {b: torch.zeros(3, b, dtype=torch.int32, device=device) for b in self.buckets}
        self._static_lora = model.pool._backend == "triton"
        self._graph_pool = torch.cuda.graph_pool_handle() if mode == "graphs" else None

    def forward(self, step: StepBatch) -> torch.Tensor:
        """Next-token logits (float32) for `step.logit_rows`."""
        bucket = bucket_for(step.tokens.shape[0], self.buckets)
        if self.mode == "eager" or bucket is None or not is_decode_only(step):
            return self.model.forward(step)
        self.pad(step, bucket)
        if self.mode == "padded":
            logits = self._forward(bucket)
        else:
            if bucket not in self._graphs:
                self._graphs[bucket] = self._capture(bucket)
            graph, logits = self._graphs[bucket]
            graph.replay()
        return logits.index_select(0, step.logit_rows)

    def pad(self, step: StepBatch, bucket: int) -> None:
        """Copy the decode step's inputs into the first rows of the static buffers, and padding rows up to
        `bucket`: token 0 at position 0, no adapter, context 1 in the pad block."""
        b = step.tokens.shape[0]
        blocks = step.paged.blocks if step.paged is not None else step.decode_blocks
        if blocks.shape[1] > self.max_blocks:
            raise ValueError(f"a block table of {blocks.shape[1]} blocks exceeds the {self.max_blocks} padded to")
        kv = self.kv
        self.tokens[:b].copy_(step.tokens)
        self.positions[:b].copy_(step.positions)
        self.write_slots[:b].copy_(step.write_slots)
        self.lora_idx[:b].copy_(step.lora.idx)
        torch.add(step.positions, 1, out=self.context_lens[:b])  # a decode row sees its past and itself
        self.tables[:b, :blocks.shape[1]].copy_(blocks)
        self.tables[:b, blocks.shape[1]:].fill_(kv.null_block)
        self.tokens[b:bucket].zero_()
        self.positions[b:bucket].zero_()
        self.write_slots[b:bucket].fill_(kv.pad_block * kv.block_size)
        self.lora_idx[b:bucket].fill_(-1)
        self.context_lens[b:bucket].fill_(1)
        self.tables[b:bucket].fill_(kv.null_block)
        self.tables[b:bucket, 0].fill_(kv.pad_block)
        if self._static_lora:
            fill_per_token_tiles(self.lora_idx[:bucket], self.tiles[bucket])

    def _forward(self, n: int) -> torch.Tensor:
        """The model over the first n rows of the static buffers: logits [n, vocab] (the captured body)."""
        idx, tables, ctx = self.lora_idx[:n], self.tables[:n], self.context_lens[:n]
        if self._static_lora:
            lora = per_token_mapping(idx, self.num_slots, self.tiles[n])
        else:
            lora = kernels.make_lora_mapping(idx, self.num_slots)
        if self.model.attention.in_place:
            no_rows = self.rows[:0]
            layout = dict(decode_rows=no_rows, decode_blocks=tables[:0], decode_mask=no_rows.view(0, 1, 1, 0),
                          paged=PagedBatch(tables, ctx, self.rows[:n + 1], 1))
        else:
            positions = torch.arange(self.max_blocks * self.kv.block_size, device=ctx.device)
            mask = positions[None, :] < ctx[:, None]
            layout = dict(decode_rows=self.rows[:n], decode_blocks=tables, decode_mask=mask[:, None, None, :])
        step = StepBatch(tokens=self.tokens[:n], positions=self.positions[:n], write_slots=self.write_slots[:n],
                         lora=lora, prefills=[], logit_rows=self.rows[:n], **layout)
        return self.model.forward(step)

    def _capture(self, n: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture bucket n's forward (CUDA only). The warm-up runs compile the kernels and fill the LoRA
        kernels' metadata caches outside the capture; they rewrite the real rows' K/V with the same values."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(n)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = self._forward(n)
        return graph, logits
