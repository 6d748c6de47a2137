"""``capcli benchmark --sections peers``: capcli beside transformers' VisionEncoderDecoder and open_clip's CoCa.

No speed is asserted (the machine is shared): the tests check that every figure is there, that
ratios are ratios of the timed sides, that every side wrote the same number of tokens, that
the peers have the sizes the docs claim, and that a missing peer is skipped, not an error.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext

import pytest
import torch
from typer.testing import CliRunner

from capcli.bench import peer_captions, peer_models, peers
from capcli.bench.benchmark import SECTIONS
from capcli.cli import app
from capcli.data.sources import load_splits
from capcli.model import build_model
from capcli.phases import concept_words_for
from capcli.train.runtime import Runtime

runner = CliRunner()

SMALL = {
    "CAPCLI_BENCHMARK__IMAGES": "4", "CAPCLI_BENCHMARK__CAPTION_BATCH": "2", "CAPCLI_BENCHMARK__METRIC_CAPTIONS": "4",
    "CAPCLI_BENCHMARK__MATMUL_SIZE": "128", "CAPCLI_RUNTIME__DEVICE": "cpu",
}
CAPTION = [f"peer_{side}_caption_beam{beams}_{figure}" for beams in (1, 5)
           for side, figure in (("capcli", "images_per_s"), ("ved", "images_per_s"), ("coca", "images_per_s"),
                                ("ved", "speedup"), ("coca", "speedup"))]
TRAIN = ["peer_capcli_train_samples_per_s", "peer_capcli_train_gflops_per_sample", "peer_capcli_train_mfu"] + [
    f"peer_{peer}_train_{figure}" for peer in ("ved", "coca")
    for figure in ("samples_per_s", "gflops_per_sample", "mfu", "speedup", "flops_speedup")]


@pytest.fixture
def tiny(settings_factory):
    settings = settings_factory()
    captions = load_splits(settings.data)["train"]["captions"]
    torch.manual_seed(0)
    return build_model(settings.model, (c for caps in captions for c in caps), concept_words_for(settings, captions))


def _benchmark(monkeypatch, *args: str):
    monkeypatch.setattr(peers, "CAPTION_TOKENS", 5)  # every side writes 5 tokens a caption: a quick run
    return runner.invoke(app, ["benchmark", "--json", "--quiet", "--repeats", "1", "--steps", "2",
                               "--batch-size", "4", "--sections", "peers", *args], env=SMALL)


def test_peers_are_timed_beside_capcli_and_ratios_are_of_the_timed_sides(monkeypatch) -> None:
    result = _benchmark(monkeypatch)
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert [k for k in d if k not in ("range", "context")] == CAPTION + TRAIN
    for key in CAPTION + TRAIN:
        low, high = d["range"][key]
        assert low <= d[key] <= high and d[key] > 0, key
    for beams in (1, 5):
        capcli = d[f"peer_capcli_caption_beam{beams}_images_per_s"]
        for peer in ("ved", "coca"):
            rate = d[f"peer_{peer}_caption_beam{beams}_images_per_s"]
            assert d[f"peer_{peer}_caption_beam{beams}_speedup"] == pytest.approx(capcli / rate)
    for peer in ("ved", "coca"):
        rate = d[f"peer_{peer}_train_samples_per_s"]
        assert d[f"peer_{peer}_train_speedup"] == pytest.approx(d["peer_capcli_train_samples_per_s"] / rate)
        # FLOP/s over FLOP/s: capcli's MFU over the peer's, both against the same measured peak
        assert d[f"peer_{peer}_train_flops_speedup"] == pytest.approx(d["peer_capcli_train_mfu"] / d[f"peer_{peer}_train_mfu"])
    context = d["context"]
    assert set(context["peers"]) == {"ved", "coca"}
    assert set(context["peer_versions"]) == {"transformers", "open_clip"}
    assert all(context["peer_versions"].values())
    for beams in (1, 5):  # the same work on every side: 5 tokens a caption
        assert {context[f"peer_{side}_caption_beam{beams}_tokens"] for side in ("capcli", "ved", "coca")} == {5}
    assert context["peer_coca_generate"].startswith("open_clip's CoCa.generate")


def test_peers_run_only_when_named() -> None:
    assert "peers" not in SECTIONS  # the default run stays within its time budget
    result = runner.invoke(app, ["benchmark", "--sections", "peers,speed"], env=SMALL)
    assert result.exit_code == 2 and "peers" in result.stderr and "speed" in result.stderr


def test_without_the_peers_packages_the_section_says_so_and_is_skipped(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip.coca_model", None)  # import open_clip.coca_model fails

    def no_transformers_ved():
        raise ImportError("No module named 'transformers'")

    monkeypatch.setattr(peer_models, "_import_ved", no_transformers_ved)
    result = runner.invoke(app, ["benchmark", "--json", "--sections", "peers"], env=SMALL)
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert [k for k in d if k not in ("range", "context")] == []
    assert d["context"]["peers"] == {}
    assert d["context"]["peer_ved"].startswith("skipped: ImportError")
    assert d["context"]["peer_coca"].startswith("skipped: ModuleNotFoundError")  # a subclass of ImportError
    assert "peers skipped" in result.stderr and "capcli[peers]" in result.stderr


def test_one_missing_peer_leaves_the_other(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip.coca_model", None)
    assert set(peer_models.missing_peers()) == {"coca"}


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _vit_layers(vit: torch.nn.Module) -> torch.nn.Module:
    """A ViTModel's transformer layers (``layers`` in transformers 5, ``encoder.layer`` before)."""
    return vit.layers if hasattr(vit, "layers") else vit.encoder.layer


