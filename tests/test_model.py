"""Tests for capcli.model: the Captioner's shapes, padding, causality, temperature and checkpoints.

The tiny preset is built from synthetic captions in a fraction of a second. The full-size
``clip-gpt2`` architecture (ViT-B/32 + GPT-2 124M) is built with random weights from local
directories and files written here, through the same code path as hub names, and never
touches the network (tests marked ``slow``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from capcli.data.synthetic import generate
from capcli.errors import ConfigError
from capcli.losses import IGNORE_INDEX
from capcli.model import Captioner, build_model
from capcli.model.captioner import CONFIG_FILE, WEIGHTS_FILE
from capcli.settings import ModelSettings

EXTRA_TEXT = [
    "a zebra-striped umbrella, unseen words: quokka & naïve café ☕",
    "THREE Large Hexagons   below 2 tiny stars!!",
    "",
    "   ",
    "tab\tand\nnewline",
]


def _encode(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption ids as the collator makes them: tokens, end-of-text, then right padding."""
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


def _pixels(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)


@pytest.fixture(scope="module")
def captions() -> list[str]:
    """A few dozen synthetic captions (5 per scene), the tiny tokenizer's training text."""
    return [c for index in range(8) for c in generate("train", index, seed=0)[1]]


@pytest.fixture(scope="module")
def tiny(captions: list[str]) -> Captioner:
    torch.manual_seed(0)
    return build_model(ModelSettings(), captions).eval()


# ---------------------------------------------------------------- tokenizer and padding


def test_tiny_pad_token_is_its_own_token_and_never_encodes_text(tiny: Captioner, captions: list[str]) -> None:
    tok = tiny.tokenizer
    assert tok.pad_token_id is not None
    assert tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)
    assert tok.pad_token != tok.eos_token
    assert tiny.pad_id == tok.pad_token_id
    assert tiny.decoder.config.pad_token_id == tok.pad_token_id
    assert tiny.decoder.config.vocab_size >= len(tok)  # every token, pad included, has an embedding row
    encoded = tok(captions + EXTRA_TEXT, add_special_tokens=False)["input_ids"]
    ids = {i for seq in encoded for i in seq}
    assert ids, "nothing was encoded"
    assert tok.pad_token_id not in ids
    assert tok.eos_token_id not in ids  # end-of-text only comes from the collator
    assert tok.unk_token_id is None or tok.unk_token_id not in ids  # byte-level: any text encodes
    # Byte-level BPE round-trips text it never saw.
    assert tok.decode(tok(EXTRA_TEXT[0], add_special_tokens=False)["input_ids"]) == EXTRA_TEXT[0]


def test_caption_targets_ignore_exactly_the_padding(tiny: Captioner) -> None:
    ids, mask = _encode(tiny.tokenizer, ["a red circle", "two large blue squares left of a small star", "x"])
    assert (mask == 0).any(), "the batch should contain padding"
    targets = tiny.caption_targets(ids, mask)
    assert targets.shape == ids.shape
    assert torch.equal(targets == IGNORE_INDEX, mask == 0)
    assert torch.equal(targets[mask == 1], ids[mask == 1])
    assert not (targets == tiny.pad_id).any()  # no position asks the model to predict padding


# ---------------------------------------------------------------- shapes and normalisation


def test_tiny_feature_and_embedding_shapes_are_normalised(tiny: Captioner) -> None:
    ids, mask = _encode(tiny.tokenizer, ["a red circle", "a small green star above a square", "two crosses"])
    with torch.no_grad():
        features = tiny.image_features(_pixels(3, tiny.image_size))
        image_emb = tiny.embed_image(features)
        text_emb = tiny.embed_text(ids, mask)
    assert tiny.image_size == 64
    assert features.shape == (3, 1, 512)  # the pooled vector alone: the MLP prefix reads nothing else
    assert image_emb.shape == (3, 512)
    assert text_emb.shape == (3, 512)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(3))
    # Different captions get different embeddings (the head is not collapsed).
    assert not torch.allclose(text_emb[0], text_emb[1], atol=1e-3)


