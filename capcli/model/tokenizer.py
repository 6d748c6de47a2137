"""Tokenizers: a byte-level BPE trained on the captions (tiny preset) or GPT-2's own.

Either way the pad token is a token of its own, never end-of-text or a word piece, so
padding can never be mistaken for text (ClipCap padded with a real token id).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe(captions: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE on caption text.

    Args:
        captions: the training captions (only train: val/test text must not shape the vocabulary).
        vocab_size: the target size, including the 256 byte symbols and the two special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(captions, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=PAD)


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer by hub name or directory and make sure it has a dedicated pad token."""
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    return with_pad_token(tokenizer)


def with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add ``<|pad|>`` unless the tokenizer already has a pad token distinct from end-of-text.

    GPT-2 ships without one, and the common fix (pad = eos) makes every padded position look
    like a real end-of-text, so it is not taken here.
    """
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD})
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    return tokenizer