def test_the_vision_encoder_decoder_has_the_tiny_presets_sizes(tiny) -> None:
    ved = peer_models.ved_for(tiny).model
    arch, gpt = tiny.config.vision["arch"], tiny.decoder.config
    vit = ved.encoder.config
    assert (vit.image_size, vit.patch_size, vit.hidden_size, vit.num_hidden_layers, vit.num_attention_heads,
            vit.intermediate_size) == (arch["image_size"], arch["patch_size"], arch["width"], arch["layers"],
                                       arch["heads"], int(arch["width"] * arch["mlp_ratio"]))
    dec = ved.decoder.config
    assert (dec.n_embd, dec.n_layer, dec.n_head, dec.vocab_size) == (gpt.n_embd, gpt.n_layer, gpt.n_head, gpt.vocab_size)
    assert dec.add_cross_attention
    # The same blocks: a ViT layer holds what an open_clip residual block does, and the GPT-2
    # decoder is capcli's plus its cross-attention.
    assert _params(_vit_layers(ved.encoder)) == _params(tiny.vision.transformer.resblocks)
    cross = sum(_params(block.crossattention) + _params(block.ln_cross_attn) for block in ved.decoder.transformer.h)
    assert _params(ved.decoder) - cross == _params(tiny.decoder)


def test_the_coca_has_the_tiny_presets_sizes(tiny) -> None:
    coca = peer_models.coca_for(tiny).model
    arch, gpt = tiny.config.vision["arch"], tiny.decoder.config
    visual = coca.visual
    assert (visual.image_size[0], visual.patch_size[0], len(visual.transformer.resblocks),
            visual.transformer.resblocks[0].attn.num_heads) == (arch["image_size"], arch["patch_size"],
                                                                arch["layers"], arch["heads"])
    assert _params(visual.transformer.resblocks) == _params(tiny.vision.transformer.resblocks)
    # Text and multimodal towers each of the decoder's width and depth (coca_ViT-B-32's have GPT-2 small's depth).
    assert _params(coca.text.transformer.resblocks) == _params(tiny.decoder.transformer.h)
    assert len(coca.text_decoder.resblocks) == len(coca.text_decoder.cross_attn) == gpt.n_layer
    assert coca.text_decoder.width == gpt.n_embd and coca.text_decoder.text_projection.shape[1] == gpt.vocab_size
    assert visual.attn_pool.query.shape[0] == tiny.config.prefix_length  # the image positions capcli's decoder reads
    # open_clip leaves the multimodal projection uninitialised (torch.empty); the peer sets it
    assert all(torch.isfinite(p).all() for p in coca.parameters())
    assert coca.text_decoder.text_projection.std().item() == pytest.approx(gpt.n_embd ** -0.5, rel=0.1)


def test_every_side_writes_the_same_number_of_tokens(tiny, tmp_path) -> None:
    from PIL import Image

    from capcli.api import ImageCaptioner

    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        Image.new("RGB", (80, 60), (40 * i, 100, 200)).save(files[-1])
    built = peer_models.build_peers(tiny, peer_models.PEERS)
    runs = [peer_captions.caption_capcli(ImageCaptioner(tiny, Runtime(torch.device('cpu')), batch_size=2), files, 3, 4),
            peer_captions.caption_ved(built["ved"], files, 2, 3, 4, nullcontext),
            peer_captions.caption_coca(built["coca"], files, 2, 3, 4, nullcontext)]
    assert [run.tokens for run in runs] == [4, 4, 4]
    assert all(len(run.captions) == 3 for run in runs)