def test_caption_logits_shape_and_alignment_with_the_decoder(tiny: Captioner) -> None:
    ids, mask = _encode(tiny.tokenizer, ["a red circle on a white background", "one star"])
    with torch.no_grad():
        features = tiny.image_features(_pixels(2, tiny.image_size))
        logits = tiny.caption_logits(features, ids, mask)
        prefix = tiny.prefix(features)
        k = prefix.shape[1]
        full_mask = torch.cat([torch.ones(2, k, dtype=mask.dtype), mask], dim=1)
        embeds = torch.cat([prefix, tiny.decoder.transformer.wte(ids)], dim=1)
        reference = tiny.decoder(inputs_embeds=embeds, attention_mask=full_mask).logits  # (B, K+T, V)
    batch, length = ids.shape
    assert logits.shape == (batch, length, tiny.decoder.config.vocab_size)
    assert k == 4  # the tiny preset's prefix length
    # Position K-1+t of [prefix, caption] predicts caption token t.
    real = mask.bool()
    torch.testing.assert_close(logits[real], reference[:, k - 1 : -1][real], atol=1e-5, rtol=1e-5)


def test_caption_logits_are_causal(tiny: Captioner) -> None:
    """logits[:, t] predicts token t: it may depend on tokens < t and the image, never on tokens >= t."""
    vocab = len(tiny.tokenizer)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (2, 8), generator=gen)  # 0/1 are end-of-text and pad
    mask = torch.ones_like(ids)
    with torch.no_grad():
        features = tiny.image_features(_pixels(2, tiny.image_size))
        logits = tiny.caption_logits(features, ids, mask)
        for t in range(ids.shape[1]):
            changed = ids.clone()
            shift = torch.randint(1, vocab - 2, changed[:, t:].shape, generator=gen)
            changed[:, t:] = 2 + (changed[:, t:] - 2 + shift) % (vocab - 2)  # a different real token everywhere
            assert (changed[:, t:] != ids[:, t:]).all()
            after = tiny.caption_logits(features, changed, mask)
            torch.testing.assert_close(after[:, : t + 1], logits[:, : t + 1], atol=1e-5, rtol=1e-5)
            if t + 1 < ids.shape[1]:
                assert not torch.allclose(after[:, t + 1], logits[:, t + 1], atol=1e-4), f"token {t} is ignored"
        # The first caption token is predicted from the image alone.
        other = tiny.caption_logits(tiny.image_features(_pixels(2, tiny.image_size, seed=5)), ids, mask)
    assert not torch.allclose(other[:, 0], logits[:, 0], atol=1e-4)


def test_padding_does_not_change_a_shorter_caption(tiny: Captioner) -> None:
    short, long = "a red circle", "three large purple crosses above two small cyan diamonds on beige"
    ids_alone, mask_alone = _encode(tiny.tokenizer, [short])
    ids, mask = _encode(tiny.tokenizer, [short, long])
    assert mask[0].sum() < mask.shape[1], "the short caption should be padded in the batch"
    with torch.no_grad():
        alone = tiny.embed_text(ids_alone, mask_alone)[0]
        batched = tiny.embed_text(ids, mask)
        # Whatever sits under the padding mask is ignored, not only the pad token.
        scribbled = ids.clone()
        scribbled[mask == 0] = tiny.tokenizer.eos_token_id + 7
        scribbled_emb = tiny.embed_text(scribbled, mask)
        features = tiny.image_features(_pixels(2, tiny.image_size))
        logits_alone = tiny.caption_logits(features[:1], ids_alone, mask_alone)[0]
        logits_batched = tiny.caption_logits(features, ids, mask)[0, : ids_alone.shape[1]]
    assert (alone - batched[0]).abs().max() < 1e-5
    assert (scribbled_emb[0] - batched[0]).abs().max() < 1e-5
    assert (logits_alone - logits_batched).abs().max() < 1e-4
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


