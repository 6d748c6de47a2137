"""Device and precision: what ``--device`` and ``--precision`` resolve to."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

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
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast_context(device: torch.device, dtype: torch.dtype) -> Callable[[], AbstractContextManager]:
    """Built once: ``nullcontext`` for fp32, ``torch.autocast`` otherwise."""
    if dtype == torch.float32:
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """Loss scaling for fp16; created disabled otherwise, where every call is a no-op."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
