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
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

    from lorabus.scheduler.sampling import Sampler


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


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
    _check_params(request.params)
    return ids


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
        ids = render_chat(request.messages, tokenizer)
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


def render_chat(messages, tokenizer) -> list[int]:
    """The prompt ids of a chat: the tokenizer's chat template with the generation prompt added, then the
    text tokenized as it stands (the template writes every special token it wants, a BOS included)."""
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
    try:
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja's TemplateError (raise_exception in a template), a template bug, ...
        reason = f"{type(exc).__name__}: {exc}"
        if len(reason) > MAX_TEMPLATE_ERROR:
            reason = reason[:MAX_TEMPLATE_ERROR] + "..."
        raise RequestError("invalid_job", f"the model's chat template refused the messages: {reason}") from None
    if not isinstance(text, str):
        raise RequestError("invalid_job", "the model's chat template did not render to text")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _check_params(params: SamplingParams) -> None:
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


@dataclass
class Completion:
    id: str
    status: str  # "ok" | "error"
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length"
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
        if params.stop and self.tokenizer is not None:  # decoding every step costs: only for stop strings
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            hits = [text.find(s) for s in params.stop if s in text]
            if hits:
                seq.text = text[: min(hits)]
                return "stop"
        if seq.output_ids[-1] in self.eos_ids:
            return "stop"
        if len(seq.output_ids) >= params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def text(self, seq: Sequence) -> str:
        if seq.text is not None:
            return seq.text
        return self.tokenizer.decode(seq.output_ids, skip_special_tokens=True) if self.tokenizer else ""
