"""Public LoRA shrink/expand ops: argument checks, layout normalisation, backend dispatch.

Shapes (T tokens, L device slots, R padded max rank, S slices):
  lora_shrink: x [T, H_in], a [L, R, H_in] -> t [T, R]
               or a [S, L, R, H_in]        -> t [S, T, R]            (t is fp32)
  lora_expand: y [T, H_y] += scale * t @ b.T per token's slot, in place;
               single: t [T, R], b [L, H_out, R], scale [L]
               sliced: t [S, T, R], b S tensors [L, H_out_s, R], scale [S, L],
                       slice s lands in y[:, offsets[s]:offsets[s] + H_out_s]

Strided inputs are used as they are (the kernels take strides, the torch
paths index); nothing is copied except `scale`, which becomes a tiny fp32
[S, L] tensor. y is updated in place, so it may be any strided 2-D view.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import torch_ops
from .mapping import LoRAMapping, make_lora_mapping

BACKENDS = ("auto", "triton", "torch", "gather")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve_backend(backend: str, device: torch.device, choices: tuple[str, ...] = BACKENDS,
                    what: str = "backend") -> str:
    """The backend `backend` (one of `choices`) means on `device`: 'auto' is 'triton' on CUDA, else 'torch'
    (per-segment matmuls, the fastest CPU path for the LoRA ops)."""
    if backend not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def _as_mapping(mapping, num_tokens: int, num_slots: int, device: torch.device) -> LoRAMapping:
    m = mapping if isinstance(mapping, LoRAMapping) else make_lora_mapping(mapping, num_slots)
    if m.num_tokens != num_tokens:
        raise ValueError(f"mapping covers {m.num_tokens} tokens, the input has {num_tokens}")
    if m.active_slots and m.active_slots[-1] >= num_slots:
        raise ValueError(f"mapping uses slot {m.active_slots[-1]}, the weights have {num_slots} slots")
    if m.idx.device != device:
        raise ValueError(f"mapping is on {m.idx.device}, the inputs on {device}")
    return m


def lora_shrink(x: torch.Tensor, a: torch.Tensor, mapping: LoRAMapping | torch.Tensor, *,
                backend: str = "auto") -> torch.Tensor:
    """t[i] = x[i] @ a[idx[i]].T in fp32, zero rows where idx[i] == -1.

    a [L, R, H_in] gives t [T, R]; a sliced [S, L, R, H_in] gives t [S, T, R].
    """
    if x.dim() != 2 or a.dim() not in (3, 4):
        raise ValueError(f"expected x [T, H_in] and a [L, R, H_in] or [S, L, R, H_in], "
                         f"got {tuple(x.shape)} and {tuple(a.shape)}")
    sliced = a.dim() == 4
    a4 = a if sliced else a.unsqueeze(0)
    S, L, R, H = a4.shape
    if H != x.shape[1]:
        raise ValueError(f"a's last dim {H} != x's hidden size {x.shape[1]}")
    _check_dtypes(x.dtype, a.dtype)
    if a.device != x.device:
        raise ValueError(f"x on {x.device}, a on {a.device}")
    m = _as_mapping(mapping, x.shape[0], L, x.device)
    backend = resolve_backend(backend, x.device)

    # Zeros: rows without an adapter stay 0, and split-K adds into it.
    t = torch.zeros((S, x.shape[0], R), dtype=torch.float32, device=x.device)
    if m.has_lora:
        if backend == "triton":
            from . import triton_ops
            triton_ops.shrink(x, a4, m, t)
        elif backend == "torch":
            torch_ops.shrink_segmented(x, a4, m, t)
        else:
            torch_ops.shrink_gather(x, a4, m, t)
    return t if sliced else t[0]


def lora_expand(y: torch.Tensor, t: torch.Tensor, b: torch.Tensor | Sequence[torch.Tensor],
                mapping: LoRAMapping | torch.Tensor, scale: torch.Tensor, *,
                offsets: Sequence[int] | None = None, backend: str = "auto") -> torch.Tensor:
    """y[i, cols_s] += scale[s, idx[i]] * (t[s, i] @ b_s[idx[i]].T) in place; returns y.

    Single: t [T, R], b [L, H_out, R], scale [L]. Sliced: t [S, T, R], b a
    sequence of S [L, H_out_s, R], scale [S, L], offsets (default: cumulative
    H_out_s, which must then add up to y's width). Accumulates in fp32 and
    rounds each y element once; rows with idx -1 are not touched.
    """
    if y.dim() != 2 or t.dim() not in (2, 3):
        raise ValueError(f"expected y [T, H] and t [T, R] or [S, T, R], got {tuple(y.shape)} and {tuple(t.shape)}")
    sliced = t.dim() == 3
    if not sliced and not (isinstance(b, torch.Tensor) and b.dim() == 3):
        raise ValueError("single lora_expand (t [T, R]) takes b as one [L, H_out, R] tensor")
    if not isinstance(scale, torch.Tensor):
        raise ValueError("scale must be a tensor ([L] single, [S, L] sliced)")
    bs = list(b) if sliced else [b]
    scale2 = scale if sliced else scale.reshape(1, -1)
    t3 = t if sliced else t.unsqueeze(0)
    S, T, R = t3.shape
    if T != y.shape[0]:
        raise ValueError(f"t has {T} tokens, y has {y.shape[0]}")
    if len(bs) != S or any(bb.dim() != 3 for bb in bs):
        raise ValueError(f"expected {S} b tensors [L, H_out_s, R], got {[tuple(bb.shape) for bb in bs]}")
    L = bs[0].shape[0]
    for bb in bs:
        if bb.shape[0] != L or bb.shape[2] != R:
            raise ValueError(f"b tensors must be [L={L}, H_out_s, R={R}], got {tuple(bb.shape)}")
        _check_dtypes(y.dtype, bb.dtype)
        if bb.device != y.device:
            raise ValueError(f"y on {y.device}, b on {bb.device}")
    if not t.is_floating_point() or t.device != y.device:
        raise ValueError(f"t must be a floating tensor on {y.device}, got {t.dtype} on {t.device}")
    if tuple(scale2.shape) != (S, L):
        raise ValueError(f"scale must have shape {[S, L] if sliced else [L]}, got {tuple(scale.shape)}")
    widths = [bb.shape[1] for bb in bs]
    offsets = _check_offsets(offsets, widths, y.shape[1])
    m = _as_mapping(mapping, T, L, y.device)
    backend = resolve_backend(backend, y.device)

    if m.has_lora:
        scale2 = scale2.to(device=y.device, dtype=torch.float32).contiguous()
        if backend == "triton":
            from . import triton_ops
            triton_ops.expand(y, t3, bs, scale2, offsets, m)
        elif backend == "torch":
            torch_ops.expand_segmented(y, t3, bs, scale2, offsets, m)
        else:
            torch_ops.expand_gather(y, t3, bs, scale2, offsets, m)
    return y


def _check_dtypes(act: torch.dtype, weight: torch.dtype) -> None:
    if act not in _DTYPES or weight != act:
        raise ValueError(f"activations and weights must share one of {_DTYPES}, got {act} and {weight}")


def _check_offsets(offsets, widths: list[int], y_width: int) -> list[int]:
    if offsets is None:
        if sum(widths) != y_width:
            raise ValueError(f"slice widths {widths} sum to {sum(widths)}, y has {y_width} columns; pass offsets")
        return [sum(widths[:i]) for i in range(len(widths))]
    offsets = [int(o) for o in offsets]
    if len(offsets) != len(widths):
        raise ValueError(f"need {len(widths)} offsets, got {len(offsets)}")
    spans = sorted(zip(offsets, widths))
    for (o, w), nxt in zip(spans, spans[1:] + [(y_width, 0)]):
        # Overlapping slices would race in the kernel (two programs, one element).
        if o < 0 or o + w > nxt[0]:
            raise ValueError(f"slices (offset, width) {list(zip(offsets, widths))} "
                             f"overlap or exceed y's {y_width} columns")
    return offsets
