"""The runtime of one command: device, precision, autocast, loss scaling and the process group.

Resolved once per command (``Runtime.from_settings``) and handed to every part that runs a
model: the engine, align's caches and held-out numbers, evaluate, caption and the benchmark.
Nothing else resolves ``--device`` or ``--precision`` (precision.py says what they mean).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from capcli.settings import RuntimeSettings
from capcli.train import distributed
from capcli.train.distributed import World
from capcli.train.precision import resolve_device, resolve_precision


@dataclass(frozen=True)
class Runtime:
    """Where and in what precision a command runs, and its place among torchrun's processes.

    ``settings`` keeps the rest of the runtime group (seed, quiet, log, compile, ...), which
    the engine reads.
    """

    device: torch.device
    dtype: torch.dtype = torch.float32
    world: World = World()
    settings: RuntimeSettings = field(default_factory=RuntimeSettings)

    @classmethod
    def from_settings(cls, settings: RuntimeSettings, *, join: bool = False) -> Runtime:
        """Resolve ``settings.device`` and ``settings.precision``.

        Args:
            join: a training command: under torchrun, join the process group now and take
                this rank's GPU (``distributed.setup``); without torchrun nothing changes.
        """
        device, world = resolve_device(settings.device), World()
        if join:
            world, device = distributed.setup(device)
        return cls(device, resolve_precision(settings.precision, device), world, settings)

    @classmethod
    def named(cls, device: str = "auto", precision: str = "auto") -> Runtime:
        """A runtime of a device and a precision named as on the command line (the Python API's)."""
        resolved = resolve_device(device)
        return cls(resolved, resolve_precision(precision, resolved))

    def autocast(self) -> AbstractContextManager:
        """``nullcontext`` for fp32, ``torch.autocast`` otherwise (nanoGPT's one context)."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A fresh loss scaler for one training run: scaling for fp16; disabled otherwise, where every
        call is a no-op."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    @contextmanager
    def inference(self, model: nn.Module) -> Iterator[None]:
        """Run ``model`` for measurement (``evaluating``) under the runtime's autocast."""
        with evaluating(model), self.autocast():
            yield


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the block; the model's training mode is given back afterwards
    (a model measured between training steps goes on training)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
