"""Per-sequence token sampling: greedy, or seeded temperature / top-k / top-p sampling.

Each sequence owns its generator, so a seeded job draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import random

import torch

from scheduler.core import SamplingParams


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.greedy = params.temperature == 0.0
        self.generator = None
        if not self.greedy:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def sample(self, logits: torch.Tensor) -> int:
        """One token from float32 logits [V]."""
        p = self.params
        logits = logits / p.temperature
        if p.top_k > 0:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))
