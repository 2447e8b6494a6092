"""The ``kernelforge`` command.

    kernelforge ops                         ops and the backends available here
    kernelforge show OP --backend triton    generated code (also: ir, inductor, eager, cpp)
    kernelforge aot-check [--targets ...]   compile every kernel for GPU targets
    kernelforge conformance [--backend B]   check a backend (default: --device's) against every op's spec
    kernelforge new-op NAME                 write a new op file and its test skeleton
    kernelforge demo                        the RMSNorm family on every backend
    kernelforge generate "prompt"           text from the default model, streamed
    kernelforge chat                        a chat with it (its chat template)
    kernelforge report F.json --out DIR     charts from pytest-benchmark JSON (matplotlib)
"""
from __future__ import annotations

import argparse
import sys

import torch

# the runtime extra's modules (pyproject.toml): the ops run without them
_RUNTIME_EXTRA = ("gguf", "tokenizers", "safetensors", "tqdm")
# and the serve extra's: the HTTP server
_SERVE_EXTRA = _RUNTIME_EXTRA + ("fastapi", "uvicorn", "prometheus_client", "starlette",
                                 "pydantic")

_DTYPES = {"f32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "f16": torch.float16, "float16": torch.float16}


def cmd_ops(args) -> int:
    from .backends import registry
    from .ops import KERNELS
    dev = torch.device("cpu")
    print("backends on this machine (cpu tensors):")
    for name, b in registry.backends().items():
        ok, why = b.can_run(dev)
        prio, _ = b.default_priority(dev)
        star = " (default)" if registry.select(dev).backend is b and \
            not registry.config.env_backend() else ""
        print(f"  {name:<13} {'yes' if ok else 'no ':<4} {b.description}{star}")
        if not ok:
            print(f"            {why}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()} -> default "
              f"{registry.select(torch.device('cuda')).backend.name}")
    from .ops import SPECS
    print("ops (kernelforge.ops.NAME):")
    for op, kdefs in KERNELS.items():
        spec = SPECS.get(op)
        vllm = f"; vLLM: {spec.vllm}" if spec is not None and spec.vllm else ""
        print(f"  {op:<20} torch.ops.kernelforge.{op}; kernels: "
              f"{', '.join(k.name for k in kdefs) or 'none (plain torch)'}{vllm}")
    return 0


def example_args(kdef, dtype: torch.dtype, hidden: int | None = None, rows: int = 4):
    """Tensors and scalars that specialise ``kdef`` like a real call would:
    static axes from its first example (or all ``hidden`` when given), every
    other axis ``rows``, dtypes as ``example_dtypes`` says or ``dtype``."""
    sizes = kdef.examples[0] if kdef.examples and hidden is None else \
        {a: hidden or 4096 for a in kdef.static}
    args = []
    for name, ann in kdef.signature:
        if hasattr(ann, "axes"):
            shape = [sizes.get(a, rows) for a in ann.axes]
            d = kdef.example_dtypes.get(name)
            args.append(torch.zeros(shape, dtype=d.torch if d else dtype))
        else:
            args.append(0.0 if ann.is_float else 0)
    return args


def cmd_show(args) -> int:
    from . import dispatch
    from .ops import KERNELS
    if args.op not in KERNELS:
        print(f"show: unknown op {args.op!r}; ops: {', '.join(KERNELS)}", file=sys.stderr)
        return 2
    for kdef in KERNELS[args.op]:
        ex = example_args(kdef, _DTYPES[args.dtype], args.hidden)
        if args.backend == "ir":
            dtypes, sizes = dispatch.specialization(kdef, ex)
            print(kdef.specialize(dtypes, sizes))
        else:
            print(dispatch.source(kdef, ex, args.backend))
    return 0


def cmd_aot(args) -> int:
    from . import aot
    from .backends.triton import triton_import_error
    if triton_import_error():
        print(f"aot-check: triton is not importable: {triton_import_error()}", file=sys.stderr)
        return 2
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in aot.TARGETS]
    if bad:
        print(f"aot-check: unknown target(s) {bad}; known: {', '.join(aot.TARGETS)}",
              file=sys.stderr)
        return 2
    from .ops import KERNELS
    ops = [o.strip() for v in (args.op or []) for o in v.split(",") if o.strip()]
    unknown = [o for o in ops if o not in KERNELS]
    if unknown:
        print(f"aot-check: unknown op(s) {unknown}; ops: {', '.join(KERNELS)}", file=sys.stderr)
        return 2
    results = aot.check(targets, ops=ops or None)
    if not results:
        print("aot-check: nothing to compile", file=sys.stderr)
        return 2
    rows: dict[tuple, dict] = {}
    for r in results:
        rows.setdefault((r.op, r.kernel, r.spec), {})[r.target] = r
    w = max(len(f"{op} [{spec}]") for op, _, spec in rows) + 2
    print(f"{'op [specialisation]':<{w}}" + "".join(f"{t:<20}" for t in targets))
    for (op, _, spec), cells in rows.items():
        line = f"{f'{op} [{spec}]':<{w}}"
        for t in targets:
            r = cells[t]
            line += f"{('ok ' + r.detail) if r.ok else 'FAIL':<20}"
        print(line)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAILED {r.op} {r.kernel} [{r.spec}] {r.target}: {r.detail}", file=sys.stderr)
    print(f"{len(results) - len(failed)}/{len(results)} compiled")
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kernelforge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ops", help="ops and the backends available here")
    s = sub.add_parser("show", help="print the IR or the generated code of an op")
    s.add_argument("op")
    from .backends import registry
    s.add_argument("--backend", default="triton",
                   choices=["ir", *registry.backends()])     # plug-ins included
    s.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    s.add_argument("--hidden", type=int, default=None,
                   help="size of every static axis (default: the kernel's first example)")
    a = sub.add_parser("aot-check", help="compile every kernel for GPU targets")
    a.add_argument("--targets", default="sm_80,sm_90,gfx942")
    a.add_argument("--op", action="append", metavar="OP[,OP...]",
                   help="limit to these ops (comma-separated; the flag repeats)")
    from . import conformance
    conformance.add_parser(sub)
    n = sub.add_parser("new-op", help="write kernelforge/kernels/NAME.py (a kernel and its "
                       "spec) and tests/test_NAME.py (a skeleton for the op's own tests)")
    n.add_argument("name", help="the op's name, a Python identifier (e.g. gelu_and_mul)")
    n.add_argument("--root", default=".", help="the checkout to write into (default: here)")
    d = sub.add_parser("demo", help="run the RMSNorm family on every backend")
    d.add_argument("--rows", type=int, default=64)
    d.add_argument("--hidden", type=int, default=4096)
    from .runtime import cli as runtime_cli
    runtime_cli.add_parsers(sub)
    from .server import cli as server_cli
    server_cli.add_parser(sub)
    from . import report
    report.add_parser(sub)
    args = p.parse_args(argv)
    # the commands that need an extra: (how to run them, the extra, its modules)
    extras = {"generate": (runtime_cli.cmd_generate, "runtime", _RUNTIME_EXTRA),
              "chat": (runtime_cli.cmd_chat, "runtime", _RUNTIME_EXTRA),
              "serve": (server_cli.cmd_serve, "serve", _SERVE_EXTRA)}
    if args.cmd in extras:
        run, extra, modules = extras[args.cmd]
        try:
            return run(args)
        except ModuleNotFoundError as e:
            if e.name not in modules:
                raise
            print(f"kernelforge {args.cmd}: needs the {extra} extra ({e.name} is not "
                  f"installed): pip install 'kernelforge[{extra}]'", file=sys.stderr)
            return 2
    if args.cmd == "demo":
        from .demo import main as demo
        return demo(args.rows, args.hidden)
    if args.cmd == "conformance":
        return conformance.main(args)
    if args.cmd == "report":
        return report.main(args)
    if args.cmd == "new-op":
        from .new_op import main as new_op
        return new_op(args.name, args.root)
    return {"ops": cmd_ops, "show": cmd_show, "aot-check": cmd_aot}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