@pytest.mark.parametrize("mapper", ["mlp", "transformer", "resampler"])
def test_prefix_mapper_output_shape(captions: list[str], mapper: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSettings(prefix_mapper=mapper, prefix_length=3), captions).eval()
    with torch.no_grad():
        features = model.image_features(_pixels(5, model.image_size))
        prefix = model.prefix(features)
        ids, mask = _encode(model.tokenizer, ["a circle"] * 5)
        logits = model.caption_logits(features, ids, mask)
    assert prefix.shape == (5, 3, model.decoder.config.n_embd)
    assert logits.shape == (5, ids.shape[1], model.decoder.config.vocab_size)
    names = {"mlp": "MLPMapper", "transformer": "TransformerMapper", "resampler": "Resampler"}
    assert type(model.prefix_mapper).__name__ == names[mapper]
    # The resampler reads the 8×8 patch tokens after the pooled vector; ClipCap's mappers the pooled vector alone.
    assert features.shape == (5, 65 if mapper == "resampler" else 1, 512)
    # Each image gets its own prefix.
    assert not torch.allclose(prefix[0], prefix[1], atol=1e-5)


def test_tiny_token_prefix_is_the_patch_grid_and_keeps_where_things_are(captions: list[str]) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSettings(prefix_mapper="tokens"), captions).eval()
    pixels = _pixels(2, model.image_size)
    mirrored = pixels.flip(-1)  # the same content, left and right swapped
    ids, mask = _encode(model.tokenizer, ["a red circle left of a square"] * 2)
    with torch.no_grad():
        features = model.image_features(pixels)
        prefix = model.prefix(features)
        logits = model.caption_logits(features, ids, mask)
        prefix_mirrored = model.prefix(model.image_features(mirrored))
    # The pooled vector, then one token per cell of the 8×8 grid, each projected to the decoder's width.
    assert features.shape == (2, 1 + 64, 512)
    assert prefix.shape == (2, 65, model.decoder.config.n_embd) and model.config.prefix_length == 65
    assert logits.shape == (2, ids.shape[1], model.decoder.config.vocab_size) and torch.isfinite(logits).all()
    # The decoder has room for the grid and a caption of the longest default length.
    assert model.decoder.config.n_positions >= 65 + 48 + 1
    # Each prefix position comes from its own patch: mirroring the image reorders the prefix, it is not the same.
    assert not torch.allclose(prefix[:, 1:], prefix_mirrored[:, 1:], atol=1e-4)


def test_the_token_prefix_has_no_settable_length() -> None:
    with pytest.raises(ValueError, match="prefix_length does not apply to the tokens mapper"):
        ModelSettings(prefix_mapper="tokens", prefix_length=8)


def test_patch_concepts_are_the_most_confident_patch(captions: list[str]) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSettings(concept_source="patches"), captions, ("circle", "red")).eval()
    with torch.no_grad():
        features = model.image_features(_pixels(3, model.image_size))
        per_patch = model.concept_head(features[:, 1:])  # (3, 64, 2)
        logits = model.concept_logits(features)
    assert features.shape == (3, 65, 512)  # the MLP prefix reads the pooled vector; the head needs the patches
    assert model.prefix(features).shape == (3, 4, model.decoder.config.n_embd)
    torch.testing.assert_close(logits, per_patch.max(dim=1).values)


def test_token_dropout_hides_words_from_the_decoder_in_training_only(captions: list[str]) -> None:
    from capcli.data.batches import CaptionBatch
    from capcli.losses import caption_loss
    from capcli.objectives import PretrainObjective

    torch.manual_seed(0)
    model = build_model(ModelSettings(), captions)
    texts = ["a small red circle left of a blue square", "two green stars"]
    ids, mask = _encode(model.tokenizer, texts)
    batch = CaptionBatch(_pixels(2, model.image_size), ids, mask, texts)
    read = []
    original = model.caption_logits
    model.caption_logits = lambda features, inputs, m: read.append(inputs.clone()) or original(features, inputs, m)
    objective = PretrainObjective(contrastive_weight=0.0, token_dropout=0.5)

    model.train()
    torch.manual_seed(1)
    loss = objective(model, batch, 0.0)["caption_loss"]
    dropped = read[-1] != ids
    assert dropped.any() and (read[-1][dropped] == model.pad_id).all() and not dropped[mask == 0].any()
    assert dropped[mask == 1].float().mean() < 1
    # The targets are the whole caption: the loss is that of the full targets on the dropped inputs.
    with torch.no_grad():
        by_hand = caption_loss(original(model.image_features(batch.pixels), read[-1], mask),
                               model.caption_targets(ids, mask))
    torch.testing.assert_close(loss.detach(), by_hand)

    model.eval()  # validation and decoding read every word
    objective(model, batch, 0.0)
    assert torch.equal(read[-1], ids)


