"""Request models (pydantic, validated strictly: a string where a number belongs is an error, not a
guess) and builders of the OpenAI response bodies.

Fields follow the OpenAI API. Extensions: ``top_k`` (as in vLLM) and ``speculative`` (engine and
drafting settings of this request); responses add ``speculative_metrics`` (``Metrics.summary()``).
Fields OpenAI clients may send but that this server cannot honour (n > 1, logprobs, penalties, ...)
are refused with a 400 that names them rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engines import GenerationResult

SEED_RANGE = dict(ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed accepts


class _Strict(BaseModel):
    # extra="ignore": clients send fields with no effect here (user, metadata, store, ...).
    model_config = ConfigDict(strict=True, extra="ignore")


class Speculative(_Strict):
    """Per-request extension: which engine decodes and how it drafts (never changes the output law)."""

    model_config = ConfigDict(strict=True, extra="forbid")  # a typo here would silently do nothing
    engine: str | None = None
    num_draft_tokens: int | None = None  # gamma
    branches: int | None = None
    tau: float | None = None
    draft_sampling: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class GenerationRequest(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None  # omitted: 1.0, the OpenAI default
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, **SEED_RANGE)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    speculative: Speculative | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a requested feature this server does not implement."""
        if self.n != 1:
            return "n", "only n = 1 is supported (one completion per request)"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty", "presence/frequency penalties are not supported (they would change the output law)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "only best_of = 1 is supported"
        if self.logprobs is not None:
            return "logprobs", "logprobs are not supported"
        return super().unsupported()


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message text; content parts must all be text (no images or audio here)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(p.type != "text" or p.text is None for p in self.content):
            raise ValueError("only text content parts are supported")
        return "".join(p.text for p in self.content)  # type: ignore[misc]


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer OpenAI name of max_tokens
    logprobs: bool | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        return super().unsupported()


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(result: GenerationResult) -> dict[str, int]:
    p, c = result.metrics.prompt_tokens, len(result.tokens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def speculative_metrics(engine: str, result: GenerationResult) -> dict[str, Any]:
    return {"engine": engine, **result.metrics.summary()}


def completion_body(rid: str, model: str, engine: str, result: GenerationResult) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}],
        "usage": usage(result), "speculative_metrics": speculative_metrics(engine, result),
    }


def chat_body(rid: str, model: str, engine: str, result: GenerationResult) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                     "finish_reason": result.finish_reason}],
        "usage": usage(result), "speculative_metrics": speculative_metrics(engine, result),
    }


def completion_chunk(rid: str, model: str, text: str, finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, obj: str, result: GenerationResult) -> dict:
    """The extra last chunk OpenAI sends with stream_options.include_usage: no choices, just usage."""
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(result)}
