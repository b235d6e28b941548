"""The model runner: one step's sequences and token counts in, next-token logits (and tokens) out.

`ModelRunner.run` builds the step's tensors once (tokens, positions, KV cache slots, each token's adapter
slot, the decode and prefill layout), runs the model's forward pass over them, and returns a `StepOutput`:
the sequences that get a token this step, in logit-row order, and their tokens (greedy, or drawn by each
sequence's own sampler). It only reads a sequence's bookkeeping; the step loop updates it.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from lorabus import kernels
from lorabus.scheduler.decode_graphs import DecodeGraphs
from lorabus.scheduler.kv_cache import PagedKVCache
from lorabus.scheduler.model import CausalLM, PagedBatch, PrefillGroup, PrefillSpan, StepBatch
from lorabus.scheduler.requests import Sequence, call_hook
from lorabus.scheduler.sampling import prompt_logprobs

# A sequence with this many new tokens in a step is decoding (attends over its cached context);
# more is a prefill chunk (causal attention over the chunk and what precedes it).
DECODE_TOKENS = 1


class StepOutput:
    """The logits of a step: the row of each sequence that gets a token (`sequences`, in row order), and the
    prompt rows of the sequences that asked for prompt logprobs (`scored`)."""

    def __init__(self, sequences: list[Sequence], logits: torch.Tensor, rows: list[int],
                 scored: list[tuple[Sequence, int, int, int]]):
        self.sequences, self.logits, self.rows = sequences, logits, rows
        self.scored = scored  # (sequence, first logit row, rows, position of the first)
        self._greedy = logits.argmax(dim=-1).tolist()  # one device → host copy for every greedy row

    def token(self, row: int, seq: Sequence | None = None) -> int:
        """The next token of `sequences[row]` (or of `seq`, a choice that starts from that row's logits); a
        sampling failure raises here, for that sequence alone."""
        seq = seq or self.sequences[row]
        i, sampler = self.rows[row], seq.sampler
        if sampler.plain:
            return self._greedy[i]
        return sampler.select(self.logits[i], seq.prompt_ids, seq.output_ids, seq.logprobs)

    def score_prompt(self, index: int) -> None:
        """Append the logprobs of the prompt tokens that `scored[index]`'s rows predict to its sequence's."""
        seq, first, count, past = self.scored[index]
        next_ids = seq.prompt_ids[past + 1:past + 1 + count]  # the last row may predict the first output token
        rows = self.logits[first:first + len(next_ids)].float().cpu()
        seq.prompt_logprobs.extend(prompt_logprobs(rows, next_ids, seq.request.params.prompt_logprobs))


class ModelRunner:
    """Builds each step's tensors into reused host buffers (pinned on CUDA, one copy to the device per
    step) and runs the model over them.

    A sequence's `kv_slots` holds, from its first step on, its block table as a CPU int64 tensor (its
    blocks are zeroed then: attention reads whole blocks, also past the sequence's context in the last).
    The layout follows the model's attention backend: decode tables, masks and prefill groups for the
    torch backend; the same for the seats backend, less the decode rows of sequences that hold a seat
    (`SeatKV.plan` lays out what they write and read there); one block table, context length and row range
    per sequence (`PagedBatch`) for a backend that reads the cache in place."""

    def __init__(self, model: CausalLM, kv: PagedKVCache, num_slots: int, device: torch.device,
                 max_step_tokens: int = 512, max_running: int = 64, decode_mode: str = "eager", max_blocks: int = 0):
        self.model, self.kv, self.num_slots, self.device = model, kv, num_slots, device
        # Decode-only steps through CUDA graphs per batch-size bucket (decode_mode "graphs"), block tables
        # padded to `max_blocks` (0: the whole cache); "eager" runs every step as built.
        self.decode = DecodeGraphs(model, kv, num_slots, max_running, max_blocks or kv.num_blocks, decode_mode)
        self.steps = 0
        # Optional metrics hook, called from the step thread: on_step(sequences, tokens, distinct_adapters, seconds).
        self.on_step = None
        self._pin = device.type == "cuda"
        self._in_place = model.attention.in_place
        self._seats = getattr(model.attention, "seats", None)  # the seat backend's rows (scheduler/seat_kv.py)
        if self._seats is not None:
            self._seats.max_seats = max_running
        self._copied: torch.cuda.Event | None = None  # the last step's host → device copy
        # The last step's LoRA mapping, its token slots and the pool's version then (`_lora_mapping`).
        self._last_lora: tuple[int, np.ndarray, kernels.LoRAMapping] | None = None
        self._host = self._host_np = None
        self._reserve(7 * max_step_tokens + max_running * (3 + 8))

    def _reserve(self, size: int) -> None:
        """Host buffer of at least `size` int64 (grown by doubling, so it settles at the largest step)."""
        if self._host is not None and self._host.numel() >= size:
            return
        if self._host is not None:
            size = max(size, 2 * self._host.numel())
        self._host = torch.empty(size, dtype=torch.long, pin_memory=self._pin)
        self._host_np = self._host.numpy()

    def run(self, batch: list[tuple[Sequence, int]]) -> StepOutput:
        step, wants_logits, rows, scored = self._step_batch(batch)
        started = time.perf_counter()
        logits = self.decode.forward(step)
        self.steps += 1
        call_hook(self.on_step, len(batch), step.tokens.numel(), len(step.lora.active_slots),
                  time.perf_counter() - started)
        return StepOutput(wants_logits, logits, rows, scored)

    def layout(self, batch: list[tuple[Sequence, int]]) -> StepBatch:
        """The forward pass's input for `batch`, as `run` lays it out (scheduler/attention_tuning.py times it)."""
        return self._step_batch(batch)[0]

    def fork(self, parent: Sequence, choices: list[Sequence]) -> None:
        """Start the other choices of `parent`'s job from its prefilled prompt: each reads the prompt's full
        blocks in place and gets a copy of the last, partial one (its own output goes there next)."""
        bs = self.kv.block_size
        full = len(parent.prompt_ids) // bs
        for seq in choices:
            seq.shared_blocks = parent.blocks[:full]
            seq.kv_slots = torch.tensor(seq.shared_blocks + seq.blocks, dtype=torch.long)
            self.kv.clear(torch.tensor(seq.blocks, dtype=torch.long, device=self.device))
            if len(parent.prompt_ids) % bs:
                self.kv.copy_block(parent.blocks[full], seq.blocks[0])

    def _step_batch(self, batch: list[tuple[Sequence, int]]) -> tuple[StepBatch, list[Sequence], list[int], list]:
        """The forward pass's input; the sequences whose last new token is their newest (they get a token) and
        their logit rows; the prompt rows of sequences that score their prompt."""
        device, kv = self.device, self.kv
        bs, null_block = kv.block_size, kv.null_block
        fresh = [seq for seq, _ in batch if seq.kv_slots is None]
        if fresh:
            for seq in fresh:
                seq.kv_slots = torch.tensor(seq.blocks, dtype=torch.long)
            # Only its own blocks: the first `cached_blocks` hold a cached prompt prefix other sequences read.
            kv.clear(torch.cat([seq.kv_slots[seq.cached_blocks:] for seq in fresh]).to(device))
        in_place = self._in_place
        seat_plan = self._seats.plan(batch, device) if self._seats is not None else None
        seated = self._seats.seat_index if seat_plan is not None else {}  # their decode rows read their seats
        num_tokens = num_decode = width = max_new = num_scored = 0
        for seq, n in batch:
            num_tokens += n
            if n > DECODE_TOKENS and seq.prompt_logprobs is not None:
                num_scored += n
            max_new = max(max_new, n)
            if in_place:
                width = max(width, (seq.num_computed + n - 1) // bs + 1)  # blocks holding [0, past + n)
            elif n == DECODE_TOKENS and id(seq) not in seated:
                num_decode += 1
                width = max(width, seq.num_computed // bs + 1)  # blocks holding positions [0, past]
        num_rows = len(batch)
        # One int64 buffer: tokens, positions, write slots, adapter slots [T each]; the B attention
        # sequences' first rows (+ the end, in place) and context lengths; logit rows [up to one per
        # sequence]; block tables [B, width]. B: the decode rows (torch), or every sequence (in place).
        t, b = num_tokens, (num_rows if in_place else num_decode)
        o_dec = 4 * t
        o_ctx = o_dec + b + 1
        o_logit, o_tbl = o_ctx + b, o_ctx + b + num_rows + num_scored
        size = o_tbl + b * width
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the buffer
        self._reserve(size)
        buf = self._host_np
        tokens, positions, write, lora_idx = buf[:t], buf[t:2 * t], buf[2 * t:3 * t], buf[3 * t:4 * t]
        tables = buf[o_tbl:size].reshape(b, width)
        tables.fill(null_block)
        prefill_spans: list[tuple[PrefillSpan, Sequence]] = []
        wants_logits: list[Sequence] = []
        logit_of: list[int] = []
        scored: list[tuple[Sequence, int, int, int]] = []
        row = d = num_logits = 0
        for seq, n in batch:
            past = seq.num_computed
            prompt, out_ids = seq.prompt_ids, seq.output_ids
            blocks = seq.kv_slots.numpy()
            if in_place:
                buf[o_dec + d] = row
                buf[o_ctx + d] = past + n
                nb = (past + n - 1) // bs + 1
                tables[d, :nb] = blocks[:nb]
                d += 1
            if n == DECODE_TOKENS:
                p = len(prompt)
                tokens[row] = prompt[past] if past < p else out_ids[past - p]
                positions[row] = past
                write[row] = blocks[past // bs] * bs + past % bs
                lora_idx[row] = seq.slot
                if not in_place and id(seq) not in seated:
                    buf[o_dec + d] = row
                    buf[o_ctx + d] = past + 1
                    nb = past // bs + 1
                    tables[d, :nb] = blocks[:nb]
                    d += 1
            else:
                end, p = past + n, len(prompt)
                if end <= p:
                    tokens[row:row + n] = prompt[past:end]
                elif past >= p:
                    tokens[row:row + n] = out_ids[past - p:end - p]
                else:
                    tokens[row:row + p - past] = prompt[past:]
                    tokens[row + p - past:row + n] = out_ids[:end - p]
                pos = positions[row:row + n]
                pos[:] = range(past, end)
                write[row:row + n] = blocks[pos // bs] * bs + pos % bs
                lora_idx[row:row + n] = seq.slot
                if not in_place:
                    prefill_spans.append((PrefillSpan(row, n, past), seq))
            if n > DECODE_TOKENS and seq.prompt_logprobs is not None:  # every row: each predicts a prompt token
                buf[o_logit + num_logits:o_logit + num_logits + n] = range(row, row + n)
                scored.append((seq, num_logits, n, past))
                num_logits += n
                if past + n == seq.num_tokens:
                    wants_logits.append(seq)
                    logit_of.append(num_logits - 1)
            elif past + n == seq.num_tokens:
                buf[o_logit + num_logits] = row + n - 1
                wants_logits.append(seq)
                logit_of.append(num_logits)
                num_logits += 1
            row += n
        buf[o_dec + b] = row  # in place: the end of the last sequence's rows
        host = self._host[:size]
        if device.type == "cpu":
            dev = host  # used before the next step refills the buffer: forward is synchronous
        else:
            dev = host.to(device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        ctx_lens = dev[o_ctx:o_ctx + b]
        tables_dev = dev[o_tbl:size].view(b, width)
        if in_place:
            no_rows = dev[o_dec:o_dec]
            step = StepBatch(
                tokens=dev[:t], positions=dev[t:2 * t], write_slots=dev[2 * t:3 * t],
                lora=self._lora_mapping(lora_idx, dev[3 * t:4 * t]),
                decode_rows=no_rows, decode_blocks=no_rows.view(0, 0), decode_mask=no_rows.view(0, 1, 1, 0),
                prefills=[], logit_rows=dev[o_logit:o_logit + num_logits],
                paged=PagedBatch(tables_dev, ctx_lens, dev[o_dec:o_dec + b + 1], max_new))
            return step, wants_logits, logit_of, scored
        step = StepBatch(
            tokens=dev[:t],
            positions=dev[t:2 * t],
            write_slots=dev[2 * t:3 * t],
            lora=self._lora_mapping(lora_idx, dev[3 * t:4 * t]),
            decode_rows=dev[o_dec:o_dec + b],
            decode_blocks=tables_dev,
            # Padding points at the null block, never at memory a sequence wrote.
            decode_mask=(torch.arange(width * bs, device=device)[None, :] < ctx_lens[:, None])[:, None, None, :],
            prefills=self._prefill_groups(prefill_spans),
            logit_rows=dev[o_logit:o_logit + num_logits],
            seats=seat_plan,
        )
        return step, wants_logits, logit_of, scored

    def _lora_mapping(self, slots: np.ndarray, slots_dev: torch.Tensor) -> kernels.LoRAMapping:
        """The step's LoRA mapping: the last step's where every token has the slot it had then and no slot was
        written since (a decode batch's steady state), so the plans and grids cached on it carry over."""
        version, last = self.model.pool.version, self._last_lora
        if last is not None and last[0] == version and np.array_equal(last[1], slots):
            return last[2]
        mapping = kernels.make_lora_mapping(slots_dev, self.num_slots)
        self._last_lora = (version, slots.copy(), mapping)
        return mapping

    def _prefill_groups(self, spans: list[tuple[PrefillSpan, Sequence]]) -> list[PrefillGroup]:
        """Prefill spans bucketed for batched attention: first chunks of equal length together (causal,
        no padding); the rest by power-of-two query length and context blocks (padded and masked), first
        chunks apart (they read no cache: their keys are their own new rows)."""
        if not spans:
            return []
        bs, device = self.kv.block_size, self.device
        exact: dict[int, list[tuple[PrefillSpan, Sequence]]] = {}
        for span, seq in spans:
            if span.past == 0:
                exact.setdefault(span.length, []).append((span, seq))
        buckets: dict[tuple, list[tuple[PrefillSpan, Sequence]]] = {
            (0, length): members for length, members in exact.items() if len(members) > 1}
        for span, seq in spans:
            if span.past == 0 and (0, span.length) in buckets:
                continue
            nb = -(-(span.past + span.length) // bs)
            key = (1, span.past == 0, (span.length - 1).bit_length(), (nb - 1).bit_length())
            buckets.setdefault(key, []).append((span, seq))
        groups = []
        for key, members in buckets.items():
            s = len(members)
            starts = np.fromiter((span.start for span, _ in members), np.int64, s)
            lengths = np.fromiter((span.length for span, _ in members), np.int64, s)
            pasts = np.fromiter((span.past for span, _ in members), np.int64, s)
            fresh = key[0] == 0 or key[1]  # keys from the step's own rows: no block table
            counts = np.zeros_like(pasts) if fresh else -(-(pasts + lengths) // bs)  # blocks each span reads
            n, width = int(lengths.max()), int(counts.max())
            tables = np.full((s, width), self.kv.null_block, dtype=np.int64)
            for i, (_, seq) in enumerate(members):
                tables[i, :counts[i]] = seq.kv_slots.numpy()[:counts[i]]
            # Padded query rows repeat the span's last row (their output is dropped).
            clipped = np.minimum(np.arange(n)[None, :], lengths[:, None] - 1)  # [S, n]
            q_index = (starts[:, None] + clipped).reshape(-1)
            if key[0] == 0:
                valid = mask = None
                rows = q_index
            else:
                valid = np.flatnonzero(np.arange(n)[None, :] < lengths[:, None])
                rows = q_index[valid]
                # Query i of a span sees keys up to its own position (padded rows: the last real one's).
                last = pasts[:, None] + clipped  # [S, n]
                keys = n if fresh else width * bs
                mask = torch.from_numpy(np.arange(keys)[None, None, :] <= last[:, :, None])[:, None].to(device)
                valid = torch.from_numpy(valid).to(device)
            groups.append(PrefillGroup(n, torch.from_numpy(q_index).to(device), valid, torch.from_numpy(rows).to(device),
                                       torch.from_numpy(tables).to(device), mask, bool(fresh)))
        return groups
