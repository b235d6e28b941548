"""The device pool of adapter weights that the LoRA kernels read, and the LoRA step of each projection.

The pool holds `max_loras` slots. For every decoder layer and projection group (`scheduler.arch.GROUPS`:
fused q/k/v, o, fused gate/up, down) it keeps one stacked A tensor [S, slots, R, in] and, per slice, a B tensor
[slots, out, R] plus scales [S, slots]. Adapters of different ranks share the pool by zero padding
to the pool's max rank R: the padded columns add nothing to the result, and one fixed layout keeps
every kernel launch a single gather-free read of the slot's tile (see docs/benchmarks.md for the cost).
Which job uses which slot is decided by the scheduler; the pool only stores and applies. An adapter on
a fused module (Phi-3's qkv_proj) arrives split into slices that share its A (scheduler/adapters.py), so
the pool keeps a copy of that A per slice and shrinks once per slice: exact, for (slices - 1) extra A
copies and reads on such adapters, and one fixed layout for every family.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from lorabus import kernels
from lorabus.scheduler.adapters import AdapterWeights
from lorabus.scheduler.arch import GROUPS


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
        self.device = device
        self.groups = groups
        self._group_of = {proj: (group, i) for group, projs in groups.items() for i, proj in enumerate(projs)}
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, list[torch.Tensor]]] = []
        self.scale: list[dict[str, torch.Tensor]] = []
        for _ in range(num_layers):
            a, b, s = {}, {}, {}
            for group, projs in groups.items():
                d_in = projections[projs[0]][0]
                a[group] = torch.zeros(len(projs), max_loras, max_rank, d_in, dtype=dtype, device=device)
                b[group] = [torch.zeros(max_loras, projections[p][1], max_rank, dtype=dtype, device=device) for p in projs]
                s[group] = torch.zeros(len(projs), max_loras, dtype=torch.float32, device=device)
            self.a.append(a)
            self.b.append(b)
            self.scale.append(s)
        # Slots per group whose adapter targets it: a group no resident adapter targets costs no launch.
        self._targets: dict[str, set[int]] = {group: set() for group in groups}
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

    def apply(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor, mapping: "kernels.LoRAMapping") -> None:
        """y[:, slice] += scale · B(A x) for each token's own adapter slot, all slices in one launch each."""
        if not self._targets[group] or not mapping.has_lora:
            return
        t = kernels.lora_shrink(x, self.a[layer][group], mapping, backend=self.backend)
        kernels.lora_expand(y, t, self.b[layer][group], mapping, self.scale[layer][group], backend=self.backend)

