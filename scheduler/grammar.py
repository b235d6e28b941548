"""Structured output: a job's response format compiled to a grammar, and a per-sequence matcher that masks
the logits to the tokens the grammar allows next.

Built on llguidance (Microsoft's grammar engine, which vLLM also uses): it compiles JSON schemas, regular
expressions and Lark grammars in Rust, bounds every compile and every mask step by fuel and size limits (a
hostile schema or regex is refused, not served for minutes), and never raises on a grammar error. Each
grammar is compiled once and cached, keyed by the format's compact text; every sequence gets a copy of
the compiled matcher, so sequences with different formats share a batch, each masked by its own.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

ALLOWED = 200  # what llguidance's one-byte-per-token mask holds for an allowed token (0: not allowed)
MAX_GRAMMAR_ERROR = 512  # a compile error may quote the schema
# JSON with its separators fixed to json.dumps's (", " and ": "): JSON's free whitespace let sampled outputs run
# on in newlines until max_new_tokens (5.7% of SmolLM2 jobs under an adapter, docs/benchmarks.md), and compact
# separators (",") derail a model trained on json.dumps's output. A schema may still ask for free whitespace
# with its own "x-guidance": {"whitespace_flexible": true}.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(Exception):
    """A response format the grammar engine cannot compile; the message says why."""


@dataclass(frozen=True)
class OutputFormat:
    """What a sequence's output must match. `kind` is json_schema, json_object, regex or choice; `spec` is the
    schema as compact JSON text (in its written key order, which is the output's property order), the pattern,
    or the choices as a JSON list."""

    kind: str
    spec: str = ""

    def grammar(self) -> str:
        """The format as a grammar in llguidance's terms."""
        import llguidance

        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.spec, defaults=JSON_OPTIONS)
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":
            # Lark string literals take JSON's escapes: each choice is matched as exactly its text.
            choices = json.loads(self.spec)
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
        raise GrammarError(f"unknown response format {self.kind!r}")


class Constraint:
    """One sequence's position in its grammar: which tokens may come next, and whether it is complete."""

    def __init__(self, matcher):
        self._matcher = matcher

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits [V] of the tokens the grammar does not allow next to -inf, in place."""
        # numpy for the comparison: one small single-threaded pass, where torch's may wait for its thread pool.
        allowed = np.frombuffer(self._matcher.compute_logit_bias(), dtype=np.uint8)
        width = min(allowed.size, logits.numel())
        logits[:width].masked_fill_(torch.from_numpy(allowed[:width] != ALLOWED), float("-inf"))
        logits[width:] = float("-inf")

    def advance(self, token: int) -> bool:
        """Take the sampled token; False if the grammar refuses it (the matcher is then in error)."""
        return self._matcher.consume_token(token)

    @property
    def accepting(self) -> bool:
        """The output so far is a complete match (it may still go on, as a number may)."""
        return self._matcher.is_accepting()

    @property
    def complete(self) -> bool:
        """Nothing but the end of the output may follow."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()

    def copy(self) -> Constraint:
        return Constraint(self._matcher.deep_copy())


class Grammars:
    """Compiled grammars, least recently used evicted past `max_entries`; safe to call from any thread."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int], max_entries: int):
        self._hf_tokenizer, self._vocab_size, self._eos_ids = tokenizer, vocab_size, eos_ids
        self.max_entries = max_entries
        self._tokenizer = None  # llguidance's view of the tokenizer: built on first use (about 0.3 s)
        self._compiled: OrderedDict[OutputFormat, object] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._compiled)

    def constraint(self, fmt: OutputFormat) -> Constraint:
        """A fresh constraint for one sequence; GrammarError if the format cannot be compiled."""
        with self._lock:
            matcher = self._compiled.get(fmt)
            if matcher is not None:
                self._compiled.move_to_end(fmt)
        if matcher is None:
            matcher = self._compile(fmt)
            with self._lock:
                self._compiled[fmt] = matcher
                self._compiled.move_to_end(fmt)
                while len(self._compiled) > self.max_entries:
                    self._compiled.popitem(last=False)
        return Constraint(matcher.deep_copy())

    def _compile(self, fmt: OutputFormat):
        import llguidance

        try:
            grammar = fmt.grammar()
        except (ValueError, TypeError) as exc:  # not a JSON object, or a choice list that is not one
            raise GrammarError(_short(str(exc))) from None
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(_short(matcher.get_error()))
        return matcher

    def _llg_tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                if self._hf_tokenizer is None:
                    raise GrammarError("the model directory has no tokenizer: structured output needs one")
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=sorted(self._eos_ids) or None)
            return self._tokenizer


def _short(reason: str) -> str:
    return reason if len(reason) <= MAX_GRAMMAR_ERROR else reason[:MAX_GRAMMAR_ERROR] + "..."
