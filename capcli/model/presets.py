"""Model presets: what `--model tiny` and `--model clip-gpt2` build (DESIGN §3)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice

from capcli.data.concepts import concept_slots
from capcli.model.captioner import Captioner, CaptionerConfig
from capcli.model.tokenizer import load_tokenizer, train_bpe
from capcli.model.towers import (
    TINY_VOCAB,
    decoder_spec_tiny,
    load_pretrained_decoder,
    patch_tokens,
    vision_spec_open_clip,
    vision_spec_tiny,
)
from capcli.settings import ModelSettings

PREFIX_LENGTH = {"tiny": 4, "clip-gpt2": 10}  # ClipCap uses 10 for GPT-2
RESAMPLER_LENGTH = {"tiny": 16, "clip-gpt2": 32}  # BLIP-2's Q-Former has 32 queries
SLOT_CAPTIONS = 50_000  # the captions a pretrained decoder's concept slots are read from


def prefix_length(settings: ModelSettings, vision: dict) -> int:
    """K, the prefix length: as set, else the preset's default for the mapper; the tokens
    mapper's is the tower's patch grid plus the pooled vector."""
    if settings.prefix_mapper == "tokens":
        return 1 + patch_tokens(vision)
    defaults = RESAMPLER_LENGTH if settings.prefix_mapper == "resampler" else PREFIX_LENGTH
    return settings.prefix_length or defaults[settings.preset]


def build_model(settings: ModelSettings, captions: Iterable[str] = (), concept_words: Sequence[str] = ()) -> Captioner:
    """Build a fresh Captioner for a preset.

    Args:
        settings: the model settings group.
        captions: training captions: the tiny preset's tokenizer learns from them, and the concept
            words' slots (``concept_slots``) are read from them.
        concept_words: the words its concept head detects; none, no head.
    """
    # Kept: the tiny preset's tokenizer learns from all of them; the concept slots need only the first ones.
    captions = list(captions if settings.preset == "tiny" else islice(captions, SLOT_CAPTIONS if concept_words else 0))
    if settings.preset == "tiny":
        tokenizer = train_bpe(captions, vocab_size=TINY_VOCAB)
        vision, vision_state = vision_spec_tiny(), None
        decoder_spec = decoder_spec_tiny(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                         tokenizer.pad_token_id, prefix_length(settings, vision))
        pretrained_decoder = None
    else:
        vision, vision_state = vision_spec_open_clip("ViT-B-32", settings.vision_weights or "openai",
                                                     settings.vision_quick_gelu)
        source = settings.decoder or "gpt2"
        pretrained_decoder = load_pretrained_decoder(source)  # first: its error says how to provide the files
        tokenizer = load_tokenizer(source)
        # Grow (never shrink) the embedding so the added pad token has a row of its own.
        pretrained_decoder.resize_token_embeddings(max(len(tokenizer), pretrained_decoder.config.vocab_size))
        pretrained_decoder.config.pad_token_id = tokenizer.pad_token_id
        decoder_spec = {"config": pretrained_decoder.config.to_dict(), "weights": f"transformers:{source}"}

    config = CaptionerConfig(
        preset=settings.preset,
        embed_dim=settings.embed_dim,
        prefix_length=prefix_length(settings, vision),
        prefix_mapper=settings.prefix_mapper,
        temperature=settings.temperature,
        learn_temperature=settings.learn_temperature,
        vision=vision,
        decoder=decoder_spec,
        concept_words=list(concept_words),
        concept_source=settings.concept_source,
        # Tags sit on the patch tokens and need the head that reads them: elsewhere there is nothing to add.
        concept_tags=bool(settings.concept_tags and concept_words and settings.prefix_mapper == "tokens"
                          and settings.concept_source == "patches"),
        concept_slots=concept_slots(captions, concept_words) if concept_words else [],
    )
    model = Captioner(config, tokenizer)
    if vision_state is not None:
        model.vision.load_state_dict(vision_state)
    if pretrained_decoder is not None:
        model.decoder.load_state_dict(pretrained_decoder.state_dict())
    return model