def test_the_beam_scorer_keeps_finished_and_running_beams_by_hand() -> None:
    """One image, 2 beams, length 3 after this step. The four best continuations, best first:

    rank 0: end-of-text after row 0, sum -1 → finished, scored -1 / 3;
    rank 1: token 5 after row 1, sum -2 → running beam 0;
    rank 2: token 6 after row 0, sum -3 → running beam 1 (the beams are full; rank 3 is not used).
    One finished of two: not done.
    """
    eos = 9
    scorer = peer_captions.BeamScorer(batch_size=1, num_beams=2, device=torch.device("cpu"))
    ids = torch.tensor([[1, 2], [1, 3]])
    out = scorer.process(ids, torch.tensor([[-1.0, -2.0, -3.0, -4.0]]), torch.tensor([[eos, 5, 6, 7]]),
                         torch.tensor([[0, 1, 0, 1]]), pad_token_id=0, eos_token_id=torch.tensor([eos]))
    assert out["next_beam_scores"].tolist() == [-2.0, -3.0]
    assert out["next_beam_tokens"].tolist() == [5, 6]
    assert out["next_beam_indices"].tolist() == [1, 0]
    assert scorer._beam_hyps[0][0][0] == pytest.approx(-1 / 3) and scorer._beam_hyps[0][0][1].tolist() == [1, 2]
    assert not scorer.is_done
    # Finalize at length 3: the running beams join, scored -2/3 and -3/3; the best is the finished one.
    final = scorer.finalize(torch.tensor([[1, 3, 5], [1, 2, 6]]), out["next_beam_scores"], None, None,
                            max_length=3, pad_token_id=0, eos_token_id=eos)
    assert final["sequences"].tolist() == [[1, 2, eos]]


def test_coca_beam_search_of_one_beam_is_open_clips_greedy(tiny) -> None:
    coca = peer_models.coca_for(tiny)
    pixels = torch.randn(2, 3, tiny.image_size, tiny.image_size)
    with peer_captions.coca_generate_available():
        greedy = coca.model.generate(pixels, seq_len=7, min_seq_len=6, generation_type="top_k", top_k=1, **coca.special)
        beam = coca.model.generate(pixels, seq_len=7, min_seq_len=6, generation_type="beam_search", num_beams=1,
                                   num_beam_groups=1, **coca.special)
    assert torch.equal(greedy[:, :6], beam[:, :6])  # greedy then forces end-of-text in the last place


@pytest.mark.slow
def test_the_peers_have_the_full_size_clip_gpt2_shapes(tmp_path) -> None:
    """ViT-B/32 + GPT-2 small with random weights: the VisionEncoderDecoder matches them block for block;
    the CoCa is open_clip's coca_ViT-B-32."""
    from test_model import _gpt2_tokenizer_without_pad
    from transformers import GPT2Config, GPT2LMHeadModel

    from capcli.model.captioner import Captioner  # noqa: F401  (the Captioner built below)
    from capcli.settings import ModelSettings

    GPT2LMHeadModel(GPT2Config()).save_pretrained(str(tmp_path))
    _gpt2_tokenizer_without_pad(["a red circle"] * 20).save_pretrained(str(tmp_path))
    model = build_model(ModelSettings(preset="clip-gpt2", vision_weights="none", decoder=str(tmp_path)))
    ved = peer_models.ved_for(model).model
    assert (ved.encoder.config.hidden_size, ved.encoder.config.num_hidden_layers, ved.encoder.config.patch_size,
            ved.encoder.config.image_size) == (768, 12, 32, 224)
    assert _params(_vit_layers(ved.encoder)) == _params(model.vision.transformer.resblocks)
    cross = sum(_params(block.crossattention) + _params(block.ln_cross_attn) for block in ved.decoder.transformer.h)
    assert _params(ved.decoder) - cross == _params(model.decoder)
    coca = peer_models.coca_for(model).model
    assert _params(coca.visual.transformer.resblocks) == _params(model.vision.transformer.resblocks)
    assert coca.text_decoder.width == 512 and len(coca.text_decoder.resblocks) == 12
    assert coca.text_decoder.text_projection.shape[1] == 49408