def test_a_checkpoint_written_before_token_prefixes_loads_and_captions(tmp_path: Path, tiny: Captioner) -> None:
    """model.json of the earlier format has no ``concept_source``; it loads as the pooled model it was."""
    from capcli.model.generation import generate_captions

    tiny.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text(encoding="utf-8"))
    del config["concept_source"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
    loaded = Captioner.from_pretrained(tmp_path).eval()
    assert loaded.config.concept_source == "pooled" and loaded.config.prefix_mapper == "mlp"
    pixels = _pixels(2, tiny.image_size)
    assert generate_captions(loaded, pixels) == generate_captions(tiny.eval(), pixels)


# ---------------------------------------------------------------- temperature


def test_logit_scale_is_fixed_at_one_over_0_07_by_default(tiny: Captioner) -> None:
    assert tiny.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert not tiny.log_logit_scale.requires_grad
    assert all(p is not tiny.log_logit_scale for p in tiny.parameters() if p.requires_grad)


def test_learned_logit_scale_is_trainable_and_clamped_at_100(captions: list[str]) -> None:
    model = build_model(ModelSettings(learn_temperature=True, temperature=0.05), captions)
    assert model.log_logit_scale.requires_grad
    assert model.logit_scale().item() == pytest.approx(20.0, rel=1e-5)
    model.logit_scale().backward()
    assert model.log_logit_scale.grad is not None and model.log_logit_scale.grad.item() == pytest.approx(20.0, rel=1e-4)
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(1000.0))
    assert model.logit_scale().item() == pytest.approx(100.0)


# ---------------------------------------------------------------- save and load


def _assert_same_state(a: Captioner, b: Captioner) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _assert_tied(model: Captioner) -> None:
    head, wte = model.decoder.lm_head.weight, model.decoder.transformer.wte.weight
    assert head.data_ptr() == wte.data_ptr()
    with torch.no_grad():
        wte[0, 0] += 1.0
    assert torch.equal(head, wte)


