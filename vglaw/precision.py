"""Numeric precision as a setting: ``fp32``, or ``bf16`` through autocast on CUDA and on the CPU alike.

The same autocast region runs on a GPU and, through CPU autocast, in CI, so that the code a GPU cluster runs is
the code the tests run. Parameters, optimiser state and losses stay fp32 (:mod:`vglaw.losses` leaves autocast).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal, get_args

import torch

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


# A setting, not a precision: bf16 where the hardware computes in bf16 (CUDA, or a CPU with bf16 instructions),
# fp32 elsewhere, where bf16 autocast would be emulated and several times slower than fp32.
AUTO = "auto"


def check_precision(precision: str | None, setting: str = "precision") -> None:
    """Raise ValueError unless ``precision`` is one of :data:`PRECISIONS`, :data:`AUTO` or None (the device's
    default)."""
    if precision is not None and precision not in (*PRECISIONS, AUTO):
        raise ValueError(f"{setting} must be one of {list(PRECISIONS)}, {AUTO!r} or null, got {precision!r}")


def resolve_precision(precision: str | None, device: torch.device | str) -> Precision:
    """``precision`` checked, or the device's default when None: bf16 on CUDA, fp32 elsewhere.

    :data:`AUTO` is bf16 on CUDA and on a CPU with bf16 instructions (:func:`cpu_bf16_instructions`), fp32 on
    any other CPU.
    """
    check_precision(precision)
    on_cuda = torch.device(device).type == "cuda"
    if precision is None:
        return "bf16" if on_cuda else "fp32"
    if precision == AUTO:
        return "bf16" if on_cuda or cpu_bf16_instructions() else "fp32"
    return precision  # type: ignore[return-value]


def autocast_dtype(precision: str | None, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: no autocast), ``auto`` and None resolved for it."""
    return torch.bfloat16 if resolve_precision(precision, device) == "bf16" else None


def autocast(precision: str | None, device: torch.device | str) -> contextlib.AbstractContextManager[None]:
    """The autocast region for ``precision`` on ``device``; a no-op region for fp32."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


# The x86 instruction sets with bf16 arithmetic, as /proc/cpuinfo names them.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_instructions(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, ...]:
    """The bf16 instruction sets that ``cpuinfo`` lists for the CPU; empty where it lists none or does not exist.

    Without them CPU autocast to bf16 still runs, several times slower than fp32: 2.43 s against 0.41 s per
    ``tiny`` training step on an AVX2-only AMD EPYC (docs/benchmarks.md, "Precision and compile on the CPU").
    """
    path = Path(cpuinfo)
    text = path.read_text() if path.is_file() else ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return tuple(flag for flag in CPU_BF16_FLAGS if flag in value.split())
    return ()
