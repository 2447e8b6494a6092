"""The serving engine loop: one thread runs ``LLM.step`` for every HTTP request.

Requests join the running batch between steps and leave it when they finish
or are aborted (a client gone, a timeout), so the batch is continuous across
clients. The HTTP side never touches the scheduler: it posts "add" and "abort"
commands to an inbox that the loop applies before each step, and receives
each step's new tokens on its own asyncio queue.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ..runtime.llm import LLM
from ..runtime.sequence import Sequence
from .metrics import Metrics

log = logging.getLogger("kernelforge.server")


class QueueFullError(RuntimeError):
    """The waiting queue holds ``max_waiting`` requests already."""


@dataclass
class Delta:
    """What one step gave one request."""
    token_ids: list
    logprobs: list                       # entries for token_ids when the request asked
    finished: bool
    finish_reason: Optional[str] = None
    error: Optional[str] = None


@dataclass(eq=False)
class Request:
    """One sequence in flight and where its deltas go."""
    seq: Sequence
    queue: asyncio.Queue
    tag: Any = None                     # the caller's label, e.g. a choice index
    arrival: float = field(default_factory=time.monotonic)
    last_token: Optional[float] = None
    done: bool = False


class AsyncEngine:
    """Continuous batching for many asyncio clients over one ``LLM``.

    Args:
        llm: the engine; only this object's thread steps it once started.
        max_waiting: requests that may wait for a place in the batch; one more
            is refused with ``QueueFullError`` (backpressure, not unbounded memory).
    """

    def __init__(self, llm: LLM, max_waiting: int = 256, metrics: Optional[Metrics] = None):
        self.llm = llm
        self.max_waiting = max_waiting
        self.metrics = metrics or Metrics()
        self.metrics.bind(self)
        self._inbox: collections.deque = collections.deque()
        self._live: dict[int, Request] = {}
        self._wake = threading.Event()
        self._stop = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self.steps = 0

    # -- state the HTTP side and /metrics read -------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.llm.scheduler.running)

    @property
    def num_waiting(self) -> int:
        """Requests not in the running batch (queued, or just arrived)."""
        return len(self.llm.scheduler.waiting) + sum(1 for c, _ in list(self._inbox) if c == "add")

    @property
    def queue_length(self) -> int:
        """Requests that will wait: those not running beyond the batch's free places."""
        sched = self.llm.scheduler
        return max(0, self.num_waiting - max(0, sched.max_num_seqs - len(sched.running)))

    @property
    def blocks_in_use(self) -> int:
        return self.llm.pool.num_blocks - self.llm.pool.num_free

    # -- the asyncio side ----------------------------------------------------------------

    def start(self, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kernelforge-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Abort what is left and end the loop thread."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def add(self, seq: Sequence, queue: asyncio.Queue, tag: Any = None) -> Request:
        """Queue ``seq``; its deltas arrive on ``queue`` as ``(tag, Delta)``."""
        if self._stop:
            raise QueueFullError("the server is shutting down")
        if self.queue_length >= self.max_waiting:
            raise QueueFullError(f"{self.queue_length} requests are waiting already "
                                 f"(--max-waiting {self.max_waiting})")
        req = Request(seq, queue, tag)
        self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
        self._inbox.append(("add", req))
        self._wake.set()
        return req

    def abort(self, req: Request) -> None:
        """Drop ``req`` (client gone, timeout); its blocks are freed before the next step."""
        if not req.done:
            self._inbox.append(("abort", req))
            self._wake.set()

    # -- the loop thread -----------------------------------------------------------------

    def _apply_inbox(self) -> None:
        while self._inbox:
            cmd, req = self._inbox.popleft()
            if cmd == "add":
                self._live[req.seq.id] = req
                self.llm.scheduler.add(req.seq)
            elif not req.done and req.seq.id in self._live:
                self._finish(req, "abort")
                if not req.seq.finished:
                    self.llm.scheduler.finish(req.seq, "abort")

    def _run(self) -> None:
        sched = self.llm.scheduler
        while True:
            self._apply_inbox()
            if self._stop:
                for req in list(self._live.values()):
                    self._inbox.append(("abort", req))
                self._apply_inbox()
                return
            if not sched.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                out = self.llm.step()
                self.steps += 1
                self._deliver(out)
            except Exception as e:          # noqa: BLE001  the batch failed: fail its requests
                log.exception("engine step failed; failing the requests of its batch")
                self._fail_batch(f"{type(e).__name__}: {e}")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _fail_batch(self, error: str) -> None:
        """A step raised: fail the requests that were running (or the head of the
        queue, if none could start); the engine goes on with the others."""
        sched = self.llm.scheduler
        victims = list(sched.running) or list(sched.waiting)[:1]
        for seq in victims:
            self.llm.fail(seq, error)
            req = self._live.get(seq.id)
            if req is not None:
                self._finish(req, "error", error)

    def _deliver(self, out) -> None:
        now = time.monotonic()
        m = self.metrics
        for seq, toks in out:
            req = self._live.get(seq.id)
            if req is None:
                continue
            if toks:
                m.generation_tokens.inc(len(toks))
                if req.last_token is None:
                    m.ttft.observe(now - req.arrival)
                else:
                    m.itl.observe(now - req.last_token)
                req.last_token = now
            lps = []
            if seq.params.logprobs is not None and toks:
                lps = seq.logprobs[len(seq.output_ids) - len(toks):len(seq.output_ids)]
            if seq.finished:
                self._finish(req, seq.finish_reason, seq.error, toks, lps)
            else:
                self._put(req, Delta(list(toks), list(lps), False))

    def _finish(self, req: Request, reason: str, error: Optional[str] = None,
                toks=(), lps=()) -> None:
        req.done = True
        self._live.pop(req.seq.id, None)
        self.metrics.finished.labels(reason=reason).inc()
        self._put(req, Delta(list(toks), list(lps), True, reason, error))

    def _put(self, req: Request, delta: Delta) -> None:
        try:
            self._loop.call_soon_threadsafe(req.queue.put_nowait, (req.tag, delta))
        except RuntimeError:                # the event loop is closed: nobody is listening
            pass