def test_save_and_load_round_trip_is_exact(tmp_path: Path, captions: list[str]) -> None:
    torch.manual_seed(3)
    model = build_model(ModelSettings(learn_temperature=True, prefix_mapper="transformer"), captions).eval()
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(42.0))  # not the default, so it must come from the file
    model.save_pretrained(tmp_path / "ckpt")
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {WEIGHTS_FILE, CONFIG_FILE, "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text(encoding="utf-8"))
    assert config["preset"] == "tiny" and config["prefix_mapper"] == "transformer"

    torch.manual_seed(99)  # a different random init, overwritten by the load
    loaded = Captioner.from_pretrained(tmp_path / "ckpt").eval()
    _assert_same_state(model, loaded)
    assert loaded.logit_scale().item() == pytest.approx(42.0, rel=1e-5)
    assert loaded.log_logit_scale.requires_grad
    assert loaded.pad_id == model.pad_id and loaded.tokenizer.eos_token_id == model.tokenizer.eos_token_id
    text = ["a small red circle left of a blue star", "quokka"]
    assert loaded.tokenizer(text)["input_ids"] == model.tokenizer(text)["input_ids"]

    ids, mask = _encode(model.tokenizer, text)
    pixels = _pixels(2, model.image_size)
    with torch.no_grad():
        outputs = [(m.image_features(pixels), m.embed_text(ids, mask)) for m in (model, loaded)]
        logits = [m.caption_logits(m.image_features(pixels), ids, mask) for m in (model, loaded)]
    for a, b in zip(outputs[0], outputs[1], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(logits[0], logits[1])
    _assert_tied(loaded)


def test_checkpoint_stores_the_tied_head_once(tmp_path: Path, tiny: Captioner) -> None:
    from safetensors.torch import load_file

    tiny.save_pretrained(tmp_path)
    stored = load_file(str(tmp_path / WEIGHTS_FILE))
    assert "decoder.lm_head.weight" not in stored
    assert torch.equal(stored["decoder.transformer.wte.weight"], tiny.decoder.transformer.wte.weight)
    assert set(stored) == set(tiny.state_dict()) - {"decoder.lm_head.weight"}


def test_loading_a_checkpoint_into_a_different_mapper_raises_value_error(tmp_path: Path, tiny: Captioner,
                                                                        captions: list[str]) -> None:
    tiny.save_pretrained(tmp_path)
    other = build_model(ModelSettings(prefix_mapper="transformer"), captions)
    with pytest.raises(ValueError, match="different model") as err:
        other.load_weights(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "prefix_mapper" in str(err.value)


def test_loading_a_checkpoint_with_other_shapes_raises_value_error(tmp_path: Path, tiny: Captioner,
                                                                   captions: list[str]) -> None:
    tiny.save_pretrained(tmp_path)
    other = build_model(ModelSettings(embed_dim=256), captions)
    with pytest.raises(ValueError, match="different model"):
        other.load_weights(tmp_path)


# ---------------------------------------------------------------- offline errors


@pytest.fixture
def offline_empty_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The hub offline with an empty cache, whatever the developer's own cache holds."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _gpt2_tokenizer_without_pad(texts: list[str]):
    """A GPT-2-style byte-level BPE with only <|endoftext|>, as GPT-2 itself ships (no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _small_decoder_dir(directory: Path, captions: list[str]) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _gpt2_tokenizer_without_pad(captions)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def test_offline_missing_decoder_is_a_config_error_naming_it(offline_empty_hub: Path) -> None:
    settings = ModelSettings(preset="clip-gpt2", vision_weights="none", decoder="gpt2")
    with pytest.raises(ConfigError) as err:
        build_model(settings)
    message = str(err.value)
    assert "'gpt2'" in message
    assert "HF_HOME" in message and "local path" in message
    assert "--decoder" in message


def test_offline_missing_vision_weights_is_a_config_error_naming_them(offline_empty_hub: Path, tmp_path: Path,
                                                                       captions: list[str]) -> None:
    decoder = _small_decoder_dir(tmp_path / "decoder", captions)
    settings = ModelSettings(preset="clip-gpt2", vision_weights="openai", decoder=str(decoder))
    with pytest.raises(ConfigError) as err:
        build_model(settings)
    message = str(err.value)
    assert "'openai'" in message and "ViT-B-32" in message
    assert "HF_HOME" in message and "local path" in message
    assert "--vision-weights" in message


def test_missing_local_vision_file_is_a_config_error(tmp_path: Path, captions: list[str]) -> None:
    decoder = _small_decoder_dir(tmp_path / "decoder", captions)
    missing = tmp_path / "nowhere" / "vit.pt"
    settings = ModelSettings(preset="clip-gpt2", vision_weights=str(missing), decoder=str(decoder))
    with pytest.raises(ConfigError, match="cannot load vision weights") as err:
        build_model(settings)
    assert str(missing) in str(err.value)


# ---------------------------------------------------------------- full-size clip-gpt2, offline


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory, captions: list[str]) -> dict:
    """A full-size (124M) random GPT-2 and a pad-less BPE tokenizer, saved as a local decoder directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("gpt2-random")
    tokenizer = _gpt2_tokenizer_without_pad(captions + EXTRA_TEXT)
    torch.manual_seed(0)
    decoder = GPT2LMHeadModel(GPT2Config())
    decoder.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    fingerprint = {
        "c_attn": decoder.transformer.h[0].attn.c_attn.weight.detach().clone(),
        "wpe": decoder.transformer.wpe.weight.detach().clone(),
        "wte": decoder.transformer.wte.weight.detach().clone(),
    }
    return {"path": directory, "tokens": len(tokenizer), "fingerprint": fingerprint}


@pytest.fixture(scope="module")
def vit_b32_file(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A random ViT-B-32 CLIP state dict saved as open_clip loads local checkpoints (torch.save of the full CLIP)."""
    import open_clip

    torch.manual_seed(1)
    clip = open_clip.create_model("ViT-B-32")
    path = tmp_path_factory.mktemp("vit-b-32") / "vit-b-32-random.pt"
    torch.save(clip.state_dict(), path)
    return {"path": path, "visual": {k: v.detach().clone() for k, v in clip.visual.state_dict().items()}}


def _forbid_hub_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to fetch pretrained parts fail loudly: a checkpoint must rebuild from itself."""
    import open_clip
    from transformers import GPT2LMHeadModel

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained must not load pretrained towers")

    monkeypatch.setattr(open_clip, "create_model", refuse)
    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained", refuse)


@pytest.mark.slow
def test_clip_gpt2_builds_offline_from_a_local_decoder_and_round_trips(
    gpt2_dir: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_empty_hub: Path
) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSettings(preset="clip-gpt2", vision_weights="none", decoder=str(gpt2_dir["path"])))
    model.eval()

    # Vision: ViT-B/32 at 224 px, projected to 512.
    arch = model.config.vision["arch"]
    assert arch == {"image_size": 224, "patch_size": 32, "width": 768, "layers": 12, "heads": 12,
                    "mlp_ratio": 4.0, "output_dim": 512}
    assert model.vision.conv1.out_channels == 768 and model.vision.conv1.kernel_size == (32, 32)
    assert len(model.vision.transformer.resblocks) == 12
    assert model.vision.output_dim == 512 and model.image_size == 224

    # Decoder: GPT-2 small, with the local weights loaded, not a fresh init.
    cfg = model.decoder.config
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head) == (768, 12, 12)
    fp = gpt2_dir["fingerprint"]
    assert torch.equal(model.decoder.transformer.h[0].attn.c_attn.weight, fp["c_attn"])
    assert torch.equal(model.decoder.transformer.wpe.weight, fp["wpe"])

    # A pad token was added, distinct from end-of-text; the embedding grew (or kept its size), never shrank.
    tok = model.tokenizer
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)
    assert tok.pad_token_id == gpt2_dir["tokens"]  # appended after the original vocabulary
    assert cfg.vocab_size >= 50257 and cfg.vocab_size == model.decoder.transformer.wte.weight.shape[0]
    assert cfg.pad_token_id == tok.pad_token_id < cfg.vocab_size
    assert torch.equal(model.decoder.transformer.wte.weight[:50257], fp["wte"])
    assert model.config.prefix_length == 10

    ids, mask = _encode(tok, ["a red circle", "two large blue squares left of a small green star"])
    pixels = _pixels(2, 224)
    with torch.no_grad():
        features = model.image_features(pixels)
        prefix = model.prefix(features)
        logits = model.caption_logits(features, ids, mask)
        text = model.embed_text(ids, mask)
    assert features.shape == (2, 1, 512)
    assert prefix.shape == (2, 10, 768)
    assert logits.shape == (2, ids.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()
    assert text.shape == (2, 512)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))

    model.save_pretrained(tmp_path / "ckpt")
    _forbid_hub_loading(monkeypatch)
    loaded = Captioner.from_pretrained(tmp_path / "ckpt").eval()
    _assert_same_state(model, loaded)
    with torch.no_grad():
        again_features = loaded.image_features(pixels)
        assert torch.equal(again_features, features)
        assert torch.equal(loaded.caption_logits(again_features, ids, mask), logits)
        assert torch.equal(loaded.embed_text(ids, mask), text)
    assert loaded.pad_id == tok.pad_token_id
    _assert_tied(loaded)


