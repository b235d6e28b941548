"""Multi-LoRA kernels: apply many adapters to one batch (SGMV-style shrink/expand).

`lora_shrink` computes t = x @ A[slot].T per token, `lora_expand` adds
scale * t @ B[slot].T into the base layer's output. Build one `LoRAMapping`
per forward pass with `make_lora_mapping` and pass it to every layer.
This package is the bottom layer of lorabus: it imports nothing from it.
See docs/kernels.md.
"""

from .mapping import LoRAMapping, make_lora_mapping
from .ops import BACKENDS, lora_expand, lora_shrink, resolve_backend

__all__ = ["BACKENDS", "LoRAMapping", "lora_expand", "lora_shrink", "make_lora_mapping", "resolve_backend"]

from .paged_attention import (paged_attention_decode, paged_attention_decode_ref,  # noqa: E402
                              paged_attention_prefill, paged_attention_prefill_ref, resolve_attention_backend)

__all__ += ["paged_attention_decode", "paged_attention_decode_ref", "paged_attention_prefill",
            "paged_attention_prefill_ref", "resolve_attention_backend"]
