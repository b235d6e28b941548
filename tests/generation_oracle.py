"""References for the generation controls (tests/test_generation*.py): Hugging Face `generate` with its own
processors (repetition penalty, min_new_tokens, sequence bias, EOS lists), an HF logits processor that applies
an llguidance grammar (a second implementation of the glue in scheduler/grammar.py: it reads llguidance's
bitmask, not its logit bias), and float64 references of what HF has no processor for (presence/frequency
penalties, min_p sampling in the documented order)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers import PeftOracle

# A divergence from the reference is tolerated only where its top two scores are this close (float32 noise).
NEAR_TIE = 1e-4


@functools.cache
def peft_oracle(model_dir: Path) -> PeftOracle:
    """One oracle (and one loaded model per adapter) per model directory for the whole session."""
    return PeftOracle(model_dir)


@dataclass
class Reference:
    """A reference run: its generated tokens, and per generated token the processed scores it was chosen
    from and the model's raw logits ([V] each, float64)."""

    tokens: list[int]
    scores: list[torch.Tensor]
    logits: list[torch.Tensor]

    def assert_tokens(self, got: list[int], label: str) -> None:
        """Tokens must equal the reference's; a divergence is tolerated only at a near-tie of its scores."""
        if got == self.tokens:
            return
        split = next((i for i, (a, b) in enumerate(zip(got, self.tokens)) if a != b), min(len(got), len(self.tokens)))
        assert split < len(self.scores), f"{label}: got {got}, reference {self.tokens}"
        top = torch.topk(self.scores[split], 2).values
        margin = float(top[0] - top[1])
        assert margin < NEAR_TIE, f"{label}: diverges at {split}: got {got}, reference {self.tokens} (margin {margin:.3g})"
        print(f"{label}: accepted divergence at token {split}: the reference's top-2 margin is {margin:.2e}")


@torch.no_grad()
def hf_greedy(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int,
              **generate_kwargs) -> Reference:
    """transformers/PEFT greedy `generate` with `generate_kwargs` (repetition_penalty=, min_new_tokens=,
    sequence_bias=, eos_token_id=, logits_processor=, ...)."""
    oracle = peft_oracle(model_dir)
    ids = torch.tensor([prompt_ids])
    out = oracle.model(adapter_dir).generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=oracle.tokenizer.pad_token_id, output_scores=True, output_logits=True,
        return_dict_in_generate=True, **generate_kwargs)
    return Reference(out.sequences[0, len(prompt_ids):].tolist(), [s[0].double() for s in out.scores],
                     [lg[0].double() for lg in out.logits])


def sequence_bias(logit_bias: dict[int, float]) -> list:
    """A job's logit_bias as HF's `sequence_bias` (each a one-token sequence: added at every step)."""
    return [[[token], bias] for token, bias in logit_bias.items()]


@torch.no_grad()
def prompt_logits(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int]) -> torch.Tensor:
    """The model's raw logits over the prompt [len(prompt), V] (row i predicts token i + 1), float64."""
    return peft_oracle(model_dir).model(adapter_dir)(torch.tensor([prompt_ids])).logits[0].double()


@torch.no_grad()
def penalized_greedy(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int,
                     presence: float, frequency: float, eos_ids: set[int]) -> Reference:
    """Greedy decoding under OpenAI's presence/frequency penalties in float64: at each step the HF model's raw
    logits minus frequency * count + presence * (count > 0), counts over the output only."""
    model = peft_oracle(model_dir).model(adapter_dir)
    tokens, scores, logits = [], [], []
    for _ in range(max_new_tokens):
        raw = model(torch.tensor([prompt_ids + tokens])).logits[0, -1].double()
        counts = torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=raw.numel()).double()
        x = raw - frequency * counts - presence * (counts > 0).double()
        tokens.append(int(x.argmax()))
        scores.append(x)
        logits.append(raw)
        if tokens[-1] in eos_ids:
            break
    return Reference(tokens, scores, logits)


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """The float64 distribution a sampled token is drawn from, in the documented order: temperature, top-k
    (the k largest logits), top-p (the smallest most-likely prefix holding top_p of the mass), min-p (tokens at
    least min_p times as likely as the most likely one); renormalized after each cut."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_k:
        kth = probs.sort(descending=True).values[top_k - 1]
        probs = torch.where(probs >= kth, probs, 0.0)
        probs /= probs.sum()
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        mass_before = ordered.cumsum(0) - ordered
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order[mass_before < top_p]] = True
        keep[order[0]] = True
        probs = torch.where(keep, probs, 0.0)
        probs /= probs.sum()
    if min_p:
        probs = torch.where(probs >= min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
    return probs


# ---- job settings both test files derive from the reference ------------------------------------------------

FOX, HELLO, SENTIMENT = "the quick brown fox", "hello world", "classify sentiment: i loved this film"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                          "maximum": 99}},
          "required": ["ok", "n"], "additionalProperties": False,
          "x-guidance": {"whitespace_flexible": False}}  # a random model would otherwise pad with whitespace forever


def eos_bias(model_dir: Path, prompt_ids: list[int], eos: int) -> float:
    """A logit bias that makes EOS the base model's greedy choice within four tokens of the prompt."""
    logits = hf_greedy(model_dir, None, prompt_ids, 4).logits[3]
    return float(logits.max() - logits[eos]) + 0.05