@pytest.mark.slow
@pytest.mark.parametrize(("mapper", "length"), [("tokens", 50), ("resampler", 32)])
def test_clip_gpt2_token_prefixes_read_the_vit_b32_grid(gpt2_dir: dict, offline_empty_hub: Path, mapper: str,
                                                        length: int) -> None:
    """ViT-B/32 at 224 px has a 7×7 grid: 49 patch tokens after the pooled vector, projected to 512."""
    torch.manual_seed(0)
    model = build_model(ModelSettings(preset="clip-gpt2", vision_weights="none", decoder=str(gpt2_dir["path"]),
                                      prefix_mapper=mapper)).eval()
    ids, mask = _encode(model.tokenizer, ["a red circle", "two large blue squares left of a small green star"])
    with torch.no_grad():
        features = model.image_features(_pixels(2, 224))
        prefix = model.prefix(features)
        logits = model.caption_logits(features, ids, mask)
    assert features.shape == (2, 1 + 49, 512)
    assert prefix.shape == (2, length, 768) and model.config.prefix_length == length
    assert logits.shape == (2, ids.shape[1], model.decoder.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_clip_gpt2_loads_vision_weights_from_a_local_open_clip_file(vit_b32_file: dict, tmp_path: Path,
                                                                     captions: list[str]) -> None:
    decoder = _small_decoder_dir(tmp_path / "decoder", captions)
    model = build_model(ModelSettings(preset="clip-gpt2", vision_weights=str(vit_b32_file["path"]),
                                      decoder=str(decoder)))
    state = model.vision.state_dict()
    expected = vit_b32_file["visual"]
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert str(vit_b32_file["path"]) in model.config.vision["weights"]


@pytest.mark.slow
def test_clip_gpt2_grows_a_full_vocabulary_by_one_row_for_the_pad(tmp_path: Path, captions: list[str]) -> None:
    """When the decoder's embedding has exactly one row per token, the added pad token gets a new row."""
    from transformers import GPT2LMHeadModel

    directory = _small_decoder_dir(tmp_path / "decoder", captions)
    original = GPT2LMHeadModel.from_pretrained(str(directory)).transformer.wte.weight.detach().clone()
    model = build_model(ModelSettings(preset="clip-gpt2", vision_weights="none", decoder=str(directory)))
    rows = original.shape[0]
    assert model.tokenizer.pad_token_id == rows
    assert model.decoder.config.vocab_size == rows + 1 == len(model.tokenizer)
    assert torch.equal(model.decoder.transformer.wte.weight[:rows], original)
    assert model.decoder.lm_head.weight.data_ptr() == model.decoder.transformer.wte.weight.data_ptr()


@pytest.mark.slow
def test_openai_vision_weights_get_quick_gelu(vit_b32_file: dict, tmp_path: Path, captions: list[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import open_clip.factory

    from capcli.model.vit import QuickGELU

    # Stand in for the download: the 'openai' tag resolves to a local file of the right shape.
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *a, **k: str(vit_b32_file["path"]))
    decoder = _small_decoder_dir(tmp_path / "decoder", captions)
    model = build_model(ModelSettings(preset="clip-gpt2", vision_weights="openai", decoder=str(decoder)))
    assert model.config.vision["quick_gelu"] is True
    assert isinstance(model.vision.transformer.resblocks[0].mlp.gelu, QuickGELU)



# ---------------------------------------------------------------- speed options


def test_gpt2_gelu_runs_as_the_fused_tanh_gelu_with_the_same_values(tiny: Captioner) -> None:
    from transformers.activations import ACT2FN

    mlp = tiny.decoder.transformer.h[0].mlp
    assert tiny.decoder.config.activation_function == "gelu_pytorch_tanh"
    x = torch.linspace(-6, 6, 1001)
    assert torch.allclose(mlp.act(x), ACT2FN["gelu_new"](x), atol=1e-6)


def test_gradient_checkpointing_switches_both_towers(tiny: Captioner) -> None:
    tiny.set_gradient_checkpointing(True)
    try:
        assert tiny.vision.transformer.grad_checkpointing
        assert tiny.decoder.transformer.gradient_checkpointing
    finally:
        tiny.set_gradient_checkpointing(False)
    assert not tiny.vision.transformer.grad_checkpointing and not tiny.decoder.transformer.gradient_checkpointing


def test_compile_blocks_keeps_the_parameter_names(captions: list[str]) -> None:
    model = build_model(ModelSettings(), captions)
    names = list(model.state_dict())
    model.compile_blocks()
    assert list(model.state_dict()) == names
    assert all(block._compiled_call_impl is not None for block in model.decoder.transformer.h)


def test_fused_adamw_is_used_where_the_device_has_it(tiny: Captioner) -> None:
    from capcli.settings import OptimizerSettings
    from capcli.train.optim import build_optimizer

    assert build_optimizer(tiny, OptimizerSettings(), torch.device("cpu")).defaults["fused"] is True
    assert not build_optimizer(tiny, OptimizerSettings(fused=False), torch.device("cpu")).defaults["fused"]


@pytest.mark.slow(seconds=40)
def test_clip_gpt2_from_a_local_vision_file_and_decoder_trains_a_step_and_captions(
    gpt2_dir: dict, vit_b32_file: dict, tmp_path: Path, data_cache: Path, offline_empty_hub: Path
) -> None:
    """The full-size preset end to end on CPU, through the CLI: the weights come from a local
    open_clip file and a save_pretrained directory, loaded by the path that names would use."""
    from typer.testing import CliRunner

    from capcli.cli import app

    runner = CliRunner()
    run = tmp_path / "run"
    env = {"CAPCLI_DATA__CACHE_DIR": str(data_cache), "CAPCLI_PRETRAIN__ENGINE__GRAD_ACCUM": "1"}
    result = runner.invoke(app, ["pretrain", "--model", "clip-gpt2", "--vision-weights", str(vit_b32_file["path"]),
                                 "--decoder", str(gpt2_dir["path"]), "--max-steps", "1", "--batch-size", "2",
                                 "--train-size", "4", "--val-size", "2", "--test-size", "2", "--device", "cpu",
                                 "--output", str(run), "--quiet", "--json"], env=env)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 1 and math.isfinite(summary["train"]["loss"])
    saved = json.loads((run / "checkpoints" / "best" / CONFIG_FILE).read_text())
    assert saved["vision"]["weights"] == f"open_clip:ViT-B-32:{vit_b32_file['path']}"
    assert saved["decoder"]["weights"] == f"transformers:{gpt2_dir['path']}"
    image = next((data_cache).rglob("test/*.png"))
    captioned = runner.invoke(app, ["caption", str(image), "--checkpoint", str(run), "--beams", "2",
                                    "--max-length", "5", "--format", "jsonl"])
    assert captioned.exit_code == 0, captioned.output
    line = json.loads(captioned.stdout)
    assert line["path"] == str(image) and isinstance(line["caption"], str) and line["tokens"] >= 1


@pytest.mark.parametrize(("setting", "quick"), [(None, False), (True, True)])
def test_a_local_vision_file_takes_quick_gelu_from_the_setting(vit_b32_file: dict, tmp_path: Path,
                                                               captions: list[str], setting, quick: bool) -> None:
    """A file carries no activation: GELU unless model.vision_quick_gelu says the weights are OpenAI's."""
    from capcli.model.vit import QuickGELU

    decoder = _small_decoder_dir(tmp_path / "decoder", captions)
    model = build_model(ModelSettings(preset="clip-gpt2", vision_weights=str(vit_b32_file["path"]),
                                      decoder=str(decoder), vision_quick_gelu=setting))
    assert model.config.vision["quick_gelu"] is quick
    assert isinstance(model.vision.transformer.resblocks[0].mlp.gelu, QuickGELU) is quick
    rebuilt = Captioner(model.config, model.tokenizer)  # a checkpoint rebuilds the same activation
    assert isinstance(rebuilt.vision.transformer.resblocks[0].mlp.gelu, QuickGELU) is quick
