"""Hostile inputs: mutations of a valid call, each run in a worker process so
a crash is counted instead of ending the run.

From one valid call per op (its spec's samples), every tensor argument is
given wrong dtypes, ranks and zero-size dims, strided, expanded and
overlapping views, NaN and inf values and out-of-range indices; every
number extreme values. Each outcome is one of:

- ``ok``: returned, and the spec's float64 reference accepts the input and agrees;
- ``clear error``: an error naming an argument (```name``` in the message);
- ``unclear error``: any other exception;
- ``silent accept``: returned for an input the reference cannot take;
- ``wrong output``: returned something the reference disagrees with;
- ``crash``: the worker died (a signal) or hung past the timeout.

    python -m kernelforge.hostile --backend cpp [--ops a,b] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections import Counter

import torch

OUTCOMES = ("ok", "clear error", "unclear error", "silent accept", "wrong output", "crash")
_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.int64, torch.int32, torch.bool,
           torch.complex64)


def base_call(spec, backend: str):
    """One valid call with 3 rows, the same in every process (derandomized)."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    from . import testing
    got = []
    strategy = spec.samples(st, testing.budget(backend, torch.device("cpu"), spec, force_rows=3))

    @settings(max_examples=1, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def draw(data):
        got.append(data.draw(strategy))
    draw()
    return got[0]


def mutations(spec, call) -> list[tuple[str, object]]:
    """(label, mutated call) for every hostile variant of ``call``."""
    from .spec import Bool, Float, Host, Int, Out, Tensor
    out = []
    kw = call.kwargs
    first = next((kw.get(x.name) for x in spec.args if isinstance(x, Tensor)), None)
    for x in spec.args:
        v = kw.get(x.name, None)
        if isinstance(x, Out) and v is None and isinstance(first, torch.Tensor):
            o = spec.outputs[0]
            a = _bound(spec, call)
            shape = tuple(o.shape(a)) if a is not None else None
            if shape is not None and first.numel():
                flat = first.reshape(-1)
                n = math.prod(shape)
                if flat.numel() >= n and flat.dtype == o.dtype_of(a) and first.is_contiguous():
                    out.append(("out in the input's memory", call.with_(
                        out=flat[:n].view(shape))))
                out.append(("out expanded (stride 0)", call.with_(out=torch.empty(
                    (1, *shape[1:]), dtype=o.dtype_of(a)).expand(shape))))
            continue
        if isinstance(x, Tensor) and isinstance(v, torch.Tensor):
            for d in _DTYPES:
                if d != v.dtype:
                    out.append((f"{x.name} as {d}", call.with_(**{x.name: _cast(v, d)})))
            out.append((f"{x.name} with a leading dim", call.with_(**{x.name: v[None]})))
            if v.dim() >= 1 and v.shape[0]:
                out.append((f"{x.name} without its first dim", call.with_(**{x.name: v[0]})))
            for i in range(v.dim()):
                shape = list(v.shape)
                shape[i] = 0
                out.append((f"{x.name} dim {i} = 0", call.with_(
                    **{x.name: torch.empty(shape, dtype=v.dtype)})))
            if v.dim() >= 2:
                out.append((f"{x.name} transposed", call.with_(**{x.name: v.transpose(0, -1)})))
                out.append((f"{x.name} rows expanded (stride 0)", call.with_(
                    **{x.name: v[:1].expand(v.shape)})))
            if v.dim() >= 1 and v.shape[-1] > 1:
                out.append((f"{x.name} last dim strided", call.with_(
                    **{x.name: torch.repeat_interleave(v, 2, -1)[..., ::2]})))
            if v.dtype.is_floating_point and v.numel():
                for bad in (float("nan"), float("inf"), -float("inf")):
                    w = v.clone()
                    w.view(-1)[w.numel() // 2] = bad
                    out.append((f"{x.name} holding {bad}", call.with_(**{x.name: w})))
            if not v.dtype.is_floating_point and v.numel():
                for bad in (-1, -2 ** 31, 2 ** 31 - 1):
                    w = v.clone()
                    w.view(-1)[0] = max(bad, torch.iinfo(v.dtype).min)
                    out.append((f"{x.name} holding {bad}", call.with_(**{x.name: w})))
            for y in spec.args:            # another tensor argument in the same memory
                u = kw.get(y.name, None)
                if y is not x and isinstance(y, Tensor) and isinstance(u, torch.Tensor) and \
                        u.shape == v.shape and u.dtype == v.dtype:
                    out.append((f"{x.name} is {y.name}", call.with_(**{x.name: u})))
        elif isinstance(x, Float):
            for bad in (float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e-45, 1e300,
                        10 ** 400, True, "1.0", None):
                out.append((f"{x.name}={bad!r:.12}", call.with_(**{x.name: bad})))
        elif isinstance(x, Int):
            for bad in (-1, 0, 2 ** 31, 2 ** 63 - 1, -2 ** 63, 2 ** 64, 1.5, True, None):
                out.append((f"{x.name}={bad!r}", call.with_(**{x.name: bad})))
        elif isinstance(x, Bool):
            for bad in (1, None, "yes"):
                out.append((f"{x.name}={bad!r}", call.with_(**{x.name: bad})))
        elif hasattr(x, "graph_value") or isinstance(x, Host):    # per-row numbers, host options
            rows = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else 1
            for bad in (float("nan"), float("inf"), -1, -1.5, 1e300, 2 ** 63, -2 ** 63 - 1,
                        True, "1", torch.ones(rows + 1), torch.ones(rows, 2),
                        torch.full((rows,), float("nan"))):
                label = f"{x.name}={bad!r:.12}" if not isinstance(bad, torch.Tensor) else \
                    f"{x.name} a {list(bad.shape)} tensor{' of NaN' if bad.isnan().any() else ''}"
                out.append((label, call.with_(**{x.name: bad})))
    return out


def _bound(spec, call):
    from . import testing
    try:
        return testing.bound(spec, call)
    except Exception:
        return None


def _cast(v: torch.Tensor, d: torch.dtype) -> torch.Tensor:
    if d == torch.bool:
        return v != 0
    return v.to(d)


def classify(spec, call, backend: str) -> tuple[str, str]:
    """Run one call; its outcome and a one-line detail."""
    from . import checks, testing
    try:
        outs = testing.run(spec, call, backend)
    except (checks.OpArgError, ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        named = "`" in msg or msg.startswith("backend:")
        return ("clear error" if named else "unclear error"), f"{type(e).__name__}: {msg[:160]}"
    except Exception as e:       # counted: the kit reports it
        first = str(e).splitlines()[0][:160] if str(e) else ""
        return "unclear error", f"{type(e).__name__}: {first}"
    try:
        a = testing.bound(spec, call, backend)
        ref = spec.reference(a)
    except Exception as e:
        return "silent accept", f"the reference cannot take it ({type(e).__name__})"
    try:
        (spec.compare or (lambda a_, o_, r_: _compare(spec, a_, o_, r_)))(a, outs, ref)
    except AssertionError as e:
        return "wrong output", str(e).splitlines()[0][:200]
    return "ok", ""


def _compare(spec, a, outs, ref) -> None:
    from .tolerance import assert_close
    extra = spec.allowance(a, ref) if spec.allowance is not None else (None,) * len(ref)
    if len(outs) != len(ref):
        raise AssertionError(f"{len(outs)} outputs, the reference has {len(ref)}")
    for o, r, e in zip(outs, ref, extra):
        if o is None or r is None:
            if (o is None) != (r is None):
                raise AssertionError("an output is None where the reference's is not")
            continue
        if tuple(o.shape) != tuple(r.shape):
            raise AssertionError(f"shape {list(o.shape)}, the reference's {list(r.shape)}")
        if o.dtype.is_floating_point:
            assert_close(o, r, o.dtype, "hostile", extra=e)
        elif not torch.equal(o.cpu(), r.to(o.dtype).cpu()):
            raise AssertionError("integer output differs from the reference")


# -- the worker and the driver --------------------------------------------------------

def _worker(backend: str, plan: list[tuple[str, int, int]]) -> None:
    """For each ``(op, start, stride)``: run cases ``start, start + stride, ...``
    of ``op``, one JSON line before and one after each."""
    from . import ops
    for op, start, stride in plan:
        spec = ops.SPECS[op]
        cases = mutations(spec, base_call(spec, backend))
        for i in range(start, len(cases), stride):
            label, call = cases[i]
            print(json.dumps({"op": op, "i": i, "label": label}), flush=True)
            outcome, detail = classify(spec, call, backend)
            print(json.dumps({"op": op, "i": i, "outcome": outcome, "detail": detail}),
                  flush=True)
    print(json.dumps({"done": True}), flush=True)


def run_ops(names: list[str], backend: str, limit: int | None = None,
            timeout: float = 120.0) -> dict[str, list[dict]]:
    """Every mutation of each op on ``backend`` (or about ``limit`` per op, spread
    evenly), in worker processes: one runs the ops' cases in order (a process
    start costs seconds, so one serves them all), and after a crash or a hang a
    new one resumes after the case that killed it."""
    from . import ops
    plan = []
    for op in names:
        n = len(mutations(ops.SPECS[op], base_call(ops.SPECS[op], backend)))
        plan.append((op, 0, max(1, math.ceil(n / limit)) if limit else 1))
    results: dict[str, dict[int, dict]] = {op: {} for op in names}
    while plan:
        cmd = [sys.executable, "-m", "kernelforge.hostile", "--worker", backend,
               json.dumps(plan)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        current, finished = None, False
        try:
            for line in _lines(proc, timeout):
                msg = json.loads(line)
                if msg.get("done"):
                    finished = True
                    break
                if "outcome" in msg:
                    results[msg["op"]][msg["i"]] = {
                        "label": current["label"], "outcome": msg["outcome"],
                        "detail": msg["detail"]}
                    current = None
                else:
                    current = msg
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if finished:
            break
        if current is None:
            raise RuntimeError(f"hostile: a worker on {backend} died outside a case "
                               f"(exit {proc.returncode}): {' '.join(cmd)}")
        results[current["op"]][current["i"]] = {
            "label": current["label"], "outcome": "crash",
            "detail": f"worker exit {proc.returncode}" if proc.returncode
            and proc.returncode > 0 else
            f"signal {-proc.returncode}" if proc.returncode else "hung"}
        k = [op for op, _, _ in plan].index(current["op"])
        stride = plan[k][2]
        plan = [(current["op"], current["i"] + stride, stride)] + plan[k + 1:]
    return {op: [r[i] for i in sorted(r)] for op, r in results.items()}


def _lines(proc, timeout: float):
    """The worker's lines; stops (the caller kills it) after ``timeout`` s of silence."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        if not sel.select(timeout):
            return
        line = proc.stdout.readline()
        if not line:
            return
        yield line


def summary(per_op: dict[str, list[dict]]) -> tuple[Counter, str]:
    total = Counter()
    lines = [f"{'op':<20}" + "".join(f"{o:>15}" for o in OUTCOMES)]
    for op, results in per_op.items():
        c = Counter(r["outcome"] for r in results)
        total += c
        lines.append(f"{op:<20}" + "".join(f"{c[o]:>15}" for o in OUTCOMES))
    lines.append(f"{'total':<20}" + "".join(f"{total[o]:>15}" for o in OUTCOMES))
    return total, "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernelforge.hostile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="eager")
    p.add_argument("--ops", default="", help="comma-separated (default: every op with a spec)")
    p.add_argument("--limit", type=int, default=None, help="about this many cases per op")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        backend, plan = args.worker
        _worker(backend, [tuple(x) for x in json.loads(plan)])
        return 0
    from . import ops
    names = [o for o in args.ops.split(",") if o] or list(ops.SPECS)
    per_op = run_ops(names, args.backend, args.limit)
    total, text = summary(per_op)
    print(f"hostile inputs on backend {args.backend}:\n{text}")
    for op, results in per_op.items():
        for r in results:
            if r["outcome"] in ("unclear error", "wrong output", "crash"):
                print(f"  {op}: {r['label']}: {r['outcome']}: {r['detail']}")
    return 1 if total["crash"] or total["wrong output"] or total["unclear error"] else 0


if __name__ == "__main__":
    sys.exit(main())
