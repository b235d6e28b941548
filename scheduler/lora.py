"""The device pool of adapter weights that the LoRA kernels read, and the LoRA step of each projection.

The pool holds `max_loras` slots. For every decoder layer and projection group (`scheduler.arch.GROUPS`:
fused q/k/v, o, fused gate/up, down) it keeps one A tensor stored slot-major [slots, R, S, in] (`a` exposes
it as the kernels' [S, slots, R, in] view: strides, no copy) and, per slice, a B tensor [slots, out, R]
plus scales [S, slots] (the CPU path reads them transposed, as a view). Slot-major storage
lets the CPU path read a batch's adapters as views of the pool: `a[slot, :r]` is one contiguous
[r*S, in] matrix and a run of slots is one strided batch, so a step gathers no A or B. Adapters of
different ranks share the pool by zero padding to the pool's max rank R. The CPU path never runs past
the largest true rank (recorded per slot at write time) among the slots it batches: a segment done on
its own (a long prefill run) runs at its slot's rank, and batched segments are grouped by rank bucket
(true rank rounded up to a power of two, at least `MIN_RANK_BUCKET`), each bucket at its largest rank,
when a rough work estimate says the split saves enough to pay for its extra calls (`SPLIT_GAIN`): rank-8
adapters beside a few rank-32/64 ones do not pay their rank, but rank 8 beside rank 16 stays one call
(measured faster on CPU), and slots of different ranks interleaved in the pool stay one call when a
bucket's view of the pool would span the others' slots anyway or gather its weights; slots that do not
target the group are skipped. The Triton
path reads the padded tile (see docs/benchmarks.md for the cost). The backend is resolved once here,
at construction; `apply` calls the torch path or the Triton kernels directly, with no per-call argument
checks. Which job uses which slot is decided by the scheduler; the pool only stores and applies. An adapter on
a fused module (Phi-3's qkv_proj) arrives split into slices that share its A (scheduler/adapters.py), so
the pool keeps a copy of that A per slice and shrinks once per slice: exact, for (slices - 1) extra A
copies and reads on such adapters, and one fixed layout for every family.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from lorabus import kernels
from lorabus.kernels import torch_ops
from lorabus.kernels.mapping import restrict_mapping
from lorabus.scheduler.adapters import AdapterWeights
from lorabus.scheduler.arch import GROUPS


# Ranks up to this share one bucket: below it a matmul costs its call, not its rank.
MIN_RANK_BUCKET = 8


def rank_bucket(rank: int) -> int:
    """The bucket of an adapter's true rank: the next power of two, at least MIN_RANK_BUCKET."""
    return max(MIN_RANK_BUCKET, 1 << (rank - 1).bit_length())


# A rank split must cost at most this share of the unsplit step's work: each bucket adds a call. Measured
# (64 decode tokens on 64 slots, hidden 576, 1 thread): 32 rank-8 + 32 rank-16 slots split is 1.2x slower
# (estimate 0.75), 48 rank-8 + 16 rank-32 is 2.1x faster (0.44), 32 rank-8 + 32 rank-64 1.6x (0.56).
SPLIT_GAIN = 0.6


def _grid_cost(slots: list[int], seg_len: dict[int, int], rank: int) -> int:
    """Rough work of torch_ops.apply_slot_major over these slots' segments (lengths `seg_len`) at `rank`:
    grid cells x rank, twice that when the weights are gathered (index_select) instead of read as views."""
    longest, tokens = max(seg_len[s] for s in slots), sum(seg_len[s] for s in slots)
    plan = torch_ops.plan_segments(slots, longest, tokens)
    if plan == "span":
        return (slots[-1] - slots[0] + 1) * longest * rank
    if plan == "active":
        return 2 * len(slots) * longest * rank
    return tokens * rank


def slot_bytes(projections: dict[str, tuple[int, int]], num_layers: int, max_rank: int, dtype: torch.dtype) -> int:
    """Bytes one pool slot takes: what sizes the pool from device memory."""
    per_layer = sum((d_in + d_out) * max_rank for d_in, d_out in projections.values())
    return per_layer * num_layers * torch.finfo(dtype).bits // 8


