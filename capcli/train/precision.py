"""Device and precision: what ``--device`` and ``--precision`` resolve to (``Runtime`` resolves them once)."""

from __future__ import annotations

import platform
import sys

import torch

from capcli.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` takes CUDA, then MPS, then the CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but CUDA is not available (allowed: auto, cpu, cuda, mps)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' was asked for but MPS is not available (allowed: auto, cpu, cuda, mps)")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA (fp16 where bf16 is missing) and fp32 elsewhere.

    On CPU, fp32 is the only sane automatic choice: bf16 matmuls run about 100× slower
    than fp32 on CPUs without AMX or AVX512-BF16.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name == "bf16" and device.type == "cpu" and not _warned and not cpu_has_fast_bf16():
        _warn_slow_bf16()
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


_warned = False


def _warn_slow_bf16() -> None:
    global _warned
    _warned = True
    print("warning: --precision bf16 on a CPU without AVX512-BF16 or AMX: bf16 matmuls are emulated there, "
          "often many times slower than fp32; --precision fp32 (the CPU's auto) is faster", file=sys.stderr)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (x86: AVX512-BF16 or AMX). Other CPUs
    (ARM's BF16 extension) and PyTorch builds that cannot tell count as yes: no false alarm."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [probe for probe in probes if callable(probe)]
    return not probes or any(probe() for probe in probes)
