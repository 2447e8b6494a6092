"""``kernelforge conformance``: a verdict for one backend, built-in or plug-in.

Every op spec's checks (kernelforge/testing.py) run against the backend:

- property: random calls from the spec's samples against its float64 reference;
- bad input: the declared and listed bad calls raise errors naming the argument;
- compiles: a new number of rows builds nothing new;
- bounds: inputs inside NaN-filled buffers, ``out=`` inside a sentinel buffer.

Levels: **L1**, every check of every op passes; **L2**, L1 and every op at
least ``L2_RATIO`` of eager torch's speed on the same device (the spec's
benchmark shapes, median of timed calls, same process).

Without ``--backend`` the default backend for ``--device`` is judged (what
``backend=None`` runs there). An out-of-tree device exists once its plug-in
is imported: the one a package announces under the ``kernelforge.devices``
entry point group is imported by name (``kernelforge conformance --device
hostdev``); ``--import MODULE`` imports any other first.
"""
from __future__ import annotations

import importlib
import json
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

#: the speed an op must reach, as a fraction of eager's, for L2
L2_RATIO = 0.8


@dataclass
class CheckResult:
    name: str
    ok: bool | None          # None: not applicable
    detail: str = ""


@dataclass
class OpResult:
    op: str
    checks: list = field(default_factory=list)
    speed: float | None = None     # eager's time / the backend's (higher is faster)
    speed_detail: str = ""

    @property
    def correct(self) -> bool:
        return all(c.ok is not False for c in self.checks)


def _hypothesis_run(fn, examples: int):
    """Run ``fn(data)`` as a hypothesis property with ``examples`` examples
    (deterministic); returns None or the failure's text."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    prop = settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))(given(data=st.data())(fn))
    try:
        prop()
    except Exception as e:       # the verdict reports it
        lines = [ln for ln in traceback.format_exception_only(type(e), e)]
        return "".join(lines).strip()[-600:]
    return None


def check_op(spec, backend: str, device: torch.device, examples: int) -> OpResult:
    from hypothesis import strategies as st
    from . import testing
    res = OpResult(spec.name)

    def draw(data, **kw):
        return data.draw(spec.samples(st, testing.budget(backend, device, spec, **kw)))

    counted = {"n": 0}

    def prop(data):
        testing.check_reference(spec, draw(data), backend)
        counted["n"] += 1
    err = _hypothesis_run(prop, examples)
    res.checks.append(CheckResult("property", err is None,
                                  f"{counted['n']} calls" if err is None else err))

    bad_counts = {"n": 0}

    def bad(data):
        call = draw(data, force_rows=2)
        for label, b, words in testing.bad_cases(spec, call):
            testing.check_bad(spec, label, b, words, backend)
            bad_counts["n"] += 1
    err = _hypothesis_run(bad, 1)
    res.checks.append(CheckResult("bad input", err is None,
                                  f"{bad_counts['n']} cases" if err is None else err))

    if spec.resize is None:
        res.checks.append(CheckResult("compiles", None, "the spec gives no resize"))
    else:
        def compiles(data):
            call = draw(data, force_rows=3)
            testing.check_compile_count(spec, lambda rows: spec.resize(call, rows), backend)
        err = _hypothesis_run(compiles, 1)
        res.checks.append(CheckResult("compiles", err is None, "rows 0-7: no new build"
                                      if err is None else err))

    def poison(data):
        testing.check_poison(spec, draw(data, force_rows=3), backend)
    err = _hypothesis_run(poison, max(1, examples // 10))
    res.checks.append(CheckResult("bounds", err is None, "" if err is None else err))
    return res


def _sync(device: torch.device):
    """A call that waits for the device's queued work (nothing to wait for on the CPU)."""
    sync = getattr(getattr(torch, device.type, None), "synchronize", None)
    if device.type == "cpu" or not callable(sync):
        return lambda: None
    return lambda: sync(device)


def _median_time(fn, device, budget_s: float = 0.3) -> float:
    sync = _sync(device)
    fn()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(spec, backend: str, device: torch.device, dtype=torch.bfloat16):
    """eager's median time over the backend's, per benchmark shape; the
    geometric mean over shapes, and the per-shape text."""
    if not spec.bench:
        return None, "no benchmark shapes"
    ratios, parts = [], []
    for label, make in spec.bench:
        call = make(device, dtype)
        kw = call.kwargs
        t_be = _median_time(lambda: spec.op(**kw, backend=backend), device)
        t_ref = _median_time(lambda: spec.op(**kw, backend="eager"), device)
        ratios.append(t_ref / t_be)
        parts.append(f"{label} {t_ref / t_be:.2f}x")
    gm = float(torch.tensor(ratios).log().mean().exp())
    return gm, ", ".join(parts)


def import_plugins(modules) -> None:
    """Import each module of ``modules`` (a device's plug-in registers the
    device when imported); ValueError naming the one that fails."""
    for m in modules or ():
        try:
            importlib.import_module(m)
        except Exception as e:
            raise ValueError(f"conformance: --import {m} failed: {type(e).__name__}: {e}") \
                from None


