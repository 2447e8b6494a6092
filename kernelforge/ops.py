"""The public ops, ``kernelforge.ops.NAME(..., backend=None)``. Each is also
a torch.library custom op, ``torch.ops.kernelforge.NAME``.

Every op is declared once, by an ``OpSpec`` in a file under kernelforge/kernels/
(installed as ``kernelforge.kernels``) that lists it in its module-level
``SPECS``: the files are found here, so adding an op is adding its file.
"""
import importlib
import pkgutil

from . import kernels as _kernels
from .kernels.attention_plan import PagedAttentionPlan, paged_attention_plan  # noqa: F401


def _find_specs() -> dict:
    found = {}
    for mod in sorted(m.name for m in pkgutil.iter_modules(_kernels.__path__)):
        for spec in getattr(importlib.import_module(f"{_kernels.__name__}.{mod}"), "SPECS", ()):
            if spec.name in found:
                raise RuntimeError(f"op {spec.name!r} is declared twice "
                                   f"(kernelforge/kernels/{mod}.py)")
            found[spec.name] = spec
    return found


#: op name -> its spec (kernelforge/spec.py): the tests, `kernelforge conformance`
#: and the benchmarks are derived from these
SPECS = _find_specs()
globals().update({name: spec.op for name, spec in SPECS.items()})

#: op name -> the IR kernels it launches (for `kernelforge ops`, `show`, `aot-check`)
KERNELS = {name: tuple(s.kernels()) for name, s in SPECS.items()}
