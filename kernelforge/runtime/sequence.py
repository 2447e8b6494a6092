"""One request's state as the engine runs it."""
from __future__ import annotations

import enum
import itertools
from typing import Optional

from .sampler import request_seed
from .sampling_params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, prompt: Optional[str] = None):
        self.id = next(_ids)
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_computed = 0          # tokens whose keys and values are in the cache
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None        # why it failed (finish_reason "error")
        self.num_preemptions = 0
        self.seed = request_seed(params.seed)   # the draw's key (sampler.py)
        # per generated token when params.logprobs is set: (its logprob, {id: logprob} top n)
        self.logprobs: list[tuple[float, dict]] = []

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self):
        return (f"Sequence(id={self.id}, {self.status.value}, prompt={len(self.prompt_ids)}, "
                f"out={len(self.output_ids)}, computed={self.num_computed})")
