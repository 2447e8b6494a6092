"""``torch.hostdev``: the device module of hostdev (one device, index 0).

Work runs to completion before each call returns, so ``synchronize`` has
nothing to wait for. Random ops draw from the device's own generator, a
CPU Mersenne twister (``torch.manual_seed`` seeds it too): the same seed
gives the same numbers as on the CPU.
"""
from __future__ import annotations

import contextlib

import torch

from . import _C

_NAME = "hostdev"


def _index(device=None) -> int:
    """The device index ``device`` names (0), or ValueError."""
    if device is None:
        return 0
    if isinstance(device, int) and not isinstance(device, bool):
        index = device
    else:
        try:
            d = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"hostdev: expected a hostdev device, got {device!r} ({e})") \
                from None
        if d.type != _NAME:
            raise ValueError(f"hostdev: expected a hostdev device, got {d}")
        index = 0 if d.index is None else d.index
    if index != 0:
        raise ValueError(f"hostdev has one device (index 0), got index {index}")
    return index


# -- devices --------------------------------------------------------------------------

def is_available() -> bool:
    return True


def is_initialized() -> bool:
    return True


def _lazy_init() -> None:
    pass


def _is_in_bad_fork() -> bool:
    # no driver state: a forked child can use the device
    return False


def device_count() -> int:
    return 1


def current_device() -> int:
    return 0


def set_device(device) -> None:
    _index(device)


def synchronize(device=None) -> None:
    _index(device)


@contextlib.contextmanager
def device(device):
    """Context manager selecting ``device`` (there is only hostdev:0)."""
    _index(device)
    yield


# -- random numbers ---------------------------------------------------------------------

default_generator: torch.Generator = _C._default_generator()
default_generators: tuple = (default_generator,)


def manual_seed(seed: int) -> None:
    default_generator.manual_seed(int(seed))


def manual_seed_all(seed: int) -> None:
    manual_seed(seed)


def seed() -> None:
    default_generator.seed()


def seed_all() -> None:
    seed()


def initial_seed() -> int:
    return default_generator.initial_seed()


def get_rng_state(device=_NAME) -> torch.Tensor:
    _index(device)
    return default_generator.get_state()


def set_rng_state(new_state: torch.Tensor, device=_NAME) -> None:
    _index(device)
    default_generator.set_state(new_state)


def get_rng_state_all() -> list:
    return [get_rng_state()]


def set_rng_state_all(new_states) -> None:
    (state,) = new_states
    set_rng_state(state)


# -- memory -----------------------------------------------------------------------------

def memory_stats(device=None) -> dict:
    """Allocator statistics in torch.cuda.memory_stats' key format (``.all`` pools only)."""
    _index(device)
    return dict(_C._memory_stats())


def memory_allocated(device=None) -> int:
    """Bytes held by hostdev tensors now (whole 64-byte blocks, their headers included)."""
    return memory_stats(device)["allocated_bytes.all.current"]


def max_memory_allocated(device=None) -> int:
    return memory_stats(device)["allocated_bytes.all.peak"]


def reset_peak_memory_stats(device=None) -> None:
    _index(device)
    _C._reset_peak_memory_stats()


def mem_get_info(device=None) -> tuple:
    """(free, total) bytes of host memory."""
    _index(device)
    return tuple(_C._memory_info())


def empty_cache() -> None:
    """Nothing is cached: freed blocks go back to the host at once."""
