"""A job as the engine takes it: the submitted `Request`, its validation, its life as a `Sequence`, its `Completion`.

`Request` is what a caller (the worker, a benchmark, a test) submits. `validate` turns it into prompt
token ids (a chat's `messages` rendered with the tokenizer's chat template first) or raises `RequestError`,
which carries the wire error code (`invalid_job`, `prompt_too_long`, ...) so the caller answers it without
parsing text. A valid request becomes a `Sequence`: the one
per-sequence state the scheduling policy, the model runner and the step loop share. `StopRules` decide
when a sequence is done and what text its `Completion` carries.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

    from lorabus.scheduler.grammar import OutputFormat
    from lorabus.scheduler.sampling import Sampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """How a sequence picks its tokens, in the order they apply (docs/generation.md): `logit_bias`, the penalties,
    the `min_new_tokens` and grammar masks, then greedy or `temperature`, `top_k`, `top_p`, `min_p` sampling."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # Hugging Face's: over the prompt's and the output's tokens
    presence_penalty: float = 0.0  # OpenAI's and vLLM's: over the output's tokens
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    min_new_tokens: int = 0  # until then no end-of-sequence or stop token may be drawn, and no stop string ends it
    ignore_eos: bool = False  # end-of-sequence tokens do not end the sequence (stop_token_ids still do)
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # each generated token's logprob and this many alternatives; None: none
    prompt_logprobs: int | None = None  # the same for the prompt's tokens

    @property
    def plain(self) -> bool:
        """Nothing but temperature, top-k and top-p touches the logits, and no logprobs are kept."""
        return (self.min_p == 0.0 and self.repetition_penalty == 1.0 and self.presence_penalty == 0.0
                and self.frequency_penalty == 0.0 and not self.logit_bias and self.min_new_tokens == 0
                and self.logprobs is None)


@dataclass
class Request:
    id: str
    tenant: str
    adapter: str | None = None  # an AdapterSpec key registered with the engine; None = base model
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    deadline: float | None = None  # unix epoch seconds
    # A chat: [{"role": ..., "content": ...}, ...], rendered with the tokenizer's chat template (generation
    # prompt added). Exactly one of prompt, prompt_ids and messages.
    messages: list[dict[str, str]] | None = None
    # A chat's content is plain text (False) or may hold special tokens, forged turn markers included (True).
    content_special_tokens: bool = False
    output_format: OutputFormat | None = None  # structured output: what the text must match
    n: int = 1  # samples of the one prompt, prefilled once (Completion.choices)
    # Streaming: on_partial(Partial) from the step thread every `stream_every` new tokens of a choice, and
    # with its last ones; None: no partials.
    on_partial: Callable[[Partial], None] | None = None
    stream_every: int = 1


class RequestError(Exception):
    """A request the engine refuses; `code` is its wire error code, `message` says why."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int  # prompt + output tokens per job
    kv_tokens: int  # what the whole KV cache holds, in whole blocks


def validate(request: Request, tokenizer, limits: RequestLimits) -> list[int]:
    """The request's prompt token ids; RequestError if it can never be served."""
    ids = _prompt_ids(request, tokenizer, limits.vocab_size)
    max_new = request.params.max_new_tokens
    if not isinstance(max_new, int) or max_new < 1:
        raise RequestError("invalid_job", "max_new_tokens must be an integer >= 1")
    total = len(ids) + max_new
    if total > limits.max_model_len:
        raise RequestError("prompt_too_long", f"{len(ids)} prompt + {max_new} new tokens exceed the model's limit "
                                              f"{limits.max_model_len}")
    if total > limits.kv_tokens:  # it could never be admitted: answer now, not never
        raise RequestError("prompt_too_long", f"{len(ids)} prompt + {max_new} new tokens exceed the KV cache's "
                                              f"{limits.kv_tokens} tokens")
    _check_params(request.params, limits.vocab_size)
    if not isinstance(request.n, int) or not 1 <= request.n <= MAX_CHOICES:
        raise RequestError("invalid_job", f"n must be an integer in [1, {MAX_CHOICES}]")
    if len(ids) + request.n * max_new > limits.kv_tokens:  # the choices share the prompt's blocks, not their own
        raise RequestError("prompt_too_long", f"{len(ids)} prompt + {request.n} x {max_new} new tokens exceed the "
                                              f"KV cache's {limits.kv_tokens} tokens")
    return ids


