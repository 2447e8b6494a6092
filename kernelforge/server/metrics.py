"""``/metrics`` in Prometheus text format (prometheus_client), one registry per server.

Counters and latency histograms are updated by the engine loop as tokens
come out; the engine's state (running, waiting, KV blocks, preemptions) is
read when the endpoint is scraped.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# seconds; vLLM's buckets, reaching the slow end of a loaded 2-core CPU
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class _EngineState:
    """Reads the engine's state at scrape time."""

    def __init__(self):
        self.engine = None

    def collect(self):
        e = self.engine
        if e is None:
            return
        for name, doc, value in (
                ("kernelforge_requests_running", "Requests in the running batch", e.num_running),
                ("kernelforge_requests_waiting", "Requests waiting for a place in the batch",
                 e.num_waiting),
                ("kernelforge_kv_blocks_used", "KV-cache blocks held by requests",
                 e.blocks_in_use),
                ("kernelforge_kv_blocks_total", "KV-cache blocks in the pool",
                 e.llm.pool.num_blocks)):
            yield GaugeMetricFamily(name, doc, value=value)
        sched = e.llm.scheduler
        yield CounterMetricFamily("kernelforge_preemptions", "Requests preempted (blocks freed, "
                                  "recomputed later)", value=sched.num_preemptions)
        yield CounterMetricFamily("kernelforge_prefix_cache_tokens", "Prompt tokens served "
                                  "from cached KV blocks", value=sched.num_cached_tokens)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self._state = _EngineState()
        r.register(self._state)
        self.prompt_tokens = Counter("kernelforge_prompt_tokens", "Prompt tokens received",
                                     registry=r)
        self.generation_tokens = Counter("kernelforge_generation_tokens", "Tokens generated",
                                         registry=r)
        self.finished = Counter("kernelforge_requests_finished", "Requests finished, by reason "
                                "(stop, length, abort, error)", ["reason"], registry=r)
        self.ttft = Histogram("kernelforge_time_to_first_token_seconds", "Time from arrival "
                              "to the first generated token", buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("kernelforge_inter_token_latency_seconds", "Time between a "
                             "request's consecutive tokens", buckets=_ITL_BUCKETS, registry=r)

    def bind(self, engine) -> None:
        self._state.engine = engine

    def render(self) -> bytes:
        return generate_latest(self.registry)
