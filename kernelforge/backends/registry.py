"""Backend registry and per-call selection.

Built-in backends and plug-ins are found the same way and only that way: an
entry in the ``kernelforge.backends`` entry point group (kernelforge's own
pyproject announces the built-ins) naming a zero-argument factory that
returns a Backend, or None when it cannot work on this host. A broken
plug-in is reported and skipped, never fatal. Selection is per call, from
the tensors' device: an explicit ``backend=`` wins, then
KERNELFORGE_BACKEND, then the backend with the highest default priority for
that device.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import torch

from .. import config
from .base import Backend

_backends: dict[str, Backend] | None = None
#: backend name -> the distribution that announced it ("kernelforge" for the built-ins)
origin: dict[str, str] = {}
_defaults: dict[tuple, "Decision"] = {}


def backends() -> dict[str, Backend]:
    """Every backend announced through the entry point group, by name."""
    global _backends
    if _backends is None:
        found: dict[str, Backend] = {}
        eps = sorted(entry_points(group="kernelforge.backends"),
                     key=lambda ep: (_dist(ep) != "kernelforge", ep.name))
        for ep in eps:
            dist = _dist(ep)
            try:
                b = ep.load()()
            except Exception as e:   # fault isolation: a broken plug-in is skipped
                if dist == "kernelforge":
                    raise
                warnings.warn(f"kernelforge: backend plug-in {ep.name!r} failed to load "
                              f"(from {dist}): {type(e).__name__}: {e}")
                continue
            if b is None:
                continue
            if b.name in found:
                warnings.warn(f"kernelforge: backend {b.name!r} from {dist} ignored: the name "
                              f"is taken by {origin[b.name]}")
                continue
            found[b.name] = b
            origin[b.name] = dist
        if not any(v == "kernelforge" for v in origin.values()):
            raise RuntimeError("kernelforge: no built-in backend is announced: kernelforge "
                               "must be installed (pip install -e . from a checkout) for its "
                               "entry points to exist")
        _backends = found
    return _backends


def _dist(ep) -> str:
    return getattr(getattr(ep, "dist", None), "name", None) or "?"


def builtin(name: str) -> bool:
    """Whether ``name`` is one of kernelforge's own backends (not a plug-in)."""
    backends()
    return origin.get(name) == "kernelforge"


def register(backend: Backend) -> None:
    """Add a backend at run time (tests, notebooks); plug-ins use the entry point."""
    backends()[backend.name] = backend
    origin[backend.name] = "register()"
    reset()


def reset() -> None:
    """Forget every cached choice of backend: the defaults per device and
    dispatch's per-call memo. For when what a backend can run changed (a
    backend registered, a compiler removed in a test)."""
    _defaults.clear()
    from .. import cache       # (cache imports only config: no cycle)
    cache.launchers.clear()
    cache.checked.clear()


@dataclass
class Decision:
    backend: Backend
    reason: str
    candidates: list[tuple[str, int | None, str]] = field(default_factory=list)
    #: chosen by backend= or KERNELFORGE_BACKEND, not by priority: no fallback
    forced: bool = False

    def __str__(self) -> str:
        lines = [f"backend: {self.backend.name} ({self.reason})"]
        width = max([10, *(len(name) for name, _, _ in self.candidates)])   # plug-ins' names too
        for name, prio, why in self.candidates:
            lines.append(f"  {name:<{width}} {'-' if prio is None else prio:>4}  {why}")
        return "\n".join(lines)


def select(device: torch.device, explicit: str | None = None) -> Decision:
    if explicit is not None:
        return _forced(device, explicit, "backend= argument")
    env = config.env_backend()
    if env is not None:
        return _forced(device, env, "KERNELFORGE_BACKEND environment variable")
    key = (device.type, device.index)
    hit = _defaults.get(key)
    if hit is None:
        cands = []
        for b in backends().values():
            prio, why = b.default_priority(device)
            cands.append((b.name, prio, why))
        ranked = sorted((c for c in cands if c[1] is not None), key=lambda c: -c[1])
        best = backends()[ranked[0][0]]
        hit = _defaults[key] = Decision(best, f"highest default priority for {device.type} "
                                              "tensors", cands)
    return hit


def fallback(device: torch.device, kernel, *unable: Backend, reason: str = "") -> Decision:
    """The backend that runs ``kernel`` when the default one cannot (it has
    no rule for something the kernel uses, or ``reason``: building failed):
    the next by default priority, skipping every backend in ``unable``."""
    cands = []
    for b in backends().values():
        if b in unable:
            continue
        prio, _ = b.default_priority(device)
        if prio is not None and b.supports(kernel)[0]:
            cands.append((prio, b))
    why = reason or unable[0].supports(kernel)[1]
    if not cands:
        raise ValueError(f"no backend can run kernel `{kernel.name}` on {device.type} tensors: "
                         f"{unable[-1].name}: {why}")
    best = max(cands, key=lambda c: c[0])[1]
    return Decision(best, f"{unable[-1].name} is the default for {device.type} tensors, but "
                          f"{why}")


def _forced(device, name: str, source: str) -> Decision:
    # cached: a backend's answer for a device type does not change (register() clears)
    if not isinstance(name, str):
        return _forced_uncached(device, name, source)    # raises: names the argument
    key = (device.type, device.index, name, source)
    hit = _defaults.get(key)
    if hit is None:
        hit = _defaults[key] = _forced_uncached(device, name, source)
    return hit


def _forced_uncached(device, name, source: str) -> Decision:
    bs = backends()
    if not isinstance(name, str) or name not in bs:
        raise ValueError(f"backend: expected one of {sorted(bs)} (from the {source}), "
                         f"got {name!r}")
    b = bs[name]
    ok, why = b.can_run(device)
    if not ok:
        raise ValueError(f"backend: {name!r} (from the {source}) cannot run on "
                         f"{device.type} tensors: {why}")
    return Decision(b, f"requested by the {source}; {why}", forced=True)