MAX_CHOICES = 16
MAX_LOGPROBS = 20


def _prompt_ids(request: Request, tokenizer, vocab_size: int) -> list[int]:
    given = [name for name in ("prompt", "prompt_ids", "messages") if getattr(request, name) is not None]
    if len(given) != 1:
        raise RequestError("invalid_job", "exactly one of prompt, prompt_ids and messages is required"
                                          + (f" (got {', '.join(given)})" if given else ""))
    if request.prompt_ids is not None:
        ids = list(request.prompt_ids)
        # A negative id would index the embedding from its end: wrong output, not an error.
        if not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
            raise RequestError("invalid_job", f"prompt_ids must be integers in [0, {vocab_size})")
    elif request.messages is not None:
        ids = render_chat(request.messages, tokenizer, request.content_special_tokens)
    else:
        if tokenizer is None:
            raise RequestError("invalid_job", "the model directory has no tokenizer; send prompt_ids")
        if not isinstance(request.prompt, str):
            raise RequestError("invalid_job", "prompt must be a string")
        ids = tokenizer(request.prompt)["input_ids"]
    if not ids:
        raise RequestError("invalid_job", "the prompt encodes to no tokens")
    return ids


MAX_TEMPLATE_ERROR = 512  # a template's error may quote the messages
# Private-use characters (plane 15) that wrap a control token found in a message's content, so that after
# rendering it can be told apart from the control tokens the template writes; the same pair Hugging Face's
# `apply_chat_template(sanitize_control_tokens=True)` uses. Content loses any it holds before marking.
MARK_START, MARK_END = "\U000f0000", "\U000f0001"


