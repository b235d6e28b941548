"""Per-sequence token choice: logits processing (bias, penalties, masks), greedy or seeded sampling, logprobs.

Each sequence owns its generator, so a seeded job draws the same tokens whatever else shares its batch.
Sampling is total: whatever the job's numbers (a temperature of 1e-320, a top_p of 0, any int seed) and
whatever the logits (NaN, ±inf), it returns a token of the vocabulary and never raises, so one job's
numbers can never fail a step that other jobs share.
"""

from __future__ import annotations

import random

import torch

from lorabus.scheduler.grammar import Constraint
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
    """One sequence's token choice. `plain` samplers (greedy, nothing else) take the batch's argmax; the others
    process their own logits row: `logit_bias`, the penalties, the `min_new_tokens` and grammar masks, then
    greedy or temperature / top-k / top-p / min-p sampling. Logprobs, when asked for, are those of the
    processed logits after temperature, before the top-k / top-p / min-p cut (vLLM's "processed_logprobs")."""

    def __init__(self, params: SamplingParams, device: torch.device, eos_ids: frozenset[int] = frozenset(),
                 constraint: Constraint | None = None, seed_offset: int = 0):
        self.params = params
        self.greedy = params.temperature == 0.0
        self.constraint = constraint
        self.plain = self.greedy and params.plain and constraint is None
        self.generator = None
        if not self.greedy:
            seed = params.seed + seed_offset if params.seed is not None else random.getrandbits(RANDOM_SEED_BITS)
            self.generator = torch.Generator(device=device).manual_seed(generator_seed(seed))
        if params.min_new_tokens:  # the tokens that end a sequence, held back until then (ignore_eos: not EOS)
            ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
            self._ends = torch.tensor(sorted(ends), dtype=torch.long)
        if params.logit_bias:
            self._bias_ids = torch.tensor([i for i, _ in params.logit_bias], dtype=torch.long)
            self._bias = torch.tensor([b for _, b in params.logit_bias], dtype=SAMPLE_DTYPE)
        # Penalty state, built on first use: tokens seen (prompt and output) and output counts.
        self._seen: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        self._observed = 0  # output tokens counted so far

    def select(self, logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int],
               logprobs: list | None = None) -> int:
        """The next token from logits [V], given what the sequence holds; appends its logprob entry to
        `logprobs` when given, and moves the grammar on. Never raises for any numbers in the logits."""
        x = self.processed(logits, prompt_ids, output_ids)
        token, scaled = self._draw(x)
        if logprobs is not None:
            logprobs.append(top_logprobs(torch.log_softmax(scaled, dim=-1), token, self.params.logprobs))
        if self.constraint is not None:
            self.constraint.advance(token)
        return token

    def sample(self, logits: torch.Tensor) -> int:
        """The next token of a sequence with nothing generated yet (no penalties apply)."""
        return self.select(logits, [], [])

    def processed(self, logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
        """The logits [V] in float64 after NaN removal, bias, penalties and masks (a fresh tensor)."""
        p = self.params
        x = logits.to(SAMPLE_DTYPE, copy=True)
        x.masked_fill_(torch.isnan(x), float("-inf"))
        if p.logit_bias:
            x.index_add_(0, self._bias_ids, self._bias)
        if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            self._observe(x.shape[-1], prompt_ids, output_ids)
            if p.repetition_penalty != 1.0:  # Hugging Face's: shrink a seen token's logit towards 0... or below it
                penalized = torch.where(x < 0, x * p.repetition_penalty, x / p.repetition_penalty)
                x = torch.where(self._seen, penalized, x)
            if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                x -= p.frequency_penalty * self._counts + p.presence_penalty * (self._counts > 0)
        if len(output_ids) < p.min_new_tokens and self._ends.numel():  # min_new_tokens > 0: _ends exists
            x.index_fill_(0, self._ends, float("-inf"))
        if self.constraint is not None:
            self.constraint.mask(x)
        return x

    def _observe(self, vocab: int, prompt_ids: list[int], output_ids: list[int]) -> None:
        """Bring the penalty state up to date with the output (each token counted once)."""
        if self._seen is None:
            self._seen = torch.zeros(vocab, dtype=torch.bool)
            self._seen[torch.tensor(prompt_ids, dtype=torch.long)] = True
            self._counts = torch.zeros(vocab, dtype=SAMPLE_DTYPE)
        new = torch.tensor(output_ids[self._observed:], dtype=torch.long)
        if new.numel():
            self._seen[new] = True
            self._counts.index_add_(0, new, torch.ones(new.numel(), dtype=SAMPLE_DTYPE))
            self._observed = len(output_ids)

    def _draw(self, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        """A token from processed logits, and the logits it was drawn from (after temperature)."""
        p = self.params
        top_inf = torch.isposinf(x)
        if bool(top_inf.any()):  # an infinitely likely token: there is nothing to draw
            return int(top_inf.nonzero()[0]), x
        best = int(x.argmax())
        if self.greedy or not torch.isfinite(x[best]):  # greedy, or no usable logit (any token is as good)
            return best, x
        # Shift before dividing so the best logit becomes exactly 0: a tiny temperature then sends the
        # others to -inf (greedy), never to inf - inf = NaN; a huge one flattens them towards uniform.
        z = (x - x[best]) / p.temperature
        z = z.masked_fill(x == float("-inf"), float("-inf"))
        keep = z
        if p.top_k > 0:
            kth = torch.topk(keep, min(p.top_k, keep.shape[-1])).values[-1]
            keep = keep.masked_fill(keep < kth, float("-inf"))
        probs = torch.softmax(keep, dim=-1)  # the best token has mass >= 1/V, so the sum is never 0
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p; the first token always stays, even for top_p <= 0.
            drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
            drop[0] = False
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(drop, 0.0))
        if p.min_p > 0.0:  # relative to the most likely token, which always stays
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
            return best, z  # cannot happen by the construction above; greedy beats raising inside a shared step
        return int(torch.multinomial(probs, 1, generator=self.generator)), z


# A logprob JSON can carry: a token the processing ruled out has -inf, which JSON cannot say.
MIN_LOGPROB = -1e30


def top_logprobs(logprobs: torch.Tensor, token: int, k: int | None) -> tuple:
    """(token, its logprob, the k most likely ids, their logprobs) from a log-softmax row [V]; tokens with
    probability 0 are left out of the k."""
    k = min(k or 0, logprobs.shape[-1])
    if k:
        values, ids = torch.topk(logprobs, k)
        finite = torch.isfinite(values)
        top_ids, top_values = ids[finite].tolist(), values[finite].tolist()
    else:
        top_ids, top_values = [], []
    chosen = float(logprobs[token])
    if chosen != chosen:  # NaN: the token's logit was +inf (drawn outright), a certainty
        chosen = 0.0
    return token, max(chosen, MIN_LOGPROB), top_ids, top_values


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int], k: int | None) -> list[tuple]:
    """For logit rows [R, V] whose row i predicts next_ids[i]: each token's entry as in top_logprobs, from the
    raw logits (no penalty, bias or temperature: the model's own scores of the prompt)."""
    rows = torch.log_softmax(logits.to(SAMPLE_DTYPE).nan_to_num(nan=float("-inf")), dim=-1)
    return [top_logprobs(rows[i], token, k) for i, token in enumerate(next_ids)]
