"""capcli's vision transformer against open_clip's: same names, same initial weights from one seed,
same outputs and gradients on the same weights (capcli/model/vit.py says why it is written out)."""

from __future__ import annotations

import pytest
import torch
from open_clip import transformer as oc

from capcli.model import vit

SMALL = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 4, "mlp_ratio": 4.0, "output_dim": 48}
VIT_B32 = {"image_size": 224, "patch_size": 32, "width": 768, "layers": 12, "heads": 12, "mlp_ratio": 4.0,
           "output_dim": 512}


def _pair(arch: dict, quick: bool, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    theirs = oc.VisionTransformer(**arch, act_layer=oc.QuickGELU if quick else torch.nn.GELU)
    torch.manual_seed(seed)
    ours = vit.VisionTransformer(**arch, act_layer=vit.QuickGELU if quick else torch.nn.GELU)
    return theirs, ours


@pytest.mark.parametrize("quick", [False, True])
def test_one_seed_gives_open_clips_names_and_initial_weights(quick: bool) -> None:
    theirs, ours = _pair(SMALL, quick)
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(("arch", "quick"), [(SMALL, False), (VIT_B32, True)], ids=["small", "vit-b32"])
def test_open_clip_weights_give_the_same_pooled_vector_and_tokens(arch: dict, quick: bool) -> None:
    theirs, ours = _pair(arch, quick, seed=1)
    ours.load_state_dict(theirs.state_dict())  # strict: every name and shape the same
    theirs.output_tokens = ours.output_tokens = True
    x = torch.randn(2, 3, arch["image_size"], arch["image_size"])
    with torch.no_grad():
        (pooled_a, tokens_a), (pooled_b, tokens_b) = theirs.eval()(x), ours.eval()(x)
    n = (arch["image_size"] // arch["patch_size"]) ** 2
    assert tokens_b.shape == (2, n, arch["width"]) and pooled_b.shape == (2, arch["output_dim"])
    # The same operations in the same order: equal bit for bit, so training is too.
    assert torch.equal(pooled_b, pooled_a) and torch.equal(tokens_b, tokens_a)
    theirs.output_tokens = ours.output_tokens = False
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_gradients_match_with_and_without_checkpointing(checkpointing: bool) -> None:
    theirs, ours = _pair(SMALL, quick=False, seed=2)
    ours.load_state_dict(theirs.state_dict())
    theirs.set_grad_checkpointing(checkpointing)
    ours.set_grad_checkpointing(checkpointing)
    x = torch.randn(3, 3, 32, 32)
    for model in (theirs, ours):
        model.train()
        model(x).square().sum().backward()
    grads_a = {k: p.grad for k, p in theirs.named_parameters()}
    for name, p in ours.named_parameters():
        assert torch.equal(p.grad, grads_a[name]), name


def test_bf16_autocast_keeps_each_norms_output_in_its_input_dtype() -> None:
    theirs, ours = _pair(SMALL, quick=False, seed=3)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = theirs(x), ours(x)
    assert a.dtype == b.dtype == torch.bfloat16
    assert torch.equal(b, a)
