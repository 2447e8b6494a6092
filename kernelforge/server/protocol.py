"""OpenAI's request shapes (completions and chat completions) and their
conversion to a checked ``SamplingParams``.

Every parameter is checked here, when the request arrives, so a bad one is a
400 naming the field and never a failed engine step. Fields OpenAI defines
that this server does not implement are refused when set to anything but
their default; unknown fields are ignored, as OpenAI's own API does.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..runtime.sampling_params import SamplingParams, SamplingParamsError

MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error response: HTTP status, OpenAI error type, message, and the bad parameter."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type
        self.code, self.headers = code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields both endpoints share (vLLM's extras included: top_k, min_p,
    repetition_penalty, ignore_eos)."""
    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    n: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logit_bias: Optional[dict] = None
    user: Optional[str] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16            # OpenAI's default for completions
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list] = None
    tool_choice: Optional[Union[str, dict]] = None
    response_format: Optional[dict] = None


def _refuse_unsupported(req: _Sampling) -> None:
    if req.n not in (None, 1):
        raise bad("n", f"only n=1 is supported, got {req.n}")
    if req.logit_bias:
        raise bad("logit_bias", "is not supported")
    if req.stream_options is not None and not req.stream:
        raise bad("stream_options", "is only allowed with stream: true")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise bad("echo", "is not supported")
        if req.best_of not in (None, 1):
            raise bad("best_of", f"only best_of=1 is supported, got {req.best_of}")
        if req.suffix:
            raise bad("suffix", "is not supported")
    if isinstance(req, ChatCompletionRequest):
        if req.tools or req.tool_choice not in (None, "none"):
            raise bad("tools", "tool calls are not supported")
        if req.response_format and req.response_format.get("type") != "text":
            raise bad("response_format", "only {\"type\": \"text\"} is supported")


def top_logprobs_of(req: _Sampling) -> Optional[int]:
    """How many top logprobs per token the request asked for (None: no logprobs)."""
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise bad("top_logprobs", "needs logprobs: true")
        n = (req.top_logprobs or 0) if req.logprobs else None
        name = "top_logprobs"
    else:
        n, name = req.logprobs, "logprobs"
    if n is not None and not 0 <= n <= MAX_TOP_LOGPROBS:
        raise bad(name, f"must be an int in [0, {MAX_TOP_LOGPROBS}], got {n}")
    return n


def sampling_params(req: _Sampling, prompt_len: int, max_model_len: int) -> SamplingParams:
    """The request's SamplingParams, checked against the model's context."""
    _refuse_unsupported(req)
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens, "
                       f"and the prompt has {prompt_len}: no room for a new token",
                       "messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                       code="context_length_exceeded")
    name, max_tokens = "max_tokens", req.max_tokens
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        name, max_tokens = "max_completion_tokens", req.max_completion_tokens
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise APIError(400, f"{name}: this model's maximum context length is {max_model_len} "
                       f"tokens; the prompt has {prompt_len}, so at most {room} can be "
                       f"generated, but {max_tokens} were asked", name,
                       code="context_length_exceeded")
    given = {k: getattr(req, k) for k in ("temperature", "top_p", "top_k", "min_p", "seed",
                                          "presence_penalty", "frequency_penalty",
                                          "repetition_penalty")
             if getattr(req, k) is not None}
    try:
        return SamplingParams(max_tokens=max_tokens, stop=req.stop or [],
                              ignore_eos=req.ignore_eos, logprobs=top_logprobs_of(req), **given)
    except SamplingParamsError as e:
        field = name if e.field == "max_tokens" else e.field
        raise bad(field, str(e).replace(f"SamplingParams.{e.field} ", "", 1)) from None