class AdapterPool:
    def __init__(
        self,
        projections: dict[str, tuple[int, int]],
        num_layers: int,
        max_loras: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        backend: str = "auto",
        groups: dict[str, tuple[str, ...]] = GROUPS,
    ):
        self.backend = backend
        self._backend = kernels.resolve_backend(backend, device)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"pool dtype must be fp32, fp16 or bf16, got {dtype}")
        self.device = device
        self.groups = groups
        self.max_rank = max_rank
        self._group_of = {proj: (group, i) for group, projs in groups.items() for i, proj in enumerate(projs)}
        self._offsets = {group: [sum(projections[p][1] for p in projs[:i]) for i in range(len(projs))]
                         for group, projs in groups.items()}
        self._a_slot_major: list[dict[str, torch.Tensor]] = []  # [slots, R, S, in]
        self.a: list[dict[str, torch.Tensor]] = []  # the same storage viewed [S, slots, R, in]
        self.b: list[dict[str, list[torch.Tensor]]] = []
        self.scale: list[dict[str, torch.Tensor]] = []  # [S, slots] fp32
        for _ in range(num_layers):
            a_sm, a, b, s = {}, {}, {}, {}
            for group, projs in groups.items():
                d_in = projections[projs[0]][0]
                a_sm[group] = torch.zeros(max_loras, max_rank, len(projs), d_in, dtype=dtype, device=device)
                a[group] = a_sm[group].permute(2, 0, 1, 3)
                b[group] = [torch.zeros(max_loras, projections[p][1], max_rank, dtype=dtype, device=device) for p in projs]
                s[group] = torch.zeros(len(projs), max_loras, dtype=torch.float32, device=device)
            self._a_slot_major.append(a_sm)
            self.a.append(a)
            self.b.append(b)
            self.scale.append(s)
        # Slots per group whose adapter targets it: a group no resident adapter targets costs no launch.
        self._targets: dict[str, set[int]] = {group: set() for group in groups}
        # True rank per group and slot (largest over layers and slices), 0 when the slot does not target it.
        self._rank: dict[str, list[int]] = {group: [0] * max_loras for group in groups}
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def write(self, slot: int, adapter: AdapterWeights) -> None:
        """Copy an adapter into a slot (called from the loader thread; the slot is idle meanwhile)."""
        stream = torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else nullcontext()
        with stream:
            self.clear(slot)
            for (layer, proj), (a, b, scale) in adapter.modules.items():
                group, i = self._group_of[proj]
                rank = a.shape[0]
                self.a[layer][group][i, slot, :rank].copy_(a, non_blocking=True)
                self.b[layer][group][i][slot, :, :rank].copy_(b, non_blocking=True)
                self.scale[layer][group][i, slot] = scale
                self._targets[group].add(slot)
                self._rank[group][slot] = max(self._rank[group][slot], rank)
        if self._copy_stream is not None:
            self._copy_stream.synchronize()

    def clear(self, slot: int) -> None:
        for layer in range(len(self.a)):
            for group in self.groups:
                self.a[layer][group][:, slot].zero_()
                for b in self.b[layer][group]:
                    b[slot].zero_()
                self.scale[layer][group][:, slot] = 0.0
        for slots in self._targets.values():
            slots.discard(slot)
        for ranks in self._rank.values():
            ranks[slot] = 0

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor, mapping: "kernels.LoRAMapping") -> None:
        """y[:, slice] += scale · B(A x) for each token's own adapter slot, all slices in one launch each."""
        # A static (CUDA-graph) mapping launches whatever the batch holds: the graph outlives this step.
        if not mapping.static and (not self._targets[group] or not mapping.has_lora):
            return
        if self._backend == "torch":
            for rank, bucket_mapping in self._rank_buckets(group, mapping):
                torch_ops.apply_slot_major(x, y, self._a_slot_major[layer][group], self.b[layer][group],
                                           self.scale[layer][group].T, self._offsets[group], bucket_mapping, rank,
                                           self._rank[group])
        elif self._backend == "triton":
            # The shapes were checked when the pool was built: launch the kernels without the public ops'
            # per-call checks. They read the [S, slots, R, in] view of the slot-major A by its strides.
            from lorabus.kernels import triton_ops

            a = self.a[layer][group]
            t = torch.zeros((a.shape[0], x.shape[0], a.shape[2]), dtype=torch.float32, device=x.device)
            triton_ops.shrink(x, a, mapping, t)
            triton_ops.expand(y, t, self.b[layer][group], self.scale[layer][group], self._offsets[group], mapping)
        else:  # the "gather" baseline, through the checked public ops
            t = kernels.lora_shrink(x, self.a[layer][group], mapping, backend=self._backend)
            kernels.lora_expand(y, t, self.b[layer][group], mapping, self.scale[layer][group], backend=self._backend)

    def _rank_buckets(self, group: str, mapping: "kernels.LoRAMapping") -> list[tuple[int, "kernels.LoRAMapping"]]:
        """How the torch path runs the step's slots for `group`: (rank, mapping) pairs, one per rank bucket
        or one for the whole step (see the module docstring). Cached on the step's mapping, so every layer
        reuses it."""
        cache = mapping.__dict__.setdefault("_pool_rank_buckets", {})
        key = (id(self), group)
        if key not in cache:
            cache[key] = self._split_by_rank(group, mapping)
        return cache[key]

    def _split_by_rank(self, group: str, mapping: "kernels.LoRAMapping") -> list[tuple[int, "kernels.LoRAMapping"]]:
        ranks = self._rank[group]
        by_bucket: dict[int, list[int]] = {}
        for slot in mapping.active_slots:
            if ranks[slot]:
                by_bucket.setdefault(rank_bucket(ranks[slot]), []).append(slot)
        if not by_bucket:
            return []
        whole = [(max(ranks[s] for s in mapping.active_slots), mapping)]
        plan = torch_ops.grid_plan(mapping)
        if plan is None or (len(by_bucket) == 1 and sum(map(len, by_bucket.values())) == len(mapping.active_slots)):
            return whole  # segments one GEMM each (each at its own rank), or nothing to split
        # Split only where it saves work: a bucket's grid may span other buckets' slots (computed, then
        # dropped) or gather its weights where the whole step reads views.
        seg_len = dict(zip(mapping.active_slots, mapping.seg_lens))
        buckets = [(max(ranks[s] for s in slots), tuple(slots)) for slots in by_bucket.values()]
        split_cost = sum(_grid_cost(slots, seg_len, r) for r, slots in buckets)
        if split_cost >= SPLIT_GAIN * _grid_cost(list(mapping.active_slots), seg_len, whole[0][0]):
            return whole
        cut = mapping.__dict__.setdefault("_pool_restricted", {})  # shared by groups with the same split
        for _, slots in buckets:
            if slots not in cut:
                cut[slots] = restrict_mapping(mapping, slots)
        return [(r, cut[slots]) for r, slots in buckets]
