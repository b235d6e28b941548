"""Per-sequence token sampling: greedy, or seeded temperature / top-k / top-p sampling.

Each sequence owns its generator, so a seeded job draws the same tokens whatever else shares its batch.
Sampling is total: whatever the job's numbers (a temperature of 1e-320, a top_p of 0, any int seed) and
whatever the logits (NaN, ±inf), it returns a token of the vocabulary and never raises, so one job's
numbers can never fail a step that other jobs share.
"""

from __future__ import annotations

import random

import torch

from lorabus.scheduler.requests import SamplingParams

# torch.Generator.manual_seed takes [-2**63, 2**64); it maps a negative seed s to s + 2**64. Reducing every
# int modulo 2**64 is the same map on that range and extends it deterministically to any int.
SEED_MODULUS = 2**64
RANDOM_SEED_BITS = 63
# Sampling math runs in float64: a float32 softmax underflows or overflows for extreme temperatures.
SAMPLE_DTYPE = torch.float64


def generator_seed(seed: int) -> int:
    """Any Python int as a seed torch's generators accept; in-range seeds keep their stream."""
    return int(seed) % SEED_MODULUS


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.greedy = params.temperature == 0.0
        self.generator = None
        if not self.greedy:
            seed = params.seed if params.seed is not None else random.getrandbits(RANDOM_SEED_BITS)
            self.generator = torch.Generator(device=device).manual_seed(generator_seed(seed))

    def sample(self, logits: torch.Tensor) -> int:
        """One token from logits [V]: drawn among the finite logits (and +inf ones, which win outright)."""
        p = self.params
        x = logits.to(SAMPLE_DTYPE)
        top_inf = torch.isposinf(x)
        if bool(top_inf.any()):  # an infinitely likely token: there is nothing to draw
            return int(top_inf.nonzero()[0])
        x = x.masked_fill(torch.isnan(x), float("-inf"))
        best = int(x.argmax())
        if not torch.isfinite(x[best]):  # no usable logit at all: any token is as good as another
            return best
        # Shift before dividing so the best logit becomes exactly 0: a tiny temperature then sends the
        # others to -inf (greedy), never to inf - inf = NaN; a huge one flattens them towards uniform.
        z = (x - x[best]) / p.temperature
        z = z.masked_fill(x == float("-inf"), float("-inf"))
        if p.top_k > 0:
            kth = torch.topk(z, min(p.top_k, z.shape[-1])).values[-1]
            z = z.masked_fill(z < kth, float("-inf"))
        probs = torch.softmax(z, dim=-1)  # the best token has mass >= 1/V, so the sum is never 0
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p; the first token always stays, even for top_p <= 0.
            drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
            drop[0] = False
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(drop, 0.0))
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
            return best  # cannot happen by the construction above; greedy beats raising inside a shared step
        return int(torch.multinomial(probs, 1, generator=self.generator))
