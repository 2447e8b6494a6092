"""Decode steps replayed through CUDA graphs: ``decode_graphs.py``'s fixed
inputs and batch sizes, captured with ``torch.cuda.graph`` instead of
``kernelforge.graph``.

A graph holds every kernel launch of one decode forward, so a replay costs
one launch from the host instead of a few hundred (vLLM's decode mode).
Each size is captured on first use: the forward runs twice on a side stream
first (it compiles the Triton kernels and settles the allocator, neither of
which may happen during a capture), then once under capture. All sizes share
one memory pool, as vLLM's do: only one graph replays at a time.

A size whose capture fails (an op that syncs with the host, say) warns once
and runs op by op from then on; the tokens are the same either way.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from .decode_graphs import DecodeGraphs

#: warm-up forwards before a capture (Triton compiles, the allocator settles)
WARMUP_RUNS = 2        # at least 1: the last one checks for host syncs


@contextlib.contextmanager
def sync_errors():
    """Inside, a CUDA call that syncs with the host raises (sync debug mode "error")."""
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


class CudaDecodeGraphs(DecodeGraphs):
    """``DecodeGraphs`` on a CUDA device, one ``torch.cuda.CUDAGraph`` per batch size."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.model.device.type != "cuda":
            raise ValueError(f"CudaDecodeGraphs: the model must be on a CUDA device, "
                             f"got {self.model.device}")
        self._pool = None

    def capture(self, forward):
        dev = self.model.device
        with torch.cuda.device(dev), torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS - 1):
                    forward()      # writes this step's keys and values: the replay rewrites them
                try:
                    # the last warm-up with host syncs made errors: a forward that syncs
                    # cannot be captured, and trying can leave torch 2.11's allocator in
                    # capture mode (pytorch#180395): found here, outside any capture
                    with sync_errors():
                        forward()
                except RuntimeError as e:
                    torch.cuda.synchronize(dev)
                    warnings.warn(f"kernelforge runtime: a CUDA graph of the decode step could "
                                  f"not be captured: the step syncs with the host ({e}); this "
                                  f"batch size runs op by op", RuntimeWarning)
                    return forward
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            g = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(g, pool=self._pool):
                    out = forward()
            except Exception as e:      # noqa: BLE001  the step still runs, uncaptured
                torch.cuda.synchronize(dev)
                warnings.warn(f"kernelforge runtime: a CUDA graph of the decode step could not "
                              f"be captured ({type(e).__name__}: {e}); this batch size runs "
                              f"op by op", RuntimeWarning)
                return forward
        return g, out

    def replay(self, g) -> torch.Tensor:
        if callable(g):                 # capture failed: the forward itself
            with torch.inference_mode():
                return g()
        graph, out = g
        graph.replay()
        return out