def render_chat(messages, tokenizer, content_special_tokens: bool = False) -> list[int]:
    """The prompt ids of a chat: the tokenizer's chat template with the generation prompt added, then the
    text tokenized (the template writes every special token it wants, a BOS included).

    By default a control token (a special token, or an added token the template writes) spelled out inside a
    message's content is tokenized as plain text, so content cannot forge turns (`<|im_end|>` then
    `<|im_start|>system`): the same ids as Hugging Face's `apply_chat_template(..., sanitize_control_tokens=True)`.
    `content_special_tokens` tokenizes the rendered text as it stands (the ids of `apply_chat_template`)."""
    if tokenizer is None:
        raise RequestError("invalid_job", "the model directory has no tokenizer; send prompt_ids")
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("invalid_job", "the model has no chat template; send prompt or prompt_ids")
    if not (isinstance(messages, (list, tuple)) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise RequestError("invalid_job", "messages must be a non-empty list of {role, content} strings")
    # Fresh dicts: a template sees only role and content, and cannot change the caller's.
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    control = None if content_special_tokens else _control_tokens(tokenizer)
    if control is None or not any(control.search(m["content"]) for m in chat):
        # Nothing to tell apart: the rendered text as it stands.
        return tokenizer(_render(chat, tokenizer), add_special_tokens=False)["input_ids"]
    for m in chat:
        content = m["content"].replace(MARK_START, "").replace(MARK_END, "")  # no marks but ours
        m["content"] = control.sub(lambda found: MARK_START + found.group() + MARK_END, content)
    return _encode_marked(_render(chat, tokenizer), tokenizer, control)


def _render(chat: list[dict], tokenizer) -> str:
    try:
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja's TemplateError (raise_exception in a template), a template bug, ...
        reason = f"{type(exc).__name__}: {exc}"
        if len(reason) > MAX_TEMPLATE_ERROR:
            reason = reason[:MAX_TEMPLATE_ERROR] + "..."
        raise RequestError("invalid_job", f"the model's chat template refused the messages: {reason}") from None
    if not isinstance(text, str):
        raise RequestError("invalid_job", "the model's chat template did not render to text")
    return text


def _control_tokens(tokenizer) -> re.Pattern:
    """What content may not spell as tokens: the tokenizer's added tokens that are special, and those the chat
    template writes (the tokenizer's `chat_control_tokens` where it lists them; else those in the template's
    text, whitespace tokens such as Gemma's newline excepted, since templates write those as ordinary text)."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    listed = getattr(tokenizer, "chat_control_tokens", None)
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    # Only added tokens: the tokenizer matches no other text as one token, so content cannot spell any other.
    tokens = {token.content for token in added
              if token.special or (token.content in listed if listed is not None
                                   else token.content in template and not token.content.isspace())}
    return _alternation(tuple(sorted(token for token in tokens if token)))


@functools.lru_cache(maxsize=8)
def _alternation(tokens: tuple[str, ...]) -> re.Pattern:
    """A regex matching any of `tokens`, the longest first (a token wins over the tokens it contains)."""
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)")


def _encode_marked(text: str, tokenizer, control: re.Pattern) -> list[int]:
    """The ids of a chat rendered from marked content: a marked control token as plain text (without its marks),
    the rest (the template's own control tokens included) as it stands. A mark left alone (a template that
    splits content) is dropped, but still separates the text around it, so no two pieces join into a token."""
    pieces = re.split(f"{MARK_START}({control.pattern}){MARK_END}|[{MARK_START}{MARK_END}]", text)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    ids = tokenizer(pieces[0], add_special_tokens=False)["input_ids"]
    for i, piece in enumerate(pieces[1:], start=1):
        if not piece:  # an empty text piece, or None: the token of a lone mark
            continue
        as_text = i % 2 == 1  # [text, marked token, text, marked token, ..., text]
        piece_ids = _encode_piece(tokenizer, piece, as_text, newline)
        if as_text and tokenizer.convert_tokens_to_ids(piece) in piece_ids:
            raise RequestError("invalid_job", f"a message's content holds {piece!r}, which this model's tokenizer "
                                              "cannot encode as plain text; remove it, or set content_special_tokens")
        ids += piece_ids
    return ids


def _encode_piece(tokenizer, piece: str, as_text: bool, newline: list[int]) -> list[int]:
    """A piece from the middle of a chat, as plain text (no added token matched) when `as_text`. Encoded after a
    newline that is then taken off again, so a SentencePiece tokenizer adds no prefix space, as it would at the
    start of a text."""
    def encode(text: str) -> list[int]:
        return _plain_text_ids(tokenizer, text) if as_text else tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = encode("\n" + piece)
    if ids[:len(newline)] == newline:
        return ids[len(newline):]
    return encode(piece)


def _plain_text_ids(tokenizer, text: str) -> list[int]:
    """`text` through the tokenizer's normalizer, pre-tokenizer and model, none of its added tokens matched
    (`split_special_tokens` would still match the added tokens that are not special)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    splits = [split for split, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
    return [token.id for split in splits for token in backend.model.tokenize(split)]


def _check_params(params: SamplingParams, vocab_size: int) -> None:
    """Refuse sampling numbers that have no meaning; extreme but meaningful ones are the sampler's job."""
    if not (isinstance(params.temperature, (int, float)) and math.isfinite(params.temperature)
            and params.temperature >= 0):
        raise RequestError("invalid_job", "temperature must be a finite number >= 0")
    if not (isinstance(params.top_p, (int, float)) and 0 <= params.top_p <= 1):
        raise RequestError("invalid_job", "top_p must be a number in [0, 1]")
    if not isinstance(params.top_k, int) or params.top_k < 0:
        raise RequestError("invalid_job", "top_k must be an integer >= 0")
    if params.seed is not None and not isinstance(params.seed, int):
        raise RequestError("invalid_job", "seed must be an integer or null")
    if not all(isinstance(stop, str) for stop in params.stop):
        raise RequestError("invalid_job", "stop must be strings")
    if not 0 <= params.min_p <= 1:
        raise RequestError("invalid_job", "min_p must be a number in [0, 1]")
    if not (math.isfinite(params.repetition_penalty) and params.repetition_penalty > 0):
        raise RequestError("invalid_job", "repetition_penalty must be a finite number > 0")
    if not all(math.isfinite(x) for x in (params.presence_penalty, params.frequency_penalty)):
        raise RequestError("invalid_job", "presence_penalty and frequency_penalty must be finite numbers")
    # A token id past the vocabulary would index the logits out of range: refused, not a failed step.
    for name, ids in (("logit_bias", [i for i, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids)):
        if not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
            raise RequestError("invalid_job", f"{name} names token ids outside [0, {vocab_size})")
    if not all(math.isfinite(bias) for _, bias in params.logit_bias):
        raise RequestError("invalid_job", "logit_bias values must be finite numbers")
    if not (isinstance(params.min_new_tokens, int) and 0 <= params.min_new_tokens <= params.max_new_tokens):
        raise RequestError("invalid_job", "min_new_tokens must be an integer in [0, max_new_tokens]")
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(params, name)
        if k is not None and not (isinstance(k, int) and 0 <= k <= MAX_LOGPROBS):
            raise RequestError("invalid_job", f"{name} must be an integer in [0, {MAX_LOGPROBS}] or null")


@dataclass(frozen=True)
class TokenLogprob:
    """A token, its logprob, and the most likely tokens at its position as (id, text, logprob), best first."""

    id: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass
class ChoiceOutput:
    """One of a job's n samples."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Partial:
    """A streamed piece of choice `index`: the tokens generated since its last piece, and their text."""

    id: str
    index: int
    token_ids: list[int]
    text: str


@dataclass
class Completion:
    id: str
    status: str  # "ok" | "error"
    token_ids: list[int] = field(default_factory=list)  # choice 0's (also text, finish_reason and logprobs)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length"
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # the first prompt token has none
    choices: list[ChoiceOutput] | None = None  # every choice when n > 1
    prompt_tokens: int = 0
    error_code: str | None = None
    error_message: str | None = None
    queue_s: float = 0.0  # arrival → admitted into the batch
    ttft_s: float | None = None  # arrival → first token
    total_s: float = 0.0
    cold: bool = False  # its adapter was not resident on arrival (ttft_s is then the cold start)


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One job from submission to its answer: what the policy, the runner and the step loop keep of it."""

    def __init__(self, request: Request, prompt_ids: list[int], arrival: float,
                 on_done: Callable[[Completion], None], deadline: float | None = None, sampler: Sampler | None = None):
        self.request = request
        self.prompt_ids = prompt_ids
        self.arrival = arrival  # on the step loop's clock
        self.deadline = deadline  # on the step loop's clock
        self.on_done = on_done
        self.sampler = sampler  # None only where no model runs (the simulations)
        self.answered = False  # on_done was called: a later failure must not answer it again
        # The scheduling policy's bookkeeping.
        self.state = State.WAITING
        self.output_ids: list[int] = []
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.blocks: list[int] = []
        self.slot = -1  # device adapter slot while running; -1 = base model
        self.cold = False  # its adapter was not resident when it arrived
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.done_by = 0  # while running: the scheduler step by which it is finished, at the latest
        # The model runner's: cache index of every position the sequence may use (set on its first step).
        self.kv_slots: torch.Tensor | None = None
        self.text: str | None = None  # set early only when a stop string cut it
        # Generation controls: what logprobs asked for is kept as (token, logprob, top ids, top logprobs).
        self.logprobs: list[tuple] | None = [] if request.params.logprobs is not None else None
        self.prompt_logprobs: list[tuple | None] | None = [None] if request.params.prompt_logprobs is not None else None
        self.finish_reason: str | None = None
        self.streamed = 0  # output tokens already sent as partials, and their text
        self.streamed_text = ""
        # A job with n > 1: its first sequence (index 0) holds the others in `choices`; they share its prompt's
        # full KV blocks and start from its last prefill logits (`shared_blocks`: what they read of its cache).
        self.index = 0
        self.parent: Sequence | None = None
        self.choices: list[Sequence] = []
        self.shared_blocks: list[int] = []
        self.live = 0  # a parent: its choices (itself included) not yet finished, while running
        # The prefix cache's (docs/scheduling.md, "Prefix caching"): a mix's member keys (re-publishing one
        # changes what the mix computes), the adapter identity the sequence was admitted under, and how many
        # of its first blocks came from the cache (shared with other sequences: never zeroed, never written).
        self.adapter_parts: tuple[str, ...] = ()
        self.prefix_identity: tuple | None = None
        self.cached_blocks = 0

    @property
    def job(self) -> Sequence:
        """The sequence that answers the job: this one, or the first choice of its job."""
        return self.parent or self

    @property
    def width(self) -> int:
        """Sequences the job runs as: n."""
        return 1 + len(self.choices)

    @property
    def cost(self) -> int:
        return len(self.prompt_ids) + self.request.params.max_new_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass(frozen=True)
class StopRules:
    """When a sequence is done, and its text. Without a tokenizer no stop string matches and the text is empty."""

    tokenizer: object | None
    eos_ids: frozenset[int]
    max_model_len: int

    def finish_reason(self, seq: Sequence) -> str | None:
        params = seq.request.params
        out = seq.output_ids
        if len(out) >= params.min_new_tokens:  # before min_new_tokens only the length ends a sequence
            if params.stop and self.tokenizer is not None:  # decoding every step costs: only for stop strings
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                hits = [text.find(s) for s in params.stop if s in text]
                if hits:
                    seq.text = text[: min(hits)]
                    return "stop"
            if out[-1] in params.stop_token_ids or (out[-1] in self.eos_ids and not params.ignore_eos):
                return "stop"
        constraint = seq.sampler.constraint if seq.sampler is not None else None
        if constraint is not None and constraint.complete:  # the grammar allows nothing more: it wins
            return "stop"
        if len(out) >= params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def text(self, seq: Sequence) -> str:
        if seq.text is not None:
            return seq.text
        if self.tokenizer is None:
            return ""
        out = seq.output_ids
        if out and seq.finish_reason == "stop" and out[-1] in seq.request.params.stop_token_ids:
            out = out[:-1]  # the stop token ends the text, as a stop string does, and is not part of it
        return self.tokenizer.decode(out, skip_special_tokens=True)

    def partial_text(self, seq: Sequence) -> str:
        """The text so far of a sequence still running, less what may yet change: an incomplete character at
        the end, or an end that could be the start of a stop string."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True).rstrip("\ufffd")
        for stop in seq.request.params.stop:
            for length in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:length]):
                    text = text[:-length]
                    break
        return text

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else ""


# ---- calls from the engine's threads into caller code ----------------------------------------------------
# Caller code may raise; that is logged and goes no further, so no callback can take an engine thread down.

def deliver(on_done: Callable[[Completion], None], completion: Completion) -> None:
    """Hand a job's completion to its caller."""
    try:
        on_done(completion)
    except Exception:
        log.exception("on_done for %s failed", completion.id)


def call_hook(hook: Callable | None, *args) -> None:
    """Metrics hooks are observers: their failure is logged, never the jobs' problem."""
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:
        log.exception("engine hook %s failed", getattr(hook, "__name__", hook))