def late_token(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int]) -> int:
    """A token (with visible text) that greedy decoding first reaches at its fourth position or later."""
    tokens = hf_greedy(model_dir, adapter_dir, prompt_ids, 12).tokens
    decode = peft_oracle(model_dir).tokenizer.decode
    return next(t for i, t in enumerate(tokens) if i >= 3 and t not in tokens[:i] and decode([t]).strip())


# ---- structured output ---------------------------------------------------------------------------------

@functools.cache
def llg_tokenizer(model_dir: Path, vocab_size: int):
    import llguidance.hf

    return llguidance.hf.from_tokenizer(peft_oracle(model_dir).tokenizer, n_vocab=vocab_size)


# The engine's JSON options (scheduler/grammar.py), written out: the oracle must compile the same grammar.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar(kind: str, spec) -> str:
    """llguidance's grammar for a response format: a JSON schema (a dict), a regex, or a list of choices."""
    import json

    import llguidance

    if kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(spec), defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    assert kind == "choice", kind
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))


class GrammarLogitsProcessor:
    """An HF logits processor (batch of one) that lets through only the tokens the grammar allows next: it
    feeds the matcher the tokens generated since its last call and masks the scores with llguidance's bitmask."""

    def __init__(self, matcher, prompt_len: int):
        self.matcher, self.prompt_len, self.consumed = matcher, prompt_len, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        new = input_ids[0, self.prompt_len + self.consumed:].tolist()
        for token in new:
            assert self.matcher.consume_token(token), self.matcher.get_error()
        self.consumed += len(new)
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        bits = (words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
        allowed = bits.flatten().bool()[:scores.shape[-1]]
        allowed = torch.cat([allowed, allowed.new_zeros(scores.shape[-1] - allowed.numel())])
        return scores.masked_fill(~allowed, float("-inf"))


def hf_structured(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int,
                  grammar_text: str, vocab_size: int) -> tuple[Reference, bool]:
    """HF greedy under the grammar; its tokens end where the grammar is complete (the EOS HF then forces is
    not part of the output). Also whether it ended there (else max_new_tokens came first)."""
    import llguidance
    from transformers import LogitsProcessorList

    tokenizer = llg_tokenizer(model_dir, vocab_size)
    processor = GrammarLogitsProcessor(llguidance.LLMatcher(tokenizer, grammar_text), len(prompt_ids))
    run = hf_greedy(model_dir, adapter_dir, prompt_ids, max_new_tokens,
                    logits_processor=LogitsProcessorList([processor]))
    replay = llguidance.LLMatcher(tokenizer, grammar_text)
    for i, token in enumerate(run.tokens):
        assert replay.consume_token(token), replay.get_error()
        if replay.is_stopped():
            return Reference(run.tokens[:i + 1], run.scores[:i + 1], run.logits[:i + 1]), True
    return run, False


# ---- logprobs ------------------------------------------------------------------------------------------

LOGPROB_TOLERANCE = 1e-4


def assert_logprobs(entries, rows: list[torch.Tensor], ids: list[int], k: int, label: str) -> None:
    """Logprob entries (engine or wire form) against the log-softmax of reference rows, entry i naming ids[i]:
    its logprob within 1e-4 and its top k the reference's k most likely tokens (those of probability 0 left
    out), in order, with their logprobs."""
    assert len(entries) == len(rows) == len(ids), f"{label}: {len(entries)} entries, {len(rows)} rows, {len(ids)} ids"
    for i, (entry, row, token) in enumerate(zip(entries, rows, ids)):
        want = torch.log_softmax(row.double(), dim=-1)
        assert entry.id == token, f"{label}[{i}]: entry for {entry.id}, expected {token}"
        assert abs(entry.logprob - float(want[token])) < LOGPROB_TOLERANCE, f"{label}[{i}]: {entry.logprob} vs {float(want[token])}"
        values, top_ids = torch.topk(want, k)
        finite = torch.isfinite(values)
        top = [(t[0], t[2]) if isinstance(t, tuple) else (t.id, t.logprob) for t in entry.top]
        assert [t for t, _ in top] == top_ids[finite].tolist(), f"{label}[{i}]: top {top}, reference {top_ids.tolist()}"
        assert all(abs(lp - v) < LOGPROB_TOLERANCE for (_, lp), v in zip(top, values[finite].tolist())), f"{label}[{i}]"
