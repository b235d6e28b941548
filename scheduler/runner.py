"""The model runner: one step's sequences and token counts in, next-token logits (and tokens) out.

`ModelRunner.run` builds the step's tensors once (tokens, positions, KV cache slots, each token's adapter
slot, the decode and prefill layout), runs the model's forward pass over them, and returns a `StepOutput`:
the sequences that get a token this step, in logit-row order, and their tokens (greedy, or drawn by each
sequence's own sampler). It only reads a sequence's bookkeeping; the step loop updates it.
"""

from __future__ import annotations

import time

import torch

from lorabus import kernels
from lorabus.scheduler.callbacks import call_hook
from lorabus.scheduler.kv_cache import PagedKVCache
from lorabus.scheduler.model import CausalLM, PrefillSpan, StepBatch
from lorabus.scheduler.requests import Sequence

# A sequence with this many new tokens in a step is decoding (attends over its cached context);
# more is a prefill chunk (causal attention over the chunk and what precedes it).
DECODE_TOKENS = 1


class StepOutput:
    """Logits of the sequences that get a token this step, rows in `sequences` order."""

    def __init__(self, sequences: list[Sequence], logits: torch.Tensor):
        self.sequences, self.logits = sequences, logits
        self._greedy = logits.argmax(dim=-1).tolist()  # one device → host copy for every greedy row

    def token(self, row: int) -> int:
        """The next token of `sequences[row]`; a sampling failure raises here, for that sequence alone."""
        sampler = self.sequences[row].sampler
        return self._greedy[row] if sampler.greedy else sampler.sample(self.logits[row])


class ModelRunner:
    def __init__(self, model: CausalLM, kv: PagedKVCache, num_slots: int, device: torch.device):
        self.model, self.kv, self.num_slots, self.device = model, kv, num_slots, device
        self.steps = 0
        # Optional metrics hook, called from the step thread: on_step(sequences, tokens, distinct_adapters, seconds).
        self.on_step = None

    def run(self, batch: list[tuple[Sequence, int]]) -> StepOutput:
        step, wants_logits = self._step_batch(batch)
        started = time.perf_counter()
        logits = self.model.forward(step)
        self.steps += 1
        call_hook(self.on_step, len(batch), step.tokens.numel(), len(step.lora.active_slots),
                  time.perf_counter() - started)
        return StepOutput(wants_logits, logits)

    def _step_batch(self, batch: list[tuple[Sequence, int]]) -> tuple[StepBatch, list[Sequence]]:
        """The forward pass's input, and the sequences whose last new token is their newest (they get logits)."""
        device = self.device
        tokens, positions, write_slots, lora_idx, logit_rows = [], [], [], [], []
        decode_rows, decode_ctx, prefills = [], [], []
        wants_logits: list[Sequence] = []
        for seq, n in batch:
            if seq.kv_slots is None:
                seq.kv_slots = self.kv.token_slots(seq.blocks, device)
            start, past = len(tokens), seq.num_computed
            all_ids = seq.prompt_ids + seq.output_ids
            tokens.extend(all_ids[past : past + n])
            positions.extend(range(past, past + n))
            write_slots.append(seq.kv_slots[past : past + n])
            lora_idx.extend([seq.slot] * n)
            if n == DECODE_TOKENS:
                decode_rows.append(start)
                decode_ctx.append(seq.kv_slots[: past + 1])
            else:
                prefills.append(PrefillSpan(start, n, past, seq.kv_slots[: past + n]))
            if past + n == seq.num_tokens:
                logit_rows.append(start + n - 1)
                wants_logits.append(seq)
        ctx_lens = torch.tensor([c.numel() for c in decode_ctx], device=device)
        width = int(ctx_lens.max()) if decode_ctx else 0
        step = StepBatch(
            tokens=torch.tensor(tokens, device=device),
            positions=torch.tensor(positions, device=device),
            write_slots=torch.cat(write_slots),
            lora=kernels.make_lora_mapping(torch.tensor(lora_idx, device=device), self.num_slots),
            decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=device),
            # Padding points at the cache's null slot, never at memory a sequence wrote.
            decode_kv_slots=torch.nn.utils.rnn.pad_sequence(decode_ctx, batch_first=True,
                                                            padding_value=self.kv.null_slot) if decode_ctx
            else torch.empty(0, 0, dtype=torch.long, device=device),
            decode_mask=(torch.arange(width, device=device)[None, :] < ctx_lens[:, None])[:, None, None, :],
            prefills=prefills,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=device),
        )
        return step, wants_logits