def resolve_device(device: str) -> torch.device:
    """``device`` as a torch.device. An out-of-tree device type exists only
    once its plug-in is imported: the one its package announces (entry point
    group ``kernelforge.devices``) is imported here; for any other, a
    ValueError says how to get it."""
    from . import devices
    try:
        devices.load_plugin(str(device).split(":")[0])
    except RuntimeError as e:
        raise ValueError(f"conformance: {e}") from None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        pass
    kind = str(device).split(":")[0]
    raise ValueError(f"conformance: {kind} is not a registered torch device: import its "
                     f"plug-in, e.g. --import MODULE, MODULE being its package (announced "
                     f"device plug-ins: {sorted(devices.announced()) or 'none'})")


def run(backend: str | None = None, device: str | None = None, ops=None, examples: int = 30,
        level: int = 1, imports=()) -> dict:
    """Judge ``backend`` on ``device``; ``backend=None`` judges the default
    backend for the device (registry.select), ``imports`` are imported first."""
    from . import ops as kf_ops
    from .backends import registry
    import_plugins(imports)
    dev = resolve_device(device) if device else None
    if backend is None:
        if dev is None:
            dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        backend = registry.select(dev).backend.name
    b = registry.backends().get(backend)
    if b is None:
        raise ValueError(f"conformance: `backend` expected one of {sorted(registry.backends())}, "
                         f"got {backend!r}")
    if dev is None:
        dev = torch.device("cuda") if torch.cuda.is_available() and \
            b.can_run(torch.device("cuda"))[0] else torch.device("cpu")
    ok, why = b.can_run(dev)
    if not ok:
        raise ValueError(f"conformance: backend {backend!r} cannot run on {dev}: {why}")
    specs = kf_ops.SPECS
    unknown = [o for o in (ops or []) if o not in specs]
    if unknown:
        raise ValueError(f"conformance: `ops` expected names from {sorted(specs)}, got {unknown}")
    results = []
    for name, spec in specs.items():
        if ops and name not in ops:
            continue
        r = check_op(spec, backend, dev, examples)
        if level >= 2 and r.correct:
            r.speed, r.speed_detail = speed(spec, backend, dev)
        results.append(r)
    l1 = all(r.correct for r in results)
    l2 = l1 and level >= 2 and all(r.speed is None or r.speed >= L2_RATIO for r in results)
    return {"backend": backend, "origin": registry.origin.get(backend, "?"), "device": str(dev),
            "torch": torch.__version__, "examples": examples,
            "level": 2 if l2 else 1 if l1 else 0, "l2_ratio": L2_RATIO,
            "ops": [{**asdict(r), "correct": r.correct} for r in results]}


def table(report: dict) -> str:
    cols = ["property", "bad input", "compiles", "bounds"]
    lines = [f"kernelforge conformance: backend {report['backend']} ({report['origin']}) on "
             f"{report['device']}, torch {report['torch']}, {report['examples']} examples per op",
             f"{'op':<20}" + "".join(f"{c:<12}" for c in cols) + f"{'vs eager':<10}verdict"]
    failures = []
    for op in report["ops"]:
        cells = {c["name"]: c for c in op["checks"]}
        row = f"{op['op']:<20}"
        for c in cols:
            cell = cells.get(c)
            mark = "-" if cell is None or cell["ok"] is None else "pass" if cell["ok"] else "FAIL"
            row += f"{mark:<12}"
            if cell is not None and cell["ok"] is False:
                failures.append(f"{op['op']} / {c}: {cell['detail']}")
        sp = "-" if op["speed"] is None else f"{op['speed']:.2f}x"
        verdict = "FAIL" if not op["correct"] else ("L2" if op["speed"] is not None and
                                                     op["speed"] >= report["l2_ratio"] else "L1")
        lines.append(row + f"{sp:<10}{verdict}")
    level = report["level"]
    lines.append(f"verdict: {'L' + str(level) if level else 'not conformant'}"
                 + (" (every op correct)" if level == 1 else
                    f" (every op correct and at least {report['l2_ratio']}x eager's speed)"
                    if level == 2 else ""))
    lines += [f"  {f}" for f in failures]
    return "\n".join(lines)


def main(args) -> int:
    try:
        report = run(args.backend, args.device, [o for v in (args.ops or []) for o in v.split(",")
                                                 if o], args.examples, args.level,
                     imports=args.imports or ())
    except ValueError as e:
        print(str(e))
        return 2
    except ImportError as e:
        print(f"conformance needs the test extra (pip install 'kernelforge[test]'): {e}")
        return 2
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report["level"] >= 1 else 1


def add_parser(sub) -> None:
    p = sub.add_parser("conformance", help="check a backend (built-in or plug-in) against every "
                       "op's spec and print a verdict (L1: correct; L2: and fast)")
    p.add_argument("--backend", default=None, help="a registered backend (kernelforge ops; "
                   "default: the one chosen by default for --device)")
    p.add_argument("--device", default=None, help="torch device (default: the backend's GPU "
                   "if one is here, else cpu)")
    p.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                   help="import MODULE first, e.g. the plug-in that registers an out-of-tree "
                        "device (--import kf_hostdev); repeatable")
    p.add_argument("--ops", action="append", help="only these ops (comma-separated; repeatable)")
    p.add_argument("--examples", type=int, default=30, help="random calls per op (default 30)")
    p.add_argument("--level", type=int, default=1, choices=(1, 2),
                   help="2 also times every op against eager on the device")
    p.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON")
