"""The CUDA paths of the engine, on a GPU only: bf16 autocast, fp16 with the GradScaler, and resume.

Skipped without a CUDA device; `scripts/gpu_check.sh` runs them (``pytest -m gpu``) together
with the full-size benchmark. The tiny preset keeps them to seconds.
"""

from __future__ import annotations

import pytest
import torch
from test_engine import interrupt_at, train_log
from torch.testing import assert_close

from capcli.errors import TrainingInterrupted
from capcli.model import Captioner
from capcli.model.generation import DecodeSettings, generate_captions
from capcli.phases import pretrain
from capcli.settings import override
from capcli.train.checkpoint import load_state

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def on_cuda(settings_factory, name: str, precision: str, **overrides):
    return settings_factory(name, **{"runtime.device": "cuda", "runtime.precision": precision, **overrides})


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_like_fp32_and_keeps_fp32_weights(settings_factory, precision):
    """The first loss (same weights, same batch) agrees with fp32 to autocast's rounding, the
    loss falls, and the master weights stay fp32. fp16 saves its GradScaler; bf16 needs none."""
    runs = {}
    for name in ("fp32", precision):
        settings = on_cuda(settings_factory, name, name)
        pretrain(settings)
        runs[name] = settings.pretrain.engine.output
    reference, mixed = ([r["loss"] for r in train_log(runs[name])] for name in ("fp32", precision))
    assert len(mixed) == len(reference) == 16
    assert_close(mixed[0], reference[0], rtol=2e-2, atol=0.0)
    assert sum(mixed[-4:]) / 4 < 0.9 * mixed[0], mixed
    run = runs[precision]
    model = Captioner.from_pretrained(run / "checkpoints" / "last")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    scaler = load_state(run / "checkpoints" / "last")["scaler"]
    if precision == "fp16":
        assert scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0, scaler
    else:
        assert scaler == {}, "a disabled GradScaler saves an empty state"


def test_fp16_resume_on_cuda_repeats_the_uninterrupted_losses(settings_factory):
    """Stopped mid-epoch and resumed: the GradScaler's scale comes back with the optimizer, so
    the resumed steps are the uninterrupted ones (to CUDA's non-deterministic summation)."""
    whole = on_cuda(settings_factory, "whole", "fp16")
    pretrain(whole)
    parted = on_cuda(settings_factory, "parted", "fp16")
    with pytest.raises(TrainingInterrupted):
        pretrain(parted, on_step=interrupt_at(5))
    assert load_state(parted.pretrain.engine.output / "checkpoints" / "last")["step"] == 5
    pretrain(override(parted, {"pretrain.engine.resume": True}))
    expected = [(r["step"], r["loss"]) for r in train_log(whole.pretrain.engine.output)]
    got = [(r["step"], r["loss"]) for r in train_log(parted.pretrain.engine.output)]
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, 17))
    assert_close([loss for _, loss in got], [loss for _, loss in expected], rtol=1e-3, atol=1e-4)


def test_a_checkpoint_trained_on_cuda_captions_on_the_cpu(settings_factory):
    """Train on the GPU, caption on a laptop: the weights load onto the CPU and decode the same."""
    settings = on_cuda(settings_factory, "run", "bf16", **{"pretrain.engine.max_steps": 4})
    pretrain(settings)
    path = settings.pretrain.engine.output / "checkpoints" / "last"
    on_gpu = Captioner.from_pretrained(path, torch.device("cuda"))
    on_cpu = Captioner.from_pretrained(path, torch.device("cpu"))
    size = on_cpu.image_size
    pixels = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert next(on_cpu.parameters()).device.type == "cpu"
    decode = DecodeSettings(beams=1, max_length=12)
    assert generate_captions(on_cpu, pixels, decode) == generate_captions(on_gpu, pixels.cuda(), decode)
