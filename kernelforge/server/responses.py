"""OpenAI's response shapes: whole responses, stream chunks, usage and logprobs,
and the text of a request as its tokens arrive."""
from __future__ import annotations

import json
import time
import uuid
from typing import Optional


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(obj) -> str:
    """One server-sent event carrying ``obj`` as JSON (or the literal ``[DONE]``)."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


class TextDelta:
    """A request's output text as its tokens arrive: each ``push`` returns the
    new text that is safe to send. Text is held back while it ends in a partial
    UTF-8 character, and by one character less than the longest stop string
    (a stop string may be completing); the text ends before the first stop
    string found."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""

    def push(self, ids: list[int], final: bool) -> str:
        self.ids += ids
        text = self.tok.decode(self.ids) if self.tok is not None else ""
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
        elif not final:
            if text.endswith("\ufffd"):
                return ""
            text = text[:max(len(self.sent), len(text) - self.hold)]
        if not text.startswith(self.sent):      # a decode that rewrote sent text: wait
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    @property
    def text(self) -> str:
        return self.sent


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _piece(tokenizer, token_id: int) -> str:
    """A token's text; a token that is part of a UTF-8 character alone is named
    ``token_id:N`` (vLLM's spelling), so distinct tokens never share a key."""
    s = tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else ""
    return s if s and "\ufffd" not in s else f"token_id:{token_id}"


def completion_logprobs(tokenizer, ids: list[int], entries: list, offset: int = 0) -> dict:
    """The legacy completions ``logprobs`` object for ``ids`` (text offsets from ``offset``)."""
    tokens, offsets, pos = [], [], offset
    for i in ids:
        tokens.append(_piece(tokenizer, i))
        offsets.append(pos)
        pos += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp for lp, _ in entries],
            "top_logprobs": [{_piece(tokenizer, t): v for t, v in top.items()}
                             for _, top in entries],
            "text_offset": offsets}


def chat_logprobs(tokenizer, ids: list[int], entries: list) -> dict:
    """The chat ``logprobs`` object (``{"content": [...]}``) for ``ids``."""
    def one(t, lp):
        s = _piece(tokenizer, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**one(t, lp), "top_logprobs": [one(k, v) for k, v in top.items()]}
                        for t, (lp, top) in zip(ids, entries)]}


class Shapes:
    """Builds one endpoint's responses: ``chat`` or ``completion``."""

    def __init__(self, chat: bool, model: str, tokenizer):
        self.chat, self.model, self.tok = chat, model, tokenizer
        self.id = request_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict:
        obj = ("chat.completion" if self.chat else "text_completion") + (
            ".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def logprobs(self, ids, entries, offset=0) -> Optional[dict]:
        if entries is None:
            return None
        return (chat_logprobs(self.tok, ids, entries) if self.chat
                else completion_logprobs(self.tok, ids, entries, offset))

    def chunk(self, index: int, text: Optional[str], finish_reason: Optional[str] = None,
              logprobs: Optional[dict] = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs,
                      "finish_reason": finish_reason}
        return {**self._head(True), "choices": [choice], "usage": None}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._head(True), "choices": [], "usage": usage(prompt_tokens,
                                                                  completion_tokens)}

    def response(self, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
        """``choices``: per choice, dict(text=, finish_reason=, logprobs=)."""
        out = []
        for i, c in enumerate(choices):
            if self.chat:
                out.append({"index": i, "message": {"role": "assistant", "content": c["text"]},
                            "logprobs": c["logprobs"], "finish_reason": c["finish_reason"]})
            else:
                out.append({"index": i, "text": c["text"], "logprobs": c["logprobs"],
                            "finish_reason": c["finish_reason"]})
        return {**self._head(False), "choices": out,
                "usage": usage(prompt_tokens, completion_tokens)}
